"""``-m`` sweeps through each launcher, and the report written when they end."""

import csv
import shutil
import statistics

import pytest
import yaml
from conftest import FAST, cli

from mnist_cnn.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

F1 = "+model.metrics.f1={_target_:torchmetrics.classification.MulticlassF1Score,average:macro}"


def sweep(tmp_path, data_dir, *args, status=0):
    where = [f"paths.log_dir={tmp_path}", f"data.data_dir={data_dir}"]
    proc = cli("train", "-m", *FAST, *args, *where, code=status)
    (sweep_dir,) = (tmp_path / "multiruns").iterdir()
    return sweep_dir, proc.stdout + proc.stderr


def rows(sweep_dir, name="sweep_report.csv"):
    with (sweep_dir / name).open() as f:
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
def seeds(tmp_path_factory, data_dir):
    """2 seeds x 2 learning rates with a user's F1 metric, two jobs at a time (joblib; the
    basic launcher runs in test_sweep_goes_on_past_a_failing_job and test_cli.py)."""
    args = ["hydra/launcher=joblib", "seed=1,2", "model.optimizer.lr=1e-3,3e-3", F1]
    return sweep(tmp_path_factory.mktemp("seeds"), data_dir, *args)


def test_seeds_are_aggregated_per_setting_best_first(seeds):
    sweep_dir, output = seeds
    jobs = {r["job"]: r for r in rows(sweep_dir, "sweep_report_jobs.csv")}
    assert sorted(jobs) == ["0", "1", "2", "3"] and {r["status"] for r in jobs.values()} == {"ok"}
    settings = rows(sweep_dir)
    assert [(s["rank"], len(s["jobs"].split())) for s in settings] == [("1", 2), ("2", 2)]
    assert {s["model.optimizer.lr"] for s in settings} == {"0.001", "0.003"}
    for s in settings:
        members = [jobs[j] for j in s["jobs"].split()]
        assert sorted(j["seed"] for j in members) == ["1", "2"]
        assert {(j["model.optimizer.lr"], j["setting"]) for j in members} == {
            (s["model.optimizer.lr"], s["rank"])
        }
        best = [best_score(sweep_dir / j["job"]) for j in members]
        assert float(s["val/acc_best mean"]) == pytest.approx(statistics.fmean(best), abs=1e-4)
        assert float(s["val/acc_best std"]) == pytest.approx(statistics.stdev(best), abs=1e-4)
        assert s["val/acc_best n"] == "2" and float(s["val/acc_best std"]) > 0
    means = [float(s["val/acc_best mean"]) for s in settings]
    assert means == sorted(means, reverse=True)
    markdown = (sweep_dir / "sweep_report.md").read_text()
    assert markdown in output  # printed when the sweep ended
    assert "4 jobs, 2 settings, mean ± std over seed=1,2" in markdown
    best = settings[0]
    mean, std = best["val/acc_best mean"], best["val/acc_best std"]
    assert f"| 1 | {best['model.optimizer.lr']} | 2 | {mean} ± {std} |" in markdown
    assert (sweep_dir / "sweep_report.png").read_bytes()[:4] == b"\x89PNG"


def test_a_metric_the_user_adds_is_reported(seeds):
    sweep_dir, _ = seeds
    settings, jobs = rows(sweep_dir), rows(sweep_dir, "sweep_report_jobs.csv")
    for stage in ("train", "val", "test"):
        assert all(0 < float(s[f"{stage}/f1 mean"]) <= 1 for s in settings)
        assert all(0 < float(j[f"{stage}/f1"]) <= 1 for j in jobs)
    assert (
        "| val/f1 | val/loss | test/acc | test/f1 |" in (sweep_dir / "sweep_report.md").read_text()
    )
    assert not [c for c in jobs[0] if c.startswith("lr-") or c == "epoch"]  # not metrics


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_sweep_goes_on_past_a_failing_job(tmp_path, data_dir, launcher):
    # lr=1e8 diverges at step 2: job 1 records its error, job 0 still runs, and the exit status
    # is the number of failed jobs
    args = [f"hydra/launcher={launcher}", "model.optimizer.lr=1e-3,1e8"]
    sweep_dir, output = sweep(tmp_path, data_dir, *args, status=1)
    failure = yaml.safe_load((sweep_dir / "1" / "job_failed.yaml").read_text())
    assert failure["kind"] == "diverged"
    jobs = rows(sweep_dir, "sweep_report_jobs.csv")
    assert [(j["job"], j["status"]) for j in jobs] == [("0", "ok"), ("1", "failed")]
    assert float(jobs[0]["test/acc"]) > 0 and jobs[1]["error"] == f"diverged: {failure['error']}"
    (setting,) = rows(sweep_dir)  # the failed job is in no mean
    assert (setting["jobs"], setting["model.optimizer.lr"]) == ("0", "0.001")
    markdown = (sweep_dir / "sweep_report.md").read_text()
    assert "## Failed: 1 of 2 jobs, not in the means" in markdown
    assert f"model.optimizer.lr=100000000.0 paths.log_dir={tmp_path} " in markdown
    assert f"`: diverged: {failure['error']}\n" in markdown
    assert f"1 of 2 jobs failed: see {sweep_dir / 'sweep_report.md'}" in output


def report_cli(folder):
    return cli("sweep_report", str(folder), code=None, timeout=300)


def test_report_cli_on_a_partial_sweep_with_failed_and_unreadable_jobs(seeds, tmp_path):
    sweep_dir = shutil.copytree(seeds[0], tmp_path / "sweep")
    for report in sweep_dir.glob("sweep_report*"):
        report.unlink()
    # job 1 as if it had just started: its config is written, no metrics logged yet
    for name in ("tensorboard", "checkpoints"):
        shutil.rmtree(sweep_dir / "1" / name)
    # job 2 failed (after logging an epoch); its setting's mean is job 0's alone
    failure = {"error": "Training diverged at epoch 2, step 9: ...", "kind": "diverged"}
    (sweep_dir / "2" / "job_failed.yaml").write_text(yaml.safe_dump(failure))
    # job 4 without its config.yaml, job 5 with an overrides.yaml cut off mid-write
    for job in ("4", "5"):
        shutil.copytree(sweep_dir / "1" / ".hydra", sweep_dir / job / ".hydra")
    (sweep_dir / "4" / ".hydra" / "config.yaml").unlink()
    (sweep_dir / "5" / ".hydra" / "overrides.yaml").write_text("- seed=3\n- 'deb")
    proc = report_cli(sweep_dir)
    assert proc.returncode == 0, proc.stderr
    jobs = rows(sweep_dir, "sweep_report_jobs.csv")
    assert [j["status"] for j in jobs] == ["ok", "no metrics", "failed", "ok"]
    assert jobs[2]["error"] == "diverged: Training diverged at epoch 2, step 9: ..."
    assert jobs[2]["val/acc_best"] and not jobs[2]["setting"]
    by_lr = {s["model.optimizer.lr"]: s for s in rows(sweep_dir)}
    assert (by_lr["0.001"]["jobs"], by_lr["0.003"]["jobs"]) == ("0", "1 3")
    for s, job in ((by_lr["0.001"], jobs[0]), (by_lr["0.003"], jobs[3])):
        assert (s["val/acc_best mean"], s["val/acc_best std"]) == (job["val/acc_best"], "")
        assert s["val/acc_best n"] == "1"
    assert "## Failed: 1 of 4 jobs, not in the means" in proc.stdout
    assert "- job 2 `" in proc.stdout and "`: diverged: Training diverged at epoch 2" in proc.stdout
    assert "No metrics yet (running, killed or not started): jobs 1." in proc.stdout
    assert (
        "Unreadable, not in the tables: jobs 4 (.hydra/config.yaml: No such file or directory); "
        "5 (.hydra/overrides.yaml: found unexpected end of stream at line 2)." in proc.stdout
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
def test_report_cli_refuses_a_folder_that_is_no_sweep(seeds, tmp_path, folder, what, fix):
    (tmp_path / "empty").mkdir()
    for job in ("0", "1"):  # real runs' .hydra/, as outputs/runs holds them
        shutil.copytree(seeds[0] / job / ".hydra", tmp_path / "runs" / job / ".hydra")
    shutil.copytree(seeds[0] / "0" / ".hydra", tmp_path / "sweep" / "0" / ".hydra")
    shutil.copy(seeds[0] / "multirun.yaml", tmp_path / "sweep")
    proc = report_cli(tmp_path / folder)
    assert proc.returncode == 2, proc.stdout
    assert f"{tmp_path / folder} {what}" in proc.stderr and fix in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.rglob("sweep_report*"))


def test_submitit_local_runs_each_job_in_its_own_process_and_dir(tmp_path, data_dir):
    args = ["hydra/launcher=submitit_local", "data.batch_size=32,64"]
    sweep_dir, _ = sweep(tmp_path, data_dir, *args)
    jobs = rows(sweep_dir, "sweep_report_jobs.csv")
    assert sorted((j["job"], j["data.batch_size"]) for j in jobs) == [("0", "32"), ("1", "64")]
    assert all(j["val/acc_best"] for j in jobs)
    for j in jobs:
        overrides = (sweep_dir / j["job"] / ".hydra" / "overrides.yaml").read_text()
        assert f"data.batch_size={j['data.batch_size']}" in overrides
    assert len(list((sweep_dir / ".submitit").glob("*/*_log.out"))) == 2  # submitit's job logs
