"""`modelyard keys create NAME` and `modelyard keys hash`: keys are shown once, stored hashed."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml
from pydantic import ValidationError

from modelyard.auth.keys import generate_key, key_digest
from modelyard.config.schema import ApiKeyConfig


def add_key_commands(verbs: Any) -> None:
    """Add `keys create` and `keys hash` to the CLI's sub-commands."""
    keys = verbs.add_parser("keys", help="make API keys (the config holds only their SHA-256)")
    actions = keys.add_subparsers(title="key commands")

    create = actions.add_parser("create", help="make a new random key; print it and its config")
    create.add_argument("name", help="the key's name, shown in metrics, events and logs")
    _rights(create)
    create.set_defaults(run=_create)

    hashed = actions.add_parser(
        "hash", help="config lines for an existing key read from standard input"
    )
    hashed.add_argument("name")
    _rights(hashed)
    hashed.set_defaults(run=_hash)


def _rights(command: argparse.ArgumentParser) -> None:
    command.add_argument("--admin", action="store_true", help="may use admin routes")
    command.add_argument(
        "--models", nargs="+", default=["*"], metavar="PATTERN", help="glob patterns (default: *)"
    )
    command.add_argument("--rpm", type=int, help="requests per minute (default: no limit)")


def _create(args: argparse.Namespace) -> int:
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
    if args.rpm is not None:
        fields["rpm"] = args.rpm
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
