"""`GET /openapi.yaml` and `GET /openapi.json`: the description of the gateway's own routes.

The YAML is written by hand next to this file (`openapi.yaml`) and checked against the running
gateway by schemathesis in tests/security, so it stays true to the implementation.
"""

from __future__ import annotations

import functools
import importlib.resources
import json

import yaml
from aiohttp import web

SPEC = importlib.resources.files("modelyard") / "api" / "openapi.yaml"


@functools.cache
def spec_text() -> str:
    return SPEC.read_text(encoding="utf-8")


@functools.cache
def spec_json() -> str:
    return json.dumps(yaml.safe_load(spec_text()))


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/openapi.yaml", openapi_yaml)
    router.add_get("/openapi.json", openapi_json)


async def openapi_yaml(request: web.Request) -> web.Response:
    return web.Response(text=spec_text(), content_type="application/yaml")


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(text=spec_json(), content_type="application/json")
