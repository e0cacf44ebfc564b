"""Interruption, divergence and bad checkpoint files, with real processes and real signals."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
import yaml
from conftest import finish, last_ckpt, start, the_run, wait_until

from mnist_cnn import ROOT
from mnist_cnn.callbacks import Diverged, FiniteCheck, Interrupted, LastCheckpoint
from mnist_cnn.checkpoint import CheckpointError, load_checkpoint
from mnist_cnn.data import MNISTDataModule
from mnist_cnn.module import Classifier
from mnist_cnn.train import train


def stopped(proc: subprocess.Popen) -> bool:
    """Whether every thread of ``proc`` is stopped (SIGSTOP), or the process is gone."""
    try:
        stats = [t.read_text() for t in Path(f"/proc/{proc.pid}/task").glob("*/stat")]
    except FileNotFoundError:  # a thread or the process ended meanwhile
        return proc.poll() is not None
    return all(s.rpartition(")")[2].split()[0] in ("T", "t", "Z", "X") for s in stats)


def kill_when(proc: subprocess.Popen, condition, poll: float = 0.01) -> None:
    """``kill -9`` ``proc`` at a moment ``condition()`` holds. It is checked again with the run
    paused (SIGSTOP), so nothing changes between the check and the kill, however slow the
    machine; when the run moved on meanwhile, it continues and the wait goes on."""
    while True:
        wait_until(proc, condition, poll)
        proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 60
        while not stopped(proc):
            assert time.monotonic() < deadline, "SIGSTOP did not stop the run"
            time.sleep(0.001)
        if proc.poll() is None and condition():
            proc.kill()
            return
        proc.send_signal(signal.SIGCONT)


_steps: dict[tuple, int] = {}


def step(path: Path) -> int:
    """The global step of a checkpoint, -1 while there is none. A file is read once: a save
    replaces it (a new inode), so a loop that polls it does not take the CPU from the run."""
    try:
        seen = path.stat()
    except FileNotFoundError:
        return -1
    key = (str(path), seen.st_ino, seen.st_mtime_ns, seen.st_size)
    if key not in _steps:
        _steps[key] = torch.load(path, map_location="cpu", weights_only=True)["global_step"]
    return _steps[key]


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig",
    [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1],
    ids=["SIGTERM", "Ctrl-C", "SIGHUP (terminal closed)", "SIGUSR1 (before a time limit)"],
)
def test_a_signal_saves_last_ckpt_and_says_how_to_resume(tmp_path, data_dir, sig):
    steps = ["trainer.max_epochs=2", "trainer.limit_train_batches=20", "logger=tensorboard"]
    proc = start(tmp_path, data_dir, *steps, "callbacks.last_checkpoint.every_n_train_steps=3")
    wait_until(proc, lambda: last_ckpt(tmp_path).exists())
    proc.send_signal(sig)
    code, out = finish(proc)
    assert code == 128 + sig, out[-3000:]
    assert "Traceback" not in out
    run = the_run(tmp_path)
    stopped = re.search(rf"Stopped by {sig.name} at step (\d+) \(saved (\S+)\)", out)
    assert stopped, out[-3000:]
    assert stopped[2] == str(run / "checkpoints" / "last.ckpt")
    # nothing lost; a signal during validation lets it finish, then stops after the next batch
    assert step(run / "checkpoints" / "last.ckpt") == int(stopped[1]) <= 40
    assert f"Resume with: python -m mnist_cnn.train resume={run}" in out
    if sig != signal.SIGTERM:
        return

    code, out = finish(start(tmp_path, data_dir, "resume=true"))  # the old overrides come back
    assert code == 0, out[-3000:]
    assert the_run(tmp_path) == run  # same run dir, same TensorBoard dir
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert (state["epoch"], state["global_step"]) == (1, 40)
    assert [r["epoch"] for r in state["callbacks"]["EpochSummary"]["history"]] == [1, 2]
    starts = yaml.safe_load((run / "run_info.yaml").read_text())
    assert [s["resumed_from"] for s in starts] == [None, str(run / "checkpoints" / "last.ckpt")]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) >= 2
    for path in run.rglob("*"):  # every checkpoint and exported file
        if path.suffix in (".ckpt", ".pt", ".pth"):
            torch.load(path, map_location="cpu", weights_only=True)


class CtrlCAtFitEnd(L.Callback):
    """Presses Ctrl-C in on_fit_end, after Lightning's teardown restored the signal handlers."""

    def on_fit_end(self, trainer, pl_module) -> None:
        os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow
def test_a_ctrl_c_in_on_fit_end_leaves_ctrl_c_working_afterwards(make_cfg):
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted, match="Stopped by Ctrl-C"):
        train(make_cfg("+callbacks.ctrl_c={_target_: test_faults.CtrlCAtFitEnd}"))
    assert signal.getsignal(signal.SIGINT) == before  # was SIG_IGN: a notebook ignored Ctrl-C


class SigtermAt(L.Callback):
    """Sends this process SIGTERM as the first validation or the test starts: between batches."""

    def __init__(self, stage: str):
        self.stage = stage

    def on_validation_start(self, trainer, pl_module) -> None:
        if (
            self.stage == "validation"
            and not trainer.sanity_checking
            and trainer.current_epoch == 0
        ):
            os.kill(os.getpid(), signal.SIGTERM)

    def on_test_start(self, trainer, pl_module) -> None:
        if self.stage == "test":
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_a_sigterm_during_validation_lets_it_finish_then_stops_after_the_next_batch(make_cfg):
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
    handlers = [signal.getsignal(s) for s in signals]
    cfg = make_cfg(
        "trainer.max_epochs=2",
        "+callbacks.term={_target_: test_faults.SigtermAt, stage: validation}",
    )
    with pytest.raises(Interrupted, match=r"Stopped by SIGTERM at step 6 ") as stopped:
        train(cfg)  # 5 batches an epoch (debug=fast), validation of 2 batches
    assert [signal.getsignal(s) for s in signals] == handlers  # restored after fit
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    assert stopped.value.checkpoint == str(checkpoints / "last.ckpt")
    assert step(checkpoints / "last.ckpt") == 6
    assert len(list(checkpoints.glob("epoch000-*.ckpt"))) == 1  # epoch 1 validated and ranked
    (first,) = load_checkpoint(checkpoints / "last.ckpt")["callbacks"]["EpochSummary"]["history"]
    assert first["epoch"] == 1 and {"train/loss", "val/loss", "val/acc"} <= first.keys()

    train(make_cfg("trainer.max_epochs=2", "resume=true"))
    assert [signal.getsignal(s) for s in signals] == handlers
    state = load_checkpoint(checkpoints / "last.ckpt")
    assert state["global_step"] == 10
    history = state["callbacks"]["EpochSummary"]["history"]
    assert [h["epoch"] for h in history] == [1, 2] and "val/acc" in history[1]


class TwoCtrlCAt(L.Callback):
    """Presses Ctrl-C twice as batch ``batch_idx`` of epoch 2 starts."""

    def __init__(self, batch_idx: int):
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == self.batch_idx:
            os.kill(os.getpid(), signal.SIGINT)  # GracefulStop: stop after this batch
            os.kill(os.getpid(), signal.SIGINT)  # abort now


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_without_saving_and_keeps_the_last_ckpt(make_cfg):
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    cfg = make_cfg(
        "trainer.max_epochs=2", "+callbacks.c={_target_: test_faults.TwoCtrlCAt, batch_idx: 2}"
    )
    with pytest.raises(Interrupted, match="Stopped by Ctrl-C at step 7 without saving"):
        train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert step(last) == 5  # epoch 1's, as it was
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    assert train(make_cfg("trainer.max_epochs=2", "resume=true", "test=false"))  # resumes


class CtrlCWhileSaving(L.Callback):
    """Presses Ctrl-C as batch 2 of epoch 2 starts, and again while its last.ckpt is written."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == 2:
            io = trainer.strategy.checkpoint_io
            save = io.save_checkpoint

            def save_with_ctrl_c(checkpoint, path, storage_options=None):
                os.kill(os.getpid(), signal.SIGINT)  # the second: in the middle of the save
                save(checkpoint, path, storage_options)

            io.save_checkpoint = save_with_ctrl_c
            os.kill(os.getpid(), signal.SIGINT)  # the first: stop after this batch


@pytest.mark.slow
def test_a_second_ctrl_c_while_the_stop_saves_waits_for_the_save(make_cfg):
    cfg = make_cfg("trainer.max_epochs=2", "+callbacks.c={_target_: test_faults.CtrlCWhileSaving}")
    with pytest.raises(Interrupted, match=r"Stopped by SIGINT at step 8 \(saved .*last.ckpt\)"):
        train(cfg)
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    assert step(checkpoints / "last.ckpt") == 8  # written whole, at the stop
    assert not list(checkpoints.glob("*.partial"))


class CtrlCDuringASave(L.Callback):
    """Presses Ctrl-C while last.ckpt is being written at step 3 (a periodic save)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step == 3 and not getattr(self, "sent", False):
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


def test_a_ctrl_c_during_a_periodic_save_is_held_then_stops_the_run(make_cfg):
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        every = "callbacks.last_checkpoint.every_n_train_steps=3"
        cfg = make_cfg(every, "+callbacks.c={_target_: test_faults.CtrlCDuringASave}")
        with pytest.raises(Interrupted, match=r"Stopped by SIGINT at step 4 \(saved .*last.ckpt"):
            train(cfg)
    finally:
        signal.signal(signal.SIGINT, inherited)


class CtrlCInSetup(L.Callback):
    """Presses Ctrl-C while the Trainer sets up, before GracefulStop listens."""

    def setup(self, trainer, pl_module, stage) -> None:
        os.kill(os.getpid(), signal.SIGINT)


def test_a_ctrl_c_before_training_starts_is_interrupted_not_lightnings_exit(make_cfg):
    # as in a terminal: a job started in the background (CI's, nohup's) inherits SIGINT ignored
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cfg = make_cfg("+callbacks.c={_target_: test_faults.CtrlCInSetup}")
        with pytest.raises(Interrupted, match=r"Ctrl-C at step 0 without saving \(none was saved"):
            train(cfg)
    finally:
        signal.signal(signal.SIGINT, inherited)


@pytest.mark.slow
def test_a_sigterm_during_the_test_says_how_to_run_it_again(make_cfg):
    cfg = make_cfg("+callbacks.term={_target_: test_faults.SigtermAt, stage: test}")
    with pytest.raises(Interrupted, match=r"Stopped by SIGTERM at step 5 ") as stopped:
        train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert stopped.value.checkpoint == str(last) and step(last) == 5
    metrics = train(make_cfg("resume=true"))  # nothing left to train: the test runs
    assert {"test/acc", "test/loss"} <= metrics.keys() and step(last) == 5


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, data_dir):
    steps = ["trainer.max_epochs=2", "trainer.limit_train_batches=12", "logger=none", "test=false"]
    steps += [
        "trainer.deterministic=true",
        "seed=3",
        "callbacks.last_checkpoint.every_n_train_steps=3",
    ]
    whole, part = tmp_path / "whole", tmp_path / "part"
    whole.mkdir(), part.mkdir()
    uninterrupted = start(whole, data_dir, *steps)
    proc = start(part, data_dir, *steps)
    last = part / "unknown"

    def in_epoch_2_and_not_saving() -> bool:
        nonlocal last
        last = last_ckpt(part)
        return step(last) > 12 and not last.with_name("last.ckpt.partial").exists()

    kill_when(proc, in_epoch_2_and_not_saving)
    assert finish(proc)[0] == -signal.SIGKILL
    saved = load_checkpoint(last)
    assert saved["global_step"] % 3 == 0 and 12 < saved["global_step"] < 24
    assert [r["epoch"] for r in saved["callbacks"]["EpochSummary"]["history"]] == [1]
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": saved["global_step"] - 12}  # the loader's place in epoch 2
    ]

    code, out = finish(start(part, data_dir, f"resume={last.parents[1]}"))
    assert code == 0, out[-3000:]
    assert f"Restoring states from the checkpoint path at {last}" in out
    assert "not resumable" not in out  # Lightning's warning for a loader without a state
    assert finish(uninterrupted)[0] == 0
    a, b = load_checkpoint(last_ckpt(whole)), load_checkpoint(last)
    assert a["global_step"] == b["global_step"] == 24
    history = b["callbacks"]["EpochSummary"]["history"]
    assert history[0] == saved["callbacks"]["EpochSummary"]["history"][0]  # restored, not redone
    assert [r["epoch"] for r in history] == [1, 2]
    assert 0 < history[1]["seconds"] < 300  # both parts of the epoch, kill excluded
    # the rest of epoch 2's order, the same dropout draws, the epoch's train metrics so far:
    # the resumed run ends bit for bit where the uninterrupted one does
    for name, weights in a["state_dict"].items():
        assert torch.equal(weights, b["state_dict"][name]), name

    def metrics(state):
        rows = state["callbacks"]["EpochSummary"]["history"]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert metrics(a) == metrics(b)


@pytest.mark.slow
@pytest.mark.parametrize("seconds", [60, 0.001])
def test_the_last_checkpoint_saves_by_training_time_and_at_each_epoch_end(
    tmp_path, data_dir, seconds
):
    steps = []

    class Counted(LastCheckpoint):
        def save(self, trainer):
            steps.append(trainer.global_step)
            return super().save(trainer)

    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=0,
        callbacks=[Counted(str(tmp_path), every_n_seconds=seconds)],
        logger=False,
        enable_progress_bar=False,
    )
    trainer.fit(Classifier(), datamodule=MNISTDataModule(str(data_dir)))
    # every epoch's end; by time: after every step too (then again at the epoch's end)
    assert steps == ([3, 6] if seconds == 60 else [1, 2, 3, 3, 4, 5, 6, 6])
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 6


@pytest.mark.slow
def test_last_ckpt_is_current_when_the_monitored_metric_never_improves(make_cfg, tmp_path):
    # lr 1e-9: val/acc never beats epoch 0, so ModelCheckpoint saves its best once only
    train(make_cfg("trainer.max_epochs=3", "model.optimizer.lr=1e-9", "test=false"))
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    history = state["callbacks"]["EpochSummary"]["history"]
    assert state["epoch"] == 2 and [row["epoch"] for row in history] == [1, 2, 3]
    best = list((tmp_path / "checkpoints").glob("epoch*.ckpt"))
    assert len(best) == 1 and best[0].name.startswith("epoch000")


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_save_leaves_the_previous_last_ckpt(tmp_path, data_dir):
    steps = ["trainer.max_epochs=1", "trainer.limit_train_batches=8", "logger=none", "test=false"]
    proc = start(tmp_path, data_dir, *steps, "callbacks.last_checkpoint.every_n_train_steps=1")
    wait_until(proc, lambda: last_ckpt(tmp_path).exists())
    last = last_ckpt(tmp_path)
    partial = last.with_name("last.ckpt.partial")
    kill_when(proc, partial.exists, poll=0.0005)  # while the next checkpoint is being written
    assert finish(proc)[0] == -signal.SIGKILL
    state = load_checkpoint(last)  # complete, readable with weights_only=True
    assert state["global_step"] >= 1

    code, out = finish(start(tmp_path, data_dir, "resume=true"))
    assert code == 0, out[-3000:]
    assert step(last) == 8 and not partial.exists()


@pytest.mark.slow
def test_a_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
    tmp_path, data_dir
):
    steps = ["trainer.max_epochs=2", "trainer.limit_train_batches=10", "logger=none"]
    args = [*steps, "callbacks.last_checkpoint.every_n_train_steps=1", "model.optimizer.lr=1e8"]
    code, out = finish(start(tmp_path, data_dir, *args))
    assert code == 2 and "Traceback" not in out
    diverged = re.search(r"Training diverged at epoch 1, step (\d+): the training loss is nan", out)
    assert diverged, out[-3000:]
    assert "model.optimizer.lr=100000000.0" in out and "is the last good one" in out
    state = load_checkpoint(the_run(tmp_path) / "checkpoints" / "last.ckpt")
    assert state["global_step"] < int(diverged[1])
    assert all(torch.isfinite(w).all() for k, w in state["state_dict"].items() if "net." in k)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ),
    ],
)
def test_the_finite_check_reads_the_loss_every_step_on_cpu_and_every_nth_on_a_gpu(device):
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    check, nan = FiniteCheck(gpu_every_n_steps=4), torch.tensor(float("nan"), device=device)
    stops = []
    for batch_idx in range(9):
        try:
            check.on_train_batch_end(trainer, Classifier(), {"loss": nan}, None, batch_idx)
        except Diverged as e:
            assert "the training loss is nan" in str(e)
            assert "no checkpoint had been saved yet" in str(e)  # this trainer saves none
            stops.append(batch_idx)
    assert stops == (list(range(9)) if device == "cpu" else [0, 4, 8])


class Payload:
    """Pickles to a call that creates a file: what a tampered checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {name: tmp_path / f"{name}.ckpt" for name in ("text", "truncated", "pickle", "plain")}
    files["text"].write_text("not a checkpoint")
    model = Classifier()
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": {}}, files["truncated"])
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:100_000])
    state = {"state_dict": Payload(tmp_path / "ran"), "hyper_parameters": {}}
    torch.save(state, files["pickle"])
    torch.save({"weights": torch.zeros(3)}, files["plain"])  # a tensor file, not a checkpoint
    return files


@pytest.mark.parametrize("name", ["text", "truncated", "pickle", "plain"])
def test_a_tampered_or_foreign_ckpt_path_is_refused_before_any_work(tmp_path, make_cfg, name):
    path = bad_files(tmp_path)[name]
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(CheckpointError, match=f"Cannot use checkpoint {path}: .*ckpt_path="):
        train(make_cfg(f"ckpt_path={path}"))
    assert not (tmp_path / "ran").exists() and not (tmp_path / "checkpoints").exists()
    # the setup's SIGTERM handler is gone: a later SIGTERM (a notebook's next run) is not ours
    assert signal.getsignal(signal.SIGTERM) is handler


@pytest.mark.slow
def test_the_cli_refuses_a_tampered_ckpt_path_and_a_damaged_last_ckpt(tmp_path, data_dir):
    files = bad_files(tmp_path)
    run = tmp_path / "runs" / "damaged"  # a run dir whose last.ckpt is damaged
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(files["truncated"].read_bytes())
    procs = {
        files["pickle"]: start(tmp_path, data_dir, f"ckpt_path={files['pickle']}"),
        run / "checkpoints" / "last.ckpt": start(tmp_path, data_dir, f"resume={run}"),
    }
    for path, proc in procs.items():
        code, out = finish(proc)
        assert code == 2 and "Traceback" not in out, out[-3000:]
        assert f"Cannot use checkpoint {path}: " in out and "ckpt_path=" in out
    assert not (tmp_path / "ran").exists()
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["damaged"]  # no run dir made


def test_lightnings_own_load_path_reads_weights_only(tmp_path, make_cfg):
    cfg = make_cfg("trainer.max_epochs=1", "logger=none")
    trainer = hydra.utils.instantiate(cfg.trainer)  # the configured plugin, SafeCheckpointIO
    model = hydra.utils.instantiate(cfg.model, _recursive_=False)
    datamodule = hydra.utils.instantiate(cfg.data)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        trainer.fit(model, datamodule=datamodule, ckpt_path=bad_files(tmp_path)["pickle"])
    assert not (tmp_path / "ran").exists()


def test_no_code_loads_a_file_without_weights_only():
    sources = [p for p in ROOT.glob("mnist_cnn/*.py")] + list(ROOT.glob("notebooks/*.ipynb"))
    calls = 0
    for path in sources:
        text = path.read_text()
        assert not re.search(r"load\w*\([^)]*weights_only\s*=\s*False", text), path
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.end() : text.find(")", match.end())]
            assert "weights_only=True" in call, (path, call)
            calls += 1
    assert calls >= 1  # checkpoint.load_checkpoint at least
