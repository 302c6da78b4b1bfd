"""Balanced sampling: the cut on hand examples, balance on a 90 %-dominated dataset, batches, metrics, store."""

from __future__ import annotations

import numpy as np
import pytest

from workbench.curate import cluster as hc
from workbench.curate import sample as hs


def test_cut_hand_examples():
    sizes = np.array([10, 3, 7, 1])
    # sum min(4, s) = 4 + 3 + 4 + 1 = 12 <= 12; x = 5 gives 14
    assert hs.cut_level(sizes, 12) == 4
    assert hs.cut_level(sizes, 13) == 4
    assert hs.cut_level(sizes, 14) == 5
    assert hs.cut_level(sizes, 0) == 0
    assert hs.cut_level(sizes, 100) == 10  # everything fits
    q = hs.split_quotas(sizes, np.zeros(4, np.int64), np.array([13]), np.random.default_rng(0))
    # base 4, 3, 4, 1 and one extra point to cluster 0 or 2 (the only ones larger than 4)
    assert q.sum() == 13 and q[1] == 3 and q[3] == 1 and sorted([q[0], q[2]]) == [4, 5]
    # grouped: two parents cut independently, in one call
    q = hs.split_quotas(
        np.array([10, 3, 7, 1, 6, 6]), np.array([0, 0, 0, 0, 1, 1]), np.array([12, 5]), np.random.default_rng(0)
    )
    assert q[:4].tolist() == [4, 3, 4, 1] and sorted(q[4:].tolist()) == [2, 3]


def test_sampler_recurses_with_quotas_and_leaf_strategies():
    # level 2: cluster 0 = level-1 {0, 1} (sizes 6, 2), cluster 1 = level-1 {2} (size 1)
    lab1 = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2])
    lab2 = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1])
    labels = np.stack([lab1, lab2], 1)
    s = hs.HierarchicalSampler(5, strategy="random", random_state=0).fit(labels)
    # top: sizes (8, 1), n=5 -> x=4: quotas 4, 1; inside cluster 0: sizes (6, 2), quota 4 -> x=2: 2, 2
    assert s.cut_ == 4
    assert s.quotas_[2].tolist() == [4, 1] and s.quotas_[1].tolist() == [2, 2, 1]
    assert np.bincount(lab1[s.indices_], minlength=3).tolist() == [2, 2, 1]
    dist = np.array([5, 4, 3, 0.5, 0.1, 9, 1, 1, 1], np.float32)
    tree = hc.Tree(labels, [np.zeros((3, 2)), np.zeros((2, 2))], [np.array([0, 0, 1])], dist)
    s = hs.HierarchicalSampler(5, strategy="closest", random_state=0).fit(tree)
    assert s.indices_.tolist() == [3, 4, 6, 7, 8]
    # deterministic for a seed, different for another
    a = hs.HierarchicalSampler(40, random_state=1).fit(np.arange(200) % 7).indices_
    b = hs.HierarchicalSampler(40, random_state=1).fit(np.arange(200) % 7).indices_
    c = hs.HierarchicalSampler(40, random_state=2).fit(np.arange(200) % 7).indices_
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(np.unique(a)) == 40


def dominated_dataset(seed=0):
    """Six classes; class 0 holds 90 % of the points (a broad mode), the others 2 % each."""
    rng = np.random.default_rng(seed)
    dim = 16
    centres = rng.normal(size=(6, dim)) * 12
    n = np.array([9000, 200, 200, 200, 200, 200])
    X = np.concatenate(
        [centres[c] + rng.normal(size=(m, dim)) * (2.0 if c == 0 else 1.0) for c, m in enumerate(n)]
    ).astype(np.float32)
    y = np.repeat(np.arange(6), n)
    return X, y


def test_balanced_sampling_evens_out_a_dominant_class():
    X, y = dominated_dataset()
    hk = hc.HierarchicalKMeans(
        levels=[60, 8],
        resampling_steps=[3, 3],
        sample_per_cluster=[10, 3],
        backend="torch",
        device="cpu",
        random_state=0,
    ).fit(X)
    tree = hk.tree_
    idx = hs.HierarchicalSampler(600, strategy="random", random_state=0).fit(tree).indices_
    assert len(idx) == 600
    rand = np.random.default_rng(0).choice(len(X), 600, replace=False)
    share_bal = np.bincount(y[idx], minlength=6) / 600
    share_rand = np.bincount(y[rand], minlength=6) / 600
    # random keeps the 90 % dominance (0.9); balanced sampling brings class 0 to 0.375 (3 of the 8
    # top clusters hold class 0, each gets 75 points) and every rare class to 0.125
    assert share_rand[0] > 0.85
    assert share_bal[0] < 0.40, share_bal
    assert share_bal[1:].min() > 0.08, share_bal
    m_bal = hs.balance_metrics(tree.labels[idx], tree.labels, y[idx])
    m_rand = hs.balance_metrics(tree.labels[rand], tree.labels, y[rand])
    assert m_bal["dominant_class_share"] < 0.40 < 0.85 < m_rand["dominant_class_share"]
    assert m_bal["class_entropy"] > 0.9 > 0.5 > m_rand["class_entropy"]
    assert m_bal["entropy_level_2"] > m_rand["entropy_level_2"]
    assert m_bal["coverage_level_1"] == 1.0


def test_metadata_sample_even_over_groups():
    groups = np.array(["a"] * 900 + ["b"] * 80 + ["c"] * 20)
    idx = hs.metadata_sample(groups, 120, random_state=0)
    counts = {g: int((groups[idx] == g).sum()) for g in "abc"}
    assert counts == {"a": 50, "b": 50, "c": 20}


def test_balance_metrics_hand_example():
    full = np.array([0, 0, 0, 0, 1, 1, 2, 3])
    m = hs.balance_metrics(np.array([0, 1, 2, 3]), full, np.array([0, 0, 1, 1]), class_names=["x", "y"])
    assert m["entropy_level_1"] == pytest.approx(1.0)
    assert m["coverage_level_1"] == 1.0
    assert m["class_share_x"] == 0.5 and m["dominant_class_share"] == 0.5 and m["class_entropy"] == pytest.approx(1)
    m = hs.balance_metrics(np.array([0, 0]), full)
    assert m["entropy_level_1"] == 0.0 and m["coverage_level_1"] == 0.25


def test_stratified_batches_equal_shares_least_seen_first_and_slide_cap():
    import torch.utils.data as tud

    labels = np.repeat([0, 1, 2, 3], [700, 200, 60, 40])  # skewed clusters
    slides = np.arange(1000) % 25
    bs = hs.StratifiedBatchSampler(labels, 64, n_batches=20, random_state=0)
    batches = bs.schedule(0)
    for b in batches:
        assert np.bincount(labels[b], minlength=4).tolist() == [16, 16, 16, 16]
    # least seen first: cluster 3 (40 tiles) drawn 320 times -> every tile exactly 8 times
    seen3 = bs.seen_[labels == 3]
    assert seen3.min() == seen3.max() == 8
    seen0 = bs.seen_[labels == 0]  # 320 of 700 drawn once, none twice
    assert seen0.max() == 1 and seen0.sum() == 320
    # a DataLoader accepts it as batch_sampler
    ds = tud.TensorDataset(__import__("torch").arange(1000))
    dl = tud.DataLoader(ds, batch_sampler=hs.StratifiedBatchSampler(labels, 10, n_batches=3))
    assert [len(x[0]) for x in dl] == [10, 10, 10]
    # slide cap: one epoch touches at most 5 slides
    bs = hs.StratifiedBatchSampler(labels, 32, slide_ids=slides, max_slides_per_epoch=5, n_batches=10)
    used = np.unique(slides[np.concatenate(bs.schedule(0))])
    assert len(used) <= 5
    # deterministic per (seed, epoch)
    a = hs.StratifiedBatchSampler(labels, 32, n_batches=3, random_state=7).schedule(1)
    b = hs.StratifiedBatchSampler(labels, 32, n_batches=3, random_state=7).schedule(1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_sample_store_round_trip(tmp_path):
    from test_cluster import make_store

    path = tmp_path / "ds.zarr"
    make_store(path)
    hc.fit_store(path, "toy", "t", levels=[16, 4], backend="torch", device="cpu")
    idx = hs.sample_store(path, "t", "bal100", 100, strategy="closest")
    np.testing.assert_array_equal(hs.load_sample(path, "bal100"), idx)
    assert len(idx) == 100 and idx.dtype == np.int64
    from workbench import store as st

    attrs = st.open_store(path)[st.Key.sample("bal100")].attrs["parameters"]
    assert attrs["tree_run"] == "t" and attrs["n_sampled"] == 100 and attrs["strategy"] == "closest"
