"""Tests of d3jax.attacks: BadNets and Blended triggers, poisoning in every label mode, backdoor
test sets, multi-trigger poisoning and the untargeted success rate."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3jax.attacks import (SIG, BadNets, Blended, apply_trigger, backdoor_test_set, get_trigger,
                           poison, poison_dataset, poison_multi, untargeted_success_rate)
from d3jax.data.dataset import Dataset


def _images(n, shape=(32, 32, 3), seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _labels(n, num_classes, seed=0):
  return np.random.default_rng(seed).integers(0, num_classes, n).astype(np.int32)


# Triggers.


def test_badnets_32_patch_is_exact():
  x = _images(4)
  out = np.asarray(BadNets((32, 32, 3))(x))
  assert out.dtype == np.uint8 and out.shape == x.shape
  assert np.all(out[:, 29:32, 29:32, :] == 255)
  mask = np.zeros(x.shape, bool)
  mask[:, 29:32, 29:32, :] = True
  np.testing.assert_array_equal(out[~mask], x[~mask])


@pytest.mark.parametrize("shape, side", [((28, 28, 1), 3), ((16, 16, 3), 2), ((64, 64, 3), 6)])
def test_badnets_scaled_sizes(shape, side):
  x = np.zeros((2, *shape), np.uint8)
  trigger = BadNets(shape)
  assert trigger.size == side
  out = np.asarray(trigger(x))
  expected = np.zeros_like(x)
  expected[:, -side:, -side:, :] = 255
  np.testing.assert_array_equal(out, expected)


def test_badnets_options_and_idempotence():
  x = _images(3)
  trigger = BadNets((32, 32, 3), size=5, value=7)
  once = np.asarray(trigger(x))
  assert np.all(once[:, 27:, 27:] == 7) and np.all(once[:, :27] == x[:, :27])
  np.testing.assert_array_equal(np.asarray(trigger(once)), once)


def _blend_by_hand(x, pattern, alpha):
  value = (1 - alpha) * x.astype(np.float64) + alpha * pattern.astype(np.float64)
  return np.clip(value, 0, 255), np.trunc(np.clip(value, 0, 255)).astype(np.uint8)


def test_blended_formula_and_truncation():
  shape = (4, 4, 3)
  key = np.full(shape, 20.5, np.float32)
  key[0, 0, 0] = 255.0
  x = np.full((1, *shape), 11, np.uint8)
  x[0, 0, 0, 0] = 255
  out = np.asarray(Blended(shape, alpha=0.2, key_image=key)(x))
  assert out[0, 1, 1, 0] == 12  # 0.8·11 + 0.2·20.5 = 12.9 truncates to 12.
  assert out[0, 0, 0, 0] == 255  # 0.8·255 + 0.2·255 stays in range after clip.
  x = _images(8)
  trigger = Blended((32, 32, 3), alpha=0.2)
  out = np.asarray(trigger(x))
  value, expected = _blend_by_hand(x, trigger.pattern, 0.2)
  # float32 vs float64 may differ by one only where the exact value sits on an integer.
  on_edge = np.abs(value - np.round(value)) < 1e-3
  np.testing.assert_array_equal(out[~on_edge], expected[~on_edge])
  assert np.all(np.abs(out.astype(int) - expected) <= 1)


def test_blended_default_pattern_is_seeded_noise():
  trigger = Blended((32, 32, 3))
  pattern = trigger.pattern
  assert pattern.shape == (32, 32, 3) and pattern.dtype == np.float32
  assert 0 <= pattern.min() and pattern.max() <= 255 and pattern.std() > 50
  np.testing.assert_array_equal(Blended((32, 32, 3)).pattern, pattern)
  assert not np.array_equal(Blended((32, 32, 3), seed=1).pattern, pattern)
  np.testing.assert_array_equal(np.asarray(Blended((32, 32, 3), alpha=0.0)(_images(2))),
                                _images(2))


def test_blended_user_array_other_size_and_channels(tmp_path):
  gray = np.random.default_rng(0).integers(0, 256, (20, 24), dtype=np.uint8)
  trigger = Blended((32, 32, 3), key_image=gray)
  resized = jax.image.resize(gray.astype(np.float32), (32, 32), "linear", antialias=True)
  for c in range(3):
    np.testing.assert_allclose(trigger.pattern[..., c], resized, rtol=0, atol=1e-4)
  rgb = np.broadcast_to(np.array([10.0, 20.0, 30.0], np.float32), (50, 40, 3))
  np.testing.assert_allclose(Blended((16, 16, 1), key_image=rgb).pattern,
                             np.full((16, 16, 1), 0.299 * 10 + 0.587 * 20 + 0.114 * 30),
                             atol=1e-3)
  same = np.random.default_rng(1).uniform(0, 255, (32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(Blended((32, 32, 3), key_image=same).pattern, same, atol=1e-3)
  from PIL import Image  # pylint: disable=import-outside-toplevel
  path = tmp_path / "key.png"
  rgb_u8 = np.random.default_rng(2).integers(0, 256, (40, 30, 3), dtype=np.uint8)
  Image.fromarray(rgb_u8).save(path)
  np.testing.assert_array_equal(Blended((32, 32, 3), key_image=path).pattern,
                                Blended((32, 32, 3), key_image=rgb_u8).pattern)
  with pytest.raises(ValueError, match=r"\[0, 255\]"):
    Blended((32, 32, 3), key_image=-np.ones((8, 8)))
  with pytest.raises(ValueError, match="key_image must have shape"):
    Blended((32, 32, 3), key_image=np.zeros((8, 8, 2)))


@pytest.mark.parametrize("trigger", [BadNets((32, 32, 3)), Blended((32, 32, 3), alpha=0.3)])
def test_trigger_jit_matches_eager_and_numpy_input(trigger):
  x = _images(5)
  eager = np.asarray(trigger(x))
  np.testing.assert_array_equal(np.asarray(jax.jit(trigger)(x)), eager)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda v: trigger(v))(jnp.asarray(x))), eager)
  np.testing.assert_array_equal(apply_trigger(trigger, x, chunk=2), eager)


def test_trigger_errors():
  with pytest.raises(ValueError, match=r"\(32, 32, 3\).*\(2, 28, 28, 1\)"):
    BadNets((32, 32, 3))(np.zeros((2, 28, 28, 1), np.uint8))
  with pytest.raises(ValueError, match=r"\(32, 32, 3\).*\(32, 32, 3\)"):
    Blended((32, 32, 3))(np.zeros((32, 32, 3), np.uint8))  # missing batch axis
  with pytest.raises(ValueError, match="uint8"):
    BadNets((32, 32, 3))(np.zeros((1, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match="alpha"):
    Blended((32, 32, 3), alpha=1.5)
  with pytest.raises(ValueError, match="size"):
    BadNets((8, 8, 3), size=9)
  with pytest.raises(ValueError, match="badnets, blended, sig"):
    get_trigger("refool", (32, 32, 3))
  assert isinstance(get_trigger("BadNets", (32, 32, 3)), BadNets)
  assert get_trigger("blended", (32, 32, 3), alpha=0.1).alpha == 0.1


# Poisoning.


@pytest.mark.parametrize("ratio, n, count", [(0.1, 50, 5), (0.25, 10, 2), (0.0, 10, 0),
                                             (1.0, 12, 12)])
def test_poison_count(ratio, n, count):
  result = poison(_images(n), _labels(n, 4), BadNets((32, 32, 3)), ratio=ratio, num_classes=4,
                  key=jax.random.key(0))
  assert result.is_poison.sum() == count == round(ratio * n)


@pytest.mark.parametrize("label_mode", ["all2one", "all2all", "clean_label", "untargeted"])
def test_poison_labels_images_and_indicators(label_mode):
  n, num_classes, target = 60, 3, 1
  x, y = _images(n), _labels(n, num_classes)
  trigger = Blended((32, 32, 3))
  result = poison(x, y, trigger, ratio=0.2, target=target, label_mode=label_mode,
                  num_classes=num_classes, key=jax.random.key(3))
  hit = result.is_poison
  assert result.x.dtype == np.uint8 and result.y.dtype == np.int32 and hit.dtype == bool
  assert result.y_orig.dtype == np.int32
  np.testing.assert_array_equal(result.y_orig, y)
  np.testing.assert_array_equal(result.x[~hit], x[~hit])
  np.testing.assert_array_equal(result.y[~hit], y[~hit])
  np.testing.assert_array_equal(result.x[hit], np.asarray(trigger(x[hit])))
  assert hit.sum() == round(0.2 * n)
  if label_mode == "untargeted":
    assert np.all(result.y[hit] != y[hit]) and np.all((0 <= result.y) & (result.y < num_classes))
    assert len(np.unique(result.y[hit] - y[hit])) > 1  # random other classes, not one shift
    return
  expected = {"all2one": np.full(hit.sum(), target), "all2all": (y[hit] + 1) % num_classes,
              "clean_label": y[hit]}[label_mode]
  np.testing.assert_array_equal(result.y[hit], expected)
  if label_mode == "clean_label":
    assert np.all(y[hit] == target)


def test_all2one_does_not_avoid_target_class():
  x, y = _images(20), _labels(20, 3)
  result = poison(x, y, BadNets((32, 32, 3)), ratio=1.0, target=0, num_classes=3,
                  key=jax.random.key(0))
  assert result.is_poison.all() and np.all(result.y == 0)
  assert np.all(result.x[y == 0][:, 29:, 29:] == 255)


@pytest.mark.parametrize("label_mode", ["all2one", "untargeted"])
def test_poison_determinism_per_key(label_mode):
  x, y = _images(100), _labels(100, 5)
  args = dict(trigger=BadNets((32, 32, 3)), ratio=0.1, num_classes=5, label_mode=label_mode)
  first = poison(x, y, key=jax.random.key(7), **args)
  again = poison(x, y, key=jax.random.key(7), **args)
  other = poison(x, y, key=jax.random.key(8), **args)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first.is_poison, other.is_poison)
  np.testing.assert_array_equal(x, _images(100))  # inputs are not modified in place


def test_clean_label_too_few_targets_raises():
  y = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2, 2], np.int32)
  with pytest.raises(ValueError, match="only 2 are available"):
    poison(_images(10), y, BadNets((32, 32, 3)), ratio=0.3, label_mode="clean_label",
           num_classes=3, key=jax.random.key(0))


def test_poison_argument_errors():
  x, y, trigger, key = _images(10), _labels(10, 3), BadNets((32, 32, 3)), jax.random.key(0)
  with pytest.raises(ValueError, match="ratio"):
    poison(x, y, trigger, ratio=1.5, num_classes=3, key=key)
  with pytest.raises(ValueError, match="target"):
    poison(x, y, trigger, ratio=0.1, target=3, num_classes=3, key=key)
  with pytest.raises(ValueError, match="label_mode"):
    poison(x, y, trigger, ratio=0.1, label_mode="one2one", num_classes=3, key=key)
  with pytest.raises(ValueError, match=r"\(28, 28, 1\)"):
    poison(_images(10, (28, 28, 1)), y, trigger, ratio=0.5, num_classes=3, key=key)
  with pytest.raises(ValueError, match="target label 0"):
    backdoor_test_set(x, np.zeros(10, np.int32), trigger, num_classes=3)


def test_backdoor_test_set_modes():
  x, y, trigger = _images(40), _labels(40, 4), BadNets((32, 32, 3))
  bd = backdoor_test_set(x, y, trigger, target=2, num_classes=4)
  assert len(bd.x) == np.sum(y != 2) and bd.is_poison.all()
  np.testing.assert_array_equal(bd.y_orig, y[y != 2])
  np.testing.assert_array_equal(bd.y, np.full(len(bd.y), 2))
  np.testing.assert_array_equal(bd.x, np.asarray(trigger(x[y != 2])))
  clean = backdoor_test_set(x, y, trigger, target=2, label_mode="clean_label", num_classes=4)
  for got, want in zip(clean, bd):  # clean-label backdoors are measured like all2one ones
    np.testing.assert_array_equal(got, want)
  every = backdoor_test_set(x, y, trigger, label_mode="all2all", num_classes=4)
  assert len(every.x) == 40
  np.testing.assert_array_equal(every.y, (y + 1) % 4)
  untargeted = backdoor_test_set(x, y, trigger, label_mode="untargeted", num_classes=4)
  np.testing.assert_array_equal(untargeted.y, y)
  np.testing.assert_array_equal(untargeted.y_orig, y)
  np.testing.assert_array_equal(untargeted.x, every.x)


def test_label_mode_must_suit_the_attack():
  x, y = _images(30), np.repeat(np.arange(3, dtype=np.int32), 10)
  with pytest.raises(ValueError, match="sig attack is defined for label_mode clean_label, not 'all2one'"):
    poison(x, y, SIG((32, 32, 3)), ratio=0.1, num_classes=3, key=jax.random.key(0))
  with pytest.raises(ValueError, match="sig attack"):
    backdoor_test_set(x, y, SIG((32, 32, 3)), label_mode="all2all", num_classes=3)


def test_poison_multi_disjoint_with_own_targets():
  n, num_classes = 60, 4
  x, y = _images(n), _labels(n, num_classes)
  badnets, blended = BadNets((32, 32, 3)), Blended((32, 32, 3))
  result, source = poison_multi(x, y, [(badnets, 1), (blended, 3)], ratio=0.25,
                                num_classes=num_classes, key=jax.random.key(2))
  assert source.dtype == np.int32 and set(np.unique(source)) == {-1, 0, 1}
  for k, (trigger, target) in enumerate([(badnets, 1), (blended, 3)]):
    hit = source == k
    assert hit.sum() == 15
    np.testing.assert_array_equal(result.y[hit], np.full(15, target))
    np.testing.assert_array_equal(result.x[hit], np.asarray(trigger(x[hit])))
  np.testing.assert_array_equal(result.is_poison, source >= 0)
  np.testing.assert_array_equal(result.x[source < 0], x[source < 0])
  single = poison(x, y, badnets, ratio=0.25, target=1, num_classes=num_classes, key=jax.random.key(2))
  np.testing.assert_array_equal(single.is_poison, source == 0)  # the first pair draws as poison()
  with pytest.raises(ValueError, match="only 0 are available; lower ratio or poison with fewer"):
    poison_multi(x, y, [(badnets, 1), (blended, 3), (badnets, 2)], ratio=0.5,
                 num_classes=num_classes, key=jax.random.key(2))
  with pytest.raises(ValueError, match="at least one"):
    poison_multi(x, y, [], ratio=0.1, num_classes=num_classes, key=jax.random.key(2))


def test_untargeted_success_rate():
  y_true = np.array([0, 1, 2, 3, 4])
  clean = np.array([0, 1, 2, 0, 0])  # the last two are wrong without the trigger: ignored
  triggered = np.array([1, 1, 0, 3, 4])
  assert untargeted_success_rate(clean, triggered, y_true) == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="no clean sample correctly"):
    untargeted_success_rate(np.ones(5, int), triggered, np.zeros(5, int))
  with pytest.raises(ValueError, match="one shape"):
    untargeted_success_rate(clean, triggered[:3], y_true)


def test_poison_dataset():
  data = Dataset(_images(50), _labels(50, 3), _images(20, seed=1), _labels(20, 3, seed=1),
                 num_classes=3, mean=(0.5,) * 3, std=(0.25,) * 3)
  train, bd_test = poison_dataset(data, BadNets(data.image_shape), ratio=0.1, target=0,
                                  label_mode="all2one", key=jax.random.key(0))
  assert train.is_poison.sum() == 5 and np.all(train.y[train.is_poison] == 0)
  assert len(bd_test.x) == np.sum(data.y_test != 0)


def test_gallery_row_panels_and_magnified_residual():
  from d3jax.attacks.gallery import gallery_rows, pair_row
  clean = np.full((2, 4, 5, 1), 100, np.uint8)
  poisoned = clean.copy()
  poisoned[:, 1, 2, 0] = 110  # residual 10 → magnified ×25.5 to 255
  label, strip = pair_row("toy", clean, poisoned)
  assert label == "toy (residual x25.5)"
  # Per image: clean | poisoned | residual side by side (5 pixels each), a 4-pixel gap between images.
  panels = [strip[:, start:start + 5, 0] for start in (0, 5, 10, 19, 24, 29)]
  np.testing.assert_array_equal(panels[0], clean[0, ..., 0])
  np.testing.assert_array_equal(panels[1], poisoned[0, ..., 0])
  assert panels[2][1, 2] == 255 and panels[2].sum() == 255
  np.testing.assert_array_equal(panels[4], poisoned[1, ..., 0])
  assert np.all(strip[:, 15:19] == 255)
  assert strip.shape == (4, 2 * 15 + 4, 3)  # grey becomes RGB
  same_label, _ = pair_row("none", clean, clean)
  assert same_label == "none (residual x1.0)"
  with pytest.raises(ValueError, match="same shape"):
    pair_row("toy", clean, poisoned[:1])
  rows = gallery_rows({"badnets": BadNets((16, 16, 1))}, np.zeros((3, 16, 16, 1), np.uint8))
  assert [name for name, _ in rows] == ["badnets (residual x1.0)"]
