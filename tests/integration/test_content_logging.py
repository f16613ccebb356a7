"""Message content reaches the log only with [logging] enable_content_logging = true."""

from __future__ import annotations

import logging

from tests.fakes import FakeOpenAI
from tests.harness import settings_for, wait_for

SECRET = "the-launch-code-is-0000"
BODY = {"model": "mock-model", "messages": [{"role": "user", "content": SECRET}]}


def access_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "nexus.access"]


def test_content_is_not_logged_by_default(start_fake, start_nexus, client, caplog):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("gpu", fake, "vllm")))
    with caplog.at_level(logging.DEBUG, logger="nexus"):
        assert client.post(nexus.url + "/v1/chat/completions", json=BODY).status_code == 200
        assert wait_for(lambda: len(access_lines(caplog)) == 1)
    assert all(SECRET not in r.getMessage() for r in caplog.records)
    assert all(SECRET not in str(vars(r)) for r in caplog.records)
    history = client.get(nexus.url + "/v1/history").text
    assert SECRET not in history


def test_content_is_logged_when_enabled(start_fake, start_nexus, client, caplog):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(
        settings_for(("gpu", fake, "vllm"), logging={"enable_content_logging": True})
    )
    with caplog.at_level(logging.INFO, logger="nexus.access"):
        assert client.post(nexus.url + "/v1/chat/completions", json=BODY).status_code == 200
        assert wait_for(lambda: len(access_lines(caplog)) == 1)
    (line,) = access_lines(caplog)
    assert SECRET in line.getMessage()
    assert line.content == SECRET  # type: ignore[attr-defined]
    assert SECRET not in client.get(nexus.url + "/v1/history").text  # logs only
