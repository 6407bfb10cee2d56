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


GIB = 2**30
STATUS = {
    "models": [
        {"name": LONG_NAME, "state": "failed", "engine": "vllm", "route": "/coder",
         "in_flight": 0, "queued": 0, "last_used_ago_s": 12.0, "failure": {"message": NOTE},
         "footprint_bytes": 16 * GIB, "footprint_measured": True, "gpus": [0, 1]},
        {"name": "chat", "state": "ready", "engine": "diffusion", "in_flight": 2, "queued": 128,
         "last_used_ago_s": 3000.0, "footprint_bytes": 3 * GIB, "gpus": []},
    ],
    "gpus": [
        {"index": 0, "name": "NVIDIA GeForce RTX 4090", "total_bytes": 24 * GIB,
         "used_bytes": 7 * GIB, "planned_bytes": 6 * GIB, "free_bytes": 17 * GIB,
         "models": [LONG_NAME, "chat"]},
    ],
}  # fmt: skip


def column(lines: list[str], header: str, next_header: str | None, sep: str = "") -> str:
    """One column of the first table (no vertical rules): its pieces under the header, joined
    (sep "" for folded names, " " for wrapped text)."""
    rule = next(i for i, line in enumerate(lines) if line.startswith("─"))
    head = lines[rule - 1]
    start = head.index(header)
    end = head.index(next_header) if next_header else None
    pieces = []
    for line in lines[rule + 1 :]:
        if not line.strip() or line.startswith(f"{LONG_NAME}:") or line.strip() == "GPUs":
            break
        if line[start:end].strip():
            pieces.append(line[start:end].strip())
    return sep.join(pieces)


@pytest.mark.parametrize("width", [80, 200])
def test_status_fits_and_keeps_whole_names_and_notes(width: int) -> None:
    lines = render(width, lambda console: print_status(console, STATUS, "modelyard at test"))
    text = "\n".join(lines)
    assert all(len(line) <= width for line in lines), text
    assert LONG_NAME in column(lines, "model", "state"), text
    # Every column is there, whole: the counts and sizes are not pushed off the edge.
    for cell in (
        "failed",
        "diffusion",
        "/coder",
        "128",
        "3000s ago",
        "16.0 GiB",
        "0,1",
        "~3.0 GiB",
    ):
        assert cell in text, (cell, text)
    shown = words(lines) if width < 120 else column(lines, "note", None, sep=" ")
    assert NOTE in shown, text
    assert "…" not in text
    gpus = lines[[line.strip() for line in lines].index("GPUs") :]
    assert column(gpus, "name", "total", sep=" ") == "NVIDIA GeForce RTX 4090", text
    assert LONG_NAME in column(gpus, "models", None), text


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
        "vllm": {"executable": ["/bin/true", "serve"]},  # `check` refuses a missing program
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
