"""A researcher's own LightningModule end to end, through the CLI with a --config-dir: a subclass
of ours with its own argument and loss (model=focal), and a module written from scratch
(model=tiny), both in tests/user_code/my_modules.py. Training, then eval, predict, export
(ONNX), serve and the notebook rebuild the user's class from the checkpoint alone; a bug in the
user's code keeps its file and line. Nothing inside the package is edited."""

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import lightning as L
import nbformat
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import cli, import_or_skip, spawn
from nbclient import NotebookClient
from omegaconf import OmegaConf
from PIL import Image
from torchvision.datasets import MNIST

from mnist_cnn import ROOT
from mnist_cnn.checkpoint import load_model
from mnist_cnn.train import train
from mnist_cnn.validate import ConfigError

USER_CODE = Path(__file__).parent / "user_code"
SMALL = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=40",
    "trainer.limit_val_batches=3",
    "trainer.limit_test_batches=3",
    "trainer.accelerator=cpu",
    "callbacks.progress_bar.refresh_rate=0",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """``{model option: (work dir, best checkpoint, training's output)}``: each module trained
    once through the CLI from a researcher's folder (a copy of tests/user_code)."""
    work = tmp_path_factory.mktemp("researcher")
    shutil.copytree(USER_CODE, work, dirs_exist_ok=True)
    runs = {}
    for option in ("focal", "tiny"):
        out = work / "outputs" / option
        args = ["--config-dir", "conf", f"model={option}", f"paths.data_dir={data_dir}"]
        proc = cli("train", *args, f"paths.log_dir={out}", *SMALL, cwd=work)
        (run,) = (out / "runs").iterdir()
        (best,) = (run / "checkpoints").glob("epoch*.ckpt")
        runs[option] = (work, best, proc.stdout + proc.stderr)
    return runs


def printed(text: str, name: str) -> float:
    return float(re.search(rf"{name} (\S+)", text)[1])


@pytest.mark.slow
@pytest.mark.parametrize("option", ["focal", "tiny"])
def test_the_checkpoint_names_the_users_module_and_eval_uses_its_loss(trained, option, data_dir):
    work, best, log = trained[option]
    state = torch.load(best, weights_only=True)  # the module's own save_hyperparameters too
    target = {"focal": "my_modules.FocalClassifier", "tiny": "my_modules.TinyModule"}[option]
    assert state["mnist_cnn"]["module"]["_target_"] == target

    sys.path.insert(0, str(work))  # as a notebook started in the researcher's folder
    try:
        model = load_model(best)
    finally:
        sys.path.remove(str(work))
    assert type(model).__module__ + "." + type(model).__name__ == target
    assert model.hparams.classes == [str(i) for i in range(10)]

    evaluated = cli("eval", f"ckpt_path={best}", "trainer.limit_test_batches=3", cwd=work)
    loss, acc = printed(evaluated.stdout, "test/loss"), printed(evaluated.stdout, "test/acc")
    # training tested the same checkpoint on the same batches: the same numbers
    trained_acc, trained_loss = map(
        float, re.search(r"test accuracy (\S+), test loss (\S+)", log).groups()
    )
    assert loss == pytest.approx(trained_loss, abs=1e-4) and acc == pytest.approx(
        trained_acc, abs=1e-4
    )
    if option == "focal":  # the user's loss, not our cross-entropy: focal is below it
        assert model.criterion.gamma == 2.0
        test = MNIST(str(data_dir), train=False)
        x, y = test.data[:3000, None], test.targets[:3000]  # the three test batches
        with torch.no_grad():
            ce = F.cross_entropy(model(x).float(), y).item()
        assert loss < ce - 1e-3, (loss, ce)


@pytest.mark.slow
@pytest.mark.parametrize("option", ["focal", "tiny"])
def test_predict_export_and_serve_rebuild_the_users_module(trained, option, data_dir):
    work, best, _ = trained[option]
    test = MNIST(str(data_dir), train=False)
    folder = work / f"my_test_{option}"  # a class-folder tree, as a user's test set
    for digit in (0, 1, 7):
        (folder / str(digit)).mkdir(parents=True)
        for i in (test.targets == digit).nonzero().flatten()[:4].tolist():
            Image.fromarray(test.data[i].numpy()).save(folder / str(digit) / f"{i}.png")
    predicted = cli("predict", f"ckpt_path={best}", f"inputs=[{folder}]", cwd=work)
    assert len(predicted.stdout.splitlines()) == 12
    summary = re.search(r"accuracy (\S+) \((\d+) of 12 images\)", predicted.stderr)
    assert summary, predicted.stderr
    per_class = re.findall(r"class (\d): \S+ \((\d+) of 4\)", predicted.stderr)
    assert [c for c, _ in per_class] == ["0", "1", "7"]
    assert sum(int(n) for _, n in per_class) == int(summary[2])
    assert float(summary[1]) == pytest.approx(int(summary[2]) / 12, abs=1e-4)

    onnx = work / f"{option}.onnx"
    exported = cli("export", f"ckpt_path={best}", f"output={onnx}", cwd=work)
    assert onnx.stat().st_size > 0 and "max abs diff" in exported.stdout

    import_or_skip("litserve", "the serve extra: pip install -e '.[serve]'")
    port = free_port()
    server = spawn(
        "serve",
        *(f"ckpt_path={best}", f"port={port}"),
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, "the server did not answer /health"
                time.sleep(0.5)
        png = next((folder / "7").iterdir()).read_bytes()
        request = urllib.request.Request(
            f"{url}/predict", png, headers={"Content-Type": "image/png"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.load(r)
        assert answer["classes"] == [str(i) for i in range(10)]
        assert answer["class"] == str(answer["index"]) and len(answer["probabilities"]) == 10
    finally:
        server.terminate()
        server.wait(timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("option", ["focal", "tiny"])
def test_the_notebook_loads_the_users_module(trained, option, data_dir, tmp_path, monkeypatch):
    from ipykernel.kernelspec import install

    work, best, _ = trained[option]
    install(kernel_name="python3", prefix=str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    monkeypatch.setenv("MNIST_CKPT", str(best))
    monkeypatch.setenv("MNIST_TEST_BATCHES", "2")
    monkeypatch.delenv("MNIST_CODE_DIR", raising=False)  # found from the run's run_info.yaml
    nb = nbformat.read(ROOT / "notebooks" / "checkpoint.ipynb", as_version=4)
    client = NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    name = {"focal": "FocalClassifier", "tiny": "TinyModule"}[option]
    assert f"{name} (Sequential) mnist_cnn.data.MNISTDataModule 10 classes" in text, text


@pytest.mark.slow
def test_a_bug_in_the_users_network_keeps_its_file_and_line(tmp_path, data_dir):
    (tmp_path / "conf" / "model" / "net").mkdir(parents=True)
    (tmp_path / "broken_nets.py").write_text(
        "from torch import nn\n\n\n"
        "class Broken(nn.Module):\n"
        "    def __init__(self, in_channels: int, num_classes: int):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(in_channels * 784, num_clases)\n"
    )
    (tmp_path / "conf" / "model" / "net" / "broken.yaml").write_text(
        "_target_: broken_nets.Broken\n"
    )
    args = ["--config-dir", "conf", "model/net=broken", f"paths.data_dir={data_dir}", "debug=fast"]
    proc = cli("train", *args, f"paths.log_dir={tmp_path / 'out'}", cwd=tmp_path, code=1)
    assert 'broken_nets.py", line 7, in __init__' in proc.stderr, proc.stderr[-3000:]
    assert "NameError: name 'num_clases' is not defined" in proc.stderr


@pytest.mark.slow
def test_tune_searches_the_users_own_argument_and_its_best_command_runs_as_printed(trained):
    work = trained["focal"][0]
    out = work / "outputs" / "tune"
    tiny = [
        *("trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"),
        *("trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0", "logger=none"),
        *("trainer.accelerator=cpu", "callbacks.progress_bar.refresh_rate=0"),
    ]
    gamma = "+search_space.gamma={key:model.gamma,type:float,low:0.5,high:3.0}"
    args = ["--config-dir", "conf", "model=focal", "model/net=small_bn", gamma, "tune.n_trials=1"]
    cli("tune", *args, f"paths.log_dir={out}", *tiny, cwd=work)
    best = yaml.safe_load((out / "tune" / "mnist_cnn" / "best.yaml").read_text())
    assert 0.5 <= best["params"]["model.gamma"] <= 3.0

    argv = shlex.split(best["command"])  # run as printed, from the researcher's folder
    assert argv[3] == "--config-dir" and "model/net=small_bn" in argv
    cli("train", *argv[3:], cwd=work)
    (run,) = (out / "runs").iterdir()
    module = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["mnist_cnn"]["module"]
    assert module["_target_"] == "my_modules.FocalClassifier"
    assert module["gamma"] == best["params"]["model.gamma"]
    assert module["net"]["_target_"] == "my_nets.SmallBNNet"


@pytest.mark.slow
def test_a_run_of_the_users_module_resumes_and_prints_a_resume_command_that_works(
    trained, tmp_path
):
    work, best, _ = trained["tiny"]
    run = tmp_path / "run"
    shutil.copytree(best.parents[1], run)
    (run / "checkpoints" / "last.ckpt").unlink()  # a stop in the first epoch: the best is older
    shutil.copy(best, run / "checkpoints" / "last.ckpt")
    resumed = cli(
        "train", "--config-dir", "conf", f"resume={run}", "trainer.max_epochs=2", cwd=work
    )
    assert "epoch 2/2" in resumed.stdout + resumed.stderr
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["mnist_cnn"]["module"]["_target_"] == "my_modules.TinyModule"
    assert state["epoch"] == 1 and state["hyper_parameters"]["hidden"] == [64]


BUGGY = """import lightning as L
from torchmetrics.classification import MulticlassAccuracy


class BadMetric(MulticlassAccuracy):
    def __init__(self, num_classes: int):
        super().__init__(num_classes=num_clases)


class BadCallback(L.Callback):
    def on_train_start(self, trainer, pl_module):
        raise RuntimeError("a bug in my callback")
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, line, error",
    [
        ("+model.metrics.bad={_target_:buggy.BadMetric}", 7, "NameError: name 'num_clases'"),
        ("+callbacks.bad={_target_:buggy.BadCallback}", 12, "RuntimeError: a bug in my callback"),
    ],
)
def test_a_bug_in_the_users_metric_or_callback_keeps_its_file_and_line(
    tmp_path, data_dir, override, line, error
):
    (tmp_path / "buggy.py").write_text(BUGGY)
    args = [
        override,
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={tmp_path / 'out'}",
        "debug=fast",
    ]
    proc = cli("train", *args, cwd=tmp_path, code=1)
    assert f'buggy.py", line {line}, in ' in proc.stderr and error in proc.stderr, proc.stderr[
        -3000:
    ]


@pytest.mark.slow
def test_the_notebook_on_rgb_images_in_class_order(tmp_path, data_dir, monkeypatch):
    """A user's RGB image folder whose test split is sorted by class: the grid draws across the
    classes, and the own-image cell draws and prepares in RGB."""
    from ipykernel.kernelspec import install

    train_set, test_set = MNIST(str(data_dir), train=True), MNIST(str(data_dir), train=False)
    for split, mnist, n in (("train", train_set, 60), ("test", test_set, 20)):
        for digit in (3, 5, 8):
            folder = tmp_path / "rgb" / split / str(digit)
            folder.mkdir(parents=True)
            for i in (mnist.targets == digit).nonzero().flatten()[:n].tolist():
                Image.fromarray(mnist.data[i].numpy()).convert("RGB").save(folder / f"{i}.png")
    args = ["data=image_folder", f"data.data_dir={tmp_path / 'rgb'}", "data.channels=3"]
    args += [f"paths.log_dir={tmp_path / 'out'}", "trainer.max_epochs=1", *SMALL[4:]]
    cli("train", *args, cwd=tmp_path)
    (run,) = (tmp_path / "out" / "runs").iterdir()
    (best,) = (run / "checkpoints").glob("epoch*.ckpt")

    install(kernel_name="python3", prefix=str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    monkeypatch.setenv("MNIST_CKPT", str(best))
    nb = nbformat.read(ROOT / "notebooks" / "checkpoint.ipynb", as_version=4)
    NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    shown = re.search(r"shown: (.+)", text)[1].split()
    assert len(shown) == 12 and len(set(shown)) >= 2, shown  # not the first class only
    assert "drawn in RGB, prepared as (3, 28, 28)" in text, text


class NoTestStep(L.LightningModule):
    """A module from scratch with no test_step (and no logged_metrics)."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(784, 10)

    def forward(self, x):
        return self.layer(x.float().flatten(1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/accuracy", (self(batch[0]).argmax(-1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def own_module(cfg, target: str):
    cfg.model = OmegaConf.create({"_target_": target})
    return cfg


def test_a_module_without_test_step_is_refused_before_any_work(make_cfg, tmp_path):
    cfg = own_module(make_cfg(), f"{__name__}.NoTestStep")
    with pytest.raises(ConfigError, match="has no test_step.*or pass test=false"):
        train(cfg)
    assert list(tmp_path.iterdir()) == []


def test_a_monitor_the_module_does_not_log_is_named_at_its_first_validation(make_cfg, tmp_path):
    cfg = own_module(
        make_cfg("test=false", "trainer.num_sanity_val_steps=1"), f"{__name__}.NoTestStep"
    )
    with pytest.raises(
        ConfigError, match=r"monitor=val/acc is not a metric the module NoTestStep .*val/accuracy"
    ):
        train(cfg)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()  # no training step was taken
