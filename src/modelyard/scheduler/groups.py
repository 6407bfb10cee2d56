"""Exclusive groups without GPU placement: starting one member stops the others.

With managed GPUs the placement policy honours exclusive groups (it sleeps or stops the running
member as part of its plan). Without GPUs (CPU engines, such as the demo's two vLLM models on
a 2-core machine) there is no placement coordinator, so this small hook does the same job
through the supervisors' `prepare` step.
"""

from __future__ import annotations

import asyncio

from modelyard.config.schema import GatewayConfig
from modelyard.engines.base import MemoryBudget
from modelyard.scheduler.supervisor import ModelState, ModelSupervisor

_AT_REST = (ModelState.STOPPED, ModelState.FAILED)


class ExclusiveGroups:
    def __init__(self, config: GatewayConfig) -> None:
        self.peers: dict[str, list[str]] = {}
        self.reconfigure(config)
        self._supervisors: dict[str, ModelSupervisor] = {}
        self._lock = asyncio.Lock()
        self._preparing: set[str] = set()

    def reconfigure(self, config: GatewayConfig) -> None:
        """The groups of a (reloaded) config; starts in progress finish under the old ones."""
        peers: dict[str, list[str]] = {}
        for group in config.groups.values():
            if group.exclusive:
                for member in group.members:
                    peers[member] = [m for m in group.members if m != member]
        self.peers = peers

    def __bool__(self) -> bool:
        return bool(self.peers)

    def attach(self, supervisors: dict[str, ModelSupervisor]) -> None:
        self._supervisors = supervisors

    async def prepare(self, supervisor: ModelSupervisor) -> MemoryBudget | None:
        """Stop the running members of `supervisor`'s group before its engine starts."""
        name = supervisor.name
        if not self.peers.get(name):
            return None  # in no exclusive group: nothing to wait for
        self._preparing.add(name)
        try:
            # One start decides at a time. A peer still waiting here has no engine yet and
            # is skipped: stopping it would wait for its start, which waits for this lock.
            async with self._lock:
                for peer_name in self.peers.get(name, []):
                    peer = self._supervisors.get(peer_name)
                    if peer is None or peer.state in _AT_REST or peer_name in self._preparing:
                        continue
                    # Drains the peer's requests in flight first, then stops its engine.
                    await peer.stop(f"exclusive group: {name!r} is starting")
        finally:
            self._preparing.discard(name)
        return None
