"""A report of a ``-m`` sweep: each job's overrides and final metrics, best first, and a plot.

Written into the sweep dir when a multirun ends (the ``SweepReport`` Hydra callback in
``conf/hydra/default.yaml``) and rebuilt on demand, also for a sweep still running or stopped:

python -m mnist_cnn.sweep_report outputs/multiruns/<date>_<time>_<id>
python -m mnist_cnn.sweep_report                       # the newest sweep under outputs/multiruns

It writes ``sweep_report.csv``, ``sweep_report.md`` (also printed) and ``sweep_report.png``
(final ``val/acc`` against each swept parameter). A job's metrics are the last value of each
scalar it logged (TensorBoard events, else the CSV logger's ``metrics.csv``).
"""

import argparse
import csv
import logging
import os
import sys
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

SHOWN = ("val/acc_best", "val/acc", "val/loss", "test/acc", "test/loss", "train/acc", "train/loss")
PLOTTED = "val/acc"


class SweepError(RuntimeError):
    """The folder is not a sweep dir; the message says what to pass instead."""


def _value(text: str):
    """An override's value as a number when it is one, else the text."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def job_metrics(job: Path) -> dict[str, float]:
    """The last value of every scalar the job logged, and ``epochs`` (how many ``val/acc``
    values it logged); empty when it logged nothing yet."""
    metrics, epochs = {}, 0
    events = sorted({e.parent for e in job.rglob("events.out.tfevents.*")})
    if events:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        logging.getLogger("tensorboard").setLevel(logging.WARNING)  # no per-file chatter
        for folder in events:
            acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                values = acc.Scalars(tag)
                metrics[tag] = values[-1].value
                epochs += len(values) if tag == PLOTTED else 0
    else:
        for path in sorted(job.rglob("metrics.csv")):
            with path.open() as f:
                for row in csv.DictReader(f):
                    metrics |= {k: float(v) for k, v in row.items() if v not in ("", None)}
                    epochs += row.get(PLOTTED) not in ("", None)
    if not metrics and (job / "checkpoints" / "last.ckpt").is_file():
        return checkpoint_metrics(job / "checkpoints" / "last.ckpt")
    return metrics | {"epochs": epochs} if metrics else {}


def checkpoint_metrics(path: Path) -> dict[str, float]:
    """Without a logger: the last epoch of the ``EpochSummary`` history kept in ``last.ckpt``
    and ``val/acc_best`` from its ``ModelCheckpoint`` on ``val/acc``."""
    from mnist_cnn.checkpoint import CheckpointError, load_checkpoint

    try:
        callbacks = load_checkpoint(path).get("callbacks", {})
    except CheckpointError:
        return {}
    metrics = {}
    for name, state in callbacks.items():
        if name.startswith("EpochSummary") and state.get("history"):
            metrics |= {k: v for k, v in state["history"][-1].items() if "/" in k}
            metrics["epochs"] = len(state["history"])
        if "'monitor': 'val/acc'" in name and state.get("best_model_score") is not None:
            metrics["val/acc_best"] = float(state["best_model_score"])
    return metrics


def _read_yaml(path: Path, kind: type):
    """``path`` parsed (``kind()`` when empty); ``ValueError`` saying why it cannot be read."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:  # missing, not text, not YAML
        why = getattr(e, "strerror", None) or getattr(e, "problem", None) or str(e)
        if mark := getattr(e, "problem_mark", None):
            why += f" at line {mark.line + 1}"
        raise ValueError(f".hydra/{path.name}: {why}") from None
    if not isinstance(data, kind | None):
        raise ValueError(f".hydra/{path.name}: a {type(data).__name__}, not a {kind.__name__}")
    return data or kind()


def read_jobs(sweep_dir: Path) -> list[dict]:
    """One dict per job: ``job`` (its dir name), ``overrides`` (key -> value) and ``metrics``;
    only ``job`` and ``error`` for a job whose ``.hydra/`` files cannot be read."""
    jobs = []
    for file in sweep_dir.glob("**/.hydra/overrides.yaml"):
        job = file.parent.parent
        name = str(job.relative_to(sweep_dir))
        try:
            lines = _read_yaml(file, list)
            config = _read_yaml(job / ".hydra" / "config.yaml", dict)
        except ValueError as e:
            jobs.append({"job": name, "error": str(e)})
            continue
        overrides = {}
        for line in lines:
            key, _, value = str(line).partition("=")
            overrides[key.lstrip("+~")] = _value(value)
        jobs.append(
            {
                "job": name,
                "overrides": overrides,
                "metrics": job_metrics(job),
                "optimized": config.get("optimized_metric") or "val/acc_best",
            }
        )
    return sorted(jobs, key=lambda j: (len(j["job"]), j["job"]))  # 0, 1, ..., 10


def swept_keys(jobs: list[dict]) -> list[str]:
    """Override keys whose value differs between jobs, in command-line order."""
    keys = list(dict.fromkeys(k for j in jobs for k in j["overrides"]))
    return [k for k in keys if len({str(j["overrides"].get(k)) for j in jobs}) > 1]


def rank(jobs: list[dict]) -> list[dict]:
    """Best first on the optimized metric (higher is better, lower for a loss); no metric last."""
    metric = jobs[0]["optimized"] if jobs else "val/acc_best"
    sign = 1 if "loss" in metric else -1
    return sorted(
        jobs, key=lambda j: (metric not in j["metrics"], sign * j["metrics"].get(metric, 0))
    )


def not_a_sweep(folder: Path) -> str:
    """Why ``folder`` (without Hydra's ``multirun.yaml``) is no sweep dir, and what to pass."""
    fix = (
        "Pass a sweep dir, outputs/multiruns/<date>_<time>_<id> (Hydra writes multirun.yaml "
        "there), made by `python -m mnist_cnn.train -m key=value1,value2`."
    )
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is a file, not a folder"
    elif (folder / ".hydra").is_dir():
        what = "is a single run (it has .hydra/ itself), not a sweep"
        if (folder.parent / "multirun.yaml").is_file():
            what, fix = "is one job of a sweep", f"Pass its sweep dir: {folder.parent}"
    elif runs := list(folder.glob("*/.hydra")):
        what = f"is a runs folder holding {len(runs)} runs, not a sweep (it has no multirun.yaml)"
    elif sweeps := sorted(folder.glob("*/multirun.yaml")):
        what, fix = "holds sweeps", f"Pass one of them, e.g. {sweeps[-1].parent}"
    else:
        what = "is not a sweep (it has no multirun.yaml)"
    return f"{folder} {what}. {fix}"


def write_report(sweep_dir: str | Path) -> str:
    """Write the CSV, markdown and plot into ``sweep_dir``; return the markdown. ``SweepError``
    when it is no sweep dir (no ``multirun.yaml``, which Hydra writes into each)."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "multirun.yaml").is_file():
        raise SweepError(not_a_sweep(sweep_dir))
    jobs = read_jobs(sweep_dir)
    unreadable = [j for j in jobs if "error" in j]
    jobs = [j for j in jobs if "error" not in j]
    if not jobs:
        why = "; ".join(f"job {j['job']}: {j['error']}" for j in unreadable) or "none started"
        raise SweepError(
            f"{sweep_dir} holds no readable sweep job yet ({why}). Run this again once a job has "
            "started (or its .hydra/ files are repaired), or pass another sweep dir."
        )
    jobs = rank(jobs)
    swept = swept_keys(jobs)
    names = [m for m in SHOWN if any(m in j["metrics"] for j in jobs)]
    header = ["rank", "job", *swept, *names, "epochs", "overrides"]
    rows = []
    for i, j in enumerate(jobs, 1):
        m = j["metrics"]
        epochs = int(m["epochs"]) if m else ""
        overrides = " ".join(f"{k}={v}" for k, v in j["overrides"].items())
        values = [f"{m[n]:.4f}" if n in m else "" for n in names]
        rows.append([i, j["job"], *(j["overrides"].get(k, "") for k in swept), *values, epochs])
        rows[-1].append(overrides)

    with (sweep_dir / "sweep_report.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    lines = [
        f"# Sweep {sweep_dir.name}: {len(jobs)} jobs, best first on {jobs[0]['optimized']}",
        "",
        "| " + " | ".join(header[:-1]) + " |",
        "|" + "---|" * (len(header) - 1),
        *("| " + " | ".join(str(v) for v in row[:-1]) + " |" for row in rows),
    ]
    if missing := [j["job"] for j in jobs if not j["metrics"]]:
        lines += [
            "",
            f"No metrics yet (running, failed or not started): jobs {', '.join(missing)}.",
        ]
    if unreadable:
        listed = "; ".join(f"{j['job']} ({j['error']})" for j in unreadable)
        lines += ["", f"Unreadable, not in the table: jobs {listed}."]
    markdown = "\n".join(lines) + "\n"
    (sweep_dir / "sweep_report.md").write_text(markdown)
    plot(jobs, swept, sweep_dir / "sweep_report.png")
    return markdown


def plot(jobs: list[dict], swept: list[str], path: Path) -> None:
    """Final ``val/acc`` against each swept parameter, one line per value of the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = swept or ["job"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        others = [k for k in swept if k != key]
        lines: dict[str, list] = {}
        for j in jobs:
            if PLOTTED in j["metrics"]:
                x = j["overrides"].get(key, j["job"])
                label = ", ".join(f"{k.split('.')[-1]}={j['overrides'].get(k)}" for k in others)
                lines.setdefault(label, []).append((x, j["metrics"][PLOTTED]))
        xs = [x for points in lines.values() for x, _ in points]
        numeric = xs and all(isinstance(x, int | float) for x in xs)
        for label, points in lines.items():
            points = sorted(points, key=lambda p: p[0]) if numeric else points
            ax.plot([str(x) if not numeric else x for x, _ in points], [y for _, y in points])
            ax.lines[-1].set(marker="o", label=label or None)
        if numeric and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=PLOTTED)
        ax.grid(alpha=0.3)
        if any(lines):
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class SweepReport(Callback):
    """Hydra callback: writes the report into the sweep dir when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            print(write_report(sweep_dir))
            log.info("sweep report: %s", sweep_dir / "sweep_report.md")
        except Exception as e:  # a report problem must not turn a finished sweep into a failure
            log.warning("no sweep report for %s: %s", sweep_dir, e)


class DDPInSweep(Callback):
    """Hydra callback for ``trainer=ddp`` in a ``-m`` sweep. Lightning's DDP launcher re-runs
    the command line for ranks 1..N-1: at each job's start this points that command at the job
    alone (its overrides, its dir; not the whole sweep again), and at its end closes the
    process group and restores the environment, so the next job starts its own ranks."""

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        from omegaconf import read_write

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return
        self._saved = sys.argv, dict(os.environ)
        with read_write(hydra_cfg.run):
            hydra_cfg.run.dir = hydra_cfg.runtime.output_dir  # what Lightning passes to ranks
        hydra_overrides = [o for o in hydra_cfg.overrides.hydra if not o.startswith("hydra.mode")]
        sys.argv = [sys.argv[0], *hydra_overrides, *hydra_cfg.overrides.task]

    def on_job_end(self, config: DictConfig, **kwargs) -> None:
        if not hasattr(self, "_saved"):
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        sys.argv, env = self._saved
        os.environ.clear()
        os.environ.update(env)  # MASTER_PORT, LOCAL_RANK, WORLD_SIZE of this job gone
        del self._saved


def main(argv: list[str] | None = None) -> int:
    """``python -m mnist_cnn.sweep_report [DIR]``: (re)write the report of a sweep dir."""
    from mnist_cnn import ROOT

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("sweep_dir", nargs="?", help="default: the newest outputs/multiruns/*")
    args = parser.parse_args(argv)
    sweep_dir = args.sweep_dir
    if sweep_dir is None:
        sweeps = sorted((ROOT / "outputs" / "multiruns").glob("*"), key=lambda p: p.stat().st_mtime)
        sweep_dir = sweeps[-1] if sweeps else ROOT / "outputs" / "multiruns"
    try:
        print(write_report(sweep_dir))
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {Path(sweep_dir) / 'sweep_report.md'}, .csv and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
