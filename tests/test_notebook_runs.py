"""Executed notebooks carry run-relative paths: a copy of a run folder, re-run where it lies, writes next to itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from workbench.runs.notebooks import _relative_to, run_notebook


def test_relative_to():
    base = Path("/data/runs/demo")
    assert _relative_to("/data/runs/demo", base) == "."
    assert _relative_to("/data/runs/demo/demo.zarr", base) == "demo.zarr"
    assert _relative_to("/data/manifests/demo.csv", base) == "../../manifests/demo.csv"
    assert _relative_to("already/relative", base) == "already/relative"
    assert _relative_to(3, base) == 3 and _relative_to(None, base) is None and _relative_to("", base) == ""


def _notebook(path: Path) -> Path:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('run_dir = "."\ndata = "x.txt"\nstore = "s.zarr"')
    params.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(
        "import json, os, pathlib\n"
        "pathlib.Path(store).mkdir(exist_ok=True)\n"
        "(pathlib.Path(store) / 'written').write_text(pathlib.Path(data).read_text())\n"
        "pathlib.Path(run_dir, 'out.json').write_text(json.dumps({'cwd': os.getcwd(), 'store': store}))"
    )
    nb.cells = [params, body]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_run_relative_then_copy_writes_next_to_itself(tmp_path):
    src = _notebook(tmp_path / "nb.ipynb")
    (tmp_path / "x.txt").write_text("payload")
    run = tmp_path / "runs" / "a"
    out = run_notebook(src, run, {"data": str(tmp_path / "x.txt"), "store": str(run / "s.zarr")}, relative=True)
    injected = json.loads(out.read_text())["cells"][1]["source"]
    text = "".join(injected)
    assert str(tmp_path) not in text, text  # no absolute path in the executed notebook
    assert 'run_dir = "."' in text and 'data = "../../x.txt"' in text and 'store = "s.zarr"' in text
    assert (run / "s.zarr" / "written").read_text() == "payload"
    assert json.loads((run / "out.json").read_text())["cwd"] == str(run.resolve())

    # copy the run folder elsewhere and re-run the executed notebook where it lies: it writes into the copy
    copy = tmp_path / "elsewhere" / "b"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "s.zarr")
    import papermill as pm

    pm.execute_notebook(
        str(copy / "nb.ipynb"), str(copy / "nb.ipynb"), cwd=str(copy), kernel_name="python3", progress_bar=False
    )
    assert json.loads((copy / "out.json").read_text())["cwd"] == str(copy.resolve())
    assert (copy / "s.zarr" / "written").exists()
    assert json.loads((run / "out.json").read_text())["cwd"] == str(run.resolve())  # the original is untouched
