"""The Grafana dashboard and the Prometheus config in deploy/: valid, and only real metrics."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.conftest import fake_model
from tests.observability.scrape import scrape

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "modelyard.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
MODELYARD_NAME = re.compile(r"\bmodelyard_[a-zA-Z0-9_]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> list[str]:
    found = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            found.append(query["query"])
    return found


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "modelyard"
    assert dashboard["title"] == "modelyard"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    for expr in queries(dashboard):
        assert expr.count("(") == expr.count(")"), expr
        assert expr.count("{") == expr.count("}"), expr
    names = {m for expr in queries(dashboard) for m in MODELYARD_NAME.findall(expr)}
    assert len(names) >= 15
    assert any(expr.startswith("sum by (model) (vllm:") for expr in queries(dashboard))


async def test_every_modelyard_metric_the_dashboard_queries_is_exported(gateway_factory):
    gateway = gateway_factory({"chat": fake_model("chat")})
    async with aiohttp.ClientSession() as session:
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with session.post(gateway.url + "/v1/chat/completions", json=body) as response:
            await response.read()
    samples, families = await scrape(gateway.url + "/metrics")
    exported = {
        family.name + suffix for family in families for suffix in SUFFIXES.get(family.type, ("",))
    }
    with_samples = {name for name, _ in samples}
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {m for expr in queries(dashboard) for m in MODELYARD_NAME.findall(expr)}
    engine_samples, _ = await scrape(gateway.url + "/metrics/engines")
    exported |= {name for name, _ in engine_samples}
    assert sorted(queried - exported) == []
    # Most of them even have values after one streamed request (GPU and footprint series
    # appear only where placement manages GPUs).
    without = sorted(name for name in queried - with_samples if "gpu_" not in name
                     and "footprint" not in name)  # fmt: skip
    assert without == []


def test_prometheus_config_scrapes_both_gateway_targets() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    paths = {job["job_name"]: job["metrics_path"] for job in config["scrape_configs"]}
    assert paths == {"modelyard": "/metrics", "modelyard-engines": "/metrics/engines"}


def test_promtool_accepts_the_prometheus_config(tmp_path: Path) -> None:
    # promtool checks that the key file exists; compose mounts it as a secret at run time,
    # so the check runs on a copy that points at a key file made here.
    key_file = tmp_path / "modelyard-metrics.key"
    key_file.write_text("my-metrics-key\n")
    text = PROMETHEUS.read_text().replace("/run/secrets/modelyard-metrics.key", str(key_file))
    assert str(key_file) in text
    config = tmp_path / "prometheus.yml"
    config.write_text(text)
    result = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    # Grafana's variables become ordinary values; promtool then checks each query's PromQL.
    substitutions = {"$__rate_interval": "1m", "$__range": "1h", "$model": ".*"}
    rules = []
    for number, expr in enumerate(queries(json.loads(DASHBOARD.read_text()))):
        if expr.startswith("label_values("):
            continue  # a Grafana function, not PromQL
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
