"""The attacks of issue 21 on a running `modelyard serve`: each one once held a connection for
good, ate the event loop or ran foreign code; each must now be refused or contained by the
server's limits while `/health` keeps answering.

- a pipelining flood: requests sent without ever reading an answer;
- a 4 MiB body sent in 256-byte pieces; a body that stops coming;
- four 4 MiB JSON bodies without a key, in parallel;
- a request head sent one line at a time;
- request lines ending in a bare LF;
- a `modelyard/` folder planted in the directory the gateway is started from.

The CPU a request costs is read from /proc for the gateway's process alone (engines left out),
so the figures hold on a busy machine; the timings are an attacker's, shortened where a limit
is set lower for the test (`limits.head_timeout`, `limits.body_timeout`).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import RunningGateway, fake_model, free_port, processes_with
from tests.security.front_door import DOORS, door_settings, open_socket
from tests.security.keys import auth_settings

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
MiB = 1024 * 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def post(path: str, body: bytes, *headers: str, newline: str = "\r\n") -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *headers,
    ]
    return (newline.join(lines) + newline + newline).encode() + body


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@contextmanager
def health_probe(url: str) -> Iterator[list[float]]:
    """GET /health every 50 ms on a fresh connection while the block runs: the latencies."""
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            began = time.perf_counter()
            try:
                with urllib.request.urlopen(url + "/health", timeout=10) as answer:
                    answer.read()
                latencies.append(time.perf_counter() - began)
            except OSError:
                latencies.append(10.0)
            stop.wait(0.05)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    try:
        yield latencies
    finally:
        stop.set()
        thread.join(timeout=15)


def read_status(sock: socket.socket, timeout: float) -> tuple[int, bytes]:
    """The status of the first answer on `sock` (0 if it closed without one), and its bytes."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    except TimeoutError:
        return -1, data  # still open, nothing said: the hang these tests are about
    except ConnectionResetError:
        return 0, data
    parts = data.split(b"\r\n", 1)[0].split()
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0), data


def closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def started(gateway_factory: Any, **limits: str) -> RunningGateway:
    """A gateway with one test engine, started and warm before any attack."""
    running: RunningGateway = gateway_factory({"chat": fake_model("chat")}, limits=limits)
    urllib.request.urlopen(
        urllib.request.Request(
            running.url + "/v1/chat/completions",
            data=json.dumps(CHAT).encode(),
            headers={"Content-Type": "application/json"},
        ),
        timeout=30,
    ).read()
    return running


@pytest.fixture
def gateway(gateway_factory) -> RunningGateway:
    return started(gateway_factory, head_timeout="1s", body_timeout="2s")


def test_a_pipelining_flood_is_not_read_ahead(gateway):
    """A client pipelines chat requests for 5 s and never reads an answer. The gateway stops
    reading once a few wait (the answers it cannot write hold the handler; a full queue
    pauses the socket): only what fits in the kernel's buffers is sent, its memory does not
    grow with the flood, and /health answers as before. (The fast lane read 62-89 MiB in
    4-9 s, grew by 60-260 MB, and /health took 2-5 s.)"""
    pid = gateway.process.pid
    batch = post("/v1/chat/completions", json.dumps(CHAT).encode()) * 64
    rss_before = rss_bytes(pid)
    sent = 0
    with health_probe(gateway.url) as latencies, open_socket(gateway.url, False) as sock:
        sock.settimeout(1.0)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                sent += sock.send(batch)
            except TimeoutError:
                continue  # the gateway is not reading: keep trying until the deadline
        rss_growth = rss_bytes(pid) - rss_before
    assert sent < 16 * MiB, f"the gateway took {sent / MiB:.1f} MiB of unanswered requests"
    assert rss_growth < 40 * MiB, f"the gateway grew by {rss_growth / MiB:.0f} MiB"
    assert statistics.median(latencies) < 0.1, latencies
    assert gateway.process.poll() is None


def _cpu_to_read_in_pieces(gateway, size: int) -> float:
    """Gateway CPU seconds to take a chat request of about `size` bytes in 256-byte pieces."""
    pid = gateway.process.pid
    padding = "x" * (size - 4096)
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": padding}]}).encode()
    raw = post("/v1/chat/completions", body)
    cpu_before = cpu_seconds(pid)
    with open_socket(gateway.url, False) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start in range(0, len(raw), 256):
            sock.sendall(raw[start : start + 256])
            time.sleep(0.00005)  # the pace of a slow link: pieces arrive one by one
        status, _ = read_status(sock, 30)
    assert status == 200
    return cpu_seconds(pid) - cpu_before


def test_a_body_in_256_byte_pieces_costs_little_cpu(gateway_factory):
    """A body of nearly 4 MiB (the limit) sent in 256-byte pieces: the server reads it in
    place, so its CPU grows with the body, not with the body times the pieces (the fast
    lane's `buffer += data` copied the whole body per piece: 1-3 s for 4 MiB). Compared with
    a 1 MiB body in the same run, so a loaded machine slows both alike: a copy per piece
    would make each piece of the 4 MiB body cost about four times as much."""
    gateway = started(gateway_factory)
    _cpu_to_read_in_pieces(gateway, 64 * 1024)  # warm up: first-request costs out of the way
    small = _cpu_to_read_in_pieces(gateway, 1 * MiB)
    large = _cpu_to_read_in_pieces(gateway, 4 * MiB)
    assert large < 2.0 * 4 * small, (
        f"4 MiB cost {large:.2f} s of CPU against {small:.2f} s for 1 MiB: more than linear"
    )
    assert large < 3.0, f"the gateway spent {large:.2f} s of CPU reading one body"


def test_a_body_that_stops_coming_is_refused_in_time(gateway):
    """A head that promises 4 MiB, then a few bytes, then nothing: a 408 after
    `limits.body_timeout` (2 s here), not a connection held for good."""
    head = post("/v1/chat/completions", b"")
    head = head.replace(b"Content-Length: 0", b"Content-Length: %d" % (4 * MiB - 1))
    with open_socket(gateway.url, False) as sock:
        began = time.monotonic()
        sock.sendall(head + b'{"model": "chat", "messages": [')
        status, answer = read_status(sock, 6)
        waited = time.monotonic() - began
    assert status == 408, answer[:300]
    assert 1.5 < waited < 5
    assert b'"body_timeout"' in answer


@pytest.mark.parametrize("door", DOORS)
def test_a_slow_head_is_closed_after_the_head_timeout(gateway_factory, tmp_path, door):
    """One header line every 0.3 s, never the blank line that ends the head: the connection is
    closed once `limits.head_timeout` (1 s here) has passed since it opened, though bytes
    keep coming; over TLS too (the same server). (Neither path had a limit: one line every
    20 s held a connection for good.)"""
    gateway = gateway_factory(
        {"chat": fake_model("chat")},
        limits={"head_timeout": "1s"},
        **door_settings(door, tmp_path / door),
    )
    with open_socket(gateway.url, door == "tls") as sock:
        began = time.monotonic()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed = False
        for index in range(20):
            try:
                sock.sendall(f"X-Line-{index}: {'y' * 20}\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if closed_within(sock, 0.3):
                closed = True
                break
        waited = time.monotonic() - began
    assert closed, "the connection is still open after 6 s of a head that never ends"
    assert waited < 3


@pytest.mark.parametrize("separator", ["\n", "\r\n\n"])
def test_lines_ending_in_a_bare_lf_are_answered(gateway, separator):
    """A request whose lines end in a bare LF (or a head whose last line does): answered at
    once, served or refused with an OpenAI-shaped error, never left without an answer."""
    body = json.dumps(CHAT).encode()
    raw = post("/v1/chat/completions", body, newline="\n")
    if separator != "\n":
        raw = raw.replace(b"\n\n", b"\r\n\n", 1)
    with open_socket(gateway.url, False) as sock:
        sock.sendall(raw)
        status, answer = read_status(sock, 5)
    assert status in (200, 400), answer[:300]
    if status == 400:
        error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        assert set(error) == {"message", "type", "param", "code"}


def test_four_unauthenticated_4_mib_bodies_are_refused_before_any_parse(gateway_factory):
    """With keys configured, four clients at once each send a 4 MiB JSON body of small objects
    without a key. Each is refused with a 401 before its body is read, let alone parsed: the
    four cost the gateway little CPU, and /health keeps answering. (The fast lane parsed each
    before checking the key: 0.55 s of CPU each, /health at 1.7 s.)"""
    running = gateway_factory({"chat": fake_model("chat")}, **auth_settings())
    messages = [{"role": "user", "content": "x"}] * (4 * MiB // 32)
    body = json.dumps({"model": "chat", "messages": messages}).encode()[: 4 * MiB - 16]
    raw = post("/v1/chat/completions", body)
    pid = running.process.pid
    statuses: list[int] = []

    def attack() -> None:
        with open_socket(running.url, False) as sock:
            # Refused and closed before the whole body was sent: as it should be.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(raw)
            statuses.append(read_status(sock, 10)[0])

    cpu_before = cpu_seconds(pid)
    with health_probe(running.url) as latencies:
        threads = [threading.Thread(target=attack) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    used = cpu_seconds(pid) - cpu_before
    assert statuses == [401] * 4 or set(statuses) <= {401, 0}, statuses
    assert 401 in statuses
    assert used < 1.0, f"the gateway spent {used:.2f} s of CPU on four refused requests"
    assert statistics.median(latencies) < 0.1, latencies


@contextmanager
def served_by_script(tmp_path: Path, cwd: Path, **settings: Any) -> Iterator[tuple[Any, str]]:
    """`modelyard serve` as an operator starts it (the installed script), from `cwd`, in a
    session of its own (so the test can signal its whole process group), with one test engine;
    stopped with SIGTERM after the block, and no engine of it left running."""
    port = free_port()
    marker = f"frontdoor-{tmp_path.name}-{port}"
    chat = fake_model("chat")
    chat["command"] = [*chat["command"], "--root", marker]
    config = {
        "listen": f"127.0.0.1:{port}",
        "state_dir": str(tmp_path / "state"),
        "models": {"chat": chat},
        **settings,
    }
    config_path = tmp_path / "modelyard.yaml"
    config_path.write_text(yaml.safe_dump(config))
    script = Path(sys.executable).parent / "modelyard"
    process = subprocess.Popen(
        [str(script), "serve", "-c", str(config_path)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as answer:
                    assert answer.status == 200
                break
            except OSError:
                assert process.poll() is None, process.communicate()[0]
                assert time.monotonic() < deadline, "the gateway did not start"
                time.sleep(0.1)
        yield process, url
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=30)
        leaked = processes_with(marker)
        for pid in leaked:
            os.kill(pid, signal.SIGKILL)
        assert not leaked, f"engine processes leaked: {leaked}"


def chat_request(url: str, **fields: Any) -> urllib.request.Request:
    return urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps({**CHAT, **fields}).encode(),
        headers={"Content-Type": "application/json"},
    )


def test_a_planted_modelyard_folder_in_the_working_directory_is_never_run(tmp_path):
    """The gateway started as an operator starts it (the `modelyard` script) from a directory
    that holds a `modelyard/` package: nothing of that package runs, in the gateway or any
    process it starts, with `proxy_workers` set or not. (Proxy workers were started with
    `python -m modelyard.proxy.worker_lane`, which puts the working directory first on
    sys.path.)"""
    planted = tmp_path / "cwd" / "modelyard"
    planted.mkdir(parents=True)
    marker = tmp_path / "planted-code-ran"
    code = f"open({str(marker)!r}, 'a').write('ran\\n')\n"
    for name in ("__init__.py", "__main__.py"):
        (planted / name).write_text(code)
    (planted / "proxy").mkdir()
    (planted / "proxy" / "__init__.py").write_text(code)
    (planted / "proxy" / "worker_lane.py").write_text(code)
    with served_by_script(tmp_path, planted.parent, proxy_workers=2) as (_, url):
        for _ in range(6):  # on new connections: any process on the port gets some
            with urllib.request.urlopen(chat_request(url), timeout=30) as answer:
                assert answer.status == 200
    assert not marker.exists(), "code from the planted modelyard/ folder ran"


def test_a_sighup_to_the_process_group_cuts_no_stream(tmp_path):
    """What a closed terminal sends: SIGHUP to the gateway's whole process group while six
    streams are in flight, each on its own connection. The gateway reloads its config; every
    stream comes whole, without an error event, and the gateway serves on. (With
    `proxy_workers`, it killed every worker, cutting their streams, while the gateway itself
    reloaded; the setting is kept here for that reason.)"""
    with served_by_script(tmp_path, tmp_path, proxy_workers=2) as (process, url):
        with urllib.request.urlopen(chat_request(url), timeout=30) as answer:
            assert answer.status == 200  # the engine is up
        streamed: list[bytes] = []

        def stream() -> None:
            request = chat_request(url, stream=True, fake_chunks=30, fake_chunk_delay=0.05)
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    streamed.append(answer.read())
            except (OSError, http.client.HTTPException) as error:
                streamed.append(repr(error).encode())

        readers = [threading.Thread(target=stream) for _ in range(6)]
        for reader in readers:
            reader.start()
        time.sleep(0.5)  # about ten events in
        os.killpg(process.pid, signal.SIGHUP)
        for reader in readers:
            reader.join(timeout=30)
        assert len(streamed) == 6
        for answer in streamed:
            events = [line for line in answer.split(b"\n") if line.startswith(b"data: ")]
            assert events, answer[-300:]
            assert events[-1] == b"data: [DONE]", answer[-300:]
            assert not any(b'"error"' in event for event in events)
            assert sum(b'"choices"' in event for event in events) >= 30
        assert process.poll() is None
        with urllib.request.urlopen(chat_request(url), timeout=30) as answer:
            assert answer.status == 200


HOSTILE: list[bytes] = [
    post("/v1/chat/completions", json.dumps(CHAT).encode()),
    post("/v1/chat/completions", b"{nope"),
    post("/v1/chat/completions", b'{"model": "nosuch"}'),
    post("/v1/chat/completions", json.dumps(CHAT).encode(), newline="\n"),
    post("/v1/chat/completions", b"{}", "Content-Length: 9"),
    post("/v1/chat/completions", b"{}", "X-Odd: a\x00b"),
    post("/v1/chat/completions", b"{}", "X-Long: " + "z" * 9000),
    post("/v1/chat/completions", b"{}", *(f"X-{n}: {n}" for n in range(150))),
    post("/v1/chat/completions", b"{}", "Transfer-Encoding: chunked"),
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /../../etc/passwd HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"BREW /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /v1/models HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 64,
    post("/sleep", b"{}"),
    post("/chat/v1/chat/completions", json.dumps(CHAT).encode()),
]


def test_every_door_gives_every_hostile_request_the_same_status(gateway_factory, tmp_path):
    """One server behind every door: the same bytes get the same status over TCP, over TLS
    and through proxy workers."""
    statuses: dict[str, list[int]] = {}
    for door in DOORS:
        running = gateway_factory(
            {"chat": fake_model("chat", route="/chat")}, **door_settings(door, tmp_path / door)
        )
        answers = []
        for raw in HOSTILE:
            with open_socket(running.url, door == "tls") as sock:
                sock.sendall(raw)
                answers.append(read_status(sock, 10)[0])
        statuses[door] = answers
    assert statuses["plain"] == statuses["tls"] == statuses["workers"], statuses
    assert -1 not in statuses["plain"], statuses  # every request answered or closed
    assert statuses["plain"][0] == 200
