"""``harness``: run | validate | schema | scenarios | envs | report | nightly | history | gc.

Exit codes (also in the README):
    0  every cell met its expectation (nightly: nothing regressed)
    1  some cell failed its expectation (nightly: a regression)
    2  invalid input: bad YAML, unknown field/scenario/format, bad tolerance, a storage
       some host of the cluster cannot read ...
    3  the harness itself failed: Ray or storage unreachable or unusable, Ray refused a
       placement, Ray lost mid-run, results could not be published (what finished is still written)
    130 interrupted (Ctrl-C); results written so far are kept
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from . import text

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INFRA, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class UsageError(Exception):
    """Invalid input that is not a spec error (exit 2)."""


def _err(msg: str) -> None:
    print(f"harness: error: {text.one_line(msg)}", file=sys.stderr)


def _load(args) -> tuple[Any, dict]:
    """Sweep + the scenarios it needs, or raise SpecError/ScenarioError/UsageError."""
    from .scenario import discover, select
    from .spec import check_scenarios, load_sweep
    from .spec_types import normalize_scheme, storage_problem

    sweep = load_sweep(args.sweep)
    for option in ("storage", "history"):  # URIs given on the command line are checked like storage:
        uri = getattr(args, option, None)
        problem = storage_problem(uri) if uri else None
        if problem:
            raise UsageError(f"--{option}: {problem}")
        if uri:
            setattr(args, option, normalize_scheme(uri))
    available = discover([*sweep.scenario_paths, *args.scenarios_path])
    chosen = {s.name: s for s in select(available, sweep.scenarios, source=str(args.sweep))}
    check_scenarios(sweep, chosen)
    return sweep, chosen


def _plan(args, sweep) -> list:
    """The sweep's cells filtered by ``--only``; an unknown name is a UsageError naming the file."""
    from .sweep import plan

    try:
        return plan(sweep, args.only)
    except ValueError as exc:
        raise UsageError(f"{args.sweep}: {exc}") from None


def _progress(done: int, total: int, cell) -> None:
    """One stderr line per finished cell (``cell`` is a ``harness.records.CellResult``)."""
    from .compare import AS_ACCURATE, LESS_ACCURATE
    from .report import failure_mark

    metric = ""
    if cell.max_ulp_diff is not None and cell.verdict in ("within_tolerance", "mismatch"):
        metric = f" max {cell.max_ulp_diff:.3g} ulp, {cell.max_abs_diff or 0:.3g} abs"
        if cell.accuracy in (AS_ACCURATE, LESS_ACCURATE):
            metric += f", {cell.accuracy.replace('_', ' ')} vs float64"
    failed = "  save✗ (expect_save)" if failure_mark(cell) == "save✗" else f"  ✗ expected {cell.expected}"
    mark = {True: "", False: failed, None: "  (optional: not judged)"}[cell.passed]
    if cell.flaky:  # its repeats disagree: said before any failure, which it is never counted as in a nightly
        spread = f", up to {cell.repeat_spread_ulp:.3g} ulp apart" if cell.repeat_spread_ulp is not None else ""
        mark = f"  FLAKY ({cell.repeats} repeats disagree{spread}){mark}"
    err = f" -- {text.one_line(cell.error)}" if cell.error and cell.passed is not True else ""  # in full: the advice ends it
    name = text.one_line(f"{cell.scenario}/{cell.format} @ {cell.environment}")
    print(f"[{done:>{len(str(total))}}/{total}] {name}: {cell.verdict}{metric}{mark}{err}", file=sys.stderr, flush=True)


def cmd_run(args) -> int:
    from . import report
    from .sweep import run_sweep

    sweep, scenarios = _load(args)
    cells = _plan(args, sweep)
    out = Path(args.out) if args.out else Path("runs") / f"{sweep.name}-latest"
    if args.run_id and not args.resume:
        raise UsageError(f"--run-id {args.run_id}: only with --resume (it names the run to resume from storage); "
                         "add --resume, or drop --run-id to start a new run")
    if args.resume:
        from .run import Run
        from .storage import normalize_uri

        # A foreign or unreadable run directory (or a run not in storage) is refused before
        # anything starts; with --run-id, --out is rebuilt from the run's directory in storage.
        Run.resume(out, sweep, scenarios, normalize_uri(args.storage or sweep.storage), run_id=args.run_id)

    def started(run) -> None:  # the run id first: if this machine is lost, another resumes it with --run-id
        print(f"harness: sweep {sweep.name!r}: {len(cells)} cells "
              f"({len({c.scenario for c in cells})} scenarios x {len({c.format for c in cells})} formats x "
              f"{len({c.environment for c in cells})} environments) -> {out} (run {run.run_id})", file=sys.stderr,
              flush=True)

    try:
        result = run_sweep(sweep, scenarios, out_dir=out, address=args.address, storage=args.storage,
                           only=args.only, retrain=args.retrain, inline=args.inline, resume=args.resume,
                           progress=_progress, verbose=args.verbose, started=started)
    except BaseException:
        _write_partial_report(out, sweep.name)  # what finished is kept, with its report
        raise
    explanations = _explain_differences(sweep, scenarios, args, result) if not result.harness_failures else {}
    print(report.matrix_text(result.table))
    (out / "report.md").write_text(report.render(result.table, "md", title=f"Sweep {sweep.name}",
                                                 explanations=explanations))
    print(f"\nresults: {out / 'results.parquet'}\nreport:  {out / 'report.md'}")
    _publish_report(result, out / "report.md")
    return _exit_code(result)


def _publish_report(result, report_md: Path) -> None:
    """Put report.md next to the run's results in storage and say where (a cluster driver's disk may not last)."""
    from . import layout
    from .storage import Storage

    if not result.results_uri:
        return  # publishing the results failed already: reported as the run's failure
    try:
        result.run.publish({"report.md": report_md.read_bytes()})
    except Exception as exc:  # noqa: BLE001 -- the run's results are published; only its report is not
        print(f"harness: warning: report.md could not be published to storage: {text.one_line(str(exc), 200)}",
              file=sys.stderr)
    print(f"storage: {Storage.open(result.storage_uri).name_of(layout.run_root(result.run_id))}")


def _explain_differences(sweep, scenarios, args, result) -> dict:
    """With ``explain: true``, explain every cell that is not bitwise; the run's explanations, by cell.

    An explanation that cannot be made is reported and skipped: it never
    changes the run's results or its exit code.
    """
    from .explain import cells_to_explain, explain_cells, load_explanations

    cells = cells_to_explain(result.table) if sweep.explain and not getattr(args, "inline", False) else []
    if cells:
        print(f"harness: explain: true -- explaining {len(cells)} cell(s) that are not bitwise", file=sys.stderr)
        try:
            for exp in explain_cells(result.run, sweep, scenarios, cells, address=args.address,
                                     verbose=args.verbose):
                where = exp.localisation.first if exp.localisation and exp.localisation.first else "-"
                lost = exp.localisation.accuracy_lost_at if exp.localisation else None
                lost_text = f"loses accuracy at {text.one_line(lost)}; " if lost else ""
                print(f"  {text.one_line(exp.cell)}: starts at {text.one_line(where)}; {lost_text}"
                      f"{text.one_line(exp.summary or exp.message or '')}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 -- the run's results stand without their explanations
            reason = text.one_line(f"{type(exc).__name__}: {exc}", 300)
            print(f"harness: warning: explain failed: {reason}", file=sys.stderr)
    return load_explanations(result.run_dir)


def _exit_code(result) -> int:
    """3 if the harness itself failed (the first failure printed), else 1 if a cell missed its expectation."""
    for message in result.harness_failures[:1]:
        _err(message)
    if result.harness_failures:
        return EXIT_INFRA
    return EXIT_OK if result.passed else EXIT_FAILED


def _write_partial_report(out: Path, sweep_name: str) -> None:
    from . import report, results

    try:
        table = results.read_table(out)
        (out / "report.md").write_text(report.render(table, "md", title=f"Sweep {sweep_name} (incomplete)"))
    except Exception:
        pass  # nothing finished, or nothing readable: there is no report to write


def cmd_validate(args) -> int:
    sweep, _ = _load(args)
    cells = _plan(args, sweep)
    print(f"{args.sweep}: ok -- sweep {sweep.name!r}, {len(sweep.scenarios)} scenarios x {len(sweep.formats)} formats "
          f"x {len(sweep.environments)} environments = {len(cells)} cells; storage {sweep.storage}")
    return EXIT_OK


def cmd_schema(args) -> int:
    from .spec import schema_text

    sys.stdout.write(schema_text())
    return EXIT_OK


def cmd_scenarios(args) -> int:
    from tabulate import tabulate

    from .scenario import discover

    found = discover(args.scenarios_path)
    rows = [(s.name, s.seed, s.description, os.path.relpath(s.source_file)) for s in found.values()]
    print(tabulate(rows, headers=["scenario", "seed", "description", "file"]))
    return EXIT_OK


def cmd_envs(args) -> int:
    from .envs import describe_cluster

    sweep = None
    if args.sweep:
        from .spec import load_sweep

        sweep = load_sweep(args.sweep)
    print(describe_cluster(args.address, sweep, as_json=args.json))
    return EXIT_OK


def cmd_explain(args) -> int:
    import dataclasses
    import json

    from .explain import run_explain
    from .run import Run
    from .scenario import discover, select
    from .spec import load_sweep
    from .storage import normalize_uri

    try:
        run = Run.load(args.run_dir)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    if args.storage:
        run = dataclasses.replace(run, storage=normalize_uri(args.storage))
    source = args.sweep or run.source
    sweep = load_sweep(source)
    # The directories the run found its scenarios in, so --scenarios-path need not be given again.
    available = discover([*sweep.scenario_paths, *run.scenario_paths, *args.scenarios_path])
    scenarios = {s.name: s for s in select(available, sweep.scenarios, source=str(source))}
    run.check(sweep, scenarios)  # a sweep file (or scenario) changed since the run is refused
    try:
        explanation = run_explain(run, sweep, scenarios, args.cell, address=args.address,
                                  attribution=not args.no_attribution, verbose=args.verbose)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(explanation.to_dict(), indent=1))
    else:
        print(explanation.text())
    return EXIT_OK


def cmd_report(args) -> int:
    from . import report, results
    from .explain import load_explanations
    from .run import Run

    try:
        # A run directory is read through its Run (one row per cell); a bare results file as it is.
        table = Run.load(args.run_dir).table() if (Path(args.run_dir) / "run.json").exists() \
            else results.read_table(args.run_dir)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None

    published = "://" in args.run_dir  # a run directory in storage: its explanations stay with its driver
    name = Path(args.run_dir.split("?", 1)[0].rstrip("/") if published else args.run_dir).name
    text = report.render(table, args.format, title=f"Run {name}",
                         explanations={} if published else load_explanations(args.run_dir))
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return EXIT_OK


def _keep_days(args) -> int | None:
    """``--keep-days`` checked (a whole number of days >= 0) before anything runs or is deleted."""
    days = getattr(args, "keep_days", None)
    if days is not None and days < 0:
        raise UsageError(f"--keep-days {days}: must be a whole number of days >= 0 (history partitions older "
                         "than that many days are deleted)")
    if getattr(args, "dry_run", False) and days is None:
        raise UsageError("--dry-run: only means something with --keep-days D")
    return days


def _warn_skipped(problems: Sequence[str]) -> None:
    for problem in problems:
        print(f"harness: warning: history file {text.one_line(problem, 400)}", file=sys.stderr)


def cmd_nightly(args) -> int:
    from . import history, report
    from .storage import StorageError
    from .sweep import run_sweep

    keep_days = _keep_days(args)
    sweep, scenarios = _load(args)
    _plan(args, sweep)  # an unknown --only name is invalid input (exit 2), before anything runs
    result = run_sweep(sweep, scenarios, out_dir=args.out or Path("runs") / "nightly" / sweep.name,
                       address=args.address, storage=args.storage, only=args.only, retrain=args.retrain,
                       progress=_progress, verbose=args.verbose)
    if result.harness_failures:
        _write_partial_report(Path(result.run_dir), sweep.name)
        return _exit_code(result)
    explanations = _explain_differences(sweep, scenarios, args, result)
    title = f"Nightly {sweep.name}"
    try:
        try:  # tonight's results go into the history first: nothing read or deleted later can lose them
            history.append_run(result.table, args.history)
        except OSError as exc:
            raise StorageError(f"cannot append to the history {args.history}: {text.one_line(exc, 300)}") from None
        past = history.History.open(args.history)
        recent = past.recent(sweep.name, history.TREND_RUNS, result.table)
        changes = history.compare(past, result.table, factor=args.factor, recent=recent)
    except StorageError:  # the history is out of reach: tonight's reports still get written, without it
        report.write_all(result.table, result.run_dir, title=title, explanations=explanations)
        print(f"harness: tonight's results and reports are in {result.run_dir}", file=sys.stderr)
        raise
    _warn_skipped(changes.skipped_files)
    paths = report.write_all(result.table, result.run_dir, history=recent, changes=changes, title=title,
                             explanations=explanations)
    print(report.matrix_text(result.table))
    print(history.render_changes_md(changes))
    for fmt, path in paths.items():
        print(f"{fmt:>5}: {path}")
    if keep_days is not None:
        import datetime as dt

        tonight = past.date_of(result.run_id)
        freed = past.retain(keep_days, today=dt.date.fromisoformat(tonight), protect={result.run_id})
        print(freed.text())
    return EXIT_FAILED if changes.regressed else EXIT_OK


def cmd_history(args) -> int:
    import datetime as dt

    from tabulate import tabulate

    from . import history

    from .spec_types import normalize_scheme, storage_problem

    problem = storage_problem(args.history)
    if problem:
        raise UsageError(f"history URI: {problem}")
    args.history = normalize_scheme(args.history)
    keep_days = _keep_days(args)
    if args.last < 1:
        raise UsageError(f"--last {args.last}: must be at least 1")
    past = history.History.open(args.history)
    if keep_days is not None:
        today = dt.datetime.now(dt.timezone.utc).date()
        print(past.retain(keep_days, today=today, dry_run=args.dry_run).text())
        return EXIT_OK
    if args.cell:
        points = past.cell_points(_split_cell(args.cell), sweep=args.sweep_name)
        shown = [{k: v for k, v in dataclasses.asdict(p).items() if k != "flaky" or any(q.flaky is not None
                                                                                           for q in points)}
                 for p in points[-args.last:]]
        print(tabulate(shown, headers="keys") if shown else f"no results of {args.cell} in {args.history}")
        streak = history.cell_streak(points)
        if streak is not None:
            good = streak.last_good
            print(f"first bad: {streak.first_bad.run_id} ({streak.first_bad.date}), failing {streak.failing_runs} "
                  f"run(s); last good: " + (f"{good.run_id} ({good.date})" if good else "none in the history"))
        elif points:
            print(f"not failing in its latest run ({points[-1].run_id}: {history.cell_status(points[-1])})")
    else:
        runs = past.summaries(args.sweep_name, args.last)
        print(tabulate(runs, headers="keys") if runs else f"no runs in {args.history}")
    _warn_skipped(past.problems)
    return EXIT_OK


def cmd_gc(args) -> int:
    from .retention import collect
    from .spec_types import normalize_scheme, storage_problem
    from .storage import LEASES, Storage, normalize_uri

    problem = storage_problem(args.storage)
    if problem:
        raise UsageError(f"STORAGE: {problem}")
    for option, value in (("--keep-runs", args.keep_runs), ("--keep-days", args.keep_days),
                          ("--grace-hours", args.grace_hours)):
        if value is not None and value < 0:
            raise UsageError(f"{option} {value:g}: must be >= 0")
    uri = normalize_uri(normalize_scheme(args.storage))
    st = Storage.open(uri)
    if not any(st.exists(top) for top in ("runs", "artifacts", LEASES)):
        raise UsageError(f"STORAGE {args.storage}: nothing the harness wrote is there (no runs/, artifacts/ or "
                         f"{LEASES}/); check the path")
    report = collect(uri, keep_runs=args.keep_runs, keep_days=args.keep_days, grace_s=args.grace_hours * 3600,
                     dry_run=args.dry_run)
    print(report.text(items=args.dry_run or args.verbose))
    return EXIT_OK


def _split_cell(text: str) -> tuple[str, str, str]:
    parts = text.split("/")
    if len(parts) != 3:
        raise UsageError(f"--cell {text!r}: expected SCENARIO/FORMAT/ENVIRONMENT")
    return parts[0], parts[1], parts[2]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)

    def sweep_args(sp, *, running: bool):
        sp.add_argument("sweep", help="sweep YAML file")
        sp.add_argument("--scenarios-path", action="append", default=[], metavar="DIR",
                        help="extra directory of scenario modules (repeatable)")
        sp.add_argument("--only", nargs="+", action="extend", default=[], metavar="NAME",
                        help="restrict to these scenarios / formats / environments (repeatable: all are kept)")
        if running:
            sp.add_argument("--address", default="local",
                            help="Ray: 'local' (embedded, default), 'auto', or ray://host:10001")
            sp.add_argument("--storage", help="storage URI, overriding the sweep's (path, file://, s3://, gs://, hdfs://)")
            sp.add_argument("--retrain", action="store_true", help="train again even if artifacts exist")
            sp.add_argument("--verbose", action="store_true", help="show Ray and worker logs")

    r = sub.add_parser("run", help="run a sweep and print the matrix")
    sweep_args(r, running=True)
    r.add_argument("--out", help="run directory (default runs/<sweep>-latest)")
    r.add_argument("--inline", action="store_true", help="no Ray: run in this process (debugging)")
    r.add_argument("--resume", action="store_true", help="keep finished cells in --out and run the rest")
    r.add_argument("--run-id", metavar="RUN_ID",
                   help="with --resume: resume run RUN_ID from its directory in storage (runs/RUN_ID/), from any host")
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("validate", help="check a sweep (and its scenarios) without running it")
    sweep_args(v, running=False)
    v.set_defaults(func=cmd_validate)

    sc = sub.add_parser("schema", help="print the JSON Schema of a sweep file (for editors)")
    sc.set_defaults(func=cmd_schema)

    s = sub.add_parser("scenarios", help="list available scenarios")
    s.add_argument("--scenarios-path", action="append", default=[], metavar="DIR")
    s.set_defaults(func=cmd_scenarios)

    e = sub.add_parser("envs", help="list the cluster's nodes and which environments each can host")
    e.add_argument("--address", default="local")
    e.add_argument("--sweep", help="sweep YAML whose environments to match against the nodes")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(func=cmd_envs)

    x = sub.add_parser("explain", help="where a cell's difference starts, which setting causes it")
    x.add_argument("run_dir", help="run directory written by `harness run`")
    x.add_argument("cell", help="SCENARIO/FORMAT/ENVIRONMENT")
    x.add_argument("--sweep", help="the run's sweep file (default: the one recorded in RUN_DIR/run.json)")
    x.add_argument("--scenarios-path", action="append", default=[], metavar="DIR",
                   help="more scenario directories (the run's own are remembered in RUN_DIR/run.json)")
    x.add_argument("--address", default="local", help="Ray: 'local' (embedded, default), 'auto', or ray://host:10001")
    x.add_argument("--storage", help="storage URI (default: the run's)")
    x.add_argument("--no-attribution", action="store_true", help="only localise: do not re-run the cell per knob")
    x.add_argument("--json", action="store_true", help="machine-readable output")
    x.add_argument("--verbose", action="store_true", help="show Ray and worker logs")
    x.set_defaults(func=cmd_explain)

    rep = sub.add_parser("report", help="render a run's results")
    rep.add_argument("run_dir", help="run directory (or results.parquet), or a run's directory in storage "
                                     "(s3://.../runs/RUN_ID, as `run` prints it)")
    rep.add_argument("--format", default="md", choices=["md", "html", "junit", "json"])
    rep.add_argument("--out", help="file to write (default stdout)")
    rep.set_defaults(func=cmd_report)

    n = sub.add_parser("nightly", help="run, append to history, report what changed")
    sweep_args(n, running=True)
    n.add_argument("--history", required=True, help="history dataset URI (path, s3://...)")
    n.add_argument("--out", help="run directory (default runs/nightly/<sweep>)")
    n.add_argument("--factor", type=float, default=2.0, help="report ULP/abs changes beyond this factor")
    n.add_argument("--keep-days", type=int, metavar="D",
                   help="after appending tonight's results, delete history partitions older than D days")
    n.set_defaults(func=cmd_nightly)

    h = sub.add_parser("history", help="list past runs, one cell's trend and first bad run, or apply retention")
    h.add_argument("history", help="history dataset URI")
    h.add_argument("--sweep", dest="sweep_name", help="only this sweep")
    h.add_argument("--cell", help="SCENARIO/FORMAT/ENVIRONMENT trend")
    h.add_argument("--last", type=int, default=10, help="how many runs (default 10)")
    h.add_argument("--keep-days", type=int, metavar="D", help="delete history partitions older than D days")
    h.add_argument("--dry-run", action="store_true", help="with --keep-days: only print what would be freed")
    h.set_defaults(func=cmd_history)

    from .retention import DEFAULT_GRACE_S

    g = sub.add_parser("gc", help="remove old runs, artifacts no kept run uses, and crash debris from a storage")
    g.add_argument("storage", help="storage URI (path, s3://...)")
    g.add_argument("--keep-runs", type=int, metavar="N", help="keep at least the N newest runs")
    g.add_argument("--keep-days", type=float, metavar="D", help="keep runs younger than D days")
    g.add_argument("--grace-hours", type=float, default=DEFAULT_GRACE_S / 3600, metavar="H",
                   help=f"never remove an artifact younger than H hours (default {DEFAULT_GRACE_S / 3600:g})")
    g.add_argument("--dry-run", action="store_true", help="report what would go, remove nothing")
    g.add_argument("--verbose", action="store_true", help="list every path removed")
    g.set_defaults(func=cmd_gc)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``harness`` console script; returns the exit code (see the module docstring)."""
    from .engine import RayUnavailable
    from .explain import UnknownCell
    from .reach import StorageUnreachable
    from .results import ResultsError
    from .run import RunDirError
    from .scenario import ScenarioError
    from .spec import SpecError
    from .storage import StorageError

    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminated) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return args.func(args)
    except (SpecError, ScenarioError, UsageError, RunDirError, ResultsError, UnknownCell, StorageUnreachable) as exc:
        _err(_one_line(exc))
        return EXIT_INVALID
    except (RayUnavailable, StorageError) as exc:
        _err(_one_line(exc))
        return EXIT_INFRA
    except KeyboardInterrupt:
        _err("interrupted; results written so far are kept (continue with --resume)")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug of ours: still one line, and the traceback only on request
        if os.environ.get("HARNESS_DEBUG"):
            raise
        _err(f"internal error: {type(exc).__name__}: {_one_line(exc)} (set HARNESS_DEBUG=1 for the traceback, "
             "and please report it)")
        return EXIT_INFRA
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminated(signum, frame) -> None:
    """SIGTERM ends a run like Ctrl-C: what finished is written out, then exit 130."""
    raise KeyboardInterrupt


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
