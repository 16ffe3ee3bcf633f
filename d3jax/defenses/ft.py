"""FT — vanilla fine-tuning on the reserved clean set (the baseline of the D3 paper's Table 1).

BackdoorBench's ``defense/ft.py``: SGD lr 0.01, momentum 0.9, weight decay 5e-4 on all parameters,
cosine annealing with T_max = 100 hard-coded and stepped per epoch, 100 epochs, batch 256, BN in
train mode, the last model kept. Deviation: fp32 instead of mixed precision.
"""
from __future__ import annotations

import dataclasses

from d3jax.engine.train import SGDConfig


@dataclasses.dataclass(frozen=True)
class FTConfig(SGDConfig):
  """BackdoorBench's FT defaults. ``learning_rate`` and ``weight_decay`` are sweepable."""
