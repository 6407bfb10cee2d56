"""`modelyard keys ...`: keys are shown once and stored hashed.

Without `--url`, `keys create` and `keys hash` print lines for the config file. With `--url`
(a running gateway), `keys create`, `list`, `change` and `revoke` manage runtime keys through
the admin API; they take effect at once, with no restart or reload.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import yaml
from pydantic import ValidationError

from modelyard.auth.keys import generate_key, key_digest
from modelyard.client import call_gateway
from modelyard.config.schema import ApiKeyConfig
from modelyard.config.units import parse_duration


def add_key_commands(verbs: Any) -> None:
    """Add `keys create|hash|list|change|revoke` to the CLI's sub-commands."""
    keys = verbs.add_parser(
        "keys", help="make and manage API keys (stored hashed: only their SHA-256)"
    )
    actions = keys.add_subparsers(title="key commands")

    create = actions.add_parser(
        "create",
        help="make a new random key: with --url on a running gateway (a runtime key), "
        "else print it and its config lines",
    )
    create.add_argument("name", help="the key's name, shown in metrics, events and logs")
    _rights(create)
    _gateway_args(create, required=False)
    create.add_argument(
        "--config-entry",
        action="store_true",
        help="print the key and its lines for the config file, even when $MODELYARD_URL is set",
    )
    create.set_defaults(run=_create)

    hashed = actions.add_parser(
        "hash", help="config lines for an existing key read from standard input"
    )
    hashed.add_argument("name")
    _rights(hashed)
    hashed.set_defaults(run=_hash)

    listed = actions.add_parser("list", help="every key of a running gateway, with its usage")
    _gateway_args(listed, required=True)
    listed.set_defaults(run=_list)

    change = actions.add_parser("change", help="change a runtime key's rights or limits")
    change.add_argument("name")
    _rights(change, defaults=False)
    _gateway_args(change, required=True)
    change.set_defaults(run=_change)

    revoke = actions.add_parser("revoke", help="revoke a runtime key (refused from now on)")
    revoke.add_argument("name")
    _gateway_args(revoke, required=True)
    revoke.set_defaults(run=_revoke)


def _rights(command: argparse.ArgumentParser, defaults: bool = True) -> None:
    command.add_argument("--admin", action="store_true", default=None, help="may use admin routes")
    command.add_argument(
        "--models",
        nargs="+",
        default=["*"] if defaults else None,
        metavar="PATTERN",
        help="glob patterns (default: *)",
    )
    command.add_argument("--rpm", type=int, help="requests per minute (0: no limit)")
    command.add_argument("--tpm", type=int, help="tokens per minute (0: no limit)")
    command.add_argument(
        "--budget", type=int, metavar="TOKENS", help="token budget per --period (0: no budget)"
    )
    command.add_argument("--period", choices=("day", "month", "total"), help="budget period")
    command.add_argument(
        "--expires", metavar="DURATION", help="runtime keys: expire after e.g. 30d, 12h, 90m"
    )


def _gateway_args(command: argparse.ArgumentParser, required: bool) -> None:
    command.add_argument(
        "--url",
        required=required and not os.environ.get("MODELYARD_URL"),
        default=os.environ.get("MODELYARD_URL") or None,
        help="a running gateway (default: $MODELYARD_URL)",
    )
    command.add_argument(
        "--key",
        default=os.environ.get("MODELYARD_API_KEY"),
        help="an admin API key (default: $MODELYARD_API_KEY)",
    )
    command.add_argument("--json", action="store_true", help="print raw JSON")


def _create(args: argparse.Namespace) -> int:
    if args.url and not args.config_entry:
        return _create_runtime(args)
    if args.expires:
        print("modelyard: --expires is for runtime keys (give --url)", file=sys.stderr)
        return 2
    key = generate_key()
    entry = _entry(args, key)
    if entry is None:
        return 2
    print(f"API key {args.name!r} (shown only now; store it somewhere safe):\n")
    print(f"    {key}\n")
    print("Add this under `auth: keys:` in the config:\n")
    print(entry)
    return 0


def _hash(args: argparse.Namespace) -> int:
    # Read from standard input, never from an argument: arguments end up in shell history.
    key = sys.stdin.readline().strip()
    if not key:
        print("modelyard: give the key on standard input", file=sys.stderr)
        return 2
    entry = _entry(args, key)
    if entry is None:
        return 2
    print(entry)
    return 0


def _entry(args: argparse.Namespace, key: str) -> str | None:
    """The YAML list item for the config, validated by the config's own schema."""
    fields: dict[str, Any] = {"name": args.name, "sha256": key_digest(key), "models": args.models}
    for option, field in (("rpm", "rpm"), ("tpm", "tpm"), ("budget", "token_budget")):
        if getattr(args, option):
            fields[field] = getattr(args, option)
    if args.period and args.budget:
        fields["budget_period"] = args.period
    fields["admin"] = bool(args.admin)
    try:
        ApiKeyConfig.model_validate(fields)
    except ValidationError as error:
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"])
            message = item["msg"].removeprefix("Value error, ")
            print(f"modelyard: {where}: {message}", file=sys.stderr)
        return None
    text = yaml.safe_dump([fields], sort_keys=False, default_flow_style=None)
    return "\n".join("  " + line for line in text.splitlines())


def _runtime_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The admin API's fields for the options given on the command line."""
    fields: dict[str, Any] = {}
    if args.models is not None:
        fields["models"] = args.models
    for option, field in (("rpm", "rpm"), ("tpm", "tpm"), ("budget", "token_budget")):
        if getattr(args, option) is not None:
            fields[field] = getattr(args, option)
    if args.period:
        fields["budget_period"] = args.period
    if args.admin is not None:
        fields["admin"] = bool(args.admin)
    if args.expires:
        try:
            fields["expires_in"] = parse_duration(args.expires)
        except ValueError as error:
            raise SystemExit(f"modelyard: --expires: {error}") from None
    return fields


def _create_runtime(args: argparse.Namespace) -> int:
    body = {"name": args.name, **_runtime_fields(args)}
    result = call_gateway(args.url, args.key, "POST", "/admin/keys", body)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"API key {args.name!r} (shown only now; store it somewhere safe):\n")
    print(f"    {result['key']}\n")
    print(f"Active now on {args.url}: {_summary(result)}")
    return 0


def _list(args: argparse.Namespace) -> int:
    result = call_gateway(args.url, args.key, "GET", "/admin/keys")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for key in result["keys"]:
        print(f"{key['name']} ({key['source']}): {_summary(key)}")
    return 0


def _change(args: argparse.Namespace) -> int:
    fields = _runtime_fields(args)
    if not fields:
        print("modelyard: nothing to change (give --models, --rpm, --tpm, ...)", file=sys.stderr)
        return 2
    result = call_gateway(args.url, args.key, "PATCH", f"/admin/keys/{args.name}", fields)
    print(json.dumps(result, indent=2) if args.json else f"{args.name}: {_summary(result)}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    result = call_gateway(args.url, args.key, "DELETE", f"/admin/keys/{args.name}")
    print(json.dumps(result, indent=2) if args.json else f"{args.name}: revoked")
    return 0


def _summary(key: dict[str, Any]) -> str:
    parts = ["admin" if key["admin"] else "models " + ",".join(key["models"])]
    if key.get("rpm"):
        parts.append(f"{key['rpm']} requests/min")
    if key.get("tpm"):
        parts.append(f"{key['tpm']} tokens/min")
    budget = key.get("budget")
    if budget:
        parts.append(
            f"budget {budget['spent']}/{budget['tokens']} tokens"
            + ("" if budget["period"] == "total" else f" per {budget['period']}")
        )
    if key.get("expires_at"):
        parts.append(
            "expires " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(key["expires_at"]))
        )
    if key.get("revoked"):
        parts.append("REVOKED")
    elif key.get("expired"):
        parts.append("EXPIRED")
    usage = key.get("usage") or {}
    tokens = sum(
        m["prompt_tokens"] + m["completion_tokens"] for m in (usage.get("models") or {}).values()
    )
    parts.append(f"{usage.get('requests', 0)} requests, {tokens} tokens used")
    return "; ".join(parts)
