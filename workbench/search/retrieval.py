"""Tile retrieval: faiss indexes over store features, and the store glue for slide search.

Tile index
    :class:`TileIndex` wraps one faiss index over an (N, d) features array: ``"flat"`` (exact),
    ``"ivf"`` (IVF-Flat: ``nlist`` k-means cells, ``nprobe`` of them searched) or ``"hnsw"`` (graph with
    ``M`` links per node, ``ef_search`` candidates). With ``metric="cosine"`` vectors are
    L2-normalised and compared by inner product, so scores are cosine similarities. faiss-gpu is used
    when it is installed and sees a GPU (``use_gpu="auto"``; HNSW stays on the CPU, faiss has no GPU
    HNSW), otherwise the CPU build. Every database row may carry a *group* (the patient, or the slide
    when the patient is unknown); ``search(..., exclude_groups=)`` never returns rows of the query's
    group (leave-one-patient-out). It over-fetches and filters, doubling the number of candidates (and,
    for IVF, the number of probed cells once the probed lists run dry) until each query has ``k``
    results or none are left, so a query whose own slide holds all its nearest tiles still gets ``k``.

    Saved as ``<name>.faiss`` (faiss.write_index) + ``<name>.json`` (kind, parameters, size, features
    digest) + ``<name>.groups.npz``. The digest hashes what the features came from (per slide: id, tile
    count, encoder weights digest), so :func:`load_store_index` refuses an index built from other
    features (:class:`StaleIndexError`) instead of silently answering with wrong ids.

Slide search
    The SISH mosaic and ranking rules (:func:`mosaic`, :func:`label_weights`, :func:`sish_rank`,
    :func:`mean_similarity_rank`, :func:`near_white`, :func:`colour_histograms`) live in
    :mod:`workbench.search.slidesearch` and are re-exported here. :class:`StoreIndex` glues the index to a
    store: queries by global tile id, by tile image (encoded on the fly) or by whole slide.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from workbench.search.slidesearch import (LABEL_WEIGHT_SUM, colour_histograms, label_weights, mean_similarity_rank, mosaic,
                          near_white, sish_rank)
from workbench.errors import ParameterError, StaleIndexError  # noqa: F401  (StaleIndexError: raised here; defined in workbench.errors)

__all__ = [
    # tile index
    "KINDS", "METRICS", "StaleIndexError", "TileIndex", "gpu_available", "l2_normalise", "array_digest",
    # store glue
    "index_path", "features_digest", "slide_table", "encode_images", "StoreIndex", "build_store_index",
    "load_store_index",
    # re-exported from workbench.search.slidesearch
    "LABEL_WEIGHT_SUM", "near_white", "colour_histograms", "mosaic", "label_weights", "sish_rank",
    "mean_similarity_rank",
]

log = logging.getLogger(__name__)

KINDS = ("flat", "ivf", "hnsw")
METRICS = ("cosine", "ip", "l2")




def _faiss():
    import faiss

    return faiss


def gpu_available() -> bool:
    """True when the installed faiss is a GPU build and sees at least one device."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (n, d) as float32 unit vectors (all-zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def array_digest(x, *, rows: int = 65536) -> str:
    """blake2b digest of an (N, d) array's float32 values, read in blocks (NumPy or Dask)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(x.shape), "float32")).encode())
    for start in range(0, x.shape[0], rows):
        h.update(np.ascontiguousarray(np.asarray(x[start : start + rows]), dtype=np.float32).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- tile index


class TileIndex:
    """A faiss index over tile embeddings with leave-one-group-out search.

    Parameters
    ----------
    kind : {"flat", "ivf", "hnsw"}
    nlist : int, optional
        IVF cells; default ``clip(4 * sqrt(N), 1, N // 39)``.
    nprobe : int
        IVF cells searched per query.
    M, ef_construction, ef_search : int
        HNSW links per node, build-time and query-time candidate list sizes.
    metric : {"cosine", "ip", "l2"}
        Scores are similarities (higher is closer) for cosine/ip, squared L2 distances for l2.
    use_gpu : {"auto", True, False}
    train_size : int, optional
        Rows sampled to train IVF; default ``64 * nlist``.
    batch_rows : int
        Rows converted and added per block (bounds memory for Dask inputs).
    random_state : int

    Attributes
    ----------
    index_ : faiss.Index
    n_, dim_ : int
    groups_ : (N,) int64 group code of each row, or None
    group_values_ : (G,) array of the original group values
    digest_ : str
    on_gpu_ : bool
    build_seconds_ : float

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(size=(1000, 16)).astype("float32")
    >>> idx = TileIndex("flat").fit(x, groups=np.arange(1000) // 10)
    >>> scores, ids = idx.search(x[:2], 5, exclude_groups=[0, 0])
    >>> bool((ids >= 10).all())
    True
    """

    def __init__(self, kind: str = "flat", *, nlist: int | None = None, nprobe: int = 16, M: int = 32,
                 ef_construction: int = 40, ef_search: int = 64, metric: str = "cosine", use_gpu="auto",
                 train_size: int | None = None, batch_rows: int = 65536, random_state: int = 0):
        self.kind = kind
        self.nlist = nlist
        self.nprobe = nprobe
        self.M = M
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.metric = metric
        self.use_gpu = use_gpu
        self.train_size = train_size
        self.batch_rows = batch_rows
        self.random_state = random_state

    def get_params(self) -> dict:
        return {k: getattr(self, k) for k in ("kind", "nlist", "nprobe", "M", "ef_construction", "ef_search",
                                               "metric", "use_gpu", "train_size", "batch_rows", "random_state")}

    # ---- building
    def _validate(self, n: int) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, not {self.metric!r}")
        if self.use_gpu not in ("auto", True, False):
            raise ValueError(f"use_gpu must be 'auto', True or False, not {self.use_gpu!r}")
        if n < 1:
            raise ValueError("cannot build an index over 0 vectors")
        for name in ("nprobe", "M", "ef_construction", "ef_search", "batch_rows"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)!r}")

    def _nlist(self, n: int) -> int:
        if self.nlist is not None:
            return max(1, min(int(self.nlist), n))
        return int(np.clip(4 * math.sqrt(n), 1, max(1, n // 39)))

    def _prepare(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or (hasattr(self, "dim_") and x.shape[1] != self.dim_):
            want = f"(n, {self.dim_})" if hasattr(self, "dim_") else "(n, d)"
            raise ValueError(f"expected vectors of shape {want}, got {x.shape}")
        return l2_normalise(x) if self.metric == "cosine" else np.ascontiguousarray(x, dtype=np.float32)

    def _new_index(self, d: int, n: int):
        faiss = _faiss()
        mt = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        flat = faiss.IndexFlatL2 if self.metric == "l2" else faiss.IndexFlatIP
        if self.kind == "flat":
            index = flat(d)
        elif self.kind == "ivf":
            quantizer = flat(d)
            index = faiss.IndexIVFFlat(quantizer, d, self._nlist(n), mt)
            index.nprobe = int(self.nprobe)
        else:
            index = faiss.IndexHNSWFlat(d, int(self.M), mt)
            index.hnsw.efConstruction = int(self.ef_construction)
            index.hnsw.efSearch = int(self.ef_search)
        return self._maybe_gpu(index)

    def _maybe_gpu(self, index):
        want = self.use_gpu
        if want is False:
            self.on_gpu_ = False
            return index
        if not gpu_available():
            if want is True:
                raise RuntimeError("use_gpu=True but this faiss build sees no GPU; install faiss-gpu or use 'auto'")
            self.on_gpu_ = False
            return index
        if self.kind == "hnsw":
            log.info("faiss has no GPU HNSW: the HNSW index stays on the CPU")
            self.on_gpu_ = False
            return index
        faiss = _faiss()
        self._gpu_res = faiss.StandardGpuResources()
        self.on_gpu_ = True
        return faiss.index_cpu_to_gpu(self._gpu_res, 0, index)

    def fit(self, x, *, groups=None, digest: str | None = None) -> "TileIndex":
        """Build the index over ``x`` (N, d) (NumPy or Dask; float16 is fine).

        ``groups`` (N,) holds each row's group (patient or slide) for leave-one-group-out search;
        ``digest`` identifies the features (default: a hash of ``x``'s values).
        """
        t0 = time.perf_counter()
        n, d = int(x.shape[0]), int(x.shape[1])
        self._validate(n)
        self.n_, self.dim_ = n, d
        index = self._new_index(d, n)
        if self.kind == "ivf":
            nlist = self._nlist(n)
            size = min(n, self.train_size or 64 * nlist)
            rng = np.random.default_rng(self.random_state)
            sample = self._prepare(x[np.sort(rng.choice(n, size=size, replace=False))])
            index.train(sample[np.isfinite(sample).all(axis=1)])
        # NaN/Inf rows (a broken model or tile) are left out of the index and reported, never searched
        kept, bad = [], []
        for start in range(0, n, int(self.batch_rows)):
            block = self._prepare(x[start : start + int(self.batch_rows)])
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                bad.extend((start + np.flatnonzero(~finite)).tolist())
                block = np.ascontiguousarray(block[finite])
            kept.append(start + np.flatnonzero(finite))
            if len(block):
                index.add(block)
        if bad:
            log.warning("%d of %d rows are non-finite (NaN/Inf) and were left out of the index: rows %s%s",
                        len(bad), n, bad[:20], " …" if len(bad) > 20 else "")
        self.row_ids_ = np.concatenate(kept).astype(np.int64) if bad else None
        self.nonfinite_rows_ = np.asarray(bad, np.int64)
        self.index_ = index
        self._set_groups(groups)
        self.digest_ = digest if digest is not None else array_digest(x)
        self.build_seconds_ = time.perf_counter() - t0
        log.info("built %s index over %d x %d in %.1f s", self.kind, n, d, self.build_seconds_)
        return self

    def _set_groups(self, groups) -> None:
        import pandas as pd

        if groups is None:
            self.groups_, self.group_values_ = None, None
            return
        groups = np.asarray(groups)
        if groups.shape != (self.n_,):
            raise ValueError(f"groups must have shape ({self.n_},), got {groups.shape}")
        codes, uniques = pd.factorize(groups)
        if (codes < 0).any():
            raise ValueError("groups contain missing values: give every row a patient or slide id")
        self.groups_ = codes.astype(np.int64)
        self.group_values_ = np.asarray(uniques)
        self._group_sizes = np.bincount(self.groups_, minlength=len(self.group_values_))

    # ---- searching
    def _check_fitted(self) -> None:
        if not hasattr(self, "index_"):
            raise RuntimeError("this TileIndex is not built yet: call fit() or TileIndex.load()")

    def _raw_search(self, q: np.ndarray, k: int, nprobe: int | None = None):
        """faiss search of k rows; IVF probes ``nprobe`` cells, HNSW keeps max(ef_search, k) candidates."""
        faiss = _faiss()
        params = None
        if self.kind == "ivf" and nprobe is not None and nprobe != int(self.nprobe):
            params = faiss.SearchParametersIVF(nprobe=int(nprobe))
        elif self.kind == "hnsw" and k > int(self.ef_search):
            params = faiss.SearchParametersHNSW(efSearch=int(k))  # faiss returns at most efSearch results
        if params is None or getattr(self, "on_gpu_", False):
            if params is not None and self.kind == "ivf":  # GPU indexes take nprobe as an attribute
                old, self.index_.nprobe = self.index_.nprobe, int(nprobe)
                try:
                    return self._to_rows(*self.index_.search(q, k))
                finally:
                    self.index_.nprobe = old
            return self._to_rows(*self.index_.search(q, k))
        return self._to_rows(*self.index_.search(q, k, params=params))

    def _to_rows(self, scores: np.ndarray, ids: np.ndarray):
        """Map faiss positions to row ids of ``x`` (they differ when non-finite rows were left out)."""
        row_ids = getattr(self, "row_ids_", None)
        if row_ids is not None:
            ids = np.where(ids >= 0, row_ids[np.maximum(ids, 0)], -1)
        return scores, ids

    def _max_k(self) -> int:
        n = int(self.index_.ntotal)
        return min(n, 2048) if getattr(self, "on_gpu_", False) else n

    def group_codes(self, values) -> np.ndarray:
        """Codes of group ``values`` (-1 for a group absent from the database)."""
        import pandas as pd

        if self.groups_ is None:
            raise ValueError("this index was built without groups: pass groups= to fit() to exclude them")
        return pd.Index(self.group_values_).get_indexer(np.asarray(values))

    def search(self, queries, k: int, *, exclude_groups=None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest rows of each query, never from the query's own group.

        Parameters
        ----------
        queries : (nq, d) array
        k : int
        exclude_groups : (nq,) group values, optional
            Rows whose group equals the query's are skipped (values as given to ``fit``).

        Returns
        -------
        scores : (nq, k) float32, similarities (cosine/ip) or squared distances (l2), best first
        ids : (nq, k) int64 row ids, -1 where fewer than ``k`` rows qualify
        """
        self._check_fitted()
        q = self._prepare(queries)
        nq, k = len(q), int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, not {k}")
        fill = np.inf if self.metric == "l2" else -np.inf
        scores = np.full((nq, k), fill, dtype=np.float32)
        ids = np.full((nq, k), -1, dtype=np.int64)
        if exclude_groups is None:
            kk = min(k, self._max_k())
            d_, i_ = self._raw_search(q, kk)
            scores[:, :kk], ids[:, :kk] = d_, i_
            return scores, ids
        qg = self.group_codes(exclude_groups)
        if qg.shape != (nq,):
            raise ValueError(f"exclude_groups must have shape ({nq},), got {qg.shape}")
        own = np.where(qg >= 0, self._group_sizes[np.maximum(qg, 0)], 0)
        possible = np.minimum(k, self.n_ - own)  # results that can exist at all
        todo = np.arange(nq)
        fetch = min(self._max_k(), 2 * k + 8)
        nprobe = int(self.nprobe) if self.kind == "ivf" else None
        nlist = self.index_.nlist if self.kind == "ivf" else None
        while todo.size:
            d_, i_ = self._raw_search(q[todo], fetch, nprobe)
            keep = (i_ >= 0) & (self.groups_[np.maximum(i_, 0)] != qg[todo, None])
            count = keep.sum(1)
            exhausted = fetch >= self._max_k() and (nprobe is None or nprobe >= nlist)
            done = (count >= possible[todo]) | exhausted
            order = np.argsort(~keep[done], axis=1, kind="stable")[:, :k]
            rows = todo[done]
            kk = order.shape[1]
            took = np.take_along_axis(keep[done], order, 1)
            scores[rows, :kk] = np.where(took, np.take_along_axis(d_[done], order, 1), fill)
            ids[rows, :kk] = np.where(took, np.take_along_axis(i_[done], order, 1), -1)
            todo = todo[~done]
            if todo.size:
                if nprobe is not None and (i_[~done] < 0).any():
                    nprobe = min(nlist, 2 * nprobe)  # the probed lists ran dry: probe more cells
                fetch = min(self._max_k(), 2 * fetch)
        return scores, ids

    # ---- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (.faiss), its ``.json`` sidecar and ``.groups.npz``; returns the index path."""
        self._check_fitted()
        faiss = _faiss()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        index = faiss.index_gpu_to_cpu(self.index_) if getattr(self, "on_gpu_", False) else self.index_
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(index, str(tmp))
        os.replace(tmp, path)
        if self.groups_ is not None:
            values = self.group_values_
            values = values.astype(str) if values.dtype == object else values
            with open(path.with_suffix(".groups.npz"), "wb") as fh:
                np.savez(fh, codes=self.groups_, values=values)
        if getattr(self, "row_ids_", None) is not None:
            with open(path.with_suffix(".rows.npy"), "wb") as fh:
                np.save(fh, self.row_ids_)
        meta = {"params": {**self.get_params(), "use_gpu": str(self.use_gpu)}, "n": self.n_, "dim": self.dim_,
                "digest": self.digest_, "has_groups": self.groups_ is not None,
                "n_indexed": int(index.ntotal), "has_row_ids": getattr(self, "row_ids_", None) is not None,
                "build_seconds": self.build_seconds_}
        from workbench.store import write_json_atomic

        write_json_atomic(path.with_suffix(".json"), meta)  # written last: an index without it is incomplete
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, expected_digest: str | None = None, use_gpu="auto") -> "TileIndex":
        """Read an index saved by :meth:`save`; refuse it if its digest is not ``expected_digest``."""
        faiss = _faiss()
        path = Path(path)
        sidecar = path.with_suffix(".json")
        if not path.exists() or not sidecar.exists():
            raise FileNotFoundError(f"no complete index at {path} (need {path.name} and {sidecar.name})")
        meta = json.loads(sidecar.read_text())
        if expected_digest is not None and meta["digest"] != expected_digest:
            raise StaleIndexError(
                f"index {path} was built from features {meta['digest']}, the store now holds {expected_digest}: "
                "rebuild it (build_store_index)"
            )
        params = dict(meta["params"])
        params["use_gpu"] = use_gpu
        self = cls(**params)
        index = faiss.read_index(str(path))
        if index.ntotal != meta.get("n_indexed", meta["n"]) or index.d != meta["dim"]:
            raise StaleIndexError(f"index {path} holds {index.ntotal} x {index.d}, its sidecar says "
                                  f"{meta.get('n_indexed', meta['n'])} x {meta['dim']}: rebuild it")
        self.row_ids_ = None
        if meta.get("has_row_ids"):
            self.row_ids_ = np.load(path.with_suffix(".rows.npy"), allow_pickle=False)
        if self.kind == "ivf":
            index.nprobe = int(self.nprobe)
        elif self.kind == "hnsw":
            index.hnsw.efSearch = int(self.ef_search)
        self.n_, self.dim_, self.digest_ = meta["n"], meta["dim"], meta["digest"]
        self.build_seconds_ = meta.get("build_seconds", float("nan"))
        self.index_ = self._maybe_gpu(index)
        if meta["has_groups"]:
            with np.load(path.with_suffix(".groups.npz"), allow_pickle=False) as z:
                self.groups_, self.group_values_ = z["codes"].astype(np.int64), z["values"]
            self._group_sizes = np.bincount(self.groups_, minlength=len(self.group_values_))
        else:
            self.groups_, self.group_values_ = None, None
        return self


# --------------------------------------------------------------------------- store glue


def index_path(store: str | os.PathLike, encoder: str, kind: str) -> Path:
    """Where the ``kind`` index over ``encoder`` features of a store lives: ``<store>.indexes/<encoder>-<kind>.faiss``."""
    from workbench.store import encoder_key

    store = Path(store)
    return store.with_name(store.name + ".indexes") / f"{encoder_key(encoder)}-{kind}.faiss"


def features_digest(root, encoder: str, ids: list[str] | None = None) -> str:
    """Digest of a store's ``encoder`` features: per slide its id, tile count, dim and weights digest.

    A slide whose features carry no ``weights_digest`` attribute is hashed by value instead.
    """
    from workbench.store import Key, StoreError, is_complete, slide_ids

    ids = slide_ids(root) if ids is None else ids
    h = hashlib.sha256(encoder.encode())
    for s in ids:
        key = Key.features(s, encoder)
        if not is_complete(root, key):
            raise StoreError(f"slide {s!r} has no complete {encoder!r} features: run embedding first")
        arr = root[key]
        wd = arr.attrs.get("weights_digest") or array_digest(arr)
        h.update(json.dumps([s, list(arr.shape), wd]).encode())
    return h.hexdigest()


def slide_table(root, ids: list[str] | None = None):
    """Slides of a store in manifest order with their exclusion group, labels, tile counts and first global id.

    Columns: slide_id, group (``patient:<id>``, or ``slide:<id>`` without a patient id), patient_id, site,
    diagnosis, n_tiles, start.
    """
    import pandas as pd

    from workbench.store import slide_ids, tile_counts

    ids = slide_ids(root) if ids is None else ids
    man = pd.DataFrame(root.attrs.get("manifest", []))
    for col in ("patient_id", "site", "diagnosis"):
        if col not in man:
            man[col] = None
    man = man.set_index("slide_id").loc[ids].reset_index()
    counts = tile_counts(root, ids)
    pid = man["patient_id"]
    has = pid.notna() & (pid.astype(str) != "")
    man["group"] = np.where(has, "patient:" + pid.astype(str), "slide:" + man["slide_id"].astype(str))
    man["n_tiles"] = counts
    man["start"] = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return man[["slide_id", "group", "patient_id", "site", "diagnosis", "n_tiles", "start"]]


def encode_images(images: np.ndarray, encoder) -> np.ndarray:
    """Embed tiles (n, h, w, 3) uint8 on the fly.

    ``encoder`` is a registry name (:func:`workbench.features.encoders.get_encoder`), an object with ``.encode``
    (a :class:`workbench.features.encoders.Encoder`), one with ``.preprocess`` and ``.model`` (``model(preprocess(t))``
    on a uint8 NHWC tensor), or any callable mapping tiles to (n, d) features.
    """
    if isinstance(encoder, str):
        from workbench.features.encoders import get_encoder

        encoder = get_encoder(encoder)
    if hasattr(encoder, "encode"):
        return np.asarray(encoder.encode(images), dtype=np.float32)
    if hasattr(encoder, "preprocess") and hasattr(encoder, "model"):
        import torch

        param = next(iter(encoder.model.parameters()), None)
        device = param.device if param is not None else "cpu"
        with torch.inference_mode():
            out = encoder.model(encoder.preprocess(torch.as_tensor(np.ascontiguousarray(images)).to(device)))
        return out.float().cpu().numpy()
    if callable(encoder):
        return np.asarray(encoder(images), dtype=np.float32)
    raise TypeError(f"encoder must be a name, have .encode or .preprocess + .model, or be callable; "
                    f"got {type(encoder).__name__}")


@dataclass
class StoreIndex:
    """A :class:`TileIndex` over a store's features, queried by tile id, tile image or slide.

    Row ``i`` of the index is global tile id ``i`` (manifest order). Queries exclude the query's
    own patient (its slide when the patient is unknown) unless ``exclude=None``.
    """

    store: Path
    encoder: str
    index: TileIndex
    slides: "object"  # pandas DataFrame from slide_table
    exclude: str | None = "patient"
    _features: object = field(default=None, repr=False)

    def __post_init__(self):
        if self.exclude not in ("patient", None):
            raise ValueError(f"exclude must be 'patient' or None, not {self.exclude!r}")
        self._starts = self.slides["start"].to_numpy()

    @property
    def features(self):
        """Lazy (N, d) Dask array of the store's features."""
        if self._features is None:
            from workbench.store import features_array, open_store

            self._features = features_array(open_store(self.store), self.encoder, list(self.slides["slide_id"]))
        return self._features

    def slide_of(self, tile_ids) -> np.ndarray:
        """Row in :attr:`slides` of each global tile id (-1 for -1)."""
        tile_ids = np.asarray(tile_ids)
        pos = np.searchsorted(self._starts, tile_ids, side="right") - 1
        return np.where(tile_ids >= 0, pos, -1)

    def slide_tiles(self, slide_id: str) -> np.ndarray:
        """Global tile ids of one slide."""
        row = self.slides.index[self.slides["slide_id"] == slide_id]
        if len(row) == 0:
            raise KeyError(f"slide {slide_id!r} is not in the index of {self.store}")
        rec = self.slides.loc[row[0]]
        return np.arange(rec["start"], rec["start"] + rec["n_tiles"], dtype=np.int64)

    def query_vectors(self, vectors, k: int, *, groups=None):
        """Search raw vectors; ``groups`` (nq,) are the groups to exclude (None: no exclusion)."""
        t0 = time.perf_counter()
        out = self.index.search(vectors, k, exclude_groups=groups)
        self.last_query_seconds_ = time.perf_counter() - t0
        return out

    def query_tiles(self, tile_ids, k: int):
        """The ``k`` nearest tiles of each global tile id (its own patient excluded). Returns (scores, ids)."""
        tile_ids = np.asarray(tile_ids, dtype=np.int64)
        order = np.argsort(tile_ids)
        vec = np.empty((len(tile_ids), self.index.dim_), np.float32)
        vec[order] = np.asarray(self.features[tile_ids[order]], dtype=np.float32)
        groups = self.slides["group"].to_numpy()[self.slide_of(tile_ids)] if self.exclude else None
        return self.query_vectors(vec, k, groups=groups)

    def query_images(self, images: np.ndarray, k: int, encoder, *, slide_id: str | None = None):
        """Encode tiles (n, h, w, 3) uint8 on the fly and search; ``slide_id`` excludes that slide's patient."""
        vec = encode_images(images, encoder)
        groups = None
        if slide_id is not None and self.exclude:
            g = self.slides.loc[self.slides["slide_id"] == slide_id, "group"]
            groups = np.repeat(g.iloc[0] if len(g) else f"slide:{slide_id}", len(vec))
        return self.query_vectors(vec, k, groups=groups)

    def hits_table(self, scores: np.ndarray, ids: np.ndarray):
        """Long table of search results: query, rank, tile_id, slide_id, tile (position in slide), score, labels."""
        import pandas as pd

        q, r = np.nonzero(ids >= 0)
        tid = ids[q, r]
        srow = self.slide_of(tid)
        s = self.slides.iloc[srow]
        return pd.DataFrame({"query": q, "rank": r, "tile_id": tid, "slide_id": s["slide_id"].to_numpy(),
                             "tile": tid - s["start"].to_numpy(), "score": scores[q, r],
                             "site": s["site"].to_numpy(), "diagnosis": s["diagnosis"].to_numpy()})

    def read_tiles(self, tile_ids, *, tile_px: int | None = None) -> np.ndarray:
        """Images (n, px, px, 3) uint8 of global tile ids, read from their slides with :class:`TileReader`."""
        from workbench.io.slides import TileReader, open_slide
        from workbench.store import open_store, read_slide

        tile_ids = np.asarray(tile_ids, dtype=np.int64)
        root = open_store(self.store)
        rows = self.slide_of(tile_ids)
        out = None
        for row in np.unique(rows):
            sid = self.slides["slide_id"].iloc[row]
            info = read_slide(root, sid)
            px = int(tile_px or info["tile_px"])
            sel = np.flatnonzero(rows == row)
            local = tile_ids[sel] - self.slides["start"].iloc[row]
            with open_slide(info["path"], slide_id=sid, mpp=info.get("mpp")) as slide, \
                    TileReader(slide, tile_px=px, tile_mpp=info["tile_mpp"] * info["tile_px"] / px) as reader:
                images = reader.read(info["coords"][local])
            if out is None:
                out = np.zeros((len(tile_ids),) + images.shape[1:], np.uint8)
            out[sel] = images
        return out if out is not None else np.zeros((0, tile_px or 224, tile_px or 224, 3), np.uint8)

    def mosaic(self, slide_id: str, *, by: str = "colour", white_filter: bool = True, n_colour: int = 9,
               rate: float = 0.05, min_tissue: float = 0.1, mpp_5x: float = 2.0, random_state: int = 0) -> np.ndarray:
        """Global tile ids of a slide's mosaic (:func:`mosaic`, SISH's two-stage k-means).

        ``by="colour"`` (default, as SISH) clusters RGB histograms (256 bins per channel) of the tiles read
        at 5x (``mpp_5x`` µm/px over each tile's footprint: 56 px for 224-px tiles at 0.5 µm/px);
        ``by="features"`` clusters the tiles' embeddings instead. ``white_filter`` (default on, as SISH)
        drops tiles whose grey level is > 235 on more than 90 % of the 5x tile (:func:`near_white`);
        with ``by="features"`` and the filter off no pixel is read and tiles with tissue fraction below
        ``min_tissue`` are dropped instead.
        """
        from workbench.store import open_store, read_slide

        if by not in ("features", "colour"):
            raise ParameterError(f"mosaic: by must be 'features' or 'colour', not {by!r}")
        root = open_store(self.store)
        info = read_slide(root, slide_id)
        ids = self.slide_tiles(slide_id)
        images = None
        if by == "colour" or white_filter:
            from workbench.io.slides import TileReader, open_slide

            with open_slide(info["path"], slide_id=slide_id, mpp=info.get("mpp")) as slide:
                px = max(8, int(round(info["tile_px"] * info["tile_mpp"] / mpp_5x)))
                with TileReader(slide, tile_px=px, tile_mpp=info["tile_mpp"] * info["tile_px"] / px) as reader:
                    images = reader.read(info["coords"])
        if by == "features":
            feats = l2_normalise(np.asarray(self.features[ids[0] : ids[-1] + 1])) if ids.size else np.empty((0, 1))
        else:
            feats = colour_histograms(images)
        keep = ~near_white(images) if white_filter else np.asarray(info["tissue"]) >= min_tissue
        local = mosaic(info["coords"], feats, keep=keep, n_colour=n_colour, rate=rate, random_state=random_state)
        return ids[local] if ids.size else ids

    def query_slide(self, slide_id: str, *, k_tiles: int = 20, ranking: str = "sish", label: str = "diagnosis",
                    by: str = "colour", white_filter: bool = True, max_distance: float | None = None,
                    mosaic_ids: np.ndarray | None = None):
        """Rank the database's slides for a query slide (its own patient excluded).

        The slide's mosaic tiles each retrieve ``k_tiles`` tiles; hits are ranked by :func:`sish_rank`
        (``ranking="sish"``, labels from column ``label`` weighted by inverse slide frequency) or
        :func:`mean_similarity_rank` (``"mean"``). ``max_distance`` drops hits farther than it (cosine
        distance, or L2 for an L2 index), as SISH keeps only hits within Hamming distance 128: the lists
        then differ in length and SISH's list-length filter can act; without it every list holds
        ``k_tiles`` hits (fewer only where the query's patient was excluded) and that filter, which needs
        more than 3 distinct lengths, does not fire. Returns a DataFrame: rank, slide_id, label and the
        ranking's score columns.
        """
        import pandas as pd

        if ranking not in ("sish", "mean"):
            raise ValueError(f"ranking must be 'sish' or 'mean', not {ranking!r}")
        t0 = time.perf_counter()
        mids = self.mosaic(slide_id, by=by, white_filter=white_filter) if mosaic_ids is None else np.asarray(mosaic_ids)
        scores, ids = self.query_tiles(mids, k_tiles) if mids.size else (np.empty((0, k_tiles)), np.empty((0, k_tiles), int))
        rows = self.slide_of(ids)
        slide_names = self.slides["slide_id"].to_numpy()
        labels = self.slides[label].to_numpy()
        dist = 1.0 - scores if self.index.metric != "l2" else scores
        value = dist if ranking == "sish" else scores
        near = dist <= (np.inf if max_distance is None else float(max_distance))
        hits = [[(slide_names[rw], float(v), labels[rw]) for rw, v, ok in zip(rows[i], value[i], near[i]) if rw >= 0 and ok]
                for i in range(len(ids))]
        if ranking == "sish":
            ranked = sish_rank(hits, label_weights(labels))
        else:
            ranked = mean_similarity_rank(hits)
        self.last_query_seconds_ = time.perf_counter() - t0
        out = pd.DataFrame(ranked, columns=["slide", "label", "entropy", "distance", "mosaic"] if ranking == "sish"
                           else ["slide", "label", "score"]).rename(columns={"slide": "slide_id"})
        out.insert(0, "rank", np.arange(len(out)))
        return out


def _open_for_index(store, encoder):
    from workbench.store import open_store

    root = open_store(store)
    table = slide_table(root)
    table = table[table["n_tiles"] > 0].reset_index(drop=True)
    # slides without tiles add no rows; starts are recomputed over the slides kept
    table["start"] = np.concatenate([[0], np.cumsum(table["n_tiles"].to_numpy())[:-1]]).astype(np.int64)
    return root, table


def build_store_index(store: str | os.PathLike, encoder: str, kind: str = "flat", *, save: bool = True,
                      exclude: str | None = "patient", **params) -> StoreIndex:
    """Build (and by default save next to the store) a ``kind`` index over the store's ``encoder`` features.

    ``params`` go to :class:`TileIndex` (nlist, nprobe, M, ef_search, metric, use_gpu, ...).
    """
    from workbench.store import features_array

    store = Path(store)
    root, table = _open_for_index(store, encoder)
    ids = list(table["slide_id"])
    feats = features_array(root, encoder, ids)
    groups = np.repeat(table["group"].to_numpy(), table["n_tiles"].to_numpy())
    digest = features_digest(root, encoder, ids)
    index = TileIndex(kind, **params).fit(feats, groups=groups, digest=digest)
    if save:
        path = index.save(index_path(store, encoder, kind))
        log.info("saved %s index of %s to %s", kind, store, path)
    return StoreIndex(store, encoder, index, table, exclude, feats)


def load_store_index(store: str | os.PathLike, encoder: str, kind: str = "flat", *, use_gpu="auto",
                     exclude: str | None = "patient") -> StoreIndex:
    """Load the saved ``kind`` index of a store; raises :class:`StaleIndexError` if the features changed."""
    store = Path(store)
    root, table = _open_for_index(store, encoder)
    digest = features_digest(root, encoder, list(table["slide_id"]))
    index = TileIndex.load(index_path(store, encoder, kind), expected_digest=digest, use_gpu=use_gpu)
    return StoreIndex(store, encoder, index, table, exclude)
