"""d3jax.interop: parity with BackdoorBench's PyTorch models both ways, safe checkpoint loading."""
from __future__ import annotations

import pickle
import zipfile

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from d3jax import interop  # noqa: E402
from d3jax.models import get_model  # noqa: E402
from d3jax.interop.torch_models import (VGG, PreActResNet18, SmallCNN, VisionTransformer,
                                       randomize_batch_norm)  # noqa: E402

# (d3jax name, d3jax options, PyTorch builder): CPU-sized widths, the published parameter names.
CASES = {
    "preact_resnet18": ({"width": 8}, lambda c, ch: PreActResNet18(c, width=8, in_channels=ch)),
    "vgg19_bn": ({"width": 8, "hidden": 32},
                 lambda c, ch: VGG(19, True, c, width=8, hidden=32, in_channels=ch)),
    "vgg11": ({"width": 8, "hidden": 32},
              lambda c, ch: VGG(11, False, c, width=8, hidden=32, in_channels=ch)),
    "small_cnn": ({"width": 8}, lambda c, ch: SmallCNN(c, width=8, in_channels=ch)),
}


def _images(channels: int = 3, n: int = 4, size: int = 32) -> np.ndarray:
  return np.random.default_rng(1).normal(size=(n, size, size, channels)).astype(np.float32)


def _torch_logits(model, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def _jax_logits(name: str, options: dict, variables, images: np.ndarray, classes: int):
  return np.asarray(get_model(name, classes, **options).apply(variables, images, train=False))


def _relative(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name", list(CASES))
def test_torch_to_d3jax_same_logits(name):
  options, build = CASES[name]
  torch.manual_seed(0)
  model = randomize_batch_norm(build(10, 3))
  variables = interop.from_torch_state_dict(name, model.state_dict(), 10, **options)
  images = _images()
  expected = _torch_logits(model, images)
  assert _relative(_jax_logits(name, options, variables, images, 10), expected) <= 1e-4


@pytest.mark.parametrize("name", list(CASES))
def test_d3jax_to_torch_same_logits(name):
  options, build = CASES[name]
  model = get_model(name, 7, **options)
  images = _images()
  variables = model.init(jax.random.key(3), images, train=False)
  # Every leaf perturbed (positive for variances), so BN statistics and biases are non-trivial.
  rng = np.random.default_rng(2)
  variables = jax.tree.map(lambda v: v + 0.1 * rng.random(v.shape, np.float32), variables)
  state = interop.to_torch_state_dict(name, variables, **options)
  torch_model = build(7, 3)
  torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  expected = _jax_logits(name, options, variables, images, 7)
  assert _relative(_torch_logits(torch_model, images), expected) <= 1e-4


def test_one_channel_and_dataparallel_prefix():
  torch.manual_seed(1)
  model = randomize_batch_norm(PreActResNet18(10, width=8, in_channels=1))
  wrapped = torch.nn.DataParallel(model)
  assert all(key.startswith("module.") for key in wrapped.state_dict())
  variables = interop.from_torch_state_dict("preact_resnet18", wrapped.state_dict(), 10, width=8)
  images = _images(channels=1, size=16)
  assert _relative(_jax_logits("preact_resnet18", {"width": 8}, variables, images, 10),
                   _torch_logits(model, images)) <= 1e-4


def test_round_trip_is_exact():
  torch.manual_seed(2)
  state = randomize_batch_norm(VGG(19, True, 5, width=8, hidden=32)).state_dict()
  variables = interop.from_torch_state_dict("vgg19_bn", state, 5, width=8, hidden=32)
  back = interop.to_torch_state_dict("vgg19_bn", variables, width=8, hidden=32)
  assert set(back) == set(state)
  for key, value in state.items():
    if not key.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_files_round_trip(tmp_path, suffix):
  torch.manual_seed(3)
  model = randomize_batch_norm(PreActResNet18(10, width=8))
  path = tmp_path / f"model{suffix}"
  variables = interop.from_torch_state_dict("preact_resnet18", model.state_dict(), 10, width=8)
  interop.save_torch_state_dict(path, interop.to_torch_state_dict("preact_resnet18", variables))
  loaded = interop.load_torch_checkpoint(path)
  restored = PreActResNet18(10, width=8)
  restored.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in loaded.items()})
  images = _images()
  np.testing.assert_allclose(_torch_logits(restored, images), _torch_logits(model, images),
                             rtol=1e-5, atol=1e-5)


def test_torch_save_read_without_torch_unpickler(tmp_path):
  """Tensors of several dtypes, a non-contiguous view, numpy arrays and nested containers."""
  base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
  obj = {"a": base.t(), "b": torch.tensor([1, 2], dtype=torch.int64), "half": torch.ones(3).half(),
         "flag": torch.tensor(True), "nested": [{"x": np.arange(5, dtype=np.int16)}, (1, "s")],
         "scalar": torch.tensor(2.5)}
  torch.save(obj, tmp_path / "obj.pt")
  loaded = interop.load_torch_checkpoint(tmp_path / "obj.pt")
  np.testing.assert_array_equal(loaded["a"], base.t().numpy())
  assert loaded["b"].dtype == np.int64 and loaded["half"].dtype == np.float16
  assert bool(loaded["flag"]) and float(loaded["scalar"]) == 2.5
  np.testing.assert_array_equal(loaded["nested"][0]["x"], np.arange(5))
  assert loaded["nested"][1] == (1, "s")


class _Exploit:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (open, (str(self.target), "w"))


def test_malicious_pickle_refused_unexecuted(tmp_path):
  target = tmp_path / "pwned"
  torch.save({"weights": torch.zeros(2), "payload": _Exploit(target)}, tmp_path / "evil.pt",
             pickle_module=pickle)
  with pytest.raises(interop.UnsafeCheckpointError,
                     match=r"refusing to unpickle io\.open.*nothing was executed"):
    interop.load_torch_checkpoint(tmp_path / "evil.pt")
  assert not target.exists()


def test_truncated_and_foreign_files_are_one_line(tmp_path):
  torch.save(PreActResNet18(10, width=8).state_dict(), tmp_path / "ok.pt")
  data = (tmp_path / "ok.pt").read_bytes()
  (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
  (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
  for name in ("cut.pt", "cut.safetensors"):
    with pytest.raises(ValueError, match="truncated") as error:
      interop.load_torch_checkpoint(tmp_path / name)
    assert "\n" not in str(error.value)
  with pytest.raises(FileNotFoundError, match="no checkpoint file"):
    interop.load_torch_checkpoint(tmp_path / "absent.pt")
  with zipfile.ZipFile(tmp_path / "other.pt", "w") as archive:
    archive.writestr("readme.txt", "not a model")
  with pytest.raises(ValueError, match="one data.pkl"):
    interop.load_torch_checkpoint(tmp_path / "other.pt")


def test_mismatched_state_dicts_are_one_line():
  state = PreActResNet18(10, width=8).state_dict()
  with pytest.raises(ValueError, match=r"no 4-D features\.0\.weight.*vgg19_bn checkpoint"):
    interop.from_torch_state_dict("vgg19_bn", state, 10, width=8, hidden=32)
  missing = dict(state)
  del missing["layer3.1.bn2.running_var"]
  with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\) \(layer3\.1\.bn2\.running_var\)"):
    interop.from_torch_state_dict("preact_resnet18", missing, 10, width=8)
  extra = {**state, "head.weight": torch.zeros(3)}
  with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \(head\.weight\)"):
    interop.from_torch_state_dict("preact_resnet18", extra, 10, width=8)
  with pytest.raises(ValueError, match=r"linear\.weight has shape \(10, 64\).*\(5, 64\)"):
    interop.from_torch_state_dict("preact_resnet18", state, 5, width=8)
  with pytest.raises(ValueError, match=r"conv1\.weight has shape \(8, 3, 3, 3\).*\(16, 3, 3, 3\)"):
    interop.from_torch_state_dict("preact_resnet18", state, 10, width=16)
  with pytest.raises(ValueError, match="unknown model 'resnet50'"):
    interop.from_torch_state_dict("resnet50", state, 10)


def test_interop_reachable_after_import_d3jax():
  import d3jax
  assert d3jax.interop.from_torch_state_dict is interop.from_torch_state_dict
  assert callable(d3jax.analysis.path_curves)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["preact_resnet18", "vgg19_bn"])
def test_published_sizes_parity_both_ways(name):
  """The paper's models at their published sizes (11.2M and 139.6M parameters)."""
  torch.manual_seed(4)
  model = randomize_batch_norm(PreActResNet18(10) if name == "preact_resnet18" else VGG(19))
  variables = interop.from_torch_state_dict(name, model.state_dict(), 10)
  images = _images(n=2)
  expected = _torch_logits(model, images)
  assert _relative(_jax_logits(name, {}, variables, images, 10), expected) <= 1e-4
  back = PreActResNet18(10) if name == "preact_resnet18" else VGG(19)
  back.load_state_dict({k: torch.from_numpy(v)
                        for k, v in interop.to_torch_state_dict(name, variables).items()})
  assert _relative(_torch_logits(back, images), expected) <= 1e-4


VIT = {"patch_size": 4, "width": 16, "depth": 2, "heads": 4, "mlp_dim": 32}


def _torch_vit(classes: int = 5) -> "torch.nn.Module":
  torch.manual_seed(5)
  model = VisionTransformer(16, 4, 16, 2, 4, 32, classes)
  with torch.no_grad():  # torchvision zero-initialises the head; make the logits informative
    model.heads.head.weight.normal_()
  return model


def test_vit_parity_both_ways_in_torchvisions_names():
  model = _torch_vit()
  images = _images(size=16)
  # BackdoorBench wraps the ViT as Sequential(Resize, vit): its keys carry a "1." prefix.
  state = {f"1.{k}": v for k, v in model.state_dict().items()}
  assert interop.infer_model_options("vit", state) == {k: v for k, v in VIT.items() if k != "heads"}
  variables = interop.from_torch_state_dict("vit", state, 5, **VIT)
  expected = _torch_logits(model, images)
  assert _relative(_jax_logits("vit", VIT, variables, images, 5), expected) <= 1e-4
  back = VisionTransformer(16, 4, 16, 2, 4, 32, 5)
  back.load_state_dict({k: torch.from_numpy(v)
                        for k, v in interop.to_torch_state_dict("vit", variables, **VIT).items()})
  assert _relative(_torch_logits(back, images), expected) <= 1e-4
  with pytest.raises(ValueError, match="pos_embedding has shape"):
    interop.from_torch_state_dict("vit", state, 5, **VIT, resize=32)
