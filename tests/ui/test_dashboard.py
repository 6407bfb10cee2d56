"""The dashboard in a real headless Chromium, against a real gateway with test engines.

Needs Debian's Chromium (`apt-get install -y chromium`) and Playwright for Python (in the
`test` extra). Playwright drives the system's Chromium; it never downloads a browser. Screenshots
go to test-artifacts/.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import fake_gpu
from tests.conftest import FAKE_ENGINE, fake_model
from tests.security.keys import ADMIN_KEY, USER_KEY, auth_settings

pytestmark = pytest.mark.chromium

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GIB = 1024**3
WAIT_MS = 15_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            "Chromium is not installed; the dashboard tests need it: "
            "apt-get update && apt-get install -y chromium"
        )
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("Playwright is not installed: pip install -e '.[test]'")
    expect.set_options(timeout=WAIT_MS)  # engines start on 2 busy cores
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page_errors() -> list[str]:
    return []


def open_page(browser: Any, errors: list[str], **options: Any) -> Any:
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, **options)
    page.set_default_timeout(WAIT_MS)
    page.on("pageerror", lambda error: errors.append(str(error)))
    return page


def vllm_like(name: str, gpu_dir: Path, memory: str, *args: str, **settings: Any) -> dict[str, Any]:
    """A test engine started with vLLM's command line, on a simulated GPU."""
    return {
        "engine": "vllm",
        "model": f"/models/{name}",
        "executable": [sys.executable, FAKE_ENGINE],
        "args": list(args),
        "env": {"FAKE_GPU_DIR": str(gpu_dir)},
        "memory": memory,
        **settings,
    }


def chat_request(url: str, model: str, key: str | None = None) -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": "from the test"}]}
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.mouse.wheel(0, -10_000)
    page.screenshot(path=str(path), full_page=True)
    return path


def test_dashboard_shows_models_live_and_drives_them(
    browser, gateway_factory, tmp_path, page_errors
):
    from playwright.sync_api import expect

    gpu = tmp_path / "fake-gpu"
    fake_gpu.create(gpu, {0: 24 * GIB})
    gateway = gateway_factory(
        {
            "llama": vllm_like("llama", gpu, "10GiB", sleep=1, aliases=["llama-chat"]),
            "qwen": vllm_like("qwen", gpu, "8GiB", "--ready-delay", "0.5", route="/qwen"),
            # Exits at once; a small footprint, so that placing it evicts nobody.
            "broken": {
                "engine": "command",
                "command": [sys.executable, "-c", "import sys; sys.exit(3)", "{port}"],
                "memory": "1GiB",
            },
        },
        gpus=[{"index": 0, "memory": "24GiB", "name": "Test GPU"}],
    )
    page = open_page(browser, page_errors)
    loads: list[str] = []
    page.on("load", lambda _: loads.append(page.url))
    page.goto(gateway.url + "/ui")

    rows = {name: page.locator(f'tr[data-model="{name}"]') for name in ("llama", "qwen", "broken")}
    for row in rows.values():
        expect(row).to_have_attribute("data-state", "stopped")
    expect(rows["llama"]).to_contain_text("llama-chat")  # aliases and routes are shown
    expect(rows["qwen"]).to_contain_text("/qwen")
    expect(page.locator(".gpu")).to_contain_text("Test GPU")
    expect(page.locator("#live-pill")).to_have_attribute("data-live", "live")

    # A request from outside the page starts a model: the row flips without a reload.
    chat_request(gateway.url, "llama")
    expect(rows["llama"]).to_have_attribute("data-state", "ready")
    expect(rows["llama"].locator(".state")).to_have_text("ready")
    expect(page.locator('#events li[data-kind="ready"][data-model="llama"]')).to_have_count(1)
    expect(rows["llama"]).to_contain_text("10.0 GiB")  # its footprint
    expect(page.locator(".gpu-numbers")).to_contain_text("planned 10.0 GiB")

    # The Load button starts a model; its log shows the start.
    rows["qwen"].locator('button[data-action="load"]').click()
    expect(rows["qwen"]).to_have_attribute("data-state", "ready")
    rows["qwen"].click()
    expect(page.locator("#log-model")).to_have_text("qwen")
    expect(page.locator("#log")).to_contain_text("Application startup complete")

    # Sleep and unload; a model that cannot start shows why.
    rows["llama"].locator('button[data-action="sleep"]').click()
    expect(rows["llama"]).to_have_attribute("data-state", "sleeping")
    rows["broken"].locator('button[data-action="load"]').click()
    expect(rows["broken"]).to_have_attribute("data-state", "failed")
    expect(rows["broken"].locator(".failure")).to_contain_text("exit code 3")
    expect(page.locator(".toast.error")).to_contain_text("broken")

    # The chat box streams an answer (waking the sleeping model on the way).
    page.select_option("#chat-model", "llama-chat")
    page.fill("#chat-input", "hello dashboard")
    page.click("#chat-send")
    expect(page.locator(".msg.assistant .text")).to_contain_text("says: hello dashboard")
    expect(rows["llama"]).to_have_attribute("data-state", "ready")
    screenshot(page, "dashboard.png")

    rows["qwen"].locator('button[data-action="unload"]').click()
    expect(rows["qwen"]).to_have_attribute("data-state", "stopped")
    expect(page.locator('#events li[data-kind="stop"][data-model="qwen"]')).to_have_count(1)

    assert loads == [gateway.url + "/ui/"]  # every change above arrived without a reload
    assert page_errors == []

    dark = open_page(browser, page_errors, color_scheme="dark")
    dark.goto(gateway.url + "/ui/")
    expect(dark.locator('tr[data-model="llama"]')).to_have_attribute("data-state", "ready")
    expect(dark.locator("#events li").first).to_be_visible()
    screenshot(dark, "dashboard-dark.png")
    dark.close()
    page.close()


def test_dashboard_asks_for_a_key_once_per_tab(browser, gateway_factory, page_errors):
    from playwright.sync_api import expect

    gateway = gateway_factory({"chat": fake_model("chat")}, **auth_settings())
    gateway.admin_key = ADMIN_KEY
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))

    page.goto(gateway.url + "/ui/")  # the page itself loads without a key...
    expect(page.locator("#key-dialog")).to_be_visible()  # ...and asks for one
    expect(page.locator("#notice")).to_contain_text("needs an API key")
    expect(page.locator('tr[data-model="chat"]')).to_have_count(0)

    # A key that may use models but not administer them: models and chat, no admin parts.
    page.fill("#key-input", USER_KEY)
    page.click("#key-save")
    expect(page.locator('tr[data-model="chat"]')).to_have_attribute("data-state", "stopped")
    expect(page.locator("#notice")).to_contain_text("not an admin key")
    expect(page.locator("th", has_text="footprint")).to_be_hidden()
    expect(page.locator("#events-panel")).to_be_hidden()
    expect(page.locator('tr[data-model="chat"] button[data-action="load"]')).to_be_hidden()
    page.fill("#chat-input", "hi user")
    page.click("#chat-send")
    expect(page.locator(".msg.assistant .text")).to_contain_text("chat says: hi user")
    expect(page.locator('tr[data-model="chat"]')).to_have_attribute("data-state", "ready")
    screenshot(page, "dashboard-user-key.png")

    # An admin key: everything, and it is kept for this tab across a reload.
    page.click("#key-button")
    page.fill("#key-input", ADMIN_KEY)
    page.click("#key-save")
    expect(page.locator("#events-panel")).to_be_visible()
    expect(page.locator("#live-pill")).to_have_attribute("data-live", "live")
    page.reload()
    expect(page.locator('tr[data-model="chat"]')).to_have_attribute("data-state", "ready")
    expect(page.locator("#key-dialog")).to_be_hidden()
    expect(page.locator('#events li[data-kind="ready"]')).to_have_count(1)

    # Keys travel in headers only: never in a URL, where logs and history would keep them.
    assert not [url for url in urls if ADMIN_KEY in url or USER_KEY in url]
    other = browser.new_context().new_page()
    other.goto(gateway.url + "/ui/")
    expect(other.locator("#key-dialog")).to_be_visible()  # a new session has no key
    other.context.close()
    context.close()
    assert page_errors == []


def test_dashboard_shows_each_keys_turn_at_a_busy_model(browser, gateway_factory, page_errors):
    """A model at its max_in_flight: the row shows the slots in use and each key's share of
    the queue (in flight + waiting), and the header the requests waiting for a turn."""
    import threading

    from playwright.sync_api import expect

    gateway = gateway_factory(
        {"slow": fake_model("slow", max_in_flight=1)},
    )
    page = open_page(browser, page_errors)
    page.goto(gateway.url + "/ui")
    row = page.locator('tr[data-model="slow"]')
    expect(row).to_be_visible()

    def slow_request() -> None:
        body = {"model": "slow", "messages": [{"role": "user", "content": "x"}], "fake_delay": 4}
        request = urllib.request.Request(
            gateway.url + "/v1/chat/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    senders = [threading.Thread(target=slow_request) for _ in range(3)]
    for sender in senders:
        sender.start()
    expect(row).to_contain_text("1 / 1")  # in flight / max_in_flight
    expect(row).to_contain_text("keys: anonymous 1+2")
    expect(page.locator("#gateway-meta")).to_contain_text("2 waiting for a turn")
    for sender in senders:
        sender.join()
    assert page_errors == []
    page.close()


def test_dashboard_shows_a_models_replicas(browser, gateway_factory, tmp_path, page_errors):
    """Under load a model gets a second engine: its row shows x2, with each engine on hover,
    and the GPUs of both."""
    import threading

    from playwright.sync_api import expect

    gpu = tmp_path / "fake-gpu"
    fake_gpu.create(gpu, {0: 24 * GIB, 1: 24 * GIB})
    replicas = {"max": 2, "target_in_flight": 2}
    gateway = gateway_factory(
        {"coder": vllm_like("coder", gpu, "10GiB", "--max-num-seqs", "2", replicas=replicas)},
        gpus=[{"index": 0, "memory": "24GiB"}, {"index": 1, "memory": "24GiB"}],
    )
    chat_request(gateway.url, "coder")
    page = open_page(browser, page_errors)
    page.goto(gateway.url + "/ui")
    row = page.locator('tr[data-model="coder"]')
    expect(row).to_have_attribute("data-state", "ready")
    expect(row.locator(".replicas")).to_have_count(0)  # one engine: nothing more to say

    def slow_request() -> None:
        body = {"model": "coder", "messages": [{"role": "user", "content": "x"}], "fake_delay": 3}
        request = urllib.request.Request(
            gateway.url + "/v1/chat/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    senders = [threading.Thread(target=slow_request) for _ in range(6)]
    for sender in senders:
        sender.start()
    expect(row.locator(".replicas")).to_have_text("\u00d72")  # x2, with the multiplication sign
    expect(row.locator(".replicas")).to_have_attribute("title", re.compile(r"coder#2: \w+"))
    expect(row).to_contain_text("0, 1")
    for sender in senders:
        sender.join()
    assert page_errors == []
    page.close()


def test_dashboard_shows_what_prewarming_expects_of_a_stopped_model(browser, tmp_path, page_errors):
    """With `prewarm: auto` and habits learned before a restart (the state dir's habits
    file), a request for `a` makes the stopped `b` show the predictor's chance under its
    state, its reason on hover; at 50 % (under 70 %) it is not pre-warmed."""
    import time

    from playwright.sync_api import expect

    from modelyard.scheduler.predictor import Predictor
    from modelyard.scheduler.prewarm_habits import HABITS_NAME
    from tests.conftest import start_gateway
    from tests.core.test_prewarm_gateway import taught

    predictor = Predictor()
    taught(predictor, time.time() - 6 * 3600.0)  # a, and b 20 s after every other a
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / HABITS_NAME).write_text(json.dumps(predictor.to_dict()))
    gateway = start_gateway(
        tmp_path, {"a": fake_model("a"), "b": fake_model("b")}, defaults={"prewarm": "auto"}
    )
    try:
        page = open_page(browser, page_errors)
        page.goto(gateway.url + "/ui")
        row = page.locator('tr[data-model="b"]')
        expect(row).to_be_visible()
        expect(row.locator(".prewarm")).to_have_count(0)  # nothing asked: nothing expected
        assert chat_request(gateway.url, "a")["choices"]
        hint = row.locator(".prewarm")
        expect(hint).to_have_text(re.compile(r"next: 50 % within \d+ s"))
        assert hint.get_attribute("title").startswith("after a, 0.50 within ")
        expect(row).to_have_attribute("data-state", "stopped")
        assert page_errors == []
        page.close()
    finally:
        gateway.stop()
    assert gateway.engine_pids() == []
