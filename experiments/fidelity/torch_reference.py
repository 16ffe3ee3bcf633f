"""D3, FT and FT-SAM as complete defenses in PyTorch, independent of d3jax, for the differential run.

Written from the papers and from the documented behaviour of the released code (BackdoorBench's
``defense/ft.py`` and ``defense/ft-sam.py``, the official ``defense/d3.py``), not from d3jax and not
copied from either. Shared by all three: the reserved set shuffled every epoch into batches of 256
with the last one smaller (``drop_last=False``), a random crop with 4 pixels of zero padding applied
to the uint8 image before normalisation (no flip unless asked), BN in train mode, the last model
kept, float32.

* D3 (D3 paper Eq. (4); supplement Algorithm 1; the official step order): the selected weights
  (the classifier's ``linear.weight``) start from U(−0.5, 0.5) rescaled to their original Frobenius
  norm (the ``random`` warm-up); each step minimises (λ·L_c − D)/(λ + 1) if λ > 1 else λ·L_c − D,
  with L_c = mean_i max(0, CE_i − ε) and D = Σ_l ‖W_l − W0_l‖_F; SGD (lr 0.01, momentum 0.9, no
  weight decay) over every parameter, then each selected weight rescaled onto ‖W0_l‖; cosine
  annealing with T_max = epochs stepped per epoch.
* FT: cross-entropy, SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine T_max = 100 per epoch.
* FT-SAM (Zhu et al., ICCV 2023, Algorithm 1, as BackdoorBench runs it): ASAM with ρ = 2 around the
  FT optimizer, label smoothing 0.1 (1 − s on the label, s/(C − 1) elsewhere), the perturbation
  e = ρ·w²⊙g / (‖|w|⊙g‖ + 1e-12) over all parameters, the second pass with BN momentum 0 (running
  statistics frozen), the cosine (T_max = 100) stepped every iteration.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def normalized(images: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float]
               ) -> torch.Tensor:
  """uint8 NHWC → float NCHW, ``(x/255 − mean)/std`` (ToTensor then Normalize), C-contiguous."""
  x = torch.as_tensor(np.asarray(images)).float() / 255.0
  x = (x - torch.tensor(mean)) / torch.tensor(std)
  return x.permute(0, 3, 1, 2).contiguous()


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
  """Per-image random crop of uint8 NHWC images zero-padded by ``padding`` (RandomCrop(pad))."""
  if padding == 0:
    return images
  n, h, w, _ = images.shape
  padded = F.pad(images.permute(0, 3, 1, 2), (padding,) * 4).permute(0, 2, 3, 1)
  offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
  return torch.stack([padded[i, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, padding: int,
            flip: bool, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
  """One epoch: a shuffled pass in batches of ``batch_size`` (the last one smaller), augmented."""
  order = torch.randperm(len(labels), generator=generator)
  for index in order.split(batch_size):
    x = random_crop(images[index], padding, generator)
    if flip:
      mirror = torch.rand(len(index), generator=generator) < 0.5
      x = torch.where(mirror[:, None, None, None], x.flip(2), x)
    yield x, labels[index]


def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
  return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class Reserved:
  """The defender's data and how a step sees it."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, mean: Sequence[float],
               std: Sequence[float], padding: int = 4, flip: bool = False):
    self.images = torch.as_tensor(np.asarray(images))
    self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    self.mean, self.std, self.padding, self.flip = mean, std, padding, flip

  def epoch(self, batch_size: int, generator: torch.Generator):
    for x, y in batches(self.images, self.labels, batch_size, self.padding, self.flip, generator):
      yield normalized(x, self.mean, self.std), y


def _train(model: nn.Module, reserved: Reserved, epochs: int, batch_size: int, seed: int,
           step: Callable[[torch.Tensor, torch.Tensor, int], None],
           end_epoch: Callable[[int], None]) -> nn.Module:
  generator = torch.Generator().manual_seed(seed)
  for epoch in range(epochs):
    model.train()
    for x, y in reserved.epoch(batch_size, generator):
      step(x, y, epoch)
    end_epoch(epoch)
  return model.eval()


def d3(model: nn.Module, reserved: Reserved, *, lmd: float = 10.0, eps: float = 0.1,
       selected: Sequence[str] = ("linear.weight",), epochs: int = 100, batch_size: int = 256,
       learning_rate: float = 0.01, seed: int = 0) -> nn.Module:
  """D3 in place on ``model`` (module docstring); returns it in eval mode."""
  torch.manual_seed(seed)
  named = dict(model.named_parameters())
  weights = [named[name] for name in selected]
  originals = [w.detach().clone() for w in weights]
  norms = [w.norm() for w in originals]
  with torch.no_grad():
    for w, target in zip(weights, norms):
      w.uniform_(-0.5, 0.5)
      w.mul_(target / w.norm())
  optimizer = torch.optim.SGD(model.parameters(), learning_rate, momentum=0.9, weight_decay=0.0)
  scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)

  def step(x, y, epoch):
    clean = torch.clamp(F.cross_entropy(model(x), y, reduction="none") - eps, min=0).mean()
    distance = sum((w - w0).norm() for w, w0 in zip(weights, originals))
    loss = (lmd * clean - distance) / (lmd + 1) if lmd > 1 else lmd * clean - distance
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
      for w, target in zip(weights, norms):
        w.mul_(target / w.norm())

  return _train(model, reserved, epochs, batch_size, seed, step, lambda _: scheduler.step())


def ft(model: nn.Module, reserved: Reserved, *, epochs: int = 100, batch_size: int = 256,
       learning_rate: float = 0.01, weight_decay: float = 5e-4, t_max: int = 100, seed: int = 0
       ) -> nn.Module:
  """Vanilla fine-tuning in place (module docstring); returns the model in eval mode."""
  torch.manual_seed(seed)
  optimizer = torch.optim.SGD(model.parameters(), learning_rate, momentum=0.9,
                              weight_decay=weight_decay)
  scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)

  def step(x, y, epoch):
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()

  return _train(model, reserved, epochs, batch_size, seed, step, lambda _: scheduler.step())


def ft_sam(model: nn.Module, reserved: Reserved, *, epochs: int = 100, batch_size: int = 256,
           learning_rate: float = 0.01, weight_decay: float = 5e-4, t_max: int = 100,
           rho: float = 2.0, smoothing: float = 0.1, seed: int = 0) -> nn.Module:
  """FT-SAM in place (module docstring); returns the model in eval mode."""
  torch.manual_seed(seed)
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.SGD(params, learning_rate, momentum=0.9, weight_decay=weight_decay)
  scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)
  norms = _bn_modules(model)

  def loss_of(logits, y):
    classes = logits.shape[-1]
    onehot = F.one_hot(y, classes).float()
    target = onehot * (1 - smoothing) + (1 - onehot) * smoothing / (classes - 1)
    return -(target * F.log_softmax(logits, -1)).sum(-1).mean()

  def step(x, y, epoch):
    optimizer.zero_grad()
    loss_of(model(x), y).backward()
    with torch.no_grad():
      grad_norm = torch.norm(torch.stack([(p.abs() * p.grad).norm() for p in params
                                          if p.grad is not None]))
      scale = rho / (grad_norm + 1e-12)
      moves = []
      for p in params:
        move = torch.zeros_like(p) if p.grad is None else p.pow(2) * p.grad * scale
        p.add_(move)
        moves.append(move)
    optimizer.zero_grad()
    saved = [m.momentum for m in norms]
    for m in norms:
      m.momentum = 0.0
    loss_of(model(x), y).backward()
    for m, momentum in zip(norms, saved):
      m.momentum = momentum
    with torch.no_grad():
      for p, move in zip(params, moves):
        p.sub_(move)
    optimizer.step()
    scheduler.step()

  return _train(model, reserved, epochs, batch_size, seed, step, lambda _: None)


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, mean: Sequence[float], std: Sequence[float],
            batch_size: int = 500) -> np.ndarray:
  """Eval-mode predicted classes of uint8 NHWC ``images``."""
  model.eval()
  out = [model(normalized(images[i:i + batch_size], mean, std)).argmax(1).numpy()
         for i in range(0, len(images), batch_size)]
  return np.concatenate(out) if out else np.zeros(0, np.int64)


DEFENSES: dict[str, Callable[..., nn.Module]] = {
    "d3-paper": lambda model, reserved, seed, epochs: d3(model, reserved, lmd=10.0, seed=seed,
                                                          epochs=epochs),
    "d3-official": lambda model, reserved, seed, epochs: d3(model, reserved, lmd=0.5, seed=seed,
                                                             epochs=epochs),
    "ft": lambda model, reserved, seed, epochs: ft(model, reserved, seed=seed, epochs=epochs),
    "ft-sam": lambda model, reserved, seed, epochs: ft_sam(model, reserved, seed=seed,
                                                           epochs=epochs),
}
