"""Tile retrieval: faiss indexes over store features, and the store glue for slide search.

Tile index
    :class:`TileIndex` wraps one faiss index over an (N, d) features array; its kind comes from the
    registry :data:`KINDS` (``print(KINDS)`` shows the table; a new kind is one :class:`IndexKind` subclass
    under :func:`register_kind`): ``"flat"`` (exact), ``"ivf"`` (IVF-Flat: ``nlist`` k-means cells, ``nprobe``
    of them searched), ``"hnsw"`` (graph with ``M`` links per node, ``ef_search`` candidates) or ``"ivfpq"``
    (compressed for 10^7+ rows: IVF cells found by an HNSW coarse quantizer, ``pq_m``-byte product-quantised
    codes, trained on a sample and filled chunk by chunk from Zarr/Dask with a progress bar; the best
    ``rerank`` candidates are re-scored exactly from the float16 features, read back from the store —
    uncompressed Zarr chunks are memory-mapped — or from an in-memory float16 copy for arrays). With ``metric="cosine"`` vectors are
    L2-normalised and compared by inner product, so scores are cosine similarities. faiss-gpu is used
    when it is installed and sees a GPU (``use_gpu="auto"``; HNSW stays on the CPU, faiss has no GPU
    HNSW), otherwise the CPU build. Every database row may carry a *group* (the patient, or the slide
    when the patient is unknown); ``search(..., exclude_groups=)`` never returns rows of the query's
    group (leave-one-patient-out). It over-fetches and filters (:func:`widen_search`, the same loop on
    CPU and GPU), doubling the number of candidates (and, for IVF kinds, the number of probed cells once
    the probed lists run dry) until each query has ``k`` results or none are left, so a query whose own
    slide holds all its nearest tiles still gets ``k``; on a GPU index, queries that reach faiss-gpu's
    2,048-candidate limit first are searched again on a CPU copy of the index.

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

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from workbench.errors import IntegrityError, ParameterError, StaleError, StaleIndexError
from workbench.search.slidesearch import (
    LABEL_WEIGHT_SUM,
    colour_histograms,
    label_weights,
    mean_similarity_rank,
    mosaic,
    near_white,
    sish_rank,
)
from workbench.validate import check_choice, check_int, check_optional

__all__ = [
    # tile index
    "KINDS",
    "METRICS",
    "IndexKind",
    "register_kind",
    "widen_search",
    "FeatureRows",
    "StaleIndexError",
    "TileIndex",
    "gpu_available",
    "l2_normalise",
    "array_digest",
    # store glue
    "index_path",
    "rerank_rows_path",
    "write_rerank_rows",
    "open_rerank_rows",
    "features_digest",
    "slide_table",
    "encode_images",
    "StoreIndex",
    "build_store_index",
    "load_store_index",
    # re-exported from workbench.search.slidesearch
    "LABEL_WEIGHT_SUM",
    "near_white",
    "colour_histograms",
    "mosaic",
    "label_weights",
    "sish_rank",
    "mean_similarity_rank",
]

log = logging.getLogger(__name__)

METRICS = ("cosine", "ip", "l2")
GPU_MAX_K = 2048  # faiss-gpu returns at most this many results per query (k and nprobe)


def _faiss():
    import sys

    faiss = sys.modules.get("faiss")
    if faiss is not None:  # imported already: no logger call (setLevel clears logging's caches, per query)
        return faiss
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines ("Loading faiss with AVX2") are noise
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


# --------------------------------------------------------------------------- index kinds


class IndexKind:
    """One kind of faiss index: how to make it, set its query-time knobs and search it.

    Adding a kind is one subclass decorated with :func:`register_kind`; :class:`TileIndex` reads everything
    from here (no per-kind branches elsewhere). ``params`` names the :class:`TileIndex` parameters the kind
    reads; ``trained`` kinds are trained on a sample of ``train_size`` rows first; ``reranked`` kinds score
    their candidates approximately and re-rank them exactly from the features (:meth:`TileIndex.attach_features`).
    """

    name = ""
    summary = ""
    params: tuple = ()
    gpu = True
    trained = False
    reranked = False

    def defaults(self, n: int, d: int) -> dict:
        """Settings :class:`TileIndex` uses for ``n`` rows of ``d`` dimensions where its parameter is None."""
        return {"nprobe": 16, "rerank": 256}

    def new(self, ti: TileIndex, d: int, n: int):
        raise NotImplementedError

    def configure(self, ti: TileIndex, index) -> None:
        """Apply query-time settings (after building and after loading)."""

    def before_fill(self, ti: TileIndex, index) -> None:
        """Build-time settings while rows are added (query-time ones are applied again afterwards)."""

    def probes(self, ti: TileIndex, index) -> tuple[int | None, int | None]:
        """(cells probed, cells in all) for kinds whose probed lists can run dry, else (None, None)."""
        return None, None

    def search(self, ti: TileIndex, index, q: np.ndarray, k: int, nprobe: int | None):
        return index.search(q, k)


class _KindRegistry(dict):
    """name → :class:`IndexKind`; prints as a table."""

    def table(self):
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "kind": n,
                    "gpu": c.gpu,
                    "trained": c.trained,
                    "re-ranked": c.reranked,
                    "parameters": ", ".join(c.params),
                    "summary": c.summary,
                }
                for n, c in self.items()
            ]
        )

    def __str__(self) -> str:
        return self.table().to_string(index=False)

    __repr__ = __str__


KINDS = _KindRegistry()


def register_kind(cls):
    """Class decorator: add an :class:`IndexKind` subclass to :data:`KINDS` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    KINDS[cls.name] = cls()
    return cls


def _metric_type(ti):
    faiss = _faiss()
    return faiss.METRIC_L2 if ti.metric == "l2" else faiss.METRIC_INNER_PRODUCT


@register_kind
class FlatKind(IndexKind):
    name, summary = "flat", "exact search over the full vectors"

    def new(self, ti, d, n):
        faiss = _faiss()
        return faiss.IndexFlatL2(d) if ti.metric == "l2" else faiss.IndexFlatIP(d)


@register_kind
class IVFKind(IndexKind):
    name, summary = "ivf", "IVF-Flat: nlist k-means cells of full vectors, nprobe searched"
    params, trained = ("nlist", "nprobe", "train_size"), True

    def new(self, ti, d, n):
        faiss = _faiss()
        index = faiss.IndexIVFFlat(FlatKind().new(ti, d, n), d, ti._nlist(n), _metric_type(ti))
        # faiss trains on fewer than 39 points per cell anyway; its "please provide at least" line is C stderr noise
        index.cp.min_points_per_centroid = 1
        return index

    def configure(self, ti, index):
        index.nprobe = int(ti.nprobe)

    def probes(self, ti, index):
        return int(ti.nprobe), int(index.nlist)

    def search(self, ti, index, q, k, nprobe):
        if nprobe is None or nprobe == int(ti.nprobe):
            return index.search(q, k)
        if getattr(ti, "on_gpu_", False):  # GPU indexes take nprobe as an attribute
            old, index.nprobe = index.nprobe, int(nprobe)
            try:
                return index.search(q, k)
            finally:
                index.nprobe = old
        return index.search(q, k, params=_faiss().SearchParametersIVF(nprobe=int(nprobe)))


@register_kind
class HNSWKind(IndexKind):
    name, summary = "hnsw", "graph of M links per node over full vectors (CPU only)"
    params, gpu = ("M", "ef_construction", "ef_search"), False

    def new(self, ti, d, n):
        index = _faiss().IndexHNSWFlat(d, int(ti.M), _metric_type(ti))
        index.hnsw.efConstruction = int(ti.ef_construction)
        return index

    def configure(self, ti, index):
        index.hnsw.efSearch = int(ti.ef_search)

    def search(self, ti, index, q, k, nprobe):
        if k > int(ti.ef_search):  # faiss returns at most efSearch results
            return index.search(q, k, params=_faiss().SearchParametersHNSW(efSearch=int(k)))
        return index.search(q, k)


@register_kind
class IVFPQKind(IndexKind):
    """Compressed: (optional OPQ rotation) + IVF with an HNSW coarse quantizer + product-quantised codes.

    ``pq_m`` bytes per vector in ``pq_bits``-bit codes: 4-bit codes are faiss's SIMD "fast-scan" PQ
    (``2 * pq_m`` sub-quantizers of 16 centroids, scanned from registers), 8-bit codes the classic PQ
    (``pq_m`` sub-quantizers of 256 centroids). The index factory string is ``factory`` when given, else
    ``[OPQ{M},]IVF{nlist}_HNSW32,PQ{M}x4fs`` (or ``PQ{M}x8``). Candidates are scored from the codes, then the
    best ``rerank`` (at least the number asked for) are re-scored exactly from the float16 features.

    Defaults for n rows of d dimensions (:meth:`defaults`, what ``TileIndex("ivfpq")`` uses where a parameter
    is None), measured on a hard mixture (2,000 isotropic components, noise 0.6; benchmarks/search_scale.py):
    recall is lost in the PQ ranking, not in the probed cells (recall@10 equals the share of the true top-10
    among the candidates at nprobe 8, 16 and 32 alike), so the codes get d / 4 bytes (2 dimensions per 4-bit
    sub-quantizer: 96 B at 384-d, a 1.05 GB index at 10^7 rows) and the exact re-rank 1,000 candidates. At
    10^6 the share of the true top-10 among 256 candidates was 0.76 with d / 16 bytes of 8-bit codes, 0.97
    with d / 8 bytes of 8-bit codes, 0.98 with d / 4 bytes of fast-scan codes (scanned ~2x faster, filled ~2x
    faster); at 10^7 (5,000 rows a component) it is 0.69 / 0.83 / 0.94 among 256 / 500 / 1,000 candidates,
    with recall@10 0.937 in 4.5 ms a query (1 thread, re-rank included). nlist is ``4 * sqrt(n)`` up to
    4,096 cells: the coarse k-means costs O(nlist^2) on the CPU (12,649 cells at 10^7 would take ~40 min to
    train on 2 cores; 4,096 a few minutes), and its HNSW quantizer keeps filling fast. nprobe 16.
    """

    name = "ivfpq"
    summary = "OPQ/IVF-PQ codes (pq_m bytes per row) + exact re-rank of the top `rerank` from the features"
    params = ("nlist", "nprobe", "pq_m", "pq_bits", "opq", "factory", "rerank", "train_size")
    gpu, trained, reranked = False, True, True

    MAX_NLIST = 4096  # coarse training is O(nlist^2) on the CPU: 4096 cells train in minutes on 2 cores

    @staticmethod
    def default_m(d: int, bits: int = 4) -> int:
        """Bytes per row: d / 4 with 4-bit codes (2 dimensions per sub-quantizer), d / 8 with 8-bit codes."""
        per = 2 if bits == 4 else 8  # dimensions per sub-quantizer
        subs = max([m for m in range(1, d + 1) if d % m == 0 and d // m >= per] or [1])
        return max(1, subs * bits // 8)

    def defaults(self, n: int, d: int) -> dict:
        nlist = int(np.clip(4 * math.sqrt(n), 1, max(1, min(self.MAX_NLIST, n // 39))))
        return {"nlist": nlist, "pq_bits": 4, "nprobe": 16, "rerank": 1000}  # pq_m: default_m(d, pq_bits)

    def factory_string(self, ti, d, n) -> str:
        if ti.factory:
            return str(ti.factory)
        bits = 4 if ti.pq_bits is None else int(ti.pq_bits)
        if bits not in (4, 8):
            raise ParameterError(f"pq_bits must be 4 (fast-scan) or 8, not {ti.pq_bits!r}")
        m = self.default_m(d, bits) if ti.pq_m is None else int(ti.pq_m)
        subs = m * 8 // bits  # sub-quantizers
        if m < 1 or d % subs:
            raise ParameterError(
                f"pq_m={m!r} bytes of {bits}-bit codes need {subs} sub-quantizers, which must divide the dimension {d}"
            )
        codes = f"PQ{subs}x4fs" if bits == 4 else f"PQ{subs}x8"
        return f"{f'OPQ{subs},' if ti.opq else ''}IVF{ti._nlist(n)}_HNSW32,{codes}"

    def new(self, ti, d, n):
        faiss = _faiss()
        index = faiss.index_factory(d, self.factory_string(ti, d, n), _metric_type(ti))
        if hasattr(index, "cp"):  # 10 Lloyd iterations of the coarse k-means (faiss's default for IVF)
            index.cp.niter = 10
        ivf = self._ivf(index)
        pq = getattr(ivf, "pq", None)
        if pq is not None:  # 64 points per code word and 15 iterations train the codebooks well enough
            pq.cp.max_points_per_centroid, pq.cp.niter = 64, 15
        if hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False  # minutes of annealing, only for Hamming filtering we never use
        return index

    @staticmethod
    def _ivf(index):
        faiss = _faiss()
        return faiss.downcast_index(faiss.extract_index_ivf(index))

    def _set_nprobe(self, index, nprobe: int) -> None:
        faiss = _faiss()
        ivf = self._ivf(index)
        ivf.nprobe = int(nprobe)
        quantizer = faiss.downcast_index(ivf.quantizer)
        if hasattr(quantizer, "hnsw"):  # the HNSW coarse quantizer must return nprobe cells
            quantizer.hnsw.efSearch = max(64, 2 * int(nprobe))

    def configure(self, ti, index):
        self._set_nprobe(index, int(ti.nprobe))

    def before_fill(self, ti, index):
        # filling needs each row's nearest cell only: a 32-wide HNSW search finds it (a row put in a
        # neighbouring cell is still found by queries probing that cell); ~2x faster than the query-time 64
        quantizer = _faiss().downcast_index(self._ivf(index).quantizer)
        if hasattr(quantizer, "hnsw"):
            quantizer.hnsw.efSearch = 32

    def probes(self, ti, index):
        return int(ti.nprobe), int(self._ivf(index).nlist)

    def search(self, ti, index, q, k, nprobe):
        want = int(ti.nprobe) if nprobe is None else int(nprobe)
        if want == int(ti.nprobe):
            return index.search(q, k)
        self._set_nprobe(index, want)
        try:
            return index.search(q, k)
        finally:
            self._set_nprobe(index, int(ti.nprobe))


# --------------------------------------------------------------------------- candidate widening


def widen_search(
    raw,
    n_queries: int,
    k: int,
    *,
    possible,
    cap: int,
    keep=None,
    nprobe=None,
    nlist=None,
    fill: float = -np.inf,
    start: int | None = None,
):
    """Search with over-fetching until every query has ``k`` results that survive ``keep``.

    The one widening loop of every index (CPU and GPU): ``raw(rows, fetch, nprobe)`` returns
    ``(scores, ids)`` (len(rows), fetch) of the queries ``rows``, best first, -1 ids for missing candidates;
    ``keep(rows, ids)`` is a bool mask of the candidates allowed (default: every id ≥ 0). ``fetch`` starts at
    ``start`` (default ``2k + 8``) and doubles, and ``nprobe`` doubles (up to ``nlist``) whenever a probed
    list ran dry, until a query has ``possible[i]`` allowed results, or ``fetch`` reached ``cap`` and all
    cells are probed.

    Returns
    -------
    scores, ids : (n_queries, k), padded with ``fill`` / -1
    short : int64 array of queries that stopped at ``cap`` with fewer than ``possible`` results (a capped
        GPU index: search them again on a CPU index, cap = database size)
    """
    scores = np.full((n_queries, k), fill, dtype=np.float32)
    ids = np.full((n_queries, k), -1, dtype=np.int64)
    possible = np.broadcast_to(np.asarray(possible), (n_queries,))
    todo = np.arange(n_queries)
    short = []
    fetch = min(int(cap), int(start) if start is not None else 2 * k + 8)
    while todo.size:
        d_, i_ = raw(todo, fetch, nprobe)
        ok = (i_ >= 0) if keep is None else ((i_ >= 0) & keep(todo, i_))
        count = ok.sum(1)
        at_cap = fetch >= cap
        exhausted = at_cap and (nprobe is None or nlist is None or nprobe >= nlist)
        done = (count >= possible[todo]) | exhausted
        order = np.argsort(~ok[done], axis=1, kind="stable")[:, :k]
        rows = todo[done]
        kk = order.shape[1]
        took = np.take_along_axis(ok[done], order, 1)
        scores[rows, :kk] = np.where(took, np.take_along_axis(d_[done], order, 1), fill)
        ids[rows, :kk] = np.where(took, np.take_along_axis(i_[done], order, 1), -1)
        if exhausted:
            short.extend(rows[count[done] < possible[rows]].tolist())
        todo = todo[~done]
        if todo.size:
            if nprobe is not None and nlist is not None and ((i_[~done] < 0).any() or at_cap):
                nprobe = min(nlist, 2 * nprobe)  # the probed lists ran dry: probe more cells
            fetch = min(int(cap), 2 * fetch)
    return scores, ids, np.asarray(short, np.int64)


# --------------------------------------------------------------------------- exact re-rank


def _widen(a: np.ndarray) -> np.ndarray:
    """float32 copy of a row block; float16 widened by torch in pieces below its parallel grain (32,768 values)
    so that no thread pool wakes: 0.07 ms for 1,000 x 384 where numpy's scalar cast takes 1.2 ms and torch's
    pooled cast up to 8 ms on a loaded machine (measured on the 2-core benchmark machine)."""
    if a.dtype != np.float16 or a.ndim != 2 or a.size == 0:
        return np.asarray(a, np.float32)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return np.asarray(a, np.float32)
    a = np.ascontiguousarray(a)
    out = np.empty(a.shape, np.float32)
    src, dst = torch.from_numpy(a), torch.from_numpy(out)
    step = max(1, 32000 // a.shape[1])
    for i in range(0, a.shape[0], step):
        dst[i : i + step].copy_(src[i : i + step])
    return out


class FeatureRows:
    """Random rows of an (N, d) features array as float32: NumPy/memmap, Zarr or Dask.

    Rows are read once each, sorted. A memmap (the raw re-rank copy :func:`write_rerank_rows` writes beside a
    compressed index) is one gather from one mapping; an uncompressed Zarr v3 array on a local disk is read by
    memory-mapping its chunk files (one gather per chunk touched), so scattered rows cost page reads, not chunk
    decodes; any other Zarr array is read with one orthogonal selection (each chunk touched decoded once), a
    Dask array by fancy indexing.
    """

    def __init__(self, x, *, n: int | None = None):
        self.x = x
        self.shape = (int(x.shape[0]) if n is None else int(n), int(x.shape[1]))  # n: only the first n rows
        self._maps = None
        self._chunk = None
        if not isinstance(x, np.ndarray) and not hasattr(x, "dask"):
            self._maps = self._raw_chunk_paths(x)
        # a plain ndarray view: np.memmap's __getitem__ bookkeeping costs ~1.5 ms per 1,000-row gather
        self._plain = x.view(np.ndarray) if isinstance(x, np.ndarray) else None
        mm = getattr(x, "_mmap", None) if isinstance(x, np.memmap) else None
        if mm is not None:  # scattered candidate rows: no read-ahead around each page
            import mmap

            with contextlib.suppress(AttributeError, OSError, ValueError):
                mm.madvise(mmap.MADV_RANDOM)

    @staticmethod
    def _raw_chunk_paths(x):
        try:
            meta = x.metadata
            codecs = getattr(meta, "codecs", None)
            if codecs is None or len(codecs) != 1 or type(codecs[0]).__name__ != "BytesCodec":
                return None
            root = getattr(x.store, "root", None)
            chunks = meta.chunk_grid.chunk_shape
            if root is None or len(chunks) != 2 or chunks[1] != x.shape[1]:
                return None
            enc = meta.chunk_key_encoding
            base = Path(str(root)) / x.path if x.path else Path(str(root))
            paths = [base / enc.encode_chunk_key((i, 0)) for i in range(-(-x.shape[0] // chunks[0]))]
            if not all(p.exists() for p in paths):
                return None
            return {"paths": paths, "rows": int(chunks[0]), "dtype": np.dtype(x.dtype).newbyteorder("<"), "maps": {}}
        except Exception:
            return None

    def _chunk_map(self, i: int) -> np.ndarray:
        m = self._maps["maps"].get(i)
        if m is None:
            # a plain ndarray over an mmap (not np.memmap, whose per-index subclass bookkeeping cost ~50 µs per
            # chunk touched: 10 ms for 1,000 candidates spread over 200 chunks); the OS pages rows in on demand
            import mmap

            with open(self._maps["paths"][i], "rb") as fh:
                buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            with contextlib.suppress(AttributeError, OSError):
                buf.madvise(mmap.MADV_RANDOM)  # scattered rows: no read-ahead of neighbouring pages
            m = np.frombuffer(buf, dtype=self._maps["dtype"]).reshape(self._maps["rows"], self.shape[1])
            self._maps["maps"][i] = m
        return m

    def warm(self, block_rows: int = 1 << 16) -> float:
        """Fault in every page of a memory-mapped source (the raw re-rank copy or raw Zarr chunks); seconds taken.

        A first touch of a page costs a page fault (microseconds when the file is in the page cache, a disk
        read when not): ~1,000 first touches per query made a cold 10^7-row re-rank ~45 ms on the benchmark
        machine, against ~1 ms once the mapping is warm. A search service calls this once after loading; the
        pages are the OS page cache's (file-backed, shared, reclaimable), not the process's heap.
        """
        t0 = time.perf_counter()
        if isinstance(self.x, np.memmap):
            srcs = [self.x]
        elif self._maps is not None:
            srcs = [self._chunk_map(i) for i in range(len(self._maps["paths"]))]
        else:
            return 0.0
        import mmap

        for src in srcs:
            mm = getattr(src, "_mmap", None) or getattr(src.base, "_mmap", None) or src.base
            advise = getattr(mm, "madvise", None)
            with contextlib.suppress(OSError, ValueError, TypeError):
                if advise is not None:  # read ahead while touching (pages not in the page cache come in bulk)
                    advise(mmap.MADV_SEQUENTIAL)
                    advise(mmap.MADV_WILLNEED)
            flat = src.reshape(-1)
            step = max(1, 4096 // flat.itemsize)  # one element per 4 KiB page
            for a in range(0, flat.shape[0], block_rows * step):
                np.add.reduce(flat[a : a + block_rows * step : step], dtype=np.float32)
            with contextlib.suppress(OSError, ValueError, TypeError):
                if advise is not None:
                    advise(mmap.MADV_RANDOM)  # back to no read-ahead for the scattered candidate reads
        return time.perf_counter() - t0

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        if rows.size == 0:
            return np.empty((0, self.shape[1]), np.float32)
        # sorted once (page order); a query's candidates are distinct, so no unique pass in the usual case
        order = np.argsort(rows, kind="stable")
        uniq = rows[order]
        inv = None
        if uniq.size > 1 and (uniq[1:] == uniq[:-1]).any():
            uniq, inv = np.unique(rows, return_inverse=True)
        if isinstance(self.x, np.ndarray):
            got = self._plain[uniq]
        elif self._maps is not None:
            # rows sorted (np.unique), so each chunk's rows are one run: one memory-mapped gather per chunk
            r = self._maps["rows"]
            got = np.empty((len(uniq), self.shape[1]), self._maps["dtype"])
            which = uniq // r
            chunks, first = np.unique(which, return_index=True)
            for c, a, b in zip(chunks.tolist(), first.tolist(), first[1:].tolist() + [len(uniq)]):
                got[a:b] = self._chunk_map(c)[uniq[a:b] - c * r]
        elif hasattr(self.x, "dask"):
            got = np.asarray(self.x[uniq])
        else:
            got = np.asarray(self.x.get_orthogonal_selection((uniq, slice(None))))
        got = _widen(np.asarray(got))
        if inv is not None:
            return got[inv.reshape(-1)]
        out = np.empty_like(got)
        out[order] = got
        return out


# --------------------------------------------------------------------------- tile index


class TileIndex:
    """A faiss index over tile embeddings with leave-one-group-out search.

    Parameters
    ----------
    kind : a name in :data:`KINDS` (``print(KINDS)`` lists them): "flat", "ivf", "hnsw", "ivfpq"
    nlist : int, optional
        IVF cells; default ``clip(4 * sqrt(N), 1, N // 39)`` (ivfpq: at most 4,096, see :class:`IVFPQKind`).
    nprobe : int, optional
        IVF cells searched per query; default the kind's (16).
    M, ef_construction, ef_search : int
        HNSW links per node, build-time and query-time candidate list sizes.
    pq_m, pq_bits, opq, factory, rerank : int, int, bool, str, int
        ``ivfpq``: bytes per row (default d / 4) in 4-bit fast-scan (default) or 8-bit codes, OPQ rotation first, a faiss index-factory string replacing the default
        ``[OPQ{M},]IVF{nlist}_HNSW32,PQ{M}x4fs``, and candidates re-ranked exactly from the features (default
        the kind's: 1,000 for ivfpq). None picks the kind's default for the data's n and d at ``fit``.
    metric : {"cosine", "ip", "l2"}
        Scores are similarities (higher is closer) for cosine/ip, squared L2 distances for l2.
    use_gpu : {"auto", True, False}
    train_size : int, optional
        Rows sampled to train IVF kinds; default ``64 * nlist`` (``39 * nlist``, at least 65,536, for ivfpq).
    batch_rows : int
        Rows converted and added per block (bounds memory for Dask / Zarr inputs).
    progress : bool
        tqdm bar while adding rows.
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
    cpu_fallbacks_ : int
        Queries a capped GPU index could not fill and that were searched again on the CPU.

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(size=(1000, 16)).astype("float32")
    >>> idx = TileIndex("flat").fit(x, groups=np.arange(1000) // 10)
    >>> scores, ids = idx.search(x[:2], 5, exclude_groups=[0, 0])
    >>> bool((ids >= 10).all())
    True
    """

    def __init__(
        self,
        kind: str = "flat",
        *,
        nlist: int | None = None,
        nprobe: int | None = None,
        M: int = 32,
        ef_construction: int = 40,
        ef_search: int = 64,
        pq_m: int | None = None,
        pq_bits: int | None = None,
        opq: bool = False,
        factory: str | None = None,
        rerank: int | None = None,
        metric: str = "cosine",
        use_gpu="auto",
        train_size: int | None = None,
        batch_rows: int = 65536,
        progress: bool = False,
        random_state: int = 0,
    ):
        self.kind = kind
        self.nlist = nlist
        self.nprobe = nprobe
        self.M = M
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.pq_m = pq_m
        self.pq_bits = pq_bits
        self.opq = opq
        self.factory = factory
        self.rerank = rerank
        self.metric = metric
        self.use_gpu = use_gpu
        self.train_size = train_size
        self.batch_rows = batch_rows
        self.progress = progress
        self.random_state = random_state

    def get_params(self) -> dict:
        return {
            k: getattr(self, k)
            for k in (
                "kind",
                "nlist",
                "nprobe",
                "M",
                "ef_construction",
                "ef_search",
                "pq_m",
                "pq_bits",
                "opq",
                "factory",
                "rerank",
                "metric",
                "use_gpu",
                "train_size",
                "batch_rows",
                "progress",
                "random_state",
            )
        }

    @property
    def spec(self) -> IndexKind:
        """The :class:`IndexKind` of this index."""
        if self.kind not in KINDS:
            raise ParameterError(f"kind={self.kind!r} is not allowed: kind must be one of {tuple(KINDS)}")
        return KINDS[self.kind]

    # ---- building
    def _validate(self, n: int) -> None:
        self.spec  # noqa: B018  (raises for an unknown kind)
        check_choice("metric", self.metric, METRICS)
        check_choice("use_gpu", self.use_gpu, ("auto", True, False))
        if n < 1:
            raise ParameterError("cannot build an index over 0 vectors")
        for name, hi in (
            ("M", 512),
            ("ef_construction", 1 << 16),
            ("ef_search", 1 << 16),
            ("batch_rows", 1 << 26),
        ):
            check_int(name, getattr(self, name), 1, hi)
        check_optional(check_int, "nprobe", self.nprobe, 1, 1 << 20)
        check_optional(check_int, "rerank", self.rerank, 1, 1 << 20)
        check_optional(check_int, "nlist", self.nlist, 1, 1 << 24)
        check_optional(check_int, "train_size", self.train_size, 1)
        check_int("random_state", self.random_state)

    def _nlist(self, n: int) -> int:
        if self.nlist is not None:
            return max(1, min(int(self.nlist), n))
        default = self.spec.defaults(n, getattr(self, "dim_", 1)).get("nlist")
        return int(default) if default is not None else int(np.clip(4 * math.sqrt(n), 1, max(1, n // 39)))

    def _resolve_defaults(self, n: int, d: int) -> None:
        """Set the parameters left None to the kind's defaults for n rows of d dimensions."""
        for name, value in self.spec.defaults(n, d).items():
            if name in ("nprobe", "rerank", "pq_bits") and getattr(self, name) is None:
                setattr(self, name, value)

    def _prepare(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or (hasattr(self, "dim_") and x.shape[1] != self.dim_):
            want = f"(n, {self.dim_})" if hasattr(self, "dim_") else "(n, d)"
            raise ValueError(f"expected vectors of shape {want}, got {x.shape}")
        return l2_normalise(x) if self.metric == "cosine" else np.ascontiguousarray(x, dtype=np.float32)

    def _new_index(self, d: int, n: int):
        index = self.spec.new(self, d, n)
        self.spec.configure(self, index)
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
        if not self.spec.gpu:
            log.info("faiss has no GPU version of the %s index: it stays on the CPU", self.kind)
            self.on_gpu_ = False
            return index
        faiss = _faiss()
        self._gpu_res = faiss.StandardGpuResources()
        self.on_gpu_ = True
        return faiss.index_cpu_to_gpu(self._gpu_res, 0, index)

    def _train_sample(self, x, n: int, nlist: int) -> np.ndarray:
        default = max(39 * nlist, 65536) if self.kind == "ivfpq" else 64 * nlist
        size = min(n, int(self.train_size or default))
        rng = np.random.default_rng(self.random_state)
        rows = np.sort(rng.choice(n, size=size, replace=False))
        sample = self._prepare(FeatureRows(x)(rows) if not isinstance(x, np.ndarray) else x[rows])
        return sample[np.isfinite(sample).all(axis=1)]

    def fit(self, x, *, groups=None, digest: str | None = None) -> TileIndex:
        """Build the index over ``x`` (N, d) (NumPy, Zarr or Dask; float16 is fine).

        ``groups`` (N,) holds each row's group (patient or slide) for leave-one-group-out search;
        ``digest`` identifies the features (default: a hash of ``x``'s values). Re-ranked kinds keep ``x``
        (Zarr/Dask/memmap) or a float16 copy of it (in-memory arrays) to re-score candidates.
        """
        t0 = time.perf_counter()
        n, d = int(x.shape[0]), int(x.shape[1])
        self._validate(n)
        self.n_, self.dim_ = n, d
        self._resolve_defaults(n, d)
        index = self._new_index(d, n)
        if self.spec.trained:
            t1 = time.perf_counter()
            index.train(self._train_sample(x, n, self._nlist(n)))
            log.info("trained %s index in %.1f s", self.kind, time.perf_counter() - t1)
        # NaN/Inf rows (a broken model or tile) are left out of the index and reported, never searched
        kept, bad = [], []
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc=f"fill {self.kind} index", unit="row", unit_scale=True)
        self.spec.before_fill(self, index)
        for start in range(0, n, int(self.batch_rows)):
            block = self._prepare(x[start : start + int(self.batch_rows)])
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                bad.extend((start + np.flatnonzero(~finite)).tolist())
                block = np.ascontiguousarray(block[finite])
            kept.append(start + np.flatnonzero(finite))
            if len(block):
                index.add(block)
            if bar is not None:
                bar.update(len(finite))
        if bar is not None:
            bar.close()
        if bad:
            log.warning(
                "%d of %d rows are non-finite (NaN/Inf) and were left out of the index: rows %s%s",
                len(bad),
                n,
                bad[:20],
                " …" if len(bad) > 20 else "",
            )
        self.spec.configure(self, index)  # query-time settings again after before_fill
        self.row_ids_ = np.concatenate(kept).astype(np.int64) if bad else None
        self.nonfinite_rows_ = np.asarray(bad, np.int64)
        self.index_ = index
        self._set_groups(groups)
        if self.spec.reranked:
            self.attach_features(x)
        self.digest_ = digest if digest is not None else array_digest(x)
        self.build_seconds_ = time.perf_counter() - t0
        log.info("built %s index over %d x %d in %.1f s", self.kind, n, d, self.build_seconds_)
        return self

    def attach_features(self, x) -> TileIndex:
        """The (N, d) features re-ranked kinds re-score candidates from (kept by reference, or as float16).

        In-memory NumPy arrays are kept as a float16 copy; memmaps, Zarr and Dask arrays (or a
        :class:`FeatureRows` over one) are read on demand.
        """
        if tuple(x.shape) != (self.n_, self.dim_):
            raise ValueError(f"features of shape {tuple(x.shape)} do not match the index ({self.n_}, {self.dim_})")
        if isinstance(x, np.ndarray) and not isinstance(x, np.memmap):
            x = np.ascontiguousarray(x, dtype=np.float16)
        self._features = x if isinstance(x, FeatureRows) else FeatureRows(x)
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

    def _raw_search(self, q: np.ndarray, k: int, nprobe: int | None = None, *, index=None):
        """``k`` candidates per query (row ids, best first): faiss search, then the exact re-rank if any."""
        index = self.index_ if index is None else index
        spec = self.spec
        if not spec.reranked:
            return self._to_rows(*spec.search(self, index, q, k, nprobe))
        feats = getattr(self, "_features", None)
        kk = max(int(k), int(self.rerank))
        scores, ids = self._to_rows(*spec.search(self, index, q, min(kk, int(index.ntotal)), nprobe))
        if feats is None:
            if not getattr(self, "_warned_no_features", False):
                log.warning(
                    "%s index without features: scores come from the compressed codes; call "
                    "attach_features() for the exact re-rank",
                    self.kind,
                )
                self._warned_no_features = True
            return scores[:, :k], ids[:, :k]
        return self._rerank(q, ids, k, feats)

    def _rerank(self, q: np.ndarray, ids: np.ndarray, k: int, feats: FeatureRows):
        """Exact scores of the candidate rows ``ids`` (-1 = none) read from the features; best ``k`` first."""
        valid = ids >= 0
        vec = feats(ids[valid])
        qi = np.nonzero(valid)[0]
        if self.metric == "l2":
            exact = ((vec - q[qi]) ** 2).sum(1)
        else:
            if valid.all():  # the usual case: (nq, R) candidates scored by one batched mat-vec
                exact = np.matmul(vec.reshape(ids.shape[0], ids.shape[1], -1), q[:, :, None]).reshape(-1)
            else:
                exact = np.einsum("ij,ij->i", vec, q[qi])
            if self.metric == "cosine":  # divide by the rows' norms (no normalised copy of the rows)
                exact = exact / np.maximum(np.sqrt(np.einsum("ij,ij->i", vec, vec)), 1e-12)
        fill = np.inf if self.metric == "l2" else -np.inf
        s = np.full(ids.shape, fill, np.float32)
        s[valid] = exact
        order = np.argsort(s if self.metric == "l2" else -s, axis=1, kind="stable")[:, :k]
        out_s, out_i = np.take_along_axis(s, order, 1), np.take_along_axis(ids, order, 1)
        return out_s, np.where(np.isfinite(out_s), out_i, -1)

    def _to_rows(self, scores: np.ndarray, ids: np.ndarray):
        """Map faiss positions to row ids of ``x`` (they differ when non-finite rows were left out)."""
        row_ids = getattr(self, "row_ids_", None)
        if row_ids is not None:
            ids = np.where(ids >= 0, row_ids[np.maximum(ids, 0)], -1)
        return scores, ids

    def _max_k(self) -> int:
        """Most candidates one search may return: the database, or faiss-gpu's limit on a GPU index."""
        n = int(self.index_.ntotal)
        cap = getattr(self, "_gpu_k_cap", GPU_MAX_K) if getattr(self, "on_gpu_", False) else n
        return min(n, int(cap))

    def _cpu_index(self):
        """A CPU copy of a GPU index (made once), for queries the GPU's candidate cap cannot serve."""
        if not getattr(self, "on_gpu_", False):
            return self.index_
        if getattr(self, "_cpu_copy", None) is None:
            self._cpu_copy = _faiss().index_gpu_to_cpu(self.index_)
            self.spec.configure(self, self._cpu_copy)
        return self._cpu_copy

    def group_codes(self, values) -> np.ndarray:
        """Codes of group ``values`` (-1 for a group absent from the database)."""
        import pandas as pd

        if self.groups_ is None:
            raise ValueError("this index was built without groups: pass groups= to fit() to exclude them")
        return pd.Index(self.group_values_).get_indexer(np.asarray(values))

    def search(self, queries, k: int, *, exclude_groups=None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest rows of each query, never from the query's own group.

        Candidates are widened by :func:`widen_search` until ``k`` survive the exclusion; on a GPU index,
        queries that hit faiss-gpu's candidate limit first are searched again on a CPU copy
        (``cpu_fallbacks_`` counts them), so no query silently gets fewer than ``k``.

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
        # k is bounded by what exists: rows past the index's size could only ever be -1
        nq, k = len(q), min(check_int("k", k, 1), max(1, int(self.n_)))
        fill = np.inf if self.metric == "l2" else -np.inf
        keep, qg = None, None
        possible = np.full(nq, min(k, int(self.index_.ntotal)))
        if exclude_groups is not None:
            qg = self.group_codes(exclude_groups)
            if qg.shape != (nq,):
                raise ValueError(f"exclude_groups must have shape ({nq},), got {qg.shape}")
            own = np.where(qg >= 0, self._group_sizes[np.maximum(qg, 0)], 0)
            possible = np.minimum(k, self.n_ - own)  # results that can exist at all
            keep = lambda rows, i_: self.groups_[np.maximum(i_, 0)] != qg[rows, None]  # noqa: E731
        nprobe, nlist = self.spec.probes(self, self.index_)
        start = k if exclude_groups is None else None

        def run(index, cap, rows):
            raw = lambda r, fetch, npb: self._raw_search(q[rows[r]], fetch, npb, index=index)  # noqa: E731
            kp = None if keep is None else (lambda r, i_: keep(rows[r], i_))
            return widen_search(
                raw,
                len(rows),
                k,
                possible=possible[rows],
                cap=cap,
                keep=kp,
                nprobe=nprobe,
                nlist=nlist,
                fill=fill,
                start=start,
            )

        scores, ids, short = run(self.index_, self._max_k(), np.arange(nq))
        self.cpu_fallbacks_ = 0
        if short.size and getattr(self, "on_gpu_", False):
            log.info(
                "%d queries need more than the GPU's %d candidates: searching them on the CPU",
                short.size,
                self._max_k(),
            )
            s2, i2, _ = run(self._cpu_index(), int(self.index_.ntotal), short)
            scores[short], ids[short] = s2, i2
            self.cpu_fallbacks_ = int(short.size)
        return scores, ids

    # ---- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (.faiss), its ``.json`` sidecar and ``.groups.npz``; returns the index path."""
        self._check_fitted()
        faiss = _faiss()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        index = faiss.index_gpu_to_cpu(self.index_) if getattr(self, "on_gpu_", False) else self.index_
        from workbench.store import atomic_path, write_json_atomic

        # Atomic as a whole: every data file of this version gets a fresh name (<stem>.<token>.*), written
        # via temp + fsync + rename; the .json sidecar, which names them, is replaced last. A kill at any
        # point leaves the previous sidecar and the files it names intact, so the old index stays readable.
        token = f"{time.time_ns():x}"
        files = {"faiss": f"{path.stem}.{token}.faiss"}
        with atomic_path(path.parent / files["faiss"]) as tmp:
            faiss.write_index(index, str(tmp))
        if self.groups_ is not None:
            values = self.group_values_
            values = values.astype(str) if values.dtype == object else values
            files["groups"] = f"{path.stem}.{token}.groups.npz"
            with atomic_path(path.parent / files["groups"]) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, codes=self.groups_, values=values)
        if getattr(self, "row_ids_", None) is not None:
            files["rows"] = f"{path.stem}.{token}.rows.npy"
            with atomic_path(path.parent / files["rows"]) as tmp, open(tmp, "wb") as fh:
                np.save(fh, self.row_ids_)
        meta = {
            "params": {**self.get_params(), "use_gpu": str(self.use_gpu)},
            "n": self.n_,
            "dim": self.dim_,
            "digest": self.digest_,
            "has_groups": self.groups_ is not None,
            "n_indexed": int(index.ntotal),
            "has_row_ids": getattr(self, "row_ids_", None) is not None,
            "build_seconds": self.build_seconds_,
            "files": files,
        }
        sidecar = path.with_suffix(".json")
        try:
            old_files = set(json.loads(sidecar.read_text()).get("files", {}).values())
        except (OSError, ValueError, AttributeError):
            old_files = set()
        write_json_atomic(sidecar, meta)  # the commit point: names this version's files
        with atomic_path(path) as tmp:  # <name>.faiss: a plain copy for tools that look for it (a hard link)
            try:
                os.link(path.parent / files["faiss"], tmp)
            except OSError:
                import shutil

                shutil.copyfile(path.parent / files["faiss"], tmp)
        import re

        own = re.compile(rf"^{re.escape(path.stem)}\.[0-9a-f]+\.(faiss|groups\.npz|rows\.npy)$")
        stale = old_files | {f.name for f in path.parent.iterdir() if own.match(f.name)}  # incl. killed attempts
        for name in stale - set(files.values()):
            try:
                (path.parent / name).unlink()
            except OSError:
                pass
        for legacy in (path.with_suffix(".groups.npz"), path.with_suffix(".rows.npy")):
            legacy.unlink(missing_ok=True)
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, expected_digest: str | None = None, use_gpu="auto", features=None
    ) -> TileIndex:
        """Read an index saved by :meth:`save`; refuse it if its digest is not ``expected_digest``.

        ``features``: the (N, d) features a re-ranked kind re-scores from (see :meth:`attach_features`).
        """
        path = Path(path)
        sidecar = path.with_suffix(".json")
        if not sidecar.exists() or not (path.exists() or any(path.parent.glob(f"{path.stem}.*.faiss"))):
            raise FileNotFoundError(f"no complete index at {path} (need {path.name} and {sidecar.name})")
        try:
            meta = json.loads(sidecar.read_text())
            files = meta.get("files") or {}
            meta["digest"], meta["dim"], meta["params"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(
                f"index sidecar {sidecar} is unreadable ({type(exc).__name__}: {exc}): "
                "rebuild the index (build_store_index)"
            ) from None
        try:
            return cls._load(path, meta, files, expected_digest, use_gpu, features)
        except (StaleIndexError, ParameterError):
            raise
        except Exception as exc:
            raise IntegrityError(
                f"index {path} cannot be read ({type(exc).__name__}: {exc}): rebuild it (build_store_index)"
            ) from None

    @classmethod
    def _load(cls, path: Path, meta: dict, files: dict, expected_digest, use_gpu, features=None) -> TileIndex:
        faiss = _faiss()
        if expected_digest is not None and meta["digest"] != expected_digest:
            raise StaleIndexError(
                f"index {path} was built from features {meta['digest']}, the store now holds {expected_digest}: "
                "rebuild it (build_store_index)"
            )
        params = dict(meta["params"])
        params["use_gpu"] = use_gpu
        self = cls(**params)
        index = faiss.read_index(str(path.parent / files["faiss"]) if "faiss" in files else str(path))
        if index.ntotal != meta.get("n_indexed", meta["n"]) or index.d != meta["dim"]:
            raise StaleIndexError(
                f"index {path} holds {index.ntotal} x {index.d}, its sidecar says "
                f"{meta.get('n_indexed', meta['n'])} x {meta['dim']}: rebuild it"
            )
        self.row_ids_ = None
        if meta.get("has_row_ids"):
            self.row_ids_ = np.load(
                path.parent / files["rows"] if "rows" in files else path.with_suffix(".rows.npy"), allow_pickle=False
            )
        self.spec.configure(self, index)
        self.n_, self.dim_, self.digest_ = meta["n"], meta["dim"], meta["digest"]
        self.build_seconds_ = meta.get("build_seconds", float("nan"))
        self.index_ = self._maybe_gpu(index)
        if meta["has_groups"]:
            with np.load(
                path.parent / files["groups"] if "groups" in files else path.with_suffix(".groups.npz"),
                allow_pickle=False,
            ) as z:
                self.groups_, self.group_values_ = z["codes"].astype(np.int64), z["values"]
            self._group_sizes = np.bincount(self.groups_, minlength=len(self.group_values_))
        else:
            self.groups_, self.group_values_ = None, None
        if features is not None:
            self.attach_features(features)
        return self


# --------------------------------------------------------------------------- store glue


def index_path(store: str | os.PathLike, encoder: str, kind: str) -> Path:
    """Where the ``kind`` index over ``encoder`` features of a store lives: ``<store>.indexes/<encoder>-<kind>.faiss``."""
    from workbench.store import Key, encoder_key

    return Key.index_dir(store) / f"{encoder_key(encoder)}-{kind}.faiss"


def rerank_rows_path(store: str | os.PathLike, encoder: str, kind: str) -> Path:
    """The re-rank copy of a re-ranked (compressed) index: ``<store>.indexes/<encoder>-<kind>.rerank.f16``."""
    return index_path(store, encoder, kind).with_suffix(".rerank.f16")


def write_rerank_rows(feats, path: str | os.PathLike, digest: str, *, block_rows: int = 65536) -> np.memmap:
    """Write a raw float16 copy of ``feats`` (N, d) for the exact re-rank; returns it memory-mapped.

    The store keeps features zstd-compressed in chunks of up to 65,536 rows per slide, so re-scoring ~1,000
    scattered candidates from it decodes a whole chunk per candidate's slide (tens of ms each). The copy is
    one uncompressed row-major file (N x d x 2 bytes on disk; none of it held in memory, the OS page cache
    keeps what queries touch), so the candidates of a query are one sorted gather from one mapping
    (:class:`FeatureRows`). Written to a temporary file and renamed into place; a JSON sidecar
    (``.json`` beside it) records shape, dtype and the features ``digest``.
    """
    from workbench.store import write_json_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, d = int(feats.shape[0]), int(feats.shape[1])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    mm = np.memmap(tmp, dtype=np.float16, mode="w+", shape=(n, d))
    for a in range(0, n, int(block_rows)):
        block = feats[a : a + int(block_rows)]
        mm[a : a + len(block)] = np.asarray(block.compute() if hasattr(block, "compute") else block, np.float16)
    mm.flush()
    del mm
    os.replace(tmp, path)
    write_json_atomic(path.with_suffix(".json"), {"shape": [n, d], "dtype": "float16", "digest": digest})
    return np.memmap(path, dtype=np.float16, mode="r", shape=(n, d))


def open_rerank_rows(path: str | os.PathLike, digest: str, shape) -> np.memmap | None:
    """The re-rank copy at ``path`` (memory-mapped) if it holds the features ``digest`` of ``shape``, else None."""
    path = Path(path)
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        n, d = (int(v) for v in meta["shape"])
        ok = meta.get("digest") == digest and (n, d) == tuple(shape) and path.stat().st_size == n * d * 2
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return np.memmap(path, dtype=np.float16, mode="r", shape=(n, d)) if ok else None


def features_digest(root, encoder: str, ids: list[str] | None = None) -> str:
    """Digest of what an index over a store's ``encoder`` features is built from: per slide its id, shape,
    weights digest and the digest of its feature *values* (kept at write time), the tiles' coords, and each
    slide's exclusion group (patient).

    The features' chunks are checked against what was written (a 4-byte read per chunk): features
    rewritten in place raise :class:`~workbench.errors.StaleError`.
    """
    from workbench import store as st

    ids = st.slide_ids(root) if ids is None else ids
    groups = slide_table(root, ids)["group"].tolist()  # the leave-one-patient-out groups saved with the index
    return hashlib.sha256(
        json.dumps([st.features_digest(root, encoder, ids), st.tiling_digest(root, ids), groups]).encode()
    ).hexdigest()


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
    raise TypeError(
        f"encoder must be a name, have .encode or .preprocess + .model, or be callable; got {type(encoder).__name__}"
    )


@dataclass
class StoreIndex:
    """A :class:`TileIndex` over a store's features, queried by tile id, tile image or slide.

    Row ``i`` of the index is global tile id ``i`` (manifest order). Queries exclude the query's
    own patient (its slide when the patient is unknown) unless ``exclude=None``.
    """

    store: Path
    encoder: str
    index: TileIndex
    slides: object  # pandas DataFrame from slide_table
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

    def _check_tile_ids(self, tile_ids) -> np.ndarray:
        """Global tile ids as int64; ParameterError naming the first id outside [0, N)."""
        arr = np.asarray(tile_ids)
        if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise ParameterError(
                f"tile_ids must be integers (global tile ids), got {arr.dtype} values {arr.ravel()[:5].tolist()}"
            )
        arr = arr.astype(np.int64).ravel()
        n = int(self.slides["n_tiles"].sum())
        bad = arr[(arr < 0) | (arr >= n)]
        if bad.size:
            raise ParameterError(
                f"tile id {int(bad[0])} is out of range: this store has tiles 0..{n - 1} ({bad.size} id(s) outside)"
            )
        return arr

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
        tile_ids = self._check_tile_ids(tile_ids)
        check_int("k", k, 1)
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
        return pd.DataFrame(
            {
                "query": q,
                "rank": r,
                "tile_id": tid,
                "slide_id": s["slide_id"].to_numpy(),
                "tile": tid - s["start"].to_numpy(),
                "score": scores[q, r],
                "site": s["site"].to_numpy(),
                "diagnosis": s["diagnosis"].to_numpy(),
            }
        )

    def read_tiles(self, tile_ids, *, tile_px: int | None = None) -> np.ndarray:
        """Images (n, px, px, 3) uint8 of global tile ids, read from their slides with :class:`TileReader`."""
        from workbench.io.slides import TileReader, open_slide
        from workbench.store import check_slide_file, open_store, read_slide

        tile_ids = self._check_tile_ids(tile_ids)
        check_optional(check_int, "tile_px", tile_px, 8, 4096)
        root = open_store(self.store)
        rows = self.slide_of(tile_ids)
        out = None
        for row in np.unique(rows):
            sid = self.slides["slide_id"].iloc[row]
            info = read_slide(root, sid)
            check_slide_file(root, sid)  # never read pixels of another file at these coordinates
            px = int(tile_px or info["tile_px"])
            sel = np.flatnonzero(rows == row)
            local = tile_ids[sel] - self.slides["start"].iloc[row]
            with (
                open_slide(info["path"], slide_id=sid, mpp=info.get("mpp")) as slide,
                TileReader(slide, tile_px=px, tile_mpp=info["tile_mpp"] * info["tile_px"] / px) as reader,
            ):
                images = reader.read(info["coords"][local])
            if out is None:
                out = np.zeros((len(tile_ids),) + images.shape[1:], np.uint8)
            out[sel] = images
        return out if out is not None else np.zeros((0, tile_px or 224, tile_px or 224, 3), np.uint8)

    def mosaic(
        self,
        slide_id: str,
        *,
        by: str = "colour",
        white_filter: bool = True,
        n_colour: int = 9,
        rate: float = 0.05,
        min_tissue: float = 0.1,
        mpp_5x: float = 2.0,
        random_state: int = 0,
    ) -> np.ndarray:
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
            from workbench.store import check_slide_file

            check_slide_file(root, slide_id)

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

    def query_slide(
        self,
        slide_id: str,
        *,
        k_tiles: int = 20,
        ranking: str = "sish",
        label: str = "diagnosis",
        by: str = "colour",
        white_filter: bool = True,
        max_distance: float | None = None,
        mosaic_ids: np.ndarray | None = None,
    ):
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
        scores, ids = (
            self.query_tiles(mids, k_tiles) if mids.size else (np.empty((0, k_tiles)), np.empty((0, k_tiles), int))
        )
        rows = self.slide_of(ids)
        slide_names = self.slides["slide_id"].to_numpy()
        labels = self.slides[label].to_numpy()
        dist = 1.0 - scores if self.index.metric != "l2" else scores
        value = dist if ranking == "sish" else scores
        near = dist <= (np.inf if max_distance is None else float(max_distance))
        hits = [
            [(slide_names[rw], float(v), labels[rw]) for rw, v, ok in zip(rows[i], value[i], near[i]) if rw >= 0 and ok]
            for i in range(len(ids))
        ]
        if ranking == "sish":
            ranked = sish_rank(hits, label_weights(labels))
        else:
            ranked = mean_similarity_rank(hits)
        self.last_query_seconds_ = time.perf_counter() - t0
        out = pd.DataFrame(
            ranked,
            columns=["slide", "label", "entropy", "distance", "mosaic"]
            if ranking == "sish"
            else ["slide", "label", "score"],
        ).rename(columns={"slide": "slide_id"})
        out.insert(0, "rank", np.arange(len(out)))
        return out


def open_for_index(store, encoder):
    from workbench.store import open_store

    root = open_store(store)
    table = slide_table(root)
    table = table[table["n_tiles"] > 0].reset_index(drop=True)
    # slides without tiles add no rows; starts are recomputed over the slides kept
    table["start"] = np.concatenate([[0], np.cumsum(table["n_tiles"].to_numpy())[:-1]]).astype(np.int64)
    return root, table


def build_store_index(
    store: str | os.PathLike,
    encoder: str,
    kind: str = "flat",
    *,
    save: bool = True,
    exclude: str | None = "patient",
    **params,
) -> StoreIndex:
    """Build (and by default save next to the store) a ``kind`` index over the store's ``encoder`` features.

    ``params`` go to :class:`TileIndex` (nlist, nprobe, M, ef_search, metric, use_gpu, ...).
    """
    from workbench.store import features_array

    store = Path(store)
    root, table = open_for_index(store, encoder)
    ids = list(table["slide_id"])
    feats = features_array(root, encoder, ids)
    groups = np.repeat(table["group"].to_numpy(), table["n_tiles"].to_numpy())
    digest = features_digest(root, encoder, ids)
    source = feats
    if save and kind in KINDS and KINDS[kind].reranked:
        # compressed kinds re-score candidates from an uncompressed copy (see write_rerank_rows); the index is
        # filled from it too (a plain read, no decode)
        source = write_rerank_rows(feats, rerank_rows_path(store, encoder, kind), digest)
    index = TileIndex(kind, **params).fit(source, groups=groups, digest=digest)
    if save:
        path = index.save(index_path(store, encoder, kind))
        _write_file_sums(path)
        log.info("saved %s index of %s to %s", kind, store, path)
    return StoreIndex(store, encoder, index, table, exclude, feats)


def _index_files(path: Path) -> list[Path]:
    """The files of a saved index: ``<name>.faiss`` and its sidecars (``.json``, ``.groups.npz``, ``.rows.npy``)."""
    return [
        p
        for p in (path, path.with_suffix(".json"), path.with_suffix(".groups.npz"), path.with_suffix(".rows.npy"))
        if p.exists()
    ]


def _sum_file(path: Path) -> Path:
    return path.with_suffix(".sha256.json")


def _write_file_sums(path: Path) -> None:
    """Record the sha256 of every file of a saved index (checked by :func:`load_store_index`)."""
    from workbench.store import write_json_atomic

    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in _index_files(path)}
    write_json_atomic(_sum_file(path), sums)


def _check_file_sums(path: Path) -> None:
    """Raise :class:`~workbench.errors.ChecksumError` if a file of a saved index changed since it was saved."""
    from workbench.errors import ChecksumError

    sums_path = _sum_file(path)
    if not sums_path.exists():
        if path.exists():
            raise StaleIndexError(
                f"index {path} has no checksums ({sums_path.name}): it was saved by an older "
                "workbench or its save was interrupted; rebuild it (build_store_index)"
            )
        return
    sums = json.loads(sums_path.read_text())
    for name, want in sums.items():
        f = path.with_name(name)
        if not f.exists() or hashlib.sha256(f.read_bytes()).hexdigest() != want:
            raise ChecksumError(
                f"index file {f} "
                + ("is missing" if not f.exists() else "fails its sha256 checksum")
                + " (the file changed since the index was saved): rebuild it (build_store_index)"
            )


def load_store_index(
    store: str | os.PathLike, encoder: str, kind: str = "flat", *, use_gpu="auto", exclude: str | None = "patient"
) -> StoreIndex:
    """Load the saved ``kind`` index of a store; raises :class:`StaleIndexError` if the features changed."""
    store = Path(store)
    root, table = open_for_index(store, encoder)
    try:
        digest = features_digest(root, encoder, list(table["slide_id"]))
    except StaleError as exc:
        raise StaleIndexError(
            f"index {index_path(store, encoder, kind)} cannot be trusted: {exc}; then rebuild it (build_store_index)"
        ) from exc
    _check_file_sums(index_path(store, encoder, kind))
    index = TileIndex.load(index_path(store, encoder, kind), expected_digest=digest, use_gpu=use_gpu)
    feats = None
    if index.spec.reranked:  # compressed kinds re-rank their candidates exactly from float16 features
        copy = open_rerank_rows(rerank_rows_path(store, encoder, kind), digest, (index.n_, index.dim_))
        if copy is not None:  # the uncompressed copy written with the index: page reads per candidate
            index.attach_features(copy)
        else:
            from workbench.store import features_array

            log.warning(
                "%s has no re-rank copy of its features: candidates are re-scored from the store's compressed "
                "chunks (slow at scale); rebuild the index (build_store_index) to write it",
                index_path(store, encoder, kind),
            )
            feats = features_array(root, encoder, list(table["slide_id"]))
            index.attach_features(feats)
    return StoreIndex(store, encoder, index, table, exclude, feats)
