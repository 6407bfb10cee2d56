"""Differential test: what the engine received is what the gateway's checks approved.

Random methods, paths (encodings, dot segments, control characters, `#`), queries, headers
and bodies go through a live gateway, sent byte for byte, as a user whose key may use `chat`
(and its alias) only. Each request carries a probe id; the test engine records exactly what
reached it. Then, for every request that reached an engine:

- it reached `chat`'s engine (never `secret`'s, which must never even start);
- its decoded path is what the gateway checked (the request's decoded path minus the route
  prefix), never an engine control endpoint, and its query is the one sent, as encoded;
- the `model` in its body, if any, is `chat`'s;
- no header carries the key.

Requests that did not reach an engine must have been refused with an OpenAI-shaped error.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelyard.auth.engine_paths import is_engine_control
from tests.conftest import fake_model, start_gateway
from tests.security.front_door import DOORS, door_settings, open_socket
from tests.security.keys import ADMIN_KEY, USER_KEY, auth_settings
from tests.security.raw_http import dechunk

PREFIXES = {  # what the route prefix strips before the engine path
    "/upstream/chat": "/upstream/chat",
    "/upstream/chat-alias": "/upstream/chat-alias",
    "/chat": "/chat",
    "/upstream/secret": None,  # never allowed for this key
    "/secret": None,
    "": "",  # /v1/... by the body's model (the tail starts with v1/)
}
SEGMENTS = [
    "v1",
    "chat",
    "completions",
    "models",
    "sleep",
    "wake_up",
    "load_lora_adapter",
    "unload_lora_adapter",
    "collective_rpc",
    "fake",
    "x",
    "..",
    ".",
    "",
    "%2e%2e",
    "%2E",
    "sl%65ep",
    "SLEEP",
]
DECORATIONS = [
    "",
    "%23",
    "%09",
    "%0d",
    "%0a",
    "%20",
    "%00",
    "%2f",
    "%5c",
    "%25",
    "#",
    "%3f",
    "?",
    "\\",
    "%c3%a9",
    "%ff",
    ";x",
]

segment = st.builds(
    lambda base, decoration: base + decoration,
    st.sampled_from(SEGMENTS),
    st.sampled_from(DECORATIONS),
)
tails = st.lists(segment, min_size=0, max_size=4).map(lambda parts: "/".join(parts))
queries = st.one_of(
    st.just(""),
    st.sampled_from(["?level=1", "?a=%23&b=%2f", "?x=1#frag", "?%zz", "?a=b c", "?"]),
)
models = st.sampled_from(["chat", "chat-alias", "secret", None, 7, "", "CHAT"])
extra_headers = st.dictionaries(
    st.sampled_from(["api-key", "x-api-key", "Cookie", "X-Goog-Api-Key", "X-Other", "Accept"]),
    st.sampled_from([USER_KEY, "plain", f"Bearer {USER_KEY}"]),
    max_size=3,
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["json", "json", "duplicate", "empty", "text"]))
    if kind == "empty":
        return b""
    if kind == "text":
        return draw(st.binary(max_size=40))
    payload: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    model = draw(models)
    if model is not None:
        payload["model"] = model
    text = json.dumps(payload)
    if kind == "duplicate":
        text = text[:-1] + ', "model": ' + json.dumps(draw(models)) + "}"
    return text.encode()


# Over plain TCP and over TLS: one server serves both, so the same rules must hold.
@pytest.fixture(scope="module", params=DOORS)
def gateway(tmp_path_factory, request):
    folder = tmp_path_factory.mktemp("differential")
    running = start_gateway(
        folder,
        {
            "chat": fake_model("chat", "--sleep-mode", route="/chat", aliases=["chat-alias"]),
            "secret": fake_model("secret", route="/secret"),
        },
        **door_settings(request.param, folder),
        **auth_settings(),
    )
    running.admin_key = ADMIN_KEY
    running.tls = request.param == "tls"
    yield running
    running.stop()


def send(gateway: Any, data: bytes) -> tuple[int, bytes]:
    with open_socket(gateway.url, gateway.tls) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    return (int(status_line[1]) if len(status_line) > 1 else 0), body


def received(gateway: Any) -> list[dict[str, Any]]:
    data = (
        "GET /upstream/chat/fake/received HTTP/1.1\r\nHost: localhost\r\n"
        f"Authorization: Bearer {ADMIN_KEY}\r\nConnection: close\r\n\r\n"
    ).encode()
    status, body = send(gateway, data)
    assert status == 200, body[:300]
    try:
        result: list[dict[str, Any]] = json.loads(body)
    except ValueError:  # chunked
        result = json.loads(dechunk(body))
    return result


def test_the_engine_receives_exactly_what_was_authorised(gateway):
    sent: dict[str, dict[str, Any]] = {}

    @settings(
        max_examples=int(os.environ.get("DIFFERENTIAL_EXAMPLES", "300")),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        method=st.sampled_from(["POST", "POST", "GET", "PUT", "DELETE"]),
        prefix=st.sampled_from(sorted(PREFIXES)),
        tail=tails,
        query=queries,
        headers=extra_headers,
        body=bodies(),
    )
    def one_request(
        method: str, prefix: str, tail: str, query: str, headers: dict[str, str], body: bytes
    ) -> None:
        probe = str(len(sent))
        if prefix == "":
            tail = "v1/" + tail  # OpenAI's routes; other first segments are route prefixes
        target = prefix + "/" + tail + query
        lines = [
            f"{method} {target} HTTP/1.1",
            "Host: localhost",
            f"Authorization: Bearer {USER_KEY}",
            "Content-Type: application/json",
            f"X-Probe: {probe}",
            f"Content-Length: {len(body)}",
            "Connection: close",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        data = "\r\n".join(lines).encode("latin-1", "replace") + b"\r\n\r\n" + body
        status, answer = send(gateway, data)
        sent[probe] = {"target": target, "prefix": prefix, "status": status, "answer": answer}
        assert status != 500, answer[:300]
        assert status != 0

    one_request()
    reached = {}
    for entry in received(gateway):
        probe = dict(entry["headers"]).get("X-Probe")
        if probe is not None:
            reached[probe] = entry
    assert gateway.model_state("secret") == "stopped"
    assert gateway.status()["models"][1]["starts"] == 0
    for probe, request in sent.items():
        entry = reached.get(probe)
        if entry is None:
            if request["status"] >= 400:
                error = json.loads(request["answer"])["error"]  # refused by the gateway...
                assert set(error) == {"message", "type", "param", "code"}
            continue
        # ...or it reached the engine, exactly as checked.
        strip = PREFIXES[request["prefix"]]
        assert strip is not None, request
        raw_path, _, query = request["target"].partition("?")
        checked = unquote(raw_path)[len(strip) :]
        assert entry["path"] == checked, (request, entry["path"])
        assert entry["raw_path"].partition("?")[2] == query, (request, entry["raw_path"])
        assert not is_engine_control(entry["path"]), request
        assert USER_KEY not in json.dumps(entry["headers"]), request
        if entry["body"].lstrip().startswith("{"):
            model = json.loads(entry["body"]).get("model")
            assert model in (None, "chat"), (request, entry["body"])
    assert reached, "no request reached the engine: the test would prove nothing"
