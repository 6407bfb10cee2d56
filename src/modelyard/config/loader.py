"""Reading a config file: YAML, `${env:NAME}` substitution, validation, clear error messages."""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from modelyard.config.schema import GatewayConfig

_ENV_RE = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


class ConfigError(Exception):
    """A config that cannot be used; each problem reads `FILE: key.path: what is wrong`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def substitute_env(
    value: Any,
    environ: Mapping[str, str],
    path: str,
    problems: list[str],
    found: set[str] | None = None,
) -> Any:
    """Replace `${env:NAME}` (or `${env:NAME:-default}`) in every string of a parsed document.

    Every value taken from the environment is added to `found`: it may be a secret, and the
    gateway never shows it (see `modelyard.redaction`)."""
    if isinstance(value, dict):
        return {
            key: substitute_env(
                item, environ, f"{path}.{key}" if path else str(key), problems, found
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [
            substitute_env(item, environ, f"{path}.{index}", problems, found)
            for index, item in enumerate(value)
        ]
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in environ:
                if found is not None:
                    found.add(environ[name])
                return environ[name]
            if default is not None:
                return default
            problems.append(f"{path}: environment variable {name} is not set")
            return ""

        return _ENV_RE.sub(replace, value)
    return value


def _location(loc: tuple[int | str, ...]) -> str:
    # Pydantic adds the name of a tagged/union branch or a validator to the path; keep keys only.
    return ".".join(str(part) for part in loc if not str(part).startswith("function-"))


def _section_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The settings class that holds the key at `loc` (None when the path leaves the schema)."""
    section: type[BaseModel] = GatewayConfig
    for part in loc[:-1]:
        if str(part).startswith("function-"):
            continue
        field = section.model_fields.get(str(part))
        if field is None:
            # A name under `models:`, `groups:`: the mapping's key, not a setting.
            continue
        found = _model_class(field.annotation)
        if found is None:
            return None
        section = found
    return section


def _model_class(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, dict, list):
        for argument in reversed(typing.get_args(annotation)):  # dict[str, X]: X
            found = _model_class(argument)
            if found is not None:
                return found
    return None


def _did_you_mean(loc: tuple[int | str, ...]) -> str:
    section = _section_at(loc)
    if section is None or not loc:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def parse_config(
    document: Any, source: str = "<config>", environ: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Validate an already parsed YAML document."""
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError([f"{source}: the top level must be a mapping (listen:, models:, ...)"])
    problems: list[str] = []
    found: set[str] = set()
    environ = os.environ if environ is None else environ
    document = substitute_env(document, environ, "", problems, found)
    if problems:
        raise ConfigError([f"{source}: {problem}" for problem in problems])
    try:
        config = GatewayConfig.model_validate(document)
        config.remember_env_values(found)
        return config
    except ValidationError as error:
        messages = []
        for item in error.errors():
            where = _location(item["loc"]) or "(top level)"
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                message = "unknown setting" + _did_you_mean(item["loc"])
            messages.append(f"{source}: {where}: {message}")
        raise ConfigError(messages) from None


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and validate a YAML config file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"{source}: cannot read: {error.strerror or error}"]) from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(yaml)"
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError([f"{source}: {where}: {problem}"]) from None
    return parse_config(document, source, environ)
