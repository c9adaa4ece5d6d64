"""The building blocks every declared configuration shares: the recipe's sections and each stage's `Config`.

Stages define their own config models from these (stages never import the recipe); `pipeline/recipe.py`
assembles the recipe from the stages' models through `pipeline/registry.py`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

Slug = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.\-]*$", max_length=100)]
# numpy's generators take seeds >= 0; a negative one would crash the step that draws, long after planning.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="Random seed, 0 .. 2**32-1")]


def has_control(text: str) -> bool:
    """A newline or other control character: text that would break out of its line in a config file or a log."""
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


class Strict(BaseModel):
    """Unknown keys are errors: a misspelled recipe field must not be silently ignored."""

    # NaN or infinity is no threshold, size or time: a gate compared with NaN would never fail.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StageConfig(Strict):
    """What one step of a stage is keyed on. Validated when the step is planned; the cache key hashes
    `model_dump(mode="json")`, so every field must be plain data."""
