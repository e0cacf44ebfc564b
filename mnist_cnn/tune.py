"""Search hyper-parameters with Optuna; an interrupted search resumes where it stopped.

python -m mnist_cnn.tune trainer.max_epochs=3 tune.n_trials=30   # same overrides as train
python -m mnist_cnn.tune trainer.max_epochs=3 tune.n_trials=30   # again: resumes the study

Each trial is ``train(cfg)`` on the train config plus values drawn from ``conf/search_space/``;
``val/acc`` is reported after every epoch so the pruner can stop a lagging trial. The study
lives in ``outputs/tune/<study_name>/study.db`` (SQLite) with one dir per trial; ``best.yaml``
there holds the best parameters and the ``python -m mnist_cnn.train ...`` command that
reproduces the best trial. A trial stopped by Ctrl-C or SIGTERM, or cut off by a kill, runs again
with its values on the next run, continuing from its ``last.ckpt`` in its own dir. Any number of
workers share one study: the same command started anywhere that sees ``tune.dir``, or, on
machines that share no file system, with ``tune.storage=postgresql+psycopg://...`` and each its
own ``tune.dir``.
"""

import copy
import logging
import os
import shlex
import signal
import sys
import threading
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import hydra
import lightning as L
import optuna
import yaml
from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from mnist_cnn import runinfo
from mnist_cnn.checkpoint import epochs_done, load_checkpoint
from mnist_cnn.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    Diverged,
    Interrupted,
    Lost,
    TuneError,
)
from mnist_cnn.files import writing
from mnist_cnn.module import logged_metrics, make_model
from mnist_cnn.train import train
from mnist_cnn.validate import build, check_metrics, hydra_flags, run, task

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_RUNNING: dict[int, optuna.Trial] = {}  # trials training in this process, for Pruning
_SIGTERM: list[int] = []  # a SIGTERM received between trials (tune's main only)


def trial_id(trial: optuna.Trial) -> int:
    """The storage's id of ``trial`` (the storage's calls take it), by the storage's lookup."""
    study_id = trial.storage.get_study_id_from_name(trial.study.study_name)
    return trial.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)


def lost(trial: optuna.Trial) -> bool:
    """Whether ``trial`` is no longer this worker's: no longer RUNNING in the study."""
    return trial.storage.get_trial(trial_id(trial)).state != TrialState.RUNNING


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
        if lost(self.trial):
            raise Lost()
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


def search_space(cfg: DictConfig) -> dict[str, DictConfig]:
    """The dimensions of ``cfg.search_space`` whose ``key`` is in ``cfg``; the others do not
    apply to this network (or data, optimizer) and are left out, with a line that names them."""
    space, left_out = {}, []
    for name, spec in cfg.search_space.items():
        if not isinstance(spec, DictConfig) or not isinstance(spec.get("key"), str):
            raise TuneError(f"search_space.{name} needs a `key:` (the config key it sets).")
        if OmegaConf.select(cfg, spec.key, default=KeyError) is KeyError:
            left_out.append(f"{name} ({spec.key})")
        else:
            space[name] = spec
    net = OmegaConf.select(cfg, "model.net._target_")
    if not space:
        raise TuneError(
            f"no key of the search space is a key of this config (model.net: {net}): "
            f"{', '.join(left_out)}. Fix their `key:` in conf/search_space/ (`python -m "
            "mnist_cnn.train --cfg job` lists every key)."
        )
    if left_out:
        log.info(
            "search space: left out %s: not in this config (model.net: %s)",
            ", ".join(left_out),
            net,
        )
    return space


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
    return shlex.join(["python", "-m", "mnist_cnn.train", *hydra_flags(), *kept])


def open_study(cfg: DictConfig, space: dict) -> optuna.Study:
    """The study in ``tune.storage``, created or loaded; a stopped or killed trial is queued to
    run again. Call it holding ``study_lock``."""
    with warnings.catch_warnings():  # heartbeats are marked experimental
        warnings.simplefilter("ignore", ExperimentalWarning)
        try:
            storage = optuna.storages.RDBStorage(
                cfg.tune.storage,
                heartbeat_interval=cfg.tune.heartbeat_interval,
                grace_period=cfg.tune.grace_period,
                heartbeat_stale_trial_callback=Retry(),
            )
        except Exception as e:  # SQLAlchemy's: an unknown scheme, a missing driver or folder
            raise unusable(cfg.tune.storage, e) from None
    pruner = _build("pruner", cfg.tune.pruner)
    study = optuna.create_study(
        study_name=cfg.tune.study_name,
        storage=storage,
        direction=cfg.tune.direction,
        pruner=pruner,
        load_if_exists=True,
    )
    reseed(study, cfg)  # and a sampler that cannot be built is named before any work
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # killed ones: queued again by Retry
        # a trial stopped by Ctrl-C or SIGTERM failed; queue it again, like a killed one
        trials = study.get_trials(deepcopy=False)
        retried = {n for t in trials for n in retries(t)}
        for t in trials:
            if t.state != TrialState.FAIL or not t.user_attrs.get("stopped") or t.number in retried:
                continue
            if misfit := _misfit(t, space):
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


def backend(storage: str) -> str | None:
    """The database kind of a storage URL (``sqlite``, ``postgresql``), or None when unparsable."""
    try:
        return make_url(storage).get_backend_name()
    except Exception:  # SQLAlchemy's ArgumentError and friends: named when the study opens
        return None


def unusable(storage: str, e: Exception) -> TuneError:
    """The line for a ``tune.storage`` that cannot be opened, with the fix for its kind."""
    why = str(e).splitlines()[0] if str(e) else ""
    kind = backend(storage)
    if kind not in ("postgresql", "mysql", "mariadb", "oracle", "mssql"):  # a file, or unknown
        fix = (
            "Use a database URL SQLAlchemy can open, e.g. sqlite:///outputs/tune/study.db "
            "(the default is study.db in tune.dir)."
        )
    else:
        extra = " (pip install 'mnist_cnn[postgres]')" if kind == "postgresql" else ""
        fix = (
            f"Use a {kind} server this machine reaches, a database that exists and its driver"
            f"{extra}, e.g. postgresql+psycopg://user:password@host:5432/optuna."
        )
    return TuneError(f"tune.storage={storage} cannot be opened ({type(e).__name__}: {why}). {fix}")


class ServerLock:
    """PostgreSQL's advisory lock, the ``study.lock`` of workers that share no file system: the
    server releases it when the worker's connection ends, ``kill -9`` included."""

    KEY = zlib.crc32(b"mnist_cnn.tune")  # one per database: it also guards table creation

    def __init__(self, storage: str):
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        self.storage, self.conn = storage, None
        try:
            self.engine = sqlalchemy.create_engine(storage, poolclass=NullPool)
        except Exception as e:  # e.g. the driver is not installed
            raise unusable(storage, e) from None
        self.sql = sqlalchemy.text("SELECT pg_advisory_lock(:key)")

    def __enter__(self) -> "ServerLock":
        try:
            self.conn = self.engine.connect()
            self.conn.execute(self.sql, {"key": self.KEY})
        except Exception as e:  # the server is down, unreachable or refuses us
            if self.conn is not None:
                self.conn.close()
            raise unusable(self.storage, e) from None
        return self

    def __exit__(self, *exc) -> None:
        self.conn.close()  # its session ends, and with it the lock
        self.conn = None


def study_lock(cfg: DictConfig) -> AbstractContextManager:
    """Held while a worker opens the study, fails stale trials and takes its next trial, so
    that workers started together do not race: a file lock in ``tune.dir`` for SQLite (no row
    locks), PostgreSQL's advisory lock for a PostgreSQL server."""
    Path(cfg.tune.dir).mkdir(parents=True, exist_ok=True)
    kind = backend(cfg.tune.storage)
    if kind == "postgresql":
        return ServerLock(cfg.tune.storage)
    if kind in (None, "sqlite"):
        return FileLock(Path(cfg.tune.dir) / "study.lock")
    return nullcontext()  # other servers: their own transactions


@contextmanager
def heartbeat(trial: optuna.Trial) -> Iterator[None]:
    """Record ``trial``'s heartbeat every ``tune.heartbeat_interval`` seconds while it runs, as
    ``study.optimize`` does; Optuna has no public thread for a loop of one's own."""
    storage, done, beating = trial.storage, threading.Event(), trial_id(trial)
    interval = storage.get_heartbeat_interval()

    def beat() -> None:
        while not done.wait(interval):
            try:
                storage.record_heartbeat(beating)
            except Exception as e:  # the database is unreachable for a while: try again
                log.warning("trial %d: heartbeat not recorded (%s)", trial.number, e)

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def reseed(study: optuna.Study, cfg: DictConfig) -> None:
    """A sampler seeded with ``tune.seed`` + the trials so far: the next trial's draws differ
    from every earlier trial's, whichever worker asks (call it holding ``study_lock``)."""
    seed = cfg.tune.seed
    if seed is not None:
        seed += len(study.get_trials(deepcopy=False))
    study.sampler = _build("sampler", cfg.tune.sampler, seed=seed)


def claim(run_dir: Path) -> str | None:
    """Make this worker the only one training in ``run_dir`` (the run dir's lock, which ``train``
    takes too, held until this process ends); or who holds it instead."""
    try:
        runinfo.lock_run(run_dir)
    except runinfo.RunInUse:
        return runinfo.run_holder(run_dir) or "another process"
    return None


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


def _misfit(trial: optuna.trial.FrozenTrial, space: dict) -> str | None:
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
        warnings.simplefilter("ignore", ExperimentalWarning)
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
    """The run dir of ``trial``, claimed (``claim``), and, when it continues a stopped or killed
    trial from that trial's dir (the "dir" it inherits), the ``[epoch, value]`` pairs the
    stopped one reported."""
    run_dir = out / "trials" / f"{trial.number:03d}"
    before = retries(study.get_trials(deepcopy=False)[trial.number])
    if not before:
        claim(run_dir)
        return run_dir, None
    stopped_dir = Path(trial.user_attrs.get("dir", run_dir))
    if holder := claim(stopped_dir):  # its worker missed heartbeats but lives, e.g. paused
        problem = f"{stopped_dir} is held by {holder}"
    else:
        problem = resume_problem(stopped_dir, max_epochs)
    if problem:
        log.info(
            "trial %d runs trial %d again from the start: %s", trial.number, before[-1], problem
        )
        claim(run_dir)
        return run_dir, None
    stopped = study.get_trials(deepcopy=False)[before[-1]]
    log.info("trial %d continues trial %d from %s", trial.number, before[-1], stopped_dir)
    return stopped_dir, sorted([k, v] for k, v in stopped.intermediate_values.items())


def tune(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict:
    """Run trials until the study has ``tune.n_trials`` finished ones; save and return the best
    (``best.yaml``: trial, value, params, command). ``overrides``: the command line's.
    Raises ``Interrupted`` after a stop (the study then holds everything done so far)."""
    space = search_space(cfg)
    searched = {spec.key: name for name, spec in space.items()}
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        if o.key_or_group in searched:
            name = searched[o.key_or_group]
            raise TuneError(
                f"{o.input_line} sets a key that search_space.{name} searches, so every trial "
                f"would replace it. To fix it, also drop that dimension (~search_space.{name}), "
                f"or change its range instead (search_space.{name}.low=..., .high=... or "
                ".choices=[...])."
            )
    # tune.monitor and optimized_metric name metrics the module logs (a trial drops tune.*)
    datamodule = build("data", lambda: hydra.utils.instantiate(cfg.data))
    # a module that lists what it logs is checked now; another by each trial's first validation
    if logged := logged_metrics(build("model", lambda: make_model(cfg, datamodule), cfg)):
        check_metrics(cfg, logged)
    lock = study_lock(cfg)
    with lock:
        study = open_study(cfg, space)
    out = Path(cfg.tune.dir)
    # trials are logged below; Optuna's own warnings would print a failed trial's traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    stops: list[Interrupted] = []

    def mark_stopped(trial: optuna.Trial) -> None:  # the next run queues it again
        if not lost(trial):
            trial.set_user_attr("stopped", True)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("stopped", False)  # a retry inherits its trial's attributes
        if _SIGTERM:  # came as the previous trial ended: nothing of this one has run
            raise Interrupted(_SIGTERM[0], None)
        params = {s.key: suggest(trial, s.key, s) for s in space.values()}
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
                claim(run_dir)
                log.warning("trial %d starts again in %s: %s", trial.number, run_dir, e)
                trial.set_user_attr("dir", str(run_dir))
                metrics = train(trial_config(cfg, params, run_dir, trial.number))
        except optuna.TrialPruned as e:
            log.info("trial %d %s", trial.number, e)
            raise
        except Diverged as e:  # the trial fails, the search goes on
            log.warning("trial %d failed: %s", trial.number, e)
            raise
        except Interrupted as e:
            if cfg.optimized_metric not in (e.metrics or {}):  # cut short
                mark_stopped(trial)
                raise
            metrics = e.metrics  # stopped after its last batch: the trial is complete
            stops.append(e)
        except KeyboardInterrupt:
            mark_stopped(trial)
            raise
        finally:
            del _RUNNING[trial.number]
        value = metrics[cfg.optimized_metric]
        log.info("trial %d: %s=%.4f", trial.number, cfg.optimized_metric, value)
        return value

    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    if finished < cfg.tune.n_trials:
        log.info("study %s: %d of %d trials done", cfg.tune.study_name, finished, cfg.tune.n_trials)
    # study.optimize would tell Optuna every trial's end, also that of a trial another worker
    # has failed and queued again (this one was paused): that one is left alone here
    while not stops and not _SIGTERM:
        with lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            warnings.filterwarnings("ignore", "Heartbeat of storage")  # it beats below
            optuna.storages.fail_stale_trials(study)  # killed ones: queued again by Retry
            taken = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
            if len(taken) >= cfg.tune.n_trials:
                if running := sum(t.state == TrialState.RUNNING for t in taken):
                    log.info("the other workers' %d running trial(s) end the study", running)
                break
            reseed(study, cfg)
            trial = study.ask()
            # beating from now: a trial that never beat would never go stale
            trial.storage.record_heartbeat(trial_id(trial))
        value, state = None, TrialState.FAIL
        with heartbeat(trial):
            try:
                value, state = objective(trial), TrialState.COMPLETE
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except (Diverged, Lost, UpdateFinishedTrialError):  # the search goes on
                pass
            except BaseException:  # a stop, or an error in user code: fail it, then raise
                if not lost(trial):
                    study.tell(trial, state=TrialState.FAIL)
                raise
        if lost(trial):
            log.info(
                "trial %d was taken over: this worker sent no heartbeat for tune.grace_period="
                "%s s (paused?), so another worker failed it and queued it to run again; this "
                "worker leaves it",
                trial.number,
                cfg.tune.grace_period,
            )
        else:
            study.tell(trial, value, state)
    if stops:
        raise stops[0]
    if _SIGTERM:
        raise Interrupted(_SIGTERM[0], None)
    with lock:  # one writer of best.yaml at a time
        return save_best(study, cfg, overrides)


def save_best(study: optuna.Study, cfg: DictConfig, overrides: Sequence[str]) -> dict:
    """Write ``best.yaml`` next to the study and log it."""
    counts = {s.name.lower(): len(study.get_trials(False, states=(s,))) for s in TrialState}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete and counts["running"]:
        log.info("no complete trial yet; %d running in other workers", counts["running"])
        return {}
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
    with writing(path, partial=path.with_name(f".best.yaml.{os.getpid()}")) as tmp:
        tmp.write_text(yaml.safe_dump(result, sort_keys=False))  # whole, for other workers
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
@task
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
    return best.get("value")


if __name__ == "__main__":
    run(main)
