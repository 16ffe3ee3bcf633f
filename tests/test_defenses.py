"""Tests of d3jax.defenses: the registry, D3 warm-ups and presets, the projection during a run,
vmapped defense runs, ``defend``'s checks and threat model, and an end-to-end smoke test."""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3jax import defenses, metrics
from d3jax.engine import train
from d3jax.defenses import D3Config, FTConfig, defend
from d3jax.defenses.d3 import warm_start
from d3jax.optim import tensor_norm

NORM = train.Normalization((0.5,), (0.5,))
HEAD = "linear/kernel"


def _head(variables):
  return np.asarray(variables["params"]["linear"]["kernel"])


def _others_unchanged(before, after, skip=("linear",)):
  """Every params leaf outside the modules in ``skip`` is bit-identical."""
  for name in before:
    if name not in skip:
      jax.tree.map(np.testing.assert_array_equal, before[name], after[name])


# Warm-ups (the official code's warm_up_method).


@pytest.mark.parametrize("norm", ["fro", "l1", "nuclear"])
def test_warm_up_random_keeps_norm_and_changes_direction(variables, rbg_key, norm):
  """random: a new direction at the original norm; nothing else changes."""
  params = variables["params"]
  out = warm_start(params, HEAD, "random", norm, rbg_key)
  w0, w = _head(variables), np.asarray(out["linear"]["kernel"])
  assert w.shape == w0.shape
  assert float(tensor_norm(w, norm)) == pytest.approx(float(tensor_norm(w0, norm)), rel=1e-5)
  cosine = np.sum(w * w0) / (np.linalg.norm(w) * np.linalg.norm(w0))
  assert abs(cosine) < 0.9
  _others_unchanged(params, out)
  np.testing.assert_array_equal(out["linear"]["bias"], params["linear"]["bias"])
  again = warm_start(params, HEAD, "random", norm, jax.random.fold_in(rbg_key, 1))
  assert not np.allclose(again["linear"]["kernel"], w)


@pytest.mark.parametrize("method, expected", [
    ("near", lambda w0: w0), ("middle", np.zeros_like), ("far", lambda w0: -w0)])
def test_warm_up_deterministic_methods(variables, rbg_key, method, expected):
  """near = W0, middle = 0, far = −W0 on the selected tensor; the rest untouched."""
  params = variables["params"]
  out = warm_start(params, HEAD, method, "fro", rbg_key)
  np.testing.assert_array_equal(np.asarray(out["linear"]["kernel"]), expected(_head(variables)))
  _others_unchanged(params, out)
  np.testing.assert_array_equal(out["linear"]["bias"], params["linear"]["bias"])


def test_warm_up_noise_is_gaussian_times_std(variables, rbg_key):
  """noise: W0 + N(0, 1)·std(W0) per selected tensor (here every conv kernel and the head)."""
  params = variables["params"]
  select = r"conv\d/kernel|linear/kernel"
  out = warm_start(params, select, "noise", "fro", rbg_key)
  for name in ("conv1", "conv2", "conv3", "conv4", "linear"):
    w0 = np.asarray(params[name]["kernel"], np.float64)
    z = (np.asarray(out[name]["kernel"], np.float64) - w0) / np.std(w0, ddof=1)
    assert abs(z.mean()) < 4 / np.sqrt(z.size) + 0.05
    assert 0.7 < z.std() < 1.3
  for name in ("bn1", "bn2", "bn3", "bn4"):
    jax.tree.map(np.testing.assert_array_equal, params[name], out[name])
  np.testing.assert_array_equal(out["linear"]["bias"], params["linear"]["bias"])
  # Same key, head scaled ×3 and shifted: the noise scales with std and ignores the shift.
  scaled = jax.tree.map(lambda a: a, params)
  scaled["linear"] = {**params["linear"], "kernel": 3.0 * params["linear"]["kernel"] + 1.0}
  out_scaled = warm_start(scaled, select, "noise", "fro", rbg_key)
  np.testing.assert_allclose(
      np.asarray(out_scaled["linear"]["kernel"] - scaled["linear"]["kernel"]),
      3.0 * np.asarray(out["linear"]["kernel"] - params["linear"]["kernel"]), rtol=1e-4, atol=1e-6)


def test_warm_up_unknown_method_in_config_raises():
  """D3Config rejects an unknown warm_up (and an unknown norm) with ValueError."""
  with pytest.raises(ValueError, match="warm_up"):
    D3Config(warm_up="sideways")
  with pytest.raises(ValueError, match="norm"):
    D3Config(norm="l3")


def test_warm_start_unknown_method_raises(variables, rbg_key):
  """warm_start itself rejects an unknown method instead of silently adding noise."""
  with pytest.raises(ValueError):
    warm_start(variables["params"], HEAD, "sideways", "fro", rbg_key)


def test_d3_presets():
  """paper: λ = 10; official: λ = 0.5; overrides apply; unknown preset raises."""
  assert D3Config.preset("paper").lmd == 10
  assert D3Config.preset("official").lmd == 0.5
  official = D3Config.preset("official", epochs=3, eps=0.2)
  assert (official.lmd, official.epochs, official.eps) == (0.5, 3, 0.2)
  assert D3Config.preset("paper", lmd=2.0).lmd == 2.0
  with pytest.raises(ValueError, match="preset"):
    D3Config.preset("fastest")


# Whole runs (pure, jitted).


def _tiny_d3(**overrides):
  return D3Config(**{"epochs": 2, "batch_size": 16, "crop_padding": 0, **overrides})


def defense_run(name, model, normalization, config=None):
  """A whole defense as a pure function of (variables, images, labels, hparams, key), built from
  the registry's program, and the config's default hyperparameters."""
  program = defenses.program(name, model, normalization, config)

  def run(variables, x, y, hparams, key):
    state, metrics = program.run(program.init(variables, x.shape[0], key, hparams), x, y)
    return state.variables, metrics["loss"]

  return run, program.recipe.hyperparams()


@pytest.fixture(scope="module")
def d3_and_ft_runs(model, variables, tiny_set, rbg_key):
  """Variables after a tiny D3 run and a tiny FT run from the same start and key."""
  x, y = map(jnp.asarray, tiny_set)
  out = {}
  configs = [("d3", _tiny_d3()), ("ft", FTConfig(epochs=2, batch_size=16, crop_padding=0))]
  for name, config in configs:
    run, hparams = defense_run(name, model, NORM, config)
    out[name] = jax.jit(run)(variables, x, y, hparams, rbg_key)
  return out


def test_d3_run_keeps_head_norm_and_moves_farther_than_ft(variables, d3_and_ft_runs):
  """After D3 the head is on its original sphere (projection every step) and farther from W0
  than after FT; every other parameter trains too."""
  w0 = _head(variables)
  d3_vars, d3_losses = d3_and_ft_runs["d3"]
  ft_vars, _ = d3_and_ft_runs["ft"]
  assert d3_losses.shape == (2,) and np.all(np.isfinite(d3_losses))
  w_d3, w_ft = _head(d3_vars), _head(ft_vars)
  assert np.linalg.norm(w_d3) == pytest.approx(np.linalg.norm(w0), rel=1e-5)
  assert np.linalg.norm(w_d3 - w0) > 2 * np.linalg.norm(w_ft - w0)
  for name, leaf in [("conv1", "kernel"), ("bn1", "scale"), ("linear", "bias")]:
    assert not np.allclose(d3_vars["params"][name][leaf], variables["params"][name][leaf])


def test_d3_near_warm_up_has_no_nan(model, variables, tiny_set, rbg_key):
  """near starts at zero distance: the safe norm gives a zero gradient, not NaN."""
  x, y = map(jnp.asarray, tiny_set)
  run, hparams = defense_run("d3", model, NORM, _tiny_d3(epochs=1, warm_up="near"))
  out, losses = jax.jit(run)(variables, x, y, hparams, rbg_key)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(out))
  assert np.all(np.isfinite(losses))
  assert np.linalg.norm(_head(out)) == pytest.approx(np.linalg.norm(_head(variables)), rel=1e-5)


def _vmapped_matches_single(run, variables, x, y, hparams, key, count):
  batched, batched_losses = jax.jit(jax.vmap(run, in_axes=(None, None, None, 0, None)))(
      variables, x, y, hparams, key)
  single = jax.jit(run)
  for i in range(count):
    one, one_losses = single(variables, x, y, jax.tree.map(lambda a: a[i], hparams), key)
    np.testing.assert_allclose(np.asarray(batched_losses[i]), np.asarray(one_losses), rtol=1e-4)
    jax.tree.map(lambda b, s: np.testing.assert_allclose(np.asarray(b[i]), np.asarray(s),
                                                         rtol=1e-4, atol=1e-5), batched, one)
  return batched


@pytest.mark.slow
def test_vmap_d3_over_lmd_eps_learning_rate(model, variables, tiny_set, rbg_key):
  """One vmapped D3 run over 4 (λ, ε, lr) configurations equals each run alone."""
  x, y = map(jnp.asarray, tiny_set)
  run, defaults = defense_run("d3", model, NORM, _tiny_d3())
  assert set(defaults) == {"lmd", "eps", "learning_rate", "momentum"}
  hparams = {"lmd": jnp.array([0.5, 2.0, 10.0, 0.5]), "eps": jnp.array([0.1, 0.1, 0.0, 0.5]),
             "learning_rate": jnp.array([0.01, 0.05, 0.1, 0.02]),
             "momentum": jnp.array([0.9, 0.9, 0.5, 0.0])}
  batched = _vmapped_matches_single(run, variables, x, y, hparams, rbg_key, 4)
  heads = np.asarray(batched["params"]["linear"]["kernel"])
  assert not np.allclose(heads[0], heads[1])
  np.testing.assert_allclose(np.linalg.norm(heads.reshape(4, -1), axis=1),
                             np.linalg.norm(_head(variables)), rtol=1e-5)


def test_vmap_ft_over_learning_rate(model, variables, tiny_set, rbg_key):
  """One vmapped FT run over 4 learning rates equals each run alone."""
  x, y = map(jnp.asarray, tiny_set)
  run, defaults = defense_run("ft", model, NORM, FTConfig(epochs=2, batch_size=16, crop_padding=0))
  assert set(defaults) == {"learning_rate", "weight_decay"}
  hparams = {"learning_rate": jnp.array([0.001, 0.01, 0.05, 0.1]),
             "weight_decay": jnp.full(4, defaults["weight_decay"])}
  _vmapped_matches_single(run, variables, x, y, hparams, rbg_key, 4)


# The registry.


def test_registry_lists_and_builds_configs():
  """names() lists FT and D3; get() builds the config with overrides and rejects unknown fields
  and invalid values with a ValueError naming them."""
  assert {"ft", "d3"} <= set(defenses.names())
  assert defenses.get("d3") == D3Config()
  assert defenses.get("d3", lmd=2.0, epochs=3) == D3Config(lmd=2.0, epochs=3)
  assert isinstance(defenses.get("ft"), FTConfig)
  with pytest.raises(ValueError, match="lambda.*settings are.*lmd"):
    defenses.get("d3", **{"lambda": 2.0})


@pytest.mark.parametrize("field, value, match", [
    ("lmd", -1.0, "lmd"), ("eps", -0.1, "eps"), ("learning_rate", -0.01, "learning_rate"),
    ("momentum", 5.0, "momentum"), ("epochs", 0, "epochs"), ("batch_size", 0, "batch_size"),
    ("select", "", "select"), ("crop_padding", -1, "crop_padding"), ("epochs", 2.5, "epochs"),
])
def test_configs_reject_invalid_fields(field, value, match):
  """Each config checks its own fields when constructed: one ValueError naming the field."""
  with pytest.raises(ValueError, match=match):
    defenses.get("d3", **{field: value})
  if field in ("learning_rate", "momentum", "epochs", "batch_size", "crop_padding"):
    with pytest.raises(ValueError, match=match):
      defenses.get("ft", **{field: value})


# defend: names, configs, reserved set, threat model.


def test_defend_unknown_name_lists_defenses(model, variables, tiny_set, rbg_key):
  """An unknown defense name raises ValueError naming the available ones."""
  x, y = tiny_set
  with pytest.raises(ValueError, match="available") as info:
    defend("nope", model, variables, x, y, normalization=NORM, key=rbg_key)
  assert "d3" in str(info.value) and "ft" in str(info.value) and "nope" in str(info.value)
  with pytest.raises(ValueError, match="nope"):
    defenses.program("nope", model, NORM)
  with pytest.raises(ValueError, match="nope"):
    defenses.get("nope")


def test_defend_wrong_config_type(model, variables, tiny_set, rbg_key):
  """A config of another defense raises TypeError (defend and defense_run)."""
  x, y = tiny_set
  with pytest.raises(TypeError, match="D3Config"):
    defend("d3", model, variables, x, y, normalization=NORM, key=rbg_key, config=FTConfig())
  with pytest.raises(TypeError, match="FTConfig"):
    defenses.program("ft", model, NORM, D3Config())


@pytest.mark.parametrize("bad", [
    lambda x, y: (x.astype(np.float32), y),
    lambda x, y: (x[..., 0], y),
    lambda x, y: (x[None], y),
    lambda x, y: (x, y[:-1]),
    lambda x, y: (x, y[:, None]),
], ids=["float-images", "3d-images", "5d-images", "short-labels", "2d-labels"])
def test_defend_rejects_bad_reserved_set(model, variables, tiny_set, rbg_key, bad):
  """Wrong dtype or shape of the reserved images/labels raises ValueError before training."""
  x, y = bad(*tiny_set)
  with pytest.raises(ValueError, match="reserved set"):
    defend("ft", model, variables, x, y, normalization=NORM, key=rbg_key, config=FTConfig(epochs=1))


@pytest.mark.parametrize("label", [-1, 10])
def test_defend_rejects_out_of_range_labels(model, variables, tiny_set, rbg_key, label):
  """Reserved labels outside [0, num_classes) raise ValueError (DESIGN: label ranges)."""
  x, y = tiny_set
  labels = y.copy()
  labels[3] = label
  with pytest.raises(ValueError):
    defend("ft", model, variables, x, labels, normalization=NORM, key=rbg_key,
           config=FTConfig(epochs=1, batch_size=40, crop_padding=0), progress=False)


def test_defend_rejects_empty_reserved_set(model, variables, tiny_set, rbg_key):
  """An empty reserved set raises a ValueError that says it is empty."""
  x, y = tiny_set
  with pytest.raises(ValueError, match="empty|no sample"):
    defend("ft", model, variables, x[:0], y[:0], normalization=NORM, key=rbg_key,
           config=FTConfig(epochs=1, batch_size=8, crop_padding=0), progress=False)


def test_defend_threat_model_signature():
  """defend takes the model and the reserved set only: no test data, trigger or target."""
  params = inspect.signature(defend).parameters
  assert list(params) == ["name", "model", "variables", "images", "labels", "normalization",
                          "key", "config", "progress", "callback", "restore"]
  forbidden = ("test", "trigger", "target", "poison", "backdoor", "bd", "attack")
  assert not [p for p in params if any(word in p.lower() for word in forbidden)]


def test_defend_log(model, variables, tiny_set, rbg_key):
  """defend returns defended variables of the same structure and a log of losses, time, config."""
  x, y = tiny_set
  config = FTConfig(epochs=2, batch_size=16, crop_padding=0)
  out, log = defend("ft", model, variables, x, y, normalization=NORM, key=rbg_key, config=config,
                    progress=False)
  assert jax.tree.structure(out) == jax.tree.structure(variables)
  assert log["defense"] == "ft" and log["config"] is config
  assert len(log["losses"]) == 2 and all(np.isfinite(log["losses"]))
  assert log["wall_time_s"] > 0


# End to end.


@pytest.mark.slow
def test_badnets_then_d3_on_digits(backdoor, rbg_key):
  """A BadNets small CNN on digits (ASR ≥ 0.8) loses its backdoor to D3 on a reserved 10% clean
  set (ASR < 0.3 and < half) while ACC stays ≥ 0.6; D3 sees only the reserved set."""
  model, norm, backdoored, x_reserved, y_reserved, evaluate, before = backdoor
  defend_key = jax.random.fold_in(rbg_key, 3)
  config = D3Config(epochs=5, batch_size=16, learning_rate=0.02, crop_padding=1)
  defended, log = defend("d3", model, backdoored, x_reserved, y_reserved, normalization=norm,
                         key=defend_key, config=config, progress=False)
  after = evaluate(defended)
  assert len(log["losses"]) == 5
  assert after.asr < 0.3 and after.asr < 0.5 * before.asr, (before, after)
  assert after.acc >= 0.6, (before, after)
  assert metrics.der(before.acc, before.asr, after.acc, after.asr) > 0.75
