"""A backend marked down by a real request comes back through probes; every inference request
leaves one log line carrying its request id."""

from __future__ import annotations

import logging

from nexus.registry import Status
from tests.fakes import FakeOpenAI
from tests.harness import settings_for, wait_for

CHAT = "/v1/chat/completions"
BODY = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}


def test_backend_marked_down_by_a_request_recovers_through_probes(
    loop_thread, start_fake, start_nexus, client
):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(
        settings_for(
            ("gpu", fake, "vllm"),
            health_check={"interval_seconds": 0.2, "recovery_threshold": 2},
        )
    )
    backend = nexus.gateway.registry.get("gpu")
    assert backend.status is Status.HEALTHY

    loop_thread.run(fake.stop())
    resp = client.post(nexus.url + CHAT, json=BODY)
    assert resp.status_code == 502
    assert backend.status is Status.UNHEALTHY  # at once, not after three probe intervals
    assert client.post(nexus.url + CHAT, json=BODY).status_code == 503  # not tried again

    loop_thread.run(fake.start())  # same port again
    assert wait_for(lambda: backend.status is Status.HEALTHY), backend.last_error
    assert client.post(nexus.url + CHAT, json=BODY).status_code == 200


def test_each_inference_request_is_logged_with_its_request_id(
    start_fake, start_nexus, client, caplog
):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("gpu", fake, "vllm")))
    with caplog.at_level(logging.INFO, logger="nexus.access"):
        ok = client.post(nexus.url + CHAT, json=BODY, headers={"X-Request-Id": "req-42"})
        missing = client.post(nexus.url + CHAT, json={**BODY, "model": "nope"})
        assert wait_for(lambda: len(access_records(caplog)) == 2)
    first, second = access_records(caplog)
    assert ok.headers["x-request-id"] == "req-42"
    assert (first.request_id, first.status, first.backend) == ("req-42", 200, "gpu")  # type: ignore[attr-defined]
    assert "req-42" in first.getMessage()
    assert second.request_id == missing.headers["x-request-id"]  # type: ignore[attr-defined]
    assert second.status == 404  # type: ignore[attr-defined]


def test_failover_warning_names_the_request(start_fake, start_nexus, client, caplog):
    from tests.fakes import Reply

    first, second = start_fake(FakeOpenAI()), start_fake(FakeOpenAI())
    first.push(CHAT, Reply(status=500, json={"error": {"message": "boom"}}))
    nexus = start_nexus(
        settings_for(
            backends=[
                {"name": "first", "url": first.url, "type": "vllm", "priority": 1},
                {"name": "second", "url": second.url, "type": "vllm", "priority": 2},
            ]
        )
    )
    with caplog.at_level(logging.WARNING, logger="nexus.dispatch"):
        resp = client.post(nexus.url + CHAT, json=BODY, headers={"X-Request-Id": "req-7"})
    assert resp.headers["x-nexus-backend"] == "second"
    warnings = [r.getMessage() for r in caplog.records if r.name == "nexus.dispatch"]
    assert any("req-7" in w and "first" in w for w in warnings), warnings


def access_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "nexus.access"]
