"""Print the results table from the JSON files that scripts/bench wrote into one folder.

  python bench/report.py RESULTS_DIR [--gateways nexus,litellm]

Files read: latency-GW.json, sse-direct.json, sse-bare.json (the bare Starlette + aiohttp
pass-through: the yardstick for streams) and sse-bare-own.json (the same on Nexus's own client,
for information), each a column when present, sse-GW.json, wrk-direct.json, wrk-GW.json. A
missing file shows as "-".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ADDED_P50_TARGET_MS = 0.5
ADDED_P99_TARGET_MS = 1.5
RPS_TARGET = 3000.0


def load(folder: Path, name: str) -> dict[str, Any]:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def num(x: Any, digits: int = 2) -> str:
    if not isinstance(x, int | float) or math.isnan(x):
        return "-"
    return f"{x:,.{digits}f}"


def pair(d: dict[str, Any], a: str, b: str, digits: int = 2) -> str:
    return "-" if not d else f"{num(d.get(a), digits)} / {num(d.get(b), digits)}"


def columns(folder: Path, gateways: list[str]) -> list[str]:
    bare = [b for b in ("bare", "bare-own") if (folder / f"sse-{b}.json").exists()]
    return ["direct", *bare, *gateways]


def rows(folder: Path, gateways: list[str]) -> list[list[str]]:
    """One row per figure: label, direct, one cell per gateway, target, verdict."""
    cols = columns(folder, gateways)
    lat = {g: load(folder, f"latency-{g}") for g in cols[1:]}
    lat["direct"] = (lat.get("nexus") or next(iter(lat.values()), {})).get("direct", {})
    wrk = {c: load(folder, f"wrk-{c}") for c in cols}
    sse = {c: load(folder, f"sse-{c}") for c in cols}
    added_p50 = lat.get("nexus", {}).get("added", {}).get("p50")
    added_p99 = lat.get("nexus", {}).get("added", {}).get("p99")
    bare_sse, nexus_sse = sse.get("bare") or {}, sse.get("nexus") or {}

    def at_least_bare(key: str, higher_is_better: bool) -> bool | None:
        ours, theirs = nexus_sse.get(key), bare_sse.get(key)
        if ours is None or theirs is None:
            return None
        return bool(ours >= theirs if higher_is_better else ours <= theirs)

    rps = {c: wrk[c].get("req_per_s") for c in cols}
    nexus_rps: float | None = rps.get("nexus")

    def row(label: str, cell: Callable[[str], str], target: str = "", ok: Any = None) -> list[str]:
        cells = [cell(c) for c in cols]
        return [label, *cells, target, "" if ok is None else ("PASS" if ok else "FAIL")]

    def added(c: str) -> str:
        return "" if c == "direct" else pair(lat[c].get("added", {}), "p50", "p99", 3)

    def raw(c: str) -> str:
        return pair(lat[c] if c == "direct" else lat[c].get("via", {}), "p50", "p99", 3)

    def spread(c: str) -> str:
        d = lat[c] if c == "direct" else lat[c].get("via", {})
        iqr = "" if c == "direct" else num(lat[c].get("added", {}).get("iqr"), 3) + " / "
        return f"{iqr}n={d.get('n', '-')}"

    def ratio(c: str) -> str:
        return num(rps[c] / rps["direct"], 3) if rps[c] and rps["direct"] else "-"

    def wrk_errors(c: str) -> str:
        return str(wrk[c].get("non_2xx", 0) + wrk[c].get("socket_errors", 0)) if wrk[c] else "-"

    def sse_errors(c: str) -> str:
        return f"{sse[c].get('errors')} / {sse[c].get('incomplete')}" if sse[c] else "-"

    return [
        row(
            "added latency c=1 p50/p99 (ms)",
            added,
            f"p50 <= {ADDED_P50_TARGET_MS}, p99 <= {ADDED_P99_TARGET_MS}",
            None
            if added_p50 is None or added_p99 is None
            else added_p50 <= ADDED_P50_TARGET_MS and added_p99 <= ADDED_P99_TARGET_MS,
        ),
        row("  latency c=1 p50/p99 (ms)", raw),
        row("  round-delta IQR (ms) / samples", spread),
        row(
            "throughput c=50 req/s",
            lambda c: num(rps[c], 0),
            f">= {RPS_TARGET:,.0f}",
            None if nexus_rps is None else nexus_rps >= RPS_TARGET,
        ),
        row("  ratio to direct", ratio),
        row("  wrk p50/p99 (ms, closed loop)", lambda c: pair(wrk[c], "p50_ms", "p99_ms")),
        row("  wrk errors (non-2xx + socket)", wrk_errors),
        row(
            "SSE TTFB c=10 p50/p99 (ms)",
            lambda c: pair(sse[c], "ttfb_p50", "ttfb_p99"),
            "p50 <= bare" if bare_sse else "",
            at_least_bare("ttfb_p50", higher_is_better=False),
        ),
        row(
            "  SSE streams/s",
            lambda c: num(sse[c].get("streams_per_s"), 0),
            ">= bare" if bare_sse else "",
            at_least_bare("streams_per_s", higher_is_better=True),
        ),
        row("  SSE errors / incomplete", sse_errors),
    ]


def guardrails(folder: Path, gateways: list[str]) -> list[str]:
    notes = []
    direct = load(folder, "wrk-direct").get("req_per_s")
    for g in gateways:
        rps = load(folder, f"wrk-{g}").get("req_per_s")
        if direct and rps and rps >= 0.9 * direct:
            notes.append(
                f"WARNING: {g} is within 10% of the mock's own ceiling; the mock may be "
                "the bottleneck"
            )
    return notes


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("folder", type=Path)
    p.add_argument("--gateways", default="nexus")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    gateways = [g for g in args.gateways.split(",") if g]
    header = ["metric", *columns(args.folder, gateways), "target", "verdict"]
    table = [header, *rows(args.folder, gateways)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        print(
            "  ".join(
                c.ljust(w) if j == 0 else c.rjust(w)
                for j, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for note in guardrails(args.folder, gateways):
        print(note)


if __name__ == "__main__":
    main()
