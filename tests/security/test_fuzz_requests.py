"""Hypothesis against the request parser of a live gateway: whatever arrives, the answer is an
OpenAI-shaped error or a real answer; never a 5xx from the gateway, never a crash."""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import fake_model
from tests.lora.test_lora_gateway import lora_model, write_adapter
from tests.security.front_door import DOORS, door_settings, http_connection
from tests.security.keys import ADMIN_KEY, USER_KEY, auth_settings

LIMIT = 64 * 1024
ERROR_FIELDS = {"message", "type", "param", "code"}

TRAVERSAL = [
    "../../../../etc/passwd",
    "..%2f..%2fetc%2fpasswd",
    "chat/../secret",
    "chat/../../secret",
    "./chat",
    "chat/",
    "/chat",
    "chat\x00secret",
    "%00",
    "C:\\Windows\\system32",
    "chat:latest",
    "helper/../../secret",
    "../adapters/helper",
    "..",
    ".",
    "~root",
    "chat" * 300,
]
names = st.one_of(
    st.sampled_from(["chat", "secret", "chat-alias", "tuned", "helper", "", "CHAT", *TRAVERSAL]),
    st.text(max_size=40),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.text(max_size=12).filter(lambda name: not name.startswith("fake_"))
wrong_types = st.one_of(
    st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(), st.lists(st.integers())
)


@st.composite
def chat_payloads(draw: st.DrawFn) -> bytes:
    payload: dict[str, Any] = {
        "model": draw(st.one_of(names, wrong_types, json_values)),
        "messages": draw(
            st.one_of(
                st.just([{"role": "user", "content": "hi"}]),
                st.lists(st.dictionaries(field_names, json_values, max_size=3), max_size=3),
                json_values,
            )
        ),
    }
    payload.update(draw(st.dictionaries(field_names, json_values, max_size=4)))
    return json.dumps(payload).encode()


def nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"model": ' * depth + b"1" + b"}" * depth


bodies = st.one_of(
    chat_payloads(),
    st.binary(max_size=3000),  # random bytes, bad UTF-8 included
    st.builds(lambda v: json.dumps(v).encode(), json_values),  # JSON of any type
    st.builds(nested, st.integers(10, 200_000), st.sampled_from(["list", "dict"])),
    st.builds(lambda n: b'{"model": "chat", "x": "' + b"a" * n + b'"}', st.integers(0, 4 * LIMIT)),
    st.builds(lambda b: b'{"model": "' + b + b'"}', st.binary(max_size=20)),  # bad UTF-8 in a name
)

paths = st.one_of(
    st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]),
    st.builds(lambda n: "/v1/models/" + n, names),
    st.builds(lambda n, t: f"/upstream/{n}/{t}", names, names),
    st.builds(lambda r, t: f"/{r}/{t}", names, names),
    st.builds(lambda n, a: f"/admin/models/{n}/{a}", names, st.sampled_from(["load", "sleep"])),
    st.builds(lambda n: "/admin/logs/" + n, names),
    st.builds(lambda n, a: f"/admin/adapters/{n}/{a}", names, st.sampled_from(["load", "unload"])),
    st.builds(lambda t: "/v1/" + t, names),
    st.sampled_from(["/v1/models", "/gateway/status", "/admin/keys", "/health", "/"]),
)
auth_headers = st.one_of(
    st.just({"Authorization": f"Bearer {ADMIN_KEY}"}),
    st.just({"Authorization": f"Bearer {ADMIN_KEY}"}),
    st.just({"x-api-key": USER_KEY}),
    st.just({}),
    st.builds(
        lambda v: {"Authorization": v},
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80),
    ),
)


def quote(path: str) -> str:
    # Keep '/' and '%' so traversal and pre-encoded forms arrive as written.
    return urllib.parse.quote(path, safe="/%:@~!$&'()*+,;=")


# Over plain TCP and over TLS: one server serves both, so the same answers must come.
@pytest.fixture(params=DOORS)
def gateway(gateway_factory, tmp_path, request):
    write_adapter(tmp_path / "adapters" / "helper")
    running = gateway_factory(
        {
            "chat": fake_model("chat", route="/chat", aliases=["chat-alias"]),
            "secret": fake_model("secret", route="/secret"),
            "tuned": lora_model(tmp_path / "adapters"),
        },
        limits={"max_body_bytes": LIMIT},
        **door_settings(request.param, tmp_path),
        **auth_settings(),
    )
    running.admin_key = ADMIN_KEY
    running.tls = request.param == "tls"
    return running


def send(
    gateway, method: str, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, bytes]:
    connection = http_connection(gateway.url, gateway.tls)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_any_request_gets_an_answer_or_an_openai_error(gateway):
    @settings(
        max_examples=int(os.environ.get("FUZZ_EXAMPLES", "400")),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE", "PATCH"]),
        path=paths,
        body=bodies,
        headers=auth_headers,
        content_type=st.sampled_from(["application/json", "text/plain", "", "text/x-unknown"]),
    )
    def one_request(
        method: str, path: str, body: bytes, headers: dict[str, str], content_type: str
    ) -> None:
        sent = dict(headers)
        if content_type:
            sent["Content-Type"] = content_type
        status, raw = send(gateway, method, quote(path), body, sent)
        assert status < 500, (status, raw[:300])
        if status >= 400:
            error = json.loads(raw)["error"]
            assert set(error) == ERROR_FIELDS, raw[:300]
            assert isinstance(error["message"], str)
            assert ADMIN_KEY not in error["message"]
            assert USER_KEY not in error["message"]

    one_request()
    assert gateway.process.poll() is None  # never a crash
    log = gateway.log_text()
    assert "internal error" not in log  # no exception reached the error middleware
    assert "Traceback" not in log
    assert "Error handling request" not in log  # nor aiohttp's own last-resort handler
