"""Local delivery next to a plain uproot skim writing the same parquet, side by side.

    python benchmarks/delivery.py [--events-per-file 300000] [--files 10] [--inputs DIR] [--repeat 3] [--real]

Generates NanoAOD files (agc_sx.generate; ``--inputs DIR`` keeps them for the next run), then times, each in
a fresh process (so that peak memory and CPU time are its own):

* ``deliver_local`` at its defaults (files in parallel on every core) and with ``--workers 1``: the skim query's
  func-adl-uproot code, traced once per branch layout and run eagerly, parquet verified and recorded;
* ``func-adl-uproot dask``: the same query the way it ran before (dask-awkward graph built per file), one process;
* ``plain uproot``: ``tree.arrays(columns, cut)`` with the skim as a cut expression, written as parquet, one process
  (as uproot comes, and with the ISA-L inflater agc-sx switches on);

and prints events/s, MB/s, wall and CPU seconds and peak RSS for each, checks that all of them wrote the same
events, and that deliver_local's parquet is bit-identical to the dask path's. ``--real`` adds the per-file cost
on the real 947-branch 2015 NanoAOD file of ../shared.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REAL = Path(__file__).resolve().parents[2] / "shared" / "agc" / "samples" / "nanoAOD_2015_CMS_Open_Data_ttbar.root"

#: The skim as an uproot cut expression; ``count`` (per-event number of true values) is added below.
CUT = (
    "(count((Electron_pt > 30) & (abs(Electron_eta) < 2.1) & (Electron_cutBased == 4) & (Electron_sip3d < 4))"
    " + count((Muon_pt > 30) & (abs(Muon_eta) < 2.1) & Muon_tightId & (Muon_sip3d < 4)"
    " & (Muon_pfRelIso04_all < 0.15)) == 1)"
    " & (count((Jet_pt > 25) & (abs(Jet_eta) < 2.4) & ((Jet_jetId & 4) != 0)) >= 4)"
    " & (count((Jet_pt > 25) & (abs(Jet_eta) < 2.4) & ((Jet_jetId & 4) != 0) & (Jet_btagCSVV2 > 0.5)) >= 1)"
)

#: The skim's output columns (agc_sx.query.OUTPUT_COLUMN_NAMES), spelled out so that the plain-uproot runs do not
#: import agc_sx.
COLUMNS = (
    "run", "luminosityBlock", "event", "nJet", "nElectron", "nMuon",
    "Jet_pt", "Jet_eta", "Jet_phi", "Jet_mass", "Jet_btagCSVV2", "Jet_qgl", "Jet_jetId",
    "Electron_pt", "Electron_eta", "Electron_phi", "Electron_mass", "Electron_charge", "Electron_cutBased",
    "Electron_sip3d", "Muon_pt", "Muon_eta", "Muon_phi", "Muon_mass", "Muon_charge", "Muon_tightId", "Muon_sip3d",
    "Muon_pfRelIso04_all",
)

METHODS = ("deliver_local", "deliver_local_1", "funcadl_dask", "plain_uproot", "plain_uproot_isal")
LABELS = {
    "deliver_local": "deliver_local (defaults: {workers} workers)",
    "deliver_local_1": "deliver_local --workers 1",
    "funcadl_dask": "func-adl-uproot dask, per file (before)",
    "plain_uproot": "plain uproot arrays(columns, cut) + parquet",
    "plain_uproot_isal": "  the same, inflating with ISA-L",
}


def _usage() -> tuple[float, float, float]:
    """(CPU seconds of this process and its finished children, peak RSS MB of this process, of its children)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    return cpu, own.ru_maxrss / 1024, children.ru_maxrss / 1024


def run_method(method: str, catalog_path: Path, out: Path) -> dict[str, Any]:
    """One measurement (in its own process): wall and CPU seconds, peak memory, rows kept."""
    import os

    import awkward as ak
    import uproot
    from uproot.language.python import PythonLanguage

    doc = json.loads(catalog_path.read_text())
    files = [f["path"] for v in doc.values() for s in v.values() for f in s["files"]]
    cpu0, _, _ = _usage()
    start = time.perf_counter()
    rows = 0
    if method.startswith("plain_uproot"):
        # uproot alone (agc_sx not imported: its ISA-L inflater is not switched on unless asked for)
        if method == "plain_uproot_isal":
            import uproot.compression

            uproot.compression._DecompressZLIB.library = "isal"
        language = PythonLanguage({**PythonLanguage.default_functions, "count": lambda m: ak.sum(m, axis=1)})
        out.mkdir(parents=True)
        for i, f in enumerate(files):
            with uproot.open(f) as root:
                array = root["Events"].arrays(list(COLUMNS), CUT, language=language)
            ak.to_parquet(array, out / f"{i:04d}.parquet")  # as agc_sx.delivery.common.write_parquet
            with open(out / f"{i:04d}.parquet", "rb+") as fh:
                os.fsync(fh.fileno())
            rows += len(array)
        wall = time.perf_counter() - start
        cpu, own_mb, child_mb = _usage()
        return {"wall": wall, "cpu": cpu - cpu0, "rss_mb": own_mb, "rss_children_mb": child_mb, "rows": rows}

    from agc_sx.catalogue import load_catalog
    from agc_sx.delivery.common import write_parquet
    from agc_sx.delivery.local import deliver_local
    from agc_sx.query import OUTPUT_COLUMN_NAMES, execute, query_text

    assert tuple(COLUMNS) == OUTPUT_COLUMN_NAMES
    catalog = load_catalog(catalog_path)
    if method.startswith("deliver_local"):
        report = deliver_local(catalog, out, workers=1 if method == "deliver_local_1" else None, quiet=True)
        assert report.ok, report.failures
        rows = sum(r.rows for r in report.manifest)
    elif method == "funcadl_dask":
        out.mkdir(parents=True)
        text = query_text()
        for i, f in enumerate(files):
            array = execute(text, f)
            write_parquet(array, out / f"{i:04d}.parquet")
            rows += len(array)
    wall = time.perf_counter() - start
    cpu, own_mb, child_mb = _usage()
    return {"wall": wall, "cpu": cpu - cpu0, "rss_mb": own_mb, "rss_children_mb": child_mb, "rows": rows}


def _measure(method: str, catalog_path: Path, out: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--one", method, str(catalog_path), str(out)],
                          capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _contents(folder: Path) -> Any:
    import awkward as ak

    files = sorted(folder.rglob("*.parquet"), key=lambda p: p.name)
    return ak.concatenate([ak.from_parquet(f) for f in files])


def compare(catalog_path: Path, events: int, nbytes: int, workers: int, repeat: int) -> None:
    from agc_sx.utils import sha256_file

    with tempfile.TemporaryDirectory() as tmp:
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
        for i in range(repeat):  # interleaved, so that a busy moment of the machine hits every method alike
            for m in METHODS:
                out = Path(tmp) / (m if i == repeat - 1 else f"{m}-{i}")
                runs[m].append(_measure(m, catalog_path, out))
                if i < repeat - 1:
                    shutil.rmtree(out, ignore_errors=True)
        # the median run of each method
        results = {m: sorted(r, key=lambda x: x["wall"])[len(r) // 2] for m, r in runs.items()}
        print(f"median of {repeat} runs each:")
        base = results["plain_uproot"]["wall"]
        print(f"{'':46s} {'wall':>7s} {'CPU':>7s} {'events/s':>11s} {'MB/s':>7s} {'peak RSS':>9s} "
              f"{'(workers)':>9s}  vs plain uproot")
        for m, r in results.items():
            print(f"{LABELS[m].format(workers=workers):46s} {r['wall']:6.2f}s {r['cpu']:6.2f}s "
                  f"{events / r['wall']:11,.0f} {nbytes / r['wall'] / 1e6:7.1f} {r['rss_mb']:7,.0f}MB "
                  f"{r['rss_children_mb']:7,.0f}MB  {base / r['wall']:5.2f}x")
        rows = {r["rows"] for r in results.values()}
        import awkward as ak

        same = ak.array_equal(_contents(Path(tmp) / "deliver_local"), _contents(Path(tmp) / "plain_uproot"))
        delivered = {p.name: sha256_file(p) for p in (Path(tmp) / "deliver_local").glob("*/*.parquet")}
        catalog = json.loads(catalog_path.read_text())
        paths = [f["path"] for v in catalog.values() for s in v.values() for f in s["files"]]
        dask = [sha256_file(Path(tmp) / "funcadl_dask" / f"{i:04d}.parquet") for i in range(len(paths))]
        identical = [delivered[Path(p).stem + ".parquet"] for p in paths] == dask
        print(f"  kept events: {', '.join(f'{r:,}' for r in sorted(rows))}; same events as plain uproot: {same}; "
              f"parquet bit-identical to the dask path: {identical}")
        if len(rows) != 1 or not same or not identical:
            print("  !! the methods disagree", file=sys.stderr)


def real_file_cost() -> None:
    """Fixed cost per file on the real 947-branch NanoAOD: dask graph per file vs traced once per layout."""
    from agc_sx.delivery.local import Skim
    from agc_sx.query import execute, query_text

    text = query_text()
    execute(text, str(REAL))  # imports and caches warm
    start = time.perf_counter()
    for _ in range(3):
        execute(text, str(REAL))
    dask = (time.perf_counter() - start) / 3
    skim = Skim(text)
    start = time.perf_counter()
    skim(str(REAL))
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(3):
        skim(str(REAL))
    eager = (time.perf_counter() - start) / 3
    print(f"\nreal 2015 NanoAOD (947 branches, 200 events), per file: func-adl-uproot dask {dask:.2f} s; "
          f"deliver_local {first:.2f} s for the first file of a layout (traced), {eager:.2f} s for each next one")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events-per-file", type=int, default=300_000)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--inputs", type=Path, default=None, help="keep the generated files here (reused if there)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each method (the median is shown)")
    parser.add_argument("--real", action="store_true", help="also the per-file cost on the real 947-branch file")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "CATALOG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, catalog, out = args.one
        print(json.dumps(run_method(method, Path(catalog), Path(out))))
        return

    import uproot

    from agc_sx.delivery.local import default_workers
    from agc_sx.generate import generate

    with tempfile.TemporaryDirectory() as tmp:
        where = args.inputs or Path(tmp) / "gen"
        catalog_path = where / "ntuples.json"
        if not catalog_path.exists():
            generate(where, events_per_file=args.events_per_file, files_per_sample=args.files, seed=args.seed,
                     samples=["ttbar__nominal"])
        catalog = json.loads(catalog_path.read_text())
        paths = [Path(f["path"]) for v in catalog.values() for s in v.values() for f in s["files"]]
        events = sum(uproot.open(p)["Events"].num_entries for p in paths)
        nbytes = sum(p.stat().st_size for p in paths)
        for p in paths:  # read once, so that every method finds the files in the page cache
            p.read_bytes()
        print(f"generated NanoAOD: {len(paths)} files, {events:,} events, {nbytes / 1e6:,.0f} MB; "
              f"{default_workers()} cores")
        compare(catalog_path, events, nbytes, default_workers(), args.repeat)
    if args.real:
        if REAL.exists():
            real_file_cost()
        else:
            print(f"\n{REAL} not available", file=sys.stderr)


if __name__ == "__main__":
    main()
