"""napari inspection and QC for a workbench store (Qt and napari are imported only when used).

``show(store, slide_id)`` opens a slide with its layers and the QC dock widget; the same widget is
registered as a napari plugin (``napari.yaml``: Plugins → Pathology QC). The layer data are computed by
``workbench.ui.napari._data`` (no Qt); the labels are read and written by :mod:`workbench.ui.qc`.
"""

from __future__ import annotations

import os

__all__ = [
    "QCWidget",
    "column_values",
    "display_available",
    "list_columns",
    "make_qc_widget",
    "pen_truth",
    "run_column",
    "show",
    "slide_range",
    "truth_path",
]
_DATA = (
    "list_columns",
    "column_values",
    "run_column",
    "pen_truth",
    "truth_path",
    "slide_range",
    "tile_grid",
    "tile_raster",
    "slide_pyramid",
    "find_store_index",
    "nearest_tiles",
)


def display_available() -> bool:
    """Whether a napari window can be made here (an X/Wayland display, or Qt's offscreen platform) and napari is installed."""
    import importlib.util

    if importlib.util.find_spec("napari") is None or importlib.util.find_spec("qtpy") is None:
        return False
    return bool(
        os.environ.get("DISPLAY")
        or os.environ.get("WAYLAND_DISPLAY")
        or os.environ.get("QT_QPA_PLATFORM") == "offscreen"
    )


def __getattr__(name):
    if name in ("QCWidget", "make_qc_widget", "show"):
        from workbench.ui.napari import _widget

        return getattr(_widget, name)
    if name in _DATA:  # the layer data, public (no Qt needed)
        from workbench.ui.napari import _data

        return getattr(_data, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
