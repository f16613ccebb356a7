"""Print the results table from the JSON files that scripts/bench wrote into one folder.

  python bench/report.py RESULTS_DIR [--gateways nexus,litellm]

Files read: latency-GW.json, sse-direct.json, sse-bare.json (the bare Starlette + aiohttp
pass-through: the yardstick for streams) and sse-bare-own.json (the same on Nexus's own client,
for information), each a column when present, sse-GW.json, wrk-direct.json, wrk-GW.json. A
missing file shows as "-". Columns named ``nexus-*`` (priced, auth) are also compared with the
``nexus`` column; ab-auth.json (bench/ab.py: nexus and nexus-auth in alternating rounds) gives
the verdicts on what client keys add.
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
AUTH_ADDED_P50_TARGET_US = 20.0  # what client keys may add to nexus's added p50 at c=1
AUTH_RPS_RATIO_TARGET = 0.95  # and to its throughput at c=50


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

    def added_vs_nexus_us(c: str) -> float | None:
        ours, base = lat[c].get("added", {}).get("p50"), added_p50
        return None if ours is None or base is None else (ours - base) * 1000

    def delta_us(c: str) -> str:
        us = added_vs_nexus_us(c) if c.startswith("nexus-") else None
        return "" if us is None else f"{us:+,.0f}"

    def rps_vs_nexus(c: str) -> float | None:
        ours = rps[c]
        return ours / nexus_rps if c.startswith("nexus-") and ours and nexus_rps else None

    def vs_nexus(c: str) -> str:
        r = rps_vs_nexus(c)
        return "" if r is None else num(r, 3)

    ab = bool(load(folder, "ab-auth"))
    auth_us = added_vs_nexus_us("nexus-auth") if "nexus-auth" in lat else None
    auth_ratio = rps_vs_nexus("nexus-auth") if "nexus-auth" in rps else None

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
        row(
            "  vs nexus: added p50 change (µs)",
            delta_us,
            "auth: see A/B below" if ab else f"auth <= +{AUTH_ADDED_P50_TARGET_US:g}",
            None if ab or auth_us is None else auth_us <= AUTH_ADDED_P50_TARGET_US,
        ),
        row(
            "  vs nexus: req/s ratio",
            vs_nexus,
            "auth: see A/B below" if ab else f"auth >= {AUTH_RPS_RATIO_TARGET:g}",
            None if ab or auth_ratio is None else auth_ratio >= AUTH_RPS_RATIO_TARGET,
        ),
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


def ab_rows(folder: Path) -> list[list[str]]:
    """nexus (A) and nexus-auth (B) measured in alternating rounds: metric, A, B, B vs A, target,
    verdict. Empty without ab-auth.json."""
    ab = load(folder, "ab-auth")
    if not ab:
        return []
    lat, wrk = ab.get("latency", {}), ab.get("throughput", {})
    added = lat.get("added", {})
    p50_us = added.get("p50", float("nan")) * 1000
    ratio = wrk.get("ratio_median", float("nan"))
    rounds = f"{lat.get('rounds', '-')} x {lat.get('per_round', '-')}"
    errors = lat.get("errors", {}), wrk.get("errors", {})
    failed = sum(
        e.get("direct", 0) + e.get("via", 0) + e.get("a", 0) + e.get("b", 0) for e in errors
    )
    ratios = " ".join(num(r, 3) for r in wrk.get("ratios", []))

    def verdict(ok: bool) -> str:
        return "PASS" if ok and not failed else "FAIL"

    return [
        ["metric", "nexus", "nexus-auth", "auth adds", "target", "verdict"],
        [
            "latency c=1 p50 (ms), ABBA rounds",
            num(lat.get("direct", {}).get("median_of_round_medians"), 3),
            num(lat.get("via", {}).get("median_of_round_medians"), 3),
            f"{p50_us:+,.1f} µs",
            f"<= +{AUTH_ADDED_P50_TARGET_US:g} µs",
            verdict(p50_us <= AUTH_ADDED_P50_TARGET_US),
        ],
        [
            "  round-delta IQR (µs) / rounds",
            "",
            "",
            f"{num(added.get('iqr', float('nan')) * 1000, 1)} / {rounds}",
            "",
            "",
        ],
        [
            "  latency c=1 p99 (ms)",
            num(lat.get("direct", {}).get("p99"), 3),
            num(lat.get("via", {}).get("p99"), 3),
            f"{num(added.get('p99', float('nan')) * 1000, 1)} µs",
            "",
            "",
        ],
        [
            "throughput c=50 req/s (median)",
            num(wrk.get("a_median"), 0),
            num(wrk.get("b_median"), 0),
            f"x{num(ratio, 3)}",
            f">= x{AUTH_RPS_RATIO_TARGET:g}",
            verdict(ratio >= AUTH_RPS_RATIO_TARGET),
        ],
        [
            "  ratio of each pair of processes" if ab.get("pairs") else "  per-round ratios",
            "",
            "",
            ratios,
            "",
            "",
        ],  # fmt: skip
        ["  errors (c=1 + wrk)", "", "", str(failed), "0", ""],
    ]


def print_table(table: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for i, r in enumerate(table):
        print(
            "  ".join(
                c.ljust(w) if j == 0 else c.rjust(w)
                for j, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))


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
    print_table([header, *rows(args.folder, gateways)])
    for note in guardrails(args.folder, gateways):
        print(note)
    ab = ab_rows(args.folder)
    if ab:
        print()
        print("client keys: nexus vs nexus-auth, both up on the gateway's CPU, alternating rounds")
        print_table(ab)


if __name__ == "__main__":
    main()
