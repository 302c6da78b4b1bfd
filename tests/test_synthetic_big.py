"""Streaming synthetic slides: the streamed pyramid equals an in-memory reduction, the per-block blur equals a
blur of the whole level, the coarse layout grid of big slides keeps truth and pixels in agreement, and (slow) a
60,000² slide is made in bounded memory, then tiled and embedded end to end against its ground truth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from workbench.io import synthetic as S

ROOT = Path(__file__).resolve().parent.parent


def _levels(path):
    import tifffile

    with tifffile.TiffFile(path) as tf:
        return [lv.asarray() for lv in tf.series[0].levels]


def _reduce(img):
    h, w = img.shape[0] // 4, img.shape[1] // 4
    return cv2.resize(img[: 4 * h, : 4 * w], (w, h), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("tile, spill", [(256, False), (384, True)])
def test_streamed_pyramid_equals_in_memory_reduction(tmp_path, monkeypatch, tile, spill):
    """Level 0 in the file is the rendered image and every lower level is INTER_AREA by 4 of the level above,
    within JPEG error; with levels spilled to raw files (removed afterwards) and a tile size that does not
    divide the 512-row bands."""
    if spill:
        monkeypatch.setattr(S, "_SPILL_BYTES", 0)
    w, h = 4700, 4200  # not multiples of the tile or block: edge tiles and partial bands
    kw = dict(width=w, height=h, mpp=0.25, seed=3, dominant="stroma", n_pieces=2, pen=True, blur=True)
    path = tmp_path / "p.tiff"
    S.make_slide(path, tile=tile, **kw)
    img, _ = S.render_slide(**kw)
    levels = _levels(path)
    assert [lv.shape[:2] for lv in levels] == [(h, w), (h // 4, w // 4), (h // 16, w // 16)]
    assert np.abs(levels[0].astype(int) - img).mean() < 2.0  # JPEG q90
    ref = img
    for lv in levels[1:]:
        ref = _reduce(ref)
        err = np.abs(lv.astype(int) - ref)
        assert err.mean() < 2.5, err.mean()
        # no band is misplaced: every 16-row strip agrees within JPEG error on detailed tissue (~5 at level 2);
        # a strip compared with its neighbour (as a shifted or dropped band would be) differs by far more
        strips = err[: err.shape[0] // 16 * 16].reshape(-1, 16, err.shape[1], 3).mean((1, 2, 3))
        assert strips.max() < 8.0, strips.max()
        shifted = np.abs(lv[16:].astype(int) - ref[:-16])[: err.shape[0] // 16 * 16 - 16]
        assert shifted.reshape(-1, 16, err.shape[1], 3).mean((1, 2, 3)).max() > 2 * strips.max()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.tiff", "p.truth.npz"]  # no spill files left


def test_per_block_blur_equals_blur_of_the_whole_level():
    """Blurring each block with a margin of its neighbours gives the same pixels as blurring the whole level
    (so no seams at block borders)."""
    rend = S._Renderer(width=2600, height=2100, mpp=0.25, seed=7, dominant="tumour", n_pieces=2, pen=False, blur=True)
    h, w = 2100, 2600
    raw = np.concatenate(
        [np.concatenate([rend.block(by, bx) for bx in range(-(-w // 512))], 1) for by in range(-(-h // 512))]
    )
    a = np.ascontiguousarray(S._up(rend.blur, 0, h, 0, w, rend.cds))
    assert (a > 0.5).mean() > 0.01  # there is blur on this slide
    ref = cv2.blendLinear(cv2.GaussianBlur(raw, (0, 0), rend.blur_sigma), raw, a, 1 - a)
    out = np.concatenate(
        list(
            S._Renderer(width=w, height=h, mpp=0.25, seed=7, dominant="tumour", n_pieces=2, pen=False, blur=True).bands(
                2
            )
        )
    )
    assert np.abs(out.astype(int) - ref).max() <= 1
    assert np.abs(out.astype(int) - raw)[a > 0.9].mean() > 1.0  # the blur did something


def test_coarse_layout_grid_keeps_truth_and_pixels_in_agreement(monkeypatch):
    """Big slides lay out on a coarser grid (here forced: k = 4 on a 4096² slide): the truth at 1/16 still
    matches the pixels (background light and grey, tissue coloured), the class mix is as usual and nuclei are
    drawn across block borders."""
    monkeypatch.setattr(S, "_COARSE_MAX", 64)
    img, truth = S.render_slide(width=4096, height=4096, mpp=0.25, seed=4, dominant="tumour", n_pieces=2, pen=False)
    rend = S._Renderer(width=4096, height=4096, mpp=0.25, seed=4, dominant="tumour", n_pieces=2, pen=False, blur=True)
    assert rend.k == 4  # the coarse path is on
    small = cv2.resize(img, (256, 256), interpolation=cv2.INTER_AREA).astype(int)
    k3 = np.ones((3, 3), np.uint8)
    tissue = cv2.erode(truth["tissue"].astype(np.uint8), k3) > 0
    background = cv2.erode((~truth["tissue"]).astype(np.uint8), k3) > 0
    sat = cv2.cvtColor(small.astype(np.uint8), cv2.COLOR_RGB2HSV)[..., 1]
    assert 0.15 < truth["tissue"].mean() < 0.7
    assert (small[background].min(1) > 225).mean() > 0.99 and (sat[background] < 12).mean() > 0.99
    assert (sat[tissue] > 20).mean() > 0.98
    dense = tissue & (truth["classes"] != S.CLASS_NAMES.index("fat"))  # fat is mostly empty vacuoles: light
    assert (small[dense].mean(1) < 230).mean() > 0.97
    assert (truth["classes"][truth["tissue"]] == S.CLASS_NAMES.index("tumour")).mean() > 0.6
    assert ((truth["classes"] > 0) == truth["tissue"]).all()
    # nuclei (dark haematoxylin spots) as dense on block borders as inside blocks: none cut off at the seams
    grey = img.mean(2)
    ti = cv2.resize(truth["tissue"].astype(np.uint8), (4096, 4096), interpolation=cv2.INTER_NEAREST) > 0
    dark = (grey < 120) & ti
    on_border = np.zeros_like(dark)
    on_border[:, [b + d for b in range(512, 4096, 512) for d in (-2, -1, 0, 1)]] = True
    inner = ~on_border
    assert dark[on_border].mean() > 0.5 * dark[inner].mean() > 0


@pytest.mark.slow
def test_big_slide_bounded_memory_tiles_and_embeds_end_to_end(tmp_path):
    """A 60,000² slide (level 0 would be 10.8 GB of RGB) is made with a peak RSS under 1/3 of that and under
    2 GiB, in a child process; it opens in openslide and tifffile with every level and the mpp, both reading the
    same pixels; tiling finds the truth's tissue; a subset of tiles is embedded in bounded memory."""
    openslide = pytest.importorskip("openslide")
    import tifffile
    import zarr

    side = 60_000
    path = tmp_path / "big.tiff"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    make = f"""
import json, resource
from workbench.io.synthetic import make_slide
make_slide({str(path)!r}, width={side}, height={side}, mpp=0.25, seed=5, dominant="tumour", n_pieces=3)
print(json.dumps({{"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", make], capture_output=True, text=True, env=env, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    rss = json.loads(out.stdout.strip().splitlines()[-1])["rss"]
    level0 = side * side * 3
    assert rss < level0 / 3 and rss < 2 * 2**30, rss

    # openslide and tifffile: same levels, mpp, and the same pixels at a few places in every level
    with openslide.OpenSlide(str(path)) as osr, tifffile.TiffFile(path) as tf:
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.25, abs=1e-3)
        levels = tf.series[0].levels
        dims = [(side, side), (15000, 15000), (3750, 3750), (937, 937)]
        assert list(osr.level_dimensions) == dims == [(lv.shape[1], lv.shape[0]) for lv in levels]
        rng = np.random.default_rng(0)
        za = tf.series[0].aszarr()
        group = zarr.open(za, mode="r")
        for lvl, (w, h) in enumerate(dims):
            arr = group[str(lvl)]
            # openslide maps level-0 coordinates through its downsample (60000/937 at level 3, not 64): only
            # level-0 positions that land on whole pixels of the level compare without resampling
            ds = osr.level_downsamples[lvl]
            places = [(0, 0)]
            if ds == 4**lvl:
                places += [(int(rng.integers(0, w - 300)), int(rng.integers(0, h - 300))) for _ in range(3)]
            for x, y in places:
                a = np.asarray(osr.read_region((x * 4**lvl, y * 4**lvl), lvl, (300, 300)).convert("RGB")).astype(int)
                b = np.asarray(arr[y : y + 300, x : x + 300]).astype(int)
                assert np.abs(a - b).mean() < 0.5, (lvl, x, y)
        za.close()

    # tiling + embedding a subset, in a child process with bounded memory
    store = tmp_path / "big.zarr"
    pipe = f"""
import json, resource
import numpy as np, pandas as pd, torch
from workbench import store as st
from workbench.features import embed as E
from workbench.io.tiling import tile_slides
t = tile_slides(pd.DataFrame({{"slide_id": ["big"], "path": [{str(path)!r}]}}), {str(store)!r}, progress=False)
assert t["status"].iloc[0] == "tiled", t.to_dict()
root = st.open_store({str(store)!r})
enc, model = E._prepared("stain-texture", None, "cpu", False)
job = E.slide_job(root, "big", enc)
n = len(job["coords"])
job["coords"] = job["coords"][:: max(1, n // 1500)]
batches = E.TileBatches([job], 256)
feats = []
with torch.inference_mode():
    for _, _, tiles, err in torch.utils.data.DataLoader(batches, batch_size=None, num_workers=0):
        assert not err, err
        feats.append(model(enc.preprocess(tiles)).float().numpy())
batches.close()
f = np.concatenate(feats)
print(json.dumps({{"n": n, "embedded": len(f), "finite": bool(np.isfinite(f).all()), "std": float(f.std(0).mean()),
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", pipe], capture_output=True, text=True, env=env, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["finite"] and res["embedded"] >= 1000 and res["std"] > 0
    assert res["rss"] < 2 * 2**30, res["rss"]

    from workbench import store as st

    root = st.open_store(store)
    g = root[st.Key.slide("big")]
    coords, size0 = g["coords"][:], float(g.attrs["size0"])
    assert len(coords) == res["n"]
    truth = S.load_truth(path)
    tt = S.tile_truth(truth, coords, size0)
    expected = truth["tissue"].sum() * 16**2 / size0**2  # tissue area in tile footprints
    assert 0.95 * expected < len(coords) < 1.35 * expected, (len(coords), expected)  # rule keeps edge tiles
    assert abs((tt["tissue"] >= 0.5).sum() - expected) < 0.08 * expected
    assert (tt["tissue"] > 0).mean() > 0.97  # hardly a tile off the tissue
