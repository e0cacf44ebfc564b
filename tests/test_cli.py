"""``python -m mnist_cnn.train`` as a user runs it: real subprocesses, real Hydra."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FAST, cli, spawn


def test_cli_run_with_overrides_makes_one_run_dir(tmp_path, data_dir):
    proc = cli(
        "train",
        *FAST,
        f"paths.log_dir={tmp_path}",
        f"data.data_dir={data_dir}",
        "data.batch_size=32",
        cwd=tmp_path.parent,  # any working directory works
    )
    assert "test accuracy" in proc.stdout + proc.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.count("_") == 2  # <date>_<time>_<id>
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert config["data"]["batch_size"] == 32
    assert "data.batch_size=32" in (run / ".hydra" / "overrides.yaml").read_text()
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "train.log").exists()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_two_runs_in_the_same_second_get_two_dirs(tmp_path, data_dir):
    # The same timestamp for both (a frozen run.dir prefix): only the per-process id differs.
    args = [*FAST, "test=false", "logger=none", f"paths.log_dir={tmp_path}"]
    args += [
        f"data.data_dir={data_dir}",
        "hydra.run.dir=${paths.log_dir}/runs/same-second_${run_id:}",
    ]
    procs = [spawn("train", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in "ab"]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((r / "checkpoints" / "last.ckpt").exists() for r in runs)


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_dir(tmp_path, data_dir):
    cli(
        "train",
        "-m",
        *FAST,
        f"paths.log_dir={tmp_path}",
        f"data.data_dir={data_dir}",
        "model.optimizer.lr=0.001,0.002",
    )
    (sweep,) = (tmp_path / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    lrs = []
    for job in jobs:
        last = job / "checkpoints" / "last.ckpt"
        lrs.append(torch.load(last, weights_only=True)["hyper_parameters"]["optimizer"]["lr"])
    assert lrs == [0.001, 0.002]


@pytest.mark.slow
def test_missing_data_is_one_clear_paragraph_not_a_traceback(tmp_path):
    proc = cli(
        "train", *FAST, f"paths.log_dir={tmp_path}", f"data.data_dir={tmp_path}/empty", code=2
    )
    assert "train-images-idx3-ubyte.gz" in proc.stderr + proc.stdout
    assert "MNIST_DATA_DIR" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.slow  # the fast loop refuses overrides in-process (test_validation.py)
def test_a_misspelt_override_is_refused(tmp_path):
    proc = cli("train", *FAST, f"paths.log_dir={tmp_path}", "trainer.max_epoch=1", code=2)
    assert "max_epoch" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_hydras_own_flags_work(tmp_path):
    job = cli("train", "--cfg", "job", "trainer.max_epochs=3", cwd=tmp_path)
    assert yaml.safe_load(job.stdout)["trainer"]["max_epochs"] == 3
    assert "model/net: lenet5, seed_cnn" in cli("train", "--help", cwd=tmp_path).stdout
    assert "Defaults List" in cli("train", "--info", "defaults", cwd=tmp_path).stdout
    script = Path(sys.executable).parent / "mnist-train"  # the console script: completion
    done = subprocess.run(
        [script, "--shell-completion", "query=bash"],
        env={**os.environ, "COMP_LINE": "mnist-train trainer.max_e"},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.stdout.split() == ["trainer.max_epochs="], done.stderr
    assert list(tmp_path.iterdir()) == []  # none of them made a run dir


@pytest.mark.slow
def test_sweep_syntax_glob_range_and_a_users_own_group_file(tmp_path, data_dir):
    mine = tmp_path / "my_conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "tiny.yaml").write_text("# @package _global_\nmodel:\n  net:\n    hidden: 16\n")
    cli(
        "train",
        "-m",
        "--config-dir",
        str(tmp_path / "my_conf"),
        "experiment=glob(tiny*)",  # finds the user's own option only
        "seed=range(1,3)",
        "++trainer.fast_dev_run=true",
        "trainer.accelerator=cpu",
        f"paths.log_dir={tmp_path}",
        f"data.data_dir={data_dir}",
    )
    (sweep,) = (tmp_path / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    for job, seed in zip(jobs, (1, 2), strict=True):
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        assert config["seed"] == seed and config["model"]["net"]["hidden"] == 16


@pytest.mark.slow
def test_a_debug_run_is_small_and_never_the_one_resume_picks(tmp_path, data_dir):
    cli("train", "debug=fast", f"paths.log_dir={tmp_path}", f"data.data_dir={data_dir}")
    assert not (tmp_path / "runs").exists()
    (run,) = (tmp_path / "debug").iterdir()
    assert not list(run.rglob("*.ckpt")) and (run / "figures" / "predictions.png").exists()
    assert sum(p.stat().st_size for p in run.rglob("*") if p.is_file()) < 20_000_000
    resume = cli("train", "resume=true", f"paths.log_dir={tmp_path}", code=2)
    assert "found no run" in resume.stderr
