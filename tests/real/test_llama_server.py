"""Real llama-server behind Nexus: the official SDK gets text, streams complete side by side,
a client that leaves frees its slot, and real embeddings carry meaning."""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.harness import wait_for

pytestmark = pytest.mark.real
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France? Answer in one sentence."}
]


def sdk(nexus) -> openai.OpenAI:
    return openai.OpenAI(base_url=nexus.url + "/v1", api_key="not-needed", max_retries=0)


def test_chat_answers_with_text(smollm):
    reply = sdk(smollm).chat.completions.create(
        model="smollm2-135m", messages=QUESTION, max_tokens=32, temperature=0
    )
    assert (reply.choices[0].message.content or "").strip()
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert smollm.gateway.registry.get("llama").healthy


def test_stream_answers_with_text(smollm):
    stream = sdk(smollm).chat.completions.create(
        model="smollm2-135m", messages=QUESTION, max_tokens=32, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text.strip()


def test_four_concurrent_streams_all_complete(smollm):
    def one(i: int) -> tuple[str, str | None]:
        ask: list[ChatCompletionMessageParam] = [
            {"role": "user", "content": f"Write one sentence about the number {i}."}
        ]
        stream = sdk(smollm).chat.completions.create(
            model="smollm2-135m",
            messages=ask,
            max_tokens=48,
            stream=True,
        )
        text, finish = "", None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert all(text.strip() for text, _ in results), results
    assert all(finish in ("stop", "length") for _, finish in results), results


def processing(nexus) -> int:
    """Requests the llama-server is working on now, from its own /metrics."""
    backend = nexus.gateway.registry.get("llama")
    text = httpx2.get(backend.url + "/metrics", timeout=5).text
    match = re.search(r"^llamacpp:requests_processing\s+([0-9.]+)", text, re.M)
    assert match, text[:500]
    return int(float(match.group(1)))


def test_a_client_that_leaves_frees_its_slot(smollm):
    long_job = {
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": "Count from 1 to 5000, separated by commas."}],
        "max_tokens": 3000,
        "ignore_eos": True,  # llama.cpp's own key: passes through Nexus untouched
        "stream": True,
    }
    with httpx2.Client(timeout=60) as http:
        streams = [
            http.stream("POST", smollm.url + "/v1/chat/completions", json=long_job)
            for _ in range(4)
        ]
        readers = []  # kept alive: dropping a reader would close its response early
        for cm in streams:
            resp = cm.__enter__()
            assert resp.status_code == 200
            readers.append(resp.iter_raw())
            next(readers[-1])  # generation has started
        busy = processing(smollm)
        assert busy == 4, busy  # every slot busy for a long while (3000 tokens each)
        for cm in streams:
            cm.__exit__(None, None, None)  # the client goes away
    # Each would run for tens of seconds; the slots come free as soon as Nexus closes upstream.
    assert wait_for(lambda: processing(smollm) == 0, timeout=5)
    assert smollm.gateway.registry.get("llama").in_flight == 0
    reply = sdk(smollm).chat.completions.create(
        model="smollm2-135m", messages=QUESTION, max_tokens=8
    )
    assert reply.choices[0].message.content


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_real_embeddings_have_384_dimensions_and_meaning(minilm):
    result = sdk(minilm).embeddings.create(
        model="all-minilm-l6-v2", input=["cat", "kitten", "stocks"]
    )
    cat, kitten, stocks = (item.embedding for item in result.data)
    assert len(cat) == len(kitten) == len(stocks) == 384
    assert cosine(cat, kitten) > cosine(cat, stocks)
    assert result.usage.prompt_tokens > 0  # the backend's own count, passed through
