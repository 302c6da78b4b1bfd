"""Hierarchical k-means over tile embeddings (Vo et al. 2024; Chen et al. 2025), DESIGN.md §4.

Level 1 clusters the embeddings; level l+1 clusters the centroids of level l, so every level-(l+1)
cluster is a set of level-l clusters. Every level runs k-means (k-means|| init, or greedy k-means++ with
``2 + ln k`` local trials, ``n_iter`` Lloyd iterations, sums in float64, chunked assignment), then
``resampling_steps`` times: take from every cluster the ``sample_per_cluster`` points closest to its
centroid (or random ones), re-run k-means on that union only, and re-assign all the level's points to
the new centroids. Levels with ``sample_per_cluster <= 1`` skip resampling.

The k-means kernels and the backends (``torch``, ``faiss``, ``cuml``, ``auto``) live in
:mod:`workbench.curate.kmeans`; they are re-exported here.

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

On a Dask cluster. ``fit(X, client=...)`` (a ``distributed.Client``, a scheduler address string or a cluster
object: LocalCluster, dask-jobqueue, dask-cuda) runs the streamed assignment as one task per store chunk
(:func:`workbench.curate.kmeans.assign_chunks`: centroids broadcast, each worker reads its own chunks, labels
and partial counts/sums/inertia come back), and ``stream_iter=t`` adds ``t`` Lloyd updates over every row
of the store after the sample fit (:func:`workbench.curate.kmeans.lloyd_chunks`: per-chunk partial sums
reduced, nothing per row travels until the last pass). Without ``client`` the same per-chunk code runs in
this process, so the results are identical.

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
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from workbench.curate.kmeans import (
    BACKENDS,
    INITS,
    STRATEGIES,
    as_tensor,
    assign_torch,
    finite_rows,
    iter_chunks,
    kmeans,
    kmeans_plusplus,
    l2_normalize,
    lloyd_chunks,
    lloyd_torch,
    n_rows,
    resample_indices,
    resolve_backend,
    torch_device,
)

__all__ = [
    "BACKENDS",
    "STRATEGIES",
    "HierarchicalKMeans",
    "Tree",
    "assign_torch",
    "cluster_purity",
    "compose_labels",
    "export_swissai_csv",
    "fit_store",
    "kmeans",
    "kmeans_plusplus",
    "lloyd_torch",
    "load_tree",
    "read_cluster_tiles",
    "resample_indices",
    "resolve_backend",
]

log = logging.getLogger(__name__)


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

    def predict(
        self, X, *, normalize: bool | None = None, chunk_size: int = 65536, device=None, progress: bool = False
    ):
        """Assign new rows down the tree → (n, L) int32 labels (-1 for non-finite rows)."""
        normalize = bool(self.attrs.get("normalize", False)) if normalize is None else normalize
        labels, _ = _assign_stream(
            X, self.centroids[0], normalize=normalize, chunk_rows=chunk_size, device=device, progress=progress
        )
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
    n = n_rows(X)
    labels = np.full(n, -1, dtype=np.int32)
    dist = np.full(n, np.nan, dtype=np.float32)
    dev = torch_device(device)
    Ct = as_tensor(C, dev)
    n_bad = 0
    for a, block in iter_chunks(X, chunk_rows, progress=progress, desc=desc):
        ok = finite_rows(block)
        n_bad += int((~ok).sum())
        x = block[ok]
        if normalize:
            x = l2_normalize(x)
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


# The parameters that decide what a fit computes (a tree's identity records them; ``device`` only says where,
# and ``stream_iter`` is added when non-zero). ``workbench.migrate`` rebuilds old trees' identities from it.
FIT_PARAMS = (
    "levels",
    "resampling_steps",
    "sample_per_cluster",
    "sample_strategy",
    "init",
    "n_iter",
    "normalize",
    "backend",
    "chunk_size",
    "fit_sample_per_cluster",
    "random_state",
)


class HierarchicalKMeans:
    """Hierarchical k-means with resampling steps (scikit-learn style estimator).

    Parameters
    ----------
    levels : list of int – clusters per level, bottom (level 1) first, e.g. ``[4096, 256, 16]``.
    resampling_steps : int or list – resampling steps per level (reference: 1, 10, 10, 10).
    sample_per_cluster : int, list or None – points taken per cluster in each resampling step;
        None = half the average cluster size of that level (the reference's rule of thumb).
    sample_strategy : "closest" | "random".
    init : "k-means||" (default: k-means|| seeding, :func:`workbench.curate.kmeans.kmeans_parallel`) |
        "k-means++" (full greedy k-means++, k passes over the rows) | "random".
    n_iter : Lloyd iterations per k-means (reference: 50).
    normalize : L2-normalise rows first (the cosine variant).
    backend : "auto" | "torch" | "faiss" | "cuml".
    device : torch device for the torch backend and all assignments (default: CUDA if available).
    chunk_size : rows read per streamed chunk (out-of-core paths).
    fit_sample_per_cluster : fit level 1 on a random sample of ``this × k₁`` rows, then assign
        every row by streaming (see the module docstring); None = fit on all rows in memory.
    progress : show a tqdm bar for streamed assignment.
    stream_iter : Lloyd updates of level 1 over every row of the store after the sample fit (streamed,
        on the Dask cluster when ``fit`` gets ``client=``); 0 = none.
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

    def __init__(
        self,
        levels=(64,),
        *,
        resampling_steps=1,
        sample_per_cluster=None,
        sample_strategy="closest",
        init="k-means||",
        n_iter=50,
        normalize=False,
        backend="auto",
        device=None,
        chunk_size=65536,
        fit_sample_per_cluster=None,
        progress=False,
        random_state=0,
        stream_iter=0,
    ):
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
        self.stream_iter = stream_iter

    # ------------------------------------------------------------------ params

    def get_params(self) -> dict:
        keys = [*FIT_PARAMS, "device"]
        if int(self.stream_iter):
            keys.append("stream_iter")
        out = {}
        for k in keys:
            v = getattr(self, k)
            out[k] = list(v) if isinstance(v, tuple) else (str(v) if k == "device" and v is not None else v)
        return out

    def _validate(self):
        from workbench.validate import check_choice, check_int, check_int_list, check_optional

        levels = check_int_list("levels", self.levels, 1, 1 << 24)
        check_int("n_iter", self.n_iter, 1, 100_000)
        check_choice("sample_strategy", self.sample_strategy, STRATEGIES)
        check_choice("backend", self.backend, tuple(BACKENDS))
        for name in ("resampling_steps", "sample_per_cluster"):
            v = getattr(self, name)
            if v is None or np.isscalar(v):
                check_optional(check_int, name, v, 0 if name == "resampling_steps" else 1)
            else:
                [
                    check_optional(check_int, f"{name}[{i}]", x, 0 if name == "resampling_steps" else 1)
                    for i, x in enumerate(v)
                ]
        if not levels or min(levels) < 1:
            raise ValueError(f"levels must be a non-empty list of positive cluster counts, got {self.levels!r}")
        if any(b > a for a, b in zip(levels, levels[1:])):
            raise ValueError(f"levels must not grow upwards (level 1 first), got {levels}")
        if self.sample_strategy not in STRATEGIES:
            raise ValueError(f"sample_strategy must be one of {STRATEGIES}, got {self.sample_strategy!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
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
        """Fit the tree on X: (N, d) numpy, Dask or zarr array.

        ``client``: a Dask client, scheduler address or cluster; streamed assignment and ``stream_iter`` updates
        run on it (one task per chunk), and the cuML backend fits on its GPUs (dask-cuda).
        """
        levels, steps, sizes, backend = self._validate()
        t0 = time.perf_counter()
        rng = np.random.default_rng(self.random_state)
        n = n_rows(X)
        chunk = int(self.chunk_size)
        k1 = levels[0]
        s = self.fit_sample_per_cluster
        streamed = s is not None and n > int(s) * k1
        timings = {}
        from workbench.progress import progress_bar

        bar = progress_bar(total=len(levels), desc="k-means levels", unit="level", disable=not self.progress)
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
            if int(self.stream_iter) or (client is not None and backend != "cuml"):
                # chunk by chunk (on the cluster with a client): Lloyd updates over the store, then labels
                C, labels1, dist1, hist = lloyd_chunks(
                    X, C, n_iter=int(self.stream_iter), client=client, normalize=self.normalize, progress=self.progress
                )
                self.stream_inertia_ = hist
            else:
                labels1, dist1 = _assign_stream(
                    X,
                    C,
                    normalize=self.normalize,
                    chunk_rows=chunk,
                    device=self.device,
                    progress=self.progress,
                    desc="assign level 1",
                )
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
        bar.update(1)
        centers, labels, iters = [C], [labels1], [it]
        t1 = time.perf_counter()
        for l in range(1, len(levels)):
            Cl, lab, _, it = self._fit_level(centers[-1], levels[l], steps[l], sizes[l], rng, backend, client)
            centers.append(Cl)
            labels.append(lab.astype(np.int32))
            iters.append(it)
            bar.update(1)
        bar.close()
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
            for a, block in iter_chunks(X, chunk, progress=self.progress, desc="read sample"):
                sel = pick[(pick >= a) & (pick < a + len(block))] - a
                parts.append(block[sel])
            out = np.concatenate(parts) if parts else np.empty((0, X.shape[1]), np.float32)
        out = out[finite_rows(out)]
        return l2_normalize(out) if self.normalize else out

    def _load(self, X, chunk: int):
        """All finite rows in memory (float32) and the (N,) finite mask."""
        if isinstance(X, np.ndarray):
            Xm = np.asarray(X, np.float32)
        else:
            Xm = np.empty(X.shape, np.float32)
            for a, block in iter_chunks(X, chunk, progress=self.progress, desc="load"):
                Xm[a : a + len(block)] = block
        ok = finite_rows(Xm)
        Xm = Xm[ok] if not ok.all() else Xm
        return (l2_normalize(Xm) if self.normalize else Xm), ok

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
        attrs = {
            **self.get_params(),
            "backend_used": self.backend_,
            "n_iter": self.n_iter_,
            "n_invalid": self.n_invalid_,
            "fit_seconds": round(self.fit_seconds_, 3),
        }
        return Tree(self.point_labels_, self.cluster_centers_, self.parents_, self.distances_, attrs)

    def predict(self, X, *, progress: bool = False) -> np.ndarray:
        """Assign new rows down the tree → (n, L) int32 labels (-1 for NaN/Inf rows)."""
        return self.tree_.predict(
            X, normalize=self.normalize, chunk_size=int(self.chunk_size), device=self.device, progress=progress
        )


# =========================================================================== store glue


def _kept_rows(root, ids, counts) -> np.ndarray:
    """(N,) bool: False for tiles flagged by a complete prefilter whose attrs say ``drop=True``."""
    from workbench import store as st

    keep = np.ones(int(counts.sum()), dtype=bool)
    offset = 0
    for s, c in zip(ids, counts):
        group_key = st.Key.prefilters(s)
        if group_key in root:
            for name, arr in root[group_key].arrays():
                a = dict(arr.attrs)
                if a.get("drop", False) and a.get("complete", False):
                    thr = float(a.get("threshold", 0.75))
                    keep[offset : offset + c] &= ~(np.asarray(arr[:], np.float32) >= thr)
        offset += int(c)
    return keep


def _prefilter_digest(root, ids) -> str:
    """Digest of the prefilters that drop tiles (``drop=True``): which tiles a tree leaves out."""
    from workbench import store as st

    parts = []
    for s in ids:
        group_key = st.Key.prefilters(s)
        if group_key in root:
            for name, arr in sorted(root[group_key].arrays()):
                a = dict(arr.attrs)
                if a.get("drop", False) and a.get("complete", False):
                    parts.append([s, name, a.get("threshold"), st.array_digest_of(arr)])
    return st.sha_digest(parts)


def tree_lineage(root, encoder: str) -> dict:
    """What a tree over a store's ``encoder`` features is built from, as digests (checks the features)."""
    from workbench import store as st

    ids = st.slide_ids(root)
    return {
        "encoder": encoder,
        "tiling_digest": st.tiling_digest(root, ids),
        "features_digest": st.features_digest(root, encoder, ids),
        "prefilter_digest": _prefilter_digest(root, ids),
    }


def tree_run_name(encoder: str, params: dict) -> str:
    """The run name derived from the parameters: ``hkm-<encoder>-<hash>``."""
    from workbench import store as st

    return f"hkm-{st.encoder_key(encoder)}-{st.sha_digest(params)[:10]}"


def fit_store(
    store_path, encoder: str, run: str | None = None, *, overwrite: bool = False, client=None, **params
) -> Tree:
    """Fit a tree on a store's ``encoder`` features and save it as the named run ``tree/<run>``.

    Tiles flagged by a prefilter saved with ``drop=True`` are left out (label -1), as are NaN/Inf rows.
    ``params`` go to :class:`HierarchicalKMeans`. ``run`` defaults to a name derived from the parameters.
    The same parameters over the same inputs reuse the saved tree; a run of that name with other parameters
    (or over inputs that changed) raises :class:`~workbench.errors.RunExistsError` unless ``overwrite=True``;
    replacing is atomic (the old tree stays readable until the new one is complete). Returns the :class:`Tree`.
    """
    from workbench import store as st

    hk = HierarchicalKMeans(**params)
    hk._validate()
    fit_params = {k: v for k, v in hk.get_params().items() if k not in ("device", "progress")}
    run = tree_run_name(encoder, fit_params) if run is None else run
    key = st.Key.tree(run)
    root = st.open_store(store_path, mode="r")
    lineage = tree_lineage(root, encoder)
    identity = {**lineage, "params": fit_params}
    if st.is_complete(root, st.run_key(root, key)):
        old = dict(root[st.run_key(root, key)].attrs.get("identity", {}))
        if old == _jsonable(identity):
            log.info("tree %r: same parameters over the same features: reusing it", run)
            return load_tree(store_path, run)
        if not overwrite:
            st.write_run(
                store_path, key, identity, lambda g: None, what="tree"
            )  # raises RunExistsError naming what differs
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
    hk = hk.fit(X, client=client)
    kept = np.nonzero(keep)[0]
    level1 = np.full(n, -1, np.int32)
    dist = np.full(n, np.nan, np.float32)
    level1[kept], dist[kept] = hk.labels_[0], hk.distances_
    tree = hk.tree_
    tree = Tree(
        compose_labels(level1, tree.parents),
        tree.centroids,
        tree.parents,
        dist,
        {
            **tree.attrs,
            "encoder": encoder,
            "n_tiles": n,
            "n_dropped_prefilter": int((~keep).sum()),
            "slide_ids_digest": lineage_digest(ids),
            "run": run,
        },
    )

    def build(g):
        for l in range(tree.n_levels):
            st.write_array(g, f"level_{l + 1}", tree.labels[:, l])
            st.write_array(g, f"centroids/level_{l + 1}", tree.centroids[l].astype(np.float32))
            if l:
                st.write_array(g, f"parents/level_{l}", np.asarray(tree.parents[l - 1], np.int32))
        st.write_array(g, "distance", tree.distances)
        g.attrs.update({"parameters": _jsonable(tree.attrs), "n_levels": tree.n_levels, "lineage": lineage})

    st.write_run(store_path, key, identity, build, overwrite=True, what="tree")
    log.info("tree %r: %s clusters over %d tiles in %.1f s", run, [len(c) for c in tree.centroids], n, hk.fit_seconds_)
    return tree


def _jsonable(obj):
    """Attrs as plain JSON types (numpy scalars and arrays converted)."""
    import json

    return json.loads(json.dumps(obj, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def lineage_digest(ids) -> str:
    import hashlib

    return hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]


def check_tree_lineage(root, run: str, attrs: dict) -> None:
    """Raise :class:`~workbench.errors.StaleError` saying what changed if a tree's inputs are not the store's now."""
    from workbench import store as st

    lineage = attrs.get("lineage")
    if not lineage:
        if attrs.get("parameters", {}).get("slide_ids_digest") not in (None, lineage_digest(st.slide_ids(root))):
            raise st.StaleError(
                f"tree {run!r} was fitted on another set of slides than {st.store_path(root)} now "
                f"holds; refit it (fit_store(..., {run!r}, overwrite=True))"
            )
        return
    now = tree_lineage(root, lineage["encoder"])
    what = {
        "tiling_digest": "the slides or their tiles (re-tiled, reordered, added or removed)",
        "features_digest": f"the {lineage['encoder']!r} features (re-embedded or rewritten)",
        "prefilter_digest": "the prefilters that drop tiles",
    }
    changed = [what[k] for k in what if lineage.get(k) != now.get(k)]
    if changed:
        raise st.StaleError(
            f"tree {run!r} of {st.store_path(root)} is stale: {' and '.join(changed)} changed since "
            f"it was fitted; refit it: fit_store(store, {lineage['encoder']!r}, {run!r}, "
            "overwrite=True, ...)"
        )


def load_tree(store_path, run: str) -> Tree:
    """Read ``tree/<run>`` back as a :class:`Tree`; refuses an incomplete tree, or one whose inputs changed
    (:class:`~workbench.errors.StaleError`: the slides' tiles, the features or the dropping prefilters)."""
    from workbench import store as st

    root = st.open_store(store_path, mode="r")
    key = st.run_key(root, st.Key.tree(run))
    if not st.is_complete(root, key):
        raise st.StoreError(f"tree {run!r} is missing or incomplete in {st.as_path(store_path)}: run fit_store first")
    g = root[key]
    L = int(g.attrs["n_levels"])
    check_tree_lineage(root, run, dict(g.attrs))
    attrs = dict(g.attrs["parameters"])
    attrs["digest"] = st.node_digest(g)
    labels = np.stack([g[f"level_{l + 1}"][:] for l in range(L)], axis=1).astype(np.int32)
    centroids = [g[f"centroids/level_{l + 1}"][:] for l in range(L)]
    parents = [g[f"parents/level_{l}"][:] for l in range(1, L)]
    return Tree(labels, centroids, parents, g["distance"][:], attrs)


def export_swissai_csv(store_path, run: str, path) -> Path:
    """Write the swiss-ai cluster CSV: slide_id, tile_x, tile_y, level_1 … level_L (one row per tile)."""
    from workbench import store as st

    tree = load_tree(store_path, run)
    root = st.open_store(store_path, mode="r")
    path = Path(path)
    offset = 0
    with st.atomic_path(path) as tmp, open(tmp, "w") as fh:  # unique temp name, fsync, rename
        fh.write(",".join(["slide_id", "tile_x", "tile_y"] + [f"level_{l + 1}" for l in range(tree.n_levels)]) + "\n")
        for s in st.slide_ids(root):  # one slide at a time: bounded memory
            import pandas as pd

            xy = root[st.Key.coords(s)][:]
            lab = tree.labels[offset : offset + len(xy)]
            offset += len(xy)
            df = pd.DataFrame({"slide_id": s, "tile_x": xy[:, 0], "tile_y": xy[:, 1]})
            for l in range(tree.n_levels):
                df[f"level_{l + 1}"] = lab[:, l]
            df.to_csv(fh, header=False, index=False)
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
    from workbench import store as st
    from workbench.io.slides import TileReader, open_slide

    root = st.open_store(store_path)
    ids = np.nonzero(np.asarray(labels) == cluster)[0]
    if not len(ids):
        return np.zeros((0, 1, 1, 3), np.uint8)
    pick = np.sort(np.random.default_rng(random_state).choice(ids, min(n, len(ids)), replace=False))
    index = st.tile_index(root).iloc[pick]
    tiling = root.attrs["tiling"]
    out = []
    for sid, rows in index.groupby("slide_id", sort=False):
        info = st.check_slide_file(root, sid)  # never read pixels of another file at these coordinates
        with open_slide(info["path"], slide_id=sid, mpp=info.get("mpp")) as slide:
            reader = TileReader(slide, tile_px=int(tiling["tile_px"]), tile_mpp=float(tiling["tile_mpp"]))
            out.append(reader.read(rows[["x", "y"]].to_numpy()))
    return np.concatenate(out)
