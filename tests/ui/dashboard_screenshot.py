"""The dashboard picture in the README and the docs, taken from the real demo.

    python -m tests.ui.dashboard_screenshot [docs/images/dashboard.png]

Starts `modelyard demo` on a free port (real vLLM on CPU), asks `chat` one question so an
engine is ready and events have happened, opens /ui in Debian's Chromium (headless, through
Playwright, as tests/ui does) and saves the window. About a minute on a CPU, once the demo is
built.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.conftest import free_port
from tests.ui.test_dashboard import CHROMIUM, CHROMIUM_ARGS

OUT = Path(__file__).resolve().parents[2] / "docs" / "images" / "dashboard.png"


def ask(url: str, model: str, question: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 24}
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        response.read()


def main(out: Path) -> None:
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    scratch = Path(tempfile.mkdtemp(prefix="modelyard-screenshot-"))
    log = scratch / "demo.log"
    # A state folder of its own: the picture shows this run's events only.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_STATE_HOME": str(scratch / "state")}
    with log.open("w") as sink:
        demo = subprocess.Popen(
            [sys.executable, "-m", "modelyard", "demo", "--port", str(port)],
            stdout=sink, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while "modelyard listening on http" not in log.read_text():
            if demo.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the demo did not start:\n{log.read_text()}")
            time.sleep(0.2)
        ask(url, "chat", "Say hello in five words")
        ask(url, "chat", "Name a colour")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url + "/ui")
            page.wait_for_selector('tr[data-model="chat"][data-state="ready"]', timeout=30_000)
            # A question in the chat box; its streamed answer is stopped after a few lines
            # (on a CPU the small model would write up to its whole context).
            page.select_option("#chat-model", "chat")
            page.fill("#chat-input", "What is a GPU? Answer in one sentence.")
            page.click("#chat-send")
            answer = page.locator(".msg.assistant .text")
            deadline = time.monotonic() + 120  # the page's policy allows no evaluated script
            while len(answer.text_content() or "") < 120 and time.monotonic() < deadline:
                page.wait_for_timeout(200)
            page.click("#chat-send")  # Stop
            page.wait_for_timeout(1500)  # the event feed fills from the live stream
            page.mouse.wheel(0, -10_000)  # typing scrolled the window a little
            page.wait_for_timeout(300)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            browser.close()
        print(f"wrote {out}")
    finally:
        demo.send_signal(signal.SIGTERM)
        demo.wait(timeout=120)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
