"""Logging that never blocks the event loop: records go through a queue to a writer thread.

``pretty`` is for people at a terminal, ``json`` (one object per line) for machines.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import re
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


# C0 and C1 controls (ESC and CSI start terminal sequences), DEL, and the Unicode line breaks.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or char.encode(
        "unicode_escape"
    ).decode("ascii")


class EscapingFormatter(logging.Formatter):
    """The message of a pretty line, made safe: control characters in it (a client's model
    name or path among its arguments) are escaped, so that no one can forge a log line or
    drive the terminal. A traceback keeps its lines, each indented: none starts like a record.
    It runs in the queue handler, before the traceback is joined to the message."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _UNSAFE.sub(_escape, super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(stack_info)


def _indented(text: str) -> str:
    return "\n".join("  " + _UNSAFE.sub(_escape, line) for line in text.split("\n"))


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
    if settings.format != "json":
        handler.setFormatter(EscapingFormatter())
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
