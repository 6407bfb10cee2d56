"""How the fast lane relays a stream (proxy/fastpath.StreamRelay), at the level of writes.

When 1,000 clients ask for streams at once, the event loop's queue holds a task step for each
of them. A stream's head and events must leave from the engine's read callback, in as few
writes as possible, not wait behind that queue: these tests drive the real protocol objects
with recording transports and look at what was written when, with no loop turn in between.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from modelyard.api.accounting import ServedTokens, UsageAsked
from modelyard.proxy.fastpath import (
    FastProtocol,
    FastRequest,
    LaneCore,
    StreamRelay,
    _with_usage_asked,
)
from modelyard.proxy.lean_client import UpstreamConnection

HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class RecordingTransport:
    """Stands for a socket's transport: keeps every write as it was made."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.reading = True
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.closed:  # as uvloop's transports do
            raise RuntimeError("unable to perform operation on a closed transport")
        self.writes.append(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading


class Tokens:
    def __init__(self) -> None:
        self.counted: list[dict[str, int]] = []
        self.served = ServedTokens()  # what the relay tells of the stream as it passes

    def count(self, usage: dict[str, int]) -> None:
        self.counted.append(usage)


def relay_pair(
    replacements: list[tuple[bytes, bytes]] | None = None, usage_added: bool = False
) -> tuple[RecordingTransport, UpstreamConnection, StreamRelay, Tokens]:
    lane = LaneCore(fallback=asyncio.Protocol, max_body=1 << 20, connect_timeout=5, read_timeout=60)
    client = RecordingTransport()
    protocol = FastProtocol(lane)
    protocol.connection_made(client)  # type: ignore[arg-type]
    engine = UpstreamConnection(asyncio.get_running_loop(), read_timeout=60)
    engine.connection_made(RecordingTransport())  # type: ignore[arg-type]
    tokens = Tokens()
    relay = StreamRelay(protocol, replacements or [], UsageAsked(final=usage_added), tokens)
    return client, engine, relay, tokens


async def test_the_head_and_first_event_leave_in_one_write_from_the_engines_read():
    client, engine, relay, _ = relay_pair()
    exchange = engine.send(b"POST /v1/chat/completions HTTP/1.1\r\n\r\n", relay)
    first = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
    engine.data_received(HEAD + chunk(first))
    # No loop turn has passed: the client has the head and the event already, in one write.
    assert len(client.writes) == 1
    head, _, body = client.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Transfer-Encoding: chunked" in head
    assert b"Cache-Control: no-cache" in head
    assert body == chunk(first)
    assert exchange.streaming
    assert exchange.head_seen


async def test_a_head_without_an_event_is_not_held_back():
    # vLLM sends its head before prefill ends; the client must see the 200 then, not with the
    # first token seconds later.
    client, engine, relay, _ = relay_pair()
    engine.send(b"POST /v1/chat/completions HTTP/1.1\r\n\r\n", relay)
    engine.data_received(HEAD)
    assert len(client.writes) == 1
    assert client.writes[0].startswith(b"HTTP/1.1 200 OK")
    engine.data_received(chunk(b"data: {}\n\n"))
    assert client.writes[1] == chunk(b"data: {}\n\n")


async def test_the_streams_end_is_written_before_the_exchange_resolves():
    client, engine, relay, tokens = relay_pair(usage_added=True)
    exchange = engine.send(b"POST /v1/chat/completions HTTP/1.1\r\n\r\n", relay)
    engine.data_received(HEAD + chunk(b'data: {"choices":[{"delta":{}}]}\n\n'))
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}\n\n'
    writes_before = len(client.writes)
    engine.data_received(chunk(usage) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    # Three chunks and the end in one read of the engine's: one write to the client.
    assert len(client.writes) == writes_before + 1
    # The usage-only chunk the gateway asked for is dropped, counted, and the client has the
    # whole stream (with its last, empty chunk) by the time `done` resolves.
    assert tokens.counted == [{"prompt_tokens": 3, "completion_tokens": 5}]
    sent = b"".join(client.writes)
    assert b'"usage"' not in sent
    assert sent.endswith(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    assert exchange.done.done()
    assert relay.usage["completion_tokens"] == 5


async def test_events_that_come_in_one_read_leave_in_one_write():
    # An engine that got ahead of a busy gateway: its socket holds many events at once.
    client, engine, relay, _ = relay_pair(replacements=[(b'"model":"m-1"', b'"model":"chat"')])
    engine.send(b"POST /v1/chat/completions HTTP/1.1\r\n\r\n", relay)
    events = [b'data: {"model":"m-1","seq":%d}\n\n' % n for n in range(50)]
    engine.data_received(HEAD + b"".join(chunk(event) for event in events))
    assert len(client.writes) == 1
    relayed = client.writes[0].partition(b"\r\n\r\n")[2]
    assert relayed == b"".join(chunk(event.replace(b"m-1", b"chat")) for event in events)


async def test_a_json_answer_is_not_streamed():
    client, engine, relay, _ = relay_pair()
    exchange = engine.send(b"POST /v1/chat/completions HTTP/1.1\r\n\r\n", relay)
    body = b'{"error":{"message":"no"}}'
    engine.data_received(
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert not exchange.streaming
    assert client.writes == []
    assert exchange.take_buffered() == body


async def test_a_client_that_leaves_as_its_answer_comes_is_not_an_internal_error():
    # wrk and SDKs close connections at any moment. When the engine's whole answer is in but
    # the request's task has not run again yet, the client's hang-up leaves the request to
    # finish (`connection_lost`): its answer must then be dropped quietly, not written to
    # the closed socket (uvloop raises: this was logged as a 500 with a traceback).
    loop = asyncio.get_running_loop()
    lane = LaneCore(fallback=asyncio.Protocol, max_body=1 << 20, connect_timeout=5, read_timeout=60)
    client = RecordingTransport()
    protocol = FastProtocol(lane)
    protocol.connection_made(client)  # type: ignore[arg-type]
    engine = UpstreamConnection(loop, read_timeout=60)
    engine.connection_made(RecordingTransport())  # type: ignore[arg-type]
    engine.idle_since = loop.time()
    lane.pool._idle[("127.0.0.1", 9)] = [engine]  # the pool hands this connection out
    request = FastRequest(b"/v1/chat/completions", [], 2, True, b"127.0.0.1")
    forwarding = asyncio.ensure_future(
        protocol._forward(
            request, "http://127.0.0.1:9", {}, "/v1/chat/completions", b"{}", [], False, Tokens()
        )
    )
    await asyncio.sleep(0)  # the request is written and waits for the engine's head
    body = b'{"choices":[]}'
    engine.data_received(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    client.close()
    protocol.connection_lost(None)
    status, _first_byte, streamed, _usage = await forwarding
    assert status == 200
    assert not streamed
    assert client.writes == []


def test_asking_for_usage_splices_the_option_only_into_plain_utf8():
    # Hostile encodings a client may send (json.loads takes them all): the splice is only for
    # a body that starts with "{" in UTF-8; the rest is serialised from the parsed payload.
    payload = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "é"}]}
    text = json.dumps(payload)
    for body in (
        text.encode(),
        b" \r\n\t" + text.encode(),
        b"\xef\xbb\xbf" + text.encode(),  # a BOM
        text.encode("utf-16-le"),  # "{" then a zero byte
        text.encode("utf-16-be"),
        text.encode("utf-16"),
        text.encode("utf-32-le"),
        text.encode("utf-32-be"),
    ):
        parsed = json.loads(body)
        parsed["stream_options"] = {"include_usage": True}
        sent = _with_usage_asked(body, parsed)
        assert json.loads(sent) == parsed, body[:12]
        assert sent.count(b'"stream_options"') == 1
    assert _with_usage_asked(text.encode(), {}).startswith(b'{"stream_options":')
