"""Fixes as named on/off toggles, for any recipe (model/recipe.py).

Each fix sets one or more config fields; `before` is the broken recipe, `after` the fixed one
(= the config's defaults). A study factor named after a fix takes the values off (before) and
on (after). FIXES are the default recipe's (the chorus CNN's, model/chorus_cnn.py).
"""

from __future__ import annotations

from typing import Any, Optional

from model.chorus_cnn import RECIPE as CHORUS_CNN
from model.recipe import Fix, Recipe, table as _table

__all__ = ["FIXES", "Fix", "check_consistent", "fix_overrides", "table"]

FIXES: dict[str, Fix] = CHORUS_CNN.fix_map


def fix_overrides(on: Optional[dict[str, bool]] = None, baseline: str = "fixed",
                  recipe: Recipe = CHORUS_CNN) -> dict[str, Any]:
    """Config overrides for a combination of `recipe`'s fixes. Fixes not named in `on` take
    their `baseline` state: "fixed" (after) or "broken" (before)."""
    return recipe.overrides(on, baseline)


def check_consistent(recipe: Recipe = CHORUS_CNN) -> None:
    """The fixed recipe must be the config's defaults (asserted by the tests)."""
    recipe.check_consistent()


def table(recipe: Recipe = CHORUS_CNN) -> str:
    """The fixes as a plain-text table for `runner.py fixes`."""
    return _table(recipe)
