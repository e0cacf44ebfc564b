"""A ``hydra/launcher=joblib`` sweep under fire: a job killed with ``kill -9``, and Ctrl-C."""

import csv
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import FAST, cli, spawn

pytestmark = pytest.mark.slow

LONG = ["trainer.limit_train_batches=400", "trainer.log_every_n_steps=5"]


def start(tmp_path, data_dir, *args) -> subprocess.Popen:
    where = [f"paths.log_dir={tmp_path}", f"data.data_dir={data_dir}"]
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *FAST, *LONG, *where, *args]
    return spawn("train", *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def job_processes(pid: int) -> list[int]:
    """The sweep's job processes (spawned children running a job), in start order."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    jobs = [
        c for c in map(int, children) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
    ]
    return sorted(jobs)


def wait_training(proc: subprocess.Popen, log_dir: Path, jobs: int) -> Path:
    """The sweep dir, once its first ``jobs`` jobs have started fit (their run_info.yaml)
    and trained a few steps."""
    deadline = time.monotonic() + 240
    sweeps = log_dir / "multiruns"
    while not sweeps.is_dir() or not all(
        (s / str(j) / "run_info.yaml").is_file() for s in sweeps.iterdir() for j in range(jobs)
    ):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the jobs did not start training"
        time.sleep(0.5)
    time.sleep(4)
    (sweep_dir,) = sweeps.iterdir()
    return sweep_dir


def jobs_csv(sweep_dir: Path) -> dict[str, dict]:
    with (sweep_dir / "sweep_report_jobs.csv").open() as f:
        return {row["job"]: row for row in csv.DictReader(f)}


def test_a_killed_job_is_reported_failed_while_the_other_finishes(tmp_path, data_dir):
    proc = start(tmp_path, data_dir, "trainer.max_steps=60,-1")  # job 0 ends early
    sweep_dir = wait_training(proc, tmp_path, jobs=2)
    second = job_processes(proc.pid)[-1]  # the newest: job 1 (job 0 may have finished)
    os.kill(second, signal.SIGKILL)
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 1, output[-3000:]  # one failed job
    assert "max_steps=-1) died: killed by SIGKILL; the other jobs go on" in output
    jobs = jobs_csv(sweep_dir)
    assert jobs["0"]["status"] == "ok" and float(jobs["0"]["test/acc"]) > 0.5
    assert jobs["1"]["status"] == "failed"
    assert jobs["1"]["error"] == "died: killed by SIGKILL before it finished"
    assert "## Failed: 1 of 2 jobs, not in the means" in (sweep_dir / "sweep_report.md").read_text()


def test_ctrl_c_saves_every_running_job_and_prints_how_to_finish(tmp_path, data_dir):
    proc = start(tmp_path, data_dir, "seed=1,2,3")  # 3 jobs, 2 at a time: job 2 waits
    sweep_dir = wait_training(proc, tmp_path, jobs=2)
    proc.send_signal(signal.SIGINT)  # the parent alone: it passes Ctrl-C on to each job once
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, output[-3000:]
    for job in ("0", "1"):
        assert (sweep_dir / job / "checkpoints" / "last.ckpt").is_file()
        assert not list((sweep_dir / job).rglob("*.partial"))
        failed = yaml.safe_load((sweep_dir / job / "job_failed.yaml").read_text())
        assert failed == {"error": "stopped by SIGINT before it finished", "kind": "interrupted"}
    assert not (sweep_dir / "2").exists()  # never started
    assert {j["status"] for j in jobs_csv(sweep_dir).values()} == {"failed"}
    assert "Sweep stopped by SIGINT: 3 of 3 jobs did not finish." in output
    commands = re.findall(r"^  (python -m mnist_cnn\.train .*)$", output, re.MULTILINE)
    assert commands[:2] == [
        f"python -m mnist_cnn.train resume={sweep_dir / job}" for job in ("0", "1")
    ]
    assert "seed=3" in commands[2] and f"hydra.run.dir={sweep_dir / '2'}" in commands[2]
    assert re.search(rf"^  python -m mnist_cnn.sweep_report {sweep_dir}$", output, re.MULTILINE)

    # the printed command finishes job 0 in its dir, and the rebuilt report counts it
    cli("train", *shlex.split(commands[0])[3:], "callbacks.progress_bar.refresh_rate=0")
    assert not (sweep_dir / "0" / "job_failed.yaml").exists()
    cli("sweep_report", str(sweep_dir))
    jobs = jobs_csv(sweep_dir)
    assert (jobs["0"]["status"], jobs["1"]["status"]) == ("ok", "failed")
    assert float(jobs["0"]["test/acc"]) > 0.5
