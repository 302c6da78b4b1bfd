"""The tile rules against independent, straightforward implementations of the references' rules.

The references (read from their public code): CLAM ``create_patches_fp.py`` / ``wsi_core/WholeSlideImage.py``
(``process_contour`` with ``contour_fn='four_pt'``, ``use_padding=True``; ``isInContourV3_Easy``; ``isInHoles``)
and Mussel ``mussel/utils/segment.py`` (``contours_to_polygon``, ``grid_bounds``, ``partition``). The
implementations here test every candidate tile one by one with plain geometry (crossing numbers, segment
clipping), nothing shared with the production code but the contours themselves.
"""

import numpy as np
import pytest

from workbench.io.segment import SegmentParams, tissue_mask
from workbench.io.slides import open_slide, tile_footprint
from workbench.io.tiling import TilingParams, grid_clam, grid_mussel, tile_slide

# --------------------------------------------------------------------------- plain geometry


def _ring(contour, ds) -> np.ndarray:
    """Contour (k, 1, 2) in mask pixels → (k, 2) float level-0 vertices, truncated as the references do."""
    sx, sy = (ds, ds) if np.isscalar(ds) else ds
    return np.array(np.asarray(contour).reshape(-1, 2) * np.array([sx, sy]), dtype=np.int32).astype(np.float64)


def _on_edge(ring: np.ndarray, pts: np.ndarray) -> np.ndarray:
    a, b = ring, np.roll(ring, -1, axis=0)
    p = pts[:, None, :]
    cross = (b[:, 0] - a[:, 0]) * (p[..., 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (p[..., 0] - a[:, 0])
    within = (
        (np.minimum(a[:, 0], b[:, 0]) <= p[..., 0])
        & (p[..., 0] <= np.maximum(a[:, 0], b[:, 0]))
        & (np.minimum(a[:, 1], b[:, 1]) <= p[..., 1])
        & (p[..., 1] <= np.maximum(a[:, 1], b[:, 1]))
    )
    return ((cross == 0) & within).any(1)


def _crossings_odd(ring: np.ndarray, pts: np.ndarray) -> np.ndarray:
    a, b = ring, np.roll(ring, -1, axis=0)
    x, y = pts[:, None, 0], pts[:, None, 1]
    straddle = (a[:, 1] > y) != (b[:, 1] > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = a[:, 0] + (y - a[:, 1]) * (b[:, 0] - a[:, 0]) / (b[:, 1] - a[:, 1])
    return (straddle & (x < xi)).sum(1) % 2 == 1


def inside_or_on(ring, pts):
    pts = np.asarray(pts, np.float64).reshape(-1, 2)
    return _on_edge(ring, pts) | _crossings_odd(ring, pts)


def strictly_inside(ring, pts):
    pts = np.asarray(pts, np.float64).reshape(-1, 2)
    return ~_on_edge(ring, pts) & _crossings_odd(ring, pts)


def _segments_hit_box(ring, x0, y0, x1, y1) -> bool:
    """Does any edge of the closed ring meet the closed box [x0, x1] × [y0, y1]? (Liang–Barsky clipping)"""
    a, b = ring, np.roll(ring, -1, axis=0)
    d = b - a
    t0, t1 = np.zeros(len(a)), np.ones(len(a))
    ok = np.ones(len(a), bool)
    for p, q in ((-d[:, 0], a[:, 0] - x0), (d[:, 0], x1 - a[:, 0]), (-d[:, 1], a[:, 1] - y0), (d[:, 1], y1 - a[:, 1])):
        zero = p == 0
        ok &= ~(zero & (q < 0))
        with np.errstate(divide="ignore", invalid="ignore"):
            r = q / p
        t0 = np.where(~zero & (p < 0), np.maximum(t0, r), t0)
        t1 = np.where(~zero & (p > 0), np.minimum(t1, r), t1)
    return bool((ok & (t0 <= t1)).any())


# --------------------------------------------------------------------------- the references' rules, tile by tile


def reference_mussel(tissue, holes, ds, size0):
    """Mussel: polygon = union of tissue contours minus the holes; grid over its bounds without the last
    row and column; keep a square that intersects the polygon (touching counts)."""
    rings = [_ring(c, ds) for c in tissue if len(c) >= 4]
    hole_rings = [_ring(h, ds) for hs in holes for h in hs if len(h) >= 4]
    if not rings:
        return set()
    # a tissue piece lying inside a hole is removed by the difference
    rings = [r for r in rings if not any(strictly_inside(h, r).all() for h in hole_rings)]
    allpts = np.concatenate(rings)
    (minx, miny), (maxx, maxy) = allpts.min(0), allpts.max(0)
    xs, ys = np.arange(minx, maxx, size0), np.arange(miny, maxy, size0)
    kept = set()
    for x in xs[:-1]:
        for y in ys[:-1]:
            corners = np.array([(x, y), (x + size0, y), (x, y + size0), (x + size0, y + size0)], np.float64)
            in_tissue = np.zeros(4, bool)
            for r in rings:
                in_tissue |= inside_or_on(r, corners)
            for h in hole_rings:
                in_tissue &= ~strictly_inside(h, corners)
            hit = in_tissue.any() or any(_segments_hit_box(r, x, y, x + size0, y + size0) for r in rings + hole_rings)
            if hit:
                kept.add((int(x), int(y)))
    return kept


def reference_clam(tissue, holes, ds, size0):
    """CLAM: per contour, a grid over its bounding box (padding allowed); keep a tile when one of four points
    a quarter tile from its centre is in or on the contour, unless its centre is strictly inside a hole."""
    kept = set()
    shift = int(size0 // 2 * 0.5)
    for c, hs in zip(tissue, holes):
        ring = _ring(c, ds)
        hole_rings = [_ring(h, ds) for h in hs]
        x, y = ring.min(0)
        w, h = ring.max(0) - ring.min(0) + 1  # cv2.boundingRect
        for ty in np.arange(y, y + h, size0):
            for tx in np.arange(x, x + w, size0):
                cx, cy = tx + size0 // 2, ty + size0 // 2
                pts = [
                    (cx - shift, cy - shift),
                    (cx + shift, cy + shift),
                    (cx + shift, cy - shift),
                    (cx - shift, cy + shift),
                ]
                if not inside_or_on(ring, pts).any():
                    continue
                centre = [(tx + size0 / 2, ty + size0 / 2)]
                if any(strictly_inside(hr, centre)[0] for hr in hole_rings):
                    continue
                kept.add((int(tx), int(ty)))
    return kept


def _contours(path, seg=None):
    seg = seg or SegmentParams()
    with open_slide(path) as slide:
        image, ds, _ = slide.segmentation_image(seg.seg_level, seg.mask_mpp)
        size0 = tile_footprint(slide.mpp, 224, 0.5)
    mask, tissue, holes = tissue_mask(image, ds, seg)
    return mask, tissue, holes, ds, size0


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


# --------------------------------------------------------------------------- tests


def test_rules_on_a_drawn_disc_with_a_hole():
    # a disc of radius 150 mask px with a hole of radius 40, at downsample 16; tiles of 448 level-0 px
    import cv2

    img = np.full((400, 400, 3), 240, np.uint8)
    cv2.circle(img, (200, 200), 150, (180, 60, 160), -1)
    cv2.circle(img, (200, 200), 40, (240, 240, 240), -1)
    mask, tissue, holes = tissue_mask(img, 16.0, SegmentParams(hole_area=0.1))
    assert len(tissue) == 1 and len(holes[0]) == 1
    got_m = set(map(tuple, grid_mussel(tissue, holes, mask.shape, 16.0, 448).tolist()))
    got_c = set(map(tuple, grid_clam(tissue, holes, 16.0, 448).tolist()))
    assert got_m == reference_mussel(tissue, holes, 16.0, 448)
    assert got_c == reference_clam(tissue, holes, 16.0, 448)
    # the disc spans 4800 level-0 px: Mussel's grid has 11 x 11 steps over it, less the last row and column
    # (100), less the 6 corner squares that miss the disc; CLAM's bounding-box grid is 11 x 11
    assert len(got_m) == 94 and len(got_c) == 96
    # the hole (radius 640 level-0 px) removes the one Mussel square inside it, and the 6 CLAM tiles centred in it
    _, t2, h2 = tissue_mask(img, 16.0, SegmentParams(hole_area=100))  # hole too small to keep
    assert h2 == [[]]
    assert len(grid_mussel(t2, h2, mask.shape, 16.0, 448)) == 95 and len(grid_clam(t2, h2, 16.0, 448)) == 102


@pytest.mark.realdata
def test_real_slide_counts_pinned_to_the_reference_rules():
    from conftest import shared_file

    path = shared_file("CMU-1-Small-Region.svs")
    mask, tissue, holes, ds, size0 = _contours(path)
    assert ds == (1.0, 1.0) and size0 == 224  # a one-level slide is segmented at level 0, as CLAM and Mussel do
    ref_m = reference_mussel(tissue, holes, ds, size0)
    ref_c = reference_clam(tissue, holes, ds, size0)
    # the reference counts on this slide (computed with the plain implementations above)
    assert abs(len(ref_m) - 64) <= 2 and abs(len(ref_c) - 63) <= 2, (len(ref_m), len(ref_c))
    default = tile_slide(str(path), TilingParams())  # default: the Mussel rule
    got = set(map(tuple, default["coords"].tolist()))
    assert default["attrs"]["tile_rule"] == "mussel" and default["attrs"]["seg_level"] == 0
    assert abs(len(got) - len(ref_m)) <= max(1, 0.02 * len(ref_m)) and _jaccard(got, ref_m) >= 0.97
    clam = set(map(tuple, tile_slide(str(path), TilingParams(tile_rule="clam"))["coords"].tolist()))
    assert abs(len(clam) - len(ref_c)) <= max(1, 0.02 * len(ref_c)) and _jaccard(clam, ref_c) >= 0.97
    # the tissue-fraction rule is a different rule: clearly fewer tiles on this slide
    tf = tile_slide(str(path), TilingParams(tile_rule="tissue_fraction"))["attrs"]["n_tiles"]
    assert 40 <= tf <= 55 and tf < 0.85 * len(ref_m)


def _demo_subset(tmp_path, n):
    # make_demo_set draws every slide's settings up front; build the whole table cheaply with 256-px slides,
    # then make the first n at full size with the same settings
    import pandas as pd

    from workbench.io import synthetic

    calls = []
    real = synthetic.make_slide
    try:
        synthetic.make_slide = lambda path, **kw: calls.append((path, kw))
        df = synthetic.make_demo_set(tmp_path / "demo", n_slides=24, size=6144, seed=0, workers=1)
    finally:
        synthetic.make_slide = real
    for path, kw in calls[:n]:
        real(path, **kw)
    return pd.DataFrame(df).iloc[:n]


def _check_demo(df, tol_rel=0.02):
    totals = {"mussel": 0, "ref_mussel": 0, "clam": 0, "ref_clam": 0}
    for p in df.path:
        mask, tissue, holes, ds, size0 = _contours(p)
        totals["ref_mussel"] += len(reference_mussel(tissue, holes, ds, size0))
        totals["ref_clam"] += len(reference_clam(tissue, holes, ds, size0))
        totals["mussel"] += tile_slide(str(p), TilingParams())["attrs"]["n_tiles"]
        totals["clam"] += tile_slide(str(p), TilingParams(tile_rule="clam"))["attrs"]["n_tiles"]
    assert abs(totals["mussel"] - totals["ref_mussel"]) <= tol_rel * totals["ref_mussel"], totals
    assert abs(totals["clam"] - totals["ref_clam"]) <= tol_rel * totals["ref_clam"], totals
    return totals


def test_demo_slides_match_the_reference_rules(tmp_path):
    df = _demo_subset(tmp_path, 3)
    totals = _check_demo(df)
    # pinned: the first three demo slides (6144² at 0.25 mpp, segmented at level 2, downsample 16)
    assert abs(totals["ref_mussel"] - DEMO3_MUSSEL) <= 3 and abs(totals["ref_clam"] - DEMO3_CLAM) <= 3, totals


@pytest.mark.slow
def test_whole_demo_matches_the_reference_rules(tmp_path):
    df = _demo_subset(tmp_path, 24)
    totals = _check_demo(df)
    assert abs(totals["ref_mussel"] - DEMO_MUSSEL) <= 10 and abs(totals["ref_clam"] - DEMO_CLAM) <= 10, totals


DEMO3_MUSSEL, DEMO3_CLAM = 293, 266
DEMO_MUSSEL, DEMO_CLAM = 2083, 1965  # tissue_fraction keeps 1579


@pytest.mark.realdata
def test_fast_segmentation_equals_the_reference_chain_on_the_real_slide():
    """Our mask (direct decode, box-count median threshold, white compositing) is CLAM's/Mussel's, pixel for pixel:
    OpenSlide's RGBA level image → HSV → cv2.medianBlur → threshold → close → the same contour filter."""
    import cv2
    import openslide
    from conftest import shared_file

    from workbench.io.segment import filter_contours, render_mask

    path = shared_file("CMU-1-Small-Region.svs")
    p = SegmentParams()
    osr = openslide.OpenSlide(str(path))
    img = np.array(osr.read_region((0, 0), 0, osr.level_dimensions[0]))
    med = cv2.medianBlur(cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[:, :, 1], p.median_ksize)
    binary = cv2.threshold(med, p.threshold, 255, cv2.THRESH_BINARY)[1]
    binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, np.ones((p.close_kernel, p.close_kernel), np.uint8))
    ref = render_mask(binary.shape, *filter_contours(binary, 1.0, p))
    ours, *_ = _contours(path)
    assert ours.shape == ref.shape and (ours == ref).all()
    assert 0.3 < ours.mean() < 0.7  # about half the region is tissue


def test_oversized_segmentation_level_refused_by_name_and_mask_mpp_works(slide_dir, monkeypatch):
    from workbench.io import slides

    monkeypatch.setattr(slides, "MAX_SEG_PIXELS", 100_000)  # the 768² level 1 of a 3072² slide is over this
    with open_slide(slide_dir / "s1.tiff") as s:
        with pytest.raises(slides.SlideError, match=r"'s1'.*mask_mpp"):
            s.segmentation_image()
        image, ds, level = s.segmentation_image(mask_mpp=8.0)  # read in blocks and shrunk: 96² at 32× downsample
    assert level is None and image.shape == (96, 96, 3) and ds == (32.0, 32.0)
