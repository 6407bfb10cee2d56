"""vLLM's start, as its log tells it: the lines a real `vllm serve` prints while it downloads,
loads its weights, compiles and comes up, each at a time within a start of `total_s` seconds.

The wording is vLLM's (0.10/0.11, as its users' logs show it); the timestamps and figures are
made up. Used by the unit tests of the progress tracker and by `fake_engine.py --vllm-start`.
"""

from __future__ import annotations

PREFIX = "(EngineCore_DP0 pid=4242) INFO 12-07 03:00:00"
SHARDS = 4


def download_lines(
    duration_s: float, every_s: float, files: int = SHARDS
) -> list[tuple[float, str]]:
    """Hugging Face hub's bars while vLLM downloads `files` shards over `duration_s`."""
    lines: list[tuple[float, str]] = []
    steps = max(int(duration_s / every_s), files)
    per_file = max(steps // files, 1)
    for step in range(steps):
        index, within = divmod(step, per_file)
        index = min(index, files - 1)
        percent = min(100, int((within + 1) / per_file * 100))
        name = f"model-{index + 1:05d}-of-{files:05d}.safetensors"
        got = 4.92 * percent / 100
        lines.append(
            (
                step * every_s,
                f"{name}:  {percent}%|████      | {got:.2f}G/4.92G "
                f"[00:{step % 60:02d}<00:30, 74.1MB/s]",
            )
        )
    return lines


def vllm_start_lines(
    total_s: float, download: bool, model: str = "Qwen/Qwen2.5-7B-Instruct"
) -> list[tuple[float, str]]:
    """The whole start: (seconds from launch, line), last line at `total_s`."""
    lines: list[tuple[float, str]] = [
        (0.0, "INFO 12-07 03:00:00 [api_server.py:1896] vLLM API server version 0.11.0"),
        (0.01 * total_s, f"{PREFIX} [gpu_model_runner.py:2602] Starting to load model {model}..."),
        (
            0.02 * total_s,
            f"{PREFIX} [weight_utils.py:392] Using model weights format ['*.safetensors']",
        ),
    ]
    loading_from = 0.03
    if download:
        span = 0.45 * total_s
        lines += [
            (0.03 * total_s + at, line)
            for at, line in download_lines(span, every_s=max(span / 24, 0.1))
        ]
        lines.append(
            (
                0.49 * total_s,
                f"{PREFIX} [weight_utils.py:413] Time spent downloading weights for {model}: "
                f"{span:.6f} seconds",
            )
        )
        loading_from = 0.5
    shard_span = 0.2 * total_s
    for done in range(SHARDS + 1):
        percent = done * 100 // SHARDS
        lines.append(
            (
                loading_from * total_s + shard_span * done / SHARDS,
                f"Loading safetensors checkpoint shards: {percent:3d}% Completed | "
                f"{done}/{SHARDS} [00:{done * 2:02d}<00:{(SHARDS - done) * 2:02d}, 2.10s/it]",
            )
        )
    after = loading_from * total_s + shard_span
    lines += [
        (
            after + 0.01,
            f"{PREFIX} [default_loader.py:267] Loading weights took {shard_span:.2f} seconds",
        ),
        (
            after + 0.02,
            f"{PREFIX} [gpu_model_runner.py:2653] Model loading took 14.2488 GiB and "
            f"{shard_span + 1:.6f} seconds",
        ),
        (
            after + 0.05 * total_s,
            f"{PREFIX} [backends.py:548] Using cache directory: "
            "/root/.cache/vllm/torch_compile_cache/0f1e2d3c4b/rank_0_0/backbone "
            "for vLLM's torch.compile",
        ),
        (after + 0.1 * total_s, f"{PREFIX} [monitor.py:34] torch.compile takes 9.87 s in total"),
    ]
    graphs_from = after + 0.12 * total_s
    graphs_span = max(total_s - 0.02 * total_s - graphs_from, 0.1)
    for step in range(5):
        lines.append(
            (
                graphs_from + graphs_span * step / 4,
                "Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): "
                f"{step * 25:3d}%|████      | {step * 67 // 4}/67 [00:0{step}<00:03, 18.2it/s]",
            )
        )
    lines += [
        (
            total_s - 0.01 * total_s,
            f"{PREFIX} [core.py:210] init engine (profile, create kv cache, warmup model) took "
            f"{total_s * 0.4:.2f} seconds",
        ),
        (
            total_s - 0.005 * total_s,
            "INFO 12-07 03:01:00 [api_server.py:1971] Starting vLLM API server 0 on http://127.0.0.1:8000",
        ),
        (total_s, "INFO:     Application startup complete."),
    ]
    return sorted(lines, key=lambda item: item[0])
