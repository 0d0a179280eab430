"""Search knobs chosen to reach a target recall@k against exact search, on the queries users will send.

For an image index those are text queries (captions or prompts embedded by the model), not the indexed
vectors themselves: a database vector's nearest neighbour is itself, which makes any index look better
than it is for a text query that lands between clusters.

Each knob is raised along a doubling ladder until the target is met, then bisected down to the smallest
value that still meets it (recall grows with nprobe and efSearch). IVF-PQ also tries re-ranking depths
in increasing order and keeps the cheapest that reaches the target; when none does, the best knobs
tried (under a fixed re-ranking depth, recall can fall as nprobe grows).

A result whose exact score ties the k-th exact one counts as found: with duplicate vectors, exact search
keeps an arbitrary few of the tied ids, and an index that keeps others is just as right. So visiting
every list of an index of full vectors reaches recall 1, and anything less after an update means the
update damaged it (`retrieval.build` refuses to publish such a version).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np

from .index import Neighbors, SearchParams, VectorIndex, exact_search
from .vectors import VectorStore

__all__ = [
    "TuningReport",
    "TargetRecallError",
    "recall_vs_exact",
    "recall_per_query",
    "exact_scores",
    "tune",
    "require_target",
    "RERANK_LADDER",
]

logger = logging.getLogger(__name__)

RERANK_LADDER = (2, 4, 8, 16, 32, 64, 128, 256)
# Under a fixed re-ranking depth, a recall this far below the best seen ends the climb of nprobe.
_FALLING = 0.02
# Scores within this of the k-th exact score tie with it (cosines; FAISS's kernels give one pair's
# float32 inner product to ~1e-7, so exact search and an index may order a tie either way).
TIE_TOLERANCE = 1e-5
_EF_MAX = 4096


@dataclass
class TuningReport:
    """What tuning chose and what it measured; recorded in the index manifest."""

    k: int
    target_recall: float
    recall: float  # recall@k of the chosen knobs on the tuning queries
    reached: bool  # the 95% lower confidence bound of `recall` is at least the target
    params: SearchParams
    queries: int
    query_source: str  # where the queries came from, e.g. "captions (text)"
    trials: list[dict] = field(default_factory=list)  # every setting measured: knobs and recall
    lower_bound: float | None = None  # the 95% lower confidence bound of `recall`

    def to_dict(self) -> dict:
        """JSON-ready fields, as the manifest records them."""
        return {**asdict(self), "params": self.params.to_dict()}


class TargetRecallError(ValueError):
    """No search knobs reach the target recall on the tuning queries."""


def require_target(report: TuningReport, factory: str, consequence: str) -> TuningReport:
    """`report` if its knobs reach the target recall; else TargetRecallError saying what the best knobs
    measured, then `consequence` (what was not done, and how to go on)."""
    if report.reached:
        return report
    lower = "" if report.lower_bound is None else f", 95% lower bound {report.lower_bound:.3f}"
    raise TargetRecallError(
        f"{factory} reaches at best recall@{report.k} {report.recall:.3f} with {_knobs(report.params)}{lower} "
        f"on {report.queries} {report.query_source} queries, below the target {report.target_recall}: {consequence}"
    )


def recall_vs_exact(
    I: np.ndarray, I_true: np.ndarray, *, scores: np.ndarray | None = None, D_true: np.ndarray | None = None
) -> float:
    """Mean over queries of `recall_per_query` (1.0 without queries)."""
    per_query = recall_per_query(I, I_true, scores=scores, D_true=D_true)
    return float(per_query.mean()) if len(per_query) else 1.0


def recall_per_query(
    I: np.ndarray, I_true: np.ndarray, *, scores: np.ndarray | None = None, D_true: np.ndarray | None = None
) -> np.ndarray:
    """|approximate top-k ∩ exact top-k| / |exact top-k| for each row of I (nq, k) against I_true
    (nq, k), -1 entries ignored; 1.0 for a query with no exact results.

    Given `scores` (nq, k), the exact scores of I's results, and `D_true`, those of the exact top-k, a
    result that ties the k-th exact score (within TIE_TOLERANCE) counts as found too: among equal
    scores (duplicate images, repeated captions) which ids exact search keeps is arbitrary."""
    out = np.ones(len(I))
    for i, (approx, exact) in enumerate(zip(I, I_true)):
        exact = exact[exact >= 0]
        if not len(exact):
            continue
        found = (approx >= 0) & np.isin(approx, exact)
        if scores is not None:
            found |= (approx >= 0) & (scores[i] >= D_true[i][: len(exact)].min() - TIE_TOLERANCE)
        out[i] = min(int(found.sum()), len(exact)) / len(exact)
    return out


def exact_scores(xq: np.ndarray, I: np.ndarray, store: VectorStore) -> np.ndarray:
    """(nq, k) inner products of each query with its results' stored vectors (-inf where I is -1)."""
    out = np.full(I.shape, -np.inf, dtype=np.float32)
    valid = I >= 0
    if valid.any():
        unique, inverse = np.unique(I[valid], return_inverse=True)
        out[valid] = np.einsum("ij,ij->i", np.repeat(xq, valid.sum(1), axis=0), store.get(unique)[inverse])
    return out


def _lower_bound(per_query: np.ndarray) -> float:
    """One-sided 95% lower confidence bound of the mean recall: the knobs are chosen on a sample of
    queries, and the promise must hold for the queries users send next, not just for that sample."""
    if len(per_query) < 2:
        return float(per_query.mean()) if len(per_query) else 1.0
    bound = per_query.mean() - 1.645 * per_query.std(ddof=1) / np.sqrt(len(per_query))
    return round(float(bound), 9)  # a mean of 0.9s is 0.8999999999999999: float noise must not miss 0.9


def tune(
    vindex: VectorIndex,
    xq: np.ndarray,
    *,
    k: int = 10,
    target_recall: float = 0.95,
    query_source: str = "unspecified",
    truth: Neighbors | None = None,
) -> TuningReport:
    """Sets `vindex.params` to the cheapest knobs whose recall@k on `xq` reaches `target_recall` (else
    the most exhaustive knobs tried, with `reached` False: `require_target` turns that into an error)."""
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    if vindex.vectors is None:
        raise ValueError("tuning needs the stored full vectors for exact ground truth")
    if len(xq) == 0 or vindex.ntotal == 0:
        report = TuningReport(k, target_recall, 1.0, True, vindex.params, 0, query_source)
        logger.warning("no tuning queries or no vectors: keeping default search knobs %s", vindex.params)
        return report
    truth = truth if truth is not None else exact_search(xq, vindex.vectors, k)
    trials: list[dict] = []

    def measure(params: SearchParams) -> tuple[float, float]:
        I = vindex.search(xq, k, params=params).I
        per_query = recall_per_query(I, truth.I, scores=exact_scores(xq, I, vindex.vectors), D_true=truth.D)
        recall, lower = float(per_query.mean()), _lower_bound(per_query)
        trials.append({**params.to_dict(), "recall": round(recall, 5), "lower_bound": round(lower, 5)})
        return recall, lower

    params, (recall, lower) = _choose(vindex, measure, target_recall)
    vindex.params = params
    report = TuningReport(
        k, target_recall, recall, lower >= target_recall, params, len(xq), query_source, trials, lower
    )
    log = logger.info if report.reached else logger.warning
    log(
        "tuned %s: %s gives recall@%d %.4f (95%% lower bound %.4f, target %.2f) on %d %s queries",
        vindex.spec.factory,
        _knobs(params),
        k,
        recall,
        lower,
        target_recall,
        len(xq),
        query_source,
    )
    return report


Measure = Callable[[SearchParams], "tuple[float, float]"]  # knobs -> (mean recall, its lower bound)


def _choose(vindex: VectorIndex, measure: Measure, target: float) -> tuple[SearchParams, tuple[float, float]]:
    base = vindex.params
    if vindex.spec.is_ivf:
        nlist = max(1, vindex.spec.nlist or _nlist(vindex))
        if base.rerank:
            return _deepest_needed(base, nlist, measure, target)
        return _smallest(lambda v: replace(base, nprobe=v), 1, nlist, measure, target)
    if base.ef_search or vindex.spec.is_hnsw:
        return _smallest(lambda v: replace(base, ef_search=v), 16, _EF_MAX, measure, target)
    return base, measure(base)  # no knobs (exact search): measured all the same, a damaged index shows


def _deepest_needed(
    base: SearchParams, nlist: int, measure: Measure, target: float
) -> tuple[SearchParams, tuple[float, float]]:
    """The smallest re-ranking depth of RERANK_LADDER, and under it the smallest nprobe, that reaches
    `target`; else the best knobs tried. With a fixed number of candidates, recall need not grow with
    nprobe: the more lists, the more codes whose approximate score crowds out true neighbours (IVF4096,
    PQ32x4fs on 1M clustered vectors: recall@10 0.93 with 8 lists and 640 candidates, 0.70 with all lists)."""
    tried: list[tuple[SearchParams, tuple[float, float]]] = []

    def noted(params: SearchParams) -> tuple[float, float]:
        tried.append((params, measure(params)))
        return tried[-1][1]

    for rerank in RERANK_LADDER:
        params, recall = _smallest(
            lambda v, r=rerank: replace(base, nprobe=v, rerank=r), 1, nlist, noted, target, falls=True
        )
        if recall[1] >= target:
            return params, recall
    return max(tried, key=lambda trial: trial[1][1])


def _smallest(
    make: Callable[[int], SearchParams], low: int, high: int, measure: Measure, target: float, *, falls: bool = False
) -> tuple[SearchParams, tuple[float, float]]:
    """The smallest knob value in [low, high] whose recall's lower bound reaches `target` (else the last
    tried). With `falls` (recall may fall as the knob grows), the climb also stops once recall is `_FALLING`
    below the best seen."""
    seen: dict[int, tuple[float, float]] = {}

    def at(value: int) -> float:
        if value not in seen:
            seen[value] = measure(make(value))
        return seen[value][1]

    value, previous = low, low - 1
    while at(value) < target and value < high:
        if falls and seen[value][0] < max(mean for mean, _ in seen.values()) - _FALLING:
            break
        previous, value = value, min(high, value * 2)
    if at(value) >= target:
        while value - previous > 1:  # invariant: previous misses (or is below the ladder), value reaches
            middle = (previous + value) // 2
            if middle < low:
                break
            if at(middle) >= target:
                value = middle
            else:
                previous = middle
    return make(value), seen[value]


def _nlist(vindex: VectorIndex) -> int:
    import faiss

    ivf = faiss.try_extract_index_ivf(vindex.index)
    return ivf.nlist if ivf is not None else 1


def _knobs(params: SearchParams) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.to_dict().items() if v) or "defaults"
