"""Recipes left every chorus CNN run key as it was: the keys of every shipped study's runs, as
the code before recipes existed computed them (commit 807df5b, over these same study files),
must be what this code computes. A resumed study then finds every finished run (the end-to-end
form: tests/engine/test_stress_study.py, a study finished before fields were added)."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest

from ablations.design import designs
from ablations.design.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
# study file -> [runs, sha256 of the sorted run keys joined by commas, first 16 hex digits]
BEFORE_RECIPES = json.loads((Path(__file__).parent / "run_keys_before_recipes.json").read_text())


@pytest.mark.parametrize("study", sorted(BEFORE_RECIPES))
def test_shipped_study_keys_are_unchanged(study):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = load_spec(ROOT / "studies" / study)
        keys = sorted(r.run_key for r in designs.runs(spec))
    digest = hashlib.sha256(",".join(keys).encode()).hexdigest()[:16]
    assert [len(keys), digest] == BEFORE_RECIPES[study]


def test_another_recipe_never_shares_a_key_with_the_cnn():
    """The same field values under another recipe are another run."""
    from model.chorus_transformer import TransformerConfig
    from model.config import TrainConfig

    assert designs.config_key(TransformerConfig()) != designs.config_key(TrainConfig())
    assert designs.config_key(TransformerConfig(seed=1)) != designs.config_key(TransformerConfig())
    assert designs.config_key(TransformerConfig(device="cpu")) == designs.config_key(TransformerConfig())
