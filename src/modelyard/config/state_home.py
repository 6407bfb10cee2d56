"""Where the gateway keeps its state when the config does not say (`state_dir`).

The platform's state folder (`$XDG_STATE_HOME/modelyard`, else `~/.local/state/modelyard`), so
runtime keys, budgets and learned footprints stay the same whatever folder `serve` starts in.
A `.state` folder in the current directory, made by earlier versions' default, is still used
(with a warning), so upgrading loses none of it.
"""

from __future__ import annotations

import os
from pathlib import Path

LEGACY_STATE_DIR = ".state"
# Files and folders only a modelyard state folder holds: a stray `.state` of another tool
# is not taken for ours.
_STATE_MARKERS = (
    "engines",
    "logs",
    "events.sqlite3",
    "footprints.sqlite3",
    "runtime_keys.sqlite3",
    "key_usage.sqlite3",
    "key_tokens.sqlite3",
)


def platform_state_dir() -> Path:
    """`$XDG_STATE_HOME/modelyard` when that is an absolute path, else ~/.local/state/modelyard."""
    xdg = os.environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return base / "modelyard"


def legacy_state_dir_here() -> bool:
    """Whether the current directory holds a `.state` folder left by the old default."""
    folder = Path(LEGACY_STATE_DIR)
    return folder.is_dir() and any((folder / marker).exists() for marker in _STATE_MARKERS)


def default_state_dir() -> str:
    """The `state_dir` of a config that sets none."""
    return LEGACY_STATE_DIR if legacy_state_dir_here() else str(platform_state_dir())


def legacy_state_warning() -> str:
    return (
        f"state_dir: using {Path(LEGACY_STATE_DIR).resolve()} (a state folder left in the "
        f"current directory); set `state_dir:` to keep using it, or move it to "
        f"{platform_state_dir()}, the default"
    )
