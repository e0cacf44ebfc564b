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
import signal
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
_SIGTERM: list[int] = []  # a SIGTERM received between trials (tune's main only)


class TuneError(ValueError):
    """A search space or study setting that cannot work; the message says what to change."""


class Pruning(L.Callback):
    """Reports ``monitor`` to the running Optuna trial after each validation epoch and stops
    the trial (``optuna.TrialPruned``) when the pruner says so. Added to each trial's config
    by ``tune``; ``trial`` is the trial's number."""

    def __init__(self, trial: int, monitor: str = "val/acc", history: list | None = None):
        self.trial, self.monitor, self.history = _RUNNING[trial], monitor, history or []

    def on_train_start(self, trainer, pl_module) -> None:
        # a stopped trial run again: once its checkpoint is loaded, the pruner gets its epochs
        for step, value in self.history:
            if step < trainer.current_epoch:
                self.trial.report(value, step=step)

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
        if "dynamic value space" in str(e):
            raise TuneError(
                f"the choices of {name} differ from those this study's trials used; Optuna "
                "needs the same choices throughout a study. Start a new study "
                "(tune.study_name=NEW) or keep the old choices."
            ) from None
        raise TuneError(f"search space entry for {name} is unusable ({e}).") from None
    raise TuneError(
        f"search space entry for {name} has type={kind}; use float (low, high, log), "
        "int (low, high, step, log) or categorical (choices) in conf/search_space/."
    )


def trial_config(
    cfg: DictConfig, params: dict, run_dir: Path, trial: int, history: list | None = None
) -> DictConfig:
    """The train config of one trial: ``cfg`` without the tune keys, plus ``params``;
    ``history``: continue from ``run_dir``'s last.ckpt, whose epochs reported these
    ``[epoch, value]`` pairs."""
    run = copy.deepcopy(cfg)
    with open_dict(run):
        for key in ("tune", "search_space"):
            run.pop(key)
        run.paths.output_dir = str(run_dir)
        run.test = cfg.tune.test
        run.resume = history is not None
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
            "history": history or [],
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
    """The study in ``tune.storage``, created or loaded; a stopped or killed trial is queued to
    run again."""
    Path(cfg.tune.dir).mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # heartbeats are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            storage = optuna.storages.RDBStorage(
                cfg.tune.storage,
                heartbeat_interval=cfg.tune.heartbeat_interval,
                grace_period=cfg.tune.grace_period,
                heartbeat_stale_trial_callback=Retry(),
            )
        except Exception as e:  # SQLAlchemy's: an unknown scheme, a missing driver or folder
            why = str(e).splitlines()[0]
            raise TuneError(
                f"tune.storage={cfg.tune.storage} cannot be opened ({type(e).__name__}: {why}). "
                "Use a database URL SQLAlchemy can open, e.g. sqlite:///outputs/tune/study.db "
                "(the default is study.db in tune.dir)."
            ) from None
    pruner = _build("pruner", cfg.tune.pruner)
    study = optuna.create_study(
        study_name=cfg.tune.study_name,
        storage=storage,
        direction=cfg.tune.direction,
        pruner=pruner,
        load_if_exists=True,
    )
    seed = cfg.tune.seed + len(study.trials) if cfg.tune.seed is not None else None
    study.sampler = _build("sampler", cfg.tune.sampler, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # killed ones: queued again by Retry
        # a trial stopped by Ctrl-C or SIGTERM failed; queue it again, like a killed one
        trials = study.get_trials(deepcopy=False)
        retried = {n for t in trials for n in retries(t)}
        for t in trials:
            if t.state != TrialState.FAIL or not t.user_attrs.get("stopped") or t.number in retried:
                continue
            if misfit := _misfit(t, cfg.search_space):
                log.warning("trial %d was stopped; it does not run again: %s", t.number, misfit)
                continue
            Retry()(study, t)
            log.info("trial %d was stopped: it is queued to run again", t.number)
    if running := len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
        log.info(
            "%d trial(s) of this study are running elsewhere: another tune process, or a killed "
            "one, which runs again once it has missed heartbeats for tune.grace_period=%s s",
            running,
            cfg.tune.grace_period,
        )
    return study


def _build(name: str, node: DictConfig, **kwargs):
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except Exception as e:  # a _target_ that does not exist, an argument it does not take
        why = str(e).splitlines()[0]
        raise TuneError(
            f"Cannot build tune.{name} from the config: {why}. Fix the tune.{name}.* override "
            f"(any optuna.{name}s class, e.g. tune.{name}._target_=optuna.{name}s."
            f"{'MedianPruner' if name == 'pruner' else 'TPESampler'})."
        ) from None


def _misfit(trial: optuna.trial.FrozenTrial, space: DictConfig) -> str | None:
    """Why ``trial``'s values cannot be run again in the current search space, or None."""
    keys = {spec.key: spec for spec in space.values()}
    if set(trial.params) != set(keys):
        return f"the search space now searches {sorted(keys)}, not {sorted(trial.params)}"
    for key, value in trial.params.items():
        spec = keys[key]
        if spec.get("type") == "categorical":
            fits = list(spec.choices) == list(trial.distributions[key].choices)
        else:
            fits = spec.low <= value <= spec.high
        if not fits:
            return f"{key}={value} is outside the search space now"
    return None


def retries(trial: optuna.trial.FrozenTrial) -> list[int]:
    """The trials that ``trial`` runs again, the one right before it last."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return Retry.retry_history(trial)


def resume_problem(run_dir: Path, max_epochs: int | None) -> str | None:
    """Why ``run_dir/checkpoints/last.ckpt`` cannot be continued, or None."""
    try:
        state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    except CheckpointError as e:
        return str(e).split(". ")[0].removeprefix("Cannot use checkpoint ")
    done = epochs_done(state)
    if max_epochs is not None and max_epochs >= 0 and done >= max_epochs:
        return f"its last.ckpt has {done} epochs done, trainer.max_epochs={max_epochs}"
    return None


def continuation(
    study: optuna.Study, trial: optuna.Trial, out: Path, max_epochs: int | None
) -> tuple[Path, list | None]:
    """The run dir of ``trial`` and, when it continues a stopped or killed trial from that
    trial's dir (the "dir" it inherits), the ``[epoch, value]`` pairs the stopped one reported."""
    run_dir = out / "trials" / f"{trial.number:03d}"
    before = retries(study.get_trials(deepcopy=False)[trial.number])
    if not before:
        return run_dir, None
    stopped_dir = Path(trial.user_attrs.get("dir", run_dir))
    if problem := resume_problem(stopped_dir, max_epochs):
        log.info(
            "trial %d runs trial %d again from the start: %s", trial.number, before[-1], problem
        )
        return run_dir, None
    stopped = study.get_trials(deepcopy=False)[before[-1]]
    log.info("trial %d continues trial %d from %s", trial.number, before[-1], stopped_dir)
    return stopped_dir, sorted([k, v] for k, v in stopped.intermediate_values.items())


def tune(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict:
    """Run trials until the study has ``tune.n_trials`` finished ones; save and return the best
    (``best.yaml``: trial, value, params, command). ``overrides``: the command line's.
    Raises ``Interrupted`` after a stop (the study then holds everything done so far)."""
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
    stops: list[Interrupted] = []

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("stopped", False)  # a retry inherits its trial's attributes
        if _SIGTERM:  # came as the previous trial ended: nothing of this one has run
            raise Interrupted(_SIGTERM[0], None)
        params = {s.key: suggest(trial, s.key, s) for s in cfg.search_space.values()}
        trial.set_user_attr("params", params)  # what runs (a retry's params may hold more)
        run_dir, history = continuation(study, trial, out, cfg.trainer.get("max_epochs"))
        trial.set_user_attr("dir", str(run_dir))
        log.info("trial %d: %s", trial.number, " ".join(f"{k}={v}" for k, v in params.items()))
        _RUNNING[trial.number] = trial
        try:
            try:
                metrics = train(trial_config(cfg, params, run_dir, trial.number, history))
            except CheckpointError as e:  # e.g. a command line that changed model.net
                if history is None:
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
        except Interrupted as e:
            if cfg.optimized_metric not in (e.metrics or {}):  # cut short: the next run queues it
                trial.set_user_attr("stopped", True)
                raise
            metrics = e.metrics  # stopped after its last batch: the trial is complete
            stops.append(e)
            study.stop()
        except KeyboardInterrupt:
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
            callbacks=[
                optuna.study.MaxTrialsCallback(cfg.tune.n_trials, states=FINISHED),
                lambda study, trial: _SIGTERM and study.stop(),
            ],
            # no gc.collect() after each trial: a Ctrl-C during it is lost in a weakref callback
            gc_after_trial=False,
        )
    if stops:
        raise stops[0]
    if _SIGTERM:
        raise Interrupted(_SIGTERM[0], None)
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
    params = best.user_attrs.get("params", best.params)
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


def _on_sigterm(signum, frame):
    # between trials (during one, GracefulStop takes over): raising here could land in a
    # SQLAlchemy weakref callback, where Python drops it; the search checks the flag instead
    _SIGTERM.append(signum)


@hydra.main(version_base="1.3", config_path="../conf", config_name="tune")
def main(cfg: DictConfig) -> float | None:
    signal.signal(signal.SIGTERM, _on_sigterm)  # as Ctrl-C: a trial in flight is marked stopped
    try:
        best = tune(cfg, HydraConfig.get().overrides.task)
    except (TuneError, ConfigError, DataError, CheckpointError) as e:
        log.error("%s", e)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt) as e:
        log.warning(
            "%s The same command resumes the study in %s; a trial cut short runs again, from "
            "its last.ckpt when it has one.",
            str(e) or "Stopped by SIGINT.",
            cfg.tune.storage,
        )
        sys.exit(128 + getattr(e, "signum", signal.SIGINT))
    return best["value"]


if __name__ == "__main__":
    run_checked(main, "tune")
