"""``python -m mnist_cnn.tune``: an Optuna study that survives a kill and resumes."""

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import lightning as L
import optuna
import pytest
import yaml
from conftest import TINY, cli, compose_train, spawn, tune_cfg
from filelock import FileLock
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from mnist_cnn.callbacks import Interrupted
from mnist_cnn.checkpoint import epochs_done, load_checkpoint
from mnist_cnn.tune import TuneError, retries, tune
from mnist_cnn.validate import ConfigError, check


def trials(storage: str, *states) -> list:
    path = storage.removeprefix("sqlite:///")
    if not os.path.exists(path):
        return []
    # under tune's own lock: opening a study.db whose tables tune is creating races on them
    with FileLock(os.path.join(os.path.dirname(path), "study.lock")):
        try:
            study = optuna.load_study(study_name="mnist_cnn", storage=storage)
        except KeyError:  # the file is there, the study not yet
            return []
        return study.get_trials(deepcopy=False, states=states)


def count(storage: str, *states) -> int:
    return len(trials(storage, *states))


@pytest.mark.slow
def test_tune_killed_then_resumed_reaches_n_trials_and_its_best_command_runs(tmp_path, data_dir):
    args = [*TINY, f"paths.log_dir={tmp_path}", f"data.data_dir={data_dir}", "tune.n_trials=3"]
    args += ["tune.heartbeat_interval=1", "tune.grace_period=2"]  # a killed trial fails fast
    storage = f"sqlite:///{tmp_path}/tune/mnist_cnn/study.db"

    first = spawn("tune", *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300

    # kill it while its second trial trains, with no chance to clean up (a lost machine)
    def training() -> bool:  # one trial done, the next one drawn its values
        return any(t.params for t in trials(storage, TrialState.RUNNING))

    while not (count(storage, TrialState.COMPLETE) and training()):
        assert first.poll() is None and time.monotonic() < deadline, "no second trial started"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL
    assert count(storage, TrialState.RUNNING) == 1
    assert 1 <= count(storage, TrialState.COMPLETE, TrialState.PRUNED) < 3
    time.sleep(2)  # the machine comes back after tune.grace_period: the trial is stale by then

    second = cli("tune", *args)
    study = optuna.load_study(study_name="mnist_cnn", storage=storage)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 3  # the study's total, across both runs
    assert not study.get_trials(states=(TrialState.RUNNING,))
    (killed,) = study.get_trials(states=(TrialState.FAIL,))  # no heartbeat: marked failed
    retried = RetryHeartbeatStaleTrialCallback.retried_trial_number
    (retry,) = [t for t in finished if retried(t) is not None]
    assert retried(retry) == killed.number
    assert retry.params == killed.params  # and run again with the same values

    best = yaml.safe_load((tmp_path / "tune" / "mnist_cnn" / "best.yaml").read_text())
    assert best["best_trial"] == study.best_trial.number and best["value"] == study.best_value
    assert best["command"] in second.stdout + second.stderr
    assert set(best["params"]) == {
        "model.optimizer.lr",
        "data.batch_size",
        "model.net.dropout",
        "model.net.hidden",
    }

    # the printed command trains the best trial again, to the same val/acc_best
    argv = shlex.split(best["command"])
    assert argv[:3] == ["python", "-m", "mnist_cnn.train"]
    cli("train", *argv[3:], env=os.environ | {"PYTHONPATH": os.getcwd()})
    (run,) = (tmp_path / "runs").iterdir()
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert state["hyper_parameters"]["optimizer"]["lr"] == best["params"]["model.optimizer.lr"]
    score = next(
        s["best_model_score"]
        for k, s in state["callbacks"].items()
        if k.startswith("ModelCheckpoint") and s.get("best_model_score") is not None
    )
    assert float(score) == pytest.approx(best["value"], abs=1e-6)


@pytest.mark.slow
def test_a_trial_stopped_by_ctrl_c_continues_from_its_last_checkpoint_on_the_next_run(
    tmp_path, data_dir
):
    args = [
        "trainer.accelerator=cpu",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=40",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "callbacks.progress_bar.refresh_rate=0",
        # last.ckpt only at epoch ends (and the stop), not after 60 s of a slow epoch 1
        "callbacks.last_checkpoint.every_n_seconds=3600",
        "logger=none",
        f"paths.log_dir={tmp_path}",
        f"data.data_dir={data_dir}",
        "tune.n_trials=1",
    ]
    storage = f"sqlite:///{tmp_path}/tune/mnist_cnn/study.db"
    trial_dir = tmp_path / "tune" / "mnist_cnn" / "trials" / "000"
    last = trial_dir / "checkpoints" / "last.ckpt"

    first = spawn("tune", *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not last.exists():  # after epoch 1: Ctrl-C in epoch 2 or 3
        assert first.poll() is None and time.monotonic() < deadline, "epoch 1 did not end"
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 130, out[-3000:]
    assert "a trial cut short runs again, from its last.ckpt" in out
    steps = load_checkpoint(last)["global_step"]
    assert 40 <= steps < 120  # saved mid-run
    (stopped,) = trials(storage, TrialState.FAIL)
    assert stopped.user_attrs["stopped"] is True

    second = cli("tune", *args)
    assert f"trial 1 continues trial 0 from {trial_dir}" in second.stdout + second.stderr
    study = optuna.load_study(study_name="mnist_cnn", storage=storage)
    (done,) = study.get_trials(states=(TrialState.COMPLETE,))
    assert done.params == stopped.params and done.user_attrs["dir"] == str(trial_dir)
    assert not (trial_dir.parent / "001").exists()  # same dir, not a new run
    state = load_checkpoint(last)
    assert epochs_done(state) == 3 and state["global_step"] == 120  # 3 x 40 batches in all
    assert sorted(done.intermediate_values) == [0, 1, 2]  # the first run's epochs included
    info = yaml.safe_load((trial_dir / "run_info.yaml").read_text())
    assert len(info) == 2  # the first start and the resume


@pytest.mark.slow
def test_a_lagging_trial_is_pruned_after_its_first_epoch(tmp_path, data_dir):
    pruner = ["tune.pruner._target_=optuna.pruners.ThresholdPruner", "+tune.pruner.lower=1.01"]
    pruner += ["~tune.pruner.n_startup_trials", "tune.pruner.n_warmup_steps=0"]  # prunes all
    cfg = tune_cfg(tmp_path, data_dir, *pruner)
    with pytest.raises(TuneError, match="no complete trial"):
        tune(cfg)
    study = optuna.load_study(study_name="mnist_cnn", storage=cfg.tune.storage)
    (trial,) = study.trials
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [0]  # val/acc of epoch 1 only, of 2


def test_a_search_with_lenet5_leaves_out_the_seed_cnns_dimensions(tmp_path, data_dir, caplog):
    caplog.set_level(logging.INFO, "mnist_cnn.tune")
    best = tune(tune_cfg(tmp_path, data_dir, "model/net=lenet5"), ["model/net=lenet5"])
    assert "left out hidden (model.net.hidden): not in this config" in caplog.text
    assert set(best["params"]) == {"model.optimizer.lr", "data.batch_size", "model.net.dropout"}
    assert "model/net=lenet5" in best["command"]


def test_a_search_space_whose_keys_are_none_of_the_configs_is_named(tmp_path, data_dir):
    drop = ["~search_space.batch_size", "~search_space.dropout", "~search_space.hidden"]
    cfg = tune_cfg(tmp_path, data_dir, "search_space.lr.key=model.optimizer.lrr", *drop)
    with pytest.raises(TuneError, match=r"no key of the search space .*model.optimizer.lrr"):
        tune(cfg)


def test_a_monitor_the_module_does_not_log_is_refused_before_the_study(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="tune.monitor=val/accc is not a metric .* val/acc"):
        tune(tune_cfg(tmp_path, data_dir, "tune.monitor=val/accc"))
    assert not (tmp_path / "tune").exists()


def test_an_override_of_a_searched_key_is_refused_with_how_to_fix_it(tmp_path, data_dir):
    cfg = tune_cfg(tmp_path, data_dir, "data.batch_size=128")
    with pytest.raises(TuneError, match=r"data.batch_size=128 sets .*~search_space.batch_size"):
        tune(cfg, ["data.batch_size=128"])
    assert not (tmp_path / "tune").exists()  # refused before the study is made


def test_a_storage_that_cannot_be_opened_is_named_with_the_fix(tmp_path, data_dir):
    for storage in ("bogus://x", f"sqlite:///{tmp_path}/missing/dir/study.db"):
        cfg = tune_cfg(tmp_path, data_dir, f"tune.storage={storage}")
        with pytest.raises(TuneError, match=f"tune.storage={storage} cannot be opened .* Use a"):
            tune(cfg)


class CtrlCAt(L.Callback):
    """Presses Ctrl-C in epoch ``epoch`` (0-based): as its first batch starts, or when its
    validation ends (``when: validation``)."""

    def __init__(self, epoch: int, when: str = "batch"):
        self.epoch, self.when = epoch, when

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.when == "batch" and trainer.current_epoch == self.epoch and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGINT)

    def on_validation_end(self, trainer, pl_module) -> None:
        last = self.when == "validation" and trainer.current_epoch == self.epoch
        if last and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow
def test_a_trial_stopped_after_its_last_batch_is_complete(tmp_path, data_dir):
    ctrl_c = "+callbacks.ctrl_c={_target_: test_tune.CtrlCAt, epoch: 1, when: validation}"
    cfg = tune_cfg(tmp_path, data_dir, ctrl_c)
    with pytest.raises(Interrupted, match="Stopped by SIGINT"):
        tune(cfg)
    (trial,) = optuna.load_study(study_name="mnist_cnn", storage=cfg.tune.storage).trials
    assert trial.state == TrialState.COMPLETE and not trial.user_attrs["stopped"]
    assert tune(tune_cfg(tmp_path, data_dir))["best_trial"] == 0  # nothing left to run


@pytest.mark.slow
def test_a_stopped_trial_that_no_longer_fits_the_search_space_is_not_run_again(
    tmp_path, data_dir, caplog
):
    cfg = tune_cfg(tmp_path, data_dir, "+callbacks.ctrl_c={_target_: test_tune.CtrlCAt, epoch: 1}")
    with pytest.raises(Interrupted, match="Stopped by SIGINT at step 3"):
        tune(cfg)
    best = tune(tune_cfg(tmp_path, data_dir, "~search_space.hidden"))
    assert "trial 0 was stopped; it does not run again: the search space now searches" in (
        caplog.text
    )
    study = optuna.load_study(study_name="mnist_cnn", storage=cfg.tune.storage)
    stopped, done = study.trials
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["stopped"]
    assert done.state == TrialState.COMPLETE and not retries(done)
    assert "model.net.hidden" not in best["params"] and "model.net.hidden" not in best["command"]


@pytest.mark.parametrize(
    "bad, words",
    [
        ("tune.seed=abc", "null or an integer >= 0"),
        ("tune.heartbeat_interval=0", "an integer >= 1 (seconds)"),
        ("tune.grace_period=-1", "an integer >= 1 (seconds)"),
        ("tune.study_name=a/b", "a name without /"),
        ("tune.study_name=''", "a name without /"),
    ],
)
def test_bad_tune_settings_are_refused_before_any_work(bad, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        check(compose_train("paths.output_dir=.", bad, config_name="tune"))


def test_a_sampler_or_pruner_that_cannot_be_built_is_named(tmp_path, data_dir):
    cfg = tune_cfg(tmp_path, data_dir, "tune.pruner._target_=optuna.pruners.Nope")
    with pytest.raises(TuneError, match="Cannot build tune.pruner from the config: .*Nope"):
        tune(cfg)


def best_checkpoints(trial_dir) -> list:
    return [p for p in (trial_dir / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]


@pytest.mark.slow
def test_two_workers_started_together_on_a_new_study_share_it(tmp_path, data_dir):
    args = [*TINY, f"paths.log_dir={tmp_path}", f"data.data_dir={data_dir}", "tune.n_trials=2"]
    pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    workers = [spawn("tune", *args, **pipe) for _ in range(2)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-3000:] for o in outs)
    storage = f"sqlite:///{tmp_path}/tune/mnist_cnn/study.db"
    one, two = optuna.load_study(study_name="mnist_cnn", storage=storage).trials
    assert one.state == two.state == TrialState.COMPLETE and one.params != two.params
    for trial_dir in (tmp_path / "tune" / "mnist_cnn" / "trials").iterdir():
        assert len(best_checkpoints(trial_dir)) == 1


class PauseSelf(L.Callback):
    """Pauses its own process (SIGSTOP) as training starts, as a suspended job would be; not in
    the middle of a heartbeat's write, which would leave SQLite locked for the other worker."""

    def on_train_start(self, trainer, pl_module) -> None:
        (trial,) = sys.modules["__main__"]._RUNNING.values()  # python -m mnist_cnn.tune's
        storage, writing = trial.storage, threading.Lock()
        record = storage.record_heartbeat

        def record_heartbeat(*args, **kwargs):
            with writing:
                return record(*args, **kwargs)

        storage.record_heartbeat = record_heartbeat
        time.sleep(0.5)  # a write that began before is over
        with writing:
            os.kill(os.getpid(), signal.SIGSTOP)


@pytest.mark.slow
def test_a_paused_worker_whose_trial_another_runs_again_leaves_it(tmp_path, data_dir):
    cmd = [sys.executable, "-m", "mnist_cnn.tune", *TINY, f"paths.log_dir={tmp_path}"]
    cmd += [f"data.data_dir={data_dir}", "tune.n_trials=1"]
    cmd += ["tune.heartbeat_interval=1", "tune.grace_period=2"]
    log = tmp_path / "paused.log"
    with log.open("w") as out:
        paused = subprocess.Popen(
            [*cmd, "+callbacks.pause={_target_: test_tune.PauseSelf}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ | {"PYTHONPATH": os.path.dirname(__file__)},  # test_tune.PauseSelf
        )
    try:
        _, status = os.waitpid(paused.pid, os.WUNTRACED)  # paused while training trial 0
        assert os.WIFSTOPPED(status), log.read_text()[-3000:]
        time.sleep(2)  # past tune.grace_period
        other = cli("tune", *cmd[3:])
        assert "trial 1 runs trial 0 again from the start" in other.stdout + other.stderr
    finally:
        paused.send_signal(signal.SIGCONT)
    assert paused.wait(timeout=300) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "trial 0 was taken over" in text and "Traceback" not in text
    storage = f"sqlite:///{tmp_path}/tune/mnist_cnn/study.db"
    stopped, retry = optuna.load_study(study_name="mnist_cnn", storage=storage).trials
    assert stopped.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.params == stopped.params and retries(retry) == [0]
    trials_dir = tmp_path / "tune" / "mnist_cnn" / "trials"
    assert len(best_checkpoints(trials_dir / "000")) <= 1  # its worker's only
    assert len(best_checkpoints(trials_dir / "001")) == 1
