"""PreAct-ResNet18 exactly as BackdoorBench builds it (its ``models/preact_resnet.py``; He et al., ECCV 2016).

Structure: a 3×3 stem conv with NO BN/ReLU after it, four stages of two :class:`PreActBlock`
(planes 64, 128, 256, 512 × width/64; first-block strides 1, 2, 2, 2), global average pooling
and a ``linear`` head with bias. There is NO final BN+ReLU before pooling, so penultimate
features can be negative. Parameter paths: ``conv1``, ``layer{1-4}_{0,1}/{bn1,conv1,bn2,conv2}``,
``layer{2,3,4}_0/shortcut``, ``linear`` (PyTorch ``layer2.0.shortcut.0`` ↦ ``layer2_0/shortcut``).

The PyTorch-convention layer helpers defined here (init, BatchNorm, padded 3×3 conv, input
check) are shared by the other models of this package.

Deviations from the PyTorch reference (documented, deliberate):
- BatchNorm updates its running variance with the biased batch variance (Flax) instead of the
  unbiased one (PyTorch); normalisation itself is identical.
- ``conv1`` adapts to the input's channel count, so 1-channel inputs work (the reference is
  3-channel only); the parameter counts quoted below assume 3 channels.
"""
from __future__ import annotations

from typing import Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from d3jax.models.conv import Conv
from d3jax.models.precision import dense

# PyTorch's default Conv/Linear weight init, kaiming_uniform(a=√5): U(±1/√fan_in).
kaiming_uniform: nn.initializers.Initializer = nn.initializers.variance_scaling(
    1 / 3, "fan_in", "uniform")

_PAD1 = ((1, 1), (1, 1))  # PyTorch padding=1: symmetric, also for stride 2 (not "SAME").


def linear_bias_init(fan_in: int) -> Callable[..., jax.Array]:
  """PyTorch's default Linear bias init: U(−1/√fan_in, 1/√fan_in)."""
  bound = fan_in ** -0.5

  def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
  """BatchNorm with PyTorch defaults (momentum 0.1 ⇒ Flax momentum 0.9, eps 1e-5)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def conv3x3(features: int, stride: int, name: str, lowering: str = "auto",
            precision: str = "f32") -> Conv:
  """3×3 conv, padding 1 on every side, no bias, PyTorch init."""
  return Conv(features, (3, 3), strides=stride, padding=_PAD1, use_bias=False,
              kernel_init=kaiming_uniform, lowering=lowering, precision=precision, name=name)


def linear_head(num_classes: int, features: jax.Array, precision: str) -> nn.Dense:
  """The ``linear`` classifier head with PyTorch's Linear init for ``features``' width."""
  return dense(num_classes, "linear", precision, kernel_init=kaiming_uniform,
               bias_init=linear_bias_init(features.shape[-1]))


def check_images(x: jax.Array, min_size: int, model: str) -> None:
  """Raises ValueError unless ``x`` is a float NHWC batch with H, W ≥ ``min_size``."""
  if x.ndim != 4:
    raise ValueError(
        f"{model} expects a batch of images (N, H, W, C), got shape {x.shape}; add a batch "
        "axis with x[None] or a channel axis with x[..., None].")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f"{model} expects normalized float images, got dtype {x.dtype}; convert uint8 pixels "
        "with (x / 255 - mean) / std first.")
  if min(x.shape[1:3]) < min_size:
    raise ValueError(
        f"{model} needs images of at least {min_size}×{min_size}, got {x.shape[1]}×{x.shape[2]}.")


class PreActBlock(nn.Module):
  """Pre-activation basic block (BackdoorBench's ``PreActBlock``, expansion 1).

  a = relu(bn1(x)); shortcut = 1×1 conv(a) with ``stride`` when the stride is not 1 or the
  channel count changes, else the RAW x; out = conv2(relu(bn2(conv1(a)))) + shortcut.
  """

  planes: int
  stride: int = 1
  conv: str = "auto"
  precision: str = "f32"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    a = nn.relu(batch_norm(train, "bn1")(x))
    if self.stride != 1 or x.shape[-1] != self.planes:
      shortcut = Conv(self.planes, (1, 1), strides=self.stride, padding="VALID", use_bias=False,
                      kernel_init=kaiming_uniform, lowering=self.conv, precision=self.precision,
                      name="shortcut")(a)
    else:
      shortcut = x
    out = conv3x3(self.planes, self.stride, "conv1", self.conv, self.precision)(a)
    out = nn.relu(batch_norm(train, "bn2")(out))
    out = conv3x3(self.planes, 1, "conv2", self.conv, self.precision)(out)
    return out + shortcut


class PreActResNet18(nn.Module):
  """BackdoorBench's PreAct-ResNet18; ``width`` 64 is the model of the D3 paper's experiments.

  Attributes:
    num_classes: number of output logits C.
    width: channels of the stem and of stage 1; stages use width × (1, 2, 4, 8). With width 64
      and 3-channel input there are 11,171,146 trainable parameters for C = 10.
    conv: the convolution lowering, "auto" | "lax" | "im2col" | "winograd" (:mod:`d3jax.models.conv`).
    precision: the products' precision, "f32" | "bf16" (:mod:`d3jax.models.precision`).
    attention_layers: the stage outputs an attention-distillation defense (NAD) reads by default:
      stages 3 and 4, BackdoorBench's choice for this model.
  """

  attention_layers: ClassVar[tuple[str, ...]] = ("layer3_1", "layer4_1")

  num_classes: int
  width: int = 64
  conv: str = "auto"
  precision: str = "f32"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps normalized NHWC float images to logits (N, num_classes)."""
    check_images(x, 1, "preact_resnet18")
    out = conv3x3(self.width, 1, "conv1", self.conv, self.precision)(x)
    for stage, (multiple, stride) in enumerate(zip((1, 2, 4, 8), (1, 2, 2, 2)), start=1):
      for index in range(2):
        block = PreActBlock(self.width * multiple, stride if index == 0 else 1, self.conv,
                            self.precision, name=f"layer{stage}_{index}")
        out = block(out, train)
    features = jnp.mean(out, axis=(1, 2))
    return linear_head(self.num_classes, features, self.precision)(features)

