"""Prefix-cache affinity with real llama-servers: time to first token, affinity on vs off.

    python bench/affinity.py [--prompts 3] [--rounds 4]

Nexus manages two llama-servers (SmolLM2-135M, 2 slots each; scripts/build-llama-server and
scripts/fetch-models put them in the cache) and spreads requests round-robin. Each request
carries one of a few long system prompts (about 1,000 tokens each) and a short question: more
prompts than one server has slots. With affinity off, each prompt keeps moving between the two
servers and its prompt is processed again and again; with affinity on, each prompt stays where it
was first served and later requests reuse that server's prompt cache.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parents[1]
NEXUS = Path(sys.executable).parent / "nexus"


def config(port: int, affinity: bool, model: Path, binary: str) -> str:
    backend = """
[[backends]]
name = "{name}"
type = "llamacpp"
[backends.managed]
model = "{model}"
binary = "{binary}"
alias = "smollm2"
slots = 2
context = 8192
threads = 1
"""
    return (
        f'[server]\nport = {port}\n[discovery]\nenabled = false\ninterfaces = ["127.0.0.1"]\n'
        f'[routing]\nstrategy = "round_robin"\naffinity = {str(affinity).lower()}\n'
        + "".join(backend.format(name=n, model=model, binary=binary) for n in ("gpu-a", "gpu-b"))
    )


def system_prompt(i: int) -> str:
    facts = " ".join(f"Fact {j} of dossier {i}: item {i * 1000 + j} is filed under shelf {j % 17}."
                     for j in range(45))  # fmt: skip
    return f"You are archivist #{i}. Answer from this dossier only. {facts}"


def ttft(http: httpx2.Client, url: str, prompt: str, question: str) -> tuple[float, str]:
    body = {
        "model": "smollm2",
        "stream": True,
        "max_tokens": 1,
        "messages": [{"role": "system", "content": prompt}, {"role": "user", "content": question}],
    }
    start = time.perf_counter()
    with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        elapsed = None
        for line in resp.iter_lines():
            if elapsed is None and line.startswith("data:"):
                elapsed = time.perf_counter() - start
        assert elapsed is not None, "no event"
    reason = (
        resp.headers.get("x-nexus-route-reason", "") + "@" + resp.headers.get("x-nexus-backend", "")
    )
    return elapsed * 1000, reason


def run(affinity: bool, prompts: int, rounds: int, model: Path, binary: str) -> list[float]:
    port = 18900 + (1 if affinity else 0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nexus.toml"
        path.write_text(config(port, affinity, model, binary))
        env = {**os.environ, "NEXUS_CACHE_DIR": os.environ.get("NEXUS_CACHE_DIR", "")}
        env = {k: v for k, v in env.items() if v}
        proc = subprocess.Popen(
            [str(NEXUS), "serve", "-c", str(path), "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            with httpx2.Client(timeout=120) as http:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    try:
                        if http.get(url + "/readyz").status_code == 200:
                            break
                    except httpx2.TransportError:
                        pass
                    time.sleep(0.2)  # the servers are loading their model
                texts = [system_prompt(i) for i in range(prompts)]
                samples = []
                for r in range(rounds):
                    for i, text in enumerate(texts):
                        ms, why = ttft(http, url, text, f"Question {r}: what is on shelf {i}?")
                        if os.environ.get("BENCH_DEBUG"):
                            print(f"  round {r} prompt {i}: {ms:7.1f} ms {why}", file=sys.stderr)
                        if r > 0:  # the first round fills the caches either way
                            samples.append(ms)
                return samples
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from nexus.config import cache_dir
    from nexus.managed import EMBEDDED_MODEL_FILE, ManagedError, find_binary

    model = cache_dir() / "models" / EMBEDDED_MODEL_FILE
    try:
        binary = find_binary(None)
    except ManagedError as exc:
        sys.exit(f"affinity bench needs llama-server: {exc}")
    if not model.is_file():
        sys.exit(f"affinity bench needs {model}: run scripts/fetch-models")
    off = run(False, args.prompts, args.rounds, model, binary)
    on = run(True, args.prompts, args.rounds, model, binary)
    for name, samples in (("affinity off", off), ("affinity on", on)):
        print(
            f"{name:13s} TTFT p50 {statistics.median(samples):7.1f} ms, "
            f"mean {statistics.fmean(samples):7.1f} ms over {len(samples)} requests"
        )
    print(f"ratio off/on (p50): {statistics.median(off) / statistics.median(on):.1f}x")


if __name__ == "__main__":
    main()
