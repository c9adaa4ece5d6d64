"""Serving targets. Each module defines

    Config                                      pydantic model of the target's recipe section (serving.<name>)
    tools(config, inputs) -> list[str]          distributions whose versions key the step
    skip_reason(ctx) -> str | None              why this target does not apply to this model, or None
    build(ctx, config, out) -> dict             write the target's files under `out` (the bundle's
                                                serving/<target>/ folder); return a summary with a "readme"
                                                markdown section telling the serving team how to run it
    USES_BUNDLE_PATH = False                    optional: the files hold no absolute bundle path (ctx.bundle_dest),
                                                so a bundle moved to a new folder does not rebuild them

A new serving target is a module plus an entry here; the recipe's `serving` section is assembled from them.
"""

from __future__ import annotations

import importlib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Annotated

import numpy as np
from pydantic import AfterValidator, Field

from pipeline.errors import ModelError
from pipeline.schema import has_control
from stages.tensors import ModelSpec

Port = Annotated[int, Field(ge=1, le=65535)]
Token = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=100)]  # a name safe in any file
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?")


def _host(value: str) -> str:
    """A host name (RFC 1123) or an IP address: nothing else may reach a server's listen address."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if len(value) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in value.split(".")):
        raise ValueError(f"{value!r} is neither a host name nor an IP address")
    return value


Host = Annotated[str, AfterValidator(_host)]


def url_host(host: str) -> str:
    """The host as it goes in a URL: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host else host


def one_line(value: str, what: str) -> str:
    """A value written on one line of a config file; refused if it would start another (it cannot, for values the
    schema checked: this guards the values built from paths and URIs)."""
    if has_control(str(value)):
        raise ModelError(f"{what}: {str(value)!r} holds a control character (a newline?); it cannot go in a config file")
    return str(value)

TARGETS: dict[str, str] = {
    "triton": "stages.targets.triton",
    "torchserve": "stages.targets.torchserve",
    "tf_serving": "stages.targets.tf_serving",
}


@dataclass(frozen=True)
class TargetContext:
    name: str  # the model's name on the server (the recipe name)
    source: dict  # source.json from fetch: flavor, uri, version, signature
    model_dir: Path  # the MLflow model as downloaded
    onnx: Path  # the optimized, validated ONNX model
    spec: ModelSpec
    samples: dict[str, np.ndarray]  # a few validation inputs
    expected: dict[str, np.ndarray]  # ONNX Runtime's outputs for them (validated against the original)
    reference: dict[str, np.ndarray]  # the original framework's outputs for them
    metrics: dict  # validate's metrics.json: threads, latency per batch size
    latency_gates: dict
    source_options: dict  # how the original model is called, e.g. {"signature": "serving_default"}
    bundle_dest: Path  # where the bundle will be delivered (absolute)
    allow_pickle: bool = False  # the source is trusted to load in a format that runs code (stages/untrusted.py)

    @property
    def version(self) -> str:
        return str(self.source["version"])


def target(name: str) -> ModuleType:
    try:
        return importlib.import_module(TARGETS[name])
    except KeyError:
        raise KeyError(f"no serving target {name!r}; known: {', '.join(TARGETS)}") from None


def expected_output_lines(ctx: TargetContext, names: list[str], shown: int = 8) -> list[str]:
    """README lines giving the first values of each output for the first sample request."""
    import numpy as np

    lines = []
    for name in names:
        values = np.asarray(ctx.expected[name])[:1].ravel()[:shown]
        lines.append(f"- `{name}` starts with {', '.join(f'{v:.6g}' for v in values)}")
    return lines
