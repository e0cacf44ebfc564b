"""The Trainer and Hydra flags a Lightning user types work with the template's defaults (fused
Adam, bf16-mixed, our checkpoint callbacks), through train(cfg) or the CLI, as users run them."""

import pytest
import torch
from conftest import FAST, cli

from mnist_cnn.train import train

pytestmark = pytest.mark.slow

RICH = "callbacks.progress_bar={_target_:lightning.pytorch.callbacks.RichProgressBar}"
FLAGS = [
    "trainer.gradient_clip_val=0.5",  # Lightning refuses to clip a fused Adam under AMP
    "trainer.gradient_clip_algorithm=value",
    "trainer.accumulate_grad_batches=2",
    "trainer.val_check_interval=2",
    "trainer.check_val_every_n_epoch=2",
    "trainer.max_steps=3",
    "trainer.max_time=00:00:00:30",
    "trainer.overfit_batches=2",
    "trainer.profiler=simple",
    "trainer.precision=32-true",
    "trainer.precision=bf16-true",
    "trainer.precision=64-true",
    "trainer.fast_dev_run=true",
    "trainer.enable_checkpointing=false",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "+callbacks.early={_target_:lightning.pytorch.callbacks.EarlyStopping,monitor:val/loss}",
    "+callbacks.swa={_target_:lightning.pytorch.callbacks.StochasticWeightAveraging,swa_lrs:0.01}",
    RICH,
]


@pytest.mark.parametrize("flag", FLAGS)
def test_a_lightning_flag_trains_and_tests(make_cfg, tmp_path, flag):
    metrics = train(make_cfg(flag, "trainer.max_epochs=2", "trainer.limit_train_batches=4"))
    assert {"test/acc", "test/loss"} <= metrics.keys()  # fit, then the test
    if "fast_dev_run" in flag or "checkpointing" in flag:  # no checkpoint written
        assert not (tmp_path / "checkpoints").exists()
    else:
        state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
        assert state["global_step"] > 0


def test_no_validation_still_writes_checkpoints(make_cfg, tmp_path):
    train(make_cfg("trainer.limit_val_batches=0", "trainer.max_epochs=2"))
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 10


def test_ddp_spawn_on_two_cpu_processes(tmp_path, data_dir):
    proc = cli(
        "train",
        *(*FAST, "++trainer.strategy=ddp_spawn", "trainer.devices=2"),
        *(f"paths.log_dir={tmp_path}", f"data.data_dir={data_dir}"),
    )
    assert "test accuracy" in proc.stdout + proc.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "checkpoints" / "last.ckpt").exists()
