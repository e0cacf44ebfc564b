"""``-m`` sweeps through each launcher, and the report written when they end."""

import csv
import shutil
import subprocess
import sys

import pytest

from mnist_cnn.checkpoint import load_checkpoint

TINY = [
    "debug=fast",
    "trainer.accelerator=cpu",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "callbacks.progress_bar.refresh_rate=0",
]


def sweep(tmp_path, data_dir, *args):
    proc = subprocess.run(
        [sys.executable, "-m", "mnist_cnn.train", "-m", *TINY, *args]
        + [f"paths.log_dir={tmp_path}", f"data.data_dir={data_dir}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "multiruns").iterdir()
    return sweep_dir, proc.stdout + proc.stderr


def report_rows(sweep_dir):
    with (sweep_dir / "sweep_report.csv").open() as f:
        return list(csv.DictReader(f))


def best_score(job_dir) -> float:
    """val/acc of the job's best epoch, from its checkpoint (not from what the report reads)."""
    state = load_checkpoint(job_dir / "checkpoints" / "last.ckpt")
    return next(
        float(s["best_model_score"])
        for k, s in state["callbacks"].items()
        if k.startswith("ModelCheckpoint") and s.get("best_model_score") is not None
    )


@pytest.fixture(scope="module")
def grid(tmp_path_factory, data_dir):
    """A 2-job grid, both jobs at once through the joblib launcher (the default launcher runs
    them one after the other; test_cli.py covers it)."""
    args = ["hydra/launcher=joblib", "model.optimizer.lr=1e-3,5e-3"]
    return sweep(tmp_path_factory.mktemp("grid"), data_dir, *args)


def test_grid_sweep_writes_a_report_best_first(grid):
    sweep_dir, output = grid
    rows = report_rows(sweep_dir)
    assert sorted(r["job"] for r in rows) == ["0", "1"]
    assert {r["model.optimizer.lr"] for r in rows} == {"0.001", "0.005"}
    for r in rows:
        assert float(r["val/acc_best"]) == pytest.approx(best_score(sweep_dir / r["job"]), abs=1e-4)
        assert r["epochs"] == "1" and float(r["test/acc"]) > 0
        assert "model.optimizer.lr=" in r["overrides"] and "debug=fast" in r["overrides"]
    scores = [float(r["val/acc_best"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and [r["rank"] for r in rows] == ["1", "2"]
    markdown = (sweep_dir / "sweep_report.md").read_text()
    assert markdown in output  # printed when the sweep ended
    assert "| model.optimizer.lr |" in markdown
    assert (sweep_dir / "sweep_report.png").read_bytes()[:4] == b"\x89PNG"


def report_cli(folder):
    return subprocess.run(
        [sys.executable, "-m", "mnist_cnn.sweep_report", str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_report_cli_on_a_partial_sweep_with_unreadable_jobs(grid, tmp_path):
    sweep_dir = shutil.copytree(grid[0], tmp_path / "sweep")
    for name in ("sweep_report.csv", "sweep_report.md", "sweep_report.png"):
        (sweep_dir / name).unlink()
    # job 1 as if it had just started: its config is written, no metrics logged yet
    for name in ("tensorboard", "checkpoints"):
        shutil.rmtree(sweep_dir / "1" / name)
    # job 2 without its config.yaml, job 3 with an overrides.yaml cut off mid-write
    for job in ("2", "3"):
        shutil.copytree(sweep_dir / "1" / ".hydra", sweep_dir / job / ".hydra")
    (sweep_dir / "2" / ".hydra" / "config.yaml").unlink()
    (sweep_dir / "3" / ".hydra" / "overrides.yaml").write_text("- model.optimizer.lr=0.1\n- 'deb")
    proc = report_cli(sweep_dir)
    assert proc.returncode == 0, proc.stderr
    rows = report_rows(sweep_dir)
    assert [r["job"] for r in rows] == ["0", "1"] and rows[1]["val/acc_best"] == ""
    assert "No metrics yet (running, failed or not started): jobs 1" in proc.stdout
    assert (
        "Unreadable, not in the table: jobs 2 (.hydra/config.yaml: No such file or directory); "
        "3 (.hydra/overrides.yaml: found unexpected end of stream at line 2)." in proc.stdout
    )
    assert (sweep_dir / "sweep_report.png").exists()


@pytest.mark.parametrize(
    "folder, what, fix",
    [
        ("empty", "is not a sweep (it has no multirun.yaml)", "Pass a sweep dir, outputs/multi"),
        ("runs", "is a runs folder holding 2 runs, not a sweep", "Pass a sweep dir, outputs/multi"),
        ("runs/0", "is a single run (it has .hydra/ itself), not a sweep", "Pass a sweep dir"),
        ("sweep/0", "is one job of a sweep", "Pass its sweep dir: "),
    ],
)
def test_report_cli_refuses_a_folder_that_is_no_sweep(grid, tmp_path, folder, what, fix):
    (tmp_path / "empty").mkdir()
    for job in ("0", "1"):  # real runs' .hydra/, as outputs/runs holds them
        shutil.copytree(grid[0] / job / ".hydra", tmp_path / "runs" / job / ".hydra")
    shutil.copytree(grid[0] / "0" / ".hydra", tmp_path / "sweep" / "0" / ".hydra")
    shutil.copy(grid[0] / "multirun.yaml", tmp_path / "sweep")
    proc = report_cli(tmp_path / folder)
    assert proc.returncode == 2, proc.stdout
    assert f"{tmp_path / folder} {what}" in proc.stderr and fix in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.rglob("sweep_report.*"))


def test_submitit_local_runs_each_job_in_its_own_process_and_dir(tmp_path, data_dir):
    args = ["hydra/launcher=submitit_local", "data.batch_size=32,64"]
    sweep_dir, _ = sweep(tmp_path, data_dir, *args)
    rows = report_rows(sweep_dir)
    assert sorted((r["job"], r["data.batch_size"]) for r in rows) == [("0", "32"), ("1", "64")]
    assert all(r["val/acc_best"] for r in rows)
    for r in rows:
        overrides = (sweep_dir / r["job"] / ".hydra" / "overrides.yaml").read_text()
        assert f"data.batch_size={r['data.batch_size']}" in overrides
    assert len(list((sweep_dir / ".submitit").glob("*/*_log.out"))) == 2  # submitit's job logs
