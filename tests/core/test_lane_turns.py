"""A burst of requests is taken in turns (proxy/fastpath.LaneCore.take_turn).

When 1,000 clients ask for streams in the same millisecond, their requests are all readable
in one turn of the event loop. Started all at once, every one of them goes through each stage
together (parsed, then connecting to its engine, then sending), and the first answers leave
only after the last request has been read. Taken START_PER_TURN per turn, in order, the first
ones reach their engines while later ones still wait. These tests drive the real protocol
objects with recording transports (tests/core/test_stream_relay.py) and count loop turns.
"""

from __future__ import annotations

import asyncio
import json

from modelyard.proxy.fastpath import START_PER_TURN, FastProtocol, FastRequest, LaneCore
from tests.core.test_stream_relay import RecordingTransport

BODY = json.dumps({"model": "chat", "stream": True, "messages": []}).encode()
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


class EveryRequestLane(LaneCore):
    def __init__(self) -> None:
        super().__init__(
            fallback=asyncio.Protocol, max_body=1 << 20, connect_timeout=5, read_timeout=60
        )
        self.started: list[int] = []

    def eligible(self, request: FastRequest) -> bool:
        return True


class NumberedProtocol(FastProtocol):
    """Records when its request starts, and holds it (an engine that has not answered yet)."""

    def __init__(self, lane: EveryRequestLane, number: int) -> None:
        super().__init__(lane)
        self.number = number
        self.answered = asyncio.get_running_loop().create_future()

    async def _serve(self, request: FastRequest) -> None:
        lane = self.lane
        assert isinstance(lane, EveryRequestLane)
        lane.started.append(self.number)
        await self.answered


def connect(lane: EveryRequestLane, count: int) -> list[NumberedProtocol]:
    protocols = []
    for number in range(count):
        protocol = NumberedProtocol(lane, number)
        protocol.connection_made(RecordingTransport())  # type: ignore[arg-type]
        protocols.append(protocol)
    return protocols


async def test_a_burst_is_started_a_turn_at_a_time_in_the_order_it_came():
    lane = EveryRequestLane()
    protocols = connect(lane, 300)
    for protocol in protocols:  # all readable in the same turn
        protocol.data_received(REQUEST)
    # This turn took its share; the rest wait, read but not parsed.
    assert sum(p.task is not None for p in protocols) == START_PER_TURN
    assert all(p.waiting for p in protocols[START_PER_TURN:])
    turns = 0
    while len(lane.started) < 300:
        await asyncio.sleep(0)
        turns += 1
        assert turns < 50
    # At most one turn's share at a time, and first come, first started.
    assert turns >= 300 // START_PER_TURN
    assert lane.started == list(range(300))
    for protocol in protocols:
        protocol.answered.set_result(None)
    await asyncio.gather(*(p.task for p in protocols if p.task is not None))


async def test_a_client_that_hangs_up_while_waiting_for_its_turn_is_never_started():
    lane = EveryRequestLane()
    protocols = connect(lane, START_PER_TURN + 10)
    for protocol in protocols:
        protocol.data_received(REQUEST)
    gone = protocols[START_PER_TURN + 3]
    gone.connection_lost(None)
    for _ in range(5):
        await asyncio.sleep(0)
    assert gone.number not in lane.started
    assert gone.task is None
    assert len(lane.started) == len(protocols) - 1
    for protocol in protocols:
        protocol.answered.set_result(None)
    await asyncio.gather(*(p.task for p in protocols if p.task is not None))


async def test_a_request_that_comes_in_pieces_still_starts_once():
    # A hostile or slow client: the head byte by byte while the lane is busy with a burst.
    lane = EveryRequestLane()
    burst = connect(lane, START_PER_TURN)
    for protocol in burst:
        protocol.data_received(REQUEST)
    (slow,) = connect(lane, 1)
    slow.number = 999
    for index in range(len(REQUEST)):
        slow.data_received(REQUEST[index : index + 1])
        if index % 50 == 0:
            await asyncio.sleep(0)
    for _ in range(5):
        await asyncio.sleep(0)
    assert lane.started.count(999) == 1
    for protocol in [*burst, slow]:
        protocol.answered.set_result(None)
    await asyncio.gather(*(p.task for p in [*burst, slow] if p.task is not None))
