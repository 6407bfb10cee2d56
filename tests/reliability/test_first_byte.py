"""A frozen engine cannot hold requests for the read timeout; a refused connection is checked.

The test engine (tests/fake_engine.py) stands for vLLM's OpenAI server, serving at most 4
requests at a time (`--max-num-seqs 4`) at a fixed token rate (one chunk per 50 ms):
- frozen with SIGSTOP, it is a hung host or engine: the kernel still accepts connections,
  nothing answers, /health included;
- answering slowly (`fake_delay`), it is an engine busy with a long answer that is not
  streamed (its headers come with the whole answer): alive, and never cut;
- with its port closed (`fake_close_port`), it is an API server whose listener died while the
  process lives on: connections are refused, /health included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import pytest

from tests.conftest import fake_model
from tests.reliability.test_engine_faults import events, post_with_headers
from tests.reliability.test_engine_lost import stream_until_first_chunk
from tests.reliability.test_proxy_workers import (
    CHAT,
    _answer,
    _chat,
    _request,
    holder_of,
    worker_settings,
)
from tests.security.keys import ADMIN_KEY, USER_KEY, bearer, key_config
from tests.security.raw_http import dechunk

FIRST_BYTE_S = 3.0
# The periodic check is far away (60 s): any verdict within a test came from a request's own
# liveness check. A check slower than 1 s failed.
SLOW_PERIODIC_CHECKS = {
    "health_check_interval": "60s",
    "health_check_timeout": "1s",
    "upstream_first_byte_timeout": f"{FIRST_BYTE_S:g}s",
}


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}


async def timed(work: Any) -> tuple[Any, float]:
    result = await work
    return result, time.monotonic()


async def stream(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[tuple[int, str], float]:
    async with session.post(url, json=body) as response:
        text = (await response.read()).decode()
        return (response.status, text), time.monotonic()


async def until_events(
    session: aiohttp.ClientSession, gateway: Any, kind: str, timeout: float
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while not (found := await events(session, gateway, kind)):
        assert time.monotonic() < deadline, f"no {kind!r} event within {timeout}s"
        await asyncio.sleep(0.1)
    return found


async def test_requests_on_a_frozen_engine_end_at_the_first_byte_timeout(gateway_factory):
    # The model's own bound wins over the gateway's (60 s here).
    limits = {
        **SLOW_PERIODIC_CHECKS,
        "health_check_failures": 1,
        "upstream_first_byte_timeout": "60s",
    }
    model = fake_model(
        "chat", "--max-num-seqs", "4", stop_grace="2s", first_byte_timeout=f"{FIRST_BYTE_S:g}s"
    )
    gateway = gateway_factory({"chat": model}, limits=limits)
    url = gateway.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        assert (await post_with_headers(session, url, chat("chat")))[0] == 200
        pid = gateway.status()["models"][0]["pid"]
        # A stream under way (a chunk each 50 ms, 20 s in all) when the engine freezes.
        begun, first_chunk = await stream_until_first_chunk(
            session, url, chat("chat", stream=True, fake_chunks=400, fake_chunk_delay=0.05), {}
        )
        await asyncio.wait_for(first_chunk.wait(), 10)
        os.kill(pid, signal.SIGSTOP)  # the engine freezes: connections open, nothing answers
        frozen = time.monotonic()
        try:
            plain = [
                asyncio.ensure_future(timed(post_with_headers(session, url, chat("chat"))))
                for _ in range(3)
            ]
            streamed = asyncio.ensure_future(
                stream(session, url, chat("chat", stream=True, fake_chunks=40))
            )
            results = await asyncio.wait_for(asyncio.gather(*plain), FIRST_BYTE_S + 10)
            (stream_status, stream_text), stream_end = await asyncio.wait_for(streamed, 10)
            begun_status, begun_text, begun_end = await asyncio.wait_for(begun, 10)
        finally:
            with contextlib.suppress(ProcessLookupError):  # gone: the verdict's SIGKILL
                os.kill(pid, signal.SIGCONT)
        ends = [end - frozen for _, end in results] + [stream_end - frozen, begun_end - frozen]
        print("frozen engine: requests ended after " + ", ".join(f"{t:.2f}s" for t in ends))
        for (status, body, _, headers), _end in results:
            # Its own failed check ends it with 504; the verdict that follows (one failure is
            # enough here) may end it first as lost, with Retry-After.
            assert status in (503, 504), body
            code = body["error"]["code"]
            assert code in ("upstream_first_byte_timeout", "engine_lost"), body
            if status == 503:
                assert int(headers["Retry-After"]) >= 1
        assert stream_status in (503, 504), stream_text
        # The stream already begun ends with an error event in OpenAI's shape.
        assert begun_status == 200
        error = json.loads(begun_text.strip().split("\n\n")[-1].removeprefix("data: "))["error"]
        assert error["code"] in ("upstream_timeout", "engine_lost"), error
        assert max(ends) < FIRST_BYTE_S + 2, ends  # the bound
        # The request's check found it dead: stopped as hung (its stop takes the 2 s grace:
        # a stopped process ignores SIGTERM), long before the periodic check at 60 s.
        hung = await until_events(session, gateway, "hung", 15)
        assert hung[-1]["model"] == "chat"
        status, body, _, _ = await post_with_headers(session, url, chat("chat"))
        assert status == 200, body
        assert gateway.status()["models"][0]["pid"] != pid


async def test_a_slow_live_engine_is_not_cut_at_the_first_byte_timeout(gateway_factory):
    gateway = gateway_factory(
        {"chat": fake_model("chat", "--max-num-seqs", "4")}, limits=SLOW_PERIODIC_CHECKS
    )
    url = gateway.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        began = time.monotonic()
        # A long answer that is not streamed: its headers come after 5 s, past the 3 s bound,
        # but the engine answers its check, so the request waits on.
        slow = [
            post_with_headers(session, url, chat("chat", fake_delay=FIRST_BYTE_S + 2))
            for _ in range(2)
        ]
        results = await asyncio.wait_for(asyncio.gather(*slow), 30)
        took = time.monotonic() - began
        for status, body, _, _ in results:
            assert status == 200, body
        assert took >= FIRST_BYTE_S + 2
        assert not await events(session, gateway, "hung")


async def test_a_refused_connection_is_checked_and_resent_to_a_fresh_engine(gateway_factory):
    limits = {**SLOW_PERIODIC_CHECKS, "health_check_failures": 1}
    keys = {"keys": [key_config("ops", ADMIN_KEY, admin=True), key_config("alice", USER_KEY)]}
    gateway = gateway_factory(
        {"chat": fake_model("chat", "--max-num-seqs", "4")}, limits=limits, auth=keys
    )
    gateway.admin_key = ADMIN_KEY
    url = gateway.url + "/v1/chat/completions"
    async with aiohttp.ClientSession(headers=bearer(USER_KEY)) as session:
        # Its answer comes back; from then on its port refuses connections.
        status, body, _, _ = await post_with_headers(session, url, chat("chat", fake_close_port=1))
        assert status == 200, body
        first = gateway.status()["models"][0]
        assert first["state"] == "ready"
        status, body, _, _ = await post_with_headers(session, url, chat("chat"))
        # Checked at once (refused again: one failure is enough here), stopped as hung, and
        # the request, which no engine saw, went to the fresh engine.
        assert status == 200, body
    async with aiohttp.ClientSession(headers=bearer(ADMIN_KEY)) as session:
        assert gateway.status()["models"][0]["pid"] != first["pid"]
        assert [e["model"] for e in await events(session, gateway, "hung")] == ["chat"]
        resent = await events(session, gateway, "resent")
        assert len(resent) == 1
        assert "ClientConnectorError" in resent[0]["reason"]
        async with session.get(gateway.url + "/admin/keys") as answer:
            alice = next(k for k in (await answer.json())["keys"] if k["name"] == "alice")
    # The resent try is charged as a request of its own (its answer's 5 + 3 tokens); the
    # refused try served nothing.
    usage = alice["usage"]["models"]["chat"]
    assert usage["completion_tokens"] == 3 + 3, usage
    assert usage["prompt_tokens"] >= 5 + 5, usage


async def test_a_refused_connection_before_a_verdict_is_a_503_to_retry(gateway_factory):
    # Three failed checks in a row make a verdict: one refusal is one failure. The request
    # gets 503 with Retry-After, never a bare 502 for a request no engine saw.
    limits = {**SLOW_PERIODIC_CHECKS, "health_check_failures": 3}
    gateway = gateway_factory({"chat": fake_model("chat", "--max-num-seqs", "4")}, limits=limits)
    url = gateway.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        assert (await post_with_headers(session, url, chat("chat", fake_close_port=1)))[0] == 200
        statuses = []
        for _ in range(3):
            status, body, _, headers = await post_with_headers(session, url, chat("chat"))
            statuses.append(status)
            if status == 503:
                assert body["error"]["code"] == "engine_unreachable", body
                assert int(headers["Retry-After"]) >= 1
        # Two refusals answered 503; the third check made the verdict, and that request was
        # resent to a fresh engine.
        assert statuses == [503, 503, 200], statuses
        assert len(await events(session, gateway, "hung")) == 1


async def test_a_stream_begun_with_loading_comments_ends_with_an_error_event(gateway_factory):
    # The stream's 200 and loading comments went out while the engine started (2 s); then the
    # engine takes the request and freezes before its first byte (`fake_hang`: /health too).
    model = fake_model("chat", "--max-num-seqs", "4", "--bind-delay", "2")
    gateway = gateway_factory({"chat": model}, limits=SLOW_PERIODIC_CHECKS)
    url = gateway.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        began = time.monotonic()
        (status, text), end = await asyncio.wait_for(
            stream(session, url, chat("chat", stream=True, fake_hang=1)), 30
        )
    assert status == 200
    assert text.startswith(": loading chat"), text[:200]
    error = json.loads(text.strip().split("\n\n")[-1].removeprefix("data: "))["error"]
    assert error["code"] == "upstream_first_byte_timeout", error
    assert error["type"] == "server_error"
    # A start of about 2 s, then the bound and its check (3 s + 1 s), not the read timeout.
    print(f"loading stream on a frozen engine ended after {end - began:.2f}s")
    assert end - began < 20


@pytest.mark.alone  # the bound of 2 s, over three processes
def test_requests_relayed_by_a_proxy_worker_end_at_the_first_byte_timeout(gateway_factory):
    """The worker bounds the frozen engine's silence as the gateway's process does; the
    liveness verdict comes from the gateway's process (the worker asks it)."""
    limits = {**SLOW_PERIODIC_CHECKS, "health_check_failures": 1}
    gateway = gateway_factory(
        {"chat": fake_model("chat", "--max-num-seqs", "4", stop_grace="2s")},
        limits=limits,
        proxy_workers=1,
    )
    assert _chat(gateway)[0] == 200
    (worker,) = worker_settings(gateway)
    pid = gateway.status()["models"][0]["pid"]
    port = int(gateway.url.rsplit(":", 1)[1])

    def open_on_worker(body: dict[str, Any]) -> tuple[socket.socket, bytes]:
        """A request on a connection the worker holds (the kernel spreads connections over
        the processes), and what came back once it began."""
        for _ in range(60):
            sock = socket.create_connection(("127.0.0.1", port), timeout=FIRST_BYTE_S + 30)
            sock.sendall(_request(port, body))
            first = sock.recv(65536)
            if holder_of(sock, [worker]) == worker:
                return sock, first
            sock.close()
        raise AssertionError("no connection landed on the worker")

    def idle_on_worker() -> socket.socket:
        """A connection the worker holds, nothing sent on it yet: held before the freeze, so
        that its request goes out the moment the engine freezes (the kernel gives about half
        the connections to the gateway's own process, which is tested above)."""
        for _ in range(60):
            sock = socket.create_connection(("127.0.0.1", port), timeout=FIRST_BYTE_S + 30)
            holders = [worker, gateway.process.pid]
            deadline = time.monotonic() + 5
            while (holder := holder_of(sock, holders)) is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if holder == worker:
                return sock
            sock.close()
        raise AssertionError("no connection landed on the worker")

    plain = [idle_on_worker() for _ in range(3)]
    # A stream under way on the worker (a chunk each 50 ms, 20 s in all) when it freezes.
    begun, first = open_on_worker({**CHAT, "stream": True, "fake_chunks": 400})
    assert b" 200 " in first.split(b"\r\n", 1)[0], first[:200]
    os.kill(pid, signal.SIGSTOP)  # connections open, nothing answers
    frozen = time.monotonic()
    try:
        for sock in plain:  # plain requests sent at the freeze
            sock.sendall(_request(port, CHAT))
        with ThreadPoolExecutor(4) as pool:
            ends = list(pool.map(lambda s: (_answer(s), time.monotonic()), [*plain, begun]))
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone: the verdict's SIGKILL
            os.kill(pid, signal.SIGCONT)
        for sock in [*plain, begun]:
            sock.close()
    took = [end - frozen for _, end in ends]
    print("frozen engine, worker's requests ended after " + ", ".join(f"{t:.2f}s" for t in took))
    assert max(took) < FIRST_BYTE_S + 2, took  # not the read timeout (600 s)
    for answer, _ in ends[:3]:
        status = int(answer.split(b" ", 2)[1])
        body = json.loads(_body(answer))
        assert (status, body["error"]["code"]) in (
            (504, "upstream_first_byte_timeout"),
            (503, "engine_lost"),
        ), answer[-300:]
    # The stream already begun ends with an error event in OpenAI's shape.
    stream_text = _body(first + ends[3][0]).decode()
    error = json.loads(stream_text.strip().split("\n\n")[-1].removeprefix("data: "))["error"]
    assert error["code"] in ("upstream_timeout", "engine_lost"), error
    # The verdict was the gateway's process's: the engine was stopped as hung, and the next
    # request is served by a fresh one.
    assert "hung" in gateway.log_text() or gateway.status()["models"][0]["pid"] != pid
    deadline = time.monotonic() + 30
    while (status := _chat(gateway)[0]) != 200:
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert gateway.status()["models"][0]["pid"] != pid


def _body(answer: bytes) -> bytes:
    head, _, body = answer.partition(b"\r\n\r\n")
    return dechunk(body) if b"transfer-encoding: chunked" in head.lower() else body
