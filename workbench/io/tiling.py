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

**One row, one outcome.** Whatever goes wrong with one slide (opening, segmenting, gridding, reading) is
caught in its task and recorded (:func:`workbench.store.record_failure`: slide id, stage ``tile``, error
class, message); a re-run skips slides with a recorded failure (status ``failed-earlier``) unless
``retry_failed=True``. Only store write failures (full disk, lost mount) stop the run, by name.

**Sanity before work.** A slide larger than ``max_pixels`` level-0 pixels or whose grid would hold more
than ``max_tiles`` tiles is refused by name before any pixel is read, and every slide's task runs under
``time_limit`` seconds (checked inside the read loops: a slide past it stops within one read, is recorded
as ``SlideTimeoutError`` with status ``timeout``, and the worker goes on to the next slide).
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
from workbench.errors import ParameterError
from workbench.io.manifest import read_manifest, to_records, validate_manifest
from workbench.io.segment import SegmentParams, contours_geojson, render_mask, tissue_mask
from workbench.io.slides import SlideError, SlideTimeoutError, deadline, open_slide, tile_footprint
from workbench.validate import check_choice, check_float, check_int, check_optional

MAX_PIXELS = 4 * 10**10  # level-0 pixels of one slide (200k x 200k); the largest scans are about 1.5e10
MAX_TILES = 2_000_000  # tiles of one slide's grid
TIME_LIMIT = 1800.0  # seconds per slide
MAX_UPSAMPLE = 2.0  # tiles finer than the slide's own mpp by more than this factor are refused (no invented detail)

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

    def validate(self) -> TilingParams:
        check_int("tile_px", self.tile_px, 16, 65536)
        check_float("tile_mpp", self.tile_mpp, 0.05, 100)
        check_int("overlap_px", self.overlap_px, 0, int(self.tile_px) - 1)
        if self.min_tissue is not None:
            check_float("min_tissue", self.min_tissue, 0.0, 1.0)
        check_choice("tile_rule", self.tile_rule, TILE_RULES)
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


def tissue_fractions(
    mask: np.ndarray, downsample, coords: np.ndarray, size0: int, integral: np.ndarray | None = None
) -> np.ndarray:
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
    inside = integral[y1, x1].astype(np.int64) - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (inside / area).astype(np.float32)


def tile_grid(
    mask: np.ndarray,
    downsample: float,
    slide_size: tuple[int, int],
    size0: int,
    min_tissue: float,
    stride0: int | None = None,
):
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
    check_int("size0", size0, 1)
    stride0 = check_int("stride0", int(stride0 or size0), 1)
    for d in downsample if isinstance(downsample, (tuple, list)) else (downsample,):
        check_float("downsample", d, 0, lo_open=True)  # one factor, or (x, y)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"mask must be a non-empty 2-D array, got shape {mask.shape}")
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


def grid_mussel(
    tissue: list, holes: list, mask_shape: tuple[int, int], downsample, size0: int, stride0: int | None = None
) -> np.ndarray:
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
    offsets = (
        np.array([(-shift, -shift), (shift, shift), (shift, -shift), (-shift, shift)])
        if shift > 0
        else np.zeros((1, 2), int)
    )
    kept = []
    for cont, hs in zip(tissue, holes):
        c0 = _level0(cont, downsample)
        h0 = [_level0(h, downsample) for h in hs]
        x, y, w, h = cv2.boundingRect(c0)
        for ty in range(y, y + h, stride0):
            for tx in range(x, x + w, stride0):
                cx, cy = tx + half, ty + half
                if not any(
                    cv2.pointPolygonTest(c0, (float(cx + dx), float(cy + dy)), False) >= 0 for dx, dy in offsets
                ):
                    continue
                centre = (tx + size0 / 2, ty + size0 / 2)
                if any(cv2.pointPolygonTest(hole, centre, False) > 0 for hole in h0):
                    continue
                kept.append((tx, ty))
    if not kept:
        return np.zeros((0, 2), np.int32)
    coords = np.unique(np.array(kept, np.int64), axis=0)
    return coords[np.lexsort((coords[:, 0], coords[:, 1]))].astype(np.int32)


def tile_slide(
    path: str,
    params: TilingParams,
    *,
    slide_id: str | None = None,
    mpp: float | None = None,
    max_pixels: int = MAX_PIXELS,
    max_tiles: int = MAX_TILES,
) -> dict:
    """Segment and grid one slide; returns arrays and attributes (no store I/O).

    Refuses (:class:`SlideError`, naming the slide) a slide over ``max_pixels`` level-0 pixels, a grid of
    more than ``max_tiles`` tiles, or a tile footprint under one level-0 pixel, before reading pixels.
    """
    seg = params.segment
    with open_slide(path, slide_id=slide_id, mpp=mpp) as slide:
        identity = st.file_identity(path)  # recorded with the tiles: embedding refuses the slide if the file changes
        name = f"slide {slide.slide_id!r} ({slide.path})"
        w, h = slide.dimensions
        if w < 1 or h < 1 or w * h > max_pixels:
            raise SlideError(
                f"{name}: level-0 size {w} x {h} = {w * h:,} pixels is beyond the sanity limit of "
                f"{max_pixels:,} (max_pixels); raise it if this slide is real"
            )
        if params.tile_mpp * MAX_UPSAMPLE < slide.mpp:
            raise SlideError(
                f"{name}: tile_mpp {params.tile_mpp} µm/px would upsample this {slide.mpp:.4g} µm/px "
                f"slide {slide.mpp / params.tile_mpp:.3g}x (at most {MAX_UPSAMPLE:g}x is allowed); use "
                "a coarser tile_mpp or check the slide's mpp"
            )
        size0 = tile_footprint(slide.mpp, params.tile_px, params.tile_mpp)
        stride0 = size0 - round(params.overlap_px * size0 / params.tile_px)
        if stride0 < 1:
            raise SlideError(
                f"{name}: a tile covers {size0} level-0 pixel(s); with overlap_px={params.overlap_px} "
                "the step between tiles is below one pixel; use a larger tile_mpp or less overlap"
            )
        n_grid = ((w - size0) // stride0 + 1) * ((h - size0) // stride0 + 1) if w >= size0 and h >= size0 else 0
        if n_grid > max_tiles:
            raise SlideError(
                f"{name}: {n_grid:,} tiles of {size0} level-0 px ({params.tile_px} px at "
                f"{params.tile_mpp} µm/px on a {slide.mpp:.4g} µm/px slide) is beyond the sanity limit "
                f"of {max_tiles:,} (max_tiles); check the slide's mpp or raise the limit"
            )
        image, ds_xy, seg_level = slide.segmentation_image(seg.seg_level, seg.mask_mpp)
        mask, tissue, holes = tissue_mask(image, ds_xy, seg)
        del image
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
            "manifest_path": str(path),
            "file_identity": identity,
        }
    attrs["contours"] = contours_geojson(tissue, holes, ds_xy[0], slide_id=slide_id)
    return {"coords": coords, "tissue": frac, "mask": mask, "attrs": attrs}


def _write_slide(root: zarr.Group, slide_id: str, result: dict) -> None:
    g = root.create_group(st.Key.slide(slide_id), overwrite=True)  # drops any half-written earlier attempt
    st.write_array(g, "coords", result["coords"])
    st.write_array(g, "tissue", result["tissue"])
    st.write_array(g, "mask", result["mask"], chunk_rows=4096)
    g.attrs.update(result["attrs"])
    st.seal_attrs(g)  # a changed byte in mpp, size0 or path is caught on read
    st.mark_complete(g)


def _failed_row(sid: str, status: str, t0: float, error: str, error_class: str) -> dict:
    """The summary row of a slide whose tiling failed (``status`` "error" or "timeout")."""
    return {
        "slide_id": sid,
        "status": status,
        "n_tiles": 0,
        "seconds": time.perf_counter() - t0,
        "error": error,
        "error_class": error_class,
    }


def _tile_task(store_path: str, rec: dict, params: TilingParams, limits: dict | None = None) -> dict:
    sid = rec["slide_id"]
    limits = dict(limits or {})
    failed_before = limits.pop("failed_before", None)
    time_limit = limits.pop("time_limit", None)
    t0 = time.perf_counter()
    root = st.open_root(store_path, mode="a")
    if st.is_complete(root, st.Key.slide(sid)):
        return {
            "slide_id": sid,
            "status": "skipped",
            "n_tiles": int(root[st.Key.coords(sid)].shape[0]),
            "seconds": 0.0,
            "error": None,
        }
    if failed_before is not None:
        return {"slide_id": sid, "status": "failed-earlier", "n_tiles": 0, "seconds": 0.0, "error": failed_before}
    try:
        with deadline(time_limit, sid):
            result = tile_slide(rec["path"], params, slide_id=sid, mpp=rec.get("mpp"), **limits)
    except SlideTimeoutError as exc:
        return _failed_row(sid, "timeout", t0, f"{type(exc).__name__}: {exc}", type(exc).__name__)
    except MemoryError as exc:
        msg = f"MemoryError: slide {sid!r} needs more memory than is available ({exc})"
        return _failed_row(sid, "error", t0, msg, "MemoryError")
    except Exception as exc:
        where = "" if isinstance(exc, (SlideError, OSError)) else f"slide {sid!r}: "
        return _failed_row(sid, "error", t0, f"{type(exc).__name__}: {where}{exc}", type(exc).__name__)
    try:
        _write_slide(root, sid, result)
    except OSError as exc:  # a full disk or a lost mount is not the slide's fault: stop the run, by name
        raise st.StoreError(
            f"slide {sid!r}: writing to store {store_path} failed ({exc}); the slide is left "
            "incomplete and the next run redoes it"
        ) from exc
    n = result["attrs"]["n_tiles"]
    return {
        "slide_id": sid,
        "status": "tiled" if n else "empty",
        "n_tiles": n,
        "seconds": time.perf_counter() - t0,
        "error": None
        if n
        else f"no tile has tissue by the {params.tile_rule!r} rule (no tissue found, or slide smaller than one tile)",
    }


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
    retry_failed: bool = False,
    time_limit: float | None = TIME_LIMIT,
    max_pixels: int = MAX_PIXELS,
    max_tiles: int = MAX_TILES,
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
    retry_failed : retry slides whose failure is recorded in the store (default: skip them, status
        ``failed-earlier``)
    time_limit : seconds per slide (None: no limit); a slide past it is recorded as timed out
    max_pixels, max_tiles : sanity limits on a slide's level-0 pixels and on its tile grid

    Returns
    -------
    DataFrame with one row per slide: slide_id, status (tiled / skipped / empty / error), n_tiles, seconds, error.
    """
    import dask

    check_choice("on_error", on_error, ("skip", "raise"))
    check_optional(check_float, "time_limit", time_limit, 0, lo_open=True)
    check_int("max_pixels", max_pixels, 1)
    check_int("max_tiles", max_tiles, 1)
    if num_workers is not None:
        check_int("num_workers", num_workers, 1, 1024)
    if isinstance(segment, dict):
        try:
            segment = SegmentParams(**segment)
        except TypeError as exc:
            raise ParameterError(f"segment={segment!r}: {exc}") from None
    params = TilingParams(tile_px, tile_mpp, min_tissue, segment or SegmentParams(), overlap_px, tile_rule).validate()
    if isinstance(client, str):
        from dask.distributed import Client

        client = Client(client)
    df = read_manifest(manifest) if not isinstance(manifest, pd.DataFrame) else validate_manifest(manifest)
    store_path = str(Path(store_path))
    with st.write_lock(store_path):
        root = st.create_store(store_path, manifest=to_records(df), tiling=params.to_dict())
        failed = {} if retry_failed else st.failed_slides(root, "tile")
        limits = {"time_limit": time_limit, "max_pixels": int(max_pixels), "max_tiles": int(max_tiles)}
        tasks = [
            dask.delayed(_tile_task, pure=False)(
                store_path, rec, params, {**limits, "failed_before": failed.get(rec["slide_id"])}
            )
            for rec in to_records(df)
        ]
        if client is not None:
            results = client.gather(client.compute(tasks))
        elif progress:
            from workbench.progress import dask_progress

            with dask_progress("tile slides"):
                results = dask.compute(*tasks, scheduler=scheduler, num_workers=num_workers)
        else:
            results = dask.compute(*tasks, scheduler=scheduler, num_workers=num_workers)
        summary = pd.DataFrame(
            list(results), columns=["slide_id", "status", "n_tiles", "seconds", "error", "error_class"]
        )
        recorded = st.failed_slides(root, "tile") if retry_failed else failed
        for row in summary.itertuples():
            if row.status in ("error", "empty", "timeout"):
                cls = (
                    row.error_class
                    if isinstance(row.error_class, str)
                    else ("EmptySlide" if row.status == "empty" else None)
                )
                st.record_failure(root, row.slide_id, "tile", row.error, cls)
            elif row.status == "tiled" and row.slide_id in recorded:
                st.clear_error(root, row.slide_id, "tile")
    bad = summary[summary.status.isin(["error", "timeout"])]
    if on_error == "raise" and len(bad):
        raise SlideError("tiling failed for " + "; ".join(f"{r.slide_id}: {r.error}" for r in bad.itertuples()))
    return summary
