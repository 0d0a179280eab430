"""Builds larger than their memory budget: peak anonymous memory measured in a fresh process, on-disk lists
searched memory-mapped against an in-memory build, and the error for a budget too small to build anything."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

from retrieval.index import INDEX_FILE, LISTS_FILE, SearchParams, VectorIndex  # noqa: E402
from retrieval.kinds import make_spec  # noqa: E402
from retrieval.ondisk import plan_build  # noqa: E402
from retrieval.vectors import write_vectors  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LINUX = Path("/proc/self/status").is_file()

# Runs in a fresh process, so that memory freed by earlier tests (kept by the allocator) cannot hide
# the build's: the increase of RssAnon over its value after the imports is what the budget bounds.
_BUILD = """
import json, sys, time
from pathlib import Path
import numpy as np
from retrieval.index import SearchParams, VectorIndex, exact_search, set_threads
from retrieval.kinds import make_spec
from retrieval.ondisk import MemoryPeak
from retrieval.tuning import recall_vs_exact
from retrieval.vectors import VectorStore

directory, budget = Path(sys.argv[1]), int(sys.argv[2])
set_threads(2)
store = VectorStore.open(directory / "vectors")
xq = np.load(directory / "queries.npy")
spec = make_spec("IVF64,Flat", len(store), store.dim, on_disk=True)
with MemoryPeak() as peak:
    start = time.perf_counter()
    vindex = VectorIndex.build(spec, store, directory / "index", memory_budget=budget)
    truth = exact_search(xq, store, 10)  # tuning's ground truth, streamed over the stored vectors
    vindex.write(directory / "index")
    recall = recall_vs_exact(vindex.search(xq, 10, params=SearchParams(nprobe=64)).I, truth.I)  # every list
seconds = time.perf_counter() - start
result = {"anon": peak.anon, "total": peak.total, "ntotal": vindex.ntotal, "recall": recall, "seconds": seconds}
print("RESULT", json.dumps(result))
"""


def _clustered(n: int, d: int, seed: int, chunk: int = 16_384):
    """(ids, xb) chunks of `n` unit vectors around 256 random centres, never all of them in RAM."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((256, d), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        xb = centres[rng.integers(0, 256, m)] + 0.7 * rng.standard_normal((m, d), dtype=np.float32)
        yield np.arange(start, start + m, dtype=np.int64), xb / np.linalg.norm(xb, axis=1, keepdims=True)


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="reads resident memory from /proc/self/status")
def test_build_larger_than_budget_stays_under_it(tmp_path):
    n, d, budget = 150_000, 512, 64 << 20  # 293 MiB of vectors, a budget a fifth of that
    write_vectors(tmp_path / "vectors", _clustered(n, d, seed=0), n, d)
    np.save(tmp_path / "queries.npy", next(_clustered(50, d, seed=1))[1])
    (tmp_path / "index").mkdir()
    out = subprocess.run(
        [sys.executable, "-c", _BUILD, str(tmp_path), str(budget)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["ntotal"] == n and result["recall"] >= 0.999  # all lists visited: exact, so none lost
    peak = result["anon"] >> 20
    assert result["anon"] < budget, f"peak anonymous memory {peak} MiB over the {budget >> 20} MiB budget"
    assert (tmp_path / "index" / LISTS_FILE).stat().st_size >= n * (4 * d + 8)  # the lists are on disk
    assert not (tmp_path / "index" / "blocks.tmp").exists()


def _store(tmp_path: Path, n: int, d: int):
    return write_vectors(tmp_path / "vectors", _clustered(n, d, seed=2, chunk=n), n, d)


def test_memory_mapped_lists_search_like_an_in_memory_build(tmp_path):
    n, d = 4000, 32
    store = _store(tmp_path, n, d)
    spec = make_spec("IVF16,Flat", n, d)
    disk_spec = make_spec("IVF16,Flat", n, d, on_disk=True)
    # the smallest budget that still trains on every vector (as the in-memory build does), so both
    # train the same centroids, yet adds in several blocks
    budget = next(b for b in range(1 << 20, 64 << 20, 1 << 18) if _trains_on_all(disk_spec, n, d, b))
    assert plan_build(disk_spec, n, d, budget).block_rows < n / 2
    memory = VectorIndex.build(spec, store, tmp_path)
    (tmp_path / "disk").mkdir()
    VectorIndex.build(disk_spec, store, tmp_path / "disk", memory_budget=budget).write(tmp_path / "disk")
    if LINUX:  # the merged blocks are unmapped, their deleted files do not hold disk space
        assert "blocks.tmp" not in Path("/proc/self/maps").read_text()
    params = SearchParams(nprobe=3)
    mapped = VectorIndex.read(tmp_path / "disk", disk_spec, params, store)
    assert (tmp_path / "disk" / INDEX_FILE).stat().st_size < 64 * 1024  # lists are not in the index file
    xq = next(_clustered(100, d, seed=3))[1]
    expected, got = memory.search(xq, 10, params=params), mapped.search(xq, 10)
    np.testing.assert_array_equal(got.I, expected.I)
    np.testing.assert_allclose(got.D, expected.D, rtol=1e-6)


def _trains_on_all(spec, n: int, d: int, budget: int) -> bool:
    try:
        return plan_build(spec, n, d, budget).train_rows == n
    except ValueError:
        return False


def test_budget_too_small_names_the_minimum(tmp_path):
    n, d = 200_000, 512
    spec = make_spec("ivf", n, d, on_disk=True)
    with pytest.raises(ValueError, match="too small") as err:
        plan_build(spec, n, d, 8 << 20)
    minimum = re.search(r"at least ([\d.]+) MiB", str(err.value))
    assert minimum and "--memory-budget" in str(err.value)
    plan = plan_build(spec, n, d, int(float(minimum.group(1)) * 1.01 * (1 << 20)))  # the named minimum suffices
    assert plan.train_rows >= spec.nlist and plan.block_rows >= 1
    in_ram = make_spec("ivf", n, d)  # keeping 400 MB of lists in RAM: the error says to put them on disk
    with pytest.raises(ValueError, match="--on-disk"):
        plan_build(in_ram, n, d, 256 << 20)
    fast_scan = make_spec("ivfpqfs", n, d)  # its lists cannot go on disk: the error names the kind that can
    with pytest.raises(ValueError, match="--kind ivfpq --on-disk"):
        plan_build(fast_scan, n, d, 32 << 20)
