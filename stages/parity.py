"""Parity measures between a reference output (the original framework) and a candidate (ONNX Runtime)."""

from __future__ import annotations

import numpy as np


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    result: dict = {
        "shape": list(reference.shape),
        "candidate_shape": list(candidate.shape),
        "dtype": str(reference.dtype),
        "candidate_dtype": str(candidate.dtype),
    }
    if reference.shape != candidate.shape:
        result["shape_mismatch"] = True
        return result
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    nan = int(np.isnan(cand).sum())
    inf = int(np.isinf(cand).sum())
    finite = np.isfinite(ref) & np.isfinite(cand)
    abs_err = np.abs(cand - ref)[finite]
    rel_err = abs_err / (np.abs(ref[finite]) + 1e-12)
    flat_ref, flat_cand = np.where(finite, ref, 0).ravel(), np.where(finite, cand, 0).ravel()
    norm = np.linalg.norm(flat_ref) * np.linalg.norm(flat_cand)
    result.update(
        {
            "max_abs_error": float(abs_err.max()) if abs_err.size else 0.0,
            "mean_abs_error": float(abs_err.mean()) if abs_err.size else 0.0,
            "p99_abs_error": float(np.percentile(abs_err, 99)) if abs_err.size else 0.0,
            "max_rel_error": float(rel_err.max()) if rel_err.size else 0.0,
            "cosine": float(flat_ref @ flat_cand / norm) if norm > 0 else float(np.array_equal(flat_ref, flat_cand)),
            "nan": nan,
            "inf": inf,
            "reference_nan": int(np.isnan(ref).sum()),
        }
    )
    if reference.dtype.kind in "iub":
        # Integer outputs (class labels, token ids) are right or wrong: the fraction that is exactly equal.
        result["exact_agreement"] = float(np.mean(reference == candidate)) if reference.size else 1.0
        result.update(dict.fromkeys(CENTERED))
    else:
        result.update(centered(ref, np.where(finite, cand, 0)))
        result["reference_inf"] = int(np.isinf(ref).sum())
    if reference.ndim >= 2:
        result["mean_row_cosine"] = mean_row_cosine(np.where(finite, ref, 0), np.where(finite, cand, 0))
    if reference.ndim >= 2 and reference.shape[-1] > 1:
        agree = np.argmax(reference, axis=-1) == np.argmax(candidate, axis=-1)
        result["top1_agreement"] = float(agree.mean())
        k = min(TOP_K, reference.shape[-1] - 1)
        result["topk"] = k
        result["topk_agreement"] = topk_agreement(reference, candidate, k)
    return result


TOP_K = 5

CENTERED = ("variation", "centered_cosine", "error_to_signal")

# An output whose variation is below this does not vary between inputs. float32 keeps 24 bits (epsilon 1.2e-7);
# a deep network's sums, ordered differently per batch, move a constant output by a few epsilons of its norm, so
# 1e-5 stays clear of that noise while no output worth validating comes near it (the random-weight ResNet-50
# before its BatchNorm statistics were set: 3e-2).
MIN_VARIATION = 1e-5


def centered(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Parity measured against the part of the output that varies between inputs (samples on axis 0), the part
    a model that answered its mean output for every input would get wrong:
    variation: ||ref - mean(ref)|| / ||ref||, 0 for a constant output;
    centered_cosine: cosine of (cand - mean(ref)) and (ref - mean(ref));
    error_to_signal: ||cand - ref|| / ||ref - mean(ref)||, 1.0 for the mean-for-every-input model.
    None where it cannot be measured: one sample (nothing to vary), a non-finite reference (no meaningful mean),
    no variation at all (nothing to divide by)."""
    found = dict.fromkeys(CENTERED)
    if reference.shape[0] < 2 or not np.isfinite(reference).all():
        return found
    ref = reference.reshape(reference.shape[0], -1).astype(np.float64)
    cand = candidate.reshape(candidate.shape[0], -1).astype(np.float64)
    mean = ref.mean(axis=0)
    signal, size = np.linalg.norm(ref - mean), np.linalg.norm(ref)
    found["reference_norm"] = float(size)
    found["variation"] = float(signal / size) if size > 0 else 0.0
    if signal == 0:
        return found
    moved = np.linalg.norm(cand - mean)
    # A candidate at the mean for every input has no direction: it explains none of the variation.
    found["centered_cosine"] = float(np.sum((cand - mean) * (ref - mean)) / (moved * signal)) if moved > 0 else 0.0
    found["error_to_signal"] = float(np.linalg.norm(cand - ref) / signal)
    return found


def degenerate(measured: dict) -> str | None:
    """Why parity on this output of the original model proves nothing, from compare()'s measures, or None.
    Integer outputs have no variation measured and are not judged: a classifier may fairly give one label to every
    synthetic sample while its scores (judged on their own) still vary. Neither is one sample (nothing can vary)
    nor a cached measure from before variation was measured ("not measured", not degenerate)."""
    nan, inf = measured.get("reference_nan") or 0, measured.get("reference_inf") or 0
    if nan or inf:
        return f"the original model's output contains {nan} NaN and {inf} Inf values"
    variation = measured.get("variation")
    if variation is None or variation >= MIN_VARIATION:
        return None
    samples = measured["shape"][0]
    if measured.get("reference_norm") == 0:
        return f"the original model's output is all zero on the {samples} validation samples"
    return (f"the original model's output does not vary across the {samples} validation samples "
            f"(variation {variation:.2g})")


def topk_agreement(reference: np.ndarray, candidate: np.ndarray, k: int) -> float:
    """Mean overlap of the k largest classes per row (order-insensitive): 1.0 = same top-k sets everywhere."""
    ref = np.argsort(-reference.reshape(-1, reference.shape[-1]), axis=-1)[:, :k]
    cand = np.argsort(-candidate.reshape(-1, candidate.shape[-1]), axis=-1)[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(ref, cand)]
    return float(np.mean(overlap))


def per_sample_error(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Max absolute error of each sample (first axis), NaN counted as infinite."""
    diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64)).reshape(reference.shape[0], -1)
    return np.where(np.isnan(diff), np.inf, diff).max(axis=1)


def tolerance_violation(reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float) -> dict:
    """Where |candidate - reference| exceeds atol + rtol * |reference| the most (numpy.allclose's rule)."""
    ref = reference.astype(np.float64)
    diff = np.abs(candidate.astype(np.float64) - ref)
    allowed = atol + rtol * np.abs(ref)
    excess = np.where(np.isnan(diff), np.inf, diff - allowed)
    worst = np.unravel_index(int(np.argmax(excess)), excess.shape) if excess.size else ()
    return {
        "passed": bool(excess.size == 0 or excess.max() <= 0),
        "violations": int((excess > 0).sum()),
        "elements": int(excess.size),
        "worst_index": [int(i) for i in worst],
        "worst_abs_error": float(diff[worst]) if excess.size else 0.0,
        "worst_allowed": float(allowed[worst]) if excess.size else 0.0,
    }


def predicted_classes(output: np.ndarray) -> np.ndarray:
    """The class each sample is given: an output of integer labels (e.g. a scikit-learn classifier's `label`) is
    its own prediction; scores or logits give their argmax."""
    if output.dtype.kind in "iu":
        return output.reshape(-1)
    return np.argmax(output, axis=-1).reshape(-1)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((predicted_classes(logits) == labels.reshape(-1)).mean())


def macro_f1(logits: np.ndarray, labels: np.ndarray) -> float:
    predicted, truth = predicted_classes(logits), labels.reshape(-1)
    scores = []
    for cls in np.unique(np.concatenate([predicted, truth])):
        tp = int(((predicted == cls) & (truth == cls)).sum())
        fp = int(((predicted == cls) & (truth != cls)).sum())
        fn = int(((predicted != cls) & (truth == cls)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
    return float(np.mean(scores))


def mean_row_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean over samples (first axis) of each sample's cosine similarity, e.g. per sentence embedding."""
    ref = reference.reshape(reference.shape[0], -1)
    cand = candidate.reshape(candidate.shape[0], -1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    # A zero row has no direction: it matches only another zero row (an all-zero output is a broken model,
    # e.g. a softmax quantized away, not a perfect one).
    same = np.all(ref == cand, axis=1).astype(np.float64)
    cosines = np.where(norms > 0, np.sum(ref * cand, axis=1) / np.where(norms > 0, norms, 1), same)
    return float(np.mean(cosines))
