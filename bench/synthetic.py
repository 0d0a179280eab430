"""Clustered synthetic embeddings with "text-like" queries, for tests and benchmarks of the indexes.

The database imitates image embeddings: cluster centres grouped under super-centres (a photo collection
has topics and sub-topics), cluster sizes with a long tail, and within-cluster spread confined to a
low-dimensional subspace (CLIP embeddings have an effective dimension far below 512) plus a little
isotropic noise. With the defaults a point's 10th neighbour sits at cosine ~0.4, where CLIP's
text-to-image scores sit.

Queries come from a *different* distribution, as text queries to an image index do: they are drawn
around the same centres with their own noise and shifted by a fixed "modality gap" vector (CLIP's text
and image embeddings occupy two separate cones). Tuning an index on database vectors alone would be
tuned on queries whose nearest neighbour is themselves; these are not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SyntheticCollection", "clustered_vectors"]


@dataclass
class SyntheticCollection:
    """Database vectors, shifted queries and the cluster each was drawn from (see the module docstring)."""

    xb: np.ndarray  # (n, d) float32, L2-normalised database vectors
    xq: np.ndarray  # (nq, d) float32, L2-normalised queries from the shifted "text" distribution
    labels: np.ndarray  # (n,) int64 cluster of each database vector
    query_labels: np.ndarray  # (nq,) int64 cluster each query was drawn around


def clustered_vectors(
    n: int,
    d: int = 512,
    *,
    nq: int = 1000,
    clusters: int = 2000,
    noise: float = 1.5,
    gap: float = 0.8,
    rank: int = 96,
    seed: int = 0,
    chunk: int = 100_000,
) -> SyntheticCollection:
    """`n` database vectors and `nq` queries of dimension `d` (see the module docstring).

    `noise` scales the within-cluster spread relative to the unit centres (larger is harder for an
    approximate index), `gap` the norm of the modality shift added to queries, `rank` the dimension of
    the subspace the spread lives in.
    """
    if n <= 0 or d <= 0 or nq < 0 or clusters <= 0:
        raise ValueError(
            f"n, d and clusters must be positive and nq >= 0, got n={n}, d={d}, nq={nq}, clusters={clusters}"
        )
    rng = np.random.default_rng(seed)
    rank = min(rank, d)
    groups = max(1, clusters // 10)
    top = _unit(rng.standard_normal((groups, d), dtype=np.float32))
    centres = _unit(
        top[np.arange(clusters) % groups] + 0.8 * rng.standard_normal((clusters, d), dtype=np.float32) / np.sqrt(d)
    )
    weights = 1.0 / np.sqrt(np.arange(1, clusters + 1))  # a long tail of small clusters
    weights /= weights.sum()
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0].T.astype(np.float32)  # (rank, d)

    def sample(labels: np.ndarray) -> np.ndarray:
        m = len(labels)
        spread = rng.standard_normal((m, rank), dtype=np.float32) @ basis / np.sqrt(rank)
        iso = rng.standard_normal((m, d), dtype=np.float32) / np.sqrt(d)
        return centres[labels] + noise * spread + 0.3 * iso

    labels = rng.choice(clusters, size=n, p=weights)
    xb = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, chunk):  # bounded temporaries: 1M x 512 is 2 GB already
        xb[start : start + chunk] = _unit(sample(labels[start : start + chunk]))
    shift = _unit(rng.standard_normal((1, d), dtype=np.float32))[0] * gap
    query_labels = rng.choice(clusters, size=nq, p=weights)
    xq = _unit(sample(query_labels) + shift)
    return SyntheticCollection(xb, xq, labels.astype(np.int64), query_labels.astype(np.int64))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x
