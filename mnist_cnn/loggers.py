"""Experiment trackers: MLflow (``logger=mlflow``) and Weights & Biases (``logger=wandb``).

Lightning's loggers, plus what a run dir needs (see docs/tracking.md):
- the tracker's run id kept in the run dir (``mlflow_run_id.txt``, ``wandb_run_id.txt``), so
  ``resume=true`` continues the same tracked run;
- the composed config as parameters (as ``run_info.yaml`` records it, every ``${...}``
  resolved), the git commit and the run dir as tags;
- ``figures/*.png`` and ``model.pt`` uploaded when fit and test end (``artifacts``).

python -m mnist_cnn.train logger=mlflow   # mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db
python -m mnist_cnn.train logger=wandb    # offline; wandb sync outputs/runs/<run>/wandb/offline-*
"""

import contextlib
import functools
import importlib
import json
import logging
import os
import secrets
import shutil
from pathlib import Path

import yaml
from filelock import FileLock
from lightning.fabric.utilities.logger import _convert_params
from lightning.pytorch.loggers import mlflow as lightning_mlflow
from lightning.pytorch.loggers import wandb as lightning_wandb
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from mnist_cnn import runinfo
from mnist_cnn.errors import ConfigError, TrackerError

log = logging.getLogger(__name__)

ARTIFACTS = ("figures/*.png", "model.pt")  # relative to the run dir


def _on_error(value: str, logger: str) -> str:
    if value not in ("continue", "stop"):
        raise ConfigError(
            f"logger.{logger}.on_error={value} (allowed: continue, stop; e.g. "
            f"logger.{logger}.on_error=stop)"
        )
    return value


def require(package: str) -> None:
    """Raise ``ConfigError`` naming the extra to install when ``package`` cannot be imported."""
    try:
        importlib.import_module(package)
    except ImportError:
        raise ConfigError(
            f"logger={package} needs the {package} package: pip install -e '.[{package}]'"
        ) from None


def saved_id(run_dir: Path, tracker: str) -> str | None:
    """The run id ``tracker`` kept in ``run_dir``, if any."""
    path = run_dir / f"{tracker}_run_id.txt"
    return (path.read_text().strip() or None) if path.is_file() else None


def save_id(run_dir: Path, tracker: str, run_id: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"{tracker}_run_id.txt").write_text(f"{run_id}\n")


def composed_config(run_dir: Path, fallback: dict) -> dict:
    """This start's config, resolved, from ``run_info.yaml`` (``runinfo.RunRecord`` writes it when
    fit starts, before Lightning logs hyper-parameters); without it, ``fallback``."""
    path = run_dir / "run_info.yaml"
    starts = yaml.safe_load(path.read_text()) if path.is_file() else None
    return (starts[-1].get("config") if starts else None) or fallback


def flat(config: dict, prefix: str = "") -> dict[str, str]:
    """``{"model": {"optimizer": {"lr": 0.001}}}`` as ``{"model.optimizer.lr": "0.001"}``."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = (
                value if isinstance(value, str) else json.dumps(value, default=str)
            )
    return out


def changed_files(run_dir: Path, patterns, seen: dict[Path, tuple]) -> list[Path]:
    """The files matching ``patterns`` under ``run_dir`` that are new or changed since ``seen``
    (updated): the test's finalize does not upload fit's files again, nor a resume the files
    of the run's earlier starts."""
    files = []
    for pattern in patterns:
        for path in sorted(run_dir.glob(pattern)):
            stat = path.stat()
            if path.is_file() and seen.get(path) != (stat.st_mtime_ns, stat.st_size):
                seen[path] = (stat.st_mtime_ns, stat.st_size)
                files.append(path)
    return files


def git_tags() -> dict[str, str]:
    git = runinfo.info()["git"]
    tags = {"mlflow.source.git.commit": git["commit"], "git.dirty": git["dirty"]}
    return {
        k: str(v).lower() if isinstance(v, bool) else v for k, v in tags.items() if v is not None
    }


def guarded(what: str):
    """A tracker call that can fail: ``Guarded._failed`` decides; a failed tracker is skipped."""

    def wrap(method):
        @functools.wraps(method)
        def call(self, *args, **kwargs):
            if self._down:
                return None
            try:
                return method(self, *args, **kwargs)
            except ConfigError:
                raise
            except Exception as e:  # the tracker's own errors: network, server, storage
                self._failed(what, e)

        return call

    return wrap


class Guarded:
    """A tracker that fails (unreachable, dying, refusing) never takes the training down with a
    traceback: ``on_error="continue"`` logs one warning and trains on without it (TensorBoard
    and the run dir keep every metric); ``"stop"`` raises ``TrackerError`` (one line, exit 2),
    and ``last.ckpt`` is saved as for any error in fit."""

    on_error, _down, _step, _started, tracker = "continue", False, None, False, "the tracker"

    @rank_zero_only
    @guarded("logging metrics")
    def log_metrics(self, metrics, step=None) -> None:
        self._step = step
        super().log_metrics(metrics, step)

    def _failed(self, what: str, error: Exception) -> None:
        self._down, name = True, self.tracker  # after a stop too: teardown's calls are skipped
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        why = f"{type(error).__name__}: {first}" if first else type(error).__name__
        if self.on_error == "stop":
            again = (
                f"resume={self.run_dir} continues from last.ckpt"
                if self._step
                else "run the same command again"
            )
            raise TrackerError(
                f"{name} at {self.where} failed while {what} ({why}); stopped, as "
                f"logger.*.on_error=stop asks: once it is back, {again}, or pass "
                "on_error=continue to train on without it."
            ) from None
        log.warning(
            "%s at %s failed while %s (%s): training goes on without it, TensorBoard and the run "
            "dir keep every metric (on_error=stop stops the run instead)",
            name,
            self.where,
            what,
            why,
        )


def store_lock(tracking_uri: str | None):
    """A lock beside a SQLite store, for what two runs starting together (a -m sweep on joblib)
    must not both do: create the store's tables or the experiment (one of them would fail)."""
    if not (tracking_uri or "").startswith("sqlite:///"):
        return contextlib.nullcontext()
    path = Path(tracking_uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{path}.lock")


class MLFlowLogger(Guarded, lightning_mlflow.MLFlowLogger):
    """Lightning's ``MLFlowLogger`` for one run dir (``conf/logger/mlflow.yaml``).

    A run dir holding ``mlflow_run_id.txt`` continues that MLflow run (a resume: Lightning's
    ``run_id``); a parameter a resume changes keeps its first value (MLflow's rule) and the new
    one is the tag ``resumed.<key>``.
    """

    tracker = "MLflow"

    def __init__(
        self,
        run_dir: str,
        experiment_name: str = "mnist_cnn",
        run_name: str | None = None,
        artifacts=ARTIFACTS,
        tags=(),
        on_error: str = "continue",
        request_timeout: float = 10,
        request_retries: int = 1,
        **kwargs,
    ):
        require("mlflow")
        import mlflow

        self.on_error = _on_error(on_error, "mlflow")
        # MLflow's own settings for an HTTP server (its defaults retry for minutes)
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(request_timeout)
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(request_retries)
        if not isinstance(tags, dict):  # a list of labels (the run's tags=[...])
            tags = {str(t): "true" for t in tags}
        self.run_dir, self.artifacts = Path(run_dir), list(artifacts)
        self._uploaded: dict[Path, tuple] = {}
        changed_files(self.run_dir, self.artifacts, self._uploaded)  # what is there already
        uri = kwargs["tracking_uri"] = kwargs.get("tracking_uri") or mlflow.get_tracking_uri()
        # Lightning keeps these private: _start makes the experiment, messages name the store
        self.experiment_name, self.where = experiment_name, uri
        self.artifact_location = kwargs.get("artifact_location")
        with store_lock(uri):  # opening a new store creates its tables
            self.client = mlflow.MlflowClient(uri)  # to choose the run before Lightning's starts
            self.resumed = self._saved_run()
            run_name, tags = run_name or self.run_dir.name, tags or None
            super().__init__(experiment_name, run_name, tags=tags, run_id=self.resumed, **kwargs)

    @rank_zero_only  # the other ranks log nothing (rank_zero_experiment)
    @guarded("finding the run")
    def _saved_run(self) -> str | None:
        """The run this run dir logged to before, if the store still holds it."""
        from mlflow.exceptions import MlflowException

        if (run_id := saved_id(self.run_dir, "mlflow")) is None:
            return None
        try:
            if self.client.get_run(run_id).info.lifecycle_stage == "active":
                return run_id
        except MlflowException as e:  # not there; another error (unreachable): the guard's
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
        log.warning(
            "MLflow run %s (%s) is not in %s: starting a new run",
            run_id,
            self.run_dir / "mlflow_run_id.txt",
            self.where,
        )
        return None

    @property
    @rank_zero_experiment
    def experiment(self):  # the first use starts the run (guarded); then Lightning's
        return super().experiment if self._started else self._start()

    @guarded("starting the run")
    def _start(self):
        from mlflow.entities import RunTag

        if self.resumed is None:  # the experiment, made here: Lightning would warn it was missing
            with store_lock(self.where):
                found = self.client.get_experiment_by_name(self.experiment_name)
                if found is None:
                    self._create_experiment()
                elif found.lifecycle_stage != "active":
                    raise ConfigError(
                        f"The MLflow experiment {self.experiment_name} is deleted in "
                        f"{self.where}: name another, logger.mlflow.experiment_name=NAME."
                    )
        client = super().experiment
        self._started = True
        if self.resumed:
            client.update_run(self.run_id, status="RUNNING")
        save_id(self.run_dir, "mlflow", self.run_id)
        tags = {"run_dir": str(self.run_dir.resolve()), **git_tags()}
        client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        return client

    def _create_experiment(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_experiment(
                self.experiment_name, artifact_location=self.artifact_location
            )
        except MlflowException as e:  # on a server (no lock) another run made it meanwhile
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    @guarded("saving a checkpoint's record")
    def after_save_checkpoint(self, checkpoint_callback) -> None:
        super().after_save_checkpoint(checkpoint_callback)

    @rank_zero_only
    @guarded("logging the config")
    def log_hyperparams(self, params) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        config = _convert_params(params)
        values = {
            k: v[:MAX_PARAM_VAL_LENGTH]
            for k, v in flat(composed_config(self.run_dir, config)).items()
        }
        client, run_id = self.experiment, self.run_id
        logged = client.get_run(run_id).data.params  # a resume's, or fit's when test starts
        new = [Param(k, v) for k, v in values.items() if k not in logged]
        changed = [RunTag(f"resumed.{k}", v) for k, v in values.items() if logged.get(k, v) != v]
        for i in range(0, max(len(new), len(changed)), MAX_PARAMS_TAGS_PER_BATCH):
            part = slice(i, i + MAX_PARAMS_TAGS_PER_BATCH)
            client.log_batch(run_id, params=new[part], tags=changed[part])

    @rank_zero_only
    @guarded("closing the run")
    def finalize(self, status: str = "success") -> None:
        if self._started and status != "failed":
            for path in changed_files(self.run_dir, self.artifacts, self._uploaded):
                folder = path.parent.relative_to(self.run_dir).as_posix()
                self.experiment.log_artifact(
                    self.run_id, str(path), None if folder == "." else folder
                )
        super().finalize(status)


class WandbLogger(Guarded, lightning_wandb.WandbLogger):
    """Lightning's ``WandbLogger`` for one run dir (``conf/logger/wandb.yaml``): offline unless
    ``mode=online``, files in ``<run dir>/wandb/``, the run id in ``wandb_run_id.txt`` (a resume
    continues the same run: ``id=`` with ``resume="allow"``), figures as images and ``model.pt``
    saved with the run."""

    tracker = "W&B"
    _last_run = None  # the run the previous WandbLogger of this process started

    def __init__(
        self,
        run_dir: str,
        project: str = "mnist_cnn",
        name: str | None = None,
        artifacts=ARTIFACTS,
        tags=(),
        on_error: str = "continue",
        **kwargs,
    ):
        require("wandb")
        self.on_error = _on_error(on_error, "wandb")
        self.run_dir, self.artifacts = Path(run_dir), list(artifacts)
        self._uploaded: dict[Path, tuple] = {}
        changed_files(self.run_dir, self.artifacts, self._uploaded)  # what is there already
        run_id = saved_id(self.run_dir, "wandb") or secrets.token_hex(4)
        name, tags = name or self.run_dir.name, [str(t) for t in tags] or None
        super().__init__(
            name, str(self.run_dir), id=run_id, resume="allow", project=project, tags=tags, **kwargs
        )
        # Lightning always passes anonymous= to wandb.init, which warns that it has no effect
        # (None too); no public argument leaves it out
        self._wandb_init.pop("anonymous")

    @property
    def where(self) -> str:
        return f"project {self.name}"

    @property
    @rank_zero_experiment
    def experiment(self):  # the first use starts the run (guarded); then Lightning's
        return super().experiment if self._started else self._start()

    @guarded("starting the run")
    def _start(self):
        import wandb

        # wandb keeps one run per process: finish an earlier train()'s (a notebook, a sweep)
        if wandb.run is not None and wandb.run is WandbLogger._last_run:
            wandb.run.finish()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        WandbLogger._last_run = run = super().experiment
        self._started = True
        if not run.disabled:  # mode=disabled: a stand-in run, nothing kept
            save_id(self.run_dir, "wandb", run.id)  # wandb records the git commit itself
        return run

    @rank_zero_only
    @guarded("logging the config")
    def log_hyperparams(self, params) -> None:
        config = _convert_params(params)
        super().log_hyperparams(composed_config(self.run_dir, config))

    @rank_zero_only
    @guarded("closing the run")
    def finalize(self, status: str = "success") -> None:
        run = self.experiment if self._started else None
        if run is not None and not run.disabled and status != "failed":
            for path in changed_files(self.run_dir, self.artifacts, self._uploaded):
                name = path.relative_to(self.run_dir)
                if path.suffix == ".png":  # figures/x.png: the image figures/x
                    self.log_image(name.with_suffix("").as_posix(), [str(path)])
                else:  # a file in the run's files/ is uploaded with the run (wandb.save warns)
                    target = Path(run.dir) / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.unlink(missing_ok=True)
                    try:
                        os.link(path, target)
                    except OSError:  # another file system
                        shutil.copy2(path, target)
        super().finalize(status)
