"""Mixed precision: bf16 products with f32 accumulation, as a model field and a recipe field."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3jax.defenses import D3Config, FTConfig, program
from d3jax.engine import train
from d3jax.models import get_model, with_precision
from d3jax.models.conv import Conv
from d3jax.models.precision import PRECISIONS, matmul


NORM = train.Normalization((0.5,), (0.25,))


def relative_error(a, b) -> float:
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))


def test_bf16_matmul_rounds_inputs_and_accumulates_in_f32():
  a = jnp.full((1, 4096), 1.0 + 2.0 ** -10)  # 1 + 2^-10 rounds to 1 in bf16 (7 mantissa bits)
  b = jnp.ones((4096, 1))
  chex.assert_trees_all_equal(matmul(a, b, "f32"), a @ b)
  out = matmul(a, b, "bf16")
  assert out.dtype == jnp.float32
  assert float(out[0, 0]) == 4096.0  # rounded inputs, exact f32 sum (a bf16 sum would stall at 256)


@pytest.mark.parametrize("lowering,jit", [("lax", True), ("im2col", True), ("winograd", True),
                                          ("im2col", False)])
def test_bf16_conv_is_close_to_f32_with_f32_outputs_and_gradients(lowering, jit):
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  layers = {p: Conv(32, (3, 3), padding=((1, 1), (1, 1)), lowering=lowering, precision=p)
            for p in PRECISIONS}
  params = layers["f32"].init(jax.random.key(1), x)

  def loss(p, x, precision):
    return jnp.sum(jnp.sin(layers[precision].apply(p, x)))

  grad = jax.grad(loss, argnums=(0, 1))
  if jit:
    grad = jax.jit(grad, static_argnums=2)
  out = {p: jax.jit(layers[p].apply)(params, x) for p in PRECISIONS}
  grads = {p: grad(params, x, p) for p in PRECISIONS}
  assert out["bf16"].dtype == jnp.float32
  chex.assert_trees_all_equal_dtypes(grads["bf16"], grads["f32"])
  assert relative_error(out["f32"], out["bf16"]) < 1e-2  # bf16 rounding: 2^-9 per input
  for g32, g16 in zip(jax.tree.leaves(grads["f32"]), jax.tree.leaves(grads["bf16"])):
    assert relative_error(g32, g16) < 3e-2
  assert relative_error(out["f32"], out["bf16"]) > 0  # the bf16 path does round


def product_input_dtypes(jaxpr) -> list[str]:
  """The operand dtypes of every matrix product and convolution in a jaxpr, nested ones included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      found += [str(var.aval.dtype) for var in eqn.invars]
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        found += product_input_dtypes(inner)
  return found


@pytest.mark.parametrize("name,options,shape", [
    ("small_cnn", {"width": 4}, (2, 8, 8, 1)),
    ("preact_resnet18", {"width": 4}, (2, 8, 8, 3)),
    ("vgg11", {"width": 2, "small_input": True, "hidden": 8}, (1, 32, 32, 3)),
    ("vit", {"patch_size": 4, "width": 16, "depth": 1, "heads": 2}, (2, 8, 8, 3)),
])
def test_bf16_reaches_every_product_of_every_model_and_f32_none(name, options, shape):
  model = get_model(name, 10, **options)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  bf16 = with_precision(model, "bf16")
  assert bf16.precision == "bf16" and get_model(name, 10, precision="bf16", **options) == bf16
  chex.assert_trees_all_equal_shapes_and_dtypes(jax.eval_shape(bf16.init, jax.random.key(0), x),
                                                variables)
  dtypes = {p: product_input_dtypes(jax.make_jaxpr(m.apply)(variables, x).jaxpr)
            for p, m in (("f32", model), ("bf16", bf16))}
  assert set(dtypes["f32"]) == {"float32"}
  # f32 by design: ViT's attention scores and weighted sum, VGG's adaptive pooling (two einsums).
  products = {"vit": 2 * 2, "vgg11": 2 * 2}.get(name, 0)
  assert dtypes["bf16"].count("float32") == products and len(dtypes["bf16"]) == len(dtypes["f32"])
  assert jax.eval_shape(bf16.apply, variables, x).dtype == jnp.float32


def test_bf16_model_is_close_to_f32(model, variables):
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  logits = {p: jax.jit(with_precision(model, p).apply)(variables, x) for p in PRECISIONS}
  assert logits["bf16"].dtype == jnp.float32
  assert 0 < relative_error(logits["f32"], logits["bf16"]) < 2e-2


def test_recipe_precision_sets_the_program_model(model):
  f32 = program("d3", model, NORM, D3Config())
  bf16 = program("d3", model, NORM, D3Config(precision="bf16"))
  assert f32.model is model and bf16.model.precision == "bf16"
  assert f32 != bf16  # a static field: its own compilation
  assert program("ft", model, NORM, FTConfig(precision="bf16")) == program(
      "ft", model, NORM, FTConfig(precision="bf16", learning_rate=0.5))


def test_bf16_d3_training_keeps_f32_state_and_the_head_norm(model, variables, tiny_set, rbg_key):
  images, labels = tiny_set
  prog = program("d3", model, NORM, D3Config(epochs=2, batch_size=16, precision="bf16"))
  state = train.init_state(prog, variables, len(labels), rbg_key)
  state, _ = train.fit(prog, state, images, labels, progress=False)
  for leaf in jax.tree.leaves((state.params, state.batch_stats, state.opt_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32, jnp.uint32), leaf.dtype
  head = state.params["linear"]["kernel"]
  assert np.isfinite(np.asarray(head)).all()
  np.testing.assert_allclose(jnp.linalg.norm(head),
                             jnp.linalg.norm(variables["params"]["linear"]["kernel"]), rtol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: D3Config(precision="fp16"),
    lambda: FTConfig(precision="bf16 "),
    lambda: get_model("small_cnn", 10, precision="half"),
])
def test_unknown_precision_is_one_clear_error(make):
  with pytest.raises(ValueError, match=r"precision must be one of \('f32', 'bf16'\)"):
    make()


def test_bf16_needs_a_model_with_a_precision_field():
  import flax.linen as nn

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(10, name="linear")(x.reshape(x.shape[0], -1))

  assert program("ft", Plain(), NORM, FTConfig()).model == Plain()
  with pytest.raises(ValueError, match="Plain has none"):
    program("ft", Plain(), NORM, FTConfig(precision="bf16"))


@pytest.mark.slow
def test_bf16_d3_on_the_demo_badnets_model_lands_within_seed_noise_of_f32(capsys):
  """The demo's BadNets model (mnist5k, small CNN width 16), the demo's D3 (paper preset, batch
  32), reserved sets and training seeds 0–1, f32 and bf16. The rule is the differential run's:
  the means agree when they differ by at most max(3 points, 2 × the larger seed sd). Measured
  with seeds 0–2 (AMD EPYC): ACC f32 95.0/94.5/92.6, bf16 95.2/94.5/92.8; ASR f32 0.7/0.6/3.6,
  bf16 0.6/0.6/3.4 — mean differences 0.13 (ACC) and 0.10 (ASR) points."""
  from d3jax.workflows import demo, pipeline

  backdoored = pipeline.attack(dataclasses.replace(demo.DEMO_RUN, attack="badnets"), progress=False)
  rows = {p: [pipeline.defense_row(backdoored, "d3", dataclasses.replace(demo.DEFENSES["d3"],
                                                                          precision=p),
                                   seed=seed, progress=False)[0] for seed in range(2)]
          for p in PRECISIONS}
  with capsys.disabled():
    for metric in ("acc", "asr"):
      values = {p: np.array([row[metric] for row in rows[p]]) for p in PRECISIONS}
      print(f"\n{metric}: " + "; ".join(f"{p} {np.round(100 * v, 1)}" for p, v in values.items()))
      gap = abs(values["f32"].mean() - values["bf16"].mean())
      noise = max(0.03, 2 * max(values[p].std(ddof=1) for p in PRECISIONS))
      assert gap <= noise, (metric, values)
  assert max(row["asr"] for row in rows["bf16"]) < 0.2  # D3 removes BadNets here in bf16 too
