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
from workbench.io.slides import SlideError, open_slide, tile_footprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TilingParams:
    tile_px: int = 224
    tile_mpp: float = 0.5
    min_tissue: float = 0.5
    segment: SegmentParams = field(default_factory=SegmentParams)
    overlap_px: int = 0

    def validate(self) -> "TilingParams":
        if self.tile_px < 16:
            raise ValueError(f"tile_px must be >= 16, got {self.tile_px}")
        if not (0.05 <= self.tile_mpp <= 100):
            raise ValueError(f"tile_mpp must be within 0.05–100 µm/px, got {self.tile_mpp}")
        if not (0 <= self.overlap_px < self.tile_px):
            raise ValueError(f"overlap_px must be within [0, tile_px), got {self.overlap_px}")
        if not (0.0 < self.min_tissue <= 1.0):
            raise ValueError(f"min_tissue must be within (0, 1], got {self.min_tissue}")
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
    stride0 = int(stride0 or size0)
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


def tile_slide(path: str, params: TilingParams, *, slide_id: str | None = None, mpp: float | None = None) -> dict:
    """Segment and grid one slide; returns arrays and attributes (no store I/O)."""
    with open_slide(path, slide_id=slide_id, mpp=mpp) as slide:
        identity = st.file_identity(path)  # recorded with the tiles: embedding refuses the slide if the file changes
        thumb, ds = slide.thumbnail(params.segment.mask_mpp)
        mask, tissue, holes = tissue_mask(thumb, ds, params.segment)
        size0 = tile_footprint(slide.mpp, params.tile_px, params.tile_mpp)
        stride0 = size0 - round(params.overlap_px * size0 / params.tile_px)
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
    st.seal_attrs(g)  # a changed byte in mpp, size0 or path is caught on read
    st.mark_complete(g)


def _tile_task(store_path: str, rec: dict, params: TilingParams) -> dict:
    sid = rec["slide_id"]
    t0 = time.perf_counter()
    root = st.open_root(store_path, mode="a")
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

    Returns
    -------
    DataFrame with one row per slide: slide_id, status (tiled / skipped / empty / error), n_tiles, seconds, error.
    """
    import dask

    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if isinstance(segment, dict):
        segment = SegmentParams(**segment)
    params = TilingParams(tile_px, tile_mpp, min_tissue, segment or SegmentParams(), overlap_px).validate()
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
