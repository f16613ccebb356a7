"""Client keys as the official SDKs see them (issue 12): each sends its key its own way (the
``openai`` SDK as a bearer token, the ``anthropic`` SDK as ``x-api-key``), and each maps Nexus's
401, 403 and 429 to its own error classes, with the rate-limit headers it reads."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest

from tests.fakes import FakeOpenAI
from tests.harness import settings_for

HI: list[Any] = [{"role": "user", "content": "hi"}]


@pytest.fixture
def keyed(start_fake, start_nexus, client) -> tuple[Any, Any]:
    fake = start_fake(FakeOpenAI(["m", "other"]))
    backends = [{"name": "local", "url": fake.url, "type": "vllm"}]
    nexus = start_nexus(settings_for(backends=backends, auth={"enabled": True}))

    def make(**settings: Any) -> str:
        resp = client.post(nexus.url + "/admin/keys", json=settings)
        assert resp.status_code == 201, resp.text
        return str(resp.json()["key"])

    return nexus, make


def test_openai_sdk_with_a_key(keyed) -> None:
    nexus, make = keyed
    key = make(name="sdk", rpm=2, models=["m"])
    sdk = openai.OpenAI(base_url=nexus.url + "/v1", api_key=key, max_retries=0)
    raw = sdk.chat.completions.with_raw_response.create(model="m", messages=HI)
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert [m.id for m in sdk.models.list()] == ["m"]  # what this key may use

    with pytest.raises(openai.PermissionDeniedError) as denied:
        sdk.chat.completions.create(model="other", messages=HI)
    assert "may use: m" in denied.value.message
    with pytest.raises(openai.RateLimitError) as limited:
        sdk.responses.create(model="m", input="hi")
    assert int(limited.value.response.headers["retry-after"]) >= 1

    wrong = openai.OpenAI(base_url=nexus.url + "/v1", api_key=key[:-1] + "x", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="m", messages=HI)


def test_anthropic_sdk_with_a_key(keyed) -> None:
    nexus, make = keyed
    key = make(name="claude", rpm=1)
    sdk = anthropic.Anthropic(base_url=nexus.url, api_key=key, max_retries=0)
    message = sdk.messages.create(model="m", max_tokens=16, messages=HI)
    assert message.content and message.content[0].type == "text"
    with pytest.raises(anthropic.RateLimitError) as limited:
        sdk.messages.create(model="m", max_tokens=16, messages=HI)
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]

    wrong = anthropic.Anthropic(base_url=nexus.url, api_key="nx-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        wrong.messages.create(model="m", max_tokens=16, messages=HI)
    assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
