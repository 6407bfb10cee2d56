"""The pre-warming predictor's counting, on synthetic histories with a virtual clock."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from modelyard.scheduler.predictor import DAY_S, WEEK_S, Predictor, hour_of_week
from modelyard.scheduler.prewarm_habits import HabitsFile

MONDAY = 4 * 24 * 3600.0  # Unix day 4 was a Monday


def rounds(
    predictor: Predictor, n: int, first: str, then: str, gap: float, key: str = "k"
) -> float:
    """`n` rounds of `first` then `then` `gap` s later, 1000 s apart; returns the clock."""
    t = 0.0
    for _ in range(n):
        predictor.observe(t, key, first)
        predictor.observe(t + gap, key, then)
        t += 1000.0
    return t


def burst_rounds(
    predictor: Predictor, burst: int, first: str, then: str, after: float, key: str = "k"
) -> float:
    """20 rounds, 1000 s apart, of `burst` requests for `first` 5 s apart, then `then` `after`
    s after the round began; returns the clock."""
    t = 0.0
    for _ in range(20):
        for step in range(burst):
            predictor.observe(t + 5.0 * step, key, first)
        predictor.observe(t + after, key, then)
        t += 1000.0
    return t


def test_a_then_b_is_learned_with_its_reason() -> None:
    predictor = Predictor(window_s=60.0)
    t = rounds(predictor, 20, "coder", "reasoner", 10.0)
    predictor.observe(t, "k", "coder")
    [chance] = predictor.chances(t + 1.0, {"reasoner": 40.0})
    # 20 of 20 coders went on to the reasoner, plus one unseen (Laplace): 20 / 21.
    assert chance.probability == pytest.approx(20 / 21, rel=0.01)  # (a week's half-life)
    assert chance.reason == "after coder, 0.95 within 40 s"


def test_the_chance_is_for_the_start_time_so_a_late_successor_is_prewarmed_late() -> None:
    # The reasoner comes 100 s after the coder: a 30 s start made at once would sit idle for
    # 70 s (and be the first thing evicted); made when the reasoner is due, it is used.
    predictor = Predictor(window_s=300.0, half_life_s=math.inf)
    t = rounds(predictor, 20, "coder", "reasoner", 100.0)
    predictor.observe(t, "k", "coder")
    assert predictor.chances(t + 1.0, {"reasoner": 30.0}) == []
    [early] = predictor.chances(t + 75.0, {"reasoner": 30.0})  # half of the 100-110 s bucket
    [due] = predictor.chances(t + 90.0, {"reasoner": 30.0})
    assert early.probability < 0.5 < 0.9 < due.probability


def test_thin_evidence_is_never_a_certainty() -> None:
    predictor = Predictor(window_s=60.0, min_seen=3.0, half_life_s=math.inf)
    t = rounds(predictor, 3, "a", "b", 5.0)
    predictor.observe(t, "k", "a")
    [chance] = predictor.chances(t, {"b": 30.0})
    assert chance.probability == pytest.approx(3 / 4)


def test_a_burst_still_going_on_makes_the_successor_less_likely_yet() -> None:
    # Each round: three requests for a, 5 s apart, then b 5 s after the last. Right after an
    # a, the next request is another a two times in three: b within 8 s (3 s of the 5-10 s
    # bucket) is 3/5 of 20 in 60 requests for a (and one unseen).
    predictor = Predictor(window_s=60.0, half_life_s=math.inf)
    t = burst_rounds(predictor, 3, "a", "b", 15.0)
    predictor.observe(t, "k", "a")
    [chance] = predictor.chances(t, {"b": 8.0})
    assert chance.probability == pytest.approx(0.6 * 20 / 61)


def test_an_agent_s_next_model_is_foreseen_from_the_first_request_of_its_turn() -> None:
    # An agent's round: four requests for the coder, 5 s apart, then the reasoner 30 s after
    # the first. After any single coder request the next is the coder again three times in
    # four, so counted per request the reasoner is unlikely (20 in 80 requests) until the
    # burst has gone quiet, too late for its 40 s start. Counted per turn, 20 of 20 coder
    # turns went on to the reasoner 30 s after they began: a start made at the turn's first
    # request is ready about when the reasoner is asked for.
    predictor = Predictor(window_s=300.0, half_life_s=math.inf)
    t = burst_rounds(predictor, 4, "coder", "reasoner", 30.0, key="agent")
    predictor.observe(t, "agent", "coder")
    per_request = predictor.arrival(t, "coder", "reasoner", "agent", 0.0, 40.0)
    assert per_request == pytest.approx(20 / 81)
    [chance] = predictor.chances(t, {"reasoner": 40.0})
    assert chance.probability == pytest.approx(20 / 21)
    assert chance.reason == "after coder, 0.95 within 40 s"
    # Later in the turn (its second request, 5 s on), the turn still began at t.
    predictor.observe(t + 5.0, "agent", "coder")
    [later] = predictor.chances(t + 6.0, {"reasoner": 40.0})
    assert later.probability == pytest.approx(20 / 21)
    # Once the reasoner's usual time has passed with no reasoner, the turn no longer says so.
    assert predictor.turn_arrival(t + 40.0, "coder", "reasoner", "agent", 40.0, 40.0) == 0.0


def test_a_successor_outside_the_window_is_not_a_transition() -> None:
    predictor = Predictor(window_s=60.0)
    t = rounds(predictor, 20, "coder", "reasoner", 120.0)
    predictor.observe(t, "k", "coder")
    assert predictor.transition(t, "coder", "reasoner", "k") == 0.0


def test_the_probability_is_the_share_of_rounds() -> None:
    predictor = Predictor(window_s=60.0, half_life_s=math.inf)
    t = 0.0
    for index in range(10):
        predictor.observe(t, "k", "a")
        if index % 4 != 0:  # 7 of 10 rounds go on to b
            predictor.observe(t + 5.0, "k", "b")
        t += 1000.0
    assert predictor.transition(t, "a", "b", "k") == pytest.approx(0.7)


def test_a_wall_clock_set_back_mid_turn_gives_no_chance_out_of_bounds() -> None:
    # The gateway learns on the wall clock (habits span days), which NTP may set back: a
    # turn then "began" in the future, and its gap is negative. It counts as an immediate
    # switch, and every chance stays a probability.
    predictor = Predictor(window_s=300.0, half_life_s=math.inf)
    t = burst_rounds(predictor, 2, "coder", "reasoner", 20.0, key="agent")
    predictor.observe(t, "agent", "coder")
    predictor.observe(t - 3600.0, "agent", "reasoner")  # an hour back
    predictor.observe(t - 3590.0, "agent", "coder")
    for now in (t - 7200.0, t - 3590.0, t, t + 10.0):
        for chance in predictor.chances(now, {"reasoner": 40.0, "coder": 40.0}):
            assert 0.0 <= chance.probability <= 1.0
    [chance] = predictor.chances(t - 3590.0, {"reasoner": 40.0})
    assert chance.probability == pytest.approx(21 / 22)  # the set-back switch counts too


def test_too_few_observations_predict_nothing() -> None:
    predictor = Predictor(window_s=60.0, min_seen=3.0)
    t = rounds(predictor, 2, "a", "b", 5.0)
    predictor.observe(t, "k", "a")
    assert predictor.chances(t, {"b": 30.0}) == []


def test_a_burst_counts_once() -> None:
    predictor = Predictor(window_s=60.0, half_life_s=math.inf)
    t = 0.0
    for _ in range(5):
        for second in range(4):  # a burst of a: one observation of a
            predictor.observe(t + second, "k", "a")
        predictor.observe(t + 10.0, "k", "b")
        predictor.observe(t + 11.0, "k", "b")
        t += 1000.0
    assert predictor.transition(t, "a", "b", "k") == pytest.approx(1.0)


def test_old_habits_decay() -> None:
    predictor = Predictor(window_s=60.0, half_life_s=3000.0)
    t = rounds(predictor, 10, "a", "b", 5.0)
    t2 = t + 60_000.0  # 20 half-lives later, a new habit: a then c
    for index in range(10):
        predictor.observe(t2 + index * 1000.0, "k", "a")
        predictor.observe(t2 + index * 1000.0 + 5.0, "k", "c")
    now = t2 + 10_000.0
    assert predictor.transition(now, "a", "c", "k") > 0.99
    assert predictor.transition(now, "a", "b", "k") < 0.01


def test_habits_are_per_key_and_a_new_key_borrows_everyones() -> None:
    predictor = Predictor(window_s=60.0, half_life_s=math.inf)
    rounds(predictor, 10, "a", "b", 5.0, key="alice")
    t = rounds(predictor, 10, "a", "c", 5.0, key="bob")
    assert predictor.transition(t, "a", "b", "alice") == pytest.approx(1.0)
    assert predictor.transition(t, "a", "c", "alice") == 0.0
    assert predictor.transition(t, "a", "b", "carol") == pytest.approx(0.5)


def test_the_chance_fades_once_its_usual_time_has_passed() -> None:
    predictor = Predictor(window_s=60.0)
    t = rounds(predictor, 10, "a", "b", 5.0)
    predictor.observe(t, "k", "a")
    assert predictor.chances(t + 1.0, {"b": 30.0})
    assert predictor.chances(t + 30.0, {"b": 30.0}) == []  # b always came within 10 s
    assert predictor.chances(t + 61.0, {"b": 30.0}) == []


def test_the_hour_of_the_week_pattern() -> None:
    predictor = Predictor()
    nine = MONDAY + 9 * 3600.0
    assert hour_of_week(nine) == 9
    for week in range(4):  # every Monday at 9:00-9:59, six first requests of the chat model
        for minute in range(0, 60, 10):
            predictor.observe(nine + week * WEEK_S + minute * 60.0, f"u{minute}", "chat")
    monday_nine = nine + 4 * WEEK_S + 60.0
    rate, what = predictor.hourly_rate(monday_nine, "chat")
    assert what == "week"
    assert rate == pytest.approx(6 / 3600.0, rel=0.1)
    [chance] = predictor.chances(monday_nine + 3600.0 * 0.5, {"chat": 60.0})
    assert chance.probability == pytest.approx(1 - math.exp(-rate * 60.0), rel=0.05)
    assert chance.reason.startswith("this hour of the week")
    assert predictor.chances(monday_nine + 5 * 3600.0, {"chat": 60.0}) == []


def test_the_hour_of_the_day_in_the_first_week() -> None:
    predictor = Predictor()
    nine = MONDAY + 9 * 3600.0
    for day in range(3):  # Monday to Wednesday at 9:00-9:59, three first requests
        for minute in (0, 20, 40):
            predictor.observe(nine + day * DAY_S + minute * 60.0, f"u{minute}", "chat")
    thursday_nine = nine + 3 * DAY_S + 60.0
    rate, what = predictor.hourly_rate(thursday_nine, "chat")
    assert what == "day"
    assert rate == pytest.approx(3 / 3600.0, rel=0.05)
    [chance] = predictor.chances(thursday_nine, {"chat": 60.0})
    assert chance.reason.startswith("this hour of the day")
    assert predictor.hourly_rate(nine - 3600.0 + 4 * DAY_S, "chat") == (0.0, "")


def test_in_use_is_what_was_asked_for_a_moment_ago() -> None:
    predictor = Predictor(recent_s=60.0)
    predictor.observe(0.0, "k", "a")
    predictor.observe(50.0, "j", "b")
    assert predictor.in_use(70.0) == {"b"}


def test_what_was_learned_survives_a_restart(tmp_path: Path) -> None:
    predictor = Predictor(window_s=60.0)
    t = rounds(predictor, 10, "a", "b", 5.0)
    habits = HabitsFile(tmp_path / "habits.json")
    asyncio.run(habits.save(predictor))
    again = Predictor(window_s=60.0)
    habits.read_into(again)
    assert again.to_dict() == predictor.to_dict()
    assert again.transition(t, "a", "b", "k") == pytest.approx(1.0)


def test_a_damaged_habits_file_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / "habits.json").write_text("{not json")
    predictor = Predictor()
    HabitsFile(tmp_path / "habits.json").read_into(predictor)
    assert predictor.to_dict()["seen"] == []
    assert (tmp_path / "habits.damaged").exists()


def test_habits_written_before_turns_were_counted_are_set_aside(tmp_path: Path) -> None:
    # A version-2 file has no per-turn counts and its keys' turns have no beginning: read as
    # they are, every turn would seem to begin at its latest request. Learning starts afresh.
    predictor = Predictor(window_s=60.0)
    rounds(predictor, 10, "a", "b", 5.0)
    old = predictor.to_dict()
    old["version"] = 2
    del old["turn_gaps"]
    old["last"] = [row[:3] for row in old["last"]]
    (tmp_path / "habits.json").write_text(json.dumps(old))
    fresh = Predictor(window_s=60.0)
    HabitsFile(tmp_path / "habits.json").read_into(fresh)
    assert fresh.to_dict()["seen"] == []
    assert (tmp_path / "habits.damaged").exists()
