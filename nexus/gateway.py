"""The running gateway's services, built once by ``app.create_app`` and read by the handlers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .config import Settings
from .dispatch import Dispatcher
from .health import HealthChecker
from .managed import ManagedServer
from .registry import Registry


@dataclass(slots=True)
class Gateway:
    settings: Settings
    registry: Registry
    health: HealthChecker
    dispatcher: Dispatcher
    managed: list[ManagedServer] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)

    def uptime_seconds(self) -> int:
        return int(time.monotonic() - self.started_monotonic)
