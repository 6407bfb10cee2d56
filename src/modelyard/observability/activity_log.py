"""The gateway's activity in its log: one line per proxied request and per engine event.

Only what is safe to keep in a log file: names, statuses, durations and token counts.
Request bodies and headers (which carry API keys) are never logged; the key is named by the
name it has in the config, never by its value.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from modelyard.observability.events import Event
from modelyard.observability.log_format import key_values

if TYPE_CHECKING:
    from modelyard.observability.requests import RequestRecord

request_log = logging.getLogger("modelyard.requests")
engine_log = logging.getLogger("modelyard.engines")

# Failures deserve attention in a log that is mostly routine lines.
_WARNING_KINDS = frozenset({"crash", "start_failed", "wake_failed", "orphan_stopped"})
# Event data worth a log field; anything else (such as an engine's log tail) stays in the
# event history and /admin/logs, so one log line stays one line.
_EVENT_DATA_KEYS = ("exit_code", "level", "port", "in_flight", "gpus", "adapter")


def log_request(record: RequestRecord) -> None:
    if not request_log.isEnabledFor(logging.INFO):
        return
    fields: dict[str, Any] = {
        "model": record.model,
        "route": record.route,
        "key": record.key_name,
        "status": record.status,
        "duration_s": round(record.duration_s, 4),
        "first_byte_s": None if record.first_byte_s is None else round(record.first_byte_s, 4),
        "streamed": record.streamed,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
    }
    if record.client_gone:
        fields["client_gone"] = True
    request_log.info("request %s", key_values(fields), extra={"fields": fields})


def log_event(event: Event) -> None:
    level = logging.WARNING if event.kind in _WARNING_KINDS else logging.INFO
    if not engine_log.isEnabledFor(level):
        return
    fields: dict[str, Any] = {
        "event": event.kind,
        "model": event.model,
        "reason": event.reason or None,
        "duration_s": None if event.duration_s is None else round(event.duration_s, 3),
        "event_id": event.id,
    }
    for key in _EVENT_DATA_KEYS:
        if event.data.get(key) is not None:
            fields[key] = event.data[key]
    engine_log.log(level, "engine %s", key_values(fields), extra={"fields": fields})
