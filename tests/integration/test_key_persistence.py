"""Keys and their month's usage survive the process (issue 12, points 1, 3 and 4): the real
``nexus serve`` runs as a subprocess with ``[auth]`` on, keys are made and revoked through
``POST /admin/keys`` and ``DELETE /admin/keys/{name}``, used against a priced fake, and the
process is stopped (SIGTERM) or killed (SIGKILL) and started again on the same state database.
A key answered 201 is durable at once; a revoked key stays revoked; the usage read back is
what was flushed, which a clean stop makes everything."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest

from nexus.cost.ledger import month_of
from nexus.keys.tokens import hash_of
from tests.harness import wait_for
from tests.integration.test_spend_persistence import (
    IN_USD,
    KEY_VAR,
    MODEL,
    OUT_USD,
    PER_CALL,
    BillingOpenAI,
    Serve,
)

CHAT = "/v1/chat/completions"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
USED = 3
CONFIG_SECRET = "nx-config-declared-key-for-persistence-0123456789"


def config(tmp_path: Path, fake_url: str) -> Path:
    path = tmp_path / "nexus.toml"
    path.write_text(
        "[server]\nhost = '127.0.0.1'\n"
        "[discovery]\nenabled = false\n"
        "[embedded]\nenabled = false\n"
        "[health_check]\ninterval_seconds = 3600\n"
        "[auth]\nenabled = true\n"
        f"[[auth.keys]]\nname = 'gitops'\nhash = '{hash_of(CONFIG_SECRET)}'\nrpm = 1000\n"
        f"[state]\npath = '{tmp_path / 'state.db'}'\nflush_interval_seconds = 0.05\n"
        f"[[pricing]]\nmodel_pattern = '*'\nbackend = 'cloud'\n"
        f"input_per_mtok = {IN_USD * 1e6}\noutput_per_mtok = {OUT_USD * 1e6}\n"
        f"[[backends]]\nname = 'cloud'\nurl = '{fake_url}'\ntype = 'openai'\n"
        f"api_key_env = '{KEY_VAR}'\n",
        encoding="utf-8",
    )
    return path


def create(serve: Serve, **settings: Any) -> str:
    resp = httpx2.post(serve.url + "/admin/keys", json=settings, timeout=10)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["key"])


def chat(serve: Serve, secret: str) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {secret}"}
    return httpx2.post(serve.url + CHAT, json=BODY, headers=headers, timeout=10)


def shown(serve: Serve, name: str) -> dict[str, Any]:
    resp = httpx2.get(serve.url + f"/admin/keys/{name}", timeout=10)
    assert resp.status_code == 200, resp.text
    view: dict[str, Any] = resp.json()
    return view


def stored_usage(path: Path, name: str) -> tuple[int, float]:
    """The requests and cost the state database holds for ``name`` this month."""
    if not path.exists():
        return 0, 0.0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute(
            "SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(cost_usd), 0) FROM key_usage "
            "WHERE month = ? AND name = ?",
            (month_of(time.time()), name),
        ).fetchone()
    except sqlite3.OperationalError:  # no table yet
        return 0, 0.0
    finally:
        db.close()
    return int(row[0]), float(row[1])


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_keys_usage_and_revocations_survive_a_restart(tmp_path, start_fake, served, how):
    fake = start_fake(BillingOpenAI())
    path = config(tmp_path, fake.url)
    state = tmp_path / "state.db"
    first = served(path)
    keep = create(first, name="keep", owner="lab", rpm=1000, monthly_budget_usd=50.0)
    gone = create(first, name="gone")
    for _ in range(USED):
        assert chat(first, keep).status_code == 200
    assert chat(first, gone).status_code == 200
    assert chat(first, CONFIG_SECRET).status_code == 200
    assert httpx2.delete(first.url + "/admin/keys/gone", timeout=10).status_code == 200
    assert chat(first, gone).status_code == 401
    assert shown(first, "keep")["usage"]["requests"] == USED
    if how == signal.SIGKILL:
        # Killed once the usage is in the database (flushed off the request path)...
        assert wait_for(
            lambda: stored_usage(state, "keep") == (USED, pytest.approx(USED * PER_CALL))
        )
    # ...and a key answered 201 just before the kill is durable at once.
    late = create(first, name="late")
    assert first.end(how) == (0 if how == signal.SIGTERM else -signal.SIGKILL), first.stderr
    assert "Traceback" not in first.stderr

    second = served(path)
    view = shown(second, "keep")
    assert view["owner"] == "lab" and view["rpm"] == 1000 and view["monthly_budget_usd"] == 50.0
    assert view["source"] == "api" and view["revoked_at"] is None
    assert view["usage"]["requests"] == USED
    assert view["usage"]["cost_usd"] == pytest.approx(USED * PER_CALL)
    assert view["usage"]["total_tokens"] == USED * 7
    assert chat(second, keep).status_code == 200  # the same secret, from its hash on disk
    assert chat(second, late).status_code == 200
    refused = chat(second, gone)
    assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]
    assert shown(second, "gone")["revoked_at"] is not None
    listing = httpx2.get(second.url + "/admin/keys", timeout=10).json()["data"]
    assert sorted(k["name"] for k in listing) == ["gitops", "gone", "keep", "late"]
    assert shown(second, "gitops")["usage"]["requests"] == 1  # a config key's usage too
    assert chat(second, CONFIG_SECRET).status_code == 200
    # The usage goes on from where it was, and /v1/usage shows it to the key's holder.
    own = httpx2.get(
        second.url + "/v1/usage", headers={"Authorization": f"Bearer {keep}"}, timeout=10
    )
    assert own.status_code == 200, own.text
    assert own.json()["usage"]["requests"] == USED + 1
    assert second.end(signal.SIGTERM) == 0, second.stderr
    assert stored_usage(state, "keep")[0] == USED + 1
    # No secret on disk: the database holds hashes and prefixes only.
    raw = state.read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("state.db-*") if p.is_file()
    )
    for secret in (keep, gone, late):
        assert secret.encode() not in raw


def test_a_name_taken_again_shows_the_same_usage_after_a_restart(tmp_path, start_fake, served):
    """A revoked key's name may be taken by a new key. Whatever that new key's month to date is
    (its own, or the name's), a restart must not change it: usage is a key's, not a guess."""
    fake = start_fake(BillingOpenAI())
    path = config(tmp_path, fake.url)
    first = served(path)
    old = create(first, name="team", monthly_budget_usd=50.0)
    for _ in range(2):
        assert chat(first, old).status_code == 200
    assert httpx2.delete(first.url + "/admin/keys/team", timeout=10).status_code == 200
    new = create(first, name="team", monthly_budget_usd=50.0)
    assert chat(first, new).status_code == 200
    before = shown(first, "team")["usage"]
    assert first.end(signal.SIGTERM) == 0, first.stderr

    second = served(path)
    after = shown(second, "team")["usage"]
    assert after == before, f"before the restart {before}, after it {after}"
    assert chat(second, old).status_code == 401
    assert chat(second, new).status_code == 200
