"""k-means kernels and backends for :mod:`workbench.curate.cluster` (DESIGN.md §4).

One flat k-means (:func:`kmeans`): k-means|| init by default (:func:`kmeans_parallel`), or full greedy k-means++ (:func:`kmeans_plusplus`, ``2 + ln k`` local
trials), ``n_iter`` Lloyd iterations (group bounds, as Yinyang k-means, skip the rows whose label cannot change:
the same result as assigning every row, :func:`lloyd_torch`), sums in float64, chunked assignment (:func:`assign_torch`);
:func:`resample_indices` picks the points of a resampling step; the chunk I/O helpers stream rows of
numpy / Dask / zarr arrays.

Backends, chosen at run time (:func:`resolve_backend`):

* ``"torch"`` – ours, on CPU or CUDA: assignment by ``‖c‖² − 2·x·cᵀ`` (one float32 matmul per chunk
  with precomputed centroid norms, min/argmin fused), centroid sums as a sparse one-hot (CSR) product accumulated into float64,
  counts by ``bincount``; empty clusters are moved to the points farthest from their centroid.
* ``"faiss"`` – ``faiss.Kmeans`` (GPU when faiss-gpu and a device are present), started from the
  same k-means++ centroids, so the trees agree with ours within tolerance.
* ``"cuml"`` – RAPIDS ``cuml.KMeans`` on one GPU, or ``cuml.dask.cluster.KMeans`` over a Dask-CUDA
  cluster when ``client=`` is given to :meth:`workbench.curate.cluster.HierarchicalKMeans.fit`.
* ``"auto"`` – cuML when it imports and a GPU exists, else torch.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "faiss", "cuml")
STRATEGIES = ("closest", "random")
INITS = ("k-means||", "k-means++", "random")  # k-means|| (default): Bahmani et al. 2012, see kmeans_parallel


# =========================================================================== chunk I/O


def n_rows(X) -> int:
    return int(X.shape[0])


def _read_rows(X, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a numpy / Dask / zarr array as float32 numpy."""
    part = X[start:stop]
    if hasattr(part, "compute"):
        part = part.compute()
    return np.asarray(part, dtype=np.float32)


def iter_chunks(X, chunk_rows: int, *, progress: bool = False, desc: str = "rows"):
    """Yield ``(start, float32 block)`` over the rows of X, reading the next block in a thread."""
    from concurrent.futures import ThreadPoolExecutor

    n = n_rows(X)
    starts = list(range(0, n, chunk_rows))
    bar = None
    if progress:
        from workbench.progress import progress_bar

        bar = progress_bar(total=n, desc=desc, unit="row", unit_scale=True)
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


def finite_rows(block: np.ndarray) -> np.ndarray:
    return np.isfinite(block).all(axis=1)


def l2_normalize(block: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return block / np.maximum(norms, 1e-12)


# =========================================================================== torch core


def torch_device(device):
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def as_tensor(X, device):
    import torch

    if isinstance(X, torch.Tensor):
        return X.to(device=device, dtype=torch.float32)
    return torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=device)


def _default_chunk(k: int, device) -> int:
    """Rows per assignment chunk: the (rows, k) distance block stays ≈ 32 MB on CPU, 1 GB on GPU."""
    budget = 2**23 if getattr(device, "type", "cpu") == "cpu" else 2**28
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

    device = torch_device(device)
    X, C = as_tensor(X, device), as_tensor(C, device)
    n, k = X.shape[0], C.shape[0]
    chunk = chunk_size or _default_chunk(k, device)
    c_sq = (C * C).sum(1).unsqueeze(0)  # (1, k), precomputed once
    Ct = C.t().contiguous()
    labels = torch.empty(n, dtype=torch.int64, device=device)
    dist = torch.empty(n, dtype=torch.float32, device=device)
    for a in range(0, n, chunk):
        x = X[a : a + chunk]
        d = torch.addmm(c_sq, x, Ct, beta=1.0, alpha=-2.0)  # ‖c‖² − 2 x·c, (m, k)
        m, idx = d.min(dim=1)  # fused min + argmin
        labels[a : a + chunk] = idx
        dist[a : a + chunk] = (m + (x * x).sum(1)).clamp_min_(0)
    return labels, dist


def kmeans_plusplus(
    X,
    k: int,
    rng: np.random.Generator,
    *,
    n_local_trials: int | None = None,
    device=None,
    sample_weight=None,
    gram_bytes: int = 2**29,
):
    """Greedy k-means++ seeding as scikit-learn: ``2 + ln k`` candidates per step, keep the best.

    Parameters
    ----------
    X : (n, d) float32 array or tensor, n ≥ k
    k : number of centroids
    rng : numpy Generator (all randomness)
    sample_weight : optional (n,) non-negative weights: the first centre is drawn ∝ w, the next ∝ w·D²
        and the potential is Σ w·D² (what :func:`kmeans_parallel` reclusters its candidates with).
    gram_bytes : when the (n, n) float32 matrix of pairwise distances fits in this many bytes (default
        512 MiB: n ≤ 11,585) it is computed once up front; else each step computes its (t, n) block.

    Returns
    -------
    (k, d) float32 tensor of centroids (rows of X).
    """
    import torch

    device = torch_device(device)
    X = as_tensor(X, device)
    n = X.shape[0]
    if n < k:
        raise ValueError(f"k-means++ needs at least k={k} points, got {n}")
    t = n_local_trials or 2 + int(math.log(k))
    w = (
        None
        if sample_weight is None
        else torch.as_tensor(np.asarray(sample_weight), device=device, dtype=torch.float64)
    )
    x_sq = (X * X).sum(1)
    # Few points (the k-means|| candidates, a seeding subsample): all pairwise squared distances in one
    # matmul, so each greedy step only gathers t rows instead of a thin (t, d)·(d, n) product.
    D = None
    if n * n * 4 <= gram_bytes:
        D = torch.addmm(x_sq.unsqueeze(0), X, X.t(), beta=1.0, alpha=-2.0).add_(x_sq.unsqueeze(1)).clamp_min_(0)

    def sqdist(idx):  # (len(idx), n) squared distances from the rows idx to every row
        if D is not None:
            return D[idx]
        return (x_sq.unsqueeze(0) - 2 * X[idx] @ X.t() + x_sq[idx].unsqueeze(1)).clamp_min_(0)

    centers = torch.empty((k, X.shape[1]), dtype=X.dtype, device=device)
    if w is None:
        first = int(rng.integers(n))
    else:
        cw = torch.cumsum(w, 0)
        first = int(
            torch.searchsorted(
                cw, torch.as_tensor([rng.random() * float(cw[-1])], device=device, dtype=torch.float64)
            ).clamp_(max=n - 1)
        )
    centers[0] = X[first]
    closest = sqdist(torch.as_tensor([first], device=device))[0].clone()
    pot = float((closest.double() if w is None else closest.double() * w).sum())
    for c in range(1, k):
        if pot <= 0:  # fewer distinct points than k: any point will do
            cand = torch.as_tensor(rng.integers(n, size=t), device=device)
        else:
            cum = torch.cumsum(closest.double() if w is None else closest.double() * w, 0)
            r = torch.as_tensor(rng.random(t) * float(cum[-1]), device=device, dtype=torch.float64)
            cand = torch.searchsorted(cum, r).clamp_(max=n - 1)
        d = sqdist(cand)  # (t, n)
        torch.minimum(d, closest.unsqueeze(0), out=d)
        pots = (d.double() if w is None else d.double() * w).sum(1)
        best = int(torch.argmin(pots))
        closest = d[best].clone()
        pot = float(pots[best])
        centers[c] = X[cand[best]]
    return centers


def kmeans_parallel(
    X,
    k: int,
    rng: np.random.Generator,
    *,
    oversampling: float = 1.5,
    rounds: int = 2,
    local_iter: int = 10,
    n_local_trials: int | None = None,
    seed_sample: float = 3,
    chunk_size: int | None = None,
    device=None,
):
    """k-means|| seeding (Bahmani et al. 2012, "Scalable k-means++"), the start Spark MLlib and cuML use,
    with its first candidates from greedy k-means++ on a small uniform subsample.

    1. First candidates: greedy k-means++ (:func:`kmeans_plusplus`) on ``seed_sample · k`` rows drawn
       uniformly (``seed_sample = 0``: one uniform row, as in the paper); ``D²(x)`` = squared distance of
       each row to its nearest candidate (one chunked matmul pass over X).
    2. ``rounds`` times: keep each row independently with probability ``min(1, ℓ·D²(x) / Σ D²)``,
       ``ℓ = oversampling · k`` (≈ ℓ new candidates per round), and update ``D²`` with them (one pass over
       X against the new candidates only). Rows of groups the subsample missed have large D², so they
       are drawn: every row takes part, as in full k-means++.
    3. Weight each candidate by the number of rows nearest to it (tracked during the passes).
    4. Recluster the ≈ ``(1 + rounds·oversampling)·k`` weighted candidates down to k: weighted greedy
       k-means++ then ``local_iter`` weighted Lloyd iterations on the candidates.

    Cost ≈ ``1 + rounds · oversampling`` Lloyd passes over X (defaults: 4) plus work on ≈ 4k candidates,
    against k passes for full k-means++. Defaults chosen on a 250-component Dirichlet(0.5) mixture
    (50k × 384, 20 Lloyd iterations after the start; final inertia relative to full greedy k-means++):
    seed_sample 3, oversampling 1.5, rounds 2 → 1.015; the paper's one-row start with oversampling 1,
    rounds 2 → 1.128, oversampling 2 → 1.029; k-means++ on a 10·k subsample alone → 1.029, 3·k → 1.236.
    Falls back to full greedy k-means++ when X has fewer than ``(1 + rounds·oversampling)·k`` rows.

    Returns
    -------
    (k, d) float32 tensor of centroids.
    """
    import torch

    device = torch_device(device)
    X = as_tensor(X, device)
    n = X.shape[0]
    if n < k:
        raise ValueError(f"k-means|| needs at least k={k} points, got {n}")
    ell = max(1.0, float(oversampling) * k)
    if n <= (1 + rounds * oversampling) * k:
        return kmeans_plusplus(X, k, rng, device=device)
    chunk = chunk_size or _default_chunk(int(ell), device)
    if seed_sample:
        sub = np.sort(rng.choice(n, min(n, int(seed_sample * k)), replace=False))
        S = kmeans_plusplus(X[torch.as_tensor(sub, device=device)], k, rng, device=device)
        owner, closest = assign_torch(X, S, chunk_size=chunk, device=device)
        cand = [None]
        n_cand = k
    else:
        first = int(rng.integers(n))
        cand = [torch.as_tensor([first], device=device)]
        closest = ((X - X[first]) ** 2).sum(1)
        owner = torch.zeros(n, dtype=torch.int64, device=device)
        n_cand = 1
    for _ in range(int(rounds)):
        phi = float(closest.double().sum())
        if phi <= 0:
            break
        p = (closest.double() * (ell / phi)).cpu().numpy()
        new = np.flatnonzero(rng.random(n) < p)
        if new.size == 0:
            continue
        new_t = torch.as_tensor(new, device=device)
        lab, dist = assign_torch(X, X[new_t], chunk_size=chunk, device=device)
        better = dist < closest
        closest = torch.where(better, dist, closest)
        owner = torch.where(better, lab + n_cand, owner)
        cand.append(new_t)
        n_cand += len(new)
    Cc = torch.cat(([S] if seed_sample else []) + [X[i] for i in cand if i is not None])
    w = torch.bincount(owner, minlength=n_cand).double()
    if n_cand <= k:  # too few candidates (near-duplicate data): top up with random rows
        extra = torch.as_tensor(rng.choice(n, k - n_cand, replace=False), device=device)
        return torch.cat([Cc, X[extra]]).clone()
    C = kmeans_plusplus(Cc, k, rng, device=device, sample_weight=w.cpu().numpy(), n_local_trials=n_local_trials)
    for _ in range(int(local_iter)):  # weighted Lloyd on the candidates
        lab, _ = assign_torch(Cc, C, device=device)
        sums = torch.zeros((k, Cc.shape[1]), dtype=torch.float64, device=device)
        sums.index_add_(0, lab, Cc.double() * w.unsqueeze(1))
        mass = torch.zeros(k, dtype=torch.float64, device=device).index_add_(0, lab, w)
        ok = mass > 0
        C[ok] = (sums[ok] / mass[ok].unsqueeze(1)).float()
    return C


def _init_centroids(X, k, rng, init, device):
    import torch

    if init == "k-means||":
        return kmeans_parallel(X, k, rng, device=device)
    if init == "k-means++":
        return kmeans_plusplus(X, k, rng, device=device)
    if init == "random":
        X = as_tensor(X, device)
        idx = torch.as_tensor(np.sort(rng.choice(X.shape[0], k, replace=False)), device=X.device)
        return X[idx].clone()
    if isinstance(init, np.ndarray) or hasattr(init, "shape"):
        return as_tensor(init, device).clone()
    raise ValueError(f"init must be one of {INITS} or a (k, d) array, got {init!r}")


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
        A = torch.sparse_csr_tensor(crow, order, torch.ones(len(idx), dtype=x.dtype, device=x.device), (k, len(idx)))
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
        x = X[a : a + chunk]
        m, idx = torch.addmm(c_sq, x, Ct, beta=1.0, alpha=-2.0).min(dim=1)
        labels[a : a + chunk] = idx
        xs = (x * x).sum(1) if x_sq is None else x_sq[a : a + chunk]
        dist[a : a + chunk] = (m + xs).clamp_min_(0)
        part += _segment_sums(x, idx, k)
        pending += len(x)
        if pending >= flush_rows or a + chunk >= n:
            sums += part
            part.zero_()
            pending = 0
    counts = torch.bincount(labels, minlength=k)
    return labels, dist, sums, counts


def _relocate_empty(X, labels, dist, sums, counts) -> list[tuple[int, int]]:
    """sklearn's rule: move each empty centroid onto one of the rows farthest from their centroid (in place:
    the row's sums and count move to the empty cluster). Returns the ``(row, cluster)`` pairs moved."""
    import torch

    empty = torch.nonzero(counts == 0).flatten()
    moved = []
    if len(empty):
        far = torch.topk(dist, min(len(empty), len(dist))).indices
        for j, p in zip(empty.tolist(), far.tolist()):
            old = int(labels[p])
            if counts[old] > 1:
                sums[old] -= X[p].double()
                counts[old] -= 1
                sums[j] = X[p].double()
                counts[j] = 1
                moved.append((p, j))
        log.debug("lloyd: %d empty clusters relocated", len(empty))
    return moved


def _lloyd_plain(X, C, x_sq, n_iter, chunk_size):
    """Lloyd iterations, every row against every centroid each iteration (the reference for the bounded loop)."""
    prev = None
    it = 0
    for step in range(n_iter + 1):
        labels, dist, sums, counts = _assign_accumulate(X, C, x_sq=x_sq, chunk_size=chunk_size)
        if step == n_iter or (prev is not None and bool((labels == prev).all())):
            break  # converged, or the final assignment after the last update
        prev = labels
        _relocate_empty(X, labels, dist, sums, counts)
        nonzero = counts > 0
        C[nonzero] = (sums[nonzero] / counts[nonzero].unsqueeze(1).double()).float()
        it += 1
    return C, labels, dist, it


def _sqdist_to_own(X, C, labels, rows=None, chunk: int = 16384):
    """Exact ``‖x − c_label(x)‖²`` by direct differences (no cancellation), for ``rows`` (default all)."""
    import torch

    m = X.shape[0] if rows is None else len(rows)
    out = torch.empty(m, dtype=torch.float32, device=X.device)
    for a in range(0, m, chunk):
        if rows is None:
            diff = X[a : a + chunk] - C.index_select(0, labels[a : a + chunk])
        else:
            r = rows[a : a + chunk]
            diff = X.index_select(0, r).sub_(C.index_select(0, labels.index_select(0, r)))
        out[a : a + chunk] = diff.square_().sum(1)
    return out


def _group_min(d, groups: int):
    """(m, groups) minima of the columns of ``d`` (m, k) over ``groups`` contiguous column blocks whose sizes
    differ by at most one (the first ``k mod groups`` blocks are one longer): two reshapes, no scatter."""
    import torch

    m, k = d.shape
    size, extra = divmod(k, groups)
    head = extra * (size + 1)
    parts = [d[:, :head].reshape(m, extra, size + 1).amin(2)] if extra else []
    if groups > extra:
        parts.append(d[:, head:].reshape(m, groups - extra, size).amin(2))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _assign_groups(X, C, x_sq, groups: int = 1, rows=None, chunk_size=None):
    """Nearest centroid of ``rows`` (default all), its squared distance, and per group of centroids the smallest
    squared distance to a centroid of the group other than the nearest (expansion formula).

    Groups are the blocks of :func:`_group_min`. With several groups the centroids are laid out padded to
    ``groups × ceil(k / groups)`` slots (padding slots have infinite norm, so they never win), which makes each
    distance block a (rows, groups, size) view: one reduction gives every group's minimum, and only the nearest
    group's ``size`` columns are looked at again for the nearest centroid and the runner-up in its group.

    Returns labels (m,) int64, d1 (m,) float32, dg (m, groups) float32 (``inf`` for a group with no other
    centroid; with ``groups = 1``, ``dg`` is the second-nearest distance).
    """
    import torch

    k, dim = C.shape
    dev = X.device
    m = X.shape[0] if rows is None else len(rows)
    size, extra = divmod(k, groups)
    width = size + (1 if extra else 0)  # slots per group
    if groups > 1:
        starts = torch.as_tensor(
            [g * size + min(g, extra) for g in range(groups)], device=dev, dtype=torch.int64
        )  # first centroid of each group
        lens = torch.as_tensor([size + (1 if g < extra else 0) for g in range(groups)], device=dev)
        r = torch.arange(width, device=dev)
        slot_ok = (r.unsqueeze(0) < lens.unsqueeze(1)).flatten()  # (groups·width,)
        slot_c = (starts.unsqueeze(1) + r.unsqueeze(0)).flatten().clamp_(max=k - 1)
        Cp = torch.zeros((groups * width, dim), dtype=C.dtype, device=dev)
        Cp[slot_ok] = C[slot_c[slot_ok]]
        c_sq = torch.full((1, groups * width), float("inf"), dtype=C.dtype, device=dev)
        c_sq[0, slot_ok] = (C * C).sum(1)[slot_c[slot_ok]]
        Ct = Cp.t().contiguous()
    else:
        c_sq = (C * C).sum(1).unsqueeze(0)
        Ct = C.t().contiguous()
    chunk = chunk_size or _default_chunk(Ct.shape[1], dev)
    labels = torch.empty(m, dtype=torch.int64, device=dev)
    d1 = torch.empty(m, dtype=torch.float32, device=dev)
    dg = torch.empty((m, groups), dtype=torch.float32, device=dev)
    for a in range(0, m, chunk):
        if rows is None:
            x, xs = X[a : a + chunk], x_sq[a : a + chunk]
        else:
            rr = rows[a : a + chunk]
            x, xs = X[rr], x_sq[rr]
        d = torch.addmm(c_sq, x, Ct, beta=1.0, alpha=-2.0)
        if groups == 1:
            m1, i1 = d.min(dim=1)
            d.scatter_(1, i1.unsqueeze(1), float("inf"))
            g = d.min(dim=1, keepdim=True).values
        else:
            dv = d.view(len(x), groups, width)
            g = dv.amin(2)  # (rows, groups)
            gi = g.argmin(1)  # the nearest centroid's group
            ar = torch.arange(len(x), device=dev)
            sub = dv[ar, gi]  # (rows, width) copy
            m1, a1 = sub.min(1)
            sub[ar, a1] = float("inf")
            g[ar, gi] = sub.min(1).values  # runner-up within its own group
            i1 = slot_c[gi * width + a1]
        labels[a : a + chunk] = i1
        d1[a : a + chunk] = (m1 + xs).clamp_min_(0)
        dg[a : a + chunk] = (g + xs.unsqueeze(1)).clamp_min_(0)
    return labels, d1, dg


def _segment_sums_all(X, labels, k: int, flush_rows: int = 16384):
    """(k, d) float64 sums of the rows per label: float32 partial sums of ≤ ``flush_rows`` rows, flushed to float64."""
    import torch

    sums = torch.zeros((k, X.shape[1]), dtype=torch.float64, device=X.device)
    for a in range(0, X.shape[0], flush_rows):
        sums += _segment_sums(X[a : a + flush_rows], labels[a : a + flush_rows], k)
    return sums


def _lloyd_bounded(X, C, x_sq, n_iter, chunk_size, stats, groups=None):
    """Lloyd iterations with group bounds (Hamerly 2010; Ding et al. 2015, "Yinyang k-means"): exact, fewer distances.

    The centroids are cut into ``groups`` blocks of consecutive indices (default ``min(64, k // 10)``, at least 1;
    one group is Hamerly's algorithm). Each row keeps an upper bound ``u`` on its distance to its own centroid and,
    per group, a lower bound on its distance to any other centroid of the group. After an update that moves
    centroid j by δ_j, ``u += δ_own`` and each group's bound drops by the largest δ in that group; a row whose
    ``u`` is below all its group bounds provably keeps its label, so it is skipped. (After the first iterations
    most centroids stop moving, so most groups' bounds do not drop at all.) The others get ``u`` tightened to the
    exact distance (O(d) per row) and, if still in doubt, a full row of centroid distances (matmul on those rows
    only), which renews all their bounds. Centroid sums and counts are updated by the rows that changed label
    (float64).

    Float32 rounding is covered by widening the bounds: distances from the expansion formula get an error
    allowance of ``2⁻¹⁶·(‖x‖² + max‖c‖²)`` in squared units, drifts and exact distances a relative ``10⁻⁶``. So
    the labels after each iteration are those a full assignment gives (up to exact float ties), and the loop
    makes the same number of updates as :func:`_lloyd_plain`, stopping at the same iteration.
    """
    import torch

    n, k = X.shape[0], C.shape[0]
    G = max(1, min(64, k // 10)) if groups is None else max(1, min(int(groups), k))
    rel = 1.0 + 1e-6

    def widened(d1, dg, rows=None):
        """(upper, lower) bounds from squared distances of the expansion formula, widened by its error allowance."""
        xs = x_sq if rows is None else x_sq[rows]
        e = (xs + float((C * C).sum(1).max())) * 2.0**-16
        return (d1 + e).sqrt_(), (dg - e.unsqueeze(1)).clamp_min_(0).sqrt_()

    labels, d1, dg = _assign_groups(X, C, x_sq, G, chunk_size=chunk_size)
    upper, lower = widened(d1, dg)  # (n,), (n, G)
    sums = _segment_sums_all(X, labels, k)
    counts = torch.bincount(labels, minlength=k)
    recomputed = [n]
    it = 0
    for _ in range(n_iter):
        before = None  # labels before a relocation: convergence is judged against them, as in the plain loop
        if bool((counts == 0).any()):
            before = labels.clone()
            exact = _sqdist_to_own(X, C, labels)
            for p, j in _relocate_empty(X, labels, exact, sums, counts):
                labels[p] = j
                lower[p] = 0.0  # its bounds no longer hold: its label is recomputed next
        nonzero = counts > 0
        C_new = C.clone()
        C_new[nonzero] = (sums[nonzero] / counts[nonzero].unsqueeze(1).double()).float()
        drift = (C_new - C).pow_(2).sum(1).sqrt_() * rel
        C = C_new
        it += 1
        upper += drift[labels]
        if k > 1:
            if G == 1:  # Hamerly: the largest drift of another centroid
                top, arg = torch.topk(drift, 2)
                lower -= torch.where(labels == arg[0], top[1], top[0]).unsqueeze(1)
            else:
                lower -= _group_min(-drift.unsqueeze(0), G).neg_()  # each group's largest drift
        need = torch.nonzero(upper >= lower.min(dim=1).values).flatten()
        changed = 0
        if len(need) > n // 2:  # most rows in doubt (early iterations, no structure): one plain pass over all
            new, n1, ng = _assign_groups(X, C, x_sq, G, chunk_size=chunk_size)
            changed = int((new != labels).sum())
            labels = new
            sums = _segment_sums_all(X, labels, k)
            counts = torch.bincount(labels, minlength=k)
            upper, lower = widened(n1, ng)
            recomputed.append(n)
        else:
            if len(need):  # tighten u to the exact distance, test again
                upper[need] = _sqdist_to_own(X, C, labels, need).sqrt_() * rel
                need = need[upper[need] >= lower[need].min(dim=1).values]
            if len(need):
                new, n1, ng = _assign_groups(X, C, x_sq, G, rows=need, chunk_size=chunk_size)
                old = labels[need]
                moved = torch.nonzero(new != old).flatten()
                changed = len(moved)
                if changed:
                    xm = X[need[moved]].double()
                    sums.index_add_(0, old[moved], -xm)
                    sums.index_add_(0, new[moved], xm)
                    counts += torch.bincount(new[moved], minlength=k) - torch.bincount(old[moved], minlength=k)
                    labels[need] = new
                upper[need], lower[need] = widened(n1, ng, need)
            recomputed.append(len(need))
        if before is not None:
            changed = int((labels != before).sum())
        if changed == 0:
            break  # converged: the next update would leave every centroid where it is
    if stats is not None:
        stats["rows_recomputed"] = recomputed
        stats["distance_fraction"] = sum(recomputed) / (n * len(recomputed))
        stats["groups"] = G
    return C, labels, _sqdist_to_own(X, C, labels), it


def lloyd_torch(
    X,
    C0,
    *,
    n_iter: int = 50,
    chunk_size: int | None = None,
    device=None,
    bounds: bool = True,
    stats: dict | None = None,
    groups: int | None = None,
):
    """Lloyd iterations from ``C0`` (ours): float32 matmul assignment, float64 sums, empty clusters moved.

    ``bounds=True`` (default) skips the rows whose label provably cannot change (group bounds over ``groups``
    blocks of centroids, default ``min(64, k // 10)``; ``groups=1`` is Hamerly's algorithm; :func:`_lloyd_bounded`); ``bounds=False`` assigns every row each iteration (one fused pass: assignment and
    centroid sums). Both make the same updates and stop early once no label changes (the result then equals
    running all ``n_iter``); the labels match the returned centroids. ``stats`` (a dict) receives, for the
    bounded loop, the rows given a full distance row per pass (``rows_recomputed``) and their share
    (``distance_fraction``).

    Returns
    -------
    C : (k, d) float32 tensor, labels : (n,) int64 tensor, sqdist : (n,) float32 tensor, n_iter : int
    (number of centroid updates).
    """
    device = torch_device(device)
    X = as_tensor(X, device)
    C = as_tensor(C0, device).clone()
    x_sq = (X * X).sum(1)  # row norms once, not once per iteration
    if bounds:
        return _lloyd_bounded(X, C, x_sq, n_iter, chunk_size, stats, groups)
    return _lloyd_plain(X, C, x_sq, n_iter, chunk_size)


# =========================================================================== backends


def resolve_backend(backend: str = "auto") -> str:
    """``"auto"`` → ``"cuml"`` when cuML imports and a GPU exists, else ``"torch"``; checks the others."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        try:
            import cuml
            import torch

            return "cuml" if torch.cuda.is_available() else "torch"
        except ImportError:
            return "torch"
    if backend == "faiss":
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
        import faiss  # noqa: F401  (clear ImportError if missing)
    if backend == "cuml":
        try:
            import cuml  # noqa: F401
        except ImportError as err:
            raise ImportError("backend='cuml' needs RAPIDS cuML (pip install '.[gpu]')") from err
    return backend


def _kmeans_faiss(X: np.ndarray, C0: np.ndarray, n_iter: int, seed: int):
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines are noise in notebooks
    import faiss

    n, d = X.shape
    gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    km = faiss.Kmeans(
        d,
        len(C0),
        niter=n_iter,
        seed=seed,
        gpu=gpu,
        verbose=False,
        max_points_per_centroid=max(n, 1),
        min_points_per_centroid=1,
    )
    km.train(np.ascontiguousarray(X, np.float32), init_centroids=np.ascontiguousarray(C0, np.float32))
    return np.asarray(km.centroids, np.float32)


def array_module(x):
    """The array module of ``x``: ``cupy`` for CuPy (device) arrays, else ``numpy`` (dispatch, no import of cupy
    unless ``x`` is one)."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def to_host(x) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array (``np.asarray`` refuses CuPy arrays: no implicit device copies)."""
    xp = array_module(x)
    return np.asarray(x.get() if xp is not np else x)


def _kmeans_cuml_dask(X: np.ndarray, C0: np.ndarray, n_iter: int, seed: int, client, *, xp=None, KMeans=None):
    """Multi-GPU k-means with ``cuml.dask.cluster.KMeans`` started from the given centroids ``C0``.

    The rows go to the workers as device blocks (``xp.asarray`` per block; ``xp`` is cupy) and stay there; the
    initial centroids are handed to cuML as a device array (``init=C0``, one run), so the tree's k-means++ /
    resampling seeds are what cuML refines; only the final centroids come back to the host. ``xp`` and
    ``KMeans`` can be given (NumPy and a stand-in) to test the plumbing without a GPU.
    """
    import dask.array as da

    if xp is None:
        import cupy as xp
    if KMeans is None:
        from cuml.dask.cluster import KMeans
    n_workers = max(1, len(client.scheduler_info()["workers"]))
    rows = max(1, -(-len(X) // n_workers))
    Xd = da.from_array(np.ascontiguousarray(X, np.float32), chunks=(rows, X.shape[1]))
    Xd = client.persist(Xd.map_blocks(xp.asarray, dtype=np.float32, meta=xp.empty((0, X.shape[1]), np.float32)))
    km = KMeans(
        client=client,
        n_clusters=len(C0),
        init=xp.asarray(np.ascontiguousarray(C0, np.float32)),
        n_init=1,
        max_iter=int(n_iter),
        tol=0.0,
        random_state=seed,
    )
    km.fit(Xd)
    return to_host(km.cluster_centers_).astype(np.float32)


def _kmeans_cuml(X: np.ndarray, C0: np.ndarray, n_iter: int, seed: int, client=None):
    if client is not None:  # multi-GPU over a Dask-CUDA cluster
        return _kmeans_cuml_dask(X, C0, n_iter, seed, _as_client(client))
    from cuml.cluster import KMeans

    km = KMeans(
        n_clusters=len(C0),
        init=np.ascontiguousarray(C0, np.float32),
        n_init=1,
        max_iter=n_iter,
        tol=0.0,
        random_state=seed,
        output_type="numpy",
    )
    km.fit(np.ascontiguousarray(X, np.float32))
    return to_host(km.cluster_centers_).astype(np.float32)


def kmeans(
    X,
    k: int,
    *,
    rng: np.random.Generator,
    init="k-means||",
    n_iter: int = 50,
    backend: str = "torch",
    device=None,
    chunk_size: int | None = None,
    client=None,
    bounds: bool = True,
    stats: dict | None = None,
):
    """One flat k-means on in-memory rows with the chosen backend.

    ``bounds`` and ``stats`` go to :func:`lloyd_torch` (torch backend: Hamerly's bounds on by default, exact);
    ``stats`` also receives ``init_s`` and ``lloyd_s`` (seconds).

    Returns
    -------
    C : (k, d) float32 numpy, labels : (n,) int64 numpy, sqdist : (n,) float32 numpy, n_iter : int.
    """
    dev = torch_device(device)
    X = np.ascontiguousarray(X, dtype=np.float32)
    if len(X) < k:
        raise ValueError(f"k-means with k={k} needs at least {k} valid rows, got {len(X)}")
    lvl = logging.INFO if len(X) * k >= 1e8 else logging.DEBUG  # report the big fits only
    t0 = time.perf_counter()
    C0 = _init_centroids(X, k, rng, init, dev)
    if stats is not None:
        stats["init_s"] = time.perf_counter() - t0
    log.log(
        lvl,
        "k-means k=%d on %d x %d: %s init in %.1f s",
        k,
        len(X),
        X.shape[1],
        init if isinstance(init, str) else "given",
        time.perf_counter() - t0,
    )
    if backend == "torch":
        t0 = time.perf_counter()
        C, labels, dist, it = lloyd_torch(
            X, C0, n_iter=n_iter, chunk_size=chunk_size, device=dev, bounds=bounds, stats=stats
        )
        if stats is not None:
            stats["lloyd_s"] = time.perf_counter() - t0
        log.log(lvl, "k-means k=%d: %d Lloyd iterations in %.1f s", k, it, time.perf_counter() - t0)
        return C.cpu().numpy(), labels.cpu().numpy(), dist.cpu().numpy(), it
    seed = int(rng.integers(2**31 - 1))
    C0 = C0.cpu().numpy()
    if backend == "faiss":
        C = _kmeans_faiss(X, C0, n_iter, seed)
    elif backend == "cuml":
        C = _kmeans_cuml(X, C0, n_iter, seed, client=client)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    labels, dist = assign_torch(X, C, chunk_size=chunk_size, device=dev)
    return C, labels.cpu().numpy(), dist.cpu().numpy(), n_iter


def resample_indices(
    labels: np.ndarray, sqdist: np.ndarray, k: int, size: int, strategy: str, rng: np.random.Generator
) -> np.ndarray:
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


# =========================================================================== Dask: assignment and updates over chunks


def _as_client(client):
    """A ``distributed.Client`` from a client, a scheduler address string (``"tcp://host:8786"``) or a cluster
    object (LocalCluster, dask-jobqueue's SLURMCluster, dask-cuda's LocalCUDACluster)."""
    from distributed import Client

    if isinstance(client, Client):
        return client
    if isinstance(client, str) or hasattr(client, "scheduler_address"):
        return Client(client)
    raise TypeError(
        f"client must be a distributed.Client, a scheduler address or a cluster, not {type(client).__name__}"
    )


# Rows per matmul block of the chunk kernel on CPU: the (rows, k) float32 distance block stays ≈ 4 MB (L2/L3
# sized). 32 MB blocks (``_default_chunk``) ran the same matmul 2x slower on the 2-core benchmark machine.
_BLOCK_FLOATS_CPU = 1 << 20


def _float32_rows(block, dev):
    """A block (numpy of any float dtype, or a tensor) as a float32 tensor on ``dev``.

    float16 store rows are widened by torch (vectorised F16C), not numpy's slower scalar cast.
    """
    import torch

    if isinstance(block, torch.Tensor):
        return block.to(device=dev, dtype=torch.float32)
    x = np.ascontiguousarray(block)
    if x.dtype not in (np.float16, np.float32, np.float64):
        x = x.astype(np.float32)
    return torch.from_numpy(x).to(device=dev, dtype=torch.float32)


def block_partials(block, C, normalize: bool = False, *, device=None) -> dict:
    """Assignment of one block of rows to centroids ``C`` and its partial k-means statistics.

    The unit of work of :func:`assign_chunks` (one call per chunk of the store, local or on a Dask worker).
    Non-finite rows get label -1 and take no part in the sums. One pass over the block: float16 rows widened
    by torch, row norms computed once (they give the finiteness test and ``‖x‖²`` of the distances), the
    ``‖c‖² − 2·x·cᵀ`` matmul in cache-sized row blocks with a fused min/argmin, sums as a sparse one-hot
    product of ≤ 16k rows added into float64.

    Returns
    -------
    dict with ``labels`` (m,) int32, ``sqdist`` (m,) float32 (NaN for non-finite rows), ``counts`` (k,) int64,
    ``sums`` (k, d) float64 (of the normalised rows when ``normalize``), ``inertia`` float (float64 sum of
    sqdist), ``bad`` (number of non-finite rows).
    """
    import torch

    dev = torch_device(device)  # CUDA on a dask-cuda worker, else CPU
    x = _float32_rows(block, dev)
    Ct = _float32_rows(C, dev)
    k, d = Ct.shape
    m_rows = x.shape[0]
    norms = torch.linalg.vector_norm(x, dim=1)
    ok = torch.isfinite(norms)
    suspect = torch.nonzero(~ok).flatten()
    if len(suspect):  # a non-finite norm may also come from huge finite values: test those rows exactly
        ok[suspect] = torch.isfinite(x[suspect]).all(1)
    all_ok = bool(ok.all())
    if not all_ok:
        x, norms = x[ok], norms[ok]
    if normalize:
        x = x / norms.clamp_min(1e-12).unsqueeze(1)
        xsq = (x * x).sum(1)
    else:
        xsq = norms.square()
    c_sq = (Ct * Ct).sum(1).unsqueeze(0)
    Ct = Ct.t().contiguous()
    n = x.shape[0]
    rows = int(max(256, (_BLOCK_FLOATS_CPU if dev.type == "cpu" else 1 << 28) // max(k, 1)))
    lab = torch.empty(n, dtype=torch.int64, device=dev)
    dist = torch.empty(n, dtype=torch.float32, device=dev)
    for a in range(0, n, rows):
        mn, idx = torch.addmm(c_sq, x[a : a + rows], Ct, beta=1.0, alpha=-2.0).min(dim=1)
        lab[a : a + rows] = idx
        dist[a : a + rows] = (mn + xsq[a : a + rows]).clamp_min_(0)
    sums = torch.zeros((k, d), dtype=torch.float64, device=dev)
    for a in range(0, n, 16384):  # float32 partial sums of ≤ 16k rows, totals in float64
        sums += _segment_sums(x[a : a + 16384], lab[a : a + 16384], k)
    labels = np.full(m_rows, -1, np.int32)
    sq = np.full(m_rows, np.nan, np.float32)
    if all_ok:
        labels[:], sq[:] = lab.cpu().numpy(), dist.cpu().numpy()
    else:
        okn = ok.cpu().numpy()
        labels[okn], sq[okn] = lab.cpu().numpy(), dist.cpu().numpy()
    return {
        "labels": labels,
        "sqdist": sq,
        "counts": torch.bincount(lab, minlength=k).cpu().numpy().astype(np.int64),
        "sums": sums.cpu().numpy(),
        "inertia": float(dist.double().sum()),
        "bad": int(m_rows - n),
    }


def _reduce_partials(parts: list) -> dict:
    """Counts, sums, inertia of a list of :func:`block_partials` results, added in list order."""
    out = {
        "counts": parts[0]["counts"].copy(),
        "sums": parts[0]["sums"].copy(),
        "inertia": parts[0]["inertia"],
        "bad": parts[0]["bad"],
    }
    for p in parts[1:]:
        out["counts"] += p["counts"]
        out["sums"] += p["sums"]
        out["inertia"] += p["inertia"]
        out["bad"] += p["bad"]
    return out


def _stats_only(p: dict) -> dict:
    return {k: v for k, v in p.items() if k not in ("labels", "sqdist")}


def _chunk_bounds(X, chunk_rows: int | None) -> list[tuple[int, int]]:
    """Row ranges of X's chunks: its own (Zarr/Dask) row chunks, or ``chunk_rows`` blocks."""
    n = n_rows(X)
    if chunk_rows is None:
        if hasattr(X, "chunks") and isinstance(X.chunks, tuple) and X.chunks and isinstance(X.chunks[0], tuple):
            sizes = X.chunks[0]  # Dask: ((rows...), (d,))
            edges = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
            return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
        if hasattr(X, "chunks") and isinstance(X.chunks, tuple) and X.chunks:
            chunk_rows = int(X.chunks[0])  # Zarr
        else:
            chunk_rows = 65536
    return [(a, min(a + int(chunk_rows), n)) for a in range(0, n, int(chunk_rows))]


def _read_block(X, a: int, b: int) -> np.ndarray:
    """Rows ``a:b`` in their stored dtype (float16 stays float16: :func:`block_partials` widens it)."""
    part = X[a:b]
    if hasattr(part, "compute"):
        part = part.compute()
    return np.asarray(part)


def _partials_of(block, C, normalize, keep_rows):
    p = block_partials(block, C, normalize)
    return p if keep_rows else _stats_only(p)


def _task_partials(X, a, b, C, normalize, keep_rows):
    return _partials_of(_read_block(X, a, b), C, normalize, keep_rows)


def assign_chunks(
    X,
    C,
    *,
    client=None,
    normalize: bool = False,
    chunk_rows: int | None = None,
    labels: bool = True,
    progress: bool = False,
) -> dict:
    """Assign every row of X (numpy, Zarr or Dask; on disk or in memory) to ``C``, chunk by chunk.

    With ``client`` (a ``distributed.Client``, a scheduler address string or a cluster object: LocalCluster,
    dask-jobqueue, dask-cuda) each chunk is one task on the cluster: the centroids are scattered once
    (``client.scatter``: one copy per worker), each worker reads its chunks itself (Zarr arrays are pickled as
    references to the store, not as data) and returns its rows' labels and its partial counts, sums and
    inertia, which are added here in chunk order. Without ``client`` the same per-chunk function runs in
    this process, so both paths give identical labels, counts, sums and inertia.

    Returns
    -------
    dict: ``labels`` (N,) int32 (-1 non-finite) and ``sqdist`` (N,) float32 when ``labels``; ``counts`` (k,),
    ``sums`` (k, d) float64, ``inertia``, ``bad``.
    """
    C = np.ascontiguousarray(C, dtype=np.float32)
    bounds = _chunk_bounds(X, chunk_rows)
    n = n_rows(X)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="assign (chunks)", unit="row", unit_scale=True)
    parts = [None] * len(bounds)
    own = client is not None and type(client).__name__ != "Client"
    if client is None:
        for i, (a, b) in enumerate(bounds):
            parts[i] = _task_partials(X, a, b, C, normalize, labels)
            if bar is not None:
                bar.update(b - a)
    else:
        from distributed import as_completed

        client = _as_client(client)
        # Scattered once under a key of its own (hash=False: a content-hashed key is shared with any other
        # scatter of equal centroids, and one client's release of it can cancel another's tasks as "lost
        # dependencies"); each worker fetches it once and keeps it for all its tasks.
        Cf = client.scatter(C, hash=False)
        if hasattr(X, "dask"):  # each task computes its own block of the Dask graph (reads from the store)
            import dask

            blocks = X.rechunk({1: -1}).to_delayed().ravel()
            futs = client.compute([dask.delayed(_partials_of)(blk, Cf, normalize, labels) for blk in blocks])
        else:
            Xf = client.scatter(X, hash=False) if isinstance(X, np.ndarray) else X  # Zarr: a reference
            futs = [client.submit(_task_partials, Xf, a, b, Cf, normalize, labels, pure=False) for a, b in bounds]
        index = {f.key: i for i, f in enumerate(futs)}
        for fut in as_completed(futs):
            i = index[fut.key]
            parts[i] = fut.result()
            fut.release()
            if bar is not None:
                bar.update(bounds[i][1] - bounds[i][0])
        if own:  # a client made here from an address or a cluster
            client.close()
    if bar is not None:
        bar.close()
    out = _reduce_partials(parts)
    if labels:
        out["labels"] = np.concatenate([p["labels"] for p in parts]) if parts else np.empty(0, np.int32)
        out["sqdist"] = np.concatenate([p["sqdist"] for p in parts]) if parts else np.empty(0, np.float32)
    return out


def lloyd_chunks(
    X,
    C0,
    *,
    n_iter: int = 10,
    client=None,
    normalize: bool = False,
    chunk_rows: int | None = None,
    tol: float = 0.0,
    progress: bool = False,
):
    """Lloyd iterations over every row of X by chunks (out of core; on a Dask cluster with ``client``).

    Each iteration is one :func:`assign_chunks` pass returning only partial counts/sums/inertia per chunk
    (no per-row data travels); the new centroids are ``sums / counts`` (empty clusters keep their
    centroid). Stops when the relative inertia change is ≤ ``tol`` (0: run all ``n_iter``). A final pass
    returns the labels of the returned centroids.

    Returns
    -------
    C (k, d) float32, labels (N,) int32, sqdist (N,) float32, inertia history (list of float)
    """
    C = np.array(C0, dtype=np.float32, copy=True)
    client = _as_client(client) if client is not None else None
    history = []
    for it in range(int(n_iter)):
        st = assign_chunks(
            X, C, client=client, normalize=normalize, chunk_rows=chunk_rows, labels=False, progress=progress
        )
        history.append(st["inertia"])
        nz = st["counts"] > 0
        C[nz] = (st["sums"][nz] / st["counts"][nz, None]).astype(np.float32)
        log.info(
            "lloyd over chunks: iteration %d, inertia %.6g, %d empty clusters", it + 1, st["inertia"], int((~nz).sum())
        )
        if tol > 0 and len(history) > 1 and abs(history[-2] - history[-1]) <= tol * abs(history[-2]):
            break
    final = assign_chunks(
        X, C, client=client, normalize=normalize, chunk_rows=chunk_rows, labels=True, progress=progress
    )
    history.append(final["inertia"])
    return C, final["labels"], final["sqdist"], history
