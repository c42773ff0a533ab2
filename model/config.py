"""Configs: every knob of one training run, with the fixed recipe as defaults.

  LoopConfig   the shared training loop's knobs (model/train.py); every recipe's config inherits
  SongsConfig  + songs, features and input pre-normalisation (the chorus recipes)
  TrainConfig  + the chorus CNN's network: the `chorus_cnn` recipe's config

Defaults live here; YAML study files and `--set key=value` hold only overrides. Values coming
from text (the command line, YAML 1.1 which reads `1e-4` as a string) go through
`TrainConfig.from_overrides`, which coerces them to the field's type or refuses them with a
message that names the key, the value and what is allowed. We never train with a string.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Optional

# The seed recommends 1e-4..5e-4 and added a warning above that range.
LR_WARN_ABOVE = 5e-4


class ConfigError(ValueError):
    """A bad configuration value; the message names the field, the value and what is allowed."""


class DataError(ConfigError):
    """A data file or directory that cannot be used; the message names it (and the line)."""


class HighLearningRateWarning(UserWarning):
    """The seed's "learning rate warning": lr above the recommended 1e-4..5e-4."""


@dataclass(frozen=True)
class LoopConfig:
    """The shared training loop's knobs (model/train.py): every recipe's config inherits them,
    so every recipe gets the same precision, optimizer, schedule, clipping, non-finite policy and
    forensics, and the same stress factors. Defaults are the chorus CNN's fixed recipe; a recipe
    overrides a default by declaring the field again."""

    # ---- optimisation -----------------------------------------------------------------
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    """Optimizer. `sgd` uses momentum 0.9."""
    lr: float = 5e-4
    """Learning rate. Above 5e-4 a HighLearningRateWarning is emitted (the seed's warning)."""
    weight_decay: float = 1e-4
    """Weight decay (decoupled for adamw)."""
    weight_decay_mode: Literal["coupled", "independent"] = "coupled"
    """`coupled`: each step decays the weights by lr x weight_decay (PyTorch's AdamW). `independent`:
    by weight_decay x (lr_t / lr), so the decay follows the schedule but not the lr itself (adamw
    only; Wortsman et al. 2023 sec. 3.2.2, "independent weight decay", Loshchilov & Hutter's
    original form). In an lr sweep the coupled decay grows with the lr; the independent one does
    not."""
    adam_beta2: float = 0.999
    """Adam(W)'s second-moment decay. 0.999 is PyTorch's default; large-model recipes use 0.95
    (Wortsman et al. 2023 train with 0.95): the second moment then forgets in ~20 steps, so the
    update stays bounded when gradients grow fast."""
    adam_eps: float = 1e-8
    """Epsilon of adam/adamw (the update is m / (sqrt(v) + eps)). Stress knob of the update size:
    where gradients' RMS falls below eps the update shrinks towards plain SGD scaled by lr/eps,
    and Wortsman et al. 2023 (sec. 3.4) show eps changes LR sensitivity. Optimizer state stays
    fp32 here, so it is not a NaN source by itself; with fp16 optimizer state (not used here) an
    eps below fp16's smallest number (6e-8) rounds to 0 and a zero second moment divides by 0."""
    warmup_steps: int = 0
    """Linear warmup from lr/warmup_steps to lr over this many steps; 0 = none. The standard
    stabiliser users reach for first: the first updates of Adam, with fresh moment estimates, are
    the largest relative to the weights, the usual place for an early blow-up at high lr."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """After warmup: `constant`, or `cosine` / `linear` decay towards 0 at the last step."""
    epochs: int = 8
    """Epochs; validation runs after each."""
    steps_per_epoch: int = 40
    """Optimizer steps per epoch (each step draws random windows from the training songs)."""
    batch_size: int = 16
    """Windows per step."""
    frames: int = 256
    """Frames per training window (example length T)."""
    grad_clip: Optional[float] = 0.5
    """Max total grad norm for clipping; None = off. The pre-clip norm is logged either way."""
    param_clamp: Optional[float] = None
    """Clamp every parameter to [-c, c] after each step; None = off. The seed's broken code used 0.5."""
    nonfinite: Literal["stop", "skip", "zero", "rollback"] = "zero"
    """On a non-finite loss or grad norm: `stop` the run, `skip` the update, `zero` the
    non-finite gradient entries and step (the seed's "NaN zeroing", part of its fixed recipe; the
    `nan_zeroing` fix toggles stop -> zero), or `rollback`: restore the last good state (see
    `rollback_every`), halve the learning rate and go on (not one of the seed's fixes; a value
    a study can compare with the others). Non-finite parameters end the run under stop, skip
    and zero; rollback restores them (at most model.nonfinite.MAX_ROLLBACKS times)."""
    rollback_every: int = 50
    """`rollback` only: copy model and optimizer state before the update of every M-th step whose
    loss and grad norm are finite (and at the start); a rollback restores the latest copy."""
    forensics: bool = True
    """On a non-finite event, replay the step's batch under hooks to find the first non-finite
    tensor (module, stage, statistics, songs). Costs nothing until an event happens."""
    anomaly_mode: bool = False
    """With `forensics`: rerun the replay under torch.autograd.detect_anomaly(check_nan=True) and
    keep its traceback in the event. Only at events; never on every step."""
    spike_factor: Optional[float] = 10.0
    """A finite pre-clip grad norm above this times the running median of the last
    `spike_window` norms is recorded as a `grad_spike` warning event; null = no spike check."""
    spike_window: int = 50
    """Grad norms in the running median of the spike check; the check starts once it is full."""
    spike_action: Literal["record", "skip"] = "record"
    """On a grad-norm spike: `record` the warning only, or also `skip` that step's update."""
    lead_up: int = 10
    """K: an event keeps loss, grad norm and lr of the K steps before it, and counts as recovered
    when none of the next K steps is non-finite. 0 = no lead-up, recovered = not stopped."""

    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Stress knob: the arithmetic of forward and backward (torch.autocast; parameters and optimizer
    state stay fp32). `fp16` overflows above 65504 and underflows below 6e-8: a real and common
    cause of non-finite training; its gradients are scaled by torch.amp.GradScaler, whose skipped
    steps (an overflow of the *scaled* gradients while the scale is > 1) are counted apart, as
    `scaler_skips`, not as non-finite events. `bf16` has fp32's range and 8 bits of mantissa: it
    rarely overflows, but rounds; it needs no scaler. Validation runs in the same precision."""


    # ---- run --------------------------------------------------------------------------
    seed: int = 0
    """Seed of initialisation, window sampling and dropout."""
    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`."""

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("epochs", "steps_per_epoch", "batch_size", "frames", "rollback_every",
                     "spike_window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "lead_up"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("lr", "adam_eps"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name}: must be a finite number > 0, got {v!r}")
        if not 0.0 <= self.adam_beta2 < 1.0:
            raise ConfigError(f"adam_beta2: must be in [0.0, 1.0), got {self.adam_beta2!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay: must be a finite number >= 0, got {self.weight_decay!r}")
        if self.weight_decay_mode == "independent" and self.optimizer != "adamw":
            raise ConfigError(f"weight_decay_mode: independent decays the weights apart from the "
                              f"gradient step, which only adamw does; got optimizer="
                              f"{self.optimizer!r}")
        for name in ("grad_clip", "param_clamp"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name}: must be a number > 0 or null (off), got {v!r}")
        if self.spike_factor is not None and not (math.isfinite(self.spike_factor)
                                                  and self.spike_factor > 1):
            raise ConfigError(f"spike_factor: must be a number > 1 or null (off), "
                              f"got {self.spike_factor!r}")
        if self.anomaly_mode and not self.forensics:
            raise ConfigError("anomaly_mode: true needs forensics: true (anomaly mode reruns the "
                              "forensic replay), got forensics=False")
        if not (self.device in ("auto", "cpu", "cuda") or
                (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ConfigError(f"device: must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    # ---- construction from text / YAML --------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any], base: "LoopConfig | None" = None,
                       where: str = "") -> Any:
        """Defaults (or `base`) with `overrides` applied; values are coerced to each field's type.

        `where` prefixes error messages (e.g. "studies/x.yaml: base.") so they name the source.
        """
        names = cls.field_names()
        coerced = {}
        for key, value in overrides.items():
            if key not in names:
                raise ConfigError(f"{where}{key}: unknown setting; allowed: {', '.join(names)}")
            coerced[key] = coerce_field(key, value, where, cls)
        try:
            return dataclasses.replace(base, **coerced) if base else cls(**coerced)
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class SongsConfig(LoopConfig):
    """A recipe trained on songs (model/data.py): where they come from, their features, the
    input stress knobs and input pre-normalisation. Shared by the chorus CNN and the chorus
    Transformer."""

    # ---- data -------------------------------------------------------------------------
    data_source: Literal["synthetic", "harmonix"] = "synthetic"
    """Where songs come from. `synthetic`: generated pop-form songs (no files needed), or rendered
    over real section timelines (`structures`). `harmonix`: your own songs in `data_dir`."""
    n_songs: int = 64
    """Number of songs generated (synthetic) before the train/val split; with `structures`, how
    many of its timelines are used (picked by data_seed). `harmonix` uses every track."""
    data_seed: int = 0
    """Seed of the song generator; fixed across training seeds so runs share one data set."""
    n_features: int = 64
    """Feature bands per frame (log-mel-like); for audio, the number of mel bands."""
    frame_rate: float = 4.0
    """Frames per second of the features (4 Hz = 0.25 s hop)."""
    val_fraction: float = 0.25
    """Share of songs held out for validation (split by song, never by frame)."""
    data_dir: Optional[str] = None
    """`harmonix` only: the data root, holding segments/<track>.txt (Harmonix Set format) and per
    track features/<track>.npy (log-mel [n_mels, frames]) or audio/<track>.{wav,flac,ogg,mp3}.
    Relative paths are relative to the working directory. See README "Your own songs"."""
    structures: Optional[str] = None
    """`synthetic` only: a directory of Harmonix-format segment files (<track>.txt); songs are
    rendered over n_songs of these real section timelines instead of generated forms."""
    chorus_labels: tuple[str, ...] = ("chorus", "altchorus", "instchorus", "chorusinst",
                                      "chorusinstrumental", "quietchorus", "intchorus",
                                      "introchorus", "choruspart", "chorushalf", "refrain")
    """Section labels counted as chorus; every other label is non-chorus. Matched ignoring case,
    punctuation and a trailing number, so `chorus` covers chorus1, Chorus_2. The default is every
    chorus variant in the Harmonix Set; prechorus and postchorus are non-chorus (model/harmonix.py
    says why). Add `postchorus` to count it as chorus."""
    skip_bad_tracks: bool = False
    """`harmonix` and `structures`: a file that cannot be read (corrupt or truncated audio, a
    malformed segment file) is skipped with a warning instead of stopping with an error."""
    cache_dir: Optional[str] = None
    """Audio features are cached here, keyed by the audio file's content hash and the feature
    parameters. None = $XDG_CACHE_HOME/chorus-ablations (default ~/.cache/chorus-ablations)."""
    sample_rate: int = 22050
    """Audio: decoded audio is mixed to mono and resampled to this rate (Hz)."""
    n_fft: int = 2048
    """Audio: FFT size of the mel spectrogram (samples)."""
    hop_length: int = 512
    """Audio: hop of the mel spectrogram (samples). Its sample_rate / hop_length frames per second
    are averaged (in power) down to frame_rate before the log."""
    features: Literal["db", "power"] = "db"
    """Stress knob. `db`: log-mel features (the default, as every recipe expects). `power`: the mel
    power spectrogram without the log, as a pipeline that forgets the log would feed it (real
    songs: 10^(dB/10); synthetic songs, whose units are bels, 10^x). Its values span about eight
    orders of magnitude, so without input_norm the first layer's activations and gradients do
    too: a real cause of fp16 overflow (max 65504) and of steps far too large in fp32."""
    feature_scale: float = 1.0
    """Stress knob: every input feature is multiplied by this (after `features`). A real mistake
    in practice: features in the wrong units (amplitude from int16 PCM is x32768, a dB/bel slip
    x10). Large scales overflow fp16 in the first convolution and, without input_norm, push the
    norm layers and the gradients to extremes (LayerNorm goes non-finite at 1e20)."""

    input_norm: bool = True
    """Pre-normalise the input: standardise each band over the valid frames of the window."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_data_fields(self)
        for name in ("n_songs", "n_features", "sample_rate", "n_fft", "hop_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        if self.n_songs < 2:
            raise ConfigError(f"n_songs: need at least 2 (one to train, one to validate), got {self.n_songs}")
        if not 0.0 < self.val_fraction < 1.0:  # (NaN fails every comparison)
            raise ConfigError(f"val_fraction: must be in (0.0, 1.0), got {self.val_fraction!r}")
        for name in ("frame_rate", "feature_scale"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name}: must be a finite number > 0, got {v!r}")


@dataclass(frozen=True)
class TrainConfig(SongsConfig):
    """One training run of the chorus CNN (the `chorus_cnn` recipe). Defaults are the seed's
    *fixed* recipe."""

    # ---- network ----------------------------------------------------------------------
    hidden_dim: int = 48
    """Channels of the conv stem and the residual blocks."""
    n_blocks: int = 3
    """Residual blocks (two convolutions each)."""
    kernel_size: int = 5
    """Temporal kernel of every convolution (odd, 'same' padding)."""
    dropout: float = 0.1
    """Dropout inside each residual block."""
    norm: Literal["layer", "batch"] = "layer"
    """`layer`: LayerNorm on [B,T,C] (fixed). `batch`: BatchNorm1d with [B,T,C]->[B,C,T] transposes (broken)."""
    residual_scale: float = 1.0
    """Multiplier of the identity path, x = f(x) + s * residual. 1.0 is standard; the seed had 0.05/0.1."""
    classifier_bias: tuple[float, float] = (0.0, 0.0)
    """Initial classifier bias as [verse, chorus]. The seed's broken init was verse-biased (0.02, 0.0)."""


    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("hidden_dim", "n_blocks", "kernel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size: must be odd (for 'same' padding), got {self.kernel_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0.0, 1.0), got {self.dropout!r}")
        if not math.isfinite(self.residual_scale):
            raise ConfigError(f"residual_scale: must be finite, got {self.residual_scale!r}")
        if len(self.classifier_bias) != 2 or not all(math.isfinite(b) for b in self.classifier_bias):
            raise ConfigError(f"classifier_bias: must be two finite numbers [verse, chorus], "
                              f"got {list(self.classifier_bias)!r}")
        if self.lr > LR_WARN_ABOVE:
            warnings.warn(f"lr={self.lr:g} is above the recommended 1e-4..5e-4 for this CNN",
                          HighLearningRateWarning, stacklevel=4)


_HINTS: dict[type, dict[str, Any]] = {}


def _field_type(name: str, cls: type = None) -> Any:
    cls = cls if cls is not None else TrainConfig
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls][name]


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _describe(inner[0]) + " or null"
    if origin is tuple and typing.get_args(tp)[-1] is Ellipsis:
        return "a list of labels, e.g. [chorus, postchorus] (or one comma-separated string)"
    if origin is tuple:
        return "a list [verse, chorus] of two numbers"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def coerce_field(name: str, value: Any, where: str = "", cls: type = None) -> Any:
    """Turn `value` (possibly text) into the type of field `name` of config class `cls` (default
    TrainConfig), or raise ConfigError."""
    tp = _field_type(name, cls)
    try:
        return _coerce(tp, value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}{name}: must be {_describe(tp)}, got {value!r}") from None


def _coerce(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        raise ValueError(value)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "off", "")):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(inner[0], value)
    if origin is tuple and typing.get_args(tp)[-1] is Ellipsis:  # tuple[str, ...]
        if isinstance(value, str):  # --set chorus_labels=chorus,postchorus
            value = [v.strip() for v in value.strip("[]() ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(value)
        return tuple(_coerce(typing.get_args(tp)[0], v) for v in value)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("[]() ").split(",")]
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError(value)
        return tuple(_coerce(float, v) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
            return False
        raise ValueError(value)
    if tp in (int, float) and isinstance(value, bool):  # True is an int to Python, not to us
        raise ValueError(value)
    if tp is int:
        if isinstance(value, int):
            return value
        if isinstance(value, (float, str)) and float(value).is_integer():  # 1e3, "1e3", "8.0"
            return int(float(value))
        raise ValueError(value)
    if tp is float:
        # (a string too: YAML 1.1 reads 1e-4 as a string; take the number meant)
        if isinstance(value, (int, float, str)):
            return float(value)
        raise ValueError(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(value)
    raise TypeError(tp)


def _check_types(cfg: LoopConfig) -> None:
    """Direct construction (not via from_overrides) must not smuggle in strings either:
    text is coerced only by from_overrides; here values must already have the field's type."""
    for f in dataclasses.fields(cfg):
        v, tp = getattr(cfg, f.name), _field_type(f.name, type(cfg))
        text_ok = (tp is str or typing.get_origin(tp) is Literal
                   or str in typing.get_args(tp) and typing.get_origin(tp) is not tuple)  # Optional[str]
        try:
            if isinstance(v, str) and not text_ok:
                raise ValueError(v)
            coerced = _coerce(tp, v)
        except (TypeError, ValueError):
            raise ConfigError(f"{f.name}: must be {_describe(tp)}, got {v!r}") from None
        object.__setattr__(cfg, f.name, coerced)  # e.g. int -> float, list -> tuple


def _check_data_fields(cfg: TrainConfig) -> None:
    """Which data fields go with which source. Paths are not opened here (a machine that plans a
    study need not hold the data): model/data.py names a missing path when it reads it."""
    if cfg.data_source == "harmonix" and cfg.data_dir is None:
        raise ConfigError("data_dir: data_source harmonix reads songs from data_dir (a directory "
                          "with segments/ and features/ or audio/), got None")
    if cfg.data_source != "harmonix" and cfg.data_dir is not None:
        raise ConfigError(f"data_dir: only read by data_source harmonix, got data_dir="
                          f"{cfg.data_dir!r} with data_source={cfg.data_source!r}")
    if cfg.data_source != "synthetic" and cfg.structures is not None:
        raise ConfigError(f"structures: only for data_source synthetic (real timelines, synthetic "
                          f"features), got structures={cfg.structures!r} with "
                          f"data_source={cfg.data_source!r}")
    if not cfg.chorus_labels or not all(any(c.isalpha() for c in lab) for lab in cfg.chorus_labels):
        raise ConfigError(f"chorus_labels: must be a non-empty list of section labels, got "
                          f"{list(cfg.chorus_labels)!r}")
    if cfg.data_source == "harmonix" and cfg.hop_length >= 1 and \
            cfg.sample_rate / cfg.hop_length < cfg.frame_rate:
        raise ConfigError(f"hop_length: the mel spectrogram's sample_rate / hop_length = "
                          f"{cfg.sample_rate / cfg.hop_length:g} frames/s must be >= frame_rate "
                          f"{cfg.frame_rate:g}, got hop_length={cfg.hop_length}")


# Where a run happens, not what it is: the same run on another device, or reading its features
# from another cache folder, is the same run (ablations/design/designs.py keeps them out of a
# run's key; a study cannot make them a factor).
PLACE_FIELDS = ("device", "cache_dir")

def resolve_device(spec: str) -> str:
    """`auto` -> `cuda` when a GPU is present, else `cpu`. Imported lazily to keep config torch-free."""
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {spec!r} asked for but CUDA is not available here; use auto or cpu")
    return spec


def cuda_index(device: "str | torch.device") -> int:  # noqa: F821 (torch: imported lazily)
    """The CUDA device index of `device` ("cuda" means the current one)."""
    import torch

    d = torch.device(device)
    return d.index if d.index is not None else torch.cuda.current_device()
