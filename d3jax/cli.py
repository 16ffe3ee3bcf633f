"""The ``d3jax`` command, derived from the config dataclasses with tyro.

``d3jax attack``, ``d3jax defend <defense>``, ``d3jax eval RUN``, ``d3jax show RUN``,
``d3jax demo``, ``d3jax sweep <defense>``, ``d3jax analyze RUN``, ``d3jax table``, and
``d3jax import FILE`` / ``d3jax export RUN`` (BackdoorBench attack results in, PyTorch state dicts
out). Every field of the attack
run, its training recipe and every registered defense's config is a flag (shown with its default
in ``--help``); a defense added to the registry becomes a ``defend`` subcommand by itself.
``--config FILE`` (YAML or JSON, as ``--print-config`` writes it) sets defaults that flags
override.

Errors caused by the input (a bad value, a missing file, an existing ``--out``) print one line
on stderr and exit with status 2; ``--debug`` shows the traceback. Other errors are bugs and
keep their traceback.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import tyro
import yaml
from tqdm import tqdm

import d3jax
from d3jax import attacks, defenses
from d3jax.rundirs import checkpoint, imported_runs, runs
from d3jax.engine import compile_cache
from d3jax.workflows import pipeline
from d3jax.studies import table as table_runner
from d3jax.analysis.grid import format_grid_table
from d3jax.analysis.run import ANALYSES, analyze, defense_labels
from d3jax.workflows.pipeline import AttackRun, ReservedSplit, from_dict
from d3jax.progress import clear_stop, request_stop, stop_requested
from d3jax.workflows.sweep import parse_grid
from d3jax.studies.sweep_runs import defense_key, write_sweep

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, PermissionError)
# Storage faults: reported in one line like user errors (the run directory stays consistent).
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
Flat = tyro.conf.OmitArgPrefixes
TYRO_CONFIG = (tyro.conf.OmitSubcommandPrefixes, tyro.conf.CascadeSubcommandArgs)


@dataclasses.dataclass(frozen=True)
class Session:
  quiet: bool = False
  """no progress bars or per-epoch lines on the terminal (the run's log.txt keeps them)"""
  debug: bool = False
  """show the Python traceback of an error"""
  compile_cache: bool = True
  """keep compiled programs in $D3JAX_CACHE_DIR (default ~/.cache/d3jax/jax) so later runs start faster"""


@dataclasses.dataclass(frozen=True)
class Output:
  out: str
  """run directory to write; built in a hidden sibling and renamed into place when complete"""
  overwrite: bool = False
  """replace an existing --out (never the input run)"""
  resume: bool = False
  """continue the interrupted run of --out after its last finished epoch (same settings)"""
  eval_every: int = 1
  """measure ACC/ASR/RA on the test sets every N epochs (0: final model only); evaluation only"""
  checkpoint_every: float = 30.0
  """save the training state for --resume at most every this many seconds (and after the last
  epoch); 0: after every epoch"""
  config: Optional[str] = None
  """YAML or JSON file of settings, as --print-config writes them; flags override it"""
  print_config: bool = False
  """print the resolved settings as YAML and exit"""


@dataclasses.dataclass(frozen=True)
class AttackCommand:
  """Train a backdoored model into a run directory."""
  output: Annotated[Output, Flat]
  run: Annotated[AttackRun, Flat] = AttackRun()
  session: Annotated[Session, Flat] = Session()
  show: bool = False
  """only write the attack's trigger gallery to --out as a PNG (test images clean | poisoned |
  magnified residual), without training; every attack run directory also holds one (gallery.png)"""

  def settings(self) -> dict:
    return self.run.to_json()


def _defense_union() -> Any:
  """One ``defend`` subcommand per registered defense, with that defense's default config."""
  choices = tuple(Annotated[config_type, tyro.conf.subcommand(name, default=config_type())]
                  for name, config_type in defenses.REGISTRY.items())
  return Union[choices]  # type: ignore[valid-type]


def defense_name(config: Any) -> str:
  for name, config_type in defenses.REGISTRY.items():
    if type(config) is config_type:  # pylint: disable=unidiomatic-typecheck
      return name
  raise TypeError(f"no registered defense takes a {type(config).__name__}.")


@dataclasses.dataclass(frozen=True)
class DefendCommand:
  """Defend the model of an attack run; writes a defense run directory."""
  attack_run: str
  """run directory written by `d3jax attack` (read only)"""
  output: Annotated[Output, Flat]
  defense: Annotated[_defense_union(), tyro.conf.arg(name="")] = defenses.D3Config()  # type: ignore[valid-type]
  """the defense and its settings (default: d3)"""
  reserved: ReservedSplit = ReservedSplit()
  session: Annotated[Session, Flat] = Session()
  auto: bool = False
  """choose the swept hyperparameters first, with the reserved held-out split only (no test data):
  train every --auto-grid point and keep one by --auto-rule (d3jax.auto)"""
  auto_grid: tuple[str, ...] = ("lmd=1,10,20,30,40", "eps=0,0.1,0.2,0.3,0.4,0.5")
  """the grid --auto chooses from, as name=v1,v2,... entries (default: the paper's Tables 6–7)"""
  auto_rule: Optional[Literal["strongest", "farthest"]] = None
  """--auto: ``strongest`` (the smallest λ whose held-out accuracy is within three standard errors
  of the grid's best; the default when the grid sweeps lmd) or ``farthest`` (the candidate that
  moved farthest among those within --auto-budget of the best; the default otherwise)"""
  auto_budget: float = 0.02
  """--auto-rule farthest: held-out accuracy a candidate may lose against the grid's best"""

  def settings(self) -> dict:
    return {"defense": defense_name(self.defense), "config": dataclasses.asdict(self.defense),
            "reserved": dataclasses.asdict(self.reserved)}


@dataclasses.dataclass(frozen=True)
class SweepCommand:
  """Run a grid of defense settings (× seeds) on an attack run as one compiled program; writes a
  sweep run: results.csv, metrics.json, table.txt and heatmap.png (ACC and ASR)."""
  attack_run: str
  """run directory written by `d3jax attack` (read only)"""
  out: str
  """sweep run directory to write; built in a hidden sibling and renamed into place when complete"""
  grid: tuple[str, ...] = ("lmd=1,10,20,30,40", "eps=0,0.1,0.2,0.3,0.4,0.5")
  """name=v1,v2,... per swept hyperparameter (any numeric setting of the defense); the heat map
  needs one or two"""
  defense: Annotated[_defense_union(), tyro.conf.arg(name="")] = defenses.D3Config()  # type: ignore[valid-type]
  """the defense and its fixed settings (default: d3)"""
  seeds: int = 1
  """runs per configuration, with defense keys fold_in(key, seed); tables show mean±std"""
  chunk_size: int = 0
  """runs trained at once (0: the whole grid); lower it when memory runs out"""
  save_variables: bool = False
  """also store every run's variables (one stacked checkpoint)"""
  overwrite: bool = False
  """replace an existing --out (never the input run)"""
  reserved: ReservedSplit = ReservedSplit()
  session: Annotated[Session, Flat] = Session()


@dataclasses.dataclass(frozen=True)
class AnalyzeCommand:
  """Draw the D3 paper's analyses of an attack run and its defense runs as PNGs (evaluation only:
  most read the backdoor test set)."""
  run: tyro.conf.Positional[str]
  """attack run directory (read only; the PNGs go to RUN/analysis/ unless --out is given)"""
  defended: tuple[str, ...] = ()
  """defense runs of that attack run (e.g. an FT run and a D3 run), compared on every plot"""
  analyses: tuple[Literal[ANALYSES], ...] = ANALYSES  # type: ignore[valid-type]
  """path: loss/ACC/ASR along θ_init + t·(θ_def − θ_init); weights: θ_def − θ_init histograms;
  tsne: penultimate features; gradcam; tac: neuron norm vs trigger-activation change"""
  out: Optional[str] = None
  """directory for the PNGs (default RUN/analysis)"""
  samples: int = 200
  """test images (with their triggered copies) for t-SNE and TAC"""
  images: int = 3
  """images shown by Grad-CAM"""
  select: str = "linear/kernel"
  """parameters of the weight histograms (regex over '/'-joined parameter paths)"""
  layer: Optional[str] = None
  """layer of Grad-CAM and TAC (default: the last convolution)"""
  steps: int = 41
  """values of t in [0, 2] for the path curves"""
  session: Annotated[Session, Flat] = Session()


@dataclasses.dataclass(frozen=True)
class EvalCommand:
  """Re-measure a run directory (ACC/ASR/RA, and DER for a defense run)."""
  run: tyro.conf.Positional[str]
  session: Annotated[Session, Flat] = Session()


@dataclasses.dataclass(frozen=True)
class ShowCommand:
  """Print a run's config and its recorded table (a sweep run's: one row per configuration)."""
  run: tyro.conf.Positional[str]
  session: Annotated[Session, Flat] = Session()


@dataclasses.dataclass(frozen=True)
class DemoCommand:
  """Backdoor a small CNN with BadNets and Blended, defend with FT and D3, print the table."""
  out: str = "demo_out"
  """directory for results.json"""
  session: Annotated[Session, Flat] = Session()


@dataclasses.dataclass(frozen=True)
class TableCommand:
  """Run attacks × defenses × seeds and print the D3 paper's Table 1 (reuses finished runs,
  resumes interrupted ones); writes table.csv, table.json, table.txt and der.png to --out."""
  out: str
  """directory of the table: its attack and defense run directories and the results"""
  spec: Annotated[table_runner.TableSpec, Flat] = table_runner.TableSpec()
  session: Annotated[Session, Flat] = Session()


@dataclasses.dataclass(frozen=True)
class ImportCommand:
  """Turn a BackdoorBench attack result (attack_result.pt, its poisoned test PNGs beside it) into a
  d3jax attack run that defend, sweep, eval and analyze accept."""
  result: tyro.conf.Positional[str]
  """BackdoorBench's attack_result.pt (read without executing pickled code)"""
  dataset: str
  """the clean data it was made from, as a d3jax dataset spec (e.g. tfds:cifar10); checked"""
  attack: Literal[attacks.names()]  # type: ignore[valid-type]
  """the attack's d3jax name, the run's label in tables (its trigger is the stored one)"""
  out: str
  """attack run directory to write"""
  overwrite: bool = False
  """replace an existing --out"""
  session: Annotated[Session, Flat] = Session()


@dataclasses.dataclass(frozen=True)
class ExportCommand:
  """Write a run's model as a PyTorch state dict in BackdoorBench's parameter names."""
  run: tyro.conf.Positional[str]
  """attack or defense run directory"""
  out: str
  """file to write: .safetensors, or .pt/.pth/.bin (these need PyTorch installed)"""
  session: Annotated[Session, Flat] = Session()


COMMANDS = {"attack": AttackCommand, "defend": DefendCommand, "eval": EvalCommand,
            "show": ShowCommand, "demo": DemoCommand, "sweep": SweepCommand,
            "analyze": AnalyzeCommand, "table": TableCommand, "import": ImportCommand,
            "export": ExportCommand}


def _config_file(argv: list[str]) -> str | None:
  """The value of ``--config`` in ``argv`` (read before parsing: it sets the defaults)."""
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return None


def read_settings(path: str) -> dict:
  """A YAML or JSON settings file as a dict; errors name the file."""
  file = Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"--config {path}: no such file.")
  try:
    data = yaml.safe_load(file.read_text())
  except (yaml.YAMLError, UnicodeDecodeError) as err:
    reason = " ".join(str(err).split())
    raise ValueError(f"--config {path} is not valid YAML or JSON ({reason}).") from None
  if not isinstance(data, dict):
    raise ValueError(f"--config {path} must hold a mapping of settings, got {type(data).__name__}.")
  return data


def _defaults(command: str, settings: dict) -> Any:
  """The command's default instance with the settings of a config file."""
  if command == "attack":
    return AttackCommand(output=Output(out=tyro.MISSING), run=AttackRun.from_json(settings))
  if command != "defend":
    raise ValueError(f"--config applies to attack and defend, not {command}.")
  unknown = sorted(set(settings) - {"defense", "config", "reserved"})
  if unknown:
    raise ValueError(f"--config: unknown setting(s) {unknown}; allowed: defense, config, reserved.")
  name = settings.get("defense", "d3")
  if name not in defenses.REGISTRY:
    raise ValueError(f"--config: defense must be one of {', '.join(defenses.REGISTRY)}, got {name!r}.")
  config = from_dict(defenses.REGISTRY[name], settings.get("config", {}), "config")
  return DefendCommand(attack_run=tyro.MISSING, output=Output(out=tyro.MISSING), defense=config,
                       reserved=from_dict(ReservedSplit, settings.get("reserved", {}), "reserved"))


def _one_line(text: str) -> str:
  """tyro's boxed parse error (unicode or ASCII borders) as one line: "<title>: <body>"."""
  rows = []
  for line in text.strip().splitlines():
    line = line.strip()
    if line[:1] in "│|" and line[-1:] in "│|":
      line = line[1:-1].strip()
    rows.append(line)
  if not rows:
    return "invalid arguments; see d3jax --help."
  title = re.sub(r"^[╭+][─-]+\s*|\s*[─-]+[╮+]$", "", rows[0])
  body = [row for row in rows[1:] if row and not re.fullmatch(r"[─━╰╯+=-]+", row)]
  body = " ".join(" ".join(body).split("For full helptext")[0].split())
  body = re.sub(r"^Error parsing \S+: ", "", body)
  return body if title == "Value error" or body.startswith(title) else f"{title}: {body}"


def parse(argv: list[str]) -> Any:
  """The command object for ``argv`` (``SystemExit`` for --help and parse errors)."""
  config = _config_file(argv)
  command = argv[0] if argv else None
  if config is not None and command in COMMANDS:
    default = _defaults(command, read_settings(config))
    return tyro.cli(COMMANDS[command], args=argv[1:], default=default, prog=f"d3jax {command}",
                    config=TYRO_CONFIG)
  return tyro.extras.subcommand_cli_from_dict(
      COMMANDS, args=argv, prog="d3jax", description=f"d3jax {d3jax.__version__}: backdoor "
      "attacks and post-training defenses (D3) in JAX.", config=TYRO_CONFIG)


def _parse_quietly(argv: list[str]) -> Any:
  """:func:`parse` with tyro's parse errors turned into one line on stderr (exit 2)."""
  captured = io.StringIO()
  try:
    with contextlib.redirect_stderr(captured):
      return parse(argv)
  except SystemExit as exit_:
    if exit_.code:
      print(f"d3jax: error: {_one_line(captured.getvalue())}", file=sys.stderr)
    raise


class _AboveProgressBars(logging.Handler):
  """Writes log lines to stderr above any tqdm progress bar instead of through it."""

  def emit(self, record: logging.LogRecord) -> None:
    tqdm.write(self.format(record), file=sys.stderr)


def _setup(session: Session) -> None:
  logger = logging.getLogger("d3jax")
  logger.setLevel(logging.INFO)
  logger.handlers.clear()
  logger.propagate = False
  if not session.quiet:
    logger.addHandler(_AboveProgressBars())
  if session.compile_cache:
    compile_cache.enable()
  # orbax and tfds log through absl, and orbax's writer tasks through asyncio; one that fails (a
  # full disk) would print its traceback before the main thread reports the same error in one line.
  for name in ("absl", "asyncio"):
    logging.getLogger(name).setLevel(logging.CRITICAL)


def run_command(command: Any) -> None:
  """Runs a parsed command."""
  _setup(command.session)
  progress = not command.session.quiet
  if isinstance(command, (AttackCommand, DefendCommand)) and command.output.print_config:
    print(yaml.safe_dump(command.settings(), sort_keys=False), end="")
    return
  tracking = runs.Tracking(eval_every=command.output.eval_every, progress=progress,
                           checkpoint_every_s=command.output.checkpoint_every) \
      if isinstance(command, (AttackCommand, DefendCommand)) else None
  if isinstance(command, AttackCommand) and command.show:
    _show_trigger(command.run, command.output.out, progress)
  elif isinstance(command, AttackCommand):
    out = command.output
    _, row = runs.write_attack(command.run, out.out, overwrite=out.overwrite, resume=out.resume,
                               tracking=tracking)
    print(pipeline.format_table([row]))
  elif isinstance(command, DefendCommand):
    out = command.output
    runs.RunWriter(out.out, overwrite=out.overwrite, resume=out.resume,
                   inputs=[command.attack_run])  # refuse a bad --out before loading anything
    source = runs.load(command.attack_run)
    config = _auto_config(command, source, progress) if command.auto else command.defense
    _, rows = runs.write_defense(source, defense_name(command.defense), config,
                                 command.reserved, out.out, overwrite=out.overwrite,
                                 resume=out.resume, tracking=tracking)
    print(pipeline.format_table(rows))
  elif isinstance(command, SweepCommand):
    if command.seeds < 1 or command.chunk_size < 0:
      raise ValueError(f"--seeds must be ≥ 1 and --chunk-size ≥ 0, got {command.seeds} and "
                       f"{command.chunk_size}.")
    runs.RunWriter(command.out, overwrite=command.overwrite, inputs=[command.attack_run])
    grid = parse_grid(command.grid)
    _, _, table = write_sweep(runs.load(command.attack_run), defense_name(command.defense),
                              command.defense, command.reserved, grid, command.out,
                              seeds=command.seeds, chunk_size=command.chunk_size or None,
                              save_variables=command.save_variables, overwrite=command.overwrite,
                              progress=progress)
    print(table)
  elif isinstance(command, AnalyzeCommand):
    for name, value in (("samples", command.samples), ("images", command.images),
                        ("steps", command.steps)):
      if value < (2 if name == "steps" else 1):
        raise ValueError(f"--{name} must be an integer ≥ {2 if name == 'steps' else 1}, got {value}.")
    source = runs.load(command.run)
    if source.kind != "attack":
      raise ValueError(f"{command.run} is a {source.kind} run; pass the attack run and its defense "
                       "runs with --defended.")
    defended = defense_labels(source, [runs.load(path) for path in command.defended])
    written = analyze(source, defended, command.out or source.path / "analysis", command.analyses,
                      samples=command.samples, images=command.images, select=command.select,
                      layer=command.layer, steps=command.steps, progress=progress)
    for path in written.values():
      print(path)
  elif isinstance(command, ImportCommand):
    _, row = imported_runs.import_attack_result(command.result, command.dataset, command.out,
                                                attack=command.attack, overwrite=command.overwrite)
    print(pipeline.format_table([row]))
  elif isinstance(command, ExportCommand):
    print(f"wrote {imported_runs.export_run(command.run, command.out)}")
  elif isinstance(command, EvalCommand):
    print(pipeline.format_table([runs.load(command.run).measure()]))
  elif isinstance(command, TableCommand):
    result = table_runner.run_table(command.spec, command.out, progress=progress)
    print(table_runner.format_table(result["cells"], command.spec.attacks, command.spec.defenses,
                             command.spec.seeds))
  elif isinstance(command, ShowCommand) and runs.is_sweep(command.run):
    path = checkpoint.verify_run(command.run)
    print(yaml.safe_dump(checkpoint.load_json(path, "config.json"), sort_keys=False), end="")
    print((path / "table.txt").read_text(), end="")
  elif isinstance(command, ShowCommand):
    loaded = runs.load(command.run)
    print(yaml.safe_dump(loaded.config, sort_keys=False), end="")
    print(pipeline.format_table([loaded.metrics]))
    for warning in loaded.metrics.get("warnings", []):
      print(f"warning: {warning}")
  else:
    from d3jax.workflows.demo import run_demo  # pylint: disable=import-outside-toplevel
    run_demo(command.out, progress=progress)


def _show_trigger(run: AttackRun, out: str, progress: bool) -> None:
  """``d3jax attack --show``: the trigger gallery of ``run`` (crafted if it needs crafting)."""
  if not out.endswith(".png"):
    raise ValueError(f"with --show, --out names the gallery PNG to write (e.g. {run.attack}.png), "
                     f"got {out!r}.")
  dataset, model, _, backdoor_test = pipeline.prepare(run, progress=progress)
  if backdoor_test is None:
    raise ValueError(f"--show: the {run.attack} trigger trains with the model, so there is none "
                     "before training; its run directory's gallery.png shows the trained one.")
  Path(out).parent.mkdir(parents=True, exist_ok=True)
  runs.write_trigger_gallery(pipeline.Backdoored(run, dataset, model, None, backdoor_test), out)
  print(f"wrote {out}")


def _auto_config(command: DefendCommand, source: runs.LoadedRun, progress: bool) -> Any:
  """The defense config with the hyperparameters `defend --auto` chooses (held-out split only)."""
  if command.reserved.holdout == 0:
    raise ValueError("--auto chooses with the held-out part of the reserved set; give "
                     "--reserved.holdout > 0.")
  backdoored = source.backdoored
  (images, labels), heldout = command.reserved.draw(backdoored.dataset)
  _, log = d3jax.auto(defense_name(command.defense), backdoored.model, backdoored.variables,
                      images, labels, *heldout, normalization=backdoored.normalization,
                      key=defense_key(command.reserved), grid=parse_grid(command.auto_grid),
                      config=command.defense, rule=command.auto_rule,
                      budget=command.auto_budget, progress=progress)
  swept = list(log["grid"])
  print(format_grid_table(log["candidates"], swept, ("heldout_acc", "distance")))
  chosen = log["candidates"][log["chosen"]]
  print("auto: chose " + ", ".join(f"{k}={chosen[k]:g}" for k in swept) +
        f" (held-out accuracy {100 * chosen['heldout_acc']:.2f}%, best "
        f"{100 * log['reference_acc']:.2f}%, rule {log['rule']})")
  return log["config"]


def _interrupt(signum: int, frame: Any) -> None:
  """SIGINT/SIGTERM handler: the running loop stops before its next epoch (a handler that raised
  could be swallowed by a garbage-collection callback); a second signal stops at once."""
  if stop_requested():
    raise KeyboardInterrupt
  request_stop(signum)


def _interrupted(command: Any, interrupt: KeyboardInterrupt) -> str:
  """The one line printed for Ctrl-C or SIGTERM: what was kept and how to continue."""
  if not isinstance(interrupt, runs.Interrupted):
    return "interrupted before a run directory was started; nothing was written."
  if interrupt.stage is None:
    return f"interrupted; nothing was written to {interrupt.out}: run the command again."
  how = ("run the same d3jax table command again (finished cells are reused, this one resumes)"
         if isinstance(command, TableCommand) else "run the same command with --resume")
  return (f"interrupted; the partial run of {interrupt.out} is kept in {interrupt.stage}: {how} "
          "to continue after its last saved epoch.")


def _storage_reason(err: BaseException) -> str | None:
  """The OS message ("No space left on device", ...) when ``err`` is a storage fault, else None.
  Orbax's tensorstore reports a full disk as a ValueError whose text carries that message."""
  if isinstance(err, OSError):  # d3jax's own one-line OSErrors carry no errno
    return err.strerror if err.errno in STORAGE_ERRNOS else None
  return next((os.strerror(code) for code in STORAGE_ERRNOS if os.strerror(code) in str(err)),
              None)


def _storage_fault(command: Any, err: BaseException, reason: str) -> str:
  """One line for a full disk or read-only file system met while writing a run."""
  filename = getattr(err, "filename", None)
  where = f" ({filename})" if filename else ""
  out = getattr(getattr(command, "output", None), "out", None) or getattr(command, "out", None)
  kept = ""
  if out is not None and checkpoint.staging_dir(out).is_dir():
    kept = (f"; the partial run is kept in {checkpoint.staging_dir(out)}: free space and run the "
            "same command with --resume")
  return f"{reason}{where} while writing{' ' + str(out) if out else ''}{kept}."


def main(argv: list[str] | None = None) -> int:
  """The ``d3jax`` entry point; returns the exit status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] in (["--version"], ["-V"]):
    print(f"d3jax {d3jax.__version__}")
    return 0
  debug = "--debug" in argv
  in_main_thread = threading.current_thread() is threading.main_thread()
  clear_stop()
  previous = {signum: signal.signal(signum, _interrupt)
              for signum in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}
  command = None
  try:
    command = _parse_quietly(argv) if not debug else parse(argv)
    run_command(command)
  except KeyboardInterrupt as interrupt:
    if debug:
      raise
    print(f"d3jax: {_interrupted(command, interrupt)}", file=sys.stderr)
    return 130
  except SystemExit as exit_:
    return exit_.code if isinstance(exit_.code, int) else 2
  except (*USER_ERRORS, OSError) as err:
    reason = _storage_reason(err)
    if debug or (reason is None and not isinstance(err, USER_ERRORS)):
      raise
    line = ' '.join(str(err).split()) if reason is None else _storage_fault(command, err, reason)
    print(f"d3jax: error: {line}", file=sys.stderr)
    return 2
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    clear_stop()
  return 0


def run() -> None:
  """The console entry point: :func:`main`'s status as the exit code. After an interrupt the
  process ends without Python's finalisation: a computation stopped mid-flight can crash XLA's
  teardown (seen once as a segfault after the one-line message), and the run directory is
  already consistent by then."""
  status = main()
  if status == 130:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  sys.exit(status)
