"""Images through the gateway: the diffusion engine started on demand like any other engine."""

from __future__ import annotations

import base64
from pathlib import Path

import aiohttp
import pytest

from tests.diffusion.conftest import SERVER_FLAGS
from tests.diffusion.support import png_size

pytestmark = pytest.mark.diffusion


@pytest.fixture
def vision_gateway(gateway_factory, diffusion_python: Path, tiny_pipeline: Path):
    return gateway_factory(
        {
            "vision": {
                "engine": "diffusion",
                "model": str(tiny_pipeline),
                "route": "/vision",
                "aliases": ["vision-diffusion"],
                "idle_timeout": "2s",
                "args": list(SERVER_FLAGS),
            }
        },
        diffusion={"executable": [str(diffusion_python)]},
    )


async def test_images_by_model_and_by_route_then_idle_stop_and_back(vision_gateway):
    url = vision_gateway.url
    async with aiohttp.ClientSession() as session:
        body = {
            "model": "vision-diffusion",
            "prompt": "a red fox",
            "size": "64x128",
            "seed": 7,
            "num_inference_steps": 3,
        }
        async with session.post(url + "/v1/images/generations", json=body) as response:
            assert response.status == 200, await response.text()
            first = await response.json()
        image = base64.b64decode(first["data"][0]["b64_json"])
        assert png_size(image) == (64, 128)
        # The same seed gives the same image, through the seed's own route this time.
        seed_body = {
            "prompt": "a red fox",
            "num_inference_steps": 3,
            "guidance_scale": 7.5,
            "seed": 7,
            "width": 64,
            "height": 128,
        }
        async with session.post(url + "/vision/generate", json=seed_body) as response:
            assert response.status == 200
            second = await response.json()
        assert second["seed"] == 7
        assert "elapsed" in second
        assert base64.b64decode(second["image_base64"]) == image
        async with session.get(url + "/vision/healthz") as response:
            assert response.status == 200
        # Bad input: a clear 400 from the engine, passed through in OpenAI's shape.
        async with session.post(
            url + "/v1/images/generations", json={"model": "vision", "prompt": "", "size": "64x64"}
        ) as response:
            assert response.status == 400
            error = (await response.json())["error"]
        assert "prompt" in error["message"]
        async with session.post(
            url + "/v1/images/generations", json={"model": "vision", "prompt": "x", "size": "63x64"}
        ) as response:
            assert response.status == 400
        # Idle for its timeout: the engine stops, and the next request brings it back.
        vision_gateway.wait_state("vision", "stopped", timeout=15)
        assert vision_gateway.engine_pids() == []
        async with session.post(url + "/v1/images/generations", json=body) as response:
            assert response.status == 200
            again = await response.json()
        assert base64.b64decode(again["data"][0]["b64_json"]) == image
    assert vision_gateway.status()["models"][0]["starts"] == 2
