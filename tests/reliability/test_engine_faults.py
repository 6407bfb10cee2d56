"""Engines that crash, crash-loop or hang: detected, reported, and never a hung request."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import PYTHON, TESTS, fake_engine_command, fake_model

SQUATTER = str(TESTS / "reliability" / "port_squatter.py")
COMPLETIONS = "/v1/chat/completions"

CHAT = {"messages": [{"role": "user", "content": "hello"}]}


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, **CHAT, **extra}


async def post(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any, str]:
    status, payload, text, _ = await post_with_headers(session, url, body)
    return status, payload, text


async def post_with_headers(
    session: aiohttp.ClientSession, url: str, body: Any
) -> tuple[int, Any, str, dict[str, str]]:
    async with session.post(url, json=body) as response:
        text = (await response.read()).decode()
        try:
            payload = await response.json(content_type=None)
        except ValueError:
            payload = None
        return response.status, payload, text, dict(response.headers)


async def events(session: aiohttp.ClientSession, gateway, kind: str) -> list[dict[str, Any]]:
    async with session.get(gateway.url + "/admin/events?follow=0&recent=500") as response:
        return [e for e in (await response.json())["events"] if e["kind"] == kind]


async def test_requests_in_flight_get_an_error_when_the_engine_dies(gateway_factory):
    gateway = gateway_factory({"chat": fake_model("chat")})
    url = gateway.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        assert (await post(session, url, chat("chat")))[0] == 200
        slow = [asyncio.ensure_future(post_with_headers(session, url, chat("chat", fake_delay=30)))]
        slow += [
            asyncio.ensure_future(
                post_with_headers(
                    session, url, chat("chat", stream=True, fake_chunks=500, fake_chunk_delay=0.05)
                )
            )
        ]
        while gateway.status()["models"][0]["in_flight"] < 2:
            await asyncio.sleep(0.02)
        pid = gateway.status()["models"][0]["pid"]
        os.killpg(pid, signal.SIGKILL)
        (status, body, _, headers), (stream_status, _, stream_text, _) = await asyncio.wait_for(
            asyncio.gather(*slow), timeout=10
        )
        # Nothing had reached the client: refused, to be retried (the next request starts a
        # fresh engine), not a 502 the client would not retry.
        assert status == 503, body
        assert body["error"]["code"] == "engine_lost"
        assert int(headers["Retry-After"]) >= 1
        assert stream_status == 200
        # The socket reset or the exit, whichever the gateway sees first, ends the stream.
        assert (
            '"code": "upstream_stream_broken"' in stream_text
            or '"code": "engine_lost"' in stream_text
        )
        model = gateway.status()["models"][0]
        assert model["state"] == "failed"
        assert model["failure"]["exit_code"] == -9
        assert model["failure"]["log_tail"]  # the engine's last lines, for the operator
        crashes = await events(session, gateway, "crash")
        assert crashes[-1]["data"]["exit_code"] == -9
        # The next request restarts it.
        assert (await post(session, url, chat("chat")))[0] == 200


async def test_a_crash_looping_engine_is_restarted_only_as_the_backoff_allows(gateway_factory):
    gateway = gateway_factory({"bad": fake_model("bad", "--crash-on-start", "3")})
    url = gateway.url + "/v1/chat/completions"
    statuses: dict[int, int] = {}
    retry_afters = []
    async with aiohttp.ClientSession() as session:
        began = time.monotonic()
        while time.monotonic() - began < 6.0:  # a client that retries 20 times a second
            status, body, _ = await post(session, url, chat("bad"))
            statuses[status] = statuses.get(status, 0) + 1
            assert body["error"]["code"] in ("engine_start_failed", "engine_crash_loop"), body
            if body["error"]["code"] == "engine_crash_loop":
                retry_afters.append(body["error"]["message"])
            await asyncio.sleep(0.05)
        starts = await events(session, gateway, "start")
    requests = sum(statuses.values())
    # Starts at 0 s and right after (one crash is not a loop), then after 1, 2 and 4 s of
    # back-off: at most 5 in 6 s, whatever the request rate.
    # Many more requests than starts (about 100 on an idle machine, fewer on a loaded one):
    # the starts are bounded by the back-off, not by how often the client asked.
    assert requests > 20
    assert 3 <= len(starts) <= 5, (len(starts), statuses)
    assert statuses.get(503, 0) >= requests - 5
    gaps = [b["time"] - a["time"] for a, b in itertools.pairwise(starts[1:])]
    assert all(gap >= 0.9 for gap in gaps), gaps  # back-off held between attempts
    assert gaps == sorted(gaps)  # and grew
    assert gateway.engine_pids() == []


async def test_a_hung_engine_is_found_by_health_checks_stopped_and_reported(gateway_factory):
    gateway = gateway_factory(
        {"chat": fake_model("chat")},
        limits={
            "health_check_interval": "300ms",
            "health_check_timeout": "300ms",
            "health_check_failures": 2,
        },
    )
    url = gateway.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        assert (await post(session, url, chat("chat")))[0] == 200
        pid = gateway.status()["models"][0]["pid"]
        # The engine stops answering anything; the request that hung it gets an error when
        # the watchdog stops the engine, not a hang.
        status, body, _, headers = await asyncio.wait_for(
            post_with_headers(session, url, chat("chat", fake_hang=1)), 20
        )
        # Ended when the engine was declared hung (not when its stop is done): a 503 the
        # client may retry, the next request starting a fresh engine.
        assert status == 503, body
        assert body["error"]["type"] == "server_error"
        assert body["error"]["code"] == "engine_lost"
        assert "health checks" in body["error"]["message"]
        assert int(headers["Retry-After"]) >= 1
        gateway.wait_state("chat", "failed", timeout=10)
        model = gateway.status()["models"][0]
        assert "hung" in model["failure"]["message"]
        assert "health checks" in model["failure"]["message"]
        hung = await events(session, gateway, "hung")
        assert hung[-1]["data"]["pid"] == pid
        assert pid not in gateway.engine_pids()
        # Served again by a new engine.
        assert (await post(session, url, chat("chat")))[0] == 200
        assert gateway.status()["models"][0]["pid"] != pid


async def test_an_engine_whose_requests_time_out_is_hung_even_if_health_is_200(gateway_factory):
    gateway = gateway_factory(
        {"chat": fake_model("chat")},
        limits={
            "upstream_read_timeout": "1s",
            "health_check_interval": "200ms",
            "health_check_failures": 2,
        },
    )
    url = gateway.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        assert (await post(session, url, chat("chat")))[0] == 200
        pid = gateway.status()["models"][0]["pid"]
        first = await post(session, url, chat("chat", fake_stall=1))
        assert first[0] == 504
        await asyncio.sleep(1.0)  # several health checks pass meanwhile: /health is 200
        assert gateway.model_state("chat") == "ready"
        second = await post(session, url, chat("chat"))
        assert second[0] == 504
        assert second[1]["error"]["code"] == "upstream_timeout"
        gateway.wait_state("chat", "failed", timeout=10)
        model = gateway.status()["models"][0]
        assert "upstream read timeout" in model["failure"]["message"]
        assert pid not in gateway.engine_pids()
        assert (await post(session, url, chat("chat")))[0] == 200


@contextlib.contextmanager
def squatting(folder: Path, mode: str) -> Iterator[tuple[dict[str, Any], list[int]]]:
    """The config of `chat`, its test engine behind `port_squatter.py` (see there), and, once
    the block is over, the ports the squatters took (they are stopped then). With mode
    `answered`, the answering squatter runs from the start of the block, before any engine."""
    folder.mkdir()
    command = [PYTHON, SQUATTER, str(folder), mode, "{port}", *fake_engine_command("chat")[1:]]
    taken: list[int] = []
    answering = None
    if mode == "answered":
        answering = subprocess.Popen([PYTHON, SQUATTER, "answer", str(folder)])
    try:
        yield {"chat": {"engine": "command", "command": command}}, taken
    finally:
        if answering is not None:
            answering.kill()
            answering.wait()
        for record in folder.iterdir():
            if not record.name.isdigit():
                continue  # the port handed to the answering squatter, not a pid
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(record.read_text()), signal.SIGKILL)
            taken.append(int(record.name))


@pytest.mark.parametrize("squatter", ["silent", "answering"])
async def test_an_engine_whose_port_another_program_took_is_started_again_on_another(
    gateway_factory, tmp_path, squatter
):
    # Another program binds the engine's port between the gateway's choice and the engine's
    # bind: the engine exits with "address already in use", as vLLM does. That is not the
    # engine's fault: the gateway starts it once more at once, on another port, and the
    # request that asked for it is served.
    # Hostile, "answering": that program, running since before the engine was started,
    # answers 200 to everything, `/health` included (a `command` engine's only readiness
    # check). It is not the engine: the request must not be routed to it (before, it was:
    # the client got the squatter's answer).
    mode = {"silent": "once", "answering": "answered"}[squatter]
    with squatting(tmp_path / "squats", mode) as (models, taken):
        gateway = gateway_factory(models)
        async with aiohttp.ClientSession() as session:
            status, payload, text = await post(session, gateway.url + COMPLETIONS, chat("chat"))
            assert status == 200, text
            assert payload.get("object") != "squatter"
            assert payload["choices"]
            [failed] = await events(session, gateway, "start_failed")
            assert "address already in use" in "\n".join(failed["data"]["log_tail"]).lower()
            [retry] = await events(session, gateway, "port_taken_retry")
            assert retry["model"] == "chat"
            assert len(await events(session, gateway, "start")) == 2
        [model] = gateway.status()["models"]
        assert model["state"] == "ready"
        engine_log = "\n".join(p.read_text() for p in (gateway.state_dir / "logs").glob("*"))
        told = "answers, but from another program" in engine_log
        assert told == (squatter == "answering")
    assert len(taken) == 1
    assert model["port"] not in taken


async def test_an_engines_server_outside_its_process_tree_is_still_the_engine(
    gateway_factory, tmp_path
):
    # What the check above must not refuse: `command: docker run -p {port}:8000 ...` (here a
    # stand-in, port_squatter.py's "detached"). What listens on the port is none of the
    # engine's processes (docker-proxy, or the container's process, is the daemon's child),
    # but it was started after the engine's command: it is taken as the engine's, and the
    # request is routed to it.
    folder = tmp_path / "container"
    folder.mkdir()
    command = [PYTHON, SQUATTER, "detached", str(folder), "{port}"]
    try:
        # Refused, it would never be ready: a short start timeout makes that a clear failure.
        boxed = {"engine": "command", "command": command, "start_timeout": "15s"}
        gateway = gateway_factory({"boxed": boxed})
        async with aiohttp.ClientSession() as session:
            status, payload, text = await post(session, gateway.url + COMPLETIONS, chat("boxed"))
            assert status == 200, text
            assert payload == {"object": "squatter"}  # what the "container" answers
            assert await events(session, gateway, "port_taken_retry") == []
    finally:
        for record in folder.iterdir():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(record.read_text()), signal.SIGKILL)


async def test_an_engine_that_always_finds_its_port_taken_is_tried_twice_not_forever(
    gateway_factory, tmp_path
):
    # Hostile: every start finds its port taken (as if the engine bound a second, fixed port
    # that another program holds: vLLM's distributed init port, say). The gateway tries once
    # more, then answers with the engine's error, and starts nothing more on its own.
    with squatting(tmp_path / "squats", "always") as (models, taken):
        gateway = gateway_factory(models)
        async with aiohttp.ClientSession() as session:
            status, payload, _ = await post(session, gateway.url + COMPLETIONS, chat("chat"))
            assert status == 502
            assert payload["error"]["code"] == "engine_start_failed"
            assert "address already in use" in payload["error"]["message"]
            await asyncio.sleep(1.0)
            assert len(await events(session, gateway, "start")) == 2
            assert len(await events(session, gateway, "port_taken_retry")) == 1
    assert len(taken) == 2
