"""resume=true: the newest run, its overrides, its dir; exact on CPU at an epoch boundary."""

import os
import re

import pytest
import torch
import yaml
from conftest import NO_FIGURES, SMALL_EVAL, cli, finish, start
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_cnn.runinfo import find_run
from mnist_cnn.train import train
from mnist_cnn.validate import ConfigCheck

EXACT = [
    "trainer.deterministic=true",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
]
EXACT += ["trainer.num_sanity_val_steps=2", "seed=3"]  # the sanity check must not shift the RNG
EXACT += [SMALL_EVAL, NO_FIGURES]


def scalars(tb_dir, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.mark.slow
def test_a_run_stopped_after_epoch_1_and_resumed_equals_an_uninterrupted_run(tmp_path, data_dir):
    whole, part = tmp_path / "whole", tmp_path / "part"
    uninterrupted = start(
        whole.parent, data_dir, f"paths.log_dir={whole}", *EXACT, "trainer.max_epochs=3"
    )
    stopped = start(part.parent, data_dir, f"paths.log_dir={part}", *EXACT, "trainer.max_epochs=1")
    assert finish(stopped)[0] == 0
    (run,) = (part / "runs").iterdir()
    hydra_files = {f.name: f.read_text() for f in (run / ".hydra").glob("*.yaml")}
    # a resume that fails its checks (weights of another network, no data) changes nothing
    for bad, words in (("model.net.hidden=32", "do not fit"), (f"data.data_dir={part}", "MNIST")):
        code, out = finish(start(part.parent, data_dir, f"resume={run}", bad))
        assert code == 2 and words in out and "Traceback" not in out, out[-3000:]
        assert {f.name: f.read_text() for f in (run / ".hydra").glob("*.yaml")} == hydra_files
        assert len(yaml.safe_load((run / "run_info.yaml").read_text())) == 1
    code, resumed_out = finish(
        start(part.parent, data_dir, f"resume={run}", "trainer.max_epochs=3")
    )
    assert code == 0, resumed_out[-3000:]
    assert "trainer.max_epochs=3" in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert not (run / ".hydra" / "pending").exists()
    code, whole_out = finish(uninterrupted)
    assert code == 0, whole_out[-3000:]
    assert [p.name for p in (part / "runs").iterdir()] == [run.name]  # continued in place
    (whole_run,) = (whole / "runs").iterdir()

    a = torch.load(whole_run / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert a["global_step"] == 12
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, weights in a["state_dict"].items():  # weight by weight, bit for bit
        assert torch.equal(weights, b["state_dict"][name]), name
    for sa, sb in zip(
        a["optimizer_states"][0]["state"].values(),
        b["optimizer_states"][0]["state"].values(),
        strict=True,
    ):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)

    def metrics(state):
        return [
            {k: v for k, v in r.items() if k != "seconds"}
            for r in state["callbacks"]["EpochSummary"]["history"]
        ]

    assert metrics(a) == metrics(b) and len(metrics(a)) == 3
    test_line = re.compile(r"test accuracy [\d.]+, test loss [\d.]+")
    assert test_line.findall(whole_out) == test_line.findall(resumed_out) != []
    for tag in ("val/acc", "val/loss", "train/loss"):  # one TensorBoard run, the same curves
        assert scalars(whole_run / "tensorboard", tag) == scalars(run / "tensorboard", tag), tag


def test_resume_true_picks_the_run_whose_last_ckpt_is_newest(tmp_path):
    for name, mtime in [("2026-01-02_run", 100), ("2026-01-01_run", 200), ("2026-01-03_run", 50)]:
        last = tmp_path / "runs" / name / "checkpoints" / "last.ckpt"
        last.parent.mkdir(parents=True)
        last.write_bytes(b"x")
        os.utime(last, (mtime, mtime))
    (tmp_path / "runs" / "2026-01-04_no_checkpoint").mkdir()
    assert find_run(tmp_path).name == "2026-01-01_run"
    assert find_run(tmp_path, tmp_path / "runs" / "2026-01-03_run").name == "2026-01-03_run"


@pytest.mark.slow
def test_resume_continues_with_the_old_overrides_and_the_new_ones_win(tmp_path, data_dir):
    here = f"paths.log_dir={tmp_path}"
    tiny = ["trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "test=false"]
    tiny += [f"data.data_dir={data_dir}", "callbacks.progress_bar.refresh_rate=0"]
    old = ["data.batch_size=32", "model.net.dropout=0.3", "trainer.max_epochs=1"]
    cli("train", here, *tiny, *old, cwd=tmp_path)
    (run,) = (tmp_path / "runs").iterdir()
    new_group = ["resume=true", "model/net=lenet5", "trainer.max_epochs=2"]
    refused = cli("train", here, *new_group, cwd=tmp_path, code=2)
    said = refused.stdout + refused.stderr
    assert "a resume keeps the run's groups" in said
    assert "Traceback" not in said
    cli("train", here, "resume=true", "trainer.max_epochs=2", cwd=tmp_path)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.name]  # its own dir
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert config["data"]["batch_size"] == 32 and config["model"]["net"]["dropout"] == 0.3
    assert config["trainer"]["max_epochs"] == 2 and config["trainer"]["limit_train_batches"] == 3
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert "trainer.max_epochs=2" in overrides and "trainer.max_epochs=1" not in overrides
    assert "model.net.dropout=0.3" in overrides and not (run / ".hydra" / "pending").exists()
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 1 and len(state["callbacks"]["EpochSummary"]["history"]) == 2


@pytest.mark.slow
def test_a_run_start_reads_its_checkpoint_once(make_cfg, tmp_path, monkeypatch):
    first = make_cfg("test=false")
    train(first)
    last = tmp_path / "checkpoints" / "last.ckpt"
    cfg = make_cfg("test=false", f"ckpt_path={last}", "trainer.max_epochs=2")
    cfg.paths.output_dir = cfg.paths.log_dir = str(tmp_path / "second")
    reads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(str(f)) or load(f, *a, **k))
    ConfigCheck().on_run_start(cfg)  # Hydra's callback, before the run dir
    train(cfg)  # the checks, the weights, then Lightning's fit: the same read
    assert reads.count(str(last)) == 1, reads  # (the export at fit end reads the best)
    again = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=True)
    assert again["epoch"] == 1 and again["global_step"] == 10
