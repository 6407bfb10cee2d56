"""The diffusion server as a real process on the tiny random pipeline (CPU, a few steps)."""

from __future__ import annotations

import base64
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.diffusion.conftest import SERVER_FLAGS
from tests.diffusion.support import Answer, ImageServer, png_size, start_image_server

pytestmark = pytest.mark.diffusion

FAST = {"num_inference_steps": 2}
# Slow enough (about 1-2 s on one CPU thread) to hold the server busy while a test looks at it.
SLOW = {"prompt": "a slow lighthouse", "size": "256x256", "num_inference_steps": 30}


def decode(b64: str) -> bytes:
    return base64.b64decode(b64, validate=True)


def openai_images(server: ImageServer, **fields: Any) -> list[bytes]:
    answer = server.post("/v1/images/generations", {"prompt": "a red fox", **FAST, **fields})
    assert answer.status == 200, answer.body
    return [decode(item["b64_json"]) for item in answer.body["data"]]


def in_background(
    server: ImageServer, payload: dict[str, Any]
) -> tuple[threading.Thread, list[Answer]]:
    """POST /v1/images/generations on a thread; the answer lands in the returned list."""
    answers: list[Answer] = []
    thread = threading.Thread(
        target=lambda: answers.append(server.post("/v1/images/generations", payload))
    )
    thread.start()
    return thread, answers


def test_openai_route_returns_pngs_of_the_asked_size(image_server: ImageServer) -> None:
    answer = image_server.post(
        "/v1/images/generations",
        {"model": "vision", "prompt": "a red fox", "n": 2, "size": "128x64", "seed": 7, **FAST},
    )
    assert answer.status == 200, answer.body
    assert isinstance(answer.body["created"], int)
    assert [item["seed"] for item in answer.body["data"]] == [7, 8]
    images = [decode(item["b64_json"]) for item in answer.body["data"]]
    assert [png_size(image) for image in images] == [(128, 64), (128, 64)]
    assert images[0] != images[1]


def test_openai_route_defaults_to_the_models_native_size(image_server: ImageServer) -> None:
    (image,) = openai_images(image_server)
    assert png_size(image) == (64, 64)


def test_seed_route_returns_image_seed_and_elapsed(image_server: ImageServer) -> None:
    answer = image_server.post(
        "/generate",
        {"prompt": "sunset over a future city", "width": 64, "height": 96, "seed": 1337, **FAST},
    )
    assert answer.status == 200, answer.body
    assert set(answer.body) == {"image_base64", "seed", "elapsed"}
    assert answer.body["seed"] == 1337
    assert 0 < answer.body["elapsed"] < 60
    assert png_size(decode(answer.body["image_base64"])) == (64, 96)


def test_a_missing_seed_is_chosen_and_returned(image_server: ImageServer) -> None:
    first = image_server.post("/generate", {"prompt": "a red fox", **FAST}).body
    again = image_server.post("/generate", {"prompt": "a red fox", "seed": first["seed"], **FAST})
    assert again.body["image_base64"] == first["image_base64"]


def test_the_same_seed_gives_the_same_bytes(image_server: ImageServer) -> None:
    first = openai_images(image_server, seed=42)
    second = openai_images(image_server, seed=42)
    other = openai_images(image_server, seed=43)
    assert first == second
    assert other != first


def test_health_routes_and_models(image_server: ImageServer) -> None:
    assert image_server.get("/health").status == 200
    healthz = image_server.get("/healthz")
    assert healthz.status == 200
    assert healthz.body["status"] == "ok"
    assert healthz.body["device"] == "cpu"
    models = image_server.get("/v1/models")
    assert [model["id"] for model in models.body["data"]] == ["vision"]


@pytest.mark.parametrize(
    ("path", "payload", "param", "words"),
    [
        ("/v1/images/generations", {"prompt": ""}, "prompt", "non-empty"),
        ("/v1/images/generations", {"prompt": "   "}, "prompt", "non-empty"),
        ("/v1/images/generations", {"n": 1}, "prompt", "non-empty"),
        ("/v1/images/generations", {"prompt": "x", "size": "100x64"}, "size", "multiples of 8"),
        ("/v1/images/generations", {"prompt": "x", "size": "1024x64"}, "size", "from 64 to 512"),
        ("/v1/images/generations", {"prompt": "x", "size": "big"}, "size", "WIDTHxHEIGHT"),
        ("/v1/images/generations", {"prompt": "x", "n": 4}, "n", "from 1 to 3"),
        ("/v1/images/generations", {"prompt": "x", "n": 0}, "n", "from 1 to 3"),
        (
            "/v1/images/generations",
            {"prompt": "x", "num_inference_steps": 31},
            "num_inference_steps",
            "from 1 to 30",
        ),
        (
            "/v1/images/generations",
            {"prompt": "x", "response_format": "url"},
            "response_format",
            "b64_json",
        ),
        ("/generate", {"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "1 to 30"),
        ("/generate", {"prompt": "x", "width": 60}, "width", "multiple of 8 from 64 to 512"),
        ("/generate", {"prompt": "x", "height": 520}, "height", "multiple of 8 from 64 to 512"),
        ("/generate", {"prompt": "x", "guidance_scale": -1}, "guidance_scale", "from 0 to 50"),
        ("/generate", {"prompt": "x", "seed": "abc"}, "seed", "integer"),
        ("/generate", {"prompt": 5}, "prompt", "non-empty string"),
    ],
)
def test_bad_inputs_get_400_naming_the_limit(
    image_server: ImageServer, path: str, payload: dict[str, Any], param: str, words: str
) -> None:
    answer = image_server.post(path, payload)
    assert answer.status == 400
    error = answer.body["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words in error["message"]


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b""])
def test_a_body_that_is_not_a_json_object_gets_400(image_server: ImageServer, body: bytes) -> None:
    answer = image_server.request("POST", "/v1/images/generations", body)
    assert answer.status == 400
    assert answer.body["error"]["code"] == "invalid_json"


def test_beyond_the_queue_bound_requests_get_503_with_retry_after(
    image_server: ImageServer,
) -> None:
    running, running_answer = in_background(image_server, SLOW)
    image_server.wait_busy(1)
    waiting, waiting_answer = in_background(image_server, {"prompt": "next", **FAST})
    image_server.wait_busy(2)  # one running and one waiting: --max-queue 1 is reached

    refused = [image_server.post("/v1/images/generations", {"prompt": "x", **FAST}) for _ in "ab"]
    # The server stays responsive while busy: health is answered from the event loop.
    assert image_server.get("/health").status == 200

    for answer in refused:
        assert answer.status == 503
        assert int(answer.headers["Retry-After"]) >= 1
        assert "--max-queue 1" in answer.body["error"]["message"]
    running.join(60)
    waiting.join(60)
    assert running_answer[0].status == 200
    assert waiting_answer[0].status == 200
    assert png_size(decode(running_answer[0].body["data"][0]["b64_json"])) == (256, 256)


def test_sigterm_answers_the_running_request_and_exits_cleanly(
    diffusion_python: Path, tiny_pipeline: Path, tmp_path: Path
) -> None:
    server = start_image_server(
        diffusion_python, tiny_pipeline, tmp_path / "server.log", *SERVER_FLAGS
    )
    try:
        thread, answers = in_background(server, SLOW)
        server.wait_busy(1)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0, server.log_text()
        thread.join(30)
        # Stopped between two denoising steps, the request is answered, not dropped.
        assert answers[0].status == 503
        assert "shutting down" in answers[0].body["error"]["message"]
    finally:
        server.stop()
