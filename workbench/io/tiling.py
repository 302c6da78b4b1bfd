"""Tiles at a fixed mpp over tissue, written per slide into the store, in parallel with Dask.

Three rules decide which tiles are kept (``tile_rule``); all use the same tissue contours (CLAM's/Mussel's
segmentation, :mod:`workbench.io.segment`) and record each kept tile's tissue fraction (the share of its
footprint covered by the mask) for later filtering:

``"mussel"`` (default; the rule of the MSK Mussel reference run, ``mussel/utils/segment.py``)
    one grid over all tissue, started at the top-left corner of the tissue's bounding box, step ``stride0``;
    the grid's last row and last column are not made (Mussel iterates ``range(len(coords) - 1)``); a tile is
    kept when its closed square touches the tissue polygon at all (tissue contours united, the kept holes'
    interiors removed). Evaluated on the mask's pixel lattice scaled to level 0 (a tile is kept when a
    lattice point of the closed polygon lies in its square), not with shapely; tiles may extend past the
    slide's edge only with overlap.
``"clam"`` (CLAM's ``create_patches_fp.py`` defaults: ``contour_fn='four_pt'``, ``use_padding=True``)
    a grid per tissue contour from its bounding box; a tile is kept when any of four points a quarter tile
    from its centre (``isInContourV3_Easy``) is inside or on the contour, and dropped when its centre is
    strictly inside one of that contour's kept holes. Tiles of different contours are not aligned; the
    same tile made by two contours is kept once.
``"tissue_fraction"``
    a non-overlapping grid from the slide's top-left corner; a tile is kept when its tissue fraction is at
    least ``min_tissue`` (default 0.5). Partial tiles at the right and bottom edges are not made.

``min_tissue`` given with the ``mussel`` or ``clam`` rule further drops tiles below that tissue fraction (as
Mussel's ``min_tissue_proportion``; default none). With ``overlap_px`` > 0 neighbouring tiles overlap by
that many output pixels.

Each slide is one Dask task that segments, grids and writes its own group ``slides/<slide_id>``; the
slide's ``complete`` attribute is written last, so a killed run leaves at worst an incomplete group that
the next run redoes. Complete slides are skipped. Bad slides are recorded in the store's error table
(``on_error="skip"``, the default) and the others go on.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import zarr

from workbench import store as st
from workbench.io.manifest import read_manifest, to_records, validate_manifest
from workbench.errors import ParameterError
from workbench.io.segment import SegmentParams, contours_geojson, render_mask, tissue_mask
from workbench.io.slides import SlideError, open_slide, tile_footprint

log = logging.getLogger(__name__)


TILE_RULES = ("mussel", "clam", "tissue_fraction")


@dataclass(frozen=True)
class TilingParams:
    tile_px: int = 224
    tile_mpp: float = 0.5
    min_tissue: float | None = None  # tissue_fraction rule: 0.5 when None; mussel/clam: no extra filter when None
    segment: SegmentParams = field(default_factory=SegmentParams)
    overlap_px: int = 0
    tile_rule: str = "mussel"

    def validate(self) -> "TilingParams":
        if self.tile_px < 16:
            raise ParameterError(f"tile_px must be >= 16, got {self.tile_px}")
        if not (0.05 <= self.tile_mpp <= 100):
            raise ParameterError(f"tile_mpp must be within 0.05–100 µm/px, got {self.tile_mpp}")
        if not (0 <= self.overlap_px < self.tile_px):
            raise ParameterError(f"overlap_px must be within [0, tile_px), got {self.overlap_px}")
        if self.min_tissue is not None and not (0.0 <= self.min_tissue <= 1.0):
            raise ParameterError(f"min_tissue must be within [0, 1], got {self.min_tissue}")
        if self.tile_rule not in TILE_RULES:
            raise ParameterError(f"tile_rule must be one of {TILE_RULES}, got {self.tile_rule!r}")
        self.segment.validate()
        return self

    @property
    def tissue_threshold(self) -> float:
        """The tissue fraction a kept tile needs (0: none, for the contour rules without ``min_tissue``)."""
        if self.min_tissue is not None:
            return float(self.min_tissue)
        return 0.5 if self.tile_rule == "tissue_fraction" else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["segment"] = self.segment.to_dict()
        return d


def _xy(downsample) -> tuple[float, float]:
    return (float(downsample), float(downsample)) if np.isscalar(downsample) else tuple(map(float, downsample))


def tissue_fractions(mask: np.ndarray, downsample, coords: np.ndarray, size0: int,
                     integral: np.ndarray | None = None) -> np.ndarray:
    """Share of each tile's footprint covered by ``mask`` (bool, at ``downsample`` × level 0).

    Footprint edges are rounded to mask pixels (at least one pixel wide); parts outside the mask count
    as background. Uses an int32 integral image (``cv2.integral``).
    """
    sx, sy = _xy(downsample)
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    if integral is None:
        integral = cv2.integral(mask.view(np.uint8), sdepth=cv2.CV_32S)
    h, w = mask.shape
    xs, ys = coords[:, 0], coords[:, 1]
    x0 = np.clip(np.round(xs / sx).astype(np.int64), 0, w - 1)
    x1 = np.clip(np.maximum(np.round((xs + size0) / sx).astype(np.int64), x0 + 1), 1, w)
    y0 = np.clip(np.round(ys / sy).astype(np.int64), 0, h - 1)
    y1 = np.clip(np.maximum(np.round((ys + size0) / sy).astype(np.int64), y0 + 1), 1, h)
    # area of the footprint in mask pixels, outside parts included
    fx0, fx1 = np.round(xs / sx), np.maximum(np.round((xs + size0) / sx), np.round(xs / sx) + 1)
    fy0, fy1 = np.round(ys / sy), np.maximum(np.round((ys + size0) / sy), np.round(ys / sy) + 1)
    area = (fx1 - fx0) * (fy1 - fy0)
    inside = (integral[y1, x1].astype(np.int64) - integral[y0, x1] - integral[y1, x0] + integral[y0, x0])
    return (inside / area).astype(np.float32)


def tile_grid(mask: np.ndarray, downsample: float, slide_size: tuple[int, int], size0: int, min_tissue: float,
              stride0: int | None = None):
    """The ``tissue_fraction`` rule: grid from the slide's corner, keep tiles with enough tissue.

    Parameters
    ----------
    mask : (h, w) bool
        Tissue mask at ``downsample`` × level 0.
    slide_size : (width, height)
        Level-0 size of the slide.
    size0 : int
        Tile side in level-0 pixels.
    stride0 : int, optional
        Step between tiles in level-0 pixels (default ``size0``: no overlap).

    Returns
    -------
    coords : (n, 2) int32 level-0 x, y of each kept tile's top-left corner (row-major order)
    tissue : (n,) float32 tissue fraction of each kept tile
    """
    width, height = slide_size
    stride0 = int(stride0 or size0)
    if width < size0 or height < size0:
        return np.zeros((0, 2), np.int32), np.zeros(0, np.float32)
    nx, ny = (width - size0) // stride0 + 1, (height - size0) // stride0 + 1
    gy, gx = np.mgrid[0:ny, 0:nx]
    grid = np.stack([gx.ravel() * stride0, gy.ravel() * stride0], axis=1)
    frac = tissue_fractions(mask, downsample, grid, size0)
    keep = frac >= min_tissue
    return grid[keep].astype(np.int32), frac[keep]


def _level0(contour: np.ndarray, downsample) -> np.ndarray:
    """A contour in mask pixels scaled to level 0 and truncated to int32, as CLAM and Mussel do."""
    sx, sy = _xy(downsample)
    return np.array(contour * np.array([sx, sy]), dtype=np.int32)


def grid_mussel(tissue: list, holes: list, mask_shape: tuple[int, int], downsample, size0: int,
                stride0: int | None = None) -> np.ndarray:
    """The Mussel reference run's rule (``partition`` in ``mussel/utils/segment.py``); see the module doc.

    ``tissue``/``holes``: contours in mask pixels (:func:`workbench.io.segment.filter_contours`). Returns
    (n, 2) int32 level-0 top-left corners, row-major.
    """
    stride0 = int(stride0 or size0)
    tissue = [c for c in tissue if len(c) >= 4]  # Mussel makes no polygon of a contour under 4 points
    if not tissue:
        return np.zeros((0, 2), np.int32)
    pts = np.concatenate([_level0(c, downsample).reshape(-1, 2) for c in tissue])
    (minx, miny), (maxx, maxy) = pts.min(0), pts.max(0)
    xs = np.arange(minx, maxx, stride0)[:-1]  # Mussel's grid drops its last column and row
    ys = np.arange(miny, maxy, stride0)[:-1]
    if not len(xs) or not len(ys):
        return np.zeros((0, 2), np.int32)
    # the closed polygon (tissue minus the holes' interiors) on the mask's pixel lattice
    closed = render_mask(mask_shape, tissue, holes, closed=True)
    integral = cv2.integral(closed.view(np.uint8), sdepth=cv2.CV_32S)
    sx, sy = _xy(downsample)
    lat_x = (np.arange(mask_shape[1]) * sx).astype(np.int64)  # level-0 position of each lattice column
    lat_y = (np.arange(mask_shape[0]) * sy).astype(np.int64)
    i0, i1 = np.searchsorted(lat_x, xs, "left"), np.searchsorted(lat_x, xs + size0, "right")
    j0, j1 = np.searchsorted(lat_y, ys, "left"), np.searchsorted(lat_y, ys + size0, "right")
    J0, I0 = np.meshgrid(j0, i0, indexing="ij")
    J1, I1 = np.meshgrid(j1, i1, indexing="ij")
    count = integral[J1, I1] - integral[J0, I1] - integral[J1, I0] + integral[J0, I0]
    gy, gx = np.nonzero(count > 0)
    return np.stack([xs[gx], ys[gy]], axis=1).astype(np.int32)


def grid_clam(tissue: list, holes: list, downsample, size0: int, stride0: int | None = None) -> np.ndarray:
    """CLAM's rule (``process_contour`` with ``four_pt`` and ``use_padding``); see the module doc.

    Returns (n, 2) int32 level-0 top-left corners, row-major, each tile once.
    """
    stride0 = int(stride0 or size0)
    half, shift = size0 // 2, int(size0 // 2 * 0.5)
    offsets = np.array([(-shift, -shift), (shift, shift), (shift, -shift), (-shift, shift)]) if shift > 0 else \
        np.zeros((1, 2), int)
    kept = []
    for cont, hs in zip(tissue, holes):
        c0 = _level0(cont, downsample)
        h0 = [_level0(h, downsample) for h in hs]
        x, y, w, h = cv2.boundingRect(c0)
        for ty in range(y, y + h, stride0):
            for tx in range(x, x + w, stride0):
                cx, cy = tx + half, ty + half
                if not any(cv2.pointPolygonTest(c0, (float(cx + dx), float(cy + dy)), False) >= 0
                           for dx, dy in offsets):
                    continue
                centre = (tx + size0 / 2, ty + size0 / 2)
                if any(cv2.pointPolygonTest(hole, centre, False) > 0 for hole in h0):
                    continue
                kept.append((tx, ty))
    if not kept:
        return np.zeros((0, 2), np.int32)
    coords = np.unique(np.array(kept, np.int64), axis=0)
    return coords[np.lexsort((coords[:, 0], coords[:, 1]))].astype(np.int32)


def tile_slide(path: str, params: TilingParams, *, slide_id: str | None = None, mpp: float | None = None) -> dict:
    """Segment and grid one slide; returns arrays and attributes (no store I/O)."""
    seg = params.segment
    with open_slide(path, slide_id=slide_id, mpp=mpp) as slide:
        image, ds_xy, seg_level = slide.segmentation_image(seg.seg_level, seg.mask_mpp)
        mask, tissue, holes = tissue_mask(image, ds_xy, seg)
        del image
        size0 = tile_footprint(slide.mpp, params.tile_px, params.tile_mpp)
        stride0 = size0 - round(params.overlap_px * size0 / params.tile_px)
        threshold = params.tissue_threshold
        if params.tile_rule == "tissue_fraction":
            coords, frac = tile_grid(mask, ds_xy, slide.dimensions, size0, threshold, stride0)
        else:
            if params.tile_rule == "mussel":
                coords = grid_mussel(tissue, holes, mask.shape, ds_xy, size0, stride0)
            else:
                coords = grid_clam(tissue, holes, ds_xy, size0, stride0)
            frac = tissue_fractions(mask, ds_xy, coords, size0)
            if threshold > 0:
                keep = frac >= threshold
                coords, frac = coords[keep], frac[keep]
        attrs = {
            "path": str(slide.path),
            "mpp": slide.mpp,
            "width": slide.dimensions[0],
            "height": slide.dimensions[1],
            "level_count": slide.level_count,
            "vendor": slide.vendor,
            "tile_px": params.tile_px,
            "tile_mpp": params.tile_mpp,
            "tile_rule": params.tile_rule,
            "size0": size0,
            "stride0": stride0,
            "read_level": slide.best_level(params.tile_mpp),
            "seg_level": seg_level,
            "mask_downsample": float(ds_xy[0]),
            "mask_downsample_xy": [float(ds_xy[0]), float(ds_xy[1])],
            "n_tiles": int(len(coords)),
        }
    attrs["contours"] = contours_geojson(tissue, holes, ds_xy[0], slide_id=slide_id)
    return {"coords": coords, "tissue": frac, "mask": mask, "attrs": attrs}


def _write_slide(root: zarr.Group, slide_id: str, result: dict) -> None:
    g = root.create_group(st.Key.slide(slide_id), overwrite=True)  # drops any half-written earlier attempt
    st.write_array(g, "coords", result["coords"])
    st.write_array(g, "tissue", result["tissue"])
    st.write_array(g, "mask", result["mask"], chunk_rows=4096)
    g.attrs.update(result["attrs"])
    st.mark_complete(g)


def _tile_task(store_path: str, rec: dict, params: TilingParams) -> dict:
    sid = rec["slide_id"]
    t0 = time.perf_counter()
    root = zarr.open_group(store_path, mode="a", zarr_format=3)
    if st.is_complete(root, st.Key.slide(sid)):
        return {"slide_id": sid, "status": "skipped", "n_tiles": int(root[st.Key.coords(sid)].shape[0]),
                "seconds": 0.0, "error": None}
    try:
        result = tile_slide(rec["path"], params, slide_id=sid, mpp=rec.get("mpp"))
    except (SlideError, OSError, ValueError) as exc:
        return {"slide_id": sid, "status": "error", "n_tiles": 0, "seconds": time.perf_counter() - t0,
                "error": f"{type(exc).__name__}: {exc}"}
    try:
        _write_slide(root, sid, result)
    except OSError as exc:  # a full disk or a lost mount is not the slide's fault: stop the run, by name
        raise st.StoreError(f"slide {sid!r}: writing to store {store_path} failed ({exc}); the slide is left "
                            "incomplete and the next run redoes it") from exc
    n = result["attrs"]["n_tiles"]
    return {"slide_id": sid, "status": "tiled" if n else "empty", "n_tiles": n,
            "seconds": time.perf_counter() - t0, "error": None if n else
            f"no tile has tissue by the {params.tile_rule!r} rule (no tissue found, or slide smaller than one tile)"}


def tile_slides(
    manifest: pd.DataFrame | str | os.PathLike,
    store_path: str | os.PathLike,
    *,
    tile_px: int = 224,
    tile_mpp: float = 0.5,
    min_tissue: float | None = None,
    overlap_px: int = 0,
    segment: SegmentParams | dict | None = None,
    tile_rule: str = "mussel",
    on_error: str = "skip",
    client=None,
    scheduler: str = "threads",
    num_workers: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Tile every slide of a manifest into the store (created if needed, resumed if it exists).

    Parameters
    ----------
    manifest : DataFrame or path to a CSV/Parquet manifest
    store_path : path of the ``.zarr`` dataset store
    tile_px, tile_mpp : output tile size in pixels and its µm/px
    min_tissue : minimum tissue fraction of a kept tile (``tissue_fraction`` rule: default 0.5; ``mussel``/``clam``:
        an optional extra filter, default none)
    tile_rule : ``"mussel"`` (default, the Mussel reference run's rule), ``"clam"`` or ``"tissue_fraction"``
        (see the module doc)
    overlap_px : overlap of neighbouring tiles in output pixels (0: a plain grid)
    segment : :class:`SegmentParams` (or a dict of its fields)
    on_error : ``"skip"`` records a bad slide in the store's error table and goes on; ``"raise"`` raises
        after the other slides are done
    client : a ``dask.distributed.Client``, or a scheduler address (``"tcp://host:8786"``), to run on a
        cluster; else the local ``scheduler`` (threads: OpenSlide, the JPEG decoders and OpenCV release
        the GIL, so one process with a thread per core keeps both cores busy without copying masks
        between processes)

    Returns
    -------
    DataFrame with one row per slide: slide_id, status (tiled / skipped / empty / error), n_tiles, seconds, error.
    """
    import dask

    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if isinstance(segment, dict):
        segment = SegmentParams(**segment)
    params = TilingParams(tile_px, tile_mpp, min_tissue, segment or SegmentParams(), overlap_px, tile_rule).validate()
    if isinstance(client, str):
        from dask.distributed import Client

        client = Client(client)
    df = read_manifest(manifest) if not isinstance(manifest, pd.DataFrame) else validate_manifest(manifest)
    store_path = str(Path(store_path))
    with st.write_lock(store_path):
        root = st.create_store(store_path, manifest=to_records(df), tiling=params.to_dict())
        tasks = [dask.delayed(_tile_task, pure=False)(store_path, rec, params) for rec in to_records(df)]
        if client is not None:
            results = client.gather(client.compute(tasks))
        elif progress:
            from dask.diagnostics import ProgressBar

            with ProgressBar(minimum=1.0):
                results = dask.compute(*tasks, scheduler=scheduler, num_workers=num_workers)
        else:
            results = dask.compute(*tasks, scheduler=scheduler, num_workers=num_workers)
        summary = pd.DataFrame(list(results), columns=["slide_id", "status", "n_tiles", "seconds", "error"])
        for row in summary.itertuples():
            if row.status in ("error", "empty"):
                st.record_error(root, row.slide_id, "tile", row.error)
                log.warning("slide %r: %s", row.slide_id, row.error)
            elif row.status == "tiled":
                st.clear_error(root, row.slide_id, "tile")
    bad = summary[summary.status == "error"]
    if on_error == "raise" and len(bad):
        raise SlideError("tiling failed for " + "; ".join(f"{r.slide_id}: {r.error}" for r in bad.itertuples()))
    return summary
