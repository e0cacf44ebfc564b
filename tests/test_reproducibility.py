"""Same config and seed, two real runs on CPU: bit-identical metrics and weights; each run dir
records what it takes to repeat it."""

import re
from importlib.metadata import version

import pytest
import torch
import yaml
from conftest import finish, start

from mnist_cnn import fast_precision, runinfo

pytestmark = pytest.mark.slow

ARGS = ["trainer.deterministic=true", "trainer.max_epochs=2", "trainer.limit_train_batches=5"]
ARGS += ["logger=csv", "seed=5"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, data_dir):
    """Two real runs of the same config and seed, started together: their dirs and outputs."""
    tmp = tmp_path_factory.mktemp("twins")
    procs = [start(tmp, data_dir, f"paths.log_dir={tmp / n}", *ARGS) for n in "ab"]
    outs = []
    for proc in procs:
        code, out = finish(proc)
        assert code == 0, out[-3000:]
        outs.append(out)
    (a,) = (tmp / "a" / "runs").iterdir()
    (b,) = (tmp / "b" / "runs").iterdir()
    return a, b, outs


def test_two_runs_with_the_same_config_and_seed_are_bit_identical(two_runs):
    a, b, outs = two_runs
    metrics = (a / "csv" / "metrics.csv").read_text()
    assert metrics == (b / "csv" / "metrics.csv").read_text()
    assert "val/acc" in metrics and "test/acc" in metrics
    test_line = re.compile(r"test accuracy [\d.]+, test loss [\d.]+")
    assert test_line.findall(outs[0]) == test_line.findall(outs[1]) != []
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.suffix in (".ckpt", ".pt", ".pth"))
    assert files == sorted(
        p.relative_to(b) for p in b.rglob("*") if p.suffix in (".ckpt", ".pt", ".pth")
    )
    assert any(f.name == "last.ckpt" for f in files)
    for name in files:  # every checkpoint and exported file: weights_only, bit-identical tensors
        sa = torch.load(a / name, map_location="cpu", weights_only=True)
        sb = torch.load(b / name, map_location="cpu", weights_only=True)
        weights = sa.get("state_dict", sa)
        for key, value in weights.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, sb.get("state_dict", sb)[key]), (name, key)


def test_each_run_dir_records_config_overrides_commit_versions_and_command(two_runs):
    run = two_runs[0]
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert config["seed"] == 5 and config["trainer"]["deterministic"] is True
    assert "trainer.deterministic=true" in yaml.safe_load(
        (run / ".hydra" / "overrides.yaml").read_text()
    )
    (info,) = yaml.safe_load((run / "run_info.yaml").read_text())
    assert "-m mnist_cnn.train" in info["command"] and "seed=5" in info["command"]
    assert info["versions"]["torch"] == version("torch") and info["versions"]["lightning"]
    # the config as it ran: Hydra's config.yaml keeps ${...}; here every value is resolved
    assert info["config"]["seed"] == 5 and info["config"]["paths"]["output_dir"] == str(run)
    assert info["config"]["trainer"]["precision"] == fast_precision("cpu")
    commit = runinfo._git("rev-parse", "HEAD")
    assert info["git"]["commit"] == commit
    if commit:  # a git checkout (CI clones one): the commit and whether the tree is dirty
        assert re.fullmatch(r"[0-9a-f]{40}", commit)
        assert info["git"]["dirty"] == (runinfo._git("status", "--porcelain") != "")
