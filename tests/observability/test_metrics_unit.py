"""The metrics registry in-process, against a stub gateway: exact values, no timing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from modelyard.observability.events import EventBus
from modelyard.observability.metrics import MAX_ROUTE_LABELS, OTHER, GatewayMetrics
from modelyard.observability.requests import RequestRecord
from modelyard.scheduler.supervisor import ModelState


@dataclass
class StubModel:
    state: ModelState = ModelState.STOPPED
    in_flight: int = 0
    waiting: int = 0


@dataclass
class StubScheduler:
    supervisors: dict[str, StubModel] = field(default_factory=dict)

    def models(self) -> list[str]:
        return list(self.supervisors)

    def state_of(self, name: str) -> ModelState:
        return self.supervisors[name].state

    def load_counts(self, name: str) -> tuple[int, int]:
        model = self.supervisors[name]
        return model.in_flight, model.waiting


@dataclass
class StubGateway:
    scheduler: StubScheduler
    started_at: float = 1_700_000_000.0
    gpus: list[dict[str, object]] = field(default_factory=list)
    footprints: dict[str, int] = field(default_factory=dict)
    dropped_events: int = 0

    def events_dropped(self) -> int:
        return self.dropped_events

    def gpu_status(self) -> list[dict[str, object]]:
        return self.gpus

    def model_status(self, name: str) -> dict[str, object]:
        return {"name": name, "footprint_bytes": self.footprints.get(name)}


def samples(metrics: GatewayMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: GatewayMetrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


def record(**changes: Any) -> RequestRecord:
    base: dict[str, Any] = {
        "model": "chat",
        "route": "/v1/chat",
        "key_name": "alice",
        "status": 200,
        "duration_s": 0.2,
        "first_byte_s": 0.05,
        "streamed": False,
        "prompt_tokens": 5,
        "completion_tokens": 7,
    }
    return RequestRecord(**{**base, **changes})


def make(**gateway: Any) -> tuple[StubGateway, GatewayMetrics]:
    stub = StubGateway(StubScheduler({"chat": StubModel(), "coder": StubModel()}), **gateway)
    return stub, GatewayMetrics(stub, stub.scheduler.supervisors)


def test_state_queue_gpu_and_footprint_are_read_at_scrape_time() -> None:
    stub, metrics = make()
    assert value(metrics, "modelyard_engine_state", model="chat", state="stopped") == 1.0
    assert value(metrics, "modelyard_gpu_memory_total_bytes", gpu="0", gpu_name="A") is None
    stub.scheduler.supervisors["chat"] = StubModel(ModelState.READY, in_flight=3, waiting=2)
    stub.gpus = [
        {"index": 0, "name": "A", "total_bytes": 100, "used_bytes": 40, "planned_bytes": 60},
        {"index": 1, "name": "B", "total_bytes": 200, "used_bytes": 0, "planned_bytes": None},
    ]
    stub.footprints = {"chat": 4096}
    assert value(metrics, "modelyard_engine_state", model="chat", state="ready") == 1.0
    assert value(metrics, "modelyard_engine_state", model="chat", state="stopped") == 0.0
    assert value(metrics, "modelyard_in_flight_requests", model="chat") == 3.0
    assert value(metrics, "modelyard_queue_depth", model="chat") == 2.0
    assert value(metrics, "modelyard_gpu_memory_total_bytes", gpu="0", gpu_name="A") == 100.0
    assert value(metrics, "modelyard_gpu_memory_used_bytes", gpu="0", gpu_name="A") == 40.0
    assert value(metrics, "modelyard_gpu_memory_planned_bytes", gpu="0", gpu_name="A") == 60.0
    assert value(metrics, "modelyard_gpu_memory_planned_bytes", gpu="1", gpu_name="B") is None
    assert value(metrics, "modelyard_model_footprint_bytes", model="chat") == 4096.0
    assert value(metrics, "modelyard_model_footprint_bytes", model="coder") is None
    assert value(metrics, "modelyard_start_time_seconds") == 1_700_000_000.0
    assert value(metrics, "modelyard_events_dropped_total") == 0.0
    stub.dropped_events = 7  # the history's write queue overflowed behind a locked database
    assert value(metrics, "modelyard_events_dropped_total") == 7.0


def test_requests_durations_and_tokens() -> None:
    _, metrics = make()
    metrics.observe_request(record())
    metrics.observe_request(record(streamed=True, first_byte_s=0.3, duration_s=1.5))
    metrics.observe_request(record(status=503, prompt_tokens=None, completion_tokens=None))
    assert value(metrics, "modelyard_requests_total", model="chat", route="/v1/chat",
                 key="alice", status="200") == 2.0  # fmt: skip
    assert value(metrics, "modelyard_requests_total", model="chat", route="/v1/chat",
                 key="alice", status="503") == 1.0  # fmt: skip
    labels = {"model": "chat", "route": "/v1/chat"}
    assert value(metrics, "modelyard_request_duration_seconds_count", **labels) == 3.0
    assert value(metrics, "modelyard_request_duration_seconds_sum", **labels) == 1.9
    assert value(metrics, "modelyard_request_duration_seconds_bucket", le="0.25", **labels) == 2
    # Only streamed requests have a first token worth measuring.
    assert value(metrics, "modelyard_time_to_first_token_seconds_count", **labels) == 1.0
    assert value(metrics, "modelyard_time_to_first_token_seconds_bucket", le="0.25", **labels) == 0
    assert value(metrics, "modelyard_prompt_tokens_total", model="chat") == 10.0
    assert value(metrics, "modelyard_completion_tokens_total", model="chat") == 14.0


def test_random_routes_cannot_grow_the_registry_without_bound() -> None:
    _, metrics = make()
    for number in range(MAX_ROUTE_LABELS + 50):
        metrics.observe_request(record(route=f"/chat/x{number}"))
    routes = {dict(labels)["route"] for name, labels in samples(metrics)
              if name == "modelyard_requests_total"}  # fmt: skip
    assert len(routes) == MAX_ROUTE_LABELS + 1
    assert value(metrics, "modelyard_requests_total", model="chat", route=OTHER, key="alice",
                 status="200") == 50.0  # fmt: skip


def test_events_feed_lifecycle_counters_and_durations() -> None:
    _, metrics = make()
    bus = EventBus()
    bus.add_sink(metrics.observe_event)
    assert value(metrics, "modelyard_crashes_total", model="coder") == 0.0  # exists from the start
    bus.emit("start", "chat", "request")
    bus.emit("ready", "chat", "started", 12.0)
    bus.emit("sleep", "chat", "idle", 0.5, level=1)
    bus.emit("wake", "chat", "request", 0.8)
    bus.emit("evict", "chat", "room for coder")
    bus.emit("stop", "chat", "evicted", 1.0)
    bus.emit("start", "coder", "request")
    bus.emit("start_failed", "coder", "exit code 3", 2.0)
    bus.emit("crash", "chat", "exit code -9")
    bus.emit("state_file_corrupt", None, "moved aside")
    for name, expected in (
        ("modelyard_cold_starts_total", {"chat": 1, "coder": 1}),
        ("modelyard_start_failures_total", {"chat": 0, "coder": 1}),
        ("modelyard_sleeps_total", {"chat": 1, "coder": 0}),
        ("modelyard_wakes_total", {"chat": 1, "coder": 0}),
        ("modelyard_evictions_total", {"chat": 1, "coder": 0}),
        ("modelyard_stops_total", {"chat": 1, "coder": 0}),
        ("modelyard_crashes_total", {"chat": 1, "coder": 0}),
    ):
        for model, count in expected.items():
            assert value(metrics, name, model=model) == count, (name, model)
    assert value(metrics, "modelyard_start_duration_seconds_count", model="chat") == 1.0
    assert value(metrics, "modelyard_start_duration_seconds_sum", model="chat") == 12.0
    assert value(metrics, "modelyard_start_duration_seconds_bucket", model="chat", le="10.0") == 0
    assert value(metrics, "modelyard_start_duration_seconds_bucket", model="chat", le="20.0") == 1
    assert value(metrics, "modelyard_wake_duration_seconds_count", model="chat") == 1.0
    assert value(metrics, "modelyard_start_duration_seconds_count", model="coder") == 0.0
    assert value(metrics, "modelyard_events_total", kind="start") == 2.0
    assert value(metrics, "modelyard_events_total", kind="state_file_corrupt") == 1.0


def test_each_gateway_has_its_own_registry() -> None:
    _, first = make()
    _, second = make()
    first.observe_request(record())
    assert value(first, "modelyard_prompt_tokens_total", model="chat") == 5.0
    assert value(second, "modelyard_prompt_tokens_total", model="chat") is None
