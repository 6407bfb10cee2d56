"""The fair queue's decisions, on the event loop with a virtual clock (no engine, no sleeps):
an interactive key is not queued behind a backlog, weights share the slots, a key's own limit
holds, a full queue says when to come back, and a waiter that leaves is gone."""

from __future__ import annotations

import asyncio

import pytest

from modelyard.auth.principal import ShareTerms
from modelyard.sharing.fair_queue import FairQueues, QueueFull, Slot
from tests.fakes import FakeClock

ONE = ShareTerms()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class Served:
    """Waiters that record the order they were granted in."""

    def __init__(self, queues: FairQueues) -> None:
        self.queues = queues
        self.order: list[str] = []
        self.slots: list[Slot] = []
        self.tasks: list[asyncio.Task[None]] = []

    def send(self, model: str, limit: int | None, key: str, share: ShareTerms = ONE) -> None:
        async def one() -> None:
            slot = await self.queues.admit(model, limit, key, share, max_waiting=10_000)
            self.order.append(key)
            self.slots.append(slot)

        self.tasks.append(asyncio.create_task(one()))

    def finish_oldest(self) -> None:
        self.queues.release(self.slots.pop(0))


async def test_an_interactive_key_goes_ahead_of_a_backlog() -> None:
    queues = FairQueues(FakeClock())
    served = Served(queues)
    for _ in range(200):
        served.send("chat", 4, "batch")
    await _settle()
    assert served.order == ["batch"] * 4
    served.send("chat", 4, "person")
    await _settle()
    served.finish_oldest()
    await _settle()
    assert served.order[-1] == "person", "the next free slot is the person's"
    for task in served.tasks:
        task.cancel()


async def test_weights_share_the_slots_within_ten_percent() -> None:
    clock = FakeClock()
    queues = FairQueues(clock)
    served = Served(queues)
    heavy, light = ShareTerms(weight=3.0), ShareTerms(weight=1.0)
    for _ in range(400):
        served.send("batch", 4, "heavy", heavy)
        served.send("batch", 4, "light", light)
    await _settle()
    # A minute of 1-second requests on 4 slots: 240 finish.
    for _ in range(240):
        clock.now += 0.25
        served.finish_oldest()
        await _settle()
    counts = queues.counts()["batch"]
    ratio = counts["heavy"].served / counts["light"].served
    assert abs(ratio - 3.0) / 3.0 < 0.10, counts
    for task in served.tasks:
        task.cancel()
    await _settle()


async def test_priority_goes_first_and_order_within_a_key_is_kept() -> None:
    queues = FairQueues(FakeClock())
    served = Served(queues)
    served.send("m", 1, "first")
    await _settle()
    served.send("m", 1, "low", ShareTerms(priority=5))
    served.send("m", 1, "urgent", ShareTerms(priority=-5))
    await _settle()
    served.finish_oldest()
    await _settle()
    assert served.order == ["first", "urgent"]
    for task in served.tasks:
        task.cancel()


async def test_a_keys_own_limit_holds_across_models() -> None:
    queues = FairQueues(FakeClock())
    served = Served(queues)
    capped = ShareTerms(max_in_flight=2)
    served.send("a", None, "k", capped)
    served.send("b", None, "k", capped)
    served.send("a", None, "k", capped)
    await _settle()
    assert len(served.order) == 2
    assert queues.waiting("a") == 1
    served.finish_oldest()  # a slot of model a ends: the waiter on a may go
    await _settle()
    assert len(served.order) == 3
    for task in served.tasks:
        task.cancel()


async def test_a_full_queue_says_when_to_come_back() -> None:
    queues = FairQueues(FakeClock())
    slot = await queues.admit("m", 1, "k", ONE, max_waiting=1)
    waiter = asyncio.create_task(queues.admit("m", 1, "k", ONE, max_waiting=1))
    await _settle()
    with pytest.raises(QueueFull) as refused:
        await queues.admit("m", 1, "other", ONE, max_waiting=1)
    assert 1.0 <= refused.value.retry_after <= 60.0
    queues.release(slot)
    queues.release(await waiter)


async def test_a_waiter_that_hangs_up_leaves_the_queue() -> None:
    queues = FairQueues(FakeClock())
    slot = await queues.admit("m", 1, "a", ONE, max_waiting=10)
    leaving = asyncio.create_task(queues.admit("m", 1, "b", ONE, max_waiting=10))
    staying = asyncio.create_task(queues.admit("m", 1, "c", ONE, max_waiting=10))
    await _settle()
    assert queues.waiting("m") == 2
    leaving.cancel()
    await _settle()
    assert queues.waiting("m") == 1
    queues.release(slot)
    granted = await staying
    assert granted.key == "c"
    assert queues.in_flight("m") == 1
    counts = queues.counts()["m"]
    assert counts["b"].waiting == 0
    assert counts["b"].served == 0


async def test_the_bound_across_all_models_holds_too() -> None:
    queues = FairQueues(FakeClock())
    held = [await queues.admit(m, 1, "k", ONE, max_waiting=10) for m in ("a", "b")]
    waiter = asyncio.create_task(queues.admit("a", 1, "k", ONE, 10, max_waiting_total=1))
    await _settle()
    with pytest.raises(QueueFull):
        await queues.admit("b", 1, "k", ONE, 10, max_waiting_total=1)
    for slot in held:
        queues.release(slot)
    queues.release(await waiter)


async def test_a_slot_freed_in_the_turn_a_waiter_hangs_up_goes_to_the_next_one() -> None:
    """A client disconnects (its task is cancelled) and, before the cancelled waiter runs
    again, another request ends: the slot must skip the leaver, not fail to grant it (this
    raised InvalidStateError in the request that ended, at realistic timings in CI)."""
    queues = FairQueues(FakeClock())
    served = Served(queues)
    served.send("chat", 1, "a")
    served.send("chat", 1, "leaver")
    served.send("chat", 1, "b")
    await _settle()
    assert served.order == ["a"]
    served.tasks[1].cancel()
    served.finish_oldest()  # same turn: the leaver's clean-up has not run yet
    await _settle()
    assert served.order == ["a", "b"]
    assert served.tasks[1].cancelled()
    assert queues.in_flight("chat") == 1
    assert queues.waiting("chat") == 0
    assert queues.counts()["chat"]["leaver"].waiting == 0
    served.finish_oldest()
    assert queues.in_flight("chat") == 0
