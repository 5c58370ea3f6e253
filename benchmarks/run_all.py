"""Run every benchmark (``make bench``); each writes JSON under benchmarks/results/."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ["benchmarks.bench_io", "benchmarks.bench_engine", "benchmarks.bench_denoise", "benchmarks.bench_segment",
              "benchmarks.bench_uncertainty", "benchmarks.bench_restore", "benchmarks.bench_embed", "benchmarks.bench_precision",
              "benchmarks.bench_wholeslide", "benchmarks.bench_workflow", "benchmarks.bench_gpu"]  # bench_gpu skips itself without CUDA


def main() -> int:
    names = sys.argv[1:] or BENCHMARKS
    for name in names:
        print(f"== {name}", flush=True)
        importlib.import_module(name).main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
