"""The AGC notebook's three pipelines on one generated sample set, side by side.

    python benchmarks/pipelines.py [--events-per-file 20000] [--files-per-sample 2] [--workers 2] [--no-ml]

* ``direct``          (the notebook's ``coffea``): the processor reads the NanoAOD ROOT files itself;
* ``deliver+process`` (``servicex_databinder``): the skim is delivered (local backend), then processed;
* ``streaming``       (``servicex_processor``): processing overlaps the delivery (``agc-sx run``).

Each pipeline starts from nothing in a fresh folder and runs in its own process (peak RSS is its own). The
table gives input events per second of wall time, MB read by the processor (the delivered parquet for the
delivery pipelines, the ROOT branches for direct), wall time and peak RSS; the histograms of all three are
checked to be identical.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path
from typing import Any


def _run(pipeline: str, catalog_path: str, workdir: str, workers: int, ml: bool, queue: Any) -> None:
    from agc_sx.catalogue import load_catalog

    catalog = load_catalog(catalog_path)
    base = Path(workdir)
    output = base / "histograms.root"
    t0 = time.perf_counter()
    executor = "futures" if workers > 1 else "iterative"
    if pipeline == "direct":
        from agc_sx.processor import run_direct

        result = run_direct(catalog, output=output, executor=executor, workers=workers, ml=ml, quiet=True)
    elif pipeline == "deliver+process":
        from agc_sx.delivery.local import deliver_local
        from agc_sx.processor import run_processor

        report = deliver_local(catalog, base / "delivered", workers=workers, quiet=True)
        assert report.ok, report.failures
        result = run_processor(base / "delivered", output=output, executor=executor, workers=workers, ml=ml,
                               quiet=True)
    else:
        from agc_sx.streaming import run_streaming

        result = run_streaming(catalog, base / "delivered", backend="local", output=output, workers=workers,
                               ml=ml, quiet=True)
    wall = time.perf_counter() - t0
    queue.put({
        "wall": wall,
        "bytes": result.metrics.get("bytes_read", 0),
        "overlap": result.metrics.get("overlap_fraction"),
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "histograms": str(output),
    })


def _identical(a: str, b: str) -> bool:
    import numpy as np
    import uproot

    with uproot.open(a) as fa, uproot.open(b) as fb:
        keys = fa.keys(cycle=False)
        return keys == fb.keys(cycle=False) and all(
            np.array_equal(fa[k].values(), fb[k].values()) and np.array_equal(fa[k].variances(), fb[k].variances())
            for k in keys
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events-per-file", type=int, default=20000)
    parser.add_argument("--files-per-sample", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-ml", action="store_true", help="without the BDT")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    from agc_sx.generate import generate

    work = args.workdir or Path(tempfile.mkdtemp(prefix="agc-pipelines-"))
    catalog = generate(work / "nanoaod", events_per_file=args.events_per_file,
                       files_per_sample=args.files_per_sample, seed=7)
    n_events = catalog.nevts
    print(f"{n_events:,} generated events in {catalog.n_files} files, {args.workers} workers, "
          f"BDT {'off' if args.no_ml else 'on'}; folder {work}")

    ctx = mp.get_context("spawn")
    rows = {}
    for pipeline in ("direct", "deliver+process", "streaming"):
        queue = ctx.Queue()
        folder = work / pipeline.replace("+", "_")
        folder.mkdir(parents=True, exist_ok=True)
        proc = ctx.Process(target=_run, args=(pipeline, str(work / "nanoaod" / "ntuples.json"), str(folder),
                                               args.workers, not args.no_ml, queue))
        proc.start()
        rows[pipeline] = queue.get()
        proc.join()

    print(f"\n{'pipeline':<17}{'events/s':>12}{'MB read':>10}{'wall [s]':>10}{'peak RSS [MB]':>15}{'overlap':>9}")
    for pipeline, r in rows.items():
        overlap = f"{r['overlap']:.0%}" if r["overlap"] is not None else "-"
        print(f"{pipeline:<17}{n_events / r['wall']:>12,.0f}{r['bytes'] / 1e6:>10.1f}{r['wall']:>10.1f}"
              f"{r['rss_mb']:>15.0f}{overlap:>9}")
    first = rows["direct"]["histograms"]
    same = all(_identical(first, r["histograms"]) for r in rows.values())
    print(f"\nhistograms identical across the three pipelines: {same}")
    (work / "pipelines.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
