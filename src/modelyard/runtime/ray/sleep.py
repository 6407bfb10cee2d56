"""vLLM's sleep and wake on a cluster: the same HTTP calls, then the engine's node reports.

Placement measures what a sleeping engine still holds right after the sleep; on one machine
NVML answers at once, on a cluster the answer is the node agent's last report. Asking the
node again after a sleep or wake keeps that measurement from predating it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from modelyard.runtime.ray.cluster import RayCluster
from modelyard.runtime.vllm_sleep import VllmSleepControl


class ClusterSleepControl:
    def __init__(self, inner: VllmSleepControl, cluster: RayCluster) -> None:
        self._inner = inner
        self._cluster = cluster

    async def sleep(self, base_url: str, level: int) -> None:
        await self._inner.sleep(base_url, level)
        await self._refresh(base_url)

    async def wake(self, base_url: str) -> None:
        await self._inner.wake(base_url)
        await self._refresh(base_url)

    async def _refresh(self, base_url: str) -> None:
        host = urlsplit(base_url).hostname
        for node in self._cluster.live_nodes():
            if node.ip == host:
                await self._cluster.refresh(node.node_id)
