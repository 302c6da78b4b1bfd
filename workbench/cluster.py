"""Hierarchical k-means over tile embeddings (Vo et al. 2024; Chen et al. 2025), DESIGN.md §4.

Level 1 clusters the embeddings; level l+1 clusters the centroids of level l, so every level-(l+1)
cluster is a set of level-l clusters. Every level runs k-means (greedy k-means++ init with
``2 + ln k`` local trials, ``n_iter`` Lloyd iterations, sums in float64, chunked assignment), then
``resampling_steps`` times: take from every cluster the ``sample_per_cluster`` points closest to its
centroid (or random ones), re-run k-means on that union only, and re-assign all the level's points to
the new centroids. Levels with ``sample_per_cluster <= 1`` skip resampling.

Backends, chosen at run time (:func:`resolve_backend`):

* ``"torch"`` – ours, on CPU or CUDA: assignment by ``‖c‖² − 2·x·cᵀ`` (one float32 matmul per chunk
  with precomputed centroid norms, min/argmin fused), centroid sums by ``index_add_`` in float64,
  counts by ``bincount``; empty clusters are moved to the points farthest from their centroid.
* ``"faiss"`` – ``faiss.Kmeans`` (GPU when faiss-gpu and a device are present), started from the
  same k-means++ centroids, so the trees agree with ours within tolerance.
* ``"cuml"`` – RAPIDS ``cuml.KMeans`` on one GPU, or ``cuml.dask.cluster.KMeans`` over a Dask-CUDA
  cluster when ``client=`` is given to :meth:`HierarchicalKMeans.fit`.
* ``"auto"`` – cuML when it imports and a GPU exists, else torch.

Out of core. ``X`` may be a numpy array, a Dask array (``store.features_array``) or a zarr array.
With ``fit_sample_per_cluster=s`` and more than ``s·k₁`` rows, level 1 is *fitted on a uniform
random sample* of ``s·k₁`` rows (read in one streaming pass), and then *every* row is assigned to the
fitted centroids by streaming chunks from the store (progress bar). We chose this over chunk-by-chunk
Lloyd over the full store because Lloyd needs ``n_iter·(1 + resampling_steps)`` full passes over the
store (≈ 100 passes of 7.7 GB for 10 M × 384 float16 tiles) and k-means++ one pass per centroid,
while the sample fit needs one pass to read the sample plus one pass to assign; with ≥ 50 points per
cluster the centroids are as good for curation (the resampling steps themselves only ever use a few
points per cluster). Memory is bounded by the sample (``s·k₁·d`` float32) plus one chunk.
Without ``fit_sample_per_cluster`` the rows are loaded into memory.

Rows with NaN/Inf features are detected chunk by chunk, reported in the log, excluded from every
fit (never averaged) and labelled ``-1``.

Store glue: :func:`fit_store` writes ``tree/<run>/level_l`` (N,) int32 over the concatenated tiles,
``centroids/level_l`` (k_l, d) float32, ``parents/level_l`` (k_{l-1},) int32 and ``distance``
(N,) float32 (squared distance of each tile to its level-1 centroid) with the parameters in attrs
(no pickle); :func:`load_tree` reads it back as a :class:`Tree`; :func:`export_swissai_csv` writes
the swiss-ai CSV (slide_id, tile_x, tile_y, level_1 … level_L).

Example
-------
>>> import numpy as np
>>> X = np.random.default_rng(0).normal(size=(2000, 16)).astype("float32")
>>> hk = HierarchicalKMeans(levels=[20, 4], backend="torch").fit(X)
>>> hk.point_labels_.shape
(2000, 2)
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "faiss", "cuml")
STRATEGIES = ("closest", "random")


# =========================================================================== chunk I/O


def _n_rows(X) -> int:
    return int(X.shape[0])


def _read_rows(X, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a numpy / Dask / zarr array as float32 numpy."""
    part = X[start:stop]
    if hasattr(part, "compute"):
        part = part.compute()
    return np.asarray(part, dtype=np.float32)


def _iter_chunks(X, chunk_rows: int, *, progress: bool = False, desc: str = "rows"):
    """Yield ``(start, float32 block)`` over the rows of X, reading the next block in a thread."""
    from concurrent.futures import ThreadPoolExecutor

    n = _n_rows(X)
    starts = list(range(0, n, chunk_rows))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=desc, unit="row", unit_scale=True)
    with ThreadPoolExecutor(1) as pool:  # prefetch: I/O + decompression overlap the matmuls
        fut = pool.submit(_read_rows, X, 0, min(chunk_rows, n)) if starts else None
        for i, a in enumerate(starts):
            block = fut.result()
            if i + 1 < len(starts):
                b = starts[i + 1]
                fut = pool.submit(_read_rows, X, b, min(b + chunk_rows, n))
            yield a, block
            if bar is not None:
                bar.update(len(block))
    if bar is not None:
        bar.close()


def _finite_rows(block: np.ndarray) -> np.ndarray:
    return np.isfinite(block).all(axis=1)


def _l2_normalize(block: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return block / np.maximum(norms, 1e-12)


# =========================================================================== torch core


def _torch_device(device):
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_tensor(X, device):
    import torch

    if isinstance(X, torch.Tensor):
        return X.to(device=device, dtype=torch.float32)
    return torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=device)


def _default_chunk(k: int, device) -> int:
    """Rows per assignment chunk: the (rows, k) distance block stays ≈ 32 MB on CPU, 1 GB on GPU."""
    budget = 2 ** 23 if getattr(device, "type", "cpu") == "cpu" else 2 ** 28
    return int(max(256, min(1 << 16, budget // max(k, 1))))


def assign_torch(X, C, *, chunk_size: int | None = None, device=None):
    """Nearest centroid of every row, by chunks.

    Parameters
    ----------
    X : (n, d) float array or tensor
    C : (k, d) float array or tensor
    chunk_size : rows per matmul block (default: keeps the (rows, k) block cache-sized on CPU).

    Returns
    -------
    labels : (n,) int64 tensor, sqdist : (n,) float32 tensor of squared L2 distances (≥ 0).
    """
    import torch

    device = _torch_device(device)
    X, C = _as_tensor(X, device), _as_tensor(C, device)
    n, k = X.shape[0], C.shape[0]
    chunk = chunk_size or _default_chunk(k, device)
    c_sq = (C * C).sum(1).unsqueeze(0)  # (1, k), precomputed once
    Ct = C.t().contiguous()
    labels = torch.empty(n, dtype=torch.int64, device=device)
    dist = torch.empty(n, dtype=torch.float32, device=device)
    for a in range(0, n, chunk):
        x = X[a:a + chunk]
        d = torch.addmm(c_sq, x, Ct, beta=1.0, alpha=-2.0)  # ‖c‖² − 2 x·c, (m, k)
        m, idx = d.min(dim=1)  # fused min + argmin
        labels[a:a + chunk] = idx
        dist[a:a + chunk] = (m + (x * x).sum(1)).clamp_min_(0)
    return labels, dist


def kmeans_plusplus(X, k: int, rng: np.random.Generator, *, n_local_trials: int | None = None, device=None):
    """Greedy k-means++ seeding as scikit-learn: ``2 + ln k`` candidates per step, keep the best.

    Parameters
    ----------
    X : (n, d) float32 array or tensor, n ≥ k
    k : number of centroids
    rng : numpy Generator (all randomness)

    Returns
    -------
    (k, d) float32 tensor of centroids (rows of X).
    """
    import torch

    device = _torch_device(device)
    X = _as_tensor(X, device)
    n = X.shape[0]
    if n < k:
        raise ValueError(f"k-means++ needs at least k={k} points, got {n}")
    t = n_local_trials or 2 + int(math.log(k))
    x_sq = (X * X).sum(1)
    centers = torch.empty((k, X.shape[1]), dtype=X.dtype, device=device)
    first = int(rng.integers(n))
    centers[0] = X[first]
    closest = (x_sq - 2 * X @ X[first] + x_sq[first]).clamp_min_(0)
    pot = float(closest.double().sum())
    for c in range(1, k):
        if pot <= 0:  # fewer distinct points than k: any point will do
            cand = torch.as_tensor(rng.integers(n, size=t), device=device)
        else:
            cum = torch.cumsum(closest.double(), 0)
            r = torch.as_tensor(rng.random(t) * float(cum[-1]), device=device, dtype=torch.float64)
            cand = torch.searchsorted(cum, r).clamp_(max=n - 1)
        Xc = X[cand]
        d = (x_sq.unsqueeze(0) - 2 * Xc @ X.t() + x_sq[cand].unsqueeze(1)).clamp_min_(0)  # (t, n)
        torch.minimum(d, closest.unsqueeze(0), out=d)
        pots = d.double().sum(1)
        best = int(torch.argmin(pots))
        closest = d[best].clone()
        pot = float(pots[best])
        centers[c] = Xc[best]
    return centers


def _init_centroids(X, k, rng, init, device):
    import torch

    if init == "k-means++":
        return kmeans_plusplus(X, k, rng, device=device)
    if init == "random":
        X = _as_tensor(X, device)
        idx = torch.as_tensor(np.sort(rng.choice(X.shape[0], k, replace=False)), device=X.device)
        return X[idx].clone()
    if isinstance(init, np.ndarray) or hasattr(init, "shape"):
        return _as_tensor(init, device).clone()
    raise ValueError(f"init must be 'k-means++', 'random' or a (k, d) array, got {init!r}")


def _segment_sums(x, idx, k: int):
    """(k, d) float32 sums of the rows of x per label, as a CSR (k, m) 0/1 matrix times x.

    Building the CSR from an argsort of the labels and multiplying with the sparse BLAS is ≈ 5x faster
    on CPU than ``index_add_`` (whose scattered writes thrash the cache), and works on CUDA too.
    """
    import warnings

    import torch

    order = torch.argsort(idx)
    crow = torch.zeros(k + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(torch.bincount(idx, minlength=k), 0, out=crow[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        A = torch.sparse_csr_tensor(crow, order, torch.ones(len(idx), dtype=x.dtype, device=x.device),
                                    (k, len(idx)))
        return A @ x


def _assign_accumulate(X, C, *, x_sq=None, chunk_size=None, flush_rows: int = 16384):
    """One pass: nearest centroid of every row and the per-cluster sums and counts of that assignment.

    Sums are accumulated in float32 over at most ``flush_rows`` rows (:func:`_segment_sums`) and
    flushed into a float64 total, so rounding stays at the level of a float32 sum of ≤ 16k values
    while the total over millions of rows is float64.

    Returns
    -------
    labels (n,) int64, sqdist (n,) float32, sums (k, d) float64, counts (k,) int64 – all tensors.
    """
    import torch

    n, d = X.shape
    k = C.shape[0]
    dev = X.device
    chunk = chunk_size or _default_chunk(k, dev)
    c_sq = (C * C).sum(1).unsqueeze(0)
    Ct = C.t().contiguous()
    labels = torch.empty(n, dtype=torch.int64, device=dev)
    dist = torch.empty(n, dtype=torch.float32, device=dev)
    sums = torch.zeros((k, d), dtype=torch.float64, device=dev)
    part = torch.zeros((k, d), dtype=torch.float32, device=dev)
    pending = 0
    for a in range(0, n, chunk):
        x = X[a:a + chunk]
        m, idx = torch.addmm(c_sq, x, Ct, beta=1.0, alpha=-2.0).min(dim=1)
        labels[a:a + chunk] = idx
        xs = (x * x).sum(1) if x_sq is None else x_sq[a:a + chunk]
        dist[a:a + chunk] = (m + xs).clamp_min_(0)
        part += _segment_sums(x, idx, k)
        pending += len(x)
        if pending >= flush_rows or a + chunk >= n:
            sums += part
            part.zero_()
            pending = 0
    counts = torch.bincount(labels, minlength=k)
    return labels, dist, sums, counts


def lloyd_torch(X, C0, *, n_iter: int = 50, chunk_size: int | None = None, device=None):
    """Lloyd iterations from ``C0`` (ours): float32 matmul assignment, float64 sums, empty clusters moved.

    Each iteration is one pass over X (assignment fused with the centroid sums). Stops early once no
    label changes (the result then equals running all ``n_iter``); a final assignment makes the labels
    match the returned centroids.

    Returns
    -------
    C : (k, d) float32 tensor, labels : (n,) int64 tensor, sqdist : (n,) float32 tensor, n_iter : int
    (number of centroid updates).
    """
    import torch

    device = _torch_device(device)
    X = _as_tensor(X, device)
    C = _as_tensor(C0, device).clone()
    n = X.shape[0]
    x_sq = (X * X).sum(1)  # row norms once, not once per iteration
    prev = None
    it = 0
    for step in range(n_iter + 1):
        labels, dist, sums, counts = _assign_accumulate(X, C, x_sq=x_sq, chunk_size=chunk_size)
        if step == n_iter or (prev is not None and bool((labels == prev).all())):
            break  # converged, or the final assignment after the last update
        prev = labels
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            # sklearn's rule: move each empty centroid onto one of the points farthest from its centroid
            far = torch.topk(dist, min(len(empty), n)).indices
            for j, p in zip(empty.tolist(), far.tolist()):
                old = int(labels[p])
                if counts[old] > 1:
                    sums[old] -= X[p].double()
                    counts[old] -= 1
                    sums[j] = X[p].double()
                    counts[j] = 1
            log.debug("lloyd: %d empty clusters relocated", len(empty))
        nonzero = counts > 0
        C[nonzero] = (sums[nonzero] / counts[nonzero].unsqueeze(1).double()).float()
        it += 1
    return C, labels, dist, it


# =========================================================================== backends


def resolve_backend(backend: str = "auto") -> str:
    """``"auto"`` → ``"cuml"`` when cuML imports and a GPU exists, else ``"torch"``; checks the others."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        try:
            import cuml  # noqa: F401
            import torch

            return "cuml" if torch.cuda.is_available() else "torch"
        except ImportError:
            return "torch"
    if backend == "faiss":
        import faiss  # noqa: F401  (clear ImportError if missing)
    if backend == "cuml":
        try:
            import cuml  # noqa: F401
        except ImportError as err:
            raise ImportError("backend='cuml' needs RAPIDS cuML (pip install '.[gpu]')") from err
    return backend


def _kmeans_faiss(X: np.ndarray, C0: np.ndarray, n_iter: int, seed: int):
    import faiss

    n, d = X.shape
    gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    km = faiss.Kmeans(d, len(C0), niter=n_iter, seed=seed, gpu=gpu, verbose=False,
                      max_points_per_centroid=max(n, 1), min_points_per_centroid=1)
    km.train(np.ascontiguousarray(X, np.float32), init_centroids=np.ascontiguousarray(C0, np.float32))
    return np.asarray(km.centroids, np.float32)


def _kmeans_cuml(X: np.ndarray, C0: np.ndarray, n_iter: int, seed: int, client=None):
    if client is not None:  # multi-GPU over a Dask-CUDA cluster
        import cupy
        import dask.array as da
        from cuml.dask.cluster import KMeans

        n_workers = max(1, len(client.scheduler_info()["workers"]))
        Xd = da.from_array(X, chunks=(max(1, -(-len(X) // n_workers)), X.shape[1])).map_blocks(cupy.asarray)
        Xd = client.persist(Xd)
        km = KMeans(client=client, n_clusters=len(C0), init="k-means||", max_iter=n_iter, tol=0.0,
                    random_state=seed)
        km.fit(Xd)
        return np.asarray(km.cluster_centers_, np.float32)
    from cuml.cluster import KMeans

    km = KMeans(n_clusters=len(C0), init=np.ascontiguousarray(C0, np.float32), n_init=1, max_iter=n_iter,
                tol=0.0, random_state=seed, output_type="numpy")
    km.fit(np.ascontiguousarray(X, np.float32))
    return np.asarray(km.cluster_centers_, np.float32)


def kmeans(X, k: int, *, rng: np.random.Generator, init="k-means++", n_iter: int = 50, backend: str = "torch",
           device=None, chunk_size: int | None = None, client=None):
    """One flat k-means on in-memory rows with the chosen backend.

    Returns
    -------
    C : (k, d) float32 numpy, labels : (n,) int64 numpy, sqdist : (n,) float32 numpy, n_iter : int.
    """
    dev = _torch_device(device)
    X = np.ascontiguousarray(X, dtype=np.float32)
    if len(X) < k:
        raise ValueError(f"k-means with k={k} needs at least {k} valid rows, got {len(X)}")
    lvl = logging.INFO if len(X) * k >= 1e8 else logging.DEBUG  # report the big fits only
    t0 = time.perf_counter()
    C0 = _init_centroids(X, k, rng, init, dev)
    log.log(lvl, "k-means k=%d on %d x %d: %s init in %.1f s", k, len(X), X.shape[1], init if isinstance(init, str)
             else "given", time.perf_counter() - t0)
    if backend == "torch":
        t0 = time.perf_counter()
        C, labels, dist, it = lloyd_torch(X, C0, n_iter=n_iter, chunk_size=chunk_size, device=dev)
        log.log(lvl, "k-means k=%d: %d Lloyd iterations in %.1f s", k, it, time.perf_counter() - t0)
        return C.cpu().numpy(), labels.cpu().numpy(), dist.cpu().numpy(), it
    seed = int(rng.integers(2 ** 31 - 1))
    C0 = C0.cpu().numpy()
    if backend == "faiss":
        C = _kmeans_faiss(X, C0, n_iter, seed)
    elif backend == "cuml":
        C = _kmeans_cuml(X, C0, n_iter, seed, client=client)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    labels, dist = assign_torch(X, C, chunk_size=chunk_size, device=dev)
    return C, labels.cpu().numpy(), dist.cpu().numpy(), n_iter


def resample_indices(labels: np.ndarray, sqdist: np.ndarray, k: int, size: int, strategy: str,
                     rng: np.random.Generator) -> np.ndarray:
    """Indices of up to ``size`` points per cluster: the closest to its centroid, or random ones.

    Vectorised: one lexsort by (cluster, key) and each point's rank inside its cluster.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"sample_strategy must be one of {STRATEGIES}, got {strategy!r}")
    key = sqdist if strategy == "closest" else rng.random(len(labels))
    order = np.lexsort((key, labels))
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, np.arange(k))
    rank = np.arange(len(order)) - starts[sorted_labels]
    return np.sort(order[rank < size])


# =========================================================================== the tree


@dataclass
class Tree:
    """A fitted hierarchical k-means tree as plain arrays.

    Attributes
    ----------
    labels : (N, L) int32 – cluster of each point at each level (composed down the tree); -1 = excluded.
    centroids : list of L arrays (k_l, d) float32.
    parents : list of L-1 arrays; ``parents[l-1]`` (k_l,) int32 is the level-(l+1) cluster of each level-l cluster.
    distances : (N,) float32 squared distance of each point to its level-1 centroid (NaN where excluded).
    attrs : parameters and run facts.
    """

    labels: np.ndarray
    centroids: list
    parents: list
    distances: np.ndarray
    attrs: dict = field(default_factory=dict)

    @property
    def n_levels(self) -> int:
        return len(self.centroids)

    def sizes(self, level: int) -> np.ndarray:
        """Points per cluster at ``level`` (1-based), (k_level,) int64."""
        lab = self.labels[:, level - 1]
        return np.bincount(lab[lab >= 0], minlength=len(self.centroids[level - 1]))

    def predict(self, X, *, normalize: bool | None = None, chunk_size: int = 65536, device=None,
                progress: bool = False):
        """Assign new rows down the tree → (n, L) int32 labels (-1 for non-finite rows)."""
        normalize = bool(self.attrs.get("normalize", False)) if normalize is None else normalize
        labels, _ = _assign_stream(X, self.centroids[0], normalize=normalize, chunk_rows=chunk_size,
                                   device=device, progress=progress)
        return compose_labels(labels, self.parents)


def compose_labels(level1: np.ndarray, parents: list) -> np.ndarray:
    """(N,) level-1 labels and the parent maps → (N, L) int32 labels; -1 stays -1."""
    out = np.full((len(level1), len(parents) + 1), -1, dtype=np.int32)
    out[:, 0] = level1
    ok = level1 >= 0
    cur = level1[ok]
    for l, p in enumerate(parents, start=1):
        cur = np.asarray(p)[cur]
        out[ok, l] = cur
    return out


def _assign_stream(X, C, *, normalize, chunk_rows, device, progress, desc="assign"):
    """Stream X in chunks and assign every row to C → (N,) int32 labels (-1 non-finite), (N,) float32 sqdist."""
    n = _n_rows(X)
    labels = np.full(n, -1, dtype=np.int32)
    dist = np.full(n, np.nan, dtype=np.float32)
    dev = _torch_device(device)
    Ct = _as_tensor(C, dev)
    n_bad = 0
    for a, block in _iter_chunks(X, chunk_rows, progress=progress, desc=desc):
        ok = _finite_rows(block)
        n_bad += int((~ok).sum())
        x = block[ok]
        if normalize:
            x = _l2_normalize(x)
        lab, d = assign_torch(x, Ct, device=dev)
        pos = a + np.nonzero(ok)[0]
        labels[pos] = lab.cpu().numpy()
        dist[pos] = d.cpu().numpy()
    if n_bad:
        log.info("%d of %d streamed rows have NaN/Inf features: labelled -1", n_bad, n)
    return labels, dist


def _per_level(value, n_levels: int, name: str) -> list:
    if value is None or np.isscalar(value):
        return [value] * n_levels
    value = list(value)
    if len(value) != n_levels:
        raise ValueError(f"{name} has {len(value)} entries for {n_levels} levels")
    return value


class HierarchicalKMeans:
    """Hierarchical k-means with resampling steps (scikit-learn style estimator).

    Parameters
    ----------
    levels : list of int – clusters per level, bottom (level 1) first, e.g. ``[4096, 256, 16]``.
    resampling_steps : int or list – resampling steps per level (reference: 1, 10, 10, 10).
    sample_per_cluster : int, list or None – points taken per cluster in each resampling step;
        None = half the average cluster size of that level (the reference's rule of thumb).
    sample_strategy : "closest" | "random".
    init : "k-means++" | "random".
    n_iter : Lloyd iterations per k-means (reference: 50).
    normalize : L2-normalise rows first (the cosine variant).
    backend : "auto" | "torch" | "faiss" | "cuml".
    device : torch device for the torch backend and all assignments (default: CUDA if available).
    chunk_size : rows read per streamed chunk (out-of-core paths).
    fit_sample_per_cluster : fit level 1 on a random sample of ``this × k₁`` rows, then assign
        every row by streaming (see the module docstring); None = fit on all rows in memory.
    progress : show a tqdm bar for streamed assignment.
    random_state : int seed; one numpy Generator drives every random choice.

    Attributes
    ----------
    labels_ : list of L arrays; ``labels_[0]`` (N,) int32 over the points (-1 = excluded row),
        ``labels_[l]`` (k_l,) int32 over the level-l centroids.
    point_labels_ : (N, L) int32 composed labels of every point at every level.
    cluster_centers_ : list of L (k_l, d) float32 arrays.
    distances_ : (N,) float32 squared distance of each point to its level-1 centroid.
    n_iter_ : list of L ints, Lloyd iterations of the last k-means of each level.
    n_invalid_ : rows excluded for NaN/Inf features.
    backend_ : backend used; fit_seconds_ : wall time of fit; timings_ : seconds per phase.
    """

    def __init__(self, levels=(64,), *, resampling_steps=1, sample_per_cluster=None, sample_strategy="closest",
                 init="k-means++", n_iter=50, normalize=False, backend="auto", device=None, chunk_size=65536,
                 fit_sample_per_cluster=None, progress=False, random_state=0):
        self.levels = levels
        self.resampling_steps = resampling_steps
        self.sample_per_cluster = sample_per_cluster
        self.sample_strategy = sample_strategy
        self.init = init
        self.n_iter = n_iter
        self.normalize = normalize
        self.backend = backend
        self.device = device
        self.chunk_size = chunk_size
        self.fit_sample_per_cluster = fit_sample_per_cluster
        self.progress = progress
        self.random_state = random_state

    # ------------------------------------------------------------------ params

    def get_params(self) -> dict:
        keys = ["levels", "resampling_steps", "sample_per_cluster", "sample_strategy", "init", "n_iter",
                "normalize", "backend", "device", "chunk_size", "fit_sample_per_cluster", "random_state"]
        out = {}
        for k in keys:
            v = getattr(self, k)
            out[k] = list(v) if isinstance(v, tuple) else (str(v) if k == "device" and v is not None else v)
        return out

    def _validate(self):
        levels = [int(k) for k in self.levels]
        if not levels or min(levels) < 1:
            raise ValueError(f"levels must be a non-empty list of positive cluster counts, got {self.levels!r}")
        if any(b > a for a, b in zip(levels, levels[1:])):
            raise ValueError(f"levels must not grow upwards (level 1 first), got {levels}")
        if self.sample_strategy not in STRATEGIES:
            raise ValueError(f"sample_strategy must be one of {STRATEGIES}, got {self.sample_strategy!r}")
        if self.init not in ("k-means++", "random"):
            raise ValueError(f"init must be 'k-means++' or 'random', got {self.init!r}")
        if int(self.n_iter) < 1:
            raise ValueError(f"n_iter must be >= 1, got {self.n_iter}")
        steps = [int(s) for s in _per_level(self.resampling_steps, len(levels), "resampling_steps")]
        sizes = _per_level(self.sample_per_cluster, len(levels), "sample_per_cluster")
        return levels, steps, sizes, resolve_backend(self.backend)

    # ------------------------------------------------------------------ fit

    def _fit_level(self, X: np.ndarray, k: int, steps: int, size, rng, backend, client):
        """k-means + resampling steps on in-memory rows X → (C, labels, sqdist, n_iter)."""
        kw = dict(rng=rng, init=self.init, n_iter=int(self.n_iter), backend=backend, device=self.device, client=client)
        C, labels, dist, it = kmeans(X, k, **kw)
        size = max(1, len(X) // (2 * k)) if size is None else int(size)
        if size <= 1:
            return C, labels, dist, it
        for step in range(steps):
            idx = resample_indices(labels, dist, k, size, self.sample_strategy, rng)
            if len(idx) < k:
                log.warning("resampling step %d: only %d points for %d clusters; stopping", step + 1, len(idx), k)
                break
            C, _, _, it = kmeans(X[idx], k, **kw)
            lab, d = assign_torch(X, C, device=self.device)
            labels, dist = lab.cpu().numpy(), d.cpu().numpy()
        return C, labels, dist, it

    def fit(self, X, y=None, *, client=None):
        """Fit the tree on X: (N, d) numpy, Dask or zarr array. ``client``: Dask-CUDA client for cuML."""
        levels, steps, sizes, backend = self._validate()
        t0 = time.perf_counter()
        rng = np.random.default_rng(self.random_state)
        n = _n_rows(X)
        chunk = int(self.chunk_size)
        k1 = levels[0]
        s = self.fit_sample_per_cluster
        streamed = s is not None and n > int(s) * k1
        timings = {}
        if streamed:
            m = int(s) * k1
            pick = np.sort(rng.choice(n, m, replace=False))
            Xs = self._gather(X, pick, chunk)
            timings["read_sample"] = time.perf_counter() - t0
            log.info("level 1: fitting %d clusters on a sample of %d of %d rows", k1, len(Xs), n)
            C, _, _, it = self._fit_level(Xs, k1, steps[0], sizes[0], rng, backend, client)
            timings["sample_fit"] = time.perf_counter() - t0 - timings["read_sample"]
            del Xs
            t1 = time.perf_counter()
            labels1, dist1 = _assign_stream(X, C, normalize=self.normalize, chunk_rows=chunk, device=self.device,
                                            progress=self.progress, desc="assign level 1")
            timings["assign"] = time.perf_counter() - t1
        else:
            Xm, ok = self._load(X, chunk)
            timings["load"] = time.perf_counter() - t0
            log.info("level 1: %d clusters on %d rows in memory", k1, len(Xm))
            C, lab, d, it = self._fit_level(Xm, k1, steps[0], sizes[0], rng, backend, client)
            labels1 = np.full(n, -1, np.int32)
            dist1 = np.full(n, np.nan, np.float32)
            labels1[ok], dist1[ok] = lab, d
        self.n_invalid_ = int((labels1 < 0).sum())
        if self.n_invalid_:
            log.warning("%d of %d rows with NaN/Inf features were excluded (label -1)", self.n_invalid_, n)
        centers, labels, iters = [C], [labels1], [it]
        t1 = time.perf_counter()
        for l in range(1, len(levels)):
            Cl, lab, _, it = self._fit_level(centers[-1], levels[l], steps[l], sizes[l], rng, backend, client)
            centers.append(Cl)
            labels.append(lab.astype(np.int32))
            iters.append(it)
        self.cluster_centers_ = [np.asarray(c, np.float32) for c in centers]
        self.labels_ = labels
        self.distances_ = dist1
        self.n_iter_ = iters
        timings["upper"] = time.perf_counter() - t1
        self.timings_ = timings
        self.backend_ = backend
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _gather(self, X, pick: np.ndarray, chunk: int) -> np.ndarray:
        """Rows ``pick`` (sorted) of X, read in one streaming pass; non-finite rows dropped."""
        if isinstance(X, np.ndarray):
            out = np.asarray(X[pick], np.float32)
        else:
            parts = []
            for a, block in _iter_chunks(X, chunk, progress=self.progress, desc="read sample"):
                sel = pick[(pick >= a) & (pick < a + len(block))] - a
                parts.append(block[sel])
            out = np.concatenate(parts) if parts else np.empty((0, X.shape[1]), np.float32)
        out = out[_finite_rows(out)]
        return _l2_normalize(out) if self.normalize else out

    def _load(self, X, chunk: int):
        """All finite rows in memory (float32) and the (N,) finite mask."""
        if isinstance(X, np.ndarray):
            Xm = np.asarray(X, np.float32)
        else:
            Xm = np.empty(X.shape, np.float32)
            for a, block in _iter_chunks(X, chunk, progress=self.progress, desc="load"):
                Xm[a:a + len(block)] = block
        ok = _finite_rows(Xm)
        Xm = Xm[ok] if not ok.all() else Xm
        return (_l2_normalize(Xm) if self.normalize else Xm), ok

    # ------------------------------------------------------------------ results

    def _check_fitted(self):
        if not hasattr(self, "cluster_centers_"):
            raise RuntimeError("HierarchicalKMeans is not fitted: call fit(X) first")

    @property
    def parents_(self) -> list:
        self._check_fitted()
        return self.labels_[1:]

    @property
    def point_labels_(self) -> np.ndarray:
        self._check_fitted()
        return compose_labels(self.labels_[0], self.parents_)

    @property
    def tree_(self) -> Tree:
        self._check_fitted()
        attrs = {**self.get_params(), "backend_used": self.backend_, "n_iter": self.n_iter_,
                 "n_invalid": self.n_invalid_, "fit_seconds": round(self.fit_seconds_, 3)}
        return Tree(self.point_labels_, self.cluster_centers_, self.parents_, self.distances_, attrs)

    def predict(self, X, *, progress: bool = False) -> np.ndarray:
        """Assign new rows down the tree → (n, L) int32 labels (-1 for NaN/Inf rows)."""
        return self.tree_.predict(X, normalize=self.normalize, chunk_size=int(self.chunk_size),
                                  device=self.device, progress=progress)


# =========================================================================== store glue


def _kept_rows(root, ids, counts) -> np.ndarray:
    """(N,) bool: False for tiles flagged by a complete prefilter whose attrs say ``drop=True``."""
    from . import store as st

    keep = np.ones(int(counts.sum()), dtype=bool)
    offset = 0
    for s, c in zip(ids, counts):
        group_key = f"{st.Key.slide(s)}/prefilter"
        if group_key in root:
            for name, arr in root[group_key].arrays():
                a = dict(arr.attrs)
                if a.get("drop", False) and a.get("complete", False):
                    thr = float(a.get("threshold", 0.75))
                    keep[offset:offset + c] &= ~(np.asarray(arr[:], np.float32) >= thr)
        offset += int(c)
    return keep


def fit_store(store_path, encoder: str, run: str, *, client=None, **params) -> Tree:
    """Fit a tree on a store's ``encoder`` features and save it as ``tree/<run>`` (arrays + attrs).

    Tiles flagged by a prefilter saved with ``drop=True`` are left out (label -1), as are NaN/Inf rows.
    ``params`` go to :class:`HierarchicalKMeans`. Returns the :class:`Tree`.
    """
    from . import store as st

    key = st.Key.tree(run)
    root = st.open_store(store_path, mode="r")
    ids = st.slide_ids(root)
    X = st.features_array(root, encoder, ids)
    counts = st.tile_counts(root, ids)
    keep = _kept_rows(root, ids, counts)
    n = len(keep)
    if X.shape[0] != n:
        raise st.StoreError(f"{store_path}: {X.shape[0]} feature rows for {n} tiles of {encoder!r}; re-run embedding")
    if not keep.all():
        log.info("fit_store: %d of %d tiles dropped by prefilters", int((~keep).sum()), n)
        X = X[np.nonzero(keep)[0]]
    hk = HierarchicalKMeans(**params).fit(X, client=client)
    kept = np.nonzero(keep)[0]
    level1 = np.full(n, -1, np.int32)
    dist = np.full(n, np.nan, np.float32)
    level1[kept], dist[kept] = hk.labels_[0], hk.distances_
    tree = hk.tree_
    tree = Tree(compose_labels(level1, tree.parents), tree.centroids, tree.parents, dist,
                {**tree.attrs, "encoder": encoder, "n_tiles": n, "n_dropped_prefilter": int((~keep).sum()),
                 "slide_ids_digest": _digest(ids)})
    with st.write_lock(store_path):
        root = st.open_store(store_path, mode="a")
        g = root.create_group(key, overwrite=True)
        for l in range(tree.n_levels):
            st.write_array(g, f"level_{l + 1}", tree.labels[:, l])
            st.write_array(g, f"centroids/level_{l + 1}", tree.centroids[l].astype(np.float32))
            if l:
                st.write_array(g, f"parents/level_{l}", np.asarray(tree.parents[l - 1], np.int32))
        st.write_array(g, "distance", tree.distances)
        g.attrs.update({"parameters": _jsonable(tree.attrs), "n_levels": tree.n_levels})
        st.mark_complete(g)
    log.info("tree %r: %s clusters over %d tiles in %.1f s", run, [len(c) for c in tree.centroids], n,
             hk.fit_seconds_)
    return tree


def _jsonable(obj):
    """Attrs as plain JSON types (numpy scalars and arrays converted)."""
    import json

    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _digest(ids) -> str:
    import hashlib

    return hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]


def load_tree(store_path, run: str) -> Tree:
    """Read ``tree/<run>`` back as a :class:`Tree`; refuses an incomplete tree or changed slide set."""
    from . import store as st

    root = st.open_store(store_path, mode="r")
    key = st.Key.tree(run)
    if not st.is_complete(root, key):
        raise st.StoreError(f"tree {run!r} is missing or incomplete in {store_path}: run fit_store first")
    g = root[key]
    L = int(g.attrs["n_levels"])
    attrs = dict(g.attrs["parameters"])
    if attrs.get("slide_ids_digest") not in (None, _digest(st.slide_ids(root))):
        raise st.StoreError(f"tree {run!r} was fitted on another set of slides than {store_path} now holds; refit it")
    labels = np.stack([g[f"level_{l + 1}"][:] for l in range(L)], axis=1).astype(np.int32)
    centroids = [g[f"centroids/level_{l + 1}"][:] for l in range(L)]
    parents = [g[f"parents/level_{l}"][:] for l in range(1, L)]
    return Tree(labels, centroids, parents, g["distance"][:], attrs)


def export_swissai_csv(store_path, run: str, path) -> Path:
    """Write the swiss-ai cluster CSV: slide_id, tile_x, tile_y, level_1 … level_L (one row per tile)."""
    from . import store as st

    tree = load_tree(store_path, run)
    root = st.open_store(store_path, mode="r")
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    offset = 0
    with open(tmp, "w") as fh:
        fh.write(",".join(["slide_id", "tile_x", "tile_y"] + [f"level_{l + 1}" for l in range(tree.n_levels)]) + "\n")
        for s in st.slide_ids(root):  # one slide at a time: bounded memory
            import pandas as pd

            xy = root[st.Key.coords(s)][:]
            lab = tree.labels[offset:offset + len(xy)]
            offset += len(xy)
            df = pd.DataFrame({"slide_id": s, "tile_x": xy[:, 0], "tile_y": xy[:, 1]})
            for l in range(tree.n_levels):
                df[f"level_{l + 1}"] = lab[:, l]
            df.to_csv(fh, header=False, index=False)
    tmp.replace(path)
    return path


# =========================================================================== inspection helpers


def cluster_purity(labels: np.ndarray, classes: np.ndarray) -> float:
    """Share of points whose class is the majority class of their cluster (points with label < 0 ignored)."""
    import pandas as pd

    labels, classes = np.asarray(labels), np.asarray(classes)
    ok = labels >= 0
    table = pd.crosstab(labels[ok], pd.Series(classes[ok]).astype(str).to_numpy())
    return float(table.to_numpy().max(axis=1).sum() / max(ok.sum(), 1))


def read_cluster_tiles(store_path, labels: np.ndarray, cluster: int, n: int = 8, *, random_state=0) -> np.ndarray:
    """Up to ``n`` random tiles (n, px, px, 3) uint8 of one cluster, read from the slides with TileReader.

    ``labels`` (N,) cluster of every global tile id at the level of interest.
    """
    from . import store as st
    from .slides import TileReader, open_slide

    root = st.open_store(store_path)
    ids = np.nonzero(np.asarray(labels) == cluster)[0]
    if not len(ids):
        return np.zeros((0, 1, 1, 3), np.uint8)
    pick = np.sort(np.random.default_rng(random_state).choice(ids, min(n, len(ids)), replace=False))
    index = st.tile_index(root).iloc[pick]
    tiling = root.attrs["tiling"]
    out = []
    for sid, rows in index.groupby("slide_id", sort=False):
        info = root[st.Key.slide(sid)].attrs
        with open_slide(info["path"], slide_id=sid, mpp=info.get("mpp")) as slide:
            reader = TileReader(slide, tile_px=int(tiling["tile_px"]), tile_mpp=float(tiling["tile_mpp"]))
            out.append(reader.read(rows[["x", "y"]].to_numpy()))
    return np.concatenate(out)
