"""Grad-CAM on clean and triggered images, before and after defenses (the D3 supplement,
§7.4 and its Figure 3; Selvaraju et al., ICCV 2017).

For an image and the class the model predicts, Grad-CAM weights each channel of a layer's output
A by the spatial mean of ∂logit/∂A and keeps the positive part of the weighted sum, upsampled to
the image and scaled to [0, 1]. The layer defaults to the model's last convolution.

Evaluation only: this needs the trigger (the backdoor test set); no defense may call it.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from d3jax.analysis.data import Paired
from d3jax.analysis.plotting import pyplot, save
from d3jax.analysis.probe import apply_probed
from d3jax.data.augment import normalize
from d3jax.engine.train import Normalization


@functools.partial(jax.jit, static_argnames=("model", "layer"))
def _gradcam(model, variables, images, mean, std, layer):
  x = normalize(images, mean, std)
  shape = jax.eval_shape(lambda: apply_probed(model, variables, x, layer)[1])

  def score(delta):
    logits, act = apply_probed(model, variables, x, layer, "output", delta)
    predicted = jax.lax.stop_gradient(logits.argmax(-1))
    return jnp.take_along_axis(logits, predicted[:, None], 1).sum(), (act, predicted)

  grads, (act, predicted) = jax.grad(score, has_aux=True)(jnp.zeros(shape.shape, shape.dtype))
  weights = grads.mean(axis=(1, 2))
  cam = jax.nn.relu(jnp.einsum("nhwk,nk->nhw", act, weights))
  cam = jax.image.resize(cam, (cam.shape[0],) + images.shape[1:3], "bilinear")
  cam = cam / (cam.max(axis=(1, 2), keepdims=True) + 1e-8)
  return cam, predicted


def gradcam(model: Any, variables: Any, images: np.ndarray, normalization: Normalization,
            layer: str) -> tuple[np.ndarray, np.ndarray]:
  """(Grad-CAM maps (N, H, W) in [0, 1], predicted classes (N,)) at ``layer`` for uint8 images."""
  cam, predicted = _gradcam(model, variables, jnp.asarray(images), jnp.asarray(normalization.mean),
                            jnp.asarray(normalization.std), layer)
  return np.asarray(cam), np.asarray(predicted)


def _show(ax: Any, image: np.ndarray) -> None:
  ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
  ax.set_xticks([])
  ax.set_yticks([])


def plot_gradcam(model: Any, models: Mapping[str, Any], data: Paired, normalization: Normalization,
                 layer: str, path: str | Path, title: str) -> Path:
  """Two rows per image (clean, then triggered); columns: the image, then its Grad-CAM under each
  model of ``models`` (e.g. backdoored, FT, D3), titled with the predicted class."""
  rows = [(kind, i) for i in range(len(data.clean)) for kind in ("clean", "poisoned")]
  maps = {kind: {name: gradcam(model, variables, getattr(data, kind), normalization, layer)
                 for name, variables in models.items()} for kind in ("clean", "poisoned")}
  plt = pyplot()
  fig, axes = plt.subplots(len(rows), 1 + len(models), figsize=(2.1 * (1 + len(models)), 2.1 * len(rows)),
                           squeeze=False)
  for (kind, i), line in zip(rows, axes):
    image = getattr(data, kind)[i]
    _show(line[0], image)
    line[0].set_title(f"{kind}, label {data.label[i]}", fontsize=8)
    for ax, name in zip(line[1:], models):
      cam, predicted = maps[kind][name]
      _show(ax, image)
      ax.imshow(cam[i], cmap="jet", alpha=0.5, vmin=0, vmax=1)
      ax.set_title(f"{name}: predicts {predicted[i]}", fontsize=8)
  fig.suptitle(f"{title}\nGrad-CAM at {layer}", fontsize=10)
  return save(fig, path)
