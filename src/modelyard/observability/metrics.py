"""Prometheus metrics for one gateway, served at `GET /metrics`.

Each gateway owns its own `CollectorRegistry` (never the global one), so tests and embedding
applications can run several gateways in one process. Counters and histograms are fed by two
hooks the gateway already has: every proxied request (`observe_request`) and every event
(`observe_event`). Everything that is a *state* (engine states, queues, GPU memory,
footprints) is read from the gateway at scrape time instead, so it can never drift from the
truth. Every metric is documented in docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from modelyard import __version__
from modelyard.lifecycle import ModelState
from modelyard.observability.events import Event

if TYPE_CHECKING:
    from modelyard.observability.requests import RequestRecord

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
START_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600)
WAKE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60)

# Route labels come from request paths; past this many distinct values new ones are counted
# as "other", so a client sending random paths cannot grow the registry without bound.
MAX_ROUTE_LABELS = 100
OTHER = "other"


PREWARM_OUTCOMES = {
    "prewarm": "made",
    "prewarm_kept": "kept",
    "prewarm_used": "used",
    "prewarm_wasted": "wasted",
}


class SchedulerView(Protocol):
    """What the metrics read from the scheduler."""

    def models(self) -> list[str]: ...

    def state_of(self, name: str) -> ModelState: ...

    def load_counts(self, name: str) -> tuple[int, int]: ...


class GatewayView(Protocol):
    """The parts of `Gateway` read at scrape time (a stub in unit tests)."""

    @property
    def scheduler(self) -> SchedulerView: ...

    @property
    def started_at(self) -> float: ...

    def gpu_status(self) -> list[dict[str, object]]: ...

    def model_status(self, name: str) -> dict[str, object]: ...

    def events_dropped(self) -> int: ...


class _BoundedLabel:
    """Passes label values through until `limit` distinct ones were seen, then says OTHER."""

    def __init__(self, limit: int) -> None:
        self._seen: set[str] = set()
        self._limit = limit

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


class GatewayMetrics:
    """The gateway's metrics registry and the two hooks that feed it."""

    def __init__(self, gateway: GatewayView, model_names: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self._route = _BoundedLabel(MAX_ROUTE_LABELS)
        self.requests = Counter(
            "modelyard_requests",
            "Proxied requests by model, route, API key name and HTTP status.",
            ["model", "route", "key", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "modelyard_request_duration_seconds",
            "Time from receiving a request to its last byte, including any cold start.",
            ["model", "route"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.first_token = Histogram(
            "modelyard_time_to_first_token_seconds",
            "Streamed requests: time from forwarding to the engine to its first chunk.",
            ["model", "route"],
            buckets=FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "modelyard_prompt_tokens",
            "Prompt (input) tokens, from the engine's usage report.",
            ["model"],
            registry=registry,
        )
        self.completion_tokens = Counter(
            "modelyard_completion_tokens",
            "Completion (output) tokens, from the engine's usage report.",
            ["model"],
            registry=registry,
        )
        per_model = ["model"]
        self.cold_starts = Counter(
            "modelyard_cold_starts", "Engine starts begun.", per_model, registry=registry
        )
        self.start_failures = Counter(
            "modelyard_start_failures", "Engine starts that failed.", per_model, registry=registry
        )
        self.wakes = Counter(
            "modelyard_wakes", "Sleeping engines woken.", per_model, registry=registry
        )
        self.wake_failures = Counter(
            "modelyard_wake_failures", "Wakes that failed.", per_model, registry=registry
        )
        self.sleeps = Counter(
            "modelyard_sleeps", "Engines put to sleep.", per_model, registry=registry
        )
        self.evictions = Counter(
            "modelyard_evictions",
            "Engines evicted (stopped or put to sleep) to make room on a GPU.",
            per_model,
            registry=registry,
        )
        self.crashes = Counter(
            "modelyard_crashes", "Engines that exited unexpectedly.", per_model, registry=registry
        )
        self.stops = Counter(
            "modelyard_stops",
            "Engines stopped on purpose (idle, admin, eviction, shutdown).",
            per_model,
            registry=registry,
        )
        self.events = Counter(
            "modelyard_events", "Events of every kind.", ["kind"], registry=registry
        )
        self.prewarms = Counter(
            "modelyard_prewarms",
            "Pre-warms by outcome: made, kept (an idle engine kept up), used (asked for before it "
            "went), wasted.",
            ["model", "outcome"],
            registry=registry,
        )
        self.prewarm_spared = Counter(
            "modelyard_prewarm_spared_seconds",
            "Load-wait that pre-warms spared the requests that came for them.",
            per_model,
            registry=registry,
        )
        self.fallbacks = Counter(
            "modelyard_fallbacks",
            "Requests for a refused model served by one of its fallbacks, by why it was refused.",
            ["model", "fallback", "reason"],
            registry=registry,
        )
        self.start_duration = Histogram(
            "modelyard_start_duration_seconds",
            "Cold start time: from launching the engine until it answered its health check.",
            per_model,
            buckets=START_BUCKETS,
            registry=registry,
        )
        self.wake_duration = Histogram(
            "modelyard_wake_duration_seconds",
            "Wake time of a sleeping engine.",
            per_model,
            buckets=WAKE_BUCKETS,
            registry=registry,
        )
        self._per_model_counters = (
            self.cold_starts,
            self.start_failures,
            self.wakes,
            self.wake_failures,
            self.sleeps,
            self.evictions,
            self.crashes,
            self.stops,
        )
        for name in model_names:
            # Series that exist from the start at 0, so rate() and alerts see the first event.
            for counter in self._per_model_counters:
                counter.labels(name)
            self.start_duration.labels(name)
            self.wake_duration.labels(name)
        self._request_children: dict[tuple[str, str, str, int], tuple[Any, ...]] = {}
        registry.register(LiveStateCollector(gateway))
        ProcessCollector(registry=registry)

    # ----- hooks -----

    def observe_request(self, record: RequestRecord) -> None:
        # The hot path: labelled children are looked up once per label set, then cached
        # (prometheus_client's labels() validates and locks on every call).
        key = (record.model, record.route, record.key_name, record.status)
        children = self._request_children.get(key)
        if children is None:
            route = self._route(record.route)
            children = (
                self.requests.labels(record.model, route, record.key_name, str(record.status)),
                self.request_duration.labels(record.model, route),
                self.first_token.labels(record.model, route),
                self.prompt_tokens.labels(record.model),
                self.completion_tokens.labels(record.model),
            )
            if len(self._request_children) < 10_000:
                self._request_children[key] = children
        children[0].inc()
        children[1].observe(record.duration_s)
        if record.streamed and record.first_byte_s is not None:
            children[2].observe(record.first_byte_s)
        if record.prompt_tokens:
            children[3].inc(record.prompt_tokens)
        if record.completion_tokens:
            children[4].inc(record.completion_tokens)

    def observe_event(self, event: Event) -> None:
        self.events.labels(event.kind).inc()
        if event.model is None:
            return
        model = event.model
        counter = {
            "start": self.cold_starts,
            "start_failed": self.start_failures,
            "wake": self.wakes,
            "wake_failed": self.wake_failures,
            "sleep": self.sleeps,
            "evict": self.evictions,
            "crash": self.crashes,
            "hung": self.crashes,  # the watchdog stopped it: a crash the engine did not notice
            "stop": self.stops,
        }.get(event.kind)
        if counter is not None:
            counter.labels(model).inc()
        outcome = PREWARM_OUTCOMES.get(event.kind)
        if outcome is not None:
            self.prewarms.labels(model, outcome).inc()
            if outcome == "used" and event.duration_s:
                self.prewarm_spared.labels(model).inc(event.duration_s)
        if event.kind == "fallback":
            fallback, reason = event.data.get("fallback"), event.data.get("refusal")
            if isinstance(fallback, str) and isinstance(reason, str):
                self.fallbacks.labels(model, fallback, reason).inc()
        if event.duration_s is None:
            return
        if event.kind == "ready":
            self.start_duration.labels(model).observe(event.duration_s)
        elif event.kind == "wake":
            self.wake_duration.labels(model).observe(event.duration_s)

    def exposition(self) -> bytes:
        """The Prometheus text format (version 0.0.4)."""
        return generate_latest(self.registry)


class LiveStateCollector(Collector):
    """Gauges read from the gateway at scrape time: states, queues, GPUs, footprints."""

    def __init__(self, gateway: GatewayView) -> None:
        self._gateway = gateway

    def describe(self) -> Iterable[Metric]:
        # Declared so the registry knows the names; values come only from collect().
        return self._families()

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        state, in_flight, queued, footprint = families[:4]
        scheduler = self._gateway.scheduler
        for name in scheduler.models():
            current = scheduler.state_of(name)
            for known in ModelState:
                state.add_metric([name, known.value], 1.0 if current is known else 0.0)
            running, waiting = scheduler.load_counts(name)
            in_flight.add_metric([name], running)
            queued.add_metric([name], waiting)
            status = self._gateway.model_status(name)
            size = status.get("footprint_bytes")
            if isinstance(size, int | float):
                footprint.add_metric([name], size)
            self._replicas(name, status.get("replicas"), families[9], families[10])
        total, used, planned = families[4:7]
        for gpu in self._gateway.gpu_status():
            labels = [str(gpu.get("index", "")), str(gpu.get("name") or "")]
            for family, key in (
                (total, "total_bytes"),
                (used, "used_bytes"),
                (planned, "planned_bytes"),
            ):
                value = gpu.get(key)
                if isinstance(value, int | float):
                    family.add_metric(labels, value)
        info, started = families[7:9]
        info.add_metric([__version__], 1.0)
        started.add_metric([], self._gateway.started_at)
        dropped = CounterMetricFamily(
            "modelyard_events_dropped",
            "Events not kept in the history: its write queue was full (the database stayed "
            "locked or failing for long), or the write was given up at shutdown.",
        )
        dropped.add_metric([], float(self._gateway.events_dropped()))
        return [*families, dropped]

    @staticmethod
    def _replicas(
        name: str, replicas: object, count: GaugeMetricFamily, per_engine: GaugeMetricFamily
    ) -> None:
        """The model's running engines, and each engine's requests in flight."""
        if not isinstance(replicas, dict):
            return
        count.add_metric([name], float(replicas.get("running", 0)))
        for engine in replicas.get("engines", []):
            per_engine.add_metric([name, str(engine["key"])], float(engine["in_flight"]))

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        gpu = ["gpu", "gpu_name"]
        return [
            GaugeMetricFamily(
                "modelyard_engine_state",
                "1 for the state each model is in, 0 for the others.",
                labels=["model", "state"],
            ),
            GaugeMetricFamily(
                "modelyard_in_flight_requests",
                "Requests being served by each model's engine.",
                labels=["model"],
            ),
            GaugeMetricFamily(
                "modelyard_queue_depth",
                "Requests waiting for each model to start or wake.",
                labels=["model"],
            ),
            GaugeMetricFamily(
                "modelyard_model_footprint_bytes",
                "GPU memory each model's engine needs (measured, or estimated before it ran).",
                labels=["model"],
            ),
            GaugeMetricFamily(
                "modelyard_gpu_memory_total_bytes", "Total memory of each GPU.", labels=gpu
            ),
            GaugeMetricFamily(
                "modelyard_gpu_memory_used_bytes",
                "Memory in use on each GPU, by any process.",
                labels=gpu,
            ),
            GaugeMetricFamily(
                "modelyard_gpu_memory_planned_bytes",
                "Memory the placement plan assigns on each GPU to running and starting engines.",
                labels=gpu,
            ),
            GaugeMetricFamily(
                "modelyard_info", "Always 1; the gateway version is a label.", labels=["version"]
            ),
            GaugeMetricFamily(
                "modelyard_start_time_seconds", "When the gateway started (Unix time)."
            ),
            GaugeMetricFamily(
                "modelyard_model_replicas",
                "Engines of each model ready, starting or waking (replicas).",
                labels=["model"],
            ),
            GaugeMetricFamily(
                "modelyard_replica_in_flight_requests",
                "Requests being served by each engine of a model (replica: the engine's key).",
                labels=["model", "replica"],
            ),
        ]
