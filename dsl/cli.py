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
    _cache_write_flag(p)
    p.add_argument("--pool-format", choices=_schemas(), help="record format of --pool (default: detected)")
    p.add_argument("--val-format", choices=_schemas(), help="record format of --val (default: detected)")
    p.add_argument("--on-bad-record", choices=("fail", "skip"), default="fail",
                   help="what to do with malformed, empty or non-UTF-8 records (default: fail)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or notes")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where per-record operators run: in this process (default), or on Ray (pip install "
                        "'datasel[ray]')")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="an existing Ray cluster (e.g. ray://head:10001 or auto); default: start one here")


def _cache_write_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-write", metavar="DIR",
                   help="a writable cache for new results, read before --cache, which is then never written "
                        "(for a shared read-only cache; default: $DATASEL_CACHE_WRITE)")


def _cache_write(args) -> dict:
    """``cache_write=`` for the library calls, only when given (else $DATASEL_CACHE_WRITE applies in Cache)."""
    return {"cache_write": args.cache_write} if getattr(args, "cache_write", None) else {}


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
    p.add_argument("-o", "--output", help="where to write the selection: .jsonl, .json or .parquet (the format follows "
                                          "the extension; default: <pool stem>.selected.<ext> next to the pool)")
    _common(p, pool_required=True)

    p = sub.add_parser("eval", help="evaluate an expression for every pool record (scores, features, groups)")
    p.add_argument("expression", help="an expression or a name, e.g. 'ifd' or 'length(field=\"instruction\")'")
    p.add_argument("--recipe", help="resolve names in this recipe's bindings too")
    p.add_argument("-o", "--output", help="FILE.jsonl, FILE.npy or FILE.parquet (default: JSONL on stdout)")
    _common(p, pool_required=True)

    p = sub.add_parser("why", help="why a record was kept or dropped: its path through the recipe")
    p.add_argument("manifest", help="the manifest written by `datasel run` (OUT.manifest.json)")
    p.add_argument("record", help="the record's number in the pool file (0-based, as in the manifest's "
                                  "`selected`), its line number with --line, or the text of its line")
    p.add_argument("--line", action="store_true", help="RECORD is a line number of the pool file (1-based)")
    p.add_argument("--pool", help="the pool file, when matching RECORD by its text (default: the manifest's)")
    _debug_flag(p)

    p = sub.add_parser("ops", help="list operators, or show one")
    p.add_argument("name", nargs="?", help="an operator name")
    p.add_argument("--markdown", action="store_true", help="print the reference as Markdown (docs/ops.md)")
    _debug_flag(p)

    p = sub.add_parser("cache", help="inspect or clean the cache (or, with --models, the shared model store)",
                       description="ls lists entries (op, what it was computed for, size, last use), du sums "
                                   "them by op, gc cleans up.  gc only ever writes the writable cache (--cache, "
                                   "or --cache-write when given) and never the model store unless --models.")
    p.add_argument("action", choices=("ls", "du", "gc"))
    p.add_argument("--cache", metavar="DIR", help="cache folder (default: $DATASEL_CACHE or ./.datasel)")
    _cache_write_flag(p)
    p.add_argument("--models", action="store_true",
                   help="the model store shared by every cache ($DATASEL_MODELS, else "
                        "$XDG_CACHE_HOME/datasel/models or ~/.cache/datasel/models) instead of the cache")
    p.add_argument("--older-than", type=float, metavar="DAYS",
                   help="ls/du: only entries unused for more than DAYS days; gc: remove those entries")
    p.add_argument("--all", action="store_true", help="gc: remove every entry")
    p.add_argument("--json", action="store_true", help="ls: one JSON object per entry")
    _debug_flag(p)

    measure = _measure_parser(sub)
    del measure
    return parser


def _measure_parser(sub):
    import importlib.util

    if importlib.util.find_spec("datasel.dsl.measure") is None:  # pragma: no cover
        return None
    p = sub.add_parser("measure", help="diversity metrics of a selection, next to seeded random selections of the "
                                       "same size (mean, spread, and whether the selection lies outside them)")
    p.add_argument("selected", help="the selected records (.jsonl as written by `datasel run`)")
    p.add_argument("--pool", required=True, help="the pool the selection came from")
    p.add_argument("--metric", action="append", default=None,
                   help="novelsum, facility, distsum, knn or vendi (repeatable; default: all)")
    p.add_argument("--features", default="embed(minilm)", help="the Features expression to measure in")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random reference selections (draw i uses numpy SeedSequence(SEED).spawn(N)[i])")
    p.add_argument("--draws", type=int, default=10, metavar="N",
                   help="number of random reference selections (default: 10)")
    p.add_argument("--cache", metavar="DIR")
    _cache_write_flag(p)
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
    from datasel.dsl.cache import ReadOnlyCacheError
    from datasel.dsl.data import DataError
    from datasel.dsl.diagnostics import RecipeError
    from datasel.dsl.engine import OpError

    if debug:
        traceback.print_exc()
    if isinstance(exc, RecipeError):
        print(exc.format(), file=sys.stderr)
    elif isinstance(exc, (DataError, OpError, FileNotFoundError, ValueError, ReadOnlyCacheError)):
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
    state = cache_state(compiled.plan, datasets, Cache(args.cache, write_root=args.cache_write)) if datasets else None
    if args.format == "json":
        print(json.dumps(to_json(compiled.plan, state), indent=2))
    elif args.format == "dot":
        print(to_dot(compiled.plan, state))
    else:
        print(to_text(compiled.plan, state, title=source.name))
    return EXIT_OK


def _executor(args):
    """The executor the flags ask for (None: the engine's in-process default)."""
    if getattr(args, "executor", "local") == "local":
        if getattr(args, "ray_address", None):
            raise ValueError("--ray-address needs --executor ray")
        return None
    from datasel.dsl.executor import executor

    return executor("ray", address=args.ray_address)


def _persist() -> dict:
    """``DATASEL_PERSIST_SECONDS``: how much work (seconds) a map op may do between two saves (default 60)."""
    value = os.environ.get("DATASEL_PERSIST_SECONDS")
    if not value:
        return {}
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"DATASEL_PERSIST_SECONDS must be a number of seconds, got {value!r}") from None
    if not seconds > 0:
        raise ValueError(f"DATASEL_PERSIST_SECONDS must be positive, got {value!r}")
    return {"persist_seconds": seconds}


def cmd_run(args) -> int:
    from datasel.dsl.runner import run

    started = time.perf_counter()
    result = run(args.recipe, args.pool, val=args.val, output=args.output, default_output=True, sets=args.set,
                 cache_dir=args.cache,
                 on_bad_record=args.on_bad_record, pool_format=args.pool_format, val_format=args.val_format,
                 quiet=args.quiet, executor=_executor(args), **_cache_write(args), **_persist())
    m = result.manifest
    computed = sum(1 for n in m["nodes"] if n["status"] != "cached")
    print(f"selected {m['selected_count']} of {m['pool_size']} records "
          f"({computed} of {len(m['nodes'])} nodes computed, {time.perf_counter() - started:.1f}s)")
    formats = m["pool"].get("formats", {})
    if len(formats) > 1:
        print("  --pool mixes record formats: " + ", ".join(f"{n} {f}" for f, n in sorted(formats.items())))
    for reason, count in m["exclusions"].items():
        if reason.startswith(("pool: bad record: ", "val: bad record: ")):
            dataset, _, why = reason.split(": ", 2)
            print(f"  skipped {count} {'record' if count == 1 else 'records'} of --{dataset} when reading: {why}")
    if result.accounting is not None:
        print(result.accounting.summary())
    if result.output is not None:
        print(f"wrote {result.output} and {m['manifest_path']}")
    return EXIT_OK


def cmd_eval(args) -> int:
    from datasel.dsl.runner import evaluate, write_values

    result = evaluate(args.expression, args.pool, recipe=args.recipe, val=args.val, sets=args.set,
                      cache_dir=args.cache, on_bad_record=args.on_bad_record, pool_format=args.pool_format,
                      quiet=args.quiet, executor=_executor(args), **_cache_write(args), **_persist())
    text = write_values(result, args.output)
    if text is not None:
        sys.stdout.write(text)
    else:
        print(f"wrote {len(result.values)} values to {args.output}", file=sys.stderr)
    return EXIT_OK


def cmd_why(args) -> int:
    from pathlib import Path

    from datasel.dsl.accounting import find_record, preview, why
    from datasel.dsl.data import load_dataset

    path = Path(args.manifest)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such manifest (datasel run writes OUT.manifest.json next to OUT)") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not a manifest ({exc})") from None
    if "records" not in manifest or "funnel" not in manifest:
        raise ValueError(f"{path}: this manifest has no per-record accounting (written by an older datasel); "
                         "run the recipe again")

    def pool():
        return load_dataset(args.pool or manifest["pool"]["path"], name="pool", schema=manifest["pool"].get("format"),
                            on_bad_record="skip")

    try:
        index = find_record(manifest, args.record, line=args.line, pool_loader=pool)
    except LookupError as exc:
        print(f"{args.record}: {exc}")
        return EXIT_OK
    print(why(manifest, index, show=preview(manifest, index)))
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
    from datasel.dsl.cache import Cache, ModelStore, unused_for

    if args.models:
        store = ModelStore()
        where = f"models in {store.root} (shared by every cache; DATASEL_MODELS moves it)"
        source = store
    else:
        cache = Cache(args.cache, write_root=args.cache_write)
        store = ModelStore()
        source = cache
        where = f"models live in {store.root}, shared by every cache: `datasel cache ls --models`"
        if len(cache.layers) > 1:
            where = (f"read {cache.write_root} (new results) first, then {cache.root} (never written); {where}")
        elif cache.read_only:
            where = (f"{cache.root} is read-only ({cache.read_only_reason}): new results need --cache-write DIR; "
                     f"{where}")
    entries = [e for e in source.entries() if args.older_than is None or unused_for(e, args.older_than)]
    if args.action == "ls":
        if args.json:
            for e in entries:
                print(json.dumps(e, sort_keys=True, default=str))
        elif entries:
            _print_table(*_entry_table(entries, models=args.models, layered=len(_source_layers(source)) > 1))
        print(f"({where})", file=sys.stderr)
        return EXIT_OK
    if args.action == "du":
        totals: dict[str, list[int]] = {}
        for e in entries:
            t = totals.setdefault(e["key"] if args.models else f"{e['kind']}:{e['op']}", [0, 0])
            t[0] += 1
            t[1] += e["bytes"]
        grand = 0
        for name, (count, size) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
            print(f"{_size(size):>9}  {count:>5} {'entry  ' if count == 1 else 'entries'}  {name}")
            grand += size
        print(f"{_size(grand):>9}  total in {' + '.join(str(layer) for layer in _source_layers(source))}")
        if not args.models:
            print(f"({where})", file=sys.stderr)
        return EXIT_OK
    if args.models:
        removed = store.gc(older_than_days=args.older_than, everything=args.all)
        n = removed["models"]
        print(f"removed {n} model{'' if n == 1 else 's'} ({_size(removed['bytes'])}) and {removed['tmp']} unfinished "
              f"builds from {removed['root']}")
        what = ("model", "models")
    else:
        if args.older_than is None and not args.all:
            removed = cache.gc()
        else:
            removed = cache.gc(older_than_days=args.older_than, everything=args.all)
        print(f"removed {removed['entries']} entries ({_size(removed['bytes'])}), {removed['tmp']} temporary files; "
              f"compacted {removed['compacted']} map stores in {removed['root']}")
        what = ("entry", "entries")
    if removed["errors"]:
        done = removed["models"] if args.models else removed["entries"]
        failed = removed["failed"]
        head = f"could not remove {failed} {what[failed != 1]}" if failed else "some cleanup failed"
        if removed["failed"] and not done:
            head += "; nothing was removed"
        print(f"error: {head}:", file=sys.stderr)
        for line in removed["errors"][:10]:
            print(f"  {line}", file=sys.stderr)
        if len(removed["errors"]) > 10:
            print(f"  … and {len(removed['errors']) - 10} more", file=sys.stderr)
        return EXIT_USER
    return EXIT_OK


def _source_layers(source) -> list:
    return list(getattr(source, "layers", [source.root]))


def _fit(text, width: int, *, keep_end: bool = False) -> str:
    text = "-" if text in (None, "") else str(text).replace("\n", " ")
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1):] if keep_end else text[: width - 1] + "…"


def _entry_table(entries: list[dict], *, models: bool, layered: bool) -> tuple[list[str], list[list[str]]]:
    def when(e):
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"]))

    if models:
        headers = ["KIND", "NAME", "SIZE", "LAST USED", "STATE"]
        rows = [[e["kind"], e["key"], _size(e["bytes"]), when(e),
                 "complete" if e.get("complete") else "incomplete (an interrupted build; gc --models --all removes it)"]
                for e in entries]
        return headers, rows
    headers = ["KIND", "KEY", "OP", "LABEL", "RECIPE", "POOL", "ROWS", "SIZE", "LAST USED"]
    rows = []
    for e in entries:
        rows.append([e["kind"], e["key"][:12], _fit(e["op"], 16), _fit(e.get("label"), 40),
                     _fit(e.get("recipe"), 24), _fit(e.get("pool_path"), 36, keep_end=True),
                     f"{e['rows']} rows" if e.get("rows") else "-", _size(e["bytes"]), when(e)])
    if layered:
        headers.append("LAYER")
        for row, e in zip(rows, entries):
            row.append("writable" if e.get("writable") else "read-only")
    return headers, rows


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    """Rows on stdout (one per entry, for pipes), the header line on stderr, in aligned columns."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    right = {"SIZE"}

    def line(cells):
        parts = [c.rjust(w) if h in right else c.ljust(w) for h, c, w in zip(headers, cells, widths)]
        return "  ".join(parts).rstrip()

    print(line(headers), file=sys.stderr)
    for r in rows:
        print(line(r))


def cmd_measure(args) -> int:
    from datasel.dsl.measure import format_report, measure_selection

    report = measure_selection(args.selected, args.pool, metrics=args.metric, features=args.features,
                               seed=args.seed, draws=args.draws, cache_dir=args.cache, pool_format=args.pool_format,
                               on_bad_record=args.on_bad_record, quiet=args.quiet, **_cache_write(args))
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
