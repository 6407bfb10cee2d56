"""What a proxy worker and the gateway's process (the owner) say to each other: typed,
versioned messages (pydantic models), one JSON object a line.

A worker sends its client's request to the owner over a Unix socket, as HTTP (aiohttp on both
ends), with `ADMISSION_HEADER` naming the request. The owner runs the one pipeline of rules
on it. Whatever it answers itself (a refusal, `/v1/models`, `/metrics`, the dashboard) comes
back as a plain HTTP answer that the worker passes on. A request it sends to an engine comes
back as a stream of these messages (`Content-Type: CHANNEL_TYPE`):

- `Waiting`/`Progress`: the engine is starting; the worker keeps its client informed
  (`api.loading.LoadingStream`, the same as in one process);
- `Relay`: the engine is held for this request: the worker sends it there itself;
- `Refused`: an error answer (its status, headers and OpenAI-shaped body);
- `Lost`: the held engine was lost: the worker ends the exchange at once;
- `Done`: nothing more to do.

A `Relay` carries the request's bound on its engine's silences (`first_byte_timeout`, as
`api.liveness.first_byte_guard` sets it). When it passes, the worker posts a `Silent` to
`SILENT_PATH`; the owner runs the engine's liveness check and answers a `Verdict`: a live
engine keeps the request, one that does not answer ends it (the worker reports it in its
`Finish`, and the owner answers 504, or the stream ends with an error event).

After each `Relay` the worker posts a `Finish` (what happened: status, usage, timings) to
`FINISH_PATH`; the owner answers it there, and the channel goes on: `Done`, `Refused`, or a
`Relay` to a fallback. A worker whose client hangs up before any `Relay` posts a `Finish`
with `client_gone` too, so the owner tells a client that left (499) from a worker that died
(502) when the channel closes.

Every message carries `version`; a message of another version is refused with a clear
`MessageError` (the owner answers it 400), never read field by field.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from modelyard.proxy.sse import StreamMeter, StreamTransformer

VERSION: Literal[1] = 1
# Header on the worker's request to the owner: `<VERSION> <worker index> <request id>`.
ADMISSION_HEADER = "Modelyard-Admission"
CHANNEL_TYPE = "application/x-modelyard-channel"
FINISH_PATH = "/finish"
SILENT_PATH = "/silent"
# The request target exactly as the client sent it (an HTTP client may not send everything
# a server accepts, such as a `#`): the owner checks this one (`api.guards.canonical_form`).
TARGET_HEADER = "Modelyard-Target"
# The client's address, for what the owner logs and limits by address.
PEER_HEADER = "Modelyard-Peer"


class MessageError(ValueError):
    """A message that cannot be read: another version, or not a message at all."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = VERSION


class Waiting(_Message):
    """The engine must start (or wake) first; the worker opens its loading stream."""

    kind: Literal["waiting"] = "waiting"
    cors_origin: str | None = None  # a listed browser origin: the answer says so
    model: str  # the name the client used
    content: bool  # progress as chat chunks, not only as SSE comments
    chat: bool
    progress: str | None = None


class Progress(_Message):
    kind: Literal["progress"] = "progress"
    progress: str | None


class Reading(BaseModel):
    """How an engine's answer is read back: model names rewritten (aliases), usage captured
    from a stream and the chunks the gateway asked for on the client's behalf taken out.
    Both ways of relaying build their stream transformer from it (`transformer`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    transform: bool = False  # a stream goes through a StreamTransformer
    replacements: list[tuple[str, str]] = Field(default_factory=list)  # model names, JSON
    drop_usage_only_chunk: bool = False
    strip_progress_usage: bool = False
    prompt_estimate: int = 0  # what a cut stream's prompt is charged when no usage came

    def replacement_bytes(self) -> list[tuple[bytes, bytes]]:
        return [(old.encode(), new.encode()) for old, new in self.replacements]

    def transformer(
        self,
        meter: StreamMeter | None,
        on_final_usage: Callable[[dict[str, int]], None] | None = None,
    ) -> StreamTransformer | None:
        if not self.transform:
            return None
        return StreamTransformer(
            self.replacement_bytes(),
            capture_usage=True,
            drop_usage_only_chunk=self.drop_usage_only_chunk,
            on_final_usage=on_final_usage,
            meter=meter,
            strip_progress_usage=self.strip_progress_usage,
        )


class Relay(_Message):
    """Send the request to `url` (built from the canonical target) with these headers and
    body; read the answer back as `reading` says."""

    kind: Literal["relay"] = "relay"
    cors_origin: str | None = None
    url: str
    headers: dict[str, str]
    body: str | None  # base64; None: no body
    reading: Reading = Field(default_factory=Reading)
    answer_headers: dict[str, str] = Field(default_factory=dict)
    # Seconds the engine may stay silent (before its first byte, or mid-stream) before its
    # liveness is checked; None: no bound (the read timeout only).
    first_byte_timeout: float | None = None

    def body_bytes(self) -> bytes | None:
        return None if self.body is None else base64.b64decode(self.body)


class Refused(_Message):
    kind: Literal["refused"] = "refused"
    status: int
    message: str
    code: str | None
    headers: dict[str, str]
    body: str  # the JSON error body, as sent


class Lost(_Message):
    kind: Literal["lost"] = "lost"
    reason: str


class Done(_Message):
    kind: Literal["done"] = "done"


ChannelMessage = Annotated[
    Waiting | Progress | Relay | Refused | Lost | Done, Field(discriminator="kind")
]
_CHANNEL = TypeAdapter(ChannelMessage)
_T = TypeVar("_T")


class Finish(_Message):
    """How one exchange with an engine ended, from the worker that relayed it (or, with no
    exchange, that its client left while waiting)."""

    kind: Literal["finish"] = "finish"
    request: str  # the request id of ADMISSION_HEADER
    status: int = 0
    streamed: bool = False
    first_byte_s: float | None = None
    usage: dict[str, int] = Field(default_factory=dict)  # what to charge
    client_gone: bool = False
    upstream_broke: bool = False
    engine_lost: bool = False
    cut_by_gateway: bool = False
    # A stream whose engine went silent past the first-byte bound and failed its check: the
    # client had its 200, and got a final error event.
    first_byte_timed_out: bool = False
    # Before anything reached the client: the engine could not be reached, timed out (the
    # read timeout, or silent past the first-byte bound and found dead), or was lost (the
    # owner answers it: a 502/503/504, or a fallback).
    failure: Literal["unreachable", "timeout", "first_byte_timeout", "lost"] | None = None
    failure_detail: str = ""


class Silent(_Message):
    """The engine of a relayed request stayed silent past its first-byte bound: the worker
    asks the owner, which keeps every liveness verdict, whether to end the request."""

    kind: Literal["silent"] = "silent"
    request: str  # the request id of ADMISSION_HEADER


class Verdict(_Message):
    """The owner's answer to a `Silent`: whether the engine passed its liveness check (an
    engine that did keeps the request; a request the owner no longer knows is kept too)."""

    kind: Literal["verdict"] = "verdict"
    alive: bool


def _check_version(data: bytes) -> None:
    # Read the version before the rest, so another version says so instead of listing
    # whatever fields differ.
    try:
        raw = json.loads(data)
    except ValueError as error:
        raise MessageError(f"not a message: {error}") from None
    if not isinstance(raw, dict):
        raise MessageError("not a message: expected a JSON object")
    if raw.get("version") != VERSION:
        raise MessageError(
            f"message version {raw.get('version')!r} is not this gateway's ({VERSION}): "
            "the gateway and its workers must run the same modelyard"
        )


def encode(message: _Message) -> bytes:
    return message.model_dump_json().encode() + b"\n"


def _decode(parse: Callable[[bytes], _T], data: bytes, what: str) -> _T:
    """One message of this version, parsed by `parse`; a MessageError for anything else."""
    _check_version(data)
    try:
        return parse(data)
    except ValidationError as error:
        raise MessageError(f"not a {what} message: {error}") from None


def decode_channel(line: bytes) -> Waiting | Progress | Relay | Refused | Lost | Done:
    return _decode(_CHANNEL.validate_json, line, "channel")


def decode_finish(data: bytes) -> Finish:
    return _decode(Finish.model_validate_json, data, "finish")


def decode_silent(data: bytes) -> Silent:
    return _decode(Silent.model_validate_json, data, "silent")


def decode_verdict(data: bytes) -> Verdict:
    return _decode(Verdict.model_validate_json, data, "verdict")


def body_text(body: bytes | None) -> str | None:
    return None if body is None else base64.b64encode(body).decode()
