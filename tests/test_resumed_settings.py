"""Training from a checkpoint with changed settings: the optimizer takes the new values (and the
checkpoint records what ran), or the run is refused in one line before any work."""

import pytest
import torch

from mnist_cnn.checkpoint import CheckpointError
from mnist_cnn.train import train
from mnist_cnn.validate import ConfigError

ONE_CYCLE = (
    "model.scheduler={_target_:torch.optim.lr_scheduler.OneCycleLR,_partial_:true,"
    "max_lr:0.01,total_steps:auto,interval:step}"
)


def optimizer_groups(path) -> list[dict]:
    return torch.load(path, weights_only=True)["optimizer_states"][0]["param_groups"]


@pytest.mark.slow
def test_a_new_learning_rate_is_applied_and_recorded(make_cfg, tmp_path):
    train(make_cfg("test=false", "callbacks.last_checkpoint.every_n_train_steps=1"))
    first = tmp_path / "first.ckpt"
    (tmp_path / "checkpoints" / "last.ckpt").rename(first)
    assert optimizer_groups(first)[0]["lr"] == 0.001
    cfg = make_cfg("test=false", f"ckpt_path={first}", "model.optimizer.lr=0.5")
    cfg.trainer.max_epochs = 2
    train(cfg)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 1 and state["optimizer_states"][0]["param_groups"][0]["lr"] == 0.5
    assert state["hyper_parameters"]["optimizer"]["lr"] == 0.5  # what is recorded is what ran


@pytest.mark.slow
def test_a_new_setting_under_an_lr_scheduler_is_refused_in_one_line(make_cfg, tmp_path):
    train(make_cfg("test=false", ONE_CYCLE))
    first = tmp_path / "first.ckpt"
    (tmp_path / "checkpoints" / "last.ckpt").rename(first)
    cfg = make_cfg(
        "test=false", f"ckpt_path={first}", ONE_CYCLE, "+model.optimizer.weight_decay=0.1"
    )
    cfg.trainer.max_epochs = 2
    with pytest.raises(ConfigError, match=r"weight_decay 0 -> 0.1.*lr scheduler"):
        train(cfg)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()  # nothing trained, nothing saved


@pytest.mark.slow
def test_a_new_batch_size_mid_epoch_is_refused_before_any_work(make_cfg, tmp_path):
    train(make_cfg("test=false", "trainer.max_steps=3"))  # stops after 3 of the epoch's 5 batches
    middle = tmp_path / "middle.ckpt"
    (tmp_path / "checkpoints" / "last.ckpt").rename(middle)
    progress = torch.load(middle, weights_only=True)["loops"]["fit_loop"]
    assert progress["epoch_loop.batch_progress"]["current"]["completed"] == 3
    cfg = make_cfg("test=false", f"ckpt_path={middle}", "data.batch_size=128")
    cfg.trainer.max_epochs = 2
    with pytest.raises(CheckpointError, match="after 3 batches of 64.*data.batch_size=64"):
        train(cfg)
    cfg = make_cfg("test=false", f"ckpt_path={middle}")
    cfg.trainer.max_epochs = 2
    train(cfg)  # the same batch size goes on
