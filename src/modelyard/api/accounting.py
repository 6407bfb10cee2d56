"""What a proxied request leaves behind: its tokens for the key (budgets, tokens per minute,
usage per model) and its record (metrics, request log, watchdog).

The one request path (`api.serving`), in this order:
1. `read_options` (api.request_options): one reading of the body, for decisions and charges;
2. `TokenCount(...).reserve()`: the key's reservation, or its 429 before any engine is asked;
3. `ask_stream_for_usage`: usage asked of a stream (running totals too, where the engine
   supports them), then a `StreamTransformer` with `meter=tokens.served` so a stream cut
   anywhere is charged what it relayed;
4. `finish`: the reservation settled to what was served, and the record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelyard.api.errors import ApiError
from modelyard.api.request_options import (
    DEFAULT_RESERVE_TOKENS,
    RequestOptions,
    engine_reads_true,
)
from modelyard.auth.budgets import Reservation
from modelyard.gateway import Gateway
from modelyard.observability.requests import RequestRecord
from modelyard.proxy.served import ServedTokens
from modelyard.proxy.usage_reader import usage_of

__all__ = [
    "ServedTokens",
    "TokenCount",
    "UsageAsked",
    "ask_stream_for_usage",
    "finish",
    "supports_running_usage",
    "usage_of",
]


@dataclass(frozen=True)
class UsageAsked:
    """What the gateway added to a stream's `stream_options` on its own, so it can take it
    out again: the client sees the stream it asked for."""

    final: bool = False  # include_usage: a last chunk with no choices
    running: bool = False  # continuous_usage_stats: running totals in every chunk

    def __bool__(self) -> bool:
        return self.final or self.running


def supports_running_usage(gateway: Gateway, model: str) -> bool:
    """vLLM engines answer `continuous_usage_stats`; other servers may refuse the field."""
    config = gateway.config.models.get(model)
    return config is not None and config.engine == "vllm"


def ask_stream_for_usage(
    path: str, payload: dict[str, Any], continuous: bool = False
) -> UsageAsked:
    """Ask a completion stream for its usage (for token metrics and budgets): engines send it
    in a last chunk with no choices, which the caller drops again. With `continuous` (engines
    that support vLLM's `continuous_usage_stats`), every chunk carries the running totals
    too, so a stream cut anywhere is charged exactly; the caller strips them.

    A stream is whatever the engine reads as one (`"stream": "yes"` included:
    `engine_reads_true`). Says what was added; the payload is changed in place."""
    if not engine_reads_true(payload.get("stream")) or not path.endswith("/completions"):
        return UsageAsked()
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return UsageAsked()  # malformed: the engine's own error is the right answer
    options = options or {}
    final = not engine_reads_true(options.get("include_usage"))
    running = continuous and not engine_reads_true(options.get("continuous_usage_stats"))
    added = UsageAsked(final, running)
    if added:
        wanted = {"include_usage": True, "continuous_usage_stats": True} if running else {}
        payload["stream_options"] = {**options, "include_usage": True, **wanted}
    return added


def charged_tokens(usage: dict[str, int]) -> tuple[int, int]:
    """Prompt and completion tokens of a (normalized) usage; an embeddings answer may give
    only `total_tokens`."""
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens", 0)
    if prompt is None:
        prompt = max(usage.get("total_tokens", 0) - completion, 0)
    return prompt, completion


class TokenCount:
    """One request's tokens for its key (budgets, tokens per minute, usage per model):
    reserved at admission (`reserve`), told what the answer carries as it passes (`served`,
    the stream's meter), and settled once: as soon as the final usage is known (a stream's
    as its usage chunk passes), else at the finish to what was served."""

    def __init__(
        self,
        gateway: Gateway,
        key_name: str,
        model: str,
        options: RequestOptions | None = None,
    ) -> None:
        self._gateway = gateway
        self._key_name = key_name
        self._model = model
        self.options = options
        self.served = ServedTokens(options.prompt_estimate if options is not None else 0)
        self._reservation: Reservation | None = None
        self.counted = False

    def reserve(self) -> None:
        """Hold this request's tokens (its prompt and its longest answer) for its key; raises
        the 429 (with `Retry-After`) when they do not fit its budget or tokens per minute."""
        auth = self._gateway.auth
        if auth is None or self.options is None:
            return
        model = self._gateway.config.models.get(self._model)
        default = model.reserve_tokens if model is not None else DEFAULT_RESERVE_TOKENS
        held = auth.reserve(self._key_name, self.options.reservation(default))
        if isinstance(held, Reservation):
            self._reservation = held
            return
        raise ApiError(
            held.status, held.message, held.code, retry_after=held.retry_after, headers=held.headers
        )

    def count(self, usage: dict[str, int]) -> None:
        """The request's final usage (the engine's, or what was served): charged once."""
        if self.counted or self._gateway.auth is None:
            return
        self.counted = True
        prompt, completion = charged_tokens(usage)
        ledger = self._gateway.auth.ledger
        if self._reservation is not None:
            ledger.settle(self._reservation, self._model, prompt, completion)
        else:
            ledger.record(self._key_name, self._model, prompt, completion)

    def settle(self, usage: dict[str, int], served_unknown: bool = False) -> dict[str, int]:
        """At the finish, however it ended: the usage charged (`usage` from the engine, else
        what was relayed). `served_unknown`: the process that relayed the answer died, so
        what it served is not known: the whole reservation is charged, an upper bound."""
        charged = self.served.served(usage)
        if not charged and served_unknown and self._reservation is not None:
            charged = {"prompt_tokens": self._reservation.tokens, "completion_tokens": 0}
        self.count(charged)
        return charged


def finish(
    gateway: Gateway,
    tokens: TokenCount,
    *,
    model: str,
    route: str,
    key_name: str,
    status: int,
    duration_s: float,
    first_byte_s: float | None,
    streamed: bool,
    usage: dict[str, int],
    client_gone: bool,
    served_unknown: bool = False,
) -> None:
    """A proxied request is over, however it ended: its tokens (unless a stream's were
    counted already: a cut stream is charged what it relayed) and its record."""
    usage = tokens.settle(usage, served_unknown)
    gateway.observe(
        RequestRecord(
            model=model,
            route=route,
            key_name=key_name,
            status=status,
            duration_s=duration_s,
            first_byte_s=first_byte_s,
            streamed=streamed,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            client_gone=client_gone,
        )
    )
