"""The ``datasel`` command: parses flags and calls the library, nothing more.

Exit status: 0 success, 1 a recipe or user error (a clean message on stderr;
``--debug`` adds the traceback), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

EXIT_OK, EXIT_USER, EXIT_USAGE = 0, 1, 2


def _debug_flag(p: argparse.ArgumentParser) -> None:
    # Accepted after the subcommand too; SUPPRESS keeps it from resetting the top-level flag.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")


def _common(p: argparse.ArgumentParser, *, pool_required: bool) -> None:
    _debug_flag(p)
    p.add_argument("--pool", required=pool_required, help="the pool: .jsonl, .json, .parquet or a datasets folder")
    p.add_argument("--val", help="validation / target set (the recipe's `val`)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=EXPR",
                   help="override a binding, e.g. --set model='hf(\"Qwen/Qwen2.5-0.5B\")' (repeatable)")
    p.add_argument("--cache", metavar="DIR", help="cache folder (default: $DATASEL_CACHE or ./.datasel)")
    p.add_argument("--pool-format", choices=_schemas(), help="record format of --pool (default: detected)")
    p.add_argument("--val-format", choices=_schemas(), help="record format of --val (default: detected)")
    p.add_argument("--on-bad-record", choices=("fail", "skip"), default="fail",
                   help="what to do with malformed, empty or non-UTF-8 records (default: fail)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or notes")


def _schemas():
    from datasel.dsl.data import SCHEMAS

    return SCHEMAS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datasel",
        description="Compile and run data-selection recipes for LLM instruction tuning.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("compile", help="check a recipe and print its plan")
    p.add_argument("recipe", help="a .sel file, or the name of a shipped recipe (e.g. superfiltering)")
    p.add_argument("--format", choices=("text", "json", "dot"), default="text", help="plan format")
    _common(p, pool_required=False)

    p = sub.add_parser("run", help="run a recipe on a pool and write the selected records")
    p.add_argument("recipe", help="a .sel file, or the name of a shipped recipe")
    p.add_argument("-o", "--output", help="where to write the selection (default: print a summary only)")
    _common(p, pool_required=True)

    p = sub.add_parser("eval", help="evaluate an expression for every pool record (scores, features, groups)")
    p.add_argument("expression", help="an expression or a name, e.g. 'ifd' or 'length(field=\"instruction\")'")
    p.add_argument("--recipe", help="resolve names in this recipe's bindings too")
    p.add_argument("-o", "--output", help="FILE.jsonl, FILE.npy or FILE.parquet (default: JSONL on stdout)")
    _common(p, pool_required=True)

    p = sub.add_parser("ops", help="list operators, or show one")
    p.add_argument("name", nargs="?", help="an operator name")
    p.add_argument("--markdown", action="store_true", help="print the reference as Markdown (docs/ops.md)")
    _debug_flag(p)

    p = sub.add_parser("cache", help="inspect or clean the cache")
    p.add_argument("action", choices=("ls", "du", "gc"))
    p.add_argument("--cache", metavar="DIR", help="cache folder (default: $DATASEL_CACHE or ./.datasel)")
    p.add_argument("--older-than", type=float, metavar="DAYS", help="gc: remove entries unused for DAYS days")
    p.add_argument("--all", action="store_true", help="gc: remove everything")
    _debug_flag(p)

    measure = _measure_parser(sub)
    del measure
    return parser


def _measure_parser(sub):
    import importlib.util

    if importlib.util.find_spec("datasel.dsl.measure") is None:  # pragma: no cover
        return None
    p = sub.add_parser("measure", help="diversity metrics of a selection (and of a random one of the same size)")
    p.add_argument("selected", help="the selected records (.jsonl as written by `datasel run`)")
    p.add_argument("--pool", required=True, help="the pool the selection came from")
    p.add_argument("--metric", action="append", default=None,
                   help="novelsum, facility, distsum, knn or vendi (repeatable; default: all)")
    p.add_argument("--features", default="embed(minilm)", help="the Features expression to measure in")
    p.add_argument("--seed", type=int, default=0, help="seed of the random reference selection")
    p.add_argument("--cache", metavar="DIR")
    p.add_argument("--pool-format", choices=_schemas())
    p.add_argument("--on-bad-record", choices=("fail", "skip"), default="fail")
    p.add_argument("--quiet", "-q", action="store_true")
    p.add_argument("--json", action="store_true", help="print JSON")
    _debug_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or bool(os.environ.get("DATASEL_DEBUG"))
    if args.version:
        from importlib.metadata import version

        print(f"datasel {version('datasel')}")
        return EXIT_OK
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    handler = globals()[f"cmd_{args.command}"]
    try:
        return handler(args)
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("interrupted; finished work is cached and the next run resumes from it", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure becomes one clean paragraph
        return _report(exc, debug)


def _report(exc: BaseException, debug: bool) -> int:
    from datasel.dsl.data import DataError
    from datasel.dsl.diagnostics import RecipeError
    from datasel.dsl.engine import OpError

    if debug:
        traceback.print_exc()
    if isinstance(exc, RecipeError):
        print(exc.format(), file=sys.stderr)
    elif isinstance(exc, (DataError, OpError, FileNotFoundError, ValueError)):
        print(f"error: {exc}", file=sys.stderr)
    else:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        if not debug:
            print("(run with --debug for the traceback)", file=sys.stderr)
    return EXIT_USER


# ------------------------------------------------------------------ commands
def cmd_compile(args) -> int:
    from datasel.dsl.cache import Cache
    from datasel.dsl.compiler import compile_recipe, recipe_source
    from datasel.dsl.explain import to_dot, to_json, to_text
    from datasel.dsl.runner import cache_state, fingerprints, load_inputs

    source = recipe_source(args.recipe)
    datasets = {}
    if args.pool:
        datasets = load_inputs(args.pool, args.val, pool_format=args.pool_format, val_format=args.val_format,
                               on_bad_record=args.on_bad_record)
    compiled = compile_recipe(source, args.set, fingerprints(datasets))
    state = cache_state(compiled.plan, datasets, Cache(args.cache)) if datasets else None
    if args.format == "json":
        print(json.dumps(to_json(compiled.plan, state), indent=2))
    elif args.format == "dot":
        print(to_dot(compiled.plan, state))
    else:
        print(to_text(compiled.plan, state, title=source.name))
    return EXIT_OK


def cmd_run(args) -> int:
    from datasel.dsl.runner import run

    started = time.perf_counter()
    result = run(args.recipe, args.pool, val=args.val, output=args.output, sets=args.set, cache_dir=args.cache,
                 on_bad_record=args.on_bad_record, pool_format=args.pool_format, val_format=args.val_format,
                 quiet=args.quiet)
    m = result.manifest
    computed = sum(1 for n in m["nodes"] if n["status"] != "cached")
    print(f"selected {m['selected_count']} of {m['pool_size']} records "
          f"({computed} of {len(m['nodes'])} nodes computed, {time.perf_counter() - started:.1f}s)")
    for reason, count in m["exclusions"].items():
        print(f"  excluded {count}: {reason}")
    if result.output is not None:
        print(f"wrote {result.output} and {m['manifest_path']}")
    return EXIT_OK


def cmd_eval(args) -> int:
    from datasel.dsl.runner import evaluate, write_values

    result = evaluate(args.expression, args.pool, recipe=args.recipe, val=args.val, sets=args.set,
                      cache_dir=args.cache, on_bad_record=args.on_bad_record, pool_format=args.pool_format,
                      quiet=args.quiet)
    text = write_values(result, args.output)
    if text is not None:
        sys.stdout.write(text)
    else:
        print(f"wrote {len(result.values)} values to {args.output}", file=sys.stderr)
    return EXIT_OK


def cmd_ops(args) -> int:
    from datasel.dsl.reference import describe_op, list_ops, markdown_reference

    if args.markdown:
        print(markdown_reference())
        return EXIT_OK
    if args.name:
        text = describe_op(args.name)
        if text is None:
            print(f"error: unknown operator '{args.name}'", file=sys.stderr)
            return EXIT_USER
        print(text)
        return EXIT_OK
    print(list_ops())
    return EXIT_OK


def cmd_cache(args) -> int:
    from datasel.dsl.cache import Cache

    cache = Cache(args.cache)
    if args.action == "ls":
        for e in cache.entries():
            rows = f"{e.get('rows', '')} rows" if e.get("rows") else ""
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"]))
            print(f"{e['kind']:<6} {e['key'][:16]}  {e['op']:<16} {_size(e['bytes']):>9}  {rows:<12} {when}")
        return EXIT_OK
    if args.action == "du":
        totals: dict[str, list[int]] = {}
        for e in cache.entries():
            t = totals.setdefault(f"{e['kind']}:{e['op']}", [0, 0])
            t[0] += 1
            t[1] += e["bytes"]
        grand = 0
        for name, (count, size) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
            print(f"{_size(size):>9}  {count:>5} {'entry  ' if count == 1 else 'entries'}  {name}")
            grand += size
        print(f"{_size(grand):>9}  total in {cache.root}")
        return EXIT_OK
    if args.older_than is None and not args.all:
        removed = cache.gc()
    else:
        removed = cache.gc(older_than_days=args.older_than, everything=args.all)
    print(f"removed {removed['entries']} entries ({_size(removed['bytes'])}), {removed['tmp']} temporary files; "
          f"compacted {removed['compacted']} map stores")
    return EXIT_OK


def cmd_measure(args) -> int:
    from datasel.dsl.measure import format_report, measure_selection

    report = measure_selection(args.selected, args.pool, metrics=args.metric, features=args.features,
                               seed=args.seed, cache_dir=args.cache, pool_format=args.pool_format,
                               on_bad_record=args.on_bad_record, quiet=args.quiet)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return EXIT_OK


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


if __name__ == "__main__":
    raise SystemExit(main())
