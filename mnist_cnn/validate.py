"""Check the config before any work: one message naming the key, the value and what is allowed.

``check(cfg)`` tests the composed config against ``RULES``. ``preflight(argv)`` runs before
Hydra starts a run: it composes the command line's overrides (a misspelt key or group option is
named with the closest real one), checks every value of a sweep too, and for ``resume`` returns
the command line that continues the old run in its own dir.

>>> try:
...     check(OmegaConf.create({"data": {"batch_size": 0}}))
... except ConfigError as e:
...     print(str(e)[:59])
Invalid config: data.batch_size=0 (allowed: an integer >= 1
"""

import difflib
import os
import sys
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig, OmegaConf

from mnist_cnn import CONFIG_DIR


class ConfigError(ValueError):
    """A config value or key that is not allowed; the message names it and what to do."""


def _int(low: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(test):
    return lambda v: isinstance(v, int | float) and not isinstance(v, bool) and test(v)


def _channels(v) -> bool:
    return isinstance(v, list | ListConfig) and len(v) == 2 and all(_int(1)(c) for c in v)


# Lightning's AcceleratorRegistry names plus "auto" and "gpu" (a test keeps them in step);
# listed here so a typo is reported without importing Lightning
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps", "tpu")
PRECISIONS = (  # Lightning's _PRECISION_INPUT, as strings
    *("32-true", "bf16-mixed", "16-mixed", "64-true", "bf16-true", "16-true"),
    *("transformer-engine", "transformer-engine-float16", "64", "32", "16", "bf16"),
)

# what MNISTClassifier logs during fit (per epoch), and after it
FIT_METRICS = ("val/acc", "val/loss", "val/acc_best", "train/acc", "train/loss")
METRICS = (*FIT_METRICS, "test/acc", "test/loss")

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
    "trainer.accelerator": (lambda v: v in ACCELERATORS, " or ".join(ACCELERATORS), ""),
    "trainer.precision": (
        lambda v: str(v) in PRECISIONS,
        ", ".join(PRECISIONS[:4]) + " or another Lightning precision",
        "trainer.precision=32-true",
    ),
    "trainer.deterministic": (lambda v: v in (True, False, "warn"), "true, false or warn", ""),
    "callbacks.step_checkpoint.every_n_seconds": (
        _number(lambda v: v > 0),
        "a number > 0 (seconds of training between saves of last.ckpt)",
        "callbacks.step_checkpoint.every_n_seconds=60",
    ),
    "callbacks.step_checkpoint.every_n_train_steps": (
        lambda v: v is None or _int(1)(v),
        "null or an integer >= 1 (training steps between saves of last.ckpt)",
        "callbacks.step_checkpoint.every_n_train_steps=200",
    ),
    "callbacks.model_checkpoint.monitor": (
        lambda v: v in FIT_METRICS,
        ", ".join(FIT_METRICS),
        "callbacks.model_checkpoint.monitor=val/loss callbacks.model_checkpoint.mode=min",
    ),
    "optimized_metric": (lambda v: v in METRICS, ", ".join(METRICS), ""),
    "tune.monitor": (lambda v: v in FIT_METRICS, ", ".join(FIT_METRICS), ""),
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
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def _not_writable(folder: Path) -> str | None:
    """Why ``folder`` cannot be made or written, judged by its nearest existing part."""
    if blocker := file_in_the_way(folder):
        return f"{blocker} is a file, not a folder"
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        return f"{existing} is not writable"
    return None


def check(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` naming every key whose value ``RULES`` does not allow."""
    problems = []
    for key in RULES:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and (problem := _problem(key, value)):
            problems.append(problem)
    if problems:
        raise ConfigError(
            f"Invalid config: {'; '.join(problems)}. Fix it on the command line or in conf/."
        )


def _keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in cfg:
        node = cfg._get_node(key)
        keys.append(prefix + str(key))
        if isinstance(node, DictConfig):
            keys += _keys(node, f"{prefix}{key}.")
    return keys


def _explain(overrides: list, config_name: str, error: Exception) -> str:
    """Name the override Hydra refused: an unknown group option or key, else Hydra's words."""
    for o in overrides:
        group = CONFIG_DIR / o.key_or_group
        if group.is_dir() and not o.is_delete():
            options = sorted(p.stem for p in group.glob("*.yaml"))
            if o.value() is not None and o.get_value_element_as_str() not in options:
                return (
                    f"Unknown option {o.input_line}: conf/{o.key_or_group}/ holds "
                    f"{', '.join(options)}. Use one of them, e.g. {o.key_or_group}={options[0]}."
                )
    groups = [o.input_line for o in overrides if (CONFIG_DIR / o.key_or_group).is_dir()]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=groups)
    known = [k for k in _keys(cfg) if not k.rsplit(".", 1)[-1].startswith("_")]  # no _target_
    for o in overrides:
        plain = not (o.is_add() or o.is_force_add() or (CONFIG_DIR / o.key_or_group).is_dir())
        if plain and OmegaConf.select(cfg, o.key_or_group, default=_ABSENT) is _ABSENT:
            close = difflib.get_close_matches(o.key_or_group, known, n=1, cutoff=0.75)
            hint = f"did you mean {close[0]}? " if close else ""
            add = "" if o.is_delete() else f"; to add a new key on purpose, write +{o.input_line}"
            return (
                f"Unknown config key {o.key_or_group} (in {o.input_line}): {hint}"
                f"`python -m mnist_cnn.{config_name} --cfg job` lists every key{add}."
            )
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"Invalid override: {' '.join(lines[:3])}"


def preflight(overrides: list[str], multirun: bool = False, config_name: str = "train") -> list:
    """Compose and check the command line's overrides; return the overrides to run with.

    For ``resume=true`` (or ``resume=<run dir>``) that is the old run's overrides, then these,
    then ``hydra.run.dir=<the old run dir>``, so the run continues where and how it was.
    """
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # a syntax error: Hydra reports it itself, with its grammar
        return overrides
    task = [o for o in parsed if not o.key_or_group.startswith("hydra")]
    sweeps = [o.input_line for o in task if o.is_sweep_override()]
    if sweeps and not multirun:
        raise ConfigError(
            f"{sweeps[0]} is a sweep (one job per value): add -m to run it, or quote a list "
            f"value as '{sweeps[0].split('=', 1)[0]}=[...]'."
        )
    first = [  # a sweep is composed with its first value; every value is checked below
        f"{o.get_key_element()}={next(o.sweep_string_iterator())}"
        if o.is_sweep_override()
        else o.input_line
        for o in task
    ]
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name, overrides=first)
    except Exception as e:
        raise ConfigError(_explain(task, config_name, e)) from None
    check(cfg)
    for o in task:
        if o.is_sweep_override() and o.key_or_group in RULES:
            bad = [p for v in o.sweep_iterator() if (p := _problem(o.key_or_group, v))]
            if bad:
                raise ConfigError(f"Invalid sweep {o.input_line}: {'; '.join(bad)}.")
    log_dir = OmegaConf.select(cfg, "paths.log_dir") if config_name in ("train", "tune") else None
    if log_dir and (why := _not_writable(Path(log_dir))):
        raise ConfigError(
            f"Cannot make runs under paths.log_dir={log_dir}: {why}. Pass a folder that can be "
            "written: paths.log_dir=/path/to/outputs."
        )
    if config_name != "train" or not (cfg.get("resume") or cfg.get("ckpt_path")):
        return overrides
    # torch: only with a checkpoint, which is checked before Hydra makes a run dir
    from mnist_cnn.checkpoint import check_continuation, find_run, load_checkpoint
    from mnist_cnn.runinfo import PENDING

    max_epochs = cfg.trainer.get("max_epochs")
    if not cfg.get("resume"):
        check_continuation(load_checkpoint(cfg.ckpt_path), cfg.ckpt_path, max_epochs, False)
        return overrides
    if multirun:
        raise ConfigError("resume cannot be combined with a sweep (-m): resume one run at a time.")
    run = find_run(cfg.paths.log_dir, cfg.resume).resolve()
    last = run / "checkpoints" / "last.ckpt"
    given = {o.key_or_group for o in task}
    fix = "Resume another run (resume=outputs/runs/<run>), or start a new run from this one's best"
    state = load_checkpoint(
        last, fix=f"{fix} checkpoint: ckpt_path={run}/checkpoints/<epoch>.ckpt."
    )
    if "trainer.max_epochs" in given:  # else the old run's own max_epochs applies
        check_continuation(state, last, max_epochs, True)
    given |= {"resume", "ckpt_path"}
    old_file = run / ".hydra" / "overrides.yaml"
    old = yaml.safe_load(old_file.read_text()) if old_file.is_file() else []
    old_parsed = OverridesParser.create().parse_overrides(old or [])
    kept = [o.input_line for o in old_parsed if o.key_or_group not in given]
    if any(o.key_or_group == "hydra.run.dir" for o in parsed):  # e.g. a DDP rank's own copy
        return [*kept, *overrides]
    quoted = str(run).replace("\\", "\\\\").replace("'", "\\'")
    # Hydra's files go to .hydra/pending until the run starts (runinfo.commit_hydra_files):
    # a resume that fails its checks leaves the run's config and overrides as they were
    return [*kept, *overrides, f"hydra.run.dir='{quoted}'", f"hydra.output_subdir={PENDING}"]


# flags the check works with; any other (--cfg, --help, --config-name, ...) goes straight to Hydra
_PLAIN_FLAGS = {"-m", "--multirun", "-r", "--run"}


def run_checked(main, config_name: str, argv: list[str] | None = None) -> None:
    """``python -m mnist_cnn.<config_name>``: check the overrides (and find the run to resume)
    before Hydra starts, then run the ``@hydra.main`` function ``main``. A bad override exits
    with status 2 and one line, no traceback."""
    from mnist_cnn.checkpoint import CheckpointError

    argv = sys.argv[1:] if argv is None else argv
    flags = [a for a in argv if a.startswith("-")]
    if all(f in _PLAIN_FLAGS for f in flags):
        overrides = [a for a in argv if not a.startswith("-")]
        try:
            overrides = preflight(
                overrides, bool({"-m", "--multirun"} & set(flags)), config_name=config_name
            )
        except (ConfigError, CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        sys.argv = [sys.argv[0], *flags, *overrides]
    main()
