"""The analyses on a tiny model: path curves end where the models are, probes read the right
layers, Grad-CAM and TAC have the right shapes, and the grid table and heat map follow the grid.
(Every analysis writing its PNG is tested through `d3jax analyze` in test_sweep_cli.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from d3jax import analysis
from d3jax.engine import train
from d3jax.analysis.data import Paired
from d3jax.analysis.grid import heatmap_figure
from d3jax.metrics import accuracy
from d3jax.workflows.sweep import aggregate

NORM = train.Normalization((0.5,), (0.5,))


@pytest.fixture(scope="module")
def defended(variables):
  """A 'defended' copy of the tiny model: every parameter and BN mean moved, the BN variances
  scaled by factors in [0.2, 2] (some shrink, so t = 2 extrapolates them below zero linearly)."""
  rng = np.random.default_rng(1)

  def move(path, leaf):
    leaf = np.asarray(leaf)
    if path[-1].key == "var":
      return leaf * rng.uniform(0.2, 2.0, leaf.shape).astype(np.float32)
    return leaf + 0.3 * rng.standard_normal(leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(move, variables)


@pytest.fixture(scope="module")
def pairs(tiny_set):
  """Clean images and a 'triggered' copy (a bright 2×2 corner), labelled with target 0."""
  x, y = tiny_set
  poisoned = x.copy()
  poisoned[:, -2:, -2:, :] = 255
  return Paired(x, poisoned, y, np.zeros_like(y))


def _metrics(model, variables, images, labels):
  logits = train.predict_logits(model, variables, images, NORM)
  ce = float(np.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)))
  return ce, accuracy(logits, labels)


@pytest.mark.slow
def test_path_curve_starts_at_the_initial_model_and_passes_the_defended_one(
    model, variables, defended, pairs):
  """t = 0 gives the backdoored model's losses, ACC and ASR; t = 1 the defended model's."""
  curves = analysis.path_curves(model, variables, defended, (pairs.clean, pairs.label),
                                (pairs.poisoned, pairs.target), NORM, ts=[0.0, 0.5, 1.0, 2.0])
  assert curves.acc.shape == (4,)
  for index, ends in ((0, variables), (2, defended)):
    clean_loss, acc = _metrics(model, ends, pairs.clean, pairs.label)
    backdoor_loss, asr = _metrics(model, ends, pairs.poisoned, pairs.target)
    np.testing.assert_allclose(curves.clean_loss[index], clean_loss, rtol=1e-4)
    np.testing.assert_allclose(curves.backdoor_loss[index], backdoor_loss, rtol=1e-4)
    assert curves.acc[index] == pytest.approx(acc)
    assert curves.asr[index] == pytest.approx(asr)
  assert curves.clean_loss[1] != pytest.approx(curves.clean_loss[0])


def test_interpolation_keeps_variances_positive_beyond_the_defended_model(variables, defended):
  """BN variances are interpolated geometrically: positive at t = 2 even where they shrank."""
  linear = jax.tree.map(lambda a, b: 2 * b - a, variables["batch_stats"], defended["batch_stats"])
  assert any(np.any(v < 0) for path, v in jax.tree_util.tree_leaves_with_path(linear)
             if path[-1].key == "var")
  far = analysis.interpolate(variables, defended, jnp.float32(2.0))
  for leaf in jax.tree.leaves(far["batch_stats"]):
    assert np.all(np.isfinite(leaf))
  variances = [v for path, v in jax.tree_util.tree_leaves_with_path(far["batch_stats"])
               if path[-1].key == "var"]
  assert variances and all(np.all(v > 0) for v in variances)


def test_probes_read_the_head_input_and_the_last_convolution(model, variables, pairs):
  """The penultimate features are the head's input (the head applied to them gives the logits)."""
  features = analysis.penultimate(model, variables, pairs.clean, NORM)
  assert features.shape == (len(pairs.clean), 8)  # width 4 → 2·width channels, pooled
  head = variables["params"]["linear"]
  logits = train.predict_logits(model, variables, pairs.clean, NORM)
  np.testing.assert_allclose(features @ head["kernel"] + head["bias"], logits, rtol=1e-4, atol=1e-5)
  assert analysis.conv_layers(model, variables, (8, 8, 1)) == ["conv1", "conv2", "conv3", "conv4"]
  assert analysis.last_conv(model, variables, (8, 8, 1)) == "conv4"


@pytest.mark.slow
def test_gradcam_maps_are_image_sized_and_in_unit_range(model, variables, pairs):
  cam, predicted = analysis.gradcam(model, variables, pairs.clean[:5], NORM, "conv4")
  assert cam.shape == (5, 8, 8) and predicted.shape == (5,)
  assert cam.min() >= 0 and cam.max() <= 1 + 1e-6
  np.testing.assert_array_equal(predicted, train.predict(model, variables, pairs.clean[:5], NORM))


def test_tac_and_neuron_norms_have_one_value_per_channel(model, variables, pairs):
  tac = analysis.trigger_activation_change(model, variables, pairs, NORM, "conv4")
  norms = analysis.neuron_norms(variables, "conv4")
  assert tac.shape == norms.shape == (8,)
  assert np.all(tac >= 0) and np.any(tac > 0)
  kernel = np.asarray(variables["params"]["conv4"]["kernel"])
  np.testing.assert_allclose(norms[3], np.linalg.norm(kernel[..., 3]), rtol=1e-6)


def test_weight_differences_cover_the_selection_and_reject_an_empty_one(variables, defended):
  diff = analysis.weight_differences(variables, defended, "linear/kernel")
  assert diff.shape == (8 * 10,)
  with pytest.raises(ValueError, match="matched no parameter"):
    analysis.weight_differences(variables, defended, "head/kernel")


def _grid_rows():
  log = {"grid": {"lmd": [1.0, 10.0, 20.0], "eps": [0.0, 0.5]}, "seeds": [0, 1] * 6}
  acc = np.linspace(0.5, 0.9, 12)
  return aggregate(log, {"acc": acc, "asr": 1 - acc, "ra": acc / 2, "der": acc})


def test_aggregate_gives_one_row_per_configuration_with_mean_and_std_over_seeds():
  rows = _grid_rows()
  assert [(r["lmd"], r["eps"]) for r in rows] == [(1, 0), (1, 0.5), (10, 0), (10, 0.5), (20, 0),
                                                  (20, 0.5)]
  acc = np.linspace(0.5, 0.9, 12)
  assert rows[1]["acc"] == pytest.approx(acc[2:4].mean())
  assert rows[1]["acc_std"] == pytest.approx(acc[2:4].std(ddof=1))
  assert all(r["seeds"] == 2 for r in rows)


def test_heatmap_axes_and_table_rows_follow_the_grid():
  rows = _grid_rows()
  fig = heatmap_figure(rows, ("lmd", "eps"), "grid")
  acc_ax = fig.axes[0]
  assert [t.get_text() for t in acc_ax.get_yticklabels()] == ["1", "10", "20"]
  assert [t.get_text() for t in acc_ax.get_xticklabels()] == ["0", "0.5"]
  image = acc_ax.images[0].get_array()
  np.testing.assert_allclose(image[1, 1], 100 * rows[3]["acc"])  # λ = 10, ε = 0.5
  table = analysis.format_grid_table(rows, ["lmd", "eps"]).splitlines()
  assert table[0].split()[:4] == ["λ", "ε", "ACC", "ASR"]
  assert len(table) == 1 + len(rows)
  assert table[4].split()[:2] == ["10", "0.5"]
  assert "±" in table[4]
  with pytest.raises(ValueError, match="two configurations in one cell"):
    heatmap_figure(rows, ("lmd",), "grid")


def test_a_third_swept_axis_gives_one_row_of_heat_maps_per_value():
  rows = [{"lmd": lmd, "eps": eps, "learning_rate": lr, "acc": lmd / 100 + eps, "asr": lr}
          for lr in (0.01, 0.1) for lmd in (1, 10) for eps in (0, 0.5)]
  fig = heatmap_figure(rows, ("lmd", "eps", "learning_rate"), "three axes")
  images = [ax for ax in fig.axes if ax.images]
  assert len(images) == 4  # 2 learning rates × (ACC, ASR)
  assert [ax.get_title() for ax in images] == ["learning_rate=0.01: ACC (%)", "learning_rate=0.01: ASR (%)",
                                               "learning_rate=0.1: ACC (%)", "learning_rate=0.1: ASR (%)"]
  np.testing.assert_allclose(images[2].images[0].get_array()[1, 1], 100 * (0.1 + 0.5))
  np.testing.assert_allclose(images[3].images[0].get_array(), np.full((2, 2), 10.0))
  with pytest.raises(ValueError, match="two configurations in one cell"):
    heatmap_figure(rows, ("lmd", "eps"), "grid")
