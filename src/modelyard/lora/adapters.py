"""Reading and checking one adapter folder before it goes anywhere near an engine."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class Adapter:
    """An adapter the gateway may serve (or refuses to, with `problem` saying why)."""

    name: str
    base: str  # the configured base model (the engine it runs on)
    path: str
    rank: int | None
    trained_on: str | None  # adapter_config.json's base_model_name_or_path
    static: bool  # configured by hand (loaded by the engine at start) vs found in a folder
    problem: str | None = None
    status: int = 400  # the HTTP status a request for it gets while `problem` is set


def safe_adapter_name(name: str) -> bool:
    """Names become URL parts, vLLM's lora_name and log fields: no path characters."""
    return bool(_SAFE_NAME.match(name)) and ".." not in name


def read_adapter(
    name: str, base: str, path: str, base_model: str | None, max_rank: int, static: bool
) -> Adapter:
    """Check an adapter folder: readable config, rank within limits, trained for this base."""

    def refused(
        problem: str, status: int = 400, rank: int | None = None, trained_on: str | None = None
    ) -> Adapter:
        return Adapter(name, base, path, rank, trained_on, static, problem, status)

    if not safe_adapter_name(name):
        return refused(f"adapter name {name!r} may only use letters, digits and . _ -")
    folder = Path(path)
    config_file = folder / "adapter_config.json"
    if not folder.is_dir():
        return refused(f"adapter {name!r}: folder {path} does not exist", 404)
    try:
        config = json.loads(config_file.read_text())
    except OSError as error:
        return refused(f"adapter {name!r}: cannot read {config_file}: {error.strerror}", 404)
    except ValueError as error:
        return refused(f"adapter {name!r}: {config_file} is not valid JSON: {error}")
    if not isinstance(config, dict):
        return refused(f"adapter {name!r}: {config_file} must hold a JSON object")
    rank = config.get("r")
    trained_on = config.get("base_model_name_or_path")
    if not isinstance(rank, int) or rank < 1:
        return refused(
            f"adapter {name!r}: adapter_config.json has no valid rank 'r'", trained_on=trained_on
        )
    if rank > max_rank:
        return refused(
            f"adapter {name!r} has rank {rank}, above the base model's max_rank {max_rank} "
            "(raise lora.max_rank, which restarts the engine with a larger --max-lora-rank)",
            rank=rank,
            trained_on=trained_on,
        )
    if not any((folder / weights).is_file() for weights in _WEIGHT_FILES):
        return refused(
            f"adapter {name!r}: {path} has no adapter_model.safetensors or .bin",
            404,
            rank,
            trained_on,
        )
    if isinstance(trained_on, str) and base_model and not same_base(trained_on, base_model):
        return refused(
            f"adapter {name!r} was trained on {trained_on!r}, but model {base!r} serves "
            f"{base_model!r}",
            rank=rank,
            trained_on=trained_on,
        )
    return Adapter(
        name, base, path, rank, trained_on if isinstance(trained_on, str) else None, static
    )


def same_base(trained_on: str, base_model: str) -> bool:
    """An adapter's recorded base matches the served weights: same path, or the same model
    name (a hub id such as `HuggingFaceTB/SmolLM2-135M-Instruct` and a local folder of it)."""
    if trained_on == base_model:
        return True
    a, b = Path(trained_on), Path(base_model)
    if a.is_absolute() and b.is_absolute():
        try:
            if a.resolve() == b.resolve():
                return True
        except OSError:
            pass
    return a.name.lower() == b.name.lower()


def scan_adapter_dir(directory: str) -> dict[str, str]:
    """Every subfolder that holds an adapter_config.json, by folder name."""
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        return {}
    return {
        entry.name: str(entry)
        for entry in sorted(folder.iterdir())
        if entry.is_dir() and (entry / "adapter_config.json").is_file()
    }
