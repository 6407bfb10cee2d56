"""The cluster as a placement inventory, from agents' reports (no cluster needed)."""

from __future__ import annotations

from modelyard.config.schema import RayConfig
from modelyard.observability.events import EventBus
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
