"""What pre-warms did: made, or kept (an engine the idle timer kept up because pre-warming
would start it again at once); used (a request came before the engine was idle-stopped or
evicted), wasted (it went first, or was cancelled), and the wait they spared."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PreWarmStats:
    made: int = 0
    kept: int = 0
    used: int = 0
    wasted: int = 0
    spared_s: float = 0.0
    # Pre-warms not yet used nor wasted, by model: (when made, the wait it would spare).
    _open: dict[str, tuple[float, float]] = field(default_factory=dict)

    def made_for(self, model: str, now: float, wait_s: float) -> None:
        self.made += 1
        self._open[model] = (now, wait_s)

    def kept_for(self, model: str, now: float, wait_s: float) -> None:
        self.kept += 1
        self._open[model] = (now, wait_s)

    def asked_for(self, model: str, now: float) -> float | None:
        """A request came for `model`: a pre-warm of it, if any, was used; the wait spared."""
        opened = self._open.pop(model, None)
        if opened is None:
            return None
        at, wait_s = opened
        self.used += 1
        # Its request waited what was left of the start, or nothing: it was spared the rest.
        spared = min(now - at, wait_s)
        self.spared_s += spared
        return spared

    def gone(self, model: str) -> bool:
        """Stopped, evicted or cancelled before any request came: wasted (True)."""
        if self._open.pop(model, None) is None:
            return False
        self.wasted += 1
        return True

    def as_dict(self) -> dict[str, float]:
        return {
            "made": self.made,
            "kept": self.kept,
            "used": self.used,
            "wasted": self.wasted,
            "spared_s": round(self.spared_s, 3),
        }
