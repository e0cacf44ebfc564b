"""One model on two "nodes": the README's two ``torchrun --nnodes=2`` commands on 127.0.0.1 train
over gloo; one run dir, one writer, the same weights on both, a dead node stops the other."""

import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import yaml
from conftest import NO_FIGURES, _free_port, need, val_acc_twice

from mnist_cnn import ROOT
from mnist_cnn.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


class WeightsDigest(L.Callback):
    """Writes this rank's weights digest to ``<dir>/weights_<rank>.txt`` when fit ends."""

    def __init__(self, dir: str):
        self.dir = dir

    def on_fit_end(self, trainer, pl_module) -> None:
        digest = hashlib.sha256()
        for value in pl_module.state_dict().values():
            digest.update(value.detach().cpu().numpy().tobytes())
        Path(self.dir, f"weights_{trainer.global_rank}.txt").write_text(digest.hexdigest())


def node(rank: int, port: int, out: Path, *overrides: str) -> subprocess.Popen:
    """Node ``rank``'s command from the README, on a free port, with ``overrides``."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    need(torchrun is not None, "torchrun is not beside this python: pip install torch")
    readme = (ROOT / "README.md").read_text().splitlines()
    (line,) = [x for x in readme if x.startswith("torchrun ") and f"-rank={rank} " in x]
    cmd = [torchrun, *shlex.split(line)[1:], *overrides]
    cmd = [f"--master-port={port}" if a.startswith("--master-port=") else a for a in cmd]
    env = os.environ | {"PYTHONPATH": os.path.dirname(__file__)}  # test_multinode.WeightsDigest
    with (out / f"node{rank}.out").open("a") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def kill_node(agent: subprocess.Popen) -> None:
    """The machine is gone: torchrun's agent and its worker, with no chance to clean up."""
    children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
    for pid in [agent.pid, *map(int, children)]:
        os.kill(pid, signal.SIGKILL)
    agent.wait()


def test_two_nodes_train_one_model_in_one_run_dir_and_resume_after_a_node_dies(tmp_path, data_dir):
    args = [
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=30",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "trainer.num_sanity_val_steps=0",
        "callbacks.progress_bar.refresh_rate=0",
        "callbacks.last_checkpoint.every_n_seconds=3600",  # last.ckpt at epoch ends
        NO_FIGURES,
        f"paths.log_dir={tmp_path}",
        f"data.data_dir={data_dir}",
        f"+callbacks.digest={{_target_: test_multinode.WeightsDigest, dir: {tmp_path}}}",
    ]
    # node 1 dies in epoch 2: node 0 stops with one line, epoch 1's last.ckpt is kept
    port = _free_port()
    nodes = [node(r, port, tmp_path, *args) for r in (0, 1)]
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("runs/*/checkpoints/last.ckpt")):
        assert all(n.poll() is None for n in nodes), (tmp_path / "node0.out").read_text()[-3000:]
        assert time.monotonic() < deadline, "epoch 1 did not end"
        time.sleep(0.1)
    kill_node(nodes[1])
    assert nodes[0].wait(timeout=120) != 0
    out0 = (tmp_path / "node0.out").read_text()
    (run,) = (tmp_path / "runs").iterdir()  # node 1 wrote in node 0's run dir, made none
    # gloo's words for the lost peer vary ("Connection closed", "... reset by peer"), and its
    # torchrun agent may stop rank 0 with SIGTERM first: one line and the resume command either way
    said = re.search(
        r"Rank 0 lost the other processes of this run at step \d+ \(|Stopped by SIGTERM", out0
    )
    assert said, out0[-3000:]
    assert f"Resume with: python -m mnist_cnn.train resume={run}" in out0, out0[-3000:]
    assert "Traceback" not in out0.split(said[0])[0][-2000:]

    # both nodes resume: epoch 2 only, in the same dir
    port = _free_port()
    nodes = [node(r, port, tmp_path, *args, f"resume={run}") for r in (0, 1)]
    for rank, n in enumerate(nodes):
        assert n.wait(timeout=300) == 0, (tmp_path / f"node{rank}.out").read_text()[-3000:]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.name]
    log = (run / "train.log").read_text()
    assert log.count("epoch 1/2 |") == 1 and log.count("epoch 2/2 |") == 1
    assert log.count("test accuracy") == 1  # one writer: rank 1 logs to its own file
    assert (run / "train_ddp_process_1.log").exists()
    assert len(yaml.safe_load((run / "run_info.yaml").read_text())) == 2  # start, resume
    checkpoints = run / "checkpoints"
    best = [p for p in checkpoints.iterdir() if p.name != "last.ckpt"]
    assert len(best) == 1 and load_checkpoint(checkpoints / "last.ckpt")["global_step"] == 60
    digests = {p.read_text() for p in tmp_path.glob("weights_*.txt")}
    assert len(list(tmp_path.glob("weights_*.txt"))) == 2 and len(digests) == 1  # same weights

    # val/acc is over both ranks' shards: 2 batches of 1000 each, the first 4000 images
    score, recomputed = val_acc_twice(best[0], best[0], data_dir)
    assert score == recomputed
