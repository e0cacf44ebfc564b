"""``trainer=ddp_cpu``: two gloo processes under Hydra, one run dir, metrics over both ranks."""

import pytest
from conftest import FAST, cli, val_acc_twice

pytestmark = pytest.mark.slow


def test_ddp_cpu_trains_in_one_run_dir_with_metrics_over_both_ranks(tmp_path, data_dir):
    proc = cli(
        "train",
        *("trainer=ddp_cpu", *FAST[:5], "callbacks.progress_bar.refresh_rate=0", "logger=all"),
        *(f"paths.log_dir={tmp_path}", f"data.data_dir={data_dir}"),
    )

    (run,) = (tmp_path / "runs").iterdir()  # rank 1 ran in rank 0's dir, made none of its own
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    (checkpoints,) = run.rglob("checkpoints")
    best = [p for p in checkpoints.iterdir() if p.name != "last.ckpt"]
    assert (checkpoints / "last.ckpt").exists() and len(best) == 1
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and len({e.name.split(".")[4] for e in events}) == 1  # one writer (pid)
    assert (run / "csv" / "metrics.csv").exists() and not list(run.glob("*/version_*"))

    # val/acc is over both ranks' shards: debug=fast validates 2 batches of 1000 per rank, and
    # DistributedSampler gives rank 0 the even and rank 1 the odd images of the first 4000.
    score, recomputed = val_acc_twice(checkpoints / "last.ckpt", best[0], data_dir)
    assert score == recomputed
    assert "test accuracy" in proc.stdout + proc.stderr
