"""Balanced sampling from a hierarchical k-means tree, stratified batches, balance metrics (DESIGN.md §4).

Hierarchical sampling for a target N (Vo et al. 2024): at the top level find the integer cut x such
that ``Σ_c min(x, size_c)`` is the largest value not exceeding N (sizes counted in points; binary
search), give the remainder as +1 to randomly chosen clusters still larger than x, then recurse with
each cluster's quota over its children down to level 1, where a cluster gives ``random`` points or
its points ``closest`` to its centroid. Every level is done for all clusters at once (a grouped
binary search with ``bincount``), never with a Python loop over clusters, so it runs on millions of
level-1 clusters. Deterministic for a seed.

:class:`StratifiedBatchSampler` is a torch ``Sampler`` of index batches that take an equal share
from every cluster of a chosen level; inside a cluster, tiles seen least often come first; the
number of distinct slides per epoch can be capped. :func:`balance_metrics` compares a subset with
the full set. :func:`metadata_sample` is the baseline: even over a metadata column (site, diagnosis).

Example
-------
>>> import numpy as np
>>> labels = np.array([[0, 0], [0, 0], [0, 0], [1, 0], [2, 1]])
>>> HierarchicalSampler(3, strategy="random").fit(labels).indices_.size
3
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np

log = logging.getLogger(__name__)

STRATEGIES = ("random", "closest")


# =========================================================================== the cut


def cut_level(sizes: np.ndarray, n: int) -> int:
    """Largest integer x with ``Σ min(x, sizes) <= n`` (x = max size when n covers everything).

    >>> cut_level(np.array([10, 3, 7, 1]), 13)
    4
    """
    x, _ = grouped_cut(np.asarray(sizes, np.int64), np.zeros(len(sizes), np.int64), np.array([n], np.int64))
    return int(x[0])


def grouped_cut(sizes: np.ndarray, groups: np.ndarray, totals: np.ndarray):
    """The cut of every group at once (binary search run in lock-step over groups).

    Parameters
    ----------
    sizes : (m,) int64 sizes of the children; groups : (m,) int64 group (parent) of each child in [0, G);
    totals : (G,) int64 quota of each group.

    Returns
    -------
    x : (G,) int64 cut per group, totals : (G,) quota clipped to what the group holds.
    """
    sizes, groups = np.asarray(sizes, np.int64), np.asarray(groups, np.int64)
    G = len(totals)
    cap = np.bincount(groups, weights=sizes, minlength=G).astype(np.int64)
    totals = np.minimum(np.asarray(totals, np.int64), cap)
    lo = np.zeros(G, np.int64)
    hi = np.zeros(G, np.int64)
    np.maximum.at(hi, groups, sizes)
    while (lo < hi).any():
        mid = (lo + hi + 1) // 2
        f = np.bincount(groups, weights=np.minimum(mid[groups], sizes), minlength=G)
        ok = f <= totals
        lo = np.where(ok, mid, lo)
        hi = np.where(ok, hi, mid - 1)
    return lo, totals


def _rank_in_group(groups: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order of items by (group, key) and each ordered item's rank inside its group."""
    order = np.lexsort((key, groups))
    g = groups[order]
    first = np.r_[0, np.nonzero(np.diff(g))[0] + 1] if len(g) else np.zeros(0, np.int64)
    starts = np.zeros(len(g), np.int64)
    if len(g):
        starts[first] = first
        starts = np.maximum.accumulate(starts)
    return order, np.arange(len(g)) - starts


def split_quotas(sizes: np.ndarray, groups: np.ndarray, totals: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Quota of every child: ``min(x_g, size)`` plus +1 for ``remainder_g`` random children larger than x_g.

    Returns (m,) int64 quotas; per group they sum to ``min(total_g, Σ sizes)``.
    """
    sizes, groups = np.asarray(sizes, np.int64), np.asarray(groups, np.int64)
    x, totals = grouped_cut(sizes, groups, totals)
    q = np.minimum(x[groups], sizes)
    rem = totals - np.bincount(groups, weights=q, minlength=len(totals)).astype(np.int64)
    eligible = np.nonzero(sizes > x[groups])[0]
    key = rng.random(len(eligible))
    order, rank = _rank_in_group(groups[eligible], key)
    chosen = eligible[order][rank < rem[groups[eligible][order]]]
    q[chosen] += 1
    return q


# =========================================================================== tree input


def _tree_arrays(tree):
    """(N, L) labels, parents list (or None), (N,) distances (or None) from a Tree, estimator or array."""
    if hasattr(tree, "tree_"):  # a fitted HierarchicalKMeans
        tree = tree.tree_
    if hasattr(tree, "labels") and hasattr(tree, "parents"):
        return np.asarray(tree.labels), list(tree.parents), tree.distances, [len(c) for c in tree.centroids]
    labels = np.asarray(tree)
    if labels.ndim == 1:
        labels = labels[:, None]
    return labels, None, None, None


def _parents_from_labels(lower: np.ndarray, upper: np.ndarray, k_lower: int) -> np.ndarray:
    ok = lower >= 0
    parent = np.zeros(k_lower, np.int64)
    parent[lower[ok]] = upper[ok]
    return parent


class HierarchicalSampler:
    """Balanced sample of ``n`` points from a hierarchical k-means tree.

    Parameters
    ----------
    n : target sample size (all points when the tree holds fewer).
    strategy : "random" or "closest" (the points nearest their level-1 centroid; needs the tree's distances).
    level : top level to start the split from (1-based); None = the tree's top level.
    random_state : int seed.

    Attributes
    ----------
    indices_ : (m,) int64 sorted global ids of the sampled points.
    quotas_ : dict level → (k_level,) int64 points taken from each cluster of that level.
    cut_ : the top level's cut x.
    """

    def __init__(self, n: int, *, strategy: str = "random", level: int | None = None, random_state=0):
        self.n = n
        self.strategy = strategy
        self.level = level
        self.random_state = random_state

    def fit(self, tree, y=None):
        """``tree``: a :class:`workbench.curate.cluster.Tree`, a fitted ``HierarchicalKMeans`` or (N, L) labels."""
        from workbench.validate import check_choice, check_int, check_optional

        check_choice("strategy", self.strategy, STRATEGIES)
        check_int("n", self.n, 0)
        check_optional(check_int, "level", self.level, 1)
        labels, parents, dist, ks = _tree_arrays(tree)
        L = labels.shape[1]
        top = L if self.level is None else int(self.level)
        if not 1 <= top <= L:
            raise ValueError(f"level must be in 1..{L}, got {self.level}")
        if self.strategy == "closest" and (dist is None or np.isnan(dist[labels[:, 0] >= 0]).any()):
            raise ValueError("strategy='closest' needs the tree's distances to the level-1 centroids (use a Tree)")
        rng = np.random.default_rng(self.random_state)
        valid = labels[:, 0] >= 0
        ks = ks or [int(labels[valid, l].max()) + 1 if valid.any() else 0 for l in range(L)]
        n_valid = int(valid.sum())
        if self.n > n_valid:
            log.warning("asked for %d points, the tree holds %d valid ones: taking all", self.n, n_valid)

        sizes = np.bincount(labels[valid, top - 1], minlength=ks[top - 1])
        self.cut_ = cut_level(sizes, int(self.n))
        quotas = {top: split_quotas(sizes, np.zeros(len(sizes), np.int64), np.array([self.n]), rng)}
        for l in range(top - 1, 0, -1):
            sizes = np.bincount(labels[valid, l - 1], minlength=ks[l - 1])
            if parents is not None:
                parent = np.asarray(parents[l - 1], np.int64)
            else:
                parent = _parents_from_labels(labels[:, l - 1], labels[:, l], ks[l - 1])
            quotas[l] = split_quotas(sizes, parent, quotas[l + 1], rng)

        ids = np.nonzero(valid)[0]
        lab1 = labels[ids, 0].astype(np.int64)
        key = dist[ids] if self.strategy == "closest" else rng.random(len(ids))
        order, rank = _rank_in_group(lab1, key)
        take = order[rank < quotas[1][lab1[order]]]
        self.indices_ = np.sort(ids[take]).astype(np.int64)
        self.quotas_ = quotas
        return self

    def fit_sample(self, tree) -> np.ndarray:
        """Fit and return ``indices_``."""
        return self.fit(tree).indices_


def metadata_sample(groups, n: int, *, random_state=0) -> np.ndarray:
    """Baseline: ``n`` points spread evenly over the values of a metadata column (site, diagnosis).

    The same cut as the tree's top level, random points inside each group; NaN/None values are a group.
    Returns (m,) int64 sorted indices.
    """
    import pandas as pd

    codes, _ = pd.factorize(pd.Series(groups), use_na_sentinel=False)
    codes = np.asarray(codes, np.int64)
    return HierarchicalSampler(n, strategy="random", random_state=random_state).fit(codes).indices_


# =========================================================================== batches


class StratifiedBatchSampler:
    """Batches of indices that draw equally from the clusters of one level (a torch batch sampler).

    Use as ``DataLoader(dataset, batch_sampler=StratifiedBatchSampler(labels, 2048))``.

    Parameters
    ----------
    labels : (N,) cluster of each tile at the chosen level, or (N, L) with ``level`` (1-based, default top);
        -1 = excluded.
    batch_size : tiles per batch; split as evenly as possible over the clusters (the cut of
        :func:`split_quotas`; with more clusters than ``batch_size`` a rotating subset of clusters).
    slide_ids : (N,) slide of each tile, needed for ``max_slides_per_epoch``.
    max_slides_per_epoch : cap on distinct slides drawn from in one epoch (I/O locality; swiss-ai: 800);
        the slides are chosen at random each epoch.
    n_batches : batches per epoch; default ``ceil(eligible tiles / batch_size)``.
    random_state : int seed; epoch e uses ``(random_state, e)``.

    Inside a cluster tiles are drawn least-seen first: each cluster walks a random permutation of its
    tiles and reshuffles when it wraps, so no tile is drawn k+1 times before all were drawn k times.
    ``seen_`` (N,) counts draws over all epochs so far.
    """

    def __init__(
        self,
        labels,
        batch_size: int,
        *,
        level: int | None = None,
        slide_ids=None,
        max_slides_per_epoch: int | None = None,
        n_batches: int | None = None,
        random_state=0,
    ):
        from workbench.validate import check_int, check_optional

        labels = np.asarray(labels)
        check_optional(check_int, "level", level, 1, labels.shape[1] if labels.ndim == 2 else 1)
        check_int("batch_size", batch_size, 1, max(1, len(labels)))  # bounded by the tiles that exist
        check_optional(check_int, "max_slides_per_epoch", max_slides_per_epoch, 1)
        check_optional(check_int, "n_batches", n_batches, 1)
        if labels.ndim == 2:
            labels = labels[:, (labels.shape[1] if level is None else int(level)) - 1]
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_slides_per_epoch is not None and slide_ids is None:
            raise ValueError("max_slides_per_epoch needs slide_ids")
        self.labels = labels.astype(np.int64)
        self.batch_size = int(batch_size)
        self.slide_ids = None if slide_ids is None else np.asarray(slide_ids)
        self.max_slides_per_epoch = max_slides_per_epoch
        self.n_batches = n_batches
        self.random_state = random_state
        self.epoch = 0
        self.seen_ = np.zeros(len(labels), np.int64)
        self._cursor = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _eligible(self, rng) -> np.ndarray:
        ok = self.labels >= 0
        if self.max_slides_per_epoch is not None:
            slides = np.unique(self.slide_ids[ok])
            if len(slides) > self.max_slides_per_epoch:
                keep = rng.choice(slides, self.max_slides_per_epoch, replace=False)
                ok &= np.isin(self.slide_ids, keep)
        return np.nonzero(ok)[0]

    def __len__(self) -> int:
        if self.n_batches is not None:
            return int(self.n_batches)
        return max(1, math.ceil(int((self.labels >= 0).sum()) / self.batch_size))

    def schedule(self, epoch: int | None = None) -> list[np.ndarray]:
        """The batches of one epoch (updates ``seen_``); what ``__iter__`` yields, for writing schedules."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([int(self.random_state), epoch])
        ids = self._eligible(rng)
        lab = self.labels[ids]
        clusters, inverse = np.unique(lab, return_inverse=True)
        members = np.split(ids[np.argsort(inverse, kind="stable")], np.cumsum(np.bincount(inverse))[:-1])
        # per cluster: tiles ordered least-seen first (ties random), walked with a cursor
        queues = []
        for m in members:
            key = self.seen_[m] + rng.random(len(m))
            queues.append(m[np.argsort(key)])
        cursors = np.zeros(len(clusters), np.int64)
        n_batches = self.n_batches or max(1, math.ceil(len(ids) / self.batch_size))
        extras = np.zeros(len(clusters), np.int64)  # remainder slots each cluster got so far
        batches = []
        for _ in range(n_batches):
            # equal share per cluster; the remainder (and, with many clusters, the clusters) go to the
            # clusters that got the fewest remainder slots so far, ties at random
            per = np.full(len(clusters), self.batch_size // max(len(clusters), 1), np.int64)
            extra = self.batch_size - int(per.sum())
            if extra:
                pick = np.lexsort((rng.random(len(clusters)), extras))[:extra]
                per[pick] += 1
                extras[pick] += 1
            parts = [self._draw(queues, cursors, c, int(per[c]), rng) for c in np.nonzero(per)[0]]
            batches.append(np.concatenate(parts) if parts else np.zeros(0, np.int64))
        return batches

    def _draw(self, queues, cursors, c: int, want: int, rng) -> np.ndarray:
        """``want`` tiles of cluster c from its queue; a finished pass reshuffles it, least seen first."""
        out = []
        while want > 0:
            q, cur = queues[c], int(cursors[c])
            chosen = q[cur : cur + want]
            self.seen_[chosen] += 1
            out.append(chosen)
            want -= len(chosen)
            cursors[c] = cur + len(chosen)
            if cursors[c] >= len(q):
                queues[c] = q[np.argsort(self.seen_[q] + rng.random(len(q)))]
                cursors[c] = 0
        return np.concatenate(out)

    def __iter__(self):
        for b in self.schedule():
            yield b.tolist()
        self.epoch += 1


# =========================================================================== metrics


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum()) if len(p) else 0.0


def balance_metrics(labels_subset, labels_full, classes=None, *, class_names=None) -> dict:
    """How balanced a subset is against the full set (flat dict).

    Parameters
    ----------
    labels_subset : (m, L) or (m,) cluster labels of the subset's points (-1 ignored).
    labels_full : (N, L) or (N,) labels of all points.
    classes : optional (m,) class of each subset point (e.g. the demo's true tissue class).
    class_names : optional names for class values (index → name).

    Returns
    -------
    ``entropy_level_l`` (cluster-count entropy / ln(number of clusters of the full set at level l),
    1 = perfectly even), ``coverage_level_l`` (share of the full set's clusters present), and with
    ``classes``: ``class_share_<name>``, ``dominant_class_share``, ``class_entropy`` (normalised over
    the classes present).
    """
    sub, full = np.asarray(labels_subset), np.asarray(labels_full)
    sub = sub[:, None] if sub.ndim == 1 else sub
    full = full[:, None] if full.ndim == 1 else full
    out = {"n": int(len(sub))}
    for l in range(full.shape[1]):
        f = full[:, l][full[:, l] >= 0]
        s = sub[:, l][sub[:, l] >= 0]
        k = int(f.max()) + 1 if len(f) else 1
        present = np.bincount(f, minlength=k) > 0
        counts = np.bincount(s, minlength=k)[:k] if len(s) else np.zeros(k, np.int64)
        n_clusters = int(present.sum())
        out[f"entropy_level_{l + 1}"] = _entropy(counts) / math.log(n_clusters) if n_clusters > 1 else 1.0
        out[f"coverage_level_{l + 1}"] = float(((counts > 0) & present).sum() / max(n_clusters, 1))
    if classes is not None:
        classes = np.asarray(classes)
        values, counts = np.unique(classes, return_counts=True)
        shares = counts / counts.sum()
        for v, sh in zip(values, shares):
            name = class_names[int(v)] if class_names is not None else v
            out[f"class_share_{name}"] = float(sh)
        out["dominant_class_share"] = float(shares.max())
        out["class_entropy"] = _entropy(counts) / math.log(len(values)) if len(values) > 1 else 1.0
    return out


# =========================================================================== store glue


def sample_store(
    store_path,
    tree_run: str,
    run: str | None,
    n: int,
    *,
    strategy: str = "random",
    level: int | None = None,
    random_state=0,
    overwrite: bool = False,
) -> np.ndarray:
    """Sample ``n`` tiles from ``tree/<tree_run>`` and save them as the named run ``samples/<run>``.

    Saved: ``indices`` (m,) int64 global tile ids, and each tile's stable key (``slide`` (m,) int32 index
    into the ``slide_ids`` attr, ``xy`` (m, 2) int32 level-0 corner), with the tiling and tree digests
    it was drawn from. ``run`` defaults to a name derived from the parameters; the same parameters from
    the same tree reuse the saved sample; other ones need another name or ``overwrite=True`` (atomic).
    """
    from workbench import store as st
    from workbench.curate.cluster import load_tree
    from workbench.validate import check_int

    check_int("n", n, 0)
    if run is not None:
        st.check_name(run, "sample run")
    tree = load_tree(store_path, tree_run)  # refuses a stale tree
    params = {"tree_run": tree_run, "n": int(n), "strategy": strategy, "level": level, "random_state": random_state}
    run = f"{tree_run}-n{int(n)}-{st.sha_digest(params)[:8]}" if run is None else run
    key = st.Key.sample(run)
    root = st.open_store(store_path, mode="r")
    ids = st.slide_ids(root)
    identity = {"params": params, "tree_digest": tree.attrs.get("digest"), "tiling_digest": st.tiling_digest(root, ids)}
    existing = st.run_key(root, key)
    if st.is_complete(root, existing) and dict(root[existing].attrs.get("identity", {})) == json.loads(
        json.dumps(identity, sort_keys=True)
    ):
        log.info("sample %r: same parameters from the same tree: reusing it", run)
        return load_sample(store_path, run)
    sampler = HierarchicalSampler(n, strategy=strategy, level=level, random_state=random_state).fit(tree)
    idx = sampler.indices_
    table = st.tile_index(root, ids)
    rows = table.iloc[idx]
    slide_pos = {s: i for i, s in enumerate(ids)}

    def build(g):
        st.write_array(g, "indices", idx)
        st.write_array(g, "slide", rows["slide_id"].map(slide_pos).to_numpy(np.int32))
        st.write_array(g, "xy", rows[["x", "y"]].to_numpy(np.int32).reshape(-1, 2))
        g.attrs["slide_ids"] = ids
        g.attrs["lineage"] = {
            "tree_run": tree_run,
            "tree_digest": identity["tree_digest"],
            "tiling_digest": identity["tiling_digest"],
        }
        g.attrs["parameters"] = {
            **params,
            "n_sampled": int(len(idx)),
            "cut": sampler.cut_,
            "encoder": tree.attrs.get("encoder"),
        }

    st.write_run(store_path, key, identity, build, overwrite=overwrite, what="sample")
    log.info("sample %r: %d tiles from tree %r", run, len(idx), tree_run)
    return idx


def load_sample(store_path, run: str, *, check_tree: bool = True) -> np.ndarray:
    """The (m,) int64 global tile ids of ``samples/<run>``, always naming the tiles that were sampled.

    If the slides were re-tiled or reordered since, the ids are re-derived from the saved tile keys
    (slide id, level-0 x, y); a tile that no longer exists raises :class:`~workbench.errors.StaleError`.
    With ``check_tree``, a sample whose tree was replaced or went stale is refused too.
    """
    from workbench import store as st

    root = st.open_store(store_path, mode="r")
    key = st.run_key(root, st.Key.sample(run))
    if not st.is_complete(root, key):
        raise st.StoreError(
            f"sample {run!r} is missing or incomplete in {st.as_path(store_path)}: run sample_store first"
        )
    g = root[key]
    idx = g["indices"][:].astype(np.int64)
    lineage = g.attrs.get("lineage")
    if not lineage:
        return idx
    if check_tree:
        from workbench.curate.cluster import load_tree

        tree_run = lineage["tree_run"]
        try:
            digest = load_tree(store_path, tree_run).attrs.get("digest")
        except st.StaleError as exc:
            raise st.StaleError(f"sample {run!r} comes from tree {tree_run!r}, which is stale: {exc}") from exc
        except st.StoreError:
            digest = None
        if digest != lineage["tree_digest"]:
            raise st.StaleError(
                f"sample {run!r} was drawn from tree {tree_run!r} as it was; that tree was "
                + ("removed" if digest is None else "replaced")
                + " since: re-run sample_store(..., overwrite=True) "
                "(or load_sample(..., check_tree=False) for the tiles alone)"
            )
    if lineage["tiling_digest"] == st.tiling_digest(root):
        return idx
    saved_ids = list(g.attrs["slide_ids"])
    slides = np.asarray(saved_ids, dtype=object)[g["slide"][:]]
    xy = g["xy"][:]
    table = st.tile_index(root)
    lookup = {(s, int(x), int(y)): i for i, (s, x, y) in enumerate(zip(table["slide_id"], table["x"], table["y"]))}
    out = np.array([lookup.get((s, int(x), int(y)), -1) for s, (x, y) in zip(slides, xy)], np.int64)
    if (out < 0).any():
        bad = np.flatnonzero(out < 0)
        raise st.StaleError(
            f"sample {run!r}: {len(bad)} of {len(out)} sampled tiles no longer exist in {st.as_path(store_path)} "
            f"(e.g. slide {slides[bad[0]]!r} at x={int(xy[bad[0], 0])}, y={int(xy[bad[0], 1])}): the slides were "
            "re-tiled; refit the tree and re-run sample_store"
        )
    log.warning("sample %r: the slides were re-tiled or reordered since; ids re-derived from the saved tile keys", run)
    return out


def demo_tile_classes(store_path) -> np.ndarray:
    """(N,) true tissue class name of every tile of a store of synthetic demo slides (None = background).

    Thin wrapper over :func:`workbench.search.evaluate.synthetic_tile_labels` (the one place that reads the truth).
    """
    from types import SimpleNamespace

    import pandas as pd

    from workbench import store as st
    from workbench.search.evaluate import synthetic_tile_labels

    root = st.open_store(store_path)
    return synthetic_tile_labels(
        SimpleNamespace(store=str(store_path), slides=pd.DataFrame({"slide_id": st.slide_ids(root)}))
    )


def tile_metadata(store_path, column: str) -> np.ndarray:
    """(N,) value of a manifest column (site, diagnosis, patient_id) for every global tile id."""
    from workbench import store as st

    root = st.open_store(store_path)
    manifest = {r["slide_id"]: r for r in root.attrs["manifest"]}
    ids = st.slide_ids(root)
    counts = st.tile_counts(root, ids)
    return np.repeat(np.array([manifest[s].get(column) for s in ids], dtype=object), counts)
