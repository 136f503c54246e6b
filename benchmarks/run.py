"""Run datasel's benchmarks and print one JSON line per benchmark.

Usage: python benchmarks/run.py [--quick] [--list] [NAME ...]

Every ``benchmarks/bench_*.py`` module exposes ``BENCHMARKS``: a dict from a
benchmark name to a function ``fn(quick: bool) -> dict``.  Each function runs
datasel's implementation and a faithful reference-style implementation in the
same process on the same inputs, checks that the results agree, and returns
``{"name", "n", "k", "ours_s", "baseline", "baseline_s", "speedup",
"same_result", ...}`` (extra keys are allowed).  ``--quick`` shrinks the inputs
so the whole suite finishes in a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover() -> dict:
    """Import every bench_*.py next to this file and merge their BENCHMARKS."""
    found: dict = {}
    sys.path.insert(0, str(HERE))
    for path in sorted(HERE.glob("bench_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for name, fn in getattr(module, "BENCHMARKS", {}).items():
            if name in found:
                raise SystemExit(f"benchmark {name!r} defined twice")
            found[name] = fn
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="small inputs, a few minutes in all")
    parser.add_argument("--list", action="store_true", help="list benchmark names and exit")
    args = parser.parse_args(argv)
    benches = discover()
    if args.list:
        print("\n".join(benches))
        return 0
    names = args.names or list(benches)
    unknown = [n for n in names if n not in benches and not any(b.startswith(n) for b in benches)]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(benches)}", file=sys.stderr)
        return 2
    # An exact name selects that benchmark; otherwise a name selects every benchmark it prefixes.
    selected = [b for b in benches if b in names or any(n not in benches and b.startswith(n) for n in names)]
    failed = 0
    for name in selected:
        start = time.perf_counter()
        try:
            result = benches[name](args.quick)
        except Exception as exc:  # a broken benchmark must not hide the others
            traceback.print_exc()
            result = {"name": name, "error": f"{type(exc).__name__}: {exc}"}
            failed += 1
        result.setdefault("name", name)
        result["quick"] = args.quick
        result["wall_s"] = round(time.perf_counter() - start, 3)
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
