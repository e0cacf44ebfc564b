"""``trainer=ddp_cpu``: two gloo processes under Hydra, one run dir, metrics over both ranks."""

import subprocess
import sys

import pytest
import torch
from conftest import FAST

from mnist_cnn import fast_precision
from mnist_cnn.checkpoint import load_checkpoint, load_model
from mnist_cnn.data import MNISTDataModule

pytestmark = pytest.mark.slow


def test_ddp_cpu_trains_in_one_run_dir_with_metrics_over_both_ranks(tmp_path, data_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "mnist_cnn.train", "trainer=ddp_cpu", *FAST[:5]]
        + ["callbacks.progress_bar.refresh_rate=0", "logger=all"]
        + [f"paths.log_dir={tmp_path}", f"data.data_dir={data_dir}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

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
    state = load_checkpoint(checkpoints / "last.ckpt")
    (score,) = [
        s["best_model_score"]
        for k, s in state["callbacks"].items()
        if k.startswith("ModelCheckpoint") and s.get("best_model_score") is not None
    ]
    dm = MNISTDataModule(str(data_dir))
    dm.setup("fit")
    x, y = dm.on_after_batch_transfer(dm.val_set[torch.arange(4000)], 0)
    bf16 = fast_precision("cpu") == "bf16-mixed"  # the run's trainer.precision
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        correct = load_model(best[0])(x).argmax(-1) == y
    assert float(score) == correct.float().mean().item()
    assert "test accuracy" in proc.stdout + proc.stderr
