"""vLLM's own `vllm:` metrics from every running engine, as one scrape target.

Prometheus could scrape `/upstream/{model}/metrics`, but that route starts a stopped engine
and counts as use, so a 15 s scrape would keep every model loaded forever. This reads only
engines that are ready *now*, straight from their port, adds a `model` label (the name in
the gateway's config) and a `replica` label (the engine's key: the model's name for its own
engine, `coder#2` for a replica) and merges the families, so one target covers engines that
come and go.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

MODEL_LABEL = "model"
REPLICA_LABEL = "replica"


async def scrape_engines(
    session: aiohttp.ClientSession, base_urls: Mapping[str, str], timeout: float = 5.0
) -> dict[str, str | None]:
    """Each engine's `/metrics` text, or None for an engine that did not answer in time."""

    async def scrape(url: str) -> str | None:
        try:
            async with session.get(
                url + "/metrics", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                return await response.text() if response.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
            return None

    names = list(base_urls)
    texts = await asyncio.gather(*(scrape(base_urls[name]) for name in names))
    return dict(zip(names, texts, strict=True))


def merge_expositions(
    texts: Mapping[str, str | None], models: Mapping[str, str] | None = None
) -> bytes:
    """One exposition with every engine's samples labelled by model and replica, plus an up
    gauge. `texts` are by engine key; `models` gives each key's model (default: the key)."""
    families: dict[str, Metric] = {}
    up = GaugeMetricFamily(
        "modelyard_engine_metrics_up",
        "1 if the engine's own /metrics answered this scrape, 0 if not.",
        labels=[MODEL_LABEL, REPLICA_LABEL],
    )
    for key, text in texts.items():
        model = models.get(key, key) if models is not None else key
        parsed = _parse(text) if text is not None else None
        up.add_metric([model, key], 0.0 if parsed is None else 1.0)
        for family in parsed or []:
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            elif merged.type != family.type:
                continue  # two engine versions disagree; keep the first one's samples
            for sample in family.samples:
                labels = dict(sample.labels)
                for name in (MODEL_LABEL, REPLICA_LABEL):
                    if name in labels:
                        labels["exported_" + name] = labels[name]
                labels[MODEL_LABEL] = model
                labels[REPLICA_LABEL] = key
                merged.add_sample(sample.name, labels, sample.value, sample.timestamp)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed([*families.values(), up]))
    return generate_latest(registry)


def _parse(text: str) -> list[Metric] | None:
    try:
        return list(text_string_to_metric_families(text))
    except ValueError:
        return None


class _Fixed(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families
