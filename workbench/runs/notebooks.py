"""Running the numbered notebooks with papermill, reading their metrics, and stripping outputs.

``python -m workbench.runs.notebooks strip notebooks/*.ipynb`` removes outputs and execution counts before a commit.

**Parameters are data, never code.** papermill writes parameter values into the notebook's parameters
cell as source text, so a value that is not a plain literal (YAML ``!!binary`` bytes, a set, a date, an
object) could become code. :func:`check_parameters` refuses every value that is not a plain literal of
the parameter's declared type (read from its default in the parameters cell, or from
``notebooks/parameters.yml`` beside the notebooks), and checks that papermill's rendering of each value
reads back, with :func:`ast.literal_eval`, as exactly that value. :func:`run_notebook` calls it before
every execution, whatever the route (sweep file, ``--set``, Python call).
"""
from __future__ import annotations

import ast
import json
import logging
import math
import os
import sys
from pathlib import Path

from workbench.errors import ParameterError

log = logging.getLogger(__name__)



def numbered_notebooks(folder: str | Path | None = None) -> list[Path]:
    """The ``NN_*.ipynb`` notebooks of a folder (default: the project's ``notebooks/``), in order."""
    if folder is None:
        from workbench.runs.project import notebook_dir

        folder = notebook_dir()
    return sorted(p for p in Path(folder).glob("[0-9][0-9]_*.ipynb"))


SCHEMA_FILE = "parameters.yml"
_KINDS = {"null", "bool", "int", "float", "str", "list", "dict", "list[int]", "list[float]", "list[str]"}


def _kind_of_default(value) -> set:
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"bool"}
    if isinstance(value, int):
        return {"int"}
    if isinstance(value, float):
        return {"float"}
    if isinstance(value, str):
        return {"str"}
    if isinstance(value, (list, tuple)):
        for t, kind in ((int, "list[int]"), (float, "list[float]"), (str, "list[str]")):
            if value and all(isinstance(v, t) and not isinstance(v, bool) for v in value):
                return {kind, "list[float]"} if kind == "list[int]" else {kind}
        return {"list"}
    if isinstance(value, dict):
        return {"dict"}
    return set()


def declared_types(notebook: str | Path) -> dict[str, set]:
    """{parameter: allowed kinds} of a notebook: from ``notebooks/parameters.yml``, else from its default."""
    import papermill as pm
    import yaml

    notebook = Path(notebook)
    schema_path = notebook.parent / SCHEMA_FILE
    schema = {}
    if schema_path.exists():
        schema = (yaml.safe_load(schema_path.read_text()) or {}).get(notebook.name[:2], {}) or {}
    out = {}
    for name, info in pm.inspect_notebook(str(notebook)).items():
        if name in schema:
            kinds = {k.strip() for k in str(schema[name]).split("|")}
            unknown = {k for k in kinds - _KINDS if not (len(k) > 1 and k[0] == k[-1] == "'")}  # 'text' = that text
            if unknown:
                raise ParameterError(f"{schema_path}: {notebook.name[:2]}.{name}: unknown type(s) {sorted(unknown)}")
            out[name] = kinds
            continue
        try:
            default = ast.literal_eval(info.get("default", ""))
        except (ValueError, SyntaxError):
            default = object()
        kinds = _kind_of_default(default)
        if "float" in kinds:
            kinds.add("int")
        out[name] = kinds or {"null", "bool", "int", "float", "str", "list", "dict"}
    return out


def is_plain(value, depth: int = 0) -> bool:
    """None, bool, int, finite float, str, or lists / str-keyed dicts of those (nesting < 8)."""
    if depth > 8:
        return False
    if value is None or type(value) in (bool, int, str):
        return True
    if type(value) is float:
        return math.isfinite(value)
    if type(value) in (list, tuple):
        return all(is_plain(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(type(k) is str and is_plain(v, depth + 1) for k, v in value.items())
    return False


def _matches(value, kinds: set) -> bool:
    if value is None:
        return "null" in kinds
    if type(value) is bool:
        return "bool" in kinds
    if type(value) is int:
        return "int" in kinds
    if type(value) is float:
        return "float" in kinds
    if type(value) is str:
        return "str" in kinds or f"'{value}'" in kinds
    if type(value) in (list, tuple):
        if "list" in kinds:
            return True
        for kind, types in (("list[int]", (int,)), ("list[float]", (int, float)), ("list[str]", (str,))):
            if kind in kinds and all(type(v) in types for v in value):
                return True
        return False
    if type(value) is dict:
        return "dict" in kinds
    return False


def render_value(value) -> str:
    """The text papermill writes into the parameters cell for ``value``, checked to read back as ``value``.

    Raises :class:`ParameterError` unless ``ast.literal_eval`` of the text equals the value (so the text is a
    literal: nothing in it can run).
    """
    from papermill.translators import PythonTranslator

    text = PythonTranslator.translate(value)
    try:
        back = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        back = _Unequal
    if isinstance(value, tuple):
        value = list(value)
    if back != value or type(back) is not type(value):
        raise ParameterError(f"value {value!r} does not render as a plain literal (papermill writes {text[:80]!r})")
    return text


class _Unequal:
    pass


def check_parameters(notebook: str | Path, parameters: dict, *, where: str = "",
                     lines: dict | None = None) -> dict:
    """Refuse any parameter the notebook does not declare, or whose value is not a plain literal of its type.

    ``where`` names the source (a sweep file, ``--set``) and ``lines`` maps a parameter to its line there.
    Returns the parameters unchanged.
    """
    types = declared_types(notebook)
    name = Path(notebook).name
    for key, value in parameters.items():
        at = f"{where}{', line ' + str(lines[key]) if lines and key in lines else ''}: " if where else ""
        if key not in types:
            raise ParameterError(f"{at}parameter {key!r} is not declared by notebook {name}; it declares "
                                 f"{sorted(types)}")
        if not is_plain(value):
            raise ParameterError(f"{at}parameter {key!r}: value {value!r} ({type(value).__name__}) is not a plain "
                                 "literal (null, true/false, a number, text, or lists/maps of these); refused, "
                                 "nothing was run")
        if not _matches(value, types[key]):
            raise ParameterError(f"{at}parameter {key!r}: value {value!r} ({type(value).__name__}) is not of its "
                                 f"declared type {'|'.join(sorted(types[key]))} (notebook {name})")
        try:
            render_value(value)
        except ParameterError as exc:
            raise ParameterError(f"{at}parameter {key!r}: {exc}") from None
    return parameters
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
    check_parameters(notebook, params, where=f"notebook {notebook.name}")
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
        from workbench.store import write_bytes_atomic

        write_bytes_atomic(path, after.encode())
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
