"""Exact formulas of the SIG, additive (LF, TrojanNN) and WaNet triggers and of LF's filter."""
import jax
import numpy as np
import pytest

from d3jax.attacks import SIG, Additive, get
from d3jax.attacks.lf import filter_matrix, gaussian_kernel, load_pattern, low_pass
from d3jax.attacks.trojannn import mask_image
from d3jax.attacks.warp import Warp, bicubic_matrix, grid_offsets, identity_grid, warp, warp_field


def _images(n, shape=(32, 32, 3), seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


# SIG.


def test_sig_values_are_the_reference_formula():
  x = _images(3)
  out = np.asarray(SIG((32, 32, 3))(x))
  columns = np.arange(32)
  wave = 40.0 * np.sin(2 * np.pi * columns * 6 / 32)
  exact = np.clip(x.astype(np.float64) + wave[None, None, :, None], 0, 255)
  expected = np.trunc(exact).astype(np.uint8)
  on_edge = np.abs(exact - np.round(exact)) < 1e-4  # float32 may land either side of an integer
  np.testing.assert_array_equal(out[~on_edge], expected[~on_edge])
  assert np.all(np.abs(out.astype(int) - expected) <= 1)
  # Spot values on a flat grey image: column 1 adds 40·sin(3π/8) = 36.95 → 136, column 3
  # adds 40·sin(9π/8) = −15.3 → 84.7 → 84; column 0 adds 0.
  grey = np.asarray(SIG((32, 32, 3))(np.full((1, 32, 32, 3), 100, np.uint8)))
  assert grey[0, 5, 0, 1] == 100 and grey[0, 5, 1, 1] == 136 and grey[0, 5, 3, 2] == 84
  assert np.all(grey == grey[:, :1])  # every row is the same
  assert np.all(grey == grey[..., :1])  # every channel is the same


def test_sig_options_and_errors():
  trigger = SIG((8, 16, 1), delta=20, frequency=1)
  np.testing.assert_allclose(trigger.pattern[3, :, 0], 20 * np.sin(2 * np.pi * np.arange(16) / 16), atol=1e-5)
  with pytest.raises(ValueError, match="delta"):
    SIG((32, 32, 3), delta=300)
  with pytest.raises(ValueError, match="frequency"):
    SIG((32, 32, 3), frequency=-1)


# Additive patterns (LF, TrojanNN).


def test_additive_clips_or_wraps():
  pattern = np.zeros((4, 4, 3), np.float32)
  pattern[0, 0] = 10
  x = np.full((1, 4, 4, 3), 250, np.uint8)
  assert np.asarray(Additive((4, 4, 3), pattern)(x))[0, 0, 0, 0] == 255
  wrapped = np.asarray(Additive((4, 4, 3), pattern, wrap=True)(x))
  assert wrapped[0, 0, 0, 0] == 4 and wrapped[0, 1, 1, 0] == 250  # (250 + 10) mod 256
  gray = Additive((4, 4, 3), np.full((4, 4, 1), -3.5, np.float32))
  assert np.asarray(gray(x))[0, 2, 2, 1] == 246  # trunc(246.5)
  with pytest.raises(ValueError, match=r"integer pattern in \[0, 255\]"):
    Additive((4, 4, 3), pattern + 0.5, wrap=True)
  with pytest.raises(ValueError, match=r"must have shape \(4, 4, 3\)"):
    Additive((4, 4, 3), np.zeros((4, 5, 3)))


# LF's Gaussian low-pass filter and pattern files.


def test_lf_kernel_and_impulse_response():
  kernel = gaussian_kernel(30, 6.0)
  offsets = np.arange(30) - 14.5
  expected = np.exp(-offsets ** 2 / 72.0)
  np.testing.assert_allclose(kernel, expected / expected.sum(), rtol=1e-6)
  np.testing.assert_allclose(kernel, kernel[::-1], rtol=1e-6)
  impulse = np.zeros((40, 40, 1), np.float32)
  impulse[20, 25, 0] = 1.0
  response = np.asarray(low_pass(impulse, 30, 6.0))[..., 0]
  # out[i, l] = k[20 − i + 14] · k[25 − l + 14] inside the kernel's support, 0 outside.
  rows = np.array([kernel[20 - i + 14] if 0 <= 20 - i + 14 < 30 else 0.0 for i in range(40)])
  cols = np.array([kernel[25 - i + 14] if 0 <= 25 - i + 14 < 30 else 0.0 for i in range(40)])
  np.testing.assert_allclose(response, np.outer(rows, cols), atol=1e-7)
  assert filter_matrix(5, np.array([1.0, 2.0, 3.0], np.float32))[2].tolist() == [0, 1, 2, 3, 0]


def test_lf_filter_passes_low_and_stops_high_frequencies():
  size = 64
  grid = np.indices((size, size)).sum(0)
  constant = np.ones((size, size, 1), np.float32)
  checker = np.where(grid % 2 == 0, 1.0, -1.0)[..., None].astype(np.float32)
  smooth = np.asarray(low_pass(constant, 30, 6.0))
  np.testing.assert_allclose(smooth[20:44, 20:44], 1.0, atol=1e-5)  # DC gain 1 away from borders
  assert 0.25 < smooth[0, 0, 0] < 0.4  # zero padding: ≈ (½ + the centre tap)² at the corner
  assert np.abs(np.asarray(low_pass(checker, 30, 6.0))[20:44, 20:44]).max() < 1e-5


def test_lf_pattern_files(tmp_path):
  pattern = np.random.default_rng(0).integers(0, 52, (32, 32, 3)).astype(np.uint8)
  np.save(tmp_path / "p.npy", pattern)
  np.save(tmp_path / "batch.npy", pattern[None])
  np.save(tmp_path / "gray.npy", pattern[..., 0])
  np.save(tmp_path / "unit.npy", pattern.astype(np.float32) / 255.0)
  np.testing.assert_array_equal(load_pattern(str(tmp_path / "p.npy"), (32, 32, 3)), pattern)
  np.testing.assert_array_equal(load_pattern(str(tmp_path / "batch.npy"), (32, 32, 3)), pattern)
  np.testing.assert_array_equal(load_pattern(str(tmp_path / "gray.npy"), (32, 32, 3))[..., 2], pattern[..., 0])
  trigger = get("lf", pattern_path=str(tmp_path / "p.npy")).trigger((32, 32, 3))
  x = _images(2)
  np.testing.assert_array_equal(np.asarray(trigger(x)), np.minimum(x.astype(int) + pattern, 255))
  assert trigger.name == "lf"
  with pytest.raises(ValueError, match="multiply it by 255"):
    load_pattern(str(tmp_path / "unit.npy"), (32, 32, 3))
  with pytest.raises(ValueError, match=r"has shape \(32, 32, 3\); images of shape \(16, 16, 3\)"):
    load_pattern(str(tmp_path / "p.npy"), (16, 16, 3))
  with pytest.raises(ValueError, match="is not a file"):
    load_pattern(str(tmp_path / "missing.npy"), (32, 32, 3))


def test_crafted_attacks_need_a_clean_model():
  with pytest.raises(ValueError, match="LF needs a pattern"):
    get("lf").trigger((32, 32, 3))
  with pytest.raises(ValueError, match="TrojanNN optimises its trigger against a clean model"):
    get("trojannn").trigger((32, 32, 3))


def test_trojannn_masks(tmp_path):
  mask = mask_image(get("trojannn"), (32, 32, 3))
  assert mask.shape == (32, 32, 3) and set(np.unique(mask)) == {0.0, 1.0}
  rows, cols = np.nonzero(mask[..., 0])
  assert rows.min() >= 17 and rows.max() <= 29 and cols.min() >= 18 and cols.max() <= 28
  assert 50 <= len(rows) <= 100  # an ellipse of radii 6 × 4.8 px covers ≈ 90 pixels
  from PIL import Image  # pylint: disable=import-outside-toplevel
  square = np.zeros((64, 64), np.uint8)
  square[:32, :32] = 255
  Image.fromarray(square).save(tmp_path / "mask.png")
  user = mask_image(get("trojannn", mask_path=str(tmp_path / "mask.png")), (16, 16, 1))
  assert user.shape == (16, 16, 1) and user[:7, :7].min() == 1.0 and user[9:, 9:].max() == 0.0
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "black.png")
  with pytest.raises(ValueError, match="no non-zero pixel"):
    mask_image(get("trojannn", mask_path=str(tmp_path / "black.png")), (16, 16, 1))


# WaNet's warp.


def test_bicubic_matrix_interpolates_with_aligned_corners():
  matrix = bicubic_matrix(32, 4)
  np.testing.assert_allclose(matrix.sum(1), 1.0, atol=1e-6)
  np.testing.assert_allclose(matrix[0], [1, 0, 0, 0], atol=1e-7)
  np.testing.assert_allclose(matrix[-1], [0, 0, 0, 1], atol=1e-7)
  np.testing.assert_allclose(matrix, matrix[::-1, ::-1], atol=1e-6)  # symmetric about the centre
  # Halfway between control points 1 and 2 (source 1.5): Keys' weights −0.09375, 0.59375 ×2, −0.09375.
  np.testing.assert_allclose(bicubic_matrix(7, 4)[3], [-0.09375, 0.59375, 0.59375, -0.09375], atol=1e-6)


def test_warp_field_is_normalised_at_the_control_points():
  field = np.asarray(warp_field(jax.random.key(3), 4, 31, 31))
  control = field[::10, ::10]  # aligned corners: pixels 0, 10, 20, 30 are the 4×4 control points
  np.testing.assert_allclose(np.abs(control).mean(), 1.0, rtol=1e-5)
  assert control.min() >= -16 and control.max() <= 16  # |noise| ≤ 1, divided by its mean
  np.testing.assert_array_equal(field, np.asarray(warp_field(jax.random.key(3), 4, 31, 31)))


def test_wanet_is_identity_at_zero_strength():
  x = _images(4)
  np.testing.assert_array_equal(np.asarray(get("wanet", strength=0.0).trigger((32, 32, 3))(x)), x)
  np.testing.assert_array_equal(np.asarray(warp(x.astype(np.float32), np.zeros((32, 32, 2)))), x)
  moved = np.asarray(get("wanet").trigger((32, 32, 3))(x))
  assert np.mean(moved != x) > 0.5
  np.testing.assert_array_equal(moved, np.asarray(get("wanet").trigger((32, 32, 3))(x)))
  assert not np.array_equal(moved, np.asarray(get("wanet", seed=1).trigger((32, 32, 3))(x)))


def test_warp_is_bilinear_with_aligned_corners():
  x = np.arange(2 * 5 * 6 * 1, dtype=np.float32).reshape(2, 5, 6, 1)
  shift = np.zeros((5, 6, 2), np.float32)
  shift[..., 0] = 2.0 / 5  # one pixel to the right in [−1, 1] units over W − 1 = 5 intervals
  out = np.asarray(warp(x, shift))
  np.testing.assert_allclose(out[:, :, :5], x[:, :, 1:], atol=1e-4)
  np.testing.assert_allclose(out[:, :, 5], x[:, :, 5], atol=1e-4)  # clipped to the border
  half = np.zeros((5, 6, 2), np.float32)
  half[..., 1] = 0.5 * 2.0 / 4  # half a pixel down
  np.testing.assert_allclose(np.asarray(warp(x, half))[:, :4], (x[:, :4] + x[:, 1:5]) / 2, atol=1e-4)
  # Per-sample offsets, and the identity grid's corners sit on pixel centres.
  per_sample = np.stack([shift, np.zeros_like(shift)])
  np.testing.assert_allclose(np.asarray(warp(x, per_sample))[1], x[1], atol=1e-5)
  np.testing.assert_allclose(np.asarray(identity_grid(5, 6))[0, 0], [-1, -1])
  with pytest.raises(ValueError, match="offsets must have shape"):
    Warp((5, 6, 1), np.zeros((6, 5, 2)))


def test_grid_offsets_strength_and_rescale():
  field = np.ones((8, 8, 2), np.float32)
  np.testing.assert_allclose(np.asarray(grid_offsets(field, 0.5, 1.0)), 0.5 / 8, atol=1e-7)
  identity = np.asarray(identity_grid(8, 8))
  np.testing.assert_allclose(np.asarray(grid_offsets(field, 0.0, 2.0)), identity, atol=1e-6)
