"""The attack registry: names, published defaults, documented sources, clear errors."""
import dataclasses

import numpy as np
import pytest

from d3jax import attacks
from d3jax.attacks import LABEL_MODES

PUBLISHED = {
    "badnets": {"size": 0, "value": 255},
    "blended": {"alpha": 0.2, "key_image": "", "seed": 0},
    "sig": {"delta": 40.0, "frequency": 6.0},
    "lf": {"num_images": 100, "overshoot": 0.02, "max_iter": 200, "max_passes": 50,
           "fooling_rate": 0.2, "magnitude": 0.2, "filter_taps": 30, "filter_sigma": 6.0},
    "trojannn": {"layer": "linear", "num_neurons": 2, "target_value": 100.0, "steps": 1000,
                 "step_size": 0.1, "epsilon": 0.3, "tolerance": 1e-3, "wrap": False},
    "ssba": {"bits": 100},
    "wanet": {"k": 4, "strength": 0.5, "grid_rescale": 1.0, "cross_ratio": 2.0},
    "input_aware": {"width": 32, "depth": 3, "mask_epochs": 25, "cross_ratio": 0.1,
                    "lambda_div": 1.0, "lambda_norm": 100.0, "mask_density": 0.032,
                    "generator_lr": 0.01, "mask_lr": 0.01, "generator_milestones": "200,300,400,500",
                    "mask_milestones": "10,20", "gamma": 0.1, "conv": "auto"},
}


def test_names_and_published_defaults():
  assert set(PUBLISHED) <= set(attacks.names())
  for name, defaults in PUBLISHED.items():
    config = attacks.get(name)
    assert config.name == name
    for field, value in defaults.items():
      assert getattr(config, field) == value, (name, field)


@pytest.mark.parametrize("name", attacks.names())
def test_every_config_is_frozen_documented_and_plain(name):
  config = attacks.get(name)
  assert dataclasses.is_dataclass(config) and hash(config) == hash(attacks.get(name))
  with pytest.raises(dataclasses.FrozenInstanceError):
    setattr(config, dataclasses.fields(config)[0].name, None)
  for field in dataclasses.fields(config):  # plain types, so every field can be a flag
    assert field.type in ("int", "float", "bool", "str"), (name, field.name, field.type)
  doc = type(config).__doc__
  assert any(str(year) in doc for year in range(2017, 2022)), "the docstring names the paper"
  assert config.label_modes and set(config.label_modes) <= set(LABEL_MODES)
  assert config.kind in ("poison", "training")


def test_label_modes_per_attack():
  assert attacks.get("sig").label_modes == ("clean_label",)
  assert attacks.get("wanet").label_modes == ("all2one", "all2all")
  assert attacks.get("badnets").label_modes[0] == "all2one"
  assert attacks.get("wanet").kind == "training" and attacks.get("lf").kind == "poison"


def test_registry_errors_name_the_input():
  with pytest.raises(ValueError, match="unknown attack 'refool'; available attacks: badnets"):
    attacks.get("refool")
  with pytest.raises(ValueError, match="attack 'sig' has no option 'alpha'; its options are delta, frequency"):
    attacks.get("sig", alpha=0.1)
  with pytest.raises(ValueError, match="WaNet k must be ≥ 2"):
    attacks.get("wanet", k=1)
  with pytest.raises(ValueError, match="LF fooling_rate must lie in"):
    attacks.get("lf", fooling_rate=0.0)
  with pytest.raises(ValueError, match="TrojanNN num_neurons"):
    attacks.get("trojannn", num_neurons=0)
  with pytest.raises(ValueError, match="BadNets size must be ≥ 0"):
    attacks.get("badnets", size=-1).trigger((32, 32, 3))


def test_get_trigger_builds_static_triggers():
  x = np.zeros((1, 16, 16, 3), np.uint8)
  assert attacks.get_trigger("SIG", (16, 16, 3), delta=10).delta == 10.0
  assert attacks.get_trigger("badnets", (16, 16, 3)).size == 2
  assert attacks.get_trigger("badnets", (16, 16, 3), size=4).size == 4
  assert np.asarray(attacks.get("wanet").trigger((16, 16, 3))(x)).shape == x.shape
  with pytest.raises(ValueError, match="'wanet' controls its own training.*attacks: badnets, blended, sig, lf"):
    attacks.get_trigger("wanet", (16, 16, 3))
