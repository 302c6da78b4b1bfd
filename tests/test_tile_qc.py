import shutil

import numpy as np

from workbench import store as st
from workbench.features.tile_qc import compute_store, read_store, tile_qc
from workbench.io.synthetic import load_truth, tile_truth


def _auc(scores, labels):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(labels, scores)


def test_metrics_on_hand_made_tiles():
    import cv2

    white = np.full((64, 64, 3), 245, np.uint8)
    pink = np.zeros((64, 64, 3), np.uint8)
    pink[::2] = (220, 120, 180)
    pink[1::2] = (150, 60, 140)  # stripes: sharp texture
    blurred = cv2.GaussianBlur(pink, (0, 0), 4)
    blue = np.full((64, 64, 3), (40, 60, 200), np.uint8)
    q = tile_qc(np.stack([white, pink, blurred, blue]))
    np.testing.assert_allclose(q["background"], [1, 0, 0, 0])
    np.testing.assert_allclose(q["pen_colour"], [0, 0, 0, 1])
    assert q["blur"][1] > 100 * q["blur"][2]


def test_store_columns_follow_truth(tiled_store, tmp_path):
    path = tmp_path / "qc.zarr"
    shutil.copytree(tiled_store, path)
    done = compute_store(path, progress=False)
    root = st.open_store(path)
    assert set(done) == set(st.slide_ids(root))
    assert compute_store(path, progress=False) == {}  # complete: skipped
    pen_scores, pen_labels = [], []
    for sid in st.slide_ids(root):
        g = root[st.Key.slide(sid)]
        truth = tile_truth(load_truth(g.attrs["path"]), g["coords"][:], g.attrs["size0"])
        qc = read_store(root, sid)
        pen_scores.append(qc["pen_colour"])
        pen_labels.append(truth["pen"] >= 0.3)
    pen_scores, pen_labels = np.concatenate(pen_scores), np.concatenate(pen_labels)
    assert pen_labels.sum() > 5
    assert _auc(pen_scores, pen_labels) > 0.85
