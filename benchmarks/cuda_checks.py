"""The GPU path, checked for real on a machine with CUDA (no GPU was lent where this was written).

    python benchmarks/cuda_checks.py              # tests on CUDA, a quick study, precision modes
    python benchmarks/cuda_checks.py --seed-grid  # also the seed grid's wall time on one GPU

1. the test suite's device tests with CUDA present (the CUDA-parametrized stress-knob tests:
   every precision trains finite, a real fp16 overflow is localised, GradScaler skips counted);
2. `runner.py run studies/quick.yaml --device cuda` in a temporary directory, timed;
3. the fixed recipe for 80 steps in fp32, bf16 and fp16 (autocast, GradScaler) on CUDA, side by
   side: steps/s and the ratios to fp32, and the same on the CPU for comparison;
4. with --seed-grid: `runner.py run studies/seed_fixes.yaml --device cuda` (192 runs), timed;
5. the vectorised ensemble (model/ensemble.py) on CUDA: each member's dropout masks equal solo's
   (native_dropout under the member's CUDA generator state), members' statuses and curves equal
   separate runs (train/loss within 1e-3 relative over the first 10 steps; 1e-4 measured on CPU),
   then benchmarks/ensemble.py --device cuda (runs/hour, M = 3, 8, 32).
Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._env import code_state, load_average  # noqa: E402


def sh(args: list[str], cwd: Path) -> tuple[int, float, str]:
    t = time.perf_counter()
    p = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    return p.returncode, time.perf_counter() - t, (p.stdout + p.stderr)[-3000:]


def precision_speed(device: str, steps: int = 80) -> dict[str, float]:
    from model.config import TrainConfig
    from model.train import train

    out = {}
    for precision in ("fp32", "bf16", "fp16"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = TrainConfig(device=device, precision=precision, epochs=2,
                              steps_per_epoch=steps // 2)
        train(TrainConfig(device=device, precision=precision, epochs=1, steps_per_epoch=3))  # warm
        res = train(cfg)
        out[precision] = res.steps_per_s
        print(f"  {device:<5} {precision}: {res.steps_per_s:7.1f} steps/s  status {res.status}  "
              f"events {res.nonfinite_events}  scaler skips {res.scaler_skips}", flush=True)
    return out


def ensemble_check(device: str = "cuda") -> list[str]:
    """Members equal separate runs on CUDA; the ensemble's runs/hour. Returns failed checks."""
    import math

    import torch
    import torch.nn.functional as F

    from model.config import TrainConfig
    from model.data import make_data
    from model.ensemble import _Ensemble, train_ensemble
    from model.train import Run, build_model, train

    failed, cuda = [], device.startswith("cuda")
    cfgs = [TrainConfig(device=device, epochs=2, steps_per_epoch=10, seed=s) for s in range(3)]
    data = make_data(cfgs[0])
    runs, gens = [], []
    for c in cfgs:
        torch.manual_seed(c.seed)
        runs.append(Run(c, data, build_model(c, data.n_features).to(device), device, print, 0.0))
        gens.append(torch.cuda.get_rng_state() if cuda else
                    torch.Generator().set_state(torch.get_rng_state()))
    states = [g.clone() if cuda else g.get_state() for g in gens]
    ens = _Ensemble(runs, gens, device)
    noise = ens._noise()[f"{ens.drops[0]}.noise"]
    shape, stride = ens.layouts[0]
    masks_ok = True
    for j, st in enumerate(states):
        torch.cuda.set_rng_state(st) if cuda else torch.set_rng_state(st)
        solo = F.dropout(torch.empty_strided(shape, stride, device=device).fill_(1.0),
                         ens.p, True)
        masks_ok &= bool(torch.equal(solo, noise[j]))
    print(f"5. ensemble: dropout masks equal solo's: {masks_ok}", flush=True)
    failed += [] if masks_ok else ["ensemble dropout masks"]
    curves = [[] for _ in cfgs], [[] for _ in cfgs]
    # The first 10 steps: later, training amplifies any kernel difference (model/ensemble.py).
    solo = [train(c, data, lambda m, s, k=k: s <= 10 and curves[0][k].append(m.get("train/loss")))
            for k, c in enumerate(cfgs)]
    logs = [lambda m, s, k=k: s <= 10 and curves[1][k].append(m.get("train/loss"))
            for k in range(len(cfgs))]
    ens_res = train_ensemble(cfgs, data, logs, ensemble=True)
    worst = max(abs(a - b) / max(abs(a), 1e-12) for k in range(len(cfgs))
                for a, b in zip(curves[0][k], curves[1][k]) if a is not None and b is not None
                and math.isfinite(a) and math.isfinite(b))
    same = [r.status for r in solo] == [r.status for r in ens_res]
    print(f"   members vs separate runs: statuses equal {same}, steps 1-10 train/loss max rel diff "
          f"{worst:.2e}", flush=True)
    failed += [] if same and worst < 1e-3 else ["ensemble equals separate runs"]
    rc, s, out = sh([sys.executable, str(ROOT / "benchmarks" / "ensemble.py"), "--device", device,
                     "--members", "3", "8", "32", "--steps", "40", "--repeats", "2"], ROOT)
    print(out.strip(), flush=True)
    failed += ["ensemble benchmark"] if rc else []
    return failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed-grid", action="store_true", help="also time studies/seed_fixes.yaml")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to check (run this on a GPU machine)")
        return 2
    print(f"{torch.cuda.get_device_name(0)}; torch {torch.__version__}; {code_state()}; "
          f"load {load_average()}", flush=True)
    failed = []
    rc, s, out = sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                     "tests/model/test_stress_knobs.py", "tests/test_cli_train.py", "tests/model/test_train.py",
                     "tests/model/test_cnn.py", "tests/model/test_ensemble.py"], ROOT)
    print(f"1. device tests on CUDA: {'ok' if rc == 0 else 'FAILED'} ({s:.0f} s)\n"
          + out.strip().splitlines()[-1], flush=True)
    failed += ["tests"] if rc else []
    with tempfile.TemporaryDirectory() as d:
        rc, s, out = sh([sys.executable, str(ROOT / "runner.py"), "run",
                         str(ROOT / "studies" / "quick.yaml"), "--device", "cuda", "--no-report"],
                        Path(d))
        print(f"2. quick study on cuda: {'ok' if rc == 0 else 'FAILED'} in {s:.0f} s", flush=True)
        if rc:
            print(out)
            failed.append("quick study")
    print("3. precision modes, fixed recipe, 80 steps:", flush=True)
    gpu = precision_speed("cuda")
    cpu = precision_speed("cpu")
    for p in ("bf16", "fp16"):
        print(f"   {p} / fp32 steps/s: cuda {gpu[p] / gpu['fp32']:.2f}x, cpu {cpu[p] / cpu['fp32']:.2f}x")
    print(f"   cuda / cpu steps/s in fp32: {gpu['fp32'] / cpu['fp32']:.2f}x", flush=True)
    if args.seed_grid:
        with tempfile.TemporaryDirectory() as d:
            rc, s, out = sh([sys.executable, str(ROOT / "runner.py"), "run",
                             str(ROOT / "studies" / "seed_fixes.yaml"), "--device", "cuda",
                             "--no-report"], Path(d))
            print(f"4. seed grid (192 runs) on one GPU: {'ok' if rc == 0 else 'FAILED'} in "
                  f"{s / 60:.1f} min", flush=True)
            failed += ["seed grid"] if rc else []
    failed += ensemble_check("cuda")
    print("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
