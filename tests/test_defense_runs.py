"""Each baseline defense removes a BadNets backdoor from a small CNN on digits: one session-scoped
backdoored model (ASR ≥ 0.8), a reserved 10% of the clean training set, a few epochs per
defense; the ASR must drop while the clean accuracy holds. Also: NFT's defended variables are
the plain model's with only BN scales changed (masks folded in), and FP prunes then fine-tunes.

The FT-SAM, FP, NC, i-BAU, NFT and ANP bars are not calibrated on one CPU: a CPU's rounding changes
a run from its first step on, much as another seed does, so their settings and bars were checked
over three fixture seeds (0, 1, 2) × three defense keys (7, 8, 9) on an AMD EPYC (family 23,
model 1), and hold in all nine runs; the NFT and ANP bars, taken over five keys, hold for each
seed's keys 7–11 and again for keys 12–16. The measured ranges are in each test's comment. (The
FST, Super-FT, NAD and SAU tests were never CPU-marked and were not re-checked over seeds.)"""
import logging

import jax
import numpy as np
import pytest

from d3jax import defenses
from d3jax.defenses import nc
from d3jax.optim.masks import lower_bounds

pytestmark = pytest.mark.slow
SHORT = {"batch_size": 16, "crop_padding": 1}


def _defend(backdoor, name, seed=7, **settings):
  model, norm, backdoored, x, y, evaluate, before = backdoor
  config = defenses.get(name, **{**SHORT, **settings})
  defended, log = defenses.defend(name, model, backdoored, x, y, normalization=norm,
                                  key=jax.random.key(seed, impl="rbg"), config=config, progress=False)
  return defended, log, before, evaluate(defended)


@pytest.mark.parametrize("name, settings, max_asr, min_acc", [
    # FT-SAM over the nine runs: ASR 0.00–0.15, ACC 0.79–0.92.
    ("ft-sam", {"epochs": 5, "learning_rate": 0.02, "cosine_t_max": 50}, 0.3, 0.7),
    ("fst", {"epochs": 5, "learning_rate": 0.02}, 0.2, 0.4),
    ("super-ft", {"epochs": 4, "lr_max1": 0.6, "switch_epoch": 3}, 0.7, 0.7),
])
def test_defense_lowers_badnets_asr(backdoor, name, settings, max_asr, min_acc):
  _, log, before, after = _defend(backdoor, name, **settings)
  assert after.asr < max_asr and after.asr < 0.75 * before.asr, (before, after)
  assert after.acc >= min_acc, (before, after)
  assert len(log["losses"]) == settings["epochs"] and np.all(np.isfinite(log["losses"]))


def test_nft_only_masks_train_and_fold_into_bn_scales(backdoor):
  """NFT lowers the ASR; every parameter but the BN scales is bit-identical; each scale is
  γ₀⊙m with m in [μ(l), 1]; the variables load in the plain model.

  On this 48-channel CNN, masks alone remove the backdoor only in some runs: over three fixture
  seeds × ten keys the ASR after 8 epochs ranges 0.05–0.99 (ACC 0.58–0.93), and no setting tried
  (lr 0.1–1.0, 8–20 epochs, clamp α 0.1–0.3, also at width 16) did well in every run. So the bar
  is on the median over five keys (per seed 0.26–0.77 against before 0.93–0.96; an NFT that trains
  nothing leaves ≈ 0.95), and the structure is checked on the first key's run."""
  runs = [_defend(backdoor, "nft", seed, epochs=8, flip=False, learning_rate=0.3,
                  final_learning_rate=0.1, clamp_alpha=0.3) for seed in range(7, 12)]
  defended, log, before, after = runs[0]
  assert np.median([run[3].asr for run in runs]) < 0.9 * before.asr, [run[3] for run in runs]
  assert min(run[3].acc for run in runs) >= 0.5, [run[3] for run in runs]
  original = backdoor[2]["params"]
  bounds = np.asarray(lower_bounds(4, 0.3, 0.5))
  for index in range(1, 5):
    bn = f"bn{index}"
    np.testing.assert_array_equal(defended["params"][bn]["bias"], original[bn]["bias"])
    np.testing.assert_array_equal(defended["params"][f"conv{index}"]["kernel"], original[f"conv{index}"]["kernel"])
    mask = np.asarray(defended["params"][bn]["scale"]) / np.asarray(original[bn]["scale"])
    assert mask.min() >= bounds[index - 1] - 1e-5 and mask.max() <= 1 + 1e-5
  np.testing.assert_array_equal(defended["params"]["linear"]["kernel"], original["linear"]["kernel"])
  assert jax.tree.structure(defended) == jax.tree.structure(backdoor[2])


def test_fp_prunes_then_fine_tunes(backdoor):
  """FP lowers the ASR; it logs its held-out accuracies and depth; the pruned head rows are still
  zero after fine-tuning. Over the nine runs: ASR 0.01–0.38, ACC 0.82–0.93."""
  defended, log, before, after = _defend(backdoor, "fp", epochs=5, learning_rate=0.02, holdout=0.2,
                                         acc_ratio=0.5)
  assert after.asr < 0.75 * before.asr and after.acc >= 0.75, (before, after)
  assert log["pruned"] > 0 and log["features"] == 16 and log["holdout_acc"][0] > 0.8
  kernel = np.asarray(defended["params"]["linear"]["kernel"])
  assert (np.abs(kernel).sum(axis=1) == 0).sum() == log["pruned"]


def test_nc_flags_the_target_and_unlearns(backdoor):
  """NC flags the BadNets target (label 0), and unlearning lowers the ASR. With the published 80
  epochs of reverse engineering (20 left label 0's anomaly index at 1.6–1.9 in five of nine runs),
  the nine runs flag label 0 every time (index 2.1–9.4; once label 9 as well), ASR 0.00–0.16,
  ACC 0.88–0.96."""
  _, log, before, after = _defend(backdoor, "nc", nc_epochs=80, epochs=5, learning_rate=0.02)
  assert 0 in log["flagged"] and len(log["flagged"]) <= 2 and not log["unchanged"], log["anomaly_index"]
  assert after.asr < 0.3 and after.acc >= 0.8, (before, after)


def test_nc_returns_an_unflagged_model_unchanged(backdoor, monkeypatch, caplog):
  """When no mask norm is an outlier, the variables come back untouched, nothing is trained, and
  the log says so."""
  model, norm, variables, x, y, _, _ = backdoor
  norms = np.array([40.0, 42.0, 38.0, 41.0, 39.0, 40.5, 39.5, 40.0, 41.5, 38.5])
  masks = np.zeros((10,) + x.shape[1:3] + (1,), np.float32)
  monkeypatch.setattr(nc, "reverse_engineer", lambda *args: (masks, masks, norms))
  monkeypatch.setattr(nc, "train", lambda *args, **kwargs: pytest.fail("NC trained an unflagged model"))
  with caplog.at_level(logging.INFO, logger="d3jax"):
    defended, log = defenses.defend("nc", model, variables, x, y, normalization=norm,
                                    key=jax.random.key(0), config=defenses.get("nc", **SHORT),
                                    progress=False)
  assert log["unchanged"] and log["flagged"] == [] and log["losses"] == []
  assert defended is variables and "returned unchanged" in caplog.text


def test_ibau_unlearns_in_eval_mode(backdoor):
  """i-BAU lowers the ASR; BN running statistics are untouched (eval mode throughout). On 143
  reserved images its unlearning costs clean accuracy: at lr 3e-4 the nine runs give ASR
  0.02–0.13 and ACC 0.49–0.72 (lr 1e-3 took ACC down to 0.36)."""
  defended, log, before, after = _defend(backdoor, "i-bau", epochs=5, patch_fraction=0.5,
                                         learning_rate=3e-4)
  assert after.asr < 0.3 and after.asr < 0.5 * before.asr and after.acc >= 0.4, (before, after)
  jax.tree.map(np.testing.assert_array_equal, defended["batch_stats"], backdoor[2]["batch_stats"])
  assert len(log["losses"]) == 5


def test_anp_prunes_bn_channels_by_the_held_out_rule(backdoor):
  """ANP returns the original model with some BN scales zeroed (shifts and all other parameters
  untouched), chosen by its held-out rule, and it can remove the backdoor. On this 48-channel CNN
  the published noise ε = 0.4 wrecks every prediction (loss ≈ 4 throughout); ε = 0.2 and a mask
  rate of 0.2 (the reference's 2,000 steps are 160 here) make the masks separate in most runs,
  but not all: over three fixture seeds × ten keys the rule prunes 0–6 channels and the ASR ranges
  0.00–0.96 (one seed's keys 12–16 have a median of 0.82). So the behavioural bar is that one of
  five keys halves the ASR (the best per seed measured 0.00–0.09) and that the median ACC holds;
  the structure is checked on every run."""
  runs = [_defend(backdoor, "anp", seed, epochs=20, holdout=0.2, acc_ratio=0.2, eps=0.2,
                  learning_rate=0.2) for seed in range(7, 12)]
  before = runs[0][2]
  assert min(run[3].asr for run in runs) < 0.5 * before.asr, [run[3] for run in runs]
  assert np.median([run[3].acc for run in runs]) >= 0.6, [run[3] for run in runs]
  for defended, log, _, _ in runs:
    _check_anp_structure(backdoor, defended, log)


def _check_anp_structure(backdoor, defended, log):
  """Only BN scales changed, each kept or zeroed; the log counts the zeroed and its held-out rule."""
  original = backdoor[2]["params"]
  accuracies = np.asarray(log["holdout_acc"])
  assert len(accuracies) == 20 and np.all(np.isfinite(log["losses"]))
  chosen = 0 if log["threshold"] is None else int(round(log["threshold"] / 0.05)) + 1
  assert accuracies[0] - accuracies[chosen] < 0.3 * accuracies[0]
  zeroed = 0
  for index in range(1, 5):
    bn = f"bn{index}"
    np.testing.assert_array_equal(defended["params"][bn]["bias"], original[bn]["bias"])
    scale, before = np.asarray(defended["params"][bn]["scale"]), np.asarray(original[bn]["scale"])
    assert np.all((scale == before) | (scale == 0))
    zeroed += int(np.sum((scale == 0) & (before != 0)))
  assert zeroed == log["pruned"]
  np.testing.assert_array_equal(defended["params"]["linear"]["kernel"], original["linear"]["kernel"])


def test_nad_distils_the_fine_tuned_teacher(backdoor):
  """NAD (a 5-epoch fine-tuned teacher, 5 epochs of distillation on the small CNN's two stages)
  lowers the ASR while the clean accuracy holds."""
  _, log, before, after = _defend(backdoor, "nad", teacher_epochs=5, epochs=5, learning_rate=0.02)
  assert after.asr < 0.3 and after.asr < 0.5 * before.asr and after.acc >= 0.85, (before, after)
  assert log["layers"] == ["bn2", "bn4"] and len(log["teacher_losses"]) == 5
  assert len(log["losses"]) == 5 and np.all(np.isfinite(log["losses"]))


def test_sau_unlearns_shared_adversarial_examples(backdoor):
  """SAU lowers the ASR; BN running statistics are untouched (eval mode throughout). In this
  short budget the published ε = 0.2 leaves the ASR near 0.7 on 16×16 digits; ε = 0.3 is used."""
  defended, log, before, after = _defend(backdoor, "sau", epochs=10, learning_rate=3e-3, eps=0.3,
                                         pgd_lr=0.3, crop_padding=0)
  assert after.asr < 0.4 and after.asr < 0.5 * before.asr and after.acc >= 0.75, (before, after)
  jax.tree.map(np.testing.assert_array_equal, defended["batch_stats"], backdoor[2]["batch_stats"])
  assert len(log["losses"]) == 10 and np.all(np.isfinite(log["losses"]))
