#!/usr/bin/env python3
"""Long-mode fuzzing of every parser of untrusted bytes (outside CI; CI runs the property tests).

`scripts/fuzz.py [--cases 100000] [--parsers footer,toc,...] [--seed N] [--out DIR]`

Each case is an honest seed input (tests/support/fuzzing.py) mutated the way a blind fuzzer
does. The contract: a result or one of our StargzfsErrors (one line, a documented exit
code), never another exception. Reported per parser: cases, outcomes, distinct contract
failures (saved to --out for reproduction), the worst time of one case, the largest peak
of Python allocations of one case (tracemalloc), and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
import tracemalloc
import traceback
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from support.fuzzing import PARSERS, Parser, mutate, outcome  # noqa: E402
from support.crafted import crafted_layer  # noqa: E402

MiB = 1024 * 1024


def hostile_inputs(name: str) -> list[tuple[str, bytes]]:
    """Inputs built to exhaust a parser, tried once each on top of the mutations."""
    deep_name = "a/" * 60_000 + "f"
    tocs = {
        "60,000-level name": json.dumps({"version": 1, "entries": [{"name": deep_name, "type": "reg"}]}).encode(),
        "JSON nested 100k deep": b'{"version":1,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "5,000-digit integer": b'{"version":1,"entries":[{"name":"a","type":"reg","size":' + b"9" * 5000 + b"}]}",
        "100k implicit parents": json.dumps({"version": 1, "entries": [
            {"name": f"d{i}/e{i}/f", "type": "reg"} for i in range(100_000)]}).encode(),
    }
    if name == "toc":
        return list(tocs.items())
    if name == "toc-fetch":
        return [(label, crafted_layer(toc_json=raw)[0]) for label, raw in tocs.items()]
    return []


def run_parser(parser: Parser, cases: int, rng: random.Random, out: Path) -> dict:
    seeds = parser.seeds()
    outcomes: Counter[str] = Counter()
    failures: dict[str, str] = {}
    worst_time, worst_alloc = (0.0, ""), (0, "")
    tracemalloc.start()
    work = [(f"case {n}", None) for n in range(cases)] + hostile_inputs(parser.name)
    for label, fixed in work:
        data = fixed if fixed is not None else mutate(rng, rng.choice(seeds))
        tracemalloc.reset_peak()
        started = time.perf_counter()
        try:
            outcomes[outcome(parser, data)] += 1
        except Exception as exc:  # noqa: BLE001 - a contract failure is what we look for
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            signature = f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno}"
            outcomes["contract failure"] += 1
            if signature not in failures:
                failures[signature] = f"{str(exc)[:300]} ({label})"
                out.mkdir(parents=True, exist_ok=True)
                (out / f"{parser.name}-{len(failures)}.bin").write_bytes(data)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        if elapsed > worst_time[0]:
            worst_time = (elapsed, f"{label}, {len(data)} bytes")
        if peak > worst_alloc[0]:
            worst_alloc = (peak, f"{label}, {len(data)} bytes")
    tracemalloc.stop()
    return {
        "parser": parser.name,
        "cases": len(work),
        "outcomes": dict(outcomes),
        "distinct contract failures": failures,
        "worst time per case": f"{worst_time[0] * 1000:.1f} ms ({worst_time[1]})",
        "largest allocation peak per case": f"{worst_alloc[0] / MiB:.1f} MiB ({worst_alloc[1]})",
        "process peak RSS": f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000, help="mutated cases per parser (default 100000)")
    parser.add_argument("--parsers", default=",".join(PARSERS), help=f"comma-separated subset of {', '.join(PARSERS)}")
    parser.add_argument("--seed", type=int, default=20261204)
    parser.add_argument("--out", type=Path, default=REPO / ".bench" / "fuzz", help="where failing inputs are saved")
    args = parser.parse_args()
    names = args.parsers.split(",")
    unknown = sorted(set(names) - set(PARSERS))
    if unknown:
        parser.error(f"unknown parsers {unknown} (known: {', '.join(PARSERS)})")
    if len(names) > 1:  # one process per parser: its peak RSS is its own
        codes = [
            subprocess.run([sys.executable, __file__, "--cases", str(args.cases), "--parsers", name,
                            "--seed", str(args.seed + index), "--out", str(args.out)]).returncode
            for index, name in enumerate(names)
        ]
        return max(codes)
    report = run_parser(PARSERS[names[0]], args.cases, random.Random(args.seed), args.out)
    print(json.dumps(report, indent=2), flush=True)
    return 1 if report["distinct contract failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
