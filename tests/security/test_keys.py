"""Keys, their lookup in constant time, rate limits, engine control paths, exposure rules."""

from __future__ import annotations

import hashlib
import hmac
import re

import pytest
import yaml

from modelyard.auth import keys as keys_module
from modelyard.auth.credentials import presented_key
from modelyard.auth.engine_paths import is_engine_control
from modelyard.auth.exposure import auth_mode, exposure_problem, is_loopback
from modelyard.auth.keys import KeyRing, generate_key, key_digest
from modelyard.auth.ratelimit import RateLimiter
from modelyard.cli import main
from modelyard.config import parse_config
from modelyard.config.schema import ApiKeyConfig


def ring(count: int) -> tuple[KeyRing, list[str]]:
    secrets = [generate_key() for _ in range(count)]
    configs = [ApiKeyConfig(name=f"k{i}", sha256=key_digest(s)) for i, s in enumerate(secrets)]
    return KeyRing(configs), secrets


def test_generated_keys_are_random_prefixed_and_long():
    made = {generate_key() for _ in range(200)}
    assert len(made) == 200
    for key in made:
        assert re.fullmatch(r"my-[A-Za-z0-9_-]{43}", key)  # 32 bytes, URL-safe base64


def test_digest_is_sha256_of_the_key():
    assert key_digest("my-abc") == hashlib.sha256(b"my-abc").hexdigest()


def test_find_matches_only_the_right_key():
    keyring, secrets = ring(5)
    for index, secret in enumerate(secrets):
        found = keyring.find(secret)
        assert found is not None
        assert found.name == f"k{index}"
    assert keyring.find(secrets[0] + "x") is None
    assert keyring.find(secrets[0][:-1]) is None
    assert keyring.find("") is None


@pytest.mark.parametrize("which", ["first", "last", "none"])
def test_lookup_compares_digests_with_compare_digest_and_every_key(monkeypatch, which):
    keyring, secrets = ring(7)
    presented = {"first": secrets[0], "last": secrets[-1], "none": generate_key()}[which]
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", counting)
    keyring.find(presented)
    # Every configured key is compared, whether the match is first, last or absent: the time
    # taken does not say which key matched or how many were tried.
    assert len(calls) == 7
    # What is compared are SHA-256 digests, never the key itself.
    assert all(len(a) == 32 and len(b) == 32 for a, b in calls)
    assert all(presented.encode() not in (a, b) for a, b in calls)


def test_presented_key_from_bearer_or_x_api_key():
    assert presented_key({"Authorization": "Bearer my-k"}) == "my-k"
    assert presented_key({"Authorization": "bearer   my-k  "}) == "my-k"
    assert presented_key({"x-api-key": "my-k"}) == "my-k"
    assert presented_key({"Authorization": "Basic abc", "x-api-key": "my-k"}) == "my-k"
    assert presented_key({"Authorization": "Bearer "}) is None
    assert presented_key({"Authorization": "Basic abc"}) is None
    assert presented_key({}) is None


def test_rate_limit_is_a_sliding_minute():
    now = [100.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert [limiter.acquire("a", 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a", 3) == pytest.approx(60.0)
    assert limiter.acquire("b", 3) == 0.0  # keys are limited separately
    assert limiter.acquire("c", None) == 0.0  # no rpm, no limit
    now[0] += 30
    assert limiter.acquire("a", 3) == pytest.approx(30.0)
    now[0] += 30.001
    assert limiter.acquire("a", 3) == 0.0
    assert limiter.remaining("a", 3) == 2  # the first three left the window; one came in


@pytest.mark.parametrize(
    ("path", "control"),
    [
        ("/sleep", True),
        ("/wake_up", True),
        ("sleep?level=2", True),
        ("/v1/load_lora_adapter", True),
        ("//v1//unload_lora_adapter", True),
        ("/v1/../sleep", True),
        ("/v1/chat/../../collective_rpc", True),
        ("/./reset_prefix_cache", True),
        ("/SLEEP", True),
        ("/v1/chat/completions", False),
        ("/generate", False),
        ("/v1/models", False),
        ("/sleeping-beauty", False),
    ],
)
def test_engine_control_paths(path, control):
    assert is_engine_control(path) is control


def test_loopback_detection():
    assert is_loopback("127.0.0.1")
    assert is_loopback("127.3.4.5")
    assert is_loopback("::1")
    assert is_loopback("[::1]")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("::")
    assert not is_loopback("192.168.1.10")
    assert not is_loopback("no-such-host.invalid")


def test_no_keys_means_loopback_only():
    def config(listen: str, **auth: object):
        return parse_config({"listen": listen, "auth": auth})

    assert exposure_problem(config("127.0.0.1:8000")) is None
    problem = exposure_problem(config("0.0.0.0:8000"))
    assert problem is not None
    assert "no API keys" in problem
    assert exposure_problem(config("0.0.0.0:8000", allow_unauthenticated=True)) is None
    keyed = config("0.0.0.0:8000", keys=[{"name": "a", "sha256": key_digest("my-x")}])
    assert exposure_problem(keyed) is None
    assert "1 API key(s)" in auth_mode(keyed)
    assert "loopback" in auth_mode(config("127.0.0.1:8000"))
    assert "NONE" in auth_mode(config("0.0.0.0:8000", allow_unauthenticated=True))


def test_key_names_are_a_safe_alphabet():
    with pytest.raises(ValueError, match="not a valid key name"):
        ApiKeyConfig(name="bad name\n", sha256="0" * 64)


def test_keys_create_prints_the_key_once_and_config_that_accepts_it(capsys):
    assert main(["keys", "create", "alice", "--models", "chat*", "--rpm", "30"]) == 0
    out = capsys.readouterr().out
    key = re.search(r"\b(my-[A-Za-z0-9_-]{43})\b", out)
    assert key is not None
    assert out.count(key.group(1)) == 1
    entries = yaml.safe_load(out[out.index("  - name:") :])
    config = parse_config({"auth": {"keys": entries}})
    found = KeyRing(config.auth.keys).find(key.group(1))
    assert found is not None
    assert (found.name, found.models, found.rpm, found.admin) == ("alice", ("chat*",), 30, False)


def test_keys_hash_reads_the_key_from_stdin(capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("my-existing-secret\n"))
    assert main(["keys", "hash", "legacy", "--admin"]) == 0
    out = capsys.readouterr().out
    assert "my-existing-secret" not in out
    entries = yaml.safe_load(out)
    assert entries[0]["sha256"] == key_digest("my-existing-secret")
    assert entries[0]["admin"] is True


def test_check_refuses_what_serve_would_refuse(tmp_path, capsys):
    config = tmp_path / "modelyard.yaml"
    config.write_text("listen: 0.0.0.0:8000\nmodels: {}\n")
    assert main(["check", "-c", str(config)]) == 1
    assert "refusing to listen on 0.0.0.0:8000" in capsys.readouterr().err
    config.write_text("listen: 0.0.0.0:8000\nauth: {allow_unauthenticated: true}\n")
    assert main(["check", "-c", str(config)]) == 0
    assert "auth: NONE" in capsys.readouterr().out
