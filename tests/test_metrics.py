"""Tests of d3jax.metrics: ACC/ASR/RA from predictions, DER (D3 paper Eq. (5)) and RIR."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3jax import metrics

# Table 1 of the D3 paper (CIFAR-10, PreAct-ResNet18, 10% poisoning), in percent:
# (attack, defense, ACC/ASR without defense, ACC/ASR after the defense, reported DER).
# Every per-attack cell of the table reproduces to within the paper's 2-decimal rounding (which
# rounds exact halves either way, e.g. 96.095 -> 96.1 but 80.365 -> 80.36). The "Average" row's
# DER is the mean of the per-attack DERs, not the DER of the average ACC/ASR, so it is not a cell
# of Eq. (5) and is left out.
TABLE_1 = [
    ("BadNets", "FT", 91.32, 95.03, 89.96, 1.48, 96.10),
    ("BadNets", "D3", 91.32, 95.03, 90.77, 0.74, 96.87),
    ("Blended", "NC", 93.47, 99.92, 93.47, 99.92, 50.00),
    ("Blended", "i-BAU", 93.47, 99.92, 87.00, 50.53, 71.46),
    ("WaNet", "FT", 91.25, 89.73, 93.48, 17.10, 86.32),
    ("WaNet", "FT-SAM", 91.25, 89.73, 93.66, 1.31, 94.21),
    ("LF", "ANP", 93.19, 99.28, 92.64, 39.99, 79.37),
    ("LF", "SAU", 93.19, 99.28, 90.50, 0.71, 97.94),
    ("Input-aware", "FP", 90.67, 98.26, 91.74, 0.04, 99.11),
    ("Input-aware", "i-BAU", 90.67, 98.26, 89.17, 27.08, 84.84),
    ("SIG", "ANP", 84.48, 98.27, 83.36, 36.42, 80.36),
    ("SIG", "D3", 84.48, 98.27, 89.99, 0.00, 99.13),
    ("SSBA", "NAD", 92.88, 97.86, 91.91, 77.40, 59.74),
    ("SSBA", "NC", 92.88, 97.86, 90.99, 0.58, 97.69),
]


@pytest.mark.parametrize("attack,defense,acc0,asr0,acc1,asr1,paper_der", TABLE_1,
                         ids=[f"{a}-{d}" for a, d, *_ in TABLE_1])
def test_der_reproduces_d3_table_1(attack, defense, acc0, asr0, acc1, asr1, paper_der):
  del attack, defense
  value = metrics.der(acc0 / 100, asr0 / 100, acc1 / 100, asr1 / 100)
  assert isinstance(value, float)
  assert 100 * value == pytest.approx(paper_der, abs=0.01 + 1e-9)


def test_der_no_change_is_one_half():
  assert metrics.der(0.9, 0.95, 0.9, 0.95) == 0.5


def test_der_clips_asr_increase_and_ignores_acc_gain():
  assert metrics.der(0.9, 0.5, 0.9, 0.8) == 0.5  # ASR went up: no credit, no penalty.
  assert metrics.der(0.8, 0.5, 0.95, 0.5) == 0.5  # ACC went up: not rewarded.
  assert metrics.der(0.9, 0.5, 0.8, 0.9) == pytest.approx(0.45)  # only the ACC drop counts.
  assert metrics.der(0.9, 1.0, 0.9, 0.0) == 1.0
  assert metrics.der(1.0, 0.0, 0.0, 1.0) == 0.0


@pytest.mark.parametrize("args", [(91.32, 95.03, 89.96, 1.48), (0.9, 0.9, 0.8, -0.1),
                                  (0.9, np.nan, 0.8, 0.1)])
def test_der_rejects_values_outside_unit_interval(args):
  with pytest.raises(ValueError, match="pass fractions"):
    metrics.der(*args)


def test_der_elementwise_and_under_jit():
  acc0 = jnp.array([0.9, 0.9, 0.9])
  asr1 = jnp.array([0.1, 0.95, 0.5])
  expected = np.array([0.85, 0.45, 0.65])
  out = metrics.der(acc0, 0.9, 0.8, asr1)
  assert isinstance(out, np.ndarray) and out.shape == (3,)
  np.testing.assert_allclose(out, expected, atol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.vmap(metrics.der))(acc0, acc0, acc0 - 0.1, asr1),
                             expected, atol=1e-6)
  with pytest.raises(ValueError, match="acc_after"):
    metrics.der(acc0, 0.9, np.array([0.8, 1.2, 0.8]), asr1)


def test_rir():
  assert metrics.rir(0.9, 0.05, 0.88, 0.85) == pytest.approx((0.8 - 0.02 + 1) / 2)
  assert metrics.rir(0.9, 0.5, 0.9, 0.3) == 0.5  # RA fell: clipped.
  with pytest.raises(ValueError, match="ra_before"):
    metrics.rir(0.9, 5.0, 0.9, 0.8)


def test_rates_on_hand_example():
  clean_pred = np.array([0, 1, 2, 3])
  clean_labels = np.array([0, 1, 2, 0])
  bd_pred = jnp.array([0, 0, 2, 0, 3])
  bd_labels = np.zeros(5, np.int32)
  bd_orig = np.array([1, 2, 2, 3, 3])
  assert metrics.accuracy(clean_pred, clean_labels) == 0.75
  assert metrics.attack_success_rate(bd_pred, bd_labels) == 0.6
  assert metrics.robust_accuracy(bd_pred, bd_orig) == 0.4
  assert metrics.summarize(clean_pred, clean_labels, bd_pred, bd_labels,
                           bd_orig) == metrics.BackdoorMetrics(acc=0.75, asr=0.6, ra=0.4)


def test_logits_are_reduced_by_argmax():
  logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.5, 3.0], [0.1, 0.2, 0.0]])
  assert metrics.accuracy(logits, np.array([0, 2, 0])) == pytest.approx(2 / 3)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="3 predictions but 2 labels"):
    metrics.accuracy(np.array([0, 1, 2]), np.array([0, 1]))
  with pytest.raises(ValueError, match="empty"):
    metrics.attack_success_rate(np.zeros(0, np.int32), np.zeros(0, np.int32))
  with pytest.raises(ValueError, match="integer class ids"):
    metrics.accuracy(np.array([0.0, 1.0]), np.array([0, 1]))
  with pytest.raises(ValueError, match="2 predictions but 3 labels"):
    metrics.summarize([0, 1], [0, 1], np.array([0, 1]), np.array([0, 0]), np.array([1, 2, 3]))
