"""Proxy workers with a real `modelyard serve` process: what only a process shows (signals,
exit codes, processes left behind)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time

import aiohttp
import yaml

from tests.conftest import fake_model
from tests.core.test_proxy_workers import workers_of


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def stream(url: str) -> list[dict[str, object]]:
    """A long stream on its own connection (the kernel picks the process)."""
    body = {
        "model": "m",
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
        "fake_chunks": 300,
        "fake_chunk_delay": 0.1,
    }
    events = []
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(url + "/v1/chat/completions", json=body) as response,
    ):
        assert response.status == 200
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    return events


async def test_sigterm_ends_every_processs_streams_after_one_grace_and_stops_the_workers(
    gateway_factory,
):
    gateway = gateway_factory(
        {"m": fake_model("m")}, proxy_workers=2, limits={"shutdown_grace": "3s"}
    )
    workers = workers_of(gateway.process.pid)
    assert len(workers) == 2
    streams = [asyncio.create_task(stream(gateway.url)) for _ in range(8)]
    await asyncio.sleep(2.0)  # the engine starts, every stream is under way
    began = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)
    results = await asyncio.wait_for(asyncio.gather(*streams), 30)
    ended = time.monotonic() - began
    assert ended < 9  # one grace (3 s) and the engine's stop, not a hang
    for events in results:
        assert len(events) > 10
        assert events[-1]["error"]["code"] == "shutting_down"  # type: ignore[index]
    assert gateway.process.wait(timeout=20) == 0
    assert not [pid for pid in workers if alive(pid)]
    log = gateway.log_text()
    assert "Traceback" not in log
    assert "proxy worker" in log  # their start is logged


async def test_workers_never_outlive_a_killed_gateway(gateway_factory):
    gateway = gateway_factory({"m": fake_model("m")}, proxy_workers=2)
    workers = workers_of(gateway.process.pid)
    assert len(workers) == 2
    gateway.process.send_signal(signal.SIGKILL)  # the OOM killer: no shutdown at all
    gateway.process.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not [pid for pid in workers if alive(pid)]


def sockets_on_port(pid: int, port: int) -> list[str]:
    """The TCP sockets a process holds whose local port is `port` (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    held = []
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and int(fields[1].split(":")[1], 16) == port:
                held.append(fields[1] + " " + fields[2])
    return held


def ask_and_read_to_the_end(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):  # `Connection: close`: read until the gateway closes
            answer += chunk
    return answer


async def test_an_engine_started_for_a_handed_over_connection_does_not_inherit_it(
    gateway_factory,
):
    """A connection a worker hands over arrives as a file descriptor; an engine the gateway
    starts for it must not inherit it (uvloop's spawn keeps inheritable descriptors open), or
    the client never sees the connection close. Found by the differential test: the first
    request, a cold start through /upstream, hung its `Connection: close` client."""
    gateway = gateway_factory({"m": fake_model("m")}, proxy_workers=2)
    port = int(gateway.url.rsplit(":", 1)[1])
    request = b"GET /upstream/m/v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    for _ in range(8):  # fresh connections: some land on a worker and are handed over
        answer = await asyncio.to_thread(ask_and_read_to_the_end, port, request)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    engines = gateway.engine_pids()
    assert engines
    for pid in engines:
        assert sockets_on_port(pid, port) == []


async def test_a_reload_changes_the_body_limit_in_every_process(gateway_factory):
    """`limits.max_body_bytes` lowered by a reload: a body over the new limit gets 413 on
    whichever process its connection lands (the fast lane of each kept its start-time limit
    before), and one within it is still served."""
    gateway = gateway_factory(
        {"m": fake_model("m")}, proxy_workers=2, limits={"max_body_bytes": "64KiB"}
    )
    padding = "x" * (30 * 1024)
    big = {"model": "m", "messages": [{"role": "user", "content": padding}]}
    small = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    statuses = [(await post_fresh(gateway.url, big))[0] for _ in range(6)]
    assert statuses == [200] * 6
    config = yaml.safe_load(gateway.config_path.read_text())
    config["limits"]["max_body_bytes"] = "16KiB"
    gateway.config_path.write_text(yaml.safe_dump(config))
    status, _ = await post_fresh(gateway.url, None, "/admin/reload")
    assert status == 200
    for _ in range(8):
        status, body = await post_fresh(gateway.url, big)
        assert status == 413, body[:200]
        assert json.loads(body)["error"]["code"] == "body_too_large"
        status, _ = await post_fresh(gateway.url, small)
        assert status == 200


async def post_fresh(
    url: str, body: dict[str, object] | None, path: str = "/v1/chat/completions"
) -> tuple[int, bytes]:
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(url + path, json=body) as response,
    ):
        return response.status, await response.read()
