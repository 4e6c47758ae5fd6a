"""Exact per-event argmax of a binary:logistic XGBoost model by branch and bound over its trees.

Only the best permutation of each event matters, not its score, so most (permutation, tree) evaluations can be
skipped: a permutation whose partial margin plus an upper bound on the trees still to come stays below what
the leading permutation is known to reach can never win. Per group of events the kernel

1. walks every permutation through the first few trees and takes each event's leader (largest partial margin),
2. walks the leaders through all trees: their margins set each event's cut,
3. walks the other permutations tree by tree, dropping each as soon as its upper bound falls below the cut; one
   that runs ahead of its event's leader (larger partial margin after as many trees) becomes a challenger and
   is completed at once, so that a wrong first leader costs little.

The bound on a tree's leaf for a given row is the largest leaf among those whose region (the box of
thresholds on its path) overlaps the row's value of one or two chosen features, binned -- the "box bound",
looked up in small tables -- and never more than the tree's largest leaf.

The choice must be the one of full evaluation, bit for bit: the first row with the largest float32
*probability* that ``Booster.inplace_predict`` returns (``ak.argmax`` semantics). Hence

- bounds are inflated by the worst-case float32 rounding of xgboost's sum of ``1 + n_trees`` terms, whatever
  its summation order (our own sums are float64);
- a row is dropped only if its probability is *certainly* below another row's: the cut is placed in
  probability space with a relative gap that covers xgboost's float32 sigmoid (``expf``; it saturates at 1.0f
  for margins above ~16.6, where distinct margins tie and the first row must win);
- split decisions are xgboost's: float32 ``x < threshold`` goes left, NaN follows the default direction;
- when more than one row survives all trees, the survivors are re-scored by xgboost itself and the first of
  the largest float32 probabilities is taken.

The trees come from the booster's own JSON (``save_raw("json")``): nothing is unpickled or evaluated. A model
the kernel cannot reproduce (another objective, categorical splits, vector leaves, dart, ...) yields a reason
string instead, and the caller falls back to full evaluation. The kernel is single-threaded and releases the
GIL; its result does not depend on how events are grouped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numba
import numpy as np
import xgboost as xgb
from numpy.typing import NDArray

#: Trees walked by every row before each event's leader is chosen.
FIRST_TREES: Final = 6
#: Rows (whole events) processed together: enough to keep the tree walks batched, small enough for the cache.
GROUP_ROWS: Final = 2048
#: Challengers completed together.
CHUNK: Final = 64
#: Relative error allowed for xgboost's float32 sigmoid against the exact one (measured < 1e-7; 2^-20 ≈ 1e-6).
SIGMOID_REL_ERROR: Final = 2.0**-20
#: Below this lower bound on the margin nothing is pruned: float32 probabilities near 1e-38 lose precision and
#: xgboost clamps the exponent at 88.7, so very negative margins may tie.
MIN_PRUNE_MARGIN: Final = -80.0
#: Deepest complete-binary-tree layout of a tree's top levels (walked level by level over many rows at once),
#: and the memory it may take for all trees together.
MAX_TOP_DEPTH: Final = 10
MAX_TOP_BYTES: Final = 4 << 20
#: Bin edges per feature of the box bounds (63: six steps of a branch-free search; one more bin holds NaN),
#: and features looked up per tree.
BOX_EDGES: Final = 63
BOX_FEATURES: Final = 2
#: Rows sampled per call to choose the box-bound features of each tree.
BOX_SAMPLE: Final = 2048
_U32: Final = 2.0**-24  # float32 unit roundoff
_F32_MAX: Final = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Trees:
    """One model's trees as flat arrays for the kernel (nothing else is kept from the JSON).

    Nodes of all trees, model order: ``feature`` (-1 at leaves), ``value`` (threshold, or leaf value),
    ``left`` / ``right`` (global node ids), ``default_left``; ``model_tree`` maps each tree of the model to its
    index among the walked trees, or -1 for a single leaf (whose value is in ``leaf_only``). Walked trees:
    ``roots``, ``tree_max``, the top ``depth`` levels as complete binary trees (``top_*``; ``exits`` are the
    nodes reached below them), and the box-bound tables (``box_edges`` per feature, ``box_tables`` per tree and
    feature). ``constant`` is the base margin plus the single-leaf trees, ``slack`` the
    worst-case float32 rounding of xgboost's sum, ``n_trees`` all trees of the model (the cost of full
    evaluation per row).
    """

    feature: NDArray[np.int32]
    value: NDArray[np.float32]
    left: NDArray[np.int32]
    right: NDArray[np.int32]
    default_left: NDArray[np.bool_]
    model_tree: NDArray[np.int32]
    leaf_only: NDArray[np.float32]
    roots: NDArray[np.int32]
    tree_max: NDArray[np.float64]
    depth: int
    top_feature: NDArray[np.int32]
    top_value: NDArray[np.float32]
    top_default_left: NDArray[np.bool_]
    exits: NDArray[np.int32]
    box_edges: NDArray[np.float32]
    box_tables: NDArray[np.float32]
    constant: float
    base_margin: np.float32
    slack: float
    n_trees: int
    n_features: int

    @property
    def n_walked(self) -> int:
        """Trees the kernel walks (single-leaf trees add the same value to every row and are skipped)."""
        return len(self.roots)


def parse_booster(booster: xgb.Booster) -> Trees | str:
    """The trees of ``booster`` for :func:`pruned_argmax`, or why they cannot be used (a short reason)."""
    try:
        model = json.loads(bytes(booster.save_raw("json")))
        return _parse_model(model)
    except (ValueError, KeyError, TypeError, IndexError, xgb.core.XGBoostError) as err:
        return f"unreadable model JSON: {type(err).__name__}: {err}"[:200]


def _parse_model(model: dict[str, Any]) -> Trees | str:
    learner = model["learner"]
    objective = learner["objective"]["name"]
    if objective != "binary:logistic":
        return f"objective {objective}"
    gbm = learner["gradient_booster"]
    if gbm["name"] != "gbtree":
        return f"booster {gbm['name']}"
    param = learner["learner_model_param"]
    if int(param.get("num_class", "0")) > 1 or int(param.get("num_target", "1")) != 1:
        return "multiple outputs"
    if any(t in ("c", "categorical") for t in learner.get("feature_types", [])):
        return "categorical features"
    base = [float(v) for v in str(param["base_score"]).strip("[]").split(",") if v.strip()]
    if len(base) != 1 or not 0.0 < base[0] < 1.0:
        return f"base_score {param['base_score']}"
    trees = gbm["model"]["trees"]
    if any(int(g) != 0 for g in gbm["model"].get("tree_info", [])):
        return "multiple output groups"
    if not trees:
        return "no trees"
    base_margin = np.float32(-math.log(1.0 / base[0] - 1.0))
    n_features = int(param.get("num_feature", "0"))

    parts: dict[str, list[NDArray[Any]]] = {k: [] for k in ("feature", "value", "left", "right", "dl")}
    model_tree: list[int] = []
    leaf_only: list[float] = []
    roots: list[int] = []
    constant = float(base_margin)
    abs_bound = abs(float(base_margin))
    offset = 0
    for tree in trees:
        if int(tree["tree_param"].get("size_leaf_vector", "1")) > 1:
            return "vector leaves"
        if any(int(s) != 0 for s in tree.get("split_type", [])) or tree.get("categories_nodes"):
            return "categorical splits"
        left = np.asarray(tree["left_children"], dtype=np.int64)
        right = np.asarray(tree["right_children"], dtype=np.int64)
        value = np.asarray(tree["split_conditions"], dtype=np.float64).astype(np.float32)
        feature = np.asarray(tree["split_indices"], dtype=np.int64)
        default_left = np.asarray(tree["default_left"], dtype=np.int64) != 0
        n = len(left)
        if n == 0 or not (len(right) == len(value) == len(feature) == len(default_left) == n):
            return "inconsistent tree arrays"
        is_leaf = left < 0
        if np.any((right < 0) != is_leaf) or np.any(left >= n) or np.any(right >= n):
            return "inconsistent tree children"
        if not np.all(np.isfinite(value)):
            return "non-finite split or leaf value"
        if np.any(feature[~is_leaf] < 0) or (n_features and np.any(feature[~is_leaf] >= n_features)):
            return "split on an unknown feature"
        leaves = _reachable_leaves(left, right)
        leaf_values = value[leaves].astype(np.float64)
        abs_bound += float(np.max(np.abs(leaf_values)))
        if n == 1:  # a single leaf adds the same value to every row: never walked
            model_tree.append(-1)
            leaf_only.append(float(value[0]))
            constant += float(value[0])
        else:
            model_tree.append(len(roots))
            leaf_only.append(0.0)
            roots.append(offset)
        parts["feature"].append(np.where(is_leaf, -1, feature))
        parts["value"].append(value)
        parts["left"].append(np.where(is_leaf, -1, left + offset))
        parts["right"].append(np.where(is_leaf, -1, right + offset))
        parts["dl"].append(default_left)
        offset += n
    if not roots:
        return "only constant trees"
    if offset >= 2**31 - 1:
        return "too many nodes"
    feat = np.concatenate(parts["feature"]).astype(np.int32)
    val = np.concatenate(parts["value"])
    lft = np.concatenate(parts["left"]).astype(np.int32)
    rgt = np.concatenate(parts["right"]).astype(np.int32)
    dfl = np.concatenate(parts["dl"])
    n_cols = max(n_features, int(feat.max()) + 1)
    root_arr = np.asarray(roots, dtype=np.int32)

    depths = np.array([_max_depth(int(r), lft, rgt) for r in roots])
    depth = int(min(MAX_TOP_DEPTH, depths.max()))
    while depth > 1 and len(roots) * (2**depth) * 12 > MAX_TOP_BYTES:
        depth -= 1
    top_f, top_v, top_d, exits = _top_layout(root_arr, feat, val, lft, rgt, dfl, depth)
    tree_max, edges, box_tables = _box_bounds(root_arr, feat, val, lft, rgt, dfl, n_cols)
    # xgboost adds 1 + n_trees float32 terms; each addition rounds by at most u * |partial| <= u * abs_bound.
    # Twice that, plus a few ulps for our own base margin and float64 running sums, bounds the difference
    # between xgboost's margin and the exact sum whatever its order of summation.
    slack = 2.0 * (len(trees) + 4) * _U32 * abs_bound
    return Trees(
        feature=feat, value=val, left=lft, right=rgt, default_left=dfl,
        model_tree=np.asarray(model_tree, dtype=np.int32), leaf_only=np.asarray(leaf_only, dtype=np.float32),
        roots=root_arr, tree_max=tree_max, depth=depth, top_feature=top_f, top_value=top_v,
        top_default_left=top_d, exits=exits, box_edges=edges, box_tables=box_tables,
        constant=constant, base_margin=base_margin, slack=slack, n_trees=len(trees), n_features=n_cols,
    )


def _reachable_leaves(left: NDArray[np.int64], right: NDArray[np.int64]) -> NDArray[np.int64]:
    # Deleted nodes may linger in the arrays; only leaves reachable from the root bound the tree's value.
    seen = np.zeros(len(left), dtype=bool)
    stack = [0]
    leaves = []
    while stack:
        k = stack.pop()
        if seen[k]:
            raise ValueError("tree is not a tree (node reached twice)")
        seen[k] = True
        if left[k] < 0:
            leaves.append(k)
        else:
            stack.extend((int(left[k]), int(right[k])))
    return np.asarray(leaves, dtype=np.int64)


@numba.njit(cache=True)
def _max_depth(root: int, left: np.ndarray, right: np.ndarray) -> int:  # pragma: no cover - compiled
    stack = [(root, 0)]
    deepest = 0
    while stack:
        k, d = stack.pop()
        if left[k] < 0:
            deepest = max(deepest, d)
        else:
            stack.append((left[k], d + 1))
            stack.append((right[k], d + 1))
    return deepest


@numba.njit(cache=True)
def _top_layout(roots: np.ndarray, feature: np.ndarray, value: np.ndarray, left: np.ndarray, right: np.ndarray,
                default_left: np.ndarray, depth: int) -> tuple[Any, Any, Any, Any]:  # pragma: no cover
    # The top `depth` levels of each tree as a complete binary tree (slot s has children 2s+1, 2s+2). Below a
    # leaf that sits higher up, every slot leads to that leaf; `exits` holds the node reached at `depth`.
    n_t = roots.shape[0]
    n_inner = (1 << depth) - 1
    top_f = np.zeros((n_t, n_inner), dtype=np.int32)
    top_v = np.full((n_t, n_inner), np.nan, dtype=np.float32)
    top_d = np.zeros((n_t, n_inner), dtype=np.bool_)
    exits = np.zeros((n_t, n_inner + 1), dtype=np.int32)
    for t in range(n_t):
        stack = [(0, roots[t])]
        while stack:
            s, k = stack.pop()
            if s >= n_inner:
                exits[t, s - n_inner] = k
                continue
            if feature[k] >= 0:
                top_f[t, s] = feature[k]
                top_v[t, s] = value[k]
                top_d[t, s] = default_left[k]
                stack.append((2 * s + 1, left[k]))
                stack.append((2 * s + 2, right[k]))
            else:
                stack.append((2 * s + 1, k))
                stack.append((2 * s + 2, k))
    return top_f, top_v, top_d, exits


def _box_bounds(roots: NDArray[np.int32], feature: NDArray[np.int32], value: NDArray[np.float32],
                left: NDArray[np.int32], right: NDArray[np.int32], default_left: NDArray[np.bool_],
                n_cols: int) -> tuple[Any, Any, Any]:
    """Per tree its largest leaf and, per feature, the largest leaf given that feature's (binned) value.

    Bin edges are split thresholds of the feature (evenly spaced in rank over all its splits), so bins follow
    the data the model was grown on. Which features a tree is bounded with is chosen per call, from the data
    (:func:`_choose_boxes`).
    """
    inner = feature >= 0
    edges = np.full((n_cols, BOX_EDGES), _F32_MAX, dtype=np.float32)
    for j in range(n_cols):
        th = np.sort(value[inner & (feature == j)])
        if len(th) == 0:
            continue
        if len(np.unique(th)) > BOX_EDGES:
            th = th[np.linspace(0, len(th) - 1, BOX_EDGES).round().astype(np.int64)]
        th = np.unique(th)
        edges[j, : len(th)] = th
    n_t = len(roots)
    tree_max = np.empty(n_t, dtype=np.float64)
    tables = np.empty((n_t, n_cols, BOX_EDGES + 2), dtype=np.float32)
    for t in range(n_t):
        tree_max[t] = _tree_tables(int(roots[t]), feature, value, left, right, default_left, edges, tables[t])
    return tree_max, edges, tables


@numba.njit(cache=True)
def _tree_tables(root: int, feature: np.ndarray, value: np.ndarray, left: np.ndarray, right: np.ndarray,
                 default_left: np.ndarray, edges: np.ndarray, tables: np.ndarray) -> float:  # pragma: no cover
    # Leaves with their boxes (lo <= x < hi per feature, and whether NaN reaches them); tables[j, b] is the
    # largest leaf whose box overlaps bin b of feature j (b edges <= x; the last bin is NaN).
    n_cols = edges.shape[0]
    nan_bin = edges.shape[1] + 1
    tables[:, :] = -np.inf
    tmax = -np.inf
    stack = [(root, np.full(n_cols, -np.inf, np.float32), np.full(n_cols, np.inf, np.float32),
              np.ones(n_cols, np.bool_))]
    while stack:
        k, lo, hi, nan_ok = stack.pop()
        if left[k] < 0:
            v = value[k]
            tmax = max(tmax, np.float64(v))
            for j in range(n_cols):
                # x in [lo, hi) falls in bins searchsorted(lo, right) .. searchsorted(hi, left); covering
                # more bins than needed only loosens the bound
                b0 = np.searchsorted(edges[j], lo[j], side="right")
                b1 = np.searchsorted(edges[j], hi[j], side="left")
                for b in range(b0, b1 + 1):
                    if v > tables[j, b]:
                        tables[j, b] = v
                if nan_ok[j] and v > tables[j, nan_bin]:
                    tables[j, nan_bin] = v
            continue
        j = feature[k]
        lo_l, hi_l, nan_l = lo.copy(), hi.copy(), nan_ok.copy()
        hi_l[j] = min(hi_l[j], value[k])
        nan_l[j] = nan_l[j] and default_left[k]
        lo_r, hi_r, nan_r = lo.copy(), hi.copy(), nan_ok.copy()
        lo_r[j] = max(lo_r[j], value[k])
        nan_r[j] = nan_r[j] and not default_left[k]
        stack.append((left[k], lo_l, hi_l, nan_l))
        stack.append((right[k], lo_r, hi_r, nan_r))
    return tmax


@numba.njit(cache=True, nogil=True, inline="always")
def _bin_rows(xf: np.ndarray, base: int, n: int, n_cols: int, edges: np.ndarray, used: np.ndarray,
              bins: np.ndarray) -> None:  # pragma: no cover - compiled
    # bins[j, r]: the number of edges <= x (a branch-free search over the 63 sorted edges); NaN: bin 64.
    for j in range(n_cols):
        if not used[j]:
            continue
        ej = edges[j]
        for r in range(n):
            v = xf[base + r * n_cols + j]
            pos = 32 * np.int64(ej[31] <= v)
            pos += 16 * np.int64(ej[pos + 15] <= v)
            pos += 8 * np.int64(ej[pos + 7] <= v)
            pos += 4 * np.int64(ej[pos + 3] <= v)
            pos += 2 * np.int64(ej[pos + 1] <= v)
            pos += np.int64(ej[pos] <= v)
            bins[j, r] = BOX_EDGES + 1 if v != v else pos


@numba.njit(cache=True, nogil=True)
def _choose_boxes(x: np.ndarray, stride: int, tree_max: np.ndarray, edges: np.ndarray, tables: np.ndarray,
                  n_box: int, depth: int, top_f: np.ndarray, top_v: np.ndarray, top_d: np.ndarray,
                  exits: np.ndarray, feature: np.ndarray, value: np.ndarray, left: np.ndarray, right: np.ndarray,
                  default_left: np.ndarray) -> tuple[Any, Any, Any]:  # pragma: no cover - compiled
    # Per tree, greedily the n_box features whose tables give the smallest bound summed over a sample of the
    # rows (every stride-th), and how far that bound lies above the tree's leaf on the sample (the gap):
    # only speed depends on either, never the result.
    n_cols = x.shape[1]
    n_t = tree_max.shape[0]
    rows = x[::stride]
    n = rows.shape[0]
    used = np.ones(n_cols, dtype=np.bool_)
    bins = np.empty((n_cols, n), dtype=np.uint8)
    flat = np.ascontiguousarray(rows).ravel()
    _bin_rows(flat, 0, n, n_cols, edges, used, bins)
    lanes = np.arange(n)
    slots = np.empty(n, dtype=np.int32)
    deep = np.empty((2, n), dtype=np.int64)
    leaf = np.empty(n, dtype=np.float32)
    gap = np.zeros(n_t, dtype=np.float64)
    box_feature = np.zeros((n_t, n_box), dtype=np.int32)
    box_table = np.empty((n_t, n_box, tables.shape[2]), dtype=np.float32)
    cur = np.empty(n, dtype=np.float32)
    for t in range(n_t):
        cur[:] = np.float32(tree_max[t])
        for q in range(n_box):
            best_j = 0
            best = np.inf
            for j in range(n_cols):
                tab = tables[t, j]
                bj = bins[j]
                total = 0.0
                for r in range(n):
                    total += min(cur[r], tab[bj[r]])
                if total < best:
                    best = total
                    best_j = j
            box_feature[t, q] = best_j
            box_table[t, q] = tables[t, best_j]
            for r in range(n):
                cur[r] = min(cur[r], tables[t, best_j, bins[best_j, r]])
        _walk(flat, 0, n_cols, lanes, n, t, depth, top_f, top_v, top_d, exits, feature, value, left, right,
              default_left, True, slots, deep, leaf)
        for r in range(n):
            gap[t] += cur[r] - leaf[r]
    return box_feature, box_table, gap


@dataclass
class ArgmaxResult:
    """Per event the chosen row (global index), plus what it cost."""

    rows: NDArray[np.int64]
    tree_evaluations: int  # (row, tree) walks of the kernel, plus n_trees per row re-scored by xgboost
    rescored_rows: int


def pruned_argmax(
    trees: Trees, features: NDArray[np.float32], counts: NDArray[np.int64],
    rescore: Callable[[NDArray[np.int64]], NDArray[np.float32]],
    first_trees: int = FIRST_TREES, group_rows: int = GROUP_ROWS, box_features: int = BOX_FEATURES,
) -> ArgmaxResult:
    """Row of the highest xgboost probability of each consecutive segment of ``features`` (first on ties).

    ``rescore(rows)`` must return xgboost's float32 probabilities of ``features[rows]``; it is called at most
    once, for the rows of the events whose winner the bounds alone cannot separate (exact or near ties).
    """
    x = np.ascontiguousarray(features, dtype=np.float32)
    counts = np.asarray(counts, dtype=np.int64)
    if x.ndim != 2 or (len(x) and x.shape[1] < trees.n_features):
        raise ValueError(f"features must be (rows, >= {trees.n_features}), got {x.shape}")
    if int(counts.sum()) != len(x) or np.any(counts <= 0):
        raise ValueError("counts must be positive and add up to the number of rows")
    first = np.cumsum(counts) - counts
    choice = np.empty(len(counts), dtype=np.int64)
    survivor = np.zeros(len(x), dtype=np.bool_)
    # The probability gap that survives xgboost's float32 sigmoid on both sides, as a factor.
    ratio = (1.0 - SIGMOID_REL_ERROR) / (1.0 + SIGMOID_REL_ERROR)
    box_feature, box_table, gap = _choose_boxes(
        x, max(1, len(x) // BOX_SAMPLE), trees.tree_max, trees.box_edges, trees.box_tables,
        max(1, int(box_features)), trees.depth, trees.top_feature, trees.top_value, trees.top_default_left,
        trees.exits, trees.feature, trees.value, trees.left, trees.right, trees.default_left)
    # The sum is exact whatever the order of the trees, so walk first those whose bound is loosest: each
    # walk then takes the most off the rows' upper bounds.
    order = np.argsort(-gap, kind="stable")
    evaluations = _branch_and_bound(
        x, first, counts, trees.feature, trees.value, trees.left, trees.right, trees.default_left,
        trees.tree_max[order], trees.depth, trees.top_feature[order], trees.top_value[order],
        trees.top_default_left[order], trees.exits[order], trees.box_edges, box_feature[order], box_table[order],
        trees.constant, trees.slack, ratio,
        MIN_PRUNE_MARGIN, max(1, int(first_trees)), max(1, int(group_rows)), bool(np.isnan(x).any()),
        choice, survivor,
    )
    open_events = np.flatnonzero(choice < 0)
    rescored = 0
    if len(open_events):
        rows = np.flatnonzero(survivor)
        probabilities = np.asarray(rescore(rows), dtype=np.float32)
        rescored = len(rows)
        # survivors keep their order, so the first maximum among them is the first maximum overall
        event_of_row = np.searchsorted(first, rows, side="right") - 1
        seg_counts = np.bincount(event_of_row, minlength=len(counts))[open_events]
        seg_first = np.cumsum(seg_counts) - seg_counts
        seg_max = np.maximum.reduceat(probabilities, seg_first)
        hits = np.flatnonzero(probabilities == np.repeat(seg_max, seg_counts))
        choice[open_events] = rows[hits[np.searchsorted(hits, seg_first)]]
    return ArgmaxResult(choice, int(evaluations) + rescored * trees.n_trees, rescored)


@numba.njit(cache=True, nogil=True)
def _walk(xf: np.ndarray, base: int, n_cols: int, lanes: np.ndarray, m: int, t: int, depth: int,
          top_f: np.ndarray, top_v: np.ndarray, top_d: np.ndarray, exits: np.ndarray, feature: np.ndarray,
          value: np.ndarray, left: np.ndarray, right: np.ndarray, default_left: np.ndarray, has_nan: bool,
          slots: np.ndarray, deep: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    # Leaf values of tree t for rows lanes[:m] (row i starts at xf[base + lanes[i] * n_cols]). The top levels
    # go level by level over all rows (independent loads, no branches). Decisions
    # are xgboost's: float32 x < threshold goes left, NaN follows the default direction.
    n_inner = (1 << depth) - 1
    for i in range(m):
        slots[i] = 0
    if has_nan:
        for _ in range(depth):
            for i in range(m):
                s = slots[i]
                v = xf[base + lanes[i] * n_cols + top_f[t, s]]
                go_right = (v >= top_v[t, s]) | ((v != v) & (not top_d[t, s]))
                slots[i] = 2 * s + 1 + np.int32(go_right)
    else:
        for _ in range(depth):
            for i in range(m):
                s = slots[i]
                v = xf[base + lanes[i] * n_cols + top_f[t, s]]
                slots[i] = 2 * s + 1 + np.int32(v >= top_v[t, s])
    # below the top levels: again level by level, over the rows not at a leaf yet
    node = deep[0]
    lane = deep[1]
    q = 0
    for i in range(m):
        k = exits[t, slots[i] - n_inner]
        if feature[k] < 0:
            out[i] = value[k]
        else:
            node[q] = k
            lane[q] = i
            q += 1
    while q > 0:
        for j in range(q):
            k = node[j]
            v = xf[base + lanes[lane[j]] * n_cols + feature[k]]
            go_left = (v < value[k]) | ((v != v) & default_left[k])
            node[j] = left[k] if go_left else right[k]
        kept = 0
        for j in range(q):
            k = node[j]
            if feature[k] < 0:
                out[lane[j]] = value[k]
            else:
                node[kept] = k
                lane[kept] = lane[j]
                kept += 1
        q = kept


@numba.njit(cache=True, nogil=True, inline="always")
def _pack(xf: np.ndarray, base: int, n_cols: int, rows: np.ndarray, m: int, xs: np.ndarray,
          lanes: np.ndarray) -> None:  # pragma: no cover - compiled
    # Copy group rows rows[:m] to the front of xs, lane i on xs row i.
    for i in range(m):
        o = base + rows[i] * n_cols
        for j in range(n_cols):
            xs[i * n_cols + j] = xf[o + j]
        lanes[i] = i


@numba.njit(cache=True, nogil=True)
def _threshold(lower: float, ratio: float, min_margin: float) -> float:  # pragma: no cover - compiled
    """Margin below which a row's probability is certainly smaller than that of a row with margin >= lower."""
    if lower < min_margin:
        return -np.inf
    p = ratio / (1.0 + np.exp(-lower))
    t = np.log(p) - np.log1p(-p)
    return t - 1e-9 * (1.0 + abs(t))  # float64 rounding of the three operations above, generously


@numba.njit(cache=True, nogil=True)
def _branch_and_bound(  # pragma: no cover - compiled
    x: np.ndarray, first: np.ndarray, counts: np.ndarray, feature: np.ndarray, value: np.ndarray,
    left: np.ndarray, right: np.ndarray, default_left: np.ndarray, tree_max: np.ndarray, depth: int,
    top_f: np.ndarray, top_v: np.ndarray, top_d: np.ndarray, exits: np.ndarray, box_edges: np.ndarray,
    box_feature: np.ndarray, box_table: np.ndarray, constant: float, slack: float, ratio: float,
    min_margin: float, first_trees: int, group_rows: int, has_nan: bool, choice: np.ndarray,
    survivor: np.ndarray,
) -> int:
    n_ev = counts.shape[0]
    n_cols = x.shape[1]
    n_t = tree_max.shape[0]
    k1 = min(first_trees, n_t)
    xf = x.ravel()
    max_n = 1
    for e in range(n_ev):
        max_n = max(max_n, counts[e])
    cap = group_rows + max_n + CHUNK  # the last CHUNK lanes of the scratch arrays serve the challengers
    acc = np.empty(cap, dtype=np.float64)  # partial margin
    rem = np.empty(cap, dtype=np.float64)  # upper bound of the trees not walked yet
    event = np.empty(cap, dtype=np.int64)
    done = np.empty(cap, dtype=np.bool_)
    bins = np.empty((n_cols, cap), dtype=np.uint8)
    bound = np.empty((n_t, cap), dtype=np.float32)  # box bound of each tree for each row
    n_box = box_feature.shape[1]
    used = np.zeros(n_cols, dtype=np.bool_)
    for t in range(n_t):
        for q in range(n_box):
            used[box_feature[t, q]] = True
    lanes = np.empty(cap, dtype=np.int64)
    rid = np.empty(cap, dtype=np.int64)
    xs = np.empty(cap * n_cols, dtype=np.float32)
    slots = np.empty(cap, dtype=np.int32)
    deep = np.empty((2, cap), dtype=np.int64)
    leaf = np.empty(cap, dtype=np.float32)
    max_g = group_rows + 1
    lower = np.empty(max_g, dtype=np.float64)
    cut = np.empty(max_g, dtype=np.float64)
    lead = np.empty(max_g, dtype=np.int64)
    lead_partial = np.empty((max_g, n_t + 1), dtype=np.float64)  # leader's partial margin after k trees
    chal = np.empty(cap, dtype=np.int64)
    own = np.empty((CHUNK, n_t + 1), dtype=np.float64)  # challengers' partial margins
    evaluations = 0
    e0 = 0
    while e0 < n_ev:
        # a group: whole events, about group_rows rows
        e1 = e0
        n = 0
        while e1 < n_ev and (n == 0 or n + counts[e1] <= group_rows):
            n += counts[e1]
            e1 += 1
        n_g = e1 - e0
        base = first[e0] * n_cols
        r = 0
        for g in range(n_g):
            for _ in range(counts[e0 + g]):
                event[r] = g
                r += 1
        for r in range(n):
            acc[r] = constant
            done[r] = False
            rem[r] = 0.0
        # the box bound of every (tree, row)
        _bin_rows(xf, base, n, n_cols, box_edges, used, bins)
        for t in range(n_t):
            tmax = np.float32(tree_max[t])
            for r in range(n):
                bound[t, r] = tmax
            for q in range(n_box):
                tab = box_table[t, q]
                bj = bins[box_feature[t, q]]
                for r in range(n):
                    bound[t, r] = min(bound[t, r], tab[bj[r]])
            for r in range(n):
                rem[r] += bound[t, r]

        # 1. every row through the first trees
        for r in range(n):
            lanes[r] = r
        for t in range(k1):
            _walk(xf, base, n_cols, lanes, n, t, depth, top_f, top_v, top_d, exits, feature, value, left, right,
                  default_left, has_nan, slots, deep, leaf)
            for r in range(n):
                acc[r] += leaf[r]
                rem[r] -= bound[t, r]
        evaluations += n * k1
        # 2. each event's leader (first largest partial margin) through all trees; rows that are walked
        # again and again are copied into the contiguous buffer xs (lane i: xs row lanes[i], group row rid[.])
        r = 0
        for g in range(n_g):
            best = r
            for q in range(r, r + counts[e0 + g]):
                if acc[q] > acc[best]:
                    best = q
            lead[g] = best
            lead_partial[g, k1] = acc[best]
            r += counts[e0 + g]
        _pack(xf, base, n_cols, lead, n_g, xs, lanes)
        for t in range(k1, n_t):
            _walk(xs, 0, n_cols, lanes, n_g, t, depth, top_f, top_v, top_d, exits, feature, value, left,
                  right, default_left, has_nan, slots, deep, leaf)
            for g in range(n_g):
                acc[lead[g]] += leaf[g]
                lead_partial[g, t + 1] = acc[lead[g]]
        evaluations += n_g * (n_t - k1)
        for g in range(n_g):
            done[lead[g]] = True
            lower[g] = acc[lead[g]] - slack
            cut[g] = _threshold(lower[g], ratio, min_margin)
        # 3. the others, tree by tree, while their upper bound reaches the cut
        m = 0
        for r in range(n):
            if not done[r] and acc[r] + rem[r] + slack >= cut[event[r]]:
                rid[m] = r
                m += 1
        _pack(xf, base, n_cols, rid, m, xs, lanes)
        packed = m
        for t in range(k1, n_t):
            if m == 0:
                break
            _walk(xs, 0, n_cols, lanes, m, t, depth, top_f, top_v, top_d, exits, feature, value, left, right,
                  default_left, has_nan, slots, deep, leaf)
            evaluations += m
            kept = 0
            n_chal = 0
            for i in range(m):
                p = lanes[i]
                r = rid[p]
                a = acc[r] + leaf[i]
                acc[r] = a
                b = rem[r] - bound[t, r]
                rem[r] = b
                g = event[r]
                if a + b + slack < cut[g]:
                    continue
                if t + 1 < n_t and a > lead_partial[g, t + 1]:
                    chal[n_chal] = p  # a challenger: ahead of its leader after as many trees
                    n_chal += 1
                    continue
                lanes[kept] = p
                kept += 1
            m = kept
            # complete the challengers at once (in chunks): one that beats its leader becomes the leader
            for c0 in range(0, n_chal, CHUNK):
                nc = min(CHUNK, n_chal - c0)
                for c in range(nc):
                    own[c, t + 1] = acc[rid[chal[c0 + c]]]
                for u in range(t + 1, n_t):
                    _walk(xs, 0, n_cols, chal[c0:], nc, u, depth, top_f, top_v, top_d, exits, feature, value,
                          left, right, default_left, has_nan, slots[cap - CHUNK:], deep[:, cap - CHUNK:],
                          leaf[cap - CHUNK:])
                    for c in range(nc):
                        own[c, u + 1] = own[c, u] + leaf[cap - CHUNK + c]
                evaluations += nc * (n_t - t - 1)
                for c in range(nc):
                    r = rid[chal[c0 + c]]
                    acc[r] = own[c, n_t]
                    done[r] = True
                    g = event[r]
                    if acc[r] - slack > lower[g]:
                        lower[g] = acc[r] - slack
                        cut[g] = _threshold(lower[g], ratio, min_margin)
                        for u in range(t + 1, n_t + 1):
                            lead_partial[g, u] = own[c, u]
            if m > 0 and 2 * m < packed:
                # repack the survivors at the front (lanes stay increasing, so copying forward is safe)
                for i in range(m):
                    p = lanes[i]
                    if p != i:
                        for j in range(n_cols):
                            xs[i * n_cols + j] = xs[p * n_cols + j]
                        rid[i] = rid[p]
                    lanes[i] = i
                packed = m
        for i in range(m):  # walked through all trees
            r = rid[lanes[i]]
            done[r] = True
            g = event[r]
            if acc[r] - slack > lower[g]:
                lower[g] = acc[r] - slack
                cut[g] = _threshold(lower[g], ratio, min_margin)
        # 4. per event the completed rows that the final cut cannot exclude
        r = first[e0]
        for g in range(n_g):
            s = r - first[e0]
            n_keep = 0
            keep = -1
            for q in range(s, s + counts[e0 + g]):
                if done[q] and acc[q] + slack >= cut[g]:
                    n_keep += 1
                    if keep < 0:
                        keep = q
            if n_keep == 1:
                choice[e0 + g] = first[e0] + keep
            else:
                choice[e0 + g] = -1
                for q in range(s, s + counts[e0 + g]):
                    if done[q] and acc[q] + slack >= cut[g]:
                        survivor[first[e0] + q] = True
            r += counts[e0 + g]
        e0 = e1
    return evaluations


@numba.njit(cache=True, nogil=True)
def _margins(x: np.ndarray, model_tree: np.ndarray, leaf_only: np.ndarray, base: np.float32, depth: int,
             top_f: np.ndarray, top_v: np.ndarray, top_d: np.ndarray, exits: np.ndarray, feature: np.ndarray,
             value: np.ndarray, left: np.ndarray, right: np.ndarray, default_left: np.ndarray, has_nan: bool,
             out: np.ndarray) -> None:  # pragma: no cover - compiled
    n = x.shape[0]
    lanes = np.arange(n)
    slots = np.empty(n, dtype=np.int32)
    deep = np.empty((2, n), dtype=np.int64)
    leaf = np.empty(n, dtype=np.float32)
    for i in range(n):
        out[i] = base
    for q in range(model_tree.shape[0]):
        t = model_tree[q]
        if t < 0:
            for i in range(n):
                out[i] += leaf_only[q]
            continue
        _walk(x.ravel(), 0, x.shape[1], lanes, n, t, depth, top_f, top_v, top_d, exits, feature, value, left,
              right, default_left, has_nan, slots, deep, leaf)
        for i in range(n):
            out[i] += leaf[i]


def margins_float32(trees: Trees, features: NDArray[np.float32]) -> NDArray[np.float32]:
    """float32 margins through the kernel's own walker, summed like xgboost (base, then tree by tree).

    Not used for choosing; the tests compare it bit for bit with xgboost's margins to prove that the parsed
    thresholds, leaves, missing-value directions and base margin are exactly xgboost's.
    """
    x = np.ascontiguousarray(features, dtype=np.float32)
    out = np.empty(len(x), dtype=np.float32)
    _margins(x, trees.model_tree, trees.leaf_only, trees.base_margin, trees.depth, trees.top_feature,
             trees.top_value, trees.top_default_left, trees.exits, trees.feature, trees.value, trees.left,
             trees.right, trees.default_left, bool(np.isnan(x).any()), out)
    return out
