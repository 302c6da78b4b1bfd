import cv2
import numpy as np
import pytest

from workbench.io.segment import SegmentParams, contours_geojson, mask_iou, tissue_mask
from workbench.io.slides import open_slide
from workbench.io.synthetic import load_truth


def _disc_image():
    """A pink disc with one large and three small holes, a speck of dust, on white."""
    img = np.full((400, 400, 3), 240, np.uint8)
    cv2.circle(img, (200, 200), 150, (200, 120, 180), -1)
    cv2.circle(img, (200, 200), 40, (240, 240, 240), -1)  # hole of ~5000 px
    for c in [(120, 200), (280, 200), (200, 120)]:
        cv2.circle(img, c, 3, (240, 240, 240), -1)  # tiny holes below the hole-area threshold
    cv2.circle(img, (20, 20), 2, (200, 120, 180), -1)  # dust below the tissue-area threshold
    return img


def test_clam_chain_keeps_big_holes_drops_small_ones_and_dust():
    img = _disc_image()
    # downsample 16: reference patch 512 px -> 32 px -> area 1024 px
    mask, tissue, holes = tissue_mask(img, 16.0, SegmentParams())
    truth = np.zeros((400, 400), np.uint8)
    cv2.circle(truth, (200, 200), 150, 1, -1)
    cv2.circle(truth, (200, 200), 40, 0, -1)
    assert len(tissue) == 1 and len(holes[0]) == 1
    assert mask_iou(truth.astype(bool), mask) > 0.97
    assert not mask[20, 20] and not mask[200, 200] and mask[120, 200]  # dust gone, big hole kept, small hole filled


def test_max_holes_limits_holes():
    img = np.full((400, 400, 3), 240, np.uint8)
    cv2.rectangle(img, (20, 20), (380, 380), (200, 120, 180), -1)
    for i in range(4):
        cv2.circle(img, (80 + 80 * i, 200), 25 + 3 * i, (240, 240, 240), -1)
    _, _, holes = tissue_mask(img, 16.0, SegmentParams(max_holes=2))
    assert len(holes[0]) == 2
    areas = sorted(cv2.contourArea(h) for h in holes[0])
    assert areas[0] > np.pi * 27**2  # the two largest holes were kept


def test_otsu_and_validation():
    mask, _, _ = tissue_mask(_disc_image(), 16.0, SegmentParams(threshold="otsu"))
    assert 0.3 < mask.mean() < 0.6
    with pytest.raises(ValueError, match="median_ksize"):
        tissue_mask(_disc_image(), 16.0, SegmentParams(median_ksize=4))


def test_synthetic_slide_mask_iou(slide_dir):
    ious = {}
    for name in ("s0", "s1", "s2", "s3"):
        with open_slide(slide_dir / f"{name}.tiff") as s:
            image, ds, level = s.segmentation_image()  # CLAM's/Mussel's level: ds 4 (1 µm/px) here
        assert level == 1 and ds == (4.0, 4.0)
        mask, _, _ = tissue_mask(image, ds)
        ious[name] = mask_iou(load_truth(slide_dir / f"{name}.tiff")["tissue"], mask)
    # s1, s3 have no pen; s0, s2 have pen strokes partly on bare glass, which the mask counts as tissue
    assert min(ious["s1"], ious["s3"]) > 0.9, ious
    assert min(ious["s0"], ious["s2"]) > 0.75, ious


def test_contours_geojson_in_level0_coordinates():
    img = _disc_image()
    _, tissue, holes = tissue_mask(img, 16.0, SegmentParams())
    gj = contours_geojson(tissue, holes, 16.0, slide_id="disc")
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 1
    rings = gj["features"][0]["geometry"]["coordinates"]
    assert len(rings) == 2  # outer ring + the one kept hole
    outer = np.array(rings[0])
    assert outer[0].tolist() == outer[-1].tolist()  # closed ring
    # the disc has radius 150 px at downsample 16, centred at (200, 200): 2400 level-0 px around (3200, 3200)
    radii = np.hypot(outer[:, 0] - 3200, outer[:, 1] - 3200)
    assert np.abs(radii - 2400).max() < 16 * 3
