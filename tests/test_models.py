"""Tests of d3jax.models: BackdoorBench's PreAct-ResNet18 and VGG structure and parameter counts, modes, errors."""
from __future__ import annotations

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3jax import models
from d3jax.models import MODELS, PreActResNet18, SmallCNN, VGG, adaptive_avg_pool, get_model

CIFAR = (1, 32, 32, 3)


def key(seed: int) -> jax.Array:
  """An "rbg" key: XLA-CPU compiles its random ops ~8× faster than threefry's."""
  return jax.random.key(seed, impl="rbg")


def init(model, x):
  return jax.jit(model.init)(key(0), x)


@functools.cache
def _jitted_apply(model, options: tuple):
  return jax.jit(functools.partial(model.apply, **dict(options)))


def apply(model, variables, x, rngs=None, **options):
  """Jitted ``model.apply``, compiled once per model and static ``options`` (train, mutable)."""
  return _jitted_apply(model, tuple(sorted(options.items())))(variables, x, rngs=rngs)


def abstract_variables(model, shape=CIFAR):
  """Variable shapes without materialising anything (fine for 140M-parameter models)."""
  return jax.eval_shape(model.init, key(0), jnp.zeros(shape))


def num_params(model, shape=CIFAR) -> int:
  leaves = jax.tree.leaves(abstract_variables(model, shape)["params"])
  return sum(math.prod(leaf.shape) for leaf in leaves)


def images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


@pytest.mark.parametrize("name,num_classes,shape,expected", [
    ("preact_resnet18", 10, CIFAR, 11_171_146),
    ("preact_resnet18", 43, CIFAR, 11_188_075),
    ("preact_resnet18", 100, CIFAR, 11_217_316),
    ("vgg19_bn", 10, CIFAR, 139_622_218),
    ("vgg11", 10, CIFAR, 128_807_306),
    ("small_cnn", 10, (1, 28, 28, 1), 65_834),
])
def test_parameter_counts(name, num_classes, shape, expected):
  assert num_params(get_model(name, num_classes), shape) == expected


@pytest.mark.parametrize("name,features", [
    ("preact_resnet18", 512), ("vgg19_bn", 4096), ("vgg11", 4096), ("small_cnn", 64)])
def test_head_is_dense_named_linear(name, features):
  params = abstract_variables(get_model(name, 43))["params"]
  assert params["linear"]["kernel"].shape == (features, 43)
  assert params["linear"]["bias"].shape == (43,)


def test_registry_builds_the_exported_classes():
  assert MODELS == ("small_cnn", "preact_resnet18", "vgg11", "vgg19_bn", "vit", "vit_b16")
  assert isinstance(get_model("small_cnn", 10), SmallCNN)
  assert isinstance(get_model("preact_resnet18", 10), PreActResNet18)
  vgg11, vgg19 = get_model("vgg11", 10), get_model("vgg19_bn", 10)
  assert isinstance(vgg11, VGG) and (vgg11.depth, vgg11.batch_norm) == (11, False)
  assert isinstance(vgg19, VGG) and (vgg19.depth, vgg19.batch_norm) == (19, True)
  assert set(models.__all__) >= {"MODELS", "get_model", "SmallCNN", "PreActResNet18", "VGG"}


def test_preact_resnet18_structure():
  variables = abstract_variables(get_model("preact_resnet18", 10))
  params = variables["params"]
  blocks = [f"layer{stage}_{index}" for stage in range(1, 5) for index in range(2)]
  assert set(params) == {"conv1", "linear", *blocks}
  assert {block for block in blocks if "shortcut" in params[block]} == {
      "layer2_0", "layer3_0", "layer4_0"}
  for block in blocks:
    assert {"bn1", "conv1", "bn2", "conv2"} <= set(params[block])
  assert "bias" not in params["conv1"] and "bias" not in params["layer2_0"]["conv1"]
  assert params["layer4_0"]["shortcut"]["kernel"].shape == (1, 1, 256, 512)
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  kernels = [path for path in paths if path[-1].key == "kernel"]
  assert len(kernels) == 21
  bn_channels = sum(leaf.shape[0] for leaf in jax.tree.leaves(variables["batch_stats"])) // 2
  assert bn_channels == 3392


def test_width_scales_every_channel_count():
  params = abstract_variables(get_model("preact_resnet18", 10, width=16))["params"]
  assert params["conv1"]["kernel"].shape == (3, 3, 3, 16)
  assert params["layer4_1"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
  assert params["linear"]["kernel"].shape == (128, 10)


@pytest.fixture(scope="module")
def tiny_resnet():
  model = get_model("preact_resnet18", 10, width=8)
  x = images((2, 32, 32, 3))
  return model, init(model, x), x


def test_spatial_sizes_and_symmetric_stride2_padding(tiny_resnet):
  model, variables, x = tiny_resnet
  # A hand-set kernel that only reads the top-left tap: out[i, j] = a_padded[2i, 2j].
  kernel = np.zeros((3, 3, 8, 16), np.float32)
  kernel[0, 0, np.arange(8), np.arange(8)] = 1.0
  params = jax.tree.map(jnp.asarray, variables["params"])  # a fresh nested dict to edit
  params["layer2_0"]["conv1"]["kernel"] = jnp.asarray(kernel)
  _, state = apply(model, {**variables, "params": params}, x, capture_intermediates=True,
                   mutable=("intermediates",))
  inter = state["intermediates"]
  sizes = [inter[f"layer{stage}_1"]["__call__"][0].shape[1:3] for stage in range(1, 5)]
  assert sizes == [(32, 32), (16, 16), (8, 8), (4, 4)]
  a = np.asarray(jax.nn.relu(inter["layer2_0"]["bn1"]["__call__"][0]))
  out = np.asarray(inter["layer2_0"]["conv1"]["__call__"][0])
  padded = np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))
  np.testing.assert_array_equal(out[..., :8], padded[:, 0:32:2, 0:32:2, :])
  np.testing.assert_array_equal(out[..., 8:], 0.0)
  same = jax.lax.conv_general_dilated(a, kernel, (2, 2), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert not np.allclose(out, same)  # "SAME" pads (0, 1) for stride 2 on even sizes.


def test_stride2_conv_matches_lax_reference(tiny_resnet):
  model, variables, x = tiny_resnet
  _, state = apply(model, variables, x, capture_intermediates=True, mutable=("intermediates",))
  inter = state["intermediates"]["layer3_0"]
  a = jax.nn.relu(inter["bn1"]["__call__"][0])
  kernel = variables["params"]["layer3_0"]["conv1"]["kernel"]
  expected = jax.lax.conv_general_dilated(
      a, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(inter["conv1"]["__call__"][0], expected, rtol=1e-5, atol=1e-5)
  shortcut = variables["params"]["layer3_0"]["shortcut"]["kernel"][0, 0]  # 1×1, stride 2
  np.testing.assert_allclose(inter["shortcut"]["__call__"][0],
                             np.einsum("nhwi,io->nhwo", a[:, ::2, ::2], shortcut),
                             rtol=1e-5, atol=1e-5)


def test_pytorch_like_init_bounds(tiny_resnet):
  _, variables, _ = tiny_resnet
  params = variables["params"]
  linear_bound = 1 / math.sqrt(64)
  assert np.abs(params["linear"]["bias"]).max() <= linear_bound
  assert np.abs(params["linear"]["kernel"]).max() <= linear_bound
  assert np.abs(params["linear"]["bias"]).max() > 0
  assert np.abs(params["conv1"]["kernel"]).max() <= 1 / math.sqrt(27)


@pytest.mark.parametrize("name,options", [("small_cnn", {"width": 4}),
                                          ("preact_resnet18", {"width": 8})])
def test_batch_stats_change_in_train_mode_only(name, options):
  model = get_model(name, 10, **options)
  x = images((4, 16, 16, 3))
  variables = init(model, x)
  logits_eval, unchanged = apply(model, variables, x, train=False, mutable=("batch_stats",))
  same = jax.tree.map(np.array_equal, unchanged["batch_stats"], variables["batch_stats"])
  assert all(jax.tree.leaves(same))
  logits_train, updated = apply(model, variables, x, train=True, mutable=("batch_stats",))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), updated["batch_stats"],
                         variables["batch_stats"])
  assert all(jax.tree.leaves(changed))
  assert logits_train.shape == logits_eval.shape == (4, 10)
  assert not np.allclose(logits_train, logits_eval)
  np.testing.assert_array_equal(apply(model, variables, x), logits_eval)


def test_batchnorm_uses_pytorch_momentum():
  model = get_model("small_cnn", 10, width=4)
  x = images((8, 16, 16, 1))
  variables = init(model, x)
  _, state = apply(model, variables, x, train=True, mutable=("batch_stats", "intermediates"),
                   capture_intermediates=True)
  conv1 = state["intermediates"]["conv1"]["__call__"][0]
  bn1 = state["batch_stats"]["bn1"]
  np.testing.assert_allclose(bn1["mean"], 0.1 * conv1.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bn1["var"], 0.9 + 0.1 * conv1.var(axis=(0, 1, 2)), rtol=1e-5)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [16, 28, 32])
def test_small_cnn_input_shapes(channels, size):
  model = get_model("small_cnn", 10, width=8)
  x = images((2, size, size, channels))
  logits, _ = jax.jit(model.init_with_output)(key(0), x)  # init runs a forward pass
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.isfinite(logits).all()


@pytest.mark.parametrize("name", ["vgg11", "vgg19_bn"])
def test_vgg_dropout_needs_rng_in_train_mode_only(name):
  model = get_model(name, 10, width=2, small_input=True, hidden=16)
  x = images((2, 32, 32, 3))
  variables = init(model, x)
  mutable = ("batch_stats",) if "batch_stats" in variables else False
  np.testing.assert_array_equal(apply(model, variables, x), apply(model, variables, x))

  def train(rngs):
    out = apply(model, variables, x, rngs, train=True, mutable=mutable)
    return out[0] if mutable else out

  assert not np.allclose(train({"dropout": key(1)}), train({"dropout": key(2)}))
  with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
    train(None)


def test_vgg_classifier_layout():
  params = abstract_variables(get_model("vgg19_bn", 10))["params"]
  assert params["fc1"]["kernel"].shape == (7 * 7 * 512, 4096)
  assert params["fc2"]["kernel"].shape == (4096, 4096)
  assert sum(name.startswith("conv") for name in params) == 16
  assert sum(name.startswith("bn") for name in params) == 16
  params = abstract_variables(get_model("vgg11", 10, small_input=True))["params"]
  assert params["fc1"]["kernel"].shape == (512, 512)
  assert sum(name.startswith("conv") for name in params) == 8
  assert not any(name.startswith("bn") for name in params)


def reference_adaptive_pool(x: np.ndarray, out: int) -> np.ndarray:
  """Loops over PyTorch's bins [floor(i·H/out), ceil((i+1)·H/out))."""
  n, h, w, c = x.shape
  result = np.zeros((n, out, out, c), np.float64)
  for i in range(out):
    for j in range(out):
      rows = slice(math.floor(i * h / out), math.ceil((i + 1) * h / out))
      cols = slice(math.floor(j * w / out), math.ceil((j + 1) * w / out))
      result[:, i, j] = x[:, rows, cols].mean(axis=(1, 2))
  return result


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (10, 13), (14, 14), (7, 7)])
def test_adaptive_avg_pool_matches_pytorch_bins(h, w):
  x = np.asarray(images((2, h, w, 3)))
  out = adaptive_avg_pool(jnp.asarray(x), (7, 7))
  assert out.shape == (2, 7, 7, 3)
  np.testing.assert_allclose(out, reference_adaptive_pool(x, 7), rtol=1e-5, atol=1e-6)
  if (h, w) == (1, 1):
    np.testing.assert_array_equal(out, np.broadcast_to(x, out.shape))


def test_unknown_model_name():
  with pytest.raises(ValueError, match=r"resnet50.*small_cnn, preact_resnet18, vgg11, vgg19_bn"):
    get_model("resnet50", 10)


@pytest.mark.parametrize("name,num_classes,options,message", [
    ("small_cnn", 1, {}, "num_classes"),
    ("small_cnn", True, {}, "num_classes"),
    ("preact_resnet18", 10.0, {}, "num_classes"),
    ("preact_resnet18", 10, {"width": 0}, "width"),
    ("small_cnn", 10, {"width": 2.5}, "width"),
    ("small_cnn", 10, {"width": True}, "width"),
    ("preact_resnet18", 10, {"depth": 34}, "unknown option 'depth'.*width"),
    ("vgg11", 10, {"batch_norm": True}, "unknown option 'batch_norm'"),
    ("vgg19_bn", 10, {"small_input": "yes"}, "small_input"),
    ("vgg19_bn", 10, {"hidden": 0}, "hidden"),
])
def test_bad_options(name, num_classes, options, message):
  with pytest.raises(ValueError, match=message):
    get_model(name, num_classes, **options)


@pytest.mark.parametrize("name,shape,dtype,message", [
    ("small_cnn", (28, 28, 1), jnp.float32, r"\(N, H, W, C\)"),
    ("small_cnn", (1, 28, 28, 1), jnp.uint8, "float"),
    ("vgg11", (1, 16, 16, 3), jnp.float32, "32×32"),
])
def test_bad_inputs(name, shape, dtype, message):
  model = get_model(name, 10)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(model.init, key(0), jnp.zeros(shape, dtype))
