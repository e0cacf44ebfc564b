"""Studies of this template's speed, run from the repo root: python -m benchmarks.bench."""
