import numpy as np
import pytest
from conftest import shared_file

from workbench.io.slides import MPP_TOLERANCE, SlideError, TileReader, open_slide, resolve_mpp, tile_footprint


def test_synthetic_slide_levels_and_mpp(slide_dir):
    with open_slide(slide_dir / "s0.tiff") as s:
        assert s.level_count > 1
        assert s.mpp == pytest.approx(0.25, abs=1e-3)
        assert s.best_level(0.5) == 0  # level 1 is 4x coarser (1.0 mpp): too coarse for 0.5 mpp
        assert s.best_level(1.0) == 1
        thumb, ds = s.thumbnail(8.0)
        assert ds == pytest.approx(32, rel=0.02)
        assert abs(thumb.shape[1] - 3072 / 32) <= 1


def test_fast_reader_matches_openslide_with_resize(slide_dir):
    with open_slide(slide_dir / "s1.tiff") as s:
        rng = np.random.default_rng(0)
        coords = rng.integers(0, 3072 - 448, size=(40, 2))
        coords[:3] = [[0, 0], [3072 - 448, 3072 - 448], [256, 256]]  # stored-tile corners and edges
        fast, slow = TileReader(s), TileReader(s, fast=False)
        assert fast.backend == "tiff-direct" and slow.backend == "openslide"
        assert fast.size0 == 448 and fast.level == 0
        a, b = fast.read(coords), slow.read(coords)
        assert a.shape == (40, 224, 224, 3) and a.dtype == np.uint8
        # same stored JPEG tiles decoded by two libjpeg builds: equal up to rounding
        assert np.abs(a.astype(int) - b).mean() < 1.0
        assert np.abs(a.astype(int) - b).max() <= 12
        fast.close()


def test_tile_beyond_edge_is_white(slide_dir):
    with open_slide(slide_dir / "s1.tiff") as s:
        t = TileReader(s).read([[3072 - 100, 0]])[0]
        assert t[:, 60:].min() == 255  # the part beyond the right edge


def test_mpp_resolution_rules():
    assert resolve_mpp({"openslide.mpp-x": "0.2527"}) == pytest.approx(0.2527)
    assert resolve_mpp({"aperio.MPP": "0.499"}) == pytest.approx(0.499)
    assert resolve_mpp({"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"}) == pytest.approx(0.25)
    with pytest.raises(SlideError, match=r"352.8 µm/px, which is not a microscope"):  # 72 dpi: refused (issue 14)
        resolve_mpp({"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"})
    assert resolve_mpp({"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"}, override=0.5) == 0.5
    assert resolve_mpp({}) is None
    assert resolve_mpp({"openslide.mpp-x": "0.25"}, override=0.5) == 0.5


def test_footprint_tolerance():
    assert tile_footprint(0.499, 224, 0.5) == 224  # within tolerance: no resampling
    assert tile_footprint(0.25, 224, 0.5) == 448
    assert tile_footprint(0.5 * (1 + 2 * MPP_TOLERANCE), 224, 0.5) != 224


@pytest.mark.parametrize("content, what", [(b"", "empty"), (b"this is not an image" * 10, "not a slide format")])
def test_bad_files_named(tmp_path, content, what):
    p = tmp_path / "bad.svs"
    p.write_bytes(content)
    with pytest.raises(SlideError, match=f"bad.*{what}"):
        open_slide(p)


def test_missing_and_directory(tmp_path):
    with pytest.raises(SlideError, match="does not exist"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(SlideError, match="directory"):
        open_slide(tmp_path)


def test_png_without_mpp_refused(tmp_path):
    import cv2

    p = tmp_path / "plain.png"
    cv2.imwrite(str(p), np.full((300, 300, 3), 200, np.uint8))
    with pytest.raises(SlideError, match="plain"):
        open_slide(p)


@pytest.mark.realdata
def test_cmu_small_region_fast_path_identical():
    path = shared_file("CMU-1-Small-Region.svs")
    with open_slide(path) as s:
        assert s.mpp == pytest.approx(0.499, abs=1e-3) and s.level_count == 1
        coords = np.array([[x, y] for y in range(0, 2967 - 224, 224) for x in range(0, 2220 - 224, 224)])
        fast, slow = TileReader(s), TileReader(s, fast=False)
        assert fast.size0 == 224 and fast.backend == "tiff-direct"
        np.testing.assert_array_equal(fast.read(coords), slow.read(coords))


@pytest.mark.realdata
@pytest.mark.parametrize(
    "name, match",
    [
        ("openslide-fixtures/unopenable.tiff", "unopenable.*OpenSlide cannot open it"),
        ("openslide-fixtures/boxes.tiff", "boxes.*not a microscope scan's resolution"),
    ],
)
def test_real_bad_files(name, match):
    with pytest.raises(SlideError, match=match):
        open_slide(shared_file(name))


@pytest.mark.realdata
def test_real_boxes_pyramid_with_manifest_mpp():
    with open_slide(shared_file("openslide-fixtures/boxes.tiff"), mpp=0.25) as s:
        assert s.level_count == 4 and s.vendor == "generic-tiff"
        assert s.best_level(1.0) == 2  # downsamples 1, 2, 4, 8


@pytest.mark.realdata
def test_real_dicom_opens():
    with open_slide(shared_file("openslide-fixtures/boxes_0.dcm")) as s:
        assert s.vendor == "dicom" and s.mpp == pytest.approx(0.499, abs=1e-3)
