"""``hydra/launcher=joblib`` (a Hydra plugin, so under ``hydra_plugins``): a ``-m`` sweep's
jobs, ``n_jobs`` at a time, each in a process of its own, so that one dying takes only itself down.

Hydra's joblib launcher runs jobs in a loky pool, which kills every other worker when one dies
(``kill -9``, the OOM killer) and kills them mid-save on Ctrl-C. Here a dead job is recorded
as failed (``job_failed.yaml``) and the others run on. Ctrl-C, SIGTERM or SIGHUP reaches each
running job once (they run in their own process groups): each saves its ``last.ckpt``; no new
job starts; the report of what finished is written and the commands to finish the sweep are
printed. The exit status is then 128 + the signal.
"""

import logging
import multiprocessing
import os
import shlex
import signal
import sys
from multiprocessing.connection import wait
from pathlib import Path

import cloudpickle  # what loky pickles Hydra's task function with
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher as HydraJoblib
from omegaconf import open_dict

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _job(payload: bytes, conn) -> None:
    """A job's process: run it as Hydra's launchers do; tell the parent its dir, then its
    result."""
    os.setpgrp()  # a terminal's Ctrl-C reaches the parent alone, which passes it on once
    idx, overrides, context, config, task, state = cloudpickle.loads(payload)
    setup_globals()
    Singleton.set_state(state)
    cfg = context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(cfg):
        cfg.hydra.job.id, cfg.hydra.job.num = f"{cfg.hydra.job.name}_{idx}", idx
    HydraConfig.instance().set_config(cfg)

    def started(task_cfg):
        conn.send(("dir", HydraConfig.get().runtime.output_dir))
        return task(task_cfg)

    try:
        ret = run_job(
            hydra_context=context,
            task_function=started,
            config=cfg,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
    except KeyboardInterrupt:  # Ctrl-C before training listens for it: nothing to save
        sys.exit(128 + signal.SIGINT)
    if ret.status == JobStatus.FAILED:  # an exception train.main did not record
        ret.return_value = RuntimeError(repr(ret._return_value))
    conn.send(("done", cloudpickle.dumps(ret)))


class JoblibLauncher(HydraJoblib):
    """Hydra's joblib launcher's config (``n_jobs``: jobs at once, -1 for every CPU); each job
    in its own process (see the module's docstring)."""

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        n_jobs = int(self.joblib.get("n_jobs") or 1)
        cpus = os.cpu_count() or 1
        n_jobs = max(1, cpus + 1 + n_jobs if n_jobs < 0 else n_jobs)
        log.info("Launching %d jobs, %d at a time, into %s", len(job_overrides), n_jobs, sweep_dir)
        waiting = list(enumerate(job_overrides, initial_job_idx))
        running, dirs, results, stopped = {}, {}, {}, []

        def on_signal(signum, frame):
            if not stopped:
                log.warning("%s: each job saves its last.ckpt", signal.Signals(signum).name)
            stopped.append(signum)
            for process, _, _ in running.values():
                os.kill(process.pid, signum)

        previous = {s: signal.signal(s, on_signal) for s in SIGNALS}
        spawn = multiprocessing.get_context("spawn")  # a fork would copy torch's threads
        threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = threads or str(max(1, cpus // n_jobs))
        try:
            while running or (waiting and not stopped):
                while waiting and len(running) < n_jobs and not stopped:
                    idx, overrides = waiting.pop(0)
                    state = (idx, overrides, self.hydra_context, self.config)
                    payload = cloudpickle.dumps((*state, self.task_function, Singleton.get_state()))
                    parent, child = spawn.Pipe(duplex=False)
                    process = spawn.Process(target=_job, args=(payload, child), name=f"job {idx}")
                    process.start()
                    child.close()
                    running[idx] = (process, parent, overrides)
                ready = wait([w for p, c, _ in running.values() for w in (p.sentinel, c)])
                for idx, (process, conn, overrides) in list(running.items()):
                    if conn in ready or process.sentinel in ready:
                        _receive(conn, idx, dirs, results)
                    if process.sentinel in ready:
                        process.join()
                        conn.close()
                        del running[idx]
                        if idx not in results:
                            code, job_dir = process.exitcode, dirs.get(idx)
                            results[idx] = _ended(idx, code, overrides, job_dir, stopped)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if threads is None:
                del os.environ["OMP_NUM_THREADS"]
        if stopped:
            _stopped(stopped[0], sweep_dir, job_overrides, initial_job_idx, dirs, results)
        return [results[i] for i in sorted(results)]


def _receive(conn, idx: int, dirs: dict, results: dict) -> None:
    """What a job's process sent: its dir when it starts, its result when it ends."""
    try:
        while conn.poll():
            kind, value = conn.recv()
            if kind == "dir":
                dirs[idx] = Path(value)
            else:
                results[idx] = cloudpickle.loads(value)
    except EOFError:  # the process has ended
        pass


def _ended(idx: int, code: int | None, overrides, job_dir: Path | None, stopped) -> JobReturn:
    """The record of a job whose process ended without a result (stopped by the signal we
    passed on, or died): ``job_failed.yaml`` in its dir, so that the sweep report lists it
    outside the means, and a JobReturn that lets the sweep go on."""
    kind, how = "died", f"exit status {code}"
    if code is not None and code < 0:
        how = f"killed by {signal.Signals(-code).name}"
    if stopped:  # the signal we passed on
        kind, how = "interrupted", f"stopped by {signal.Signals(stopped[0]).name}"
    else:
        log.error("job %d (%s) died: %s; the other jobs go on", idx, " ".join(overrides), how)
    if job_dir is not None and not (job_dir / "job_failed.yaml").is_file():
        error = f"{how} before it finished"
        (job_dir / "job_failed.yaml").write_text(yaml.safe_dump({"error": error, "kind": kind}))
    return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=None)


def _stopped(signum, sweep_dir: Path, job_overrides, first: int, dirs, results) -> None:
    """After a signal: the report of what finished, the commands that finish the sweep, and
    exit 128 + signum."""
    from mnist_cnn import sweep_report

    try:
        print(sweep_report.write_report(sweep_dir))
    except Exception as e:  # e.g. no job got as far as its dir
        log.warning("no sweep report for %s: %s", sweep_dir, e)
    train = ["python", "-m", "mnist_cnn.train"]
    again = []
    for idx, overrides in enumerate(job_overrides, first):
        job_dir = dirs.get(idx) or sweep_dir / str(idx)
        finished = idx in results and not (job_dir / "job_failed.yaml").is_file()
        if finished:
            continue
        if (job_dir / "checkpoints" / "last.ckpt").is_file():
            again.append(shlex.join([*train, f"resume={job_dir}"]))
        else:
            again.append(shlex.join([*train, *overrides, f"hydra.run.dir={job_dir}"]))
    name = signal.Signals(signum).name
    if again:
        lines = "\n".join(f"  {command}" for command in again)
        print(
            f"Sweep stopped by {name}: {len(again)} of {len(job_overrides)} jobs did not finish. "
            f"Finish them (each in its own job dir), then rebuild the report:\n{lines}\n"
            f"  python -m mnist_cnn.sweep_report {sweep_dir}",
            file=sys.stderr,
        )
    else:
        print(f"Sweep stopped by {name} after every job had finished.", file=sys.stderr)
    sys.exit(128 + signum)
