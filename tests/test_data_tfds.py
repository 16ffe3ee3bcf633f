"""The real tensorflow-datasets path: a tiny array_record dataset prepared here, loaded via ``tfds:``.

No TensorFlow and no network: the builder below writes array_record files, which
``tfds.data_source`` reads. Its train split lacks the last class, so the class count must come from
the ``ClassLabel`` feature, not from the largest label seen.
"""
from __future__ import annotations

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from d3jax import cli, data
from d3jax.rundirs import runs  # noqa: E402

CLASSES = 4


class TinyShapes(tfds.core.GeneratorBasedBuilder):
  """8×8×3 uint8 images, 4 classes; train has classes 0-2 only, test all four."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=CLASSES)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(48, 0, CLASSES - 1),
            "test": self._generate_examples(16, 1, CLASSES)}

  def _generate_examples(self, count: int, seed: int, classes: int):
    rng = np.random.default_rng(seed)
    for index in range(count):
      label = index % classes
      image = rng.integers(0, 64, (8, 8, 3), dtype=np.uint8) + np.uint8(60 * label)
      yield index, {"image": image, "label": label}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tfds")
  TinyShapes(data_dir=str(directory), file_format="array_record").download_and_prepare()
  return directory


def test_prepared_dataset_loads_with_class_label_count(data_dir):
  dataset = data.load_dataset("tfds:tiny_shapes", data_dir=str(data_dir))
  assert dataset.num_classes == CLASSES  # the ClassLabel's, though train has labels 0-2 only
  assert int(dataset.y_train.max()) == CLASSES - 2  # the last class is absent from train
  assert dataset.x_train.shape == (48, 8, 8, 3) and dataset.x_train.dtype == np.uint8
  assert dataset.x_test.shape == (16, 8, 8, 3)
  np.testing.assert_array_equal(np.bincount(dataset.y_test), [4, 4, 4, 4])
  sliced = data.load_dataset("tfds:tiny_shapes@train[:50%],test", data_dir=str(data_dir))
  assert len(sliced.x_train) == 24 and sliced.num_classes == CLASSES


@pytest.mark.slow
def test_attack_run_on_a_tfds_dataset(data_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
  out = tmp_path / "run"
  assert cli.main(["attack", "--dataset", "tfds:tiny_shapes", "--model-options", "width", "4",
                   "--epochs", "1", "--batch-size", "16", "--out", str(out), "--quiet"]) == 0
  loaded = runs.load(out)
  assert loaded.config["dataset"]["num_classes"] == CLASSES
  assert loaded.config["model"]["num_classes"] == CLASSES
