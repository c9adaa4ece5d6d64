"""Keras example architectures (TensorFlow path)."""

from __future__ import annotations


def digits_mlp():
    """features (N, 64) in [0, 1] -> probabilities (N, 10)."""
    import keras

    inputs = keras.Input((64,), name="features")
    hidden = keras.layers.Dense(64, activation="relu")(inputs)
    hidden = keras.layers.Dense(32, activation="relu")(hidden)
    outputs = keras.layers.Dense(10, activation="softmax", name="probabilities")(hidden)
    return keras.Model(inputs, outputs, name="digits_mlp")


def mobilenet_v2(size: int = 224):
    """Keras' MobileNetV2 with random weights (weights=None: no download): image (N, size, size, 3) in [-1, 1]
    -> probabilities (N, 1000)."""
    import keras

    inputs = keras.Input((size, size, 3), name="image")
    return keras.applications.MobileNetV2(input_tensor=inputs, weights=None, name="mobilenet_v2")
