"""Stream edits: model names rewritten across chunk boundaries, usage captured and hidden."""

from __future__ import annotations

import json

from modelyard.proxy.sse import StreamTransformer, model_name_replacements


def events(model: str, usage: bool) -> bytes:
    chunks = [{"model": model, "choices": [{"delta": {"content": str(i)}}]} for i in range(3)]
    if usage:
        chunks.append(
            {"model": model, "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}
        )
    text = "".join(f"data: {json.dumps(c, separators=(',', ':'))}\n\n" for c in chunks)
    return (text + "data: [DONE]\n\n").encode()


def feed_in_pieces(transformer: StreamTransformer, data: bytes, size: int) -> bytes:
    out = b"".join(transformer.feed(data[i : i + size]) for i in range(0, len(data), size))
    return out + transformer.flush()


def test_rewrites_model_name_split_across_chunks():
    original = events("served-name", usage=False)
    for size in (1, 7, 64, len(original)):
        transformer = StreamTransformer(model_name_replacements("served-name", "alias"))
        assert feed_in_pieces(transformer, original, size) == events("alias", usage=False)


def test_usage_captured_and_usage_only_chunk_dropped():
    transformer = StreamTransformer([], capture_usage=True, drop_usage_only_chunk=True)
    out = feed_in_pieces(transformer, events("m", usage=True), 5)
    assert transformer.usage == {"prompt_tokens": 4, "completion_tokens": 3}
    assert b'"usage"' not in out
    assert out.count(b"data: ") == 4  # three content chunks and [DONE]


def test_usage_kept_when_client_asked_for_it():
    transformer = StreamTransformer([], capture_usage=True, drop_usage_only_chunk=False)
    out = feed_in_pieces(transformer, events("m", usage=True), 9)
    assert out == events("m", usage=True)
    assert transformer.usage["completion_tokens"] == 3
