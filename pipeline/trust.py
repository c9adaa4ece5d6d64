"""Which models kiln may load in formats that run code (pickles, MLflow code_paths), and where fetch records what
each version's files were.

A model is trusted when its recipe says `source.allow_pickle: true`, or when the kiln-wide trust file
`<artifacts>/trust.yaml` names its registry (the tracking URI, as resolved) or its registered model name:

    allow_pickle:
      registries: [http://mlflow.internal:5000]    # every model of this registry
      models: [digits-cnn, bert-encoder]           # these registered models, in any registry

Trust is where the steps run, not what they build: it travels in the steps' context and keys nothing.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from pipeline.errors import RecipeError
from pipeline.schema import Strict

TRUST_FILE = "trust.yaml"
FETCH_RECORD = Path("trust") / "fetched.json"  # under the artifacts folder: each version's files at first fetch


class AllowPickle(Strict):
    registries: list[str] = Field(default_factory=list, description="Tracking URIs whose models may be unpickled")
    models: list[str] = Field(default_factory=list, description="Registered model names that may be unpickled")


class Trust(Strict):
    allow_pickle: AllowPickle = Field(default_factory=AllowPickle)


def load_trust(artifacts: Path) -> Trust:
    """The kiln-wide trust file; no file trusts nothing. A malformed file is exit 2 naming it."""
    path = artifacts / TRUST_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Trust()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the trust file ({exc})") from None
    try:
        return Trust.model_validate(yaml.safe_load(text) or {})
    except (yaml.YAMLError, ValidationError) as exc:
        raise RecipeError(f"{path}: not a valid trust file ({' '.join(str(exc).split())[:200]})") from None


def allows_pickle(artifacts: Path, recipe_allows: bool, tracking_uri: str, model: str) -> bool:
    if recipe_allows:
        return True
    trust = load_trust(artifacts).allow_pickle
    return model in trust.models or tracking_uri.rstrip("/") in {r.rstrip("/") for r in trust.registries}
