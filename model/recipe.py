"""A recipe: what the runner needs from a model family to ask which of its fixes mattered.

    RECIPE = Recipe(
        name="my_mlp",
        config=MyConfig,        # a frozen dataclass subclassing model.config.LoopConfig;
                                # its defaults are the *fixed* recipe
        fixes=(Fix("wide_init", before={"init_std": 1.0}, after={"init_std": 0.02},
                   claim="..."), ...),
        make_data=my_data,      # cfg -> model.data.SongData (SongData.from_arrays for plain arrays)
        build_model=my_model,   # (cfg, n_features) -> nn.Module:
                                #   forward(x [B,T,F], mask [B,T] bool) -> logits [B,T,2]
    )

Everything else comes from the runner: the shared loop (model/train.py: precision, optimizer,
warmup and schedule, clipping, the non-finite policy and forensic replay, spike checks), the
outcomes, the designs and stress factors, MLflow, the analysis and the report. The loop trains a
binary tagger of frames (or of examples: windows of one frame), class 1 being the one whose F1
is reported ("chorus" in the metric names). Optional hooks:
  * loss(cfg) -> loss_fn(logits, y, mask): the training loss (default masked cross-entropy;
    e.g. cross-entropy + z-loss). Validation always reports the plain cross-entropy.
  * curves: {name: model attribute}: a 0-dim tensor the model sets on each forward, logged per
    step as train/<name> and summarised as the outcomes peak_<name> and final_<name> (e.g. the
    Transformer's largest attention logit).

A study file picks a recipe with `recipe:`: a shipped name (`runner.py recipes`), an importable
`package.module:ATTR`, or a file `path/to/file.py:ATTR` (relative to the study file). Model code:
this module imports neither MLflow nor Optuna.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from model.config import ConfigError, LoopConfig

DEFAULT = "chorus_cnn"
# Shipped recipes, imported on first use.
SHIPPED = {"chorus_cnn": "model.chorus_cnn:RECIPE",
           "chorus_transformer": "model.chorus_transformer:RECIPE"}


class RecipeError(ConfigError):
    """A recipe that cannot be found or used; one line naming the reference and what is wrong."""


@dataclass(frozen=True)
class Fix:
    """One fix as an on/off toggle: the config fields it sets when off (`before`, the broken
    recipe) and when on (`after`, the fixed recipe = the config's defaults)."""

    name: str
    before: dict[str, Any]
    after: dict[str, Any]
    claim: str  # the claim being tested, one line
    critical: bool = False  # its authors list it among the most critical fixes
    kind: str = "fix"  # "fix" or "safeguard"

    def values(self, on: bool) -> dict[str, Any]:
        return dict(self.after if on else self.before)


_BY_CONFIG: dict[type, Any] = {}  # config class -> its Recipe
LossFn = Callable[..., Any]  # (logits [B,T,2], y [B,T], mask [B,T]) -> scalar tensor


def _default_loss(cfg: Any) -> LossFn:
    from model.metrics import masked_cross_entropy
    return masked_cross_entropy


@dataclass(frozen=True)
class Recipe:
    name: str
    config: type  # a frozen dataclass subclassing LoopConfig; defaults = the fixed recipe
    fixes: tuple[Fix, ...]
    make_data: Callable[[Any], Any]  # cfg -> SongData
    build_model: Callable[[Any, int], Any]  # (cfg, n_features) -> nn.Module
    loss: Callable[[Any], LossFn] = _default_loss
    curves: dict[str, str] = field(default_factory=dict)  # curve name -> model attribute
    description: str = ""
    ref: str = ""  # how it was loaded (set by `load`)

    def __post_init__(self) -> None:
        where = f"recipe {self.name!r}"
        if not (is_dataclass(self.config) and isinstance(self.config, type)
                and issubclass(self.config, LoopConfig)):
            raise RecipeError(f"{where}: config must be a dataclass subclassing "
                              f"model.config.LoopConfig, got {self.config!r}")
        names = set(self.config.field_names())
        seen: set[str] = set()
        for fix in self.fixes:  # (a fix may share its field's name: input_norm)
            if fix.name in seen:
                raise RecipeError(f"{where}: two fixes named {fix.name!r}")
            seen.add(fix.name)
            for side in (fix.before, fix.after):
                for k in side:
                    if k not in names:
                        raise RecipeError(f"{where}: fix {fix.name!r} sets {k!r}, not a field of "
                                          f"{self.config.__name__}")
        for name in self.curves:
            if not name.isidentifier():
                raise RecipeError(f"{where}: curve name {name!r} must be an identifier")
        _BY_CONFIG.setdefault(self.config, self)  # train(cfg) finds its recipe by the config's class

    @property
    def fix_map(self) -> dict[str, Fix]:
        return {f.name: f for f in self.fixes}

    def overrides(self, on: Optional[dict[str, bool]] = None, baseline: str = "fixed") -> dict[str, Any]:
        """Config overrides for a combination of fixes; fixes not named in `on` take their
        `baseline` state: "fixed" (after) or "broken" (before)."""
        on = on or {}
        out: dict[str, Any] = {}
        for fix in self.fixes:
            out.update(fix.values(on.get(fix.name, baseline == "fixed")))
        return out

    def check_consistent(self) -> None:
        """Each fix's `after` must be the config's default (the fixed recipe is the default)."""
        defaults = self.config().to_dict()
        for fix in self.fixes:
            for k, v in fix.after.items():
                want = list(v) if isinstance(v, tuple) else v
                if defaults[k] != want:
                    raise RecipeError(f"recipe {self.name!r}: fix {fix.name}: after {k}={v!r} but "
                                      f"the config's default is {defaults[k]!r}")


# ------------------------------------------------------------------------------- loading
_LOADED: dict[str, Recipe] = {}


def load(ref: Optional[str] = None, base_dir: Optional[Path] = None) -> Recipe:
    """The recipe `ref` names: a shipped name, `package.module:ATTR`, or `file.py:ATTR` (a path
    relative to `base_dir`, else the working directory). Loaded once per process."""
    ref = (ref or DEFAULT).strip()
    key = ref if ":" not in ref or not ref.split(":")[0].endswith(".py") else \
        str(((base_dir or Path.cwd()) / ref.rsplit(":", 1)[0]).resolve()) + ":" + ref.rsplit(":", 1)[1]
    if key in _LOADED:
        return _LOADED[key]
    target = SHIPPED.get(ref, ref)
    if ":" not in target:
        raise RecipeError(f"recipe: {ref!r} is not a shipped recipe ({', '.join(SHIPPED)}) nor a "
                          f"reference package.module:ATTR or path/to/file.py:ATTR")
    where, attr = target.rsplit(":", 1)
    if where.endswith(".py"):
        module = _from_file(Path(key.rsplit(":", 1)[0]), ref)
    else:
        module = _from_module(where, ref, base_dir)
    obj = getattr(module, attr, None)
    if obj is None:
        raise RecipeError(f"recipe: {ref!r}: {where} has no attribute {attr!r}")
    if callable(obj) and not isinstance(obj, Recipe):
        obj = obj()  # a factory (or a Recipe subclass) returning the recipe
    if not isinstance(obj, Recipe):
        raise RecipeError(f"recipe: {ref!r} is a {type(obj).__name__}, not a model.recipe.Recipe")
    obj.check_consistent()
    object.__setattr__(obj, "ref", ref)
    _LOADED[key] = _BY_CONFIG[obj.config] = obj
    return obj


def _from_module(name: str, ref: str, base_dir: Optional[Path]) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is None or not name.startswith(e.name):
            raise RecipeError(f"recipe: {ref!r}: importing {name} failed: {e}") from None
    # Not on sys.path: try the study file's folder and the working directory, as a user expects.
    for extra in [p for p in (base_dir, Path.cwd()) if p is not None]:
        if str(extra) not in sys.path:
            sys.path.insert(0, str(extra))
            try:
                return importlib.import_module(name)
            except ModuleNotFoundError:
                sys.path.remove(str(extra))
    raise RecipeError(f"recipe: {ref!r}: no module named {name!r} (looked on sys.path, in "
                      f"{base_dir or '.'} and in the working directory)")


def _from_file(path: Path, ref: str) -> Any:
    if not path.is_file():
        raise RecipeError(f"recipe: {ref!r}: no such file {path}")
    name = f"chorus_recipe_{path.stem}_{abs(hash(str(path))) % 10**8}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing.get_type_hints look the module up
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a user's file: one line, not their traceback
        sys.modules.pop(name, None)
        raise RecipeError(f"recipe: {ref!r}: {path} failed to load: {type(e).__name__}: {e}") from None
    return module


def recipe_for(cfg_or_type: Any) -> Recipe:
    """The recipe whose config `cfg_or_type` is (or whose config class it is)."""
    cls = cfg_or_type if isinstance(cfg_or_type, type) else type(cfg_or_type)
    for name in SHIPPED:  # the shipped ones are known without being named first
        if cls in _BY_CONFIG:
            break
        load(name)
    if cls not in _BY_CONFIG:
        raise RecipeError(f"no recipe is loaded for config {cls.__module__}.{cls.__name__}")
    return _BY_CONFIG[cls]


def shipped() -> list[Recipe]:
    return [load(name) for name in SHIPPED]


def table(recipe: Recipe) -> str:
    """A recipe's fixes as a plain-text table (`runner.py fixes`)."""
    def show(d: dict[str, Any]) -> str:
        return ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in d.items())

    rows = [("fix", "kind", "before (broken)", "after (fixed)", "claim")]
    for f in recipe.fixes:
        rows.append((f.name + (" *" if f.critical else ""), f.kind, show(f.before), show(f.after),
                     f.claim))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 12)
    if any(f.critical for f in recipe.fixes):
        lines.append("\n* = among its authors' \"most critical fixes\"")
    return "\n".join(lines)


def config_fields(recipe: Recipe) -> list[str]:
    return [f.name for f in fields(recipe.config)]
