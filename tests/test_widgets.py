"""Notebook widgets: gallery selection against known tree / score / sample arrays, tile pixels, static output."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import os

import numpy as np
import pytest
from test_qc import W, make_test_store

from workbench import store as st
from workbench.ui import widgets


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_test_store(tmp_path_factory.mktemp("widgets"))


def test_threshold_summary_exact():
    scores = np.array([0.1, 0.2, 0.8, 0.9, 0.76, 0.3])
    truth = np.array([0, 0, 1, 1, 0, 1], bool)
    s = widgets.threshold_summary(scores, 0.75, truth)
    assert s["n_flagged"] == 3 and s["frac_flagged"] == 0.5
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert widgets.threshold_summary(scores, 0.95)["n_flagged"] == 0
    slider = widgets.ThresholdSlider(scores, threshold=0.85, truth=truth)
    assert slider.static  # no kernel frontend here
    fig = slider.figure()
    assert isinstance(fig, matplotlib.figure.Figure) and "1 of 6 tiles" in fig.axes[0].get_title()
    assert slider.show() is None  # displays once; returns nothing a cell would display again
    assert slider.summary()["recall"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="truth has shape"):
        widgets.ThresholdSlider(scores, truth=truth[:3])


def test_frontend_detection_outside_a_kernel(monkeypatch):
    assert widgets.interactive_frontend() is False  # plain Python: no kernel
    assert widgets.headless_run() is False
    monkeypatch.setenv("PAPERMILL_EXECUTION", "1")
    assert widgets.headless_run() is True


_PROBE = """
import json
from workbench.ui import widgets
print("PROBE", json.dumps({"live": widgets.interactive_frontend(),
      "slider": not widgets.ThresholdSlider([0.1, 0.9]).static}))
"""


def _run_in_kernel(kc, code: str, metadata: dict | None = None) -> dict:
    """Execute ``code`` as a frontend would (``metadata`` in the execute_request) and parse its PROBE line."""
    import json

    msg = kc.session.msg(
        "execute_request",
        {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
        metadata=metadata or {},
    )
    kc.shell_channel.send(msg)
    text = ""
    while True:
        out = kc.get_iopub_msg(timeout=60)
        if out["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
            continue
        if out["msg_type"] == "stream":
            text += out["content"]["text"]
        elif out["msg_type"] == "error":
            raise AssertionError("\n".join(out["content"]["traceback"]))
        elif out["msg_type"] == "status" and out["content"]["execution_state"] == "idle":
            break
    line = next(ln for ln in text.splitlines() if ln.startswith("PROBE "))
    return json.loads(line[6:])


def test_frontend_detection_in_a_real_kernel(monkeypatch):
    """A real ipykernel: a JupyterLab-style request (metadata names the cell) is live at once — no widget comm
    exists yet — while an nbclient/papermill-style request (no cell id) and a papermill environment are static."""
    pytest.importorskip("ipywidgets")
    jc = pytest.importorskip("jupyter_client")
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.delenv("PAPERMILL_EXECUTION", raising=False)
    km, kc = jc.manager.start_new_kernel(kernel_name="python3")
    try:
        assert _run_in_kernel(kc, _PROBE, {"cellId": "3f1c", "deletedCells": [], "recordTiming": False}) == {
            "live": True,
            "slider": True,
        }
        assert _run_in_kernel(kc, _PROBE) == {"live": False, "slider": False}  # how nbclient sends cells
        _run_in_kernel(kc, "import os; os.environ['PAPERMILL_EXECUTION'] = '1'; print('PROBE {}')")
        assert _run_in_kernel(kc, _PROBE, {"cellId": "3f1c"}) == {"live": False, "slider": False}
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_gallery_by_cluster_score_sample(store):
    root = st.open_store(store)
    total = int(st.tile_counts(root).sum())
    g = widgets.TileGallery(store, by="cluster", n=10, tile_px=32, static=True)
    assert g.column == "tree/t1/level_1"
    keys = g.keys()
    assert sorted(keys) == list(range(7)) and keys[0] == 0  # cluster 0 is (one of) the largest: ids % 7
    ids = g.tile_ids(3)
    assert len(ids) == 10 and (ids % 7 == 3).all() and len(set(ids.tolist())) == 10

    s = widgets.TileGallery(store, by="score", column="prefilter/marker", n=12, tile_px=32, static=True)
    top = s.tile_ids(0)
    coords = np.concatenate([root[st.Key.coords(x)][:] for x in st.slide_ids(root)])
    scores = coords[:, 0] / W
    assert np.all(np.diff(scores[top]) <= 0) and scores[top[0]] == scores.max()
    assert len(s.keys()) == -(-total // 12)

    m = widgets.TileGallery(store, by="sample", n=5, tile_px=32, static=True)
    assert m.column == "samples/r1" and m.tile_ids(1).tolist() == [15, 18, 21, 24, 27]

    # pixels: the gallery's tile equals the slide read directly over the same footprint
    from workbench.io.slides import TileReader, open_slide

    n0 = root[st.Key.coords("s0")].shape[0]
    pick = np.array([2, n0 + 1])
    imgs = g.images(pick)
    for gid, img in zip(pick, imgs):
        sid, local = ("s0", gid) if gid < n0 else ("s1", gid - n0)
        info = st.read_slide(root, sid)
        with open_slide(info["path"]) as slide, TileReader(slide, tile_px=32, tile_mpp=0.5 * 224 / 32) as r:
            ref = r.read(info["coords"][[local]])[0]
        assert np.array_equal(img, ref) and img.std() > 5  # tissue texture, not blank
    fig = g.figure(keys[0])
    assert isinstance(fig, matplotlib.figure.Figure) and "cluster 0" in fig.axes[0].get_title()
    assert g.show() is None
    with pytest.raises(ValueError, match="by must be"):
        widgets.TileGallery(store, by="colour")


def test_gallery_interactive_builds_controls(store):
    ipw = pytest.importorskip("ipywidgets")
    box = widgets.TileGallery(store, by="sample", n=4, tile_px=32, static=False).widget()
    assert isinstance(box, ipw.VBox) and isinstance(box.children[0], ipw.IntSlider)  # pages: a slider
    assert box.children[0].max == len(widgets.TileGallery(store, by="sample", n=4).keys()) - 1
    first = bytes(box.children[1].value)
    assert (
        isinstance(box.children[1], ipw.Image)
        and first[:8] == b"\x89PNG\r\n\x1a\n"
        and first.endswith(b"IEND\xaeB`\x82")
    )
    box.children[0].value = 2  # a new page redraws the image
    second = bytes(box.children[1].value)
    assert second != first and second.endswith(b"IEND\xaeB`\x82")
    clusters = widgets.TileGallery(store, by="cluster", n=4, tile_px=32, static=False).widget()
    assert isinstance(clusters.children[0], ipw.Dropdown) and clusters.children[0].value == 0
    slider = widgets.ThresholdSlider(np.linspace(0, 1, 11), static=False).widget()
    slider.children[0].value = 0.5


def test_progress_bar_headless_kernel_writes_final_state_to_stdout(monkeypatch, capsys):
    """In a kernel without a widget frontend (papermill) bars are text on stdout (no red stderr box), end at
    n/n, and a bar inside another shares the line (no ANSI cursor moves saved into the notebook)."""
    from workbench import progress

    monkeypatch.setattr(progress, "_in_kernel", lambda: True)
    outer = progress.progress_bar(total=2, desc="levels")
    for _ in progress.progress_bar(range(5), desc="load", unit="row"):
        pass
    outer.update(2)
    outer.close()
    out, err = capsys.readouterr()
    assert err == "" and "load: 100%" in out and "5/5" in out and "levels: 100%" in out and "2/2" in out
    assert "\x1b[" not in out
    monkeypatch.setattr(progress, "_in_kernel", lambda: False)  # plain Python: tqdm's default, stderr
    for _ in progress.progress_bar(range(2), desc="plain"):
        pass
    out, err = capsys.readouterr()
    assert "plain: 100%" in err and out == ""
