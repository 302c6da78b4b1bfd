"""Where the project's notebooks and sweep files are: found from the current directory, never from the package.

The numbered notebooks (``notebooks/NN_*.ipynb``) and the shipped sweeps (``sweeps/*.yml``) live in the
project checkout, not inside the installed package. :func:`project_dir` walks up from the current
directory (or ``start``) to the first folder holding ``notebooks/``; ``$WORKBENCH_PROJECT`` overrides it.
"""
from __future__ import annotations

import os
from pathlib import Path

from workbench.errors import WorkbenchError


def project_dir(start: str | os.PathLike | None = None) -> Path:
    """The project folder: ``$WORKBENCH_PROJECT``, else the nearest folder at or above ``start`` (default: the
    current directory) that holds a ``notebooks/`` folder with numbered notebooks."""
    env = os.environ.get("WORKBENCH_PROJECT")
    if env:
        return Path(env).resolve()
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        nb = folder / "notebooks"
        if nb.is_dir() and any(nb.glob("[0-9][0-9]_*.ipynb")):
            return folder
    raise WorkbenchError(
        f"no project folder with numbered notebooks at or above {here}: run from the project checkout "
        "or set WORKBENCH_PROJECT to it"
    )


def notebook_dir(start: str | os.PathLike | None = None) -> Path:
    """The project's ``notebooks/`` folder."""
    return project_dir(start) / "notebooks"


def sweep_dir(start: str | os.PathLike | None = None) -> Path:
    """The project's ``sweeps/`` folder."""
    return project_dir(start) / "sweeps"
