"""Config reloads on a live gateway: how long a reload takes, and what requests see meanwhile.

    .venv/bin/python -m bench.reload [--models 3] [--reloads 20] [--clients 8]

Test engines behind a real `modelyard serve`; clients keep streaming to every model while the
file is changed and reloaded (an alias each time, then one engine's argv). Prints JSON: reload
answer times, requests tried and answered, any that failed, the PIDs before and after, and the
time until the changed model answered from its new engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from tests.conftest import fake_model, start_gateway


async def client_loop(url: str, model: str, stop: asyncio.Event, results: list[int]) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "fake_chunks": 10,
        "fake_chunk_delay": 0.02,
    }
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                text = await response.text()
                complete = response.status == 200 and "data: [DONE]" in text
                results.append(200 if complete else response.status or 599)


async def run(models: int, reloads: int, clients: int) -> dict[str, Any]:
    names = [f"m{i}" for i in range(models)]
    with tempfile.TemporaryDirectory() as directory:
        gateway = start_gateway(Path(directory), {name: fake_model(name) for name in names})
        try:
            async with aiohttp.ClientSession() as session:
                for name in names:
                    await (await session.post(gateway.url + f"/admin/models/{name}/load")).read()
            before = {m["name"]: m["pid"] for m in gateway.status()["models"]}
            stop, results = asyncio.Event(), []
            tasks = [
                asyncio.create_task(client_loop(gateway.url, names[i % models], stop, results))
                for i in range(clients)
            ]
            config = yaml.safe_load(gateway.config_path.read_text())
            times = []
            async with aiohttp.ClientSession() as session:
                for number in range(reloads):
                    config["models"]["m0"]["aliases"] = [f"alias-{number}"]
                    gateway.config_path.write_text(yaml.safe_dump(config))
                    began = time.perf_counter()
                    async with session.post(gateway.url + "/admin/reload") as response:
                        assert response.status == 200, await response.text()
                    times.append(time.perf_counter() - began)
                    await asyncio.sleep(0.05)
                config["models"]["m1"]["command"] += ["--ready-delay", "0"]
                gateway.config_path.write_text(yaml.safe_dump(config))
                began = time.perf_counter()
                await (await session.post(gateway.url + "/admin/reload")).read()
                while True:
                    status = {m["name"]: m for m in gateway.status()["models"]}["m1"]
                    if status["state"] == "ready" and status["pid"] != before["m1"]:
                        break
                    await asyncio.sleep(0.01)
                replaced_after = time.perf_counter() - began
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*tasks)
            after = {m["name"]: m["pid"] for m in gateway.status()["models"]}
        finally:
            gateway.stop()
    return {
        "reloads": reloads,
        "reload_ms_median": round(statistics.median(times) * 1000, 1),
        "reload_ms_max": round(max(times) * 1000, 1),
        "requests": len(results),
        "answered_completely": results.count(200),
        "failed": len(results) - results.count(200),
        "unchanged_pids_kept": all(before[n] == after[n] for n in names if n != "m1"),
        "changed_engine_ready_again_s": round(replaced_after, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--reloads", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.models, args.reloads, args.clients)), indent=2))


if __name__ == "__main__":
    main()
