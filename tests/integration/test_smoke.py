from __future__ import annotations

from tests.fakes import FakeOpenAI
from tests.harness import settings_for


def test_chat_goes_through_to_the_backend(start_fake, start_nexus, client):
    fake = start_fake(FakeOpenAI())
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm")))
    resp = client.post(
        f"{nexus.url}/v1/chat/completions",
        json={"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["content"] == "Hello!"
    assert resp.headers["x-nexus-backend"] == "vllm-1"
    assert fake.calls("/v1/chat/completions")[0].json["messages"][0]["content"] == "hi"
