"""A checkpoint of an earlier release (before checkpoints named their module): the tools read
its weights; training from it is one line naming the release that wrote it."""

import pytest
import torch
import yaml
from conftest import cli

from mnist_cnn.checkpoint import CheckpointError, load_model
from mnist_cnn.export import load_weights
from mnist_cnn.train import train

# the hyper-parameters a checkpoint of commit 68b7d5b held: the network's build_cnn arguments
# without a _target_, and no classes, channels, image size or datamodule
OLD_KEYS = ("net", "optimizer", "scheduler", "channels_last", "augment", "compile")


@pytest.fixture
def old_ckpt(make_cfg, tmp_path):
    """A real checkpoint of this release, written back in the layout of commit 68b7d5b, in a run
    dir whose run_info.yaml names that commit."""
    train(make_cfg("test=false"))
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    del state["mnist_cnn"]
    hp = state["hyper_parameters"]
    net = {k: v for k, v in hp["net"].items() if k != "_target_"}
    state["hyper_parameters"] = {k: hp[k] for k in OLD_KEYS} | {"net": net}
    state["state_dict"] = {  # the metric's state had another name
        k.replace("train_metrics.acc.", "train_acc."): v for k, v in state["state_dict"].items()
    }
    run = tmp_path / "old_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run_info.yaml").write_text(yaml.safe_dump([{"git": {"commit": "68b7d5b" + "0" * 33}}]))
    torch.save(state, run / "checkpoints" / "last.ckpt")
    return run / "checkpoints" / "last.ckpt", state


@pytest.mark.slow
def test_the_tools_read_an_older_checkpoints_weights(old_ckpt, tmp_path):
    path, state = old_ckpt
    assert any(k.startswith("train_acc.") for k in state["state_dict"])
    model = load_model(path)
    assert type(model).__name__ == "Classifier" and model.hparams.classes == list("0123456789")
    for key, value in state["state_dict"].items():
        if key.startswith("net."):
            assert torch.equal(model.state_dict()[key], value), key
    cli("export", f"ckpt_path={path}", "format=pt", cwd=tmp_path)  # was a KeyError traceback
    net, info = load_weights(path.with_suffix(".pt"))
    assert info["channels"] == 1 and type(net).__name__ == "Sequential"


@pytest.mark.slow
def test_training_from_an_older_checkpoint_names_the_release_in_one_line(old_ckpt, make_cfg):
    path, _ = old_ckpt
    cfg = make_cfg("test=false", f"ckpt_path={path}")
    cfg.trainer.max_epochs = 2
    with pytest.raises(CheckpointError, match="written by commit 68b7d5b.*Train from it with that"):
        train(cfg)
