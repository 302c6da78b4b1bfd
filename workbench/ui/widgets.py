"""Notebook widgets (ipywidgets): a tile gallery and a threshold slider, static when no frontend listens.

* :class:`TileGallery` — tiles of a store by cluster (a tree level), by score (a prefilter, pages of
  tiles ranked by score) or by sample (pages of a sample run's indices), read at a small size through
  :class:`~workbench.io.slides.TileReader`.
* :class:`ThresholdSlider` — the score histogram with a threshold line, the number of tiles flagged and,
  given ground truth, precision / recall at the threshold (notebook 02's prefilter threshold).

Both render with matplotlib. ``show()`` displays the view once and returns nothing (so a ``show()`` that
ends a cell is not shown twice): live ipywidgets controls when the cell runs in a notebook frontend that
draws widgets (JupyterLab, Notebook 7, VS Code), one static figure when it runs headless (papermill,
``jupyter nbconvert --execute``, a console, plain Python). The rule (:func:`interactive_frontend`) decides at
once, without waiting for a widget comm: live when the code runs in an IPython kernel with ipywidgets, the
request that runs the cell comes from a notebook frontend (its metadata names the cell, ``cellId``, which
JupyterLab, Notebook 7 and VS Code send and papermill / nbclient do not), and no papermill run is
announced in the environment (``PAPERMILL_*``). ``static=True/False`` decides explicitly; ``widget()``
returns the ipywidgets view without displaying it.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import numpy as np

from workbench import store as st
from workbench.dataset import run_column

log = logging.getLogger(__name__)


def _parent_request(shell) -> dict:
    """The message that runs the current cell (an ``execute_request``), or ``{}``."""
    kernel = getattr(shell, "kernel", None)
    getters = [lambda: kernel.get_parent("shell"), lambda: kernel.get_parent(), lambda: shell.parent_header]
    for get in getters:
        try:
            msg = get()
        except Exception:
            continue
        if msg:
            return msg
    return {}


def headless_run() -> bool:
    """Whether a batch runner (papermill) announces itself in this process's environment."""
    return any(k.startswith("PAPERMILL_") for k in os.environ)


def interactive_frontend() -> bool:
    """Whether this cell runs in a notebook frontend that draws ipywidgets (see the module docstring)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell" or headless_run():
        return False
    if importlib.util.find_spec("ipywidgets") is None:
        return False
    meta = _parent_request(shell).get("metadata") or {}
    return bool(meta.get("cellId"))


def _display(obj) -> None:
    from IPython.display import display

    display(obj)


def _show_static(fig) -> None:
    """Display a figure once and close it (the inline backend would otherwise show it again at the cell's end)."""
    import matplotlib.pyplot as plt

    _display(fig)
    plt.close(fig)


def _png(fig, dpi: int = 100) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _live(control, figure):
    """``control`` above an image that shows ``figure()`` and is redrawn whenever the control's value changes
    (not displayed). The figure travels as the PNG value of an ``ipywidgets.Image``: a widget state update, so
    rapid changes (a dragged slider, held arrow keys) end with the last figure, whole."""
    import ipywidgets as ipw
    import matplotlib.pyplot as plt

    image = ipw.Image(format="png", layout=ipw.Layout(max_width="100%", height="auto"))
    errors = ipw.Output()  # a failed redraw shows its traceback here

    def redraw(change=None):
        errors.clear_output()
        with errors:
            fig = figure()
            try:
                image.value = _png(fig)
            finally:
                plt.close(fig)

    control.observe(redraw, names="value")
    redraw()
    return ipw.VBox([control, image, errors])


# --------------------------------------------------------------------------- threshold


def threshold_summary(scores: np.ndarray, threshold: float, truth: np.ndarray | None = None) -> dict:
    """Tiles flagged at ``threshold`` (score ≥ threshold) and, with boolean ``truth``, precision and recall."""
    scores = np.asarray(scores, dtype=np.float64)
    flagged = scores >= threshold
    out = {
        "threshold": float(threshold),
        "n_tiles": int(len(scores)),
        "n_flagged": int(flagged.sum()),
        "frac_flagged": float(flagged.mean()) if len(scores) else 0.0,
    }
    if truth is not None:
        truth = np.asarray(truth, bool)
        tp = int((flagged & truth).sum())
        out["precision"] = tp / int(flagged.sum()) if flagged.any() else float("nan")
        out["recall"] = tp / int(truth.sum()) if truth.any() else float("nan")
    return out


class ThresholdSlider:
    """A threshold over per-tile scores, shown as a histogram with a slider (or statically).

    Parameters
    ----------
    scores : (n,) float
    threshold : initial threshold (Mussel's marker filter: 0.75)
    truth : (n,) bool, optional — the true positives (e.g. pen tiles of synthetic slides)
    static : None (detect), True or False
    """

    def __init__(self, scores, *, threshold: float = 0.75, truth=None, bins: int = 50, static: bool | None = None):
        self.scores = np.asarray(scores, dtype=np.float64)
        self.truth = None if truth is None else np.asarray(truth, bool)
        if self.truth is not None and self.truth.shape != self.scores.shape:
            raise ValueError(f"truth has shape {self.truth.shape}, scores {self.scores.shape}")
        self.threshold = float(threshold)
        self.bins = bins
        self.static = (not interactive_frontend()) if static is None else bool(static)

    def summary(self, threshold: float | None = None) -> dict:
        return threshold_summary(self.scores, self.threshold if threshold is None else threshold, self.truth)

    def figure(self, threshold: float | None = None):
        import matplotlib.pyplot as plt

        t = self.threshold if threshold is None else threshold
        fig, ax = plt.subplots(figsize=(6, 3))
        lo, hi = (float(self.scores.min()), float(self.scores.max())) if len(self.scores) else (0.0, 1.0)
        edges = np.linspace(lo, hi if hi > lo else lo + 1, self.bins + 1)
        if self.truth is None:
            ax.hist(self.scores, bins=edges, color="0.5")
        else:
            ax.hist(
                [self.scores[~self.truth], self.scores[self.truth]],
                bins=edges,
                stacked=True,
                color=["0.6", "tab:blue"],
                label=["other", "truth"],
            )
            ax.legend(loc="upper center")
        ax.axvline(t, color="tab:red")
        s = self.summary(t)
        text = f"≥ {t:.3g}: {s['n_flagged']} of {s['n_tiles']} tiles ({100 * s['frac_flagged']:.1f} %)"
        if "precision" in s:
            text += f"\nprecision {s['precision']:.3f}, recall {s['recall']:.3f}"
        ax.set_title(text, fontsize=9)
        ax.set_xlabel("score")
        ax.set_ylabel("tiles")
        fig.tight_layout()
        return fig

    def widget(self):
        """The ipywidgets view (slider above the live histogram), not displayed."""
        import ipywidgets as ipw

        lo, hi = (float(self.scores.min()), float(self.scores.max())) if len(self.scores) else (0.0, 1.0)
        slider = ipw.FloatSlider(
            value=self.threshold,
            min=lo,
            max=max(hi, lo + 1e-6),
            step=(hi - lo) / 200 or 0.01,
            description="threshold",
            continuous_update=False,
        )

        def figure():
            self.threshold = float(slider.value)
            return self.figure()

        return _live(slider, figure)

    def show(self) -> None:
        """Display the slider and live histogram, or the static figure (once; returns nothing)."""
        if self.static:
            _show_static(self.figure())
        else:
            _display(self.widget())


# --------------------------------------------------------------------------- gallery


def _members(arr, value, n: int, rng: np.random.Generator, block: int = 1 << 20) -> np.ndarray:
    """Up to ``n`` random positions of ``arr`` (a 1-d zarr/numpy array) equal to ``value``.

    Reads blocks in random order and stops once ``4 n`` members are found, so a large array is not
    read whole for a small gallery.
    """
    total = arr.shape[0]
    found: list[np.ndarray] = []
    count = 0
    for start in rng.permutation(np.arange(0, total, block)):
        pos = np.flatnonzero(np.asarray(arr[start : start + block]) == value) + start
        found.append(pos)
        count += len(pos)
        if count >= 4 * n:
            break
    pos = np.concatenate(found) if found else np.zeros(0, np.int64)
    return np.sort(rng.choice(pos, size=min(n, len(pos)), replace=False)) if len(pos) else pos


class TileGallery:
    """Browse a store's tiles by cluster, by score or by sample.

    Parameters
    ----------
    store : path of a workbench store
    by : ``"cluster"`` (``column`` = ``tree/<run>/level_<l>``), ``"score"`` (``column`` = ``prefilter/<name>``
        or ``tissue``; pages of ``n`` tiles from the highest score down) or ``"sample"``
        (``column`` = ``samples/<run>``; pages of its indices)
    n, ncols, tile_px : tiles per view, per row, and their side in pixels
    random_state : seed of the tiles drawn from a cluster
    static : None (detect), True or False
    """

    def __init__(
        self,
        store,
        *,
        by: str = "cluster",
        column: str | None = None,
        n: int = 16,
        ncols: int = 8,
        tile_px: int = 96,
        random_state: int = 0,
        static: bool | None = None,
    ):
        if by not in ("cluster", "score", "sample"):
            raise ValueError(f"by must be 'cluster', 'score' or 'sample', not {by!r}")
        self.store, self.by, self.column, self.n, self.ncols = store, by, column, int(n), int(ncols)
        self.tile_px, self.random_state = int(tile_px), random_state
        self.static = (not interactive_frontend()) if static is None else bool(static)
        self.root = st.open_store(store)
        self.ids_ = st.slide_ids(self.root)
        counts = st.tile_counts(self.root, self.ids_)
        self.starts_ = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.column = column or self._default_column()
        self._order = None

    def _default_column(self) -> str:
        if self.by == "score":
            return "tissue"
        group = {"cluster": st.Key.TREES, "sample": st.Key.SAMPLES}[self.by]
        runs = st.run_names(self.root, group)
        if not runs:
            raise st.StoreError(f"store {self.store} has no {group}/ runs to browse by {self.by}")
        run = runs[-1]
        if self.by == "sample":
            return st.Key.sample(run)
        g = self.root[st.run_key(self.root, st.Key.tree(run))]
        levels = sorted(k for k in g.array_keys() if k.startswith("level_"))
        return f"{st.Key.tree(run)}/{levels[0]}"

    # ---------------------------------------------------------------- what to show
    def keys(self) -> list:
        """Cluster ids (largest first), or page numbers."""
        if self.by == "cluster":
            labels = np.asarray(run_column(self.root, self.column)[:])
            values, counts = np.unique(labels, return_counts=True)
            return values[np.argsort(-counts, kind="stable")].tolist()
        total = self._sample_indices().shape[0] if self.by == "sample" else int(self.starts_[-1])
        return list(range(max(1, -(-total // self.n))))

    def _sample_indices(self):
        return run_column(self.root, self.column)

    def _scores(self) -> np.ndarray:
        if self.column == "tissue":
            parts = [self.root[st.Key.tissue(s)][:] for s in self.ids_]
        else:
            name = self.column.split("/", 1)[1]
            parts = [self.root[st.Key.prefilter(s, name)][:] for s in self.ids_]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def tile_ids(self, key) -> np.ndarray:
        """Global tile ids shown for a key (cluster id or page)."""
        if self.by == "cluster":
            rng = np.random.default_rng(self.random_state)
            return _members(run_column(self.root, self.column), key, self.n, rng)
        page = slice(int(key) * self.n, (int(key) + 1) * self.n)
        if self.by == "sample":
            return np.asarray(self._sample_indices()[page], dtype=np.int64)
        if self._order is None:
            self._scores_ = self._scores()
            self._order = np.argsort(-self._scores_, kind="stable")
        return self._order[page]

    def images(self, tile_ids) -> np.ndarray:
        """(m, tile_px, tile_px, 3) uint8 tiles for global ids, read over each tile's full footprint."""
        from workbench.io.slides import TileReader, open_slide

        tile_ids = np.asarray(tile_ids, dtype=np.int64)
        out = np.full((len(tile_ids), self.tile_px, self.tile_px, 3), 255, np.uint8)
        slide_row = np.searchsorted(self.starts_, tile_ids, side="right") - 1
        for row in np.unique(slide_row):
            sid = self.ids_[row]
            info = st.read_slide(self.root, sid)
            st.check_slide_file(self.root, sid)  # never read pixels of another file at these coordinates
            sel = np.flatnonzero(slide_row == row)
            local = tile_ids[sel] - self.starts_[row]
            mpp = info["tile_mpp"] * info["tile_px"] / self.tile_px
            with (
                open_slide(info["path"], slide_id=sid, mpp=info.get("mpp")) as slide,
                TileReader(slide, tile_px=self.tile_px, tile_mpp=mpp) as reader,
            ):
                out[sel] = reader.read(info["coords"][local])
        return out

    def figure(self, key):
        import matplotlib.pyplot as plt

        from workbench.ui.plots import tile_mosaic

        ids = self.tile_ids(key)
        mosaic = tile_mosaic(self.images(ids), ncols=self.ncols)
        fig, ax = plt.subplots(figsize=(min(12, 1.2 * self.ncols), 1.2 * max(1, -(-len(ids) // self.ncols)) + 0.4))
        ax.imshow(mosaic)
        ax.set_axis_off()
        what = {"cluster": f"cluster {key}", "score": f"page {key} by score", "sample": f"page {key}"}[self.by]
        ax.set_title(f"{self.column}: {what} ({len(ids)} tiles)", fontsize=9)
        fig.tight_layout()
        return fig

    def widget(self, key=None):
        """The ipywidgets view, not displayed: a page slider (by score / sample) or a cluster dropdown above
        the live gallery."""
        import ipywidgets as ipw

        keys = self.keys()
        key = keys[0] if key is None else key
        if self.by == "cluster":
            pick = ipw.Dropdown(options=keys, value=key, description="cluster")
        else:
            pick = ipw.IntSlider(
                value=int(key), min=0, max=max(0, len(keys) - 1), description="page", continuous_update=False
            )
        return _live(pick, lambda: self.figure(pick.value))

    def show(self, key=None) -> None:
        """Display the controls and the gallery, or the static figure of ``key`` (default: the first), once."""
        if self.static:
            keys = self.keys()
            _show_static(self.figure(keys[0] if key is None else key))
        else:
            _display(self.widget(key))
