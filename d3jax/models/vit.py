"""Vision Transformer (Dosovitskiy et al., ICLR 2021) with torchvision's ``VisionTransformer`` layout.

The D3 supplement (Sec. 8, Tables 3-4) defends ViT-B/16 (patch 16, width 768, depth 12, 12 heads,
MLP 3072); BackdoorBench builds it as torchvision's ``vit_b_16`` with ImageNet-pretrained weights
and a fresh ``Linear(768, C)`` head, behind a bilinear resize of the input to 224×224 (pass
``resize=224``). Those pretrained weights are not bundled: d3jax's ViT starts from torchvision's
initialisation.

Structure: a ``patch_size`` × ``patch_size`` stride-``patch_size`` convolution ``conv_proj`` (with
bias), a learned ``class_token`` prepended, learned ``pos_embedding`` added (its length is fixed by
the image size at init), ``depth`` pre-norm encoder blocks ``block{i}`` — LayerNorm (ε 1e-6) →
multi-head self-attention (one fused ``qkv`` projection, then ``out``) → residual, LayerNorm →
MLP (``mlp1`` → exact GELU → ``mlp2``) → residual — a final LayerNorm ``ln`` and the head
``linear`` on the class token, so D3's default selection (``linear/kernel``) applies as for every
model here. Dropout is 0, torchvision's default. ViT-B/16 with C = 10 at 224×224 has 85,806,346
parameters, torchvision's count.
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from d3jax.models.conv import Conv
from d3jax.models.precision import dense
from d3jax.models.preact_resnet import check_images

_xavier = nn.initializers.xavier_uniform()
_tiny_bias = nn.initializers.normal(1e-6)  # torchvision's MLP bias init


class SelfAttention(nn.Module):
  """Multi-head scaled dot-product self-attention with a fused ``qkv`` projection (torchvision's
  ``in_proj_weight``) and an ``out`` projection."""

  heads: int
  precision: str = "f32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, width = x.shape
    head_dim = width // self.heads
    qkv = dense(3 * width, "qkv", self.precision, kernel_init=_xavier)(x)
    q, k, v = jnp.moveaxis(qkv.reshape(batch, tokens, 3, self.heads, head_dim), 2, 0)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
    attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    return dense(width, "out", self.precision)(attended.reshape(batch, tokens, width))


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + attn(ln_1(x)), then y + mlp(ln_2(y))."""

  heads: int
  mlp_dim: int
  precision: str = "f32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = x + SelfAttention(self.heads, self.precision, name="attention")(
        nn.LayerNorm(1e-6, name="ln_1")(x))
    h = dense(self.mlp_dim, "mlp1", self.precision, kernel_init=_xavier, bias_init=_tiny_bias)(
        nn.LayerNorm(1e-6, name="ln_2")(y))
    h = dense(x.shape[-1], "mlp2", self.precision, kernel_init=_xavier, bias_init=_tiny_bias)(
        nn.gelu(h, approximate=False))
    return y + h


class ViT(nn.Module):
  """A Vision Transformer classifier (module docstring); ``vit_b16`` fixes the ViT-B/16 shape.

  Attributes:
    num_classes: number of output logits C.
    patch_size: side of the square patches; it must divide the (resized) image's height and width.
    width: token dimension D; a multiple of ``heads``.
    depth: number of encoder blocks.
    heads: attention heads.
    mlp_dim: hidden size of each block's MLP; None ⇒ 4·width.
    resize: resize images bilinearly to ``resize`` × ``resize`` first (BackdoorBench: 224); None
      keeps the input size.
    conv: the lowering of the patch convolution (:mod:`d3jax.models.conv`).
    precision: the products' precision, "f32" | "bf16" (:mod:`d3jax.models.precision`): the patch
      convolution and every Dense layer; the attention scores and their weighted sum stay f32.
    attention_layers: none: an attention-distillation defense (NAD) needs its layers given.
  """

  attention_layers: ClassVar[tuple[str, ...]] = ()

  num_classes: int
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int | None = None
  resize: int | None = None
  conv: str = "auto"
  precision: str = "f32"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps normalized NHWC float images to logits (N, num_classes)."""
    check_images(x, 1, "vit")
    if self.width % self.heads:
      raise ValueError(f"vit: width {self.width} must be a multiple of heads {self.heads}.")
    if self.resize is not None:
      x = jax.image.resize(x, (x.shape[0], self.resize, self.resize, x.shape[-1]), "bilinear")
    if x.shape[1] % self.patch_size or x.shape[2] % self.patch_size:
      raise ValueError(f"vit: patch_size {self.patch_size} must divide the image size "
                       f"{x.shape[1]}×{x.shape[2]}.")
    fan_in = self.patch_size ** 2 * x.shape[-1]
    patches = Conv(self.width, (self.patch_size, self.patch_size), strides=self.patch_size,
                   padding="VALID", kernel_init=nn.initializers.truncated_normal(fan_in ** -0.5),
                   lowering=self.conv, precision=self.precision, name="conv_proj")(x)
    tokens = patches.reshape(x.shape[0], -1, self.width)
    cls = self.param("class_token", nn.initializers.zeros_init(), (1, 1, self.width))
    tokens = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), tokens], 1)
    tokens = tokens + self.param("pos_embedding", nn.initializers.normal(0.02),
                                 (1, tokens.shape[1], self.width))
    for index in range(self.depth):
      tokens = EncoderBlock(self.heads, self.mlp_dim or 4 * self.width, self.precision,
                            name=f"block{index}")(tokens)
    features = nn.LayerNorm(1e-6, name="ln")(tokens)[:, 0]
    return dense(self.num_classes, "linear", self.precision,
                 kernel_init=nn.initializers.zeros_init())(features)
