"""``python -m mnist_cnn.tune`` on a real PostgreSQL server: workers that share no file system
(each its own ``tune.dir``) search one study."""

import signal
import subprocess
import threading
import time

import optuna
import pytest
import yaml
from conftest import TINY, cli, spawn, tune_cfg

from mnist_cnn.tune import TuneError, open_study, retries, search_space, study_lock, tune

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def worker(tmp_path, data_dir, url: str, name: str, n_trials: int) -> list[str]:
    """The arguments of the ``tune`` one machine runs: the shared study, its own ``tune.dir``."""
    own = [f"paths.log_dir={tmp_path / name}", f"tune.dir={tmp_path / name / 'tune'}"]
    shared = [f"tune.storage={url}", "tune.study_name=across", f"tune.n_trials={n_trials}"]
    fast = ["tune.heartbeat_interval=1", "tune.grace_period=2"]  # a killed trial fails fast
    return [*TINY, *own, *shared, *fast, f"data.data_dir={data_dir}"]


def trials(url: str, *states) -> list:
    try:
        study = optuna.load_study(study_name="across", storage=url)
    except KeyError:  # not created yet
        return []
    return study.get_trials(deepcopy=False, states=states or None)


@pytest.mark.slow
def test_two_workers_on_a_new_database_share_one_study_and_take_over_a_killed_trial(
    tmp_path, data_dir, postgres
):
    url = postgres("optuna")
    pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    a_cmd, b_cmd = (worker(tmp_path, data_dir, url, n, n_trials=4) for n in ("a", "b"))
    a, b = spawn("tune", *a_cmd, **pipe), spawn("tune", *b_cmd, **pipe)  # one instant

    # kill machine a while it trains a trial, with no chance to clean up
    deadline = time.monotonic() + 300
    while True:
        assert a.poll() is None and time.monotonic() < deadline, a.communicate()[0][-3000:]
        running = trials(url, optuna.trial.TrialState.RUNNING)
        mine = [t for t in running if str(tmp_path / "a") in t.user_attrs.get("dir", "")]
        if mine:
            break
        time.sleep(0.1)
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=60)
    killed = mine[0].number

    out_b = b.communicate(timeout=600)[0]
    assert b.returncode == 0, out_b[-3000:]
    # machine a comes back: the study is done, it only writes its best.yaml
    cli("tune", *a_cmd)

    study = optuna.load_study(study_name="across", storage=url)
    finished = study.get_trials(states=FINISHED)
    assert len(finished) == 4  # n_trials across both workers, not 4 each
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    (failed,) = study.get_trials(states=(optuna.trial.TrialState.FAIL,))  # no heartbeat
    assert failed.number == killed
    (retry,) = [t for t in finished if retries(t)]
    assert retries(retry) == [killed] and retry.params == failed.params
    took_over = (f"trial {retry.number} runs trial {killed} again", f"continues trial {killed}")
    assert any(line in out_b for line in took_over), out_b[-3000:]  # b ran it
    dirs = [t.user_attrs["dir"] for t in finished]
    assert len(set(dirs)) == len(dirs)  # no trial ran twice
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 4  # 4 distinct draws

    for name in ("a", "b"):  # each machine's best.yaml, from the database
        best = yaml.safe_load((tmp_path / name / "tune" / "best.yaml").read_text())
        assert best["best_trial"] == study.best_trial.number and best["value"] == study.best_value
        assert sum(best["trials"].get(s, 0) for s in ("complete", "pruned")) == 4


@pytest.mark.slow
def test_workers_opening_a_new_database_at_the_same_instant_create_one_study(
    tmp_path, data_dir, postgres
):
    # without the advisory lock this fails: IntegrityError (UniqueViolation) from the tables
    url = postgres("race")
    cfg = tune_cfg(tmp_path, data_dir, f"tune.storage={url}", "tune.study_name=race")
    space, start, errors = search_space(cfg), threading.Barrier(6), []

    def worker() -> None:
        start.wait()
        try:
            with study_lock(cfg):  # as tune() opens it
                open_study(cfg, space)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["race"]


def test_a_server_that_cannot_be_reached_is_named_with_the_fix_for_a_server(tmp_path, data_dir):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/optuna"
    with pytest.raises(TuneError) as e:
        tune(tune_cfg(tmp_path, data_dir, f"tune.storage={url}"))
    assert str(e.value).startswith(f"tune.storage={url} cannot be opened (OperationalError")
    assert "postgresql server this machine reaches" in str(e.value)
    assert "sqlite" not in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "tune" / "mnist_cnn" / "study.lock").exists()  # no file lock
