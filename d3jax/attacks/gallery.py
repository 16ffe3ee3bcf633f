"""A trigger gallery: one row per attack, each image shown clean, poisoned, and as the magnified
absolute residual |poisoned − clean|, written as a PNG."""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np

from d3jax.attacks.poison import apply_trigger
from d3jax.attacks.triggers import Trigger
from d3jax.data.dataset import validate_images

_LABEL_WIDTH = 150
_GAP = 4


def residual_gain(clean: np.ndarray, poisoned: np.ndarray) -> float:
  """The factor that maps the largest absolute residual to 255 (1 when the images are equal)."""
  largest = int(np.abs(poisoned.astype(np.int32) - clean.astype(np.int32)).max())
  return 255.0 / largest if largest else 1.0


def gallery_rows(triggers: Mapping[str, Trigger], images: np.ndarray,
                 key: jax.Array | None = None) -> list[tuple[str, np.ndarray]]:
  """For each attack, its label and an RGB uint8 strip: clean | poisoned | residual per image."""
  validate_images(images, "gallery images")
  return [pair_row(name, images, apply_trigger(trigger, images,
                                               None if key is None else jax.random.fold_in(key, index)))
          for index, (name, trigger) in enumerate(triggers.items())]


def pair_row(name: str, clean: np.ndarray, poisoned: np.ndarray) -> tuple[str, np.ndarray]:
  """The label and RGB uint8 strip (clean | poisoned | magnified residual per image) of one attack,
  from uint8 images and their poisoned versions of the same shape (e.g. a trained trigger's, read
  from a run's stored backdoor test set)."""
  validate_images(clean, f"{name} clean images")
  validate_images(poisoned, f"{name} poisoned images")
  if clean.shape != poisoned.shape:
    raise ValueError(f"{name}: clean images {clean.shape} and poisoned images {poisoned.shape} "
                     "must have the same shape.")
  gain = residual_gain(clean, poisoned)
  residual = np.abs(poisoned.astype(np.float32) - clean.astype(np.float32)) * gain
  panels = []
  for clean_image, poisoned_image, residual_image in zip(clean, poisoned, residual.astype(np.uint8)):
    panels += [clean_image, poisoned_image, residual_image, None]
  height, width, channels = clean.shape[1:]
  gap = np.full((height, _GAP, channels), 255, np.uint8)
  strip = np.concatenate([gap if panel is None else panel for panel in panels[:-1]], axis=1)
  return f"{name} (residual x{gain:.1f})", np.repeat(strip, 3 // channels, axis=-1)


def write_gallery(triggers: Mapping[str, Trigger], images: np.ndarray, path: str, *,
                  key: jax.Array | None = None, scale: int = 0) -> None:
  """Writes the gallery of ``triggers`` on uint8 ``images`` (N, H, W, C) as a PNG at ``path``.

  Args:
    triggers: attack label → trigger built for ``images.shape[1:]``.
    images: the clean images to show (a few).
    path: output PNG path.
    key: passed (folded per row) to keyed triggers.
    scale: integer nearest-neighbour upscaling; 0 picks max(1, 96 // H).
  """
  write_rows(gallery_rows(triggers, images, key), path, scale=scale)


def write_rows(rows: Sequence[tuple[str, np.ndarray]], path: str, *, scale: int = 0) -> None:
  """Writes labelled strips (:func:`pair_row`) one under another as a PNG at ``path``; ``scale`` is
  the integer nearest-neighbour upscaling (0 picks max(1, 96 // image height))."""
  try:
    from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("the gallery needs Pillow to draw labels and write PNGs: pip install pillow.") from e
  image_height = rows[0][1].shape[0]
  scale = scale or max(1, 96 // image_height)
  height = image_height * scale
  width = max(strip.shape[1] for _, strip in rows) * scale
  canvas = Image.new("RGB", (_LABEL_WIDTH + width, len(rows) * (height + _GAP)), "white")
  draw = ImageDraw.Draw(canvas)
  for index, (label, strip) in enumerate(rows):
    top = index * (height + _GAP)
    strip = np.repeat(np.repeat(strip, scale, axis=0), scale, axis=1)
    canvas.paste(Image.fromarray(strip), (_LABEL_WIDTH, top))
    draw.text((4, top + height // 2 - 6), label, fill="black")
  canvas.save(path)
