"""Search hyper-parameters with Optuna; an interrupted search resumes where it stopped.

python -m mnist_cnn.tune trainer.max_epochs=3 tune.n_trials=30   # same overrides as train
python -m mnist_cnn.tune trainer.max_epochs=3 tune.n_trials=30   # again: resumes the study

Each trial is ``train(cfg)`` on the train config plus values drawn from ``conf/search_space/``;
``val/acc`` is reported after every epoch so the pruner can stop a lagging trial. The study
lives in ``outputs/tune/<study_name>/study.db`` (SQLite) with one dir per trial; ``best.yaml``
there holds the best parameters and the ``python -m mnist_cnn.train ...`` command that
reproduces the best trial. A trial stopped by Ctrl-C or SIGTERM, or cut off by a kill, runs again
with its values on the next run, continuing from its ``last.ckpt`` in its own dir.
"""

import copy
import logging
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import hydra
import lightning as L
import optuna
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry
from optuna.trial import TrialState

from mnist_cnn.callbacks import Diverged, Interrupted
from mnist_cnn.checkpoint import CheckpointError, epochs_done, load_checkpoint
from mnist_cnn.data import DataError
from mnist_cnn.train import train
from mnist_cnn.validate import ConfigError, run_checked

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_RUNNING: dict[int, optuna.Trial] = {}  # trials training in this process, for Pruning


class TuneError(ValueError):
    """A search space or study setting that cannot work; the message says what to change."""


class Pruning(L.Callback):
    """Reports ``monitor`` to the running Optuna trial after each validation epoch and stops
    the trial (``optuna.TrialPruned``) when the pruner says so. Added to each trial's config
    by ``tune``; ``trial`` is the trial's number."""

    def __init__(self, trial: int, monitor: str = "val/acc"):
        self.trial, self.monitor = _RUNNING[trial], monitor

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        epoch, value = trainer.current_epoch, float(trainer.callback_metrics[self.monitor])
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}: {self.monitor}={value:.4f}")


def suggest(trial: optuna.Trial, name: str, spec: DictConfig):
    """Draw one value for a ``conf/search_space/`` entry."""
    kind = spec.get("type")
    try:
        if kind == "float":
            return trial.suggest_float(name, spec.low, spec.high, log=spec.get("log", False))
        if kind == "int":
            step, use_log = spec.get("step", 1), spec.get("log", False)
            return trial.suggest_int(name, spec.low, spec.high, step=step, log=use_log)
        if kind == "categorical":
            return trial.suggest_categorical(name, list(spec.choices))
    except (ValueError, TypeError, AttributeError) as e:
        raise TuneError(f"search space entry for {name} is unusable ({e}).") from None
    raise TuneError(
        f"search space entry for {name} has type={kind}; use float (low, high, log), "
        "int (low, high, step, log) or categorical (choices) in conf/search_space/."
    )


def trial_config(
    cfg: DictConfig, params: dict, run_dir: Path, trial: int, resume: bool = False
) -> DictConfig:
    """The train config of one trial: ``cfg`` without the tune keys, plus ``params``;
    ``resume``: continue from ``run_dir``'s last.ckpt."""
    run = copy.deepcopy(cfg)
    with open_dict(run):
        for key in ("tune", "search_space"):
            run.pop(key)
        run.paths.output_dir = str(run_dir)
        run.test = cfg.tune.test
        run.resume = resume
        for key, value in params.items():
            if OmegaConf.select(run, key, default=KeyError) is KeyError:
                raise TuneError(
                    f"the search space sets {key}, which is not a key of the train config; "
                    "fix its `key:` in conf/search_space/ (`python -m mnist_cnn.train --cfg "
                    "job` lists every key)."
                )
            OmegaConf.update(run, key, value)
        run.callbacks = run.get("callbacks") or {}
        run.callbacks.optuna_pruning = {
            "_target_": f"{__name__}.Pruning",
            "trial": trial,
            "monitor": cfg.tune.monitor,
        }
    return run


def train_command(overrides: Sequence[str], params: dict) -> str:
    """``python -m mnist_cnn.train`` with the tune command's train overrides and ``params``."""
    kept = []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group
        if not key.startswith(("tune", "search_space", "hydra")) and key not in params:
            kept.append(o.input_line)
    kept += [f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()]
    return shlex.join(["python", "-m", "mnist_cnn.train", *kept])


def open_study(cfg: DictConfig) -> optuna.Study:
    """The study in ``tune.storage``, created or loaded; a killed run's trial is retried."""
    Path(cfg.tune.dir).mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # heartbeats are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            storage = optuna.storages.RDBStorage(
                cfg.tune.storage,
                heartbeat_interval=cfg.tune.heartbeat_interval,
                grace_period=cfg.tune.grace_period,
                heartbeat_stale_trial_callback=Retry(max_retry=2),
            )
        except Exception as e:  # SQLAlchemy's: an unknown scheme, a missing driver or folder
            why = str(e).splitlines()[0]
            raise TuneError(
                f"tune.storage={cfg.tune.storage} cannot be opened ({type(e).__name__}: {why}). "
                "Use a database URL SQLAlchemy can open, e.g. sqlite:///outputs/tune/study.db "
                "(the default is study.db in tune.dir)."
            ) from None
    study = optuna.create_study(
        study_name=cfg.tune.study_name,
        storage=storage,
        direction=cfg.tune.direction,
        pruner=hydra.utils.instantiate(cfg.tune.pruner),
        load_if_exists=True,
    )
    seed = cfg.tune.seed + len(study.trials) if cfg.tune.seed is not None else None
    study.sampler = hydra.utils.instantiate(cfg.tune.sampler, seed=seed)
    # a trial stopped by Ctrl-C or SIGTERM failed; queue it again, like a killed one
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in retries(t)}
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("stopped") and t.number not in retried:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                Retry()(study, t)
            log.info("trial %d was stopped: it runs again, from its last.ckpt", t.number)
    return study


def retries(trial: optuna.trial.FrozenTrial) -> list[int]:
    """The trials that ``trial`` runs again, the one right before it last."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return Retry.retry_history(trial)


def resumable(run_dir: Path, max_epochs: int | None) -> bool:
    """Whether ``run_dir/checkpoints/last.ckpt`` loads and has epochs left to train."""
    try:
        state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    except CheckpointError:
        return False
    return max_epochs is None or max_epochs < 0 or epochs_done(state) < max_epochs


def tune(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict:
    """Run trials until the study has ``tune.n_trials`` finished ones; save and return the best
    (``best.yaml``: trial, value, params, command). ``overrides``: the command line's."""
    searched = {spec.key: name for name, spec in cfg.search_space.items()}
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        if o.key_or_group in searched:
            name = searched[o.key_or_group]
            raise TuneError(
                f"{o.input_line} sets a key that search_space.{name} searches, so every trial "
                f"would replace it. To fix it, also drop that dimension (~search_space.{name}), "
                f"or change its range instead (search_space.{name}.low=..., .high=... or "
                ".choices=[...])."
            )
    study = open_study(cfg)
    out = Path(cfg.tune.dir)
    # trials are logged below; Optuna's own warnings would print a failed trial's traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    def objective(trial: optuna.Trial) -> float:
        params = {s.key: suggest(trial, s.key, s) for s in cfg.search_space.values()}
        run_dir = out / "trials" / f"{trial.number:03d}"
        # a stopped or killed trial run again: continue in its dir (the "dir" it inherits)
        before = retries(study.get_trials(deepcopy=False)[trial.number])
        stopped_dir = Path(trial.user_attrs.get("dir", run_dir))
        resume = bool(before) and resumable(stopped_dir, cfg.trainer.get("max_epochs"))
        if resume:
            run_dir = stopped_dir
            log.info("trial %d continues trial %d from %s", trial.number, before[-1], run_dir)
            # the pruner sees the epochs reported before the stop
            stopped = study.get_trials(deepcopy=False)[before[-1]]
            for step, value in stopped.intermediate_values.items():
                trial.report(value, step)
        trial.set_user_attr("dir", str(run_dir))
        trial.set_user_attr("stopped", False)
        log.info("trial %d: %s", trial.number, " ".join(f"{k}={v}" for k, v in params.items()))
        _RUNNING[trial.number] = trial
        try:
            try:
                metrics = train(trial_config(cfg, params, run_dir, trial.number, resume))
            except CheckpointError as e:  # e.g. a command line that changed model.net
                if not resume:
                    raise
                run_dir = out / "trials" / f"{trial.number:03d}"
                log.warning("trial %d starts again in %s: %s", trial.number, run_dir, e)
                trial.set_user_attr("dir", str(run_dir))
                metrics = train(trial_config(cfg, params, run_dir, trial.number))
        except optuna.TrialPruned as e:
            log.info("trial %d %s", trial.number, e)
            raise
        except Diverged as e:  # caught by study.optimize: the search goes on
            log.warning("trial %d failed: %s", trial.number, e)
            raise
        except (Interrupted, KeyboardInterrupt):  # the next run queues it again
            trial.set_user_attr("stopped", True)
            raise
        finally:
            del _RUNNING[trial.number]
        value = metrics[cfg.optimized_metric]
        log.info("trial %d: %s=%.4f", trial.number, cfg.optimized_metric, value)
        return value

    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    if finished < cfg.tune.n_trials:
        log.info("study %s: %d of %d trials done", cfg.tune.study_name, finished, cfg.tune.n_trials)
        study.optimize(
            objective,
            catch=(Diverged,),  # a diverging trial fails; the search goes on
            callbacks=[optuna.study.MaxTrialsCallback(cfg.tune.n_trials, states=FINISHED)],
            gc_after_trial=True,
        )
    return save_best(study, cfg, overrides)


def save_best(study: optuna.Study, cfg: DictConfig, overrides: Sequence[str]) -> dict:
    """Write ``best.yaml`` next to the study and log it."""
    counts = {s.name.lower(): len(study.get_trials(False, states=(s,))) for s in TrialState}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise TuneError(
            f"study {study.study_name} has no complete trial yet ({counts}); run more trials "
            "(tune.n_trials=N) or relax the pruner (tune.pruner.n_startup_trials)."
        )
    best = study.best_trial
    params = {k: v for k, v in best.params.items()}
    result = {
        "study": study.study_name,
        "storage": cfg.tune.storage,
        "trials": {k: v for k, v in counts.items() if v},
        "best_trial": best.number,
        "metric": cfg.optimized_metric,
        "value": best.value,
        "params": params,
        "dir": best.user_attrs.get("dir"),
        "command": train_command(overrides, params),
    }
    path = Path(cfg.tune.dir) / "best.yaml"
    path.write_text(yaml.safe_dump(result, sort_keys=False))
    log.info(
        "best of %d trials: #%d %s=%.4f %s\nreproduce it with:\n%s\n(saved in %s)",
        sum(counts[s.name.lower()] for s in FINISHED),
        best.number,
        cfg.optimized_metric,
        best.value,
        params,
        result["command"],
        path,
    )
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="tune")
def main(cfg: DictConfig) -> float | None:
    try:
        best = tune(cfg, HydraConfig.get().overrides.task)
    except (TuneError, ConfigError, DataError, CheckpointError) as e:
        log.error("%s", e)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt):
        log.warning(
            "Stopped: the trial that was running is marked failed and does not count. The same "
            "command resumes the study in %s, and that trial with it, from its last.ckpt.",
            cfg.tune.storage,
        )
        sys.exit(130)
    return best["value"]


if __name__ == "__main__":
    run_checked(main, "tune")
