"""The terminal side of observability: `modelyard events [--follow]` and the status tables.

Talks to a running gateway over HTTP with the standard library only, so the CLI needs
nothing that the gateway does not already install.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from modelyard.config.units import format_bytes
from modelyard.observability.load_view import progress_line

_KIND_STYLES = {
    "start": "cyan",
    "ready": "green",
    "wake": "green",
    "sleep": "blue",
    "stop": "yellow",
    "evict": "magenta",
    "crash": "bold red",
    "hung": "bold red",
    "oom_retry": "yellow",
    "node_lost_retry": "yellow",
    "port_taken_retry": "yellow",
    "resent": "yellow",
}


def _style(kind: str) -> str:
    if kind.endswith("_failed") or kind == "adapter_refused":
        return "bold red"
    if kind.startswith("adapter_"):
        return "blue"
    return _KIND_STYLES.get(kind, "default")


RECONNECT_S = 2.0
# Longer than the gateway's 15 s keep-alive comments: a silence this long means a dead link.
READ_TIMEOUT_S = 45.0


@dataclass(frozen=True)
class Endpoint:
    url: str
    key: str | None

    def request(self, path: str, **headers: str) -> urllib.request.Request:
        request = urllib.request.Request(self.url.rstrip("/") + path, headers=headers)
        if self.key:
            request.add_header("Authorization", f"Bearer {self.key}")
        return request


def events_path(recent: int, model: str | None, follow: bool) -> str:
    query: dict[str, str] = {"recent": str(recent), "follow": "1" if follow else "0"}
    if model:
        query["model"] = model
    return "/admin/events?" + urllib.parse.urlencode(query)


def sse_events(lines: Iterator[bytes]) -> Iterator[tuple[int | None, str]]:
    """(id, data) for each event in a Server-Sent-Events byte stream; comments skipped."""
    event_id: int | None = None
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data:
                yield event_id, "\n".join(data)
            event_id, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("id:"):
            try:
                event_id = int(line[3:].strip())
            except ValueError:
                event_id = None
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def follow_events(
    endpoint: Endpoint,
    recent: int,
    model: str | None,
    on_event: Callable[[dict[str, Any]], None],
    on_reconnect: Callable[[str], None],
) -> None:
    """Print events as they happen until interrupted; reconnects and resumes by event id."""
    last_id: int | None = None
    while True:
        headers = {"Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-ID"] = str(last_id)
        request = endpoint.request(events_path(recent, model, True), **headers)
        try:
            with urllib.request.urlopen(request, timeout=READ_TIMEOUT_S) as response:
                for event_id, data in sse_events(iter(response.readline, b"")):
                    on_event(json.loads(data))
                    last_id = event_id if event_id is not None else last_id
            reason = "the gateway closed the stream"
        except urllib.error.HTTPError:
            raise  # a wrong key or URL does not get better by retrying
        except (OSError, ValueError) as error:
            reason = str(getattr(error, "reason", None) or error)
        on_reconnect(reason)
        time.sleep(RECONNECT_S)


def follow_sse_lines(endpoint: Endpoint, path: str) -> Iterator[str]:
    """Each data item (a JSON string) of an SSE stream such as `/admin/logs/M?follow=1`."""
    request = endpoint.request(path, Accept="text/event-stream")
    with urllib.request.urlopen(request, timeout=READ_TIMEOUT_S) as response:
        for _event_id, data in sse_events(iter(response.readline, b"")):
            item = json.loads(data)
            yield item if isinstance(item, str) else json.dumps(item)


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _duration(value: object) -> str:
    return f"{value:.2f}s" if isinstance(value, int | float) else ""


def event_line(event: dict[str, Any]) -> Text:
    """One event as one line of text, for `events --follow`."""
    kind = str(event.get("kind", "?"))
    line = Text()
    line.append(f"{_when(float(event.get('time', 0)))} ", style="dim")
    line.append(f"#{event.get('id', '?'):<5} ", style="dim")
    line.append(f"{kind:<13}", style=_style(kind))
    line.append(f" {event.get('model') or '-':<16}", style="bold")
    reason = str(event.get("reason") or "")
    duration = _duration(event.get("duration_s"))
    line.append(f" {reason}" + (f" ({duration})" if duration else ""))
    return line


# Below this many columns a table leaves the long fields (event reasons, failure notes) a
# strip a dozen characters wide: they are printed under their row or table instead.
WIDE_COLUMNS = 120


def events_table(events: list[dict[str, Any]], title: str) -> Table:
    """Recent events as a table, for a terminal at least `WIDE_COLUMNS` wide."""
    table = Table(title=title)
    for column in ("id", "time", "event", "model", "reason", "took"):
        table.add_column(column, overflow="fold")
    for event in events:
        kind = str(event.get("kind", "?"))
        table.add_row(
            str(event.get("id", "")),
            _when(float(event.get("time", 0))),
            Text(kind, style=_style(kind)),
            event.get("model") or "-",
            str(event.get("reason") or ""),
            _duration(event.get("duration_s")),
        )
    return table


def print_events(console: Console, events: list[dict[str, Any]], title: str) -> None:
    """`modelyard events`: a table on a wide terminal; on a narrow one each event's line,
    with its reason wrapped beneath it, so nothing is cut and no column is a sliver."""
    if console.width >= WIDE_COLUMNS:
        console.print(events_table(events, title))
        return
    console.print(Text(title, style="italic"), justify="center")
    for event in events:
        console.print(_event_head(event), overflow="fold")
        reason = str(event.get("reason") or "")
        if reason:
            console.print(Padding(Text(reason), (0, 0, 0, 4)), overflow="fold")


def _event_head(event: dict[str, Any]) -> Text:
    kind = str(event.get("kind", "?"))
    head = Text()
    head.append(f"#{event.get('id', '?')} ", style="dim")
    head.append(f"{_when(float(event.get('time', 0)))} ", style="dim")
    head.append(kind, style=_style(kind))
    head.append(f" {event.get('model') or '-'}", style="bold")
    duration = _duration(event.get("duration_s"))
    if duration:
        head.append(f" ({duration})")
    return head


def gpu_table(gpus: list[dict[str, Any]], width: int = 200) -> Table:
    """GPU memory as placement sees it: total, used, planned and free, and who is there."""
    rows = [
        [
            str(gpu.get("index", "?")),
            str(gpu.get("name") or "-"),
            format_bytes(gpu.get("total_bytes")),
            format_bytes(gpu.get("used_bytes")),
            format_bytes(gpu.get("planned_bytes")),
            format_bytes(gpu.get("free_bytes")),
            ", ".join(gpu.get("models") or []) or "-",
        ]
        for gpu in gpus
    ]
    columns = ["gpu", "name", "total", "used", "planned", "free", "models"]
    return _fitted_table("GPUs", columns, rows, ("name", "models"), width)


def _fitted_table(
    title: str, columns: list[str], rows: list[list[str]], wide: tuple[str, ...], width: int
) -> Table:
    """A table whose short columns (states, counts, sizes) keep their width and whose long
    ones (names, notes) share what is left, folding or wrapping there: on an 80-column
    terminal a model's name folds inside its cell instead of pushing the counts off."""
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
        collapse_padding=True,
        show_edge=False,
    )
    natural = [
        max([len(row[index]) for row in rows] + [len(column)])
        for index, column in enumerate(columns)
    ]
    narrowest = [
        max([len(row[index]) for row in rows] + [len(word) for word in column.split()])
        for index, column in enumerate(columns)
    ]
    gaps = 2 * (len(columns) - 1)
    if sum(natural) + gaps <= width:
        widths = natural
    else:
        # Short columns at their narrowest (a two-word header may take two lines); the long
        # ones share the rest in proportion to what they hold, at least 4 columns each.
        widths = [4 if c in wide else n for c, n in zip(columns, narrowest, strict=True)]
        room = max(width - gaps - sum(widths), 0)
        wanted = sum(n - 4 for c, n in zip(columns, natural, strict=True) if c in wide) or 1
        for index, column in enumerate(columns):
            if column in wide:
                extra = room * (natural[index] - 4) // wanted
                widths[index] = min(natural[index], 4 + extra)
    for column, column_width in zip(columns, widths, strict=True):
        table.add_column(column, overflow="fold", width=column_width)
    for row in rows:
        table.add_row(*row)
    return table


def print_status(console: Console, status: dict[str, Any], title: str) -> None:
    """`modelyard status`: every model; footprint and GPU columns only when there is data.
    Long names fold inside their cell; failure notes are a column on a wide terminal and
    whole wrapped lines under the table on a narrow one."""
    models: list[dict[str, Any]] = status.get("models") or []
    with_footprint = any(m.get("footprint_bytes") is not None for m in models)
    with_gpus = bool(status.get("gpus")) or any(m.get("gpus") for m in models)
    notes_in_table = console.width >= WIDE_COLUMNS
    columns = ["model", "state", "engine", "route", "in flight", "queued", "last use"]
    if with_footprint:
        columns.append("footprint")
    if with_gpus:
        columns.append("gpus")
    if notes_in_table:
        columns.append("note")
    rows: list[list[str]] = []
    notes: list[tuple[str, str]] = []
    for model in models:
        ago = model.get("last_used_ago_s")
        failure = model.get("failure") or {}
        row = [
            model["name"],
            model["state"],
            model.get("engine") or "-",
            model.get("route") or "-",
            str(model.get("in_flight", 0)),
            str(model.get("queued", 0)),
            "-" if ago is None else f"{ago:.0f}s ago",
        ]
        if with_footprint:
            size = format_bytes(model.get("footprint_bytes"))
            measured = model.get("footprint_measured")
            row.append(size if measured or size == "-" else f"~{size}")
        if with_gpus:
            row.append(",".join(str(g) for g in model.get("gpus") or []) or "-")
        note = str(failure.get("message") or "")
        progress = model.get("progress")
        if not note and isinstance(progress, dict):
            # A start in progress: its phase and how far along (downloading 40 %, ...).
            note = progress_line(model["name"], model).split(": ", 1)[1]
        if notes_in_table:
            row.append(note)
        elif note:
            notes.append((model["name"], note))
        rows.append(row)
    wide = ("model", "note")
    console.print(_fitted_table(title, columns, rows, wide, console.width))
    for name, note in notes:
        line = Text()
        line.append(f"{name}: ", style="bold")
        line.append(note)
        console.print(line, overflow="fold")
    if status.get("gpus"):
        console.print(gpu_table(status["gpus"], console.width))
