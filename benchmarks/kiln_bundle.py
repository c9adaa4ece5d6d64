"""A kiln bundle run exactly as the bundle says (`session_config.json`: providers and their options, session
options, IO binding, fixed shapes), through the same runner kiln validated and tuned it with."""

from __future__ import annotations

import json
from pathlib import Path


def bundle_runner(bundle: Path):
    from stages.onnx_runtime import Runner

    config = json.loads((bundle / "session_config.json").read_text())
    return Runner(bundle / config["model"], config)
