"""Events/s per core of ``agc-sx process`` (without the BDT) next to a straightforward coffea-NanoEvents
implementation of the same physics, with peak memory, on a synthetic skim written directly as parquet.

    /work/venv/bin/python benchmarks/process.py [--events 1200000] [--files 4] [--workdir DIR] [--skip-baseline]

The baseline is the AGC notebook's processor written the obvious way (NanoEvents collections, boolean masks,
``ak.combinations`` + ``ak.argmax`` with coffea's vector behaviour, one ``hist`` fill per variation), using our
deterministic ``pt_res_up`` factors so the two can be compared bin by bin. Each implementation runs in a fresh
process so that peak RSS is its own. The ``agc-sx process`` command itself is also timed as a user runs it, in
a fresh interpreter with its imports (~1 s of CPU for coffea, awkward, numba, ...) included.

With ``--ml`` the comparison is the one a user sees at real scale: the whole ``agc-sx process`` command at its
defaults (all cores, the BDT on, the official AGC models when ``../shared/agc/models`` exists) against the
seed-style coffea processor on all cores (``FuturesExecutor``, as the AGC notebook runs it) that fills the same
20 BDT-feature histograms, choosing each event's permutation the AGC notebook's way (per-event permutation
lists, awkward gathers, crossed ``DMatrix`` prediction, ``ak.argmax``; ``benchmarks/ml.py``).

    /work/venv/bin/python benchmarks/process.py --ml [--events 213556]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

XSEC = 729.84
F32 = np.float32


def synthesise(base: Path, n_events: int, n_files: int, seed: int = 1) -> None:
    """A skim-like ttbar sample: one lepton-ish, 4-8 pT-ordered jets above 25 GeV, >= 1 b-tag-ish."""
    import awkward as ak

    from agc_sx.manifest import Manifest, OutputFile, SampleRecord
    from agc_sx.utils import sha256_file

    rng = np.random.default_rng(seed)
    manifest = Manifest.open_or_create(base)
    record = SampleRecord("ttbar", "nominal", XSEC, "synthetic", inputs=[])
    per_file = n_events // n_files
    for i in range(n_files):
        n = per_file
        nj = rng.choice([3, 4, 4, 5, 5, 6, 6, 7, 8], n)
        J = int(nj.sum())

        def jag(counts: np.ndarray, v: np.ndarray) -> Any:
            return ak.unflatten(v, counts)

        pt = np.sort(jag(nj, (25 + rng.exponential(40, J)).astype(F32)), axis=1)[:, ::-1]
        ne = rng.choice([0, 1, 1, 2], n)
        nm = rng.choice([0, 0, 1, 2], n)
        cols: dict[str, Any] = {
            "run": np.ones(n, np.uint32), "luminosityBlock": rng.integers(1, 1000, n).astype(np.uint32),
            "event": (np.arange(n) + i * per_file).astype(np.uint64),
            "nJet": nj.astype(np.uint32), "nElectron": ne.astype(np.uint32), "nMuon": nm.astype(np.uint32),
            "Jet_pt": pt, "Jet_eta": jag(nj, rng.uniform(-2.5, 2.5, J).astype(F32)),
            "Jet_phi": jag(nj, rng.uniform(-np.pi, np.pi, J).astype(F32)),
            "Jet_mass": jag(nj, rng.uniform(3, 20, J).astype(F32)),
            "Jet_btagCSVV2": jag(nj, np.where(rng.random(J) < 0.3, rng.uniform(0.5, 1, J),
                                              rng.uniform(0, 0.6, J)).astype(F32)),
            "Jet_qgl": jag(nj, rng.uniform(0, 1, J).astype(F32)),
            "Jet_jetId": jag(nj, rng.choice([2, 6, 6, 6, 6, 6, 6, 6], J).astype(np.int32)),
        }
        for name, c in (("Electron", ne), ("Muon", nm)):
            L = int(c.sum())
            cols[f"{name}_pt"] = jag(c, (25 + rng.exponential(30, L)).astype(F32))
            cols[f"{name}_eta"] = jag(c, rng.uniform(-2.4, 2.4, L).astype(F32))
            cols[f"{name}_phi"] = jag(c, rng.uniform(-np.pi, np.pi, L).astype(F32))
            cols[f"{name}_mass"] = jag(c, np.full(L, 0.1, F32))
            cols[f"{name}_charge"] = jag(c, rng.choice([-1, 1], L).astype(np.int32))
            cols[f"{name}_sip3d"] = jag(c, rng.exponential(1.5, L).astype(F32))
        L = int(ne.sum())
        cols["Electron_cutBased"] = jag(ne, rng.choice([2, 3, 4, 4, 4], L).astype(np.int32))
        L = int(nm.sum())
        cols["Muon_tightId"] = jag(nm, rng.random(L) < 0.9)
        cols["Muon_pfRelIso04_all"] = jag(nm, rng.exponential(0.06, L).astype(F32))
        rel = f"ttbar__nominal/part{i:03d}.parquet"
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        ak.to_parquet(ak.Array(cols), path, row_group_size=None)
        nevts = 3 * n
        record.inputs.append({"path": f"synthetic_{i}.root", "nevts": nevts})
        record.set_output(OutputFile(rel, f"synthetic_{i}.root", nevts, n, path.stat().st_size,
                                     sha256_file(path), "synthetic"))
    record.finish()
    manifest.samples[record.name] = record
    manifest.save()


# --------------------------------------------------------------------------------------------------------------
# baseline: the AGC processor written straightforwardly with NanoEvents


def _baseline_processor(models_dir: Path | None = None) -> Any:
    import awkward as ak
    import hist
    import xgboost as xgb
    from coffea import processor
    from ml import agc_style_choice, agc_style_features

    from agc_sx.constants import ML_FEATURES
    from agc_sx.ml import MODEL_EVEN, MODEL_ODD
    from agc_sx.systematics import jer_factors

    models = None
    if models_dir is not None:
        models = tuple(xgb.Booster(model_file=str(models_dir / name)) for name in (MODEL_EVEN, MODEL_ODD))
        for booster in models:
            booster.set_param({"nthread": 1})  # one process per core

    class Baseline(processor.ProcessorABC):  # type: ignore[misc]
        def process(self, events: Any) -> Any:
            h = (hist.Hist.new.StrCat([], name="key", growth=True)
                 .Reg(25, 50, 550, name="observable").Weight())
            ml_hists = {name: hist.Hist.new.StrCat([], name="key", growth=True).Reg(bins, lo, hi, name="x").Weight()
                        for name, bins, lo, hi in ML_FEATURES} if models else {}
            weight = events.metadata["xsec_weight"]
            ele = events.Electron
            mu = events.Muon
            ele = ele[(ele.pt > 30) & (abs(ele.eta) < 2.1) & (ele.cutBased == 4) & (ele.sip3d < 4)]
            mu = mu[(mu.pt > 30) & (abs(mu.eta) < 2.1) & mu.tightId & (mu.sip3d < 4) & (mu.pfRelIso04_all < 0.15)]
            jets = events.Jet
            counts = ak.to_numpy(ak.num(jets.pt))
            factors = jer_factors(ak.to_numpy(events.run), ak.to_numpy(events.luminosityBlock),
                                  ak.to_numpy(events.event), np.concatenate([[0], np.cumsum(counts)]))
            variations = {"nominal": jets.pt, "pt_scale_up": jets.pt * np.float64(1.03),
                          "pt_res_up": jets.pt * ak.unflatten(factors, counts)}
            for var, pt in variations.items():
                vjets = ak.with_field(jets, pt, "pt")
                sel = vjets[(vjets.pt > 30) & (abs(vjets.eta) < 2.4) & ((vjets.jetId & 4) != 0)]
                event_ok = ((ak.num(ele) + ak.num(mu)) == 1) & (ak.num(sel) >= 4)
                nb = ak.sum(sel.btagCSVV2 > 0.5, axis=1)
                for region, mask in (("4j1b", event_ok & (nb == 1)), ("4j2b", event_ok & (nb >= 2))):
                    rj = sel[mask]
                    if region == "4j1b":
                        obs = ak.sum(rj.pt, axis=-1)
                    else:
                        tri = ak.combinations(rj, 3, fields=["j1", "j2", "j3"])
                        p4 = tri.j1 + tri.j2 + tri.j3
                        max_btag = np.maximum(tri.j1.btagCSVV2, np.maximum(tri.j2.btagCSVV2, tri.j3.btagCSVV2))
                        p4 = p4[max_btag > 0.5]
                        obs = ak.flatten(p4[ak.argmax(p4.pt, axis=1, keepdims=True)].mass)
                    obs = ak.to_numpy(obs).astype(np.float64)
                    suffix = "" if var == "nominal" else f"_{var}"
                    h.fill(key=f"{region}_ttbar{suffix}", observable=obs, weight=weight)
                    if models and region == "4j2b" and len(rj):
                        lepton = ak.concatenate([ele, mu], axis=1)[mask][:, 0]
                        features, counts = agc_style_features(rj, lepton)
                        best = agc_style_choice(features, counts, ak.to_numpy(events.event[mask]), *models)
                        chosen = features[np.cumsum(counts) - counts + best]
                        for i, (name, *_) in enumerate(ML_FEATURES):
                            ml_hists[name].fill(key=f"ttbar{suffix}", x=chosen[:, i], weight=weight)
                    if var == "nominal":
                        for i in range(4):
                            w = 1 + np.array([0.075, -0.075]) * ak.to_numpy(rj.pt[:, i] / 50)[:, None]
                            h.fill(key=f"{region}_ttbar_btag_var_{i}_up", observable=obs, weight=weight * w[:, 0])
                            h.fill(key=f"{region}_ttbar_btag_var_{i}_down", observable=obs,
                                   weight=weight * w[:, 1])
            return {"hist": h, "ml": ml_hists, "events": len(events)}

        def postprocess(self, accumulator: Any) -> Any:
            return accumulator

    return Baseline()


def _run_ours(base: Path, out: Path, io_only: bool, queue: Any) -> None:
    """Two runs in one fresh process (imports done before timing): the first pays the one-time start-up inside
    the run (numba's typing context ~0.6 s, pandas imported by pyarrow's array conversion ~0.3 s), the second
    shows the steady state a long run converges to."""
    from agc_sx.processor import run_processor

    runs = []
    for _ in range(2):
        t0, c0 = time.perf_counter(), time.process_time()
        result = run_processor(base, output=out, ml=False, quiet=True, io_only=io_only)
        runs.append((time.perf_counter() - t0, time.process_time() - c0, result.metrics["cpu_seconds_processing"]))
    values = {k: h.values(flow=True).tolist() for k, h in result.histograms.items()}
    queue.put({"wall": runs[0][0], "cpu": runs[0][1], "events": result.metrics["events_read"], "values": values,
               "chunk_cpu": runs[0][2], "warm_wall": runs[1][0], "warm_cpu": runs[1][1], "warm_chunk_cpu": runs[1][2],
               "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def _run_baseline(base: Path, models_dir: Path | None, workers: int, queue: Any) -> None:
    """The baseline processor, without the BDT in this process, with it on ``workers`` processes."""
    from coffea import processor

    from agc_sx.manifest import Manifest
    from agc_sx.processor import sample_weight
    from agc_sx.schema import AGCSkimSchema

    manifest = Manifest.load(base)
    rec = manifest.samples["ttbar__nominal"]
    fileset = {"ttbar__nominal": {"files": [str(base / o.file) for o in sorted(rec.outputs, key=lambda o: o.file)],
                                  "treename": "events", "metadata": {"xsec_weight": sample_weight(rec)}}}
    t0, c0 = time.perf_counter(), time.process_time()
    executor = (processor.FuturesExecutor(workers=workers, status=False) if workers > 1
                else processor.IterativeExecutor(status=False))
    runner = processor.Runner(executor=executor, schema=AGCSkimSchema, format="parquet",
                              chunksize=max(o.rows for o in rec.outputs))
    proc = _baseline_processor(models_dir)
    out = runner(fileset, proc, treename="events")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    values = {}
    for prefix, h in [("", out["hist"]), *((f"{name}_", ml) for name, ml in out["ml"].items())]:
        for key in h.axes[0]:
            v = h[{"key": key}].values(flow=True)
            if v[1:-1].sum() != 0:
                values[prefix + key] = v.tolist()
    queue.put({"wall": wall, "cpu": cpu, "events": out["events"], "values": values,
               "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def _run_cli(base: Path, out: Path, *options: str) -> dict[str, Any]:
    """``agc-sx process`` (default ``--no-ml``) in a fresh interpreter, imports included: wall, CPU (with the
    worker processes it waited for) and peak RSS of that child."""
    cmd = [sys.executable, "-c", "from agc_sx.cli import main; main()", "process", str(base), "--quiet",
           "-o", str(out), *(options or ("--no-ml",))]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    metrics = json.loads((out.parent / "metrics.json").read_text())
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "events": metrics["events_read"],
            "rss_mb": usage.ru_maxrss / 1024}


def _in_subprocess(target: Any, *args: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result: dict[str, Any] = queue.get()
    proc.join()
    return result


def compare_with_ml(base: Path, work: Path) -> None:
    """``agc-sx process`` at its defaults with the BDT against the seed-style processor, both on all cores."""
    import uproot
    from ml import OFFICIAL

    from agc_sx.constants import ML_FEATURES
    from agc_sx.ml import MODEL_EVEN
    from agc_sx.resources import default_models_dir

    models = OFFICIAL if (OFFICIAL / MODEL_EVEN).is_file() else default_models_dir()
    cores = os.cpu_count() or 1
    print(f"BDT models: {models}; {cores} cores")
    _run_cli(base, work / "warm-ml" / "histograms.root", "--models", str(models))  # numba's on-disk cache
    ours = _run_cli(base, work / "ml" / "histograms.root", "--models", str(models))
    metrics = json.loads((work / "ml" / "metrics.json").read_text())
    baseline = _in_subprocess(_run_baseline, base, models, cores)
    print(f"\n{'implementation (BDT on, ' + str(cores) + ' cores)':52s} {'events':>10s} {'wall s':>8s} "
          f"{'events/s':>10s}")
    for name, r in ((f"agc-sx process, defaults (argmax: {metrics.get('bdt_argmax')})", ours),
                    ("seed-style coffea, FuturesExecutor, AGC-style BDT", baseline)):
        print(f"{name:52s} {r['events']:>10,d} {r['wall']:8.2f} {r['events'] / r['wall']:>10,.0f}")
    print(f"agc-sx process / seed-style: {baseline['wall'] / ours['wall']:.2f}x faster (wall, whole command)")
    with uproot.open(work / "ml" / "histograms_ml.root") as f:
        mine = {k.split(";")[0]: f[k].values(flow=True) for k in f.keys(cycle=True)}
    features = {name for name, *_ in ML_FEATURES}
    theirs = {k: np.asarray(v) for k, v in baseline["values"].items() if k.split("_ttbar")[0] in features}
    common = sorted(set(mine) & set(theirs))
    equal = sum(int(np.sum(np.isclose(mine[k], theirs[k], rtol=1e-9, atol=0))) for k in common)
    total = sum(len(theirs[k]) for k in common)
    print(f"BDT-feature histograms: {len(common)} compared; bins equal to 1e-9: {equal}/{total}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_200_000, help="skimmed events to synthesise")
    parser.add_argument("--files", type=int, default=4, help="parquet files (one chunk each)")
    parser.add_argument("--workdir", type=Path, default=None, help="reuse/keep the inputs here")
    parser.add_argument("--skip-baseline", action="store_true", help="only time agc-sx process")
    parser.add_argument("--ml", action="store_true", help="the whole command with the BDT, all cores, vs the "
                        "seed-style processor with the AGC notebook's BDT step")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="agcsx-bench-"))
    base = work / "delivery"
    if not (base / "manifest.json").exists():
        t0 = time.perf_counter()
        synthesise(base, args.events, args.files)
        print(f"synthesised {args.events:,} skimmed events in {time.perf_counter() - t0:.1f} s -> {base}")
    if args.ml:
        compare_with_ml(base, work)
        return
    # fill the numba on-disk cache so compilation is not timed
    _in_subprocess(_run_ours, base, work / "warm" / "histograms.root", False)
    ours = _in_subprocess(_run_ours, base, work / "ours" / "histograms.root", False)
    io_only = _in_subprocess(_run_ours, base, work / "io" / "histograms.root", True)
    cli = _run_cli(base, work / "cli" / "histograms.root")
    rows = [("agc-sx process (iterative, 1 core)", ours), ("agc-sx process --io-only (I/O ceiling)", io_only),
            ("agc-sx process command, with imports", cli)]
    if not args.skip_baseline:
        rows.append(("coffea NanoEvents baseline", _in_subprocess(_run_baseline, base, None, 1)))
    print(f"\n{'implementation':40s} {'events':>10s} {'wall s':>8s} {'cpu s':>8s} {'events/s/core':>14s} "
          f"{'peak RSS MB':>12s}")
    for name, r in rows:
        print(f"{name:40s} {r['events']:>10,d} {r['wall']:8.2f} {r['cpu']:8.2f} {r['events'] / r['cpu']:>14,.0f} "
              f"{r['rss_mb']:>12.0f}")
    if not args.skip_baseline:
        base_v, our_v = rows[-1][1]["values"], {k: v for k, v in ours["values"].items() if "pseudodata" not in k}
        common = sorted(set(base_v) & set(our_v))
        worst = max(float(np.max(np.abs(np.subtract(base_v[k], our_v[k])) / np.maximum(np.abs(base_v[k]), 1e-300)))
                    for k in common)
        identical_bins = sum(int(np.sum(np.isclose(base_v[k], our_v[k], rtol=1e-12, atol=0))) for k in common)
        total_bins = sum(len(base_v[k]) for k in common)
        print(f"\nhistograms: {len(common)} compared (keys equal: {set(base_v) == set(our_v)}); "
              f"bins equal to 1e-12: {identical_bins}/{total_bins}; max relative difference {worst:.2e}")
    print("\nsteady state (second run in the same process) and per-chunk work only (read + physics + fills):")
    for name, r in rows[:2]:  # the in-process runs
        print(f"{name:40s} whole command {r['events'] / r['warm_cpu']:>11,.0f} events/s/core; per chunk "
              f"{r['events'] / r['warm_chunk_cpu']:>11,.0f} (cold process: {r['events'] / r['chunk_cpu']:,.0f})")
    if not args.skip_baseline:
        print(json.dumps({"speedup_cpu_whole_command": rows[-1][1]["cpu"] / ours["cpu"]}))


if __name__ == "__main__":
    main()
