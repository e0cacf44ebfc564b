"""logger=mlflow and logger=wandb: real runs (train(cfg)) read back through a real mlflow server
and from W&B's offline files; a resume continues the same tracked run; lists of loggers."""

import importlib.util
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import FAST, NO_FIGURES, SMALL_EVAL, _free_port, compose_train, need, spawn

from mnist_cnn.loggers import MLFlowLogger
from mnist_cnn.train import train
from mnist_cnn.validate import ConfigError


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@pytest.fixture
def mlflow():
    need(installed("mlflow"), "mlflow is not installed: pip install -e '.[mlflow]'")


@pytest.fixture
def wandb():
    need(installed("wandb"), "wandb is not installed: pip install -e '.[wandb]'")
    import wandb

    yield wandb
    wandb.finish()  # the process's run stays open after train() (as in a notebook)


@contextmanager
def mlflow_server(db: Path, workdir: Path):
    """``mlflow server`` on 127.0.0.1 with ``db`` as its store; yields its URL and process."""
    log = workdir / "mlflow_server.log"
    for _ in range(5):  # the port is free when picked; if another process takes it first: again
        port = _free_port()
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}"]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        with log.open("w") as out:  # its own process group: uvicorn runs as a child
            proc = subprocess.Popen(
                cmd, cwd=workdir, stdout=out, stderr=out, start_new_session=True
            )
        url = f"http://127.0.0.1:{port}"
        # uvicorn says so once it has bound the port: a /health answer before that could come
        # from another server on the port (one that makes this one fail to bind it)
        listening, deadline = f"Uvicorn running on {url}", time.monotonic() + 300
        taken = "address already in use"
        while listening not in (text := log.read_text()) and taken not in text:
            if proc.poll() is not None or time.monotonic() > deadline:
                text = log.read_text()
                break
            time.sleep(0.25)
        if listening in text and proc.poll() is None:
            break
        stop_server(proc)
        if taken not in text:
            pytest.fail(f"mlflow server did not start:\n{text[-3000:]}")
    else:
        pytest.fail(f"no free port in 5 tries:\n{log.read_text()[-3000:]}")
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=10).close()
                break
            except OSError:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.25)
        yield url, proc
    finally:
        stop_server(proc)


def stop_server(proc: subprocess.Popen) -> None:
    with suppress(ProcessLookupError):  # the group may be gone already
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def rest(url: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """A call to MLflow's REST API: POST ``body`` as JSON, else GET with ``query``."""
    address = f"{url}/api/2.0/mlflow/{endpoint}"
    if query:
        address += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(address, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


@pytest.mark.slow
def test_mlflow_run_and_its_resume_are_one_run_read_back_through_a_real_server(
    mlflow, make_cfg, tmp_path
):
    # Hydra's list of group options; the run's tags become MLflow tags
    first = train(make_cfg("logger=[tensorboard,mlflow]", "tags=[baseline,bn]", figures=True))
    run_id = (tmp_path / "mlflow_run_id.txt").read_text().strip()
    resumed = train(
        make_cfg("logger=[tensorboard,mlflow]", "resume=true", "trainer.max_epochs=2", figures=True)
    )
    assert (tmp_path / "mlflow_run_id.txt").read_text().strip() == run_id

    with mlflow_server(tmp_path / "mlflow.db", tmp_path) as (url, _):
        experiment = rest(url, "experiments/get-by-name", experiment_name="mnist_cnn")
        experiment_id = experiment["experiment"]["experiment_id"]
        runs = rest(url, "runs/search", {"experiment_ids": [experiment_id]})["runs"]
        run = rest(url, "runs/get", run_id=run_id)["run"]
        history = {
            key: rest(url, "metrics/get-history", run_id=run_id, metric_key=key)["metrics"]
            for key in ("val/acc", "test/acc")
        }
        listed = {
            folder: rest(url, "artifacts/list", run_id=run_id, path=folder).get("files", [])
            for folder in ("", "figures")
        }

    assert [r["info"]["run_id"] for r in runs] == [run_id]  # the resume made no second run
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == tmp_path.name
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["seed"] == "1" and params["data.batch_size"] == "64"
    assert params["model.optimizer.lr"] == "0.001" and params["model.net.hidden"] == "1024"
    assert params["trainer.limit_train_batches"] == "5" and params["logger.mlflow.run_dir"]
    assert params["trainer.max_epochs"] == "1"  # MLflow keeps a param's first value ...
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["resumed.trainer.max_epochs"] == "2"  # ... the resume's is a tag
    assert tags["run_dir"] == str(tmp_path.resolve())
    assert tags["baseline"] == tags["bn"] == "true"
    assert re.fullmatch("[0-9a-f]{40}", tags["mlflow.source.git.commit"])

    # per epoch, the values train() returned, in one history across the resume
    val = [(m["step"], m["value"]) for m in history["val/acc"]]
    assert [v for _, v in val] == pytest.approx([first["val/acc"], resumed["val/acc"]])
    assert val[0][0] < val[1][0]
    test = [m["value"] for m in history["test/acc"]]
    assert test == pytest.approx([first["test/acc"], resumed["test/acc"]])
    latest = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    for key in ("train/loss", "train/acc", "val/loss", "val/acc_best", "test/loss"):
        assert latest[key] == pytest.approx(resumed[key])

    files = {f["path"]: f for f in listed[""]}
    assert int(files["model.pt"]["file_size"]) == (tmp_path / "model.pt").stat().st_size
    figures = {f["path"] for f in listed["figures"]}
    assert figures == {f"figures/{p.name}" for p in (tmp_path / "figures").glob("*.png")}
    assert len(figures) == 3


@pytest.mark.slow
def test_runs_that_open_a_new_store_together_both_start(mlflow, tmp_path):
    """Jobs of a -m sweep on joblib: without a lock one failed creating mlflow.db's tables."""
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "__init__.py").touch()
    (tmp_path / "job" / "opens.py").write_text(
        "import sys\nfrom mnist_cnn.loggers import MLFlowLogger\n\n"
        "MLFlowLogger(sys.argv[1], tracking_uri=sys.argv[2]).experiment\n"
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    jobs = [
        spawn(
            "job.opens",  # python -m job.opens, in tmp_path
            *(str(tmp_path / f"job{i}"), uri),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    ids = {(tmp_path / f"job{i}" / "mlflow_run_id.txt").read_text() for i in range(2)}
    assert len(ids) == 2


def test_an_experiment_another_run_made_meanwhile_is_used(mlflow, tmp_path, monkeypatch):
    """On a tracking server (no lock across machines) two runs starting together may both find
    no experiment and both create it: the second one's "already exists" is no error."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert MLFlowLogger(tmp_path / "first", tracking_uri=uri).experiment  # makes the experiment
    second = MLFlowLogger(tmp_path / "second", tracking_uri=uri)
    monkeypatch.setattr(second.client, "get_experiment_by_name", lambda name: None)  # too early
    assert second.experiment.get_run(second.run_id).info.status == "RUNNING"


@pytest.mark.slow
def test_a_saved_mlflow_run_is_continued_else_a_new_one_starts(mlflow, tmp_path, caplog):
    """The run id kept in the run dir is Lightning's ``run_id``: the same run, RUNNING again;
    a run the store no longer holds is one warning and a new run; a deleted experiment, one line."""
    uri, run_dir = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "run"
    first = MLFlowLogger(run_dir, tracking_uri=uri)
    run_id = first.run_id
    first.finalize("success")
    assert first.experiment.get_run(run_id).info.status == "FINISHED"
    again = MLFlowLogger(run_dir, tracking_uri=uri)
    assert again.run_id == run_id and again.experiment.get_run(run_id).info.status == "RUNNING"

    again.experiment.delete_run(run_id)
    fresh = MLFlowLogger(run_dir, tracking_uri=uri)
    assert fresh.run_id not in (None, run_id)
    assert (run_dir / "mlflow_run_id.txt").read_text().strip() == fresh.run_id
    said = [r.getMessage() for r in caplog.records if "starting a new run" in r.getMessage()]
    assert len(said) == 1 and run_id in said[0] and uri in said[0], said

    fresh.experiment.delete_experiment(fresh.experiment_id)
    deleted = f"The MLflow experiment mnist_cnn is deleted in {uri}: name another"
    with pytest.raises(ConfigError, match=re.escape(deleted)):
        _ = MLFlowLogger(tmp_path / "other", tracking_uri=uri).experiment


def wandb_records(path: Path):
    """The protobuf records of a ``run-<id>.wandb`` file (LevelDB's log format, W&B's header)."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    pos, parts = header, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # the block's tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        parts += data[pos + header : pos + header + length]
        pos += header + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def offline_run(folder: Path, run_id: str, keys=()) -> tuple[list[dict], dict]:
    """The history rows and the config an offline run folder holds, once its history has
    ``keys`` (wandb's service process may still be writing the file after ``finish``)."""
    deadline = time.monotonic() + 60
    while True:
        rows, config = _offline_run(folder, run_id)
        if set(keys) <= {k for row in rows for k in row} or time.monotonic() > deadline:
            return rows, config
        time.sleep(0.5)


def _offline_run(folder: Path, run_id: str) -> tuple[list[dict], dict]:
    rows, config = [], {}
    for record in wandb_records(folder / f"run-{run_id}.wandb"):
        kind = record.WhichOneof("record_type")
        if kind == "history":  # a dict value (an image) comes as one item per nested key
            row: dict = {}
            for i in record.history.item:
                key, *inner = [i.key] if i.key else i.nested_key
                value = json.loads(i.value_json)
                if inner:
                    row.setdefault(key, {})[inner[-1]] = value
                else:
                    row[key] = value
            rows.append(row)
        elif kind in ("run", "config"):
            items = record.run.config.update if kind == "run" else record.config.update
            config |= {i.key: json.loads(i.value_json) for i in items}
    return rows, config


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics_and_a_resume_reuses_its_id(wandb, make_cfg, tmp_path):
    first = train(make_cfg("logger=wandb", "tags=[baseline,bn]", figures=True))
    run_id = (tmp_path / "wandb_run_id.txt").read_text().strip()
    resumed = train(make_cfg("logger=wandb", "resume=true", "trainer.max_epochs=2", figures=True))
    wandb.finish()
    assert (tmp_path / "wandb_run_id.txt").read_text().strip() == run_id

    folders = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(folders) == 2  # one per start, both the same run (wandb sync uploads them in turn)
    records = wandb_records(folders[0] / f"run-{run_id}.wandb")
    runs = [r.run for r in records if r.HasField("run")]
    assert runs and list(runs[0].tags) == ["baseline", "bn"]  # the run's tags
    for folder, metrics, epochs in zip(folders, (first, resumed), (1, 2), strict=True):
        keys = ("train/loss", "train/acc", "val/acc", "val/loss", "test/acc", "test/loss")
        rows, config = offline_run(folder, run_id, keys)
        last = {k: v for row in rows for k, v in row.items()}  # each key's last value
        for key in keys:
            assert last[key] == pytest.approx(metrics[key])
        assert config["trainer"]["max_epochs"] == epochs  # the composed config
        assert config["data"]["batch_size"] == 64
        for name in ("learning_curves", "predictions", "confusion_matrix"):  # as images
            (image,) = last[f"figures/{name}"]["filenames"]
            assert (folder / "files" / image).stat().st_size > 0
        assert (folder / "files" / "model.pt").stat().st_size == (
            tmp_path / "model.pt"
        ).stat().st_size
    steps = [
        [row["trainer/global_step"] for row in offline_run(f, run_id)[0] if "val/acc" in row]
        for f in folders
    ]
    assert steps[0][-1] < steps[1][0]  # the resume goes on from the first start's step


@pytest.mark.slow
@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_missing_tracker_package_names_the_extra_to_install(tracker, make_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, tracker, None)  # import fails, as if not installed
    fix = f"logger={tracker} needs the {tracker} package: pip install -e '.[{tracker}]'"
    with pytest.raises(ConfigError, match=re.escape(fix)):
        train(make_cfg(f"logger=[tensorboard,{tracker}]"))


@pytest.mark.slow
def test_the_command_line_says_it_in_one_line_and_exits_2(tmp_path, data_dir):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\n\nsys.modules['mlflow'] = None\n")
    path = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(  # a new interpreter: sitecustomize runs as it starts
        [sys.executable, "-m", "mnist_cnn.train", *FAST, "logger=[tensorboard,mlflow]"]
        + [f"paths.log_dir={tmp_path}", f"data.data_dir={data_dir}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": path},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out
    (line,) = [line for line in out.splitlines() if "needs the mlflow package" in line]
    assert line.endswith("logger=mlflow needs the mlflow package: pip install -e '.[mlflow]'")


def test_logger_all_and_lists_compose():
    where = "paths.output_dir=."
    assert list(compose_train("logger=all", where).logger) == ["tensorboard", "csv"]  # no extra
    both = compose_train("logger=[tensorboard,mlflow,wandb]", where).logger
    assert list(both) == ["tensorboard", "mlflow", "wandb"]
    assert both.mlflow.tracking_uri == f"sqlite:///{compose_train(where).paths.log_dir}/mlflow.db"
    assert both.wandb.mode == "offline"


@pytest.mark.slow
def test_an_unreachable_mlflow_is_one_warning_and_the_training_goes_on(mlflow, make_cfg, caplog):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    tracked = ["logger=[tensorboard,mlflow]", f"logger.mlflow.tracking_uri={uri}"]
    metrics = train(make_cfg(*tracked))
    assert {"val/acc", "test/acc"} <= metrics.keys()
    said = [r.getMessage() for r in caplog.records if "failed while" in r.getMessage()]
    assert len(said) == 1 and uri in said[0] and "training goes on" in said[0], said

    with pytest.raises(ConfigError, match="on_error=stop asks: once it is back, run the same"):
        train(make_cfg(*tracked, "logger.mlflow.on_error=stop"))


class HoldAtEpoch2(L.Callback):
    """Writes ``<dir>/<name>.ready`` as epoch 2 starts (epoch 1 logged), then waits for
    ``<dir>/go``: the test stops the server in between."""

    def __init__(self, dir: str, name: str):
        self.dir, self.name = Path(dir), name

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            (self.dir / f"{self.name}.ready").touch()
            deadline = time.monotonic() + 600
            while not (self.dir / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.05)


@pytest.mark.slow
def test_an_mlflow_server_that_dies_mid_run_leaves_the_training_running(mlflow, tmp_path, data_dir):
    # two runs log epoch 1 to one server, which dies before their epoch 2: on_error=continue
    # trains on, on_error=stop stops at epoch 2's metrics
    args = [f"paths.log_dir={tmp_path}", f"data.data_dir={data_dir}", "trainer.max_epochs=2"]
    args += ["trainer.limit_train_batches=10", "trainer.limit_val_batches=2"]
    args += ["trainer.limit_test_batches=2", "trainer.accelerator=cpu"]
    args += ["callbacks.progress_bar.refresh_rate=0", "logger=[tensorboard,mlflow]"]
    args += [NO_FIGURES, SMALL_EVAL]
    env = os.environ | {"PYTHONPATH": os.path.dirname(__file__)}  # test_loggers.HoldAtEpoch2
    procs, logs = {}, {e: tmp_path / f"{e}.out" for e in ("continue", "stop")}
    with mlflow_server(tmp_path / "mlflow.db", tmp_path) as (url, server):
        for on_error, log in logs.items():
            hold = f"{{_target_: test_loggers.HoldAtEpoch2, dir: {tmp_path}, name: {on_error}}}"
            mine = [f"paths.output_dir={tmp_path / on_error}", f"logger.mlflow.on_error={on_error}"]
            mine += [f"logger.mlflow.tracking_uri={url}", f"+callbacks.hold={hold}"]
            with log.open("w") as out:
                procs[on_error] = spawn(
                    "train",
                    *args,
                    *mine,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=tmp_path,
                    env=env,
                )
        deadline = time.monotonic() + 600
        while not all((tmp_path / f"{e}.ready").exists() for e in logs):
            for e, proc in procs.items():
                assert proc.poll() is None, logs[e].read_text()[-3000:]
            assert time.monotonic() < deadline, "epoch 1 did not end"
            time.sleep(0.1)
        os.killpg(server.pid, signal.SIGKILL)  # all of it: a SIGTERM'd uvicorn still answers
        server.wait()  # on the connections it keeps alive
    (tmp_path / "go").touch()
    for on_error, code in (("continue", 0), ("stop", 2)):
        procs[on_error].wait(timeout=600)
        out, run = logs[on_error].read_text(), tmp_path / on_error
        assert procs[on_error].returncode == code and "Traceback" not in out, out[-3000:]
        assert out.count("failed while logging metrics") == 1, out[-3000:]
        state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        if on_error == "continue":  # both epochs, then the test
            assert state["epoch"] == 1 and "test accuracy" in out
        else:  # stopped at epoch 2's metrics, last.ckpt saved and the resume named
            assert f"resume={run} continues from last.ckpt" in out and state["global_step"] >= 10
