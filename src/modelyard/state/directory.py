"""The state directory: where each part's database lives, and who hears about damaged files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from modelyard.state.database import StateDatabase
from modelyard.state.files import SetAside, SetAsideReport


class StateDirectory:
    """Opens `<state_dir>/<name>.sqlite3` for each owner; every set-aside file is reported."""

    def __init__(self, path: Path, report: SetAsideReport | None = None) -> None:
        self.path = path
        self.set_aside: list[SetAside] = []  # everything moved aside since the gateway started
        self._report = report
        path.mkdir(parents=True, exist_ok=True)

    def database(self, name: str, migrations: Sequence[str]) -> StateDatabase:
        """Open the database `name` (one file per owner: usage, events, footprints, ...)."""
        return StateDatabase(self.path / f"{name}.sqlite3", migrations, self.note)

    def note(self, record: SetAside) -> None:
        """Remember and report a state file that was moved aside (callers of `read_json` too)."""
        self.set_aside.append(record)
        if self._report is not None:
            self._report(record)
