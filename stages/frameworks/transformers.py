"""Hugging Face models from MLflow's transformers flavor (`mlflow.transformers.log_model(pipeline(...))`): load the
model and its tokenizer as MLflow does (`return_type="components"`) and run it so (its own attention, SDPA by
default); export it with the TorchScript exporter and eager attention, the only combination that gives ONNX
Runtime's full Attention and EmbedLayerNormalization fusion (DESIGN.md); name the fusion settings from the
model's own config.

The inputs are the tokenizer's tensors that the model's forward takes (input_ids, attention_mask, token_type_ids:
int64 [batch, sequence]); the outputs are the task's (logits, last_hidden_state). The pipeline's pre- and
post-processing (tokenizing, softmax, label names) is not part of the graph: a serving team tokenizes with the
model's tokenizer and reads logits, as Optimum's exports do.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.errors import ModelError, first_line
from stages import parity
from stages.frameworks import pytorch
from stages.tensors import ModelSpec

TOOLS = ["torch", "transformers", "tokenizers", "mlflow", "onnxscript"]

# The task the pipeline was logged for -> the model outputs kiln exports and compares.
TASK_OUTPUTS = {
    "text-classification": ["logits"],
    "token-classification": ["logits"],
    "feature-extraction": ["last_hidden_state"],
}
TOKEN_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
SEQUENCE = "sequence"  # the name of the token axis
DEFAULT_SEQUENCE = 128  # synthetic data and text: tokens per sample (at most the model's position table)

# Hugging Face config.model_type -> the onnxruntime.transformers.optimizer model type that fuses it (encoder
# families the BERT fusion handles, as Optimum maps them).
FUSION_TYPES = {t: "bert" for t in ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra",
                                    "albert", "mpnet")}


@dataclass
class Pipeline:
    """What MLflow's components give: the task, the model (eager attention, eval mode) and its tokenizer."""

    task: str
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any


def set_threads(threads: int) -> None:
    pytorch.set_threads(threads)


def _flavor(model_dir: Path) -> dict:
    return yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["transformers"]


def _check_loadable(flavor: dict) -> str:
    """The task, when kiln can build it offline: weights in the model folder, a task with known outputs."""
    if flavor.get("source_model_revision") or not flavor.get("model_binary"):
        reference = f"{flavor.get('source_model_name')}@{flavor.get('source_model_revision')}"
        raise ModelError(f"logged with save_pretrained=False: MLmodel references the Hugging Face Hub model "
                         f"{reference} and holds no weights; kiln builds offline (log it with save_pretrained=True)")
    task = flavor.get("task")
    if task not in TASK_OUTPUTS:
        raise ModelError(f"transformers task '{task}' is not supported (supported: {', '.join(TASK_OUTPUTS)})")
    return task


def _config(model_dir: Path):
    """The model's config, read from the weights folder without loading the weights."""
    from transformers import AutoConfig

    flavor = _flavor(model_dir)
    _check_loadable(flavor)
    return AutoConfig.from_pretrained(str(model_dir / flavor["model_binary"]), local_files_only=True)


def load(model_dir: Path, options: dict | None = None) -> Pipeline:
    import mlflow.transformers

    task = _check_loadable(_flavor(model_dir))
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a model with its weights in the folder needs no hub
    hf_logging.disable_progress_bar()  # "Loading weights" bars on every step's stderr
    try:
        components = mlflow.transformers.load_model(str(model_dir), return_type="components")
    except Exception as exc:  # noqa: BLE001 - a model that does not load is the user's input problem
        raise ModelError(f"mlflow.transformers.load_model failed: {type(exc).__name__}: {first_line(exc, 250)}") from None
    model = components["model"].eval()  # run and timed as MLflow loads it (SDPA attention by default)
    return Pipeline(task, model, components.get("tokenizer"))


def _forward_inputs(config) -> list[str]:
    """The token inputs the model's forward takes, in forward's order (DistilBERT takes no token_type_ids)."""
    import transformers

    architecture = getattr(transformers, (config.architectures or [""])[0], None)
    if architecture is None:
        raise ModelError(f"config.json names architecture {config.architectures}, which transformers does not have")
    params = list(inspect.signature(architecture.forward).parameters)
    return [name for name in params if name in TOKEN_INPUTS]


def model_inputs(model_dir: Path, options: dict | None = None) -> list[dict]:
    """int64 [batch, sequence] token tensors, with the bounds synthetic data needs to be valid: token ids inside
    the vocabulary, an attention mask of ones, token types inside type_vocab_size."""
    config = _config(model_dir)
    bounds = {"input_ids": (0, int(config.vocab_size)), "attention_mask": (1, 2),
              "token_type_ids": (0, int(getattr(config, "type_vocab_size", 1) or 1))}
    return [{"name": name, "dtype": "int64", "shape": [-1, SEQUENCE], "low": bounds[name][0],
             "high": bounds[name][1]} for name in _forward_inputs(config)]


def default_axes(model_dir: Path, options: dict | None = None) -> dict[str, int]:
    """Tokens per sample when the recipe does not say: 128, or the model's position table when shorter."""
    positions = getattr(_config(model_dir), "max_position_embeddings", None) or DEFAULT_SEQUENCE
    return {SEQUENCE: min(DEFAULT_SEQUENCE, int(positions))}


def model_outputs(model_dir: Path, options: dict | None = None) -> list[str]:
    return list(TASK_OUTPUTS[_check_loadable(_flavor(model_dir))])


def tokenize(model_dir: Path, options: dict | None, texts: list[str], length: int) -> dict[str, np.ndarray]:
    """The texts as the model's tokenizer gives them, padded and truncated to `length` tokens so they stack."""
    pipe = load(model_dir, options)
    if pipe.tokenizer is None:
        raise ModelError("the logged pipeline has no tokenizer to tokenize validation text with")
    encoded = pipe.tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="np")
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    # A tokenizer that gives no token types (RoBERTa's) for a model whose forward takes them: all type 0, as
    # the model assumes when they are not passed.
    return {name: np.asarray(encoded[name], dtype=np.int64) if name in encoded else np.zeros_like(ids)
            for name in _forward_inputs(pipe.model.config)}


def fusion_hint(model: Pipeline) -> dict | None:
    """The onnxruntime transformer fusion settings the model's config implies, or None for a family it lacks."""
    config = model.model.config
    fused = FUSION_TYPES.get(config.model_type)
    if fused is None:
        return None
    return {"model_type": fused, "num_heads": int(config.num_attention_heads), "hidden_size": int(config.hidden_size),
            "from": f"model config ({config.model_type}, {type(config).__name__})"}


def _wrapped(model: Pipeline, spec: ModelSpec):
    """A module that calls the model with keyword inputs (transformers 5 wants them) and returns the task's
    outputs only, as a tuple (what is run, timed and exported)."""
    import torch

    names = [t.name for t in spec.inputs]
    unknown = [n for n in names if n not in TOKEN_INPUTS]
    if unknown:
        raise ModelError(f"inputs: {', '.join(unknown)} are not token inputs of a transformers model "
                         f"(it takes {', '.join(TOKEN_INPUTS)})")
    outputs = TASK_OUTPUTS[model.task]

    class TaskOutputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model.model

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            result = self.model(**{k: v for k, v in given.items() if k in names}, return_dict=True)
            return tuple(result[name] for name in outputs)

    return TaskOutputs().eval()


def predict(model: Pipeline, spec: ModelSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return pytorch.predict(_wrapped(model, spec), spec, feeds)


def runner(model: Pipeline, spec: ModelSpec, feeds: dict[str, np.ndarray]):
    return pytorch.runner(_wrapped(model, spec), spec, feeds)


def output_names(model: Pipeline, spec: ModelSpec) -> list[str]:
    return list(TASK_OUTPUTS[model.task])


def export_onnx(model: Pipeline, spec: ModelSpec, feeds, output_names: list[str], exporter: str, opset: int,
                path: Path) -> dict:
    """Always the TorchScript exporter: the dynamo export of a transformers model fuses only LayerNorm/Gelu
    (DESIGN.md), so `export.exporter` (the pytorch flavor's option) does not apply here."""
    config = model.model.config
    loaded = config._attn_implementation
    # Eager attention for the export only: SDPA exports as a graph the fusion does not recognise (DESIGN.md).
    model.model.set_attn_implementation("eager")
    try:
        done = pytorch.export_onnx(_wrapped(model, spec), spec, feeds, output_names, "torchscript", opset, path)
    finally:
        model.model.set_attn_implementation(loaded)
    return {**done, "task": model.task, "architecture": type(model.model).__name__,
            "model_type": config.model_type, "attn_implementation": "eager", "original_attn_implementation": loaded}


def task_parity(model: Pipeline, spec: ModelSpec, feeds: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                candidate: dict[str, np.ndarray]) -> dict:
    """Agreement at the pipeline's level, on real tokens only (attention mask 1, padding excluded): the label of
    each text (argmax of logits), the label of each token, or each text's mean-pooled embedding (cosine)."""
    name = TASK_OUTPUTS[model.task][0]
    ref, cand = reference[name].astype(np.float64), candidate[name].astype(np.float64)
    mask = feeds.get("attention_mask", np.ones(feeds["input_ids"].shape, dtype=np.int64)).astype(bool)
    if model.task in ("text-classification", "token-classification"):
        agree = np.argmax(ref, axis=-1) == np.argmax(cand, axis=-1)
        per_token = model.task == "token-classification"
        agree = agree[mask] if per_token else agree
        return {"task": model.task, "metric": "token label agreement" if per_token else "label agreement",
                "output": name, "value": float(agree.mean()), "compared": int(agree.size),
                "unit": "tokens" if per_token else "texts", "distinct_labels": int(len(np.unique(ref.argmax(-1))))}
    weights = mask[..., None].astype(np.float64)
    pooled_ref, pooled_cand = ((x * weights).sum(axis=1) / weights.sum(axis=1) for x in (ref, cand))
    return {"task": model.task, "metric": "mean-pooled embedding cosine (mean over texts)", "output": name,
            "value": parity.mean_row_cosine(pooled_ref, pooled_cand), "compared": int(ref.shape[0]), "unit": "texts"}


def layer_outputs(model: Pipeline, spec: ModelSpec, feeds: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
    """The transformer's submodules, named as in the exported graph's scopes (under the wrapper's `model.`)."""
    return pytorch.layer_outputs(_wrapped(model, spec), spec, feeds)

