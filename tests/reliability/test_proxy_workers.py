"""Proxy workers (`proxy_workers:`): more processes on the gateway's port, the gateway's own
process deciding. A worker killed with a stream in flight leaves no hold, no fair-queue slot
and no silent record behind: the request is logged as 502, the engine serves on, and another
worker takes the dead one's place. Worker messages of another version, and the worker
headers sent by a client, are refused or ignored."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest

from modelyard.proxy.worker_messages import (
    VERSION,
    Finish,
    MessageError,
    decode_channel,
    decode_finish,
    encode,
)
from tests.conftest import RunningGateway, fake_model
from tests.security.keys import ADMIN_KEY, auth_settings
from tests.security.raw_http import dechunk

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


def _request(port: int, body: dict[str, Any], *headers: str) -> bytes:
    data = json.dumps(body).encode()
    lines = [
        "POST /v1/chat/completions HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
        "Connection: close",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def _answer(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _chat(gateway: RunningGateway, **fields: Any) -> tuple[int, bytes]:
    port = int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(_request(port, {**CHAT, **fields}))
        answer = _answer(sock)
    return int(answer.split(b" ", 2)[1]), answer


def worker_settings(gateway: RunningGateway) -> dict[int, dict[str, Any]]:
    """The gateway's live workers: pid -> the settings it was started with."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == gateway.process.pid and b"modelyard.workers.worker" in argv:
            found[int(entry.name)] = json.loads(argv[argv.index(b"modelyard.workers.worker") + 1])
    return found


def holder_of(sock: socket.socket, pids: list[int]) -> int | None:
    """Which of `pids` holds the server side of our connection (from /proc, by inode)."""
    ours = sock.getsockname()[1]
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port == ours:
            inodes.add(fields[9])
    for pid in pids:
        try:
            for fd in (Path("/proc") / str(pid) / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return pid
        except OSError:
            continue
    return None


def wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_worker_killed_mid_stream_is_logged_502_and_lets_go_of_the_engine(gateway_factory):
    gateway = gateway_factory({"chat": fake_model("chat", max_in_flight=1)}, proxy_workers=2)
    assert _chat(gateway)[0] == 200  # the engine is up
    workers = worker_settings(gateway)
    assert len(workers) == 2
    port = int(gateway.url.rsplit(":", 1)[1])
    # A stream on a worker's connection (the kernel spreads connections over the processes).
    for _ in range(60):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(_request(port, {**CHAT, "stream": True, "fake_chunks": 400}))
        first = sock.recv(65536)
        assert b" 200 " in first.split(b"\r\n", 1)[0], first[:200]
        victim = holder_of(sock, list(workers))
        if victim is not None:
            break
        sock.close()
    else:
        pytest.fail("no connection landed on a worker")
    os.kill(victim, signal.SIGKILL)
    rest = _answer(sock)  # the stream is cut: the worker is gone
    sock.close()
    assert b"data: [DONE]" not in rest
    wait_for(lambda: "status=502" in gateway.log_text(), "the lost request was not logged as 502")
    assert "proxy worker" in gateway.log_text()
    assert "logged as 502" in gateway.log_text()
    # Gone for good (reaped): a connection still waiting in a dead process's accept queue is
    # reset by the kernel, and that is not what this test is about.
    wait_for(lambda: "exited with -9" in gateway.log_text(), "the worker's exit was not seen")
    # Its turn (max_in_flight: 1) and its hold were let go: the next request is served.
    for _ in range(4):
        status, answer = _chat(gateway)
        assert status == 200, answer[-300:]
    model = gateway.status()["models"][0]
    assert model["in_flight"] == 0, model
    assert model["state"] == "ready", model  # the engine serves on
    # Another worker took the dead one's place.
    wait_for(
        lambda: len(worker_settings(gateway)) == 2 and victim not in worker_settings(gateway),
        "the dead worker was not replaced",
    )
    assert gateway.stop() == 0
    assert not worker_settings(gateway), "a worker outlived the gateway"


def test_worker_headers_from_a_client_are_not_trusted(gateway_factory):
    """A client naming another target, a peer or a request id in the workers' own headers
    changes nothing, whichever process takes its connection."""
    gateway = gateway_factory({"chat": fake_model("chat")}, proxy_workers=2)
    port = int(gateway.url.rsplit(":", 1)[1])
    forged = (
        f"Modelyard-Admission: {VERSION} w0 forged",
        "Modelyard-Target: /upstream/chat/sleep",
        "Modelyard-Peer: 10.0.0.1",
    )
    for _ in range(9):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                + "".join(f"{line}\r\n" for line in forged).encode()
                + b"\r\n"
            )
            answer = _answer(sock)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert b'"status": "ok"' in answer
    assert gateway.model_state("chat") == "stopped"  # nothing reached the engine


def test_a_worker_message_of_another_version_is_refused(gateway_factory):
    gateway = gateway_factory({"chat": fake_model("chat")}, proxy_workers=1)
    settings = next(iter(worker_settings(gateway).values()))
    head = (
        "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Modelyard-Admission: {VERSION + 1} w0 r1\r\nModelyard-Target: /health\r\n\r\n"
    )
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(settings["admission_socket"])
        sock.sendall(head.encode())
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b"version" in answer
    assert b"worker_protocol" in answer
    finish = json.dumps({"version": VERSION + 1, "kind": "finish", "request": "r1"}).encode()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(settings["control_socket"])
        sock.sendall(
            b"POST /finish HTTP/1.1\r\nHost: owner\r\nConnection: close\r\n"
            + f"Content-Length: {len(finish)}\r\n\r\n".encode()
            + finish
        )
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b"is not this gateway" in answer
    # Only this user may reach the sockets.
    for path in (settings["admission_socket"], settings["control_socket"]):
        assert os.stat(path).st_mode & 0o077 == 0
        assert os.stat(os.path.dirname(path)).st_mode & 0o077 == 0


@pytest.mark.parametrize(
    "line",
    [
        b'{"version": 2, "kind": "done"}',
        b'{"kind": "done"}',
        b'{"version": "1", "kind": "done"}',
        b"[1]",
        b"not json",
        b'{"version": 1, "kind": "nope"}',
        b'{"version": 1, "kind": "relay"}',
        b'{"version": 1, "kind": "done", "extra": 1}',
    ],
)
def test_unreadable_messages_are_refused_clearly(line):
    with pytest.raises(MessageError):
        decode_channel(line)
    with pytest.raises(MessageError):
        decode_finish(line)


def test_a_finish_survives_the_trip():
    finish = Finish(request="w0-1", status=200, usage={"prompt_tokens": 3}, streamed=True)
    assert decode_finish(encode(finish)) == finish


def test_clients_of_workers_are_kept_informed_through_a_cold_start(gateway_factory):
    """Streams that wait for an engine's start, on every process's connections: each gets its
    headers and loading comments while the engine starts, then the whole answer."""
    gateway = gateway_factory(
        {"chat": fake_model("chat", "--vllm-start", "4", "--download")}, proxy_workers=2
    )
    port = int(gateway.url.rsplit(":", 1)[1])
    socks = []
    for index in range(6):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        extra = ("X-Modelyard-Loading: content",) if index == 0 else ()
        sock.sendall(_request(port, {**CHAT, "stream": True, "fake_chunks": 3}, *extra))
        socks.append(sock)
    time.sleep(0.5)  # every connection accepted by now (the start takes 4 s)
    workers = list(worker_settings(gateway))
    assert any(holder_of(sock, workers) for sock in socks), "no stream went through a worker"
    for index, sock in enumerate(socks):
        answer = _answer(sock)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        answer = dechunk(answer.split(b"\r\n\r\n", 1)[1])
        assert answer.startswith(b": loading chat: "), answer[:500]
        assert answer.rstrip().endswith(b"data: [DONE]"), answer[-300:]
        assert b'"error"' not in answer
        if index == 0:
            assert b"reasoning_content" in answer
            assert b"loading chat" in answer
    # A worker posts each finish to the gateway after the client's last bytes: the request
    # log may trail the answers by a moment on a loaded machine.
    deadline = time.monotonic() + 15
    while gateway.log_text().count("status=200") < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gateway.log_text().count("status=200") == 6


def test_keys_are_charged_exactly_whichever_process_serves(gateway_factory):
    """A key's budget, usage and metrics add up to what its requests used, with requests on
    fresh connections spread over the gateway's process and two workers; `/metrics`
    answers the same totals from every process."""

    gateway = gateway_factory({"chat": fake_model("chat")}, proxy_workers=2, **auth_settings())
    admin = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}

    def call(method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        sent = urllib.request.Request(gateway.url + path, data=data, method=method, headers=admin)
        with urllib.request.urlopen(sent, timeout=30) as answer:
            text = answer.read().decode()
        return text if path == "/metrics" else json.loads(text)

    key = call(
        "POST", "/admin/keys", {"name": "spread", "models": ["chat"], "token_budget": 100_000}
    )
    messages: Any = CHAT["messages"]
    for _ in range(6):
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key=key["key"], max_retries=0) as sdk:
            answer = sdk.chat.completions.create(model="chat", messages=messages)
            assert answer.choices[0].message.content == "chat says: hi"
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key=key["key"], max_retries=0) as sdk:
            stream = sdk.chat.completions.create(
                model="chat", messages=messages, stream=True, extra_body={"fake_chunks": 4}
            )
            chunks = list(stream)
            assert chunks
            assert all(chunk.usage is None for chunk in chunks)
    entry = next(k for k in call("GET", "/admin/keys")["keys"] if k["name"] == "spread")
    assert entry["usage"]["models"]["chat"] == {
        "requests": 12,
        "prompt_tokens": 6 * 5 + 6 * 5,
        "completion_tokens": 6 * 3 + 6 * 4,
    }
    assert entry["budget"]["spent"] == 6 * 8 + 6 * 9
    line = 'modelyard_requests_total{key="spread",model="chat",route="/v1/chat",status="200"} 12.0'
    for _ in range(6):  # fresh connections: each process answers with the owner's totals
        assert line in call("GET", "/metrics")
