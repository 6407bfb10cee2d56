"""Keyed requests: the same decisions and accounting however the request is spelled.

The gateway in-process (tests/harness.py, served as `modelyard serve` serves it) on its own
thread, with engines that report usage as vLLM does (5 prompt tokens, one completion token
per word, and for a stream one per chunk in a last usage-only chunk when asked). Each request
is sent twice: plain, and with a query string: the two answers and the two keys' accounting
must be the same. (Once the fast lane's check against the web layer; one path now, the
differential still guards the key, scope and accounting rules.)
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import openai
import pytest

from tests.harness import engine_model, in_process_gateway_thread
from tests.security.keys import ADMIN_KEY, USER_KEY, key_config
from tests.security.raw_http import RawAnswer, request, send_raw

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}
PATH = "/v1/chat/completions"
WEB = PATH + "?via=web"  # a query string: always the web layer's
# Headers that differ between any two answers, whichever server wrote them.
VOLATILE = {"date", "server"}


@pytest.fixture
def gateway(tmp_path):
    with in_process_gateway_thread(
        tmp_path,
        {"chat": engine_model(served_name="chat"), "secret": engine_model(served_name="secret")},
        auth={
            "keys": [
                key_config("ops", ADMIN_KEY, admin=True),
                key_config("alice", USER_KEY, models=["chat"]),
            ]
        },
    ) as harness:
        yield harness


def admin(gateway, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    sent = urllib.request.Request(
        gateway.url + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(sent, timeout=10) as answer:
        text = answer.read().decode()
    return json.loads(text) if path != "/metrics" else text


async def answered(gateway, headers: dict[str, str], body: Any = None) -> RawAnswer:
    return await post(gateway, PATH, headers, body)


def new_key(gateway, name: str, **fields: Any) -> str:
    return str(admin(gateway, "POST", "/admin/keys", {"name": name, **fields})["key"])


def key_entry(gateway, name: str) -> dict[str, Any]:
    return next(k for k in admin(gateway, "GET", "/admin/keys")["keys"] if k["name"] == name)


async def post(gateway, target: str, headers: dict[str, str], body: Any = None) -> RawAnswer:
    data = json.dumps(CHAT if body is None else body).encode()
    return await request(
        gateway.url,
        "POST",
        target,
        {"Content-Type": "application/json", **headers},
        data,
    )


def same_answer(lane: RawAnswer, web: RawAnswer) -> None:
    assert lane.status == web.status, (lane, web)
    assert lane.json() == web.json()
    volatile = VOLATILE | {"connection", "keep-alive"}
    assert {k: v for k, v in lane.headers.items() if k not in volatile} == {
        k: v for k, v in web.headers.items() if k not in volatile
    }


def test_keyed_requests_are_charged_the_same_with_or_without_a_query(gateway):
    """Two runtime keys with budgets: one's plain and streamed requests without a query, the
    other's with one; usage per model, budget spent, request counts and metrics come
    out the same, and the streams' usage chunk (asked for by the gateway) is never shown."""
    lane_key = new_key(gateway, "lane", models=["chat"], token_budget=1000)
    web_key = new_key(gateway, "web", models=["chat"], token_budget=1000)
    for key, query in ((lane_key, None), (web_key, {"via": "web"})):
        sdk = openai.OpenAI(
            base_url=gateway.url + "/v1", api_key=key, max_retries=0, default_query=query
        )
        messages: Any = CHAT["messages"]
        answer = sdk.chat.completions.create(model="chat", messages=messages)
        assert answer.choices[0].message.content == "chat says: hello"
        stream = sdk.chat.completions.create(
            model="chat", messages=messages, stream=True, extra_body={"fake_chunks": 4}
        )
        chunks = list(stream)
        assert chunks
        assert all(chunk.usage is None for chunk in chunks)
        assert {chunk.model for chunk in chunks} == {"chat"}
    lane, web = key_entry(gateway, "lane"), key_entry(gateway, "web")
    assert lane["usage"]["models"] == web["usage"]["models"]
    assert lane["usage"]["models"]["chat"] == {
        "requests": 2,
        "prompt_tokens": 10,
        "completion_tokens": 3 + 4,
    }
    assert lane["budget"]["spent"] == web["budget"]["spent"] == 17
    assert lane["usage"]["requests"] == web["usage"]["requests"] == 2
    metrics = admin(gateway, "GET", "/metrics")
    for key in ("lane", "web"):
        assert (
            f'modelyard_requests_total{{key="{key}",model="chat",route="/v1/chat",status="200"}}'
            " 2.0" in metrics
        )
        assert f'modelyard_key_completion_tokens_total{{key="{key}",model="chat"}} 7.0' in metrics


async def test_refusals_are_the_same_with_or_without_a_query(gateway):
    """A revoked runtime key (refused on its very next request), a key over its token budget
    (429 with the budget headers), a key asking for a model outside its scope (the same 404 as
    an unknown model), an unknown key: the two answers are equal, byte for byte
    in the body and header for header, and each refusal is counted once per request."""
    doomed = new_key(gateway, "doomed", models=["chat"])
    assert (await post(gateway, PATH, {"Authorization": f"Bearer {doomed}"})).status == 200
    admin(gateway, "DELETE", "/admin/keys/doomed")
    lane = await answered(gateway, {"Authorization": f"Bearer {doomed}"})
    assert lane.status == 401
    assert lane.json()["error"]["code"] == "key_revoked"
    same_answer(lane, await post(gateway, WEB, {"Authorization": f"Bearer {doomed}"}))
    assert lane.headers["www-authenticate"] == 'Bearer realm="modelyard"'

    tiny = new_key(gateway, "tiny", models=["chat"], token_budget=5)
    assert (await post(gateway, PATH, {"x-api-key": tiny})).status == 200  # 8 tokens: spent
    lane = await answered(gateway, {"x-api-key": tiny})
    assert lane.status == 429
    assert lane.json()["error"]["code"] == "budget_exceeded"
    assert lane.headers["x-budget-spent-tokens"] == "8"
    same_answer(lane, await post(gateway, WEB, {"x-api-key": tiny}))
    assert key_entry(gateway, "tiny")["usage"]["rate_limited"] == 2

    scoped = {"Authorization": f"Bearer {USER_KEY}"}
    secret = {**CHAT, "model": "secret"}
    lane = await answered(gateway, scoped, secret)
    assert lane.status == 404
    assert lane.json()["error"]["code"] == "model_not_found"
    assert "secret" not in lane.json()["error"]["message"].split("known models")[-1]
    same_answer(lane, await post(gateway, WEB, scoped, secret))
    assert key_entry(gateway, "alice")["usage"]["forbidden"] == 2

    wrong = {"Authorization": "Bearer my-not-a-key"}
    same_answer(await answered(gateway, wrong), await post(gateway, WEB, wrong))


async def test_hostile_key_headers_are_read_one_way(gateway):
    """Keys where a careless parser would read them differently (a repeated key header, an
    oversized header, odd casing): one reading (`presented_key`), the same answers."""
    good, bad = f"Bearer {USER_KEY}", "Bearer my-wrong"
    cases: list[tuple[list[tuple[str, str]], int, bool]] = [
        # (headers, status, once served by the fast lane)
        ([("api-key", USER_KEY)], 200, True),  # Azure style
        ([("AUTHORIZATION", f"bEaReR {USER_KEY}")], 200, True),  # odd casing
        ([("X-Api-Key", "my-wrong"), ("Authorization", good)], 200, True),  # bearer first
        ([("Authorization", good), ("Authorization", bad)], 200, False),  # repeated
        ([("Authorization", bad), ("authorization", good)], 401, False),
        ([("Authorization", good), ("X-Pad", "x" * 9000)], 400, False),  # over aiohttp's limit
        ([("Authorization", "Basic " + USER_KEY)], 401, True),  # not a bearer key
        ([("Authorization", "Bearer " + USER_KEY + "\u00e9")], 401, False),  # not ASCII
    ]
    for headers, status, _ in cases:
        answers = []
        for target in (PATH, WEB):
            lines = [f"POST {target} HTTP/1.1", f"Host: {gateway.url[7:]}", "Connection: close"]
            lines += [f"{name}: {value}" for name, value in headers]
            body = json.dumps(CHAT).encode()
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
            raw = "\r\n".join(lines).encode("utf-8") + b"\r\n\r\n" + body
            answers.append(await send_raw(gateway.url, raw))
        lane, web = answers
        assert lane.status == status, (headers, lane)
        if status == 200:
            assert lane.json()["choices"] == web.json()["choices"]
        else:
            same_answer(lane, web)
