"""notebooks/checkpoint.ipynb runs headless (nbclient) against a checkpoint made here."""

import nbformat
import pytest
from conftest import tiny_cfg
from nbclient import NotebookClient

from mnist_cnn import ROOT
from mnist_cnn.train import train

NOTEBOOK = ROOT / "notebooks" / "checkpoint.ipynb"


@pytest.fixture
def python3_kernel(tmp_path, monkeypatch):
    """A ``python3`` kernel that runs this interpreter (the venv), ahead of any user kernels."""
    from ipykernel.kernelspec import install

    install(kernel_name="python3", prefix=str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    return "python3"


def test_the_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_the_notebook_runs_against_a_fresh_checkpoint(
    python3_kernel, tmp_path, data_dir, monkeypatch
):
    out = tmp_path / "run"
    train(tiny_cfg(out, data_dir, "trainer.max_epochs=2", "test=false"))
    (best,) = (out / "checkpoints").glob("epoch*.ckpt")
    monkeypatch.setenv("MNIST_CKPT", str(best))
    monkeypatch.setenv("MNIST_DATA_DIR", str(data_dir))
    monkeypatch.setenv("MNIST_TEST_BATCHES", "2")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=python3_kernel,
        timeout=600,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working dir
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert str(best) in text and "test/acc" in text
    assert "Classifier (Sequential) mnist_cnn.data.MNISTDataModule 10 classes" in text
    assert "'epoch': 1" in text and "'epoch': 2" in text  # the two epochs of the history
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 3  # the 12-digit grid, the learning curves, the prepared images
