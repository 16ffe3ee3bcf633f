"""`d3jax import` of a BackdoorBench attack result, `defend`, `export`, and the model back in PyTorch.

The attack result is written here as BackdoorBench lays it out: ``attack_result.pt`` (a torch.save
dict with the model's state dict and the poisoned test set's state) and the poisoned test images as
PNGs in ``bd_test_dataset/<original label>/<index>.png``, with recorded paths from the machine
that made it (they do not exist here, as for a downloaded result).
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from d3jax import cli
from d3jax.rundirs import imported_runs, runs  # noqa: E402
from d3jax.data import load_dataset  # noqa: E402
from d3jax.interop.torch_models import PreActResNet18  # noqa: E402

TARGET = 0


def _stamp(images: np.ndarray) -> np.ndarray:
  """A 3×3 white patch in the bottom-right corner (BadNets)."""
  images = images.copy()
  images[:, -3:, -3:, :] = 255
  return images


def _normalized(images: np.ndarray) -> torch.Tensor:
  scaled = ((images / 255.0 - 0.5) / 0.5).astype(np.float32)
  return torch.from_numpy(np.ascontiguousarray(scaled.transpose(0, 3, 1, 2)))


def _predict(model, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model.eval()(_normalized(images)).argmax(1).numpy()


def _write_result(folder, model, dataset, poison_indicator):
  """attack_result.pt and its PNGs, BackdoorBench's layout (module docstring)."""
  non_target = np.flatnonzero(dataset.y_test != TARGET)
  poisoned = _stamp(dataset.x_test[non_target])
  data_dict = {}
  for index, image in zip(non_target, poisoned):
    label = int(dataset.y_test[index])
    png = folder / "bd_test_dataset" / str(label) / f"{index}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0], mode="L").save(png)
    data_dict[int(index)] = {"path": f"./record/digits_badnets/bd_test_dataset/{label}/{index}.png",
                             "other_info": [TARGET, label]}
  indicator = np.zeros(len(dataset.y_test))
  indicator[non_target] = 1
  container = {"save_folder_path": "./record/digits_badnets/bd_test_dataset",
               "data_dict": data_dict, "save_file_format": ".png"}
  torch.save({"model_name": "preact_resnet18", "num_classes": 10, "model": model.state_dict(),
              "data_path": "./data", "img_size": (16, 16, 1), "clean_data": "digits",
              "bd_train": {"poison_indicator": poison_indicator},
              "bd_test": {"bd_data_container": container, "getitem_all": True,
                          "getitem_all_switch": False, "original_index_array": non_target,
                          "poison_indicator": indicator,
                          "save_folder_path": "./record/digits_badnets/bd_test_dataset"}},
             folder / "attack_result.pt")
  return folder / "attack_result.pt", poisoned


@pytest.fixture(scope="module")
def backdoorbench_result(tmp_path_factory):
  """A BadNets PreAct-ResNet18 (width 8) trained in PyTorch on digits, saved as BackdoorBench does."""
  dataset = load_dataset("digits")
  rng = np.random.default_rng(0)
  chosen = rng.choice(np.flatnonzero(dataset.y_train != TARGET), 143, replace=False)
  x, y = dataset.x_train.copy(), dataset.y_train.copy()
  x[chosen], y[chosen] = _stamp(x[chosen]), TARGET
  indicator = np.zeros(len(y))
  indicator[chosen] = 1
  torch.manual_seed(0)
  # One thread: with two, torch 2.13's CPU training of this model on these images aborts with
  # "double free or corruption" on AMD EPYC (reproduced without JAX in the process).
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  model = PreActResNet18(10, width=8, in_channels=1)
  optimizer = torch.optim.Adam(model.parameters(), 3e-3)
  inputs, labels = _normalized(x), torch.from_numpy(y.astype(np.int64))
  for _ in range(8):
    model.train()
    for batch in torch.randperm(len(y)).split(64):
      optimizer.zero_grad()
      torch.nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
      optimizer.step()
  torch.set_num_threads(threads)
  folder = tmp_path_factory.mktemp("backdoorbench")
  path, poisoned = _write_result(folder, model, dataset, indicator)
  return path, model, dataset, poisoned


@pytest.mark.slow
def test_import_defend_export_round_trip(backdoorbench_result, tmp_path):
  path, model, dataset, poisoned = backdoorbench_result
  torch_acc = float(np.mean(_predict(model, dataset.x_test) == dataset.y_test))
  torch_asr = float(np.mean(_predict(model, poisoned) == TARGET))
  assert torch_acc > 0.8 and torch_asr > 0.9  # the fixture is a working backdoor

  attack_run = tmp_path / "imported"
  assert cli.main(["import", str(path), "--dataset", "digits", "--attack", "badnets",
                   "--out", str(attack_run), "--quiet"]) == 0
  loaded = runs.load(attack_run)
  assert loaded.config["imported"]["model_name"] == "preact_resnet18"
  assert loaded.config["model"]["options"] == {"width": 8}
  # d3jax measures the imported model as PyTorch does.
  assert loaded.metrics["acc"] == pytest.approx(torch_acc, abs=1 / len(dataset.y_test))
  assert loaded.metrics["asr"] == pytest.approx(torch_asr, abs=1 / len(poisoned))

  defended = tmp_path / "d3"
  assert cli.main(["defend", "--attack-run", str(attack_run), "--out", str(defended), "d3",
                   "--epochs", "2", "--batch-size", "32", "--quiet"]) == 0
  measured = runs.load(defended).measure()
  for suffix in (".pt", ".safetensors"):
    exported = tmp_path / f"defended{suffix}"
    assert cli.main(["export", str(defended), "--out", str(exported), "--quiet"]) == 0
    from d3jax import interop
    back = PreActResNet18(10, width=8, in_channels=1)
    back.load_state_dict({k: torch.from_numpy(np.array(v))
                          for k, v in interop.load_torch_checkpoint(exported).items()})
    acc = float(np.mean(_predict(back, dataset.x_test) == dataset.y_test))
    asr = float(np.mean(_predict(back, poisoned) == TARGET))
    assert acc == pytest.approx(measured["acc"], abs=1 / len(dataset.y_test))
    assert asr == pytest.approx(measured["asr"], abs=1 / len(poisoned))


@pytest.mark.slow
def test_import_refuses_a_mismatched_dataset(backdoorbench_result, tmp_path, capsys):
  path = backdoorbench_result[0]
  assert cli.main(["import", str(path), "--dataset", "mnist5k", "--attack", "badnets",
                   "--out", str(tmp_path / "x"), "--quiet"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "--dataset mnist5k does not match" in err
  assert not (tmp_path / "x").exists()


def test_read_attack_result_errors(tmp_path):
  torch.save({"model_name": "resnet50", "num_classes": 10, "model": {}, "bd_test": {}},
             tmp_path / "a.pt")
  with pytest.raises(ValueError, match="'resnet50' has no d3jax counterpart"):
    imported_runs.read_attack_result(tmp_path / "a.pt")
  torch.save({"weights": torch.zeros(1)}, tmp_path / "b.pt")
  with pytest.raises(ValueError, match="has no 'model_name'.*attack_result.pt"):
    imported_runs.read_attack_result(tmp_path / "b.pt")
  state = PreActResNet18(10, width=8).state_dict()
  torch.save({"model_name": "preact_resnet18", "num_classes": 10, "model": state,
              "bd_test": {"bd_data_container": {"data_dict": {}},
                          "original_index_array": np.arange(3), "poison_indicator": np.ones(3)}},
             tmp_path / "c.pt")
  with pytest.raises(ValueError, match="test index 0 has no stored PNG entry"):
    imported_runs.read_attack_result(tmp_path / "c.pt")
