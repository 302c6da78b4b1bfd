"""Running the numbered notebooks with papermill, reading their metrics, and stripping outputs.

``python -m workbench.runs.notebooks strip notebooks/*.ipynb`` removes outputs and execution counts before a commit.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)



def numbered_notebooks(folder: str | Path | None = None) -> list[Path]:
    """The ``NN_*.ipynb`` notebooks of a folder (default: the project's ``notebooks/``), in order."""
    if folder is None:
        from workbench.runs.project import notebook_dir

        folder = notebook_dir()
    return sorted(p for p in Path(folder).glob("[0-9][0-9]_*.ipynb"))


def _relative_to(value, base: Path):
    """An absolute path string as a path relative to ``base``; anything else unchanged."""
    if isinstance(value, str) and value and os.path.isabs(value):
        return os.path.relpath(value, base)
    return value


def run_notebook(notebook: str | Path, run_dir: str | Path, parameters: dict, *, kernel: str = "python3",
                 progress: bool = False, relative: bool = False) -> Path:
    """Execute one notebook with papermill into ``run_dir``; returns the executed notebook's path.

    ``run_dir`` is always passed as a parameter. By default the notebook runs with its own folder as working
    directory. With ``relative=True`` it runs inside ``run_dir`` and every absolute path parameter is passed
    relative to ``run_dir`` (``run_dir`` itself as ``"."``), so the executed notebook carries no absolute paths
    and a copy of the run folder, re-run where it lies, writes next to itself.
    """
    import papermill as pm

    notebook, run_dir = Path(notebook).resolve(), Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / notebook.name
    params = {**parameters, "run_dir": str(run_dir)}
    cwd = notebook.parent
    if relative:
        params = {k: _relative_to(v, run_dir) for k, v in params.items()}
        cwd = run_dir
    log.info("running %s -> %s", notebook.name, out)
    pm.execute_notebook(str(notebook), str(out), parameters=params, kernel_name=kernel, cwd=str(cwd),
                        start_timeout=300, progress_bar=progress)
    return out


def read_metrics(run_dir: str | Path) -> dict:
    """All ``NN_metrics.json`` of a run, flattened as ``{"NN.key": value}``."""
    out = {}
    for path in sorted(Path(run_dir).glob("[0-9][0-9]_metrics.json")):
        prefix = path.name[:2]
        for k, v in json.loads(path.read_text()).items():
            out[f"{prefix}.{k}"] = v
    return out


def write_metrics(run_dir: str | Path, number: str, metrics: dict) -> Path:
    """Write ``run_dir/NN_metrics.json`` (flat JSON; numpy scalars converted)."""
    from workbench.store import write_json_atomic

    flat = {}
    for k, v in metrics.items():
        if isinstance(v, (dict, list, tuple)):
            raise TypeError(f"metric {k!r} is not flat: {type(v).__name__}")
        flat[k] = v.item() if hasattr(v, "item") else v
    path = Path(run_dir) / f"{number}_metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, flat)
    return path


def strip_outputs(path: str | Path) -> bool:
    """Remove outputs, execution counts and volatile metadata; returns True if the file changed."""
    import nbformat

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
        cell.metadata.pop("papermill", None)
    nb.metadata.pop("papermill", None)
    after = nbformat.writes(nb)
    if after != before:
        path.write_text(after)
        return True
    return False


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "strip":
        print("usage: python -m workbench.runs.notebooks strip NOTEBOOK...", file=sys.stderr)
        return 2
    for p in argv[1:]:
        if strip_outputs(p):
            print(f"stripped {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
