"""The canonical request target (proxy/canonical.py), the credential header list and the
secret masking, as pure functions."""

from __future__ import annotations

import logging
from urllib.parse import quote, unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from modelyard.auth.credentials import CREDENTIAL_HEADERS, is_credential_header, presented_key
from modelyard.observability.log_guard import FloodGuard, RedactingFormatter
from modelyard.proxy.canonical import NonCanonical, canonical_target, engine_path
from modelyard.proxy.forward import forward_headers
from modelyard.redaction import MASK, one_line, redact, register_secrets


@pytest.mark.parametrize(
    ("raw", "path", "query"),
    [
        ("/v1/chat/completions", "/v1/chat/completions", ""),
        ("/v1/models/org/model:latest", "/v1/models/org/model:latest", ""),
        ("/upstream/chat/metrics?name[]=a&b=%23", "/upstream/chat/metrics", "name[]=a&b=%23"),
        ("/caf%C3%A9/", "/café/", ""),
        ("/sl%65ep", "/sleep", ""),  # decoded: the check sees 'sleep', like the engine will
    ],
)
def test_canonical_targets(raw, path, query):
    target = canonical_target(raw)
    assert (target.path, target.query) == (path, query)


@pytest.mark.parametrize(
    "raw",
    [
        "/upstream/chat/sleep%23",
        "/upstream/chat/sleep%09",
        "/upstream/chat/sleep%0d",
        "/upstream/chat/sleep%0A",
        "/upstream/chat/sleep%00",
        "/upstream/chat/sleep%20",
        "/sleep\t",
        "/a/%2e%2e/b",
        "/a/../b",
        "/a/./b",
        "/a/..",
        "/a//b",
        "/a/%2Fb",  # an encoded slash that would become an empty segment
        "/a%5cb",  # backslash: some servers read it as '/'
        "/a/%2523",  # double encoding: a second decoder would find '#'
        "/a/%zz",
        "/a/%ff",  # not UTF-8
        "/x#frag",
        "/x?a=#",
        "/x?a=b c",
        "/x?a=%z1",
        "http://evil/x",  # absolute form
        "*",
        "/caf\u00e9",  # raw non-ASCII must be encoded
    ],
)
def test_targets_with_more_than_one_reading_are_refused(raw):
    with pytest.raises(NonCanonical):
        canonical_target(raw)


@given(st.text(min_size=0, max_size=30))
def test_the_engine_decodes_exactly_the_checked_path(text):
    raw = "/" + quote(text, safe="/%:@!$&'()*+,;=~")
    try:
        target = canonical_target(raw)
    except NonCanonical:
        return
    # What aiohttp sends and what the engine's server decodes (percent-decoding once).
    url = URL("http://engine:1" + engine_path(target.path), encoded=True)
    assert unquote(url.raw_path) == target.path
    assert url.path == target.path
    assert url.fragment == ""


def test_the_credential_header_list_is_stripped_before_forwarding():
    headers = {name: "secret-value" for name in CREDENTIAL_HEADERS}
    headers |= {
        "X-Custom-Api-Key": "v",
        "X-Session-Token": "v",
        "X-My-Secret": "v",
        "Content-Type": "application/json",
        "Accept": "*/*",
        "X-Request-Id": "1",
        "Host": "h",
    }
    kept = forward_headers(headers)
    assert set(kept) == {"Content-Type", "Accept", "X-Request-Id"}
    for name in ("Authorization", "API-KEY", "x-goog-api-key", "Cookie"):
        assert is_credential_header(name)
    # The presented key copied into a header of any name does not leave either.
    copied = forward_headers({"Authorization": "Bearer k-123456", "X-Echo": "k-123456 here"})
    assert copied == {}


def test_a_key_is_accepted_from_each_header_clients_use():
    assert presented_key({"Authorization": "Bearer k1"}) == "k1"
    assert presented_key({"x-api-key": "k2"}) == "k2"
    assert presented_key({"api-key": "k3"}) == "k3"
    assert presented_key({"Authorization": "Basic k"}) is None


def test_secrets_are_masked_and_control_characters_escaped():
    register_secrets(["s3cr3t-value-1", "s3cr3t-value-1-longer", "short"])
    assert redact("a s3cr3t-value-1-longer b s3cr3t-value-1") == f"a {MASK} b {MASK}"
    assert redact("short stays") == "short stays"  # too short to be a secret
    assert one_line("a\nb\x1b[31m\x00") == "a\\nb\\x1b[31m\\x00"
    formatter = RedactingFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("x", logging.INFO, "", 0, "got s3cr3t-value-1\x07", None, None)
    assert formatter.format(record) == f"got {MASK}\\x07"


def test_client_caused_log_lines_are_bounded_and_shortened():
    guard = FloodGuard(burst=3, window_s=3600)
    kept = []
    for index in range(50):
        try:
            raise ValueError("Got more than 8190 bytes: b'Bearer my-secretkey...'")
        except ValueError as error:
            record = logging.LogRecord(
                "aiohttp.server",
                logging.ERROR,
                "",
                0,
                "Error handling request %s",
                (index,),
                (type(error), error, None),
            )
        if guard.filter(record):
            kept.append(record)
    assert len(kept) == 3
    assert all(record.exc_info is None for record in kept)
    assert "my-secretkey" not in " ".join(record.getMessage() for record in kept)
    other = logging.LogRecord("modelyard.requests", logging.INFO, "", 0, "request", None, None)
    assert all(guard.filter(other) for _ in range(100))  # a gateway's own lines are not cut
