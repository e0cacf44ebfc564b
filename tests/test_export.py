"""model.pt (weights without Lightning) from a real run, and python -m mnist_cnn.export to ONNX."""

import os
import shutil

import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import cli, compose_train, tiny_cfg
from torchvision.datasets import MNIST

from mnist_cnn import export as exporter
from mnist_cnn.checkpoint import load_model
from mnist_cnn.export import load_weights
from mnist_cnn.train import train
from mnist_cnn.validate import ConfigError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    """A tiny run with a non-default network (batch norm, a narrower fc1)."""
    out = tmp_path_factory.mktemp("run")
    train(
        tiny_cfg(out, data_dir, "model.net.hidden=256", "model.net.batch_norm=true", "test=false")
    )
    (best,) = (out / "checkpoints").glob("epoch*.ckpt")
    return out, best


@pytest.fixture(scope="module")
def images(data_dir):
    return MNIST(str(data_dir), train=False).data[:64].unsqueeze(1).float() / 255


def export(*args, cwd):
    return cli("export", *args, cwd=cwd, code=None)


def test_each_run_writes_model_pt_that_loads_without_lightning(run, images):
    out, best = run
    weights = torch.load(out / "model.pt", weights_only=True)
    assert set(weights) == {"state_dict", "net", "classes", "channels", "image_size", "preprocess"}
    assert weights["net"]["hidden"] == 256 and weights["net"]["batch_norm"] is True
    assert weights["classes"] == [str(i) for i in range(10)] and weights["channels"] == 1
    net, info = load_weights(out / "model.pt")  # strict: every key, no extra
    assert info["image_size"] == 28
    lightning_net = load_model(best).net  # the best checkpoint's network
    for name, tensor in lightning_net.state_dict().items():
        assert torch.equal(weights["state_dict"][name], tensor), name
    with torch.no_grad():
        assert torch.allclose(net(images), lightning_net(images), atol=1e-6)


def test_export_onnx_matches_pytorch_in_onnxruntime_with_any_batch_size(run, images, tmp_path):
    _, best = run
    target = tmp_path / "mnist.onnx"
    proc = export(f"ckpt_path={best}", "format=onnx", f"output={target}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model = onnx.load(str(target))
    onnx.checker.check_model(model)
    (batch_dim, *_) = model.graph.input[0].type.tensor_type.shape.dim
    assert batch_dim.dim_param and not batch_dim.dim_value  # a symbolic (dynamic) batch

    net = load_model(best).net
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    for n in (1, 5, 64):
        x = images[:n]
        (got,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            expected = net(x)
        assert got.shape == (n, 10)
        assert abs(torch.from_numpy(got) - expected).max() < 1e-4
        assert torch.equal(torch.from_numpy(got).argmax(-1), expected.argmax(-1))


def test_export_pt_equals_the_runs_model_pt_and_bad_requests_exit_2(run, tmp_path):
    out, best = run
    target = tmp_path / "weights.pt"
    proc = export(f"ckpt_path={best}", "format=pt", f"output={target}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    mine, runs = (torch.load(p, weights_only=True) for p in (target, out / "model.pt"))
    assert mine["net"] == runs["net"] and mine["state_dict"].keys() == runs["state_dict"].keys()
    assert all(torch.equal(mine["state_dict"][k], v) for k, v in runs["state_dict"].items())

    for args, words in (
        ([f"ckpt_path={best}", "format=tflite"], "format=tflite"),
        (["format=onnx"], "ckpt_path is required"),
    ):
        proc = export(*args, cwd=tmp_path)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 2 and words in output and "Traceback" not in output, output


def test_export_never_overwrites_its_checkpoint_and_names_an_unwritable_output(run, tmp_path):
    _, best = run
    ckpt = tmp_path / "copy.pt"  # a checkpoint named .pt: format=pt's default output is itself
    shutil.copy(best, ckpt)
    original = ckpt.read_bytes()
    proc = export(f"ckpt_path={ckpt}", "format=pt", cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in output, output
    assert f"{ckpt} (by default" in output and "would replace the checkpoint" in output
    assert "output=other.pt" in output

    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    (tmp_path / "link.pt").symlink_to(ckpt)
    for fmt, out, words in (
        ("pt", ckpt, "would replace the checkpoint"),
        ("pt", tmp_path / "link.pt", "would replace the checkpoint"),  # a link to it
        ("pt", "/proc/m.pt", "Cannot write /proc/m.pt: No such file or directory."),
        ("pt", a_file / "m.pt", f"Cannot write {a_file}/m.pt: {a_file} is a file, not a folder."),
        ("pt", tmp_path, f"Cannot write {tmp_path}: it is a folder."),
        ("onnx", "/proc/m.onnx", "Cannot write /proc/m.onnx: No such file or directory."),
    ):
        cfg = compose_train(
            f"ckpt_path={ckpt}", f"format={fmt}", f"output={out}", config_name="export"
        )
        with pytest.raises(ConfigError) as err:
            exporter.export(cfg)
        assert words in str(err.value) and "output=" in str(err.value), str(err.value)
    assert ckpt.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["a_file", "copy.pt", "link.pt"]  # no partial file

    # another existing file is replaced, as cp would
    exporter.export(
        compose_train(f"ckpt_path={ckpt}", "format=pt", f"output={a_file}", config_name="export")
    )
    assert {"state_dict", "net"} <= torch.load(a_file, weights_only=True).keys()


def test_an_onnx_model_that_does_not_match_pytorch_is_not_written(run, tmp_path, monkeypatch):
    _, best = run
    monkeypatch.setattr(exporter, "ONNX_TOLERANCE", -1.0)  # any difference is too much
    target = tmp_path / "mnist.onnx"
    cfg = compose_train(
        f"ckpt_path={best}", "format=onnx", f"output={target}", config_name="export"
    )
    with pytest.raises(exporter.ExportError, match="differ from PyTorch's .* was not written"):
        exporter.export(cfg)
    assert os.listdir(tmp_path) == []  # neither the file nor its .partial
