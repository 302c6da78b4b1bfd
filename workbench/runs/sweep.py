"""Experiment sweeps: the numbered notebooks run with papermill over a grid of parameters.

A sweep is a small YAML file under ``sweeps/``::

    name: segmentation            # default: the file's stem
    notebooks: ["01"]             # numbers, names or .ipynb paths, in pipeline order
    manifest: ../data_manifests/demo.csv   # paths are relative to the YAML file
    store: null                   # an existing store to work on; null = one store per tiling (below)
    fixed: {show_slides: 1}       # parameters of every point ("02.threshold": only notebook 02's threshold)
    grid: {threshold: [8, 15, 25], median_ksize: [5, 11]}   # cartesian product (or a list of grids: union)
    points: [{threshold: otsu, median_ksize: 11}]           # explicit points, added to the grid's
    names: {tree_run: "03"}       # parameters derived from a stage's hash (distinct store entries per point)
    parallel: []                  # notebooks whose runs may share a store concurrently (default: none)
    metric: 01.mask_iou_mean      # what the report optimises ...
    goal: max                     # ... and in which direction
    metrics: [01.mask_iou_mean, 01.n_tiles]   # what the report plots

``python -m workbench.runs.sweep sweeps/NAME.yml`` or :func:`run_sweep` runs every point into
``runs/<sweep>/<point-id>/`` (one executed notebook and ``NN_metrics.json`` per notebook, and ``point.json``),
and gathers ``runs/<sweep>/results.parquet`` + ``results.csv``: point_id, parameters, status, error,
seconds (of the stages run for the point; a shared stage counts for each of its points, a reused one
not at all), stages_run / stages_reused, store, and every metric prefixed by its notebook number
(``01.mask_iou_mean``).

**Point id.** A readable slug of the swept values plus a hash of all the point's parameters:
``threshold-8_median_ksize-5-1a2b3c4d``.

**Stages and reuse.** Each notebook of a point is a *stage* keyed by
``hash(notebook name, the notebook's effective parameters, the upstream stage's key)``. The effective
parameters are the ones the notebook declares in its ``parameters`` cell (read with papermill), with
the notebook's own defaults filled in (a name given as ``NN.name`` applies to notebook NN only, over
a plain ``name``: notebooks 01 and 02 both have a ``threshold``), minus ``run_dir``, ``store``, display-only ``show_*`` and the
derived ``names``; a ``manifest`` counts by the digest of its content. So a stage's key changes exactly
when a parameter that affects it or any stage before it changes. The store is the unit of reuse:

- with no ``store:`` in the spec, a point's store is ``<stores_dir>/<NN>-<key>.zarr`` keyed by its *first*
  stage (notebook 01: segmentation and tiling), so points with the same tiling share one store and
  points with other tiling parameters get their own (a store never mixes two tilings);
- with ``store:``, every point works on that store (its path is the root of every key).

A stage that finishes records itself in the store's root attrs under ``"sweep_stages"``
(``{"NN-key": {notebook, params, metrics, run_dir, seconds, finished}}``), written under the store's
write lock after the notebook succeeded. A stage whose key is already recorded is not run again: its
metrics are reused and its outputs are linked into the point's folder. A clustering sweep over one
tiled store therefore tiles once, and a later sweep with ``stores_dir`` pointing at the same folder
re-tiles nothing. Editing a notebook does not change keys: delete the store (or its record) to redo it.
A stage whose outputs in a shared store depend on a parameter must write them under a name derived
from its key (``names: {tree_run: "03"}`` gives every point its own ``tree/sw-<key>``), otherwise a
later point may overwrite what an earlier point's downstream stage read.

**Concurrency.** Points run in parallel on Dask (a local cluster of processes by default, or a
scheduler address); every unique stage is one Dask task, depending on its upstream stage's task,
so a stage shared by many points runs once before them. Stages writing one store would contend for
its write lock (:func:`workbench.store.write_lock` refuses a second writer), so the stages of one store
run one after another (a chain of Dask dependencies, in pipeline order), and stores run in parallel:
a segmentation sweep (one store per point) is fully parallel, a clustering sweep on one store is
serial. Notebooks listed in ``parallel`` (read-only ones, e.g. ``"05"`` evaluating saved indexes) skip
the chain. Files are passed by path: a distributed cluster needs a shared filesystem.

**Failures and resume.** A failing stage is recorded with its error, its downstream stages are skipped
and the sweep goes on. A point is finished when its ``point.json`` with ``"status": "ok"`` is written
(atomically, last). Re-running a sweep skips finished points and retries the others; stages that
completed before a kill are reused from the store's record.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import SweepError

log = logging.getLogger(__name__)

MANAGED = ("run_dir", "store")  # set by the sweep for every stage
SPEC_KEYS = {"name", "description", "notebooks", "manifest", "store", "stores_dir", "fixed", "grid", "points",
             "names", "parallel", "metric", "goal", "metrics", "scheduler", "max_workers"}


# --------------------------------------------------------------------------- safe YAML
#
# Sweep files and ``--set`` values are data. They are read with a loader that knows only YAML's plain
# types (null, bool, int, float, str, lists, maps): tags such as ``!!binary``, ``!!set``, ``!!timestamp``,
# ``!!omap`` or ``!!python/...`` and anchors/aliases are refused with the file and line, and dates stay
# text. Every value then goes through :func:`workbench.runs.notebooks.check_parameters` (declared type,
# plain literal that renders and reads back as itself) before any notebook runs.


def _strict_loader():
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    allowed = {"tag:yaml.org,2002:null", "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int",
               "tag:yaml.org,2002:float", "tag:yaml.org,2002:str", "tag:yaml.org,2002:seq",
               "tag:yaml.org,2002:map"}
    StrictLoader.yaml_constructors = {k: v for k, v in yaml.SafeLoader.yaml_constructors.items() if k in allowed}
    StrictLoader.yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in rs if tag != "tag:yaml.org,2002:timestamp"]
        for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def refuse(loader, node):
        raise yaml.constructor.ConstructorError(None, None, f"the YAML tag {node.tag!r} is not allowed in a sweep "
                                                "(plain values only: null, true/false, numbers, text, lists, maps)",
                                                node.start_mark)

    StrictLoader.add_constructor(None, refuse)
    StrictLoader.add_multi_constructor("", lambda loader, suffix, node: refuse(loader, node))
    return StrictLoader


def safe_yaml(text: str, source: str):
    """Parse sweep YAML with :func:`_strict_loader`; returns (data, {key: first line}).

    Raises :class:`SweepError` naming ``source`` and the line for tags, aliases and syntax errors.
    """
    import yaml

    from workbench.errors import SweepError

    loader_cls = _strict_loader()
    lines: dict = {}
    positions: list = []  # (line, column, key) of every mapping key
    try:
        node = yaml.compose(text, Loader=loader_cls)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f", line {mark.line + 1}" if mark is not None else ""
        raise SweepError(f"{source}{at}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:
        raise SweepError(f"{source}: nested too deeply to be a sweep file") from None
    if node is None:
        return None, lines
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode):
                    lines.setdefault(k.value, k.start_mark.line + 1)
                    positions.append((k.start_mark.line, k.start_mark.column, k.value))
                stack += [k, v]
        elif isinstance(n, yaml.SequenceNode):
            stack += n.value
    loader = loader_cls(text)
    try:
        if any(isinstance(e, yaml.AliasEvent) for e in yaml.parse(text, Loader=loader_cls)):
            raise SweepError(f"{source}: anchors and aliases (&name / *name) are not allowed in a sweep file")
        data = loader.get_single_data()
    except RecursionError:
        raise SweepError(f"{source}: nested too deeply to be a sweep file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        before = [p for p in positions if mark is not None and (p[0], p[1]) <= (mark.line, mark.column)]
        key = max(before)[2] if before else None
        at = f", line {line}" if line else ""
        raise SweepError(f"{source}{at}{f', key {key!r}' if key else ''}: "
                         f"{getattr(exc, 'problem', None) or exc}; nothing was run") from None
    finally:
        loader.dispose()
    return data, lines


def _check_values(where, notebooks, params: dict, lines: dict | None = None) -> None:
    """Check each value against the declared types of every notebook that takes it (``NN.name``: that one)."""
    from workbench.errors import ParameterError, SweepError
    from workbench.runs.notebooks import check_parameters

    for key, value in params.items():
        number, _, bare = key.rpartition(".") if "." in key else ("", "", key)
        for nb in notebooks:
            if (number and nb.number != number) or bare not in nb.defaults:
                continue
            try:
                check_parameters(nb.path, {bare: value}, where=str(where),
                                 lines={bare: lines[key]} if lines and key in lines else
                                 ({bare: lines[bare]} if lines and bare in lines else None))
            except ParameterError as exc:
                raise SweepError(f"{exc} [key {key!r}]") from None


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class Notebook:
    """One notebook of a sweep: its path, number (``"01"``) and declared parameters with their defaults."""

    path: Path
    number: str
    defaults: dict

    @classmethod
    def resolve(cls, ref: str | os.PathLike, base_dir: Path) -> "Notebook":
        from workbench.runs.notebooks import numbered_notebooks
        from workbench.runs.project import notebook_dir

        ref_s = str(ref)
        if ref_s.endswith(".ipynb"):
            path = (base_dir / ref_s).resolve()
        else:
            matches = [p for p in numbered_notebooks() if p.stem == ref_s or p.name[:2] == ref_s.zfill(2)]
            if len(matches) != 1:
                raise SweepError(f"notebook {ref_s!r}: {len(matches)} matches in {notebook_dir()}")
            path = matches[0]
        if not path.exists():
            raise FileNotFoundError(f"notebook {path} does not exist")
        if not re.match(r"^\d\d_", path.name):
            raise SweepError(f"notebook {path.name!r} is not numbered (NN_name.ipynb): its metrics file needs NN")
        return cls(path, path.name[:2], _declared_parameters(path))


def _declared_parameters(path: Path) -> dict:
    """The notebook's ``parameters`` cell as {name: default value} (literal values parsed, others kept as source)."""
    import papermill as pm

    out = {}
    for name, info in pm.inspect_notebook(str(path)).items():
        src = info.get("default", "")
        try:
            out[name] = ast.literal_eval(src)
        except (ValueError, SyntaxError):
            out[name] = src
    if not out:
        raise SweepError(f"notebook {path.name} has no cell tagged 'parameters'")
    return out


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file; see the module docstring for the fields."""

    name: str
    notebooks: tuple
    points: tuple  # swept values of each point (dicts), in order
    fixed: dict = field(default_factory=dict)
    manifest: Path | None = None
    store: Path | None = None
    stores_dir: Path | None = None
    names: dict = field(default_factory=dict)
    parallel: tuple = ()
    metric: str | None = None
    goal: str = "max"
    metrics: tuple = ()
    scheduler: str | None = None
    max_workers: int | None = None
    description: str = ""
    path: Path | None = None

    @property
    def swept(self) -> list[str]:
        """Parameter names that vary over the points, in first-seen order."""
        names = []
        for p in self.points:
            names += [k for k in p if k not in names]
        return names


def expand_points(grid=None, points=None) -> list[dict]:
    """Points of a grid (a dict of lists, or a list of such dicts: union of products) then the explicit ones."""
    grids = [] if grid is None else ([grid] if isinstance(grid, dict) else list(grid))
    out = []
    for g in grids:
        if not isinstance(g, dict) or not g:
            raise SweepError(f"a grid must be a non-empty mapping of parameter -> list of values, got {g!r}")
        keys = list(g)
        values = [v if isinstance(v, list) else [v] for v in g.values()]
        out += [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    for p in points or []:
        if not isinstance(p, dict):
            raise SweepError(f"each of 'points' must be a mapping of parameter -> value, got {p!r}")
        out.append(dict(p))
    seen, unique = set(), []
    for p in out:
        key = _canon(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def load_spec(spec, *, overrides: dict | None = None) -> SweepSpec:
    """Read a sweep from a YAML path or a dict (paths in a dict are relative to the working directory).

    ``overrides`` replace top-level keys (e.g. ``{"manifest": path}``); ``fixed`` overrides are merged.
    """
    import yaml

    if isinstance(spec, SweepSpec):
        return spec
    from workbench.errors import SweepError

    lines = {}
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec).resolve()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SweepError(f"sweep file {path} cannot be read: {exc}") from None
        raw, lines = safe_yaml(text, f"sweep file {path}")
        raw = raw or {}
        base = path.parent
    else:
        path, raw, base = None, dict(spec), Path.cwd()
    if not isinstance(raw, dict):
        raise SweepError(f"{path or 'sweep spec'}: a sweep must be a mapping of keys (name, notebooks, grid, ...), "
                         f"got {type(raw).__name__}")
    raw = dict(raw)
    for k, v in (overrides or {}).items():
        raw[k] = {**(raw.get("fixed") or {}), **v} if k == "fixed" else v
    where = path or "sweep spec"
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise SweepError(f"{where}: unknown keys {sorted(map(str, unknown))}; known: {sorted(SPEC_KEYS)}")
    for key, kind in (("fixed", dict), ("names", dict), ("notebooks", list), ("points", list), ("parallel", list),
                      ("metrics", list)):
        if raw.get(key) is not None and not isinstance(raw[key], kind):
            raise SweepError(f"{where}, line {lines.get(key, '?')}: {key!r} must be a {'mapping' if kind is dict else 'list'}, "
                             f"got {type(raw[key]).__name__}")
    for key in ("name", "manifest", "store", "stores_dir", "metric", "scheduler", "description"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise SweepError(f"{where}, line {lines.get(key, '?')}: {key!r} must be text, got {raw[key]!r}")
    if raw.get("max_workers") is not None:
        from workbench.validate import check_int

        check_int("max_workers", raw["max_workers"], 1, 4096, where=str(where))
    if not raw.get("notebooks"):
        raise SweepError(f"{where}: 'notebooks' is empty: name the notebooks to run, e.g. ['01']")
    notebooks = tuple(Notebook.resolve(n, base) for n in raw["notebooks"])
    points = expand_points(raw.get("grid"), raw.get("points")) or [{}]
    fixed = dict(raw.get("fixed") or {})
    declared = set().union(*(nb.defaults for nb in notebooks))
    declared |= {f"{nb.number}.{k}" for nb in notebooks for k in nb.defaults}
    for p in [fixed, *points]:
        bad = [k for k in p if not isinstance(k, str) or k not in declared or k.split(".")[-1] in MANAGED]
        if bad:
            raise SweepError(f"{where}: parameters {bad} are not declared by notebooks "
                             f"{[nb.path.name for nb in notebooks]} (or are set by the sweep: {list(MANAGED)})")
        set_keys = set((overrides or {}).get("fixed") or {}) if p is fixed else set()
        from_file = {k: v for k, v in p.items() if k not in set_keys}
        _check_values(where, notebooks, from_file, lines)
        _check_values("--set", notebooks, {k: v for k, v in p.items() if k in set_keys})
    names = dict(raw.get("names") or {})
    numbers = [nb.number for nb in notebooks]
    for k, n in names.items():
        if str(n).zfill(2) not in numbers:
            raise SweepError(f"{where}: names.{k} refers to notebook {n!r}, not one of {numbers}")
    goal = raw.get("goal", "max")
    if goal not in ("max", "min"):
        raise SweepError(f"{where}: goal must be 'max' or 'min', got {goal!r}")

    def _path(v):
        return None if v in (None, "") else (base / str(v)).resolve()

    name = raw.get("name") or (path.stem if path else "sweep")
    from workbench.store import check_name

    return SweepSpec(
        name=check_name(str(name), "sweep name"), notebooks=notebooks, points=tuple(points), fixed=fixed,
        manifest=_path(raw.get("manifest")), store=_path(raw.get("store")), stores_dir=_path(raw.get("stores_dir")),
        names={k: str(n).zfill(2) for k, n in names.items()}, parallel=tuple(str(n).zfill(2) for n in raw.get("parallel") or ()),
        metric=raw.get("metric"), goal=goal, metrics=tuple(raw.get("metrics") or ()), scheduler=raw.get("scheduler"),
        max_workers=raw.get("max_workers"), description=raw.get("description", ""), path=path,
    )


# --------------------------------------------------------------------------- planning (pure)


@dataclass
class PointPlan:
    """What one point runs: its id, parameters, store and the key of each stage."""

    point_id: str
    swept: dict
    params: dict  # fixed + swept
    store: Path
    stages: list  # [{"key", "number", "notebook", "params", "upstream", "hashed"}]
    run_dir: Path


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def _digest(obj, n: int = 12) -> str:
    return hashlib.sha1(_canon(obj).encode()).hexdigest()[:n]


def _file_digest(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:16]


def point_id(swept: dict, params: dict) -> str:
    """Readable slug of the swept values + hash of all parameters, e.g. ``threshold-8_median_ksize-5-1a2b3c4d``."""
    parts = []
    for k, v in swept.items():
        text = "x".join(map(str, v)) if isinstance(v, (list, tuple)) else _canon(v) if isinstance(v, dict) else str(v)
        val = re.sub(r"[^A-Za-z0-9.]+", "", text)[:16]
        parts.append(f"{k}-{val}")
    slug = "_".join(parts)[:64].strip("_-.") or "point"
    return f"{slug}-{_digest(params, 8)}"


def plan_points(spec: SweepSpec, out: Path) -> list[PointPlan]:
    """Ids, parameters, store paths and stage keys of every point (no I/O besides reading the manifest)."""
    out = Path(out)
    stores_dir = spec.stores_dir or out / "stores"
    manifest_digest = _file_digest(spec.manifest) if spec.manifest else None
    plans = []
    for swept in spec.points:
        params = {**spec.fixed, **swept}
        upstream = _digest({"store": str(spec.store)}) if spec.store else ""
        stages = []
        for nb in spec.notebooks:
            eff = {k: params.get(f"{nb.number}.{k}", params.get(k, d)) for k, d in nb.defaults.items()}
            hashed = {k: v for k, v in eff.items()
                      if k not in MANAGED and not k.startswith("show_") and k not in spec.names}
            if "manifest" in hashed and spec.manifest is not None:
                hashed["manifest"] = manifest_digest
            key = f"{nb.number}-{_digest({'notebook': nb.path.stem, 'params': hashed, 'upstream': upstream})}"
            stages.append({"key": key, "number": nb.number, "notebook": str(nb.path), "params": eff,
                           "hashed": hashed, "upstream": upstream or None})
            upstream = key
        store = spec.store or stores_dir / f"{stages[0]['key']}.zarr"
        by_number = {s["number"]: s["key"] for s in stages}
        for s, nb in zip(stages, spec.notebooks):
            run_params = {k: v for k, v in s["params"].items() if k not in MANAGED}
            for k, n in spec.names.items():
                if k in nb.defaults:
                    run_params[k] = f"sw-{by_number[n]}"
            if "manifest" in nb.defaults and spec.manifest is not None:
                run_params["manifest"] = str(spec.manifest)
            if "store" in nb.defaults:
                run_params["store"] = str(store)
            s["params"] = run_params
        pid = point_id(swept, {"notebooks": [nb.path.stem for nb in spec.notebooks], "params": params,
                               "root": stages[0]["upstream"], "manifest": manifest_digest})
        plans.append(PointPlan(pid, swept, params, Path(store), stages, out / pid))
    ids = [p.point_id for p in plans]
    if len(set(ids)) != len(ids):
        raise SweepError(f"sweep {spec.name}: two points have the same id: {ids}")
    return plans


# --------------------------------------------------------------------------- one stage (runs on a worker)


def stage_records(store: str | os.PathLike) -> dict:
    """The ``sweep_stages`` record of a store ({} when the store does not exist yet)."""
    from workbench import store as st

    if not (Path(store) / "zarr.json").exists():
        return {}
    return dict(st.open_store(store, "r").attrs.get("sweep_stages", {}))


def _record_stage(store: Path, key: str, record: dict) -> bool:
    from workbench import store as st

    if not (store / "zarr.json").exists():
        log.warning("stage %s finished but store %s does not exist: not recorded for reuse", key, store)
        return False
    with st.write_lock(store, wait=3600):
        root = st.open_store(store, "a")
        stages = dict(root.attrs.get("sweep_stages", {}))
        stages[key] = record
        root.attrs["sweep_stages"] = stages
    return True


def _error_text(exc: BaseException) -> str:
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    text = f"{ename}: {evalue}" if ename else f"{type(exc).__name__}: {exc}"
    return text[:2000]


def run_stage(stage: dict, store: str, stage_dir: str, upstream: dict | None = None, previous=None) -> dict:
    """Run one stage's notebook unless the store records its key as complete; never raises.

    ``previous`` only orders stages of one store (its value is ignored). Returns the stage's record
    plus ``status`` ("ok" / "failed" / "skipped"), ``ran`` (the notebook ran now) and ``error``.
    """
    from workbench.runs.notebooks import run_notebook

    key, number = stage["key"], stage["number"]
    base = {"key": key, "number": number, "ran": False, "seconds": 0.0, "metrics": {}, "run_dir": stage_dir}
    if upstream is not None and upstream.get("status") != "ok":
        return {**base, "run_dir": None, "status": "skipped",
                "error": f"upstream notebook {upstream['number']} did not finish"}
    store, stage_dir = Path(store), Path(stage_dir)
    t0 = time.perf_counter()
    try:
        done = stage_records(store).get(key)
        if done is not None:
            return {**base, **done, "status": "ok", "ran": False, "error": None}
        if stage_dir.exists():  # a failed or killed attempt: start clean (point folders keep their links)
            shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True)
        t0 = time.perf_counter()
        run_notebook(stage["notebook"], stage_dir, stage["params"])
        seconds = round(time.perf_counter() - t0, 3)
        metrics_path = stage_dir / f"{number}_metrics.json"
        if not metrics_path.exists():
            raise RuntimeError(f"notebook {Path(stage['notebook']).name} did not write {metrics_path.name}")
        record = {"key": key, "number": number, "notebook": Path(stage["notebook"]).name, "params": stage["hashed"],
                  "upstream": stage["upstream"], "metrics": json.loads(metrics_path.read_text()),
                  "run_dir": str(stage_dir), "seconds": seconds, "finished": time.time()}
        _record_stage(store, key, record)
        return {**record, "status": "ok", "ran": True, "error": None}
    except Exception as exc:  # noqa: BLE001 — a failing stage is data for the sweep table, not a crash
        log.warning("stage %s failed: %s", key, _error_text(exc))
        return {**base, "status": "failed", "seconds": round(time.perf_counter() - t0, 3),
                "error": f"notebook {number}: {_error_text(exc)}"}


# --------------------------------------------------------------------------- the driver


def _link_or_copy(src, dst):
    try:
        if os.path.exists(dst):
            os.unlink(dst)
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _finish_point(plan: PointPlan, results: list[dict]) -> dict:
    """Gather a point's stage outputs into its folder and write ``point.json`` (atomically, last)."""
    from workbench.runs.notebooks import write_metrics
    from workbench.store import write_json_atomic

    plan.run_dir.mkdir(parents=True, exist_ok=True)
    (plan.run_dir / "point.json").unlink(missing_ok=True)
    for r in results:
        src = Path(r.get("run_dir") or "")
        if src.is_dir() and src.resolve() != plan.run_dir.resolve():
            shutil.copytree(src, plan.run_dir, copy_function=_link_or_copy, dirs_exist_ok=True)
        if r["status"] == "ok" and not (plan.run_dir / f"{r['number']}_metrics.json").exists():
            write_metrics(plan.run_dir, r["number"], r["metrics"])
    failed = [r for r in results if r["status"] != "ok"]
    record = {
        "point_id": plan.point_id, "swept": plan.swept, "params": plan.params, "store": str(plan.store),
        "status": "failed" if failed else "ok", "error": failed[0]["error"] if failed else None,
        "seconds": round(sum(r.get("seconds") or 0.0 for r in results if r.get("ran") or r["status"] != "ok"), 3),
        "stages": [{k: r.get(k) for k in ("key", "number", "status", "ran", "seconds", "error")} for r in results],
        "metrics": {f"{r['number']}.{k}": v for r in results for k, v in (r.get("metrics") or {}).items()},
        "finished": time.time(),
    }
    write_json_atomic(plan.run_dir / "point.json", record)
    (log.info if not failed else log.warning)("point %s: %s%s", plan.point_id, record["status"],
                                              f" ({record['error']})" if failed else "")
    return record


def read_point(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "point.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _get_client(client, max_workers: int | None, n_tasks: int):
    """(client, owned) — a given Client, one connected to a scheduler address, or a new local cluster."""
    from distributed import Client, LocalCluster

    if client is not None and not isinstance(client, str):
        return client, False
    if isinstance(client, str):
        return Client(client), True
    n = max(1, min(max_workers or os.cpu_count() or 1, n_tasks))
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster), True


def _execute(client, spec: SweepSpec, plans: list[PointPlan], out: Path) -> dict:
    """Submit every unique stage as a Dask task and finish each point when its stages are done."""
    from distributed import as_completed

    stages = {}  # key -> (stage, store, first point index)
    for i, plan in enumerate(plans):
        for s in plan.stages:
            stages.setdefault(s["key"], (s, str(plan.store), i))
    position = {nb.number: j for j, nb in enumerate(spec.notebooks)}
    order = sorted(stages, key=lambda k: (position[stages[k][0]["number"]], stages[k][2]))
    futures, chain, token = {}, {}, f"{time.time_ns():x}"
    for key in order:
        s, store, _ = stages[key]
        serial = s["number"] not in spec.parallel
        fut = client.submit(run_stage, s, store, str(out / "stages" / key), futures.get(s["upstream"]),
                            chain.get(store) if serial else None, key=f"sweep-{spec.name}-{key}-{token}", pure=False)
        futures[key] = fut
        if serial:
            chain[store] = fut
    log.info("sweep %s: %d points, %d unique stages over %d stores", spec.name, len(plans), len(stages),
             len({p.store for p in plans}))
    results, pending, finished = {}, list(plans), {}
    key_of = {f.key: k for k, f in futures.items()}
    for fut in as_completed(list(futures.values())):
        key = key_of[fut.key]
        try:
            results[key] = fut.result()
        except Exception as exc:  # noqa: BLE001 — a lost worker fails the stage, not the sweep
            s = stages[key][0]
            results[key] = {"key": key, "number": s["number"], "status": "failed", "ran": False, "seconds": 0.0,
                            "metrics": {}, "run_dir": None, "error": f"notebook {s['number']}: {_error_text(exc)}"}
        still = []
        for plan in pending:
            if all(s["key"] in results for s in plan.stages):
                finished[plan.point_id] = _finish_point(plan, [results[s["key"]] for s in plan.stages])
            else:
                still.append(plan)
        pending = still
    return finished


def run_sweep(spec_or_path, *, out=None, client=None, max_workers: int | None = None,
              overrides: dict | None = None):
    """Run a sweep (YAML path, dict or :class:`SweepSpec`); returns the results table (pandas).

    Parameters
    ----------
    out : folder of the sweep's runs (default ``runs/<sweep name>``)
    client : a ``distributed.Client``, a scheduler address, or None for a local cluster of processes
    max_workers : local cluster size (default: the spec's ``max_workers``, else the number of cores)
    overrides : top-level spec keys to replace (e.g. ``{"manifest": path}``)
    """
    spec = load_spec(spec_or_path, overrides=overrides)
    out = Path(out) if out is not None else Path.cwd() / "runs" / spec.name
    out.mkdir(parents=True, exist_ok=True)
    plans = plan_points(spec, out)
    done = [p for p in plans if (read_point(p.run_dir) or {}).get("status") == "ok"]
    todo = [p for p in plans if p not in done]
    log.info("sweep %s: %d points, %d finished earlier, %d to run", spec.name, len(plans), len(done), len(todo))
    t0 = time.perf_counter()
    if todo:
        client, owned = _get_client(client or spec.scheduler, max_workers or spec.max_workers, len(todo))
        try:
            _execute(client, spec, todo, out)
        finally:
            if owned:
                cluster = getattr(client, "cluster", None)
                client.close()
                if cluster is not None:
                    cluster.close()
    table = collect_results(spec, plans)
    write_results(table, out)
    log.info("sweep %s: %d ok, %d failed in %.1f s -> %s", spec.name, int((table.status == "ok").sum()),
             int((table.status == "failed").sum()), time.perf_counter() - t0, out / "results.parquet")
    return table


# --------------------------------------------------------------------------- results


def collect_results(spec: SweepSpec, plans: list[PointPlan]):
    """One row per point: point_id, parameters, status, error, seconds, stages run/reused, then metrics."""
    import pandas as pd

    rows, metric_cols = [], []
    params = spec.swept + [k for k in spec.fixed if k not in spec.swept]
    for plan in plans:
        rec = read_point(plan.run_dir) or {"status": "pending", "error": None, "seconds": None, "stages": [],
                                            "metrics": {}}
        row = {"point_id": plan.point_id, **{k: plan.params.get(k) for k in params},
               "status": rec["status"], "error": rec["error"], "seconds": rec["seconds"],
               "stages_run": ",".join(s["number"] for s in rec["stages"] if s.get("ran")),
               "stages_reused": ",".join(s["number"] for s in rec["stages"] if s["status"] == "ok" and not s.get("ran")),
               "store": str(plan.store)}
        for k, v in rec["metrics"].items():
            if k in row:  # a notebook echoing a parameter scoped to it ("02.threshold"): keep the parameter
                continue
            row[k] = v
            if k not in metric_cols:
                metric_cols.append(k)
        rows.append(row)
    cols = ["point_id", *params, "status", "error", "seconds", "stages_run", "stages_reused", "store",
            *sorted(metric_cols, key=lambda c: (c[:2], metric_cols.index(c)))]
    return pd.DataFrame(rows, columns=cols)


def _arrow_safe(table):
    """Columns of mixed or nested values become JSON text, so Parquet can hold them."""
    table = table.copy()
    for c in table.columns:
        if table[c].dtype != object:
            continue
        vals = [v for v in table[c] if v is not None and not (isinstance(v, float) and v != v)]
        kinds = {type(v) for v in vals}
        if kinds <= {str} or kinds <= {bool}:
            continue
        if kinds <= {int, float}:
            table[c] = table[c].astype(float)
            continue
        table[c] = [None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in table[c]]
    return table


def write_results(table, out: Path) -> tuple[Path, Path]:
    """Write ``results.parquet`` and ``results.csv`` (each atomically)."""
    out = Path(out)
    safe = _arrow_safe(table)
    paths = []
    from workbench.store import atomic_path

    for name, writer in (("results.parquet", lambda p: safe.to_parquet(p, index=False)),
                         ("results.csv", lambda p: table.to_csv(p, index=False))):
        with atomic_path(out / name) as tmp:  # unique temp name, fsync, rename
            writer(tmp)
        paths.append(out / name)
    return tuple(paths)


def load_results(path: str | os.PathLike):
    """The results table of a sweep (a ``results.parquet``/``.csv`` file or the sweep's folder)."""
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        path = path / "results.parquet"
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def best_point(table, metric: str, goal: str = "max"):
    """The row of the best finished point for ``metric`` (NaN metrics and failed points ignored)."""
    import pandas as pd

    if metric not in table.columns:
        raise KeyError(f"metric {metric!r} is not in the results; columns: {list(table.columns)}")
    ok = table[(table["status"] == "ok")]
    values = pd.to_numeric(ok[metric], errors="coerce").dropna()
    if values.empty:
        return None
    return ok.loc[values.idxmax() if goal == "max" else values.idxmin()]


def plot_sweep(table, params: list[str], metrics: list[str], *, best=None, figsize_per=(4.0, 3.0)):
    """Each metric (rows) against each swept parameter (columns), other parameters as lines; best point starred."""
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    ok = table[table["status"] == "ok"]
    params = list(params) or ["point_id"]
    fig, axes = plt.subplots(len(metrics), len(params), squeeze=False,
                             figsize=(figsize_per[0] * len(params), figsize_per[1] * len(metrics)))
    for i, metric in enumerate(metrics):
        y_all = pd.to_numeric(ok[metric], errors="coerce") if metric in ok else pd.Series(np.nan, index=ok.index)
        for j, p in enumerate(params):
            ax = axes[i, j]
            x = pd.to_numeric(ok[p], errors="coerce")
            numeric = x.notna().all() and len(x)
            cats = {v: n for n, v in enumerate(dict.fromkeys(ok[p].astype(str)))}
            xs = x if numeric else ok[p].astype(str).map(cats)
            others = [q for q in params if q != p]
            groups = [("", ok)]
            if others:
                try:
                    groups = list(ok.groupby(others, sort=True))
                except TypeError:  # mixed types (e.g. 15 and "otsu"): group by text
                    groups = list(ok.groupby([ok[q].astype(str) for q in others]))
            for label, g in groups:
                order = np.argsort(xs.loc[g.index].to_numpy(), kind="stable")
                ax.plot(xs.loc[g.index].to_numpy()[order], y_all.loc[g.index].to_numpy()[order], "o-",
                        label=", ".join(f"{q}={v}" for q, v in zip(others, np.atleast_1d(label))) or None)
            if best is not None and metric in best.index:
                bx = float(best[p]) if numeric else cats.get(str(best[p]))
                ax.plot([bx], [float(best[metric])], marker="*", ms=16, color="crimson", ls="none", label="best")
            if not numeric:
                ax.set_xticks(list(cats.values()), list(cats.keys()), rotation=45)
            ax.set(xlabel=p, ylabel=metric)
            if others or best is not None:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- demo and CLI


def run_demo_sweep(manifest: str | os.PathLike, run_dir: str | os.PathLike, *, client=None,
                   max_workers: int | None = None) -> dict:
    """Run ``sweeps/demo.yml`` on ``manifest`` into ``<run_dir>/sweep``; returns notebook 07's parameters."""
    from workbench.runs.project import sweep_dir

    demo_sweep = sweep_dir() / "demo.yml"
    out = Path(run_dir) / "sweep"
    run_sweep(demo_sweep, out=out, client=client, max_workers=max_workers,
              overrides={"manifest": str(Path(manifest).resolve())})
    return {"sweep": str(demo_sweep), "results": str((out / "results.parquet").resolve())}


def main(argv=None) -> int:
    import yaml

    ap = argparse.ArgumentParser(description="Run a papermill experiment sweep (see workbench/sweep.py).")
    ap.add_argument("sweep", help="sweep YAML file, e.g. sweeps/demo.yml")
    ap.add_argument("--out", help="folder of the sweep's runs (default runs/<name>)")
    ap.add_argument("--scheduler", help="Dask scheduler address (default: a local cluster)")
    ap.add_argument("--max-workers", type=int, help="local cluster size")
    ap.add_argument("--manifest", help="replace the spec's manifest")
    ap.add_argument("--store", help="replace the spec's store")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="fix a parameter for every point (YAML value), repeatable")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    overrides = {k: str(Path(v).resolve()) for k, v in (("manifest", args.manifest), ("store", args.store)) if v}
    if args.set:
        from workbench.errors import SweepError

        fixed = {}
        for item in args.set:
            if "=" not in item:
                ap.error(f"--set {item!r}: expected KEY=VALUE")
            k, v = item.split("=", 1)
            try:
                fixed[k], _ = safe_yaml(v, f"--set {k}")
            except SweepError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
        overrides["fixed"] = fixed
    from workbench.errors import WorkbenchError

    try:
        table = run_sweep(args.sweep, out=args.out, client=args.scheduler, max_workers=args.max_workers,
                          overrides=overrides)
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {"points": len(table), "ok": int((table.status == "ok").sum()),
               "failed": int((table.status == "failed").sum())}
    print(json.dumps(summary))
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
