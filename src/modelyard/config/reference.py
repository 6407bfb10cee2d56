"""The configuration reference page, written from the schema so it cannot miss a key.

    python -m modelyard.config.reference --write docs/configuration.md   (make docs-reference)
    python -m modelyard.config.reference --check docs/configuration.md   (a test runs this)

Each key's meaning is its field's `description` in `modelyard.config.schema`; a section's
introduction is its class's docstring. A field without a description stops the generator.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from modelyard.config.schema import GatewayConfig
from modelyard.config.units import format_bytes, parse_duration, parse_size

HEADER = """\
# Configuration reference

<!-- Written by `make docs-reference` from src/modelyard/config/schema.py: edit the schema's
descriptions, not this page. A test fails when the two differ. -->

Every key of the config file, from the schema that validates it. Unknown keys are errors, and
`modelyard check -c FILE` names the file, the key and the problem.

- **duration**: seconds as a number, or `90s`, `10m`, `1h`, `2d`.
- **bytes**: a number, or `512MiB`, `24GiB`, `1.5GB`.
- Any value may be `${env:NAME}` or `${env:NAME:-default}`: the environment variable, read when
  the file is loaded, so secrets stay out of the file.
- `<name>` stands for a name you choose (a model's, a group's).
"""

_STATE_DIR_DEFAULT = "`$XDG_STATE_HOME/modelyard`, else `~/.local/state/modelyard`"


class MissingDescription(Exception):
    """A schema field has no description: the reference would have a blank line for it."""


@dataclass(frozen=True)
class Row:
    key: str
    kind: str
    default: str
    meaning: str


def _unit(annotation: Any, metadata: list[Any] | None = None) -> str | None:
    """duration or bytes for the schema's unit types (pydantic keeps their validator in the
    field's metadata, or in the annotation when it is wrapped in Optional)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        units = {_unit(arg) for arg in typing.get_args(annotation)} - {None}
        if units:
            return units.pop()
    for meta in [*(metadata or []), *getattr(annotation, "__metadata__", ())]:
        func = getattr(meta, "func", None)
        if func is parse_duration:
            return "duration"
        if func is parse_size:
            return "bytes"
    return None


def _nested_model(annotation: Any) -> tuple[type[BaseModel], str] | None:
    """(model, how its key is written) for a section, a list of sections or a map of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in args if arg is not type(None)]
        return _nested_model(inner[0]) if len(inner) == 1 else None
    if origin is list and args and _nested_model(args[0]):
        model, _ = _nested_model(args[0])  # type: ignore[misc]
        return model, "[]"
    if origin is dict and len(args) == 2 and _nested_model(args[1]):
        model, _ = _nested_model(args[1])  # type: ignore[misc]
        return model, ".<name>"
    return None


def _kind(annotation: Any, metadata: list[Any] | None = None) -> str:
    unit = _unit(annotation, metadata)
    if unit:
        return unit
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in args if arg is not type(None)]
        return " or ".join(_kind(arg) for arg in inner)
    if origin is Literal:
        return " or ".join(f"`{arg}`" for arg in args)
    if origin is list:
        return f"list of {_kind(args[0])}"
    if origin is dict:
        return f"map of {_kind(args[0])} to {_kind(args[1])}"
    if typing.get_origin(annotation) is typing.Annotated:
        return _kind(args[0])
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default(key: str, field: FieldInfo) -> str:
    if key == "state_dir":
        return _STATE_DIR_DEFAULT
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None or value == [] or value == {}:
        return "-"
    unit = _unit(field.annotation, field.metadata)
    if unit == "bytes":
        return f"`{format_bytes(value)}`"
    if unit == "duration":
        return f"`{value:g}` s"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return "`[" + ", ".join(str(item) for item in value) + "]`"
    return f"`{value}`"


def _doc(model: type[BaseModel]) -> str:
    doc = model.__dict__.get("__doc__") or ""
    return " ".join(doc.split())


def sections() -> list[tuple[str, str, list[Row]]]:
    """(section key, introduction, rows) in the schema's order, the top level first."""
    found: list[tuple[str, str, list[Row]]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        rows: list[Row] = []
        nested: list[tuple[type[BaseModel], str]] = []
        found.append((prefix.rstrip("."), _doc(model), rows))
        for name, field in model.model_fields.items():
            key = prefix + name
            inner = _nested_model(field.annotation)
            if inner is not None:
                section, suffix = inner
                nested.append((section, f"{key}{suffix}."))
                meaning = field.description or _doc(section)
                rows.append(Row(key + suffix, "section", "-", meaning))
                continue
            if not field.description:
                raise MissingDescription(f"{key}: give the schema field a description")
            kind = _kind(field.annotation, field.metadata)
            rows.append(Row(key, kind, _default(name, field), field.description))
        for section, section_prefix in nested:
            walk(section, section_prefix)

    walk(GatewayConfig, "")
    return found


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    parts = [HEADER]
    for key, intro, rows in sections():
        parts.append(f"\n## `{key}`\n" if key else "\n## Top level\n")
        if intro and key:
            parts.append(f"\n{intro}\n")
        parts.append("\n| key | type | default | meaning |\n| --- | --- | --- | --- |\n")
        for row in rows:
            meaning = _cell(row.meaning)
            parts.append(f"| `{row.key}` | {_cell(row.kind)} | {row.default} | {meaning} |\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelyard.config.reference")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", metavar="FILE", help="write the reference page")
    action.add_argument("--check", metavar="FILE", help="fail if FILE is not what --write makes")
    args = parser.parse_args(argv)
    try:
        text = render()
    except MissingDescription as error:
        print(f"modelyard.config.schema: {error}", file=sys.stderr)
        return 1
    if args.write:
        Path(args.write).write_text(text)
        return 0
    if Path(args.check).read_text() != text:
        print(
            f"{args.check} is stale: run `make docs-reference` and commit the result",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
