"""The getting-started page, followed as written on a clean home: install, a first config,
check, serve, an admin key, the CLI; then the CLI examples of the operations and security
pages against that same gateway.

The reader's steps run in bash exactly as the pages print them. The test does only what the
pages tell the reader to do by hand (write the config file, paste the key's lines into it,
restart after changing `listen`), and replaces the one placeholder, `my-admin-key`, with the
key the reader made. The gateway runs in a network namespace of its own (`unshare -n`), so
the pages' port 8000 is free whatever else runs on this machine.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs.blocks import REPO, block

pytestmark = pytest.mark.slow

GETTING_STARTED = "docs/getting-started.md"
SERVE = "modelyard serve -c modelyard.yaml"


def first_config() -> str:
    text = (REPO / GETTING_STARTED).read_text()
    start = text.index("Write `modelyard.yaml`:")
    return text[
        text.index("```yaml\n", start) + 8 : text.index("```", text.index("```yaml\n", start) + 8)
    ]


def checkout_copy(target: Path) -> Path:
    """The repository's files as a reader's checkout has them (tracked and new, not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def serving(block_text: str) -> str:
    """A block with `modelyard serve` (which runs in the foreground) as a reader runs it in a
    second terminal: in the background, continuing once it listens."""
    assert SERVE in block_text.splitlines()
    return block_text.replace(SERVE, f"{SERVE} > serve.log 2>&1 &\nwait_listening")


# What the reader does by hand between the blocks.
HELPERS = r"""
wait_listening() {
  for _ in $(seq 300); do grep -q 'modelyard listening on' serve.log && return 0; sleep 0.1; done
  cat serve.log; return 1
}
stop_serving() { kill %1; wait %1 || true; }
paste_admin_key() {  # the lines `keys create admin --admin` printed, under auth: keys:
  key=$(grep -o 'my-[A-Za-z0-9_-]*' admin.out | head -1)
  { echo 'auth:'; echo '  keys:'; sed -n '/^  - name: admin/,$p' admin.out; } >> modelyard.yaml
  sed -i 's/^listen: 127.0.0.1:8000/listen: 0.0.0.0:8000/' modelyard.yaml
}
"""


def test_getting_started_and_the_cli_examples_as_written(tmp_path: Path) -> None:
    if subprocess.run(["unshare", "-n", "true"], check=False).returncode != 0:
        pytest.fail("needs `unshare -n` (root, or user namespaces) for a private port 8000")
    home = tmp_path / "home"
    home.mkdir()
    checkout = checkout_copy(tmp_path / "modelyard")
    (checkout / "modelyard.yaml").write_text(first_config())  # "Write modelyard.yaml"
    operations = block("docs/operations.md", "export MODELYARD_URL").commands
    security_config_key = block("docs/security.md", "modelyard keys create alice").commands
    security_runtime = block("docs/security.md", "export MODELYARD_URL").commands
    reload = block("docs/operations.md", "modelyard reload").commands
    make_admin = block(GETTING_STARTED, "modelyard keys create admin").text.strip()
    inner = "\n".join(
        [
            "set -euo pipefail",
            "ip link set lo up",
            HELPERS,
            # The reader has vLLM installed (the page's first line): `check` and `serve`
            # refuse a config whose engine program is missing. No model starts here.
            "mkdir -p engine-bin && printf '#!/bin/sh\\nexit 1\\n' > engine-bin/vllm",
            'chmod +x engine-bin/vllm && export PATH="$PWD/engine-bin:$PATH"',
            "echo '== check and serve'",
            serving(block(GETTING_STARTED, "modelyard check").text),
            "echo '== config key'",
            *security_config_key,
            "echo '== admin key'",
            f"( {make_admin} ) | tee admin.out",
            "paste_admin_key",
            "stop_serving",
            serving(SERVE),
            "echo '== the CLI'",
            block(GETTING_STARTED, "export MODELYARD_URL").text.replace("my-admin-key", "$key"),
            *[command.replace("my-admin-key", "$key") for command in operations],
            "echo '== runtime keys'",
            *[command.replace("my-admin-key", "$key") for command in security_runtime],
            "echo '== reload'",
            *reload,
            "stop_serving",
        ]
    )
    (checkout / "inner.sh").write_text(inner)
    outer = "\n".join(
        [
            "set -euo pipefail",
            block(GETTING_STARTED, "python3 -m venv").text,  # needs the package index
            "exec unshare -n bash inner.sh",
        ]
    )
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MODELYARD_", "VIRTUAL_ENV", "XDG_STATE_HOME"))
    }
    env.update(HOME=str(home), PATH="/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
    run = subprocess.run(
        ["bash", "-c", outer], cwd=checkout, env=env, capture_output=True, text=True,
        timeout=900, check=False,
    )  # fmt: skip
    out = run.stdout + run.stderr
    (tmp_path / "walkthrough.out").write_text(out)  # kept for a reader of a failed run
    log = checkout / "serve.log"
    assert run.returncode == 0, out + (log.read_text() if log.exists() else "")
    assert "config OK" in out
    assert "Add this under `auth: keys:` in the config:" in out  # no gateway named: config lines
    assert "Active now on http://127.0.0.1:8000: models coder; 60 requests/min" in out
    assert "Active now on http://127.0.0.1:8000: models chat,coder-*; 60 requests/min" in out
    assert "reloaded " in out
    # State went to the platform's state folder under the reader's home, not the checkout.
    state = home / ".local" / "state" / "modelyard"
    assert (state / "runtime_keys.sqlite3").exists(), sorted(state.iterdir())
    assert not (checkout / ".state").exists()
    installed = home / ".local" / "share" / "modelyard-venv" / "bin" / "modelyard"
    assert installed.exists(), shlex.join([sys.executable])
