"""Which engine serves a request (scheduler/balance.py) and the affinity key it is chosen by
(api/affinity.py): pure functions, hostile values included."""

from __future__ import annotations

import json

from modelyard.api.affinity import PREFIX_CHARS, affinity_key
from modelyard.scheduler.balance import Affinity, ReplicaLoad, choose_replica


def test_least_outstanding_then_the_lower_key() -> None:
    loads = [ReplicaLoad("coder", 3), ReplicaLoad("coder#2", 1), ReplicaLoad("coder#3", 1)]
    assert choose_replica(loads, 4) == "coder#2"


def test_affinity_holds_below_the_target_and_yields_above_it() -> None:
    loads = [ReplicaLoad("coder", 3), ReplicaLoad("coder#2", 0)]
    assert choose_replica(loads, 4, last="coder") == "coder"  # 3 < 4: its cache is warm
    busy = [ReplicaLoad("coder", 4), ReplicaLoad("coder#2", 0)]
    assert choose_replica(busy, 4, last="coder") == "coder#2"  # at the target: elsewhere
    assert choose_replica(loads, 4, last="coder#9") == "coder#2"  # gone: least outstanding


def test_an_adapter_goes_where_it_is_loaded_while_that_engine_has_room() -> None:
    loads = [ReplicaLoad("base", 2, has_adapter=True), ReplicaLoad("base#2", 0)]
    assert choose_replica(loads, 4) == "base"
    assert choose_replica(loads, 4, last="base#2") == "base"  # the adapter comes first
    full = [ReplicaLoad("base", 4, has_adapter=True), ReplicaLoad("base#2", 0)]
    assert choose_replica(full, 4) == "base#2"


def test_the_affinity_record_is_bounded() -> None:
    record = Affinity(entries=3)
    for number in range(10):
        record.remember(f"session-{number}", "coder")
    assert len(record) == 3
    assert record.get("session-0") is None
    assert record.get("session-9") == "coder"


def chat(messages: list[object], **extra: object) -> bytes:
    return json.dumps({"model": "coder", "messages": messages, **extra}).encode()


def test_a_conversation_keeps_its_key_as_it_grows() -> None:
    opening = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    first = affinity_key({}, chat(opening))
    later = affinity_key({}, chat([*opening, {"role": "assistant", "content": "hello"},
                                   {"role": "user", "content": "more"}]))  # fmt: skip
    other = affinity_key({}, chat([opening[0], {"role": "user", "content": "bye"}]))
    assert first is not None
    assert first == later
    assert first != other


def test_session_header_then_user_then_prompt() -> None:
    body = chat([{"role": "user", "content": "hi"}], user="alice")
    assert affinity_key({"X-Session-Id": "s1"}, body) == affinity_key({"X-Session-Id": "s1"}, None)
    assert affinity_key({}, body) != affinity_key({}, chat([{"role": "user", "content": "hi"}]))
    prompt = json.dumps({"model": "m", "prompt": "p" * PREFIX_CHARS + "tail"}).encode()
    same_prefix = json.dumps({"model": "m", "prompt": "p" * PREFIX_CHARS + "other"}).encode()
    assert affinity_key({}, prompt) == affinity_key({}, same_prefix)


def test_hostile_values_give_a_short_key_or_none() -> None:
    huge = "x" * 1_000_000
    for value in [huge, "séance 😀", "\udcff\udcfe lone surrogates", "\x00\x01"]:
        key = affinity_key({"X-Session-Id": value}, None)
        assert key is not None
        assert len(key) < 40
        assert value[:8] not in key  # a digest, never the value itself
    for body in [b"", b"not json", b"[1, 2]", b'{"messages": "text"}', b'{"messages": [1, 2]}',
                 b'{"user": 7}', b"\xff\xfe", b'{"prompt": ["a", "b"]}']:  # fmt: skip
        assert affinity_key({}, body) in (None, affinity_key({}, body))  # never raises
    assert affinity_key({}, b"[1, 2]") is None
    assert affinity_key({}, b'{"messages": [1, 2]}') is None
