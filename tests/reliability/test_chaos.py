"""Chaos: 1,000 requests over 3 models while engines are killed at random moments."""

from __future__ import annotations

import asyncio
import json
import os
import time

import aiohttp

from tests.conftest import fake_model
from tests.reliability.chaos import rss_kib, run_chaos

MODELS = ["alpha", "beta", "gamma"]


async def test_chaos_every_request_answered_memory_bounded_engines_back(gateway_factory):
    gateway = gateway_factory(
        {name: fake_model(name) for name in MODELS},
        defaults={"crash_backoff_max": "2s"},  # keep the run short; the rule is the same
        limits={"upstream_read_timeout": "20s", "health_check_interval": "1s"},
    )
    seed = int(os.environ.get("CHAOS_SEED", "0")) or int(time.time())
    figures = await run_chaos(gateway.url, MODELS, gateway.process.pid, seed=seed)
    report = {"seed": seed, **figures.to_json()}
    print("chaos figures:", json.dumps(report))
    (gateway.state_dir.parent / "chaos.json").write_text(json.dumps(report, indent=2))

    assert figures.faults_injected >= 10, report
    assert figures.outcomes["lost"] == 0, report
    assert figures.outcomes["gateway_5xx"] == 0, report
    assert figures.outcomes["ok"] + figures.outcomes["clear_error"] == figures.requests
    # Engines killed every fraction of a second crash-loop, so many requests get a clear 503
    # (back-off) instead of restarting them; but service goes on between the faults.
    assert figures.outcomes["ok"] >= figures.requests // 10, report
    # Memory stays bounded: what the run added is small next to what the gateway holds.
    assert figures.rss_after_kib - figures.rss_before_kib < 64 * 1024, report

    # Every engine serves again (after at most the 2 s back-off) ...
    async with aiohttp.ClientSession() as session:
        for model in MODELS:
            deadline = time.monotonic() + 30
            while True:
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                async with session.post(gateway.url + "/v1/chat/completions", json=body) as r:
                    if r.status == 200:
                        break
                assert time.monotonic() < deadline, f"{model} did not come back"
                await asyncio.sleep(0.2)
    states = {
        m["name"]: (m["state"], m["in_flight"], m["queued"]) for m in gateway.status()["models"]
    }
    assert states == {name: ("ready", 0, 0) for name in MODELS}
    # ... and no process leaked: one engine per model, every killed one reaped.
    assert len(gateway.engine_pids()) == len(MODELS)
    assert rss_kib(gateway.process.pid) > 0
