"""What a public model name resolves to (a configured model, an alias, or an adapter)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """What a public model name resolves to."""

    model: str  # the configured model (the engine to run)
    public_name: str  # what the client asked for
    upstream_name: str  # what the engine calls it (served name, or the adapter's name)
    adapter: str | None = None


class UnknownModel(Exception):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.name = name
        self.known = known
