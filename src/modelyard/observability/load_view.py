"""`modelyard load MODEL` while the start runs: its phase, and a progress bar where the engine
says how far along it is (downloading, loading weights, compiling)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

POLL_S = 0.5


def progress_line(model: str, status: dict[str, Any]) -> str:
    """`chat: starting, loading weights 50 % (2/4 shards)`, from a model's status entry."""
    progress = status.get("progress")
    text = f"{model}: {status.get('state', '?')}"
    if isinstance(progress, dict):
        text += f", {progress.get('phase')}"
        if progress.get("fraction") is not None:
            text += f" {float(progress['fraction']) * 100:.0f} %"
        if progress.get("detail"):
            text += f" ({progress['detail']})"
    return text


def follow_load(
    model: str,
    load: Callable[[], Any],
    model_status: Callable[[], dict[str, Any] | None],
    console: Console,
) -> Any:
    """Run `load` (it returns once the model is ready) and show the start as it goes: a bar
    on a terminal, one line per change of phase otherwise (logs, CI)."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = load()
        except BaseException as error:  # SystemExit with the gateway's message, mostly
            result["error"] = error

    worker = threading.Thread(target=run, name="modelyard-load", daemon=True)
    worker.start()
    last = ""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task(model, total=None)
        while worker.is_alive():
            status = _quietly(model_status)
            if status is not None:
                line = progress_line(model, status)
                fraction = (status.get("progress") or {}).get("fraction")
                bar.update(task, description=line, total=1.0 if fraction is not None else None)
                if fraction is not None:
                    bar.update(task, completed=float(fraction))
                if line != last and not console.is_terminal:
                    console.print(line, markup=False, highlight=False)
                last = line
            worker.join(POLL_S)
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _quietly(read: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
    try:
        return read()
    except (SystemExit, OSError, ValueError):
        return None  # the status poll is a courtesy: the load itself says what went wrong
