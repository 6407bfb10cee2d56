"""The log's output (observability/log_stream.py): a turn of the event loop's routine lines in
one write, nothing lost, nothing out of order.

At one line per proxied request, writing each line on its own cost more than half of a
request's handling (measured at c=64 against the same gateway at WARNING); these tests pin
down what batching must not change.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import pytest

from modelyard.observability.log_format import configure_logging
from modelyard.observability.log_stream import MAX_WAITING


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def stream(monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingStream]:
    captured = CountingStream()
    monkeypatch.setattr("sys.stderr", captured)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    configure_logging("INFO", "text")
    yield captured
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


def lines(stream: CountingStream) -> list[str]:
    return [line.split(": ", 1)[1] for line in stream.getvalue().splitlines()]


async def test_a_turns_request_lines_go_out_in_one_write_at_the_end_of_the_turn(stream):
    log = logging.getLogger("modelyard.requests")
    for number in range(50):
        log.info("request %d", number)
    assert stream.writes == 0  # still this turn of the loop
    await asyncio.sleep(0)
    assert stream.writes == 1
    assert lines(stream) == [f"request {number}" for number in range(50)]


async def test_a_warning_goes_out_at_once_after_the_lines_before_it(stream):
    logging.getLogger("modelyard.requests").info("first")
    logging.getLogger("modelyard").warning("a warning")
    assert lines(stream) == ["first", "a warning"]  # no loop turn needed, order kept
    logging.getLogger("modelyard.requests").info("after")
    await asyncio.sleep(0)
    assert lines(stream) == ["first", "a warning", "after"]


async def test_a_burst_of_lines_is_written_as_it_goes_not_held_without_bound(stream):
    log = logging.getLogger("modelyard.requests")
    for number in range(MAX_WAITING * 3 + 1):
        log.info("request %d", number)
    assert stream.writes == 3  # at most MAX_WAITING lines wait at any time
    await asyncio.sleep(0)
    assert len(lines(stream)) == MAX_WAITING * 3 + 1


async def test_lines_from_another_thread_are_written_at_once_in_order(stream):
    log = logging.getLogger("modelyard.requests")
    log.info("on the loop")
    await asyncio.to_thread(log.info, "from a thread")
    assert lines(stream) == ["on the loop", "from a thread"]


def test_without_an_event_loop_every_line_is_written_at_once(stream):
    logging.getLogger("modelyard").info("starting")
    assert lines(stream) == ["starting"]


async def test_replacing_the_handler_writes_what_the_old_one_holds(stream, monkeypatch):
    # A reload changes the log format: the new handler must not overtake the old one's lines.
    logging.getLogger("modelyard.requests").info("before the reload")
    monkeypatch.setattr("sys.stderr", stream)  # pytest puts its own back for the test's call
    configure_logging("INFO", "json")
    logging.getLogger("modelyard").warning("after the reload")
    text = stream.getvalue().splitlines()
    assert text[0].endswith("before the reload")
    assert '"message": "after the reload"' in text[1]


async def test_hostile_text_is_still_escaped(stream):
    # Terminal escape sequences in a logged value must not reach an operator's terminal.
    logging.getLogger("modelyard.requests").info("request model=%s", "x\x1b[2J\x07")
    await asyncio.sleep(0)
    written = stream.getvalue()
    assert "\x1b" not in written
    assert "\x07" not in written
    assert written.endswith("request model=x\\x1b[2J\\x07\n")
