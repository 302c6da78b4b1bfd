"""Retrieval metrics against hand-computed examples and SISH's own loop, and the store-level evaluation."""

import math
from collections import Counter

import numpy as np
import pytest
from test_retrieval import make_feature_store

from workbench.search import evaluate as E
from workbench.search import retrieval as R

# query labels and their ranked results (None = fewer results than k)
Q = ["A", "B", "C", "C"]
RES = [
    ["A", "B", "A", "C", "A"],
    ["A", "B", "B", "A", None],
    ["C", "C", None, None, None],
    ["C", "C", "C", None, None],
]


def test_metrics_worked_example():
    q, r, names = E.encode_labels(Q, RES)
    # precision@5: 3/5, 2/5, 2/5, 3/5 (missing results count as wrong)
    np.testing.assert_allclose(E.precision_at_k(q, r, 5), [0.6, 0.4, 0.4, 0.6])
    np.testing.assert_allclose(E.precision_at_k(q, r, 1), [1, 0, 1, 1])
    # AP@5 = sum over relevant ranks of precision@i, / 5:
    #   row 0: ranks 1, 3, 5 -> (1 + 2/3 + 3/5) / 5;  row 1: ranks 2, 3 -> (1/2 + 2/3) / 5
    #   row 2: ranks 1, 2 -> 2 / 5;  row 3: ranks 1, 2, 3 -> 3 / 5
    np.testing.assert_allclose(
        E.average_precision_at_k(q, r, 5), [(1 + 2 / 3 + 3 / 5) / 5, (1 / 2 + 2 / 3) / 5, 2 / 5, 3 / 5]
    )
    # majority vote@5: A (3 votes) right; A-B tie at 2 -> A, ranked first, wrong; C with 2 of 2 results
    # but 2 < ceil(5/2) = 3 -> wrong; C with 3 of 3 results -> right
    np.testing.assert_array_equal(E.majority_vote_at_k(q, r, 5), [True, False, False, True])
    np.testing.assert_array_equal(E.majority_vote_at_k(q, r, 1), [True, False, True, True])
    # mv@3: row 1 is A, B, B -> B right; row 2 has C, C: 2 >= ceil(3/2) -> right; mv@4 row 2: 2 >= 2 -> right,
    # mv@6 row 3: 3 >= 3 -> right, row 2: 2 < 3 -> wrong
    np.testing.assert_array_equal(E.majority_vote_at_k(q, r, 3), [True, True, True, True])
    np.testing.assert_array_equal(E.majority_vote_at_k(q, r, 6), [True, False, False, True])


def sish_loop(query, ret, k):
    """SISH eval.py's mMV and AP for one query (AP divided by k), transcribed as loops."""
    ret = [x for x in ret[:k] if x is not None]
    corr = [i for i, x in enumerate(ret) if x == query]
    ap = sum(sum(1 for j in range(i + 1) if ret[j] == query) / (i + 1) for i in corr) / k
    if not ret:
        return False, ap
    hit, count = Counter(ret).most_common(1)[0]
    mv = hit == query and (len(ret) == k or count >= math.ceil(k / 2))
    return mv, ap


def test_metrics_equal_sish_loop_on_random_lists():
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c", None]
    q = rng.choice(labels[:3], 300).tolist()
    res = [[labels[i] for i in rng.integers(0, 3, int(rng.integers(0, 8)))] for _ in q]
    qc, rc, _ = E.encode_labels(q, E.labels_matrix(res, 10))
    for k in (1, 5, 10):
        ref = [sish_loop(a, b, k) for a, b in zip(q, res)]
        np.testing.assert_array_equal(E.majority_vote_at_k(qc, rc, k), [m for m, _ in ref])
        np.testing.assert_allclose(E.average_precision_at_k(qc, rc, k), [a for _, a in ref])


def test_tables_per_class_macro_overall():
    t = E.tile_retrieval_metrics(Q, RES, ks=(1, 5))
    assert list(t.index) == ["A", "B", "C", "macro", "overall"]
    assert t.loc["C", "n_queries"] == 2 and t.loc["C", "mv@5"] == 0.5
    assert t.loc["macro", "mv@5"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert t.loc["overall", "mv@5"] == pytest.approx(2 / 4)
    assert t.loc["overall", "precision@5"] == pytest.approx(0.5)
    s = E.slide_retrieval_metrics(Q, RES, ks=(5,), sites=["lung", "lung", "skin", "lung"])
    assert s.loc["site:lung", "n_queries"] == 3 and s.loc["site:lung", "mMV@5"] == pytest.approx(2 / 3)
    assert s.loc["site:skin", "mAP@5"] == pytest.approx(2 / 5)
    assert set(s["level"]) == {"class", "macro", "site", "overall"}


def test_store_evaluation_beats_chance(tmp_path):
    path, tile_labels = make_feature_store(tmp_path / "ds.zarr")
    si = R.build_store_index(path, "toy", "ivf", nlist=8, nprobe=4, save=False)
    table, query_ms = E.evaluate_tiles(si, tile_labels, ks=(1, 5, 10), n_queries=300)
    # 4 tile classes (3 diagnoses + shared stroma, ~1/6 each diagnosis, 1/2 stroma): chance mv@5 for a
    # diagnosis tile is ~1/6; the toy clusters are well separated
    assert table.loc["macro", "mv@5"] > 0.9 and table.loc["macro", "precision@10"] > 0.8
    assert query_ms > 0
    for ranking in ("sish", "mean"):
        stable, per_query, slide_ms = E.evaluate_slides(
            si, ks=(1, 5), ranking=ranking, by="features", white_filter=False
        )  # the toy store has no pixels
        assert len(per_query) == 18
        # leave-one-patient-out: never the query's own slide or its patient's other slide
        for sid, got in zip(per_query["slide_id"], per_query["retrieved_slides"]):
            partner = f"s{int(sid[1:]) ^ 1:02d}"
            assert sid not in got and partner not in got
        # 3 balanced diagnoses: chance mMV@5 is about 1/3. Measured 1.0 for both rankings (mAP@5 0.80): SISH's
        # mosaic keeps colour clusters under 20 tiles whole, and the toy slides have 30-60 tiles, so every tile
        # queries. The former mosaic (one tile per small cluster) scored 0.72 with SISH's ranking, under this floor.
        floor = {"sish": 0.9, "mean": 0.95}[ranking]
        assert stable.loc["overall", "mMV@5"] >= floor, (ranking, stable)
        assert stable.loc["overall", "mAP@5"] >= 0.7
        assert slide_ms > 0


@pytest.mark.slow
def test_demo_chain_beats_chance(tmp_path):
    """Synthetic demo slides -> tiles -> stain-texture embeddings -> flat index: tile and slide retrieval far
    above chance. Tile chance (random retrieval): macro precision = 1 / n_classes. Slide chance: a random
    ranking of the other patients' slides (:func:`chance_slide_metrics`). About 1.5 min on 2 cores; measured
    (16 slides of 4096 px): tile macro mv@5 0.80 (chance 0.20), slide mMV@1 0.69 (chance about 0.2)."""
    synthetic = pytest.importorskip("workbench.io.synthetic", reason="workbench.io.synthetic has not landed yet")
    embed = pytest.importorskip(
        "workbench.features.embed", reason="workbench.features.embed.embed_slides has not landed yet"
    )
    from workbench.io.tiling import tile_slides

    manifest = synthetic.make_demo_set(tmp_path / "demo", n_slides=16, size=4096)
    store = tmp_path / "demo.zarr"
    tile_slides(manifest, store)
    embed.embed_slides(store, "stain-texture", progress=False)
    si = R.build_store_index(store, "stain-texture", "flat")
    labels = E.synthetic_tile_labels(si)
    table, _ = E.evaluate_tiles(si, labels, ks=(1, 5, 10), n_queries=500)
    chance = 1.0 / int((table["level"] == "class").sum())
    assert table.loc["macro", "precision@5"] >= chance + 0.4, table
    assert table.loc["macro", "mv@5"] >= chance + 0.4, table
    base = E.chance_slide_metrics(si.slides, ks=(1, 5))
    stable, per_query, _ = E.evaluate_slides(si, ks=(1, 5), ranking="sish")
    assert stable.loc["overall", "mMV@1"] >= base["mMV@1"] + 0.3, (stable, base)
    assert stable.loc["overall", "mMV@5"] >= base["mMV@5"] + 0.2, (stable, base)
    assert stable.loc["overall", "mAP@5"] >= base["mAP@5"] + 0.1, (stable, base)
