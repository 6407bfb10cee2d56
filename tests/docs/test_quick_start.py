"""The quick start as the README and the getting-started page print it: `make demo`, then
their curl commands, answered by real vLLM engines on CPU (and the demo's diffusion engine for
the images page's example).

`make demo` runs from this checkout (its virtualenv and the shared demo build are what a
second run finds). It serves on the pages' port 8000 inside a network namespace of its own
(`unshare -n`), so whatever else runs on this machine cannot take the port.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.docs.blocks import REPO, block

pytestmark = [pytest.mark.vllm, pytest.mark.diffusion, pytest.mark.slow]

SCRIPT = r"""
set -euo pipefail
ip link set lo up
setsid make demo > "$OUT/demo.log" 2>&1 &
demo=$!
trap 'kill -TERM -- -$demo 2>/dev/null; wait $demo || true' EXIT
for _ in $(seq 1800); do grep -q 'modelyard listening on' "$OUT/demo.log" && break; sleep 0.2; done
grep -q 'modelyard listening on' "$OUT/demo.log"
"""


def test_make_demo_then_the_pages_curl_commands(tmp_path: Path) -> None:
    if subprocess.run(["unshare", "-n", "true"], check=False).returncode != 0:
        pytest.fail("needs `unshare -n` (root, or user namespaces) for a private port 8000")
    readme_demo = block("README.md", "make demo").text
    assert readme_demo.splitlines()[0].split("#")[0].strip() == "make demo"
    assert block("docs/getting-started.md", "make demo").text.strip() == "make demo"
    chats = [
        block("README.md", "curl -s http://127.0.0.1:8000/v1/chat").text,
        block("docs/getting-started.md", "curl -s http://127.0.0.1:8000/v1/chat", '"chat"').text,
    ]
    image = block("docs/engines.md", "curl -s http://127.0.0.1:8000/vision/generate").text
    steps = [SCRIPT]
    for index, chat in enumerate(chats):
        steps.append(f'( {chat.strip()} ) > "$OUT/chat{index}.json"')
    steps.append(f'( cd "$OUT" && {image.strip()} )')
    env = {**os.environ, "OUT": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
    run = subprocess.run(
        ["unshare", "-n", "bash", "-c", "\n".join(steps)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    log = (tmp_path / "demo.log").read_text() if (tmp_path / "demo.log").exists() else ""
    assert run.returncode == 0, run.stdout + run.stderr + log
    for index in range(len(chats)):
        answer = (tmp_path / f"chat{index}.json").read_text()
        assert '"choices"' in answer, answer
        assert '"assistant"' in answer, answer
    assert (tmp_path / "output.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
