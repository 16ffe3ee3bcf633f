"""BackdoorBench's PyTorch classifiers, to load an exported d3jax model into PyTorch (needs PyTorch:
``pip install 'd3jax[torch]'``; nothing else in d3jax imports this module).

``PreActResNet18`` follows BackdoorBench's ``models/preact_resnet.py`` (a stem conv with no BN
after it, pre-activation blocks whose 1×1 shortcut is ``shortcut.0``, global average pooling,
``linear``); ``VGG`` follows torchvision's ``vgg19_bn``/``vgg11`` (``features``, 7×7 adaptive
pooling, ``classifier.0/3/6``); ``SmallCNN`` is d3jax's ``small_cnn`` (not a BackdoorBench model) under
the names :func:`d3jax.interop.to_torch_state_dict` gives it. ``width`` and ``hidden`` shrink them
(64 and 4096 are the published sizes); the parameter names do not depend on them. Written from
the architectures' descriptions (BackdoorBench's ``models/preact_resnet.py``, torchvision's VGG).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

VGG_LAYOUTS = {
    11: (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"),
    19: (1, 1, "M", 2, 2, "M", 4, 4, 4, 4, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8, "M"),
}


class PreActBlock(nn.Module):

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=1, bias=False)
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(x))
    shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
    out = self.conv2(F.relu(self.bn2(self.conv1(out))))
    return out + shortcut


class PreActResNet18(nn.Module):

  def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, width, 3, 1, padding=1, bias=False)
    in_planes = width
    for stage, (multiple, stride) in enumerate(zip((1, 2, 4, 8), (1, 2, 2, 2)), start=1):
      blocks = []
      for index in range(2):
        blocks.append(PreActBlock(in_planes, width * multiple, stride if index == 0 else 1))
        in_planes = width * multiple
      setattr(self, f"layer{stage}", nn.Sequential(*blocks))
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.linear = nn.Linear(in_planes, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.conv1(x)
    for stage in range(1, 5):
      out = getattr(self, f"layer{stage}")(out)
    return self.linear(torch.flatten(self.avgpool(out), 1))


class VGG(nn.Module):

  def __init__(self, depth: int = 19, batch_norm: bool = True, num_classes: int = 10,
               width: int = 64, hidden: int = 4096, in_channels: int = 3):
    super().__init__()
    layers: list[nn.Module] = []
    channels = in_channels
    for entry in VGG_LAYOUTS[depth]:
      if entry == "M":
        layers.append(nn.MaxPool2d(2, 2))
        continue
      layers.append(nn.Conv2d(channels, entry * width, 3, padding=1))
      if batch_norm:
        layers.append(nn.BatchNorm2d(entry * width))
      layers.append(nn.ReLU(inplace=True))
      channels = entry * width
    self.features = nn.Sequential(*layers)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(
        nn.Linear(channels * 49, hidden), nn.ReLU(True), nn.Dropout(),
        nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(), nn.Linear(hidden, num_classes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class SmallCNN(nn.Module):
  """d3jax's ``small_cnn``: conv-BN-ReLU ×2, max pool, ×2 at twice the width, max pool, global
  average pool, ``linear``."""

  def __init__(self, num_classes: int = 10, width: int = 32, in_channels: int = 1):
    super().__init__()
    channels = (in_channels, width, width, 2 * width, 2 * width)
    for index in range(1, 5):
      setattr(self, f"conv{index}", nn.Conv2d(channels[index - 1], channels[index], 3, padding=1,
                                              bias=False))
      setattr(self, f"bn{index}", nn.BatchNorm2d(channels[index]))
    self.linear = nn.Linear(2 * width, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for index in range(1, 5):
      x = F.relu(getattr(self, f"bn{index}")(getattr(self, f"conv{index}")(x)))
      if index % 2 == 0:
        x = F.max_pool2d(x, 2)
    return self.linear(x.mean(dim=(2, 3)))


class EncoderBlock(nn.Module):

  def __init__(self, width: int, heads: int, mlp_dim: int):
    super().__init__()
    self.ln_1 = nn.LayerNorm(width, eps=1e-6)
    self.self_attention = nn.MultiheadAttention(width, heads, batch_first=True)
    self.ln_2 = nn.LayerNorm(width, eps=1e-6)
    self.mlp = nn.Sequential(nn.Linear(width, mlp_dim), nn.GELU(), nn.Dropout(0.0),
                             nn.Linear(mlp_dim, width), nn.Dropout(0.0))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.ln_1(x)
    x = x + self.self_attention(y, y, y, need_weights=False)[0]
    return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):

  def __init__(self, tokens: int, width: int, depth: int, heads: int, mlp_dim: int):
    super().__init__()
    self.pos_embedding = nn.Parameter(torch.empty(1, tokens, width).normal_(std=0.02))
    self.layers = nn.Sequential(OrderedDict(
        (f"encoder_layer_{i}", EncoderBlock(width, heads, mlp_dim)) for i in range(depth)))
    self.ln = nn.LayerNorm(width, eps=1e-6)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.ln(self.layers(x + self.pos_embedding))


class VisionTransformer(nn.Module):
  """torchvision's ``VisionTransformer`` layout (``vit_b_16``: image 224, patch 16, width 768,
  depth 12, heads 12, MLP 3072)."""

  def __init__(self, image_size: int = 224, patch_size: int = 16, width: int = 768,
               depth: int = 12, heads: int = 12, mlp_dim: int = 3072, num_classes: int = 10,
               in_channels: int = 3):
    super().__init__()
    self.conv_proj = nn.Conv2d(in_channels, width, patch_size, patch_size)
    self.class_token = nn.Parameter(torch.zeros(1, 1, width))
    self.encoder = Encoder((image_size // patch_size) ** 2 + 1, width, depth, heads, mlp_dim)
    self.heads = nn.Sequential(OrderedDict(head=nn.Linear(width, num_classes)))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.conv_proj(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    return self.heads(self.encoder(x)[:, 0])


def randomize_batch_norm(model: nn.Module, seed: int = 0) -> nn.Module:
  """Non-trivial BN affine parameters and running statistics, so a swapped mean/var or a missed
  BN tensor changes the logits."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        size = module.num_features
        module.weight.copy_(1 + 0.3 * torch.randn(size, generator=generator))
        module.bias.copy_(0.2 * torch.randn(size, generator=generator))
        module.running_mean.copy_(0.2 * torch.randn(size, generator=generator))
        module.running_var.copy_(0.5 + torch.rand(size, generator=generator))
        module.num_batches_tracked.fill_(123)
  return model
