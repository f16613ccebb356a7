"""Fixtures shared by the integration tests that run a real ``nexus serve`` process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.test_spend_persistence import Serve


@pytest.fixture
def served() -> Iterator[Callable[[Path], Serve]]:
    """Start ``nexus serve`` on a config file, ready; every one started is stopped after."""
    started: list[Serve] = []

    def start(config_path: Path) -> Serve:
        serve = Serve(config_path)
        started.append(serve)
        serve.wait_ready()
        return serve

    yield start
    for serve in started:
        serve.stop()
