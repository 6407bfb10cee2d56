"""Merging the engines' own metrics into one scrape target."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from modelyard.observability.engine_metrics import merge_expositions

VLLM = """# HELP vllm:num_requests_running Number of requests running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{model_name="{name}"}} {running}
# HELP vllm:prompt_tokens_total Prefill tokens.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{model_name="{name}"}} {tokens}
# HELP vllm:e2e_request_latency_seconds Latency.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{{le="1.0",model_name="{name}"}} 1.0
vllm:e2e_request_latency_seconds_bucket{{le="+Inf",model_name="{name}"}} 2.0
vllm:e2e_request_latency_seconds_count{{model_name="{name}"}} 2.0
vllm:e2e_request_latency_seconds_sum{{model_name="{name}"}} 3.5
"""


def test_families_are_merged_and_labelled_by_model() -> None:
    text = merge_expositions(
        {
            "chat": VLLM.format(name="llama", running=2, tokens=10),
            "coder": VLLM.format(name="qwen", running=0, tokens=99),
            "down": None,
            "garbage": "this is { not prometheus",
        }
    ).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # One family per name: Prometheus rejects a name whose TYPE line appears twice.
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1
    running = {s.labels["model"]: s.value for s in families["vllm:num_requests_running"].samples}
    assert running == {"chat": 2.0, "coder": 0.0}
    tokens = {s.labels["model"]: s.value for s in families["vllm:prompt_tokens"].samples}
    assert tokens == {"chat": 10.0, "coder": 99.0}
    assert families["vllm:prompt_tokens"].type == "counter"
    latency = families["vllm:e2e_request_latency_seconds"]
    assert latency.type == "histogram"
    assert {s.name for s in latency.samples} == {
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_sum",
    }
    up = {s.labels["model"]: s.value for s in families["modelyard_engine_metrics_up"].samples}
    assert up == {"chat": 1.0, "coder": 1.0, "down": 0.0, "garbage": 0.0}


def test_an_engine_label_named_model_is_kept_as_exported_model() -> None:
    text = '# TYPE x gauge\nx{model="inner"} 1.0\n'
    merged = merge_expositions({"outer": text}).decode()
    (sample,) = [s for f in text_string_to_metric_families(merged) if f.name == "x"
                 for s in f.samples]  # fmt: skip
    assert sample.labels == {"model": "outer", "replica": "outer", "exported_model": "inner"}


def test_each_replica_is_labelled_by_its_model_and_its_key() -> None:
    merged = merge_expositions(
        {
            "coder": VLLM.format(name="qwen", running=4, tokens=10),
            "coder#2": VLLM.format(name="qwen", running=3, tokens=7),
            "chat": None,
        },
        {"coder": "coder", "coder#2": "coder", "chat": "chat"},
    ).decode()
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    running = {
        (s.labels["model"], s.labels["replica"]): s.value
        for s in families["vllm:num_requests_running"].samples
    }
    assert running == {("coder", "coder"): 4.0, ("coder", "coder#2"): 3.0}
    up = {
        (s.labels["model"], s.labels["replica"]): s.value
        for s in families["modelyard_engine_metrics_up"].samples
    }
    assert up == {("coder", "coder"): 1.0, ("coder", "coder#2"): 1.0, ("chat", "chat"): 0.0}


def test_no_engines_running_is_a_valid_exposition() -> None:
    text = merge_expositions({}).decode()
    assert [f.name for f in text_string_to_metric_families(text)] == ["modelyard_engine_metrics_up"]
