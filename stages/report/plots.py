"""The report's plots, as PNG bytes (matplotlib, headless): latency distributions, error histograms, per-layer
error along the network. Each function returns None when there is nothing to draw."""

from __future__ import annotations

import io

import numpy as np


def _figure(width: float = 7.0, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.subplots(figsize=(width, height), dpi=100)


def _png(plt, fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def latency(metrics: dict, framework: str) -> bytes | None:
    """Per-call latency distribution of the original framework and ONNX Runtime at each batch size."""
    series, labels = [], []
    for batch, timing in metrics.get("latency", {}).items():
        for runtime in ("original", "onnxruntime"):
            samples = timing[runtime].get("samples_ms")
            if samples:
                series.append(samples)
                labels.append(f"{framework if runtime == 'original' else 'ORT'}\nbatch {batch}")
    if not series:
        return None
    plt, (fig, ax) = _figure()
    ax.boxplot(series, showfliers=True, whis=(5, 95))
    ax.set_xticks(range(1, len(labels) + 1), labels)
    ax.set_yscale("log")
    ax.set_ylabel("ms per call (log)")
    ax.set_title("Latency distribution (whiskers: p5-p95)")
    return _png(plt, fig)


def error_histogram(name: str, reference: np.ndarray, candidate: np.ndarray) -> bytes | None:
    diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64)).ravel()
    diff = diff[np.isfinite(diff)]
    if diff.size == 0:
        return None
    plt, (fig, ax) = _figure(height=2.8)
    logged = np.log10(np.maximum(diff, 1e-12))
    ax.hist(logged, bins=50, color="#4c72b0")
    ax.set_xlabel("log10 |ONNX - original|  (floor 1e-12)")
    ax.set_ylabel("elements")
    ax.set_title(f"Absolute error histogram: {name}")
    return _png(plt, fig)


def layer_errors(localization: dict | None) -> bytes | None:
    if not localization or not localization.get("layers"):
        return None
    layers = localization["layers"]
    values = [max(layer["relative_error"], 1e-12) for layer in layers]
    plt, (fig, ax) = _figure(width=max(7.0, len(layers) * 0.12), height=3.2)
    ax.plot(range(len(values)), values, marker="o", markersize=3)
    ax.axhline(localization["tolerance"], color="#c44e52", linestyle="--", label="tolerance")
    first = localization.get("first_divergent")
    if first:
        index = next(i for i, layer in enumerate(layers) if layer["layer"] == first["layer"])
        ax.annotate(first["layer"], (index, values[index]), color="#c44e52")
    ax.set_yscale("log")
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("max |err| / max |ref|")
    ax.set_title("Per-layer error along the network")
    ax.legend()
    if len(layers) <= 30:
        ax.set_xticks(range(len(layers)), [layer["layer"] for layer in layers], rotation=60, fontsize=7, ha="right")
    return _png(plt, fig)
