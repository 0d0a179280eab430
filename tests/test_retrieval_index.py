"""Every index kind against a brute-force oracle; auto choice; tuning; stable ids; filters."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from test_retrieval_support import vector_store

from retrieval.index import SearchParams, VectorIndex, exact_search
from retrieval.kinds import IndexSpec, choose_spec, make_spec, parse_memory
from retrieval.tuning import recall_vs_exact, tune
from retrieval.vectors import count_after, merge_sorted, write_vectors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the synthetic data is benchmark data
from synthetic import clustered_vectors  # noqa: E402

D = 32
N = 6000  # below 256 * 40 points: PQ codes use 4-bit sub-quantizers, which train in well under a second

# kind, on_disk, knobs that make the index search (nearly) everything, recall it must then reach
KINDS = [
    ("flat", False, SearchParams(), 1.0),
    ("ivf", False, SearchParams(nprobe=10_000), 1.0),
    ("ivf", True, SearchParams(nprobe=10_000), 1.0),
    ("hnsw", False, SearchParams(ef_search=512), 0.99),
    ("ivfpq", False, SearchParams(nprobe=10_000, rerank=16), 0.9),
    ("ivfpq", True, SearchParams(nprobe=10_000, rerank=16), 0.9),
    ("ivfpqfs", False, SearchParams(nprobe=10_000, rerank=16), 0.9),
    ("ivfsq", False, SearchParams(nprobe=10_000, rerank=2), 0.98),
    ("hnswsq", False, SearchParams(ef_search=512), 0.95),
    ("IVF32,SQ8", False, SearchParams(nprobe=10_000), 0.9),
    ("HNSW16", False, SearchParams(ef_search=256), 0.98),
]
EXACT_SCORES = {"flat", "ivf", "hnsw", "ivfpq", "ivfpqfs", "ivfsq", "HNSW16"}  # true cosines (ivfpq*: re-ranked)


@pytest.fixture(scope="module")
def data():
    return clustered_vectors(N, D, nq=600, clusters=60, seed=3)


@pytest.fixture(scope="module")
def store(data, tmp_path_factory):
    return vector_store(tmp_path_factory.mktemp("vectors"), data.xb)


def _build(kind: str, on_disk: bool, store, tmp_path) -> VectorIndex:
    spec = make_spec(kind, len(store), D, on_disk=on_disk)
    return VectorIndex.build(spec, store, tmp_path)


def _ids_of(store, rows) -> np.ndarray:
    return np.asarray(store.ids)[rows]


@pytest.mark.parametrize(
    "kind,on_disk,params,min_recall", KINDS, ids=[f"{k}{'-disk' if d else ''}" for k, d, _, _ in KINDS]
)
def test_kind_against_brute_force(kind, on_disk, params, min_recall, data, store, tmp_path):
    vindex = _build(kind, on_disk, store, tmp_path)
    assert vindex.ntotal == N
    xq = data.xq[:100]
    truth = exact_search(xq, store, 10)
    oracle = xq @ data.xb.T  # brute force in numpy, independent of FAISS
    np.testing.assert_allclose(truth.D, -np.sort(-oracle, axis=1)[:, :10], rtol=1e-5, atol=1e-5)
    found = vindex.search(xq, 10, params=params)
    assert recall_vs_exact(found.I, truth.I) >= min_recall
    assert set(np.unique(found.I)) <= set(store.ids.tolist())  # labels are ids, not row positions
    if kind in EXACT_SCORES:
        rows = store.rows(found.I.ravel()).reshape(found.I.shape)
        np.testing.assert_allclose(found.D, np.take_along_axis(oracle, rows, 1), rtol=1e-4, atol=1e-4)
    if min_recall == 1.0:
        np.testing.assert_array_equal(np.sort(found.I, 1), np.sort(truth.I, 1))


def test_written_and_read_back_index_searches_the_same(data, store, tmp_path):
    vindex = _build("ivf", True, store, tmp_path)
    vindex.params = SearchParams(nprobe=4)
    before = vindex.search(data.xq[:50], 10)
    vindex.write(tmp_path)
    for mmap in (False, True):
        again = VectorIndex.read(tmp_path, vindex.spec, vindex.params, store, mmap=mmap)
        np.testing.assert_array_equal(again.search(data.xq[:50], 10).I, before.I)


def test_reranking_in_bounded_chunks_equals_one_gather(data, store, tmp_path, monkeypatch):
    """Deep re-ranking (64 x k candidates) gathers a bounded block of queries at a time, with the same result."""
    vindex = _build("ivfpqfs", False, store, tmp_path)
    params = SearchParams(nprobe=4, rerank=64)
    whole = vindex.search(data.xq[:40], 10, params=params)
    monkeypatch.setattr("retrieval.index._GATHER_BYTES", 3 * 640 * D * 4)  # three queries a gather
    chunked = vindex.search(data.xq[:40], 10, params=params)
    np.testing.assert_array_equal(chunked.I, whole.I)
    np.testing.assert_array_equal(chunked.D, whole.D)


def test_store_rows_of_ids_with_and_without_gaps():
    """Ids without gaps map to rows by arithmetic, ids with gaps by search: the same answer, -1 for absent ids."""
    from retrieval.vectors import VectorStore

    xb = np.zeros((5, 2), np.float32)
    asked = np.array([12, 10, 14, 15, 9, -1, 13, 11])
    dense = VectorStore(np.arange(10, 15, dtype=np.int64), xb)
    np.testing.assert_array_equal(dense.rows(asked), [2, 0, 4, -1, -1, -1, 3, 1])
    gapped = VectorStore(np.array([10, 11, 13, 14, 16], dtype=np.int64), xb)
    np.testing.assert_array_equal(gapped.rows(asked), [-1, 0, 3, -1, -1, -1, 2, 1])
    assert VectorStore(np.zeros(0, np.int64), xb[:0]).rows(asked).tolist() == [-1] * len(asked)


def test_auto_picks_by_size_and_memory():
    gib = 1 << 30
    assert choose_spec(10_000, 512, 4 * gib).kind == "flat"
    ivf = choose_spec(1_000_000, 512, 4 * gib)
    assert (ivf.kind, ivf.nlist, ivf.on_disk) == ("ivf", 4096, False)
    assert choose_spec(1_000_000, 512, gib).kind == "ivfsq"  # 2 GB of floats do not fit; 512 MB of SQ8 codes do
    pq = choose_spec(1_000_000, 512, 256 << 20)  # only 16-byte fast-scan codes fit
    assert (pq.kind, pq.on_disk, pq.rerank) == ("ivfpqfs", False, True)
    assert pq.bytes_per_vector(512) <= 24
    assert pq.factory == "IVF4096,PQ32x4fs"
    assert make_spec("ivfpq", 1_000_000, 512).factory == "OPQ32_512,IVF4096,PQ32np"
    large = choose_spec(100_000_000, 512, 4 * gib)  # 2.4 GB of 16-byte codes and ids fit in RAM: OPQ's 8-bit ones
    assert (large.kind, large.on_disk, large.pq_m) == ("ivfpq", False, 16)
    huge = choose_spec(200_000_000, 512, 4 * gib)  # 4.8 GB do not: IVF-PQ with its lists on disk
    assert (huge.kind, huge.on_disk) == ("ivfpq", True)
    assert choose_spec(60_000, 512, 4 * gib).kind == "ivf"  # past the exact-search size
    assert (
        parse_memory("4G") == 4 * gib and parse_memory("512MiB") == 512 << 20 and parse_memory("1.5GB") == 3 * gib // 2
    )
    with pytest.raises(ValueError, match="4G"):
        parse_memory("lots")
    with pytest.raises(ValueError, match="factory string"):
        make_spec("IVF12,Nonsense", 1000, 32)
    with pytest.raises(ValueError, match="on_disk"):
        IndexSpec("hnsw", "HNSW32,Flat", hnsw_m=32, on_disk=True)


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq", "ivfpqfs", "hnswsq"])
def test_tuning_reaches_the_recall_it_promises(kind, data, store, tmp_path):
    vindex = _build(kind, False, store, tmp_path)
    tuning_queries, held_out = data.xq[:300], data.xq[300:]
    report = tune(vindex, tuning_queries, k=10, target_recall=0.9, query_source="synthetic text-like")
    assert report.reached and report.recall >= 0.9
    assert vindex.params == report.params
    # the promise holds for queries tuning never saw (within sampling error of 300 queries)
    held_out_recall = recall_vs_exact(vindex.search(held_out, 10).I, exact_search(held_out, store, 10).I)
    assert held_out_recall >= 0.88, (report.params, held_out_recall)
    # and the knob is the smallest that keeps the promise: one step less misses it
    knob = "nprobe" if not kind.startswith("hnsw") else "ef_search"
    value = getattr(report.params, knob)
    if value > (16 if knob == "ef_search" else 1):
        smaller = SearchParams(**{**report.params.to_dict(), knob: value - 1})
        trial = next(t for t in report.trials if t[knob] == value - 1 and t["rerank"] == report.params.rerank)
        assert trial["lower_bound"] < 0.9
        assert (
            recall_vs_exact(
                vindex.search(tuning_queries, 10, params=smaller).I, exact_search(tuning_queries, store, 10).I
            )
            <= report.recall
        )


def test_unreachable_target_keeps_the_best_knobs_not_the_last():
    """Under a fixed re-ranking depth, recall can peak at some nprobe and fall as more lists crowd the
    candidates: when no depth reaches the target, tuning keeps the best knobs it tried."""
    from retrieval.tuning import RERANK_LADDER, _deepest_needed

    def measure(params):  # peaks at nprobe 8, and deeper re-ranking helps, never up to the target
        recall = 0.5 + 0.04 * RERANK_LADDER.index(params.rerank) - 0.01 * abs(np.log2(params.nprobe) - 3)
        return recall, recall - 0.01

    tried = []
    params, (recall, _) = _deepest_needed(
        SearchParams(nprobe=1, rerank=2), 1024, lambda p: tried.append(p) or measure(p), target=0.95
    )
    assert (params.nprobe, params.rerank) == (8, RERANK_LADDER[-1])
    assert max(p.nprobe for p in tried) == 64  # the climb stops once recall has fallen 0.02 below its best
    assert recall == pytest.approx(0.5 + 0.04 * (len(RERANK_LADDER) - 1))


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])  # ivfpqfs: tests/test_retrieval_kinds.py
def test_ids_survive_removes_and_upserts(kind, data, store, tmp_path):
    vindex = _build(kind, False, store, tmp_path)
    exhaustive = SearchParams(nprobe=10_000, ef_search=512, rerank=16 if kind.startswith("ivfpq") else 0)
    ids = np.asarray(store.ids)
    rng = np.random.default_rng(0)
    removed = rng.choice(ids, N // 3, replace=False)
    vindex.remove(removed)
    assert vindex.ntotal == N - len(removed)
    kept_rows = np.nonzero(~np.isin(ids, removed))[0][:200]
    found = vindex.search(data.xb[kept_rows], 10, params=exhaustive)
    assert not np.isin(found.I, removed).any()
    assert (found.I[:, 0] == ids[kept_rows]).mean() >= 0.98  # a vector's nearest neighbour is itself, under its id
    # upsert: the same ids come back with new vectors; the old vectors do not come back with them
    again = removed[:50]
    new_xb = data.xq[:50]
    vindex.add(again, new_xb)
    # as an update does: the stored vectors (used to re-rank) are rewritten with the changes too
    vindex.vectors = write_vectors(
        tmp_path / "v2", merge_sorted(store, removed, again, new_xb), count_after(store, removed, again), D
    )
    found = vindex.search(new_xb, 1, params=exhaustive)
    assert (found.I[:, 0] == again).mean() >= 0.96
    old = vindex.search(data.xb[store.rows(again)], 1, params=exhaustive)
    assert (old.I[:, 0] != again).all() or kind.startswith("ivfpq")  # a PQ code may still rank a near duplicate first
    if kind == "hnsw":
        assert vindex.dead == len(removed) and vindex.needs_compaction()


def test_hnsw_tombstones_survive_write_and_read(data, store, tmp_path):
    vindex = _build("hnsw", False, store, tmp_path)
    removed = np.asarray(store.ids[:100])
    vindex.remove(removed)
    vindex.write(tmp_path)
    again = VectorIndex.read(tmp_path, vindex.spec, SearchParams(ef_search=128), store)
    assert again.dead == 100 and again.ntotal == N - 100
    found = again.search(data.xb[:100], 5)
    assert not np.isin(found.I, removed).any()


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq", "ivfpqfs"])
@pytest.mark.parametrize("subset", ["large", "small"])
def test_filters_return_only_matching_items(kind, subset, data, store, tmp_path, monkeypatch):
    monkeypatch.setattr("retrieval.index.EXACT_SUBSET_MAX", 1000)  # the subset sizes below straddle it
    vindex = _build(kind, False, store, tmp_path)
    vindex.params = SearchParams(nprobe=8, ef_search=64, rerank=4 if kind.startswith("ivfpq") else 0)
    labels = data.labels
    clusters = np.unique(labels)[:: 2 if subset == "large" else 15]
    allowed = np.asarray(store.ids)[np.isin(labels, clusters)]
    assert (len(allowed) > 1000) == (subset == "large")
    found = vindex.search(data.xq[:100], 10, allowed=allowed)
    assert np.isin(found.I[found.I >= 0], allowed).all()
    assert (found.I >= 0).mean() > 0.95  # filtered inside the search: k results, not k minus the rejected
    if kind == "flat" or subset == "small":  # exact: equal to brute force over the subset
        truth = exact_search(data.xq[:100], store, 10, ids=allowed)
        np.testing.assert_array_equal(np.sort(found.I, 1), np.sort(truth.I, 1))


def test_exact_search_merges_chunks_like_one_pass(data, store):
    from retrieval.index import _topk_of

    whole = exact_search(data.xq[:20], store, 7)
    chunked = _topk_of(data.xq[:20], store.chunks(size=977), 7)
    np.testing.assert_array_equal(whole.I, chunked.I)


# ---- updates: the index equals FAISS's encoding of the stored vectors ----------------------------
def index_entries(vindex: VectorIndex) -> list[tuple[int, int, bytes]]:
    """(id, inverted list, code) of every vector the FAISS index holds, sorted (flat: list 0 and the
    vector's bytes). Read straight from FAISS's lists, not through any of our code."""
    import faiss
    from faiss.contrib.inspect_tools import get_invlist

    ivf = faiss.try_extract_index_ivf(vindex.index)
    if ivf is None:
        ids = faiss.vector_to_array(vindex.index.id_map)
        xb = vindex.index.index.reconstruct_n(0, vindex.index.ntotal)
        return sorted((int(i), 0, x.tobytes()) for i, x in zip(ids, xb))
    out = []
    for list_no in range(ivf.nlist):
        ids, codes = get_invlist(ivf.invlists, list_no)
        out += [(int(i), list_no, c.tobytes()) for i, c in zip(ids, codes)]
    return sorted(out)


def expected_entries(vindex: VectorIndex, store) -> list[tuple[int, int, bytes]]:
    """What the index must hold for `store`: FAISS's own encoding (list, code) of each stored vector,
    which is what a fresh build with the same trained quantizers holds."""
    import faiss

    ivf = faiss.try_extract_index_ivf(vindex.index)
    xb = np.ascontiguousarray(store.xb)
    if ivf is None:
        return sorted((int(i), 0, x.tobytes()) for i, x in zip(store.ids, xb))
    codes = vindex.index.sa_encode(xb)
    width = ivf.coarse_code_size()  # the list number comes first, little-endian
    lists = [int.from_bytes(c[:width].tobytes(), "little") for c in codes]
    return sorted((int(i), lst, c[width:].tobytes()) for i, lst, c in zip(store.ids, lists, codes))


# what `auto` picks (flat, IVF-Flat, IVF-PQ with 4-bit codes below 10240 vectors and OPQ above, on
# disk beyond the budget) and IVF-Flat on disk (--on-disk)
UPDATE_SPECS = {
    "flat": make_spec("flat", N, D),
    "ivf": make_spec("ivf", N, D),
    "ivf-disk": make_spec("ivf", N, D, on_disk=True),
    "ivfpq": make_spec("ivfpq", N, D),
    "ivfpq-disk": make_spec("ivfpq", N, D, on_disk=True),
    "opq-disk": make_spec("ivfpq", 256 * 40, D, pq_m=4, on_disk=True),  # 4 sub-quantizers: quicker OPQ
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "opq-disk" else n for n in UPDATE_SPECS]
)
def test_updates_equal_a_fresh_encoding_of_the_stored_vectors(name, data, tmp_path):
    spec = UPDATE_SPECS[name]
    ids = np.arange(N, dtype=np.int64) * 5 + 1
    rng = np.random.default_rng(1)
    first = vector_store(tmp_path / "v1", data.xb[:4000], ids[:4000])
    vindex = VectorIndex.build(spec, first, tmp_path / "v1")
    vindex.write(tmp_path / "v1")
    store, previous = first, tmp_path / "v1"
    # two updates in a row, each removing, replacing (upsert) and adding, as `_commit` applies them
    for step, (start, stop) in enumerate([(4000, 5000), (5000, N)], start=2):
        remove = rng.choice(np.asarray(store.ids), 300, replace=False)
        upsert = rng.choice(np.setdiff1d(store.ids, remove), 100, replace=False)
        add_ids = np.concatenate([upsert, ids[start:stop]])
        new_xb = data.xq[100 * step : 100 * step + 100]  # unused elsewhere: no duplicate vectors, no ties
        add_xb = np.concatenate([new_xb, data.xb[start:stop]])
        vdir = tmp_path / f"v{step}"
        store = write_vectors(
            vdir, merge_sorted(store, remove, add_ids, add_xb), count_after(store, remove, add_ids), D
        )
        vindex = VectorIndex.read(previous, spec, SearchParams(), store)
        vindex.update(np.union1d(remove, add_ids), add_ids, add_xb, vdir)
        vindex.write(vdir)
        vindex = VectorIndex.read(vdir, spec, SearchParams(), store)
        assert vindex.ntotal == len(store)
        assert index_entries(vindex) == expected_entries(vindex, store)
        everything = SearchParams(nprobe=max(spec.nlist, 1), rerank=16 if spec.rerank else 0)
        found, truth = vindex.search(data.xq[:100], 10, params=everything), exact_search(data.xq[:100], store, 10)
        if not spec.rerank:
            np.testing.assert_array_equal(np.sort(found.I, 1), np.sort(truth.I, 1))
        previous = vdir


@pytest.mark.slow
def test_ivfpq_skips_polysemous_training_and_old_factories_still_load(data, store, tmp_path):
    import faiss

    small, large = make_spec("ivfpq", N, D), make_spec("ivfpq", 256 * 40, D)
    assert small.factory.endswith(f"PQ{small.pq_m}x4np") and large.factory.endswith(f"PQ{large.pq_m}np")
    for spec in (small, large):
        index = VectorIndex.empty(spec, D).index  # held: the IVF part below is a view into it
        assert not faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training
    # a manifest written before: its factory string still builds, reads back and searches
    old = IndexSpec.from_dict({**small.to_dict(), "factory": small.factory.removesuffix("np")})
    vindex = VectorIndex.build(old, store, tmp_path)
    vindex.write(tmp_path)
    again = VectorIndex.read(tmp_path, old, SearchParams(nprobe=10_000, rerank=16), store)
    assert recall_vs_exact(again.search(data.xq[:50], 10).I, exact_search(data.xq[:50], store, 10).I) >= 0.9


def test_recall_counts_a_tie_with_the_kth_exact_score_as_found():
    from retrieval.tuning import recall_per_query

    I_true = np.array([[1, 2, 4], [1, 2, 4], [7, -1, -1]])
    D_true = np.array([[0.9, 0.8, 0.7], [0.9, 0.8, 0.7], [0.5, -np.inf, -np.inf]])
    I = np.array([[1, 2, 3], [1, 5, -1], [8, -1, -1]])
    scores = np.array([[0.9, 0.8, 0.7], [0.9, 0.6, -np.inf], [0.5, -np.inf, -np.inf]])  # 3 ties 4, 8 ties 7
    np.testing.assert_allclose(recall_per_query(I, I_true), [2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(recall_per_query(I, I_true, scores=scores, D_true=D_true), [1, 1 / 3, 1])


def test_truncated_on_disk_lists_are_refused_before_they_are_mapped(store, tmp_path):
    spec = make_spec("ivf", len(store), D, on_disk=True)
    VectorIndex.build(spec, store, tmp_path).write(tmp_path)
    lists = tmp_path / "lists.ivfdata"
    lists.write_bytes(lists.read_bytes()[:1000])  # searching these would die of SIGBUS
    with pytest.raises(ValueError, match=r"lists.ivfdata has 1000 bytes .*truncated"):
        VectorIndex.read(tmp_path, spec, SearchParams(nprobe=4), store)
