"""A report of a ``-m`` sweep: each setting's metrics over its seeds, best first, and each job.

Written into the sweep dir when a multirun ends (the ``SweepReport`` Hydra callback in
``conf/hydra/default.yaml``) and rebuilt on demand, also for a sweep still running or stopped:

python -m mnist_cnn.train -m seed=1,2,3 model.optimizer.lr=1e-3,3e-3   # 2 settings x 3 seeds
python -m mnist_cnn.sweep_report outputs/multiruns/<date>_<time>_<id>
python -m mnist_cnn.sweep_report                       # the newest sweep under outputs/multiruns

Jobs that differ only in ``seed`` form one setting. It writes ``sweep_report.csv`` (per setting:
mean, standard deviation and count of each metric), ``sweep_report_jobs.csv`` (per job, with its
status and error), ``sweep_report.md`` (both tables and the failed jobs; also printed) and
``sweep_report.png`` (the optimized metric's mean and std against each swept parameter). A job's
metrics are the last value of each ``train/``, ``val/`` and ``test/`` scalar it logged
(TensorBoard events, else the CSV logger's ``metrics.csv``, else ``last.ckpt``). A job that
wrote ``job_failed.yaml`` (``train.main`` in a sweep) is listed as failed, outside the means.
"""

import argparse
import csv
import logging
import statistics
import sys
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mnist_cnn.errors import SweepError

log = logging.getLogger(__name__)

SEED = "seed"  # jobs whose overrides differ only in this key are one setting
STAGES = ("val", "test", "train")  # the metrics shown: <stage>/<name>, in this order
FAILED = "job_failed.yaml"  # {error, kind} in a job dir: train.main's record of a failed job


def _value(text: str):
    """An override's value as a number when it is one, else the text."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def _shown(tag: str) -> bool:
    return tag.split("/")[0] in STAGES  # not lr-Adam, epoch, hp_metric


def job_metrics(job: Path) -> dict[str, float]:
    """The last value of every ``train/``, ``val/`` and ``test/`` scalar the job logged, and
    ``epochs`` (how many values of a ``val/`` metric); empty when it logged nothing yet."""
    metrics, counts = {}, {}
    events = sorted({e.parent for e in job.rglob("events.out.tfevents.*")})
    if events:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        logging.getLogger("tensorboard").setLevel(logging.WARNING)  # no per-file chatter
        for folder in events:
            acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in filter(_shown, acc.Tags()["scalars"]):
                values = acc.Scalars(tag)
                metrics[tag] = values[-1].value
                counts[tag] = counts.get(tag, 0) + len(values)
    else:
        for path in sorted(job.rglob("metrics.csv")):
            with path.open() as f:
                for row in csv.DictReader(f):
                    row = {k: float(v) for k, v in row.items() if _shown(k) and v not in ("", None)}
                    metrics |= row
                    counts |= {k: counts.get(k, 0) + 1 for k in row}
    if not metrics and (job / "checkpoints" / "last.ckpt").is_file():
        return checkpoint_metrics(job / "checkpoints" / "last.ckpt")
    epochs = max((n for k, n in counts.items() if k.startswith("val/")), default=0)
    return metrics | {"epochs": epochs} if metrics else {}


def checkpoint_metrics(path: Path) -> dict[str, float]:
    """Without a logger: the last epoch of the ``EpochSummary`` history kept in ``last.ckpt``
    and ``val/acc_best`` from its ``ModelCheckpoint`` on ``val/acc``."""
    from mnist_cnn.checkpoint import load_checkpoint
    from mnist_cnn.errors import CheckpointError

    try:
        callbacks = load_checkpoint(path).get("callbacks", {})
    except CheckpointError:
        return {}
    metrics = {}
    for name, state in callbacks.items():
        if name.startswith("EpochSummary") and state.get("history"):
            metrics |= {k: v for k, v in state["history"][-1].items() if _shown(k)}
            metrics["epochs"] = len(state["history"])
        if "'monitor': 'val/acc'" in name and state.get("best_model_score") is not None:
            metrics.setdefault("val/acc_best", float(state["best_model_score"]))
    return metrics


def _read_yaml(path: Path, kind: type, label: str):
    """``path`` parsed (``kind()`` when empty); ``ValueError`` saying why it cannot be read."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:  # missing, not text, not YAML
        why = getattr(e, "strerror", None) or getattr(e, "problem", None) or str(e)
        if mark := getattr(e, "problem_mark", None):
            why += f" at line {mark.line + 1}"
        raise ValueError(f"{label}: {why}") from None
    if not isinstance(data, kind | None):
        raise ValueError(f"{label}: a {type(data).__name__}, not a {kind.__name__}")
    return data or kind()


def job_failure(job: Path) -> str | None:
    """``<kind>: <error>`` from the job's ``job_failed.yaml``; None when there is none."""
    if not (job / FAILED).is_file():
        return None
    try:
        failure = _read_yaml(job / FAILED, dict, FAILED)
    except ValueError as e:
        return f"exception: {e}"
    return f"{failure.get('kind', 'exception')}: {failure.get('error', '')}"


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's job dirs (a ``.hydra/overrides.yaml`` in each), in order: 0, 1, ..., 10."""
    jobs = [f.parent.parent for f in sweep_dir.glob("**/.hydra/overrides.yaml")]
    return sorted(jobs, key=lambda j: (len(str(j)), str(j)))


def read_jobs(sweep_dir: Path) -> list[dict]:
    """One dict per job: ``job`` (its dir name), ``overrides`` (key -> value), ``command`` (the
    overrides as typed), ``metrics``, ``optimized`` and ``failed`` (its error or None); only
    ``job`` and ``error`` for a job whose ``.hydra/`` files cannot be read."""
    jobs = []
    for job in job_dirs(sweep_dir):
        name = str(job.relative_to(sweep_dir))
        try:
            lines = _read_yaml(job / ".hydra" / "overrides.yaml", list, ".hydra/overrides.yaml")
            config = _read_yaml(job / ".hydra" / "config.yaml", dict, ".hydra/config.yaml")
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
                "command": " ".join(map(str, lines)),
                "metrics": job_metrics(job),
                "optimized": config.get("optimized_metric") or "val/acc_best",
                "failed": job_failure(job),
            }
        )
    return jobs


def swept_keys(jobs: list[dict]) -> list[str]:
    """Override keys whose value differs between jobs, in command-line order."""
    keys = list(dict.fromkeys(k for j in jobs for k in j["overrides"]))
    return [k for k in keys if len({str(j["overrides"].get(k)) for j in jobs}) > 1]


def metric_names(jobs: list[dict], optimized: str) -> list[str]:
    """Every metric a job logged: the optimized one first, then val/, test/, train/."""
    names = {k for j in jobs for k in j["metrics"] if k != "epochs"}
    return sorted(names, key=lambda n: (n != optimized, STAGES.index(n.split("/")[0]), n))


def settings(jobs: list[dict], keys: list[str], names: list[str], optimized: str) -> list[dict]:
    """Jobs grouped on the values of ``keys`` (failed jobs left out), with ``stats``: metric ->
    (mean, sample std or None, count); best first on the optimized metric's mean (higher is
    better, lower for a loss); a setting without it last. Each job gets its setting's rank."""
    groups: dict[tuple, dict] = {}
    for j in jobs:
        if not j["failed"]:
            values = {k: j["overrides"].get(k, "") for k in keys}
            key = tuple(map(str, values.values()))
            groups.setdefault(key, {"values": values, "jobs": []})["jobs"].append(j)
    for g in groups.values():
        g["n"] = sum(bool(j["metrics"]) for j in g["jobs"])
        g["stats"] = {}
        for name in names:
            if xs := [j["metrics"][name] for j in g["jobs"] if name in j["metrics"]]:
                std = statistics.stdev(xs) if len(xs) > 1 else None
                g["stats"][name] = (statistics.fmean(xs), std, len(xs))
    sign = 1 if "loss" in optimized else -1
    ranked = sorted(
        groups.values(),
        key=lambda g: (optimized not in g["stats"], sign * g["stats"].get(optimized, (0,))[0]),
    )
    for rank, g in enumerate(ranked, 1):
        g["rank"] = rank
        for j in g["jobs"]:
            j["setting"] = rank
    return ranked


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


def _table(header: list, rows: list[list]) -> list[str]:
    return [
        "| " + " | ".join(map(str, header)) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(map(str, row)) + " |" for row in rows),
    ]


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "" if value is None else str(value)


def _cell(mean, std, n, total) -> str:
    """``mean ± std`` for the markdown, with the count where it is not the setting's."""
    if mean is None:
        return ""
    text = f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")
    return text + (f" (n={n})" if n != total else "")


def _write_csv(path: Path, header: list, rows: list[list]) -> None:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def write_report(sweep_dir: str | Path) -> str:
    """Write the CSVs, markdown and plot into ``sweep_dir``; return the markdown. ``SweepError``
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
    optimized = jobs[0]["optimized"]
    swept = swept_keys(jobs)
    keys = [k for k in swept if k != SEED]
    names = metric_names(jobs, optimized)
    groups = settings(jobs, keys, names, optimized)

    header = ["rank", *keys, "jobs", *(f"{n} {s}" for n in names for s in ("mean", "std", "n"))]
    rows, md_rows = [], []
    for g in groups:
        stats = [g["stats"].get(n, (None, None, 0)) for n in names]
        values = list(g["values"].values())
        jobs_in = " ".join(j["job"] for j in g["jobs"])
        rows.append([g["rank"], *values, jobs_in, *(_num(v) for s in stats for v in s)])
        md_cells = [_cell(*s, g["n"]) for s in stats]
        md_rows.append([g["rank"], *values, g["n"], *md_cells])
    _write_csv(sweep_dir / "sweep_report.csv", header, rows)

    job_header = ["job", "setting", "status", *swept, *names, "epochs", "error", "overrides"]
    job_rows, md_job_rows = [], []  # the markdown: the optimized metric only
    for j in jobs:
        m = j["metrics"]
        status = "failed" if j["failed"] else "ok" if m else "no metrics"
        values = [
            *(j["overrides"].get(k, "") for k in swept),
            *(_num(m.get(n)) for n in names),
        ]
        job_rows.append([j["job"], j.get("setting", ""), status, *values, m.get("epochs", "")])
        job_rows[-1] += [j["failed"] or "", j["command"]]
        md_job_rows.append(
            [*job_rows[-1][: 3 + len(swept)], _num(m.get(optimized)), *job_rows[-1][-3:-2]]
        )
    _write_csv(sweep_dir / "sweep_report_jobs.csv", job_header, job_rows)

    seeds = sorted({str(j["overrides"][SEED]) for j in jobs if SEED in swept})
    plural = "s" * (len(groups) != 1)
    over = f", mean ± std over {SEED}={','.join(seeds)}" if seeds else ""
    lines = [
        f"# Sweep {sweep_dir.name}: {len(jobs)} jobs, {len(groups)} setting{plural}{over}",
        "",
        f"Settings best first on {optimized}; n: the jobs with metrics (failed ones left out).",
        "",
        *_table(["rank", *keys, "n", *names], md_rows),
        "",
        "## Jobs (every metric: sweep_report_jobs.csv)",
        "",
        *_table([*job_header[: 3 + len(swept)], optimized, "epochs"], md_job_rows),
    ]
    if failed := [j for j in jobs if j["failed"]]:
        lines += ["", f"## Failed: {len(failed)} of {len(jobs)} jobs, not in the means", ""]
        lines += [f"- job {j['job']} `{j['command']}`: {j['failed']}" for j in failed]
    if missing := [j["job"] for j in jobs if not j["metrics"] and not j["failed"]]:
        lines += [
            "",
            f"No metrics yet (running, killed or not started): jobs {', '.join(missing)}.",
        ]
    if unreadable:
        listed = "; ".join(f"{j['job']} ({j['error']})" for j in unreadable)
        lines += ["", f"Unreadable, not in the tables: jobs {listed}."]
    markdown = "\n".join(lines) + "\n"
    (sweep_dir / "sweep_report.md").write_text(markdown)
    plotted = optimized if optimized in names or not names else names[0]
    plot(groups, keys, plotted, sweep_dir / "sweep_report.png")
    return markdown


def plot(groups: list[dict], keys: list[str], metric: str, path: Path) -> None:
    """``metric``'s mean over the seeds (error bars: their std) against each swept parameter,
    one line per value of the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_keys = keys or ["rank"]  # only seeds swept: the one setting
    fig, axes = plt.subplots(1, len(axes_keys), figsize=(4.5 * len(axes_keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], axes_keys, strict=True):
        others = [k for k in keys if k != key]
        lines: dict[str, list] = {}
        for g in groups:
            if metric in g["stats"]:
                mean, std, _ = g["stats"][metric]
                x = g["values"].get(key, g["rank"])
                label = ", ".join(f"{k.split('.')[-1]}={g['values'][k]}" for k in others)
                lines.setdefault(label, []).append((x, mean, std or 0.0))
        xs = [p[0] for points in lines.values() for p in points]
        numeric = xs and all(isinstance(x, int | float) for x in xs)
        for label, points in lines.items():
            points = sorted(points, key=lambda p: p[0]) if numeric else points
            x = [p[0] if numeric else str(p[0]) for p in points]
            y, err = [p[1] for p in points], [p[2] for p in points]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label or None)
        if numeric and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=f"{metric} (mean ± std)")
        ax.grid(alpha=0.3)
        if any(lines):
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class SweepReport(Callback):
    """Hydra callback: writes the report into the sweep dir when a multirun ends; when jobs
    wrote ``job_failed.yaml``, the sweep exits with their count (at most 100)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = job_dirs(sweep_dir)
        failed = [j for j in jobs if (j / FAILED).is_file()]
        try:
            print(write_report(sweep_dir))
            log.info("sweep report: %s", sweep_dir / "sweep_report.md")
        except Exception as e:  # a report problem must not turn a finished sweep into a failure
            log.warning("no sweep report for %s: %s", sweep_dir, e)
        if failed:
            report = sweep_dir / "sweep_report.md"
            log.error("%d of %d jobs failed: see %s", len(failed), len(jobs), report)
            sys.exit(min(len(failed), 100))  # Hydra passes SystemExit on; the last callback


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
    print(f"wrote {Path(sweep_dir) / 'sweep_report.md'}, .csv, _jobs.csv and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
