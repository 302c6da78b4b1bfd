"""QC labels: pure label arithmetic, regions → tiles, and the store round trip (workbench.ui.qc).

``make_test_store`` (also used by test_napari.py and test_widgets.py) writes a small pyramidal JPEG TIFF
with a pink tissue disc and a blue pen stroke, tiles it into a store and adds prefilter scores, a tree
and a sample, so every per-tile column has known values.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd
import pytest
from conftest import hold_store_lock

from workbench import store as st
from workbench.ui import qc

TILE = 224
W, H = 3584, 2688  # 16 x 12 tile grid at 0.5 mpp


def write_pyramid_tiff(path, rgb: np.ndarray, mpp: float = 0.5, levels: int = 3):
    """Pyramidal tiled JPEG TIFF (resolution in centimetres), readable by OpenSlide's generic TIFF reader."""
    import cv2
    import tifffile

    res = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        img = rgb
        for level in range(levels):
            tif.write(
                img,
                tile=(256, 256),
                compression="jpeg",
                photometric="rgb",
                resolution=(res / 2**level, res / 2**level),
                resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
            )
            img = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)


def synthetic_rgb(seed: int = 0):
    """(H, W, 3) uint8: white background, a textured pink ellipse of tissue, a blue pen line; and the pen mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    tissue = ((xx - W * 0.45) / (W * 0.33)) ** 2 + ((yy - H * 0.5) / (H * 0.38)) ** 2 <= 1
    rgb = np.full((H, W, 3), 242, np.uint8)
    noise = rng.integers(-20, 20, size=(H // 8 + 1, W // 8 + 1, 1)).repeat(8, 0).repeat(8, 1)[:H, :W]
    pink = np.clip(np.array([215, 120, 170]) + noise, 0, 255).astype(np.uint8)
    rgb[tissue] = pink[tissue]
    pen = (np.abs(xx - (W * 0.8)) < 60) & (yy > H * 0.2) & (yy < H * 0.8)
    rgb[pen] = (40, 60, 190)
    return rgb, pen


_TEMPLATES: dict = {}


def make_test_store(tmp_path, n_slides: int = 2):
    """A tiled store of ``n_slides`` synthetic slides plus prefilter/tree/sample arrays; returns its path.

    Built once per test session, then copied (the copies share the read-only slide files).
    """
    import shutil

    template = _TEMPLATES.get(n_slides)
    if template is not None and template.exists():
        shutil.copytree(template, tmp_path / "ds.zarr")
        return tmp_path / "ds.zarr"
    template_dir = tmp_path.parent / f"qc-template-{n_slides}"
    template_dir.mkdir(exist_ok=True)
    _TEMPLATES[n_slides] = _build_test_store(template_dir, n_slides)
    return make_test_store(tmp_path, n_slides)


def _build_test_store(tmp_path, n_slides: int):
    from workbench.io.manifest import to_records, validate_manifest
    from workbench.io.tiling import TilingParams, tile_slides

    rows = []
    for i in range(n_slides):
        rgb, pen = synthetic_rgb(i)
        path = tmp_path / f"s{i}.tiff"
        write_pyramid_tiff(path, rgb)
        np.savez(tmp_path / f"s{i}.tiff.truth.npz", pen=pen[::16, ::16], downsample=16)
        rows.append({"slide_id": f"s{i}", "path": str(path), "patient_id": f"p{i}"})
    store = tmp_path / "ds.zarr"
    # create the store first (tile_slides resumes it): tile_slides' lock file makes a fresh directory non-empty
    st.create_store(store, manifest=to_records(validate_manifest(pd.DataFrame(rows))), tiling=TilingParams().to_dict())
    summary = tile_slides(pd.DataFrame(rows), store, progress=False, scheduler="synchronous")
    assert (summary.status == "tiled").all(), summary
    with st.write_lock(store):
        root = st.open_store(store, mode="a")
        counts = st.tile_counts(root)
        total = int(counts.sum())
        for s in st.slide_ids(root):
            coords = root[st.Key.coords(s)][:]
            score = (coords[:, 0] / W).astype(np.float32)  # known: rises left to right
            g = root.require_group(st.Key.prefilter(s, "marker").rsplit("/", 1)[0])
            arr = st.write_array(g, "marker", score, attrs={"threshold": 0.75})
            st.mark_complete(arr)
        tree = root.require_group(st.Key.tree("t1"))
        st.write_array(tree, "level_1", (np.arange(total) % 7).astype(np.int32))
        sample = root.require_group(st.Key.sample("r1"))
        st.write_array(sample, "indices", np.arange(0, total, 3, dtype=np.int64))
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_test_store(tmp_path_factory.mktemp("qc"))


# --------------------------------------------------------------------------- pure functions


def test_label_values_and_set_labels():
    assert qc.label_value("marker") == 1 and qc.label_value(2) == 2 and qc.label_value("unlabelled") == -1
    with pytest.raises(ValueError, match="unknown QC label"):
        qc.label_value("pen")
    labels = np.full(6, -1, np.int8)
    out = qc.set_labels(labels, [1, 4], "artefact")
    assert out.tolist() == [-1, 2, -1, -1, 2, -1] and labels.tolist() == [-1] * 6  # a copy
    assert qc.counts(out) == {"n_unlabelled": 4, "n_keep": 0, "n_marker": 0, "n_artefact": 2, "n_labelled": 2}
    with pytest.raises(ValueError, match="slide 'x'.*shape"):
        qc.check_labels(out, 5, "x")
    with pytest.raises(ValueError, match=r"values \[7\]"):
        qc.check_labels(np.array([0, 7]), 2, "x")


def test_tiles_in_polygon_matches_centre_rule():
    # 10 x 10 grid of 100-px tiles
    gy, gx = np.mgrid[0:10, 0:10]
    coords = np.stack([gx.ravel() * 100, gy.ravel() * 100], axis=1)
    rect = np.array([[200, 300], [600, 300], [600, 500], [200, 500]])  # x 200..600, y 300..500
    inside = qc.tiles_in_polygon(coords, 100, rect)
    centres = coords + 50
    ref = (centres[:, 0] > 200) & (centres[:, 0] < 600) & (centres[:, 1] > 300) & (centres[:, 1] < 500)
    assert inside.sum() == 8 and np.array_equal(inside, ref)  # 4 columns x 2 rows
    tri = np.array([[0, 0], [1010, 0], [0, 1010]])
    below = qc.tiles_in_polygon(coords, 100, tri)
    assert below.sum() == 55 and np.array_equal(below, centres.sum(axis=1) < 1010)  # x + y < 1010
    union = qc.tiles_in_regions(coords, 100, [rect, tri])
    assert union.sum() == (ref | below).sum()
    ell = qc.ellipse_polygon(np.array([[0, 0], [1000, 0], [1000, 1000], [0, 1000]]), n=256)
    disc = qc.tiles_in_polygon(coords, 100, ell)
    assert np.array_equal(disc, ((centres - 500) ** 2).sum(axis=1) < 500**2)
    with pytest.raises(ValueError, match="k >= 3"):
        qc.tiles_in_polygon(coords, 100, np.array([[0, 0], [1, 1]]))


def test_mask_fraction_exact():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # left half, at downsample 4
    coords = np.array([[0, 0], [8, 0], [16, 0], [24, 8]])  # 8-px tiles = 2 mask px
    frac = qc.mask_fraction(mask, 4.0, coords, 8)
    assert frac.tolist() == [1.0, 1.0, 0.5, 0.0]  # the third straddles mask columns 4 (in) and 5 (out)


# --------------------------------------------------------------------------- store round trip


def test_write_read_round_trip_and_audit(store):
    root = st.open_store(store)
    n = root[st.Key.coords("s0")].shape[0]
    assert n > 50
    assert (qc.read_labels(root, "s0") == -1).all() and qc.read_info(root, "s0")["edit_count"] == 0
    labels = qc.set_labels(np.full(n, -1, np.int8), [0, 1, 2], "marker")
    before = time.time()
    info = qc.write_labels(store, "s0", labels, regions=[{"label": 1, "vertices": [[0, 0], [10, 0], [0, 10]]}])
    assert info["edit_count"] == 1
    labels = qc.set_labels(labels, [5], "keep")
    info = qc.write_labels(store, "s0", labels, edits=3)
    assert info["edit_count"] == 4 and before - 1 <= info["last_edit_unix"] <= time.time()
    root = st.open_store(store)  # reopen: what a new napari session sees
    got = qc.read_labels(root, "s0")
    assert got.dtype == np.int8 and got[:3].tolist() == [1, 1, 1] and got[5] == 0 and (got[6:] == -1).all()
    saved = qc.read_info(root, "s0")
    assert saved["edit_count"] == 4 and saved["regions"][0]["label"] == 1  # regions kept when not given
    table = qc.qc_table(root).set_index("slide_id")
    assert table.loc["s0", "n_marker"] == 3 and table.loc["s0", "n_keep"] == 1 and table.loc["s1", "n_labelled"] == 0
    gid, lab = qc.training_labels(root)
    assert gid.tolist() == [0, 1, 2, 5] and lab.tolist() == [1, 1, 1, 0]  # s0 is first: global = local ids
    # global ids of the second slide start after the first slide's tiles
    n1 = root[st.Key.coords("s1")].shape[0]
    qc.write_labels(store, "s1", qc.set_labels(np.full(n1, -1, np.int8), [4], "artefact"))
    gid, lab = qc.training_labels(st.open_store(store))
    assert gid[-1] == n + 4 and lab[-1] == 2


def test_write_refuses_bad_input_and_waits_for_lock(store):
    with pytest.raises(ValueError, match="slide 's0'"):
        qc.write_labels(store, "s0", np.zeros(3, np.int8))
    with pytest.raises(st.StoreError, match="not tiled"):
        qc.write_labels(store, "nope", np.zeros(3, np.int8))
    root = st.open_store(store)
    n = root[st.Key.coords("s1")].shape[0]
    count = qc.read_info(root, "s1")["edit_count"]
    with hold_store_lock(store, timeout=5) as release:
        with pytest.raises(st.StoreError, match="being written by another run"):
            qc.write_labels(store, "s1", np.zeros(n, np.int8), wait=0.3)
        assert qc.read_info(st.open_store(store), "s1")["edit_count"] == count  # nothing written
        threading.Timer(0.3, release.set).start()
        info = qc.write_labels(store, "s1", np.zeros(n, np.int8), wait=5)  # waits, then writes
    assert info["edit_count"] == count + 1 and (qc.read_labels(st.open_store(store), "s1") == 0).all()
