"""The training engine shared by attacks and defenses: the run lives in its state, compiled once.

A :class:`Program` is static and hashable: a model, a *recipe* (a frozen config dataclass that
says which loss, which optimizer, which warm start and which schedule; see :class:`Recipe`) and
the dataset's normalization. Everything that changes while training, or from one run of a grid
to the next, is data in a :class:`TrainState`: params, batch statistics, the optimizer state (D3's
reference weights live there, inside the transform's own state), the hyperparameters as arrays,
the step count and the run's key. So

* ``program.step(state, batch) -> (state, metrics)`` is one optimizer step;
* ``program.epoch(state, images, labels)`` is one ``lax.scan`` over fixed-shape batches drawn by a
  seeded permutation (the tail is padded by wrapping and masked out of the loss);
* a hyperparameter grid is ``jax.vmap`` over the state's leading axis (:func:`grid_axes`), over
  the whole grid or over chunks of it scanned in the same program (:func:`grid_vmap_width`);
* :func:`fit` drives the epochs from the host (progress bar, NaN check, per-epoch callback for
  checkpoints and curves), and resuming is calling it again on a restored state.

Programs compare by value, so the jitted init, epoch and evaluation functions below are compiled
once per (program, shapes) and reused by every later call, run and grid point.

Random streams come from the state's key by ``fold_in``: the epoch's batch order from
(key, 1, epoch), a step's augmentation and dropout from (key, 0, step), the warm start from
(key, 2). A resumed run therefore draws exactly what the uninterrupted run would have drawn.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple, Protocol

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from d3jax.data.augment import augment, normalize
from d3jax.models.precision import Precision, check_precision, with_precision
from d3jax.progress import progress_bar
from d3jax.reductions import masked_mean

PyTree = Any
Hyperparams = Mapping[str, Any]
_STEP_STREAM, _PLAN_STREAM, _WARM_STREAM = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Normalization:
  """Per-channel constants in [0, 1] space: the model sees (x/255 − mean)/std."""
  mean: tuple[float, ...]
  std: tuple[float, ...]


class Recipe(Protocol):
  """What a program trains with; implemented by frozen config dataclasses (FT, D3, attack training).

  Recipes must be hashable and compare by value (no closures, no arrays as fields), so that equal
  configs share compiled code. ``hyperparams()`` returns the numeric settings that live in the
  state as arrays (and can be swept); ``loss`` and ``optimizer`` read them from there.
  """
  epochs: int
  batch_size: int
  crop_padding: int
  flip: bool
  train_mode: bool

  def hyperparams(self) -> dict[str, jax.Array]: ...

  def loss(self, logits: jax.Array, labels: jax.Array, mask: jax.Array, hparams: Hyperparams
           ) -> jax.Array: ...

  def optimizer(self, hparams: Hyperparams, steps_per_epoch: jax.Array
                ) -> optax.GradientTransformation: ...

  def warm_start(self, params: PyTree, key: jax.Array) -> PyTree: ...


@flax.struct.dataclass
class TrainState:
  """Everything a step needs besides the data. A grid of runs stacks it on a leading axis."""
  step: jax.Array
  steps_per_epoch: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  hparams: dict[str, jax.Array]
  key: jax.Array

  @property
  def variables(self) -> dict[str, PyTree]:
    return join_variables(self.params, self.batch_stats)


class Batch(NamedTuple):
  """One fixed-shape batch: uint8 NHWC images, integer labels, and which rows are real."""
  image: jax.Array
  label: jax.Array
  mask: jax.Array


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array, hparams: Hyperparams) -> jax.Array:
  """Mean cross-entropy over the valid (unmasked) samples of a batch."""
  del hparams
  per_sample = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return masked_mean(per_sample, mask)


def sgd_with_weight_decay(learning_rate: optax.ScalarOrSchedule, weight_decay: Any,
                          momentum: Any = 0.9) -> optax.GradientTransformation:
  """PyTorch SGD with coupled L2: b ← m·b + (g + wd·w), w ← w − lr·b (dampening 0, no Nesterov)."""
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum))


def cosine_per_epoch(base_lr: Any, steps_per_epoch: Any, t_max: int) -> optax.Schedule:
  """PyTorch ``CosineAnnealingLR`` stepped once per epoch: lr_e = ½·lr0·(1 + cos(π·e/T)).

  Constant inside an epoch; ``base_lr`` and ``steps_per_epoch`` may be traced arrays.
  """
  def schedule(count):
    epoch = count // steps_per_epoch
    return base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / t_max))
  return schedule


def init_variables(model: nn.Module, image_shape: tuple[int, ...], key: jax.Array) -> PyTree:
  """Fresh variables of ``model`` for images of ``image_shape`` (H, W, C)."""
  params_key, dropout_key = jax.random.split(key)
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  return dict(model.init({"params": params_key, "dropout": dropout_key}, dummy, train=False))


def batch_plan(key: jax.Array, n: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """Indices (num_batches, batch_size) of a seeded permutation, the tail padded by wrapping, and
  the mask of real samples. Every sample appears exactly once among the unmasked entries."""
  num_batches = math.ceil(n / batch_size)
  order = jax.random.permutation(key, n)
  indices = jnp.resize(order, num_batches * batch_size).reshape(num_batches, batch_size)
  mask = (jnp.arange(num_batches * batch_size) < n).reshape(num_batches, batch_size)
  return indices, mask


def split_variables(variables: Mapping[str, PyTree]) -> tuple[PyTree, PyTree]:
  """(params, batch_stats) of a Flax variables dict; batch_stats is {} for models without BN."""
  if "params" not in variables:
    raise ValueError(f"variables must contain a 'params' collection, got keys {sorted(variables)}.")
  extra = sorted(set(variables) - {"params", "batch_stats"})
  if extra:
    raise ValueError(f"unsupported variable collections {extra}; d3jax handles 'params' and 'batch_stats'.")
  return variables["params"], variables.get("batch_stats", {})


def join_variables(params: PyTree, batch_stats: PyTree) -> dict[str, PyTree]:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def check_positive_int(name: str, value: Any) -> None:
  """Raises ``ValueError`` naming ``name`` unless ``value`` is an integer ≥ 1."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}.")


def check_recipe_fields(recipe: Any, nonnegative: tuple[str, ...]) -> None:
  """The checks every SGD-style recipe shares: ``epochs`` and ``batch_size`` integers ≥ 1, the
  ``nonnegative`` fields ≥ 0 (NaN fails too), ``momentum`` in [0, 1), ``crop_padding`` ≥ 0,
  ``precision`` one of :data:`d3jax.models.precision.PRECISIONS` where the recipe has one.
  Each failure is one ``ValueError`` naming the field, the value and what is allowed."""
  check_positive_int("epochs", recipe.epochs)
  check_positive_int("batch_size", recipe.batch_size)
  for name in nonnegative:
    if not getattr(recipe, name) >= 0:
      raise ValueError(f"{name} must be ≥ 0, got {getattr(recipe, name)!r}.")
  if not 0 <= recipe.momentum < 1:
    raise ValueError(f"momentum must be in [0, 1), got {recipe.momentum!r}.")
  if isinstance(recipe.crop_padding, bool) or not isinstance(recipe.crop_padding, int) \
      or recipe.crop_padding < 0:
    raise ValueError(f"crop_padding must be an integer ≥ 0, got {recipe.crop_padding!r}.")
  check_precision(getattr(recipe, "precision", "f32"))


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
  """A training program: model + recipe + normalization. Static; all run data is in the state.

  Programs compare and hash by everything except the recipe's hyperparameter values (those are
  arrays in the state), so two configs that differ only in, say, λ or the learning rate share one
  compilation. Code traced for a program must therefore read hyperparameters from
  ``state.hparams``, never from the recipe's fields.

  A recipe with a ``precision`` field (every d3jax recipe; default ``"f32"``) sets the model's
  product precision for this training (:func:`d3jax.models.precision.with_precision`): ``model``
  is the model as the program runs it, and the trained variables fit the model as given.
  """
  model: nn.Module
  recipe: Recipe
  normalization: Normalization

  def __post_init__(self) -> None:
    object.__setattr__(self, "model",
                       with_precision(self.model, getattr(self.recipe, "precision", "f32")))

  @functools.cached_property
  def _static(self) -> tuple:
    swept = set(self.recipe.hyperparams())
    fields = tuple((field.name, getattr(self.recipe, field.name))
                   for field in dataclasses.fields(self.recipe) if field.name not in swept)
    return (self.model, type(self.recipe), fields, self.normalization)

  def __hash__(self) -> int:
    return hash(self._static)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Program) and self._static == other._static

  def steps_per_epoch(self, n: int) -> int:
    return math.ceil(n / self.recipe.batch_size)

  def hyperparams(self, overrides: Hyperparams | None = None) -> dict[str, jax.Array]:
    """The recipe's hyperparameters as float32 arrays, with ``overrides`` (names must exist)."""
    defaults = self.recipe.hyperparams()
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
      raise ValueError(f"unknown hyperparameters {unknown}; {type(self.recipe).__name__} has "
                       f"{sorted(defaults)}.")
    return {name: jnp.asarray(overrides.get(name, value), jnp.float32)
            for name, value in defaults.items()}

  def init(self, variables: PyTree, n: int, key: jax.Array, hparams: Hyperparams | None = None
           ) -> TrainState:
    """The state at step 0 for a training set of ``n`` samples, with the recipe's hyperparameters
    overridden by ``hparams`` (inside your own ``jax.jit``, pass every hyperparameter here).

    The optimizer is initialised on the given params (so reference-keeping transforms such as
    D3's record the starting weights), then the recipe's warm start rewrites the params.
    """
    params, batch_stats = split_variables(variables)
    hparams = self.hyperparams(hparams)
    steps_per_epoch = jnp.asarray(self.steps_per_epoch(n), jnp.int32)
    opt_state = self.recipe.optimizer(hparams, steps_per_epoch).init(params)
    params = self.recipe.warm_start(params, jax.random.fold_in(key, _WARM_STREAM))
    return TrainState(step=jnp.zeros((), jnp.int32), steps_per_epoch=steps_per_epoch, params=params,
                      batch_stats=batch_stats, opt_state=opt_state, hparams=hparams, key=key)

  def step_key(self, state: TrainState) -> jax.Array:
    """The key of this step's augmentation, dropout and other draws: fold_in(key, 0, step)."""
    return jax.random.fold_in(jax.random.fold_in(state.key, _STEP_STREAM), state.step)

  def apply_gradients(self, state: TrainState, grads: PyTree, batch_stats: PyTree) -> TrainState:
    """``state`` after one step of the recipe's optimizer with ``grads``, carrying the forward
    pass's ``batch_stats``."""
    tx = self.recipe.optimizer(state.hparams, state.steps_per_epoch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state)

  def begin(self, state: TrainState, images: jax.Array, labels: jax.Array, *,
            progress: bool = False) -> TrainState:
    """A stage that runs once before the first epoch (:func:`train` calls it on a state at step
    0, not on a resumed one); none here. Attacks with a pre-training stage override it."""
    del images, labels, progress
    return state

  def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on ``batch`` (augmented and normalized here)."""
    recipe = self.recipe
    augment_key, dropout_key = jax.random.split(self.step_key(state))
    x = augment(batch.image, augment_key, crop_padding=recipe.crop_padding, flip=recipe.flip)
    x = normalize(x, self.normalization.mean, self.normalization.std)

    def objective(params):
      logits, updated = self.model.apply(
          join_variables(params, state.batch_stats), x, train=recipe.train_mode,
          mutable=["batch_stats"], rngs={"dropout": dropout_key})
      return recipe.loss(logits, batch.label, batch.mask, state.hparams), updated

    (loss, updated), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    state = self.apply_gradients(state, grads, updated.get("batch_stats", state.batch_stats))
    return state, {"loss": loss}

  def epoch(self, state: TrainState, images: jax.Array, labels: jax.Array
            ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One pass over (images, labels) as a ``lax.scan``; metrics are means over its steps."""
    epoch_index = state.step // state.steps_per_epoch
    plan_key = jax.random.fold_in(jax.random.fold_in(state.key, _PLAN_STREAM), epoch_index)
    indices, mask = batch_plan(plan_key, images.shape[0], self.recipe.batch_size)

    def one_step(state, plan):
      index, valid = plan
      return self.step(state, Batch(images[index], labels[index], valid))

    state, metrics = jax.lax.scan(one_step, state, (indices, mask))
    return state, jax.tree.map(jnp.mean, metrics)

  def run(self, state: TrainState, images: jax.Array, labels: jax.Array
          ) -> tuple[TrainState, dict[str, jax.Array]]:
    """Every epoch of the recipe from a fresh state, as one pure ``lax.scan`` (vmap/jit it)."""
    def one_epoch(state, _):
      return self.epoch(state, images, labels)

    return jax.lax.scan(one_epoch, state, None, length=self.recipe.epochs)


def grid_axes(shared_key: bool = True) -> TrainState:
  """``in_axes``/``out_axes`` of a grid's state for ``jax.vmap``: runs differ in params,
  statistics, optimizer state and hyperparameters; the step count is common, and so is the key
  when ``shared_key`` (then every run sees the same batches, augmentation and warm start, and the
  data side of each step — gather, augmentation, the first layer's patches — is computed once)."""
  return TrainState(step=None, steps_per_epoch=None, params=0, batch_stats=0, opt_state=0,
                    hparams=0, key=None if shared_key else 0)


def _is_none(x: Any) -> bool:
  return x is None


def _mapped(fn: Callable, axes: TrainState | None, out_axes: Any, vmap_width: int | None
            ) -> Callable:
  """``fn`` over a grid: ``jax.vmap`` over the whole grid axis (``vmap_width`` None), or over
  chunks of ``vmap_width`` runs taken one after another by a ``lax.scan`` in the same program
  (``lax.map`` with a batch size; :func:`grid_vmap_width` says when that is faster)."""
  if axes is None:
    return fn
  vmapped = jax.vmap(fn, in_axes=(axes, None, None), out_axes=out_axes)
  if vmap_width is None:
    return vmapped

  def per_field(fn_stacked, fn_shared, tree):
    return jax.tree.map(lambda ax, sub: jax.tree.map(fn_shared if ax is None else fn_stacked, sub),
                        axes, tree, is_leaf=_is_none)

  if vmap_width == 1:
    # Each run's slice goes through ``fn`` itself: a vmap of size 1 would add a unit batch axis
    # to every convolution and matrix product of the step.
    run, split, unchunk = fn, (lambda x: x), (lambda x: x)
  else:
    run = vmapped
    split = lambda x: x.reshape((x.shape[0] // vmap_width, vmap_width) + x.shape[1:])
    unchunk = lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])

  def in_chunks(state, images, labels):
    chunks = per_field(split, lambda x: None, state)

    def one_chunk(_, chunk):
      merged = jax.tree.map(lambda ax, shared, own: shared if ax is None else own, axes, state,
                            chunk, is_leaf=_is_none)
      return None, run(merged, images, labels)

    _, (state, metrics) = jax.lax.scan(one_chunk, None, chunks)
    return per_field(unchunk, lambda x: x[0], state), jax.tree.map(unchunk, metrics)

  return in_chunks


def grid_vmap_width(size: int, devices: int = 1) -> int | None:
  """How many runs of a grid of ``size`` one ``vmap`` should hold: None (the whole grid) on
  accelerators and on several devices; on one CPU device 1, i.e. the runs scanned one at a time
  inside one compiled program, each run's epoch the same unbatched program as a run alone.

  Measured on a 2-core CPU, quiet (``benchmarks/bench.py --sections grid``, benchmarks/RESULTS.md):
  one D3 epoch of the grid took 0.95× the one-by-one time for the demo's small CNN (G = 8) and
  0.86× for PreAct-ResNet18 (G = 4); one vmap over the whole grid took 1.19–1.49×, its batched
  matrix products of per-run weights running slower than G separate ones.
  """
  if jax.default_backend() != "cpu" or devices > 1:
    return None
  return 1 if size > 1 else None


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(program: Program, variables: PyTree, n: int, key: jax.Array,
          hparams: dict[str, jax.Array]) -> TrainState:
  return program.init(variables, n, key, hparams)


def init_state(program: Program, variables: PyTree, n: int, key: jax.Array,
               hparams: Hyperparams | None = None) -> TrainState:
  """Jitted :meth:`Program.init` (compiled once per program and shapes); the hyperparameters
  (the recipe's, with ``hparams`` overriding) enter as arrays."""
  return _init(program, variables, n, key, program.hyperparams(hparams))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _epoch(program: Program, axes: TrainState | None, vmap_width: int | None, state: TrainState,
           images: jax.Array, labels: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
  return _mapped(program.epoch, axes, (axes, 0), vmap_width)(state, images, labels)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3,))
def _epoch_donated(program: Program, axes: TrainState | None, vmap_width: int | None,
                   state: TrainState, images: jax.Array, labels: jax.Array
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
  return _mapped(program.epoch, axes, (axes, 0), vmap_width)(state, images, labels)


def train_epoch(program: Program, state: TrainState, images: jax.Array, labels: jax.Array,
                axes: TrainState | None = None, vmap_width: int | None = None
                ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One jitted epoch (of a grid when ``axes`` is given, see :func:`grid_axes`; ``vmap_width``
  runs per vmapped chunk, None: the whole grid, see :func:`grid_vmap_width`).

  On accelerators the input state's buffers are donated to the output; the CPU backend cannot
  reuse donated buffers, so there the state is not donated.
  """
  epoch_fn = _epoch if jax.default_backend() == "cpu" else _epoch_donated
  if axes is None:
    return epoch_fn(program, axes, None, state, images, labels)
  size = jax.tree.leaves(state.params)[0].shape[0]
  if vmap_width is not None and (isinstance(vmap_width, bool) or not isinstance(vmap_width, int)
                                 or vmap_width < 1 or size % vmap_width):
    raise ValueError(f"vmap_width must be None or a positive divisor of the grid's {size} runs, "
                     f"got {vmap_width!r}.")
  # A grid keeps the layout it was given (d3jax.workflows.sweep.shard_grid): without this, XLA may return
  # an equivalent but differently written sharding (e.g. replicated on a one-device mesh), and the
  # next epoch would compile again for it.
  shardings = jax.tree.map(lambda leaf: leaf.sharding, state)
  state, metrics = epoch_fn(program, axes, vmap_width, state, images, labels)
  return jax.device_put(state, shardings), metrics


def fit(program: Program, state: TrainState, images: np.ndarray | jax.Array,
        labels: np.ndarray | jax.Array, *, axes: TrainState | None = None,
        vmap_width: int | None = None, desc: str = "train", progress: bool = True,
        callback: "EpochCallback | None" = None) -> tuple[TrainState, dict[str, np.ndarray]]:
  """Runs the remaining epochs of ``state`` (from ``step // steps_per_epoch`` to the recipe's
  epochs), one jitted ``lax.scan`` epoch per iteration, with a progress bar and a NaN check.

  ``axes`` trains a stacked grid of states (see :func:`grid_axes`), ``vmap_width`` runs per
  vmapped chunk (see :func:`grid_vmap_width`; None: one vmap over the whole grid). ``callback(epoch, state,
  metrics)`` runs on the host after every epoch (0-based epoch index); use it to checkpoint, log or
  evaluate. To resume, restore a saved state and call ``fit`` again: the result is the same as
  an uninterrupted run.

  Returns the final state and the per-epoch metrics of the epochs run here (arrays (E,) or, for a
  grid, (E, G)).

  Raises:
    FloatingPointError: the training loss became NaN or infinite (the message names the epoch and,
      in a grid, the runs).
  """
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  steps_per_epoch = program.steps_per_epoch(images.shape[0])
  first = int(np.asarray(state.step).reshape(-1)[0]) // steps_per_epoch
  history: dict[str, list[np.ndarray]] = {}
  bar = progress_bar(range(first, program.recipe.epochs), desc=desc, disable=not progress,
                     initial=first, total=program.recipe.epochs)
  for index in bar:
    state, metrics = train_epoch(program, state, images, labels, axes, vmap_width)
    metrics = {name: np.asarray(value) for name, value in metrics.items()}
    loss = metrics["loss"]
    if not np.all(np.isfinite(loss)):
      runs = f" (grid runs {np.flatnonzero(~np.isfinite(loss)).tolist()})" if axes is not None else ""
      raise FloatingPointError(
          f"{desc}: the training loss became {loss.tolist()} in epoch {index + 1}{runs}; lower the "
          "learning rate or check the data (normalization, labels) and the starting weights.")
    for name, value in metrics.items():
      history.setdefault(name, []).append(value)
    bar.set_postfix(loss=f"{np.mean(loss):.4f}")
    if callback is not None:
      callback(index, state, metrics)
  bar.close()
  return state, {name: np.stack(values) for name, values in history.items()}


EpochCallback = Callable[[int, TrainState, dict[str, np.ndarray]], None]
Restore = Callable[[TrainState], TrainState]


def train(program: Program, variables: PyTree, images: np.ndarray | jax.Array,
          labels: np.ndarray | jax.Array, key: jax.Array, *, hparams: Hyperparams | None = None,
          desc: str = "train", progress: bool = True, callback: EpochCallback | None = None,
          restore: Restore | None = None) -> tuple[PyTree, dict[str, np.ndarray]]:
  """A whole run from ``variables``: :func:`init_state` then :func:`fit`; returns the final
  variables and the per-epoch metrics of the epochs run.

  ``restore(fresh_state)`` may return a saved state of the same run to continue from (resume);
  the result equals the uninterrupted run's.
  """
  state, history = train_state(program, variables, images, labels, key, hparams=hparams, desc=desc,
                               progress=progress, callback=callback, restore=restore)
  return state.variables, history


def train_state(program: Program, variables: PyTree, images: np.ndarray | jax.Array,
                labels: np.ndarray | jax.Array, key: jax.Array, *,
                hparams: Hyperparams | None = None, desc: str = "train", progress: bool = True,
                callback: EpochCallback | None = None, restore: Restore | None = None
                ) -> tuple[TrainState, dict[str, np.ndarray]]:
  """:func:`train`, returning the final state (with whatever else the program trains, such as
  an attack's generators) instead of the model's variables."""
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  state = init_state(program, variables, images.shape[0], key, hparams)
  if restore is not None:
    state = restore(state)
  if int(np.asarray(state.step).reshape(-1)[0]) == 0:
    state = program.begin(state, images, labels, progress=progress)
  return fit(program, state, images, labels, desc=desc, progress=progress, callback=callback)


@dataclasses.dataclass(frozen=True)
class SGDConfig:
  """Cross-entropy training with PyTorch-style SGD, coupled weight decay and a per-epoch cosine.

  BackdoorBench's recipe for training backdoored models and for FT: SGD lr 0.01, momentum 0.9,
  weight decay 5e-4 on every parameter, ``CosineAnnealingLR`` with T_max = 100 stepped per epoch
  (hard-coded to 100 there whatever the epoch count), batch 256, BN in train mode, random crop
  with padding 4, the last model kept. ``learning_rate`` and ``weight_decay`` are hyperparameters
  (arrays in the state: sweepable).
  """
  epochs: int = 100
  batch_size: int = 256
  learning_rate: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  cosine_t_max: int = 100
  crop_padding: int = 4
  flip: bool = False
  train_mode: bool = True
  precision: Precision = "f32"  # products in f32, or bf16 with f32 accumulation

  def __post_init__(self) -> None:
    check_recipe_fields(self, ("learning_rate", "weight_decay"))
    check_positive_int("cosine_t_max", self.cosine_t_max)

  def hyperparams(self) -> dict[str, jax.Array]:
    return {"learning_rate": jnp.float32(self.learning_rate),
            "weight_decay": jnp.float32(self.weight_decay)}

  def loss(self, logits: jax.Array, labels: jax.Array, mask: jax.Array, hparams: Hyperparams
           ) -> jax.Array:
    return cross_entropy(logits, labels, mask, hparams)

  def optimizer(self, hparams: Hyperparams, steps_per_epoch: jax.Array) -> optax.GradientTransformation:
    schedule = cosine_per_epoch(hparams["learning_rate"], steps_per_epoch, self.cosine_t_max)
    return sgd_with_weight_decay(schedule, hparams["weight_decay"], self.momentum)

  def warm_start(self, params: PyTree, key: jax.Array) -> PyTree:
    del key
    return params


@functools.partial(jax.jit, static_argnames=("model", "batch_size"))
def _logits_in_batches(model: nn.Module, variables: PyTree, images: jax.Array, mean: jax.Array,
                       std: jax.Array, batch_size: int) -> jax.Array:
  n = images.shape[0]
  num_batches = math.ceil(n / batch_size)
  padded = jnp.resize(images, (num_batches * batch_size,) + images.shape[1:])
  batches = padded.reshape((num_batches, batch_size) + images.shape[1:])

  def one(batch):
    return model.apply(variables, normalize(batch, mean, std), train=False)

  return jax.lax.map(one, batches).reshape(num_batches * batch_size, -1)[:n]


def predict_logits(model: nn.Module, variables: PyTree, images: np.ndarray, normalization: Normalization,
                   batch_size: int = 500) -> np.ndarray:
  """Eval-mode logits (BN running statistics, no augmentation) in fixed-size batches."""
  images = jnp.asarray(images)
  if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"images must be a non-empty uint8 NHWC batch, got {images.dtype} with shape "
                     f"{images.shape}.")
  batch_size = min(batch_size, images.shape[0])
  logits = _logits_in_batches(model, variables, images, jnp.asarray(normalization.mean),
                              jnp.asarray(normalization.std), batch_size)
  return np.asarray(logits)


def predict(model: nn.Module, variables: PyTree, images: np.ndarray, normalization: Normalization,
            batch_size: int = 500) -> np.ndarray:
  """Eval-mode predicted classes."""
  return predict_logits(model, variables, images, normalization, batch_size).argmax(-1)
