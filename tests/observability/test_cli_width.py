"""The CLI's output at 80 and 200 columns: long names and notes fold or wrap, never cut."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml
from rich.console import Console

from modelyard.observability.console import print_events, print_status

LONG_NAME = "/models/medium/coding/qwen2.5-coder-7b-gptq"
NOTE = (
    "engine exited with code 1 before it was ready: CUDA out of memory while loading the "
    "weights (tried to allocate 2.00 GiB; 1.10 GiB free); see `modelyard logs` for the rest"
)
REASON = (
    "placement: stopped to free 6.0 GiB on gpu 0 for 'coder' (least recently used, idle "
    "for 412 s, no requests in flight)"
)


def render(width: int, draw: object) -> list[str]:
    console = Console(record=True, width=width, color_system=None)
    draw(console)  # type: ignore[operator]
    return console.export_text().splitlines()


def cells(lines: list[str], column: int, sep: str = "") -> str:
    """The text of one table column, its folded (sep "") or wrapped (sep " ") pieces joined."""
    pieces = []
    for line in lines:
        parts = line.split("│")
        if len(parts) > column and parts[column].strip():
            pieces.append(parts[column].strip())
    return sep.join(pieces)


def words(lines: list[str]) -> str:
    return re.sub(r"\s+", " ", " ".join(line.strip(" │") for line in lines))


STATUS = {
    "models": [
        {"name": LONG_NAME, "state": "failed", "engine": "vllm", "route": "/coder",
         "in_flight": 0, "queued": 0, "last_used_ago_s": 12.0, "failure": {"message": NOTE}},
        {"name": "chat", "state": "ready", "engine": "vllm", "in_flight": 2, "queued": 1,
         "last_used_ago_s": 1.0},
    ]
}  # fmt: skip


@pytest.mark.parametrize("width", [80, 200])
def test_status_fits_and_keeps_whole_names_and_notes(width: int) -> None:
    lines = render(width, lambda console: print_status(console, STATUS, "modelyard at test"))
    assert all(len(line) <= width for line in lines), "\n".join(lines)
    assert LONG_NAME in cells(lines, 1)
    shown = words(lines) if width < 120 else cells(lines, 8, sep=" ")
    assert NOTE in shown, "\n".join(lines)
    assert "…" not in "\n".join(lines)


@pytest.mark.parametrize("width", [80, 200])
def test_events_fit_and_reasons_wrap_in_a_few_lines(width: int) -> None:
    events = [
        {"id": 1234, "time": 1_700_000_000.0, "kind": "evict", "model": LONG_NAME,
         "reason": REASON, "duration_s": 1.5},
        {"id": 1235, "time": 1_700_000_001.0, "kind": "start", "model": "coder", "reason": ""},
    ]  # fmt: skip
    lines = render(width, lambda console: print_events(console, events, "events at test"))
    text = "\n".join(lines)
    assert all(len(line) <= width for line in lines), text
    assert "…" not in text
    shown = words(lines) if width < 120 else cells(lines, 5, sep=" ")
    assert REASON in shown, text
    # The whole listing: a title, a line or two an event, the reason over a few lines.
    assert len(lines) <= (8 if width == 80 else 12), text


@pytest.mark.parametrize("width", [80, 200])
def test_check_plan_fits_and_folds_long_names(tmp_path, width: int) -> None:
    config = {
        "state_dir": str(tmp_path / "state"),
        "models": {
            LONG_NAME: {"model": "/srv/llm/weights/qwen2.5-coder-7b-instruct-gptq-int4",
                        "aliases": ["coder", "qwen-coder-7b"], "route": "/coding"},
        },
    }  # fmt: skip
    path = tmp_path / "modelyard.yaml"
    path.write_text(yaml.safe_dump(config))
    checked = subprocess.run(
        [sys.executable, "-m", "modelyard", "check", "-c", str(path)],
        capture_output=True, text=True, check=False,
        env={**os.environ, "COLUMNS": str(width), "XDG_STATE_HOME": str(tmp_path)},
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    lines = checked.stdout.splitlines()
    assert all(len(line) <= width for line in lines), checked.stdout
    assert LONG_NAME in cells(lines, 1), checked.stdout
    assert "…" not in checked.stdout
