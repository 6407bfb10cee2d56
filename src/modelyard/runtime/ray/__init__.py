"""Engines on a Ray cluster (`runtime: ray`, `pip install 'modelyard[ray]'`).

Imported only when the config asks for it, so the gateway never needs Ray otherwise.
"""

from modelyard.runtime.ray.cluster import RayCluster, RayUnavailable
from modelyard.runtime.ray.engine import RayEngine, RayRuntime

__all__ = ["RayCluster", "RayEngine", "RayRuntime", "RayUnavailable"]
