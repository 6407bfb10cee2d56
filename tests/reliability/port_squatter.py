"""Stands for another program on the box that binds an engine's port after the gateway chose
it and before the engine bound it (vLLM binds once its imports are done, seconds after it was
started). When it squats, a process of its own (in a session of its own, as another program's
would be: the engine's stop does not reach it) listens on the port; then it runs the test
engine, which cannot bind and exits as vLLM does ("address already in use").

argv: FOLDER once|always PORT ENGINE-ARGV...
- once: squat on the first run only; later runs run the engine.
- always: squat on every run.
FOLDER gets one file per squat, named by the port, holding the squatter's pid (for the test
to stop it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
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


def main() -> None:
    folder, mode, port, engine = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    if mode == "always" or not any(folder.iterdir()):
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
