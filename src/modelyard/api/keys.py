"""`/admin/keys`: each API key's rights, limits, budget and usage; runtime keys made, changed and
revoked. Never a key's digest; a new key itself only once, in the answer that creates it."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from modelyard.api.access import principal_of, require_admin
from modelyard.api.bodies import load_client_json, read_body
from modelyard.api.errors import ApiError
from modelyard.api.serving import gateway_of
from modelyard.auth.authenticator import Authenticator
from modelyard.auth.runtime_keys import KeyConflict, KeyFields, NewKey, UnknownKey
from modelyard.gateway import Gateway


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/admin/keys", key_usage)
    router.add_post("/admin/keys", create_key)
    router.add_get("/admin/keys/{name}", show_key)
    router.add_patch("/admin/keys/{name}", change_key)
    router.add_delete("/admin/keys/{name}", revoke_key)


def _admin_auth(request: web.Request) -> tuple[Gateway, Authenticator]:
    require_admin(request)
    gateway = gateway_of(request)
    assert gateway.auth is not None  # the gateway always has an authenticator
    return gateway, gateway.auth


async def key_usage(request: web.Request) -> web.Response:
    _gateway, auth = _admin_auth(request)
    return web.json_response({"keys": auth.key_report(), "refused": auth.refused})


async def show_key(request: web.Request) -> web.Response:
    _gateway, auth = _admin_auth(request)
    name = request.match_info["name"]
    for key in (*auth.keyring.keys, *auth.runtime_keys.keys()):
        if key.name == name:
            return web.json_response(auth.describe(key))
    raise ApiError(404, f"no API key named {name!r}", "key_not_found")


async def create_key(request: web.Request) -> web.Response:
    gateway, auth = _admin_auth(request)
    fields = await _fields(request, gateway, NewKey)
    assert isinstance(fields, NewKey)
    if not any(key.admin for key in auth.keyring.keys):
        # Keys turn access control on; with no admin key in the config nobody could manage
        # them afterwards (an anonymous loopback client is an admin only while no key exists).
        raise ApiError(
            409,
            "runtime keys need an admin key in the config first (auth: keys: with admin: "
            "true; `modelyard keys create NAME --admin`), or nobody could manage them",
            "admin_key_required",
        )
    try:
        secret, key = await auth.runtime_keys.create(fields, (k.name for k in auth.keyring.keys))
    except KeyConflict as error:
        raise ApiError(409, str(error), "key_exists", "name") from None
    _audit(request, gateway, "key_created", key.name)
    return web.json_response({"key": secret, **auth.describe(key)}, status=201)


async def change_key(request: web.Request) -> web.Response:
    gateway, auth = _admin_auth(request)
    name = request.match_info["name"]
    _runtime_only(auth, name)
    fields = await _fields(request, gateway, KeyFields)
    assert isinstance(fields, KeyFields)
    try:
        key = await auth.runtime_keys.change(name, fields)
    except UnknownKey as error:
        raise ApiError(404, str(error), "key_not_found") from None
    except KeyConflict as error:
        raise ApiError(409, str(error), "key_revoked") from None
    _audit(request, gateway, "key_changed", name, sorted(fields.model_fields_set))
    return web.json_response(auth.describe(key))


async def revoke_key(request: web.Request) -> web.Response:
    gateway, auth = _admin_auth(request)
    name = request.match_info["name"]
    _runtime_only(auth, name)
    try:
        key = await auth.runtime_keys.revoke(name)
    except UnknownKey as error:
        raise ApiError(404, str(error), "key_not_found") from None
    _audit(request, gateway, "key_revoked", name)
    return web.json_response(auth.describe(key))


def _runtime_only(auth: Authenticator, name: str) -> None:
    if any(key.name == name for key in auth.keyring.keys):
        raise ApiError(
            409,
            f"API key {name!r} is written in the config file: change it there and reload "
            "(`modelyard reload`)",
            "config_key",
        )


async def _fields(request: web.Request, gateway: Gateway, shape: type[BaseModel]) -> BaseModel:
    body = await read_body(request, gateway.config.limits)
    document: Any = load_client_json(body or b"{}")
    if not isinstance(document, dict):
        raise ApiError(400, "the body must be a JSON object", "invalid_json")
    try:
        return shape.model_validate(document)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'body'}: "
            + ("unknown field" if item["type"] == "extra_forbidden" else item["msg"])
            for item in error.errors()
        )
        raise ApiError(400, problems.replace("Value error, ", ""), "invalid_key_fields") from None


def _audit(
    request: web.Request, gateway: Gateway, kind: str, name: str, fields: list[str] | None = None
) -> None:
    """Who made, changed or revoked which key: an event with both names (never the key)."""
    admin = principal_of(request).name
    what = kind.removeprefix("key_")
    data: dict[str, Any] = {"key": admin, "key_name": name}
    if fields:
        data["fields"] = fields
    gateway.events.emit(kind, None, f"API key {name!r} {what} by key {admin!r}", **data)
