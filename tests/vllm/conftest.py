"""Fixtures for the real vLLM tests: the demo's engine venv, models and adapters."""

from __future__ import annotations

import pytest

from modelyard.demo import DemoSetup, prepare_demo


@pytest.fixture(scope="session")
def demo() -> DemoSetup:
    """The demo's engine venv and models: built once per machine (minutes), then reused."""
    return prepare_demo()
