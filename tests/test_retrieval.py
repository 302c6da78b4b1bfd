"""Tile index (exact / approximate, leave-one-group-out), persistence and staleness, mosaics, SISH ranking."""

import json

import numpy as np
import pytest

from workbench.search import retrieval as R
from workbench.store import Key, create_store, mark_complete, open_store, write_array


def brute_force(x, groups, q, qg, k):
    """Reference: exact cosine top-k with the query's group masked out."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = qn @ xn.T
    sims[groups[None, :] == np.asarray(qg)[:, None]] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order


@pytest.fixture(scope="module")
def crowded():
    """Group 0 is a tight blob of 600 rows around the queries: their nearest 600 rows are all their own."""
    rng = np.random.default_rng(0)
    blob = rng.normal(size=(1, 32)) * 5 + rng.normal(size=(600, 32)) * 0.3
    centres = rng.normal(size=(50, 32)) * 3
    rest = centres[rng.integers(0, 50, 3400)] + rng.normal(size=(3400, 32))
    x = np.vstack([blob, rest]).astype(np.float32)
    groups = np.concatenate([np.zeros(600, int), 1 + np.arange(3400) // 20])
    queries = x[:20] + rng.normal(size=(20, 32)).astype(np.float32) * 0.05
    return x, groups, queries


def test_flat_search_equals_brute_force_with_exclusion(crowded):
    x, groups, q = crowded
    idx = R.TileIndex("flat").fit(x, groups=groups)
    scores, ids = idx.search(q, 10, exclude_groups=np.zeros(len(q), int))
    ref_s, ref_i = brute_force(x, groups, q, np.zeros(len(q)), 10)
    assert (groups[ids] != 0).all()  # never the query's own group, though all 600 nearest rows are in it
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    # without exclusion the nearest rows are the own group's
    _, own = idx.search(q, 10)
    assert (groups[own] == 0).all()


@pytest.mark.parametrize("kind,params", [("ivf", {"nlist": 64, "nprobe": 2}), ("hnsw", {"M": 16, "ef_search": 16})])
def test_approximate_indexes_exclude_and_recall(crowded, kind, params):
    x, groups, q = crowded
    idx = R.TileIndex(kind, **params).fit(x, groups=groups)
    scores, ids = idx.search(q, 10, exclude_groups=np.zeros(len(q), int))
    assert (ids >= 0).all() and (groups[ids] != 0).all()
    _, ref = brute_force(x, groups, q, np.zeros(len(q)), 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref)])
    assert recall >= 0.8, recall
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_fewer_results_than_k_are_padded():
    x = np.eye(5, dtype=np.float32) + 0.01
    groups = np.array(["a", "a", "b", "b", "c"])
    idx = R.TileIndex("flat").fit(x, groups=groups)
    scores, ids = idx.search(x[:1], 4, exclude_groups=["c"])
    assert sorted(ids[0, :4].tolist()) == [0, 1, 2, 3]
    scores, ids = idx.search(x[:2], 4, exclude_groups=["a", "b"])
    assert sorted(ids[0, :3].tolist()) == [2, 3, 4] and ids[0, 3] == -1 and scores[0, 3] == -np.inf
    assert sorted(ids[1, :3].tolist()) == [0, 1, 4] and ids[1, 3] == -1
    # a group unknown to the index excludes nothing
    _, ids = idx.search(x[:1], 2, exclude_groups=["zzz"])
    assert ids[0, 0] == 0


def test_cosine_is_scale_invariant_and_l2_metric():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    a = R.TileIndex("flat").fit(x)
    b = R.TileIndex("flat").fit(x * rng.uniform(0.1, 10, size=(200, 1)).astype(np.float32))
    np.testing.assert_array_equal(a.search(x[:5], 5)[1], b.search(x[:5], 5)[1])
    l2 = R.TileIndex("flat", metric="l2").fit(x)
    d, i = l2.search(x[:3], 1)
    np.testing.assert_array_equal(i[:, 0], [0, 1, 2])
    np.testing.assert_allclose(d[:, 0], 0, atol=1e-5)


def test_invalid_parameters_are_refused():
    x = np.ones((10, 4), np.float32)
    with pytest.raises(ValueError, match="kind"):
        R.TileIndex("annoy").fit(x)
    with pytest.raises(ValueError, match="metric"):
        R.TileIndex(metric="hamming").fit(x)
    with pytest.raises(RuntimeError, match="not built"):
        R.TileIndex().search(x, 1)
    with pytest.raises(ValueError, match="built without groups"):
        R.TileIndex().fit(x).search(x, 1, exclude_groups=np.zeros(10))


def test_save_load_round_trip_and_stale_refusal(tmp_path, crowded):
    x, groups, q = crowded
    idx = R.TileIndex("ivf", nlist=32, nprobe=4).fit(x, groups=groups.astype(str))
    path = idx.save(tmp_path / "i.faiss")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["n"] == len(x) and meta["dim"] == 32 and meta["digest"] == R.array_digest(x)
    back = R.TileIndex.load(path, expected_digest=R.array_digest(x))
    a = idx.search(q, 10, exclude_groups=np.full(len(q), "0"))
    b = back.search(q, 10, exclude_groups=np.full(len(q), "0"))
    np.testing.assert_array_equal(a[1], b[1])
    assert back.index_.nprobe == 4
    x2 = x.copy()
    x2[0] += 1
    with pytest.raises(R.StaleIndexError, match="rebuild"):
        R.TileIndex.load(path, expected_digest=R.array_digest(x2))


# --------------------------------------------------------------------------- mosaic


def test_mosaic_rule_counts_and_drops_white():
    rng = np.random.default_rng(0)
    # 3 colour groups of 100, 40 and 10 tiles, plus 20 near-white tiles
    sizes = [100, 40, 10]
    feats = np.vstack([np.full((n, 4), c, float) + rng.normal(size=(n, 4)) * 0.01 for c, n in enumerate(sizes)])
    feats = np.vstack([feats, np.full((20, 4), 9.0)])
    coords = rng.integers(0, 10_000, size=(len(feats), 2))
    keep = np.arange(len(feats)) < 150
    m = R.mosaic(coords, feats, keep=keep, n_colour=3, rate=0.05)
    # SISH: int(5 % of each colour cluster) spatial clusters, a cluster under 20 tiles kept whole:
    # int(5) + int(2) + all 10 = 17
    assert len(m) == 17
    assert (m < 150).all()
    assert ((m < 100).sum(), ((m >= 100) & (m < 140)).sum(), (m >= 140).sum()) == (5, 2, 10)


def test_near_white_and_colour_histograms():
    tiles = np.zeros((3, 8, 8, 3), np.uint8)
    tiles[0] = 250
    tiles[1] = 250
    tiles[1, :2] = 100  # 25 % dark: not near-white
    tiles[2, :, :, 0] = 255
    np.testing.assert_array_equal(R.near_white(tiles), [True, False, False])
    grey = np.full((2, 4, 4, 3), 235, np.uint8)
    grey[1] = 236
    np.testing.assert_array_equal(R.near_white(grey), [False, True])  # SISH: strictly above 235
    h = R.colour_histograms(tiles, bins=4)
    assert h.shape == (3, 12)
    np.testing.assert_allclose(h.reshape(3, 3, 4).sum(-1), 1)
    np.testing.assert_allclose(h[2], [0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0])


# --------------------------------------------------------------------------- SISH ranking


def test_label_weights_sum_to_ten_inverse_frequency():
    w = R.label_weights(["a", "a", "a", "b"])
    assert w["a"] + w["b"] == pytest.approx(10)
    assert w["b"] == pytest.approx(3 * w["a"])  # 1/1 vs 1/3 -> 7.5 and 2.5
    assert w["b"] == pytest.approx(7.5)


def test_sish_list_length_filter_fires_on_varied_lengths_and_max_distance_varies_them(feature_store):
    # SISH's clean step: with more than 3 distinct list lengths, keep lists strictly between the 5th and 95th
    # percentile of the lengths. Lengths 1..6 -> percentiles 1.25 and 5.75 -> the 1-hit and 6-hit lists go.
    hits = [[(f"t{i}s{j}", 0.125, "X") for j in range(i + 1)] for i in range(6)]  # exact in binary
    ranked = R.sish_rank(hits, {"X": 1.0})
    assert {r["mosaic"] for r in ranked} == {1, 2, 3, 4}
    # 3 distinct lengths: no length filter (the guard), every list takes part
    ranked = R.sish_rank(hits[:3], {"X": 1.0})
    assert {r["mosaic"] for r in ranked} == {0, 1, 2}
    # with fixed-k lists every length is k: max_distance (SISH's Hamming threshold) makes them differ
    path, _ = feature_store
    si = R.build_store_index(path, "toy", "flat", save=False)
    seen = []
    orig = R.sish_rank
    try:
        R.sish_rank = lambda h, w: seen.append([len(x) for x in h if x]) or orig(h, w)
        si.query_slide("s04", k_tiles=15, by="features", white_filter=False)
        scores, ids = si.query_tiles(si.slide_tiles("s04"), 15)
        cut = float(np.median(1 - scores[ids >= 0]))  # half the hits lie beyond it
        si.query_slide("s04", k_tiles=15, by="features", white_filter=False, max_distance=cut)
    finally:
        R.sish_rank = orig
    assert set(seen[0]) == {15}
    assert len(set(seen[1])) > 3 and max(seen[1]) <= 15


def test_sish_rank_worked_example():
    # w(X) = w(Y) = 5.  m0: all X -> entropy 0.  m1: Y at rank 0, X at rank 1 -> weights 5, 2.5 ->
    # p = (2/3, 1/3), entropy 0.918.  m2: entropy 0 but top-5 mean distance 0.55 > t = mean(0.15, 0.2, 0.55)
    # = 0.3 -> cleaned.  Vote of m0 + m1: X = 1 + 1/3 > Y = 2/3 -> X; m1's majority Y disagrees -> removed
    # (s3 drops, and s1 is kept once, from m0).
    hits = [
        [("s1", 0.1, "X"), ("s2", 0.2, "X")],
        [("s3", 0.1, "Y"), ("s1", 0.3, "X")],
        [("s4", 0.5, "Y"), ("s5", 0.6, "Y")],
        [],
    ]
    ranked = R.sish_rank(hits, {"X": 5.0, "Y": 5.0})
    assert [r["slide"] for r in ranked] == ["s1", "s2"]
    assert [r["label"] for r in ranked] == ["X", "X"]
    assert ranked[0]["entropy"] == 0 and ranked[0]["distance"] == pytest.approx(0.1)
    # without m0 the vote goes to Y; m1 alone is kept, and only hits within t enter
    ranked = R.sish_rank(hits[1:], {"X": 5.0, "Y": 5.0})
    # t = mean(0.2, 0.55) = 0.375; m2 cleaned; m1 votes Y and is its own majority: s3 (0.1), s1 (0.3)
    assert [r["slide"] for r in ranked] == ["s3", "s1"]
    entropy = -(2 / 3) * np.log2(2 / 3) - (1 / 3) * np.log2(1 / 3)
    assert ranked[0]["entropy"] == pytest.approx(entropy)
    assert R.sish_rank([[], []], {"X": 1.0}) == []


def test_mean_similarity_rank():
    hits = [[("a", 0.9, "X"), ("a", 0.8, "X"), ("b", 0.7, "Y")], [("b", 0.6, "Y")]]
    ranked = R.mean_similarity_rank(hits)
    # a: (0.9 + 0) / 2 = 0.45; b: (0.7 + 0.6) / 2 = 0.65
    assert [r["slide"] for r in ranked] == ["b", "a"]
    assert ranked[0]["score"] == pytest.approx(0.65) and ranked[1]["score"] == pytest.approx(0.45)


# --------------------------------------------------------------------------- store glue


DIAG = ["luad", "lusc", "meso"]


def make_feature_store(path, *, n_slides=18, dim=24, seed=0):
    """A store with 18 slides (6 per diagnosis, 2 slides per patient): half the tiles of a slide carry its
    diagnosis' centre, the other half a "stroma" centre shared by all diagnoses."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, dim)) * 2
    manifest = [
        {
            "slide_id": f"s{i:02d}",
            "path": f"/nowhere/s{i:02d}.tif",
            "patient_id": f"p{i // 2:02d}",
            "site": ["lung", "pleura"][i % 2],
            "diagnosis": DIAG[(i // 2) % 3],
        }
        for i in range(n_slides)
    ]
    root = create_store(path, manifest=manifest, tiling={"tile_px": 224, "tile_mpp": 0.5})
    labels = []
    for i, rec in enumerate(manifest):
        n = int(rng.integers(30, 60))
        g = root.require_group(Key.slide(rec["slide_id"]))
        gx, gy = np.meshgrid(np.arange(10), np.arange(6))
        coords = (np.c_[gx.ravel(), gy.ravel()][:n] * 448).astype(np.int32)
        write_array(g, "coords", coords)
        write_array(g, "tissue", np.ones(n, np.float32))
        g.attrs.update({"path": rec["path"], "mpp": 0.25, "tile_px": 224, "tile_mpp": 0.5, "size0": 448})
        d = DIAG.index(rec["diagnosis"])
        signal = rng.random(n) < 0.5
        f = rng.normal(size=(n, dim)) + np.where(signal[:, None], centres[d], centres[3]) + rng.normal(size=dim) * 0.3
        fg = g.require_group("features")
        arr = write_array(fg, "toy", f.astype(np.float16), attrs={"encoder": "toy", "weights_digest": "w1"})
        mark_complete(arr)
        mark_complete(g)
        labels.append(np.where(signal, rec["diagnosis"], "stroma"))
    return path, np.concatenate(labels)


@pytest.fixture(scope="module")
def feature_store(tmp_path_factory):
    return make_feature_store(tmp_path_factory.mktemp("st") / "ds.zarr")


def test_store_index_tile_queries_leave_patient_out(feature_store):
    path, labels = feature_store
    si = R.build_store_index(path, "toy", "flat")
    assert R.index_path(path, "toy", "flat").exists()
    n = len(labels)
    q = np.arange(0, n, 7)
    scores, ids = si.query_tiles(q, 10)
    qslides = si.slides.iloc[si.slide_of(q)]
    hslides = si.slides.iloc[si.slide_of(ids.ravel())]
    assert (ids >= 0).all()
    assert not (np.repeat(qslides["patient_id"].to_numpy(), 10) == hslides["patient_id"].to_numpy()).any()
    # equals the brute force over the store's features with the patient masked
    feats = np.asarray(si.features, dtype=np.float32)
    groups = np.repeat(si.slides["group"].to_numpy(), si.slides["n_tiles"].to_numpy())
    _, ref = brute_force(feats, groups, feats[q], groups[q], 10)
    np.testing.assert_array_equal(ids, ref)
    hits = si.hits_table(scores, ids)
    assert len(hits) == ids.size and set(hits.columns) >= {"slide_id", "tile", "score", "diagnosis"}


def test_store_index_stale_after_reembedding(tmp_path):
    path, _ = make_feature_store(tmp_path / "ds.zarr", n_slides=6)
    R.build_store_index(path, "toy", "hnsw", M=8)
    R.load_store_index(path, "toy", "hnsw")  # fresh: loads
    root = open_store(path, mode="a")
    root[Key.features("s03", "toy")].attrs["weights_digest"] = "w2"  # re-embedded with other weights
    with pytest.raises(R.StaleIndexError, match="rebuild"):
        R.load_store_index(path, "toy", "hnsw")


def test_slide_query_excludes_own_patient_and_ranks_by_diagnosis(feature_store):
    path, _ = feature_store
    si = R.load_store_index(path, "toy", "flat")
    for ranking in ("sish", "mean"):
        out = si.query_slide("s00", k_tiles=15, ranking=ranking, by="features", white_filter=False)  # no pixels
        assert "s00" not in set(out["slide_id"]) and "s01" not in set(out["slide_id"])  # p00 owns s00, s01
        assert out["slide_id"].is_unique
        # the 4 luad slides of other patients come first (stroma mosaic tiles hit every diagnosis)
        assert (out["label"].iloc[:4] == "luad").all(), out
    m = si.mosaic("s00", by="features", white_filter=False)
    assert 1 <= len(m) <= len(si.slide_tiles("s00")) and set(m) <= set(si.slide_tiles("s00"))


def test_query_by_image_matches_query_by_tile_id(feature_store):
    path, _ = feature_store
    si = R.load_store_index(path, "toy", "flat")
    feats = np.asarray(si.features, dtype=np.float32)
    tiles = np.array([3, 100, 400])
    images = np.zeros((3, 4, 4, 3), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = tiles % 256, tiles // 256  # the "image" names its tile

    def encoder(imgs):  # any callable (n, h, w, 3) -> (n, d) works
        return feats[imgs[:, 0, 0, 0].astype(int) + 256 * imgs[:, 0, 0, 1].astype(int)]

    by_id = si.query_tiles(tiles, 5)[1]
    for i, t in enumerate(tiles):
        sid = si.slides["slide_id"].iloc[si.slide_of([t])[0]]
        np.testing.assert_array_equal(si.query_images(images[i : i + 1], 5, encoder, slide_id=sid)[1][0], by_id[i])
    # without a slide nothing is excluded: the tile finds itself first
    assert si.query_images(images[:1], 1, encoder)[1][0, 0] == 3
