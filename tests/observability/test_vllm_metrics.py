"""With a real vLLM engine (CPU build, the demo's SmolLM2): token usage on streams, and the
`vllm:` metrics the Grafana dashboard queries, read through `/metrics/engines`."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import aiohttp
import pytest

from modelyard.config import load_config
from modelyard.demo import demo_config_path, prepare_demo
from tests.observability.scrape import get, scrape
from tests.observability.test_grafana_dashboard import DASHBOARD, SUFFIXES, queries

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VLLM_NAME = re.compile(r"\bvllm:[a-zA-Z0-9_:]+")
# Older vLLM names the dashboard falls back to with PromQL's `or`; a current engine lacks them.
LEGACY = {"vllm:gpu_cache_usage_perc"}


async def test_stream_usage_and_engine_metrics_with_real_vllm(gateway_factory):
    demo = prepare_demo()
    config = load_config(demo_config_path(), {**os.environ, **demo.environ})
    chat = config.models["chat"].model_dump(mode="json", exclude_none=True)
    gateway = gateway_factory(
        {"chat": chat},
        vllm=config.vllm.model_dump(mode="json"),
        defaults={"start_timeout": "300s"},
    )
    body: dict[str, Any] = {
        "model": "chat",
        "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
    }
    timeout = aiohttp.ClientTimeout(total=400)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(gateway.url + "/v1/chat/completions", json=body) as response,
    ):
        assert response.status == 200
        text = await response.text()
    chunks = [json.loads(line[6:]) for line in text.splitlines()
              if line.startswith("data: {")]  # fmt: skip
    assert chunks
    # vLLM sent a usage-only chunk because the gateway asked; the client did not get it.
    assert all(chunk["choices"] for chunk in chunks)
    assert all(chunk.get("usage") is None for chunk in chunks)
    samples, _ = await scrape(gateway.url + "/metrics")
    assert get(samples, "modelyard_completion_tokens_total", model="chat") == 6
    prompt = get(samples, "modelyard_prompt_tokens_total", model="chat")
    assert prompt is not None
    assert prompt > 0

    _, families = await scrape(gateway.url + "/metrics/engines")
    exported = {f.name + s for f in families for s in SUFFIXES.get(f.type, ("",))}
    queried = {n for expr in queries(json.loads(DASHBOARD.read_text()))
               for n in VLLM_NAME.findall(expr)}  # fmt: skip
    assert queried
    assert sorted(queried - exported - LEGACY) == []
    labelled = {s.labels.get("model") for f in families for s in f.samples}
    assert labelled == {"chat"}
