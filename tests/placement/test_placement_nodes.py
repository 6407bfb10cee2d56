"""Placement across the nodes of a cluster: one engine never spans two nodes."""

from __future__ import annotations

from modelyard.placement.policy import CannotFit, GpuCapacity, Plan, Target, plan_placement

GIB = 1024**3


def cluster(*nodes: tuple[str, int]) -> list[GpuCapacity]:
    gpus, index = [], 0
    for node, count in nodes:
        for _ in range(count):
            gpus.append(GpuCapacity(index, 24 * GIB, node=node))
            index += 1
    return gpus


def test_tensor_parallel_stays_on_one_node():
    gpus = cluster(("10.0.0.1", 1), ("10.0.0.2", 2), ("10.0.0.3", 1))
    plan = plan_placement(
        Target("big", 20 * GIB, tensor_parallel=2), gpus, [], now=0.0, host_ram_for_sleep=None
    )
    assert isinstance(plan, Plan)
    assert plan.gpus == (1, 2)  # the two GPUs of 10.0.0.2, never 0 and 1
    assert "of node 10.0.0.2" in plan.explanation


def test_tensor_parallel_wider_than_every_node_cannot_fit():
    gpus = cluster(("10.0.0.1", 1), ("10.0.0.2", 1))
    plan = plan_placement(
        Target("big", 20 * GIB, tensor_parallel=2), gpus, [], now=0.0, host_ram_for_sleep=None
    )
    assert isinstance(plan, CannotFit)
    assert "on one node" in plan.reason


def test_one_machine_without_nodes_is_unchanged():
    gpus = [GpuCapacity(0, 24 * GIB), GpuCapacity(1, 24 * GIB)]
    plan = plan_placement(
        Target("big", 20 * GIB, tensor_parallel=2), gpus, [], now=0.0, host_ram_for_sleep=None
    )
    assert isinstance(plan, Plan)
    assert plan.gpus == (0, 1)
    assert "node" not in plan.explanation
