"""The month's spend survives the process (issue 10, point 5): the real ``nexus serve`` runs as a
subprocess against a priced OpenAI-type fake, is put under load, killed with SIGKILL and started
again on the same state database. The spend it reads back is never below what was flushed to the
database before the kill, never above what the fake billed, and short of it by at most the
requests answered in the last second. A SIGTERM loses nothing."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest

from nexus.cost.ledger import month_of
from tests.fakes import FakeOpenAI, Reply, completion
from tests.harness import wait_for

NEXUS = Path(sys.executable).parent / "nexus"
EMPTY_CACHE = tempfile.mkdtemp(prefix="nexus-test-cache-")
KEY_VAR = "NEXUS_TEST_SPEND_KEY"
MODEL = "priced-model"
IN_USD, OUT_USD = 0.01, 0.02  # per token
USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
PER_CALL = 5 * IN_USD + 2 * OUT_USD
START_DEADLINE = 30.0
EXIT_DEADLINE = 15.0
LOADERS = 4
CHAT = "/v1/chat/completions"


class BillingOpenAI(FakeOpenAI):
    """Bills ``USAGE`` on every chat answer; remembers when it billed each (monotonic time)."""

    def __init__(self) -> None:
        super().__init__([MODEL])
        self.billed_at: list[float] = []
        self.lock = threading.Lock()

    def default(self, method: str, path: str, raw: bytes) -> Reply | None:
        if path != CHAT:
            return super().default(method, path, raw)
        with self.lock:
            self.billed_at.append(time.monotonic())
        return Reply(json=completion(MODEL, usage=USAGE), delay=0.005)

    @property
    def billed(self) -> int:
        with self.lock:
            return len(self.billed_at)

    def busy_for(self) -> float:
        """Seconds since the first call was billed."""
        with self.lock:
            return time.monotonic() - self.billed_at[0] if self.billed_at else 0.0

    def billed_since(self, since: float) -> int:
        with self.lock:
            return sum(1 for at in self.billed_at if at >= since)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def config(tmp_path: Path, fake_url: str, flush: float) -> Path:
    path = tmp_path / "nexus.toml"
    path.write_text(
        "[server]\nhost = '127.0.0.1'\n"
        "[discovery]\nenabled = false\n"
        "[embedded]\nenabled = false\n"
        "[health_check]\ninterval_seconds = 3600\n"
        f"[state]\npath = '{tmp_path / 'state.db'}'\nflush_interval_seconds = {flush}\n"
        "[routing.budget]\nmonthly_limit_usd = 100000.0\n"
        f"[[pricing]]\nmodel_pattern = '*'\nbackend = 'cloud'\n"
        f"input_per_mtok = {IN_USD * 1e6}\noutput_per_mtok = {OUT_USD * 1e6}\n"
        f"[[backends]]\nname = 'cloud'\nurl = '{fake_url}'\ntype = 'openai'\n"
        f"api_key_env = '{KEY_VAR}'\n",
        encoding="utf-8",
    )
    return path


class Serve:
    """``nexus serve`` as a subprocess on a free port."""

    def __init__(self, config_path: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
        env.update({"NEXUS_CACHE_DIR": EMPTY_CACHE, KEY_VAR: "sk-spend-test"})
        port = self.url.rsplit(":", 1)[1]
        self.proc = subprocess.Popen(
            [str(NEXUS), "serve", "-c", str(config_path), "-p", port, "--no-discovery"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.stderr = ""

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                self.stderr += self.proc.communicate()[1]
                pytest.fail(f"nexus serve exited with {self.proc.returncode}:\n{self.stderr}")
            try:
                return httpx2.get(self.url + "/readyz", timeout=2).status_code == 200
            except httpx2.TransportError:
                return False

        assert wait_for(ready, START_DEADLINE), "nexus serve did not become ready"

    def budget(self) -> dict[str, Any]:
        view: dict[str, Any] = httpx2.get(self.url + "/v1/stats", timeout=5).json()["budget"]
        return view

    def end(self, sig: int) -> int:
        os.kill(self.proc.pid, sig)
        try:
            _, err = self.proc.communicate(timeout=EXIT_DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            pytest.fail(f"nexus serve did not exit within {EXIT_DEADLINE}s of signal {sig}")
        self.stderr += err
        return self.proc.returncode

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


class Load:
    """Threads sending chat requests one after another until stopped; transport errors (the
    server gone) end a thread's loop quietly."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.ok = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(LOADERS)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 4})  # fmt: skip
        headers = {"content-type": "application/json"}
        with httpx2.Client(timeout=10) as http:
            while not self.stop.is_set():
                try:
                    resp = http.post(self.url + CHAT, content=body, headers=headers)
                except httpx2.TransportError:
                    if self.stop.is_set():
                        return
                    continue
                if resp.status_code == 200:
                    with self.lock:
                        self.ok += 1

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=EXIT_DEADLINE)
            assert not thread.is_alive()


def flushed(path: Path) -> float:
    """The spend the state database holds for this month, read as another process would."""
    if not path.exists():
        return 0.0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute(
            "SELECT COALESCE(SUM(cost_usd), 0) FROM spend WHERE month = ?",
            (month_of(time.time()),),
        ).fetchone()
    except sqlite3.OperationalError:  # the table is not made yet
        return 0.0
    finally:
        db.close()
    return float(row[0])


def test_spend_survives_sigkill_under_load(tmp_path, start_fake, served):
    fake = start_fake(BillingOpenAI())
    path = config(tmp_path, fake.url, flush=0.2)
    state = tmp_path / "state.db"
    first = served(path)
    load = Load(first.url)
    try:
        # Under load for a while (so that "the last second" is a part of it), with some spend
        # flushed already: then killed in the middle of it.
        assert wait_for(lambda: fake.busy_for() > 2.0 and flushed(state) > 0, 60)
        before = flushed(state)
        killed_at = time.monotonic()
        assert first.end(signal.SIGKILL) == -signal.SIGKILL
    finally:
        load.finish()
    billed = fake.billed * PER_CALL
    last_second = fake.billed_since(killed_at - 1.0) * PER_CALL
    assert before > 0

    second = served(path)
    spent = second.budget()["current_spending_usd"]
    assert spent >= before - 1e-6  # never lower than what was flushed before the kill
    assert spent <= billed + 1e-6  # nothing counted that the upstream did not bill
    assert billed - spent <= last_second + 1e-6  # within a second of requests of the bill
    assert spent == pytest.approx(flushed(state), abs=1e-6)
    second.end(signal.SIGTERM)


def test_a_clean_shutdown_loses_nothing(tmp_path, start_fake, served):
    fake = start_fake(BillingOpenAI())
    # The longest flush interval: what was settled in the last second is still pending at exit.
    path = config(tmp_path, fake.url, flush=1.0)
    state = tmp_path / "state.db"
    first = served(path)
    load = Load(first.url)
    try:
        assert wait_for(lambda: fake.billed >= 50, 60)
    finally:
        load.finish()
    assert load.ok == fake.billed  # every billed call was answered (nothing in flight)
    assert first.end(signal.SIGTERM) == 0, first.stderr
    assert "Traceback" not in first.stderr
    assert flushed(state) == pytest.approx(fake.billed * PER_CALL, abs=1e-6)

    second = served(path)
    view = second.budget()
    assert view["current_spending_usd"] == pytest.approx(fake.billed * PER_CALL, abs=1e-6)
    assert second.end(signal.SIGTERM) == 0


def test_an_unusable_state_path_stops_serve_with_the_reason_and_no_traceback(tmp_path):
    """Like any other configuration error: said in one line naming the key, exit non-zero."""
    path = config(tmp_path, "http://127.0.0.1:9", flush=0.2)
    (tmp_path / "state.db").mkdir()  # a directory where the database file should be
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update({"NEXUS_CACHE_DIR": EMPTY_CACHE, KEY_VAR: "sk-spend-test"})
    result = subprocess.run(
        [str(NEXUS), "serve", "-c", str(path), "-p", str(free_port()), "--no-discovery"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode != 0
    assert "state.path" in result.stderr and str(tmp_path / "state.db") in result.stderr
    assert "Traceback" not in result.stderr
