#!/usr/bin/env python3
"""Benchmarks: `scripts/bench.py NAME [args]`, one module per NAME in scripts/benches/.

Each module has `add_arguments(parser)` and `run(args) -> dict`; results are printed as
JSON (and as a table when the module returns "rows"). Numbers are ratios against a peer
run side by side (mkfs.erofs, bindfs, a bare fetch) so they survive a different machine.
Results go into docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import sys
from pathlib import Path

BENCHES = Path(__file__).resolve().parent / "benches"
sys.path.insert(0, str(BENCHES.parent.parent))


def load(name: str):
    path = BENCHES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benches.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def main() -> int:
    names = sorted(p.stem for p in BENCHES.glob("*.py") if not p.stem.startswith("_"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    for name in names:
        module = load(name)
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(module=module)
    args = parser.parse_args()
    # Measure the package as installed from a wheel (byte-compiled), not a source tree that
    # PYTHONDONTWRITEBYTECODE keeps compiling in every process the benchmark starts.
    compileall.compile_dir(str(Path(__file__).resolve().parent.parent / "stargzfs"), quiet=1)
    result = args.module.run(args)
    rows = result.pop("rows", None) if isinstance(result, dict) else None
    if rows:
        keys = list(rows[0])
        print(" | ".join(keys))
        for row in rows:
            print(" | ".join(str(row[k]) for k in keys))
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
