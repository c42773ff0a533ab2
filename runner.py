#!/usr/bin/env python3
"""chorus-ablations command line: which of the seed's training-stability fixes matter?

    python runner.py run studies/quick.yaml [--workers N] [--storage URL] [--tracking-uri URI]
    python runner.py status studies/quick.yaml
    python runner.py fixes
    python runner.py train [--set key=value ...]
    python runner.py ui [--tracking-uri URI] [--port P]

Exit codes: 0 done, 1 runs failed, 2 bad input. This file only parses, calls ablations/ and
model/, prints and exits; the work happens there.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings


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


def cmd_train(args: argparse.Namespace) -> int:
    from model.config import ConfigError, HighLearningRateWarning, TrainConfig
    from model.train import train

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", HighLearningRateWarning)
            cfg = TrainConfig.from_overrides(_parse_sets(args.set), where="--set ")
    except ConfigError as e:
        raise _BadInput(str(e)) from None
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    changed = {k: v for k, v in cfg.to_dict().items() if v != TrainConfig().to_dict()[k]}
    print(f"training: {'fixed recipe' if not changed else changed}")

    def log(metrics: dict[str, float], step: int) -> None:
        if "val/loss" in metrics:
            epoch = step // cfg.steps_per_epoch
            print(f"epoch {epoch:>3}/{cfg.epochs}  step {step:>5}  "
                  f"val/loss {metrics['val/loss']:.4f}  val/chorus_f1 {metrics['val/chorus_f1']:.3f}  "
                  f"val/chorus_pct {metrics['val/chorus_pct']:6.2f}  ({time.perf_counter() - t0:.1f} s)",
                  flush=True)

    t0 = time.perf_counter()
    res = train(cfg, log=log)
    first = "-" if res.first_nonfinite_step is None else res.first_nonfinite_step
    print(f"status {res.status}  final val/chorus_f1 {_fmt(res.final_val_f1)}  "
          f"best {_fmt(res.best_val_f1)}  val/chorus_pct {_fmt(res.final_val_chorus_pct, 2)}  "
          f"max grad_norm {_fmt(res.max_grad_norm)}  non-finite events {res.nonfinite_events} "
          f"(first at step {first}, skipped {res.skipped_steps}, zeroed {res.zeroed_steps})  "
          f"{res.steps} steps in {res.wall_time_s:.1f} s ({res.steps_per_s:.1f} steps/s)")
    return 0


def _fmt(v: float, digits: int = 3) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runner.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train one configuration (defaults = the fixed recipe)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field, e.g. --set lr=1e-3 --set norm=batch")
    t.set_defaults(func=cmd_train)
    return p




def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
