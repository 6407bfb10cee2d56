"""The gateway's own state on disk: small SQLite databases and atomically written files.

Every part that persists something (key usage, events, learned footprints) opens its own file
through `StateDirectory`, so WAL mode, atomic writes and the handling of a corrupt file (set
aside, logged and reported as an event, never silently dropped) are written once.
"""

from modelyard.state.database import StateDatabase, StateError
from modelyard.state.directory import StateDirectory
from modelyard.state.files import SetAside, read_json, set_aside, write_atomic

__all__ = [
    "SetAside",
    "StateDatabase",
    "StateDirectory",
    "StateError",
    "read_json",
    "set_aside",
    "write_atomic",
]
