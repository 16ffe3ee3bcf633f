"""A 2-D convolution with a selectable lowering, a drop-in for ``flax.linen.Conv``.

Same parameters as ``nn.Conv`` (``kernel`` of shape (kh, kw, cin, cout), optional ``bias``), so
checkpoints, parameter paths and layer selection are unchanged. Three lowerings compute the same
function:

* ``"lax"``: ``lax.conv_general_dilated`` — XLA's own convolution (cuDNN on GPU, native on TPU).
* ``"im2col"``: the patches are built from kh·kw shifted, strided slices of the padded NHWC input,
  concatenated along channels into (N·Ho·Wo, kh·kw·cin), and multiplied by the kernel reshaped to
  (kh·kw·cin, cout) in one matrix product. On XLA:CPU this is 1.6–2.5× faster than the lax
  convolution for training steps, it stays fast inside ``lax.scan`` (the lax convolution is ~25×
  slower there, jax-ml/jax#12868), and under ``jax.vmap`` over per-run weights it becomes a
  batched matrix product instead of a slow grouped convolution.
* ``"winograd"``: Winograd's minimal filtering F(2×2, 3×3) (Lavin & Gray, "Fast Algorithms for
  Convolutional Neural Networks", CVPR 2016, Sec. 4) for the 3×3 stride-1 convolutions padded by one
  pixel on every side with even height and width (:func:`winograd_applies`): 16 matrix products of
  (N·H·W/4, cin) × (cin, cout) instead of one of (N·H·W, 9·cin) × (9·cin, cout), 2.25× fewer
  multiplications, and a transformed input 4× (not 9×) the input's size. Other convolutions of the
  model use im2col.

Under ``precision="bf16"`` (:mod:`d3jax.models.precision`) every lowering rounds the inputs of its
products (patches and kernel; Winograd's transformed planes; lax's input and kernel) to bfloat16
and accumulates in float32; the additions of Winograd's transforms stay float32.

``"auto"`` (the default) picks lax on GPU/TPU, and on the CPU backend Winograd where it applies and
the layer has at least :data:`WINOGRAD_MIN_CHANNELS` input channels, im2col elsewhere (decided at
trace time, per layer).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from d3jax.models.precision import accumulation, matmul, product_inputs

LOWERINGS = ("auto", "lax", "im2col", "winograd")
# "auto" uses Winograd on CPU from this many input channels. One layer's forward and backward ran
# 1.5× (64 channels, 32×32), 1.8× (128, 16×16) and 1.8× (256, 8×8) faster than im2col, batch 128;
# fewer channels are unmeasured and keep im2col (benchmarks/RESULTS.md).
WINOGRAD_MIN_CHANNELS = 64
Padding = str | Sequence[tuple[int, int]]


def resolve_lowering(lowering: str) -> str:
  """``auto`` → ``im2col`` on the CPU backend (Winograd is then chosen per layer, see
  :func:`layer_lowering`), ``lax`` on GPU/TPU; other names pass through."""
  if lowering not in LOWERINGS:
    raise ValueError(f"conv lowering must be one of {LOWERINGS}, got {lowering!r}.")
  if lowering == "auto":
    return "im2col" if jax.default_backend() == "cpu" else "lax"
  return lowering


def winograd_applies(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
                     strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]
                     ) -> bool:
  """Whether F(2×2, 3×3) computes this convolution: a 3×3 kernel, stride 1, one pixel of padding
  on every side, even height and width (whole 2×2 output tiles)."""
  return (tuple(kernel_shape[:2]) == (3, 3) and tuple(strides) == (1, 1)
          and padding == ((1, 1), (1, 1)) and x_shape[1] % 2 == 0 and x_shape[2] % 2 == 0)


def layer_lowering(lowering: str, x_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
                   strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]
                   ) -> str:
  """The lowering one layer uses: ``"lax"``, ``"im2col"`` or ``"winograd"`` (module docstring)."""
  resolved = resolve_lowering(lowering)
  if resolved == "lax":
    return "lax"
  if not winograd_applies(x_shape, kernel_shape, strides, padding):
    return "im2col"
  if lowering == "auto":
    return "winograd" if kernel_shape[2] >= WINOGRAD_MIN_CHANNELS else "im2col"
  return resolved


def explicit_padding(padding: Padding, kernel_size: tuple[int, int], strides: tuple[int, int],
                     spatial: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
  """(low, high) padding per spatial axis for "VALID", "SAME" or explicit pairs."""
  if isinstance(padding, str):
    if padding == "VALID":
      return ((0, 0), (0, 0))
    if padding == "SAME":
      return tuple(jax.lax.padtype_to_pads(spatial, kernel_size, strides, "SAME"))
    raise ValueError(f"padding must be 'VALID', 'SAME' or ((lo, hi), (lo, hi)), got {padding!r}.")
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if len(pads) != 2:
    raise ValueError(f"padding needs one (lo, hi) pair per spatial axis, got {padding!r}.")
  return pads


def im2col_patches(x: jax.Array, kernel_size: tuple[int, int], strides: tuple[int, int],
                   padding: tuple[tuple[int, int], tuple[int, int]]
                   ) -> tuple[jax.Array, tuple[int, int, int]]:
  """The patch matrix (N·Ho·Wo, kh·kw·cin) of an NHWC input and the output's (N, Ho, Wo).

  Patches are gathered by kh·kw strided slices of the zero-padded input, in (i, j, c) order, which
  is the row order of ``kernel.reshape(kh·kw·cin, cout)``.
  """
  kh, kw = kernel_size
  sh, sw = strides
  x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  n, hp, wp, cin = x.shape
  ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  slices = [x[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :]
            for i in range(kh) for j in range(kw)]
  patches = slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)
  return patches.reshape(n * ho * wo, kh * kw * cin), (n, ho, wo)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def im2col_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                padding: tuple[tuple[int, int], tuple[int, int]], precision: str = "f32"
                ) -> jax.Array:
  """NHWC convolution (cross-correlation, as ``lax.conv_general_dilated``) as patches @ kernel
  (:func:`im2col_patches`). Jitted, so that eager (un-jitted) model calls run one compiled
  program per convolution instead of dispatching every slice; inside a traced function it is
  inlined.
  """
  kh, kw, cin, cout = kernel.shape
  patches, (n, ho, wo) = im2col_patches(x, (kh, kw), strides, padding)
  return matmul(patches, kernel.reshape(kh * kw * cin, cout), precision).reshape(n, ho, wo, cout)


# Winograd F(2×2, 3×3), Lavin & Gray (CVPR 2016), Sec. 4: for a 4×4 input tile d and a 3×3 kernel g,
# the 2×2 output tile is Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A. Tiles overlap by two pixels, so viewing the
# padded input as pairs of rows and pairs of columns, (N, th + 1, 2, tw + 1, 2, C), makes each of
# the 16 tile entries a plain slice. Each transformed entry ("plane") is a ±sum of such slices, and
# the element-wise product summed over input channels is one matrix product per plane. The 16
# planes stay separate arrays: on XLA:CPU each is then built in one pass and fed to its own product,
# where stacking them into one batched product copies every plane once more and runs the kernel
# gradient's batched product on a slow path (measured 1.2–1.4× slower per layer).
_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))
# Their transposes, for the backward pass.
_B, _GT, _A = (tuple(zip(*matrix)) for matrix in (_BT, _G, _AT))


def _bilinear(left, right, planes: list[list[jax.Array]]) -> list[jax.Array]:
  """The 2-D transform L·P·Rᵀ of a grid of equally shaped arrays: Σ_ij left[a][i]·right[b][j]·
  planes[i][j] for every (a, b), row-major, zero terms skipped."""
  out = []
  for row in left:
    for col in right:
      terms = [planes[i][j] if l * r == 1 else l * r * planes[i][j]
               for i, l in enumerate(row) for j, r in enumerate(col) if l and r]
      out.append(functools.reduce(jnp.add, terms))
  return out


def _rows(planes: list[jax.Array], cols: int) -> list[list[jax.Array]]:
  return [planes[i:i + cols] for i in range(0, len(planes), cols)]


def _interleave(planes: list[jax.Array]) -> jax.Array:
  """Four (N, h, w, C) planes (p, q) row-major → (N, 2h, 2w, C), plane (p, q) on the rows ≡ p and
  columns ≡ q (mod 2)."""
  n, h, w, c = planes[0].shape
  return jnp.stack(planes).reshape(2, 2, n, h, w, c).transpose(2, 3, 0, 4, 1, 5).reshape(
      n, 2 * h, 2 * w, c)


def _overlap_add(first: jax.Array, second: jax.Array, axis: int) -> jax.Array:
  """Length + 1 along ``axis``: ``first`` added at offsets 0.., ``second`` at offsets 1.."""
  size = first.shape[axis]
  cut = functools.partial(jax.lax.slice_in_dim, axis=axis)
  return jnp.concatenate([cut(first, 0, 1), cut(first, 1, size) + cut(second, 0, size - 1),
                          cut(second, size - 1, size)], axis=axis)


def _tile_planes(pairs: jax.Array, th: int, tw: int) -> list[list[jax.Array]]:
  """The 4×4 entries of every tile, each (N, th, tw, C), from the pair view (N, th + 1, 2, tw + 1,
  2, C) of the padded input."""
  return [[pairs[:, i // 2:i // 2 + th, i % 2, j // 2:j // 2 + tw, j % 2] for j in range(4)]
          for i in range(4)]


def _winograd_forward(x: jax.Array, kernel: jax.Array, precision: str):
  n, h, w, cin = x.shape
  th, tw = h // 2, w // 2
  pairs = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(n, th + 1, 2, tw + 1, 2, cin)
  v = product_inputs(precision, *[plane.reshape(-1, cin)
                                   for plane in _bilinear(_BT, _BT, _tile_planes(pairs, th, tw))])
  u, = product_inputs(precision, jnp.stack(
      _bilinear(_G, _G, _rows(list(kernel.reshape((9,) + kernel.shape[2:])), 3))))
  m = [jnp.matmul(v[t], u[t], **accumulation(precision)).reshape(n, th, tw, -1) for t in range(16)]
  return _interleave(_bilinear(_AT, _AT, _rows(m, 4))), (v, u)


def _winograd_backward(precision: str, residuals, dy: jax.Array):
  """dM = Aᵀ's transpose applied to dy, dV = dM Uᵀ and dU = Vᵀ dM per plane, then the transposed
  kernel transform and the transposed input transform, whose overlapping tiles are summed. Under
  bf16 the residuals V and U are already rounded and dM is rounded before its products."""
  v, u = residuals
  n, h, w, cout = dy.shape
  th, tw, cin = h // 2, w // 2, u.shape[1]
  pairs = dy.reshape(n, th, 2, tw, 2, cout)
  dy_planes = [[pairs[:, :, p, :, q] for q in range(2)] for p in range(2)]
  dm = product_inputs(precision, *[plane.reshape(-1, cout)
                                    for plane in _bilinear(_A, _A, dy_planes)])
  du = [jnp.matmul(v[t].T, dm[t], **accumulation(precision)) for t in range(16)]
  dkernel = jnp.stack(_bilinear(_GT, _GT, _rows(du, 4)))
  dv = [jnp.matmul(dm[t], u[t].T, **accumulation(precision)).reshape(n, th, tw, cin)
        for t in range(16)]
  tile = _rows(_bilinear(_B, _B, _rows(dv, 4)), 4)
  rows = [[_overlap_add(tile[s][j], tile[s + 2][j], 1) for j in range(4)] for s in range(2)]
  dxp = _interleave([_overlap_add(rows[s][t], rows[s][t + 2], 2)
                     for s in range(2) for t in range(2)])
  return dxp[:, 1:-1, 1:-1], dkernel.reshape((3, 3, cin, cout))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def winograd_conv(x: jax.Array, kernel: jax.Array, precision: str = "f32") -> jax.Array:
  """A 3×3 stride-1 NHWC convolution padded by one pixel (even H and W, see
  :func:`winograd_applies`) by Winograd's F(2×2, 3×3); the same function as ``im2col_conv``.
  The custom VJP writes each transposed transform as ±sums of slices too; left to autodiff, the
  slices' transposes become separate padded copies (an autodiff version, its planes stacked,
  measured 1.5–1.6× slower per layer, benchmarks/RESULTS.md)."""
  return _winograd_forward(x, kernel, precision)[0]


winograd_conv.defvjp(_winograd_forward, _winograd_backward)


class Conv(nn.Module):
  """``nn.Conv`` for NHWC inputs with a selectable lowering (see the module docstring).

  Supports what d3jax's models use: 2-D kernels, strides, "VALID"/"SAME"/explicit padding,
  optional bias, no dilation or feature groups; ``precision`` "f32" or "bf16" (module docstring).
  """

  features: int
  kernel_size: tuple[int, int]
  strides: int | tuple[int, int] = 1
  padding: Padding = "SAME"
  use_bias: bool = True
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()
  lowering: str = "auto"
  precision: str = "f32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_size = tuple(self.kernel_size)
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    kernel = self.param("kernel", self.kernel_init, kernel_size + (x.shape[-1], self.features))
    padding = explicit_padding(self.padding, kernel_size, strides, x.shape[1:3])
    lowering = layer_lowering(self.lowering, x.shape, kernel.shape, strides, padding)
    if lowering == "winograd":
      y = winograd_conv(x, kernel, self.precision)
    elif lowering == "im2col":
      y = im2col_conv(x, kernel, strides, padding, self.precision)
    else:
      y = jax.lax.conv_general_dilated(*product_inputs(self.precision, x, kernel), strides, padding,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       **accumulation(self.precision))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,))
    return y


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2×2 max pooling with stride 2 on NHWC (PyTorch ``MaxPool2d(2)``: odd trailing rows and
  columns are dropped), as a reshape and a max over the window axes. Same values as
  ``nn.max_pool(x, (2, 2), strides=(2, 2))``; on XLA:CPU its gradient avoids the slow
  select-and-scatter of ``reduce_window``. Where a window's maximum is tied, the gradient is
  shared among the tied entries instead of going to one of them."""
  n, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2, :]
  return jnp.max(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))
