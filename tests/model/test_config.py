"""TrainConfig: defaults, validation, coercion from text, the learning-rate warning."""

import math
import warnings

import pytest

from model.config import ConfigError, HighLearningRateWarning, TrainConfig, coerce_field


def test_defaults_are_the_fixed_recipe():
    """The defaults are the seed's fixed recipe, not its broken settings."""
    cfg = TrainConfig()
    assert cfg.norm == "layer"
    assert cfg.residual_scale == 1.0
    assert cfg.classifier_bias == (0.0, 0.0)
    assert cfg.param_clamp is None
    assert cfg.grad_clip == 0.5
    assert cfg.lr == 5e-4
    assert cfg.input_norm is True


@pytest.mark.parametrize("kwargs, field, shown", [
    ({"grad_clip": -1.0}, "grad_clip", "-1.0"),
    ({"kernel_size": 4}, "kernel_size", "4"),
    ({"norm": "group"}, "norm", "'group'"),
    ({"lr": "1e-4"}, "lr", "'1e-4'"),
    ({"lr": float("nan")}, "lr", "nan"),
    ({"device": "gpu"}, "device", "'gpu'"),
    ({"device": "cuda:x"}, "device", "'cuda:x'"),
    ({"param_clamp": 0.0}, "param_clamp", "0.0"),
    ({"n_songs": 1}, "n_songs", "1"),
    ({"classifier_bias": (0.0, float("inf"))}, "classifier_bias", "inf"),
])
def test_bad_values_raise_config_error_naming_field_and_value(kwargs, field, shown):
    """Each bad value raises ConfigError whose message starts with the field and shows the value."""
    with pytest.raises(ConfigError) as exc:
        TrainConfig(**kwargs)
    msg = str(exc.value)
    assert msg.startswith(f"{field}:"), msg
    assert shown in msg, msg


def test_config_error_is_a_value_error():
    """ConfigError is a ValueError, so generic handlers still catch it."""
    with pytest.raises(ValueError):
        TrainConfig(kernel_size=2)


def test_from_overrides_coerces_numbers_from_text():
    """'1e-4' becomes the float 1e-4 and '32' the int 32, never a string."""
    cfg = TrainConfig.from_overrides({"lr": "1e-4", "hidden_dim": "32"})
    assert cfg.lr == 1e-4 and type(cfg.lr) is float
    assert cfg.hidden_dim == 32 and type(cfg.hidden_dim) is int


@pytest.mark.parametrize("text", ["null", "none", "None", "off"])
def test_from_overrides_null_text_gives_none_for_optional(text):
    """'null'/'none' switch an Optional field off (None)."""
    cfg = TrainConfig.from_overrides({"grad_clip": text})
    assert cfg.grad_clip is None


@pytest.mark.parametrize("text, expected", [("true", True), ("false", False), ("False", False),
                                            ("yes", True), ("0", False)])
def test_from_overrides_bool_text(text, expected):
    """Boolean fields accept true/false text."""
    assert TrainConfig.from_overrides({"input_norm": text}).input_norm is expected


@pytest.mark.parametrize("text", ["0.02,0", "[0.02, 0]", "(0.02,0.0)"])
def test_from_overrides_classifier_bias_text(text):
    """'0.02,0' becomes the tuple (0.02, 0.0) [verse, chorus]."""
    cfg = TrainConfig.from_overrides({"classifier_bias": text})
    assert cfg.classifier_bias == (0.02, 0.0)
    assert all(type(b) is float for b in cfg.classifier_bias)


def test_from_overrides_keeps_base():
    """Overrides apply on top of `base`; other base values are kept."""
    base = TrainConfig(hidden_dim=16)
    cfg = TrainConfig.from_overrides({"lr": "2e-4"}, base=base)
    assert (cfg.hidden_dim, cfg.lr) == (16, 2e-4)


def test_from_overrides_unknown_key_lists_allowed_keys():
    """An unknown key is refused with a message naming it and listing the allowed keys."""
    with pytest.raises(ConfigError) as exc:
        TrainConfig.from_overrides({"nosuchkey": "1"})
    msg = str(exc.value)
    assert msg.startswith("nosuchkey:")
    for name in ("lr", "grad_clip", "norm", "residual_scale", "device"):
        assert name in msg


@pytest.mark.parametrize("key, value", [("lr", "abc"), ("hidden_dim", "3.5"), ("norm", "group"),
                                        ("input_norm", "maybe"), ("classifier_bias", "1,2,3")])
def test_from_overrides_bad_text_names_key_value_and_where(key, value):
    """Uncoercible text raises ConfigError with the `where` prefix, key and value."""
    with pytest.raises(ConfigError) as exc:
        TrainConfig.from_overrides({key: value}, where="study.yaml: base.")
    msg = str(exc.value)
    assert msg.startswith(f"study.yaml: base.{key}:"), msg
    assert repr(value) in msg, msg


def test_from_overrides_validation_error_gets_where_prefix():
    """A value that coerces but fails validation is still prefixed with `where`."""
    with pytest.raises(ConfigError, match=r"^--set kernel_size: must be odd"):
        TrainConfig.from_overrides({"kernel_size": "4"}, where="--set ")


def test_from_overrides_nan_text_refused_for_lr():
    """'nan' parses as a float but is refused by validation."""
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig.from_overrides({"lr": "nan"})


def test_coerce_field_refuses_bool_for_int():
    """True is not silently taken as the integer 1."""
    with pytest.raises(ConfigError, match="n_blocks"):
        coerce_field("n_blocks", True)


def test_direct_construction_normalises_types():
    """Direct construction turns an int lr into float and a list bias into a tuple."""
    cfg = TrainConfig(lr=1e-4, residual_scale=1, classifier_bias=[0.5, 0])
    assert type(cfg.residual_scale) is float
    assert cfg.classifier_bias == (0.5, 0.0) and isinstance(cfg.classifier_bias, tuple)


def test_to_dict_roundtrips_through_from_overrides():
    """to_dict() values fed back to from_overrides give an equal config."""
    cfg = TrainConfig(lr=3e-4, grad_clip=None, classifier_bias=(0.02, 0.0), norm="batch")
    assert TrainConfig.from_overrides(cfg.to_dict()) == cfg


@pytest.mark.parametrize("lr", [6e-4, 2e-3])
def test_high_lr_warns(lr):
    """lr above 5e-4 emits HighLearningRateWarning."""
    with pytest.warns(HighLearningRateWarning, match="lr="):
        TrainConfig(lr=lr)


def test_high_lr_warns_from_overrides():
    """The warning is also emitted for text overrides."""
    with pytest.warns(HighLearningRateWarning):
        TrainConfig.from_overrides({"lr": "1e-3"})


@pytest.mark.parametrize("lr", [1e-4, 5e-4])
def test_recommended_lr_does_not_warn(lr):
    """lr <= 5e-4 emits no HighLearningRateWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", HighLearningRateWarning)
        cfg = TrainConfig(lr=lr)
    assert math.isclose(cfg.lr, lr)
