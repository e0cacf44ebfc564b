"""Two processes and one run dir: the live run is locked; a kill -9 releases it."""

import signal

import pytest
from conftest import finish, last_ckpt, start, the_run, wait_until

pytestmark = pytest.mark.slow


def test_a_run_being_trained_is_never_resumed_by_another_process(tmp_path, data_dir):
    # full epochs (~780 batches): the live run must outlast the two refused starts below, each
    # ~30 s of imports on a loaded 2-core machine; it is killed long before it would end
    long = ["trainer.max_epochs=3", "trainer.limit_train_batches=1.0", "test=false"]
    live = start(tmp_path, data_dir, *long, "callbacks.last_checkpoint.every_n_train_steps=2")
    wait_until(live, lambda: last_ckpt(tmp_path).exists())
    run = the_run(tmp_path)

    code, out = finish(start(tmp_path, data_dir, "resume=true"))  # the newest run is live
    assert code == 2 and "Traceback" not in out, out[-3000:]
    assert "found no run" in out and "1 in use by live processes" in out
    code, out = finish(start(tmp_path, data_dir, f"resume={run}"))
    assert code == 2 and f"Cannot resume {run}: pid {live.pid}" in out, out[-3000:]
    assert live.poll() is None  # the live run goes on, untouched

    live.kill()  # the OS releases the lock
    assert finish(live)[0] == -signal.SIGKILL
    code, out = finish(start(tmp_path, data_dir, "resume=true", "trainer.limit_train_batches=4"))
    assert code == 0, out[-3000:]
    assert f"Restoring states from the checkpoint path at {run}" in out
