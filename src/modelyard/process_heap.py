"""Garbage collection settings for a long-running serving process."""

from __future__ import annotations

import gc


def keep_startup_heap() -> None:
    """What startup made (modules, configuration, the app) lives as long as the process: move
    it out of the cycle collector's sight, so a full collection under load scans only what
    requests made. Profiled: without it, collections took a tenth of the gateway's CPU in a
    burst of 1,000 new streams."""
    gc.collect()
    gc.freeze()
