"""python -m benchmarks.bench in its reduced mode, as a real subprocess."""

import json
import math
import subprocess

import pytest
from conftest import cli

from benchmarks.bench import VARIANTS, _cpu_flop_per_cycle, flop_per_sample
from mnist_cnn import ROOT

VARIANT_FIELDS = {
    "train_samples_per_s",
    "train_samples_per_s_repeats",
    "eval_samples_per_s",
    "eval_samples_per_s_repeats",
    "batch_size",
    "eval_batch_size",
    "peak_rss_mib",
    "peak_cuda_mib",
    "threads",
    "train_gflops",
    "train_peak_fraction",
    "train_outside_ms_per_step",
    "train_outside_ms_per_step_repeats",
}
REPORT_FIELDS = {
    "date",
    "machine",
    "settings",
    "flop_per_train_sample",
    "flop_per_eval_sample",
    "peak_gflops",
    "peak_estimate",
    "ratio_b_over_a",
    "overhead_b_over_c_pct",
    "overhead_b_over_c_pct_per_round",
    "overhead_b_over_c_pct_median_of_rounds",
    "lightning_ms_per_step",
    "overhead_from_phases_pct_per_round",
    "overhead_from_phases_pct",
    "variants",
}


def bench(*args: str) -> subprocess.CompletedProcess:
    return cli("benchmarks.bench", *args, cwd=ROOT, code=None, timeout=300)


@pytest.mark.slow
def test_reduced_bench_writes_json_with_every_field_and_a_table(data_dir, tmp_path):
    done = bench(
        *("--batches", "2", "--warmup", "1", "--repeats", "2", "--eval-batches", "2"),
        *("--threads", "1", "--data-dir", str(data_dir), "--out", str(tmp_path)),
        "data.batch_size=32",  # overrides reach (b) and (c), not the notebook's loop
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report.keys() == REPORT_FIELDS and report["variants"].keys() == set(VARIANTS)
    for name, v in report["variants"].items():
        assert v.keys() == VARIANT_FIELDS, name
        assert len(v["train_samples_per_s_repeats"]) == len(v["eval_samples_per_s_repeats"]) == 2
        assert v["train_samples_per_s"] > 0 and v["eval_samples_per_s"] > 0
        assert v["peak_rss_mib"] > 100 and v["threads"] == 1
    assert [report["variants"][n]["batch_size"] for n in VARIANTS] == [64, 32, 32]
    # the time outside the model's work is a part of each step of (b) and (c), not all of it
    outside = {}
    for name in ("lightning", "plain"):
        v = report["variants"][name]
        outside[name] = v["train_outside_ms_per_step_repeats"]
        steps_ms = [1000 * v["batch_size"] / sps for sps in v["train_samples_per_s_repeats"]]
        assert all(0 < o < ms for o, ms in zip(outside[name], steps_ms, strict=True)), name
    assert report["variants"]["notebook"]["train_outside_ms_per_step"] is None
    assert math.isfinite(report["peak_gflops"]) and report["peak_gflops"] > 0
    table = (tmp_path / "bench.md").read_text()
    for label in ("(a) notebook loop", "(b) template, Lightning", "(c) template data, plain loop"):
        assert label in table
    assert table in done.stdout


@pytest.mark.slow
def test_bad_arguments_and_missing_data_exit_2_with_a_clear_message(tmp_path):
    done = bench("--batches", "0", "--out", str(tmp_path))
    assert done.returncode == 2 and "--batches" in done.stderr
    done = bench("--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path))
    assert done.returncode == 2 and "MNIST_DATA_DIR" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "bench.json").exists()
    # a misspelt override is named before any variant runs; an --out that cannot be a folder
    done = bench("trainer.max_epoch=3", "--out", str(tmp_path))
    assert done.returncode == 2 and "did you mean trainer.max_epochs?" in done.stderr
    assert "bench: notebook" not in done.stderr
    (tmp_path / "file").write_text("")
    done = bench("--out", str(tmp_path / "file" / "bench"))
    assert done.returncode == 2 and "cannot write --out" in done.stderr
    assert "Traceback" not in done.stderr


def test_flops_per_sample_match_the_layer_arithmetic():
    macs = 28 * 28 * 32 * 25 + 14 * 14 * 64 * 32 * 25 + 3136 * 1024 + 1024 * 10
    assert flop_per_sample(train=False) == 2 * macs
    assert 2.9 < flop_per_sample(train=True) / flop_per_sample(train=False) < 3.0  # no conv1 dgrad


def test_cpu_peak_uses_the_vector_units():
    assert _cpu_flop_per_cycle({"avx512f", "avx2", "fma"}, "AuthenticAMD") == 32
    assert _cpu_flop_per_cycle({"avx512f", "avx2", "fma"}, "GenuineIntel") == 64
    assert _cpu_flop_per_cycle({"avx2", "fma"}, "GenuineIntel") == 32
    assert _cpu_flop_per_cycle(set(), "") == 8
