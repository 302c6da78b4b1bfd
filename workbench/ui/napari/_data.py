"""What the napari layers show, computed without Qt or napari: lazy slide pyramids, tile rasters, columns.

World coordinates are level-0 pixels (row = y, column = x) for every layer, so the image, the tissue mask
(scaled by its ``mask_downsample``), the tile grid (scaled by the tile footprint ``size0``) and drawn
regions line up.

* :func:`slide_pyramid` — the slide's pyramid levels as Dask arrays. Each level is a
  :class:`LevelArray` (an array-like whose ``__getitem__`` reads that region from the slide) wrapped by
  ``dask.array.from_array``: building the arrays reads no pixels, so a 100k × 100k slide opens at once,
  and napari computes only the chunks in view. Chunks come from :class:`~workbench.io.slides.TileReader`
  (the TIFF fast path: stored tiles decoded once, in threads) or OpenSlide ``read_region``.
* :func:`tile_grid` / :func:`tile_raster` — tiles on their grid (one raster pixel per tile), so a slide
  with 10^5 tiles is one small image rather than 10^5 shapes.
* :func:`list_columns` / :func:`column_values` — per-tile columns from the store: tissue fraction,
  prefilter scores, cluster labels of a tree level (sliced by the slide's global tile id range), sample
  membership, QC labels.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from workbench import store as st
from workbench.dataset import run_column

log = logging.getLogger(__name__)

CHUNK = 512
TRUTH_DOWNSAMPLE = 16


# --------------------------------------------------------------------------- lazy pyramid


class LevelArray:
    """One pyramid level of a slide as a read-only array-like (h, w, 3) uint8 (white outside the slide).

    Supports basic slicing with step 1 (what ``dask.array.from_array`` needs). Thread-safe.
    """

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, slide, level: int, *, fast: bool = True, chunk: int = CHUNK):
        self.slide, self.level, self.chunk = slide, int(level), int(chunk)
        w, h = slide.level_dimensions[level]
        self.shape = (int(h), int(w), 3)
        self.downsample = float(slide.level_downsamples[level])
        self._reader = None
        self._lock = threading.Lock()
        if fast:
            from workbench.io.slides import TileReader

            reader = TileReader(slide, tile_px=self.chunk, tile_mpp=slide.level_mpp(level), workers=2)
            if reader.backend == "tiff-direct" and reader.level == level:
                self._reader = reader
            else:
                reader.close()
        self.backend = "tiff-direct" if self._reader is not None else "openslide"

    def _bounds(self, key, axis: int) -> tuple[int, int]:
        n = self.shape[axis]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise IndexError("LevelArray supports slices with step 1 only")
            return start, max(start, stop)
        if isinstance(key, (int, np.integer)):
            i = int(key) + (n if key < 0 else 0)
            return i, i + 1
        raise IndexError(f"LevelArray supports int and slice indices, not {type(key).__name__}")

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        (y0, y1), (x0, x1) = self._bounds(key[0], 0), self._bounds(key[1], 1)
        out = self.read(x0, y0, x1 - x0, y1 - y0)
        squeeze = tuple(0 if isinstance(k, (int, np.integer)) else slice(None) for k in key[:2])
        return out[squeeze + (key[2],)]

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB (h, w, 3) of the level's region with top-left (x, y) in this level's pixels."""
        if w <= 0 or h <= 0:
            return np.zeros((max(h, 0), max(w, 0), 3), np.uint8)
        ds = self.downsample
        if self._reader is not None and w <= self.chunk and h <= self.chunk:
            with self._lock:  # the reader's block cache is not thread-safe
                block = self._reader.read(np.array([[round(x * ds), round(y * ds)]]))[0]
            return block[:h, :w]
        return self.slide.read_region(round(x * ds), round(y * ds), self.level, w, h)

    def __array__(self, dtype=None, copy=None):
        raise TypeError("LevelArray would read the whole level; slice it first")

    def close(self):
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def slide_pyramid(slide, *, chunk: int = CHUNK, fast: bool = True, min_side: int = 0):
    """The slide's levels as Dask arrays (finest first) and their downsamples vs level 0.

    Parameters
    ----------
    slide : :class:`~workbench.io.slides.Slide` (kept open by the caller while the arrays are used)
    chunk : chunk side in pixels
    fast : use the TIFF fast path where the file allows it
    min_side : drop levels whose longer side is below this (napari needs none of them)

    Returns
    -------
    levels : list of dask arrays (h_l, w_l, 3) uint8
    downsamples : list of float
    """
    import dask.array as da

    levels, downsamples = [], []
    for level in range(slide.level_count):
        w, h = slide.level_dimensions[level]
        if level and max(w, h) < min_side:
            break
        arr = LevelArray(slide, level, fast=fast, chunk=chunk)
        levels.append(
            da.from_array(
                arr,
                chunks=(chunk, chunk, 3),
                asarray=False,
                fancy=False,
                lock=False,
                name=f"slide-{slide.slide_id}-level{level}-{id(arr)}",
            )
        )
        downsamples.append(float(slide.level_downsamples[level]))
    return levels, downsamples


# --------------------------------------------------------------------------- tile rasters


def tile_grid(coords: np.ndarray, size0: int, width: int, height: int):
    """Grid cell (row, col) of each tile and the grid's shape; tiles sit at multiples of ``size0``.

    Returns rows (n,), cols (n,) int64 and shape (ceil(height / size0), ceil(width / size0)).
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    shape = (max(1, -(-int(height) // size0)), max(1, -(-int(width) // size0)))
    cols, rows = coords[:, 0] // size0, coords[:, 1] // size0
    if len(coords) and (rows.max() >= shape[0] or cols.max() >= shape[1] or rows.min() < 0 or cols.min() < 0):
        raise ValueError("tile coordinates fall outside the slide")
    return rows, cols, shape


def tile_raster(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape, *, fill=np.nan, dtype=np.float32):
    """An image with one pixel per grid cell: ``values[i]`` at (rows[i], cols[i]), ``fill`` elsewhere."""
    out = np.full(shape, fill, dtype=dtype)
    out[rows, cols] = np.asarray(values).astype(dtype, copy=False)
    return out


def tile_at(coords: np.ndarray, size0: int, x: float, y: float) -> int:
    """Index of the tile whose footprint holds level-0 point (x, y), or -1."""
    coords = np.asarray(coords)
    hit = (coords[:, 0] <= x) & (x < coords[:, 0] + size0) & (coords[:, 1] <= y) & (y < coords[:, 1] + size0)
    idx = np.flatnonzero(hit)
    return int(idx[0]) if idx.size else -1


# --------------------------------------------------------------------------- per-tile columns


def slide_range(root, slide_id: str) -> tuple[int, int]:
    """Global tile id range [start, stop) of a slide (manifest order of complete slides)."""
    ids = st.slide_ids(root)
    if slide_id not in ids:
        raise st.StoreError(f"slide {slide_id!r} is not a complete slide of {st.store_path(root)}: run tiling first")
    counts = st.tile_counts(root, ids)
    i = ids.index(slide_id)
    start = int(counts[:i].sum())
    return start, start + int(counts[i])


def _children(group) -> list[str]:
    try:
        return sorted(name for name, _ in group.members())
    except (KeyError, AttributeError):
        return []


def list_columns(root, slide_id: str) -> list[str]:
    """Names of the per-tile columns available for a slide (for the colour-by menu).

    ``tissue``; ``qc``; ``prefilter/<name>``; ``tree/<run>/level_<l>``; ``samples/<run>``.
    """
    names = ["tissue", "qc"]
    if st.Key.prefilters(slide_id) in root:
        names += [f"prefilter/{n}" for n in _children(root[st.Key.prefilters(slide_id)])]
    for run in st.run_names(root, st.Key.TREES):
        g = root[st.run_key(root, st.Key.tree(run))]
        names += [f"{st.Key.tree(run)}/{n}" for n in _children(g) if n.startswith("level_")]
    for run in st.run_names(root, st.Key.SAMPLES):
        if "indices" in root[st.run_key(root, st.Key.sample(run))]:
            names += [st.Key.sample(run)]
    return names


def membership(indices, start: int, stop: int, *, rows: int = 1 << 20) -> np.ndarray:
    """(stop - start,) bool: which global ids in [start, stop) appear in ``indices`` (read in blocks of ``rows``)."""
    out = np.zeros(stop - start, bool)
    for i in range(0, indices.shape[0], rows):
        block = np.asarray(indices[i : i + rows], dtype=np.int64)
        block = block[(block >= start) & (block < stop)]
        out[block - start] = True
    return out


def column_values(root, slide_id: str, name: str) -> np.ndarray:
    """(n,) values of one column (see :func:`list_columns`) for the slide's tiles, as float32 or int."""
    from workbench.ui import qc

    if name == "tissue":
        return np.asarray(root[st.Key.tissue(slide_id)][:], np.float32)
    if name == "qc":
        return qc.read_labels(root, slide_id).astype(np.float32)
    if name.startswith("prefilter/"):
        key = st.Key.prefilter(slide_id, name.split("/", 1)[1])
        if key not in root:
            raise st.StoreError(f"slide {slide_id!r} has no prefilter scores {name!r}: run the prefilter first")
        return np.asarray(root[key][:], np.float32)
    start, stop = slide_range(root, slide_id)
    if name.startswith(st.Key.TREES + "/"):
        arr = run_column(root, name)
        total = int(st.tile_counts(root).sum())
        if arr.shape[0] != total:
            raise st.StoreError(f"{name} has {arr.shape[0]} entries but the store has {total} tiles: the tree is stale")
        return np.asarray(arr[start:stop])
    if name.startswith(st.Key.SAMPLES + "/"):
        return membership(run_column(root, name), start, stop).astype(np.float32)
    raise KeyError(f"unknown tile column {name!r} for slide {slide_id!r}; available: {list_columns(root, slide_id)}")


# --------------------------------------------------------------------------- ground truth, neighbours


def truth_path(slide_path: str | Path) -> Path | None:
    """``<slide>.truth.npz`` next to a synthetic slide (suffix appended or replacing), if it exists."""
    return st.Key.truth(slide_path)


def pen_truth(slide_path: str | Path) -> tuple[np.ndarray, float] | None:
    """The pen-mask ground truth of a synthetic slide and its downsample vs level 0, or ``None``."""
    path = truth_path(slide_path)
    if path is None:
        return None
    with np.load(path) as z:
        if "pen" not in z.files:
            return None
        pen = np.asarray(z["pen"]).astype(bool)
        ds = float(z["downsample"]) if "downsample" in z.files else float(TRUTH_DOWNSAMPLE)
    return pen, ds


def find_store_index(store: str | Path, root=None, slide_id: str | None = None):
    """A saved retrieval index over this store's features, or ``None`` when none exists or it is stale."""
    try:
        from workbench.search import retrieval
    except ImportError:
        return None
    load = getattr(retrieval, "load_store_index", None)
    where = getattr(retrieval, "index_path", None)
    if load is None or where is None:
        return None
    root = st.open_store(store) if root is None else root
    ids = st.slide_ids(root)
    sid = slide_id if slide_id in ids else (ids[0] if ids else None)
    if sid is None or st.Key.features_group(sid) not in root:
        return None
    feats = root[st.Key.features_group(sid)]
    for name in _children(feats):
        encoder = feats[name].attrs.get("encoder", name)
        for kind in retrieval.KINDS:  # every registered kind, in registration order (flat, ivf, hnsw, ivfpq, ...)
            if where(store, encoder, kind).exists():
                try:
                    return load(store, encoder, kind, use_gpu=False)
                except (RuntimeError, OSError, ValueError, st.StoreError) as exc:
                    log.warning("retrieval index %s/%s of %s not usable: %s", encoder, kind, store, exc)
    return None


def nearest_tiles(index, root, slide_id: str, tile: int, k: int = 5):
    """The ``k`` nearest tiles (other patients) of one tile as a DataFrame, via a store index."""
    start, _ = slide_range(root, slide_id)
    scores, ids = index.query_tiles(np.array([start + tile]), k)
    return index.hits_table(scores, ids)
