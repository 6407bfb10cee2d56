"""The fair queues per API key and model as Prometheus series, read at scrape time from
`sharing.fair_queue` (so they cannot drift from what the queue holds). The key's *name* is
the label, never the key; names are bounded by the keys an admin made."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from modelyard.sharing.fair_queue import KeyCounts

Counts = Callable[[], dict[str, dict[str, KeyCounts]]]


class KeyQueueCollector(Collector):
    def __init__(self, counts: Counts) -> None:
        self._counts = counts

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        waiting, in_flight, served, queued, wait_seconds = families
        for model, keys in self._counts().items():
            for key, counts in keys.items():
                labels = [key, model]
                waiting.add_metric(labels, counts.waiting)
                in_flight.add_metric(labels, counts.in_flight)
                served.add_metric(labels, counts.served)
                queued.add_metric(labels, counts.queued)
                wait_seconds.add_metric(labels, counts.wait_seconds)
        return families

    @staticmethod
    def _families() -> tuple[
        GaugeMetricFamily,
        GaugeMetricFamily,
        CounterMetricFamily,
        CounterMetricFamily,
        CounterMetricFamily,
    ]:
        labels = ["key", "model"]
        return (
            GaugeMetricFamily(
                "modelyard_key_queue_waiting",
                "Requests waiting for a model's turn (max_in_flight reached), by key and model.",
                labels=labels,
            ),
            GaugeMetricFamily(
                "modelyard_key_queue_in_flight",
                "Requests holding a turn at a model, by key and model.",
                labels=labels,
            ),
            CounterMetricFamily(
                "modelyard_key_queue_served",
                "Requests given a turn at a model (at once or after waiting), by key and model.",
                labels=labels,
            ),
            CounterMetricFamily(
                "modelyard_key_queue_waited",
                "Requests that had to wait for their turn, by key and model.",
                labels=labels,
            ),
            CounterMetricFamily(
                "modelyard_key_queue_wait_seconds",
                "Seconds requests waited for their turn, summed, by key and model.",
                labels=labels,
            ),
        )
