"""The cluster as a placement inventory, from agents' reports (no cluster needed)."""

from __future__ import annotations

import pytest

from modelyard.config.schema import RayConfig
from modelyard.observability.events import EventBus
from modelyard.runtime.process import EngineStartError
from modelyard.runtime.ray.cluster import NodeView, RayCluster

GIB = 1024**3


def report(*gpus: tuple[int, int], held: dict[int, dict[int, int]] | None = None) -> dict:
    return {
        "hostname": "box",
        "gpus": [{"index": i, "name": "H100", "total": 80 * GIB, "used": used} for i, used in gpus],
        "held": held or {},
        "problem": None,
    }


def cluster_of(*nodes: tuple[str, dict]) -> tuple[RayCluster, EventBus]:
    events = EventBus()
    cluster = RayCluster(RayConfig(), events)
    for node_id, first in nodes:
        view = NodeView(node_id, f"10.0.0.{len(cluster.nodes) + 1}")
        cluster.nodes[node_id] = view
        cluster._take_report(view, first)
    return cluster, events


def test_gpus_are_numbered_across_nodes_and_keep_their_numbers():
    cluster, events = cluster_of(("n1", report((0, 0), (1, 0))), ("n2", report((0, 5 * GIB))))
    gpus = cluster.gpus()
    assert [(g.index, g.node, g.local_index) for g in gpus] == [
        (0, "10.0.0.1", 0),
        (1, "10.0.0.1", 1),
        (2, "10.0.0.2", 0),
    ]
    assert gpus[2].free_bytes == 75 * GIB
    assert cluster.locate(2) == ("n2", 0)
    assert cluster.node_gpus([1, 2, 99, "x"]) == [1, 0]  # unknown numbers are skipped
    lost: list[tuple[str, str]] = []
    cluster.on_node_lost(lambda node_id, reason: lost.append((node_id, reason)))
    cluster.mark_lost("n1", "its agent is gone")
    cluster.mark_lost("n1", "again")  # said once
    assert [g.index for g in cluster.gpus()] == [2]  # n2 keeps its number
    assert lost == [("n1", "node 10.0.0.1 is lost: its agent is gone")]
    kinds = [e.kind for e in events.recent(10)]
    assert kinds.count("node_lost") == 1
    view = NodeView("n3", "10.0.0.3")
    cluster.nodes["n3"] = view
    cluster._take_report(view, report((0, 0)))
    assert [g.index for g in cluster.gpus()] == [2, 3]


def test_engine_memory_is_read_on_the_engine_s_own_node():
    # The same pid on two nodes is two processes: each engine is looked up where it runs.
    cluster, _ = cluster_of(
        ("n1", report((0, 0), held={4242: {0: 10 * GIB}})),
        ("n2", report((0, 0), held={4242: {0: 30 * GIB}})),
    )
    assert cluster.process_memory([4242]) == {}  # not started by this gateway
    cluster.engine_started("n2", 4242)
    assert cluster.process_memory([4242]) == {1: 30 * GIB}
    cluster.engine_gone("n2", 4242)
    assert cluster.process_memory([4242]) == {}


def test_a_cluster_without_gpus_runs_engines_unplanned(tmp_path):
    from modelyard.config.schema import GatewayConfig
    from modelyard.gateway import _placement_for

    config = GatewayConfig.model_validate({"runtime": "ray", "models": {}})
    cpu_only, _ = cluster_of(("n1", report()), ("n2", report()))
    assert _placement_for(config, tmp_path, EventBus(), cpu_only) is None
    with_gpus, _ = cluster_of(("n1", report()), ("n2", report((0, 0))))
    assert _placement_for(config, tmp_path, EventBus(), with_gpus) is not None


def test_the_runtime_starts_an_engine_on_the_node_of_its_gpus(tmp_path):
    from modelyard.engines.base import LaunchSpec
    from modelyard.runtime.ray.engine import RayRuntime

    cluster, _ = cluster_of(("n1", report((0, 0), (1, 0))), ("n2", report((0, 0), (1, 0))))
    runtime = RayRuntime(cluster, tmp_path, health_session=None)  # type: ignore[arg-type]
    # Placement chose cluster-wide GPUs 2 and 3: the second node's GPUs 0 and 1.
    spec = LaunchSpec(argv=["x"], env={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert runtime._choose_node(spec) == ("n2", "0,1")
    # GPUs of two nodes for one engine are refused (the policy never plans that).
    split = LaunchSpec(argv=["x"], env={"CUDA_VISIBLE_DEVICES": "1,2"})
    with pytest.raises(EngineStartError, match="cannot span nodes"):
        runtime._choose_node(split)
    # Without GPUs: the live node with the fewest engines.
    cluster.mark_lost("n1", "gone")
    assert runtime._choose_node(LaunchSpec(argv=["x"])) == ("n2", None)
