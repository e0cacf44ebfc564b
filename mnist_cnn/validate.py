"""Check the config: one message naming the key, the value and what is allowed.

``check(cfg)`` tests the composed config against ``RULES`` at the top of each task function;
``SweepCheck`` (a Hydra callback) tests every value of a ``-m`` sweep before its first job;
``run(main)`` turns Hydra's composition errors (an unknown key, group option or override
syntax) into one line with exit status 2, and lets errors from user code keep their traceback.

>>> try:
...     check(OmegaConf.create({"data": {"batch_size": 0}}))
... except ConfigError as e:
...     print(str(e)[:59])
Invalid config: data.batch_size=0 (allowed: an integer >= 1
"""

import difflib
import errno
import functools
import logging
import os
import re
import shlex
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import (
    ConfigCompositionException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from mnist_cnn import runinfo  # noqa: F401 (registers conf/'s resolvers)
from mnist_cnn.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    Diverged,
    Interrupted,
    StorageError,
    in_user_code,
    unwrap,
)

log = logging.getLogger(__name__)


def _int(low: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(test):
    return lambda v: isinstance(v, int | float) and not isinstance(v, bool) and test(v)


def _channels(v) -> bool:
    return isinstance(v, list | ListConfig) and len(v) == 2 and all(_int(1)(c) for c in v)


# key: (test, what is allowed, an example); a key missing from the config is not checked
RULES = {
    "seed": (_int(0), "an integer >= 0", "seed=1"),
    "threads": (lambda v: v is None or _int(1)(v), "null or an integer >= 1", "threads=1"),
    "data.batch_size": (_int(1), "an integer >= 1", "data.batch_size=64"),
    "data.eval_batch_size": (_int(1), "an integer >= 1", "data.eval_batch_size=1000"),
    "data.num_workers": (_int(0), "an integer >= 0", "data.num_workers=0"),
    "data.loader": (lambda v: v in ("tensor", "torchvision"), "tensor or torchvision", ""),
    "model.optimizer.lr": (_number(lambda v: v > 0), "a number > 0", "model.optimizer.lr=0.001"),
    "model.net.dropout": (
        _number(lambda v: 0 <= v < 1),
        "a number in [0, 1)",
        "model.net.dropout=0.5",
    ),
    "model.label_smoothing": (
        _number(lambda v: 0 <= v < 1),
        "a number in [0, 1)",
        "model.label_smoothing=0.1",
    ),
    "model.net.hidden": (_int(1), "an integer >= 1", "model.net.hidden=1024"),
    "model.net.channels": (
        _channels,
        "two integers >= 1, conv1's and conv2's",
        "'model.net.channels=[32,64]'",
    ),
    "model.net.kernel_size": (_int(1), "an integer >= 1", "model.net.kernel_size=5"),
    "model.optimizer": (
        lambda v: False,  # only a config with a _target_ passes
        "a config with _target_",
        "model.optimizer._target_=torch.optim.AdamW",
    ),
    "model.scheduler": (
        lambda v: v is None,
        "null or a config with _target_, as in conf/experiment/best.yaml",
        "",
    ),
    "trainer.max_epochs": (_int(1), "an integer >= 1", "trainer.max_epochs=20"),
    "trainer.deterministic": (lambda v: v in (True, False, "warn"), "true, false or warn", ""),
    "callbacks.last_checkpoint.every_n_seconds": (
        _number(lambda v: v > 0),
        "a number > 0 (seconds of training between saves of last.ckpt)",
        "callbacks.last_checkpoint.every_n_seconds=60",
    ),
    "callbacks.last_checkpoint.every_n_train_steps": (
        lambda v: v is None or _int(1)(v),
        "null or an integer >= 1 (training steps between saves of last.ckpt)",
        "callbacks.last_checkpoint.every_n_train_steps=200",
    ),
    "tune.n_trials": (_int(1), "an integer >= 1", "tune.n_trials=30"),
    "tune.direction": (
        lambda v: v in ("maximize", "minimize"),
        "maximize or minimize",
        "tune.direction=maximize",
    ),
    "tune.study_name": (
        lambda v: isinstance(v, str) and v.strip() != "" and "/" not in v,
        "a name without /",
        "tune.study_name=lr_only",
    ),
    "tune.seed": (lambda v: v is None or _int(0)(v), "null or an integer >= 0", "tune.seed=0"),
    "tune.heartbeat_interval": (_int(1), "an integer >= 1 (seconds)", "tune.heartbeat_interval=30"),
    "tune.grace_period": (_int(1), "an integer >= 1 (seconds)", "tune.grace_period=120"),
    "resume": (
        lambda v: isinstance(v, bool) or (isinstance(v, str) and v != ""),
        "true, false or a run dir",
        "resume=true",
    ),
}
_ABSENT = object()
# lightning-hydra-template's keys with no counterpart here, and this template's way
FOREIGN = {
    "hparams_search": (
        "the search runs as its own command here: python -m mnist_cnn.tune with the same "
        "overrides as train, its space in conf/search_space/ (docs/tuning.md)"
    ),
    "extras": (
        "there are no extras here: --cfg job prints the config before a run, and the config "
        "tree is checked as it is composed"
    ),
}


def _problem(key: str, value) -> str | None:
    test, allowed, example = RULES[key]
    if isinstance(value, DictConfig) and "_target_" in value:  # e.g. a custom Accelerator object
        return None
    if test(value):
        return None
    shown = OmegaConf.to_container(value) if isinstance(value, DictConfig) else value
    shown = "null" if shown is None else shown
    return f"{key}={shown} (allowed: {allowed}{', e.g. ' + example if example else ''})"


def file_in_the_way(folder: Path) -> Path | None:
    """The file that stops ``folder`` from being made: ``folder`` or its nearest existing
    parent, when that is not a folder."""
    existing = next((p for p in (folder, *folder.parents) if _exists(p)), None)
    return existing if existing is not None and not existing.is_dir() else None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a name over 255 characters
        return False


def check(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` naming every key whose value ``RULES`` does not allow."""
    for key in FOREIGN:
        if key in cfg:
            raise ConfigError(f"{key} is lightning-hydra-template's key: {FOREIGN[key]}.")
    problems = []
    for key in RULES:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and (problem := _problem(key, value)):
            problems.append(problem)
    if problems:
        raise ConfigError(
            f"Invalid config: {'; '.join(problems)}. Fix it on the command line or in conf/."
        )


TRAINER_FLAGS = ("accelerator", "devices", "precision")


def check_trainer(trainer: DictConfig | None) -> None:
    """Lightning's own check of ``trainer.accelerator``, ``devices`` and ``precision`` (a
    Trainer made of them alone), as a one-line ``ConfigError``: before the run dir, not after
    the data and model are built."""
    flags = {k: trainer[k] for k in TRAINER_FLAGS if trainer is not None and k in trainer}
    if not flags or any(isinstance(v, DictConfig) for v in flags.values()):  # e.g. an object
        return
    import lightning as L
    from lightning.fabric.plugins.environments import LightningEnvironment

    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the real Trainer says which device it uses
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = OmegaConf.to_container(OmegaConf.create(flags))
            # not Slurm's or torchrun's environment: their ranks and node counts come later
            L.Trainer(**plain, logger=False, plugins=[LightningEnvironment()])
    except Exception as e:  # its ValueError or MisconfigurationException names what is allowed
        words = " ".join(str(e).split())
        named = [k for k in TRAINER_FLAGS if f"{k}=" in words] or TRAINER_FLAGS[::-1]
        key = next((k for k in named if k in words.lower()), "accelerator")  # CPUAccelerator
        raise ConfigError(
            f"Invalid config: trainer.{key}={flags.get(key)}: {words} Fix it on the command "
            "line or in conf/trainer/."
        ) from None
    finally:
        quiet.setLevel(level)


METRIC_KEYS = ("callbacks.model_checkpoint.monitor", "optimized_metric", "tune.monitor")


def check_metrics(cfg: DictConfig, logged: list[str], keys=METRIC_KEYS, module=None) -> None:
    """Raise ``ConfigError`` when one of ``keys`` names a metric the module does not log
    (``logged``: what it logs, e.g. ``val/acc``); a typo would otherwise fail after an epoch.
    With ``module`` (its class name), ``logged`` is what its first validation logged, and only
    ``val/`` names are checked."""
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or value in logged or (module and not str(value).startswith("val/")):
            continue
        close = difflib.get_close_matches(str(value), logged, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        allowed = ", ".join(logged) or "none"
        if module:
            raise ConfigError(
                f"Invalid config: {key}={value} is not a metric the module {module} logged in "
                f"its first validation (it logged: {allowed}). {hint.capitalize()}Log it with "
                f"self.log('{value}', ...) in validation_step, or pass {key}=<one it logs>."
            )
        raise ConfigError(
            f"Invalid config: {key}={value} is not a metric the module logs: {hint}"
            f"allowed: {allowed}."
        )


class ConfigCheck(Callback):
    """Hydra callback: ``check`` the composed config before Hydra makes the run dir; before a
    ``-m`` sweep's first job, every value of every swept key that ``RULES`` knows too."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from mnist_cnn.checkpoint import check_continuation, load_checkpoint

        try:
            check(config)
            check_trainer(config.get("trainer"))
            if ckpt := OmegaConf.select(config, "ckpt_path", default=None):  # before the run dir
                max_epochs = OmegaConf.select(config, "trainer.max_epochs", default=None)
                check_continuation(load_checkpoint(ckpt, keep=True), ckpt, max_epochs, False)
            elif OmegaConf.select(config, "resume", default=False):
                run = Path(config.hydra.run.dir)
                fix = (
                    "Resume another run (resume=outputs/runs/<run>), or start a new run from "
                    f"this one's best checkpoint: ckpt_path={run}/checkpoints/<epoch>.ckpt."
                )
                load_checkpoint(run / "checkpoints" / "last.ckpt", fix=fix, keep=True)
        except Exception as e:  # Hydra turns a callback's exception into a warning
            if (message := explain(e)) is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            if OmegaConf.select(config, "resume", default=False):
                raise ConfigError("resume cannot be combined with -m: resume one run at a time.")
            check(config)
            parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
            for o in parsed:
                if o.is_sweep_override() and o.key_or_group in RULES:
                    bad = [p for v in o.sweep_iterator() if (p := _problem(o.key_or_group, v))]
                    if bad:
                        raise ConfigError(f"Invalid sweep {o.input_line}: {'; '.join(bad)}.")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)


def hydra_flags(config_name: str | None = None) -> list[str]:
    """This command line's ``--config-dir`` (and ``--config-name``, when it is not
    ``config_name``), for a command printed for the user to run again: it then finds the same
    config groups."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    hydra_cfg, flags = HydraConfig.get(), []
    for source in hydra_cfg.runtime.config_sources:
        if source.provider == "command-line" and source.schema == "file":
            flags += ["--config-dir", source.path]
    if config_name and hydra_cfg.job.config_name != config_name:
        flags += ["--config-name", hydra_cfg.job.config_name]
    return flags


def _command() -> str:
    name = Path(sys.argv[0]).stem
    commands = ("train", "eval", "predict", "export", "tune", "serve")
    return f"python -m mnist_cnn.{name if name in commands else 'train'}"


def _did_you_mean(error: ConfigCompositionException) -> str | None:
    """An unknown key in an override: the closest key of the same node."""
    cause = error.__cause__
    parent, key = getattr(cause, "parent_node", None), getattr(cause, "key", None)
    quoted = re.search(r"override '([^']+)'", str(error))
    if not isinstance(parent, DictConfig) or key is None or quoted is None:
        return None
    given = quoted[1]
    if (root := given.lstrip("+~").split(".")[0]) in FOREIGN:
        return f"{root} is lightning-hydra-template's key: {FOREIGN[root]}."
    add = re.search(r"use (\+\S+)", str(error))
    node, value = given.lstrip("+~"), add[1].partition("=")[2] if add else ""
    if value.startswith("{") and str(getattr(cause, "full_key", "")).startswith(node + "."):
        group = node.replace(".", "/")
        return (
            f"{node}={value} merges into the {node} node, which has no key {key}: Hydra keeps the "
            f"keys already there ({', '.join(map(str, parent))}). To replace the whole node, write "
            f"~{node} '+{node}={value}', or save it as conf/{group}/<name>.yaml and pick it "
            f"with {group}=<name>."
        )
    parts = given.split(".")
    close = difflib.get_close_matches(str(key), [str(k) for k in parent], n=1, cutoff=0.6)
    hint = ""
    if close and str(key) in parts:
        i = parts.index(str(key))
        hint = f"did you mean {'.'.join([*parts[:i], close[0], *parts[i + 1 :]])}? "
    return (
        f"Unknown config key {given}: {hint}`{_command()} --cfg job` prints every key; to add a "
        f"new key on purpose, write {add[1] if add else '+' + given + '=...'}"
    )


def explain(error: BaseException) -> str | None:
    """One line for a mistake on the command line, or None when ``error`` is something else."""
    if isinstance(error, MissingConfigException) and getattr(error, "options", None) is not None:
        group, _, option = str(error.missing_cfg_file).rpartition("/")
        return (
            f"Unknown option {group}={option}: {group} has {', '.join(error.options)} "
            f"(in conf/{group}/ or a --config-dir). Use one of them, e.g. "
            f"{group}={error.options[0]}."
        )
    if isinstance(error, ConfigCompositionException) and (hint := _did_you_mean(error)):
        return hint
    if isinstance(error, ConfigCompositionException | MissingConfigException):
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return " ".join(
            line for line in lines if not line.startswith(("Config search", "provider"))
        )
    if isinstance(error, OverrideParseException):
        return (
            f"Cannot parse the override {error.override!r}: {error.message.splitlines()[0]}. "
            "Quote values with spaces or unusual characters: key='a value'."
        )
    for e in _chain(error):  # e.g. from a resolver of the run dir: resume=<a run with no ckpt>
        if isinstance(e, ConfigError | CheckpointError):
            return str(e)
    if "Unknown plugin class : 'hydra_plugins.mnist_cnn_launcher" in str(error):
        return (
            "hydra/launcher=joblib is this project's plugin, which Hydra cannot find in a default "
            "editable install: reinstall with make install, or with pip install -e '.[dev]' "
            "--config-settings editable_mode=compat."
        )
    if out_of_memory(error):
        return (
            "Out of memory: lower data.batch_size or data.eval_batch_size, or use a smaller "
            "model.net; trainer.precision=bf16-mixed halves activations."
        )
    return None


def out_of_memory(error: BaseException) -> bool:
    """torch ran out of memory: a GPU's is ``torch.OutOfMemoryError``, the CPU allocator's a
    RuntimeError."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error) if isinstance(error, RuntimeError) else ""
    return "DefaultCPUAllocator" in text and ("can't allocate" in text or "not enough" in text)


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


_STARTED = False  # the task function has started: errors from here on are not composition's


def task(fn):
    """Below ``@hydra.main``: marks that the config was composed and the task began."""

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig):
        global _STARTED
        _STARTED = True
        return fn(cfg)

    return wrapper


def run(main) -> None:
    """``python -m mnist_cnn.<command>``: run the ``@hydra.main`` function ``main``. A mistake in
    the command line or the config is one line on stderr and exit status 2; an error raised by
    user code keeps its whole traceback."""
    # Hydra prints a composition error and exits 1; raising lets it be named in one line here
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except Exception as e:
        message = explain(e)
        if message is None and isinstance(e, OSError) and not _STARTED:  # making the run dir
            blocker = file_in_the_way(Path(e.filename)) if e.filename else None
            why = f"{blocker} is a file, not a folder" if blocker else (e.strerror or str(e))
            message = (
                f"Cannot make the run dir {e.filename or ''}: {why}. Pass a folder that can be "
                "written: paths.log_dir=/path/to/outputs (or hydra.run.dir=...)."
            )
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build(group: str, make, cfg: DictConfig | None = None):
    """``make()``; an error raised while building the ``group`` config (a bad ``_target_``, an
    argument the class refuses, no GPU for trainer.accelerator=gpu) as a one-line
    ``ConfigError``. An error raised inside the user's own code keeps its traceback."""
    try:
        return make()
    except ConfigError:
        raise
    except Exception as e:  # Hydra wraps the class's own error, which names the problem
        cause = unwrap(e)
        if isinstance(cause, ConfigError | DataError | CheckpointError) or in_user_code(cause):
            raise cause from None  # the user's own bug keeps its traceback, file and line
        targets, wrapper = [], e  # the instantiations it went through, outermost first
        while isinstance(wrapper, InstantiationException):
            if found := re.match(r"Error in call to target '([^']+)'", str(wrapper)):
                targets.append(found[1])
            wrapper = wrapper.__cause__
        words = " ".join(line.strip() for line in str(cause).splitlines() if line.strip())
        fix = (
            f"Fix the {group}.* override on the command line or in conf/{group}/ "
            "(python -m mnist_cnn.train --cfg job shows them)."
        )
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", words)
        if targets and unexpected and cfg is not None:
            fix = _unexpected_key(cfg.get(group), group, targets[-1], unexpected[1]) or fix
        where = f" (in {targets[-1]})" if targets else ""
        raise ConfigError(f"Cannot build {group} from the config: {words}{where}. {fix}") from None


def _unexpected_key(node, path: str, target: str, key: str) -> str | None:
    """Where ``key``, refused by ``target``, sits in the config, and how to drop it or replace
    its whole node (Hydra merges ``node={...}`` into the keys already there)."""
    if not isinstance(node, DictConfig):
        return None
    if key in node and "_target_" in node:
        try:
            same = hydra.utils.get_object(node._target_) is hydra.utils.get_object(target)
        except Exception:  # a _target_ that does not import is another error
            same = False
        if same:
            group = path.replace(".", "/")
            return (
                f"{path}.{key} is not one of its arguments: remove it with ~{path}.{key}. To "
                f"replace the whole node, write ~{path} '+{path}={{...}}' (Hydra merges "
                f"{path}={{...}} into the keys already there), or save it as "
                f"conf/{group}/<name>.yaml and pick it with {group}=<name>."
            )
    for child, value in node.items():
        if hint := _unexpected_key(value, f"{path}.{child}", target, key):
            return hint
    return None


WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.ENOENT, errno.EFBIG)
KINDS = {ConfigError: "config", DataError: "data", CheckpointError: "checkpoint"}
KINDS |= {Diverged: "diverged", StorageError: "storage"}


def _storage_error(e: OSError, cfg: DictConfig) -> StorageError:
    where = os.fsdecode(e.filename) if e.filename else cfg.paths.output_dir
    fix = "Free some space or make the folder writable"
    if e.errno == errno.ENOENT:
        fix = "Was the run dir deleted or moved while training? Leave it in place"
    run = Path(cfg.paths.output_dir)
    last = run / "checkpoints" / "last.ckpt"
    again = f"resume={run}"
    if not (run / ".hydra" / "config.yaml").is_file():  # its settings are gone with it
        again = f"ckpt_path={last} with the run's settings"
    kept = f"the last complete checkpoint is kept, and {again} continues from it"
    if not last.is_file():  # the first save failed: there is nothing to continue from
        kept = "no checkpoint was saved yet: run the same command again"
    return StorageError(
        f"Cannot write {where}: {e.strerror or e}. {fix} (or pass paths.log_dir=/another/folder); "
        f"{kept}."
    )


def _thread_write_error(args) -> None:
    """A background writer (TensorBoard's event thread) that cannot write: one line, not a
    traceback; the main thread names the fault when it writes next."""
    e = args.exc_value
    if isinstance(e, OSError) and e.errno in WRITE_ERRORS:
        where = os.fsdecode(e.filename) if e.filename else "a file"
        log.warning("%s could not write %s: %s", args.thread.name, where, e.strerror or e)
    else:
        threading.__excepthook__(args)


def _out_of_memory(cfg: DictConfig) -> ConfigError:
    batch = OmegaConf.select(cfg, "data.batch_size", default="?")
    evals = OmegaConf.select(cfg, "data.eval_batch_size", default="?")
    precision = str(OmegaConf.select(cfg, "trainer.precision", default=""))
    half = "" if "16" in precision else "; trainer.precision=bf16-mixed halves activations"
    return ConfigError(
        f"Out of memory: lower data.batch_size (now {batch}) or data.eval_batch_size (now "
        f"{evals}), or use a smaller model.net{half}."
    )


def _job_failed(cfg: DictConfig, error: Exception) -> None:
    """In a ``-m`` sweep: record the failed job for the sweep report; the other jobs go on."""
    kind = next((k for t, k in KINDS.items() if isinstance(error, t)), "exception")
    line = str(error).splitlines()[0] if str(error) else type(error).__name__
    if kind == "exception":
        log.exception("the job failed; the sweep goes on with the other jobs")
        line = f"{type(error).__name__}: {line}"
    path = Path(cfg.paths.output_dir) / "job_failed.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"error": line, "kind": kind}, sort_keys=False))


@contextmanager
def failures(cfg: DictConfig):
    """Around a training run (``train.main``): a ``ConfigError``, ``DataError``,
    ``CheckpointError``, ``Diverged`` or a run file that cannot be written is one line and exit
    status 2; ``Interrupted`` the resume command and 128 + the signal; in a ``-m`` sweep any of
    them, and an error in the user's code, is the job's ``job_failed.yaml`` and the others go
    on. Elsewhere the user's error keeps its traceback."""
    sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    threading.excepthook = _thread_write_error
    try:
        try:
            yield
        except OSError as e:  # ours to name only when the run's files cannot be written
            if e.errno not in WRITE_ERRORS or in_user_code(e):
                raise
            raise _storage_error(e, cfg) from None
        except Exception as e:
            if not out_of_memory(e):
                raise
            raise _out_of_memory(cfg) from None
    except (ConfigError, DataError, CheckpointError, Diverged, StorageError) as e:
        log.error("%s", e)
        if not sweep:
            sys.exit(2)
        _job_failed(cfg, e)
    except Interrupted as e:
        if e.checkpoint:
            again = shlex.join(["python", "-m", "mnist_cnn.train", *hydra_flags("train")])
            log.warning(
                "%s Resume with: %s resume=%s (or resume=true for the newest run), adding "
                "trainer.max_epochs=N to change the length.",
                e,
                again,
                cfg.paths.output_dir,
            )
        else:
            log.warning("%s Training had not started: run the same command again.", e)
        sys.exit(128 + e.signum)
    except Exception as e:  # the user's code: its traceback; in a sweep, the other jobs go on
        if not sweep:
            raise
        _job_failed(cfg, e)
