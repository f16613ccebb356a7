"""The log formats, and that message content is logged only when asked for."""

from __future__ import annotations

import logging

import orjson

from nexus.config import LoggingSettings
from nexus.telemetry.logging import JSONFormatter, configure_logging, level_of


def record(**extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("nexus.access", logging.INFO, __file__, 1, "done %s", ("ok",), None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_json_lines_carry_the_message_and_the_request_fields():
    line = JSONFormatter().format(record(request_id="r1", status=200, backend="gpu"))
    entry = orjson.loads(line)
    assert entry["message"] == "done ok"
    assert entry["level"] == "info" and entry["logger"] == "nexus.access"
    assert (entry["request_id"], entry["status"], entry["backend"]) == ("r1", 200, "gpu")
    assert entry["ts"].endswith("Z")


def test_levels_accept_the_rust_spellings():
    assert level_of("trace") == logging.DEBUG
    assert level_of("warn") == logging.WARNING
    assert level_of("error") == logging.ERROR


def test_component_levels_apply_per_part_of_nexus():
    listener = configure_logging(
        LoggingSettings(level="warn", component_levels={"health": "debug"})
    )
    try:
        assert logging.getLogger("nexus").level == logging.WARNING
        assert logging.getLogger("nexus.health").level == logging.DEBUG
    finally:
        listener.stop()
        for name in ("nexus", "uvicorn", "uvicorn.error"):
            logger = logging.getLogger(name)
            logger.handlers = []
            logger.propagate = True
        logging.getLogger("nexus.health").setLevel(logging.NOTSET)
        logging.getLogger("nexus").setLevel(logging.NOTSET)
