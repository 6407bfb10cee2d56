"""Issue 23's rules as pure functions: one reading of a request's options, usage from every
shape vLLM answers with, reservations settled at the finish, what a stream is charged when
cut, URL credentials and engine addresses, the remote path allow-list."""

from __future__ import annotations

import json
import random

import pytest

from modelyard.api.accounting import ServedTokens, ask_stream_for_usage
from modelyard.api.request_options import engine_reads_true, read_options
from modelyard.auth.budgets import Refusal, Reservation, TokenLedger
from modelyard.auth.engine_paths import remote_path_allowed
from modelyard.auth.keys import ApiKey
from modelyard.config.schema import url_credentials
from modelyard.proxy.sse import StreamTransformer
from modelyard.proxy.usage_reader import usage_of
from modelyard.redaction import without_addresses
from tests.vllm_shapes import chunk_usage, responses_answer, responses_events


def key(**limits: object) -> ApiKey:
    return ApiKey("k", b"\0" * 32, ("*",), None, False, **limits)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [True, 1, 1.0, "1", "true", "True", "yes", "on", " ON ", "t"])
def test_values_vllm_reads_as_true_stream_for_the_gateway_too(value: object):
    assert engine_reads_true(value)
    payload = {"model": "m", "stream": value}
    asked = ask_stream_for_usage("/v1/chat/completions", payload)
    assert asked.final
    assert payload["stream_options"] == {"include_usage": True}
    assert read_options("/v1/chat/completions", payload, 100).stream


@pytest.mark.parametrize("value", [False, 0, 2, "0", "no", "off", "", "maybe", None, [], {}])
def test_values_vllm_reads_as_false_or_refuses_do_not(value: object):
    assert not engine_reads_true(value)
    assert not ask_stream_for_usage("/v1/chat/completions", {"model": "m", "stream": value})


def test_running_usage_is_asked_only_where_supported_and_not_twice():
    payload = {"stream": "yes", "stream_options": {"include_usage": True}}
    asked = ask_stream_for_usage("/v1/chat/completions", payload, continuous=True)
    assert (asked.final, asked.running) == (False, True)
    assert payload["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    again = ask_stream_for_usage("/v1/chat/completions", payload, continuous=True)
    assert not again


def test_a_reservation_is_the_prompt_estimate_and_the_longest_answer():
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 400}]})
    options = read_options("/v1/chat/completions", json.loads(body), len(body))
    assert options.max_tokens is None
    assert options.reservation(100) == len(body) // 4 + 100  # the model's default
    limited = read_options("/v1/chat/completions", {"max_tokens": 7, "n": 3}, 40)
    assert limited.reservation(100) == 10 + 7 * 3
    responses = read_options("/v1/responses", {"max_output_tokens": 9}, 40)
    assert responses.reservation() == 10 + 9
    assert read_options("/v1/embeddings", {"max_tokens": 9}, 40).reservation() == 10


def test_usage_is_read_from_every_shape_vllm_answers_with():
    answer = json.dumps(responses_answer("m", "one two three")).encode()
    usage = usage_of(answer)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (5, 3)
    chat = {
        "choices": [],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2, "prompt_tokens_details": {"x": 1}},
    }
    assert usage_of(json.dumps(chat).encode())["completion_tokens"] == 2  # nested details
    embeddings = {"data": [], "usage": {"prompt_tokens": 3, "total_tokens": 3}}
    assert usage_of(json.dumps(embeddings).encode()) == {"prompt_tokens": 3, "total_tokens": 3}


def test_a_responses_stream_is_charged_from_its_completed_event():
    served = ServedTokens(prompt_estimate=50)
    finals: list[dict[str, int]] = []
    transformer = StreamTransformer(
        [], capture_usage=True, on_final_usage=finals.append, meter=served
    )
    out = b"".join(transformer.feed(e) for e in responses_events("m", ["a", "b", "c", "d"]))
    assert b'"response.completed"' in out  # nothing of the client's stream is dropped
    assert finals
    assert finals[0]["prompt_tokens"] == 5
    assert finals[0]["completion_tokens"] == 4
    assert served.served()["completion_tokens"] == 4


def _chat_stream(chunks: int, running: bool) -> list[bytes]:
    events = []
    for index in range(chunks):
        chunk: dict[str, object] = {"choices": [{"index": 0, "delta": {"content": "w "}}]}
        if running:
            chunk["usage"] = chunk_usage(index + 1)
        events.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
    final = {"choices": [], "usage": chunk_usage(chunks)}
    events.append(b"data: " + json.dumps(final, separators=(",", ":")).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


@pytest.mark.parametrize("running", [False, True])
def test_a_stream_cut_anywhere_is_charged_at_least_what_it_relayed(running: bool):
    rng = random.Random(23)
    for _ in range(50):
        events = _chat_stream(40, running)
        cut = rng.randrange(1, len(events) - 2)  # before the usage chunk
        served = ServedTokens(prompt_estimate=12)
        transformer = StreamTransformer(
            [],
            capture_usage=True,
            drop_usage_only_chunk=True,
            meter=served,
            strip_progress_usage=running,
        )
        relayed = b""
        for event in events[:cut]:
            # Pieces of any size, as a socket gives them.
            at = rng.randrange(len(event))
            relayed += transformer.feed(event[:at]) + transformer.feed(event[at:])
        assert b'"usage"' not in relayed  # the running totals were ours: taken out
        assert relayed.count(b"data: ") == cut
        charged = served.served()
        assert charged["completion_tokens"] == cut  # one token a chunk, exact either way
        assert charged["prompt_tokens"] == (5 if running else 12)


def test_fifty_concurrent_reservations_overshoot_a_small_budget_by_one_at_most():
    ledger = TokenLedger(None)
    small = key(token_budget=8)
    held: list[Reservation] = []
    refused = 0
    for _ in range(50):
        answer = ledger.reserve(small, 30)
        if isinstance(answer, Refusal):
            refused += 1
            assert answer.retry_after is not None
        else:
            held.append(answer)
    assert len(held) == 1
    assert refused == 49
    for reservation in held:
        ledger.settle(reservation, "m", 10, 20)
    assert ledger.spent("k", "total")[0] - 8 <= 30
    assert isinstance(ledger.reserve(small, 30), Refusal)  # spent: refused until raised
    assert ledger.reserved("k") == 0


def test_reservations_bound_tokens_per_minute_and_are_given_back_once():
    ledger = TokenLedger(None)
    limited = key(tpm=100)
    first = ledger.reserve(limited, 60)
    assert isinstance(first, Reservation)
    assert isinstance(ledger.reserve(limited, 60), Refusal)  # 120 would pass 100
    second = ledger.reserve(limited, 40)
    assert isinstance(second, Reservation)
    ledger.settle(first, "m", 5, 5)
    ledger.settle(first, "m", 5, 5)  # a second settle counts nothing
    assert ledger.reserved("k") == 40
    ledger.settle(second, "m", 5, 5)
    assert ledger.reserved("k") == 0
    assert ledger.usage("k")["m"] == {"requests": 2, "prompt_tokens": 10, "completion_tokens": 10}


def test_url_credentials_are_secrets_and_addresses_are_hidden():
    found = url_credentials("http://svc:p%40ss-word-1@10.0.0.5:8001/v1")
    assert {"p%40ss-word-1", "p@ss-word-1"} <= found
    assert url_credentials("http://10.0.0.5:8001") == set()
    text = "remote at http://svc:x@10.0.0.5:8001/v1 down (Cannot connect to host gpu-1:8001)"
    hidden = without_addresses(text)
    assert "10.0.0.5" not in hidden
    assert "gpu-1" not in hidden
    assert "/v1" not in hidden
    assert without_addresses("model 'chat' at 12:30, retry in 5s") == (
        "model 'chat' at 12:30, retry in 5s"
    )


def test_remotes_are_reached_on_openai_routes_and_what_the_config_opens():
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/models/x", "/v1/embeddings"):
        assert remote_path_allowed(path)
    for path in ("/admin/keys", "/v1/../admin/keys", "/metrics", "/v1/chat", "/sleep"):
        assert not remote_path_allowed(path)
    assert remote_path_allowed("/v1/rerank", ["/v1/rerank"])
    assert remote_path_allowed("/metrics?x=1", ["/metrics"])
