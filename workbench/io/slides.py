"""Opening slides, resolving their mpp, and reading tiles fast.

:func:`open_slide` wraps OpenSlide (SVS, generic TIFF, DICOM, MRXS, NDPI, …) and resolves the level-0
microns per pixel from, in order: an explicit ``mpp`` (the manifest's column), ``openslide.mpp-x/y``,
``aperio.MPP``, the TIFF resolution tags. A slide with none of these is refused by name: the user must
give the mpp in the manifest. Nothing is guessed.

:class:`TileReader` reads square tiles of ``tile_px`` pixels at ``tile_mpp`` µm/px from level-0 tile
coordinates. It reads from the coarsest pyramid level that is still at least as fine as ``tile_mpp``
and resizes (``cv2.INTER_AREA``) only when that level's mpp differs from the target by more than
``MPP_TOLERANCE`` (so a 0.499-mpp scan tiled at 0.5 mpp is not resampled). For TIFF-family files whose
level is a tiled JPEG/LZW/... page (SVS, generic pyramidal TIFF) it decodes every stored tile that the
batch touches exactly once, in a thread pool straight from the file (imagecodecs releases the GIL), and
cuts the tiles from the decoded blocks — about 3–5× faster than one ``read_region`` per tile
(``benchmarks/tiling.py``). Anything else goes through OpenSlide's ``read_region``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from workbench.errors import SlideError, SlideTimeoutError

log = logging.getLogger(__name__)

MPP_TOLERANCE = 0.02  # relative: a level within 2 % of the target mpp is read as is
MAX_SEG_PIXELS = 2**30  # a segmentation level larger than this (3 GiB as RGB) is refused: use mask_mpp
WHITE = 255


# ---- per-slide time limit: a deadline set by the stage's per-slide task, checked inside the read loops


_DEADLINE = threading.local()


@contextlib.contextmanager
def deadline(seconds: float | None, slide_id: str = "slide", limit: float | None = None):
    """Run the block with a time limit: any slide read past it raises :class:`SlideTimeoutError`.

    ``seconds`` is the time left; ``limit`` the configured per-slide limit that the error names
    (default: ``seconds``).

    The check sits inside the read loops (every region, every batch of stored tiles), so a slide that
    declares a huge image behind little data stops within one read of the limit instead of spinning.
    """
    old = getattr(_DEADLINE, "value", None)
    limit = float(seconds if limit is None else limit) if seconds is not None else None
    _DEADLINE.value = None if seconds is None else (time.monotonic() + float(seconds), limit, slide_id)
    try:
        yield
    finally:
        _DEADLINE.value = old


def check_deadline(slide_id: str | None = None) -> None:
    value = getattr(_DEADLINE, "value", None)
    if value is not None and time.monotonic() > value[0]:
        raise SlideTimeoutError(
            f"slide {slide_id or value[2]!r}: timed out after the per-slide time limit of "
            f"{value[1]:g} s (raise time_limit to allow more)"
        )


def _composite_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA (premultiplied by OpenSlide) over a white background → RGB uint8.

    No compositing work when the block is opaque (the usual case: one check of the alpha channel), and
    saturating uint8 arithmetic otherwise (rgb + 255 − alpha), without wider temporaries.
    """
    if rgba.shape[-1] == 3:
        return rgba
    if rgba.size == 0:
        return np.ascontiguousarray(rgba[..., :3])
    rgba = np.ascontiguousarray(rgba)
    alpha = cv2.extractChannel(rgba, 3)
    rgb = cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    if cv2.minMaxLoc(alpha)[0] == 255:  # opaque: nothing to composite
        return rgb
    inv = cv2.bitwise_not(alpha)
    return cv2.add(rgb, cv2.merge([inv, inv, inv]))  # saturating uint8


FILE_MPP_RANGE = (0.05, 10.0)  # µm/px a microscope scan's level 0 can have; outside it a file's tags are not trusted
ANISOTROPY_TOLERANCE = 0.02  # relative difference of x and y pixel sizes still read as square pixels


def _positive(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def resolve_mpp(properties: dict, override: float | None = None) -> float | None:
    """Level-0 µm/px from an explicit value or slide properties, or ``None`` if unknown.

    An explicit ``override`` (the manifest's mpp) wins. From the file: ``openslide.mpp-x``/``-y``,
    ``aperio.MPP``, then the TIFF resolution tags (inch or centimetre units). Raises :class:`SlideError`
    (without the slide's name; :class:`Slide` adds it) when the file's value is not a microscope's
    (outside :data:`FILE_MPP_RANGE`, e.g. 84.7 µm/px from a 300-dpi tag) or when x and y differ
    (anisotropic pixels, which square tiles would distort).
    """
    if override is not None and not (isinstance(override, float) and math.isnan(override)):
        return float(override)
    found = None
    mx, my = _positive(properties.get("openslide.mpp-x")), _positive(properties.get("openslide.mpp-y"))
    if mx is not None:
        found = (mx, my, "openslide.mpp-x/y")
    elif _positive(properties.get("aperio.MPP")) is not None:
        v = _positive(properties.get("aperio.MPP"))
        found = (v, v, "aperio.MPP")
    else:
        unit = properties.get("tiff.ResolutionUnit")
        rx, ry = _positive(properties.get("tiff.XResolution")), _positive(properties.get("tiff.YResolution"))
        if rx is not None and unit in ("centimeter", "inch"):
            per_unit = 1e4 if unit == "centimeter" else 25400.0
            found = (per_unit / rx, per_unit / ry if ry is not None else None, f"TIFF resolution tags ({unit})")
    if found is None:
        return None
    x, y, source = found
    if y is not None and abs(x - y) > ANISOTROPY_TOLERANCE * max(x, y):
        raise SlideError(
            f"anisotropic pixels: {source} give x {x:.4g} µm/px and y {y:.4g} µm/px; square tiles "
            "would be distorted, and this workbench tiles square pixels only (give the mpp in the "
            "manifest to override, only if the tags are wrong)"
        )
    lo, hi = FILE_MPP_RANGE
    if not (lo <= x <= hi):
        raise SlideError(
            f"{source} give {x:.4g} µm/px, which is not a microscope scan's resolution "
            f"({lo}–{hi} µm/px; e.g. a 300-dpi tag reads as 84.7 µm/px); give the slide's mpp in the "
            "manifest's 'mpp' column if the file is right"
        )
    return x


class Slide:
    """An open whole-slide image. Use :func:`open_slide`.

    Attributes: ``slide_id``, ``path``, ``mpp`` (level-0 µm/px), ``dimensions`` (w, h), ``level_count``,
    ``level_dimensions``, ``level_downsamples``, ``vendor``.
    """

    def __init__(self, path: str | os.PathLike, *, slide_id: str | None = None, mpp: float | None = None):
        import openslide

        self.path = Path(path)
        self.slide_id = slide_id or self.path.stem
        name = f"slide {self.slide_id!r} ({self.path})"
        try:
            self.path.stat()
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            raise SlideError(f"{name}: unusable path: {exc}") from None
        if not self.path.exists():
            raise SlideError(f"{name}: file does not exist")
        if self.path.is_dir():
            raise SlideError(f"{name}: is a directory, not a slide file")
        if not self.path.is_file():
            raise SlideError(f"{name}: is not a regular file (a device, pipe or socket), not a slide file")
        if self.path.stat().st_size == 0:
            raise SlideError(f"{name}: file is empty (0 bytes)")
        if not os.access(self.path, os.R_OK):
            raise SlideError(f"{name}: permission denied: the file is not readable by this user")
        try:
            with open(self.path, "rb") as fh:
                fh.read(1)
        except PermissionError:
            raise SlideError(f"{name}: permission denied: the file is not readable by this user") from None
        except OSError as exc:
            raise SlideError(f"{name}: I/O error reading the file: {exc}") from None
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideError(f"{name}: not a slide format OpenSlide can read ({exc or 'unsupported format'})") from None
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{name}: OpenSlide cannot open it: {exc}") from None
        self.properties = dict(self._osr.properties)
        self.vendor = self.properties.get("openslide.vendor", "unknown")
        try:
            self.mpp = resolve_mpp(self.properties, mpp)
        except SlideError as exc:
            self.close()
            raise SlideError(f"{name}: {exc}") from None
        if self.mpp is None:
            self.close()
            raise SlideError(
                f"{name}: the file states no microns per pixel (no openslide.mpp-x, aperio.MPP or TIFF resolution); "
                "give it in the manifest's 'mpp' column"
            )
        if not (0.05 <= self.mpp <= 100):
            self.close()
            raise SlideError(f"{name}: mpp {self.mpp} is outside the plausible range 0.05–100 µm/px")
        self.dimensions = tuple(self._osr.dimensions)
        self.level_count = self._osr.level_count
        self.level_dimensions = [tuple(d) for d in self._osr.level_dimensions]
        self.level_downsamples = [float(d) for d in self._osr.level_downsamples]

    # --------------------------------------------------------------- reading
    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def best_level(self, target_mpp: float) -> int:
        """The coarsest level whose mpp is not coarser than ``target_mpp`` (within tolerance)."""
        best = 0
        for level in range(self.level_count):
            if self.level_mpp(level) <= target_mpp * (1 + MPP_TOLERANCE):
                best = level
        return best

    def read_region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of a region; (x, y) in level-0 pixels, (w, h) in level pixels; white outside."""
        check_deadline(self.slide_id)
        try:
            rgba = np.asarray(self._osr.read_region((int(x), int(y)), int(level), (int(w), int(h))))
        except Exception as exc:  # openslide raises OpenSlideError, or others from the codec
            raise SlideError(
                f"slide {self.slide_id!r} ({self.path}): reading region x={x} y={y} level={level} failed: {exc}"
            ) from None
        return _composite_white(rgba)

    def reference_seg_level(self) -> int:
        """The level CLAM and Mussel segment: OpenSlide's best level for a downsample of 64 (0 if one level)."""
        if self.level_count == 1:
            return 0
        return int(self._osr.get_best_level_for_downsample(64))

    def level_downsample_xy(self, level: int) -> tuple[float, float]:
        """Per-axis downsample of a level from the level sizes (as CLAM's ``_assertLevelDownsamples``)."""
        (w0, h0), (w, h) = self.dimensions, self.level_dimensions[level]
        return w0 / w, h0 / h

    def level_image(self, level: int, block: int = 4096, workers: int | None = None) -> np.ndarray:
        """A whole pyramid level as RGB uint8.

        TIFF-family levels stored as tiles are decoded straight from the file on ``workers`` threads (default:
        the CPU count, at most 8) and pasted in place; others are read with OpenSlide in blocks (no
        temporaries larger than one block).
        """
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        try:
            tiff = _TiffLevel(self.path, (lh, lw))
        except Exception:  # not TIFF-family, or a layout we do not decode ourselves
            tiff = None
        if tiff is not None:
            try:
                return tiff.whole(workers or min(8, os.cpu_count() or 1))
            except Exception as exc:
                raise SlideError(
                    f"slide {self.slide_id!r} ({self.path}): decoding level {level} failed: {exc}"
                ) from None
            finally:
                tiff.close()
        out = np.empty((lh, lw, 3), np.uint8)
        for by in range(0, lh, block):
            for bx in range(0, lw, block):
                bw, bh = min(block, lw - bx), min(block, lh - by)
                out[by : by + bh, bx : bx + bw] = self.read_region(round(bx * ds), round(by * ds), level, bw, bh)
        return out

    def segmentation_image(self, seg_level: int = -1, mask_mpp: float | None = None):
        """The image tissue is segmented on: ``(rgb, (downsample_x, downsample_y), level_or_None)``.

        ``mask_mpp`` given: the slide at that mpp (:meth:`thumbnail`, bounded memory); else the pyramid level
        ``seg_level`` (-1: :meth:`reference_seg_level`).
        """
        if mask_mpp is not None:
            thumb, ds = self.thumbnail(mask_mpp)
            return thumb, (self.dimensions[0] / thumb.shape[1], self.dimensions[1] / thumb.shape[0]), None
        level = self.reference_seg_level() if seg_level < 0 else int(seg_level)
        if level >= self.level_count:
            raise SlideError(
                f"slide {self.slide_id!r} ({self.path}): seg_level {level} does not exist "
                f"(the slide has {self.level_count} levels)"
            )
        lw, lh = self.level_dimensions[level]
        if lw * lh > MAX_SEG_PIXELS:
            raise SlideError(
                f"slide {self.slide_id!r} ({self.path}): segmentation level {level} is {lw}x{lh} px "
                f"(over {MAX_SEG_PIXELS:,} px); give SegmentParams(mask_mpp=...) to segment a "
                "fixed-mpp image read in blocks instead"
            )
        return self.level_image(level), self.level_downsample_xy(level), level

    def thumbnail(self, mpp: float) -> tuple[np.ndarray, float]:
        """The whole slide at about ``mpp`` µm/px (never coarser); returns (RGB image, downsample vs level 0).

        Reads the best pyramid level block by block and shrinks each block, so memory stays bounded
        even for a single-level slide.
        """
        level = self.best_level(mpp)
        lw, lh = self.level_dimensions[level]
        ds_level = self.level_downsamples[level]
        factor = max(1.0, mpp / self.level_mpp(level))  # extra shrink after reading the level
        out_w, out_h = max(1, round(lw / factor)), max(1, round(lh / factor))
        out = np.empty((out_h, out_w, 3), np.uint8)
        block = 4096
        for by in range(0, lh, block):
            for bx in range(0, lw, block):
                bw, bh = min(block, lw - bx), min(block, lh - by)
                region = self.read_region(round(bx * ds_level), round(by * ds_level), level, bw, bh)
                x0, y0 = round(bx / factor), round(by / factor)
                x1, y1 = min(out_w, round((bx + bw) / factor)), min(out_h, round((by + bh) / factor))
                if x1 > x0 and y1 > y0:
                    out[y0:y1, x0:x1] = cv2.resize(region, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
        return out, ds_level * factor

    def close(self) -> None:
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
            self._osr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (
            f"Slide({self.slide_id!r}, {self.dimensions[0]}x{self.dimensions[1]} px, mpp={self.mpp:.4f}, "
            f"levels={self.level_count}, vendor={self.vendor})"
        )


def open_slide(path: str | os.PathLike, *, slide_id: str | None = None, mpp: float | None = None) -> Slide:
    """Open a slide; ``mpp`` overrides what the file says (e.g. the manifest's column)."""
    return Slide(path, slide_id=slide_id, mpp=mpp)


# --------------------------------------------------------------------------- tile geometry


def tile_footprint(slide_mpp: float, tile_px: int, tile_mpp: float) -> int:
    """Side of a tile in level-0 pixels; exactly ``tile_px`` when the mpps agree within tolerance."""
    ratio = tile_mpp / slide_mpp
    if abs(ratio - 1) <= MPP_TOLERANCE:
        return int(tile_px)
    size0 = int(round(tile_px * ratio))
    if size0 < 1:
        raise SlideError(
            f"a {tile_px}-px tile at {tile_mpp} µm/px covers {tile_px * ratio:.3g} level-0 pixels of a "
            f"{slide_mpp} µm/px slide: less than one pixel; use a larger tile_mpp or check the slide's mpp"
        )
    return size0


class _BlockCache:
    """Decoded stored tiles, shared by every reader in the process (threads, loaders, the segmentation pass).

    Least recently used blocks go first once ``max_bytes`` is exceeded (``WORKBENCH_DECODE_CACHE_MB``,
    default 64). Keys name the file (path, size, mtime), the page and the tile, so a rewritten file is not
    served stale blocks.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._blocks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key):
        with self._lock:
            arr = self._blocks.get(key)
            if arr is None:
                self.misses += 1
                return None
            self._blocks.move_to_end(key)
            self.hits += 1
            return arr

    def put(self, key, arr: np.ndarray) -> None:
        if arr.nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._blocks:
                return
            self._blocks[key] = arr
            self._bytes += arr.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._blocks.popitem(last=False)
                self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._bytes = 0


DECODE_CACHE = _BlockCache(int(float(os.environ.get("WORKBENCH_DECODE_CACHE_MB", 64)) * 2**20))


class _TiffLevel:
    """Direct access to one tiled TIFF page: decode stored tiles once, in parallel, from the file."""

    def __init__(self, path: Path, shape_hw: tuple[int, int]):
        import tifffile

        self._tif = tifffile.TiffFile(str(path))
        page = None
        for series in self._tif.series:
            for lvl in series.levels:
                p = lvl.keyframe
                if tuple(p.shape[:2]) == tuple(shape_hw) and p.is_tiled and p.samplesperpixel in (3, 4):
                    page = p
                    break
            if page is not None:
                break
        if page is None or page.planarconfig != 1 or page.tiledepth > 1 or page.dtype != np.uint8:
            self._tif.close()
            raise LookupError("no matching tiled page")
        page = self._tif.pages[page.index] if hasattr(page, "index") else page
        self.page = page
        self.th, self.tw = page.tilelength, page.tilewidth
        self.height, self.width = page.shape[:2]
        self.across = math.ceil(self.width / self.tw)
        self.offsets, self.counts = page.dataoffsets, page.databytecounts
        self.jpegtables = getattr(page, "jpegtables", None)
        self._decode = page.decode
        self._fd = os.open(str(path), os.O_RDONLY)
        st_ = os.fstat(self._fd)
        self._key = (str(Path(path).resolve()), st_.st_size, st_.st_mtime_ns, getattr(page, "index", id(page)))
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.decoded = 0  # stored tiles decoded so far (cache misses)

    def _decode_one(self, index: int) -> np.ndarray:
        key = self._key + (index,)
        arr = DECODE_CACHE.get(key)
        if arr is not None:
            return arr
        count = self.counts[index]
        if count == 0:
            arr = np.full((self.th, self.tw, 3), WHITE, np.uint8)
        else:
            data = os.pread(self._fd, count, self.offsets[index])
            arr, _, _ = self._decode(data, index, jpegtables=self.jpegtables, _fullsize=True)
            arr = np.asarray(arr).reshape(self.th, self.tw, -1)
            arr = _composite_white(arr) if arr.shape[2] == 4 else np.ascontiguousarray(arr[..., :3])
        arr.flags.writeable = False  # shared: nobody writes into a cached block
        DECODE_CACHE.put(key, arr)
        return arr

    def tiles(self, indices: list[int], pool: ThreadPoolExecutor, cache_size: int) -> dict[int, np.ndarray]:
        check_deadline()
        missing = [i for i in indices if i not in self.cache]
        self.decoded += len(missing)
        # a few chunks per thread rather than one future per stored tile (less scheduling per block)
        n_chunks = min(len(missing), 4 * max(1, getattr(pool, "_max_workers", 1)))
        chunks = [missing[k::n_chunks] for k in range(n_chunks)]
        for chunk, arrs in zip(chunks, pool.map(lambda c: [self._decode_one(i) for i in c], chunks)):
            for i, arr in zip(chunk, arrs):
                self.cache[i] = arr
        got = {i: self.cache[i] for i in indices}
        for i in indices:
            self.cache.move_to_end(i)
        while len(self.cache) > max(cache_size, len(indices)):
            self.cache.popitem(last=False)
        return got

    def whole(self, workers: int) -> np.ndarray:
        """The whole page as RGB uint8, every stored tile decoded once on ``workers`` threads."""
        out = np.empty((self.height, self.width, 3), np.uint8)
        down = math.ceil(self.height / self.th)

        def paste(index: int) -> None:
            row, col = divmod(index, self.across)
            y0, x0 = row * self.th, col * self.tw
            h, w = min(self.th, self.height - y0), min(self.tw, self.width - x0)
            out[y0 : y0 + h, x0 : x0 + w] = self._decode_one(index)[:h, :w]

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(paste, range(self.across * down)))
        return out

    def region(self, x: int, y: int, w: int, h: int, blocks: dict[int, np.ndarray]) -> np.ndarray:
        out = np.full((h, w, 3), WHITE, np.uint8)
        for row in range(max(0, y // self.th), min(math.ceil(self.height / self.th), (y + h - 1) // self.th + 1)):
            for col in range(max(0, x // self.tw), min(self.across, (x + w - 1) // self.tw + 1)):
                block = blocks[row * self.across + col]
                bx, by = col * self.tw, row * self.th
                # intersection of the region, the block and the image
                x0, y0 = max(x, bx), max(y, by)
                x1 = min(x + w, bx + self.tw, self.width)
                y1 = min(y + h, by + self.th, self.height)
                if x1 > x0 and y1 > y0:
                    out[y0 - y : y1 - y, x0 - x : x1 - x] = block[y0 - by : y1 - by, x0 - bx : x1 - bx]
        return out

    def blocks_for(self, x: int, y: int, w: int, h: int) -> list[int]:
        rows = range(max(0, y // self.th), min(math.ceil(self.height / self.th), (y + h - 1) // self.th + 1))
        cols = range(max(0, x // self.tw), min(self.across, (x + w - 1) // self.tw + 1))
        return [r * self.across + c for r in rows for c in cols]

    def close(self):
        os.close(self._fd)
        self._tif.close()


class TileReader:
    """Read square tiles at a fixed mpp from a slide, in batches.

    Parameters
    ----------
    slide : Slide
    tile_px : int
        Output tile side in pixels.
    tile_mpp : float
        Output µm per pixel.
    workers : int
        Decoder threads for the TIFF fast path.
    fast : bool
        Use the TIFF fast path when the file allows it (``False`` forces OpenSlide).

    ``read(coords)`` takes (n, 2) level-0 x, y of tile top-left corners and returns (n, tile_px, tile_px, 3) uint8.
    """

    def __init__(
        self,
        slide: Slide,
        *,
        tile_px: int = 224,
        tile_mpp: float = 0.5,
        workers: int = 2,
        fast: bool = True,
        cache_tiles: int = 256,
    ):
        self.slide = slide
        self.tile_px, self.tile_mpp = int(tile_px), float(tile_mpp)
        self.size0 = tile_footprint(slide.mpp, tile_px, tile_mpp)
        self.level = slide.best_level(tile_mpp)
        ds = slide.level_downsamples[self.level]
        self.downsample = ds
        self.read_px = max(1, round(self.size0 / ds))  # tile side at the read level
        self.cache_tiles = cache_tiles
        self._tiff = None
        self._pool = None
        if fast:
            lw, lh = slide.level_dimensions[self.level]
            try:
                self._tiff = _TiffLevel(slide.path, (lh, lw))
                self._pool = ThreadPoolExecutor(max_workers=max(1, workers))
            except Exception as exc:  # not TIFF-family, or a layout we do not decode ourselves
                log.debug("slide %s: TIFF fast path unavailable (%s); using OpenSlide", slide.slide_id, exc)
                self._tiff = None
        self.backend = "tiff-direct" if self._tiff is not None else "openslide"

    def _finish(self, region: np.ndarray) -> np.ndarray:
        if region.shape[0] != self.tile_px or region.shape[1] != self.tile_px:
            interp = cv2.INTER_AREA if region.shape[0] > self.tile_px else cv2.INTER_LINEAR
            region = cv2.resize(region, (self.tile_px, self.tile_px), interpolation=interp)
        return region

    def read(self, coords: np.ndarray) -> np.ndarray:
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        out = np.empty((len(coords), self.tile_px, self.tile_px, 3), np.uint8)
        if self._tiff is None:
            for i, (x, y) in enumerate(coords):
                out[i] = self._finish(self.slide.read_region(x, y, self.level, self.read_px, self.read_px))
            return out
        t = self._tiff
        boxes = [(round(x / self.downsample), round(y / self.downsample)) for x, y in coords]
        needed = sorted({b for (lx, ly) in boxes for b in t.blocks_for(lx, ly, self.read_px, self.read_px)})
        try:
            blocks = t.tiles(needed, self._pool, self.cache_tiles)
        except SlideTimeoutError:
            raise
        except Exception as exc:
            raise SlideError(
                f"slide {self.slide.slide_id!r} ({self.slide.path}): decoding stored tiles failed: {exc}"
            ) from None

        def cut(i: int) -> None:  # on the decoder threads: cv2's resize releases the GIL
            lx, ly = boxes[i]
            out[i] = self._finish(t.region(lx, ly, self.read_px, self.read_px, blocks))

        if len(boxes) > 8:
            list(self._pool.map(cut, range(len(boxes)), chunksize=max(1, len(boxes) // (4 * self._pool._max_workers))))
        else:
            for i in range(len(boxes)):
                cut(i)
        return out

    def close(self):
        if self._tiff is not None:
            self._tiff.close()
            self._pool.shutdown()
            self._tiff = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
