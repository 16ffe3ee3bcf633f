"""The ViT family: torchvision's ViT-B/16 shape, the attention arithmetic, errors, and D3 on a ViT."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3jax import cli
from d3jax.rundirs import runs
from d3jax.models import get_model
from d3jax.models.vit import SelfAttention

TINY = {"patch_size": 4, "width": 16, "depth": 2, "heads": 4}


def test_vit_b16_has_torchvisions_parameter_count():
  model = get_model("vit_b16", 10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes)) == 85_806_346
  assert shapes["params"]["pos_embedding"].shape == (1, 197, 768)  # 14×14 patches + class token
  assert shapes["params"]["linear"]["kernel"].shape == (768, 10)


def test_attention_matches_a_per_head_numpy_reference():
  x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
  module = SelfAttention(heads=2)
  params = module.init(jax.random.key(1), x)["params"]
  qkv = x @ np.asarray(params["qkv"]["kernel"]) + np.asarray(params["qkv"]["bias"])
  q, k, v = np.split(qkv, 3, axis=-1)
  heads = []
  for h in range(2):
    cut = slice(4 * h, 4 * h + 4)
    logits = q[..., cut] @ k[..., cut].transpose(0, 2, 1) / 2.0
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    heads.append((weights / weights.sum(-1, keepdims=True)) @ v[..., cut])
  expected = np.concatenate(heads, -1) @ np.asarray(params["out"]["kernel"]) + np.asarray(
      params["out"]["bias"])
  np.testing.assert_allclose(module.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-5)


class ViTVariantsTest(chex.TestCase):
  """A tiny ViT's logits, with and without jit, equal; resize fixes the token count."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_logits(self):
    model = get_model("vit", 3, **TINY, resize=16)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 1)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    # A non-zero head (torchvision initialises it to zero), so the logits depend on the input.
    rng = np.random.default_rng(3)
    variables = jax.tree.map(lambda v: v + 0.1 * rng.normal(size=v.shape).astype(np.float32),
                             variables)
    logits = self.variant(lambda v, images: model.apply(v, images))(variables, x)
    chex.assert_shape(logits, (2, 3))
    np.testing.assert_allclose(logits, model.apply(variables, x), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(logits[0] - logits[1]).max()) > 1e-4
    assert variables["params"]["pos_embedding"].shape == (1, 17, 16)  # 16×16 → 4×4 patches + 1


def test_vit_option_errors():
  with pytest.raises(ValueError, match="width 18 must be a multiple of heads 4"):
    get_model("vit", 3, **{**TINY, "width": 18}).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="patch_size 3 must divide the image size 8×8"):
    get_model("vit", 3, **{**TINY, "patch_size": 3}).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="vit_b16: unknown option 'depth'"):
    get_model("vit_b16", 3, depth=2)
  with pytest.raises(ValueError, match="option heads must be a positive integer, got 0"):
    get_model("vit", 3, heads=0)


@pytest.mark.slow
def test_d3_defends_a_vit(tmp_path):
  attack = tmp_path / "vit"
  options = [part for key, value in TINY.items() for part in (key, str(value))]
  assert cli.main(["attack", "--dataset", "digits", "--model", "vit", "--model-options", *options,
                   "--epochs", "2", "--batch-size", "64", "--out", str(attack), "--quiet"]) == 0
  defended = tmp_path / "vit-d3"
  assert cli.main(["defend", "--attack-run", str(attack), "--out", str(defended), "d3",
                   "--epochs", "1", "--batch-size", "32", "--quiet"]) == 0
  before = runs.load(attack).backdoored.variables["params"]["linear"]["kernel"]
  after = runs.load(defended).backdoored.variables["params"]["linear"]["kernel"]
  assert float(jnp.linalg.norm(after - before)) > 0  # D3's default selection found the head
