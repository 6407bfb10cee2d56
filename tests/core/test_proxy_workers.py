"""Proxy workers (`proxy_workers: N`, proxy/worker_lane.py and worker_host.py): more processes
serve the fast lane on the gateway's port, and everything they serve goes through the
gateway's own decisions.

The gateway runs in-process (tests/harness.py) and its workers are real processes, started
as `modelyard serve` starts them, listening on the same port (SO_REUSEPORT): the kernel picks
the process for each new connection, so the tests open many connections and read from the
gateway's metrics which process served what. The engines are the harness's in-process ones
(real loopback servers in vLLM's shapes); the workers connect to them as to a real engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import generate_latest

from modelyard.config.loader import ConfigError, parse_config
from tests.core.test_fast_lane import read_answers
from tests.harness import Behaviour, Harness, engine_model, in_process_gateway
from tests.security.keys import LIMITED_KEY, USER_KEY, auth_settings, bearer

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}
WORKER = "modelyard.proxy.worker_lane"


def models() -> dict[str, Any]:
    return {
        "chat": engine_model(served_name="chat-upstream", aliases=["chat-alias"]),
        "secret": engine_model(),
    }


def metric(gateway: Harness, name: str, **labels: str) -> float:
    text = generate_latest(gateway.gateway.metrics.registry).decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for what another process reports (a worker's message is on its way)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "not reached in time"
        await asyncio.sleep(0.02)


def in_flight(gateway: Harness, model: str = "chat") -> int:
    """Requests the gateway's scheduler counts in flight on the model's engine."""
    return gateway.gateway.scheduler.load_counts(model)[0]


def worker_requests(gateway: Harness) -> float:
    return metric(gateway, "modelyard_proxy_worker_requests_total")


def workers_of(parent: int) -> list[int]:
    """The proxy workers of a process (its children running the worker module)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                command = file.read()
            with open(f"/proc/{entry}/stat") as file:
                ppid = int(file.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if WORKER.encode() in command and ppid == parent:
            pids.append(int(entry))
    return pids


def worker_pids() -> list[int]:
    """This test process's proxy workers (the in-process gateway's)."""
    return workers_of(os.getpid())


async def post(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One request on a fresh connection (so the kernel picks a process for it)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(url + "/v1/chat/completions", json=body, headers=headers or {}) as response,
    ):
        return response.status, await response.read()


async def test_requests_on_workers_are_served_and_accounted_as_the_gateways_own(tmp_path):
    async with in_process_gateway(tmp_path, models(), proxy_workers=2) as gateway:
        assert len(worker_pids()) == 2
        assert metric(gateway, "modelyard_proxy_workers_running") == 2
        bodies = []
        for number in range(40):
            body = {**CHAT, "model": "chat-alias", "stream": number % 2 == 0}
            if body["stream"]:
                body["stream_options"] = {"include_usage": True}
            bodies.append(body)
        answers = await asyncio.gather(*(post(gateway.url, body) for body in bodies))
        for body, (status, data) in zip(bodies, answers, strict=True):
            assert status == 200, data
            text = data.decode()
            # The alias the client asked for comes back; the engine's own name never does.
            assert set(re.findall(r'"model": ?"([^"]*)"', text)) == {"chat-alias"}, text
            if body["stream"]:
                assert text.rstrip().endswith("data: [DONE]")
        # Some were served by the workers, all of them counted once, as the gateway's own
        # (a worker's `done` may still be on its way when its client has the answer).
        await until(lambda: len(gateway.records) == 40)
        assert worker_requests(gateway) > 0
        assert metric(gateway, "modelyard_requests_total", model="chat", status="200") == 40
        assert metric(gateway, "modelyard_fast_lane_requests_total", outcome="served") == 40
        assert len(gateway.records) == 40
        assert all(record.key_name == "anonymous" for record in gateway.records)
        # The engine saw its own name in every request, never the alias.
        engine = gateway.runtime.engines[0]
        assert engine.state.requests == 40
        assert {json.loads(seen["body"])["model"] for seen in engine.state.received} == {
            "chat-upstream"
        }
    assert worker_pids() == []  # the workers stopped with the gateway


async def test_connections_a_worker_does_not_serve_go_whole_to_the_web_layer(tmp_path):
    """GETs, admin routes, an unknown model, a chunked body: each answered by the gateway's
    web layer, as if the client had connected to it, on the client's own socket."""
    async with in_process_gateway(tmp_path, models(), proxy_workers=2) as gateway:
        unknown = {**CHAT, "model": "nosuch"}
        for _ in range(12):
            connector = aiohttp.TCPConnector(force_close=True)
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.get(gateway.url + "/v1/models") as response,
            ):
                listed = await response.json()
                assert response.status == 200
                assert {m["id"] for m in listed["data"]} >= {"chat", "secret", "chat-alias"}
            status, data = await post(gateway.url, unknown)
            assert status == 404
            assert json.loads(data)["error"]["code"] == "model_not_found"
        # A keep-alive connection: a GET, then a fast POST, then a GET, all in order.
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.client.server.port)
        body = json.dumps(CHAT).encode()
        writer.write(
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            % (len(body), body)
        )
        data = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        assert data.count(b"HTTP/1.1 200") == 3, data
        assert data.index(b'"status"') < data.index(b"chat.completion") < data.index(b'"list"')
        assert metric(gateway, "modelyard_fast_lane_requests_total", outcome="handed_over") >= 12


async def test_keys_limits_and_scopes_hold_on_the_workers(tmp_path):
    settings = auth_settings()
    async with in_process_gateway(tmp_path, models(), proxy_workers=2, **settings) as gateway:
        no_key = await asyncio.gather(*(post(gateway.url, CHAT) for _ in range(10)))
        assert {status for status, _ in no_key} == {401}
        wrong = await asyncio.gather(
            *(post(gateway.url, CHAT, bearer("sk-" + "x" * 40)) for _ in range(10))
        )
        assert {status for status, _ in wrong} == {401}
        # A key limited to chat: the other model is as unknown as a missing one.
        scoped = await asyncio.gather(
            *(post(gateway.url, {**CHAT, "model": "secret"}, bearer(USER_KEY)) for _ in range(10))
        )
        assert {status for status, _ in scoped} == {404}
        assert {json.loads(data)["error"]["code"] for _, data in scoped} == {"model_not_found"}
        allowed = await asyncio.gather(
            *(post(gateway.url, CHAT, bearer(USER_KEY)) for _ in range(20))
        )
        assert {status for status, _ in allowed} == {200}
        # 3 requests a minute for this key, whichever process each request lands on.
        limited = await asyncio.gather(
            *(post(gateway.url, CHAT, bearer(LIMITED_KEY)) for _ in range(12))
        )
        assert sorted(status for status, _ in limited).count(200) == 3
        assert sorted(status for status, _ in limited).count(429) == 9
        assert gateway.model_state("secret") == "stopped"
        # No key ever reached the engine, from any process.
        engine = gateway.runtime.engines[0]
        for seen in engine.state.received:
            assert USER_KEY not in json.dumps(seen)
            assert LIMITED_KEY not in json.dumps(seen)
        assert worker_requests(gateway) > 0


async def stream_on_a_worker(
    gateway: Harness, chunks: int, delay: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream the kernel gave to a worker (connections are retried until one lands on a
    worker, as the worker request counter tells), with its first chunk read."""
    port = gateway.client.server.port
    body = json.dumps({**CHAT, "stream": True, "fake_chunks": chunks, "fake_chunk_delay": delay})
    for _ in range(60):
        before = worker_requests(gateway)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body.encode())
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        assert head.startswith(b"HTTP/1.1 200"), head
        await asyncio.wait_for(reader.readuntil(b"data: "), 20)
        if worker_requests(gateway) > before:
            return reader, writer
        writer.close()
        await gateway.wait_state("chat", "ready")
        while in_flight(gateway):
            await asyncio.sleep(0.05)
    raise AssertionError("no connection landed on a worker in 60 tries")


@pytest.mark.slow
async def test_no_engine_is_stopped_under_a_workers_stream(tmp_path):
    """A stream of 8 s on a worker holds its engine in the gateway's scheduler: the idle
    timer (1 s) waits for it; when the worker dies mid-stream, the engine is
    given back at once, the request is recorded as 502, and another worker takes its place."""
    config = {"chat": engine_model(idle_timeout=1), "secret": engine_model()}
    async with in_process_gateway(tmp_path, config, proxy_workers=2) as gateway:
        reader, writer = await stream_on_a_worker(gateway, chunks=16, delay=0.5)
        assert in_flight(gateway) == 1
        await asyncio.sleep(2.5)  # past the idle timeout: still streaming, still ready
        assert gateway.model_state("chat") == "ready"
        rest = await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), 20)  # its end
        assert rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), rest[-200:]
        writer.close()
        await until(lambda: in_flight(gateway) == 0)  # the worker's `done` is on its way
        await gateway.wait_state("chat", "stopped", timeout=10)  # idle now: stopped

        # The worker dies mid-stream (SIGKILL: the OOM killer, a bug).
        reader, writer = await stream_on_a_worker(gateway, chunks=40, delay=0.5)
        assert in_flight(gateway) == 1
        victims = worker_pids()
        before_502 = metric(gateway, "modelyard_requests_total", model="chat", status="502")
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        rest = await asyncio.wait_for(reader.read(), 20)  # the client sees the connection end
        assert b"[DONE]" not in rest
        writer.close()
        await until(lambda: in_flight(gateway) == 0)
        assert metric(gateway, "modelyard_requests_total", model="chat", status="502") > before_502
        # Restarted after a second.
        await until(lambda: metric(gateway, "modelyard_proxy_workers_running") == 2, 10)
        assert set(worker_pids()).isdisjoint(victims)
        status, _ = await post(gateway.url, CHAT)
        assert status == 200


@pytest.mark.slow
async def test_a_client_that_leaves_during_a_cold_start_leaves_the_queue(tmp_path):
    """Engines take seconds to start (30-60 s for vLLM on a GPU; 4 s here): clients that hang
    up while they wait, on whichever process, are counted as 499 and leave the queue."""
    behaviours = {"chat": Behaviour(ready_after=4.0)}
    async with in_process_gateway(tmp_path, models(), behaviours, proxy_workers=2) as gateway:
        port = gateway.client.server.port
        body = json.dumps(CHAT).encode()
        writers = []
        for _ in range(12):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            writers.append(writer)
        scheduler = gateway.gateway.scheduler
        await until(lambda: scheduler.total_waiting() == 12)
        assert worker_requests(gateway) > 0  # some of them wait through a worker
        for writer in writers:
            writer.close()
        await until(lambda: scheduler.total_waiting() == 0)
        await until(lambda: metric(gateway, "modelyard_requests_total", status="499") == 12)
        await gateway.wait_state("chat", "ready")
        assert in_flight(gateway) == 0


async def test_a_hang_up_that_crosses_a_finished_admission_lets_go_of_the_engine(tmp_path):
    """A worker's client hangs up just as the gateway admits its request: the admission task
    has finished, but its done callback (which takes it out of `admitting`) runs a turn of the
    loop later, and the worker's `cancel` can come in between. wrk closing its connections at
    the end of a benchmark run hit this 43 times in 50,000 requests; each hit held the engine
    for good (never idle, never stopped, a shutdown waiting its whole grace). Deterministic
    here: the window's state is set up as it was."""
    async with in_process_gateway(tmp_path, models(), proxy_workers=1) as gateway:
        status, _ = await post(gateway.url, CHAT)
        assert status == 200
        assert gateway.client.server.served is not None
        workers = gateway.client.server.served.workers
        assert workers is not None
        link = workers.links[0]
        request_id = 10**9  # not one the worker asked: its reply is dropped there
        link.on_message(
            ("admit", request_id, "/v1/chat/completions", "chat", b"127.0.0.1", [], None, 2)
        )
        admission = link.admitting[request_id]
        await asyncio.wait([admission])
        assert in_flight(gateway) == 1  # admitted: the engine is held for the worker
        link.admitting[request_id] = admission  # finished, its done callback not yet run
        link.on_message(("cancel", request_id))
        await until(lambda: in_flight(gateway) == 0)
        assert request_id not in link.held
        await until(lambda: metric(gateway, "modelyard_requests_total", status="499") == 1)


HOSTILE = [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
    b"Content-Length: 6\r\nContent-Type: application/json\r\n\r\n{}{}{}",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: evil.example\r\n"
    b'Content-Type: application/json\r\nContent-Length: 17\r\n\r\n{"model": "chat"}',
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b'Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n0\r\n\r\n',
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Type: application/json\r\nContent-Length: 9\r\n\r\n[[[[]]]]]",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Type: application/json\r\nContent-Length: 100001\r\n\r\n"
    + b"[" * 50_000
    + b"]" * 50_001,
    b"GET /../../etc/passwd HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS hello
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b'Content-Type: application/json\r\nContent-Length: 30\r\n\r\n{"model": "chat\\u0000", "x":1}',
]


def send_and_read(port: int, data: bytes) -> list[tuple[int, bytes]]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        return read_answers(sock, 1)


async def test_hostile_requests_get_the_gateways_own_answers_on_any_process(tmp_path):
    async with in_process_gateway(tmp_path, models(), proxy_workers=2) as gateway:
        port = gateway.client.server.port
        for _ in range(4):
            for data in HOSTILE:
                # In a thread: the gateway's own process is this test's event loop.
                answers = await asyncio.to_thread(send_and_read, port, data)
                if not answers:
                    assert data.startswith(b"\x16"), data[:40]  # a TLS hello may get none
                    continue
                status, body = answers[0]
                assert 400 <= status < 500, (data[:60], status, body[:300])
                assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
        assert metric(gateway, "modelyard_proxy_workers_running") == 2
        assert len(worker_pids()) == 2
        status, _ = await post(gateway.url, CHAT)
        assert status == 200


def test_proxy_workers_and_tls_together_are_a_clear_config_error(tmp_path):
    with pytest.raises(ConfigError, match="proxy_workers serve plain HTTP only"):
        parse_config(
            {
                "proxy_workers": 2,
                "tls": {"cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "k.pem")},
                "models": {},
            }
        )
    with pytest.raises(ConfigError):
        parse_config({"proxy_workers": -1, "models": {}})


async def test_a_reload_reaches_the_lanes_upstream_timeout_in_every_process(tmp_path):
    """`limits.upstream_read_timeout` lowered by a reload: an engine that then answers too
    slowly gets the 504 of the new limit, whichever process the connection lands on (the fast
    lanes kept their start-time timeouts before)."""
    settings: dict[str, Any] = {"proxy_workers": 2, "limits": {"upstream_read_timeout": 10}}
    async with in_process_gateway(tmp_path, models(), **settings) as gateway:
        slow = {**CHAT, "fake_delay": 1.0}
        assert [status for status, _ in [await post(gateway.url, slow) for _ in range(3)]] == [
            200
        ] * 3
        path = tmp_path / "modelyard.yaml"
        config = {"state_dir": str(tmp_path / "state"), "models": models(), **settings}
        config["limits"] = {"upstream_read_timeout": 0.3}
        path.write_text(yaml.safe_dump(config))
        gateway.gateway.config_path = path
        await gateway.gateway.reload()
        await asyncio.sleep(0.5)  # the workers hear of it over their socket pairs
        answers = await asyncio.gather(*(post(gateway.url, slow) for _ in range(8)))
        for status, data in answers:
            assert status == 504, data[:300]
            assert "0.3s" in json.loads(data)["error"]["message"]
        assert worker_requests(gateway) > 0
