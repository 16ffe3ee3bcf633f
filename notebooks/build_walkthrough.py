"""Builds and executes notebooks/walkthrough.ipynb (needs: pip install -e ".[notebooks]").

Run from the repository root:  .venv/bin/python notebooks/build_walkthrough.py
"""
from pathlib import Path

import nbformat
from nbclient import NotebookClient

CELLS = [
    ("md", "# d3jax walkthrough: backdoor a model, detoxify it with D3\n\n"
           "Everything here runs offline on scikit-learn's digits (16×16 after upsampling), in about a "
           "minute on a laptop CPU. The defense sees only the model and a small clean reserved set."),
    ("code", "import jax\nimport numpy as np\nfrom d3jax import data, models, attacks, defenses, metrics, pipeline, optim\n"
             "from d3jax.attacks.training import AttackTrainConfig, train_backdoored\n"
             "from d3jax.train import Normalization\n\n"
             "ds = data.load_dataset('digits')\nnorm = Normalization(ds.mean, ds.std)\n"
             "print(ds.x_train.shape, ds.x_test.shape, ds.num_classes)"),
    ("md", "## 1. Poison 10% of the training set with BadNets (all-to-one, target 0) and train\n\n"
           "On 16×16 images the 2×2 patch is a large part of the border, so training crops use padding 1 "
           "instead of 4 (with padding 4 the patch is often cropped away and the backdoor is learned slowly)."),
    ("code", "trigger = attacks.get_trigger('badnets', ds.image_shape)\n"
             "train_set, bd_test = attacks.poison_dataset(ds, trigger, ratio=0.1, target=0, key=jax.random.key(0))\n"
             "print('poisoned training images:', int(train_set.is_poison.sum()), '| backdoor test set:', len(bd_test.x))\n"
             "model = models.get_model('small_cnn', ds.num_classes, width=8)\n"
             "config = AttackTrainConfig(epochs=10, learning_rate=0.1, batch_size=64, cosine_t_max=10, crop_padding=1)\n"
             "backdoored, losses = train_backdoored(model, train_set, norm, config, jax.random.key(1), progress=False)\n"
             "from d3jax.evaluation import evaluate\n"
             "before = evaluate(model, backdoored, ds.x_test, ds.y_test, bd_test, norm)\nbefore"),
    ("md", "## 2. Defend with FT and D3 on a 10% clean reserved set\n\n"
           "D3's `paper` preset: λ = 10, ε = 0.1, Frobenius distance on the head `linear/kernel`, random warm-up."),
    ("code", "idx = data.draw_reserved(ds.y_train, 0.10, jax.random.key(2))\n"
             "x_res, y_res = ds.x_train[idx], ds.y_train[idx]\nrows = [pipeline.table_row('badnets', 'none', before)]\n"
             "for name, cfg in [('ft', defenses.FTConfig(batch_size=32)), ('d3', defenses.D3Config.preset('paper', batch_size=32))]:\n"
             "    defended, log = defenses.defend(name, model, backdoored, x_res, y_res, normalization=norm,\n"
             "                                    key=jax.random.key(3), config=cfg, progress=False)\n"
             "    rows.append(pipeline.table_row('badnets', name, evaluate(model, defended, ds.x_test, ds.y_test, bd_test, norm), before))\n"
             "    if name == 'd3':\n        d3_variables = defended\n"
             "print(pipeline.format_table(rows))"),
    ("md", "## 3. What D3 did to the head\n\nThe head kept its norm (projection after every step) and moved far from its backdoored value."),
    ("code", "W0, W = backdoored['params']['linear']['kernel'], d3_variables['params']['linear']['kernel']\n"
             "print('‖W0‖ =', float(optim.tensor_norm(W0, 'fro')), ' ‖W‖ =', float(optim.tensor_norm(W, 'fro')))\n"
             "print('‖W − W0‖ =', float(optim.distance(d3_variables['params'], backdoored['params'], 'linear/kernel')))"),
]


def main() -> None:
  notebook = nbformat.v4.new_notebook()
  notebook.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                    for kind, src in CELLS]
  NotebookClient(notebook, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(Path.cwd())}}).execute()
  out = Path(__file__).with_name("walkthrough.ipynb")
  nbformat.write(notebook, out)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
