"""train_ensemble(cfgs, data, logs) -> [TrainResult]: the seeds of one cell trained as one
vectorised ensemble, each member's outcome equal to its own train(cfg) run within a tolerance.

Design. The members' parameters, BatchNorm buffers and optimizer state are stacked along a new
leading dim [M, ...]; one step is `vmap(functional_call(model))` over the stack (the members'
own batches stacked as [M, B, T, F]), one backward of the summed losses (members share no
parameter, so each slice of a stacked gradient is that member's gradient) and one optimizer step
on the stacked tensors. On a GPU a step of this small CNN is bound by kernel launches and Python,
so M members cost about the launches of one. vmap (not a hand-written grouped-conv model) keeps
cnn.py the one definition of the network: any change there is picked up here.

Only the *common* step is vectorised: loss and grad norm finite (and no spike under
spike_action=skip). Everything else is done by train()'s own loop (model/train.py `Run`): a
member that needs anything more (a non-finite loss, grad norm or validation output, a spike to
skip, a rollback, forensics) is EJECTED: its pre-step parameters, BatchNorm buffers, optimizer
state, sampler position, dropout RNG state, partial TrainResult, Monitor and log are written into
its own `Run`, which redoes that step (or that validation) solo and carries the member to its end,
while the other members go on together. The common step itself goes through the member's `Run`
too: its named parts (begin_step, after_sync, spike_skips, take_snapshot, updated) and
model.train.apply_update (clip and clamp, with one grad norm per member). So the policy code
exists once, and a member that diverges cannot change the others. Per member, exactly as
train() does:
  * init: torch.manual_seed(seed) then build_model; data order: its own WindowSampler(seed);
  * dropout: each member's masks are drawn outside vmap, in solo order (block by block), from a
    generator holding that member's RNG state, with the layout (strides) solo's dropout input
    has, then passed into the vmapped forward as buffers; on CPU these are bit-identical to
    solo's masks (tested). On CUDA the masks come from torch.native_dropout (solo's fused
    kernel) under the member's swapped-in CUDA generator state (benchmarks/cuda_checks.py checks
    it; not verified where this was written, no GPU was lent);
  * grad norm and clipping per member (a per-member pre-clip norm, clip coefficient [M]);
  * BatchNorm running statistics per member (stacked buffers, updated in place under vmap);
  * Adam/AdamW/SGD are elementwise, so one optimizer over the stack equals M optimizers as long
    as every member steps at every step, which holds: a member that skips a step is ejected.
    Its shared `step` counter is copied into an ejected member's state.
  * param_clamp, lr schedules, spike *records*, rollback snapshots (taken from the member's
    slices every rollback_every steps), validation (vmapped too) and the final parameter check.

Tolerance. A vmapped convolution runs as one grouped convolution, a different kernel from solo's:
its sums round differently, so the ensemble is NOT bit-identical to separate runs. The first
step's loss differs by at most ~1 ulp; training then amplifies the difference as it amplifies any
change of kernel. Measured on the default model (CPU, seed 0, 320 steps), train/loss per step,
max relative difference up to step 10 / 40 / 80 / 160 / 320:
    ensemble vs separate run:        7e-8  9e-7  4e-3  0.6  11   (final F1 0.9446 vs 0.9406)
    separate run, 1 vs 2 threads:    8e-8  1e-4  7e-3  0.5  11   (final F1 0.9457 vs 0.9406)
So "bit-identical" holds for one kernel at one thread count only; after ~100 steps the
trajectories of the same run on 1 and 2 threads decorrelate just as far as the ensemble's do.
What the ensemble guarantees: every member's curves agree with its separate run to <= 1e-5
relative while training is not chaotic (checked on 10-step runs by tests/model/test_ensemble.py:
measured <= 2e-7; fixed and broken recipes, BatchNorm, dropout, clipping, a member that
diverges, every non-finite policy), with the same events at the same steps and the same
statuses; over a long run, the same outcome as a rerun of that run on another thread count or
machine. With BatchNorm, eval-mode metrics differ more (test_ensemble.py says why and how much).

Not vectorised (trained as separate train() runs, said by `ensemble_declines`): precision fp16 /
bf16 (GradScaler's skip-and-rescale and autocast under vmap are not reproduced here), a single
member, and CPU under ensemble="auto": on CPU the model is compute-bound, so stacking gains
little (benchmarks/ensemble.py measures it); on CUDA "auto" turns it on.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Optional, Union

import torch
from torch import nn
from torch.func import functional_call, vmap

from model.config import TrainConfig, cuda_index, resolve_device
from model.data import Batch, SongData, make_data
from model.metrics import FrameCounts, count_frames, masked_cross_entropy, predicted_chorus
from model.train import (LogFn, Run, TrainResult, apply_update, build_model, build_optimizer,
                         no_log, train)

__all__ = ["ensemble_declines", "train_ensemble"]


def ensemble_declines(cfgs: list[TrainConfig], ensemble: Union[bool, str] = "auto") -> str:
    """Why these members would be trained one at a time ("" when they are vectorised)."""
    if ensemble is False or ensemble == "off":
        return "ensemble off"
    if len(cfgs) < 2:
        return "a single member"
    if type(cfgs[0]) is not TrainConfig:  # its members are vectorised with the CNN's loss
        return "vectorised for the chorus_cnn recipe only"
    if cfgs[0].precision != "fp32":
        return f"precision {cfgs[0].precision} (GradScaler/autocast are not vectorised here)"
    if ensemble == "auto" and torch.device(resolve_device(cfgs[0].device)).type != "cuda":
        return "CPU under ensemble=auto (compute-bound: see benchmarks/ensemble.py)"
    return ""


class _GivenDropout(nn.Module):
    """Dropout whose scaled mask (`noise`, = bernoulli(1-p) / (1-p)) is drawn outside vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("noise", torch.empty(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.noise if self.training else x  # solo dropout computes input * noise


def _same_cell(cfgs: list[TrainConfig]) -> None:
    for c in cfgs[1:]:
        diff = [f.name for f in dataclasses.fields(c) if f.name != "seed"
                and getattr(c, f.name) != getattr(cfgs[0], f.name)]
        if diff:
            raise ValueError(f"train_ensemble: members must differ only in seed; seed {c.seed} "
                             f"differs from seed {cfgs[0].seed} in {', '.join(diff)}")


class _Ensemble:
    """The stacked state of the members still trained together (`ids`: their indices)."""

    def __init__(self, runs: list[Run], gens: list[torch.Generator], device: str):
        self.runs, self.device, self.cfg = runs, device, runs[0].cfg
        self.ids = list(range(len(runs)))
        self.gens = gens  # per member: the RNG state its dropout draws from (CPU generator, or a
        # holder of the CUDA state that is swapped into the device generator to draw)
        m0 = runs[0].model
        self.drops = [n for n, m in m0.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
        self.p = m0.get_submodule(self.drops[0]).p if self.drops else 0.0
        self.layouts = self._dropout_layouts(m0) if self.drops else []
        self.template = copy.deepcopy(m0).to("meta")
        for name in self.drops:
            parent, _, leaf = name.rpartition(".")
            setattr(self.template.get_submodule(parent), leaf, _GivenDropout())
        self.pnames = [n for n, p in m0.named_parameters() if p.requires_grad]
        self.bnames = [n for n, _ in m0.named_buffers()]
        self.params = {n: torch.stack([dict(r.model.named_parameters())[n].detach() for r in runs])
                       .requires_grad_(True) for n in self.pnames}
        self.buffers = {n: torch.stack([dict(r.model.named_buffers())[n] for r in runs])
                        for n in self.bnames}
        self.opt = build_optimizer(self.cfg, list(self.params.values()))
        self._step_fn = vmap(self._member_step)
        self._eval_fn = vmap(self._member_eval, in_dims=(0, 0, None, None))

    # ---------------------------------------------------------------- the vmapped functions
    def _member_step(self, params, buffers, x, mask, y):
        logits = functional_call(self.template, (params, buffers), (x, mask))
        loss = masked_cross_entropy(logits, y, mask)
        pred = predicted_chorus(logits.detach()) & mask
        return loss, 100.0 * pred.sum() / mask.sum().clamp_min(1)

    def _member_eval(self, params, buffers, x, mask):
        return functional_call(self.template, (params, buffers), (x, mask))

    # ---------------------------------------------------------------- dropout masks
    def _dropout_layouts(self, model: nn.Module) -> list[tuple[tuple, tuple]]:
        """Shape and strides of each dropout input in a training forward (solo's mask has
        empty_like(input)'s layout, and a CPU bernoulli fills memory in order)."""
        cfg, probe, seen = self.cfg, copy.deepcopy(model), []
        hooks = [probe.get_submodule(n).register_forward_pre_hook(
            lambda m, a: seen.append((tuple(a[0].shape), a[0].stride()))) for n in self.drops]
        x = torch.zeros(cfg.batch_size, cfg.frames, self.runs[0].sampler.x.shape[1],
                        device=self.device)
        cuda = [cuda_index(self.device)] if torch.device(self.device).type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            probe.train()(x, torch.ones(x.shape[:2], dtype=torch.bool, device=self.device))
        for h in hooks:
            h.remove()
        return seen

    def _noise(self) -> dict[str, torch.Tensor]:
        """Every member's dropout masks for one step, drawn in solo's order from its own state."""
        if not self.drops:
            return {}
        keep, per_layer = 1.0 - self.p, [[] for _ in self.drops]
        cuda = torch.device(self.device).type == "cuda"
        for i in self.ids:
            if cuda:
                idx = cuda_index(self.device)
                saved = torch.cuda.get_rng_state(idx)
                torch.cuda.set_rng_state(self.gens[i], idx)
            for k, (shape, stride) in enumerate(self.layouts):
                t = torch.empty_strided(shape, stride, device=self.device)
                if cuda:
                    mask = torch.native_dropout(t.fill_(1.0), self.p, True)[1]
                    per_layer[k].append(mask.to(t.dtype) * (1.0 / keep))
                else:
                    per_layer[k].append(t.bernoulli_(keep, generator=self.gens[i]).div_(keep))
            if cuda:
                self.gens[i] = torch.cuda.get_rng_state(idx)
                torch.cuda.set_rng_state(saved, idx)
        return {f"{n}.noise": torch.stack(ms) for n, ms in zip(self.drops, per_layer)}

    def rng_state(self, i: int) -> torch.Tensor:
        g = self.gens[i]
        return g.clone() if torch.is_tensor(g) else g.get_state()

    def set_rng_state(self, i: int, state: torch.Tensor) -> None:
        if torch.is_tensor(self.gens[i]):
            self.gens[i] = state
        else:
            self.gens[i].set_state(state)

    # ---------------------------------------------------------------- members in and out
    @torch.no_grad()
    def write_back(self, i: int, buffers: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Copy member i's slices (parameters, `buffers` or the live ones, optimizer state) into
        its own Run's model and optimizer."""
        run, j = self.runs[i], self.ids.index(i)
        named_p, named_b = dict(run.model.named_parameters()), dict(run.model.named_buffers())
        for n in self.pnames:
            named_p[n].copy_(self.params[n][j])
        for n in self.bnames:
            named_b[n].copy_((buffers or self.buffers)[n][j])
        run.opt.state.clear()
        for n, sp in zip(self.pnames, self.params.values()):
            st = self.opt.state.get(sp)
            if st:
                run.opt.state[named_p[n]] = {
                    k: (v[j].clone() if torch.is_tensor(v) and v.dim() > 0 else
                        v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
        for g, sg in zip(run.opt.param_groups, self.opt.param_groups):
            g["lr"] = sg["lr"]

    def drop(self, leaving: list[int]) -> None:
        """Remove members from the stack (their state was written back); keep the grads."""
        keep = [j for j, i in enumerate(self.ids) if i not in leaving]
        self.ids = [self.ids[j] for j in keep]
        if not self.ids:
            return
        idx = torch.tensor(keep, device=self.device)
        old = list(self.params.values())
        with torch.no_grad():
            self.params = {n: p[idx].clone().requires_grad_(True) for n, p in self.params.items()}
            self.buffers = {n: b[idx].clone() for n, b in self.buffers.items()}
        opt = build_optimizer(self.cfg, list(self.params.values()))
        for op, np_ in zip(old, self.params.values()):
            if op.grad is not None:
                np_.grad = op.grad[idx]
            st = self.opt.state.get(op)
            if st:
                opt.state[np_] = {k: (v[idx] if torch.is_tensor(v) and v.dim() > 0 else v)
                                  for k, v in st.items()}
        for g, sg in zip(opt.param_groups, self.opt.param_groups):
            g["lr"] = sg["lr"]
        self.opt = opt

    # ---------------------------------------------------------------- one shared step
    def forward_backward(self, batches: list[Batch]) -> tuple[torch.Tensor, ...]:
        """Losses, pre-clip grad norms and chorus% of every member [M] each (read in one sync)."""
        dev = self.device
        x, mask, y = (torch.stack([getattr(b, k) for b in batches]).to(dev)
                      for k in ("x", "mask", "y"))
        self.template.train()
        loss, pct = self._step_fn(self.params, {**self.buffers, **self._noise()}, x, mask, y)
        for p in self.params.values():
            p.grad = None
        loss.sum().backward()  # d(sum)/d(loss_m) = 1: each member's own gradient, as solo
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        per = torch.stack([torch.linalg.vector_norm(g.reshape(len(self.ids), -1), dim=1)
                           for g in grads])  # [P, M]
        return loss.detach(), torch.linalg.vector_norm(per, dim=0), pct.detach()

    def update(self, grad_norm: torch.Tensor) -> None:
        """Clip (each member by its own norm), step the stacked optimizer, clamp: train()'s
        update (model.train.apply_update)."""
        apply_update(self.cfg, list(self.params.values()), grad_norm, self.opt.step)

    @torch.no_grad()
    def evaluate(self) -> list[FrameCounts]:
        """Validation counts of every member (eval mode: running statistics, no dropout)."""
        self.template.eval()
        total = None
        for b in self.runs[0].val_batches:
            b = b.to(self.device)
            logits = self._eval_fn(self.params, self.buffers, b.x, b.mask)  # [M, B, T, 2]
            c = torch.stack([count_frames(lg.float(), b.y, b.mask) for lg in logits])
            total = c if total is None else total + c
        self.template.train()
        return [FrameCounts(*row) for row in total.tolist()]


def train_ensemble(cfgs: list[TrainConfig], data: SongData | None = None,
                   logs: list[LogFn] | None = None,
                   ensemble: Union[bool, str] = "auto") -> list[TrainResult]:
    """Train the seeds of one cell (configs equal but for `seed`) and return one TrainResult per
    member, in order; logs[i] gets member i's metrics exactly as train(cfgs[i], data, logs[i])
    would. `ensemble`: "auto" (vectorised on CUDA, separate runs on CPU), True or False."""
    if not cfgs:
        return []
    _same_cell(cfgs)
    logs = list(logs) if logs is not None else [no_log] * len(cfgs)
    if len(logs) != len(cfgs):
        raise ValueError(f"train_ensemble: {len(cfgs)} configs but {len(logs)} log functions")
    data = data if data is not None else make_data(cfgs[0])
    if ensemble_declines(cfgs, ensemble):
        return [train(c, data, lg) for c, lg in zip(cfgs, logs)]
    device = resolve_device(cfgs[0].device)
    cuda = torch.device(device).type == "cuda"
    runs, gens, setup = [], [], []
    for c, lg in zip(cfgs, logs):
        t0 = time.perf_counter()
        torch.manual_seed(c.seed)
        model = build_model(c, data.n_features).to(device)
        if cuda:
            gens.append(torch.cuda.get_rng_state(cuda_index(device)))
        else:
            gens.append(torch.Generator().set_state(torch.get_rng_state()))
        runs.append(Run(c, data, model, device, lg, t0))
        setup.append(time.perf_counter() - t0)
    ens = _Ensemble(runs, gens, device)
    loop_time = [0.0] * len(runs)  # each member's share of the shared loop's time
    results: list[Optional[TrainResult]] = [None] * len(runs)

    def eject(i: int, epoch: int, done: int, buffers=None) -> None:
        """Member i goes on alone through train()'s loop from `done` steps into `epoch`."""
        run = runs[i]
        ens.write_back(i, buffers)
        if cuda:
            torch.cuda.set_rng_state(ens.rng_state(i), cuda_index(device))
        else:
            torch.set_rng_state(ens.rng_state(i))
        results[i] = run.run_from(epoch, done, spent=(setup[i] + loop_time[i], loop_time[i]))

    def share(t0: float) -> None:
        dt = (time.perf_counter() - t0) / max(1, len(ens.ids))
        for i in ens.ids:
            loop_time[i] += dt

    cfg = cfgs[0]
    for epoch in range(1, cfg.epochs + 1):
        for done in range(cfg.steps_per_epoch):
            if not ens.ids:
                break
            t0 = time.perf_counter()
            pre = {i: (runs[i].sampler.rng.bit_generator.state, ens.rng_state(i)) for i in ens.ids}
            pre_buffers = {n: b.clone() for n, b in ens.buffers.items()}
            batches = [runs[i].sampler.next() for i in ens.ids]
            loss, gn, pct = ens.forward_backward(batches)
            rows = torch.stack([loss.float(), gn.float(), pct.float()]).tolist()
            leaving = [i for j, i in enumerate(ens.ids)
                       if runs[i].needs_solo(rows[0][j], rows[1][j])]
            for i in leaving:  # back to the state before this step, which train() redoes
                runs[i].sampler.rng.bit_generator.state = pre[i][0]
                ens.set_rng_state(i, pre[i][1])
            share(t0)
            for i in leaving:
                eject(i, epoch, done, pre_buffers)
            t0 = time.perf_counter()
            for j, i in enumerate(ens.ids):
                if i in leaving:
                    continue
                # the member's own step, as train_step does it for a finite step (no skip:
                # a spike to skip left above)
                run, (loss_v, gn_v, pct_v) = runs[i], (r[j] for r in rows)
                lr = run.begin_step()
                run.after_sync(loss_v, gn_v, pct_v)
                run.spike_skips(epoch, loss_v, gn_v)
                if run.snapshot_due():
                    ens.write_back(i)  # its own model holds its state only when written back
                    run.take_snapshot()
                run.updated(batches[j])
            if leaving:
                gn = gn[[j for j, i in enumerate(pre) if i not in leaving]]
                ens.drop(leaving)
            if ens.ids:
                for g in ens.opt.param_groups:
                    g["lr"] = lr  # every member's (all at the same step, none rolled back)
                ens.update(gn)
            share(t0)
        if not ens.ids:
            break
        t0 = time.perf_counter()
        for i in ens.ids:
            runs[i].end_epoch(epoch)
        counts = ens.evaluate()
        bad = [i for i, c in zip(ens.ids, counts) if not math.isfinite(c.loss())]
        share(t0)
        for i in bad:
            eject(i, epoch, cfg.steps_per_epoch)
        t0 = time.perf_counter()
        for i, c in zip(list(ens.ids), counts):
            if i not in bad:
                runs[i].validate(epoch, c)
        if bad:
            ens.drop(bad)
        share(t0)
    for i in list(ens.ids):  # the end: train()'s last parameter check and the status
        eject(i, cfg.epochs + 1, 0)
    return [r for r in results if r is not None]
