"""VGG-11 and VGG-19-BN as BackdoorBench uses them (torchvision's VGG; Simonyan & Zisserman, ICLR 2015).

Features: 3×3 convs (padding 1, with bias), each followed by BN (VGG-19-BN only) and ReLU, with
2×2 max pools at the "M" entries of the config. Then adaptive average pooling to 7×7 (a 32×32
input reaches 1×1, which is replicated 49 times) and the classifier
``fc1`` (4096) → ReLU → Dropout(0.5) → ``fc2`` (4096) → ReLU → Dropout(0.5) → ``linear`` (C).
Parameter counts for C = 10: VGG-19-BN 139,622,218, VGG-11 128,807,306. Init follows
torchvision's VGG: conv kaiming-normal (fan_out, ReLU gain), Dense N(0, 0.01), zero biases.

Paths: ``conv{i}``/``bn{i}`` for the i-th conv (1-based; torchvision ``features.k``), ``fc1``,
``fc2``, ``linear`` (torchvision ``classifier.0/3/6``). fc1's input is flattened in (H, W, C)
order, not PyTorch's (C, H, W): permute its rows when converting PyTorch weights.

Deviation (opt-in, ``small_input=True``, for small images and CPU budgets): the features are
globally averaged to 1×1 (for 32×32 input that is just the flattened 1×1×512 map) instead of
being replicated to 7×7, and the hidden size defaults to 512 instead of 4096.
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d3jax.models import preact_resnet
from d3jax.models.conv import Conv, max_pool_2x2
from d3jax.models.precision import dense

# Conv channels as multiples of width (width 64 ⇒ 64, 128, 256, 512); "M" = 2×2 max pool.
CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"),
    19: (1, 1, "M", 2, 2, "M", 4, 4, 4, 4, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8, "M"),
}
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_dense_init = nn.initializers.normal(0.01)


def _pool_matrix(size: int, out: int) -> np.ndarray:
  """(out, size) averaging matrix with PyTorch's adaptive bins [⌊i·size/out⌋, ⌈(i+1)·size/out⌉)."""
  matrix = np.zeros((out, size), np.float32)
  for i in range(out):
    start, end = (i * size) // out, -(-(i + 1) * size // out)
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  """PyTorch's AdaptiveAvgPool2d on an NHWC batch: (N, H, W, C) → (N, *output_size, C)."""
  rows = _pool_matrix(x.shape[1], output_size[0])
  cols = _pool_matrix(x.shape[2], output_size[1])
  return jnp.einsum("ih,nhwc,jw->nijc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)


class VGG(nn.Module):
  """VGG-``depth`` (11 or 19), optionally with BatchNorm.

  Attributes:
    num_classes: number of output logits C.
    depth: 11 or 19 (the configs BackdoorBench uses).
    batch_norm: BN after every conv (VGG-19-BN) or none (VGG-11).
    width: channels of the first conv; the others scale with it (64 = torchvision).
    small_input: pool the features to 1×1 instead of 7×7 (see the module docstring).
    hidden: classifier hidden size; None ⇒ 4096, or 512 when ``small_input``.
    conv: the convolution lowering, "auto" | "lax" | "im2col" | "winograd" (:mod:`d3jax.models.conv`).
    precision: the products' precision, "f32" | "bf16" (:mod:`d3jax.models.precision`).
    attention_layers: none: an attention-distillation defense (NAD) needs its layers given.
  """

  attention_layers: ClassVar[tuple[str, ...]] = ()

  num_classes: int
  depth: int = 19
  batch_norm: bool = True
  width: int = 64
  small_input: bool = False
  hidden: int | None = None
  conv: str = "auto"
  precision: str = "f32"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps normalized NHWC float images (H, W ≥ 32) to logits (N, num_classes)."""
    preact_resnet.check_images(x, 32, f"vgg{self.depth}")
    if self.depth not in CONFIGS:
      raise ValueError(f"VGG depth must be one of {sorted(CONFIGS)}, got {self.depth}.")
    index = 0
    for entry in CONFIGS[self.depth]:
      if entry == "M":
        x = max_pool_2x2(x)
        continue
      index += 1
      x = Conv(entry * self.width, (3, 3), padding=((1, 1), (1, 1)), kernel_init=_conv_init,
               lowering=self.conv, precision=self.precision, name=f"conv{index}")(x)
      if self.batch_norm:
        x = preact_resnet.batch_norm(train, f"bn{index}")(x)
      x = nn.relu(x)
    x = adaptive_avg_pool(x, (1, 1) if self.small_input else (7, 7))
    x = x.reshape(x.shape[0], -1)
    hidden = self.hidden or (512 if self.small_input else 4096)
    for name in ("fc1", "fc2"):
      x = nn.relu(dense(hidden, name, self.precision, kernel_init=_dense_init)(x))
      x = nn.Dropout(0.5, deterministic=not train)(x)
    return dense(self.num_classes, "linear", self.precision, kernel_init=_dense_init)(x)
