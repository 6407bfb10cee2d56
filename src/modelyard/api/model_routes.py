"""The routes an engine serves that the gateway routes by the request's model, and how.

vLLM's OpenAI server (and the Anthropic-shaped `/v1/messages` it serves too) names the model
in a JSON body for most routes, and in a form field of a multipart body for the audio
uploads. Any other path under `/v1` is refused with a 404 here: a route the gateway does not
know it cannot check (scopes, budgets, body limits), so it is not passed through blind.
Engine control endpoints (`/v1/load_lora_adapter`) keep their admin-only path.
"""

from __future__ import annotations

import asyncio

from aiohttp import BodyPartReader, MultipartReader, MultipartWriter
from aiohttp.base_protocol import BaseProtocol
from aiohttp.streams import StreamReader
from multidict import CIMultiDict

from modelyard.api.errors import ApiError
from modelyard.auth.engine_paths import is_engine_control

# JSON bodies with a `model` field.
JSON_ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/rerank",
        "/v1/score",
        "/v1/audio/speech",
        "/v1/images/generations",
        "/v1/moderations",  # not vLLM's; an OpenAI-compatible remote engine may serve it
        "/v1/classify",
        "/v1/pooling",
        # vLLM's routes outside /v1.
        "/tokenize",
        "/detokenize",
        "/rerank",
        "/v2/rerank",
        "/score",
        "/pooling",
        "/classify",
    }
)
# Multipart form bodies whose `model` form field picks the engine (OpenAI's audio uploads).
MULTIPART_ROUTES = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})
# The part of a multipart body the gateway reads to find the model; the file parts are not
# read into memory by the check (they are forwarded as they came).
MAX_FORM_FIELD_BYTES = 4096


def check_route(path: str) -> None:
    """A 404 for a path no engine route serves (engine control paths pass: admin-checked)."""
    if path in JSON_ROUTES or path in MULTIPART_ROUTES or is_engine_control(path):
        return
    raise ApiError(404, "no such route", "not_found")


def route_label(path: str) -> str:
    """The metrics label of a served route: its first segment under `/v1` (`/v1/chat`,
    `/v1/audio`, `/v1/messages`: the labels dashboards already use), else the path."""
    return "/v1/" + path[4:].split("/")[0] if path.startswith("/v1/") else path


async def multipart_model(body: bytes, content_type: str) -> str:
    """The `model` form field of a multipart body, read with aiohttp's own multipart reader
    (never by hand). Exactly one `model` field, a short text, is accepted; a missing or
    repeated one, a bad boundary or a body cut short is a 400. (The body limit was enforced
    while the body was read.)"""
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(
            415,
            "send this route's body as multipart/form-data (the file and a 'model' field)",
            "unsupported_media_type",
        )
    found: list[str] = []
    try:
        reader = MultipartReader(CIMultiDict({"Content-Type": content_type}), _stream_of(body))
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise ApiError(400, "nested multipart bodies are not accepted", "invalid_body")
            if part.name == "model":
                found.append(await _small_text(part))
            else:
                await part.release()
    except ApiError:
        raise
    except (ValueError, AssertionError, RuntimeError, EOFError, UnicodeDecodeError) as error:
        raise ApiError(
            400, f"the multipart body could not be read: {type(error).__name__}", "invalid_body"
        ) from None
    if not found:
        raise ApiError(400, "you must provide a model parameter", "missing_model", "model")
    if len(found) > 1:
        raise ApiError(400, "the form has more than one 'model' field", "duplicate_model", "model")
    if not found[0]:
        raise ApiError(400, "'model' must be a non-empty string", "invalid_model", "model")
    return found[0]


async def _small_text(part: BodyPartReader) -> str:
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(1024):
        size += len(chunk)
        if size > MAX_FORM_FIELD_BYTES:
            raise ApiError(400, "the 'model' form field is too long", "invalid_model", "model")
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8").strip()


def _stream_of(body: bytes) -> StreamReader:
    """The body as the stream aiohttp's multipart reader reads from."""
    loop = asyncio.get_running_loop()
    # A limit above the body's size: the whole body is fed at once, and a smaller one would
    # ask the (absent) transport to pause reading.
    stream = StreamReader(BaseProtocol(loop), limit=len(body) + 1, loop=loop)
    stream.feed_data(body)
    stream.feed_eof()
    return stream


async def with_model_field(body: bytes, content_type: str, model: str) -> tuple[bytes, str]:
    """The multipart body again, its `model` field set to `model` (the engine's own name for
    an alias or variant); every other part as it came. Returns the body and its content type
    (a new boundary)."""
    reader = MultipartReader(CIMultiDict({"Content-Type": content_type}), _stream_of(body))
    writer = MultipartWriter("form-data")
    while (part := await reader.next()) is not None:
        assert isinstance(part, BodyPartReader)  # checked by `multipart_model` already
        data: bytes = model.encode() if part.name == "model" else await part.read()
        kept = [(k, v) for k, v in part.headers.items() if k.lower() != "content-length"]
        writer.append(data, CIMultiDict(kept))
    return await writer.as_bytes(), writer.content_type
