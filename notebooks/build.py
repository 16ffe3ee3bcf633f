"""Builds and executes the notebooks (needs: pip install -e ".[notebooks]").

Run from the repository root:  .venv/bin/python notebooks/build.py
The test suite executes the written notebooks with D3JAX_QUICK=1 (one epoch everywhere).
"""
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

WALKTHROUGH = [
    ("md", "# d3jax walkthrough: backdoor a model, detoxify it with D3\n\n"
           "Everything here runs offline on scikit-learn's digits (16×16 after upsampling), in about a "
           "minute on a laptop CPU. The defense sees only the model and a small clean reserved set."),
    ("code", "import os\nimport tempfile\nimport jax\nimport numpy as np\nfrom d3jax import data, models, attacks, defenses, metrics, optim\nfrom d3jax.workflows import pipeline\n"
             "from d3jax.attacks.training import AttackTrainConfig, train_backdoored\n"
             "from d3jax.engine.train import Normalization\n\n"
             "QUICK = bool(os.environ.get('D3JAX_QUICK'))  # the test suite runs every loop for one epoch\n"
             "ds = data.load_dataset('digits')\nnorm = Normalization(ds.mean, ds.std)\n"
             "print(ds.x_train.shape, ds.x_test.shape, ds.num_classes)"),
    ("md", "## 1. Poison 10% of the training set with BadNets (all-to-one, target 0) and train\n\n"
           "On 16×16 images the 2×2 patch is a large part of the border, so training crops use padding 1 "
           "instead of 4 (with padding 4 the patch is often cropped away and the backdoor is learned slowly)."),
    ("code", "trigger = attacks.get_trigger('badnets', ds.image_shape)\n"
             "train_set, bd_test = attacks.poison_dataset(ds, trigger, ratio=0.1, target=0, key=jax.random.key(0))\n"
             "print('poisoned training images:', int(train_set.is_poison.sum()), '| backdoor test set:', len(bd_test.x))\n"
             "model = models.get_model('small_cnn', ds.num_classes, width=8)\n"
             "epochs = 1 if QUICK else 10\n"
             "config = AttackTrainConfig(epochs=epochs, learning_rate=0.1, batch_size=64, cosine_t_max=epochs, crop_padding=1)\n"
             "backdoored, losses = train_backdoored(model, train_set, norm, config, jax.random.key(1), progress=False)\n"
             "from d3jax.workflows.evaluation import evaluate\n"
             "before = evaluate(model, backdoored, ds.x_test, ds.y_test, bd_test, norm)\nbefore"),
    ("md", "## 2. Defend with FT and D3 on a 10% clean reserved set\n\n"
           "D3's `paper` preset: λ = 10, ε = 0.1, Frobenius distance on the head `linear/kernel`, random warm-up."),
    ("code", "idx = data.draw_reserved(ds.y_train, 0.10, jax.random.key(2))\n"
             "x_res, y_res = ds.x_train[idx], ds.y_train[idx]\nrows = [pipeline.table_row('badnets', 'none', before)]\n"
             "epochs = 1 if QUICK else 100\n"
             "for name, cfg in [('ft', defenses.FTConfig(batch_size=32, epochs=epochs)), ('d3', defenses.D3Config.preset('paper', batch_size=32, epochs=epochs))]:\n"
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


NNX_EQUINOX = [
    ("md", "# `d3jax.optim.d3` on a flax.nnx model and on an equinox model\n\n"
           "The D3 optimizer is an optax transformation over a pytree of parameters, so it works with any "
           "JAX model library. It needs the parameters as a plain pytree whose '/'-joined paths name the "
           "tensors to push away from their reference (`select`), and the reference weights in the same "
           "structure. Here both models are trained for a few steps on random data with the clean hinge loss."),
    ("code", "import os\nimport equinox as eqx\nimport jax\nimport jax.numpy as jnp\nimport optax\nfrom flax import nnx\n"
             "import d3jax\n\n"
             "STEPS = 5 if os.environ.get('D3JAX_QUICK') else 100\n"
             "x = jax.random.normal(jax.random.key(0), (256, 64))                # your reserved clean inputs\n"
             "y = jax.random.randint(jax.random.key(1), (256,), 0, 10)           # and their labels"),
    ("md", "## flax.nnx\n\n"
           "Split the module into its graph and its state and turn the state into a pure dict "
           "(`nnx.to_pure_dict`): paths then read `head/kernel`. `nnx.merge` accepts the pure dict back "
           "inside the loss. (An `nnx.State` itself holds `nnx.Variable` wrappers, which the selection "
           "mask cannot use: pass the pure dict.)"),
    ("code", "class Net(nnx.Module):\n"
             "  def __init__(self, rngs):\n"
             "    self.body = nnx.Linear(64, 32, rngs=rngs)\n"
             "    self.head = nnx.Linear(32, 10, rngs=rngs)\n\n"
             "  def __call__(self, x):\n"
             "    return self.head(nnx.relu(self.body(x)))\n\n"
             "graphdef, state = nnx.split(Net(nnx.Rngs(0)))\n"
             "params = reference = nnx.to_pure_dict(state)                      # the possibly backdoored weights\n"
             "tx = d3jax.optim.d3(reference=reference, select='head/kernel', learning_rate=0.05, lmd=10.0)\n"
             "opt_state = tx.init(params)\n\n"
             "@jax.jit\n"
             "def nnx_step(params, opt_state):\n"
             "  def clean_loss(p):\n"
             "    ce = optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), y)\n"
             "    return d3jax.optim.clean_hinge(ce, eps=0.1)\n"
             "  updates, opt_state = tx.update(jax.grad(clean_loss)(params), opt_state, params)\n"
             "  return optax.apply_updates(params, updates), opt_state\n\n"
             "for _ in range(STEPS):\n"
             "  params, opt_state = nnx_step(params, opt_state)\n"
             "model = nnx.merge(graphdef, params)                                 # the detoxified module\n"
             "norm = d3jax.optim.tensor_norm\n"
             "print('distance moved:', float(d3jax.optim.distance(params, reference, 'head/kernel')))\n"
             "print('head norm kept:', float(norm(params['head']['kernel'], 'fro')), float(norm(reference['head']['kernel'], 'fro')))"),
    ("md", "## equinox\n\n"
           "`eqx.partition(model, eqx.is_array)` gives the parameter pytree; its paths are the attribute "
           "names, so the head's weight is `head/weight`."),
    ("code", "class EqxNet(eqx.Module):\n"
             "  body: eqx.nn.Linear\n"
             "  head: eqx.nn.Linear\n\n"
             "  def __init__(self, key):\n"
             "    body_key, head_key = jax.random.split(key)\n"
             "    self.body = eqx.nn.Linear(64, 32, key=body_key)\n"
             "    self.head = eqx.nn.Linear(32, 10, key=head_key)\n\n"
             "  def __call__(self, x):\n"
             "    return jax.vmap(lambda v: self.head(jax.nn.relu(self.body(v))))(x)\n\n"
             "params, static = eqx.partition(EqxNet(jax.random.key(2)), eqx.is_array)\n"
             "reference = params\n"
             "tx = d3jax.optim.d3(reference=reference, select='head/weight', learning_rate=0.05, lmd=10.0)\n"
             "opt_state = tx.init(params)\n\n"
             "@eqx.filter_jit\n"
             "def eqx_step(params, opt_state):\n"
             "  def clean_loss(p):\n"
             "    ce = optax.softmax_cross_entropy_with_integer_labels(eqx.combine(p, static)(x), y)\n"
             "    return d3jax.optim.clean_hinge(ce, eps=0.1)\n"
             "  updates, opt_state = tx.update(jax.grad(clean_loss)(params), opt_state, params)\n"
             "  return eqx.apply_updates(params, updates), opt_state\n\n"
             "for _ in range(STEPS):\n"
             "  params, opt_state = eqx_step(params, opt_state)\n"
             "print('distance moved:', float(d3jax.optim.distance(params, reference, 'head/weight')))\n"
             "print('head norm kept:', float(norm(params.head.weight, 'fro')), float(norm(reference.head.weight, 'fro')))"),
]

ANALYSES = [
    ("md", "# The D3 paper's analyses on a small backdoored model\n\n"
           "A BadNets model on scikit-learn's digits, defended with FT and with D3; then the pictures of the "
           "paper: loss and accuracy along the path from the backdoored to the defended weights (Figure 2), "
           "weight changes (Figure 3c), t-SNE of penultimate features (Figure 3a/b), Grad-CAM (supplement "
           "Figure 3), neuron norm vs trigger-activation change (FT-SAM paper, Figure 4), and a λ × ε grid "
           "(Tables 6–7) trained as one vmapped program. Every analysis except the weight histogram reads the "
           "backdoor test set: they are evaluation tools, no defense calls them. The same pictures come from "
           "the command line: `d3jax analyze ATTACK_RUN --defended FT_RUN D3_RUN`."),
    ("code", "import os\nimport tempfile\nimport jax\nimport numpy as np\nfrom IPython.display import Image, display\n"
             "from d3jax import analysis, metrics\nfrom d3jax.workflows import pipeline\nfrom d3jax.workflows.sweep import aggregate, sweep\nfrom d3jax.attacks.training import AttackTrainConfig\n"
             "from d3jax.defenses import D3Config, FTConfig\n\n"
             "QUICK = bool(os.environ.get('D3JAX_QUICK'))  # the test suite runs everything for one epoch\n"
             "epochs = 1 if QUICK else 12\n"
             "run = pipeline.AttackRun(dataset='digits', model_options={'width': 8}, attack='badnets', ratio=0.1,\n"
             "                         train=AttackTrainConfig(epochs=epochs, learning_rate=0.05, batch_size=64,\n"
             "                                                 cosine_t_max=epochs, crop_padding=1))\n"
             "backdoored = pipeline.attack(run, progress=False)\n"
             "model, initial, norm = backdoored.model, backdoored.variables, backdoored.normalization\n"
             "rows = [pipeline.table_row('badnets', 'none', backdoored.baseline)]\n"
             "defended = {}\n"
             "for name, config in [('ft', FTConfig(epochs=1 if QUICK else 20, batch_size=32, crop_padding=1)),\n"
             "                     ('d3', D3Config(epochs=1 if QUICK else 20, batch_size=32, crop_padding=1))]:\n"
             "    row, defended[name], _ = pipeline.defense_row(backdoored, name, config, reserved_ratio=0.1, progress=False)\n"
             "    rows.append(row)\n"
             "print(pipeline.format_table(rows))\n"
             "out = tempfile.mkdtemp() if QUICK else 'analyses_out'  # the PNGs land here"),
    ("md", "## Path curves (Figure 2)\n\n"
           "θ_t = θ_init + t·(θ_def − θ_init) for t ∈ [0, 2]; every t is evaluated in one `jax.vmap`. FT stays "
           "where the backdoor loss is low; D3's path leaves that region, and going on beyond t = 1 raises the "
           "backdoor loss further."),
    ("code", "data, bd = backdoored.dataset, backdoored.backdoor_test\n"
             "curves = {name: analysis.path_curves(model, initial, v, (data.x_test, data.y_test), (bd.x, bd.y), norm,\n"
             "                                     ts=np.linspace(0, 2, 11 if QUICK else 41))\n"
             "          for name, v in defended.items()}\n"
             "display(Image(analysis.plot_paths(curves, f'{out}/path.png', 'badnets: along θ_init + t·(θ_def − θ_init)')))"),
    ("md", "## Weight changes of the head (Figure 3c)"),
    ("code", "display(Image(analysis.plot_weight_differences(initial, defended, 'linear/kernel', f'{out}/weights.png',\n"
             "                                                'badnets: θ_def − θ_init of linear/kernel')))"),
    ("md", "## t-SNE of penultimate features (Figure 3a/b)\n\nDots are clean test images, crosses the same images "
           "with the trigger, coloured by their true class."),
    ("code", "pairs = analysis.paired(backdoored)\n"
             "rows = np.sort(np.random.default_rng(0).choice(len(pairs.clean), 40 if QUICK else 200, replace=False))\n"
             "few = analysis.Paired(*(field[rows] for field in pairs))\n"
             "models = {'backdoored': initial, **defended}\n"
             "display(Image(analysis.plot_tsne(model, models, few, norm, f'{out}/tsne.png', 'badnets: penultimate features')))"),
    ("md", "## Grad-CAM at the last convolution (supplement Figure 3)"),
    ("code", "layer = analysis.last_conv(model, initial, data.image_shape)\n"
             "two = analysis.Paired(*(field[:2] for field in pairs))\n"
             "display(Image(analysis.plot_gradcam(model, models, two, norm, layer, f'{out}/gradcam.png', 'badnets')))"),
    ("md", "## Neuron weight norm vs trigger-activation change (FT-SAM paper, Figure 4)"),
    ("code", "display(Image(analysis.plot_tac(model, initial, models, few, norm, layer, f'{out}/tac.png',\n"
             "                                 'badnets: neuron norm vs TAC')))"),
    ("md", "## A λ × ε grid as one program (Tables 6–7)\n\n"
           "`sweep` trains every configuration at once (vmapped, sharded over the devices there are); the "
           "table and the heat map read it like the paper's ablations. `d3jax sweep` does the same from an "
           "attack run and writes a run directory; with `--seeds 3` every cell is a mean ± std, which matters: "
           "D3's result moves a lot with the random warm start."),
    ("code", "x_res, y_res = pipeline.reserved_set(data, 0.1, seed=0)\n"
             "grid = {'lmd': [1.0, 10.0], 'eps': [0.0, 0.3]} if QUICK else {'lmd': [1.0, 10.0, 40.0], 'eps': [0.0, 0.1, 0.5]}\n"
             "key = jax.random.fold_in(jax.random.key(0), 3)  # defense_row's key: λ = 10, ε = 0.1 is the D3 run above\n"
             "variables, log = sweep('d3', model, initial, x_res, y_res, normalization=norm, key=key, grid=grid,\n"
             "                       config=D3Config(epochs=1 if QUICK else 20, batch_size=32, crop_padding=1), progress=False)\n"
             "measured, before = [backdoored.measure(v) for v in variables], backdoored.baseline\n"
             "grid_rows = aggregate(log, {'acc': [m.acc for m in measured], 'asr': [m.asr for m in measured],\n"
             "                            'ra': [m.ra for m in measured],\n"
             "                            'der': [metrics.der(before.acc, before.asr, m.acc, m.asr) for m in measured]})\n"
             "print(analysis.format_grid_table(grid_rows, list(grid)))\n"
             "display(Image(analysis.heatmap(grid_rows, ('lmd', 'eps'), f'{out}/heatmap.png', 'badnets → d3')))"),
]

NOTEBOOKS = {"walkthrough.ipynb": WALKTHROUGH, "optim_nnx_equinox.ipynb": NNX_EQUINOX,
             "analyses.ipynb": ANALYSES}


def build(name: str, cells: list[tuple[str, str]]) -> Path:
  """Writes the notebook ``name`` from ``cells`` after executing it."""
  notebook = nbformat.v4.new_notebook()
  notebook.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                    for kind, src in cells]
  NotebookClient(notebook, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(Path.cwd())}}).execute()
  out = Path(__file__).with_name(name)
  nbformat.write(notebook, out)
  return out


def main(names: list[str]) -> None:
  for name in names or NOTEBOOKS:
    print(f"wrote {build(name, NOTEBOOKS[name])}")


if __name__ == "__main__":
  main(sys.argv[1:])
