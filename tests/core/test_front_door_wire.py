"""The front door (api/http_layer.py: aiohttp's server, every request) on the wire.

Raw sockets, because the interesting cases are the ones a polite client never sends: pipelined
requests of different routes on one connection, requests split into single bytes, duplicate
Content-Length headers, chunked bodies. Every answer is OpenAI-shaped, in order, with nothing
lost. (These once checked the fast lane against aiohttp; they keep checking the one path.)
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
import urllib.request

import aiohttp
import openai
import pytest

from tests.conftest import fake_model
from tests.harness import engine_model, in_process_gateway

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}


def request(path: str, body: bytes, *headers: str, method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    if method == "POST":
        lines.append("Content-Type: application/json")
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_answers(sock: socket.socket, count: int, timeout: float = 10.0) -> list[tuple[int, bytes]]:
    """Read `count` HTTP answers (Content-Length or chunked) from a raw socket."""
    sock.settimeout(timeout)
    data = b""
    answers: list[tuple[int, bytes]] = []
    while len(answers) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            head = data[:end].decode("latin-1")
            status = int(head.split(" ", 2)[1])
            fields = {
                line.split(":", 1)[0].strip().lower(): line.split(":", 1)[1].strip()
                for line in head.split("\r\n")[1:]
            }
            rest = data[end + 4 :]
            if "content-length" in fields:
                length = int(fields["content-length"])
                if len(rest) >= length:
                    answers.append((status, rest[:length]))
                    data = rest[length:]
                    continue
            elif fields.get("transfer-encoding") == "chunked":
                body, remaining = _dechunk(rest)
                if body is not None:
                    answers.append((status, body))
                    data = remaining
                    continue
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return answers


def _dechunk(data: bytes) -> tuple[bytes | None, bytes]:
    body = b""
    while True:
        line_end = data.find(b"\r\n")
        if line_end < 0:
            return None, data
        size = int(data[:line_end], 16)
        if len(data) < line_end + 2 + size + 2:
            return None, data
        body += data[line_end + 2 : line_end + 2 + size]
        data = data[line_end + 2 + size + 2 :]
        if size == 0:
            return body, data


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


async def test_pipelined_requests_of_different_routes_stay_in_order(tmp_path):
    async with in_process_gateway(tmp_path, {"chat": engine_model(served_name="chat")}) as harness:
        await asyncio.to_thread(_pipelined_requests_of_different_routes_stay_in_order, harness)


def _pipelined_requests_of_different_routes_stay_in_order(gateway) -> None:
    body = json.dumps(CHAT).encode()
    with connect(gateway.url) as sock:
        # POST, POST, GET, POST: all in one send, answered in order.
        sock.sendall(
            request("/v1/chat/completions", body)
            + request("/v1/chat/completions", body)
            + request("/v1/models", b"", method="GET")
            + request("/v1/chat/completions", body)
        )
        answers = read_answers(sock, 4)
    assert [status for status, _ in answers] == [200, 200, 200, 200]
    assert json.loads(answers[0][1])["choices"][0]["message"]["content"] == "chat says: hello"
    assert json.loads(answers[2][1])["object"] == "list"
    assert json.loads(answers[3][1])["model"] == "chat"


async def test_a_request_sent_byte_by_byte_is_served(tmp_path):
    async with in_process_gateway(tmp_path, {"chat": engine_model(served_name="chat")}) as harness:
        await asyncio.to_thread(_a_request_sent_byte_by_byte_is_served, harness)


def _a_request_sent_byte_by_byte_is_served(gateway) -> None:
    raw = request("/v1/chat/completions", json.dumps(CHAT).encode())
    with connect(gateway.url) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index in range(len(raw)):
            sock.send(raw[index : index + 1])
            if index % 40 == 0:
                time.sleep(0.001)
        [(status, body)] = read_answers(sock, 1)
    assert status == 200
    assert json.loads(body)["choices"][0]["message"]["content"] == "chat says: hello"


async def test_hostile_requests_get_openai_shaped_answers(tmp_path):
    async with in_process_gateway(tmp_path, {"chat": engine_model(served_name="chat")}) as harness:
        await asyncio.to_thread(_hostile_requests_get_openai_shaped_answers, harness)


def _hostile_requests_get_openai_shaped_answers(gateway) -> None:
    body = json.dumps(CHAT).encode()
    # (request, statuses allowed, whether the answer is OpenAI-shaped: every error is, the
    # parser's own refusals included)
    cases = [
        # two lengths: a smuggling attempt; aiohttp refuses it
        (
            request(
                "/v1/chat/completions",
                body,
                f"Content-Length: {len(body)}",
                f"Content-Length: {len(body) + 5}",
            ),
            {400},
            True,
        ),
        # a NUL in a header value
        (request("/v1/chat/completions", body, "X-Odd: a\x00b"), {400}, True),
        # not JSON, not an object, no model, unknown model: OpenAI-shaped errors
        (request("/v1/chat/completions", b"{nope"), {400}, True),
        (request("/v1/chat/completions", b"[1, 2]"), {400}, True),
        (request("/v1/chat/completions", b'{"messages": []}'), {400}, True),
        (request("/v1/chat/completions", b'{"model": "nosuch"}'), {404}, True),
        # a query string is passed on
        (request("/v1/chat/completions?trace=1", body), {200}, False),
    ]
    for raw, statuses, shaped in cases:
        with connect(gateway.url) as sock:
            sock.sendall(raw)
            answers = read_answers(sock, 1)
        assert answers, raw
        status, answer = answers[0]
        assert status in statuses, (raw, status, answer)
        if shaped:
            error = json.loads(answer)["error"]
            assert set(error) == {"message", "type", "param", "code"}, answer
    # and the gateway still serves
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="none")
    assert client.chat.completions.create(**CHAT).choices[0].message.content == "chat says: hello"


async def test_a_chunked_request_body_is_served(tmp_path):
    async with in_process_gateway(tmp_path, {"chat": engine_model(served_name="chat")}) as harness:
        await asyncio.to_thread(_a_chunked_request_body_is_served, harness)


def _a_chunked_request_body_is_served(gateway) -> None:
    body = json.dumps(CHAT).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    with connect(gateway.url) as sock:
        sock.sendall(request("/v1/chat/completions", chunked, "Transfer-Encoding: chunked"))
        [(status, answer)] = read_answers(sock, 1)
    assert status == 200
    assert json.loads(answer)["model"] == "chat"


async def test_streams_rewrite_aliases_and_count_usage(tmp_path):
    async with in_process_gateway(
        tmp_path, {"chat": engine_model(served_name="chat-upstream", aliases=["friendly"])}
    ) as harness:
        await asyncio.to_thread(_streams_rewrite_aliases_and_count_usage, harness)


def _streams_rewrite_aliases_and_count_usage(gateway) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="none")
    stream = client.chat.completions.create(
        model="friendly", messages=CHAT["messages"], stream=True
    )
    chunks = list(stream)
    assert chunks, "no chunks"
    assert {chunk.model for chunk in chunks} == {"friendly"}  # never the engine's own name
    assert all(chunk.usage is None for chunk in chunks)  # usage was not asked for by the client
    # The request is recorded just after its last byte: poll briefly.
    served = 'modelyard_requests_total{key="anonymous",model="chat",route="/v1/chat",status="200"}'
    tokens = 'modelyard_completion_tokens_total{model="chat"} 5.0'
    deadline = time.monotonic() + 5
    while True:
        with urllib.request.urlopen(gateway.url + "/metrics", timeout=10) as response:
            metrics = response.read().decode()
        if (served in metrics and tokens in metrics) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert served + " 1.0" in metrics
    assert tokens in metrics  # the usage chunk was read (and dropped) on the way


@pytest.mark.slow
async def test_a_slow_reader_pauses_the_engine_not_the_read_timeout(tmp_path):
    """A client that stops reading makes the gateway stop reading from the engine (its
    socket buffers fill), and that wait is not the engine's silence: with a 1 s read timeout,
    a client that reads nothing for 2.5 s still gets every event, in order."""
    async with in_process_gateway(
        tmp_path, {"chat": engine_model(served_name="chat")}, limits={"upstream_read_timeout": "1s"}
    ) as harness:
        await asyncio.to_thread(_a_slow_reader_pauses_the_engine_not_the_read_timeout, harness)


def _a_slow_reader_pauses_the_engine_not_the_read_timeout(gateway) -> None:
    count = 40_000  # about 5 MB of events, beyond the socket buffers on both sides
    body = json.dumps({**CHAT, "stream": True, "fake_chunks": count, "fake_chunk_delay": 0})
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        host, port = gateway.url.removeprefix("http://").split(":")
        sock.connect((host, int(port)))
        # Warm the engine first so the pause below is all about the slow reader.
        sock.sendall(request("/v1/chat/completions", json.dumps(CHAT).encode()))
        assert read_answers(sock, 1)[0][0] == 200
        sock.sendall(request("/v1/chat/completions", body.encode()))
        time.sleep(2.5)
        sock.settimeout(30)
        pieces = [sock.recv(65536)]
        tail = pieces[0][-7:]
        while not tail.endswith(b"\r\n0\r\n\r\n"):
            piece = sock.recv(65536)
            assert piece, "the stream ended early"
            pieces.append(piece)
            tail = (tail + piece)[-7:]
    raw = b"".join(pieces)
    assert raw.startswith(b"HTTP/1.1 200 ")
    answer, _rest = _dechunk(raw[raw.index(b"\r\n\r\n") + 4 :])
    assert answer is not None
    events = [line for line in answer.split(b"\n\n") if line.startswith(b"data: {")]
    assert [json.loads(event[6:])["seq"] for event in events] == list(range(count))
    assert answer.rstrip().endswith(b"data: [DONE]")


@pytest.mark.slow
async def test_shutdown_ends_a_long_stream_with_an_error_event(gateway_factory):
    """SIGTERM with a stream still going: after `shutdown_grace` the stream ends with a final
    `shutting_down` error event and a proper end, never a silent cut."""
    gateway = gateway_factory({"chat": fake_model("chat")}, limits={"shutdown_grace": "1s"})
    body = {**CHAT, "stream": True, "fake_chunks": 1000, "fake_chunk_delay": 0.05}
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.url + "/v1/chat/completions", json=body) as response,
    ):
        assert response.status == 200
        lines: list[bytes] = []
        async for line in response.content:
            if line.startswith(b"data: "):
                lines.append(line)
            if len(lines) == 3:
                began = time.monotonic()
                gateway.process.send_signal(signal.SIGTERM)
        ended_after = time.monotonic() - began
    last = json.loads(lines[-1][6:])
    assert last["error"]["code"] == "shutting_down", lines[-3:]
    assert "shutdown_grace" in last["error"]["message"]
    assert 0.8 < ended_after < 8
    assert len(lines) < 200  # ended, not streamed to the end
    assert gateway.process.wait(timeout=20) == 0


async def test_keyed_pipelined_requests_are_answered_and_counted_once(tmp_path):
    """With keys (tests/core/test_keyed_requests.py compares answers). One connection, pipelined:
    alice's request, a wrong key (401, and the connection stays open), alice again; on fresh
    connections a model alice may not use (404, naming no other key's model) and bob's
    rate-limited key; each key's usage counted once."""
    from tests.security.keys import auth_settings

    models = {
        "chat": engine_model(served_name="chat"),
        "secret": engine_model(served_name="secret"),
    }
    async with in_process_gateway(tmp_path, models, **auth_settings()) as harness:
        await asyncio.to_thread(_keyed_pipelined_requests_are_answered_and_counted_once, harness)


def _keyed_pipelined_requests_are_answered_and_counted_once(gateway) -> None:
    from tests.security.keys import ADMIN_KEY, LIMITED_KEY, USER_KEY

    body = json.dumps(CHAT).encode()
    alice = f"Authorization: Bearer {USER_KEY}"
    with connect(gateway.url) as sock:
        sock.sendall(
            request("/v1/chat/completions", body, alice)
            + request("/v1/chat/completions", body, "Authorization: Bearer sk-wrong")
            + request("/v1/chat/completions", body, alice)
        )
        answers = read_answers(sock, 3)
    assert [status for status, _ in answers] == [200, 401, 200]
    assert json.loads(answers[1][1])["error"]["code"] == "invalid_api_key"
    secret = json.dumps({**CHAT, "model": "secret"}).encode()
    with connect(gateway.url) as sock:
        sock.sendall(request("/v1/chat/completions", secret, alice))
        [(status, answer)] = read_answers(sock, 1)
    assert status == 404
    assert "secret" not in json.loads(answer)["error"]["message"].split("known models")[-1]
    with connect(gateway.url) as sock:
        sock.sendall(request("/v1/chat/completions", body, f"x-api-key: {LIMITED_KEY}"))
        assert read_answers(sock, 1)[0][0] == 200
    admin = urllib.request.Request(
        gateway.url + "/admin/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    with urllib.request.urlopen(admin, timeout=10) as response:
        keys = {key["name"]: key["usage"] for key in json.loads(response.read())["keys"]}
    assert keys["alice"]["requests"] == 3  # two served, and the 404 one
    assert keys["bot"]["requests"] == 1


async def test_idle_kept_alive_connections_are_closed(tmp_path):
    """limits.head_timeout: a connection that sends nothing (a client that went quiet, or one
    that opens sockets to hold them) is closed after it, as is one that sends a request head
    a byte at a time; one that sends whole requests is served. Shortened from 15 s."""
    limits = {"head_timeout": "0.6s"}
    async with in_process_gateway(tmp_path, {"chat": engine_model()}, limits=limits) as harness:
        host, port = harness.url.removeprefix("http://").split(":")
        quiet_reader, quiet_writer = await asyncio.open_connection(host, int(port))
        trickle_reader, trickle_writer = await asyncio.open_connection(host, int(port))
        began = time.monotonic()
        for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n":
            if trickle_writer.is_closing() or trickle_reader.at_eof():
                break
            trickle_writer.write(bytes([byte]))
            await asyncio.sleep(0.05)
        assert await asyncio.wait_for(quiet_reader.read(), timeout=2) == b""  # closed
        assert await asyncio.wait_for(trickle_reader.read(), timeout=2) == b""
        assert time.monotonic() - began < 2.5
        quiet_writer.close()
        trickle_writer.close()
        # A client that asks, waits less than the limit and asks again keeps its connection.
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.post(harness.url + "/v1/chat/completions", json=CHAT) as answer:
                    assert answer.status == 200
                await asyncio.sleep(0.2)


@pytest.mark.slow
async def test_a_burst_of_streams_is_served_whole_and_its_engine_connections_let_go(tmp_path):
    """300 clients ask for a stream in the same moment (the benchmark does 1,000), each of 10
    events 50 ms apart, as an engine's tokens come. Taken in turns (LaneCore.take_turn), every
    stream still comes whole and is counted once, and the engine is let go by all of them."""
    async with in_process_gateway(tmp_path, {"chat": engine_model()}) as harness:
        body = {**CHAT, "stream": True, "fake_chunks": 10, "fake_chunk_delay": 0.05}
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            # The engine is up first: 300 waiting for a cold start would meet the queue bound.
            async with session.post(harness.url + "/v1/chat/completions", json=CHAT) as answer:
                assert answer.status == 200

            async def one() -> tuple[int, bytes]:
                async with session.post(harness.url + "/v1/chat/completions", json=body) as answer:
                    return answer.status, await answer.read()

            answers = await asyncio.gather(*(one() for _ in range(300)))
        for status, text in answers:
            assert status == 200
            assert text.count(b"data: {") == 10
            assert text.endswith(b"data: [DONE]\n\n")
        await asyncio.sleep(0.1)  # each record is written just after its last byte
        streams = [record for record in harness.records if record.streamed]
        assert len(streams) == 300
        assert {record.status for record in streams} == {200}
        assert harness.gateway.scheduler.load_counts("chat") == (0, 0)


async def test_oversized_and_too_many_headers_get_openai_errors_that_quote_nothing(tmp_path):
    """The parser's own refusals (api/http_layer.py): a header past 8,190 bytes, more than 100
    headers. A 400 in OpenAI's shape that quotes none of the request (a key in an oversized
    header must not come back, nor reach the log), and the connection closed."""
    async with in_process_gateway(tmp_path, {"chat": engine_model(served_name="chat")}) as harness:
        await asyncio.to_thread(_oversized_and_too_many_headers, harness)


def _oversized_and_too_many_headers(gateway) -> None:
    secret = "sk-" + "s" * 9000
    body = json.dumps(CHAT).encode()
    cases = {
        "too long": request("/v1/chat/completions", body, f"Authorization: Bearer {secret}"),
        "too many headers": request(
            "/v1/chat/completions", body, *(f"X-Extra-{n}: {n}" for n in range(150))
        ),
    }
    for reason, raw in cases.items():
        with connect(gateway.url) as sock:
            sock.sendall(raw)
            [(status, answer)] = read_answers(sock, 1)
            sock.settimeout(5)
            assert sock.recv(1) == b""  # closed after the refusal
        assert status == 400
        error = json.loads(answer)["error"]
        assert error["code"] == "bad_request"
        assert reason in error["message"], error
        assert "sssss" not in answer.decode()


async def test_the_body_limit_holds_while_reading_chunked_and_compressed_bodies(tmp_path):
    """limits.max_body_bytes without a Content-Length to go by: a chunked body that goes on
    and on is refused with a 413 once it passes the limit, not read to its end; a small gzip
    body that inflates past the limit is refused the same way (the limit counts decoded
    bytes)."""
    limits = {"max_body_bytes": "64KiB"}
    models = {"chat": engine_model(served_name="chat")}
    async with in_process_gateway(tmp_path, models, limits=limits) as harness:
        await asyncio.to_thread(_the_body_limit_holds_while_reading, harness)


def _the_body_limit_holds_while_reading(gateway) -> None:
    import gzip

    head = request("/v1/chat/completions", b"", "Transfer-Encoding: chunked")
    piece = b"x" * 16384
    sent = 0
    with connect(gateway.url) as sock:
        sock.sendall(head)
        sock.settimeout(0.05)
        answer = b""
        while sent < 8 * 1024 * 1024 and not answer:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                continue
        sock.settimeout(10)
        answer += b"" if answer else sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"body_too_large"' in answer
    assert sent < 1024 * 1024, f"{sent} bytes were taken before the refusal"

    bomb = gzip.compress(b'{"model": "chat", "pad": "' + b"y" * (1024 * 1024) + b'"}')
    assert len(bomb) < 8192
    with connect(gateway.url) as sock:
        sock.sendall(request("/v1/chat/completions", bomb, "Content-Encoding: gzip"))
        [(status, body)] = read_answers(sock, 1)
    assert status == 413, body[:200]
    assert json.loads(body)["error"]["code"] == "body_too_large"
