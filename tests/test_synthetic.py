"""Synthetic slides: readable by openslide and tifffile with the right mpp and levels, deterministic, and
their ground truth agrees with their pixels."""

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from workbench.io import synthetic as S

SIZE = 2048


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A 2048² tumour slide with pen and blur, its level-0 array (rendered again) and its truth."""
    path = tmp_path_factory.mktemp("syn") / "s.tiff"
    kw = dict(width=SIZE, height=SIZE, mpp=0.25, seed=7, dominant="tumour", n_pieces=2, pen=True, blur=True)
    truth = S.make_slide(path, **kw)
    img, truth2 = S.render_slide(**kw)
    return path, img, truth, truth2


@pytest.fixture(scope="module")
def class_means():
    """Mean RGB of each class over its interior truth pixels (no pen, no blur), from one slide per dominant."""
    sums, counts = {}, {}
    for i, dom in enumerate(S.CLASS_NAMES[1:]):
        img, t = S.render_slide(width=SIZE, height=SIZE, seed=20 + i, dominant=dom, pen=False, blur=False)
        small = cv2.resize(img, (t["classes"].shape[1], t["classes"].shape[0]), interpolation=cv2.INTER_AREA)
        for c in range(1, len(S.CLASS_NAMES)):
            inner = cv2.erode((t["classes"] == c).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            sums[c] = sums.get(c, 0) + small[inner].astype(float).sum(0)
            counts[c] = counts.get(c, 0) + inner.sum()
    return {S.CLASS_NAMES[c]: sums[c] / counts[c] for c in sums if counts[c] > 50}


def test_openslide_opens_with_mpp_levels_and_colours(slide):
    openslide = pytest.importorskip("openslide")
    import tifffile

    path, img, truth, _ = slide
    with openslide.OpenSlide(str(path)) as osr:
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.25, abs=1e-3)
        assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(0.25, abs=1e-3)
        assert osr.level_count == 2 and osr.dimensions == (SIZE, SIZE)
        assert osr.level_downsamples[1] == pytest.approx(4.0)
        region = np.asarray(osr.read_region((0, 0), 0, (SIZE, SIZE)).convert("RGB")).astype(int)
        assert np.abs(region - img).mean() < 2.0  # JPEG q90
        low = np.asarray(osr.read_region((0, 0), 1, osr.level_dimensions[1]).convert("RGB")).astype(int)
        ref = cv2.resize(img, osr.level_dimensions[1], interpolation=cv2.INTER_AREA)
        assert np.abs(low - ref).mean() < 2.0
        dims = list(osr.level_dimensions)
    with tifffile.TiffFile(path) as tf:
        levels = tf.series[0].levels
        assert [(lv.shape[1], lv.shape[0]) for lv in levels] == dims
        assert tf.pages[0].is_tiled and tf.pages[0].tilewidth == 256 and tf.pages[0].compression == 7  # JPEG
        assert np.abs(levels[0].asarray().astype(int) - region).mean() < 0.5  # same tiles, other decoder
    saved = S.load_truth(path)
    assert saved["downsample"] == S.TRUTH_DOWNSAMPLE and saved["mpp"] == 0.25
    assert saved["tissue"].shape == (SIZE // 16, SIZE // 16) and saved["classes"].dtype == np.uint8
    for k in ("tissue", "classes", "pen"):
        np.testing.assert_array_equal(saved[k], truth[k])


def test_same_seed_same_slide_other_seed_differs(slide, tmp_path):
    path, img, truth, truth2 = slide
    for k in ("tissue", "classes", "pen", "blur"):
        np.testing.assert_array_equal(truth[k], truth2[k])
    t = S.make_slide(tmp_path / "again.tiff", width=SIZE, height=SIZE, seed=7, dominant="tumour")
    assert (tmp_path / "again.tiff").read_bytes() == path.read_bytes()  # identical file, byte for byte
    np.testing.assert_array_equal(t["classes"], truth["classes"])
    other, t_other = S.render_slide(width=SIZE, height=SIZE, seed=8, dominant="tumour")
    assert (t_other["tissue"] != truth["tissue"]).mean() > 0.05
    assert np.abs(other.astype(int) - img).mean() > 5


def test_truth_matches_pixels(slide):
    _, img, truth, _ = slide
    small = cv2.resize(img, (SIZE // 16, SIZE // 16), interpolation=cv2.INTER_AREA).astype(int)
    k = np.ones((3, 3), np.uint8)
    tissue = cv2.erode(truth["tissue"].astype(np.uint8), k) > 0
    background = cv2.erode((~truth["tissue"]).astype(np.uint8), k) > 0
    pen = cv2.erode(truth["pen"].astype(np.uint8), k) > 0
    no_pen = cv2.dilate(truth["pen"].astype(np.uint8), k) == 0
    sat = cv2.cvtColor(small.astype(np.uint8), cv2.COLOR_RGB2HSV)[..., 1]
    assert tissue.sum() > 0.2 * tissue.size and pen.sum() > 50
    # background is near white and unsaturated; tissue (fat included) is coloured and darker
    bg = background & no_pen
    assert (small[bg].min(1) > 225).mean() > 0.99 and (sat[bg] < 12).mean() > 0.99
    t = tissue & no_pen
    assert (sat[t] > 20).mean() > 0.98 and (small[t].mean(1) < 230).mean() > 0.95
    # pen over background has the hue of one of the pen colours (semi-transparent ink on the light background)
    bg_rgb = np.median(small[bg], 0)
    inks = np.array([bg_rgb * np.asarray(T) for T in S.PEN_COLOURS.values()])
    on_bg = small[pen & background]
    assert len(on_bg) > 20
    dist = np.linalg.norm(on_bg[:, None, :] - inks[None], axis=2).min(1)
    assert np.median(dist) < 25 and (dist < 45).mean() > 0.9
    # the dominant class holds most of the tissue
    assert (truth["classes"][truth["tissue"]] == S.CLASS_NAMES.index("tumour")).mean() > 0.6
    assert ((truth["classes"] > 0) == truth["tissue"]).all()


def test_class_colours_are_distinct(class_means):
    m = class_means
    assert set(m) == set(S.CLASS_NAMES[1:])
    bright = {c: v.mean() for c, v in m.items()}
    blue = {c: v[2] / v[0] for c, v in m.items()}  # blue over red: haematoxylin (purple-blue) vs eosin (pink)
    assert bright["tumour"] < bright["stroma"] - 20
    assert blue["tumour"] > blue["stroma"] + 0.15
    assert bright["fat"] == max(bright.values())
    assert bright["lymphocytes"] == min(bright.values())
    assert blue["lymphocytes"] == max(blue.values())
    assert bright["necrosis"] > bright["tumour"] + 20
    names = list(m)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert np.linalg.norm(m[names[i]] - m[names[j]]) > 12, (names[i], names[j], m)


def test_tile_truth_hand_example():
    classes = np.array([[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 3, 3], [0, 0, 3, 3]], np.uint8)
    pen = np.zeros((4, 4), bool)
    pen[0, 0] = pen[3, 3] = True
    truth = {"tissue": classes > 0, "classes": classes, "pen": pen, "downsample": 16, "mpp": 0.25}
    # 32-px tiles = 2x2 truth pixels; the last one hangs over the slide's edge (3 of its 4 pixels outside)
    out = S.tile_truth(truth, [[0, 0], [16, 16], [32, 32], [48, 48], [0, 32]], 32)
    np.testing.assert_allclose(out["tissue"], [1.0, 0.5, 1.0, 0.25, 0.0])
    np.testing.assert_allclose(out["pen"], [0.25, 0.0, 0.25, 0.25, 0.0])
    np.testing.assert_array_equal(out["cls"], [1, 2, 3, 3, 0])  # tile 1 ties 2 vs 3: the lower id wins
    assert out["cls"].dtype == np.uint8 and out["tissue"].dtype == np.float32
    np.testing.assert_allclose(out["purity"], [0.75, 0.5, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(out["class_fraction"][0], [0, 0.75, 0.25, 0, 0, 0])
    # a footprint that is not a multiple of the downsample: pixel centres decide (centres at 8, 24, 40 ...)
    out = S.tile_truth(truth, [[10, 10]], 20)  # covers centres 24 only -> pixel (1, 1) = class 2
    assert out["cls"][0] == 2 and out["tissue"][0] == 1.0


def test_tile_truth_matches_brute_force(slide):
    _, _, truth, _ = slide
    rng = np.random.default_rng(0)
    coords = rng.integers(-200, SIZE, size=(200, 2))
    out = S.tile_truth(truth, coords, 448)
    ds = 16
    for (x, y), t, c in zip(coords, out["tissue"], out["cls"]):
        cx = (np.arange(SIZE // ds) + 0.5) * ds
        ix = np.flatnonzero((cx >= x) & (cx < x + 448))
        iy = np.flatnonzero((cx >= y) & (cx < y + 448))
        block = truth["classes"][np.ix_(iy, ix)]
        assert t == pytest.approx(block.astype(bool).sum() / 28**2, abs=1e-6)
        counts = np.bincount(block.ravel(), minlength=6)[1:]
        assert c == (counts.argmax() + 1 if counts.sum() else 0)


def test_demo_set_manifest(tmp_path):
    from workbench.io.manifest import read_manifest

    mpath = tmp_path / "manifests" / "demo.csv"
    df = S.make_demo_set(tmp_path / "demo", n_slides=8, size=1024, seed=3, manifest_path=mpath)
    assert list(df["slide_id"]) == [f"demo_{i:03d}" for i in range(8)]
    counts = df["diagnosis"].value_counts()
    assert len(counts) == 4 and counts.min() == counts.max() == 2
    per_patient = df.groupby("patient_id").size()
    assert (per_patient == 2).sum() == 4 and per_patient.max() == 2
    assert df.groupby("patient_id")["diagnosis"].nunique().max() == 1
    assert df["pen"].sum() == 4 and df["mpp"].isna().all()
    for _, rec in df.iterrows():
        t = S.load_truth(rec["path"])
        frac = (t["classes"][t["tissue"]] == S.CLASS_NAMES.index(rec["diagnosis"])).mean()
        assert frac > 0.6, (rec["slide_id"], frac)
        assert t["pen"].any() == rec["pen"]
    m = read_manifest(mpath)  # paths in the CSV are relative to its folder
    assert not pd.read_csv(mpath)["path"].iloc[0].startswith("/")
    assert [str(Path(p).resolve()) for p in m["path"]] == list(df["path"])
    again = S.make_demo_set(tmp_path / "demo2", n_slides=8, size=1024, seed=3, workers=1)
    pd.testing.assert_frame_equal(again.drop(columns="path"), df.drop(columns="path"))
    np.testing.assert_array_equal(S.load_truth(again["path"][5])["classes"], S.load_truth(df["path"][5])["classes"])


def test_odd_size_and_mpp(tmp_path):
    openslide = pytest.importorskip("openslide")
    truth = S.make_slide(
        tmp_path / "odd.tif",
        width=1300,
        height=1000,
        mpp=0.5,
        seed=1,
        dominant="stroma",
        n_pieces=1,
        pen=False,
        blur=False,
    )
    assert truth["tissue"].shape == (63, 82) and not truth["pen"].any()
    with openslide.OpenSlide(str(tmp_path / "odd.tif")) as osr:
        assert osr.dimensions == (1300, 1000) and osr.level_count == 2
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5, abs=1e-3)
        corner = np.asarray(osr.read_region((1300 - 40, 1000 - 40), 0, (40, 40)).convert("RGB"))
        assert corner.min() > 215  # background up to the ragged edge tiles


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="dominant"):
        S.render_slide(width=512, height=512, dominant="cartilage")
    with pytest.raises(FileNotFoundError, match="no ground truth"):
        S.load_truth("/nonexistent/slide.tiff")
