"""The reload diff as pure logic: which changes need a new engine and which apply live."""

from __future__ import annotations

import asyncio
from typing import Any

from modelyard.config.loader import parse_config
from modelyard.scheduler.reload_plan import plan_reload

BASE: dict[str, Any] = {
    "models": {
        "chat": {"model": "/m/chat", "aliases": ["c"], "idle_timeout": 60},
        "tool": {"engine": "command", "command": ["srv", "{port}"]},
        "far": {"engine": "remote", "url": "http://h:1"},
    }
}


def plan(change: dict[str, Any], base: dict[str, Any] = BASE) -> Any:
    new = {**base, **change}
    return plan_reload(parse_config(base), parse_config(new))


def test_the_same_file_changes_nothing():
    result = plan({})
    assert (result.added, result.removed, result.engine_changed, result.changes) == (
        [],
        [],
        [],
        [],
    )


def test_live_fields_do_not_touch_the_engine():
    models = {**BASE["models"], "chat": {**BASE["models"]["chat"], "aliases": ["c", "d"]}}
    models["chat"]["idle_timeout"] = 600
    models["chat"]["route"] = "/chat"
    models["chat"]["pinned"] = True
    result = plan({"models": models, "log_format": "json", "limits": {"max_queue": 5}})
    assert result.engine_changed == []
    details = [(c.what, c.model, c.detail) for c in result.changes]
    assert (
        "model_settings",
        "chat",
        "changed live: aliases, idle_timeout, pinned, route",
    ) in details
    assert ("setting", None, "log_format: text -> json") in details
    assert ("setting", None, "limits: max_queue") in details


def test_engine_changes_are_found_through_shared_settings_too():
    # defaults.env reaches every started engine, not the remote one.
    result = plan({"defaults": {"env": {"HF_HOME": "/cache"}}})
    assert sorted(result.engine_changed) == ["chat", "tool"]
    # vllm.executable reaches vLLM engines only.
    assert plan({"vllm": {"executable": ["/venv/bin/vllm", "serve"]}}).engine_changed == ["chat"]
    models = {**BASE["models"], "far": {"engine": "remote", "url": "http://h:2"}}
    assert plan({"models": models}).engine_changed == ["far"]
    models = {**BASE["models"], "chat": {**BASE["models"]["chat"], "served_name": "x"}}
    assert plan({"models": models}).engine_changed == ["chat"]


def test_added_removed_and_start_only_settings():
    models = {k: v for k, v in BASE["models"].items() if k != "tool"}
    models["new"] = {"model": "/m/new"}
    result = plan({"models": models, "state_dir": "/elsewhere"})
    assert (result.added, result.removed) == (["new"], ["tool"])
    assert any(note.startswith("state_dir:") for note in result.not_applied)


async def test_a_reloaded_health_check_interval_starts_and_stops_the_watchdog():
    from modelyard.scheduler.watchdog import EngineWatchdog, WatchdogSettings

    checks = 0

    async def probe(engine: object, timeout: float) -> bool:
        nonlocal checks
        checks += 1
        return True

    watchdog = EngineWatchdog({}, probe, WatchdogSettings(0, 1, 3))
    watchdog.start()
    assert watchdog._task is None
    watchdog.reconfigure(WatchdogSettings(0.01, 1, 3))
    assert watchdog._task is not None
    running = watchdog._task
    watchdog.reconfigure(WatchdogSettings(0, 1, 3))  # 0 would otherwise spin
    assert watchdog._task is None
    await asyncio.sleep(0)
    assert running.cancelled() or running.done()
    await watchdog.close()


def test_every_top_level_setting_is_either_applied_live_or_reported():
    from modelyard.config.schema import GatewayConfig
    from modelyard.scheduler.reload_plan import (
        LIVE_SETTINGS,
        PER_MODEL_SETTINGS,
        START_ONLY_SETTINGS,
    )

    # A new setting must be classified here, or a reload would silently ignore it.
    classified = {*LIVE_SETTINGS, *PER_MODEL_SETTINGS, *START_ONLY_SETTINGS}
    assert classified == set(GatewayConfig.model_fields)
    result = plan({"cors": {"allowed_origins": ["https://chat.example"]}})
    assert [c.detail.split(":")[0] for c in result.changes] == ["cors"]
