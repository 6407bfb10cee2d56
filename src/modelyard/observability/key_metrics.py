"""Usage per API key and model as Prometheus series, read from the token ledger at scrape time.

The ledger's totals are kept across restarts, so these counters never go back to 0 when the
gateway restarts (Prometheus' `rate()` sees no reset); the key's *name* is the label, never
the key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from modelyard.auth.authenticator import Authenticator


class KeyUsageCollector(Collector):
    def __init__(self, auth: Callable[[], Authenticator | None]) -> None:
        self._auth = auth

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        requests, prompt, completion, remaining = families = self._families()
        auth = self._auth()
        if auth is None:
            return families
        for key, models in auth.ledger.all_usage().items():
            for model, usage in models.items():
                requests.add_metric([key, model], usage.requests)
                prompt.add_metric([key, model], usage.prompt_tokens)
                completion.add_metric([key, model], usage.completion_tokens)
        for api_key in (*auth.keyring.keys, *auth.runtime_keys.keys()):
            budget = auth.ledger.budget_report(api_key)
            if budget is not None and not api_key.revoked:
                remaining.add_metric([api_key.name, str(budget["period"])], budget["remaining"])
        return families

    @staticmethod
    def _families() -> tuple[
        CounterMetricFamily, CounterMetricFamily, CounterMetricFamily, GaugeMetricFamily
    ]:
        per_key_model = ["key", "model"]
        return (
            CounterMetricFamily(
                "modelyard_key_requests",
                "Answered requests by API key name and model (kept across restarts).",
                labels=per_key_model,
            ),
            CounterMetricFamily(
                "modelyard_key_prompt_tokens",
                "Prompt tokens by API key name and model, from the engines' usage.",
                labels=per_key_model,
            ),
            CounterMetricFamily(
                "modelyard_key_completion_tokens",
                "Completion tokens by API key name and model, from the engines' usage.",
                labels=per_key_model,
            ),
            GaugeMetricFamily(
                "modelyard_key_budget_remaining_tokens",
                "Tokens left in each key's budget for the current period.",
                labels=["key", "period"],
            ),
        )
