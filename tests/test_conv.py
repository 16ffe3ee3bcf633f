"""The convolution lowerings (d3jax.models.conv): im2col and lax compute nn.Conv's function with
nn.Conv's parameters, and their gradients are as accurate as nn.Conv's own."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest


from d3jax.models import Conv, get_model
from d3jax.models.conv import max_pool_2x2, resolve_lowering

CASES = [((3, 3), 1, ((1, 1), (1, 1))), ((3, 3), 2, ((1, 1), (1, 1))), ((1, 1), 2, "VALID"),
         ((3, 3), 1, "SAME"), ((3, 3), 2, "SAME"), ((3, 3), 1, "VALID"), ((5, 3), (2, 1), "SAME")]


@pytest.mark.parametrize("kernel_size, strides, padding", CASES)
@pytest.mark.parametrize("lowering", ["im2col", "lax"])
def test_forward_equals_nn_conv(kernel_size, strides, padding, lowering):
  """Same parameter tree as nn.Conv, and the same outputs to ~1e-6 relative (odd sizes, strides,
  explicit and named paddings, with bias)."""
  x = jax.random.normal(jax.random.key(0), (3, 9, 10, 5))
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
  """f32 gradients of a small CNN's loss under im2col are as close to the float64 reference as
  those under XLA's own convolution (within 3×, and both small)."""
  x = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
  variables = get_model("small_cnn", 10, width=4).init(jax.random.key(1), x)
  with jax.enable_x64(True):
    reference = [np.asarray(r) for r in jax.tree.leaves(_gradients("lax", jnp.float64, x, variables))]
  errors = {}
  for lowering in ("im2col", "lax"):
    grads = jax.tree.leaves(_gradients(lowering, jnp.float32, x, variables))
    errors[lowering] = max(float(np.max(np.abs(np.asarray(g, np.float64) - r)) / np.max(np.abs(r)))
                           for g, r in zip(grads, reference))
  assert errors["lax"] < 1e-4 and errors["im2col"] < 1e-4, errors
  assert errors["im2col"] <= 3 * errors["lax"] + 1e-6, errors


@pytest.mark.parametrize("name, shape", [("small_cnn", (8, 8, 1)), ("preact_resnet18", (8, 8, 3))])
def test_models_agree_across_lowerings(name, shape):
  """The same variables give the same logits with either lowering."""
  options = {"width": 4}
  x = jax.random.normal(jax.random.key(0), (2,) + shape)
  lax_model = get_model(name, 10, conv="lax", **options)
  variables = lax_model.init(jax.random.key(1), x)
  a = lax_model.apply(variables, x)
  b = get_model(name, 10, conv="im2col", **options).apply(variables, x)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_lowering_names_are_checked():
  """auto resolves per backend (im2col on CPU); unknown names are one ValueError."""
  assert resolve_lowering("auto") == ("im2col" if jax.default_backend() == "cpu" else "lax")
  with pytest.raises(ValueError, match="lowering"):
    resolve_lowering("winograd")
  with pytest.raises(ValueError, match="conv"):
    get_model("small_cnn", 10, conv="winograd")


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 2)])
def test_max_pool_2x2_equals_reduce_window(shape):
  """Values equal nn.max_pool (odd trailing rows/columns dropped); gradients equal where the
  window maxima are unique (random inputs)."""
  x = jax.random.normal(jax.random.key(0), shape)
  np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
  ours = jax.grad(lambda v: jnp.sum(jnp.sin(max_pool_2x2(v))))(x)
  theirs = jax.grad(lambda v: jnp.sum(jnp.sin(nn.max_pool(v, (2, 2), strides=(2, 2)))))(x)
  np.testing.assert_allclose(ours, theirs, atol=1e-6)
