"""Write the request traces the placement simulator replays (seeded, so the files are stable).

    python -m bench.placement.make_traces

Six models of 2-16 GiB on one 24 GiB GPU, as in issue 4. Start times follow the seed 000's
measurements (28-38 s for 7-8B models, RTX 4080), scaled by size: 12 s + 2 s per GiB. Level-1
wake times follow vLLM's documented 0.3-3 s (0.3 s + 0.12 s per GiB); a level-2 wake reloads
the weights (1 s + 1 s per 1.5 GiB). A sleeping engine keeps 0.5-1 GiB on the GPU. The
diffusion model cannot sleep (vLLM's sleep mode only). Host RAM for level-1 sleepers: 32 GiB,
less than all the weights together, so level 2 matters too.

The traces were generated once and committed; they are not tuned to any policy.
- bursty: three users; each picks a model (skewed popularity), sends a burst of requests a
  few seconds apart (an agent loop, a chat), then goes quiet for a while.
- steady: Poisson arrivals, each request for a model drawn independently by popularity.
- gpu-timings (issue 11): a real GPU's timings, harder than issue 4's. Cold starts of 30-60 s
  (vLLM on a GPU), level-1 wakes of 0.6-3 s, and long streams (median 12 s, up to 5 min) that
  the gateway must drain before evicting. Four users open sessions together (cold requests
  for different models at the same moment), then send bursts. Graded on refusals: none may
  be refused before its start timeout.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

GIB = 1024**3
HERE = Path(__file__).parent
TRACES = HERE / "traces"
# Traces with structure (who asked; habits to learn), replayed by `bench.placement.prewarm`.
STRUCTURED = HERE / "structured"
DURATION_S = 2 * 3600.0

MODELS = [
    # name, size GiB, vLLM sleep level (0: cannot sleep)
    ("general-2g", 2, 1),
    ("agent-4g", 4, 1),
    ("vision-6g", 6, 0),
    ("chat-8g", 8, 1),
    ("coder-12g", 12, 1),
    ("coderslow-16g", 16, 1),
]
POPULARITY = [0.30, 0.22, 0.16, 0.13, 0.11, 0.08]  # shuffled onto models per trace


def model_table() -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "bytes": size * GIB,
            "start_s": round(12.0 + 2.0 * size, 2),
            "wake_s": round(0.3 + 0.12 * size, 2),
            "wake2_s": round(1.0 + size / 1.5, 2),
            "asleep_bytes": (GIB if size >= 8 else GIB // 2),
            "sleep_level": level,
        }
        for name, size, level in MODELS
    ]


def gpu_model_table() -> list[dict[str, Any]]:
    return [
        {
            **row,
            "start_s": round(min(30.0 + 1.9 * size, 60.0), 2),
            "wake_s": round(min(0.3 + 0.17 * size, 3.0), 2),
        }
        for row, (_name, size, _level) in zip(model_table(), MODELS, strict=True)
    ]


def gpu_timings(rng: random.Random) -> list[tuple[float, str, float]]:
    weights = popularity(rng)
    requests: list[tuple[float, str, float]] = []
    for _user in range(4):
        t = 0.0  # everyone starts at once: concurrent cold requests
        while t < DURATION_S:
            model = rng.choices(list(weights), list(weights.values()))[0]
            for _ in range(1 + int(rng.expovariate(1 / 4))):
                stream = min(rng.lognormvariate(2.5, 1.0), 300.0)
                requests.append((round(t, 3), model, round(stream, 3)))
                t += rng.expovariate(1 / 20.0)
            t += rng.expovariate(1 / 120.0)
    return sorted(requests)


def popularity(rng: random.Random) -> dict[str, float]:
    names = [name for name, _, _ in MODELS]
    rng.shuffle(names)
    return dict(zip(names, POPULARITY, strict=True))


def bursty(rng: random.Random) -> list[tuple[float, str, float]]:
    weights = popularity(rng)
    requests: list[tuple[float, str, float]] = []
    for _user in range(3):
        t = rng.uniform(0, 60)
        while t < DURATION_S:
            model = rng.choices(list(weights), list(weights.values()))[0]
            for _ in range(1 + int(rng.expovariate(1 / 7))):
                requests.append((round(t, 3), model, round(rng.lognormvariate(1.0, 0.6), 3)))
                t += rng.expovariate(1 / 6.0)
            t += rng.expovariate(1 / 90.0)
    return sorted(requests)


def steady(rng: random.Random) -> list[tuple[float, str, float]]:
    weights = popularity(rng)
    requests: list[tuple[float, str, float]] = []
    t = 0.0
    while True:
        t += rng.expovariate(1 / 8.0)
        if t >= DURATION_S:
            return requests
        model = rng.choices(list(weights), list(weights.values()))[0]
        requests.append((round(t, 3), model, round(rng.expovariate(1 / 5.0), 3)))


def chains(
    rng: random.Random,
    users: int,
    duration: float,
    start: float = 0.0,
    habits: list[list[str]] | None = None,
) -> list[list[Any]]:
    """Agent chains: each user (an API key) has its own habit, a chain of 2-3 models it walks
    in order (a few requests each, seconds apart), then pauses for minutes and starts again."""
    habits = habits or user_habits(rng, users)
    requests: list[list[Any]] = []
    for user, habit in enumerate(habits):
        t = start + rng.uniform(0, 120)
        while t < start + duration:
            for model in habit:
                for _ in range(1 + int(rng.expovariate(1 / 3))):
                    requests.append(
                        [round(t, 3), model, round(rng.lognormvariate(1.0, 0.6), 3), f"user{user}"]
                    )
                    t += rng.expovariate(1 / 5.0)
                t += rng.uniform(2.0, 20.0)  # the agent thinks, then calls the next model
            t += rng.expovariate(1 / 300.0)
    return requests


# Three agents whose chains together need twice the GPU (48 GiB on 24): the next model of a
# chain is rarely still loaded, which is what pre-warming is for.
AGENTS = [
    ["chat-8g", "coder-12g", "coderslow-16g"],
    ["general-2g", "coderslow-16g"],
    ["vision-6g", "coder-12g", "agent-4g"],
]


def user_habits(rng: random.Random, users: int) -> list[list[str]]:
    names = [name for name, _, _ in MODELS]
    return [rng.sample(names, rng.choice([2, 3])) for _ in range(users)]


def daily(rng: random.Random, users: int = 3) -> list[list[Any]]:
    """Daily cycles: three working days; each user works 9:00-12:00 and 14:00-17:00 with
    their own chain, nobody at night (the trace's times are seconds since Monday 00:00)."""
    requests: list[list[Any]] = []
    monday = 4 * 24 * 3600.0  # Unix day 4 was a Monday: time-of-day patterns line up
    habits = user_habits(rng, users)  # the same people, with the same habits, every day
    for day in range(3):
        for hours in ((9, 12), (14, 17)):
            begin = monday + day * 86400.0 + hours[0] * 3600.0
            length = (hours[1] - hours[0]) * 3600.0
            requests += chains(random.Random(rng.random()), users, length, begin, habits)
    return requests


def write(
    name: str,
    seed: int,
    requests: list[tuple[float, str, float]] | list[list[Any]],
    about: str,
    models: list[dict[str, Any]] | None = None,
    folder: Path = TRACES,
    **extra: Any,
) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.json"
    trace = {
        "name": name,
        "about": about,
        "seed": seed,
        "gpu_bytes": 24 * GIB,
        "host_ram_for_sleep": 32 * GIB,
        "models": models or model_table(),
        **extra,
        "requests": requests,
    }
    text = json.dumps(trace, indent=1)
    # One request per line keeps the file readable and its diffs small.
    text = text.replace("[\n   ", "[").replace(",\n   ", ", ").replace("\n  ]", "]")
    path.write_text(text + "\n")
    return path


def main() -> None:
    print(write("bursty", 1, bursty(random.Random(1)), "3 users, bursts of requests per model"))
    print(write("steady", 2, steady(random.Random(2)), "Poisson arrivals, popularity-weighted"))
    print(
        write(
            "gpu-timings",
            3,
            gpu_timings(random.Random(3)),
            "real-GPU timings: 30-60 s starts, long streams, users starting together",
            gpu_model_table(),
            start_timeout=300.0,
            load_wait_goal=False,
        )
    )
    # Traces with structure, for learned pre-warming: requests carry the user's key.
    for name, seed, requests, about in (
        ("agent-chains", 4, chains(random.Random(4), 3, DURATION_S, habits=AGENTS), "3 agents"),
        ("users-habits", 5, chains(random.Random(5), 6, DURATION_S), "6 users, own habits"),
        ("daily-cycle", 6, daily(random.Random(6)), "3 working days of 3 users' chains"),
        # The same habits on a box that is not shared: one agent (its chain still needs 36
        # GiB), one user's working days. Where the GPU is not full of other users' models in
        # use, a pre-warm finds room.
        ("agent-alone", 4, chains(random.Random(4), 1, DURATION_S, habits=AGENTS[:1]), "1 agent"),
        ("daily-alone", 6, daily(random.Random(6), 1), "3 working days of 1 user's chains"),
    ):
        for sleep in (True, False):
            models = model_table() if sleep else [{**m, "sleep_level": 0} for m in model_table()]
            print(
                write(
                    name if sleep else f"{name}-nosleep",
                    seed,
                    sorted(requests),
                    about + ("" if sleep else ", sleep off"),
                    models,
                    STRUCTURED,
                    load_wait_goal=False,
                )
            )


if __name__ == "__main__":
    main()
