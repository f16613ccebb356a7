"""Print how many requests the fuzz tier sent, and what they were answered with."""

from __future__ import annotations

import pytest

from .tally import SLOWEST, TALLY


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TALLY:
        return
    total = TALLY["requests"]
    statuses = sorted((key, n) for key, n in TALLY.items() if key != "requests")
    terminalreporter.write_sep("-", f"fuzz tier: {total} generated requests sent")
    for key, n in statuses:
        terminalreporter.write_line(f"  {key}: {n}")
    for seconds, what in SLOWEST:
        terminalreporter.write_line(f"  slowest: {seconds * 1000:.0f} ms {what}")
