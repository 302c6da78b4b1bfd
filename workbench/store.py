"""The dataset store: one Zarr v3 store per dataset, laid out as in DESIGN.md §6.

```
<dataset>.zarr/
  attrs: layout_version, workbench_version, manifest (records), tiling (parameters)
  slides/<slide_id>/        attrs: path, mpp, width, height, tile_px, tile_mpp, read_level, complete
      coords   (n, 2) int32   level-0 x, y of each tile's top-left corner
      tissue   (n,)   float32 tissue fraction of each tile
      features/<encoder>      (n, d) float16, attrs: encoder, weights_digest, complete
      prefilter/<name>        (n,) float32 scores, attrs: threshold, complete
      pixel_qc/<metric>       (n,) float32 blur / background / pen_colour per tile (workbench.features.tile_qc)
      qc/labels               (n,) int8 QC labels written by the napari widget
  tree/<run>/               level_1 ... level_L (N,) int32; centroids/level_l (k_l, d) float32
  samples/<run>/            indices (m,) int64 global tile ids, attrs: parameters
  errors.jsonl              error table: one JSON line per failure or clearance (append-only)
```

Every name in the store is built by :class:`Key`, so notebooks, napari and indexes agree. A
slide's (or a features array's) ``complete`` attribute is written last, after its arrays: a
reader trusts only complete entries, and a re-run redoes incomplete ones. One run at a time
holds the store's write lock (:func:`write_lock`); a second writer is refused, never interleaved.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from workbench.errors import StoreError  # noqa: F401  (raised here; defined in workbench.errors)

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")




def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is usable as one path component of the store, else raise."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or len(name) > 200:
        from workbench.errors import ParameterError

        raise ParameterError(
            f"{what} {name!r} is not usable in the store: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return name


def encoder_key(encoder: str) -> str:
    """Store-safe name of an encoder (``timm:org/model`` -> ``timm-org__model``)."""
    return encoder.replace(":", "-").replace("/", "__")


@dataclass(frozen=True)
class Key:
    """Builds every path inside a store. The one place that knows the layout."""

    @staticmethod
    def slide(slide_id: str) -> str:
        return f"slides/{slide_id}"

    @staticmethod
    def coords(slide_id: str) -> str:
        return f"slides/{slide_id}/coords"

    @staticmethod
    def tissue(slide_id: str) -> str:
        return f"slides/{slide_id}/tissue"

    @staticmethod
    def features(slide_id: str, encoder: str) -> str:
        return f"slides/{slide_id}/features/{encoder_key(encoder)}"

    @staticmethod
    def prefilter(slide_id: str, name: str) -> str:
        return f"slides/{slide_id}/prefilter/{name}"

    @staticmethod
    def pixel_qc(slide_id: str, metric: str) -> str:
        return f"slides/{slide_id}/pixel_qc/{metric}"

    @staticmethod
    def qc_labels(slide_id: str) -> str:
        return f"slides/{slide_id}/qc/labels"

    @staticmethod
    def tree(run: str) -> str:
        return f"tree/{check_name(run, 'tree run')}"

    @staticmethod
    def sample(run: str) -> str:
        return f"samples/{check_name(run, 'sample run')}"

    ERRORS = "errors"


# --------------------------------------------------------------------------- opening


def open_store(path: str | os.PathLike, mode: str = "r") -> zarr.Group:
    """Open an existing dataset store. ``mode`` is ``"r"`` or ``"a"``.

    Refuses a path that is not a workbench store, or one written by another layout version.
    """
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise StoreError(f"{path} is not a workbench store (no zarr.json): create it with tile_slides()")
    root = zarr.open_group(str(path), mode=mode, zarr_format=3)
    version = root.attrs.get("layout_version")
    if version != LAYOUT_VERSION:
        raise StoreError(
            f"store {path} has layout version {version!r}, this workbench reads version {LAYOUT_VERSION}; "
            "re-tile into a new store (nothing was changed)"
        )
    return root


def create_store(path: str | os.PathLike, *, manifest: list[dict], tiling: dict) -> zarr.Group:
    """Create a store, or reopen one made with the same tiling parameters (resume)."""
    from workbench import __version__

    path = Path(path)
    if (path / "zarr.json").exists():
        root = open_store(path, mode="a")
        old = root.attrs.get("tiling")
        if old != tiling:
            raise StoreError(
                f"store {path} was tiled with {old}, not {tiling}; use a new store path for new tiling parameters"
            )
        root.attrs["manifest"] = manifest
        return root
    # The folder may already hold the write lock's ``.lock`` file (write_lock runs first); anything else
    # means it is not ours. The root is created with its attributes in one (atomic) write, so a run killed
    # here leaves either no store or a complete root, never one without a layout version.
    if path.is_dir() and any(p.name != ".lock" for p in path.iterdir()):
        raise StoreError(f"{path} exists, is not empty and is not a workbench store (no zarr.json); use another path")
    return zarr.create_group(
        str(path),
        zarr_format=3,
        attributes={
            "layout_version": LAYOUT_VERSION,
            "workbench_version": __version__,
            "manifest": manifest,
            "tiling": tiling,
        },
    )


def store_path(root: zarr.Group) -> Path:
    """Filesystem path of a store opened by :func:`open_store`."""
    return Path(str(root.store.root))


# --------------------------------------------------------------------------- locking


@contextlib.contextmanager
def write_lock(path: str | os.PathLike, *, wait: float = 0.0):
    """Hold the store's exclusive write lock; raise :class:`StoreError` if another run holds it.

    The lock is an ``flock`` on ``<store>/.lock``: the kernel releases it when the holder dies,
    so a killed run never leaves a stale lock behind.
    """
    lock_path = Path(path) / ".lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                    raise StoreError(
                        f"store {path} is being written by another run ({holder or 'unknown'}); "
                        "wait for it to finish (nothing was changed)"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


# --------------------------------------------------------------------------- slides


def slide_ids(root: zarr.Group, *, complete_only: bool = True) -> list[str]:
    """Slide ids in manifest order (the order that defines global tile ids)."""
    ids = [rec["slide_id"] for rec in root.attrs.get("manifest", [])]
    if not complete_only:
        return ids
    return [s for s in ids if is_complete(root, Key.slide(s))]


def is_complete(root: zarr.Group, key: str) -> bool:
    try:
        node = root[key]
    except KeyError:
        return False
    return bool(node.attrs.get("complete", False))


def mark_complete(node) -> None:
    """Write the ``complete`` attribute: always the last write of an entry."""
    node.attrs["complete"] = True


def write_array(group: zarr.Group, name: str, data: np.ndarray, *, chunk_rows: int = 65536, attrs=None):
    """(Re)write one array of a group, chunked along its first axis."""
    data = np.asarray(data)
    chunks = (max(1, min(chunk_rows, len(data))),) + data.shape[1:]
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, overwrite=True)
    if data.size:
        arr[...] = data
    if attrs:
        arr.attrs.update(attrs)
    return arr


def read_slide(root: zarr.Group, slide_id: str) -> dict:
    """A complete slide's attrs and arrays, or a clear error naming the slide."""
    key = Key.slide(slide_id)
    if not is_complete(root, key):
        raise StoreError(f"slide {slide_id!r} is not tiled in {store_path(root)}: run tiling first")
    g = root[key]
    return {**dict(g.attrs), "coords": g["coords"][:], "tissue": g["tissue"][:]}


def tile_counts(root: zarr.Group, ids: list[str] | None = None) -> np.ndarray:
    """Number of tiles of each complete slide, in manifest order."""
    ids = slide_ids(root) if ids is None else ids
    return np.array([root[Key.coords(s)].shape[0] for s in ids], dtype=np.int64)


def tile_index(root: zarr.Group, ids: list[str] | None = None):
    """Table of all tiles: global tile id → (slide_id, position in slide, x, y), as pandas."""
    import pandas as pd

    ids = slide_ids(root) if ids is None else ids
    frames = []
    for s in ids:
        coords = root[Key.coords(s)][:]
        frames.append(
            pd.DataFrame(
                {"slide_id": s, "tile": np.arange(len(coords)), "x": coords[:, 0], "y": coords[:, 1]}
            )
        )
    if not frames:
        return pd.DataFrame(columns=["slide_id", "tile", "x", "y"])
    return pd.concat(frames, ignore_index=True)


def features_array(root: zarr.Group, encoder: str, ids: list[str] | None = None):
    """All slides' features of one encoder stacked lazily into one (N, d) Dask array.

    Raises naming the first slide whose features are missing or incomplete.
    """
    import dask.array as da

    ids = slide_ids(root) if ids is None else ids
    parts = []
    for s in ids:
        key = Key.features(s, encoder)
        if not is_complete(root, key):
            raise StoreError(f"slide {s!r} has no complete {encoder!r} features: run embedding first")
        arr = root[key]
        parts.append(da.from_zarr(arr))
    if not parts:
        raise StoreError(f"no slides with {encoder!r} features in {store_path(root)}")
    return da.concatenate(parts, axis=0)


# --------------------------------------------------------------------------- error table
#
# The error table is an append-only JSON-lines file, ``<store>/errors.jsonl`` (beside the ``.lock`` file):
# recording a failure appends one line (``O_APPEND`` under an exclusive ``flock``, one ``write`` call), so
# it costs the same at row 10 and row 100,000 and writers in several processes never lose each other's
# rows. Clearing appends a ``cleared`` line; :func:`error_table` replays the file and keeps, per
# (slide_id, stage), the last record. Stores written before this layout kept the records in the
# ``errors`` group's attrs: those are read first.

ERRORS_FILE = "errors.jsonl"
ERROR_COLUMNS = ["slide_id", "stage", "error", "time", "error_class"]


def _errors_path(root) -> Path:
    return (root if isinstance(root, (str, os.PathLike)) else store_path(root)) / ERRORS_FILE


def _append_error_line(root, record: dict) -> None:
    line = (json.dumps(record, default=_json_default, ensure_ascii=True) + "\n").encode()
    path = _errors_path(root)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        view = memoryview(line)
        while view:  # a short write (signal, full pipe) continues where it stopped
            view = view[os.write(fd, view):]
        # no fsync per record: it would cost milliseconds per row on a busy disk; a crash can lose only the
        # last rows (a cut last line is skipped on reading), never corrupt earlier ones
    finally:
        os.close(fd)  # releases the flock


def record_error(root: zarr.Group, slide_id: str, stage: str, error: BaseException | str,
                 error_class: str | None = None, **context) -> None:
    """Append (slide_id, stage, error, error_class) to the store's error table (O(1), safe across processes)."""
    if isinstance(error, BaseException):
        error_class = error_class or type(error).__name__
        text = f"{type(error).__name__}: {error}"
    else:
        text = str(error)
        if error_class is None:
            m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*(?:Error|Exception|Timeout|Interrupt)): ", text)
            error_class = m.group(1) if m else "Error"
    _append_error_line(root, {"slide_id": slide_id, "stage": stage, "error": text, "time": time.time(),
                              "error_class": error_class, **context})


def record_failure(root: zarr.Group, slide_id: str, stage: str, error: BaseException | str,
                   error_class: str | None = None, **context) -> dict:
    """The one per-slide failure helper of every stage: record the row, log it, return a summary fragment.

    Returns ``{"slide_id", "status": "error", "error", "error_class"}`` for the stage's summary table.
    ``context`` (e.g. ``encoder=``) is stored with the record and matched by :func:`failed_slides`.
    """
    record_error(root, slide_id, stage, error, error_class, **context)
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    cls = error_class or (type(error).__name__ if isinstance(error, BaseException) else None)
    log.warning("slide %r (%s): %s", slide_id, stage, text)
    return {"slide_id": slide_id, "status": "error", "error": text, "error_class": cls}


def clear_error(root: zarr.Group, slide_id: str, stage: str) -> None:
    """Mark (slide_id, stage) as no longer failing (appends a ``cleared`` line; nothing is rewritten).

    Stages call it only for the slides :func:`failed_slides` listed, so a batch costs one read of the table."""
    if not _errors_path(root).exists() and not _legacy_records(root):
        return  # nothing was ever recorded
    _append_error_line(root, {"slide_id": slide_id, "stage": stage, "cleared": True, "time": time.time()})


def _legacy_records(root) -> list:
    if isinstance(root, (str, os.PathLike)):
        return []
    try:
        return list(root[Key.ERRORS].attrs.get("records", [])) if Key.ERRORS in root else []
    except Exception:  # noqa: BLE001 — an unreadable legacy group just has no records
        return []


def _error_records(root) -> dict:
    """{(slide_id, stage): last record}, replaying the legacy attrs then the JSON-lines file."""
    latest = {}
    for r in _legacy_records(root):
        latest[(r["slide_id"], r["stage"])] = {**r, "error_class": r.get("error_class")}
    path = _errors_path(root)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    for line in data.splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # a line cut by a kill mid-write: the only one that can be partial is the last
            continue
        key = (r.get("slide_id"), r.get("stage"))
        if r.get("cleared"):
            latest.pop(key, None)
        else:
            latest.pop(key, None)  # re-insert: the table lists slides in the order of their last failure
            latest[key] = r
    return latest


def failed_slides(root, stage: str, **context) -> dict:
    """{slide_id: error text} of the slides whose last record for ``stage`` (and ``context``) is a failure."""
    return {sid: r.get("error") for (sid, stg), r in _error_records(root).items()
            if stg == stage and all(r.get(k) == v for k, v in context.items())}


def error_table(root: zarr.Group):
    """The store's error table as a DataFrame (slide_id, stage, error, time, error_class)."""
    import pandas as pd

    records = [{c: r.get(c) for c in ERROR_COLUMNS} for r in _error_records(root).values()]
    return pd.DataFrame(records, columns=ERROR_COLUMNS)


# --------------------------------------------------------------------------- atomic files


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a unique temporary path beside ``path``; on success fsync it and rename it over ``path``.

    A kill at any point leaves either the old file or the new one, never a mix; on an error the temporary
    file is removed and ``path`` is untouched. Use for every file outside Zarr chunks (indexes, tables, JSON).
    """
    import uuid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically: a unique temp file beside ``path``, fsync, rename (see :func:`atomic_path`)."""
    write_bytes_atomic(path, json.dumps(obj, indent=2, default=_json_default).encode())


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
