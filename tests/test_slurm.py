"""``hydra/launcher=submitit_slurm`` on a real single-host Slurm: a sweep through sbatch with its
report, and a job that Slurm requeues (as a pre-emption does) resuming in its own run dir."""

import subprocess
import time

import pytest
import yaml
from conftest import NO_FIGURES, SMALL_EVAL, spawn

from mnist_cnn.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


def test_a_sweep_through_sbatch_reports_and_a_requeued_job_resumes_in_its_dir(
    tmp_path, data_dir, slurm
):
    cmd = ["-m", "hydra/launcher=submitit_slurm"]
    cmd += ["hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1", "seed=1,2"]
    cmd += [
        "trainer.accelerator=cpu",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=40",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "trainer.num_sanity_val_steps=0",
        "callbacks.progress_bar.refresh_rate=0",
        "callbacks.last_checkpoint.every_n_seconds=3600",  # last.ckpt at epoch ends
        "logger=csv",
        NO_FIGURES,
        SMALL_EVAL,
        f"paths.log_dir={tmp_path}",
        f"data.data_dir={data_dir}",
    ]
    log = (tmp_path / "sweep.out").open("w")
    sweep = spawn("train", *cmd, stdout=log, stderr=subprocess.STDOUT, env=slurm)

    # once a job has finished epoch 1, Slurm requeues it: job 0 as a pre-emption does
    # (scontrol requeue: SIGTERM, then it runs again), job 1 as a time limit's --signal=USR1
    # does (Lightning saves hpc_ckpt_1.ckpt and calls scontrol requeue itself)
    deadline = time.monotonic() + 300
    for num, how in ((0, ["scontrol", "requeue"]), (1, ["scancel", "--signal=USR1"])):
        while not list(tmp_path.glob(f"multiruns/*/{num}/checkpoints/last.ckpt")):
            assert sweep.poll() is None, (tmp_path / "sweep.out").read_text()[-3000:]
            assert time.monotonic() < deadline, f"job {num}'s epoch 1 did not end"
            time.sleep(0.2)
        jobs = subprocess.run(
            ["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=slurm, check=True
        ).stdout.split()
        (job,) = [j for j in jobs if j.endswith(f"_{num}")]
        subprocess.run([*how, job], env=slurm, check=True, timeout=60)

    assert sweep.wait(timeout=600) == 0, (tmp_path / "sweep.out").read_text()[-3000:]
    (sweep_dir,) = (tmp_path / "multiruns").iterdir()
    report = (sweep_dir / "sweep_report.md").read_text()
    assert "2 jobs" in report and "| 0 | 1 | ok | 1 |" in report and "| 1 | 1 | ok | 2 |" in report

    for num in (0, 1):
        run = sweep_dir / str(num)
        text = (run / "train.log").read_text()
        assert "Slurm started job" in text and "it continues from" in text, text[-3000:]
        assert text.count("epoch 1/2 |") == 1 and text.count("epoch 2/2 |") == 1  # not again
        assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 80  # 2 x 40
        assert len(yaml.safe_load((run / "run_info.yaml").read_text())) == 2  # start, restart
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name.isdigit()) == ["0", "1"]
