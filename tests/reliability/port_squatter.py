"""Stands for another program on the box that binds an engine's port after the gateway chose
it and before the engine bound it (vLLM binds once its imports are done, seconds after it was
started). When it squats, a process of its own (in a session of its own, as another program's
would be: the engine's stop does not reach it) listens on the port; then it runs the test
engine, which cannot bind and exits as vLLM does ("address already in use").

argv: FOLDER once|always|answered PORT ENGINE-ARGV...
- once: squat on the first run only; later runs run the engine.
- always: squat on every run.
- answered: on the first run, hand the port to the answering squatter (below), already
  running, and run the engine once it listens; later runs run the engine.
FOLDER gets one file per squat, named by the port, holding the squatter's pid (for the test
to stop it).

argv: detached FOLDER PORT: stands for `docker run -p PORT:...`: the engine's own server
runs outside the engine's process tree (docker-proxy, or the container's process, is the
daemon's child, not the `docker` command's) and was started after the engine's command. This
process starts such a server on PORT (twice forked, in a session of its own: answering as
the answering squatter does, its pid in FOLDER/PORT) and then waits, as `docker run` does.

argv: answer FOLDER: the answering squatter, another program's HTTP server that was running
before the engine was started (the test starts it first, apart from the gateway). It waits
for a port in FOLDER/want, binds it and answers every request with 200 and
`{"object": "squatter"}`, as a foreign server answering `/health` would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

SQUAT = """
import os, socket, sys, time
sock = socket.socket()
sock.bind(("127.0.0.1", int(sys.argv[1])))
sock.listen()
open(sys.argv[2] + ".tmp", "w").write(str(os.getpid()))
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
time.sleep(120)
"""


class Answer(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        body = json.dumps({"object": "squatter"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


def answer(folder: Path) -> None:
    want = folder / "want"
    while not want.exists():
        time.sleep(0.01)
    port = int(want.read_text())
    serve(port, folder / str(port))


def hand_over(folder: Path, port: int) -> None:
    """Give the port to the answering squatter; return once it listens."""
    (folder / "want.tmp").write_text(str(port))
    (folder / "want.tmp").rename(folder / "want")
    deadline = time.monotonic() + 10
    while not (folder / str(port)).exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def serve(port: int, record: Path) -> None:
    server = HTTPServer(("127.0.0.1", port), Answer)
    record.with_suffix(".tmp").write_text(str(os.getpid()))
    record.with_suffix(".tmp").rename(record)
    server.serve_forever()


def detached(folder: Path, port: int) -> None:
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            serve(port, folder / str(port))
        os._exit(0)
    time.sleep(3600)


def main() -> None:
    if sys.argv[1] == "answer":
        answer(Path(sys.argv[2]))
        return
    if sys.argv[1] == "detached":
        detached(Path(sys.argv[2]), int(sys.argv[3]))
        return
    folder, mode, port, engine = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    if mode == "answered":
        if not (folder / "want").exists():
            hand_over(folder, port)
    elif mode == "always" or not any(folder.iterdir()):
        record = folder / str(port)
        subprocess.Popen(
            [sys.executable, "-c", SQUAT, str(port), str(record)], start_new_session=True
        )
        deadline = time.monotonic() + 10
        while not record.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it listens
    os.execv(sys.executable, [sys.executable, *engine])


if __name__ == "__main__":
    main()
