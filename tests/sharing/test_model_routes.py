"""Every route vLLM serves, routed by the request's model, through the official SDKs; the
audio uploads by their multipart `model` field (hostile forms included); unknown routes and
other keys' models refused as before."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from typing import Any

import anthropic
import openai
import pytest

from modelyard.auth.keys import generate_key
from tests.harness import Harness, engine_model, in_process_gateway_thread
from tests.security.keys import ADMIN_KEY, key_config

SCOPED_KEY = generate_key()  # may use "speech" only
WAV = b"RIFF" + bytes(36) + b"data" + bytes(4000)  # the shape of a WAV file, silent


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    models = {
        "whisper": engine_model(served_name="whisper-large-v3", aliases=["stt"]),
        "chat": engine_model(served_name="chat"),
        "speech": engine_model(served_name="speech"),
    }
    keys = [
        key_config("ops", ADMIN_KEY, admin=True),
        key_config("s", SCOPED_KEY, models=["speech"]),
    ]
    with in_process_gateway_thread(
        tmp_path_factory.mktemp("routes"),
        models,
        auth={"keys": keys},
        limits={"max_body_bytes": 2_000, "max_upload_bytes": 8 * 1024 * 1024},
    ) as harness:
        yield harness


def _engine(harness: Harness, name: str) -> Any:
    return harness.runtime.of(name)[-1]


def _post(harness: Harness, path: str, body: bytes, content_type: str, key: str = ADMIN_KEY):
    request = urllib.request.Request(
        harness.url + path,
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": content_type},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK's translations
def test_a_whisper_upload_through_the_sdk_reaches_the_engine_by_its_alias(gateway) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    answer = client.audio.transcriptions.create(
        model="stt", file=("hello.wav", io.BytesIO(WAV), "audio/wav"), language="en"
    )
    assert answer.text == f"{len(WAV)} bytes of audio"
    seen = _engine(gateway, "whisper").state.last
    # The engine got its own name in the form, the other fields and the file as sent.
    assert seen["form"]["model"] == "whisper-large-v3"
    assert seen["form"]["language"] == "en"
    assert seen["file_bytes"] == len(WAV)
    translated = client.audio.translations.create(
        model="whisper", file=("x.wav", io.BytesIO(WAV), "audio/wav")
    )
    assert translated.text.endswith("bytes of audio")
    assert _engine(gateway, "whisper").state.last["path"] == "/v1/audio/translations"


def test_a_large_upload_with_the_model_field_last(gateway) -> None:
    """Minutes of audio: megabytes before the `model` field (the SDK sends it after the file
    when the file is given first); the engine gets the file whole and its own name."""
    audio = b"RIFF" + bytes(5 * 1024 * 1024)
    body, content_type = _form(("file", audio), ("model", b"stt"))
    status, answer = _post(gateway, "/v1/audio/transcriptions", body, content_type)
    assert status == 200, answer
    assert answer["text"] == f"{len(audio)} bytes of audio"
    seen = _engine(gateway, "whisper").state.last
    assert seen["form"]["model"] == "whisper-large-v3"
    assert seen["file_bytes"] == len(audio)


def _form(*fields: tuple[str, bytes], boundary: str = "b0und") -> tuple[bytes, str]:
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        + value
        + b"\r\n"
        for name, value in fields
    )
    return parts + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ([("file", WAV)], "missing_model"),
        ([("model", b"whisper"), ("model", b"chat"), ("file", WAV)], "duplicate_model"),
        ([("model", b""), ("file", WAV)], "invalid_model"),
        ([("model", b"w" * 5000), ("file", WAV)], "invalid_model"),
    ],
)
def test_hostile_forms_get_a_400(gateway, fields, code) -> None:
    body, content_type = _form(*fields)
    status, answer = _post(gateway, "/v1/audio/transcriptions", body, content_type)
    assert status == 400
    assert answer["error"]["code"] == code


def test_a_bad_boundary_or_a_cut_body_is_a_400_and_a_huge_part_a_413(gateway) -> None:
    path = "/v1/audio/transcriptions"
    body, content_type = _form(("model", b"whisper"), ("file", WAV))
    huge, _ = _form(("model", b"whisper"), ("file", bytes(9 * 1024 * 1024)))
    for sent, sent_type, status in [
        (body, "multipart/form-data; boundary=other", 400),  # not the body's boundary
        (body[: len(body) // 2], content_type, 400),  # cut short
        (body, "multipart/form-data", 400),  # no boundary at all
        (huge, content_type, 413),  # past limits.max_upload_bytes
        (b"{}", "application/json", 415),
    ]:
        assert _post(gateway, path, sent, sent_type)[0] == status, sent_type


def test_a_scoped_key_cannot_reach_another_model_by_a_form(gateway) -> None:
    body, content_type = _form(("model", b"whisper"), ("file", WAV))
    status, answer = _post(gateway, "/v1/audio/transcriptions", body, content_type, SCOPED_KEY)
    assert status == 404
    assert "whisper" not in answer["error"]["message"].split("known models:")[1]


def test_messages_through_the_anthropic_sdk(gateway) -> None:
    client = anthropic.Anthropic(base_url=gateway.url, api_key=ADMIN_KEY, max_retries=0)
    message = client.messages.create(
        model="chat", max_tokens=32, messages=[{"role": "user", "content": "hello"}]
    )
    assert message.content[0].text == "chat says: hello"
    assert _engine(gateway, "chat").state.last["path"] == "/v1/messages"


def test_the_other_json_routes_are_routed_by_model(gateway) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    response = client.responses.create(model="chat", input="hi")
    assert response.output_text == "chat says: hi"
    speech = client.audio.speech.create(model="speech", voice="alloy", input="hi")
    assert speech.content.startswith(b"RIFF")
    for path, body, field in [
        ("/tokenize", {"model": "chat", "prompt": "a b c"}, "count"),
        ("/detokenize", {"model": "chat", "tokens": [1, 2]}, "prompt"),
        ("/v1/rerank", {"model": "chat", "query": "q", "documents": ["a", "b"]}, "results"),
        ("/v1/score", {"model": "chat", "text_1": "q", "text_2": ["a"]}, "data"),
        ("/v1/embeddings", {"model": "chat", "input": "a"}, "data"),
    ]:
        status, answer = _post(gateway, path, json.dumps(body).encode(), "application/json")
        assert status == 200, (path, answer)
        assert field in answer
        assert _engine(gateway, "chat").state.last["path"] == path


def test_unknown_routes_stay_refused(gateway) -> None:
    for path in ("/v1/nonsense", "/v1/chat/completions/extra", "/v1/audio/other"):
        status, answer = _post(gateway, path, b'{"model": "chat"}', "application/json")
        assert status == 404, path
        assert answer["error"]["message"] == "no such route"


def test_routes_are_counted_by_their_own_label(gateway) -> None:
    # Its own requests (not the earlier tests'): an upload, a tokenize and a message.
    body, content_type = _form(("file", WAV), ("model", b"stt"))
    assert _post(gateway, "/v1/audio/transcriptions", body, content_type)[0] == 200
    tokenize = json.dumps({"model": "chat", "prompt": "a b c"}).encode()
    assert _post(gateway, "/tokenize", tokenize, "application/json")[0] == 200
    client = anthropic.Anthropic(base_url=gateway.url, api_key=ADMIN_KEY, max_retries=0)
    client.messages.create(model="chat", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    labels = {record.route for record in gateway.records}
    assert {"/v1/audio", "/tokenize", "/v1/messages"} <= labels


def test_tokens_of_messages_and_responses_count_like_a_chats(gateway) -> None:
    client = anthropic.Anthropic(base_url=gateway.url, api_key=ADMIN_KEY, max_retries=0)
    client.messages.create(model="chat", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    record = [r for r in gateway.records if r.route == "/v1/messages"][-1]
    assert (record.prompt_tokens, record.completion_tokens) == (5, 3)
    openai.OpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY).responses.create(
        model="chat", input="hi"
    )
    record = [r for r in gateway.records if r.route == "/v1/responses"][-1]
    assert (record.prompt_tokens, record.completion_tokens) == (5, 3)
