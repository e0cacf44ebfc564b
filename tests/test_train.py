"""train(cfg) end to end with the real Trainer on a few CPU batches."""

import lightning as L
import pytest
import torch
from conftest import finish, start
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_cnn.module import Classifier
from mnist_cnn.train import train


def scalars(tb_dir, tag):
    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


@pytest.mark.slow
def test_train_writes_checkpoints_and_tensorboard_and_returns_test_metrics(make_cfg, tmp_path):
    metrics = train(make_cfg("trainer.max_epochs=2"))
    assert metrics["test/acc"] > 0.2 and metrics["test/loss"] > 0  # chance is 0.1
    assert {"train/acc", "val/acc", "val/acc_best"} <= metrics.keys()

    ckpts = tmp_path / "checkpoints"
    best = [p for p in ckpts.glob("epoch*.ckpt")]
    assert (ckpts / "last.ckpt").exists() and len(best) == 1
    for tag in ("train/acc", "train/loss", "val/acc", "val/loss"):
        assert len(scalars(tmp_path / "tensorboard", tag)) == 2, tag  # one per epoch

    state = torch.load(ckpts / "last.ckpt", weights_only=True)  # plain types only
    assert state["epoch"] == 1 and state["hyper_parameters"]["optimizer"]["lr"] == 0.001
    model = Classifier.load_from_checkpoint(best[0], map_location="cpu")
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


class LossSpy(L.Callback):
    """Keeps every training step's loss (``+callbacks.spy._target_=test_train.LossSpy``)."""

    losses: list[list[float]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        LossSpy.losses.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        LossSpy.losses[-1].append(float(outputs["loss"]))


@pytest.mark.slow
def test_train_metrics_are_logged_once_per_epoch_over_all_its_batches(make_cfg, tmp_path):
    LossSpy.losses = []
    train(make_cfg("trainer.max_epochs=2", "+callbacks.spy._target_=test_train.LossSpy"))
    assert [len(epoch) for epoch in LossSpy.losses] == [5, 5]  # debug=fast: 5 batches of 64
    logged = scalars(tmp_path / "tensorboard", "train/loss")
    expected = [sum(epoch) / len(epoch) for epoch in LossSpy.losses]
    assert logged == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_resume_from_last_ckpt_continues_the_epoch_count(make_cfg, tmp_path):
    train(make_cfg("trainer.max_epochs=1", "test=false"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0
    first_step = torch.load(last, weights_only=True)["global_step"]

    train(make_cfg("trainer.max_epochs=2", f"ckpt_path={last}", "test=false"))
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 2 * first_step
    history = state["callbacks"]["EpochSummary"]["history"]
    assert [row["epoch"] for row in history] == [1, 2]


@pytest.mark.slow
def test_a_checkpoint_that_cannot_continue_is_refused_with_what_to_pass(
    make_cfg, tmp_path, data_dir
):
    from mnist_cnn.checkpoint import CheckpointError, epochs_done

    train(make_cfg("trainer.max_epochs=2", "test=false"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert epochs_done(torch.load(last, weights_only=True)) == 2
    for epochs in (1, 2):  # Lightning raised on 1 and trained nothing on 2
        with pytest.raises(CheckpointError, match="already trained 2 epochs.*max_epochs=3 or more"):
            train(make_cfg(f"trainer.max_epochs={epochs}", f"ckpt_path={last}"))
    with pytest.raises(CheckpointError, match="more than trainer.max_epochs=1.*max_epochs=2 or"):
        train(make_cfg("trainer.max_epochs=1", "resume=true"))
    with pytest.raises(CheckpointError, match=r"do not fit .*fc1.*model.net=\{.*'hidden': 1024"):
        train(make_cfg("trainer.max_epochs=3", f"ckpt_path={last}", "model.net.hidden=16"))
    # both refused before any work: the checkpoint is as it was
    assert epochs_done(torch.load(last, weights_only=True)) == 2
    # the CLI says it in one paragraph, exit 2, before Hydra makes a run dir
    code, out = finish(start(tmp_path, data_dir, f"ckpt_path={last}", "trainer.max_epochs=2"))
    assert code == 2 and "Traceback" not in out and "Nothing to train from" in out, out[-3000:]
    assert not (tmp_path / "runs").exists()
    # resume=true at its own end only runs the test (what a stop during the test needs)
    assert "test/acc" in train(make_cfg("trainer.max_epochs=2", "resume=true"))


@pytest.mark.parametrize(
    "override, words",
    [
        ("trainer.limit_train_batches=-1", "Cannot build trainer from the config: .*-1"),
        ("model.optimizer._target_=torch.optim.Nope", "Cannot build model .*torch.optim.Nope"),
        ("+callbacks.x._target_=nowhere.X", "Cannot build callbacks .*nowhere"),
    ],
)
def test_a_config_its_classes_refuse_is_a_config_error_before_any_work(
    make_cfg, tmp_path, override, words
):
    from mnist_cnn.validate import ConfigError

    with pytest.raises(ConfigError, match=words):
        train(make_cfg(override))
    assert list(tmp_path.iterdir()) == []  # no run_info.yaml, no checkpoints


@pytest.mark.slow
def test_load_model_reads_a_real_checkpoint_and_refuses_other_files(make_cfg, tmp_path):
    from mnist_cnn.checkpoint import CheckpointError, load_model

    train(make_cfg("test=false"))
    model = load_model(tmp_path / "checkpoints" / "last.ckpt")
    assert not model.training and model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    for path in (bogus, tmp_path / "missing.ckpt"):
        with pytest.raises(CheckpointError, match="ckpt_path="):
            load_model(path)
