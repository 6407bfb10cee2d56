"""Runtime: *how* engines run. Local processes now; containers later behind the same shape."""

from modelyard.runtime.process import EngineProcess, EngineStartError, ProcessRuntime
from modelyard.runtime.registry import ProcessRegistry

__all__ = ["EngineProcess", "EngineStartError", "ProcessRegistry", "ProcessRuntime"]
