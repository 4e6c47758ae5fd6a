"""Local-delivery throughput next to a plain uproot read of the same columns with the same cut.

    python benchmarks/delivery.py [--events-per-file 20000] [--files 3] [--workers 1] [--real]

Generates NanoAOD files (agc_sx.generate), then times

* ``deliver_local``: the func-adl-uproot path (qastle -> generated code -> uproot.dask -> parquet, verified,
  manifest written after every file) - what ``agc-sx deliver --backend local`` does;
* ``uproot.open(f)["Events"].arrays(columns, cut)`` with the skim as a cut expression (no output written),

and prints input events/s, input MB/s and peak memory for each. ``--real`` adds the 200-event real NanoAOD
file of ../shared (947 branches), which shows the fixed per-file cost of the func-adl-uproot path.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import awkward as ak
import numpy as np
import uproot
from uproot.language.python import PythonLanguage

from agc_sx.catalogue import Catalog, InputFile, Sample
from agc_sx.delivery import deliver_local
from agc_sx.query import OUTPUT_COLUMN_NAMES, execute, query_text

REAL = Path(__file__).resolve().parents[2] / "shared" / "agc" / "samples" / "nanoAOD_2015_CMS_Open_Data_ttbar.root"

#: The skim as an uproot cut expression; ``count`` (per-event number of true values) is added below.
CUT = (
    "(count((Electron_pt > 30) & (abs(Electron_eta) < 2.1) & (Electron_cutBased == 4) & (Electron_sip3d < 4))"
    " + count((Muon_pt > 30) & (abs(Muon_eta) < 2.1) & Muon_tightId & (Muon_sip3d < 4)"
    " & (Muon_pfRelIso04_all < 0.15)) == 1)"
    " & (count((Jet_pt > 25) & (abs(Jet_eta) < 2.4) & ((Jet_jetId & 4) != 0)) >= 4)"
    " & (count((Jet_pt > 25) & (abs(Jet_eta) < 2.4) & ((Jet_jetId & 4) != 0) & (Jet_btagCSVV2 > 0.5)) >= 1)"
)
LANGUAGE = PythonLanguage({**PythonLanguage.default_functions, "count": lambda m: ak.sum(m, axis=1)})


def peak_mb() -> tuple[float, float]:
    """Peak resident memory (MB) of this process and of its finished children (worker processes)."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return self_kb / 1024, child_kb / 1024


def line(label: str, seconds: float, events: int, nbytes: int, rows: int) -> None:
    own, children = peak_mb()
    print(
        f"{label:<34s} {seconds:7.2f} s  {events / seconds:10,.0f} events/s  {nbytes / seconds / 1e6:7.1f} MB/s"
        f"  kept {rows:,}  peak RSS {own:,.0f} MB (children {children:,.0f} MB)"
    )


def bench(files: list[Path], workers: int, label: str) -> None:
    counts = [uproot.open(f)["Events"].num_entries for f in files]
    events = sum(counts)
    nbytes = sum(f.stat().st_size for f in files)
    print(f"\n{label}: {len(files)} files, {events:,} events, {nbytes / 1e6:.1f} MB")
    catalog = Catalog((Sample("ttbar", "nominal", tuple(InputFile(str(f), n) for f, n in zip(files, counts, strict=True)), 1.0, events),))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = deliver_local(catalog, Path(tmp) / "out", workers=workers, quiet=True)
        seconds = time.perf_counter() - start
        assert report.ok, report.failures
        rows = report.manifest.samples["ttbar__nominal"].rows
    line(f"deliver_local (workers={workers})", seconds, events, nbytes, rows)

    start = time.perf_counter()
    kept = 0
    for f in files:
        with uproot.open(f) as root:
            kept += len(root["Events"].arrays(list(OUTPUT_COLUMN_NAMES), CUT, language=LANGUAGE))
    line("uproot arrays(columns, cut)", time.perf_counter() - start, events, nbytes, kept)
    if kept != rows:
        print(f"  !! the two selections differ: {rows} vs {kept}", file=sys.stderr)

    per_file = []
    for f in files:
        start = time.perf_counter()
        execute(query_text(), str(f))
        per_file.append(time.perf_counter() - start)
    print(f"  execute() alone per file (warm, this process): {np.mean(per_file):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events-per-file", type=int, default=20_000)
    parser.add_argument("--files", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--real", action="store_true", help="also time the real 947-branch NanoAOD file")
    args = parser.parse_args()

    from agc_sx.generate import generate

    with tempfile.TemporaryDirectory() as tmp:
        catalog = generate(Path(tmp) / "gen", events_per_file=args.events_per_file, files_per_sample=args.files,
                           seed=args.seed, samples=["ttbar__nominal"])
        files = [Path(f.path) for s in catalog for f in s.files]
        execute(query_text(), str(files[0]))  # warm up imports and the generated function once
        bench(files, args.workers, "generated NanoAOD")
    if args.real:
        if REAL.exists():
            bench([REAL], 1, "real 2015 NanoAOD (947 branches)")
        else:
            print(f"\n{REAL} not available", file=sys.stderr)


if __name__ == "__main__":
    main()
