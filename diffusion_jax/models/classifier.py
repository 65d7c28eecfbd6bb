"""A small convolutional image classifier: the judge of the offline sample-quality metric.

Not a diffusion network (it takes no ``t`` and is not in MODELS): ``evaluation.judge`` trains
it on a data set's labels and reads its penultimate features (for a Fréchet distance) and its
class probabilities (for an Inception-Score-like number).

Architecture, for an input of side S: stages of two 3x3 convolutions (ReLU) at S, S/2, S/4, ...
(2x2 average pooling between them, channels ``width``, 2·width, 4·width at most) down to a side of
at most 4 (8x8 digits: 8 -> 4; 28x28: 28 -> 14 -> 7 -> 3; 32x32: 32 -> 16 -> 8 -> 4), then
flatten, a dense layer of ``feature_dim`` units with ReLU (the features), and a dense layer to
the logits.
"""

from __future__ import annotations

import flax.linen as nn
import jax


class Classifier(nn.Module):
    """``apply(variables, x [B, H, W, C] in [-1, 1]) -> (logits [B, K], features [B, F])``."""

    num_classes: int
    width: int = 32
    feature_dim: int = 64

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = x  # [B, H, W, C]
        stage = 0
        while True:
            ch = self.width * 2 ** min(stage, 2)
            h = nn.relu(nn.Conv(ch, (3, 3))(h))
            h = nn.relu(nn.Conv(ch, (3, 3))(h))  # [B, H / 2^stage, W / 2^stage, ch]
            if h.shape[1] <= 4:
                break
            h = nn.avg_pool(h, (2, 2), strides=(2, 2))
            stage += 1
        h = h.reshape(h.shape[0], -1)  # [B, s * s * ch]
        features = nn.relu(nn.Dense(self.feature_dim)(h))  # [B, F]
        logits = nn.Dense(self.num_classes)(features)  # [B, K]
        return logits, features
