"""A read-only metrics key (`metrics: true`): Prometheus scrapes without an admin key."""

from __future__ import annotations

import pytest
import yaml

from modelyard.config import ConfigError, parse_config
from tests.conftest import fake_model
from tests.security.keys import ADMIN_KEY, USER_KEY, bearer, key_config
from tests.security.test_auth_gateway import assert_openai_error, call

METRICS_KEY = "my-metrics-" + "x" * 40
SCOPED_METRICS_KEY = "my-metrics-scoped-" + "y" * 40
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def gateway(gateway_factory):
    keys = [
        key_config("ops", ADMIN_KEY, admin=True),
        key_config("alice", USER_KEY, models=["chat"]),
        key_config("prometheus", METRICS_KEY, metrics=True),
        key_config("grafana-agent", SCOPED_METRICS_KEY, metrics=True, models=["chat"]),
    ]
    running = gateway_factory({"chat": fake_model("chat")}, auth={"keys": keys})
    running.admin_key = ADMIN_KEY
    return running


async def test_metrics_key_reads_both_metrics_routes_and_nothing_else(gateway) -> None:
    for path in ("/metrics", "/metrics/engines"):
        status, body, headers = await call("GET", gateway.url + path, bearer(METRICS_KEY))
        assert status == 200, body
        assert headers["Content-Type"].startswith("text/plain")
    assert "modelyard_engine_metrics_up" in body or body == ""
    # No model: refused before anything starts.
    status, body, _ = await call(
        "POST", gateway.url + "/v1/chat/completions", bearer(METRICS_KEY), json=CHAT
    )
    assert status == 404  # as for a model that does not exist: a scoped key learns nothing
    assert_openai_error(body, "model_not_found")
    assert gateway.model_state("chat") == "stopped"
    status, body, _ = await call("GET", gateway.url + "/v1/models", bearer(METRICS_KEY))
    assert status == 200
    assert body["data"] == []
    # No admin route.
    for method, path in (
        ("GET", "/gateway/status"),
        ("GET", "/admin/keys"),
        ("POST", "/admin/models/chat/load"),
        ("GET", "/admin/events"),
    ):
        status, body, _ = await call(method, gateway.url + path, bearer(METRICS_KEY))
        assert status == 403, (path, body)
        assert_openai_error(body, "admin_required")
    assert gateway.model_state("chat") == "stopped"


async def test_ordinary_keys_may_not_read_metrics(gateway) -> None:
    for path in ("/metrics", "/metrics/engines"):
        status, body, _ = await call("GET", gateway.url + path, bearer(USER_KEY))
        assert status == 403
        assert_openai_error(body, "admin_required")
        assert "metrics: true" in body["error"]["message"]
        status, body, _ = await call("GET", gateway.url + path)
        assert status == 401
        status, _, _ = await call("GET", gateway.url + path, bearer(ADMIN_KEY))
        assert status == 200


async def test_a_metrics_key_with_models_written_out_may_use_them(gateway) -> None:
    status, body, _ = await call(
        "POST", gateway.url + "/v1/chat/completions", bearer(SCOPED_METRICS_KEY), json=CHAT
    )
    assert status == 200, body
    status, _, _ = await call("GET", gateway.url + "/metrics", bearer(SCOPED_METRICS_KEY))
    assert status == 200
    status, body, _ = await call("GET", gateway.url + "/admin/keys", bearer(ADMIN_KEY))
    rights = {key["name"]: (key["metrics"], key["models"]) for key in body["keys"]}
    assert rights["prometheus"] == (True, [])
    assert rights["grafana-agent"] == (True, ["chat"])
    assert rights["alice"] == (False, ["chat"])


@pytest.mark.parametrize("spelling", ["true", "yes", "on", "1"])
def test_every_spelling_of_true_makes_a_read_only_key(spelling: str) -> None:
    # YAML 1.1 reads yes/on as booleans; pydantic also accepts "true" and "1": whichever way
    # it is written, a metrics key without models may use no model.
    document = yaml.safe_load(
        f"auth: {{keys: [{{name: p, sha256: '{'0' * 64}', metrics: {spelling}}}]}}"
    )
    key = parse_config(document).auth.keys[0]
    assert key.metrics is True
    assert key.models == []


def test_a_metrics_flag_that_is_not_a_boolean_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"auth\.keys\.0\.metrics"):
        parse_config({"auth": {"keys": [{"name": "p", "sha256": "0" * 64, "metrics": "maybe"}]}})
