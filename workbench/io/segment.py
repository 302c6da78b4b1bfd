"""Tissue segmentation on a low-resolution image of the slide (CLAM / Mussel thresholding).

The image segmented is, by default, the pyramid level CLAM's ``create_patches_fp.py`` and Mussel's
``segment_tissue`` use (``seg_level=-1``: the level OpenSlide picks for a downsample of 64, i.e. the largest
level whose downsample is at most 64; level 0 for a one-level slide); ``mask_mpp`` instead segments a
fixed-mpp image read block by block (bounded memory for large one-level slides).

The chain (DESIGN.md §2), with the reference run's parameters as defaults:
RGB → HSV; median blur of the saturation channel (``median_ksize`` 11); binary threshold at
``threshold`` (15, or Otsu with ``threshold="otsu"``); morphological close with a square kernel
(``close_kernel`` 2); contours with hierarchy (``cv2.RETR_CCOMP``: outer contours and their holes);
a tissue contour is kept when its area minus its holes exceeds ``tissue_area`` × the reference patch
area; of its holes, at most ``max_holes`` of the largest whose area exceeds ``hole_area`` × the reference
patch area are kept. The reference patch is ``ref_patch_px`` level-0 pixels square (CLAM: 512), scaled
to the image's downsample. The mask is the kept contours filled, minus their kept holes.

All functions are pure: an RGB array in, a mask and contours out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class SegmentParams:
    """Tissue segmentation parameters (defaults: the MSK Mussel reference run)."""

    threshold: int | str = 15
    median_ksize: int = 11
    close_kernel: int = 2
    tissue_area: float = 1.0
    hole_area: float = 1.0
    max_holes: int = 2
    ref_patch_px: int = 512
    seg_level: int = -1  # pyramid level segmented; -1: CLAM's/Mussel's choice (downsample <= 64, level 0 if one level)
    mask_mpp: float | None = None  # segment a fixed-mpp image instead of a pyramid level (µm/px); None: seg_level

    def validate(self) -> SegmentParams:
        from workbench.errors import ParameterError
        from workbench.validate import check_float, check_int

        if self.threshold != "otsu":
            if isinstance(self.threshold, str):
                raise ParameterError(f"threshold={self.threshold!r} is not allowed: threshold must be 0–255 or 'otsu'")
            check_float("threshold", self.threshold, 0, 255)
        check_int("median_ksize", self.median_ksize, 1, 255)
        if self.median_ksize % 2 == 0:
            raise ParameterError(
                f"median_ksize={self.median_ksize} is not allowed: median_ksize must be an odd positive integer"
            )
        check_int("close_kernel", self.close_kernel, 0, 1024)
        check_int("max_holes", self.max_holes, 0)
        check_int("ref_patch_px", self.ref_patch_px, 1)
        check_float("tissue_area", self.tissue_area, 0)
        check_float("hole_area", self.hole_area, 0)
        if self.mask_mpp is not None:
            check_float("mask_mpp", self.mask_mpp, 0, 1000, lo_open=True)
        if isinstance(self.seg_level, bool) or not isinstance(self.seg_level, (int, np.integer)) or self.seg_level < -1:
            raise ParameterError(
                f"seg_level={self.seg_level!r} is not allowed: seg_level must be -1 (the reference "
                "level) or a level index >= 0"
            )
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def _median_above(channel: np.ndarray, ksize: int, threshold: float) -> np.ndarray:
    """``medianBlur(channel, ksize) > threshold`` as 0/255, exactly, without computing the median.

    The median of the k² window values exceeds ``t`` exactly when more than half of them do, so the
    thresholded median filter is a box count of ``channel > t`` (OpenCV's median filter replicates the
    border; so does the box filter here). About 50× faster than ``cv2.medianBlur`` with k = 11.
    """
    if ksize == 1:
        return cv2.threshold(channel, threshold, 255, cv2.THRESH_BINARY)[1]
    above = cv2.threshold(channel, threshold, 1, cv2.THRESH_BINARY)[1]  # uint8: value > floor(threshold)
    depth = -1 if ksize * ksize <= 255 else cv2.CV_16U  # counts fit in uint8 up to k = 15
    count = cv2.boxFilter(above, depth, (ksize, ksize), normalize=False, borderType=cv2.BORDER_REPLICATE)
    return cv2.compare(count, (ksize * ksize) // 2, cv2.CMP_GT)


def saturation_mask(rgb: np.ndarray, params: SegmentParams) -> np.ndarray:
    """Binary (uint8 0/255) foreground mask from the blurred HSV saturation channel."""
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2HSV)
    sat = np.ascontiguousarray(hsv[..., 1])
    del hsv
    if params.threshold == "otsu":
        sat = cv2.medianBlur(sat, params.median_ksize)
        _, binary = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    else:  # same as medianBlur then THRESH_BINARY at the threshold (value > threshold → 255)
        binary = _median_above(sat, params.median_ksize, float(params.threshold))
    if params.close_kernel > 0:
        kernel = np.ones((params.close_kernel, params.close_kernel), np.uint8)
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel)
    return binary


def filter_contours(binary: np.ndarray, downsample: float, params: SegmentParams):
    """Tissue contours and their kept holes, filtered by area as CLAM does.

    Returns ``(tissue, holes)``: a list of (k, 1, 2) int32 contours in image pixels, and for each a list
    of hole contours.
    """
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None or not contours:
        return [], []
    hierarchy = hierarchy[0]  # (n, 4): next, previous, first child, parent
    sx, sy = (downsample, downsample) if np.isscalar(downsample) else downsample
    ref_area = int(params.ref_patch_px**2 / (sx * sy))  # CLAM: the reference patch's area at this level, truncated
    min_tissue, min_hole = params.tissue_area * ref_area, params.hole_area * ref_area
    tissue, holes = [], []
    kids: dict[int, list[int]] = {}
    for j in np.flatnonzero(hierarchy[:, 3] >= 0):
        kids.setdefault(int(hierarchy[j, 3]), []).append(int(j))
    for i in np.flatnonzero(hierarchy[:, 3] == -1):
        children = kids.get(int(i), [])
        child_areas = [cv2.contourArea(contours[j]) for j in children]
        area = cv2.contourArea(contours[i]) - sum(child_areas)
        if area == 0 or not (min_tissue < area):  # CLAM keeps a piece whose area is strictly above the threshold
            continue
        order = np.argsort(child_areas, kind="stable")[::-1][: params.max_holes]  # the largest holes, then by area
        kept = [contours[children[j]] for j in order if child_areas[j] > min_hole]
        tissue.append(contours[i])
        holes.append(kept)
    return tissue, holes


def render_mask(shape: tuple[int, int], tissue: list, holes: list, *, closed: bool = False) -> np.ndarray:
    """Fill the tissue contours and cut their holes; returns a bool mask of ``shape``.

    With ``closed=True`` the holes' outlines stay in the mask (the polygon "tissue minus the holes'
    interiors", boundary included, as Mussel's shapely difference gives it).
    """
    mask = np.zeros(shape, np.uint8)
    if tissue:
        cv2.drawContours(mask, tissue, -1, 1, thickness=cv2.FILLED)
        all_holes = [h for hs in holes for h in hs]
        if all_holes:
            cv2.drawContours(mask, all_holes, -1, 0, thickness=cv2.FILLED)
            if closed:
                cv2.drawContours(mask, all_holes, -1, 1, thickness=1)
    return mask.view(bool)


def tissue_mask(rgb: np.ndarray, downsample: float, params: SegmentParams | None = None):
    """Tissue mask of a low-resolution slide image.

    Parameters
    ----------
    rgb : (h, w, 3) uint8
        The slide at ``downsample`` × level 0.
    downsample : float
        Level-0 pixels per image pixel (scales the area thresholds).

    Returns
    -------
    mask : (h, w) bool
    contours : list of (k, 1, 2) int32 tissue contours in image pixels (holes in ``holes``)
    holes : list of lists of hole contours
    """
    params = (params or SegmentParams()).validate()
    binary = saturation_mask(rgb, params)
    tissue, holes = filter_contours(binary, downsample, params)
    return render_mask(binary.shape, tissue, holes), tissue, holes


def contours_geojson(
    tissue: list, holes: list, downsample: float, *, slide_id: str | None = None, simplify: float = 1.0
) -> dict:
    """Tissue contours (with their holes) as a GeoJSON FeatureCollection in level-0 pixel coordinates.

    One Polygon feature per tissue piece: the outer ring first, then its kept holes (QuPath and
    shapely read this directly). Rings are simplified (Douglas-Peucker) to within ``simplify`` mask pixels.
    """

    def ring(contour) -> list:
        if simplify > 0:
            contour = cv2.approxPolyDP(contour, simplify, True)
        pts = (np.asarray(contour).reshape(-1, 2) * downsample).round(1).tolist()
        return pts + pts[:1] if pts and pts[0] != pts[-1] else pts

    features = []
    for i, (outer, hs) in enumerate(zip(tissue, holes)):
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring(outer)] + [ring(h) for h in hs]},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Tissue"},
                    "piece": i,
                    **({"slide_id": slide_id} if slide_id else {}),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (resized to ``a``'s shape if needed)."""
    if a.shape != b.shape:
        b = cv2.resize(b.astype(np.uint8), (a.shape[1], a.shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
