"""Cheap pixel QC per tile: blur, background and pen-colour fractions, as per-tile store columns.

Pure functions of a batch of RGB tiles (n, h, w, 3) uint8, each returning (n,) float32:

* ``blur`` — variance of the Laplacian of the grey tile (low = out of focus), the usual focus measure;
* ``background`` — share of near-white, unstained pixels (grey ≥ 220 and HSV saturation < 25);
* ``pen_colour`` — share of pixels with a marker-ink colour that H&E does not produce: blue (OpenCV hue
  95–125) or green (hue 35–90) with saturation ≥ 60, or near-black (value < 50).

They are filters and features next to the learned marker prefilter (``workbench.features.prefilter``), not a
replacement for it: ``compute_store`` writes them to ``slides/<id>/pixel_qc/<metric>`` for every slide.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

from workbench import store as st

log = logging.getLogger(__name__)

METRICS = ("blur", "background", "pen_colour")


def tile_qc(tiles: np.ndarray) -> dict[str, np.ndarray]:
    """QC metrics of tiles (n, h, w, 3) uint8 → {metric: (n,) float32}."""
    tiles = np.asarray(tiles)
    out = {m: np.empty(len(tiles), np.float32) for m in METRICS}
    for i, tile in enumerate(tiles):
        grey = cv2.cvtColor(tile, cv2.COLOR_RGB2GRAY)
        hsv = cv2.cvtColor(tile, cv2.COLOR_RGB2HSV)
        hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
        out["blur"][i] = cv2.Laplacian(grey, cv2.CV_32F).var()
        out["background"][i] = np.mean((grey >= 220) & (sat < 25))
        inked = (sat >= 60) & (((hue >= 95) & (hue <= 125)) | ((hue >= 35) & (hue <= 90)))
        out["pen_colour"][i] = np.mean(inked | (val < 50))
    return out


def compute_store(
    store_path,
    *,
    batch: int = 256,
    progress: bool = True,
    retry_failed: bool = False,
    time_limit: float | None = 1800.0,
) -> dict[str, int]:
    """Compute the QC metrics of every complete slide's tiles and write them as store columns.

    Slides whose QC columns are complete are skipped; returns {slide_id: n_tiles computed}. A slide that
    cannot be opened or read (or runs past ``time_limit`` seconds) is recorded in the error table (stage
    ``qc``) and the others go on; a re-run skips recorded failures unless ``retry_failed=True``.
    """
    from workbench.io.slides import TileReader, deadline, open_slide
    from workbench.progress import progress_bar
    from workbench.validate import check_bool, check_float, check_int, check_optional

    check_int("batch", batch, 1, 65536)
    check_bool("retry_failed", retry_failed)
    check_optional(check_float, "time_limit", time_limit, 0, lo_open=True)
    root = st.open_store(store_path, mode="a")
    done = {}
    with st.write_lock(store_path):
        failed = {} if retry_failed else st.failed_slides(root, "qc")
        recorded = st.failed_slides(root, "qc") if retry_failed else failed
        for sid in progress_bar(st.slide_ids(root), desc="pixel QC", unit="slide", disable=not progress):
            key = st.Key.pixel_qc(sid, METRICS[-1])
            if st.is_complete(root, key) or sid in failed:
                continue
            try:
                info = st.read_slide(root, sid)
                st.check_slide_file(root, sid)  # never measure pixels of another file at these coordinates
                coords = info["coords"]
                cols = {m: np.zeros(len(coords), np.float32) for m in METRICS}
                with (
                    deadline(time_limit, sid),
                    open_slide(info["path"], slide_id=sid, mpp=info["mpp"]) as slide,
                    TileReader(slide, tile_px=info["tile_px"], tile_mpp=info["tile_mpp"]) as reader,
                ):
                    for start in range(0, len(coords), batch):
                        for m, v in tile_qc(reader.read(coords[start : start + batch])).items():
                            cols[m][start : start + len(v)] = v
            except Exception as exc:
                st.record_failure(root, sid, "qc", exc)
                continue
            group = root.require_group(f"{st.Key.slide(sid)}/pixel_qc")
            for m in METRICS:  # the last metric's completion marks the set complete
                arr = st.write_array(group, m, cols[m])
                st.mark_complete(arr)
            if sid in recorded:
                st.clear_error(root, sid, "qc")
            done[sid] = len(coords)
    return done


def read_store(root, slide_id: str) -> dict[str, np.ndarray]:
    """The QC columns of one slide, or a clear error if they were not computed."""
    if not st.is_complete(root, st.Key.pixel_qc(slide_id, METRICS[-1])):
        raise st.StoreError(f"slide {slide_id!r} has no pixel QC: run workbench.features.tile_qc.compute_store first")
    return {m: root[st.Key.pixel_qc(slide_id, m)][:] for m in METRICS}
