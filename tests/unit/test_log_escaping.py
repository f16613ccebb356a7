"""Pretty logs keep one record on one line: a client's control characters cannot forge a line
or drive the terminal (issue 8, point 3). Through the real pipeline: queue handler, listener,
stream."""

from __future__ import annotations

import io
import logging
import logging.handlers
from collections.abc import Iterator

import pytest

from nexus.config import LoggingSettings
from nexus.telemetry.logging import configure_logging

FORGED = "gpt\n12:00:00 WARNING nexus.admin: backend deleted\r\x1b[2J\x9b31m\u2028x\x00"


@pytest.fixture
def pretty_log() -> Iterator[tuple[logging.handlers.QueueListener, io.StringIO]]:
    listener = configure_logging(LoggingSettings(level="info", format="pretty"))
    output = io.StringIO()
    stream = listener.handlers[0]
    assert isinstance(stream, logging.StreamHandler)
    stream.setStream(output)  # the configured handler and formatter, writing where we can read
    yield listener, output
    if listener._thread is not None:  # not stopped by the test already
        listener.stop()
    for name in ("nexus", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    logging.getLogger("nexus").setLevel(logging.NOTSET)


def lines_of(log: tuple[logging.handlers.QueueListener, io.StringIO]) -> list[str]:
    listener, output = log
    listener.stop()  # flushes the queue
    return output.getvalue().splitlines()


def test_control_characters_in_arguments_are_escaped(pretty_log):
    logging.getLogger("nexus.access").info("POST %s model=%s", "/v1/chat/completions", FORGED)
    lines = lines_of(pretty_log)
    assert len(lines) == 1, lines
    line = lines[0]
    assert "model=gpt\\n12:00:00 WARNING nexus.admin: backend deleted\\r\\x1b[2J\\x9b31m" in line
    assert "\\u2028x\\x00" in line
    assert not any(c in line for c in "\x1b\x9b\r\x00\u2028")


def test_a_traceback_keeps_its_lines_indented(pretty_log):
    try:
        raise ValueError(FORGED)
    except ValueError:
        logging.getLogger("nexus.api").exception("unexpected error on %s", "/x\n/y")
    lines = lines_of(pretty_log)
    assert "unexpected error on /x\\n/y" in lines[0]
    assert len(lines) > 2 and all(line.startswith("  ") for line in lines[1:]), lines
    assert not any("\x1b" in line for line in lines)


def test_ordinary_messages_are_unchanged(pretty_log):
    logging.getLogger("nexus.health").info("backend %s is healthy (%d ms) — ok", "gpu-1", 12)
    (line,) = lines_of(pretty_log)
    assert line.endswith("nexus.health: backend gpu-1 is healthy (12 ms) — ok")
