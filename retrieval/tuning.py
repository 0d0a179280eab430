"""Search knobs chosen to reach a target recall@k against exact search, on the queries users will send.

For an image index those are text queries (captions or prompts embedded by the model), not the indexed
vectors themselves: a database vector's nearest neighbour is itself, which makes any index look better
than it is for a text query that lands between clusters.

Each knob is raised along a doubling ladder until the target is met, then bisected down to the smallest
value that still meets it (recall grows with nprobe and efSearch). IVF-PQ also tries re-ranking depths
in increasing order and keeps the cheapest that reaches the target.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np

from .index import Neighbors, SearchParams, VectorIndex, exact_search

__all__ = ["TuningReport", "recall_vs_exact", "tune", "RERANK_LADDER"]

logger = logging.getLogger(__name__)

RERANK_LADDER = (2, 4, 8, 16)
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

    def to_dict(self) -> dict:
        """JSON-ready fields, as the manifest records them."""
        return {**asdict(self), "params": self.params.to_dict()}


def recall_vs_exact(I: np.ndarray, I_true: np.ndarray) -> float:
    """Mean over queries of |approximate top-k ∩ exact top-k| / |exact top-k| (-1 entries ignored)."""
    per_query = recall_per_query(I, I_true)
    return float(per_query.mean()) if len(per_query) else 1.0


def recall_per_query(I: np.ndarray, I_true: np.ndarray) -> np.ndarray:
    """|approximate top-k ∩ exact top-k| / |exact top-k| for each row of I (nq, k) against I_true
    (nq, k), -1 entries ignored; 1.0 for a query with no exact results."""
    out = np.ones(len(I))
    for i, (approx, exact) in enumerate(zip(I, I_true)):
        exact = exact[exact >= 0]
        if len(exact):
            out[i] = len(np.intersect1d(approx[approx >= 0], exact)) / len(exact)
    return out


def _lower_bound(per_query: np.ndarray) -> float:
    """One-sided 95% lower confidence bound of the mean recall: the knobs are chosen on a sample of
    queries, and the promise must hold for the queries users send next, not just for that sample."""
    if len(per_query) < 2:
        return float(per_query.mean()) if len(per_query) else 1.0
    return float(per_query.mean() - 1.645 * per_query.std(ddof=1) / np.sqrt(len(per_query)))


def tune(
    vindex: VectorIndex,
    xq: np.ndarray,
    *,
    k: int = 10,
    target_recall: float = 0.95,
    query_source: str = "unspecified",
    truth: Neighbors | None = None,
) -> TuningReport:
    """Sets `vindex.params` to the cheapest knobs whose recall@k on `xq` reaches `target_recall`."""
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    if vindex.vectors is None:
        raise ValueError("tuning needs the stored full vectors for exact ground truth")
    if len(xq) == 0 or vindex.ntotal == 0:
        report = TuningReport(k, target_recall, 1.0, True, vindex.params, 0, query_source)
        logger.warning("no tuning queries or no vectors: keeping default search knobs %s", vindex.params)
        return report
    if vindex.spec.kind == "flat":  # exact search: nothing to tune, recall 1 by construction
        return TuningReport(k, target_recall, 1.0, True, vindex.params, len(xq), query_source)
    truth = truth if truth is not None else exact_search(xq, vindex.vectors, k)
    trials: list[dict] = []

    def measure(params: SearchParams) -> tuple[float, float]:
        per_query = recall_per_query(vindex.search(xq, k, params=params).I, truth.I)
        recall, lower = float(per_query.mean()), _lower_bound(per_query)
        trials.append({**params.to_dict(), "recall": round(recall, 5), "lower_bound": round(lower, 5)})
        return recall, lower

    params, (recall, lower) = _choose(vindex, measure, target_recall)
    vindex.params = params
    report = TuningReport(k, target_recall, recall, lower >= target_recall, params, len(xq), query_source, trials)
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
            for rerank in RERANK_LADDER:
                params, recall = _smallest(
                    lambda v, r=rerank: replace(base, nprobe=v, rerank=r), 1, nlist, measure, target
                )
                if recall[1] >= target:
                    break
            return params, recall
        return _smallest(lambda v: replace(base, nprobe=v), 1, nlist, measure, target)
    if base.ef_search or vindex.spec.kind == "hnsw":
        return _smallest(lambda v: replace(base, ef_search=v), 16, _EF_MAX, measure, target)
    return base, measure(base)


def _smallest(
    make: Callable[[int], SearchParams], low: int, high: int, measure: Measure, target: float
) -> tuple[SearchParams, tuple[float, float]]:
    """The smallest knob value in [low, high] whose recall's lower bound reaches `target` (else `high`)."""
    seen: dict[int, tuple[float, float]] = {}

    def at(value: int) -> float:
        if value not in seen:
            seen[value] = measure(make(value))
        return seen[value][1]

    value, previous = low, low - 1
    while at(value) < target and value < high:
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
