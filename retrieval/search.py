"""`SearchIndex`: query an index directory by text, image or vector; results carry ids, scores, metadata.

    index = SearchIndex.open("photos.index")                 # loads the model recorded at build time
    results = index.search_text(["a red car", "a cat"], k=10, where="folder = 'street'")
    for hit in results[0]:
        print(hit.score, hit.id, hit.path, hit.caption)

One `SearchIndex` serves many reader threads: FAISS searches are read-only and take their knobs per
call (`SearchParameters`), metadata reads use one SQLite connection per thread, and the lazily loaded
model is created once under a lock. It reads the version that was current when it was opened; call
`reload()` to move to a newer one.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from vlm.embed import embed_texts
from vlm.images import load_image
from vlm.model import CLIP
from vlm.transforms import image_transform

from .dedup import Diversity, diverse_search
from .index import SearchParams, VectorIndex, set_threads
from .kinds import IndexSpec
from .metadata import METADATA_FILE, Item, MetadataStore
from .index_directory import IndexDirectory, Manifest
from .vectors import VectorStore

__all__ = ["Hit", "SearchResults", "SearchIndex", "index_model"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    """One search result: the item's id, cosine score, key, path, caption and extra metadata columns."""

    id: int
    score: float  # cosine similarity
    key: str
    path: str
    caption: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchResults:
    """`hits[i]` for query i, best first (in MMR's order with `mmr=`); `D`, `I` are FAISS's (nq, k) score
    and id arrays (-1: no result)."""

    D: np.ndarray
    I: np.ndarray
    hits: list[list[Hit]]

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, i: int) -> list[Hit]:
        return self.hits[i]


class SearchIndex:
    """A read-only view of an index directory (see the module docstring)."""

    def __init__(
        self, directory: str | Path, *, model: CLIP | str | None = None, mmap: bool = False, verify: bool = True
    ) -> None:
        self.store = IndexDirectory(directory)
        self._model_arg = model
        self._model: CLIP | None = None
        self._model_lock = threading.Lock()
        self._mmap, self._verify = mmap, verify
        self.reload()
        if isinstance(model, CLIP):
            self._check_model(model)
            self._model = model

    @classmethod
    def open(
        cls, directory: str | Path, *, model: CLIP | str | None = None, mmap: bool = False, verify: bool = True
    ) -> "SearchIndex":
        """Opens `directory`. `model` is a CLIP, a model name or directory, or None for the model recorded
        at build time (loaded on the first text or image query). `mmap=True` maps in-memory IVF lists
        from the file instead of reading them (on-disk lists are always mapped)."""
        return cls(directory, model=model, mmap=mmap, verify=verify)

    def reload(self) -> None:
        """Switches to the directory's current version (e.g. after `vlm index add`). Searches running in
        other threads finish on the version they started with."""
        manifest = self.store.read_manifest()
        if self._verify:
            self.store.verify(manifest)
        vdir = self.store.version_path(manifest)
        spec = IndexSpec.from_dict(manifest.spec)
        index = VectorIndex.read(vdir, spec, SearchParams(**manifest.params), VectorStore.open(vdir), mmap=self._mmap)
        meta = MetadataStore(vdir / METADATA_FILE)
        meta.count()  # opens the connection now: it keeps the file readable once a later update removes it
        self._version = _Version(manifest, index, meta)  # one assignment: readers see old or new, never a mix
        set_threads()

    @property
    def manifest(self) -> Manifest:
        """The manifest of the version this index reads."""
        return self._version.manifest

    @property
    def index(self) -> VectorIndex:
        """The FAISS index of the version this index reads."""
        return self._version.index

    @property
    def meta(self) -> MetadataStore:
        """The metadata store of the version this index reads."""
        return self._version.meta

    # ---- facts ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.manifest.count

    @property
    def modality(self) -> str:
        """What the index holds: "image" vectors (query with text) or "text" captions (query with images)."""
        return self.manifest.modality

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the model that built the index; query models must match it."""
        return self.manifest.model["fingerprint"]

    @property
    def dim(self) -> int:
        """Dimension of the stored vectors (the model's embed_dim)."""
        return int(self.manifest.model["embed_dim"])

    # ---- queries --------------------------------------------------------------------------------
    def search_vector(
        self,
        xq: np.ndarray | torch.Tensor,
        k: int = 10,
        *,
        where: str | None = None,
        ids: Sequence[int] | None = None,
        fingerprint: str | None = None,
        params: SearchParams | None = None,
        dedup: float | None = None,
        mmr: float | None = None,
    ) -> SearchResults:
        """Nearest items to each query vector (a (d,) vector or an (nq, d) batch; L2-normalised here).

        `where` restricts the search to items matching a metadata filter (`retrieval.filters`; FilterError,
        a ValueError, when it is not one), `ids` to those ids (both may be given). `fingerprint` names the
        model that embedded the queries: a different one is refused. `dedup` (a cosine in (0, 1]) drops
        results that near-duplicate a better one, `mmr` (lambda in [0, 1]) re-ranks by maximal marginal
        relevance (`retrieval.dedup`); dedup may leave fewer than k results.
        """
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise ValueError(
                f"the query was embedded by model {fingerprint}, but {self.store.path} holds vectors of model "
                f"{self.fingerprint} ({self.manifest.model.get('source') or 'source not recorded'}); embed the query with that model"
            )
        if not isinstance(k, int) or k <= 0:
            raise ValueError(f"k must be a positive int, got {k!r}")
        diversity = Diversity(dedup, mmr)
        xq = self._queries(xq)
        version = self._version
        allowed = _allowed(version.meta, where, ids)
        if diversity.active:
            found = diverse_search(version.index, xq, k, diversity, allowed=allowed, params=params)
        else:
            found = version.index.search(xq, k, allowed=allowed, params=params)
        rows = version.meta.get_many(found.I.ravel().tolist())
        hits = [
            [_hit(item, float(s)) for item, s in zip(rows[i * k : (i + 1) * k], found.D[i]) if item is not None]
            for i in range(len(xq))
        ]
        return SearchResults(found.D, found.I, hits)

    def search_text(
        self,
        texts: str | Sequence[str],
        k: int = 10,
        *,
        where: str | None = None,
        dedup: float | None = None,
        mmr: float | None = None,
    ) -> SearchResults:
        """Items nearest to each text (one query per string); `where`, `dedup`, `mmr` as in `search_vector`."""
        Diversity(dedup, mmr)  # a bad value fails before the model loads
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.search_vector(embed_texts(self.model, texts).numpy(), k, where=where, dedup=dedup, mmr=mmr)

    def search_image(
        self,
        images: Any | Sequence[Any],
        k: int = 10,
        *,
        where: str | None = None,
        dedup: float | None = None,
        mmr: float | None = None,
    ) -> SearchResults:
        """Items nearest to each image (paths, bytes, PIL images, arrays: what `vlm.load_image` reads);
        `where`, `dedup`, `mmr` as in `search_vector`. On a caption index this is image-to-text retrieval.
        An unreadable image raises ImageLoadError."""
        Diversity(dedup, mmr)
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        model = self.model
        transform = image_transform(model)
        size = model.config.vision.image_size
        draft = (size, size) if self.manifest.preprocessing.get("draft_jpeg") else None
        batch = torch.stack([transform(load_image(image, draft_size=draft)) for image in images])
        with torch.inference_mode():
            xq = model.encode_image(batch.to(model.logit_scale.device, model.logit_scale.dtype), normalize=True)
        return self.search_vector(xq.float().cpu().numpy(), k, where=where, dedup=dedup, mmr=mmr)

    def _queries(self, xq: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(xq, torch.Tensor):
            xq = xq.detach().float().cpu().numpy()
        xq = np.asarray(xq, dtype=np.float32)
        xq = xq[None] if xq.ndim == 1 else xq
        if xq.ndim != 2 or xq.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (d,) or (nq, d) with d={self.dim}, got {xq.shape}")
        norms = np.linalg.norm(xq, axis=1, keepdims=True)
        if not np.isfinite(xq).all() or (norms == 0).any():
            raise ValueError("query vectors must be finite and non-zero")
        return np.ascontiguousarray(xq / norms)

    # ---- metadata -------------------------------------------------------------------------------
    def get(self, item_id: int) -> Item | None:
        """The item with this id (its key, path, caption and extra columns), or None."""
        return self.meta.get(int(item_id))

    def get_many(self, ids: Sequence[int]) -> list[Item | None]:
        """Items in the order of `ids` (None for ids that are not in the index, e.g. FAISS's -1)."""
        return self.meta.get_many(ids)

    def ids_for_path(self, path: str | Path) -> list[int]:
        """Ids of the items whose image is `path` (as recorded, or resolved to an absolute path)."""
        return self.meta.ids_for_path(str(path)) or self.meta.ids_for_path(str(Path(path).resolve()))

    def contains_path(self, path: str | Path) -> bool:
        """Whether `path` is an image of this collection (e.g. before serving the file)."""
        return bool(self.ids_for_path(path))

    def ids_where(self, where: str) -> np.ndarray:
        """Ids matching the filter `where` (the language of `retrieval.filters`), ascending; FilterError (a
        ValueError) for a filter outside that language or one running past the store's time limit."""
        return self.meta.ids_where(where)

    # ---- model ----------------------------------------------------------------------------------
    @property
    def model(self) -> CLIP:
        """The model that embeds queries: the one given, or the one recorded in the manifest."""
        if self._model is None:
            with self._model_lock:
                if self._model is None:
                    self._model = self._load_model()
        return self._model

    def _load_model(self) -> CLIP:
        from vlm.checkpoint import load

        name = index_model(self.manifest, self._model_arg if isinstance(self._model_arg, (str, Path)) else None)
        if not name:
            raise ValueError(
                f"{self.store.path} does not record which model built it; pass the model (--model) that has "
                f"fingerprint {self.fingerprint}"
            )
        model = load(str(name)).eval()
        self._check_model(model)
        return model

    def _check_model(self, model: CLIP) -> None:
        fingerprint = model.fingerprint()
        if fingerprint != self.fingerprint:
            recorded = self.manifest.model.get("source")
            raise ValueError(
                f"{self.store.path} was built with model {recorded or '?'} (fingerprint {self.fingerprint}), "
                f"but the model given has fingerprint {fingerprint}: its queries would not be comparable. "
                f"Use {'--model ' + recorded if recorded else 'the model that built the index'}, or rebuild the index with this model"
            )

    def close(self) -> None:
        """Closes the metadata connection."""
        self.meta.close()


def index_model(manifest: Manifest, model: str | Path | None = None) -> str | Path | None:
    """The model that embeds for an index: `model` when given, else the one its manifest records (None
    when it records none: built from a preset plus weights, or by an older vlm)."""
    return model if model is not None else manifest.model.get("source")


@dataclass(frozen=True)
class _Version:
    """What one version of the directory serves; replaced as a whole by `SearchIndex.reload`."""

    manifest: Manifest
    index: VectorIndex
    meta: MetadataStore


def _allowed(meta: MetadataStore, where: str | None, ids: Sequence[int] | None) -> np.ndarray | None:
    allowed = meta.ids_where(where) if where else None
    if ids is not None:
        ids = np.asarray(list(ids), dtype=np.int64)
        allowed = ids if allowed is None else np.intersect1d(allowed, ids)
    return allowed


def _hit(item: Item, score: float) -> Hit:
    return Hit(item.id, score, item.key, item.path, item.caption, item.extra)
