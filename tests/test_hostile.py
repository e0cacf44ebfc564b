"""Hostile files and full disks end with one line (exit 2), keep the last good checkpoint and
leave no temporary file: crafted checkpoints, a filesystem that fills up, a max_time stop."""

import resource
import shutil
import subprocess
import time

import pytest
import torch
from conftest import NO_FIGURES, SMALL_EVAL, cli, spawn, tiny_cfg

from mnist_cnn.checkpoint import CheckpointError, load_model
from mnist_cnn.train import train

pytestmark = pytest.mark.slow

QUIET = "callbacks.progress_bar.refresh_rate=0"


@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("real")
    train(tiny_cfg(out, data_dir, "test=false"))
    return out / "checkpoints" / "last.ckpt"


def crafted(real_ckpt, tmp_path, **changes):
    """The checkpoint with ``changes`` in its hyper-parameters and in its record of the module's
    constructor call and data, which the tools build from."""
    state = torch.load(real_ckpt, weights_only=True)
    state["hyper_parameters"] |= changes
    record = state["mnist_cnn"]
    record["module"] |= changes
    record["data"] |= {k: v for k, v in changes.items() if k in record["data"]}
    path = tmp_path / "crafted.ckpt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"image_size": 10**9}, "image_size=1000000000 is not 1 to 4096"),
        ({"classes": 7}, "classes are not a list of names"),
        ({"channels": -1}, "channels=-1 is not 1 to 4"),
        ({"net": {"_target_": "os.system", "command": "echo hi"}}, "os.system is not a Module"),
        ({"datamodule": {"_target_": "subprocess.run"}}, "subprocess.run is not a"),
    ],
)
def test_a_crafted_checkpoint_is_refused_before_anything_is_built(
    real_ckpt, tmp_path, changes, words
):
    with pytest.raises(CheckpointError, match=words):
        load_model(crafted(real_ckpt, tmp_path, **changes))


def test_a_checkpoint_naming_another_callable_as_its_module_is_refused(real_ckpt, tmp_path):
    state = torch.load(real_ckpt, weights_only=True)
    state["mnist_cnn"]["module"] = {"_target_": "os.system", "command": "echo hi"}
    torch.save(state, tmp_path / "crafted.ckpt")
    with pytest.raises(CheckpointError, match="os.system is not a LightningModule subclass"):
        load_model(tmp_path / "crafted.ckpt")


def test_a_huge_network_in_a_checkpoint_allocates_nothing(real_ckpt, tmp_path):
    net = torch.load(real_ckpt, weights_only=True)["hyper_parameters"]["net"]
    path = crafted(real_ckpt, tmp_path, net=net | {"hidden": 10**6})  # 9 GB if built
    for command, extra in (("eval", []), ("predict", [f"inputs=[{tmp_path}]"]), ("export", [])):
        proc = cli(command, f"ckpt_path={path}", *extra, cwd=tmp_path, code=2, timeout=120)
        said = proc.stdout + proc.stderr
        assert "Traceback" not in said, said[-2000:]
        assert "do not fit its module Classifier (net.fc1" in said


def test_a_full_disk_during_a_checkpoint_save_is_one_line(small_disk, data_dir):
    disk, limit = small_disk  # 30 MB: the first last.ckpt (weights and Adam) does not fit
    proc = cli(
        "train",
        QUIET,
        *("trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1"),
        *("trainer.accelerator=cpu", "logger=none"),
        f"paths.log_dir={disk}",
        f"data.data_dir={data_dir}",
        code=2,
        preexec_fn=limit,
    )
    said = proc.stdout + proc.stderr
    assert "Traceback" not in said, said[-3000:]
    assert "Cannot write" in said and "Free some space" in said
    assert not list(disk.rglob("*.partial"))
    # the first save failed: no "last complete checkpoint is kept", as there is none
    assert not list(disk.rglob("last.ckpt")) and "no checkpoint was saved yet" in said


def test_a_max_time_stop_saves_its_partial_epoch(make_cfg, tmp_path):
    metrics = train(make_cfg("trainer.max_time=00:00:00:02", "trainer.limit_train_batches=null"))
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert 0 < state["global_step"] < 782 and state["epoch"] == 0  # stopped inside epoch 1
    assert "test/acc" in metrics


def test_out_of_memory_names_the_batch_size_to_lower(tmp_path, data_dir):
    def six_gib():  # address space: what torch and the data need (under 4 GiB here), not
        # the activations of a batch of 50,000 (the lower the limit, the sooner they fail)
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))

    proc = cli(
        "train",
        QUIET,
        *("trainer.accelerator=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=1"),
        *("trainer.num_sanity_val_steps=0", "data.batch_size=50000", "test=false"),
        f"paths.log_dir={tmp_path}",
        f"data.data_dir={data_dir}",
        code=2,
        preexec_fn=six_gib,
    )
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "Out of memory: lower data.batch_size (now 50000)" in proc.stdout


def test_a_run_dir_deleted_while_training_is_one_line_and_its_resume_says_what_to_do(
    tmp_path, data_dir
):
    args = ["trainer.accelerator=cpu", "trainer.max_epochs=3", "trainer.limit_train_batches=60"]
    args += ["trainer.limit_val_batches=5", "test=false", NO_FIGURES, SMALL_EVAL]
    args += [f"paths.log_dir={tmp_path}"]
    args += [f"data.data_dir={data_dir}"]
    proc = spawn("train", *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("runs/*/checkpoints/last.ckpt")):  # epoch 1 is saved
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.1)
    (run,) = tmp_path.glob("runs/*")
    shutil.rmtree(run, ignore_errors=True)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 2, out[-2000:]
    assert "Traceback" not in out
    assert "Was the run dir deleted or moved while training?" in out
    last = run / "checkpoints" / "last.ckpt"
    assert f"ckpt_path={last} with the run's settings continues from it" in out
    assert torch.load(last, weights_only=True)["epoch"] >= 1  # saved again as the run stopped

    # its settings went with it: a new run from its checkpoint
    again = cli("train", QUIET, f"resume={run}", code=2)
    assert f"Cannot resume {run}: its settings" in again.stdout + again.stderr
    assert f"ckpt_path={run}/checkpoints/last.ckpt" in again.stdout + again.stderr
