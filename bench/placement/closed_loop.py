"""Pre-warming with clients that wait for their answers: the traces with structure replayed
closed-loop, side by side with today's modelyard.

The shipped traces are open-loop: each request comes at its time, whatever the one before it
waited. A user or an agent that waits for its answer sends nothing meanwhile, so open-loop a
cold start's wait is also charged to requests that would not have been sent yet. Here each key
sends its next request once the previous one is answered, after the same think time as in the
trace (the gap from the previous request's end to the next request). The decisions are the
real scheduler core's, through the tests' virtual gateway, as in `bench.placement.prewarm`.

Run: python -m bench.placement.closed_loop [TRACE.json ...]   (default: bench/placement/structured)
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from tests.core.virtual_gateway import VirtualGateway

from bench.placement.prewarm import Run, trace_paths, world_for
from bench.placement.simulate import Request, Trace
from modelyard.scheduler.predictor import Predictor

# The driver's timer asks about pre-warms until the last request; closed-loop, the last one's
# time is known only once the one before it is answered, so the timer runs this much past the
# trace's own end (answers come later closed-loop only by what they waited).
TIMER_BEYOND_END_S = 2 * 3600.0


def replay_closed(trace: Trace, predictor: Predictor | None) -> VirtualGateway:
    """The virtual gateway once every key's requests were sent, each after the answer to the
    one before it and the trace's think time."""
    world = world_for(trace, predictor)
    by_key: dict[str, list[Request]] = defaultdict(list)
    for request in trace.requests:
        by_key[request.key].append(request)
    sent: dict[int, tuple[str, int]] = {}  # the world's request index -> (key, its turn)

    def send(key: str, turn: int, at: float) -> None:
        request = by_key[key][turn]
        sent[world.request(at, request.model, duration=request.service_s, key=key)] = (key, turn)

    def answered(index: int, at: float) -> None:
        key, turn = sent[index]
        sequence = by_key[key]
        if turn + 1 < len(sequence):
            before, after = sequence[turn], sequence[turn + 1]
            think = max(0.0, after.at - (before.at + before.service_s))
            send(key, turn + 1, at + think)

    world.on_answered = answered
    for key, sequence in by_key.items():
        send(key, 0, sequence[0].at)
    world.request_timer_until(max(r.at for r in trace.requests) + TIMER_BEYOND_END_S)
    world.run(until=math.inf)
    return world


@dataclass(frozen=True)
class ClosedRow:
    trace: str
    requests: int
    today: float
    learned: float
    made: int
    used: int
    wasted: int
    kept: int
    kept_used: int

    def markdown(self) -> str:
        ratio = self.learned / self.today if self.today else 1.0
        return (
            f"| {self.trace} | {self.requests:,} | {self.today:,.0f} | **{self.learned:,.0f}** "
            f"| {ratio:.2f}x | {self.made} | {self.used} | {self.wasted} "
            f"| {self.kept} ({self.kept_used}) |"
        )


HEADER = (
    "| trace | requests | modelyard today (s) | with pre-warming (s) | vs today | pre-warms "
    "| used | wasted | kept idle (then asked for) |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def compare_closed(trace: Trace) -> ClosedRow:
    today, learned = (
        Run.of(world) for world in (replay_closed(trace, None), replay_closed(trace, Predictor()))
    )
    return ClosedRow(
        trace.name, len(learned.outcomes), today.total_wait, learned.total_wait, *learned.tally()
    )


def main(argv: list[str] | None = None) -> int:
    print(HEADER)
    for path in trace_paths(argv, __doc__, random_too=False):
        print(compare_closed(Trace.load(path)).markdown(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
