"""Hierarchical k-means: our torch k-means against scikit-learn and faiss, the tree, out-of-core, store glue."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from workbench.curate import cluster as hc


@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(4000, n_features=16, centers=12, cluster_std=1.0, random_state=3)
    return X.astype(np.float32), y


def nested_blobs(n_super=4, n_sub=4, per=150, dim=8, seed=0):
    """Super-groups far apart, each made of sub-blobs: truth for level 2 (super) and level 1 (sub)."""
    rng = np.random.default_rng(seed)
    supers = rng.normal(size=(n_super, dim)) * 40
    X, ys, yb = [], [], []
    for s in range(n_super):
        subs = supers[s] + rng.normal(size=(n_sub, dim)) * 6
        for b in range(n_sub):
            X.append(subs[b] + rng.normal(size=(per, dim)))
            ys += [s] * per
            yb += [s * n_sub + b] * per
    return np.concatenate(X).astype(np.float32), np.array(ys), np.array(yb)


def test_kmeans_plusplus_is_deterministic_and_spread(blobs):
    X, y = blobs
    C1 = hc.kmeans_plusplus(X, 12, np.random.default_rng(0), device="cpu").numpy()
    C2 = hc.kmeans_plusplus(X, 12, np.random.default_rng(0), device="cpu").numpy()
    np.testing.assert_array_equal(C1, C2)
    # greedy k-means++ seeds one centre in (almost) every well-separated blob
    lab, _ = hc.assign_torch(
        C1,
        make_blobs(4000, n_features=16, centers=12, cluster_std=1.0, random_state=3, return_centers=True)[2].astype(
            np.float32
        ),
    )
    assert len(np.unique(lab.numpy())) >= 11


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_flat_kmeans_matches_sklearn(blobs, backend):
    X, y = blobs
    C, labels, dist, it = hc.kmeans(X, 12, rng=np.random.default_rng(0), backend=backend, device="cpu")
    sk = KMeans(12, n_init=1, random_state=0).fit(X)
    inertia = float(dist.astype(np.float64).sum())
    assert abs(inertia - sk.inertia_) / sk.inertia_ < 0.02
    assert adjusted_rand_score(y, labels) > 0.97
    assert adjusted_rand_score(sk.labels_, labels) > 0.97
    # labels are consistent with the returned centroids, distances are squared L2
    d2 = ((X[:, None, :] - C[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, d2.argmin(1))
    np.testing.assert_allclose(dist, d2.min(1), rtol=1e-3, atol=1e-2)


def test_torch_and_faiss_agree_from_same_seed():
    X, _ = make_blobs(3000, n_features=32, centers=20, cluster_std=2.0, random_state=1)
    X = X.astype(np.float32)
    out = {
        b: hc.kmeans(X, 20, rng=np.random.default_rng(5), backend=b, n_iter=50, device="cpu")
        for b in ("torch", "faiss")
    }
    i_t = out["torch"][2].sum()
    i_f = out["faiss"][2].sum()
    assert abs(i_t - i_f) / i_f < 0.01
    assert adjusted_rand_score(out["torch"][1], out["faiss"][1]) > 0.95


def test_lloyd_centroids_are_exact_means_and_empty_clusters_are_moved():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(size=(300, 4)), rng.normal(size=(300, 4)) + 20]).astype(np.float32)
    C0 = np.stack([X[0], X[1], np.full(4, 1e3, np.float32)])  # third centroid far away: starts empty
    C, labels, dist, it = hc.lloyd_torch(X, C0, n_iter=50, device="cpu")
    C, labels = C.numpy(), labels.numpy()
    counts = np.bincount(labels, minlength=3)
    assert (counts > 0).all(), counts
    assert np.isfinite(C).all()
    for j in range(3):
        np.testing.assert_allclose(C[j], X[labels == j].astype(np.float64).mean(0), rtol=1e-5, atol=1e-5)
    # the two real groups are separated
    assert (len(set(labels[:300])) <= 2 and not set(labels[:300]) & set(labels[300:])) or adjusted_rand_score(
        np.r_[np.zeros(300), np.ones(300)], labels
    ) > 0.5


def test_resample_indices_closest_and_random():
    labels = np.array([0, 0, 0, 1, 1, 2])
    dist = np.array([5.0, 1.0, 3.0, 2.0, 0.5, 9.0], np.float32)
    idx = hc.resample_indices(labels, dist, 3, 2, "closest", np.random.default_rng(0))
    assert idx.tolist() == [1, 2, 3, 4, 5]
    idx = hc.resample_indices(labels, dist, 3, 1, "random", np.random.default_rng(0))
    assert sorted(labels[idx].tolist()) == [0, 1, 2]


def test_hierarchy_recovers_nested_truth_and_predict():
    X, ysup, ysub = nested_blobs()
    hk = hc.HierarchicalKMeans(levels=[16, 4], resampling_steps=2, backend="torch", device="cpu", random_state=0).fit(X)
    P = hk.point_labels_
    assert P.shape == (len(X), 2) and P.dtype == np.int32
    assert adjusted_rand_score(ysub, P[:, 0]) > 0.95
    assert adjusted_rand_score(ysup, P[:, 1]) > 0.99
    # level-2 labels are level-2 labels of the level-1 centroids, composed
    np.testing.assert_array_equal(P[:, 1], hk.labels_[1][hk.labels_[0]])
    assert [c.shape for c in hk.cluster_centers_] == [(16, 8), (4, 8)]
    # new points from the same blobs go down the same branches
    Xn = X + np.random.default_rng(1).normal(size=X.shape).astype(np.float32) * 0.1
    assert (hk.predict(Xn) == P).mean() > 0.99


def test_backends_give_the_same_tree():
    X, ysup, ysub = nested_blobs(seed=2)
    trees = {
        b: hc.HierarchicalKMeans(levels=[16, 4], resampling_steps=1, backend=b, device="cpu", random_state=0)
        .fit(X)
        .point_labels_
        for b in ("torch", "faiss")
    }
    assert adjusted_rand_score(trees["torch"][:, 0], trees["faiss"][:, 0]) > 0.95
    assert adjusted_rand_score(trees["torch"][:, 1], trees["faiss"][:, 1]) > 0.99


def test_resampling_moves_centroids_from_dense_mode_to_rare_ones():
    """The reference's point: resampling takes centroids away from a dense mode towards sparse ones."""
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(9000, 8)) * 1.0
    rare = [rng.normal(size=(100, 8)) * 1.0 + rng.normal(size=8) * 15 for _ in range(10)]
    X = np.concatenate([dense] + rare).astype(np.float32)
    is_dense = np.r_[np.ones(9000, bool), np.zeros(1000, bool)]

    def n_dense_clusters(steps):
        hk = hc.HierarchicalKMeans(
            levels=[40], resampling_steps=steps, sample_per_cluster=10, backend="torch", device="cpu", random_state=0
        ).fit(X)
        lab = hk.labels_[0]
        return len(np.unique(lab[is_dense]))

    before, after = n_dense_clusters(0), n_dense_clusters(5)
    assert before >= 25  # plain k-means spends most centroids on the 90 % mode
    assert after <= before - 5, (before, after)


def test_out_of_core_zarr_with_nan_rows(tmp_path):
    import zarr

    X, ysup, ysub = nested_blobs(per=200)
    X[[5, 700]] = np.nan
    X[900, 3] = np.inf
    arr = zarr.create_array(str(tmp_path / "x.zarr"), shape=X.shape, chunks=(500, X.shape[1]), dtype="float16")
    arr[:] = X.astype(np.float16)
    hk = hc.HierarchicalKMeans(
        levels=[16, 4], backend="torch", device="cpu", chunk_size=700, fit_sample_per_cluster=60, random_state=0
    ).fit(arr)
    assert "sample_fit" in hk.timings_  # took the sample-then-stream path
    lab = hk.point_labels_
    assert hk.n_invalid_ == 3
    assert (lab[[5, 700, 900]] == -1).all()
    ok = lab[:, 0] >= 0
    assert adjusted_rand_score(ysub[ok], lab[ok, 0]) > 0.95
    assert adjusted_rand_score(ysup[ok], lab[ok, 1]) > 0.99
    # the streamed labels equal predicting the same rows in memory
    np.testing.assert_array_equal(hk.predict(X.astype(np.float16).astype(np.float32)), lab)
    # a dask array gives the same tree
    import dask.array as da

    hk2 = hc.HierarchicalKMeans(
        levels=[16, 4], backend="torch", device="cpu", chunk_size=700, fit_sample_per_cluster=60, random_state=0
    ).fit(da.from_zarr(arr))
    np.testing.assert_array_equal(hk2.point_labels_, lab)


def test_validation_errors():
    X = np.zeros((10, 2), np.float32)
    with pytest.raises(ValueError, match="levels"):
        hc.HierarchicalKMeans(levels=[]).fit(X)
    with pytest.raises(ValueError, match="backend"):
        hc.HierarchicalKMeans(levels=[2], backend="sklearn").fit(X)
    with pytest.raises(ValueError, match="at least"):
        hc.HierarchicalKMeans(levels=[20], backend="torch").fit(X)
    with pytest.raises(RuntimeError, match="not fitted"):
        hc.HierarchicalKMeans(levels=[2]).predict(X)


def make_store(path, n_slides=3, per=200, dim=8, seed=0, drop_slide=None):
    """A minimal store with coords and features written the way tiling/embedding do."""
    from workbench import store as st

    X, ysup, ysub = nested_blobs(per=per * n_slides // 16 + 1, dim=dim, seed=seed)
    X, ysup = X[: n_slides * per], ysup[: n_slides * per]
    perm = np.random.default_rng(seed).permutation(len(X))
    X, ysup = X[perm], ysup[perm]
    manifest = [{"slide_id": f"s{i}", "path": f"/nowhere/s{i}.tif"} for i in range(n_slides)]
    root = st.create_store(path, manifest=manifest, tiling={"tile_px": 224})
    for i in range(n_slides):
        g = root.create_group(st.Key.slide(f"s{i}"))
        coords = np.stack([np.arange(per) * 448, np.full(per, i * 448)], 1).astype(np.int32)
        st.write_array(g, "coords", coords)
        st.write_array(g, "tissue", np.ones(per, np.float32))
        f = st.write_array(
            root,
            st.Key.features(f"s{i}", "toy"),
            X[i * per : (i + 1) * per].astype(np.float16),
            attrs={"encoder": "toy"},
        )
        st.mark_complete(f)
        if drop_slide == i:
            scores = np.zeros(per, np.float32)
            scores[:10] = 0.9
            pf = st.write_array(
                root, st.Key.prefilter(f"s{i}", "marker"), scores, attrs={"threshold": 0.75, "drop": True}
            )
            st.mark_complete(pf)
        st.mark_complete(g)
    return X, ysup


def test_fit_store_load_tree_and_swissai_csv(tmp_path):
    import pandas as pd

    path = tmp_path / "ds.zarr"
    X, ysup = make_store(path, drop_slide=1)
    tree = hc.fit_store(path, "toy", "t1", levels=[16, 4], backend="torch", device="cpu", random_state=0)
    loaded = hc.load_tree(path, "t1")
    np.testing.assert_array_equal(loaded.labels, tree.labels)
    for a, b in zip(loaded.centroids, tree.centroids):
        np.testing.assert_array_equal(a, b)
    assert loaded.attrs["levels"] == [16, 4] and loaded.attrs["n_dropped_prefilter"] == 10
    # the 10 flagged tiles of slide s1 (global ids 200..209) are left out
    assert (loaded.labels[200:210] == -1).all() and (loaded.labels[210:] >= 0).all()
    ok = loaded.labels[:, 1] >= 0
    assert adjusted_rand_score(ysup[ok], loaded.labels[ok, 1]) > 0.99
    out = hc.export_swissai_csv(path, "t1", tmp_path / "tree.csv")
    df = pd.read_csv(out)
    assert list(df.columns) == ["slide_id", "tile_x", "tile_y", "level_1", "level_2"]
    assert len(df) == 600 and df["slide_id"].tolist()[:1] == ["s0"]
    np.testing.assert_array_equal(df[["level_1", "level_2"]].to_numpy(), loaded.labels)
    assert df.loc[205, "tile_x"] == 5 * 448 and df.loc[205, "tile_y"] == 448
    with pytest.raises(Exception, match="missing or incomplete"):
        hc.load_tree(path, "nope")


def _skewed_mixture(n, dim, k, seed=0):
    """k well-separated Gaussian components with Dirichlet(0.5) sizes: many small ones (as benchmarks/kmeans.py)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)).astype(np.float32) * 3
    comp = rng.choice(k, size=n, p=rng.dirichlet(np.full(k, 0.5)))
    return (centres[comp] + rng.normal(size=(n, dim)).astype(np.float32)).astype(np.float32)


def test_kmeans_parallel_start_matches_full_kmeans_plusplus_quality():
    # k-means|| (the default start) ends within 2 % of full greedy k-means++ after the same Lloyd iterations;
    # a random start, which misses the small components, ends far above (measured ~1.5x at 20k x 64, k = 100)
    X = _skewed_mixture(8000, 32, 60)

    def inertia(init, seed):
        _, _, d, _ = hc.kmeans(X, 60, rng=np.random.default_rng(seed), init=init, n_iter=10, device="cpu")
        return float(d.astype(np.float64).sum())

    par = np.mean([inertia("k-means||", s) for s in (0, 1)])
    pp = np.mean([inertia("k-means++", s) for s in (0, 1)])
    rnd = np.mean([inertia("random", s) for s in (0, 1)])
    assert par <= 1.02 * pp, (par, pp)
    assert rnd >= 1.2 * pp, (rnd, pp)  # the check can fail: a start no better than random would
    C1 = hc.kmeans(X, 60, rng=np.random.default_rng(3), device="cpu")[0]
    C2 = hc.kmeans(X, 60, rng=np.random.default_rng(3), device="cpu")[0]
    np.testing.assert_array_equal(C1, C2)  # deterministic for a seed


def test_weighted_kmeans_plusplus_never_picks_zero_weight_rows():
    from workbench.curate.kmeans import kmeans_parallel, kmeans_plusplus

    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 8)).astype(np.float32)
    X[:100] += 50  # far away, but weight 0
    w = np.ones(500)
    w[:100] = 0
    C = kmeans_plusplus(X, 20, np.random.default_rng(1), device="cpu", sample_weight=w).numpy()
    assert np.abs(C).max() < 20
    # too few rows for the oversampling: falls back to full k-means++ and still returns k rows of X
    C = kmeans_parallel(X[:50], 20, np.random.default_rng(0), device="cpu").numpy()
    assert C.shape == (20, 8)


def test_bounded_lloyd_gives_plain_lloyds_result_with_fewer_distances():
    # Hamerly's bounds skip rows that provably keep their label: same labels, centroids, update count and
    # inertia as the plain loop (every row against every centroid), on data where labels keep moving for many
    # iterations (k above the number of blobs), and fewer distance rows
    import torch

    from workbench.curate.kmeans import kmeans_plusplus, lloyd_torch

    X, _ = make_blobs(6000, n_features=24, centers=15, cluster_std=2.0, random_state=5)
    X = X.astype(np.float32)
    C0 = kmeans_plusplus(X, 40, np.random.default_rng(2), device="cpu")
    Cp, lp, dp, itp = lloyd_torch(X, C0, n_iter=25, device="cpu", bounds=False)
    fractions = {}
    for groups in (None, 1, 3):  # default group bounds (4 groups here), Hamerly's single bound, 3 uneven groups
        stats = {}
        Cb, lb, db, itb = lloyd_torch(X, C0, n_iter=25, device="cpu", bounds=True, stats=stats, groups=groups)
        assert itb == itp and itp >= 5  # the same number of updates, and enough of them to test the bounds
        assert torch.equal(lp, lb), groups
        np.testing.assert_allclose(Cb.numpy(), Cp.numpy(), atol=1e-4)
        np.testing.assert_allclose(float(db.double().sum()), float(dp.double().sum()), rtol=1e-5)
        exact = ((X - Cb.numpy()[lb.numpy()]) ** 2).sum(1)  # returned distances are exact for the returned labels
        np.testing.assert_allclose(db.numpy(), exact, rtol=1e-4, atol=1e-3)
        assert stats["rows_recomputed"][0] == len(X)
        fractions[groups] = stats["distance_fraction"]
    # no pruning is 1.0; measured: Hamerly 0.58 (rows near the borders between the sub-clusters of one blob
    # keep moving, and one moving centroid lowers every row's bound), 4 groups 0.47
    assert fractions[1] < 0.7 and fractions[None] < 0.6, fractions
    assert fractions[None] < fractions[1], fractions


def test_kmeans_plusplus_same_centres_with_and_without_the_distance_matrix():
    from workbench.curate.kmeans import kmeans_plusplus

    X = np.random.default_rng(0).normal(size=(900, 16)).astype(np.float32)
    w = np.random.default_rng(1).random(900)
    for weight in (None, w):
        a = kmeans_plusplus(X, 50, np.random.default_rng(4), device="cpu", sample_weight=weight, gram_bytes=0)
        b = kmeans_plusplus(X, 50, np.random.default_rng(4), device="cpu", sample_weight=weight)
        np.testing.assert_array_equal(a.numpy(), b.numpy())
