"""napari QC: lazy pyramid, layers and their data, QC edits that persist, a screenshot that shows the slide.

Runs a real napari viewer under Xvfb (pytest-xvfb starts it); skipped cleanly when napari, Qt or a
display is missing. The Qt-free parts (lazy pyramid, rasters, columns, manifest) run everywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_qc import TILE, H, W, make_test_store

from workbench import store as st
from workbench.ui import qc
from workbench.ui.napari import _data

ARTIFACTS = Path(__file__).resolve().parents[1] / "runs" / "test-artifacts"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_test_store(tmp_path_factory.mktemp("napari"))


@pytest.fixture(autouse=True)
def _own_config_dir(tmp_path, monkeypatch):
    """The QC widget remembers its choices in the user's config folder: use a fresh one per test."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


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
    assert widget.command == command.id and command.python_name == "workbench.ui.napari._widget:QCWidget"
    manifest.validate_imports()  # every python_name resolves
    # napari passes the viewer to a widget class whose __init__ takes ``napari_viewer`` (not to a factory)
    import inspect

    from workbench.ui.napari._widget import QCWidget

    assert list(inspect.signature(QCWidget.__init__).parameters)[1] == "napari_viewer"


def test_default_column_legend_and_settings(tmp_path):
    from napari.utils.colormaps import ensure_colormap

    from workbench.ui.napari import _widget as wq

    names = ["tissue", "qc", "prefilter/marker", "tree/t1/level_1", "samples/r1"]
    assert wq.default_column(names) == "prefilter/marker"  # what a reviewer looks for, not tissue
    assert wq.default_column(["tissue", "qc"], has_labels=True) == "qc"
    assert wq.default_column(["tissue", "qc"]) == "tissue"
    assert wq.default_column(names, remembered="tree/t1/level_1") == "tree/t1/level_1"
    assert wq.default_column(names, remembered="tree/gone/level_1") == "prefilter/marker"
    # categorical legend: one swatch per category, largest first, counts; the colours are the colormap's
    turbo = ensure_colormap("turbo")
    vals = np.array([0, 0, 0, 1, 1, 2, np.nan])
    rows = wq.legend_entries("tree/t1/level_1", vals, turbo, 0.0, 2.0)
    assert [t for _, t in rows] == ["cluster 0 (3)", "cluster 1 (2)", "cluster 2 (1)"]
    assert rows[0][0] == wq._hex(turbo.map(np.array([0.0]))[0]) != rows[2][0]
    qc_rows = wq.legend_entries("qc", np.array([-1, -1, 1, 2]), turbo, -1, 2)
    assert [t for _, t in qc_rows] == ["unlabelled (2)", "marker (1)", "artefact (1)"]
    many = wq.legend_entries("tree/t/level_1", np.arange(40) % 20, turbo, 0, 19)
    assert len(many) == wq.LEGEND_MAX_ITEMS + 1 and many[-1][1] == "… 8 more (16 tiles)"
    # continuous legend: a ramp from lo to hi
    ramp = wq.legend_entries("prefilter/marker", np.linspace(0.2, 0.9, 30), ensure_colormap("viridis"), 0.2, 0.9)
    assert [t for _, t in ramp] == ["0.2", "0.375", "0.55", "0.725", "0.9"]
    assert "prefilter/marker</b> (scale)" in wq.legend_html("prefilter/marker", ramp)
    # settings survive a new session and a corrupt file is ignored
    assert wq.settings_path().is_relative_to(tmp_path)
    wq.save_settings(column="qc")
    wq.save_settings(store="/x.zarr")
    assert wq.load_settings() == {"column": "qc", "store": "/x.zarr"}
    wq.settings_path().write_text("{not json")
    assert wq.load_settings() == {}


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
    assert w.column.value == "prefilter/marker"  # the default colouring: the prefilter score
    w.column.value = "tissue"
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


# --------------------------------------------------------------------------- the plugin as a user opens it


def save_picture(img: np.ndarray, name: str, *, scale: float = 1.0) -> Path:
    """Save a screenshot under runs/test-artifacts/ and, with WORKBENCH_SCREENSHOTS=DIR (``make screenshots``), DIR."""
    import os

    import cv2

    img = np.ascontiguousarray(img[..., :3])
    if scale != 1.0:
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out = ARTIFACTS / name
    cv2.imwrite(str(out), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    docs = os.environ.get("WORKBENCH_SCREENSHOTS")
    if docs:
        Path(docs).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(Path(docs) / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return out


def _plugin_widgets() -> list[str]:
    npe2 = pytest.importorskip("npe2")
    import workbench.ui.napari as wn

    manifest = npe2.PluginManifest.from_file(Path(wn.__file__).with_name("napari.yaml"))
    return [w.display_name for w in manifest.contributions.widgets]


def _visible_world(viewer) -> tuple[float, float, float, float]:
    """(y0, y1, x0, x1) of the world region the canvas shows."""
    canvas = getattr(viewer, "canvas", None)  # napari >= 0.7: viewer.canvas / viewer.scene.camera
    h, w = canvas.size if canvas is not None else viewer._canvas_size
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    cy, cx = camera.center[-2:]
    zoom = camera.zoom
    return cy - h / 2 / zoom, cy + h / 2 / zoom, cx - w / 2 / zoom, cx + w / 2 / zoom


def _open_window(make_napari_viewer, qtbot, size=(1280, 800)):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(*size)
    qtbot.wait(50)
    return viewer


def _check_docked_qc(viewer, dock, w, store, qtbot, *, picture: str | None = None):
    """Load the store through the widget's path field and check what a user sees."""
    from workbench.ui.napari import QCWidget

    assert isinstance(w, QCWidget) and w.slide_id is None  # opened empty
    w.store.value = str(store)  # typing / choosing the store in the path field loads it
    qtbot.wait(200)  # let Qt lay out the dock and run the deferred reset_view
    assert w.slide_id == "s0" and "slide s0" in [layer.name for layer in viewer.layers]

    window = viewer.window._qt_window
    frac = dock.width() / window.width()
    assert frac <= 0.34, f"dock takes {frac:.0%} of a {window.width()} px window"
    print(
        f"dock {dock.width()} px of a {window.width()} px window ({frac:.0%}); canvas {viewer.window._qt_viewer.canvas.native.width()} px"
    )
    canvas_w = viewer.window._qt_viewer.canvas.native.width()
    assert canvas_w >= 0.4 * window.width(), (
        canvas_w,
        dock.width(),
        window.width(),
    )  # napari's layer docks take the rest

    # the whole slide is in view (camera), and the screenshot shows it with background on all sides
    y0, y1, x0, x1 = _visible_world(viewer)
    assert y0 <= 0 and x0 <= 0 and y1 >= H and x1 >= W, ((y0, y1, x0, x1), (H, W))
    assert (y1 - y0) < 1.5 * H or (x1 - x0) < 1.5 * W  # ... and fills the canvas along one side
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    slide_px = shot.sum(axis=2) > 60  # the dark canvas background is near black
    rows, cols = np.flatnonzero(slide_px.any(axis=1)), np.flatnonzero(slide_px.any(axis=0))
    assert rows[0] > 0 and cols[0] > 0 and rows[-1] < shot.shape[0] - 1 and cols[-1] < shot.shape[1] - 1
    aspect = (cols[-1] - cols[0] + 1) / (rows[-1] - rows[0] + 1)
    assert abs(aspect - W / H) < 0.05 * W / H

    # the colour-by column: the prefilter score by default, with a legend (continuous, then categorical)
    assert w.column.value == "prefilter/marker"
    assert w.legend.visible and "prefilter/marker" in w.legend.value and len(w.legend_rows_) == 5
    assert w.legend.native.isVisible() and w.legend.native.width() > 50
    w.column.value = "tree/t1/level_1"
    assert [t.split(" (")[0] for _, t in w.legend_rows_] == [f"cluster {c}" for c in range(7)]
    assert len({c for c, _ in w.legend_rows_}) == 7  # seven distinct colours
    qtbot.wait(50)
    assert dock.width() / window.width() <= 0.34  # a longer legend does not widen the dock
    if picture:
        w.column.value = "prefilter/marker"
        qtbot.wait(100)
        save_picture(viewer.screenshot(canvas_only=False, flash=False), picture, scale=0.75)


@pytest.mark.napari
@pytest.mark.skipif(_viewer_skip_reason() is not None, reason=str(_viewer_skip_reason()))
def test_every_contribution_opens_with_add_plugin_dock_widget(store, make_napari_viewer, qtbot):
    names = _plugin_widgets()
    assert names == ["Pathology QC"]
    for name in names:
        viewer = _open_window(make_napari_viewer, qtbot)
        dock, w = viewer.window.add_plugin_dock_widget("pathology-workbench", name)
        _check_docked_qc(viewer, dock, w, store, qtbot, picture="napari_qc.png")
        # the choice is remembered: a new widget (a new napari session) starts with the last column
        w.column.value = "samples/r1"
        viewer2 = _open_window(make_napari_viewer, qtbot)
        _, w2 = viewer2.window.add_plugin_dock_widget("pathology-workbench", name)
        assert str(w2.store.value) == str(Path(store).resolve())  # the last store is offered
        w2.open_button.clicked.emit()
        assert w2.column.value == "samples/r1"
        assert [t.split(" (")[0] for _, t in w2.legend_rows_] == ["not sampled", "in sample"]


@pytest.mark.napari
@pytest.mark.skipif(_viewer_skip_reason() is not None, reason=str(_viewer_skip_reason()))
def test_plugins_menu_action_opens_the_widget(store, make_napari_viewer, qtbot):
    from workbench.ui.napari import QCWidget

    viewer = _open_window(make_napari_viewer, qtbot)
    menu = viewer.window.plugins_menu
    menu.aboutToShow.emit()  # napari updates the menu's entries when it is about to show

    def actions(m):
        for a in m.actions():
            if a.menu() is not None:
                a.menu().aboutToShow.emit()
                yield from actions(a.menu())
            else:
                yield a

    found = [a for a in actions(menu) if "Pathology QC" in a.text().replace("&", "")]
    assert found, [a.text() for a in actions(menu)]
    found[0].trigger()
    qtbot.wait(100)
    docked = {name: w for name, w in viewer.window.dock_widgets.items() if isinstance(w, QCWidget)}
    assert len(docked) == 1, dict(viewer.window.dock_widgets)
    (w,) = docked.values()
    dock = w.native.parent()
    assert dock.isVisible()
    _check_docked_qc(viewer, dock, w, store, qtbot)


def test_find_store_index_finds_a_compressed_ivfpq_index(tmp_path):
    # the viewer's nearest-tiles panel finds every registered index kind, not only the exact ones
    from test_retrieval import make_feature_store

    from workbench.search import retrieval as R

    path, _ = make_feature_store(tmp_path / "ds.zarr")
    assert _data.find_store_index(path) is None
    R.build_store_index(path, "toy", "ivfpq", nlist=4, pq_m=4)
    si = _data.find_store_index(path)
    assert si is not None and si.index.kind == "ivfpq"
    hits = _data.nearest_tiles(si, st.open_store(path), "s00", 3, k=5)
    assert len(hits) == 5 and not set(hits["slide_id"]) & {"s00", "s01"}  # the patient's own slides are left out
