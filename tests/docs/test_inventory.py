"""Every command block of the README and the docs is run by a test, or says here why not.

A new block fails this test until it is added to one of the two lists below, so no documented
command goes untested unnoticed.
"""

from __future__ import annotations

import re

from tests.docs.blocks import REPO, SHELL, Block, block, blocks

CURL = "curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json'"

# (page, the block's first command, start of the line) -> the test that runs it as written.
RUN_BY = {
    # The block's second command, `make test`, is the command that runs all of these.
    ("README.md", "make demo"): "tests/docs/test_quick_start.py",
    ("README.md", "curl -s http://127.0.0.1:8000/v1/chat"): "tests/docs/test_quick_start.py",
    ("README.md", "modelyard check -c modelyard.yaml"): "tests/docs/test_walkthrough.py",
    ("docs/getting-started.md", "make demo"): "tests/docs/test_quick_start.py",
    (
        "docs/getting-started.md",
        CURL + ' \\\n  -d \'{"model": "chat"',
    ): "tests/docs/test_quick_start.py",
    ("docs/getting-started.md", "python3 -m venv"): "tests/docs/test_walkthrough.py",
    ("docs/getting-started.md", "modelyard check"): "tests/docs/test_walkthrough.py",
    ("docs/getting-started.md", "modelyard keys create admin"): "tests/docs/test_walkthrough.py",
    ("docs/getting-started.md", "export MODELYARD_URL"): "tests/docs/test_walkthrough.py",
    ("docs/operations.md", "modelyard reload"): "tests/docs/test_walkthrough.py",
    ("docs/operations.md", "export MODELYARD_URL"): "tests/docs/test_walkthrough.py",
    ("docs/security.md", "modelyard keys create alice"): "tests/docs/test_walkthrough.py",
    ("docs/security.md", "export MODELYARD_URL"): "tests/docs/test_walkthrough.py",
    ("docs/engines.md", "curl -s http://127.0.0.1:8000/vision"): "tests/docs/test_quick_start.py",
    ("docs/deployment.md", "cd deploy"): "tests/deploy/test_static.py",
    ("docs/deployment.md", "docker compose --profile cpu"): "tests/deploy/test_static.py",
}

# Blocks no test can run on a machine without a GPU, a cluster or the weights they name.
NOT_RUN = {
    (
        "docs/getting-started.md",
        CURL + ' \\\n  -d \'{"model": "coder"',
    ): (
        "needs vLLM and the Qwen2.5-Coder-7B weights; the same request to the demo's model is "
        "run by tests/docs/test_quick_start.py"
    ),
    ("docs/deployment.md", "DOCKER_BUILDKIT=1 docker build"): (
        "the gpu image is several GB of CUDA wheels; tests/deploy/test_container.py builds "
        "the same Dockerfile (with the pip_cert secret) for the gateway target"
    ),
    ("docs/deployment.md", "git pull"): (
        "a git pull of a release; its compose lines are resolved by tests/deploy/test_static.py"
    ),
    ("docs/cold-starts.md", "modelyard pull coder -c modelyard.yaml"): (
        "downloads from the Hugging Face hub, which tests cannot reach; tests/core/test_pull.py "
        "runs `modelyard pull` for a config's model and for a hub name against a local server "
        "that speaks the hub's download API"
    ),
    ("docs/ray.md", "pip install 'modelyard[ray]'"): (
        "installs on the nodes of a cluster; make setup installs the same extra for tests/ray"
    ),
    ("docs/ray.md", "export RAY_process_group_cleanup_enabled"): (
        "needs several machines; tests/ray/ starts a local cluster with the same settings "
        "(checked below)"
    ),
}


def key_of(found: Block) -> tuple[str, str] | None:
    for page, start in [*RUN_BY, *NOT_RUN]:
        if found.page == page and found.text.startswith(start.removeprefix("$ ")):
            return page, start
        if found.page == page and found.first_command.startswith(start):
            return page, start
    return None


def test_every_command_block_is_run_or_says_why_not() -> None:
    unlisted = [(b.page, b.first_command) for b in blocks(SHELL) if key_of(b) is None]
    assert not unlisted, f"run these blocks in a test, or list them in NOT_RUN: {unlisted}"
    used = {key_of(b) for b in blocks(SHELL)}
    assert not ({*RUN_BY, *NOT_RUN} - used), "listed blocks that no page has any more"
    for test in set(RUN_BY.values()):
        assert (REPO / test).is_file(), test


def test_the_readme_first_config_is_the_getting_started_one() -> None:
    # The walkthrough runs the getting-started page; the README shows the same steps.
    def first_yaml(page: str) -> str:
        text = (REPO / page).read_text()
        return re.search(r"```yaml\n(.*?)```", text, re.DOTALL).group(1)  # type: ignore[union-attr]

    assert first_yaml("README.md") == first_yaml("docs/getting-started.md")

    def commands(page: str) -> list[str]:
        text = block(page, "modelyard check").text
        return [line.split("#")[0].strip() for line in text.splitlines()]

    assert commands("README.md") == commands("docs/getting-started.md")


def test_the_ray_page_settings_are_the_test_clusters() -> None:
    exported = dict(
        re.findall(r"^export (RAY_\w+)=(\S+)", block("docs/ray.md", "export RAY_").text, re.M)
    )
    cluster = (REPO / "tests" / "ray" / "cluster.py").read_text()
    for name, value in exported.items():
        assert f'"{name}": "{value}"' in cluster, name
