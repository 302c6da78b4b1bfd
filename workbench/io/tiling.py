"""Tiles at a fixed mpp over tissue, written per slide into the store, in parallel with Dask.

A tile is kept when its **tissue fraction** — the share of its footprint covered by the tissue mask —
is at least ``min_tissue`` (default 0.5). This is the mask-based equivalent of CLAM's
"tile centre / four points inside a contour" test: it uses the same contours (holes cut out) and gives
a number per tile that later stages can filter on. Tiles form a non-overlapping grid from the slide's
top-left corner (with ``overlap_px`` > 0, neighbouring tiles overlap by that many output pixels);
partial tiles at the right and bottom edges are not made.

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

import numpy as np
import pandas as pd
import zarr

from workbench import store as st
from workbench.io.manifest import read_manifest, to_records, validate_manifest
from workbench.io.segment import SegmentParams, contours_geojson, tissue_mask
from workbench.io.slides import SlideError, SlideTimeoutError, deadline, open_slide, tile_footprint
from workbench.errors import ParameterError
from workbench.validate import check_choice, check_float, check_int, check_optional

MAX_PIXELS = 4 * 10**10  # level-0 pixels of one slide (200k x 200k); the largest scans are about 1.5e10
MAX_TILES = 2_000_000  # tiles of one slide's grid
TIME_LIMIT = 1800.0  # seconds per slide
MAX_UPSAMPLE = 2.0  # tiles finer than the slide's own mpp by more than this factor are refused (no invented detail)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TilingParams:
    tile_px: int = 224
    tile_mpp: float = 0.5
    min_tissue: float = 0.5
    segment: SegmentParams = field(default_factory=SegmentParams)
    overlap_px: int = 0

    def validate(self) -> "TilingParams":
        check_int("tile_px", self.tile_px, 16, 65536)
        check_float("tile_mpp", self.tile_mpp, 0.05, 100)
        check_int("overlap_px", self.overlap_px, 0, int(self.tile_px) - 1)
        check_float("min_tissue", self.min_tissue, 0.0, 1.0, lo_open=True)
        self.segment.validate()
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["segment"] = self.segment.to_dict()
        return d


def tile_grid(mask: np.ndarray, downsample: float, slide_size: tuple[int, int], size0: int, min_tissue: float,
              stride0: int | None = None):
    """Grid tiles over a slide and keep those with enough tissue.

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
    check_float("downsample", downsample, 0, lo_open=True)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"mask must be a non-empty 2-D array, got shape {mask.shape}")
    if width < size0 or height < size0:
        return np.zeros((0, 2), np.int32), np.zeros(0, np.float32)
    nx, ny = (width - size0) // stride0 + 1, (height - size0) // stride0 + 1
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1)
    xs, ys = np.arange(nx) * stride0, np.arange(ny) * stride0
    # footprint edges in mask pixels (at least one pixel wide)
    x0 = np.clip(np.round(xs / downsample).astype(int), 0, mask.shape[1] - 1)
    x1 = np.clip(np.maximum(np.round((xs + size0) / downsample).astype(int), x0 + 1), 1, mask.shape[1])
    y0 = np.clip(np.round(ys / downsample).astype(int), 0, mask.shape[0] - 1)
    y1 = np.clip(np.maximum(np.round((ys + size0) / downsample).astype(int), y0 + 1), 1, mask.shape[0])
    Y0, X0 = np.meshgrid(y0, x0, indexing="ij")
    Y1, X1 = np.meshgrid(y1, x1, indexing="ij")
    area = (Y1 - Y0) * (X1 - X0)
    inside = integral[Y1, X1] - integral[Y0, X1] - integral[Y1, X0] + integral[Y0, X0]
    frac = (inside / area).astype(np.float32)
    keep = frac >= min_tissue
    gy, gx = np.nonzero(keep)
    coords = np.stack([xs[gx], ys[gy]], axis=1).astype(np.int32)
    return coords, frac[keep]


def tile_slide(path: str, params: TilingParams, *, slide_id: str | None = None, mpp: float | None = None,
               max_pixels: int = MAX_PIXELS, max_tiles: int = MAX_TILES) -> dict:
    """Segment and grid one slide; returns arrays and attributes (no store I/O).

    Refuses (:class:`SlideError`, naming the slide) a slide over ``max_pixels`` level-0 pixels, a grid of
    more than ``max_tiles`` tiles, or a tile footprint under one level-0 pixel, before reading pixels.
    """
    with open_slide(path, slide_id=slide_id, mpp=mpp) as slide:
        identity = st.file_identity(path)  # recorded with the tiles: embedding refuses the slide if the file changes
        name = f"slide {slide.slide_id!r} ({slide.path})"
        w, h = slide.dimensions
        if w < 1 or h < 1 or w * h > max_pixels:
            raise SlideError(f"{name}: level-0 size {w} x {h} = {w * h:,} pixels is beyond the sanity limit of "
                             f"{max_pixels:,} (max_pixels); raise it if this slide is real")
        if params.tile_mpp * MAX_UPSAMPLE < slide.mpp:
            raise SlideError(f"{name}: tile_mpp {params.tile_mpp} µm/px would upsample this {slide.mpp:.4g} µm/px "
                             f"slide {slide.mpp / params.tile_mpp:.3g}x (at most {MAX_UPSAMPLE:g}x is allowed); use "
                             "a coarser tile_mpp or check the slide's mpp")
        size0 = tile_footprint(slide.mpp, params.tile_px, params.tile_mpp)
        stride0 = size0 - round(params.overlap_px * size0 / params.tile_px)
        if stride0 < 1:
            raise SlideError(f"{name}: a tile covers {size0} level-0 pixel(s); with overlap_px={params.overlap_px} "
                             "the step between tiles is below one pixel; use a larger tile_mpp or less overlap")
        n_grid = ((w - size0) // stride0 + 1) * ((h - size0) // stride0 + 1) if w >= size0 and h >= size0 else 0
        if n_grid > max_tiles:
            raise SlideError(f"{name}: {n_grid:,} tiles of {size0} level-0 px ({params.tile_px} px at "
                             f"{params.tile_mpp} µm/px on a {slide.mpp:.4g} µm/px slide) is beyond the sanity limit "
                             f"of {max_tiles:,} (max_tiles); check the slide's mpp or raise the limit")
        thumb, ds = slide.thumbnail(params.segment.mask_mpp)
        mask, tissue, holes = tissue_mask(thumb, ds, params.segment)
        coords, frac = tile_grid(mask, ds, slide.dimensions, size0, params.min_tissue, stride0)
        attrs = {
            "path": str(slide.path),
            "mpp": slide.mpp,
            "width": slide.dimensions[0],
            "height": slide.dimensions[1],
            "level_count": slide.level_count,
            "vendor": slide.vendor,
            "tile_px": params.tile_px,
            "tile_mpp": params.tile_mpp,
            "size0": size0,
            "stride0": stride0,
            "read_level": slide.best_level(params.tile_mpp),
            "mask_downsample": ds,
            "n_tiles": int(len(coords)),
            "manifest_path": str(path),
            "file_identity": identity,
        }
    attrs["contours"] = contours_geojson(tissue, holes, ds, slide_id=slide_id)
    return {"coords": coords, "tissue": frac, "mask": mask, "attrs": attrs}


def _write_slide(root: zarr.Group, slide_id: str, result: dict) -> None:
    g = root.create_group(st.Key.slide(slide_id), overwrite=True)  # drops any half-written earlier attempt
    st.write_array(g, "coords", result["coords"])
    st.write_array(g, "tissue", result["tissue"])
    st.write_array(g, "mask", result["mask"], chunk_rows=4096)
    g.attrs.update(result["attrs"])
    st.mark_complete(g)


def _tile_task(store_path: str, rec: dict, params: TilingParams, limits: dict | None = None) -> dict:
    sid = rec["slide_id"]
    limits = dict(limits or {})
    failed_before = limits.pop("failed_before", None)
    time_limit = limits.pop("time_limit", None)
    t0 = time.perf_counter()
    root = st.open_root(store_path, mode="a")
    if st.is_complete(root, st.Key.slide(sid)):
        return {"slide_id": sid, "status": "skipped", "n_tiles": int(root[st.Key.coords(sid)].shape[0]),
                "seconds": 0.0, "error": None}
    if failed_before is not None:
        return {"slide_id": sid, "status": "failed-earlier", "n_tiles": 0, "seconds": 0.0, "error": failed_before}
    try:
        with deadline(time_limit, sid):
            result = tile_slide(rec["path"], params, slide_id=sid, mpp=rec.get("mpp"), **limits)
    except SlideTimeoutError as exc:
        return {"slide_id": sid, "status": "timeout", "n_tiles": 0, "seconds": time.perf_counter() - t0,
                "error": f"{type(exc).__name__}: {exc}", "error_class": type(exc).__name__}
    except MemoryError as exc:
        return {"slide_id": sid, "status": "error", "n_tiles": 0, "seconds": time.perf_counter() - t0,
                "error": f"MemoryError: slide {sid!r} needs more memory than is available ({exc})",
                "error_class": "MemoryError"}
    except Exception as exc:  # noqa: BLE001 — one slide's failure of any kind is its row, never the batch's
        where = "" if isinstance(exc, (SlideError, OSError)) else f"slide {sid!r}: "
        return {"slide_id": sid, "status": "error", "n_tiles": 0, "seconds": time.perf_counter() - t0,
                "error": f"{type(exc).__name__}: {where}{exc}", "error_class": type(exc).__name__}
    try:
        _write_slide(root, sid, result)
    except OSError as exc:  # a full disk or a lost mount is not the slide's fault: stop the run, by name
        raise st.StoreError(f"slide {sid!r}: writing to store {store_path} failed ({exc}); the slide is left "
                            "incomplete and the next run redoes it") from exc
    n = result["attrs"]["n_tiles"]
    return {"slide_id": sid, "status": "tiled" if n else "empty", "n_tiles": n,
            "seconds": time.perf_counter() - t0, "error": None if n else
            f"no tile has tissue fraction >= {params.min_tissue} (no tissue found, or slide smaller than one tile)"}


def tile_slides(
    manifest: pd.DataFrame | str | os.PathLike,
    store_path: str | os.PathLike,
    *,
    tile_px: int = 224,
    tile_mpp: float = 0.5,
    min_tissue: float = 0.5,
    overlap_px: int = 0,
    segment: SegmentParams | dict | None = None,
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
    min_tissue : minimum tissue fraction of a kept tile
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
    params = TilingParams(tile_px, tile_mpp, min_tissue, segment or SegmentParams(), overlap_px).validate()
    if isinstance(client, str):
        from dask.distributed import Client

        client = Client(client)
    df = read_manifest(manifest) if not isinstance(manifest, pd.DataFrame) else validate_manifest(manifest)
    store_path = str(Path(store_path))
    with st.write_lock(store_path):
        root = st.create_store(store_path, manifest=to_records(df), tiling=params.to_dict())
        failed = {} if retry_failed else st.failed_slides(root, "tile")
        limits = {"time_limit": time_limit, "max_pixels": int(max_pixels), "max_tiles": int(max_tiles)}
        tasks = [dask.delayed(_tile_task, pure=False)(store_path, rec, params,
                                                      {**limits, "failed_before": failed.get(rec["slide_id"])})
                 for rec in to_records(df)]
        if client is not None:
            results = client.gather(client.compute(tasks))
        elif progress:
            from dask.diagnostics import ProgressBar

            with ProgressBar(minimum=1.0):
                results = dask.compute(*tasks, scheduler=scheduler, num_workers=num_workers)
        else:
            results = dask.compute(*tasks, scheduler=scheduler, num_workers=num_workers)
        summary = pd.DataFrame(list(results), columns=["slide_id", "status", "n_tiles", "seconds", "error",
                                                       "error_class"])
        recorded = st.failed_slides(root, "tile") if retry_failed else failed
        for row in summary.itertuples():
            if row.status in ("error", "empty", "timeout"):
                cls = row.error_class if isinstance(row.error_class, str) else (
                    "EmptySlide" if row.status == "empty" else None)
                st.record_failure(root, row.slide_id, "tile", row.error, cls)
            elif row.status == "tiled" and row.slide_id in recorded:
                st.clear_error(root, row.slide_id, "tile")
    bad = summary[summary.status.isin(["error", "timeout"])]
    if on_error == "raise" and len(bad):
        raise SlideError("tiling failed for " + "; ".join(f"{r.slide_id}: {r.error}" for r in bad.itertuples()))
    return summary
