"""Gauges for the nodes of a Ray cluster (`runtime: ray`), read at scrape time.

Kept apart from the GPU gauges so that their labels stay the same on one machine and on a
cluster: `modelyard_gpu_node_info` joins a cluster-wide GPU number to its node and its
number there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class NodeCollector(Collector):
    def __init__(
        self,
        nodes: Callable[[], list[dict[str, Any]]],
        gpus: Callable[[], list[dict[str, object]]],
        model_nodes: Callable[[], dict[str, str | None]],
    ) -> None:
        self._nodes = nodes
        self._gpus = gpus
        self._model_nodes = model_nodes

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        up, gpu_info, engines, model_node = families = self._families()
        for node in self._nodes():
            up.add_metric([str(node["node"])], 1.0 if node["alive"] else 0.0)
            engines.add_metric([str(node["node"])], float(node.get("engines", 0)))
        for gpu in self._gpus():
            if gpu.get("node"):
                labels = [str(gpu["index"]), str(gpu["node"]), str(gpu.get("node_gpu", ""))]
                gpu_info.add_metric(labels, 1.0)
        for model, where in self._model_nodes().items():
            if where:
                model_node.add_metric([model, where], 1.0)
        return families

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "modelyard_node_up", "1 while a Ray node answers, 0 once lost.", labels=["node"]
            ),
            GaugeMetricFamily(
                "modelyard_gpu_node_info",
                "Always 1: which node a GPU is on, and its number there.",
                labels=["gpu", "node", "node_gpu"],
            ),
            GaugeMetricFamily(
                "modelyard_node_engines", "Engines running on each node.", labels=["node"]
            ),
            GaugeMetricFamily(
                "modelyard_model_node",
                "1 for the node each running model's engine is on.",
                labels=["model", "node"],
            ),
        ]
