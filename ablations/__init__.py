"""The ablation runner, one folder per layer (the README's "Layout" says what each does):
design/ (the study file), engine/ (queue, workers, trials), tracking/ (MLflow; ui/ inside),
results/ (effects, verdicts, the report).

The modules used to sit flat in this folder; `from ablations import analysis` (as notebooks
written then do) still finds the module in its layer folder, imported on first use so that
`import ablations` stays free.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_MOVED = {
    "design": ("spec", "designs", "fractional", "fixes", "identity"),
    "engine": ("study", "queue", "trial", "worker", "launch", "progress", "storage",
               "torch_setup", "defaults"),
    "tracking": ("retry",),
    "results": ("analysis", "effects", "rates", "verdicts", "importance", "power", "stability",
                "stability_report", "report", "backgrounds", "edges", "rate_power"),
}
_WHERE = {old: f"ablations.{layer}.{old}" for layer, olds in _MOVED.items() for old in olds}
# (the flat `tracking` module is now tracking/tracker.py: `ablations.tracking` names the folder)
_WHERE.update({"views": "ablations.tracking.ui.views", "ui": "ablations.tracking.ui.serve"})


def __getattr__(name: str) -> ModuleType:
    if name not in _WHERE:
        raise AttributeError(f"module 'ablations' has no attribute {name!r}")
    return importlib.import_module(_WHERE[name])
