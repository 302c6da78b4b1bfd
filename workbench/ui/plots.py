"""Plots the notebooks share (matplotlib; imported lazily by the notebooks, never by the core)."""

from __future__ import annotations

import numpy as np


def tile_mosaic(tiles: np.ndarray, ncols: int = 8, pad: int = 2) -> np.ndarray:
    """(n, h, w, 3) uint8 tiles → one (rows·h, ncols·w, 3) image with white gaps."""
    tiles = np.asarray(tiles)
    n = len(tiles)
    if n == 0:
        return np.full((8, 8, 3), 255, np.uint8)
    h, w = tiles.shape[1:3]
    ncols = min(ncols, n)
    rows = -(-n // ncols)
    out = np.full((rows * (h + pad), ncols * (w + pad), 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncols)
        out[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = t
    return out


def show_slide_tiles(
    ax,
    thumb: np.ndarray,
    downsample: float,
    coords: np.ndarray,
    size0: int,
    values: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    cmap: str = "viridis",
    title: str | None = None,
):
    """A slide thumbnail with its tissue mask outline and tile grid (boxes coloured by ``values``)."""
    import matplotlib.patches as mpatches
    from matplotlib import cm, colors

    ax.imshow(thumb)
    if mask is not None:
        scale = thumb.shape[0] / mask.shape[0]
        ax.contour(
            np.arange(mask.shape[1]) * scale,
            np.arange(mask.shape[0]) * scale,
            mask.astype(float),
            levels=[0.5],
            colors="lime",
            linewidths=0.8,
        )
    norm = colors.Normalize(*(np.nanmin(values), np.nanmax(values))) if values is not None and len(values) else None
    cmap_fn = cm.get_cmap(cmap) if hasattr(cm, "get_cmap") else __import__("matplotlib").colormaps[cmap]
    for i, (x, y) in enumerate(np.asarray(coords)):
        colour = cmap_fn(norm(values[i])) if norm is not None else "yellow"
        ax.add_patch(
            mpatches.Rectangle(
                (x / downsample, y / downsample),
                size0 / downsample,
                size0 / downsample,
                fill=False,
                edgecolor=colour,
                linewidth=0.6,
            )
        )
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax
