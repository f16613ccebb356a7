"""Two gateways already running, measured against each other in alternating rounds, so the
noise of a shared box hits both alike: what B adds to A, for differences smaller than the noise
between runs (client keys: 20 µs at c=1).

  python bench/ab.py --a URL --b URL [--b-auth KEY] [--cpu 0] [--pin-load 0] --out FILE
  python bench/ab.py merge OUT RUN.json...   (several pairs of processes: medians of the pairs)

c=1: ``loadgen.py latency --direct A --via B``: sequential requests, A and B in ABBA rounds on one
keep-alive connection each; "added" is B minus A (median of the per-round median deltas).
c=50: ``throughput.py`` (wrk) on A and on B in turn, ABBA, short runs; the figure is the median
of the per-round ratios B/A. Start both gateways on the same CPU; each is idle while the other is
measured. Every run is bounded in time; URLs are expected to be on loopback.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def pinned(cmd: list[str], cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu), *cmd] if cpu is not None and shutil.which("taskset") else cmd


def run_json(cmd: list[str], out: Path, timeout: float) -> dict[str, Any]:
    subprocess.run(cmd, check=True, timeout=timeout)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def latency(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    out = folder / "latency.json"
    cmd = [sys.executable, str(HERE / "loadgen.py"), "latency", "--direct", args.a, "--via", args.b]
    cmd += ["--warmup", str(args.warmup), "--rounds", str(args.rounds)]
    cmd += ["--per-round", str(args.per_round), "--max-seconds", str(args.max_seconds)]
    cmd += ["--out", str(out)] + (["--auth", args.b_auth] if args.b_auth else [])
    return run_json(pinned(cmd, args.pin_load), out, args.max_seconds + 60)


def throughput(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    urls = {"a": (args.a, args.a_auth), "b": (args.b, args.b_auth)}
    rps: dict[str, list[float]] = {"a": [], "b": []}
    errors = {"a": 0, "b": 0}
    for i in range(args.wrk_rounds):
        for side in ("a", "b") if i % 2 == 0 else ("b", "a"):
            url, auth = urls[side]
            out = folder / f"wrk-{side}-{i}.json"
            cmd = [sys.executable, str(HERE / "throughput.py"), "--url", url, "--out", str(out)]
            cmd += ["--seconds", str(args.wrk_seconds), "--warmup-seconds", str(args.wrk_warmup)]
            cmd += ["--connections", str(args.connections)]
            cmd += (["--auth", auth] if auth else []) + (
                ["--cpu", str(args.cpu)] if args.cpu is not None else []
            )
            got = run_json(cmd, out, args.wrk_seconds + args.wrk_warmup + 90)
            rps[side].append(got["req_per_s"])
            errors[side] += got["non_2xx"] + got["socket_errors"]
    ratios = [b / a for a, b in zip(rps["a"], rps["b"], strict=True) if a]
    return {
        "connections": args.connections,
        "rounds": args.wrk_rounds,
        "seconds": args.wrk_seconds,
        "a_req_per_s": rps["a"],
        "b_req_per_s": rps["b"],
        "a_median": statistics.median(rps["a"]),
        "b_median": statistics.median(rps["b"]),
        "ratios": ratios,
        "ratio_median": statistics.median(ratios) if ratios else float("nan"),
        "errors": errors,
    }


FIGURES = ("median_of_round_medians", "p99")
SIDES = ("direct", "via")


def merge(paths: Sequence[str], out: str) -> None:
    """One result from the runs of several pairs of gateway processes: each figure is the median
    of the pairs' figures (one pair of processes can be a few per cent apart on a shared VM
    whatever the code: address layout, what the host does), and ``pairs`` keeps them all."""
    runs = [json.loads(Path(path).read_text()) for path in paths]
    lat = [run["latency"] for run in runs]
    wrk = [run["throughput"] for run in runs]

    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    merged = {
        "a": runs[0]["a"],
        "b": runs[0]["b"],
        "pairs": runs,
        "latency": {
            "rounds": sum(x["rounds"] for x in lat),
            "per_round": lat[0]["per_round"],
            "errors": {
                side: sum(x["errors"][side] for x in lat) for side in ("direct", "via")
            },
            **{
                side: {k: med([x[side][k] for x in lat]) for k in FIGURES} for side in SIDES
            },  # fmt: skip
            "added": {k: med([x["added"][k] for x in lat]) for k in ("p50", "p99", "iqr")},
        },
        "throughput": {
            "connections": wrk[0]["connections"],
            "rounds": sum(x["rounds"] for x in wrk),
            "seconds": wrk[0]["seconds"],
            "a_median": med([x["a_median"] for x in wrk]),
            "b_median": med([x["b_median"] for x in wrk]),
            "ratios": [x["ratio_median"] for x in wrk],  # one per pair
            "ratio_median": med([x["ratio_median"] for x in wrk]),
            "errors": {side: sum(x["errors"][side] for x in wrk) for side in ("a", "b")},
        },
    }  # fmt: skip
    Path(out).write_text(json.dumps(merged, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["merge"]:  # ab.py merge OUT RUN.json...
        merge(argv[2:], argv[1])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--a", required=True, help="base URL of the reference gateway")
    p.add_argument("--b", required=True, help="base URL of the gateway compared with it")
    p.add_argument("--a-auth", help="bearer token for A (throughput only)")
    p.add_argument("--b-auth", help="bearer token for B")
    p.add_argument("--warmup", type=int, default=200, help="c=1 warm-up requests per gateway")
    p.add_argument("--rounds", type=int, default=21, help="c=1 ABBA rounds")
    p.add_argument("--per-round", type=int, default=300)
    p.add_argument("--max-seconds", type=float, default=60.0, help="c=1: stop after the round")
    p.add_argument("--wrk-rounds", type=int, default=6, help="c=50 ABBA rounds")
    p.add_argument("--wrk-seconds", type=float, default=3.0)
    p.add_argument("--wrk-warmup", type=float, default=1.0)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--cpu", type=int, help="pin wrk to this CPU")
    p.add_argument("--pin-load", type=int, help="pin the c=1 load generator to this CPU")
    p.add_argument("--out", help="write the JSON here instead of stdout")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "a": args.a,
            "b": args.b,
            "latency": latency(args, Path(tmp)),
            "throughput": throughput(args, Path(tmp)),
        }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
