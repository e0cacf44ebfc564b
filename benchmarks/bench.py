"""Training and evaluation speed: the notebook's loop vs the template, on this machine.

(a) ``notebook``: the notebook's plain loop (torchvision MNIST, ``ToTensor``, DataLoader of
    batch 64, Adam, CrossEntropy) on ``build_cnn()``;
(b) ``lightning``: the template's default training, ``mnist_cnn.train.train`` on the real
    ``conf/`` tree (overrides apply);
(c) ``plain``: a plain loop over the same config's datamodule, calling the same module's
    ``training_step``, so (b) - (c) is Lightning's overhead.

Each run is a fresh process (its peak memory is its own), with ``--warmup`` untimed
batches first; ``--repeats`` rounds of (a), (b), (c) in turn ((c) before (b) every other
round); the median is reported.
(b) and (c) also time the model's own work (``training_step``, ``Tensor.backward``, the
optimizer's update): what a step spends outside it, (b) minus (c), is Lightning's share of a
step, measured without the jitter of the compute itself.
Writes bench.json and bench.md.

python -m benchmarks.bench                                   # about 6 minutes on 2 CPU cores
python -m benchmarks.bench --batches 5 --repeats 1 --out /tmp/bench   # a smoke run
python -m benchmarks.bench trainer.precision=32-true         # overrides for (b) and (c)
"""

import argparse
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from mnist_cnn import CONFIG_DIR, ROOT
from mnist_cnn.model import build_cnn

VARIANTS = ("notebook", "lightning", "plain")
GPU_FP32_TFLOPS = {"H200": 67.0, "H100": 67.0, "A100": 19.5, "L4": 30.3, "T4": 8.1}  # datasheets


def flop_per_sample(train: bool) -> float:
    """FLOPs of one image through ``build_cnn()`` (forward, or forward + backward), counted."""
    from torch.utils.flop_counter import FlopCounterMode

    net, x = build_cnn(), torch.zeros(1, 1, 28, 28)
    with FlopCounterMode(display=False) as counter:
        if train:
            nn.functional.cross_entropy(net(x), torch.zeros(1, dtype=torch.long)).backward()
        else:
            with torch.no_grad():
                net(x)
    return float(counter.get_total_flops())


def _cpu_flop_per_cycle(flags: set[str], vendor: str) -> int:
    """FP32 FLOPs per cycle and core: FMA units x lanes x 2."""
    if "avx512f" in flags:
        return 64 if "Intel" in vendor else 32  # AMD Zen 4 runs AVX-512 on two 256-bit FMA units
    if "avx2" in flags and "fma" in flags:
        return 32
    return 8


def peak_gflops(device: torch.device) -> tuple[float, str]:
    """An FP32 peak estimate for ``device`` and how it was made."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_FP32_TFLOPS.items():
            if key in name:
                return tflops * 1000, f"{name}: {tflops} TFLOP/s FP32 (datasheet)"
        return math.nan, f"{name}: unknown, pass --peak-gflops"
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    if not fields.get("cpu MHz"):
        return math.nan, "unknown CPU, pass --peak-gflops"
    mhz, cores = float(fields["cpu MHz"]), os.cpu_count() or 1
    per_cycle = _cpu_flop_per_cycle(
        set(fields.get("flags", "").split()), fields.get("vendor_id", "")
    )
    peak = cores * mhz / 1000 * per_cycle
    return peak, f"{cores} cores x {mhz / 1000:.2f} GHz x {per_cycle} FP32 FLOP/cycle"


class ComputeClock:
    """Seconds spent in the model's own work between ``reset()`` and ``stop()``:
    ``training_step`` (forward, loss, metric updates), ``Tensor.backward`` and the optimizer's
    update function (``torch.optim.adam.adam`` for Adam). ``install`` wraps them; the bench's
    children only."""

    seconds, steps, start, elapsed = 0.0, 0, 0.0, 0.0

    @classmethod
    def reset(cls) -> None:
        cls.seconds, cls.steps, cls.start = 0.0, 0, time.perf_counter()

    @classmethod
    def stop(cls) -> None:
        cls.elapsed = time.perf_counter() - cls.start

    @classmethod
    def _wrap(cls, fn, counts_step: bool = False):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                cls.seconds += time.perf_counter() - start
                cls.steps += counts_step

        return timed

    @classmethod
    def install(cls, optimizer_target: str) -> None:
        import hydra

        from mnist_cnn.module import Classifier

        Classifier.training_step = cls._wrap(Classifier.training_step, True)
        torch.Tensor.backward = cls._wrap(torch.Tensor.backward)
        module = sys.modules[hydra.utils.get_class(optimizer_target).__module__]
        update = getattr(module, module.__name__.rsplit(".", 1)[-1], None)  # adam.adam, sgd.sgd
        if callable(update):  # else the update counts as outside, in (b) and (c) alike
            setattr(module, update.__name__, cls._wrap(update))

    @classmethod
    def outside_ms(cls) -> float:
        """Milliseconds per step outside the model's work, from ``reset()`` to ``stop()``."""
        return 1000 * (cls.elapsed - cls.seconds) / max(cls.steps, 1)


class Timer(L.Callback):
    """Logs ``bench/train_samples_per_s`` (the batches after ``warmup``),
    ``bench/train_outside_ms`` (``ComputeClock.outside_ms()`` over them) and
    ``bench/eval_samples_per_s`` (validation batches after the first): ``train(cfg)`` returns them.
    """

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.train, self.eval = [0.0, 0.0, 0], [0.0, 0.0, 0]  # start, end, samples

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            ComputeClock.reset()
            self.train[0] = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            ComputeClock.stop()
            self.train[1:] = [time.perf_counter(), self.train[2] + len(batch[1])]

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == min(1, trainer.num_val_batches[0] - 1):
            self.eval[0] = time.perf_counter()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args):
        if batch_idx >= min(1, trainer.num_val_batches[0] - 1):
            self.eval[1:] = [time.perf_counter(), self.eval[2] + len(batch[1])]

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        for name, (start, end, n) in (("train", self.train), ("eval", self.eval)):
            pl_module.log(f"bench/{name}_samples_per_s", n / (end - start), batch_size=1)
        pl_module.log("bench/train_outside_ms", ComputeClock.outside_ms(), batch_size=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(batches, step, warmup: int, device: torch.device) -> float:
    """Samples/s of ``step(batch)`` over ``batches`` after ``warmup`` of them; ``ComputeClock``
    times the same window."""
    start, n = time.perf_counter(), 0
    for i, batch in enumerate(batches):
        if i == warmup:
            _sync(device)
            ComputeClock.reset()
            start, n = time.perf_counter(), 0
        step(batch)
        n += len(batch[1])
    _sync(device)
    ComputeClock.stop()
    return n / (time.perf_counter() - start)


def _take(loader, n: int | None):
    for i, batch in enumerate(loader):
        if n is not None and i >= n:
            return
        yield batch


def run_notebook(args, data_dir: str) -> dict:
    """(a) The notebook's loop, as written there (per-image ToTensor, loss.item() per batch)."""
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import MNIST
    from torchvision.transforms import ToTensor

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(1)
    mnist = MNIST(data_dir, train=True, transform=ToTensor())
    valid_dl = DataLoader(Subset(mnist, torch.arange(10000)), 64, shuffle=False)
    train_dl = DataLoader(Subset(mnist, torch.arange(10000, len(mnist))), 64, shuffle=True)
    model = build_cnn().to(device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    totals = {"loss": 0.0, "correct": 0.0}

    def train_step(batch):
        x_batch, y_batch = (t.to(device) for t in batch)
        pred = model(x_batch)
        loss = loss_fn(pred, y_batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        totals["loss"] += loss.item() * y_batch.size(0)
        totals["correct"] += (torch.argmax(pred, dim=1) == y_batch).float().sum().item()

    def eval_step(batch):
        x_batch, y_batch = (t.to(device) for t in batch)
        pred = model(x_batch)
        totals["loss"] += loss_fn(pred, y_batch).item() * y_batch.size(0)

    train, evals = [], []
    for _ in range(args.repeats):
        model.train()
        batches = _take(train_dl, args.warmup + args.batches)
        train.append(_timed(batches, train_step, args.warmup, device))
        model.eval()
        with torch.no_grad():
            evals.append(_timed(_take(valid_dl, args.eval_batches), eval_step, 1, device))
    return {"train": train, "eval": evals, "batch_size": 64, "eval_batch_size": 64}


def _compose(args, out: str, *extra: str):
    from hydra import compose, initialize_config_dir

    from mnist_cnn import CONFIG_DIR

    overrides = [f"paths.output_dir={out}", f"paths.log_dir={out}", *args.overrides, *extra]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def run_lightning(args, out: str) -> dict:
    """(b) ``mnist_cnn.train.train`` on the real config, one epoch of warmup + batches."""
    from mnist_cnn.train import train

    train_sps, eval_sps, outside = [], [], []
    cfg = None
    for i in range(args.repeats):
        cfg = _compose(
            args,
            f"{out}/lightning{i}",
            "trainer.max_epochs=1",
            f"trainer.limit_train_batches={args.warmup + args.batches}",
            f"trainer.limit_val_batches={args.eval_batches or 1.0}",
            "trainer.num_sanity_val_steps=0",
            "test=false",
            f"+callbacks.bench_timer={{_target_: benchmarks.bench.Timer, warmup: {args.warmup}}}",
        )
        metrics = train(cfg)
        train_sps.append(metrics["bench/train_samples_per_s"])
        eval_sps.append(metrics["bench/eval_samples_per_s"])
        outside.append(metrics["bench/train_outside_ms"])
    return {
        "train": train_sps,
        "eval": eval_sps,
        "outside_ms": outside,
        "batch_size": cfg.data.batch_size,
        "eval_batch_size": cfg.data.eval_batch_size,
    }


def run_plain(args, out: str) -> dict:
    """(c) The same datamodule and module as (b), driven by a for loop instead of a Trainer."""
    import hydra

    cfg = _compose(args, f"{out}/plain")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.trainer.accelerator == "cpu":
        device = torch.device("cpu")
    if cfg.get("threads"):  # as train() does
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, verbose=False)
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    module = hydra.utils.instantiate(cfg.model, _recursive_=False).to(device)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    bf16 = str(cfg.trainer.precision).startswith("bf16")

    def batches(loader, n):
        for batch in _take(loader, n):
            yield dm.on_after_batch_transfer([t.to(device) for t in batch], 0)

    def train_step(batch):
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def eval_step(batch):
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            module.validation_step(batch, 0)

    train, evals, outside = [], [], []
    for _ in range(args.repeats):
        module.train()
        loader = batches(dm.train_dataloader(), args.warmup + args.batches)
        train.append(_timed(loader, train_step, args.warmup, device))
        outside.append(ComputeClock.outside_ms())
        module.eval()
        with torch.no_grad():
            evals.append(
                _timed(batches(dm.val_dataloader(), args.eval_batches), eval_step, 1, device)
            )
    return {
        "train": train,
        "eval": evals,
        "outside_ms": outside,
        "batch_size": cfg.data.batch_size,
        "eval_batch_size": cfg.data.eval_batch_size,
    }


def _child(variant: str, args, data_dir: str, out: str, queue) -> None:
    """Runs one variant in a fresh process and reports its numbers and peak memory."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        if variant == "notebook":  # a notebook process has not imported Lightning: undo its env
            os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
            result = run_notebook(args, data_dir)
        else:
            ComputeClock.install(_compose(args, out).model.optimizer._target_)
            result = (run_lightning if variant == "lightning" else run_plain)(args, out)
    except Exception as e:  # reported by the parent with the variant's name
        queue.put({"error": f"{type(e).__name__}: {e}"})
        return
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    result["threads"] = torch.get_num_threads()
    queue.put(result)


def run_variant(variant: str, args, data_dir: str, out: str) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    from benchmarks import bench  # not __main__: the child's Timer shares its ComputeClock

    proc = ctx.Process(target=bench._child, args=(variant, args, data_dir, out, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"bench variant {variant!r} failed: {result['error']}")
    return result


def summarize(results: dict, args, peak: float, peak_how: str) -> dict:
    """The report: medians per variant, ratio (b)/(a), overhead of (b) over (c), GFLOP/s."""
    train_flop, eval_flop = flop_per_sample(True), flop_per_sample(False)
    variants = {}
    for name, r in results.items():
        sps, eval_sps = statistics.median(r["train"]), statistics.median(r["eval"])
        gflops = sps * train_flop / 1e9
        variants[name] = {
            "train_samples_per_s": sps,
            "train_samples_per_s_repeats": r["train"],
            "eval_samples_per_s": eval_sps,
            "eval_samples_per_s_repeats": r["eval"],
            "batch_size": r["batch_size"],
            "eval_batch_size": r["eval_batch_size"],
            "peak_rss_mib": r["peak_rss_mib"],
            "peak_cuda_mib": r.get("peak_cuda_mib"),
            "threads": r["threads"],
            "train_gflops": gflops,
            "train_peak_fraction": gflops / peak,
            "train_outside_ms_per_step": statistics.median(r["outside_ms"])
            if "outside_ms" in r
            else None,
            "train_outside_ms_per_step_repeats": r.get("outside_ms"),
        }
    a, b, c = (variants[v]["train_samples_per_s"] for v in VARIANTS)
    # (b) and (c) of the same round ran back to back: their ratio is less exposed to slow drift
    rounds = zip(results["lightning"]["train"], results["plain"]["train"], strict=True)
    per_round = [(c_i / b_i - 1) * 100 for b_i, c_i in rounds]
    # the same from the time outside the model's work: Lightning's ms per step over (c)'s step
    lightning_ms, phases = [], []
    plain = results["plain"]
    for b_i, c_i, sps in zip(
        results["lightning"]["outside_ms"], plain["outside_ms"], plain["train"], strict=True
    ):
        lightning_ms.append(b_i - c_i)
        phases.append((b_i - c_i) / (1000 * plain["batch_size"] / sps) * 100)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "lightning": L.__version__,
            "python": platform.python_version(),
        },
        "settings": {
            "batches": args.batches,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "eval_batches": args.eval_batches,
            "threads": args.threads,
            "overrides": args.overrides,
        },
        "flop_per_train_sample": train_flop,
        "flop_per_eval_sample": eval_flop,
        "peak_gflops": peak,
        "peak_estimate": peak_how,
        "ratio_b_over_a": b / a,
        "overhead_b_over_c_pct": (c / b - 1) * 100,
        "overhead_b_over_c_pct_per_round": per_round,
        "overhead_b_over_c_pct_median_of_rounds": statistics.median(per_round),
        "lightning_ms_per_step": statistics.median(lightning_ms),
        "overhead_from_phases_pct_per_round": phases,
        "overhead_from_phases_pct": statistics.median(phases),
        "variants": variants,
    }


def _cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def markdown(report: dict) -> str:
    """The report as a markdown table."""
    labels = {
        "notebook": "(a) notebook loop",
        "lightning": "(b) template, Lightning",
        "plain": "(c) template data, plain loop",
    }
    rows = [
        "| | batch | train samples/s | eval samples/s | GFLOP/s | of FP32 peak | peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in report["variants"].items():
        memory = v["peak_cuda_mib"] if v["peak_cuda_mib"] is not None else v["peak_rss_mib"]
        rows.append(
            f"| {labels[name]} | {v['batch_size']} | {v['train_samples_per_s']:,.0f} "
            f"| {v['eval_samples_per_s']:,.0f} | {v['train_gflops']:.1f} "
            f"| {v['train_peak_fraction']:.0%} | {memory:,.0f} MiB |"
        )
    m, s = report["machine"], report["settings"]
    v_b, v_c = report["variants"]["lightning"], report["variants"]["plain"]
    threads = report["variants"]["lightning"]["threads"]
    return "\n".join(
        [
            *rows,
            "",
            f"(b)/(a) = **{report['ratio_b_over_a']:.2f}x**; Lightning's overhead, (b) over (c): "
            f"**{report['overhead_b_over_c_pct']:.1f}%** (per round: "
            + ", ".join(f"{x:.1f}%" for x in report["overhead_b_over_c_pct_per_round"])
            + f"; their median {report['overhead_b_over_c_pct_median_of_rounds']:.1f}%).",
            f"Outside the model's work (training_step, backward, optimizer update) a step spends "
            f"{v_b['train_outside_ms_per_step']:.2f} ms in (b) and "
            f"{v_c['train_outside_ms_per_step']:.2f} ms in (c): Lightning adds "
            f"{report['lightning_ms_per_step']:.2f} ms per step, "
            f"**{report['overhead_from_phases_pct']:.1f}%** of (c)'s step (median of rounds: "
            + ", ".join(f"{x:.1f}%" for x in report["overhead_from_phases_pct_per_round"])
            + ").",
            f"{m['device']} ({m['cpu']}, {m['cpu_count']} cores, torch threads {threads}), "
            f"torch {m['torch']}, "
            f"lightning {m['lightning']}; median of {s['repeats']} repeats of {s['batches']} "
            f"batches after {s['warmup']} warm-up batches; "
            f"{report['flop_per_train_sample'] / 1e6:.1f} MFLOP per training sample; "
            f"FP32 peak {report['peak_gflops']:.0f} GFLOP/s ({report['peak_estimate']}); "
            f"overrides: {' '.join(s['overrides']) or 'none'}.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="config overrides for (b) and (c)")
    parser.add_argument("--batches", type=int, default=300, help="timed training batches")
    parser.add_argument("--warmup", type=int, default=20, help="untimed batches before timing")
    parser.add_argument("--repeats", type=int, default=5, help="the median is reported")
    parser.add_argument("--eval-batches", type=int, default=None, help="default: all of val")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--peak-gflops", type=float, default=None, help="override the estimate")
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR", str(ROOT / "data")))
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench"), help="output folder")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.warmup < 0 or args.repeats < 1 or (args.eval_batches or 2) < 1:
        parser.error("--batches, --repeats and --eval-batches must be >= 1, --warmup >= 0")

    from mnist_cnn.errors import CheckpointError, ConfigError, DataError
    from mnist_cnn.mnist_files import prepare_mnist
    from mnist_cnn.validate import check, explain

    try:
        try:  # the overrides, before any variant runs
            with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
                check(compose("train", overrides=args.overrides))
        except Exception as e:
            if (message := explain(e)) is None:
                raise
            raise ConfigError(message) from None
        prepare_mnist(args.data_dir)
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write --out {args.out}: {e.strerror}; pass a folder", file=sys.stderr)
        return 2
    args.overrides = [*args.overrides, f"data.data_dir={args.data_dir}"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak, peak_how = peak_gflops(device)
    if args.peak_gflops:
        peak, peak_how = args.peak_gflops, "given with --peak-gflops"
    out = Path(args.out)
    results = {}
    one = argparse.Namespace(**{**vars(args), "repeats": 1})
    with tempfile.TemporaryDirectory() as runs:
        for i in range(args.repeats):  # round robin: a change in load hits every variant alike
            # (b) and (c) swap places every other round, so neither always runs after the other
            for variant in VARIANTS if i % 2 == 0 else ("notebook", "plain", "lightning"):
                print(f"bench: {variant}, repeat {i + 1}", file=sys.stderr, flush=True)
                try:
                    r = run_variant(variant, one, args.data_dir, f"{runs}/{i}")
                except RuntimeError as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 2
                if variant in results:
                    r["train"] = results[variant]["train"] + r["train"]
                    r["eval"] = results[variant]["eval"] + r["eval"]
                    if "outside_ms" in r:
                        r["outside_ms"] = results[variant]["outside_ms"] + r["outside_ms"]
                    for key in ("peak_rss_mib", "peak_cuda_mib"):
                        if r.get(key) is not None:
                            r[key] = max(r[key], results[variant][key])
                results[variant] = r
    report = summarize(results, args, peak, peak_how)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "bench.md").write_text(table)
    print(table)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
