"""Jet–parton assignment: permutation tables, features, crossed inference, training."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import xgboost as xgb

from agc_sx.ml import (
    FEATURE_NAMES,
    FEATURES,
    BDTModels,
    ModelError,
    best_permutation_features,
    permutation_features,
    permutation_table,
    segment_argmax,
)

SHARED_MODELS = Path(__file__).resolve().parents[3] / "shared" / "agc" / "models"


def synthetic_events(n_events: int, seed: int) -> tuple[ak.Array, ak.Array, np.ndarray]:
    """Random pT-ordered float32 jets (4-8 per event), one lepton each, random event numbers."""
    rng = np.random.default_rng(seed)
    n_jets = rng.integers(4, 9, n_events)
    total = int(n_jets.sum())
    pt = ak.sort(ak.unflatten((rng.exponential(40, total) + 30).astype(np.float32), n_jets), ascending=False)
    jets = ak.zip({
        "pt": pt,
        "eta": ak.unflatten(rng.normal(0, 1.2, total).astype(np.float32), n_jets),
        "phi": ak.unflatten(rng.uniform(-np.pi, np.pi, total).astype(np.float32), n_jets),
        "mass": ak.unflatten(rng.uniform(2, 20, total).astype(np.float32), n_jets),
        "btagCSVV2": ak.unflatten(rng.uniform(0, 1, total).astype(np.float32), n_jets),
        "qgl": ak.unflatten(rng.uniform(0, 1, total).astype(np.float32), n_jets),
    })
    lepton = ak.zip({
        "pt": (rng.exponential(40, n_events) + 30).astype(np.float32),
        "eta": rng.normal(0, 1, n_events).astype(np.float32),
        "phi": rng.uniform(-np.pi, np.pi, n_events).astype(np.float32),
        "mass": np.full(n_events, 0.105, np.float32),
    })
    return jets, lepton, rng.integers(0, 2**40, n_events, dtype=np.int64)


# --- permutation tables ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_jets", "expected"), [(4, 12), (5, 60), (6, 180), (9, 180)])
def test_permutation_counts_and_rules(n_jets: int, expected: int) -> None:
    table = permutation_table(n_jets)
    assert table.shape == (expected, 4)
    n_used = min(n_jets, 6)
    assert table.min() == 0 and table.max() == n_used - 1
    assert all(len(set(row)) == 4 for row in table.tolist())  # four distinct jets
    assert np.all(table[:, 0] > table[:, 1])  # W jets unordered: W1 carries the larger index
    # no duplicate assignment once the two W jets are treated as one unordered pair
    keys = {(frozenset(r[:2]), r[2], r[3]) for r in table.tolist()}
    assert len(keys) == expected
    # and nothing is missing: every unordered-W assignment of the leading jets appears
    every = {(frozenset(p[:2]), p[2], p[3]) for p in itertools.permutations(range(n_used), 4)}
    assert keys == every


def test_permutation_order_is_the_agc_one() -> None:
    # The AGC enumerates 4-tuples lexicographically (argcartesian), drops repeated jets and keeps the second of
    # each W-swapped pair, so the rows are lexicographically sorted.
    for n in (4, 5, 6):
        rows = [tuple(r) for r in permutation_table(n).tolist()]
        assert rows == sorted(rows)
    assert permutation_table(4)[0].tolist() == [1, 0, 2, 3]


def test_permutation_table_rejects_too_few_jets() -> None:
    with pytest.raises(ValueError, match="at least 4 jets"):
        permutation_table(3)


def test_features_table_matches_issue() -> None:
    assert len(FEATURES) == 20 and len(set(FEATURE_NAMES)) == 20
    assert FEATURE_NAMES[0] == "deltar_leptonbtoplep" and FEATURE_NAMES[-1] == "qgl_btoplep"
    assert all(bins == 25 and lo < hi for _, bins, lo, hi in FEATURES)


# --- features -------------------------------------------------------------------------------------------------


def _p4(pt: float, eta: float, phi: float, m: float) -> tuple[float, float, float, float]:
    px, py, pz = pt * math.cos(phi), pt * math.sin(phi), pt * math.sinh(eta)
    return px, py, pz, math.sqrt(px * px + py * py + pz * pz + m * m)


def _inv_mass(*vecs: tuple[float, float, float, float]) -> float:
    px, py, pz, e = (sum(v[i] for v in vecs) for i in range(4))
    return math.sqrt(e * e - px * px - py * py - pz * pz)


def test_each_feature_against_hand_computation() -> None:
    jets_py = [  # pt-ordered; phi of jets 0 and 3 sit across the ±π boundary
        {"pt": 120.0, "eta": 0.3, "phi": 3.0, "mass": 12.0, "btagCSVV2": 0.9, "qgl": 0.2},
        {"pt": 80.0, "eta": -1.1, "phi": 0.5, "mass": 8.0, "btagCSVV2": 0.1, "qgl": 0.7},
        {"pt": 60.0, "eta": 2.0, "phi": -1.2, "mass": 6.0, "btagCSVV2": 0.8, "qgl": -1.0},
        {"pt": 45.0, "eta": 0.0, "phi": -3.0, "mass": 5.0, "btagCSVV2": 0.3, "qgl": 0.4},
        {"pt": 35.0, "eta": -0.4, "phi": 1.9, "mass": 4.0, "btagCSVV2": 0.6, "qgl": 0.9},
    ]
    lep_py = {"pt": 50.0, "eta": 0.8, "phi": -2.9, "mass": 0.0}
    jets = ak.values_astype(ak.Array([jets_py]), np.float32)
    lepton = ak.values_astype(ak.Array([lep_py]), np.float32)
    features, counts = permutation_features(jets, lepton)
    assert counts.tolist() == [60] and features.shape == (60, 20)
    f32 = [{k: float(np.float32(v)) for k, v in j.items()} for j in jets_py]
    lep = {k: float(np.float32(v)) for k, v in lep_py.items()}

    def dr(a: dict[str, float], b: dict[str, float]) -> float:
        return math.sqrt((a["eta"] - b["eta"]) ** 2 + (a["phi"] - b["phi"]) ** 2)  # Δφ deliberately unwrapped

    def p4(o: dict[str, float]) -> tuple[float, float, float, float]:
        return _p4(o["pt"], o["eta"], o["phi"], o["mass"])

    for row, (w1, w2, bh, bl) in zip(features, permutation_table(5).tolist(), strict=True):
        j1, j2, jh, jl = f32[w1], f32[w2], f32[bh], f32[bl]
        top = [sum(c) for c in zip(p4(j1), p4(j2), p4(jh), strict=True)]
        expected = [
            dr(lep, jl), dr(j1, j2), dr(j1, jh), dr(j2, jh),
            _inv_mass(p4(lep), p4(jl)), _inv_mass(p4(j1), p4(j2)), _inv_mass(p4(j1), p4(j2), p4(jh)),
            math.hypot(top[0], top[1]),
            *(j["pt"] for j in (j1, j2, jh, jl)),
            *(j["btagCSVV2"] for j in (j1, j2, jh, jl)),
            *(j["qgl"] for j in (j1, j2, jh, jl)),
        ]
        np.testing.assert_allclose(row, expected, rtol=2e-6, atol=1e-5)
    # the unwrapped Δφ really matters for this event: jets 0 and 3 are 6 apart in φ, not 0.28
    w = [i for i, (a, b, _, _) in enumerate(permutation_table(5).tolist()) if (a, b) == (3, 0)]
    assert len(w) == 6 and np.all(features[w, 1] > 6.0)


def test_features_event_layout_and_leading_six_only() -> None:
    jets, lepton, _ = synthetic_events(50, seed=3)
    features, counts = permutation_features(jets, lepton)
    n = np.minimum(ak.to_numpy(ak.num(jets)), 6)
    assert counts.tolist() == [{4: 12, 5: 60, 6: 180}[int(k)] for k in n]
    assert len(features) == counts.sum() and features.dtype == np.float32
    # rows of event i equal the features of event i alone, and jets beyond the sixth never matter
    first = np.cumsum(counts) - counts
    for i in (0, 17, 49):
        alone, _ = permutation_features(jets[i : i + 1, :6], lepton[i : i + 1])
        np.testing.assert_array_equal(features[first[i] : first[i] + counts[i]], alone)


def test_feature_inputs_are_checked() -> None:
    jets, lepton, _ = synthetic_events(5, seed=4)
    with pytest.raises(ValueError, match="at least 4 jets"):
        permutation_features(jets[:, :3], lepton)
    with pytest.raises(ValueError, match="qgl"):
        permutation_features(jets[["pt", "eta", "phi", "mass", "btagCSVV2"]], lepton)
    with pytest.raises(ValueError, match="4 leptons"):
        permutation_features(jets, lepton[:4])


# --- inference ------------------------------------------------------------------------------------------------


def test_segment_argmax_takes_first_on_ties() -> None:
    values = np.array([1.0, 3.0, 3.0, 0.5, 0.5, 2.0, 2.0, 2.0], dtype=np.float32)
    assert segment_argmax(values, np.array([3, 2, 3])).tolist() == [1, 3, 5]


def _toy_models(tmp_path: Path) -> BDTModels:
    """Two small, clearly different models (random labels, different seeds) saved and loaded like real ones."""
    jets, lepton, _ = synthetic_events(300, seed=11)
    features, _ = permutation_features(jets, lepton)
    rng = np.random.default_rng(5)
    for name, seed in (("model_even.json", 1), ("model_odd.json", 2)):
        labels = (features[:, 5 + seed] > np.median(features[:, 5 + seed])).astype(np.float32)
        noisy = np.where(rng.uniform(size=len(labels)) < 0.2, 1 - labels, labels)
        booster = xgb.train({"objective": "binary:logistic", "max_depth": 4, "seed": seed, "nthread": 1},
                            xgb.DMatrix(features, label=noisy), num_boost_round=10)
        booster.save_model(tmp_path / name)
    return BDTModels.load(tmp_path)


def _reference_best(features: np.ndarray, counts: np.ndarray, even: np.ndarray, models: BDTModels,
                    crossed: bool = True) -> np.ndarray:
    """Booster.predict on a DMatrix and a plain per-event loop with np.argmax: the AGC way of choosing."""
    by_even_model = models.even.predict(xgb.DMatrix(features))
    by_odd_model = models.odd.predict(xgb.DMatrix(features))
    best = []
    start = 0
    for n, is_even in zip(counts, even, strict=True):
        use_odd = is_even if crossed else not is_even
        scores = (by_odd_model if use_odd else by_even_model)[start : start + n]
        best.append(features[start + int(np.argmax(scores))])
        start += n
    return np.array(best)


def test_crossed_even_odd_selection(tmp_path: Path) -> None:
    models = _toy_models(tmp_path)
    jets, lepton, event = synthetic_events(200, seed=12)
    features, counts = permutation_features(jets, lepton)
    even = event % 2 == 0
    assert 0 < even.sum() < len(even)
    chosen = best_permutation_features(jets, lepton, event, models)
    np.testing.assert_array_equal(chosen, _reference_best(features, counts, even, models))
    # the models differ, so scoring uncrossed would have chosen differently for some events
    uncrossed = _reference_best(features, counts, even, models, crossed=False)
    assert np.any(np.any(chosen != uncrossed, axis=1))
    # flipping every event's parity swaps the models
    flipped = best_permutation_features(jets, lepton, event + 1, models)
    np.testing.assert_array_equal(flipped, uncrossed)


def test_models_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model_even\.json not found"):
        BDTModels.load(tmp_path)
    (tmp_path / "model_even.json").write_text("{not json")
    (tmp_path / "model_odd.json").write_text("{}")
    with pytest.raises(ModelError, match="cannot load"):
        BDTModels.load(tmp_path)


def test_models_pickle_round_trip(tmp_path: Path) -> None:
    import pickle

    models = _toy_models(tmp_path)
    clone = pickle.loads(pickle.dumps(models))
    jets, lepton, event = synthetic_events(30, seed=13)
    np.testing.assert_array_equal(best_permutation_features(jets, lepton, event, clone, nthread=2),
                                  best_permutation_features(jets, lepton, event, models))


@pytest.fixture(scope="module")
def official_models() -> BDTModels:
    if not (SHARED_MODELS / "model_even.json").is_file():
        pytest.skip(f"official AGC models not found in {SHARED_MODELS}")
    return BDTModels.load(SHARED_MODELS)


def test_official_models_scores_agree_with_booster(official_models: BDTModels) -> None:
    jets, lepton, event = synthetic_events(150, seed=21)
    features, counts = permutation_features(jets, lepton)
    even = np.repeat(event % 2 == 0, counts)
    ours = official_models.score(features, even, nthread=2)
    reference = np.where(even, official_models.odd.predict(xgb.DMatrix(features)),
                         official_models.even.predict(xgb.DMatrix(features)))
    assert np.abs(ours - reference).max() < 1e-6
    chosen = best_permutation_features(jets, lepton, event, official_models)
    np.testing.assert_array_equal(chosen, _reference_best(features, counts, event % 2 == 0, official_models))


# --- generated events: official models and training -----------------------------------------------------------


@pytest.fixture(scope="module")
def generated_ttbar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from agc_sx.generate import generate

    out = tmp_path_factory.mktemp("gen")
    catalog = generate(out, events_per_file=6000, files_per_sample=1, seed=11, samples=["ttbar__nominal"])
    return Path(catalog["ttbar__nominal"].files[0].path)


def test_official_models_on_generated_events(official_models: BDTModels, generated_ttbar: Path) -> None:
    from agc_sx.ml import read_4j2b

    events = read_4j2b(str(generated_ttbar))
    assert len(events.event) > 50
    features, counts = permutation_features(events.jets, events.lepton)
    even = np.repeat(events.event % 2 == 0, counts)
    ours = official_models.score(features, even, nthread=2)
    reference = np.where(even, official_models.odd.predict(xgb.DMatrix(features)),
                         official_models.even.predict(xgb.DMatrix(features)))
    assert np.abs(ours - reference).max() < 1e-6
    chosen = best_permutation_features(events.jets, events.lepton, events.event, official_models, nthread=2)
    np.testing.assert_array_equal(chosen, _reference_best(features, counts, events.event % 2 == 0, official_models))


def test_training_on_a_tiny_generated_sample(generated_ttbar: Path, tmp_path: Path) -> None:
    from agc_sx.ml import train

    report = train([generated_ttbar], events=None, output=tmp_path / "models", seed=3, nthread=1,
                   num_boost_round=8)
    assert report.events_read == 6000 and 0 < report.events_matched <= report.events_4j2b
    assert report.permutations > 12 * report.events_matched
    models = BDTModels.load(tmp_path / "models")
    assert models.even.num_boosted_rounds() == 8 and models.odd.num_boosted_rounds() == 8
    card = (tmp_path / "models" / "README.md").read_text()
    assert f"{100 * report.accuracy_bdt:.1f} %" in card and "trijet" in card
    # even a tiny model beats the trijet choice on these (held-out, crossed) events
    assert report.accuracy_bdt > report.accuracy_trijet
    # seeded: the same inputs give the same models
    again = train([generated_ttbar], output=tmp_path / "again", seed=3, nthread=1, num_boost_round=8)
    assert again.accuracy_bdt == report.accuracy_bdt
    assert (tmp_path / "again" / "model_even.json").read_bytes() == (tmp_path / "models" / "model_even.json").read_bytes()


def test_train_cli(generated_ttbar: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from agc_sx.cli import main

    out = tmp_path / "cli_models"
    result = CliRunner().invoke(main, ["train", "--catalog", str(generated_ttbar.parent / "ntuples.json"),
                                       "--events", "4000", "--output", str(out), "--seed", "2", "--rounds", "4",
                                       "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "from 4,000 events" in result.output and "trijet max-pT" in result.output
    assert BDTModels.load(out).even.num_boosted_rounds() == 4
    result = CliRunner().invoke(main, ["train", "--catalog", str(tmp_path / "missing.json")])
    assert result.exit_code == 1 and "cannot read catalogue" in result.output
    result = CliRunner().invoke(main, ["train", "--catalog", str(generated_ttbar.parent / "ntuples.json"),
                                       "--events", "50", "--output", str(tmp_path / "few")])
    assert result.exit_code == 1 and "use more events" in result.output
    assert not (tmp_path / "few" / "model_even.json").exists()


def test_shipped_models_beat_trijet_on_fresh_events(generated_ttbar: Path) -> None:
    from agc_sx.ml._training import _read_block, _row_lookup
    from agc_sx.resources import default_models_dir

    models = BDTModels.load(default_models_dir())
    block = _read_block(str(generated_ttbar), None, _row_lookup())
    assert len(block.counts) > 50
    scores = models.score(block.features, np.repeat(block.even, block.counts))
    local = segment_argmax(scores, block.counts) - (np.cumsum(block.counts) - block.counts)
    chosen = np.array([permutation_table(n)[i, :3] for n, i in zip(block.n_jets, local, strict=True)])
    truth = np.sort(block.had_truth, axis=1)
    bdt = np.mean(np.all(np.sort(chosen, axis=1) == truth, axis=1))
    trijet = np.mean(np.all(np.sort(block.trijet, axis=1) == truth, axis=1))
    assert bdt > trijet + 0.15
    # the true permutation row really is labelled: it puts the truth jets into the hadronic-top slots
    first = np.cumsum(block.counts) - block.counts
    positives = np.flatnonzero(block.labels)
    assert len(positives) == len(block.counts)
    np.testing.assert_array_equal(np.searchsorted(first, positives, side="right") - 1, np.arange(len(first)))
    np.testing.assert_array_equal(np.sort(np.array([permutation_table(n)[r, :3] for n, r in
                                                    zip(block.n_jets, block.truth_rows, strict=True)]), axis=1),
                                  truth)
