#!/usr/bin/env python3
"""chorus-ablations command line: which of the seed's training-stability fixes matter?

    python runner.py run studies/quick.yaml [--workers N] [--storage URL] [--tracking-uri URI]
    python runner.py worker studies/quick.yaml --storage postgresql://... --tracking-uri http://...
    python runner.py status studies/quick.yaml
    python runner.py plan studies/quick.yaml [--target-effect 0.02]
    python runner.py report studies/quick.yaml
    python runner.py fixes
    python runner.py train [--set key=value ...]
    python runner.py ui [--tracking-uri URI] [--port P]

Exit codes: 0 done, 1 runs failed (or a store went away past the retries), 2 bad input,
130 interrupted. This file only parses, calls ablations/ and model/, prints and exits; the work
happens there.

Start-up is kept short: this module imports only the standard library and light modules, and
each command imports what it needs (torch, MLflow, Optuna) inside its function, so `fixes`,
`--help`, `status` and argument errors do not pay for torch and MLflow (tests/test_startup.py).
A new command should do the same.
"""

from __future__ import annotations

from ablations.engine.torch_setup import calm_openmp

calm_openmp()  # before anything can load torch (and its OpenMP runtime): see ablations/engine/torch_setup.py

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402


def _parse_sets(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise _BadInput(f"--set {pair!r}: expected key=value, e.g. --set lr=1e-3")
        out[key.strip()] = value.strip()
    return out


class _BadInput(Exception):
    """A user error: printed as one line, exit code 2."""


def _recipe(ref: str | None):
    from model.recipe import RecipeError, load

    try:
        return load(ref)
    except RecipeError as e:
        raise _BadInput(str(e)) from None


def _recipe_and_baseline(args: argparse.Namespace) -> tuple[str | None, str]:
    """`--recipe fixed|broken` was the baseline before recipes were model families: still read
    so, with a note."""
    recipe, baseline = args.recipe, args.baseline
    if recipe in ("fixed", "broken"):
        print(f"note: --recipe {recipe} now reads --baseline {recipe} (--recipe names a model "
              f"recipe: see `runner.py recipes`)", file=sys.stderr)
        recipe, baseline = None, recipe
    return recipe, baseline


def cmd_train(args: argparse.Namespace) -> int:
    from model.config import ConfigError, HighLearningRateWarning, resolve_device
    from model.train import train

    ref, baseline = _recipe_and_baseline(args)
    recipe = _recipe(ref)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", HighLearningRateWarning)
            base = {}
            if baseline == "broken":  # the recipe before its fixes; --set on top
                base = {k: list(v) if isinstance(v, tuple) else v
                        for k, v in recipe.overrides(baseline="broken").items()}
            cfg = recipe.config.from_overrides({**base, **_parse_sets(args.set)}, where="--set ")
        resolve_device(cfg.device)  # e.g. device=cuda on a machine without CUDA
    except ConfigError as e:
        raise _BadInput(str(e)) from None
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    defaults = recipe.config().to_dict()
    changed = {k: v for k, v in cfg.to_dict().items() if v != defaults[k]}
    print(f"training {recipe.name}: {'fixed recipe' if not changed else changed}")

    last: dict[str, float] = {}

    def log(metrics: dict[str, float], step: int) -> None:
        if "train/loss" in metrics:
            last.update(metrics, step=step)
        if "val/loss" in metrics:
            epoch = step // cfg.steps_per_epoch
            print(f"epoch {epoch:>3}/{cfg.epochs}  step {step:>5}  "
                  f"val/loss {metrics['val/loss']:.4f}  val/chorus_f1 {metrics.get('val/chorus_f1', math.nan):.3f}  "
                  f"val/chorus_pct {metrics.get('val/chorus_pct', math.nan):6.2f}  ({time.perf_counter() - t0:.1f} s)",
                  flush=True)

    t0 = time.perf_counter()
    try:
        res = train(cfg, log=log)
    except ConfigError as e:  # e.g. a data directory that does not exist (model.config.DataError)
        raise _BadInput(str(e)) from None
    first = ("-" if res.first_nonfinite_step is None else
             f"{res.first_nonfinite_step}" + (f" in {res.first_nonfinite_where}"
                                               if res.first_nonfinite_where else ""))
    if last:  # the seed's own log format, for comparing with its `loss=nan, grad_norm=nan, chorus%=0.00`
        print(f"last step {int(last['step'])}: loss={last['train/loss']:.4f}, "
              f"grad_norm={last['train/grad_norm']:.4f}, chorus%={last['train/chorus_pct']:.2f}")
    print(f"status {res.status}  final val/chorus_f1 {_fmt(res.final_val_f1)}  "
          f"best {_fmt(res.best_val_f1)}  val/chorus_pct {_fmt(res.final_val_chorus_pct, 2)}  "
          f"max grad_norm {_fmt(res.max_grad_norm)}  non-finite events {res.nonfinite_events} "
          f"(first at step {first}, skipped {res.skipped_steps}, zeroed {res.zeroed_steps})"
          + (f"  fp16 scaler skips {res.scaler_skips}" if res.scaler_skips else "")
          + "".join(f"  {k} {_fmt(v)}" for k, v in res.curves.items() if k.startswith("peak_"))
          + f"  {res.steps} steps in {res.wall_time_s:.1f} s ({res.steps_per_s:.1f} steps/s)")
    return 0


def _outage(e: Exception) -> str:
    from ablations.tracking.retry import describe_error

    return (f"a store is unreachable, retries spent ({describe_error(e)}); finished runs are "
            f"kept, a run in flight is re-queued: run the same command again once the store is "
            f"back")


def _fmt(v: float, digits: int = 3) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _load_spec(path: str):
    from ablations.design.spec import SpecError, load_spec

    try:
        return load_spec(path)
    except SpecError as e:
        raise _BadInput(str(e)) from None


def cmd_fixes(args: argparse.Namespace) -> int:
    from model.recipe import table

    print(table(_recipe(args.recipe)))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from model.recipe import DEFAULT, SHIPPED

    print("recipe              fixes  description")
    for name in SHIPPED:
        r = _recipe(name)
        print(f"{name + (' *' if name == DEFAULT else ''):<20}{len(r.fixes):>5}  {r.description}")
    print("\n* = the default. A study file picks one with `recipe: NAME`, or your own with "
          "`recipe: package.module:ATTR` or `recipe: path/to/file.py:ATTR` (README \"Your own "
          "model\"). `runner.py fixes --recipe NAME` lists a recipe's fixes.")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.workers < 0:
        raise _BadInput(f"--workers {args.workers}: must be >= 0 (0: only queue the runs)")
    spec = _load_spec(args.study)
    runs = _plan_size(spec)
    if runs > MAX_RUNS and not args.yes:
        raise _BadInput(f"{args.study}: {runs} runs is over {MAX_RUNS}: check the design (a long "
                        f"value list?), or pass --yes to queue them all")
    from ablations.results.power import preamble

    print("\n".join(preamble(spec, args.tracking_uri)), flush=True)
    from ablations.engine.launch import launch  # (after the checks: errors come fast)
    from ablations.tracking.retry import StoreError

    _sigterm_is_ctrl_c()
    try:
        res = launch(spec, args.storage, args.tracking_uri, args.workers,
                     device=_device(args.device, several=True), ensemble=args.ensemble)
    except StoreError as e:
        raise _BadInput(str(e)) from None
    if args.workers == 0:
        from ablations.engine.storage import safe_url

        print(f"{res.done}/{res.total} runs done; the rest are queued. Progress: python runner.py "
              f"status {args.study} --storage {safe_url(args.storage)}")
        return 0
    _print_summary(spec, res.summary)
    if res.done and not args.no_report and not res.interrupted:
        _report(spec, args.study, args.tracking_uri, Path(args.report_dir or f"reports/{spec.name}"))
    print(f"\n{res.done}/{res.total} runs done"
          + (f", {res.gave_up} given up after {spec.retries} retries" if res.gave_up else "")
          + f". Browse: python runner.py ui --tracking-uri {args.tracking_uri} "
            f"(experiment {spec.name!r}, id {res.experiment_id})")
    if res.interrupted:
        return 130
    return 0 if res.done >= res.total and not res.gave_up else 1


MAX_RUNS = 20_000  # a design this big is more likely a typo than a plan: `run` asks for --yes


def _plan_size(spec) -> int:
    """Print the plan's size first (a big design is then not silent), and return its runs."""
    from ablations.design.designs import cells

    if spec.design == "search":
        runs = (spec.trials or 0) * len(spec.seeds)
        print(f"plan: {spec.trials} trials x {len(spec.seeds)} seeds = {runs} runs", flush=True)
    else:
        n = len(cells(spec))
        runs = n * len(spec.seeds)
        print(f"plan: {n} cells x {len(spec.seeds)} seeds = {runs} runs", flush=True)
    return runs


def _print_summary(spec, summary: list[dict]) -> None:
    if not summary:
        return
    metric = spec.objective_metric
    width = max(len("cell"), *(len(c["cell"]) for c in summary))
    print(f"\n{'cell':<{width}}  runs  {'converged/recovered/collapsed/diverged':<38}  "
          f"{metric} mean ± sd")
    for c in summary:
        st = c["statuses"]
        counts = "/".join(str(st.get(k, 0)) for k in ("converged", "recovered", "collapsed", "diverged"))
        print(f"{c['cell']:<{width}}  {c['runs']:>4}  {counts:<38}  {_fmt(c['mean'])} ± {_fmt(c['sd'])}")
    print(f"(a diverged run's {metric} counts as {spec.diverged_value():g})")


def _report(spec, spec_path: str, tracking_uri: str, out: Path) -> bool:
    """Write the report; a failure here never loses the study's results (they are stored)."""
    from ablations.results import analysis, report
    from ablations.tracking.tracker import attach_report

    try:
        rep = report.write_report(spec.name, tracking_uri, out, analysis.plan_cells(spec_path),
                                  design=spec.design, objective=spec.objective_metric,
                                  recipe=spec.recipe)
        parent = attach_report(tracking_uri, spec.name, str(out), *report.run_summary(rep))
    except Exception as e:  # noqa: BLE001 - reported in one line, results are safe
        print(f"warning: report not written ({type(e).__name__}: {e})", file=sys.stderr)
        return False
    print(f"\nverdicts ({len(rep.runs)} runs):")
    print("\n".join(report.verdict_lines(rep)))
    print(f"report: {rep.markdown} ({len(rep.figures)} figures; with them: {rep.html})"
          + (f"; logged to MLflow run {parent}" if parent else ""))
    return True


def cmd_report(args: argparse.Namespace) -> int:
    spec = _load_spec(args.study)
    ok = _report(spec, args.study, args.tracking_uri, Path(args.out or f"reports/{spec.name}"))
    return 0 if ok else 1


def cmd_plan(args: argparse.Namespace) -> int:
    from ablations.results.power import plan

    spec = _load_spec(args.study)
    for name in ("target_effect", "sd"):
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise _BadInput(f"--{name.replace('_', '-')} {v:g}: must be a positive number")
    print("\n".join(plan(spec, args.tracking_uri, args.target_effect, args.sd)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    spec = _load_spec(args.study)
    from ablations.engine.progress import study_status
    from ablations.tracking.retry import StoreError

    try:
        st = study_status(spec, args.storage)
    except StoreError as e:
        raise _BadInput(str(e)) from None
    print(f"study {st['study']}: {st['done']}/{st['total']} done, {st['running']} running, "
          f"{st['queued']} queued, {st['given_up']} failed (given up), "
          f"{st['failed_attempts']} failed attempts, {st['diverged']} diverged; "
          f"ETA {'-' if st['eta_s'] is None else format(st['eta_s'] / 60, '.1f') + ' min'}")
    for r in st["in_flight"][:20]:
        since = "" if r["running_s"] is None else f" for {r['running_s']:.0f} s"
        print(f"  running: {r['cell']} | seed {r['seed']} on worker {r['worker']}{since}")
    if len(st["in_flight"]) > 20:
        print(f"  ... and {len(st['in_flight']) - 20} more")
    return 0


def _sigterm_is_ctrl_c() -> None:
    """SIGTERM (a scheduler pre-empting a job, `kill`) stops like Ctrl-C: the run in flight is
    re-queued at once instead of waiting out the heartbeat grace period."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _device(device: str | None, several: bool = False) -> str | None:
    """--device: validated like TrainConfig.device, and CUDA must be there if asked for; `run`
    takes a comma-separated list that its local workers share out (cuda:0,cuda:1)."""
    if device is None:
        return None
    from model.config import ConfigError, TrainConfig, resolve_device

    for one in device.split(",") if several else [device]:
        try:
            TrainConfig(device=one)
            resolve_device(one)
        except ConfigError as e:
            raise _BadInput(f"--device {device}: {str(e).removeprefix('device: ')}") from None
    return device


def cmd_worker(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise _BadInput(f"--threads {args.threads}: must be >= 1")
    if args.local_workers < 1:
        raise _BadInput(f"--local-workers {args.local_workers}: must be >= 1")
    spec = _load_spec(args.study)
    from ablations.engine.launch import join_and_work, threads_per_worker
    from ablations.tracking.retry import StoreError

    _sigterm_is_ctrl_c()
    try:
        n = join_and_work(spec, args.storage, args.tracking_uri, device=_device(args.device),
                          threads=args.threads or threads_per_worker(args.local_workers),
                          fit_threads=args.threads is None, wait=not args.no_wait,
                          ensemble=args.ensemble)
    except StoreError as e:
        raise _BadInput(str(e)) from None
    except KeyboardInterrupt:
        print("interrupted: the run in flight was re-queued, finished runs are kept",
              file=sys.stderr)
        return 130
    print(f"worker done: {n} runs executed here; no queued run left")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from ablations.tracking.ui.serve import UIError, serve

    try:
        return serve(args.tracking_uri, args.port, args.study)
    except UIError as e:
        raise _BadInput(str(e)) from None


def cmd_dashboard(args: argparse.Namespace) -> int:
    from ablations.tracking.ui.serve import UIError, serve_dashboard

    try:
        return serve_dashboard(args.storage, args.port, args.study)
    except UIError as e:
        raise _BadInput(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from ablations.engine.defaults import DEFAULT_STORAGE, DEFAULT_TRACKING, STORAGE_ENV

    # The storage URL may carry a password: from the environment it stays off command lines,
    # where `ps` shows it to every user of the machine (a ~/.pgpass file is the other way).
    storage = os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
    storage_help = (f"Optuna storage URL (default ${STORAGE_ENV} if set, else {DEFAULT_STORAGE}; "
                    f"postgresql://... to share a study between machines)")
    p = argparse.ArgumentParser(prog="runner.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stores(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--storage", default=storage, help=storage_help)
        sp.add_argument("--tracking-uri", default=DEFAULT_TRACKING,
                        help=f"MLflow tracking URI (default {DEFAULT_TRACKING})")

    def ensemble_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--ensemble", choices=("auto", "on", "off"), default="auto",
                        help="train the seeds of a cell together as one vectorised ensemble "
                             "(same results within a stated tolerance, model/ensemble.py): auto = "
                             "on CUDA only, where it pays; on a CPU it does not (default auto)")

    r = sub.add_parser("run", help="run (or resume) a study file")
    r.add_argument("study", help="study file, e.g. studies/quick.yaml")
    r.add_argument("--workers", type=int, default=1,
                   help="local worker processes (cores are split); 0 only queues the runs for "
                        "`runner.py worker` processes started here or on other machines")
    r.add_argument("--report-dir", default=None, help="where the report goes (default reports/NAME)")
    r.add_argument("--no-report", action="store_true", help="skip the report at the end")
    r.add_argument("--yes", action="store_true",
                   help=f"queue a design of more than {MAX_RUNS} runs (refused without it)")
    r.add_argument("--device", default=None,
                   help="run every run on this device (cpu, cuda, cuda:N), or share out a list "
                        "between the local workers (cuda:0,cuda:1); default: the study's")
    ensemble_arg(r)
    stores(r)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="done / running / failed / queued runs of a study")
    s.add_argument("study")
    s.add_argument("--storage", default=storage, help=storage_help)
    s.set_defaults(func=cmd_status)

    pl = sub.add_parser("plan", help="design, estimated wall time and power of a study, before "
                                     "running it (trains nothing)")
    pl.add_argument("study")
    pl.add_argument("--tracking-uri", default=DEFAULT_TRACKING,
                    help=f"tracking store with earlier runs (default {DEFAULT_TRACKING}); read only")
    pl.add_argument("--target-effect", type=float, default=None, metavar="F1",
                    help="print the seeds needed to detect this F1 effect at 80%% power")
    pl.add_argument("--sd", type=float, default=None,
                    help="F1 sd between seeds to assume (default: from earlier runs of the same "
                         "recipes in the store, else 0.03)")
    pl.set_defaults(func=cmd_plan)

    w = sub.add_parser("worker", help="join a running study (from any machine) until no run is left")
    w.add_argument("study")
    w.add_argument("--device", default=None,
                   help="run every run here on this device (cpu, cuda, cuda:N); default: the study's")
    w.add_argument("--threads", type=int, default=None,
                   help="torch threads, pinned (default: this machine's cores / --local-workers, "
                        "lowered before each run to the cores other processes leave free)")
    w.add_argument("--local-workers", type=int, default=1, metavar="N",
                   help="how many workers you start on this machine, to split its cores (default 1)")
    w.add_argument("--no-wait", action="store_true",
                   help="exit when nothing is queued, even while other workers still run")
    ensemble_arg(w)
    stores(w)
    w.set_defaults(func=cmd_worker)

    rp = sub.add_parser("report", help="effects, verdicts and figures of a study (from MLflow)")
    rp.add_argument("study")
    rp.add_argument("--tracking-uri", default=DEFAULT_TRACKING)
    rp.add_argument("--out", default=None, help="output folder (default reports/NAME)")
    rp.set_defaults(func=cmd_report)

    f = sub.add_parser("fixes", help="a recipe's fixes as a table (default: the seed's CNN)")
    f.add_argument("--recipe", default=None, help="a recipe name (see `recipes`), or "
                                                  "package.module:ATTR / file.py:ATTR")
    f.set_defaults(func=cmd_fixes)

    r = sub.add_parser("recipes", help="the shipped recipes (model families) a study can ablate")
    r.set_defaults(func=cmd_recipes)

    t = sub.add_parser("train", help="train one configuration (defaults = the fixed recipe)")
    t.add_argument("--recipe", default=None,
                   help="the model recipe (default chorus_cnn; see `recipes`), or "
                        "package.module:ATTR / file.py:ATTR")
    t.add_argument("--baseline", choices=("fixed", "broken"), default="fixed",
                   help="start from the fixed recipe (the defaults) or the broken one (every fix "
                        "off, as the seed's authors first trained it); --set applies on top")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set lr=1e-3 --set norm=batch")
    t.set_defaults(func=cmd_train)

    def port(v: str) -> int:
        if not v.isdigit() or not 0 < int(v) < 65536:
            raise argparse.ArgumentTypeError(f"{v!r} is not a port (1-65535)")
        return int(v)

    u = sub.add_parser("ui", help="MLflow UI for the study store, on 127.0.0.1 (Ctrl-C stops it)")
    u.add_argument("--tracking-uri", default=DEFAULT_TRACKING,
                   help=f"MLflow tracking store (default {DEFAULT_TRACKING})")
    u.add_argument("--port", type=port, default=5000, help="port on 127.0.0.1 (default 5000)")
    u.add_argument("--study", default=None,
                   help="study name: print only its experiment's URL (default: every study's)")
    u.set_defaults(func=cmd_ui)

    d = sub.add_parser("dashboard", help="optuna-dashboard on the study storage, on 127.0.0.1")
    d.add_argument("--storage", default=storage, help=storage_help)
    d.add_argument("--port", type=port, default=8080, help="port on 127.0.0.1 (default 8080)")
    d.add_argument("--study", default=None,
                   help="study name: print only its page's URL (default: every study's)")
    d.set_defaults(func=cmd_dashboard)
    return p


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the command line shows it: one line, no Python source line under it (the
    category is named only for warnings that are not the plain or this project's kind)."""
    text = " ".join(str(message).split())
    ours = category is UserWarning or category.__module__.split(".")[0] in ("model", "ablations")
    return f"warning: {text}" + ("" if ours else f" ({category.__name__})") + "\n"


def main(argv: list[str] | None = None) -> int:
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = formatwarning


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a store that went away mid-study: one line, finished runs are kept
        from ablations.tracking.retry import StoreUnavailable
        from ablations.tracking.retry import is_outage

        if not (isinstance(e, StoreUnavailable) or is_outage(e)):
            raise
        print(f"error: {e if isinstance(e, StoreUnavailable) else _outage(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
