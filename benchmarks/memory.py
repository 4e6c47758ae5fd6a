"""Peak memory of direct processing (``agc-sx process --catalog``) against the size of the dataset.

    python benchmarks/memory.py [--events-per-file 1400000] [--files 2 6 14] [--workdir DIR] [--ml]

Generates one ttbar NanoAOD file (``agc_sx.generate``) and hard-links it into catalogues of 2, 6 and 14 files
(hard links are distinct files to the catalogue's duplicate check, and cost no disk), then runs
``agc-sx process --catalog`` on each in a fresh process with one worker (``--workers 1``: everything in that
process, so its peak RSS is the worker's) at the default chunk size, and prints events, wall time, events/s and
peak RSS side by side. Flat peaks mean that nothing is kept between chunks and files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _catalog(source: Path, n_files: int, nevts: int, xsec: float, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n_files):
        link = folder / f"ttbar_{i:03d}.root"
        if not link.exists():
            os.link(source, link)
        files.append({"path": str(link), "nevts": nevts})
    path = folder / "ntuples.json"
    path.write_text(json.dumps({"ttbar": {"nominal": {"files": files, "xsec": xsec}}}))
    return path


def _run(catalog: Path, out: Path, ml: bool) -> dict[str, float]:
    code = ("import resource, sys; from agc_sx.cli import main; sys.argv[0] = 'agc-sx'\n"
            "try:\n    main()\nfinally:\n"
            "    print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)\n")
    args = ["process", "--catalog", str(catalog), "--workers", "1", "--quiet", "--output", str(out / "h.root")]
    if not ml:
        args.append("--no-ml")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, None):
        raise SystemExit(f"agc-sx process failed:\n{proc.stderr[-2000:]}")
    peak = float(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_MB")))
    metrics = json.loads((out / "metrics.json").read_text())
    return {"events": metrics["events_read"], "wall": wall, "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events-per-file", type=int, default=1_400_000)
    parser.add_argument("--files", type=int, nargs="+", default=[2, 6, 14])
    parser.add_argument("--workdir", type=Path, default=None, help="keep the generated file here for reuse")
    parser.add_argument("--ml", action="store_true", help="with the BDT (default: without)")
    args = parser.parse_args()

    from agc_sx.generate import generate

    work = args.workdir or Path(tempfile.mkdtemp(prefix="agc-sx-memory-"))
    source_dir = work / f"source_{args.events_per_file}"
    if not (source_dir / "ntuples.json").exists():
        print(f"generating {args.events_per_file:,} ttbar events ...", flush=True)
        generate(source_dir, events_per_file=args.events_per_file, files_per_sample=1, samples=["ttbar__nominal"])
    entry = json.loads((source_dir / "ntuples.json").read_text())["ttbar"]["nominal"]
    source = Path(entry["files"][0]["path"])
    nevts = int(entry["files"][0]["nevts"])

    print(f"{'files':>5} {'events':>12} {'wall s':>8} {'events/s':>10} {'peak RSS MB':>12}")
    for n in args.files:
        folder = work / f"cat_{n}"
        r = _run(_catalog(source, n, nevts, float(entry["xsec"]), folder), folder, args.ml)
        print(f"{n:>5} {r['events']:>12,} {r['wall']:>8.1f} {r['events'] / r['wall']:>10,.0f} {r['peak']:>12.0f}",
              flush=True)
    print(f"(this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; inputs in {work})")


if __name__ == "__main__":
    main()
