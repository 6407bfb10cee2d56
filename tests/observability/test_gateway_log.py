"""The gateway's own log lines: text or JSON, with fields, and nothing secret."""

from __future__ import annotations

import json
import logging

import pytest

from modelyard.observability.activity_log import log_event, log_request
from modelyard.observability.events import Event
from modelyard.observability.log_format import JsonLineFormatter, configure_logging, key_values
from modelyard.observability.requests import RequestRecord


@pytest.fixture
def captured():
    """Records of the gateway's loggers, formatted as JSON lines."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Keep()
    handler.setFormatter(JsonLineFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lines
    root.removeHandler(handler)
    root.setLevel(old_level)


def test_request_line_has_the_fields_as_json(captured: list[str]) -> None:
    log_request(RequestRecord("chat", "/v1/chat", "alice", 200, 0.12345, 0.01, True, 5, 7))
    (line,) = [json.loads(text) for text in captured]
    assert line["logger"] == "modelyard.requests"
    assert line["level"] == "INFO"
    assert line["time"].endswith("Z")
    assert {k: line[k] for k in ("model", "route", "key", "status", "streamed")} == {
        "model": "chat",
        "route": "/v1/chat",
        "key": "alice",
        "status": 200,
        "streamed": True,
    }
    assert line["duration_s"] == 0.1235
    assert line["prompt_tokens"] == 5
    assert line["completion_tokens"] == 7
    assert "status=200" in line["message"]


def test_engine_events_are_logged_without_their_log_tail(captured: list[str]) -> None:
    event = Event(
        7, 0.0, "crash", "chat", "exited (exit code -9)", None,
        {"exit_code": -9, "log_tail": ["line one", "line two"]},
    )  # fmt: skip
    log_event(event)
    log_event(Event(8, 0.0, "ready", "chat", "started", 1.25, {"port": 4000}))
    crash, ready = (json.loads(text) for text in captured)
    assert crash["level"] == "WARNING"
    assert crash["event"] == "crash"
    assert crash["exit_code"] == -9
    assert crash["event_id"] == 7
    assert "log_tail" not in crash
    assert "line one" not in json.dumps(crash)
    assert ready["level"] == "INFO"
    assert ready["duration_s"] == 1.25
    assert ready["port"] == 4000


def test_exceptions_are_one_json_line(captured: list[str]) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("modelyard").exception("it broke")
    (line,) = [json.loads(text) for text in captured]
    assert line["message"] == "it broke"
    assert "ValueError: boom" in line["exception"]


def test_key_values_quotes_what_would_be_ambiguous() -> None:
    text = key_values({"a": 1, "b": "two words", "c": None, "d": 0.5, "e": True, "f": 'x"y'})
    assert text == 'a=1 b="two words" d=0.500 e=true f="x\\"y"'


def test_configure_logging_replaces_handlers(capsys) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("info", "json")
        configure_logging("info", "json")
        assert len(root.handlers) == 1
        logging.getLogger("modelyard.test").info("hello %s", "there")
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert line["message"] == "hello there"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
