"""Benchmark of ``agc_sx.generate``: events/s and peak memory for the default demo set (or a chosen size).

    python benchmarks/generate.py [--events-per-file N] [--files-per-sample K] [--samples NAME ...]

Runs once for timing, then once more under ``tracemalloc`` for the peak traced allocation (numpy reports its
buffers to tracemalloc); also prints the process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from agc_sx.generate import DEFAULT_EVENTS_PER_FILE, DEFAULT_FILES_PER_SAMPLE, generate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events-per-file", type=int, default=DEFAULT_EVENTS_PER_FILE)
    parser.add_argument("--files-per-sample", type=int, default=DEFAULT_FILES_PER_SAMPLE)
    parser.add_argument("--samples", nargs="*", default=None, help="sample or process names (default: all)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    kwargs = {"events_per_file": args.events_per_file, "files_per_sample": args.files_per_sample,
              "seed": args.seed, "samples": args.samples}
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp) / "warmup", events_per_file=200, samples=["wjets"])  # imports, first-call costs
        start = time.perf_counter()
        catalog = generate(Path(tmp) / "timed", **kwargs)
        elapsed = time.perf_counter() - start
        size = sum(Path(f.path).stat().st_size for s in catalog for f in s.files)
        tracemalloc.start()
        generate(Path(tmp) / "traced", **kwargs)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024**2)
    print(f"samples: {len(catalog)}, files: {catalog.n_files}, events: {catalog.nevts:,}, "
          f"written: {size / 1e6:.1f} MB")
    print(f"wall time: {elapsed:.2f} s  ->  {catalog.nevts / elapsed:,.0f} events/s")
    print(f"peak traced memory: {peak / 1e6:.1f} MB, peak RSS: {rss:.0f} MB")


if __name__ == "__main__":
    main()
