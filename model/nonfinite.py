"""Non-finite forensics: where and when training went non-finite, at no cost when it doesn't.

Every step, train() does only what costs (almost) nothing:
  * it reads the loss and the pre-clip total grad norm in the step's one device sync (it logs
    them anyway) and branches on `math.isfinite`;
  * `Monitor.step` appends (step, loss, grad_norm, lr) to a ring buffer of K entries (the lead-up
    of a future event) and compares the grad norm with k x the running median of the last W
    norms (spike warnings, as Lightning's `SpikeDetection` and Megatron's spiky-loss check);
  * `rng_state` copies the RNG state the step's dropout draws from (about 4 us on CPU, a host
    copy with no device sync), so that a replay sees the same dropout masks;
  * under the `rollback` policy, `Snapshot` copies model and optimizer state every M steps.

Only when the loss, the grad norm, a parameter or the validation outputs are non-finite does
this module do real work, once per event:
  * `replay` reruns the step's batch from the pre-step state under hooks on every module and
    parameter and returns the *first* non-finite tensor in execution order (`Forensics`):
    module, stage, shape, NaN/Inf counts, finite min/max/abs-max of the tensor and of the
    module's input, the batch rows that hold it and their songs and frame ranges. The pre-step
    state needs no copy: train() checks the loss and grad norm *before* `optimizer.step()`, so
    the live parameters are still the state the step started from. The replay restores the RNG
    state of the step, computes gradients with `torch.autograd.grad` (the `.grad` buffers are
    left alone), and puts back buffers (BatchNorm running statistics) and the RNG state after,
    so it does not change the training trajectory.
  * `locate_params` names the parameter that went non-finite after an update (see there for
    how the stage is decided); `locate_eval` finds the first module whose validation output
    is non-finite.

Stages, in the order a step runs them (`where` = "module:stage"):
  input           the batch itself is non-finite (module "model")
  forward         a module's output (or, for code between child modules, the input it passes on)
  loss            the logits are finite, the loss is not (module = the loss function's name)
  backward        a module's or parameter's gradient, while the gradient flowing into that
                  module was finite; the module whose backward produced it is named
  grad_norm       every gradient is finite but their total norm overflowed (float32 max 3.4e38)
  optimizer_step  a parameter became non-finite in an update (found on the next step)
  clamp           listed for completeness and never assigned: clamping cannot create a
                  non-finite value (clamp(NaN) = NaN, clamp(+-inf) = +-c), see `locate_params`
  not_reproduced  the replay was finite everywhere (e.g. a non-deterministic kernel, or a fault
                  injected outside the model)
"""

from __future__ import annotations

import collections
import copy
import statistics
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

import torch
from torch import nn

from model.config import cuda_index

MAX_ROLLBACKS = 10
"""After this many rollbacks (lr / 1024) a run that still goes non-finite is stopped."""

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LogFn = Callable[[dict[str, float], int], None]


# ---------------------------------------------------------------------------- records
@dataclass
class TensorStats:
    """Shape, non-finite counts and the range of the finite entries (NaN when there are none)."""

    shape: list[int]
    nan: int
    inf: int
    min: float
    max: float
    absmax: float


@dataclass
class Forensics:
    """The first non-finite tensor of an event, and where it came from."""

    module: str  # qualified module name; "model" = the whole network; or the loss function
    stage: str  # input, forward, loss, backward, grad_norm, optimizer_step, clamp, not_reproduced
    tensor: str  # which tensor: "output", "x", "loss", "grad_input[0]", "grad:weight", "param:weight"
    stats: Optional[TensorStats] = None
    input: Optional[TensorStats] = None  # the module's forward input; in backward the gradient flowing in
    rows: list[int] = field(default_factory=list)  # batch rows holding a non-finite value
    windows: list[str] = field(default_factory=list)  # "song_id[first:end]" of those rows (all rows if none)
    note: str = ""
    anomaly_trace: str = ""  # torch.autograd.detect_anomaly's message and forward traceback

    @property
    def where(self) -> str:
        return f"{self.module}:{self.stage}"


@dataclass
class NonFiniteEvent:
    """One non-finite step (or a grad-norm spike warning) and what the policy did about it."""

    step: int
    epoch: int
    kind: str  # "loss" | "grad_norm" | "params" | "val_outputs" | "grad_spike" (a warning)
    action: str  # "stopped" | "skipped" | "zeroed" | "rolled_back" | "recorded"
    loss: float
    grad_norm: float
    lr: float = float("nan")
    where: str = ""  # "module:stage" of the first non-finite tensor; "" when not located
    recovered: Optional[bool] = None  # the next K steps were finite (None until known)
    forensics: Optional[Forensics] = None
    lead_up: list[tuple[int, float, float, float]] = field(default_factory=list)
    """(step, loss, grad_norm, lr) of the K steps before this one."""


def tensor_stats(t: torch.Tensor) -> TensorStats:
    t = t.detach().float()
    finite = torch.isfinite(t)
    vals = t[finite]
    nan, inf, n = torch.isnan(t).sum(), torch.isinf(t).sum(), vals.numel()
    if n:
        lo, hi, am = torch.stack([vals.min(), vals.max(), vals.abs().max()]).tolist()
    else:
        lo = hi = am = float("nan")
    return TensorStats(list(t.shape), int(nan), int(inf), lo, hi, am)


def _finite(t: Any) -> bool:
    return not (torch.is_tensor(t) and t.is_floating_point()) or bool(torch.isfinite(t).all())


def _first_tensor(xs: Any) -> Optional[torch.Tensor]:
    xs = xs if isinstance(xs, (tuple, list)) else (xs,)
    return next((x for x in xs if torch.is_tensor(x) and x.is_floating_point()), None)


def _first_bad(xs: Any, label: str) -> Optional[tuple[str, torch.Tensor]]:
    """The first non-finite floating tensor of a tensor or a tuple of tensors, with its label:
    `label` for a lone tensor, `label[i]` for the i-th of a tuple (`{i}` in `label` places it)."""
    if torch.is_tensor(xs):
        return None if _finite(xs) else (label.replace("{i}", ""), xs)
    for i, x in enumerate(xs or ()):
        if torch.is_tensor(x) and not _finite(x):
            return (label.replace("{i}", f"[{i}]") if "{i}" in label else f"{label}[{i}]"), x
    return None


def _windows(batch: Any, rows: list[int]) -> list[str]:
    """'song_id[first:end]' frame ranges of the given rows (every row when `rows` is empty)."""
    if batch is None:
        return []
    valid = batch.mask.sum(dim=1).tolist()  # [B] valid frames per window
    rows = rows or list(range(len(batch.song_ids)))
    return [f"{batch.song_ids[r]}[{batch.starts[r]}:{batch.starts[r] + int(valid[r])}]" for r in rows]


def _bad_rows(t: torch.Tensor, batch: Any) -> list[int]:
    """Rows of a [B, ...] tensor that hold a non-finite value ([] if it is not batch-shaped)."""
    if batch is None or t.dim() == 0 or t.shape[0] != len(batch.song_ids) or t.dim() == 1:
        return []
    return torch.nonzero(~torch.isfinite(t.detach()).reshape(t.shape[0], -1).all(dim=1)).flatten().tolist()


def _found(module: str, stage: str, label: str, t: torch.Tensor, inp: Optional[torch.Tensor],
           batch: Any, note: str = "", batch_shaped: bool = True) -> Forensics:
    """A Forensics record; `batch_shaped`: t is [B, ...] (an activation), not a parameter."""
    rows = _bad_rows(t, batch) if batch_shaped else []
    return Forensics(module, stage, label, tensor_stats(t),
                     tensor_stats(inp) if inp is not None else None, rows, _windows(batch, rows),
                     note)


# ---------------------------------------------------------------------------- replay
class _Probe:
    """Hooks on every module and parameter that keep the first non-finite tensor.

    Forward: a module's output is checked after its forward (inner modules finish first, so the
    innermost producer is found first); a module's inputs are checked before it runs, which
    catches code *between* child modules (a functional op in the parent's forward): the parent
    on the call stack is then named. Backward: a module's output gradient is checked when it is
    ready (full backward pre-hook), its parameters' gradients as they are computed, its input
    gradients when its backward ends; a module is named only if the gradient flowing into it
    was finite, so the first module whose own backward produced a non-finite value is named,
    not the ones it passed it on to.
    """

    def __init__(self, model: nn.Module, batch: Any, loss_name: str, backward: bool = True):
        self.batch, self.loss_name = batch, loss_name
        self.found: Optional[Forensics] = None
        self.stack: list[str] = []
        self.inputs: dict[str, Optional[torch.Tensor]] = {}
        self.g_out: dict[str, Optional[torch.Tensor]] = {}  # grad flowing into a module
        self.g_out_ok: dict[str, bool] = {}
        self.handles = []
        for name, mod in model.named_modules():
            n = name or "model"
            self.handles += [mod.register_forward_pre_hook(partial(self._pre, n)),
                             mod.register_forward_hook(partial(self._fwd, n))]
            if backward:
                self.handles += [mod.register_full_backward_pre_hook(partial(self._bwd_pre, n)),
                                 mod.register_full_backward_hook(partial(self._bwd, n))]
        if backward:
            for pname, p in model.named_parameters():
                if p.requires_grad:
                    mod_name, _, leaf = pname.rpartition(".")
                    self.handles.append(p.register_hook(partial(self._grad, mod_name or "model", leaf)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    # forward
    def _pre(self, name: str, mod: nn.Module, args: tuple) -> None:
        self.inputs[name] = _first_tensor(args)
        if self.found is None and self.stack:  # the top module's input is checked as "input"
            bad = _first_bad(args, "input{i} of " + name)
            if bad:
                parent = self.stack[-1]
                self.found = _found(parent, "forward", bad[0], bad[1], self.inputs.get(parent),
                                    self.batch, "non-finite before this child module ran: made by "
                                    "code in the parent's forward")
        self.stack.append(name)

    def _fwd(self, name: str, mod: nn.Module, args: tuple, out: Any) -> None:
        self.stack.pop()
        if self.found is None:
            bad = _first_bad(out, "output")
            if bad:
                self.found = _found(name, "forward", bad[0], bad[1], self.inputs.get(name), self.batch)

    # backward
    def _bwd_pre(self, name: str, mod: nn.Module, grad_output: tuple) -> None:
        self.g_out[name] = _first_tensor(grad_output)
        ok = all(_finite(g) for g in grad_output if g is not None)
        self.g_out_ok[name] = ok
        if not ok and self.found is None and name == "model":  # d loss / d logits
            bad = _first_bad(grad_output, "grad of logits")
            self.found = _found(self.loss_name, "backward", "grad of logits", bad[1], None, self.batch)

    def _bwd(self, name: str, mod: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
        if self.found is None and self.g_out_ok.get(name, True):
            bad = _first_bad(grad_input, "grad_input")
            if bad:
                self.found = _found(name, "backward", bad[0], bad[1], self.g_out.get(name), self.batch)

    def _grad(self, mod_name: str, leaf: str, g: torch.Tensor) -> None:
        if self.found is None and self.g_out_ok.get(mod_name, True) and not _finite(g):
            self.found = _found(mod_name, "backward", f"grad:{leaf}", g, self.g_out.get(mod_name),
                                self.batch, batch_shaped=False)


class _Restore:
    """Run a replay from the step's RNG state and put RNG and buffers back afterwards."""

    def __init__(self, model: nn.Module, rng: Optional[torch.Tensor], device: str):
        self.model, self.rng, self.device = model, rng, torch.device(device)

    def __enter__(self) -> None:
        self.buffers = [b.detach().clone() for b in self.model.buffers()]
        idx = cuda_index(self.device) if self.device.type == "cuda" else None
        self.fork = torch.random.fork_rng(devices=[] if idx is None else [idx])
        self.fork.__enter__()
        if self.rng is not None:
            if idx is not None:
                torch.cuda.set_rng_state(self.rng, idx)
            else:
                torch.set_rng_state(self.rng)
        self.warn = warnings.catch_warnings()
        self.warn.__enter__()
        # Full backward hooks warn when a module's inputs need no grad (the stem): expected here.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")

    def __exit__(self, *exc: Any) -> None:
        self.warn.__exit__(*exc)
        self.fork.__exit__(*exc)
        with torch.no_grad():
            for b, saved in zip(self.model.buffers(), self.buffers):
                b.copy_(saved)


def rng_state(device: str) -> torch.Tensor:
    """The RNG state the next dropout draw uses (host copy, no device sync)."""
    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.get_rng_state(cuda_index(d))
    return torch.get_rng_state()


def uses_rng(model: nn.Module) -> bool:
    """Whether a training forward draws random numbers (dropout with p > 0)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


def replay(model: nn.Module, batch: Any, loss_fn: LossFn, rng: Optional[torch.Tensor],
           device: str, anomaly_mode: bool = False) -> Forensics:
    """Rerun one training step's forward and backward from the current (pre-step) state under
    hooks; return the first non-finite tensor (stage `not_reproduced` when there is none).

    `batch` is the step's Batch, `rng` the RNG state taken before its forward (None: the model
    draws no random numbers), `loss_fn(logits, y, mask)` the loss train() used. Gradients are
    returned by `torch.autograd.grad`, so `.grad` keeps the step's values; RNG and buffers are
    restored afterwards. With `anomaly_mode` the step is run once more under
    `torch.autograd.detect_anomaly(check_nan=True)` and its message and forward traceback kept.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    loss_name = getattr(loss_fn, "__name__", "loss")
    found = None
    if not _finite(batch.x):
        found = _found("model", "input", "x", batch.x, None, batch)
    else:
        probe = _Probe(model, batch, loss_name)
        try:
            with _Restore(model, rng, device):
                logits = model(batch.x, batch.mask)  # [B, T, 2]
                if probe.found is None:
                    loss = loss_fn(logits, batch.y, batch.mask)
                    if not _finite(loss):
                        probe.found = _found(loss_name, "loss", "loss", loss, logits, batch,
                                             f"{int(batch.mask.sum())} valid frames in the batch")
                if probe.found is None:
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    if probe.found is None:
                        probe.found = _norm_overflow(model, params, grads, batch)
        except RuntimeError as e:  # forensics must never end a run that the policy would continue
            if probe.found is None:
                probe.found = Forensics("model", "not_reproduced", "",
                                        note=f"the replay raised {type(e).__name__}: {e}")
        finally:
            probe.remove()
        found = probe.found
    if found is None:
        found = Forensics("model", "not_reproduced", "", note="the replay of this batch was finite "
                          "everywhere: a non-deterministic kernel, or a value changed outside the model")
    if anomaly_mode:
        found.anomaly_trace = _anomaly_trace(model, batch, loss_fn, rng, device, params)
    return found


def _norm_overflow(model: nn.Module, params: list[torch.Tensor], grads: tuple,
                   batch: Any) -> Optional[Forensics]:
    """Every gradient finite, their total norm not: name the parameter with the largest entry."""
    present = [g for g in grads if g is not None]
    if not present or _finite(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g.float()) for g in present]))):
        return None
    names = {p: n for n, p in model.named_parameters()}
    absmax = [(g.abs().max().item(), names[p], g) for p, g in zip(params, grads) if g is not None]
    _, pname, g = max(absmax, key=lambda a: a[0])
    mod_name, _, leaf = pname.rpartition(".")
    return _found(mod_name or "model", "grad_norm", f"grad:{leaf}", g, None, batch,
                  "every gradient is finite; their total norm overflowed float32 (> 3.4e38)",
                  batch_shaped=False)


def _anomaly_trace(model: nn.Module, batch: Any, loss_fn: LossFn, rng: Optional[torch.Tensor],
                   device: str, params: list[torch.Tensor]) -> str:
    with _Restore(model, rng, device), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.autograd.detect_anomaly(check_nan=True):
                loss = loss_fn(model(batch.x, batch.mask), batch.y, batch.mask)
                torch.autograd.grad(loss, params, allow_unused=True)
            error = "detect_anomaly raised nothing (it checks backward outputs only)"
        except RuntimeError as e:
            error = str(e)
    traces = [str(w.message) for w in caught if "Traceback of forward call" in str(w.message)]
    return "\n".join([error] + traces)


@torch.no_grad()
def locate_eval(model: nn.Module, batches: list, device: str) -> Optional[Forensics]:
    """The first module whose validation output is non-finite (eval mode, forward hooks only)."""
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            b = b.to(device)
            if not _finite(b.x):
                return _found("model", "input", "x", b.x, None, b)
            probe = _Probe(model, b, "", backward=False)
            try:
                model(b.x, b.mask)
            finally:
                probe.remove()
            if probe.found is not None:
                return probe.found
    finally:
        model.train(was_training)
    return None


@torch.no_grad()
def locate_params(model: nn.Module, opt: torch.optim.Optimizer, batch: Any,
                  update_step: int, param_clamp: Optional[float]) -> Optional[Forensics]:
    """Name the first non-finite parameter (in registration order, which is execution order).

    A parameter is checked only when a later step's loss or grad norm (or the validation
    output) is non-finite, so it is found one step after it broke: the loss and grad norm of
    `update_step` were finite, hence its gradients were, and the parameter went non-finite in
    that step's update. Stage: `optimizer_step`. The clamp after it cannot be the origin:
    clamp(NaN) = NaN and clamp(+-inf) = +-c, so clamping can create no non-finite value, only
    hide an infinite one (then nothing is non-finite and there is no event). The note says
    whether the optimizer's state for the parameter (Adam's moments, SGD's momentum) is
    non-finite too (an overflow inside the optimizer) or only the parameter (p - lr * u
    overflowed, or a value was written from outside), and lists the other non-finite
    parameters. `batch` is the batch of `update_step`.
    """
    bad = [(n, p) for n, p in model.named_parameters() if not _finite(p)]
    if not bad:
        return None
    pname, p = bad[0]
    mod_name, _, leaf = pname.rpartition(".")
    state_bad = sorted(k for k, v in opt.state.get(p, {}).items() if not _finite(v))
    note = (f"non-finite after the update of step {update_step}; optimizer state "
            + (f"non-finite too: {', '.join(state_bad)}" if state_bad else "finite"))
    if param_clamp is not None:
        note += "; param_clamp is on (it keeps NaN, so the update made it)"
    if len(bad) > 1:
        others = [n for n, _ in bad[1:]]
        note += f"; {len(others)} more: {', '.join(others[:8])}" + (" ..." if len(others) > 8 else "")
    return _found(mod_name or "model", "optimizer_step", f"param:{leaf}", p, None, batch, note,
                  batch_shaped=False)


# ---------------------------------------------------------------------------- rollback
class Snapshot:
    """The last good state for the `rollback` policy: model state (parameters and buffers) and
    optimizer state, copied (not referenced) when `take` is called, every M steps."""

    def __init__(self) -> None:
        self.step: Optional[int] = None
        self.model: dict[str, torch.Tensor] = {}
        self.opt: dict[str, Any] = {}

    @torch.no_grad()
    def take(self, step: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.opt = copy.deepcopy(opt.state_dict())
        self.step = step

    @torch.no_grad()
    def restore(self, model: nn.Module, opt: torch.optim.Optimizer, lr_factor: float = 0.5) -> None:
        """Put the saved state back (into the live tensors) and scale every group's current lr."""
        lrs = [g["lr"] for g in opt.param_groups]
        model.load_state_dict(self.model)
        # load_state_dict keeps same-device tensors by reference: give it a copy, keep ours.
        opt.load_state_dict(copy.deepcopy(self.opt))
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr * lr_factor


# ---------------------------------------------------------------------------- monitor
class Monitor:
    """Per-step bookkeeping that costs only floats: the lead-up ring buffer, the grad-norm spike
    check, whether each event recovered, and the `nonfinite/*` curves (sent through `log` only at
    the steps where a count changes).

    `lead_up` K: steps kept before an event and watched after it (recovered = none of the next K
    steps, nor the validation within them, was non-finite, and the run did not stop).
    `spike_factor` k, `spike_window` W: a finite grad norm above k x the median of the previous W
    finite grad norms is a spike (checked once W norms are known); None turns the check off.
    """

    CURVES = ("nonfinite/events", "nonfinite/skipped_steps", "nonfinite/spikes")

    def __init__(self, lead_up: int, spike_factor: Optional[float], spike_window: int,
                 log: LogFn):
        self.lead: collections.deque = collections.deque(maxlen=lead_up + 1)
        self.lead_up = lead_up
        self.spike_factor = spike_factor
        self.norms: collections.deque = collections.deque(maxlen=spike_window)
        self.log = log
        self.pending: list[NonFiniteEvent] = []  # awaiting K finite steps
        self.counts = dict.fromkeys(self.CURVES, 0)
        self.emitted = dict(self.counts)

    def step(self, step: int, loss: float, grad_norm: float, lr: float) -> None:
        """Every step, after its values are read."""
        while self.pending and self.pending[0].step + self.lead_up < step:
            self.pending.pop(0).recovered = True
        self.lead.append((step, loss, grad_norm, lr))

    def would_spike(self, grad_norm: float) -> bool:
        """Whether a finite grad norm is a spike, without adding it to the window."""
        return (self.spike_factor is not None and len(self.norms) == self.norms.maxlen
                and grad_norm > self.spike_factor * statistics.median(self.norms))

    def is_spike(self, grad_norm: float) -> bool:
        """Whether a finite grad norm is a spike; it joins the window either way (the window is
        read only when spikes are checked)."""
        spike = self.would_spike(grad_norm)
        self.norms.append(grad_norm)
        return spike

    def record(self, ev: NonFiniteEvent) -> NonFiniteEvent:
        """Attach the lead-up; a non-finite event means earlier ones in their window did not recover."""
        ev.lead_up = [r for r in self.lead if r[0] < ev.step]
        if ev.kind != "grad_spike":
            for old in self.pending:
                old.recovered = False
            self.pending.clear()
            self.counts["nonfinite/events"] += 1
        else:
            self.counts["nonfinite/spikes"] += 1
        if ev.action == "skipped":
            self.counts["nonfinite/skipped_steps"] += 1
        if ev.action == "stopped":
            ev.recovered = False
        else:
            self.pending.append(ev)
        return ev

    def emit(self, step: int) -> None:
        """Log the curves that changed since the last call (nothing in a run without events)."""
        changed = {k: float(v) for k, v in self.counts.items() if v != self.emitted[k]}
        if changed:
            self.emitted.update(self.counts)
            self.log(changed, step)

    def close(self, stopped: bool) -> None:
        """End of training: events still watched recovered unless the run stopped."""
        for ev in self.pending:
            ev.recovered = not stopped
        self.pending.clear()


EVENT_COLUMNS = ("step", "epoch", "kind", "action", "loss", "grad_norm", "lr", "where",
                 "recovered", "tensor", "shape", "nan", "inf", "min", "max", "absmax",
                 "input_min", "input_max", "input_absmax", "rows", "windows", "note", "lead_up")


def event_row(ev: NonFiniteEvent) -> dict[str, Any]:
    """One flat row of the events table (tracking writes it as CSV)."""
    f = ev.forensics
    s = f.stats if f and f.stats else None
    i = f.input if f and f.input else None
    return {
        "step": ev.step, "epoch": ev.epoch, "kind": ev.kind, "action": ev.action,
        "loss": ev.loss, "grad_norm": ev.grad_norm, "lr": ev.lr, "where": ev.where,
        "recovered": "" if ev.recovered is None else ev.recovered,
        "tensor": f.tensor if f else "",
        "shape": "x".join(map(str, s.shape)) if s else "",
        "nan": s.nan if s else "", "inf": s.inf if s else "",
        "min": s.min if s else "", "max": s.max if s else "", "absmax": s.absmax if s else "",
        "input_min": i.min if i else "", "input_max": i.max if i else "",
        "input_absmax": i.absmax if i else "",
        "rows": " ".join(map(str, f.rows)) if f else "",
        "windows": " ".join(f.windows) if f else "",
        "note": f.note if f else "",
        "lead_up": " ".join(f"{st}:{lo:.6g}/{gn:.6g}/{lr:.3g}" for st, lo, gn, lr in ev.lead_up),
    }

