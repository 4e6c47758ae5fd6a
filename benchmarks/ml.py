"""Throughput of the BDT jet–parton assignment: feature building, inference, and the whole choice per event.

Runs on generated ttbar events (4j2b selection, nominal jets) with the official AGC models (when
``../shared/agc/models`` exists) and the bundled ones (``default_models_dir()``). Prints permutations/s and
events/s of

- our vectorised feature building (numba kernel over permutation index tables),
- inference: ``xgboost.Booster.inplace_predict`` (1 and 2 threads) and, for comparison, a numba tree walker
  over the same trees (scores must be identical),
- ``best_permutation_features`` end to end,
- the BDT choice on one core side by side: full xgboost evaluation (``argmax="full"``) against the exact pruned
  argmax (``argmax="auto"``): permutations/s, the fraction of (permutation, tree) evaluations it needs, whether
  the chosen permutations are identical, and the peak memory of each,
- the AGC way (per-event Python permutation lists, awkward gathers, prediction through a DMatrix as the sklearn
  wrapper's ``predict_proba`` did in the AGC's xgboost; sklearn itself is not installed) on a subset,

and the peak memory (numpy allocations of one ``best_permutation_features`` call, and the process peak RSS).

    /work/venv/bin/python benchmarks/ml.py [--events 100000] [--baseline-events 1500] [--choice-only]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import resource
import tempfile
import time
import tracemalloc
from functools import partial
from pathlib import Path
from typing import Any

import awkward as ak
import numba
import numpy as np
import xgboost as xgb

from agc_sx.generate import generate
from agc_sx.ml import (
    BDTModels,
    FlatEvents,
    best_permutation_features,
    permutation_features,
    permutation_table,
    read_4j2b,
)
from agc_sx.ml._argmax import Trees, pruned_argmax
from agc_sx.ml._models import BLOCK_EVENTS
from agc_sx.resources import default_models_dir

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = REPO.parent / "shared" / "agc" / "models"


# --- numba tree walker (comparison only) --------------------------------------------------------------------------


def flatten_trees(booster: xgb.Booster) -> tuple[Any, ...]:
    """All trees as flat node arrays: (root of each tree, split feature or -1, threshold or leaf value, left
    child, default-left flag) and the base margin. XGBoost stores the right child at left + 1."""
    model = json.loads(booster.save_raw("json"))
    trees = model["learner"]["gradient_booster"]["model"]["trees"]
    roots, feat, value, left, default_left = [], [], [], [], []
    offset = 0
    for t in trees:
        lc = np.asarray(t["left_children"], dtype=np.int32)
        assert np.all((np.asarray(t["right_children"]) == lc + 1) | (lc < 0))
        roots.append(offset)
        feat.append(np.where(lc >= 0, np.asarray(t["split_indices"], dtype=np.int32), -1))
        value.append(np.asarray(t["split_conditions"], dtype=np.float32))
        left.append(np.where(lc >= 0, lc + offset, -1))
        default_left.append(np.asarray(t["default_left"], dtype=np.bool_))
        offset += len(lc)
    # binary:logistic stores the intercept as a probability; the trees add to its logit (float32, as xgboost)
    base = np.float32(float(model["learner"]["learner_model_param"]["base_score"].strip("[]")))
    margin = -np.log(np.float32(1.0) / base - np.float32(1.0))
    return (np.asarray(roots, dtype=np.int32), np.concatenate(feat), np.concatenate(value),
            np.concatenate(left).astype(np.int32), np.concatenate(default_left), np.float32(margin))


@numba.njit(parallel=True, nogil=True, cache=True)
def walk(x: np.ndarray, roots: np.ndarray, feat: np.ndarray, value: np.ndarray, left: np.ndarray,
         default_left: np.ndarray, base_margin: np.float32, out: np.ndarray) -> None:  # pragma: no cover
    for i in numba.prange(x.shape[0]):
        acc = base_margin
        for t in range(roots.shape[0]):
            k = roots[t]
            while feat[k] >= 0:
                v = x[i, feat[k]]
                if np.isnan(v):
                    k = left[k] if default_left[k] else left[k] + 1
                elif v < value[k]:
                    k = left[k]
                else:
                    k = left[k] + 1
            acc += value[k]
        out[i] = np.float32(1.0) / (np.float32(1.0) + np.exp(-acc))


# --- the AGC way ------------------------------------------------------------------------------------------------------


def agc_style_best(jets: ak.Array, lepton: ak.Array, event: np.ndarray, even_model: Any, odd_model: Any) -> np.ndarray:
    """Per-event Python list of permutations, awkward gathers, DMatrix prediction, ak.argmax."""
    return agc_style_choice(*agc_style_features(jets, lepton), event, even_model, odd_model)


def agc_style_choice(features: np.ndarray, counts: np.ndarray, event: np.ndarray, even_model: Any,
                     odd_model: Any) -> np.ndarray:
    """Index of the best permutation of each event: crossed DMatrix prediction, then ``ak.argmax``."""
    even = np.repeat(event % 2 == 0, counts)
    scores = np.zeros(len(features))
    scores[even] = odd_model.predict(xgb.DMatrix(features[even]))
    scores[~even] = even_model.predict(xgb.DMatrix(features[~even]))
    best = ak.argmax(ak.unflatten(scores, counts), axis=1)
    return np.asarray(ak.to_numpy(best))


def agc_style_features(jets: ak.Array, lepton: ak.Array) -> tuple[np.ndarray, np.ndarray]:
    """The 20 features of every permutation the AGC notebook's way, and the permutations per event."""
    perm_dict = {n: permutation_table(n).tolist() for n in (4, 5, 6)}
    njet = np.minimum(ak.to_numpy(ak.num(jets)), 6)
    perms = ak.Array([perm_dict[int(n)] for n in njet])
    counts = ak.to_numpy(ak.num(perms))
    lep = ak.zip({k: lepton[k] for k in ("pt", "eta", "phi", "mass")})
    cols = []
    slot = [jets[perms[..., i]] for i in range(4)]
    cols.append(ak.flatten(np.sqrt((lep.eta - slot[3].eta) ** 2 + (lep.phi - slot[3].phi) ** 2)))
    for a, b in ((0, 1), (0, 2), (1, 2)):
        cols.append(ak.flatten(np.sqrt((slot[a].eta - slot[b].eta) ** 2 + (slot[a].phi - slot[b].phi) ** 2)))

    def p4(o: Any) -> tuple[Any, Any, Any, Any]:
        px, py, pz = o.pt * np.cos(o.phi), o.pt * np.sin(o.phi), o.pt * np.sinh(o.eta)
        return px, py, pz, np.sqrt(px**2 + py**2 + pz**2 + o.mass**2)

    def mass(*vs: Any) -> Any:
        px, py, pz, e = (sum(v[i] for v in vs) for i in range(4))
        return np.sqrt(np.maximum(e**2 - px**2 - py**2 - pz**2, 0))

    s4 = [p4(s) for s in slot]
    cols.append(ak.flatten(mass(p4(lep), s4[3])))
    cols.append(ak.flatten(mass(s4[0], s4[1])))
    cols.append(ak.flatten(mass(s4[0], s4[1], s4[2])))
    cols.append(ak.flatten(np.hypot(s4[0][0] + s4[1][0] + s4[2][0], s4[0][1] + s4[1][1] + s4[2][1])))
    for field in ("pt", "btagCSVV2", "qgl"):
        cols.extend(ak.flatten(s[field]) for s in slot)
    features = np.zeros((int(counts.sum()), 20))
    for i, c in enumerate(cols):
        features[:, i] = ak.to_numpy(c)
    return features, counts


def interleaved(candidates: dict[str, Any], rounds: int = 5) -> dict[str, float]:
    """Best wall time of each candidate, measured in alternation (the machine is shared: a slow spell then
    hits every candidate, not just one). Each candidate is called once first to compile / warm up."""
    for func in candidates.values():
        func()
    best = dict.fromkeys(candidates, np.inf)
    for _ in range(rounds):
        for name, func in candidates.items():
            t0 = time.perf_counter()
            func()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def peak_rss_growth_mib(func: Any) -> float:
    """How far the resident set grows above its level before ``func()`` (Linux: the high-water mark is reset
    through ``/proc/self/clear_refs``), so that xgboost's and numba's allocations count too; NaN elsewhere."""
    def status(key: str) -> int:
        for row in Path("/proc/self/status").read_text().splitlines():
            if row.startswith(key + ":"):
                return int(row.split()[1])
        raise KeyError(key)

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages would otherwise hide the growth
        Path("/proc/self/clear_refs").write_text("5")
        before = status("VmRSS")
    except (OSError, KeyError):
        return float("nan")
    func()
    return (status("VmHWM") - before) / 1024


def rescore(models: BDTModels, booster: xgb.Booster, features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """xgboost's probabilities of some rows (the pruned argmax's survivors)."""
    return models.predict(booster, features[rows])


def choice_side_by_side(label: str, ev: Any, model_dir: Path, rounds: int) -> None:
    """The BDT choice on one core, full xgboost vs pruned, on the parity blocks ``best_permutation_features``
    scores (feature building excluded: it is the same for both)."""
    full, pruned = BDTModels.load(model_dir, argmax="full"), BDTModels.load(model_dir, argmax="pruned")
    print(f"{label}: agc-sx process takes the {BDTModels.load(model_dir).argmax_path} path")
    flat = FlatEvents(ev.jets, ev.lepton)
    even = ev.event % 2 == 0
    blocks = []
    for parity in (True, False):
        selected = np.flatnonzero(even == parity)
        for lo in range(0, len(selected), BLOCK_EVENTS):
            blocks.append((bool(parity), *flat.features(selected[lo : lo + BLOCK_EVENTS])))
    n_rows = sum(len(f) for _, f, _ in blocks)

    def run(models: BDTModels) -> list[np.ndarray]:
        return [models.choose(models.booster_for(p), f, c, nthread=1) for p, f, c in blocks]

    seconds = interleaved({"full": lambda: run(full), "pruned": lambda: run(pruned)}, rounds)
    same = all(np.array_equal(a, b) for a, b in zip(run(full), run(pruned), strict=True))
    evaluations = walks = 0
    for parity, f, c in blocks:
        booster = pruned.booster_for(parity)
        trees = pruned.trees_for(booster)
        assert isinstance(trees, Trees), trees
        result = pruned_argmax(trees, f, c, partial(rescore, pruned, booster, f))
        evaluations += result.tree_evaluations
        walks += len(f) * trees.n_trees
    memory = {name: peak_rss_growth_mib(lambda m=m: run(m)) for name, m in (("full", full), ("pruned", pruned))}
    n_trees = full.even.num_boosted_rounds()
    trees = pruned.trees_for(pruned.even)
    assert isinstance(trees, Trees), trees
    # single-leaf trees add a constant: xgboost walks them (cheaply), the kernel never does
    print(f"  BDT choice on one core ({label}, {n_trees} trees of which {trees.n_walked} split, "
          f"path: {pruned.argmax_path}):")
    print(f"    {'':<8} {'M permutations/s':>17} {'tree evaluations':>17} {'walks/permutation':>18} "
          f"{'peak RSS growth':>16}")
    for name in ("full", "pruned"):
        fraction = 1.0 if name == "full" else evaluations / walks
        per_row = n_trees if name == "full" else evaluations / n_rows
        print(f"    {name:<8} {n_rows / seconds[name] / 1e6:17.3f} {fraction:16.1%} {per_row:18.1f} "
              f"{memory[name]:12.0f} MiB")
    print(f"    pruned / full: {seconds['full'] / seconds['pruned']:.2f}x the throughput; identical choices: "
          f"{'yes' if same else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="generated ttbar events (before selection)")
    parser.add_argument("--baseline-events", type=int, default=1500, help="4j2b events for the AGC-style baseline")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (best of)")
    parser.add_argument("--seed", type=int, default=99)
    parser.add_argument("--choice-only", action="store_true", help="only the full-vs-pruned BDT choice")
    args = parser.parse_args()

    model_dirs = {"shipped": default_models_dir()}
    if (OFFICIAL / "model_even.json").is_file():
        model_dirs = {"official AGC": OFFICIAL, **model_dirs}
    with tempfile.TemporaryDirectory() as tmp:
        catalog = generate(Path(tmp), events_per_file=args.events, seed=args.seed, samples=["ttbar__nominal"])
        ev = read_4j2b(catalog["ttbar__nominal"].files[0].path)
    n_ev = len(ev.event)
    features, counts = permutation_features(ev.jets, ev.lepton)
    n_perm = int(counts.sum())
    print(f"{args.events:,} generated ttbar events -> {n_ev:,} in 4j2b, {n_perm:,} permutations "
          f"({n_perm / n_ev:.1f} per event); best of {args.rounds} interleaved rounds")

    def line(label: str, seconds: float, n_rows: int = n_perm, n_events: int = n_ev) -> None:
        print(f"  {label:<44} {n_rows / seconds / 1e6:7.3f} M permutations/s {n_events / seconds:11,.0f} events/s")

    t = interleaved({"f": lambda: permutation_features(ev.jets, ev.lepton)}, args.rounds)
    line("features (vectorised, numba)", t["f"])

    for label, model_dir in model_dirs.items():
        choice_side_by_side(label, ev, model_dir, args.rounds)
    if args.choice_only:
        return
    for label, model_dir in model_dirs.items():
        models = BDTModels.load(model_dir)
        trees = flatten_trees(models.even)
        print(f"{label} models ({model_dir}): {models.even.num_boosted_rounds()} trees, {len(trees[1]):,} nodes")
        walked = np.empty(n_perm, dtype=np.float32)

        def walker(nthread: int, trees: tuple[Any, ...] = trees, walked: np.ndarray = walked) -> None:
            numba.set_num_threads(nthread)
            walk_any: Any = walk  # numba's Dispatcher stub does not type its arguments
            walk_any(features, *trees, walked)

        candidates: dict[str, Any] = {}
        for nthread in (1, 2):
            candidates[f"xgboost Booster.inplace_predict, {nthread} thread(s)"] = (
                lambda n=nthread, m=models: m.predict(m.even, features, n))
            candidates[f"numba tree walker, {nthread} thread(s)"] = lambda n=nthread: walker(n)
            candidates[f"best_permutation_features, {nthread} thread(s)"] = (
                lambda n=nthread, m=models: best_permutation_features(ev.jets, ev.lepton, ev.event, m, nthread=n))
        for name, seconds in interleaved(candidates, args.rounds).items():
            line(name, seconds)
        walker(1)
        scores = models.predict(models.even, features, 1)
        print(f"  walker vs xgboost: max |score diff| = {np.abs(walked - scores).max():.3g} "
              f"({int(np.sum(walked != scores))} of {n_perm:,} rows differ)")

        m = min(args.baseline_events, n_ev)
        t0 = time.perf_counter()
        agc_best = agc_style_best(ev.jets[:m], ev.lepton[:m], ev.event[:m], models.even, models.odd)
        line(f"AGC style (per-event lists, DMatrix), {m:,} ev", time.perf_counter() - t0, int(counts[:m].sum()), m)
        ours = best_permutation_features(ev.jets[:m], ev.lepton[:m], ev.event[:m], models)
        first = np.cumsum(counts[:m]) - counts[:m]
        same = np.all(np.abs(features[first + agc_best] - ours) <= 1e-3 * np.maximum(1, np.abs(ours)), axis=1)
        print(f"  AGC style and ours choose the same permutation in {same.mean():.2%} of events")

        tracemalloc.start()
        best_permutation_features(ev.jets, ev.lepton, ev.event, models, nthread=1)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"  peak numpy allocations of one best_permutation_features call ({n_ev:,} events): "
              f"{peak / 2**20:.0f} MiB")
    print(f"process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
