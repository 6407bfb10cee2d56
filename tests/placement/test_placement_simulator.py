"""The placement simulator: its mechanics on tiny traces, and its README's table stays true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from bench.placement.policies import LruByCount, LruByFootprint, Modelyard, OneAtATime
from bench.placement.simulate import TRACES, Request, Simulation, Trace, main
from bench.placement.world import STOP_S, ModelSpec

GIB = 1024**3
README = Path(__file__).resolve().parents[2] / "bench" / "placement" / "README.md"


def model(name: str, gib: int, start: float = 20.0, sleep: int = 1) -> ModelSpec:
    return ModelSpec(name, gib * GIB, start, 1.0, 5.0, GIB // 2, sleep)


def trace(models: list[ModelSpec], requests: list[tuple[float, str, float]]) -> Trace:
    return Trace(
        name="tiny",
        gpu_bytes=24 * GIB,
        host_ram_for_sleep=64 * GIB,
        models=tuple(models),
        requests=tuple(Request(*r) for r in requests),
    )


def test_a_busy_engine_drains_before_it_is_evicted() -> None:
    # "a" loads (20 s) and serves until 30; "b" does not fit beside it, so it waits for the
    # drain, a stop (2 s) and its own start (20 s).
    tiny = trace([model("a", 16, sleep=0), model("b", 16, sleep=0)], [(0, "a", 10), (1, "b", 1)])
    result = Simulation(tiny, LruByFootprint()).run()
    assert result.waits == [pytest.approx(20.0), pytest.approx(30 + STOP_S + 20 - 1)]
    assert result.cold_starts == 2


def test_requests_for_a_loading_model_join_the_load() -> None:
    tiny = trace([model("a", 4)], [(0, "a", 1), (5, "a", 1), (30, "a", 1)])
    result = Simulation(tiny, LruByFootprint()).run()
    assert result.waits == [pytest.approx(20.0), pytest.approx(15.0), 0.0]
    assert result.cold_starts == 1


def test_models_that_fit_together_stay_together() -> None:
    tiny = trace([model("a", 8), model("b", 8)], [(0, "a", 1), (0, "b", 1), (100, "a", 1)])
    for policy in (LruByFootprint(), Modelyard()):
        result = Simulation(tiny, policy).run()
        assert result.cold_starts == 2
        assert result.waits[2] == 0.0
    assert Simulation(tiny, OneAtATime()).run().cold_starts == 3


def test_modelyard_sleeps_and_wakes_instead_of_restarting() -> None:
    requests = [(0, "a", 1), (30, "b", 1), (60, "a", 1)]
    tiny = trace([model("a", 16), model("b", 16)], requests)
    result = Simulation(tiny, Modelyard()).run()
    assert result.cold_starts == 2
    assert result.wakes_l1 == 1
    assert result.waits[2] < 5  # a wake (1 s) after b's sleep, not a 20 s start


def test_count_based_lru_runs_out_of_memory_and_retries() -> None:
    tiny = trace([model("a", 16), model("b", 16)], [(0, "a", 1), (30, "b", 1)])
    result = Simulation(tiny, LruByCount(2)).run()
    assert result.ooms == 1
    assert result.cold_starts == 3  # a, b (OOM), b again


def test_every_request_is_answered_and_none_refused_early_on_the_shipped_traces() -> None:
    for path in sorted(TRACES.glob("*.json")):
        loaded = Trace.load(path)
        result = Simulation(loaded, Modelyard()).run()
        assert len(result.waits) == len(loaded.requests)
        assert result.refused_early == set()  # issue 11's goal


def test_the_simulator_runs_the_schedulers_own_core() -> None:
    from bench.placement import policies

    from modelyard.scheduler import core

    assert policies.SchedulerCore is core.SchedulerCore  # not a copy (issue 22)
    assert isinstance(Modelyard().core, core.SchedulerCore)


def test_a_request_waits_for_a_long_drain_instead_of_being_refused() -> None:
    # "a" streams for 90 s; "b" does not fit beside it. Before issue 11 the gateway gave up
    # after 3.2 s; now b waits for the drain (within its 300 s start timeout).
    tiny = trace([model("a", 16, sleep=0), model("b", 16, sleep=0)], [(0, "a", 90), (25, "b", 1)])
    old = Simulation(tiny, Modelyard(before_issue_11=True)).run()
    assert old.refused_early == {1}
    assert old.refused_avoidably == set()  # nothing else asked for b, so it never started
    new = Simulation(tiny, Modelyard()).run()
    assert new.refused == set()
    assert new.waits[1] == pytest.approx(20 + 90 + STOP_S + 20 - 25)  # a: start, stream


def test_a_request_whose_load_cannot_begin_within_its_start_timeout_is_refused() -> None:
    tiny = trace([model("a", 16, sleep=0), model("b", 16, sleep=0)], [(0, "a", 900), (25, "b", 1)])
    result = Simulation(tiny, Modelyard()).run()
    assert result.refused == {1}
    assert result.refused_early == set()
    assert result.waits[1] == pytest.approx(300)


def test_readme_table_is_what_the_simulator_prints(capsys: pytest.CaptureFixture[str]) -> None:
    # The goal of issue 4 (--check) and the numbers the README shows, both from one run.
    assert main(["--check"]) == 0
    printed = capsys.readouterr().out
    tables = re.findall(r"^\|.*\|$", printed, re.MULTILINE)
    assert tables
    readme = README.read_text()
    for line in tables:
        assert line in readme, f"README table is stale (run the simulator): {line}"


def test_the_gpu_pages_summary_is_the_readmes_table() -> None:
    # docs/gpus.md shows the total load-wait of four policies per trace; those figures come
    # from the tables above (checked against the simulator's own output).
    readme = README.read_text()
    page = (Path(__file__).resolve().parents[2] / "docs" / "gpus.md").read_text()
    policies = ("one-at-a-time", "LRU by count", "LRU by footprint", "modelyard |")
    rows = re.findall(r"^\| (bursty|steady|gpu-timings), .*$", page, re.MULTILINE)
    assert sorted(rows) == ["bursty", "gpu-timings", "steady"]
    for line in re.findall(r"^\| (?:bursty|steady|gpu-timings), .*$", page, re.MULTILINE):
        trace_name = line[2:].split(",")[0]
        shown = re.findall(r"([\d,]+) s\b", line.split("|", 2)[2])
        section = readme.split(f"### {trace_name} (")[1].split("###")[0]
        for policy, figure in zip(policies, shown, strict=True):
            (row,) = [r for r in section.splitlines() if r.startswith(f"| {policy}")]
            assert row.split("|")[2].strip() == figure, (trace_name, policy, figure, row)
