"""Tissue segmentation on a low-resolution image of the slide (CLAM / Mussel thresholding).

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
    mask_mpp: float = 4.0  # resolution of the image the mask is computed on (µm/px)

    def validate(self) -> "SegmentParams":
        from workbench.errors import ParameterError
        from workbench.validate import check_float, check_int

        if self.threshold != "otsu":
            if isinstance(self.threshold, str):
                raise ParameterError(f"threshold={self.threshold!r} is not allowed: threshold must be 0–255 or 'otsu'")
            check_float("threshold", self.threshold, 0, 255)
        check_int("median_ksize", self.median_ksize, 1, 255)
        if self.median_ksize % 2 == 0:
            raise ParameterError(f"median_ksize={self.median_ksize} is not allowed: median_ksize must be an odd "
                                 "positive integer")
        check_int("close_kernel", self.close_kernel, 0, 1024)
        check_int("max_holes", self.max_holes, 0)
        check_int("ref_patch_px", self.ref_patch_px, 1)
        check_float("tissue_area", self.tissue_area, 0)
        check_float("hole_area", self.hole_area, 0)
        check_float("mask_mpp", self.mask_mpp, 0, 1000, lo_open=True)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def saturation_mask(rgb: np.ndarray, params: SegmentParams) -> np.ndarray:
    """Binary (uint8 0/255) foreground mask from the blurred HSV saturation channel."""
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2HSV)
    sat = cv2.medianBlur(hsv[..., 1], params.median_ksize)
    if params.threshold == "otsu":
        _, binary = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    else:
        _, binary = cv2.threshold(sat, float(params.threshold), 255, cv2.THRESH_BINARY)
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
    ref_area = (params.ref_patch_px / downsample) ** 2
    min_tissue, min_hole = params.tissue_area * ref_area, params.hole_area * ref_area
    tissue, holes = [], []
    for i in np.flatnonzero(hierarchy[:, 3] == -1):
        children = [j for j in np.flatnonzero(hierarchy[:, 3] == i)]
        child_areas = [cv2.contourArea(contours[j]) for j in children]
        area = cv2.contourArea(contours[i]) - sum(child_areas)
        if area <= 0 or area < min_tissue:
            continue
        order = np.argsort(child_areas)[::-1]
        kept = [contours[children[j]] for j in order if child_areas[j] > min_hole][: params.max_holes]
        tissue.append(contours[i])
        holes.append(kept)
    return tissue, holes


def render_mask(shape: tuple[int, int], tissue: list, holes: list) -> np.ndarray:
    """Fill the tissue contours and cut their holes; returns a bool mask of ``shape``."""
    mask = np.zeros(shape, np.uint8)
    if tissue:
        cv2.drawContours(mask, tissue, -1, 1, thickness=cv2.FILLED)
        for hs in holes:
            if hs:
                cv2.drawContours(mask, hs, -1, 0, thickness=cv2.FILLED)
    return mask.astype(bool)


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


def contours_geojson(tissue: list, holes: list, downsample: float, *, slide_id: str | None = None,
                     simplify: float = 1.0) -> dict:
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
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring(outer)] + [ring(h) for h in hs]},
            "properties": {"objectType": "annotation", "classification": {"name": "Tissue"}, "piece": i,
                           **({"slide_id": slide_id} if slide_id else {})},
        })
    return {"type": "FeatureCollection", "features": features}


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (resized to ``a``'s shape if needed)."""
    if a.shape != b.shape:
        b = cv2.resize(b.astype(np.uint8), (a.shape[1], a.shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
