"""The recipes (experiment=fast, experiment=best) and the compute switches, on a few batches."""

from itertools import islice

import lightning as L
import pytest
import torch
from conftest import compose_train
from hydra.utils import instantiate

from mnist_cnn import fast_precision
from mnist_cnn.checkpoint import load_model
from mnist_cnn.data import MNISTDataModule
from mnist_cnn.module import Classifier, random_affine
from mnist_cnn.train import train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_default_recipe_keeps_the_notebooks_model_and_training():
    cfg = compose_train()
    assert cfg.model.net == {
        "_target_": "mnist_cnn.model.build_cnn",
        "channels": [32, 64],
        "kernel_size": 5,
        "hidden": 1024,
        "dropout": 0.5,
        "batch_norm": False,
        "batch_norm_fc": False,
    }
    assert cfg.model.optimizer.lr == 0.001 and cfg.model.optimizer._target_ == "torch.optim.Adam"
    assert cfg.model.scheduler is None and not cfg.model.augment
    assert cfg.data.batch_size == 64 and cfg.trainer.precision == fast_precision("auto")


def test_default_precision_is_bf16_only_where_the_chip_computes_bf16():
    cpu_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert fast_precision("cpu") == ("bf16-mixed" if cpu_bf16 else "32-true")
    assert fast_precision("mps") == "32-true"
    assert compose_train("trainer.accelerator=cpu").trainer.precision == fast_precision("cpu")
    assert compose_train("trainer.precision=32-true").trainer.precision == "32-true"
    for recipe in ("seed", "best"):  # the notebook's float32; best was measured in float32
        assert compose_train(f"experiment={recipe}").trainer.precision == "32-true"
    if torch.cuda.is_available():
        gpu_bf16 = torch.cuda.is_bf16_supported()
        assert fast_precision("gpu") == ("bf16-mixed" if gpu_bf16 else "32-true")


def test_fast_and_best_compose_as_one_cycle_recipes_of_the_same_network():
    fast, best = compose_train("experiment=fast"), compose_train("experiment=best")
    for cfg in (fast, best):
        assert cfg.model.net.channels == [32, 64] and cfg.model.net.hidden == 1024
        assert cfg.model.net.batch_norm
        assert cfg.model.scheduler._target_ == "torch.optim.lr_scheduler.OneCycleLR"
        assert cfg.model.scheduler.max_lr == cfg.model.optimizer.lr
    assert fast.trainer.max_epochs == 1 and "ema" not in fast.callbacks
    assert fast.model.net.batch_norm_fc and fast.model.label_smoothing == 0.1
    assert best.model.net.dropout == 0.5 and not best.model.net.batch_norm_fc
    assert best.model.augment.degrees > 0 and best.callbacks.ema._target_ == "mnist_cnn.module.EMA"
    assert best.callbacks.model_checkpoint.monitor == "val/acc"  # chosen on validation only


@pytest.mark.slow
def test_fast_recipe_trains_with_a_per_step_one_cycle_schedule(make_cfg, tmp_path):
    metrics = train(make_cfg("experiment=fast", "logger=csv"))
    assert {"test/acc", "test/loss"} <= metrics.keys()  # fit, then the test
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    (scheduler,) = state["lr_schedulers"]
    assert scheduler["total_steps"] == 5 and scheduler["last_epoch"] == 5  # stepped every batch


@pytest.mark.slow
def test_best_recipe_runs_as_a_few_batch_debug_run(make_cfg, tmp_path):
    metrics = train(make_cfg("experiment=best"))  # 5 steps: 20% warm-up is one step
    assert {"test/acc", "test/loss"} <= metrics.keys()  # fit, then the test
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    (scheduler,) = state["lr_schedulers"]
    assert scheduler["total_steps"] == 6 and scheduler["last_epoch"] == 5


@pytest.mark.slow
def test_best_recipe_tests_the_ema_weights_of_the_best_checkpoint(make_cfg, tmp_path, data_dir):
    cfg = make_cfg("experiment=best", "trainer.limit_train_batches=10")
    eval_batch_size = cfg.data.eval_batch_size
    metrics = train(cfg)
    (best,) = (tmp_path / "checkpoints").glob("epoch*.ckpt")
    state = torch.load(best, weights_only=True)
    ema, raw = state["state_dict"], state["current_model_state"]
    assert not torch.equal(ema["net.fc1.weight"], raw["net.fc1.weight"])

    model = load_model(best)  # the checkpoint's state_dict: the EMA weights
    dm = MNISTDataModule(str(data_dir), eval_batch_size=eval_batch_size)
    dm.setup("test")
    with torch.no_grad():
        for batch in islice(dm.test_dataloader(), 2):  # the run tested 2 batches
            x, y = dm.on_after_batch_transfer(batch, 0)
            model.test_metrics["acc"].update(model(x), y)
    assert model.test_metrics["acc"].compute().item() == pytest.approx(
        metrics["test/acc"], abs=1e-6
    )


def test_random_affine_draws_per_image_and_is_the_identity_at_zero():
    x = torch.rand(6, 1, 28, 28)
    assert torch.allclose(random_affine(x), x, atol=1e-5)
    same = x[:1].expand(6, 1, 28, 28).contiguous()
    moved = random_affine(same, degrees=10, translate=0.1, scale=0.1)
    assert moved.shape == same.shape and not torch.allclose(moved[0], moved[1])


def test_augment_applies_to_training_steps(make_cfg):
    x, y = torch.rand(4, 1, 28, 28), torch.arange(4)
    net = {"_target_": "mnist_cnn.model.build_cnn", "dropout": 0.0}  # only augment is random
    plain = Classifier(net=net)
    augmented = Classifier(net=net, augment={"degrees": 10, "translate": 0.2})
    augmented.load_state_dict(plain.state_dict())
    expected = plain.criterion(plain(x), y)
    assert torch.allclose(plain.training_step((x, y), 0), expected)
    assert not torch.allclose(augmented.training_step((x, y), 0), expected)


def test_fused_adam_and_channels_last_are_config_switches(make_cfg):
    for on in (True, False):
        cfg = make_cfg(f"model.optimizer.fused={on}", f"model.channels_last={on}")
        module = instantiate(cfg.model, _recursive_=False)
        assert module.configure_optimizers().defaults["fused"] is on
        assert module.net.conv2.weight.is_contiguous(memory_format=torch.channels_last) is on
        assert module(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@cuda
def test_on_device_batches_never_leave_the_gpu(make_cfg):
    cfg = make_cfg("trainer.accelerator=gpu", "data.on_device=true")
    seen = []

    class Spy(MNISTDataModule):
        def on_after_batch_transfer(self, batch, dataloader_idx):
            seen.append(batch[0].device.type)
            return super().on_after_batch_transfer(batch, dataloader_idx)

    dm = Spy(**{k: v for k, v in cfg.data.items() if k != "_target_"})
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(instantiate(cfg.model, _recursive_=False), datamodule=dm)
    assert dm.train_set.images.device.type == "cuda" and set(seen) == {"cuda"}


@cuda
def test_bf16_mixed_on_gpu_trains_and_tests(make_cfg):
    metrics = train(make_cfg("trainer.accelerator=gpu", "trainer.precision=bf16-mixed"))
    assert {"test/acc", "test/loss"} <= metrics.keys() and metrics["train/loss"] > 0
