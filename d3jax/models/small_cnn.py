"""A small, fast CNN for tests, the demo and CPU-scale experiments (not in BackdoorBench).

BackdoorBench has no small or 1-channel classifier (its MNIST runs use PreAct-ResNet18); this one fills that
gap. It is a conventional VGG-style net with the same layer conventions as PreAct-ResNet18
(PyTorch default init, BatchNorm momentum 0.1 in PyTorch terms, symmetric padding).
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from d3jax.models.conv import max_pool_2x2
from d3jax.models.preact_resnet import batch_norm, check_images, conv3x3, linear_head


class SmallCNN(nn.Module):
  """Four 3×3 conv-BN-ReLU layers in two stages, global average pooling, a ``linear`` head.

  conv1, conv2 (width) → maxpool 2 → conv3, conv4 (2·width) → maxpool 2 → global average
  pool → ``linear``. Convs have no bias (BN follows). Works on any H, W ≥ 4 and any channel
  count (MNIST 28×28×1, digits 16×16×1, CIFAR 32×32×3). Width 32 on 28×28×1 with 10 classes
  has 65,834 trainable parameters.

  Attributes:
    num_classes: number of output logits C.
    width: channels of the first stage; the second stage has 2·width.
    conv: the convolution lowering, "auto" | "lax" | "im2col" | "winograd" (:mod:`d3jax.models.conv`).
    precision: the products' precision, "f32" | "bf16" (:mod:`d3jax.models.precision`).
    attention_layers: the stage outputs an attention-distillation defense (NAD) reads by default:
      the last BN of each stage, before its ReLU.
  """

  attention_layers: ClassVar[tuple[str, ...]] = ("bn2", "bn4")

  num_classes: int
  width: int = 32
  conv: str = "auto"
  precision: str = "f32"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps normalized NHWC float images to logits (N, num_classes)."""
    check_images(x, 4, "small_cnn")
    features = (self.width, self.width, 2 * self.width, 2 * self.width)
    for index, channels in enumerate(features, start=1):
      x = conv3x3(channels, 1, f"conv{index}", self.conv, self.precision)(x)
      x = nn.relu(batch_norm(train, f"bn{index}")(x))
      if index % 2 == 0:
        x = max_pool_2x2(x)
    x = jnp.mean(x, axis=(1, 2))
    return linear_head(self.num_classes, x, self.precision)(x)
