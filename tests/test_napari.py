"""napari QC: lazy pyramid, layers and their data, QC edits that persist, a screenshot that shows the slide.

Runs a real napari viewer under Xvfb (pytest-xvfb starts it); skipped cleanly when napari, Qt or a
display is missing. The Qt-free parts (lazy pyramid, rasters, columns, manifest) run everywhere.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from test_qc import TILE, H, W, make_test_store
from workbench.ui import qc
from workbench import store as st
from workbench.ui.napari import _data

ARTIFACTS = Path(__file__).resolve().parents[1] / "runs" / "test-artifacts"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_test_store(tmp_path_factory.mktemp("napari"))


# --------------------------------------------------------------------------- Qt-free


def test_lazy_pyramid_reads_the_slide(store):
    from workbench.io.slides import open_slide

    root = st.open_store(store)
    info = st.read_slide(root, "s0")
    with open_slide(info["path"]) as slide:
        levels, ds = _data.slide_pyramid(slide, chunk=512)
        assert [lv.shape for lv in levels] == [(H, W, 3), (H // 2, W // 2, 3), (H // 4, W // 4, 3)]
        assert ds == [1.0, 2.0, 4.0] and levels[0].chunksize == (512, 512, 3)
        # a chunk-aligned read (TIFF fast path) and an unaligned one (OpenSlide) equal OpenSlide's pixels
        for y, x, h, w in [(1024, 1024, 512, 512), (1000, 1100, 300, 700), (H - 100, W - 200, 100, 200)]:
            got = np.asarray(levels[0][y : y + h, x : x + w])
            ref = slide.read_region(x, y, 0, w, h)
            assert got.shape == (h, w, 3) and np.abs(got.astype(int) - ref).max() <= 2
        arr = _data.LevelArray(slide, 0)
        assert arr.backend == "tiff-direct"
        centre = np.asarray(levels[1][H // 4 - 8 : H // 4 + 8, int(W * 0.45 / 2) - 8 : int(W * 0.45 / 2) + 8])
        assert centre[..., 1].mean() < 160 and centre[..., 0].mean() > 180  # pink tissue at the disc's centre


def test_huge_pyramid_opens_without_reading():
    class FakeSlide:  # 100k x 100k, 5 levels; any read would fail the test
        slide_id, level_count = "huge", 5
        level_dimensions = [(100_000 // 4**i, 100_000 // 4**i) for i in range(5)]
        level_downsamples = [4.0**i for i in range(5)]

        def read_region(self, *a):
            raise AssertionError("opening must not read pixels")

    import time

    t0 = time.perf_counter()
    levels, _ = _data.slide_pyramid(FakeSlide(), fast=False)
    assert time.perf_counter() - t0 < 1.0
    assert levels[0].shape == (100_000, 100_000, 3) and levels[0].numblocks == (196, 196, 1)


def test_rasters_and_columns(store):
    root = st.open_store(store)
    info = st.read_slide(root, "s1")
    coords, size0 = info["coords"], int(info["size0"])
    rows, cols, shape = _data.tile_grid(coords, size0, info["width"], info["height"])
    assert size0 == TILE and shape == (H // TILE, W // TILE)
    raster = _data.tile_raster(np.arange(len(coords)), rows, cols, shape, fill=-1)
    assert (raster >= 0).sum() == len(coords) and raster[rows[7], cols[7]] == 7
    x, y = coords[7] + size0 // 2
    assert _data.tile_at(coords, size0, x, y) == 7 and _data.tile_at(coords, size0, -5, -5) == -1
    names = _data.list_columns(root, "s1")
    assert names == ["tissue", "qc", "prefilter/marker", "tree/t1/level_1", "samples/r1"]
    n0 = root[st.Key.coords("s0")].shape[0]
    assert _data.slide_range(root, "s1") == (n0, n0 + len(coords))
    gid = n0 + np.arange(len(coords))
    assert np.array_equal(_data.column_values(root, "s1", "tree/t1/level_1"), gid % 7)  # sliced by global ids
    assert np.array_equal(_data.column_values(root, "s1", "samples/r1"), (gid % 3 == 0).astype(np.float32))
    assert np.allclose(_data.column_values(root, "s1", "prefilter/marker"), coords[:, 0] / W)
    pen, ds = _data.pen_truth(info["path"])
    assert ds == 16 and pen.shape == (H // 16, W // 16) and 0.01 < pen.mean() < 0.1
    assert _data.find_store_index(store, root, "s1") is None  # no features, no index


def test_npe2_manifest_validates():
    npe2 = pytest.importorskip("npe2")
    import workbench.ui.napari as wn

    path = Path(wn.__file__).with_name("napari.yaml")
    manifest = npe2.PluginManifest.from_file(path)
    assert manifest.name == "pathology-workbench"
    (widget,) = manifest.contributions.widgets
    (command,) = manifest.contributions.commands
    assert widget.command == command.id and command.python_name == "workbench.ui.napari._widget:make_qc_widget"
    manifest.validate_imports()  # every python_name resolves


# --------------------------------------------------------------------------- viewer


def _viewer_skip_reason() -> str | None:
    """Why a napari viewer cannot be made here (checked at collection, before Qt is touched), or None."""
    import importlib.util

    for mod in ("napari", "pytestqt", "qtpy"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed"
    from workbench.ui.napari import display_available

    if not display_available():  # pytest-xvfb sets DISPLAY when Xvfb exists
        return "no display: install Xvfb (apt: xvfb libgl1-mesa-dri) for pytest-xvfb"
    return None


@pytest.mark.napari
@pytest.mark.skipif(_viewer_skip_reason() is not None, reason=str(_viewer_skip_reason()))
def test_viewer_layers_qc_edits_persist_and_screenshot(store, make_napari_viewer):
    from workbench.ui.napari import QCWidget

    viewer = make_napari_viewer(show=True)
    w = QCWidget(viewer, store=store, slide_id="s0")
    viewer.window.add_dock_widget(w, name="Pathology QC")
    root = st.open_store(store)
    info = st.read_slide(root, "s0")
    n, size0 = len(info["coords"]), int(info["size0"])

    # layers and their data
    names = [layer.name for layer in viewer.layers]
    assert names[0] == "slide s0" and {"tissue mask", "QC labels", "exclude regions", "pen truth"} <= set(names)
    img = w.layers_["slide"]
    assert img.multiscale and len(img.data) == 3 and img.data[0].shape == (H, W, 3)
    mask = w.layers_["mask"]
    ds = float(info["mask_downsample"])
    assert tuple(mask.scale) == (ds, ds) and abs(mask.data.shape[0] * ds - H) < 2 * ds
    values = w.layers_["values"]
    assert tuple(values.scale) == (size0, size0) and values.data.shape == (H // size0, W // size0)
    assert np.count_nonzero(~np.isnan(values.data)) == n
    assert np.allclose(np.nanmax(values.data), info["tissue"].max())
    assert w.layers_["pen"].scale[0] == 16

    # colour by the prefilter score, threshold it
    w.column.value = "prefilter/marker"
    score = info["coords"][:, 0] / W
    w.threshold.value = 0.6
    above = np.asarray(w.layers_["above"].data)  # squares at the centres of the tiles >= threshold
    sel = info["coords"][score >= 0.6]
    assert len(above) == len(sel) > 0 and np.allclose(above, sel[:, ::-1] + (size0 - 1) / 2)
    w.column.value = "tree/t1/level_1"
    assert np.nanmax(w.layers_["values"].data) == 6

    # click a tile: its scores; no retrieval index in this store
    x, y = info["coords"][3] + size0 // 2
    assert w.click(x, y) == 3
    assert "tile 3" in w.info.value and "prefilter/marker" in w.info.value and "no index" in w.info.value

    # QC edits: mark on click, label ≥ threshold, a drawn region, a paint stroke — each autosaved
    w.qc_label.value = "keep"
    w.mark_on_click.value = True
    w.click(x, y)
    assert qc.read_labels(st.open_store(store), "s0")[3] == qc.KEEP
    w.mark_on_click.value = False
    w.column.value = "prefilter/marker"
    w.threshold.value = 0.7
    w.qc_label.value = "marker"
    w.label_above.clicked.emit()
    expect = np.full(n, -1)
    expect[3] = 0
    expect[score >= 0.7] = 1
    w.qc_label.value = "artefact"
    box = np.array([[0, 0], [0, 2 * size0], [2 * size0, 2 * size0], [2 * size0, 0]], float) + [H / 2, 2 * size0]
    w.layers_["regions"].add_rectangles(box)  # (row, col): y in [H/2, H/2 + 448), x in [448, 896)
    centres = info["coords"] + size0 / 2
    inside = (centres[:, 1] > H / 2) & (centres[:, 1] < H / 2 + 2 * size0)
    inside &= (centres[:, 0] > 2 * size0) & (centres[:, 0] < 4 * size0)
    assert inside.sum() == 4  # a 2 x 2 block of tiles
    expect[inside] = 2
    qc_layer = w.layers_["qc"]
    painted = np.asarray(qc_layer.data).copy()
    t = 10
    painted[w.rows_[t], w.cols_[t]] = 3  # artefact (label value + 1)
    qc_layer.data = painted
    qc_layer.events.paint(value=None)
    expect[t] = 2
    saved = qc.read_labels(st.open_store(store), "s0")
    assert np.array_equal(saved, expect), (saved, expect)
    edits = qc.read_info(st.open_store(store), "s0")["edit_count"]
    assert edits == 4 and "saved, 4 edits" in w.status.value

    # another run holds the store's lock: the edit waits in memory, then reaches the store
    from conftest import hold_store_lock

    with hold_store_lock(store):
        w.mark_tiles([0], "keep")
        assert "NOT SAVED" in w.status.value and qc.read_labels(st.open_store(store), "s0")[0] == expect[0]
    assert w.flush() and "saved, 5 edits" in w.status.value
    expect[0] = qc.KEEP
    assert np.array_equal(qc.read_labels(st.open_store(store), "s0"), expect)

    # screenshot: the slide is visible (tissue pink, not blank)
    w.column.value = "tissue"
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    import matplotlib.pyplot as plt

    plt.imsave(ARTIFACTS / "napari_screenshot.png", shot)
    rgb = shot[..., :3].astype(int)
    assert rgb.std() > 20
    pinkish = (rgb[..., 0] > 150) & (rgb[..., 1] < 150) & (rgb[..., 2] > 110)
    assert pinkish.mean() > 0.02

    # reopen in a new widget (a new napari session): the saved labels come back
    w.close_slide()
    viewer.layers.clear()
    w2 = QCWidget(viewer, store=store, slide_id="s0")
    assert np.array_equal(w2.labels_, expect)
    qc_back = np.asarray(w2.layers_["qc"].data)[w2.rows_, w2.cols_].astype(int) - 1
    assert np.array_equal(qc_back, expect) and len(w2.regions_) == 1 and len(w2.layers_["regions"].data) == 1
    # switching slides keeps one set of layers
    w2.slide.value = "s1"
    assert w2.slide_id == "s1" and sum(layer.name.startswith("slide ") for layer in viewer.layers) == 1
