"""Quality-control labels of tiles: pure label arithmetic and their store I/O (no Qt, no napari).

Each slide may carry one labels array, ``slides/<slide_id>/qc/labels`` (:meth:`Key.qc_labels`): (n,) int8,
one value per tile of the slide (same order as ``coords``)::

    -1 unlabelled    0 keep    1 marker (pen)    2 artefact

with attributes ``edit_count`` (edits saved so far), ``last_edit`` (ISO time), ``last_edit_unix`` and
``regions`` (the exclusion polygons the user drew, level-0 x, y, with the label they gave). These labels
are what the prefilter can train on (:func:`training_labels`).

Writes take the store's write lock only for the write itself (:func:`write_labels`), so readers are never
blocked and a long run holding the lock makes the write wait at most ``wait`` seconds, then fail with
:class:`~workbench.store.StoreError` (the caller keeps its edits and retries).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from workbench import store as st

log = logging.getLogger(__name__)

UNLABELLED, KEEP, MARKER, ARTEFACT = -1, 0, 1, 2
LABELS = {"unlabelled": UNLABELLED, "keep": KEEP, "marker": MARKER, "artefact": ARTEFACT}
LABEL_NAMES = {v: k for k, v in LABELS.items()}
MAX_REGIONS = 1000  # polygons kept in the attrs (the tile labels themselves are never truncated)


def label_value(label: str | int) -> int:
    """Numeric value of a label given by name (``"marker"``) or value (``1``)."""
    if isinstance(label, str):
        try:
            return LABELS[label]
        except KeyError:
            raise ValueError(f"unknown QC label {label!r}; use one of {list(LABELS)}") from None
    value = int(label)
    if value not in LABEL_NAMES:
        raise ValueError(f"unknown QC label value {label!r}; use one of {sorted(LABEL_NAMES)}")
    return value


def check_labels(labels: np.ndarray, n_tiles: int, slide_id: str = "?") -> np.ndarray:
    """Return ``labels`` as (n_tiles,) int8 or raise naming the slide and the problem."""
    labels = np.asarray(labels)
    if labels.shape != (n_tiles,):
        raise ValueError(f"slide {slide_id!r}: QC labels have shape {labels.shape}, the slide has {n_tiles} tiles")
    bad = ~np.isin(labels, list(LABEL_NAMES))
    if bad.any():
        raise ValueError(
            f"slide {slide_id!r}: QC labels hold values {np.unique(labels[bad]).tolist()}; allowed {sorted(LABEL_NAMES)}"
        )
    return labels.astype(np.int8)


def set_labels(labels: np.ndarray, tiles, label: str | int) -> np.ndarray:
    """A copy of ``labels`` with ``tiles`` (indices or a boolean mask) set to ``label``."""
    out = np.array(labels, dtype=np.int8, copy=True)
    out[np.asarray(tiles)] = label_value(label)
    return out


def counts(labels: np.ndarray) -> dict:
    """Number of tiles per label name, plus ``n_labelled``."""
    labels = np.asarray(labels)
    out = {f"n_{name}": int((labels == v).sum()) for name, v in LABELS.items()}
    out["n_labelled"] = int((labels >= 0).sum())
    return out


# --------------------------------------------------------------------------- regions → tiles


def tiles_in_polygon(coords: np.ndarray, size0: int, polygon: np.ndarray) -> np.ndarray:
    """Tiles whose centre lies inside a polygon.

    Parameters
    ----------
    coords : (n, 2) level-0 x, y of each tile's top-left corner
    size0 : tile side in level-0 pixels
    polygon : (k, 2) level-0 x, y vertices (k >= 3; closed implicitly)

    Returns
    -------
    (n,) bool
    """
    from matplotlib.path import Path as MplPath

    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    polygon = np.asarray(polygon, dtype=np.float64)
    if polygon.ndim != 2 or polygon.shape[1] != 2 or len(polygon) < 3:
        raise ValueError(f"a region needs (k >= 3, 2) x, y vertices, got shape {polygon.shape}")
    if len(coords) == 0:
        return np.zeros(0, bool)
    centres = coords + size0 / 2.0
    lo, hi = polygon.min(axis=0), polygon.max(axis=0)
    box = np.all((centres >= lo) & (centres <= hi), axis=1)  # cheap bounding-box cut first
    inside = np.zeros(len(coords), bool)
    if box.any():
        inside[box] = MplPath(polygon).contains_points(centres[box])
    return inside


def tiles_in_regions(coords: np.ndarray, size0: int, polygons) -> np.ndarray:
    """Union of :func:`tiles_in_polygon` over several polygons; (n,) bool."""
    out = np.zeros(len(coords), bool)
    for poly in polygons:
        out |= tiles_in_polygon(coords, size0, poly)
    return out


def ellipse_polygon(corners: np.ndarray, n: int = 64) -> np.ndarray:
    """Polygon (n, 2) approximating the axis-aligned ellipse inscribed in a box given by its corners (m, 2)."""
    corners = np.asarray(corners, dtype=np.float64)
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    centre, radius = (lo + hi) / 2, (hi - lo) / 2
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return centre + radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def mask_fraction(mask: np.ndarray, downsample: float, coords: np.ndarray, size0: int) -> np.ndarray:
    """Share of each tile's footprint covered by a low-resolution mask (e.g. pen ground truth).

    Parameters
    ----------
    mask : (h, w) bool at ``downsample`` × level 0
    coords : (n, 2) level-0 x, y of tile top-left corners; size0 : tile side in level-0 pixels

    Returns
    -------
    (n,) float32 in [0, 1]
    """
    mask = np.asarray(mask, bool)
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
    integral[1:, 1:] = mask.cumsum(0, dtype=np.float64).cumsum(1)
    x0 = np.clip(np.round(coords[:, 0] / downsample).astype(int), 0, mask.shape[1] - 1)
    y0 = np.clip(np.round(coords[:, 1] / downsample).astype(int), 0, mask.shape[0] - 1)
    x1 = np.clip(np.maximum(np.round((coords[:, 0] + size0) / downsample).astype(int), x0 + 1), 1, mask.shape[1])
    y1 = np.clip(np.maximum(np.round((coords[:, 1] + size0) / downsample).astype(int), y0 + 1), 1, mask.shape[0])
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (inside / ((y1 - y0) * (x1 - x0))).astype(np.float32)


# --------------------------------------------------------------------------- store I/O


def read_labels(root, slide_id: str) -> np.ndarray:
    """The slide's QC labels, (n,) int8; all -1 when none were saved."""
    n = root[st.Key.coords(slide_id)].shape[0]
    key = st.Key.qc_labels(slide_id)
    try:
        arr = root[key]
    except KeyError:
        return np.full(n, UNLABELLED, np.int8)
    labels = np.asarray(arr[:])
    if labels.shape != (n,):
        raise st.StoreError(
            f"slide {slide_id!r}: saved QC labels have {labels.shape[0]} entries but the slide has {n} tiles "
            "(it was re-tiled); delete slides/<id>/qc to start over"
        )
    return labels.astype(np.int8)


def read_info(root, slide_id: str) -> dict:
    """Audit attributes of a slide's labels: edit_count, last_edit, last_edit_unix, regions."""
    try:
        attrs = dict(root[st.Key.qc_labels(slide_id)].attrs)
    except KeyError:
        return {"edit_count": 0, "last_edit": None, "last_edit_unix": None, "regions": []}
    return {
        "edit_count": int(attrs.get("edit_count", 0)),
        "last_edit": attrs.get("last_edit"),
        "last_edit_unix": attrs.get("last_edit_unix"),
        "regions": list(attrs.get("regions", [])),
    }


def write_labels(
    store: str | os.PathLike, slide_id: str, labels: np.ndarray, *, regions=None, edits: int = 1, wait: float = 2.0
) -> dict:
    """Save a slide's QC labels, counting ``edits`` more edits; returns the new audit attributes.

    Holds the store's write lock only while writing (milliseconds: n bytes and one attrs file).
    ``regions``: list of ``{"label": int, "vertices": [[x, y], ...]}`` to keep (``None`` keeps the saved ones).
    Raises :class:`~workbench.store.StoreError` if another run holds the lock for more than ``wait`` s.
    """
    store = Path(store)
    with st.write_lock(store, wait=wait):
        root = st.open_store(store, mode="a")
        if not st.is_complete(root, st.Key.slide(slide_id)):
            raise st.StoreError(f"slide {slide_id!r} is not tiled in {store}: run tiling first")
        n = root[st.Key.coords(slide_id)].shape[0]
        labels = check_labels(labels, n, slide_id)
        key = st.Key.qc_labels(slide_id)
        old = read_info(root, slide_id)
        # through the store's one write path (checksummed chunks, values digest), written beside the old labels
        # and swapped in atomically: a kill mid-write leaves the old labels, never none
        parent, name = key.rsplit("/", 1)
        group = root.require_group(parent)
        tmp = f"{st.RUN_TMP}{name}"
        now = time.time()
        info = {
            "edit_count": old["edit_count"] + int(edits),
            "last_edit": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
            "last_edit_unix": now,
            "regions": (old["regions"] if regions is None else list(regions))[-MAX_REGIONS:],
            "values": {str(v): k for k, v in LABELS.items()},
        }
        st.write_array(group, tmp, labels, attrs=info)
        st.swap_in(store / parent / tmp, store / key)
    log.info("slide %r: saved QC labels (%d labelled, edit %d)", slide_id, int((labels >= 0).sum()), info["edit_count"])
    return info


def qc_table(root, ids: list[str] | None = None):
    """One row per slide: slide_id, n_tiles, n_labelled, n_keep, n_marker, n_artefact, edit_count, last_edit."""
    import pandas as pd

    ids = st.slide_ids(root) if ids is None else ids
    rows = []
    for s in ids:
        labels = read_labels(root, s)
        info = read_info(root, s)
        c = counts(labels)
        rows.append(
            {
                "slide_id": s,
                "n_tiles": len(labels),
                "n_labelled": c["n_labelled"],
                "n_keep": c["n_keep"],
                "n_marker": c["n_marker"],
                "n_artefact": c["n_artefact"],
                "edit_count": info["edit_count"],
                "last_edit": info["last_edit"],
            }
        )
    cols = ["slide_id", "n_tiles", "n_labelled", "n_keep", "n_marker", "n_artefact", "edit_count", "last_edit"]
    return pd.DataFrame(rows, columns=cols)


def training_labels(root, ids: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Labelled tiles of all slides as (global tile ids (m,) int64, labels (m,) int8) for a prefilter's ``fit``.

    Global tile ids follow manifest order (:func:`workbench.store.tile_counts`).
    """
    ids = st.slide_ids(root) if ids is None else ids
    starts = np.concatenate([[0], np.cumsum(st.tile_counts(root, ids))[:-1]]).astype(np.int64)
    gid, lab = [], []
    for s, start in zip(ids, starts):
        labels = read_labels(root, s)
        pos = np.flatnonzero(labels >= 0)
        gid.append(start + pos)
        lab.append(labels[pos])
    if not gid:
        return np.zeros(0, np.int64), np.zeros(0, np.int8)
    return np.concatenate(gid).astype(np.int64), np.concatenate(lab).astype(np.int8)
