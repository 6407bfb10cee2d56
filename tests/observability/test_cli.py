"""`modelyard events [--follow]` and `modelyard status` against a real gateway."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from queue import Queue
from typing import Any

from rich.console import Console

from modelyard.observability.console import print_status, sse_events
from tests.conftest import fake_model

CHAT = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}).encode()


def modelyard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelyard", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )


def post(url: str, data: bytes | None = None) -> Any:
    request = urllib.request.Request(url, data=data, method="POST")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_events_table_json_and_follow(gateway_factory):
    gateway = gateway_factory({"chat": fake_model("chat")})
    post(gateway.url + "/v1/chat/completions", CHAT)

    table = modelyard("events", "--url", gateway.url)
    assert table.returncode == 0, table.stderr
    assert "start" in table.stdout
    assert "ready" in table.stdout
    assert "chat" in table.stdout
    as_json = json.loads(modelyard("events", "--url", gateway.url, "--json", "-n", "1").stdout)
    assert [e["kind"] for e in as_json["events"]] == ["ready"]

    follow = subprocess.Popen(
        [sys.executable, "-m", "modelyard", "events", "--follow", "--json", "-n", "1",
         "--url", gateway.url],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    lines: Queue[str] = Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in follow.stdout], daemon=True
    ).start()
    try:
        assert json.loads(lines.get(timeout=20))["kind"] == "ready"  # the one recent event
        post(gateway.url + "/admin/models/chat/unload")
        live = [json.loads(lines.get(timeout=20))]  # ...then live ones as they happen
        while live[-1]["kind"] != "stop":
            live.append(json.loads(lines.get(timeout=20)))
        assert live[-1]["model"] == "chat"
        assert "admin unload" in live[-1]["reason"]
        assert all(e["id"] > as_json["events"][0]["id"] for e in live)
    finally:
        follow.terminate()
        follow.wait(10)

    status = modelyard("status", "--url", gateway.url)
    assert status.returncode == 0, status.stderr
    assert "chat" in status.stdout
    assert "stopped" in status.stdout
    assert "footprint" not in status.stdout  # no GPU data, no empty columns

    refused = modelyard("events", "--url", gateway.url + "/nowhere")
    assert refused.returncode != 0


def test_status_shows_footprints_and_gpus_when_there_are_some():
    status = {
        "models": [
            {"name": "llama", "state": "ready", "engine": "vllm", "in_flight": 1, "queued": 0,
             "last_used_ago_s": 3.0, "footprint_bytes": 6 * 2**30, "footprint_measured": True,
             "gpus": [0]},
            {"name": "qwen", "state": "stopped", "engine": "vllm", "in_flight": 0, "queued": 0,
             "footprint_bytes": 3 * 2**30, "footprint_measured": False, "gpus": []},
        ],
        "gpus": [
            {"index": 0, "name": "RTX 4090", "total_bytes": 24 * 2**30, "used_bytes": 7 * 2**30,
             "planned_bytes": 6 * 2**30, "free_bytes": 17 * 2**30, "models": ["llama"]},
        ],
    }  # fmt: skip
    console = Console(record=True, width=160)
    print_status(console, status, "test")
    text = console.export_text()
    assert "footprint" in text
    assert "6.0 GiB" in text
    assert "~3.0 GiB" in text
    assert "RTX 4090" in text
    assert "24.0 GiB" in text
    assert "17.0 GiB" in text


def test_sse_parser_handles_comments_ids_and_multiline_data():
    stream = [b": keep-alive\n", b"\n", b"id: 7\n", b"data: a\n", b"data: b\n", b"\n",
              b"data: c\r\n", b"\r\n", b"id: x\n", b"data: d\n", b"\n"]  # fmt: skip
    assert list(sse_events(iter(stream))) == [(7, "a\nb"), (None, "c"), (None, "d")]
