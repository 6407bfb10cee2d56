"""Config reload against a live gateway: engines running, streams in flight.

`POST /admin/reload`, SIGHUP and `modelyard reload` re-read the file. What must hold: no
request is lost, an unchanged engine keeps its process (same PID), a changed one is replaced
after it drained, a removed one drains and stops, a new model serves at once, and a file
that does not validate changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import fake_model
from tests.security.keys import ADMIN_KEY, USER_KEY, key_config
from tests.security.test_auth_gateway import assert_openai_error, call

STREAM_CHUNKS = 30
CHUNK_DELAY = 0.05  # 1.5 s streams: the reload happens while they run


def read_config(gateway) -> dict[str, Any]:
    return yaml.safe_load(gateway.config_path.read_text())


def write_config(gateway, config: dict[str, Any]) -> None:
    # Written whole and renamed, as an editor or a deploy tool would.
    temporary = gateway.config_path.with_suffix(".tmp")
    temporary.write_text(yaml.safe_dump(config))
    temporary.replace(gateway.config_path)


async def stream(url: str, model: str, headers: dict[str, str] | None = None) -> tuple[int, int]:
    """(status, content chunks) of one streamed chat completion that ran to [DONE]."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "fake_chunks": STREAM_CHUNKS,
        "fake_chunk_delay": CHUNK_DELAY,
    }
    chunks, done = 0, False
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/chat/completions", json=body, headers=headers) as response,
    ):
        async for raw in response.content:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert "error" not in event, event
                chunks += 1
    assert done, f"the stream for {model} ended without [DONE]"
    return response.status, chunks


def pids(gateway) -> dict[str, int | None]:
    return {model["name"]: model["pid"] for model in gateway.status()["models"]}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
async def test_reload_with_streams_in_flight_keeps_unchanged_engines(gateway_factory):
    gateway = gateway_factory(
        {
            "keep": fake_model("keep"),
            "change": fake_model("change"),
            "remove": fake_model("remove"),
        }
    )
    for name in ("keep", "change", "remove"):
        status, body, _ = await call("POST", gateway.url + f"/admin/models/{name}/load")
        assert status == 200, body
    before = pids(gateway)

    streams = [
        asyncio.create_task(stream(gateway.url, name))
        for name in ("keep", "change", "remove", "keep")
    ]
    await asyncio.sleep(0.3)  # the streams are running
    config = read_config(gateway)
    models = config["models"]
    models["keep"]["aliases"] = ["keep-alias"]
    models["keep"]["idle_timeout"] = "1h"
    models["change"]["command"] = [*models["change"]["command"], "--ready-delay", "0.1"]
    del models["remove"]
    models["new"] = {**fake_model("new")}
    models["new"]["command"] = [*models["new"]["command"], "--root", gateway.marker]
    write_config(gateway, config)
    status, report, _ = await call("POST", gateway.url + "/admin/reload")
    assert status == 200, report
    changes = {(c["what"], c["model"]) for c in report["changes"]}
    assert {
        ("model_added", "new"),
        ("model_removed", "remove"),
        ("engine_changed", "change"),
        ("model_settings", "keep"),
    } <= changes
    assert ("engine_changed", "keep") not in changes
    assert report["file"] == str(gateway.config_path)

    # A request for the changed model, made while its old engine drains, waits and is
    # answered by the new engine.
    during_drain = asyncio.create_task(
        call(
            "POST",
            gateway.url + "/v1/chat/completions",
            json={"model": "change", "messages": [{"role": "user", "content": "x"}]},
        )
    )
    # A new model and a new alias serve at once; a removed model takes no new requests.
    status, body, _ = await call(
        "POST", gateway.url + "/v1/chat/completions", json={"model": "new", "messages": []}
    )
    assert status == 200, body
    status, body, _ = await call(
        "POST",
        gateway.url + "/v1/chat/completions",
        json={"model": "keep-alias", "messages": [{"role": "user", "content": "x"}]},
    )
    assert (status, body["model"]) == (200, "keep-alias")
    status, body, _ = await call(
        "POST", gateway.url + "/v1/chat/completions", json={"model": "remove", "messages": []}
    )
    assert status == 404

    # Every stream that was in flight ran to its end, on its old engine.
    results = await asyncio.gather(*streams)
    assert results == [(200, STREAM_CHUNKS)] * 4
    status, body, _ = await during_drain
    assert status == 200, body

    after = pids(gateway)
    assert after["keep"] == before["keep"]  # never restarted
    assert "remove" not in after
    assert before["remove"] is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        alive(before["remove"]) or gateway.model_state("change") != "ready"
    ):
        await asyncio.sleep(0.05)
    assert not alive(before["remove"])  # drained, then stopped
    assert gateway.model_state("change") == "ready"  # it was running: started again
    replaced = pids(gateway)["change"]
    assert replaced not in (None, before["change"])
    status, seen, _ = await call("GET", gateway.url + "/upstream/change/fake/seen")
    assert "--ready-delay" in seen["argv"]  # the new engine has the new configuration
    assert seen["requests"] == 1  # the request made during the drain, and nothing else
    assert seen["last"]["body"]["messages"][0]["content"] == "x"
    status, model_list, _ = await call("GET", gateway.url + "/v1/models")
    assert {entry["id"] for entry in model_list["data"]} == {"keep", "keep-alias", "change", "new"}
    keep = next(m for m in gateway.status()["models"] if m["name"] == "keep")
    assert keep["idle_timeout_s"] == 3600

    # Every change is an event.
    status, body, _ = await call("GET", gateway.url + "/admin/events?follow=0&recent=100")
    events = [(e["kind"], e["model"]) for e in body["events"]]
    assert ("config_changed", "new") in events
    assert ("config_changed", "remove") in events
    assert ("reload", None) in events
    assert ("stop", "remove") in events


async def test_a_bad_file_changes_nothing_and_says_where(gateway_factory):
    gateway = gateway_factory({"keep": fake_model("keep")})
    await call("POST", gateway.url + "/admin/models/keep/load")
    before = pids(gateway)
    good = read_config(gateway)
    broken = json.loads(json.dumps(good))
    broken["models"]["keep"]["idle_timeout"] = "soon"
    broken["models"]["extra"] = {"engine": "remote"}  # no url
    for bad_text, expected in (
        (yaml.safe_dump(broken), "models.keep.idle_timeout: 'soon' is not a duration"),
        ("models: [unclosed\n", "line "),
        (yaml.safe_dump({**good, "modles": {}}), "modles: unknown setting"),
        ("\x00\xff garbage", ""),
    ):
        gateway.config_path.write_text(bad_text)
        status, body, _ = await call("POST", gateway.url + "/admin/reload")
        assert status == 400, body
        assert_openai_error(body, "invalid_config")
        assert str(gateway.config_path) in body["error"]["message"]
        assert expected in body["error"]["message"]
    gateway.config_path.write_text(yaml.safe_dump(broken))
    _, body, _ = await call("POST", gateway.url + "/admin/reload")
    assert "models.extra: engine 'remote' needs 'url:'" in body["error"]["message"]
    # The CLI says the same and fails.
    result = subprocess.run(
        [sys.executable, "-m", "modelyard", "reload", "--url", gateway.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "idle_timeout" in result.stderr
    # SIGHUP with a bad file: the gateway keeps running (it used to die) and logs why.
    gateway.process.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.5)
    assert gateway.process.poll() is None
    assert "reload refused" in gateway.log_text()
    assert pids(gateway) == before
    status, body, _ = await call(
        "POST", gateway.url + "/v1/chat/completions", json={"model": "keep", "messages": []}
    )
    assert status == 200
    status, body, _ = await call("GET", gateway.url + "/admin/events?follow=0")
    assert any(e["kind"] == "reload_failed" for e in body["events"])


async def test_sighup_and_cli_reload_apply_keys_and_routes_live(gateway_factory):
    gateway = gateway_factory(
        {"chat": fake_model("chat")},
        auth={"keys": [key_config("ops", ADMIN_KEY, admin=True)]},
    )
    gateway.admin_key = ADMIN_KEY
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    user = {"Authorization": f"Bearer {USER_KEY}"}
    await call("POST", gateway.url + "/admin/models/chat/load", admin)
    before = pids(gateway)
    status, _, _ = await call("POST", gateway.url + "/v1/chat/completions", user, json={})
    assert status == 401
    config = read_config(gateway)
    config["auth"]["keys"].append(key_config("alice", USER_KEY, models=["chat"]))
    config["models"]["chat"]["route"] = "/talk"
    config["log_format"] = "json"
    write_config(gateway, config)
    gateway.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    status = 0
    while time.monotonic() < deadline and status != 200:
        status, body, _ = await call(
            "POST", gateway.url + "/talk/v1/chat/completions", user, json={"messages": []}
        )
        await asyncio.sleep(0.05)
    assert status == 200
    assert gateway.process.poll() is None
    # The log format changed live: the request just made is logged as a JSON line.
    await asyncio.sleep(0.2)
    request_lines = [
        json.loads(line)
        for line in gateway.log_text().splitlines()
        if line.startswith("{") and '"modelyard.requests"' in line
    ]
    assert request_lines
    assert request_lines[-1]["key"] == "alice"
    status, body, _ = await call("POST", gateway.url + "/admin/reload", user)
    assert (status, body["error"]["code"]) == (403, "admin_required")  # admin only
    # Removing the key takes effect on its next request; the CLI prints what changed.
    config["auth"]["keys"] = config["auth"]["keys"][:1]
    write_config(gateway, config)
    result = subprocess.run(
        [sys.executable, "-m", "modelyard", "reload", "--url", gateway.url, "--key", ADMIN_KEY],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "keys removed alice" in result.stdout
    status, _, _ = await call(
        "POST", gateway.url + "/talk/v1/chat/completions", user, json={"messages": []}
    )
    assert status == 401
    assert pids(gateway) == before  # none of it touched the engine
