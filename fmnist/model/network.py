"""The Keras 3 CNN. Plain layers only, so the same file runs on the TensorFlow and JAX backends.

The model takes raw pixels (float32, 0..255, dark background as in Fashion-MNIST, shape
[N, 28, 28, 1]) and scales them itself, so every caller (training, predict, the worker, an Open
Inference Protocol client) feeds the same thing and the preprocessing rule travels with the
weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fmnist.config import ModelConfig

if TYPE_CHECKING:
    import keras

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
PREPROCESSING = "float32 pixels 0..255, white object on black background; the model rescales by 1/255"


def build(cfg: ModelConfig) -> keras.Model:
    """VGG-style stages of (conv-BN-ReLU) x convs_per_stage, then max-pool; a dense head.

    Convolutions are the cost on a CPU, so the widest stage runs at 7x7 and the 28x28 stage is
    narrow; batch norm lets a high learning rate converge in few epochs.
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=INPUT_SHAPE, name="pixels")
    x = layers.Rescaling(1.0 / 255.0)(inputs)
    for stage, filters in enumerate(cfg.filters):
        for conv in range(cfg.convs_per_stage):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False,
                              name=f"conv{stage}_{conv}")(x)
            x = layers.BatchNormalization(name=f"bn{stage}_{conv}")(x)
            x = layers.ReLU()(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Dropout(cfg.dropout / 2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(cfg.dense_units, use_bias=False, name="dense")(x)
    x = layers.BatchNormalization(name="bn_dense")(x)
    x = layers.ReLU()(x)
    x = layers.Dropout(cfg.dropout)(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=cfg.name)


def multiply_adds(model: keras.Model) -> int:
    """Multiply-adds per image of the conv and dense layers: the figure that predicts CPU cost."""
    from keras import layers

    total = 0
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            k_h, k_w, c_in, _ = layer.kernel.shape
            total += h * w * c_out * k_h * k_w * c_in
        elif isinstance(layer, layers.Dense):
            total += layer.kernel.shape[0] * layer.kernel.shape[1]
    return int(total)
