"""Marker prefilter: estimator, JSON round-trip, store scoring, AUC on held-out synthetic slides."""

import json
import shutil

import numpy as np
import pytest

from workbench import store as st
from workbench.features.prefilter import (
    MarkerPrefilter,
    fit_from_store,
    flags,
    marker_metrics,
    qc_training_labels,
    score_store,
    training_data,
    truth_labels,
)


def test_estimator_matches_sklearn_and_roundtrips_json(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 6)) * [1, 2, 3, 4, 5, 0] + [0, 1, 0, 0, 0, 7]
    y = X[:, 0] + 0.5 * X[:, 1] + rng.normal(0, 0.3, 400) > 1.5
    pf = MarkerPrefilter(encoder="stain-texture").fit(X, y)
    Z = StandardScaler().fit_transform(X)
    ref = LogisticRegression(class_weight="balanced", random_state=0, max_iter=2000).fit(Z, y)
    np.testing.assert_allclose(pf.predict_proba(X), ref.predict_proba(Z)[:, 1], rtol=1e-6, atol=1e-9)
    assert pf.predict(X).dtype == bool
    assert (pf.predict(X) == (pf.predict_proba(X) >= 0.75)).all()
    path = pf.save(tmp_path / "pf.json")
    assert json.loads(path.read_text())["format"].startswith("workbench.MarkerPrefilter")
    assert b"\x80" not in path.read_bytes()  # plain text, not a pickle
    back = MarkerPrefilter.load(path)
    np.testing.assert_array_equal(back.predict_proba(X), pf.predict_proba(X))
    assert back.get_params() == pf.get_params()
    with pytest.raises(RuntimeError, match="not fitted"):
        MarkerPrefilter().predict(X)
    with pytest.raises(ValueError, match="both marker and non-marker"):
        MarkerPrefilter().fit(X, np.zeros(400))
    with pytest.raises(ValueError, match="threshold"):
        MarkerPrefilter(threshold=1.5).fit(X, y)
    Xn = X.copy()
    Xn[3] = np.nan
    assert np.isnan(pf.predict_proba(Xn)[3]) and not pf.predict(Xn)[3]


def test_metrics_known_values():
    m = marker_metrics([0, 0, 1, 1, 1], [0.1, 0.8, 0.9, 0.7, 0.95], threshold=0.75)
    assert m["marker_auc"] == pytest.approx(5 / 6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["n_flagged"] == 3 and m["n_tiles"] == 5


@pytest.fixture(scope="module")
def embedded_store(tiled_store, tmp_path_factory):
    from workbench.features.embed import embed_slides

    path = tmp_path_factory.mktemp("pf") / "store.zarr"
    shutil.copytree(tiled_store, path)
    embed_slides(path, "stain-texture", num_workers=0, progress=False)
    return path


def test_marker_auc_on_held_out_slides(embedded_store, tmp_path):
    root = st.open_store(embedded_store)
    labels = truth_labels(root)
    with_pen = [s for s, lab in labels.items() if lab.any()]
    assert len(with_pen) >= 3
    # train on two pen slides + two clean ones, test on the others (split by slide)
    train_ids = with_pen[:2] + [s for s in labels if s not in with_pen][:2]
    test_ids = [s for s in labels if s not in train_ids]
    pf = fit_from_store(root, "stain-texture", {s: labels[s] for s in train_ids})
    X, y, groups = training_data(root, "stain-texture", {s: labels[s] for s in test_ids})
    assert set(groups) == set(test_ids) and y.sum() >= 5
    m = marker_metrics(y, pf.predict_proba(X), pf.threshold)
    assert m["marker_auc"] >= 0.95, m
    assert m["recall"] >= 0.7 and m["precision"] >= 0.7, m

    summary = score_store(embedded_store, pf, name="marker")
    assert (summary.status == "scored").all()
    root = st.open_store(embedded_store)
    s = test_ids[0]
    arr = root[st.Key.prefilter(s, "marker")]
    assert arr.dtype == np.float32 and arr.attrs["complete"] and arr.attrs["threshold"] == 0.75
    assert arr.attrs["drop"] is False and arr.attrs["encoder"] == "stain-texture"
    feats = root[st.Key.features(s, "stain-texture")][:]
    np.testing.assert_allclose(arr[:], pf.predict_proba(feats).astype(np.float32))
    assert (flags(root, s) == (arr[:] >= 0.75)).all()
    assert int(summary.n_flagged.sum()) == sum(int(flags(root, i).sum()) for i in labels)
    with pytest.raises(ValueError, match="fitted on 'stain-texture'"):
        score_store(embedded_store, pf, "uni")


def test_qc_labels_feed_the_prefilter(embedded_store, tmp_path):
    path = tmp_path / "qc.zarr"
    shutil.copytree(embedded_store, path)
    root = st.open_store(path, mode="a")
    truth = truth_labels(root)
    s = next(k for k, v in truth.items() if v.any())
    lab = truth[s].copy()
    lab[::3] = -1  # unlabelled
    root.require_group(f"slides/{s}/qc").create_array("labels", data=lab.astype(np.int8))
    got = qc_training_labels(root)
    assert list(got) == [s] and (got[s] == lab).all()
    X, y, _ = training_data(root, "stain-texture", got)
    assert len(y) == (lab >= 0).sum() and y.sum() == (lab == 1).sum()
