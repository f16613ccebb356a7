"""Logging that never blocks the event loop: records go through a queue to a writer thread.

``pretty`` is for people at a terminal, ``json`` (one object per line) for machines.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

import orjson

from ..config import LoggingSettings

_LEVELS = {"trace": logging.DEBUG, "warn": logging.WARNING}
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def level_of(name: str) -> int:
    return _LEVELS.get(name.lower(), logging.getLevelName(name.upper()))  # type: ignore[no-any-return]


def configure_logging(settings: LoggingSettings) -> logging.handlers.QueueListener:
    """Route ``nexus.*`` (and uvicorn's) logs through a queue; returns the started listener."""
    stream = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        stream.setFormatter(JSONFormatter())
    else:
        stream.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, stream, respect_handler_level=False)
    handler = logging.handlers.QueueHandler(records)
    for name in ("nexus", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
    logging.getLogger("uvicorn.error").propagate = True
    logging.getLogger("uvicorn.error").handlers = []
    logging.getLogger("nexus").setLevel(level_of(settings.level))
    logging.getLogger("uvicorn").setLevel(max(level_of(settings.level), logging.INFO))
    for component, level in settings.component_levels.items():
        logging.getLogger(f"nexus.{component}").setLevel(level_of(level))
    listener.start()
    return listener
