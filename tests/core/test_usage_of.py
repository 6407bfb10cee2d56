"""Token counts read from an engine's JSON answer (api/accounting.usage_of), which every
non-streamed answer goes through on the event loop."""

from __future__ import annotations

import json

from modelyard.api.accounting import usage_of


def test_a_large_embeddings_answer_gives_its_usage():
    # Megabytes of floats with `usage` last, as vLLM writes it: found from the end, so the
    # event loop does not scan the whole answer (it took 1.1 ms a 4 MB answer before).
    body = json.dumps(
        {
            "object": "list",
            "data": [{"embedding": [0.123456789] * 300_000, "index": 0}],
            "usage": {"prompt_tokens": 5, "total_tokens": 5},
        }
    ).encode()
    assert usage_of(body) == {"prompt_tokens": 5, "total_tokens": 5}


def test_text_that_mentions_usage_is_not_taken_for_it():
    # A model's reply (or a field after the object) may say "usage"; only the object counts.
    reply = {
        "usage": {"prompt_tokens": 3, "completion_tokens": 7},
        "choices": [{"message": {"content": 'my "usage": {"prompt_tokens": 999} trick'}}],
        "meta": {"usage": "n/a"},
    }
    assert usage_of(json.dumps(reply).encode()) == {"prompt_tokens": 3, "completion_tokens": 7}


def test_answers_without_a_flat_usage_object_count_nothing():
    for body in (b"", None, b'{"usage": [1, 2]}', b'{"usage": {"a": {"b": 1}}}', b"not json"):
        assert usage_of(body) == {}
    assert usage_of(b'{"usage": {"prompt_tokens": "3", "total_tokens": 4}}') == {"total_tokens": 4}
