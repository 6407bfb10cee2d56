"""What a request's answer has carried so far (`ServedTokens`): a module of its own, light to
import, for the gateway's accounting (`api.accounting`) and the proxy workers alike."""

from __future__ import annotations

from modelyard.proxy.usage_reader import usage_of


class ServedTokens:
    """What a request's answer has carried so far, told by the stream as it passes
    (`proxy.sse.StreamMeter`): events relayed, the last usage seen. Pure: no I/O, no clock."""

    __slots__ = ("final", "prompt_estimate", "relayed", "running", "usage")

    def __init__(self, prompt_estimate: int = 0) -> None:
        self.prompt_estimate = prompt_estimate
        self.relayed = 0
        self.usage: dict[str, int] = {}
        self.running = b""  # the last chunk's running usage, parsed only if needed
        self.final = False

    def relayed_events(self, count: int) -> None:
        self.relayed += count

    def saw_usage(self, usage: dict[str, int], final: bool) -> None:
        self.usage = usage
        self.final = self.final or final

    def saw_running_usage(self, raw: bytes) -> None:
        self.running = raw

    def served(self, usage: dict[str, int] | None = None) -> dict[str, int]:
        """The usage to charge: the engine's (final, or its running totals when the stream was
        cut), else the prompt's estimate and one token per event relayed."""
        known = usage or self.usage
        if not known and self.running:
            known = usage_of(b'{"usage":' + self.running + b"}")
        if known:
            return known
        if self.relayed:
            return {"prompt_tokens": self.prompt_estimate, "completion_tokens": self.relayed}
        return {}
