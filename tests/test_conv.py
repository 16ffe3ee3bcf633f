"""The convolution lowerings (d3jax.models.conv): im2col, Winograd and lax compute nn.Conv's function
with nn.Conv's parameters, and their gradients are as accurate as nn.Conv's own."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest


from d3jax.models import Conv, get_model
from d3jax.models.conv import (im2col_conv, layer_lowering, max_pool_2x2, resolve_lowering,
                               winograd_conv)

CASES = [((3, 3), 1, ((1, 1), (1, 1))), ((3, 3), 2, ((1, 1), (1, 1))), ((1, 1), 2, "VALID"),
         ((3, 3), 1, "SAME"), ((3, 3), 2, "SAME"), ((3, 3), 1, "VALID"), ((5, 3), (2, 1), "SAME")]
PAD1 = ((1, 1), (1, 1))


@pytest.mark.parametrize("kernel_size, strides, padding", CASES)
@pytest.mark.parametrize("lowering", ["im2col", "lax", "winograd"])
@pytest.mark.parametrize("height", [9, 8])
def test_forward_equals_nn_conv(kernel_size, strides, padding, lowering, height):
  """Same parameter tree as nn.Conv, and the same outputs to ~1e-6 relative (odd and even sizes,
  strides, explicit and named paddings, with bias; Winograd where it applies, im2col elsewhere)."""
  x = jax.random.normal(jax.random.key(0), (3, height, 10, 5))
  reference = nn.Conv(7, kernel_size, strides=strides, padding=padding)
  variables = reference.init(jax.random.key(1), x)
  ours = Conv(7, kernel_size, strides=strides, padding=padding, lowering=lowering)
  assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(variables)
  expected = reference.apply(variables, x)
  got = ours.apply(variables, x)
  assert got.shape == expected.shape
  assert float(jnp.max(jnp.abs(got - expected)) / jnp.max(jnp.abs(expected))) < 2e-6


def _gradients(lowering, dtype, x, variables):
  """Gradient of a small CNN's train-mode cross-entropy w.r.t. its params, computed in ``dtype``."""
  model = get_model("small_cnn", 10, width=4, conv=lowering)
  labels = jnp.arange(x.shape[0]) % 10
  cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(np.asarray(a), dtype), tree)  # noqa: E731

  def loss(params):
    logits, _ = model.apply({"params": params, "batch_stats": cast(variables["batch_stats"])},
                            cast(x), train=True, mutable=["batch_stats"])
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), labels])

  return jax.grad(loss)(cast(variables["params"]))


@pytest.mark.slow
def test_gradients_are_as_accurate_as_lax():
  """f32 gradients of a small CNN's loss under im2col and under Winograd are as close to the
  float64 reference as those under XLA's own convolution (within 3×, and all small)."""
  x = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
  variables = get_model("small_cnn", 10, width=4).init(jax.random.key(1), x)
  with jax.enable_x64(True):
    reference = [np.asarray(r) for r in jax.tree.leaves(_gradients("lax", jnp.float64, x, variables))]
  errors = {}
  for lowering in ("im2col", "winograd", "lax"):
    grads = jax.tree.leaves(_gradients(lowering, jnp.float32, x, variables))
    errors[lowering] = max(float(np.max(np.abs(np.asarray(g, np.float64) - r)) / np.max(np.abs(r)))
                           for g, r in zip(grads, reference))
  assert max(errors.values()) < 1e-4, errors
  assert errors["im2col"] <= 3 * errors["lax"] + 1e-6, errors
  assert errors["winograd"] <= 3 * errors["lax"] + 1e-6, errors


@pytest.mark.parametrize("name, shape", [("small_cnn", (8, 8, 1)), ("preact_resnet18", (8, 8, 3))])
def test_models_agree_across_lowerings(name, shape):
  """The same variables give the same logits with every lowering."""
  options = {"width": 4}
  x = jax.random.normal(jax.random.key(0), (2,) + shape)
  lax_model = get_model(name, 10, conv="lax", **options)
  variables = lax_model.init(jax.random.key(1), x)
  a = lax_model.apply(variables, x)
  for lowering in ("im2col", "winograd"):
    b = get_model(name, 10, conv=lowering, **options).apply(variables, x)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_lowering_names_are_checked():
  """auto resolves per backend (im2col on CPU); unknown names are one ValueError."""
  assert resolve_lowering("auto") == ("im2col" if jax.default_backend() == "cpu" else "lax")
  with pytest.raises(ValueError, match="lowering"):
    resolve_lowering("fft")
  with pytest.raises(ValueError, match="conv"):
    get_model("small_cnn", 10, conv="fft")


@pytest.mark.parametrize("x_shape, kernel_shape, strides, padding, lowering, expected", [
    ((2, 8, 8, 64), (3, 3, 64, 64), (1, 1), PAD1, "auto", "winograd"),
    ((2, 8, 8, 32), (3, 3, 32, 64), (1, 1), PAD1, "auto", "im2col"),      # too few channels
    ((2, 8, 8, 3), (3, 3, 3, 64), (1, 1), PAD1, "winograd", "winograd"),  # asked for: any width
    ((2, 7, 8, 64), (3, 3, 64, 64), (1, 1), PAD1, "winograd", "im2col"),  # odd height
    ((2, 8, 8, 64), (3, 3, 64, 64), (2, 2), PAD1, "winograd", "im2col"),  # strided
    ((2, 8, 8, 64), (3, 3, 64, 64), (1, 1), ((0, 0), (0, 0)), "winograd", "im2col"),  # VALID
    ((2, 8, 8, 64), (1, 1, 64, 64), (1, 1), ((0, 0), (0, 0)), "auto", "im2col"),  # 1×1
    ((2, 8, 8, 64), (3, 3, 64, 64), (1, 1), PAD1, "lax", "lax"),
    ((2, 8, 8, 64), (3, 3, 64, 64), (1, 1), PAD1, "im2col", "im2col"),
])
def test_each_layer_gets_its_lowering(x_shape, kernel_shape, strides, padding, lowering, expected):
  """Winograd only where F(2×2, 3×3) computes the layer (3×3, stride 1, one pixel of padding, even
  size); "auto" on CPU uses it from 64 input channels."""
  if jax.default_backend() != "cpu" and lowering == "auto":
    expected = "lax"
  assert layer_lowering(lowering, x_shape, kernel_shape, strides, padding) == expected


@pytest.mark.parametrize("jit", [False, True])
def test_winograd_value_and_gradients_equal_im2col(jit):
  """Output and both gradients of Winograd F(2×2, 3×3) equal im2col's (a non-square input, more
  output than input channels), jitted or not, and under a vmap over per-run kernels."""
  x = jax.random.normal(jax.random.key(0), (3, 6, 10, 5))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 5, 7)) / 5
  probe = jax.random.normal(jax.random.key(2), (3, 6, 10, 7))

  def loss(conv):
    return lambda v, k: jnp.sum(jnp.sin(conv(v, k)) * probe)

  wino, ref = loss(winograd_conv), loss(lambda v, k: im2col_conv(v, k, (1, 1), PAD1))
  transform = jax.jit if jit else (lambda f: f)
  chex.assert_trees_all_close(transform(winograd_conv)(x, kernel), im2col_conv(x, kernel, (1, 1), PAD1),
                              rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(transform(jax.grad(wino, (0, 1)))(x, kernel),
                              jax.grad(ref, (0, 1))(x, kernel), rtol=1e-5, atol=1e-5)
  kernels = jnp.stack([kernel, -2 * kernel])
  chex.assert_trees_all_close(jax.vmap(jax.grad(wino, 1), (None, 0))(x, kernels),
                              jnp.stack([jax.grad(ref, 1)(x, k) for k in kernels]),
                              rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 2)])
def test_max_pool_2x2_equals_reduce_window(shape):
  """Values equal nn.max_pool (odd trailing rows/columns dropped); gradients equal where the
  window maxima are unique (random inputs)."""
  x = jax.random.normal(jax.random.key(0), shape)
  np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
  ours = jax.grad(lambda v: jnp.sum(jnp.sin(max_pool_2x2(v))))(x)
  theirs = jax.grad(lambda v: jnp.sum(jnp.sin(nn.max_pool(v, (2, 2), strides=(2, 2)))))(x)
  np.testing.assert_allclose(ours, theirs, atol=1e-6)
