"""The OpenAPI description is true to the gateway: schemathesis against a live one."""

from __future__ import annotations

import os
import re

import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from modelyard.api.openapi import SPEC
from tests.conftest import fake_model
from tests.lora.test_lora_gateway import lora_model, write_adapter
from tests.security.keys import ADMIN_KEY, auth_settings, bearer

# SSE streams never end by design; they are checked in tests/core with follow=0 and live.
ENDLESS = ["events", "engineLogs"]


def test_the_description_is_valid_openapi():
    document = yaml.safe_load(SPEC.read_text())
    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]
    ids = {operation.definition.raw.get("operationId") for operation in operations}
    assert {"chatCompletions", "listModels", "gatewayStatus", "keyUsage", "health"} <= ids


def _shape(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


async def test_every_route_of_the_app_is_described_and_nothing_more(tmp_path):
    from modelyard.api.app import build_app
    from modelyard.config import parse_config
    from modelyard.gateway import Gateway

    gateway = Gateway.create(parse_config({"state_dir": str(tmp_path / "state")}))
    try:
        app = build_app(gateway)
        served = {_shape(resource.canonical) for resource in app.router.resources()}
    finally:
        await gateway.close()
    described = {_shape(path) for path in yaml.safe_load(SPEC.read_text())["paths"]}
    # `POST /v1/{tail}` serves any OpenAI path; the description names the usual three.
    generic = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
    assert generic <= described
    served_as_described = (served - {"/v1/{}", "/ui"}) | generic  # /ui only redirects to /ui/
    assert served_as_described == described


def test_the_gateway_keeps_to_its_description(gateway_factory, tmp_path):
    """Every described operation, with data that fits the description and data that does not:
    no 5xx, only documented statuses and content types, bodies that match their schemas, and
    401 for every secured operation called without a key (schemathesis' `ignored_auth`)."""
    gateway = gateway_factory(
        {
            "chat": fake_model("chat", route="/chat", aliases=["chat-alias"]),
            "other": fake_model("other", route="/other"),
            "tuned": lora_model(tmp_path / "adapters"),  # LoRA: the adapter routes do work
        },
        **auth_settings(),
    )
    write_adapter(tmp_path / "adapters" / "helper")
    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json")
    schema = schema.exclude(operation_id=ENDLESS)
    examples = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "15"))
    failures: dict[str, str] = {}
    calls: list[schemathesis.Case] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: schemathesis.Case) -> None:
                calls.append(case)
                # Positive data may still be refused (an unknown model is a fine 404), and
                # negative data may be accepted (unknown fields pass through to the engine).
                case.call_and_validate(
                    headers=bearer(ADMIN_KEY),
                    timeout=30,
                    excluded_checks=[positive_data_acceptance, negative_data_rejection],
                )

            try:
                check()
            except Unsatisfiable:
                continue  # nothing to make wrong: the operation takes no input
            except Exception as error:  # keep going: report every operation that fails
                failures[f"{operation.label} ({mode})"] = str(error)[:2000]
    print(f"schemathesis: {len(calls)} requests, {len(operations)} operations")
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    assert len(calls) > 100
    assert gateway.process.poll() is None
    assert "internal error" not in gateway.log_text()
