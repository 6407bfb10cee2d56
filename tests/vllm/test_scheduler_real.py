"""Issue 11 with real vLLM on CPU: the demo's `chat` and `coder`, asked for at the same
moment, are both answered.

They share an exclusive group (one engine at a time on 2 cores): the scheduler starts one,
lets its request finish, stops it and starts the other, and the second request waits for
those events within its start timeout instead of being refused (before issue 11 it got
`503 placement_stuck`-style refusals, or waited with no deadline at all without GPUs).
"""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from openai import OpenAI

from modelyard.demo import DemoSetup
from tests.vllm.support import (
    ProcessWatch,
    demo_document,
    engine_turn,
    start_demo_gateway,
    stop_gateway,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "Say hello."}]


def test_chat_and_coder_requested_together_are_both_answered(
    demo: DemoSetup, tmp_path: Path
) -> None:
    watch = ProcessWatch()
    document = demo_document(demo)
    with engine_turn():
        gateway = start_demo_gateway(tmp_path / "gateway", demo, document)
        try:
            client = OpenAI(base_url=f"{gateway.url}/v1", api_key="x", timeout=600.0, max_retries=0)

            def ask(model: str) -> tuple[str, float]:
                began = time.monotonic()
                reply = client.chat.completions.create(
                    model=model, messages=QUESTION, max_tokens=8, temperature=0
                )
                return reply.choices[0].message.content or "", time.monotonic() - began

            with ThreadPoolExecutor(2) as pool:
                answers = list(pool.map(ask, ["chat", "coder"]))
            for text, _took in answers:
                assert text.strip()
            with urllib.request.urlopen(gateway.url + "/admin/events?follow=0&recent=200") as r:
                kinds = [e["kind"] for e in json.loads(r.read())["events"]]
            assert kinds.count("ready") == 2
            assert "placement_refused" not in kinds
            assert "start_failed" not in kinds
            print("chat and coder answered after", [round(t, 1) for _, t in answers], "s")
        finally:
            stop_gateway(gateway, watch)
