"""Progress bars that read well where the code runs.

:func:`progress_bar` is ``tqdm.auto`` (a live widget bar) when a notebook frontend draws widgets (see
:func:`workbench.ui.widgets.interactive_frontend`); elsewhere a text bar. In a headless kernel (papermill)
the text bar goes to stdout, not stderr, and updates at most every ``HEADLESS_INTERVAL_S`` seconds, so an
executed notebook keeps its final state (``100% ... n/n``) as ordinary output rather than a red stderr box or a
widget whose state was never saved.
"""

from __future__ import annotations

import sys

HEADLESS_INTERVAL_S = 2.0


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def bar_class() -> tuple[type, dict]:
    """The tqdm class to use here and its extra arguments (for ``tqdm_class=`` hooks such as ``tqdm.dask``)."""
    from workbench.ui.widgets import interactive_frontend

    if interactive_frontend():
        from tqdm.auto import tqdm

        return tqdm, {}
    from tqdm.std import tqdm

    if _in_kernel():
        # position=0: a bar opened inside another (k-means levels > load) shares the line instead of moving the
        # cursor with ANSI escapes, which a saved notebook would show as text
        return tqdm, {"file": sys.stdout, "mininterval": HEADLESS_INTERVAL_S, "ncols": 100, "position": 0}
    return tqdm, {}


def progress_bar(
    iterable=None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    disable: bool = False,
    **kwargs,
):
    """A tqdm bar (``tqdm.auto`` in a widget frontend, text otherwise); same arguments as ``tqdm``."""
    cls, extra = bar_class()
    return cls(iterable, total=total, desc=desc, unit=unit, disable=disable, **{**extra, **kwargs})


def dask_progress(desc: str):
    """A context manager showing the progress of ``dask.compute`` calls inside it as such a bar."""
    from tqdm.dask import TqdmCallback

    cls, extra = bar_class()
    return TqdmCallback(tqdm_class=cls, desc=desc, unit="task", **extra)
