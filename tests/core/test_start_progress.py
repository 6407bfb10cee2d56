"""The start deadline decided by progress, on a virtual clock: vLLM's real log lines and a
growing cache folder keep a start alive; silence for `start_timeout` is a hang; nothing passes
`start_timeout_max`."""

from __future__ import annotations

from pathlib import Path

from modelyard.runtime.start_progress import Phase, StartProgress
from tests.vllm_log import download_lines, vllm_start_lines

MINUTE = 60.0


def test_phases_follow_vllms_own_lines() -> None:
    progress = StartProgress(0.0, 300, 3600)
    seen = []
    for at, line in vllm_start_lines(total_s=100, download=True):
        progress.observe_line(line, at)
        seen.append(progress.phase)
    assert [phase for i, phase in enumerate(seen) if i == 0 or seen[i - 1] != phase] == [
        Phase.STARTING,
        Phase.DOWNLOADING,
        Phase.LOADING_WEIGHTS,
        Phase.COMPILING,
        Phase.READY,
    ]


def test_shard_lines_give_a_fraction() -> None:
    progress = StartProgress(0.0, 300, 3600)
    line = "Loading safetensors checkpoint shards:  50% Completed | 2/4 [00:05<00:05, 2.60s/it]"
    assert progress.observe_line(line, 10.0)
    view = progress.view(12.0)
    assert (view.phase, view.fraction) == (Phase.LOADING_WEIGHTS, 0.5)
    assert view.describe() == "loading weights 50 % (2/4 shards)"
    assert view.to_json() == {
        "phase": "loading weights",
        "fraction": 0.5,
        "elapsed_s": 12.0,
        "detail": "2/4 shards",
    }


def test_a_six_minute_download_outlives_a_five_minute_start_timeout() -> None:
    progress = StartProgress(0.0, 5 * MINUTE, 60 * MINUTE)
    now = 0.0
    for at, line in download_lines(duration_s=6 * MINUTE, every_s=10):
        now = at
        progress.observe_line(line, now)
        assert progress.verdict(now).keep, (now, line)
    assert now >= 6 * MINUTE - 10
    assert progress.phase is Phase.DOWNLOADING
    # and then the loading goes on as usual
    for at, line in vllm_start_lines(total_s=60, download=False):
        progress.observe_line(line, now + at)
        assert progress.verdict(now + at).keep
    assert progress.phase is Phase.READY


def test_cache_growth_alone_is_progress() -> None:
    progress = StartProgress(0.0, 5 * MINUTE, 60 * MINUTE)
    size = 0
    for second in range(0, 8 * 60, 30):
        size += 500_000_000
        progress.observe_cache_bytes(size, float(second))
        assert progress.verdict(float(second)).keep
    assert progress.phase is Phase.DOWNLOADING
    assert progress.view(480.0).describe() == "downloading (8.0 GB)"


def test_a_silent_start_is_a_hang_after_start_timeout() -> None:
    progress = StartProgress(0.0, 5 * MINUTE, 60 * MINUTE)
    progress.observe_line("Loading safetensors checkpoint shards: 25% Completed | 1/4 [...]", 20)
    assert progress.verdict(20 + 5 * MINUTE - 1).keep
    verdict = progress.verdict(20 + 5 * MINUTE)
    assert (verdict.keep, verdict.reason) == (False, "hung")
    assert progress.deadline() == 20 + 5 * MINUTE
    assert "no progress for 300s while loading weights" in progress.failure_message(320)


def test_a_log_that_repeats_itself_is_not_progress() -> None:
    progress = StartProgress(0.0, 10.0, 3600.0)
    line = "Loading safetensors checkpoint shards:  50% Completed | 2/4 [00:05<00:05, 2.60s/it]"
    assert progress.observe_line(line, 1.0)
    for second in range(2, 11):
        assert not progress.observe_line(line, float(second))  # stuck at 50 %, says it loudly
        assert not progress.observe_line("INFO some other chatter " * 50, float(second))
    assert progress.verdict(11.0).reason == "hung"


def test_going_backwards_is_not_progress() -> None:
    progress = StartProgress(0.0, 10.0, 3600.0)
    progress.observe_line("Loading weights took 3.2 seconds", 1.0)
    assert progress.phase is Phase.COMPILING
    assert not progress.observe_line("Fetching 4 files:  75%|███| 3/4", 5.0)
    assert not progress.observe_line(
        "Loading safetensors checkpoint shards: 75% Completed | 3/4", 6
    )
    assert progress.phase is Phase.COMPILING


def test_a_log_that_lies_about_progress_is_capped_by_start_timeout_max() -> None:
    progress = StartProgress(0.0, 5 * MINUTE, 20 * MINUTE)
    second = 0
    # a new file every minute, each bar forever climbing: "progress" that never ends
    while progress.verdict(float(second)).keep:
        progress.observe_line(f"shard-{second}.safetensors:  {second % 100}%|█| 1G/9G [", second)
        second += 1
        assert second < 10_000
    assert second == 20 * MINUTE
    assert progress.verdict(float(second)).reason == "too_long"
    assert "start_timeout_max 1200s" in progress.failure_message(float(second))


def test_a_flood_of_endless_lines_costs_no_more_than_a_short_one() -> None:
    progress = StartProgress(0.0, 5.0, 60.0)
    huge = "x" * 10_000_000 + " Loading safetensors checkpoint shards: 25% Completed | 1/4"
    assert progress.observe_line(huge, 1.0)  # only the line's end is read
    assert progress.fraction == 0.25


def test_start_timeout_max_is_never_below_start_timeout() -> None:
    assert StartProgress(0.0, 300, 60).start_timeout_max == 300


# A vLLM 0.32 start on a CPU, as the demo's engine logged it (paths shortened).
VLLM_032_START = (Path(__file__).parent / "vllm_0.32_cpu_start.log").read_text()


def test_a_real_vllm_032_start_is_read_step_by_step() -> None:
    progress = StartProgress(0.0, 300, 3600)
    moved = [
        progress.observe_line(line, float(i)) for i, line in enumerate(VLLM_032_START.splitlines())
    ]
    assert moved == [
        False,  # the banner
        False,
        True,  # engine init
        True,  # starting to load
        True,
        True,
        True,  # shards 0 %
        True,  # shards 100 %
        False,  # the same 100 % again
        True,  # loading weights took: compiling
        True,  # KV cache size
        True,  # init engine took
        True,  # supported tasks
        True,  # server up
    ]
    assert progress.phase is Phase.READY
    # repeating a milestone is not progress
    assert not progress.observe_line("Initializing a V1 LLM engine (v0.32.0)", 20.0)
