"""Every option of every config group composes and instantiates."""

import hydra
import pytest
import torch
from conftest import compose_train
from omegaconf import OmegaConf

from mnist_cnn import CONFIG_DIR
from mnist_cnn.train import instantiate_group

GROUPS = [
    "data",
    "model",
    "model/net",
    "trainer",
    "callbacks",
    "logger",
    "paths",
    "experiment",
    "debug",
]
OPTIONS = [
    f"{group}={path.stem}"
    for group in GROUPS
    for path in sorted((CONFIG_DIR / group).glob("*.yaml"))
    if not (
        group == "callbacks" and path.stem in ("model_checkpoint", "epoch_summary", "progress_bar")
    )
]


def test_every_group_has_options():
    assert {o.split("=")[0] for o in OPTIONS} == set(GROUPS)


TRACKERS = ("logger=mlflow", "logger=wandb", "logger=all")  # seconds each to import and start


@pytest.mark.parametrize(
    "option", [pytest.param(o, marks=pytest.mark.slow) if o in TRACKERS else o for o in OPTIONS]
)
def test_option_composes_and_instantiates(option, tmp_path):
    if option == "trainer=gpu" and not torch.cuda.is_available():
        cfg = compose_train(option, f"paths.output_dir={tmp_path}")
        assert cfg.trainer.accelerator == "gpu"
        pytest.skip("instantiating trainer=gpu needs CUDA")
    folder = [f"data.data_dir={tmp_path}"] if option == "data=image_folder" else []
    cfg = compose_train(option, f"paths.output_dir={tmp_path}", *folder)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.model, _recursive_=False)
    if cfg.model.scheduler is None:
        module.configure_optimizers()
    else:  # needs a fitting trainer (total steps); test_recipes.py runs those for real
        assert hydra.utils.get_class(cfg.model.scheduler._target_)
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=instantiate_group(cfg.get("callbacks")),
        logger=instantiate_group(cfg.get("logger")) or False,
    )
    assert trainer.max_epochs == cfg.trainer.max_epochs


def test_callbacks_none_leaves_the_trainer_with_no_callbacks(tmp_path):
    cfg = compose_train("callbacks=none", f"paths.output_dir={tmp_path}")
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=instantiate_group(cfg.callbacks))
    assert trainer.callbacks == [] and trainer.checkpoint_callback is None
    timer = "+callbacks.timer={_target_: lightning.pytorch.callbacks.Timer}"
    cfg = compose_train("callbacks=none", timer, f"paths.output_dir={tmp_path}")
    assert [type(c).__name__ for c in instantiate_group(cfg.callbacks)] == ["Timer"]


def test_defaults_are_the_notebooks():
    cfg = compose_train("paths.output_dir=.")
    assert cfg.data.batch_size == 64 and cfg.seed == 1
    assert cfg.model.optimizer._target_ == "torch.optim.Adam" and cfg.model.optimizer.lr == 0.001
    assert cfg.model.net.dropout == 0.5 and cfg.trainer.max_epochs == 20
    assert cfg.trainer.accelerator == "auto"
    seed = compose_train("experiment=seed", "paths.output_dir=.")
    assert seed.trainer.max_epochs == 200 and seed.data.loader == "torchvision"
    assert seed.trainer.precision == "32-true" and not seed.model.channels_last
    assert not seed.model.optimizer.fused


def test_data_dir_follows_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("MNIST_DATA_DIR", str(tmp_path))
    assert compose_train("paths.output_dir=.").data.data_dir == str(tmp_path)
