"""Whether an engine's start is getting anywhere: its phase, how far along, when it last moved.

Pure: fed the engine's log lines, the size of its weights cache folder and the time, it says
which phase the start is in (downloading, loading weights, compiling, ready), how much of it is
done when the engine says so, and when the start must be given up. A first start that
downloads 60 GB outlasts any fixed timeout; a hung one must still be killed. So the deadline
moves with progress (`start_timeout` of no progress is a hang) under a hard cap
(`start_timeout_max`) that no log, however busy or optimistic, can push back.

Only *advances* count as progress: a phase reached for the first time, a higher percentage
within a phase, a cache folder that grew. A log that repeats "50 %" or floods with other
lines does not keep a start alive.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class Phase(enum.IntEnum):
    """In the order a vLLM start goes through them; a start never goes back."""

    STARTING = 0
    DOWNLOADING = 1
    LOADING_WEIGHTS = 2
    COMPILING = 3
    READY = 4

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", " ")


# vLLM's own log lines (0.6 to 0.11 wording), matched anywhere in a line so prefixes such as
# "(EngineCore_DP0 pid=1) INFO 11-05 22:41:22 [weight_utils.py:392]" do not matter.
_PHASE_LINES: tuple[tuple[re.Pattern[str], Phase], ...] = (
    # "Starting to load model" comes before the download: it names no phase of its own.
    (re.compile(r"Time spent downloading weights"), Phase.LOADING_WEIGHTS),
    (re.compile(r"Loading weights took|Model loading took"), Phase.COMPILING),
    (re.compile(r"torch\.compile|Compiling a graph|Capturing CUDA graph"), Phase.COMPILING),
    (re.compile(r"Starting vLLM (?:API )?server|Application startup complete"), Phase.READY),
)
# Steps of a start that name no phase of their own but show it moves on (vLLM 0.10 to 0.32):
# each counts once, so a start between two phases (engine init, profiling) is seen to live,
# and no repetition of them keeps a start alive.
_MILESTONES = re.compile(
    r"Initializing a V1 LLM engine|Starting to load model|Initializing model took"
    r"|Filesystem type for checkpoints|Available KV cache memory|KV cache size"
    r"|init engine \(profile, create kv cache, warmup model\) took|Graph capturing finished"
    r"|Supported tasks"
)
# Hugging Face hub's progress bars while vLLM downloads: "Fetching 4 files:  25%|..." and
# "model-00001-of-00004.safetensors:  45%|████   | 2.21G/4.92G [00:30<00:36, 74.1MB/s]".
_DOWNLOAD = re.compile(
    r"(Fetching \d+ files|[\w.-]+\.(?:safetensors|bin|pt|pth|gguf|json)):\s+(\d+)%"
)
_DOWNLOAD_SIZES = re.compile(r"\|\s*([\d.]+)([kMGT]?)B?/([\d.]+)([kMGT]?)B?\s*\[")
# "Loading safetensors checkpoint shards:  50% Completed | 2/4 [00:05<00:05, 2.60s/it]"
_SHARDS = re.compile(r"Loading \w+ checkpoint shards:\s+(\d+)% Completed \| (\d+)/(\d+)")
# "Capturing CUDA graphs (mixed prefill-decode, PIECEWISE):  45%|████ | 30/67 [00:02<...]"
_GRAPHS = re.compile(r"Capturing CUDA graphs?[^:]*:\s+(\d+)%")


@dataclass(frozen=True)
class Verdict:
    """What to do with a start now: go on, or kill it and why."""

    keep: bool
    reason: str = ""  # "hung" (no progress for start_timeout) or "too_long" (start_timeout_max)


@dataclass(frozen=True)
class ProgressView:
    """What status, events and clients are shown."""

    phase: Phase
    fraction: float | None  # 0..1 within the phase, when the engine says
    elapsed_s: float
    detail: str

    def describe(self) -> str:
        """`loading weights 40 %` or `downloading 1.2 GB`: the words after the model name."""
        text = self.phase.label
        if self.fraction is not None:
            text += f" {self.fraction * 100:.0f} %"
        if self.detail:
            text += f" ({self.detail})"
        return text

    def to_json(self) -> dict[str, object]:
        return {
            "phase": self.phase.label,
            "fraction": self.fraction,
            "elapsed_s": round(self.elapsed_s, 1),
            "detail": self.detail,
        }


class StartProgress:
    """One start of one engine, from launch until ready or given up."""

    def __init__(self, started_at: float, start_timeout: float, start_timeout_max: float) -> None:
        self.started_at = started_at
        self.start_timeout = start_timeout
        self.start_timeout_max = max(start_timeout_max, start_timeout)
        self.last_progress_at = started_at
        self.phase = Phase.STARTING
        self.fraction: float | None = None
        self.detail = ""
        self._cache_bytes: int | None = None
        self._bars: dict[str, int] = {}
        self._milestones: set[str] = set()

    def observe_line(self, line: str, now: float) -> bool:
        """Read one log line; True when it shows progress."""
        line = line[-2000:]  # a flood of one endless line costs no more than a short one
        shards = _SHARDS.search(line)
        if shards is not None:
            done, total = int(shards.group(2)), int(shards.group(3))
            return self._advance(
                Phase.LOADING_WEIGHTS,
                done / total if total else None,
                f"{done}/{total} shards",
                now,
            )
        download = _DOWNLOAD.search(line)
        if download is not None:
            return self._download_line(download.group(1), int(download.group(2)), line, now)
        graphs = _GRAPHS.search(line)
        if graphs is not None:
            return self._advance(Phase.COMPILING, int(graphs.group(1)) / 100, "CUDA graphs", now)
        for pattern, phase in _PHASE_LINES:
            if pattern.search(line):
                return self._advance(phase, None, "", now)
        milestone = _MILESTONES.search(line)
        if milestone is not None and milestone.group(0) not in self._milestones:
            self._milestones.add(milestone.group(0))
            self.last_progress_at = now
            return True
        return False

    def _download_line(self, item: str, percent: int, line: str, now: float) -> bool:
        # Each file has its own bar that starts again at 0 %: progress is any bar that moved.
        if self.phase > Phase.DOWNLOADING or percent <= self._bars.get(item, -1):
            return False
        self._bars[item] = percent
        sizes = _DOWNLOAD_SIZES.search(line)
        self.phase = Phase.DOWNLOADING
        self.fraction = percent / 100
        self.detail = item + (f" {sizes.group(3)}{sizes.group(4)}B" if sizes else "")
        self.last_progress_at = now
        return True

    def observe_cache_bytes(self, size: int, now: float) -> bool:
        """The weights cache folder's size; growth is download progress."""
        grew = self._cache_bytes is not None and size > self._cache_bytes
        self._cache_bytes = size if self._cache_bytes is None else max(size, self._cache_bytes)
        if not grew:
            return False
        if self.phase <= Phase.DOWNLOADING:
            self.phase = Phase.DOWNLOADING
            if not self.detail or self.fraction is None:
                self.detail = f"{size / 1000**3:.1f} GB"
        self.last_progress_at = now
        return True

    def _advance(self, phase: Phase, fraction: float | None, detail: str, now: float) -> bool:
        if phase < self.phase:
            return False  # vLLM's download bars after loading began: not news
        if phase > self.phase:
            self.phase, self.fraction, self.detail = phase, fraction, detail
            self.last_progress_at = now
            return True
        if fraction is not None and (self.fraction is None or fraction > self.fraction):
            self.fraction, self.detail = fraction, detail
            self.last_progress_at = now
            return True
        return False  # the same phase, no further along: a repeated or lying line

    def verdict(self, now: float) -> Verdict:
        if self.phase is Phase.READY:
            return Verdict(True)
        if now - self.started_at >= self.start_timeout_max:
            return Verdict(False, "too_long")
        if now - self.last_progress_at >= self.start_timeout:
            return Verdict(False, "hung")
        return Verdict(True)

    def deadline(self) -> float:
        """When the start is given up unless it progresses before then."""
        return min(
            self.last_progress_at + self.start_timeout, self.started_at + self.start_timeout_max
        )

    def view(self, now: float) -> ProgressView:
        return ProgressView(self.phase, self.fraction, now - self.started_at, self.detail)

    def failure_message(self, now: float) -> str:
        """Why the start was given up, for the error and the event."""
        verdict = self.verdict(now)
        if verdict.reason == "too_long":
            return (
                f"still {self.phase.label} after {now - self.started_at:.0f}s, the most a start "
                f"may take (start_timeout_max {self.start_timeout_max:.0f}s)"
            )
        return (
            f"no progress for {now - self.last_progress_at:.0f}s while {self.phase.label} "
            f"(start_timeout {self.start_timeout:.0f}s)"
        )
