"""The dataset store: one Zarr v3 store per dataset, layout version 2 (README: "The Dataset handle").

```
<dataset>.zarr/
  attrs: layout_version (2), workbench_version, manifest (records, store order), tiling (parameters)
  slides/<slide_id>/        attrs: path, manifest_path, file_identity, mpp, width, height, tile_px, tile_mpp, complete
      coords   (n, 2) int32   level-0 x, y of each tile's top-left corner
      tissue   (n,)   float32 tissue fraction of each tile
      mask                    the tissue mask at mask_downsample
      features/<encoder>      (n, d) float16, attrs: encoder, weights_digest, coords_digest, complete
      prefilter/<name>        (n,) float32 scores, attrs: threshold, complete
      pixel_qc/<metric>       (n,) float32 blur / background / pen_colour per tile (workbench.features.tile_qc)
      qc/labels               (n,) int8 QC labels written by the napari widget
  tree/<run>/               level_l (N,) int32; centroids/, parents/, distance; attrs: parameters, lineage, identity
  samples/<run>/            indices (m,) int64 global tile ids + stable keys slide (m,) / xy (m, 2); lineage, identity
  errors.jsonl              error table: one JSON line per failure or clearance (append-only)
<dataset>.zarr.indexes/     saved retrieval indexes (+ .sha256.json checksums)
```

Every name in the store is built by :class:`Key`. Every array is written by :func:`write_array`:
zstd + crc32c chunks, every chunk written, then attrs with the chunk count, per-chunk sha256 of the
values and crc32c of the stored bytes, and a values ``digest``; every read goes through
:class:`CheckedStore`, which raises :class:`ChecksumError` / :class:`MissingChunkError` naming slide and
array. Lineage digests (:func:`tiling_digest`, :func:`features_digest`, :func:`node_digest`) let trees,
samples and indexes refuse inputs that changed (:class:`StaleError`). Named runs are written beside the
old one and swapped in atomically (:func:`write_run`). A slide's (or a features array's) ``complete``
attribute is written last; one run at a time holds the store's write lock (:func:`write_lock`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import LocalStore

from workbench.errors import (
    ChecksumError,
    LayoutVersionError,
    MissingChunkError,
    RunExistsError,
    StaleError,
    StoreError,
)

log = logging.getLogger(__name__)

LAYOUT_VERSION = 2
# attrs every array written by write_array carries (after its data): chunk count, per-chunk sha256 of the
# values, per-chunk crc32c of the stored bytes (the codec's 4-byte tail) and a digest of the values
WRITTEN = "wb_chunks"
_CHUNK_KEY = re.compile(r"^(?:(.*)/)?c(?:/\d+)+$")
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
    def features_group(slide_id: str) -> str:
        return f"slides/{slide_id}/features"

    @staticmethod
    def prefilters(slide_id: str) -> str:
        return f"slides/{slide_id}/prefilter"

    @staticmethod
    def tree(run: str) -> str:
        return f"{Key.TREES}/{check_name(run, 'tree run')}"

    @staticmethod
    def tree_level(run: str, level: int) -> str:
        return f"{Key.tree(run)}/level_{int(level)}"

    @staticmethod
    def sample(run: str) -> str:
        return f"{Key.SAMPLES}/{check_name(run, 'sample run')}"

    @staticmethod
    def index_dir(store) -> Path:
        """``<store>.indexes/``: saved retrieval indexes live next to the store."""
        p = Path(os.fspath(store))
        return p.with_name(p.name + ".indexes")

    @staticmethod
    def truth(slide_path) -> Path | None:
        """``<slide>.truth.npz`` next to a synthetic slide (suffix appended or replacing), if it exists."""
        p = Path(str(slide_path))
        for cand in (p.with_name(p.name + ".truth.npz"), p.with_suffix(".truth.npz")):
            if cand.exists():
                return cand
        return None

    TREES = "tree"
    SAMPLES = "samples"
    ERRORS = "errors"


# --------------------------------------------------------------------------- checked chunk reads


def describe_key(key: str) -> str:
    """``slides/r1/features/toy`` -> ``slide 'r1', array 'features/toy'`` (for error messages)."""
    parts = key.strip("/").split("/")
    if len(parts) >= 3 and parts[0] == "slides":
        return f"slide {parts[1]!r}, array {'/'.join(parts[2:])!r}"
    return f"array {key.strip('/')!r}"


class CheckedStore(LocalStore):
    """A local Zarr store that refuses a corrupted or a missing chunk of an array the workbench wrote.

    Every chunk read is checked here, whoever reads it (NumPy slicing, Dask, napari): a chunk whose
    crc32c tail does not match its bytes raises :class:`ChecksumError`; a chunk file that is gone from an
    array whose attrs say it was written in full (``wb_chunks``; every chunk is written, empty or not)
    raises :class:`MissingChunkError` instead of reading back as the fill value. Both name the slide and
    the array.
    """

    def __init__(self, root, *, read_only: bool = False) -> None:
        super().__init__(root, read_only=read_only)
        self._crc: dict[str, bool] = {}

    def _meta(self, prefix: str) -> dict | None:
        try:
            return json.loads((self.root / prefix / "zarr.json").read_bytes())
        except (OSError, ValueError):
            return None

    def _has_crc(self, prefix: str) -> bool:
        if prefix not in self._crc:
            meta = self._meta(prefix) or {}
            self._crc[prefix] = any(c.get("name") == "crc32c" for c in meta.get("codecs", []) if isinstance(c, dict))
        return self._crc[prefix]

    async def get(self, key, prototype=None, byte_range=None):
        buf = await super().get(key, prototype, byte_range)
        m = _CHUNK_KEY.match(key)
        if m is None:
            return buf
        prefix = m.group(1) or ""
        if buf is None:
            meta = self._meta(prefix)
            if meta is not None and WRITTEN in meta.get("attributes", {}):
                raise MissingChunkError(
                    f"{describe_key(prefix)}: chunk {key[len(prefix) :].lstrip('/')} is missing from store "
                    f"{self.root} (it was written): the store lost data; restore it from a backup or re-run "
                    "the stage that wrote it (`python -m workbench verify` lists every fault)"
                )
            return buf
        if byte_range is None and self._has_crc(prefix):
            import google_crc32c

            data = buf.as_numpy_array().view(np.uint8)
            if len(data) < 4 or google_crc32c.value(data[:-4].tobytes()) != int.from_bytes(
                data[-4:].tobytes(), "little"
            ):
                raise ChecksumError(
                    f"{describe_key(prefix)}: chunk {key[len(prefix) :].lstrip('/')} of store {self.root} fails its "
                    "crc32c checksum (the bytes on disk changed): restore the store from a backup or re-run the "
                    "stage that wrote it"
                )
        return buf


def open_root(path: str | os.PathLike, mode: str = "r") -> zarr.Group:
    """The root group of a store through :class:`CheckedStore` (no layout check: use :func:`open_store`)."""
    store = CheckedStore(Path(path), read_only=(mode == "r"))
    return zarr.open_group(store=store, mode=mode, zarr_format=3)


# --------------------------------------------------------------------------- opening


def as_path(store) -> Path:
    """The filesystem path of a store given as a path, a :class:`~workbench.dataset.Dataset` or an open group."""
    if isinstance(store, zarr.Group):
        return store_path(store)
    return Path(os.fspath(store))


def as_root(store):
    """An open store group from a group, a :class:`~workbench.dataset.Dataset` (group-like) or a path."""
    if isinstance(store, zarr.Group) or (hasattr(store, "root") and hasattr(store, "__fspath__")):
        return store
    return open_store(store)


def open_store(path, mode: str = "r") -> zarr.Group:
    """Open an existing dataset store (a path or a Dataset). ``mode`` is ``"r"`` or ``"a"``.

    Refuses a path that is not a workbench store, or one written by another layout version (a
    version-1 store names ``python -m workbench migrate``).
    """
    if isinstance(path, zarr.Group):
        return path
    path = as_path(path)
    if not (path / "zarr.json").exists():
        from workbench.migrate import recover

        recover(path)  # a migration killed between its two renames: put the store back
    if not (path / "zarr.json").exists():
        raise StoreError(f"{path} is not a workbench store (no zarr.json): create it with tile_slides()")
    root = open_root(path, mode)
    version = root.attrs.get("layout_version")
    if version != LAYOUT_VERSION:
        if version == 1:
            raise LayoutVersionError(
                f"store {path} has layout version 1 (no checksums, no lineage); this workbench reads version "
                f"{LAYOUT_VERSION}: upgrade it in place with `python -m workbench migrate {path}` (crash-safe; "
                "nothing was changed)"
            )
        raise LayoutVersionError(
            f"store {path} has layout version {version!r}, this workbench reads version {LAYOUT_VERSION}; "
            "re-tile into a new store (nothing was changed)"
        )
    return root


def _merge_manifest(path: Path, old: list[dict], new: list[dict], root: zarr.Group) -> list[dict]:
    """The store's manifest after a re-run: existing slides keep their place (global tile ids never move),
    new ones are appended, slides left out are dropped. A slide id whose file changed is refused."""
    new_by_id = {r["slide_id"]: r for r in new}
    merged = [new_by_id[r["slide_id"]] for r in old if r["slide_id"] in new_by_id]
    known = {r["slide_id"] for r in merged}
    merged += [r for r in new if r["slide_id"] not in known]
    for rec in merged:
        sid = rec["slide_id"]
        key = Key.slide(sid)
        if not is_complete(root, key):
            continue
        attrs = root[key].attrs
        was = attrs.get("manifest_path", attrs.get("path"))
        if str(rec["path"]) == str(was) or _resolved(rec["path"]) == _resolved(attrs.get("path", "")):
            continue
        stored = attrs.get("file_identity")
        now = file_identity(rec["path"]) if Path(str(rec["path"])).exists() else None
        if stored and now and same_file(stored, now):
            log.info("slide %r moved from %s to %s (same file): path updated", sid, was, rec["path"])
            attrs.update({"path": str(Path(str(rec["path"]))), "manifest_path": str(rec["path"]), "file_identity": now})
            if SEAL in attrs:
                seal_attrs(root[key])
            continue
        raise StaleError(
            f"slide {sid!r} was tiled from {was}; the manifest now gives {rec['path']}, "
            + ("which is another file" if now else "which does not exist")
            + f": give the new file a new slide_id, or tile it into a new store (store {path} was not changed)"
        )
    return merged


def create_store(path: str | os.PathLike, *, manifest: list[dict], tiling: dict) -> zarr.Group:
    """Create a store, or reopen one made with the same tiling parameters (resume).

    On resume, slides already in the store keep their order (a reordered manifest never moves global
    tile ids); a manifest that points an existing slide id at another file is refused (:class:`StaleError`).
    """
    from workbench import __version__

    path = Path(path)
    if (path / "zarr.json").exists():
        root = open_store(path, mode="a")
        old = root.attrs.get("tiling")
        if old != tiling:
            raise StoreError(
                f"store {path} was tiled with {old}, not {tiling}; use a new store path for new tiling parameters"
            )
        root.attrs["manifest"] = _merge_manifest(path, list(root.attrs.get("manifest", [])), manifest, root)
        return root
    # The folder may already hold the write lock's ``.lock`` file (write_lock runs first); anything else
    # means it is not ours. The root is created with its attributes in one (atomic) write, so a run killed
    # here leaves either no store or a complete root, never one without a layout version.
    if path.is_dir() and any(p.name != ".lock" for p in path.iterdir()):
        raise StoreError(f"{path} exists, is not empty and is not a workbench store (no zarr.json); use another path")
    zarr.create_group(
        str(path),
        zarr_format=3,
        attributes={
            "layout_version": LAYOUT_VERSION,
            "workbench_version": __version__,
            "manifest": manifest,
            "tiling": tiling,
        },
    )
    return open_root(path, "a")


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
    root = as_root(root)
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


def chunk_keys(arr) -> list[str]:
    """Chunk keys (``c/i/j``) of an array, in C order."""
    import itertools

    grid = [max(1, -(-s // c)) for s, c in zip(arr.shape, arr.chunks)]
    if arr.size == 0:
        return []
    return ["c/" + "/".join(map(str, idx)) for idx in itertools.product(*[range(g) for g in grid])]


def _chunk_dir(arr) -> Path:
    return store_path_of(arr) / arr.path


def store_path_of(node) -> Path:
    return Path(str(node.store.root))


def stored_crcs(arr) -> list[int | None]:
    """The crc32c tail (last 4 bytes) of each stored chunk file of an array; None for a missing file."""
    base = _chunk_dir(arr)
    out = []
    for key in chunk_keys(arr):
        try:
            with open(base / key, "rb") as fh:
                fh.seek(-4, os.SEEK_END)
                out.append(int.from_bytes(fh.read(4), "little"))
        except (FileNotFoundError, OSError):
            out.append(None)
    return out


def _value_hashes(data: np.ndarray, rows: int) -> list[str]:
    return [
        hashlib.sha256(np.ascontiguousarray(data[a : a + rows]).tobytes()).hexdigest()
        for a in range(0, len(data), rows)
    ]


def values_digest(hashes: list[str], shape, dtype) -> str:
    h = hashlib.sha256(json.dumps([list(shape), str(dtype)]).encode())
    for x in hashes:
        h.update(x.encode())
    return h.hexdigest()


def write_array(group: zarr.Group, name: str, data: np.ndarray, *, chunk_rows: int = 65536, attrs=None):
    """(Re)write one array of a group, chunked along its first axis: the one write path of the store.

    Chunks are zstd-compressed and crc32c-checksummed; every chunk is written (empty or not), so a missing
    chunk file is an error, never the fill value. After the data, the attrs record the chunk count, the
    sha256 of each chunk's values, the crc32c of each stored chunk and a digest of all values (``digest``):
    what lineage and :func:`verify` check.
    """
    from zarr.codecs import Crc32cCodec, ZstdCodec

    data = np.asarray(data)
    rows = max(1, min(chunk_rows, len(data))) if data.ndim else 1
    chunks = (rows,) + data.shape[1:]
    arr = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        overwrite=True,
        compressors=[ZstdCodec(level=3), Crc32cCodec()],
        config={"write_empty_chunks": True},
    )
    if data.size:
        arr[...] = data
    hashes = _value_hashes(data, rows) if data.size else []
    lineage = {
        WRITTEN: len(chunk_keys(arr)),
        "wb_sha256": hashes,
        "wb_crc32c": stored_crcs(arr),
        "digest": values_digest(hashes, data.shape, data.dtype),
    }
    arr.attrs.update({**(attrs or {}), **lineage})
    return arr


def array_digest_of(arr) -> str | None:
    """The values digest recorded when an array was written (None for an array written otherwise)."""
    return arr.attrs.get("digest") if WRITTEN in arr.attrs else None


def check_fresh(arr, what: str | None = None) -> None:
    """Raise :class:`StaleError` if an array's chunk files are not the ones written with its attrs.

    Cheap: reads the 4-byte crc32c tail of each chunk file. Catches values rewritten in place (by zarr
    directly, bypassing :func:`write_array`) and chunks deleted since.
    """
    a = arr.attrs
    if WRITTEN not in a:
        return
    want = a.get("wb_crc32c", [])
    now = stored_crcs(arr)
    for key, w, c in zip(chunk_keys(arr), want, now):
        if c is None:
            raise MissingChunkError(
                f"{what or describe_key(arr.path)}: chunk {key} is missing from store "
                f"{store_path_of(arr)} (it was written)"
            )
        if w != c:
            raise StaleError(
                f"{what or describe_key(arr.path)}: chunk {key} was rewritten after the array was written (its "
                "values no longer match the lineage recorded with it); re-run the stage that writes it "
                "(e.g. embed_slides for features) and rebuild what was derived from it"
            )


def read_slide(root: zarr.Group, slide_id: str) -> dict:
    """A complete slide's attrs and arrays, or a clear error naming the slide."""
    root = as_root(root)
    key = Key.slide(slide_id)
    if not is_complete(root, key):
        raise StoreError(f"slide {slide_id!r} is not tiled in {store_path(root)}: run tiling first")
    g = root[key]
    return {**check_attrs(g, f"slide {slide_id!r}"), "coords": g["coords"][:], "tissue": g["tissue"][:]}


def tile_counts(root: zarr.Group, ids: list[str] | None = None) -> np.ndarray:
    """Number of tiles of each complete slide, in manifest order."""
    root = as_root(root)
    ids = slide_ids(root) if ids is None else ids
    return np.array([root[Key.coords(s)].shape[0] for s in ids], dtype=np.int64)


def tile_index(root: zarr.Group, ids: list[str] | None = None):
    """Table of all tiles: global tile id → (slide_id, position in slide, x, y), as pandas."""
    root = as_root(root)
    import pandas as pd

    ids = slide_ids(root) if ids is None else ids
    frames = []
    for s in ids:
        coords = root[Key.coords(s)][:]
        frames.append(
            pd.DataFrame({"slide_id": s, "tile": np.arange(len(coords)), "x": coords[:, 0], "y": coords[:, 1]})
        )
    if not frames:
        return pd.DataFrame(columns=["slide_id", "tile", "x", "y"])
    return pd.concat(frames, ignore_index=True)


def complete_features(root: zarr.Group, encoder: str, ids: list[str] | None = None):
    """(slide_id, array) of each slide's complete ``encoder`` features, in manifest order; raises naming the
    first slide whose features are missing or incomplete."""
    root = as_root(root)
    for s in slide_ids(root) if ids is None else ids:
        key = Key.features(s, encoder)
        if not is_complete(root, key):
            raise StoreError(f"slide {s!r} has no complete {encoder!r} features: run embedding first")
        yield s, root[key]


def features_array(root: zarr.Group, encoder: str, ids: list[str] | None = None):
    """All slides' features of one encoder stacked lazily into one (N, d) Dask array.

    Raises naming the first slide whose features are missing or incomplete.
    """
    import dask.array as da

    root = as_root(root)
    parts = [da.from_zarr(arr) for _, arr in complete_features(root, encoder, ids)]
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
            view = view[os.write(fd, view) :]
        # no fsync per record: it would cost milliseconds per row on a busy disk; a crash can lose only the
        # last rows (a cut last line is skipped on reading), never corrupt earlier ones
    finally:
        os.close(fd)  # releases the flock


def record_error(
    root: zarr.Group, slide_id: str, stage: str, error: BaseException | str, error_class: str | None = None, **context
) -> None:
    """Append (slide_id, stage, error, error_class) to the store's error table (O(1), safe across processes)."""
    if isinstance(error, BaseException):
        error_class = error_class or type(error).__name__
        text = f"{type(error).__name__}: {error}"
    else:
        text = str(error)
        if error_class is None:
            m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*(?:Error|Exception|Timeout|Interrupt)): ", text)
            error_class = m.group(1) if m else "Error"
    _append_error_line(
        root,
        {
            "slide_id": slide_id,
            "stage": stage,
            "error": text,
            "time": time.time(),
            "error_class": error_class,
            **context,
        },
    )


def record_failure(
    root: zarr.Group, slide_id: str, stage: str, error: BaseException | str, error_class: str | None = None, **context
) -> dict:
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
    except Exception:
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
    return {
        sid: r.get("error")
        for (sid, stg), r in _error_records(root).items()
        if stg == stage and all(r.get(k) == v for k, v in context.items())
    }


def error_table(root: zarr.Group):
    """The store's error table as a DataFrame (slide_id, stage, error, time, error_class)."""
    root = as_root(root)
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
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """fsync a folder so that a rename inside it is durable (errors ignored: not every filesystem allows it)."""
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


# --------------------------------------------------------------------------- slide file identity

_MIB = 1 << 20


def _resolved(p) -> str:
    try:
        return str(Path(str(p)).resolve())
    except OSError:
        return str(p)


def file_identity(path) -> dict:
    """Identity of a slide file: size, mtime and a sha256 of its first and last MiB plus 16 samples of
    64 KiB spread over the file (the header and the directory of a TIFF/SVS, and its tile data)."""
    path = Path(str(path))
    st_ = path.stat()
    if path.is_dir():  # a multi-file slide (MRXS data folder, DICOM series): names, sizes and times of its files
        files = sorted(p for p in path.rglob("*") if p.is_file())
        listing = [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        return {
            "size": int(sum(x[1] for x in listing)),
            "mtime_ns": int(max([x[2] for x in listing], default=0)),
            "sha256_sampled": sha_digest(listing),
        }
    size = st_.st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        spans = [(0, min(size, _MIB)), (max(0, size - _MIB), size)]
        spans += [(int(size * k / 17), min(size, int(size * k / 17) + 65536)) for k in range(1, 17)]
        for a, b in spans:
            fh.seek(a)
            h.update(fh.read(max(0, b - a)))
    return {"size": int(size), "mtime_ns": int(st_.st_mtime_ns), "sha256_sampled": h.hexdigest()}


def same_file(a: dict, b: dict) -> bool:
    return a.get("size") == b.get("size") and a.get("sha256_sampled") == b.get("sha256_sampled")


def identity_change(stored: dict | None, path) -> str | None:
    """What changed about a slide file since ``stored`` was recorded (None: unchanged or nothing recorded)."""
    if not stored:
        return None
    path = Path(str(path))
    if not path.exists():
        return f"the file {path} is gone"
    now = file_identity(path)
    changes = [k for k in ("size", "sha256_sampled", "mtime_ns") if stored.get(k) != now.get(k)]
    if not changes:
        return None
    what = {
        "size": f"size {stored.get('size')} -> {now['size']} bytes",
        "sha256_sampled": "content hash",
        "mtime_ns": "modification time",
    }
    return f"the file {path} changed since tiling ({', '.join(what[c] for c in changes)})"


SEAL = "attrs_sha256"


def seal_attrs(node) -> None:
    """Record a sha256 of a node's attrs (all but ``complete``) so a changed byte in them is caught."""
    a = {k: v for k, v in dict(node.attrs).items() if k not in (SEAL, "complete")}
    node.attrs[SEAL] = sha_digest(a)


def check_attrs(node, what: str) -> dict:
    """A node's attrs after checking them against their seal (:class:`ChecksumError` naming ``what``)."""
    attrs = dict(node.attrs)
    seal = attrs.get(SEAL)
    if seal is not None and sha_digest({k: v for k, v in attrs.items() if k not in (SEAL, "complete")}) != seal:
        raise ChecksumError(
            f"{what}: its attributes (zarr.json) changed since they were written (e.g. mpp, tile "
            "size or path): re-tile the slide into a new store, or restore the store from a backup"
        )
    return attrs


def check_slide_file(root: zarr.Group, slide_id: str) -> dict:
    """The slide's attrs, after checking them and that its file is the one it was tiled from
    (:class:`ChecksumError` / :class:`StaleError` if not)."""
    attrs = check_attrs(root[Key.slide(slide_id)], f"slide {slide_id!r}")
    change = identity_change(attrs.get("file_identity"), attrs.get("path", ""))
    if change:
        raise StaleError(
            f"slide {slide_id!r}: {change}; its tiles would be read at the old coordinates. Re-tile "
            "it into a new store (or give the new file a new slide_id); nothing was read"
        )
    return attrs


# --------------------------------------------------------------------------- lineage digests


def sha_digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def tiling_digest(root: zarr.Group, ids: list[str] | None = None) -> str:
    """Digest of what global tile ids mean: the slides in order and each slide's coords values."""
    root = as_root(root)
    ids = slide_ids(root) if ids is None else ids
    parts = []
    for s in ids:
        arr = root[Key.coords(s)]
        parts.append([s, list(arr.shape), array_digest_of(arr) or _legacy_digest(arr)])
    return sha_digest(parts)


def _legacy_digest(arr) -> str:
    h = hashlib.sha256(repr((arr.shape, str(arr.dtype))).encode())
    h.update(np.ascontiguousarray(arr[...]).tobytes())
    return h.hexdigest()


def features_digest(root: zarr.Group, encoder: str, ids: list[str] | None = None, *, check: bool = True) -> str:
    """Digest of a store's ``encoder`` features: per slide its id, shape, weights digest and value digest.

    With ``check`` (default) every features array is first checked against the chunks on disk
    (:func:`check_fresh`, a 4-byte read per chunk), so features rewritten in place are refused as stale.
    """
    parts = []
    for s, arr in complete_features(root, encoder, ids):
        if check:
            check_fresh(arr, f"slide {s!r}, features {encoder!r}")
        parts.append([s, list(arr.shape), arr.attrs.get("weights_digest"), array_digest_of(arr) or _legacy_digest(arr)])
    return sha_digest([encoder, parts])


def node_digest(group: zarr.Group) -> str:
    """Digest of a run group (tree / sample): its parameters and the values digest of each of its arrays."""
    parts = []
    for name, arr in sorted(group.arrays()):
        parts.append([name, array_digest_of(arr) or _legacy_digest(arr)])
    for name, sub in sorted(group.groups()):
        parts.append([name, node_digest(sub)])
    return sha_digest([dict(group.attrs.get("parameters", {})), parts])


# --------------------------------------------------------------------------- named runs, swapped atomically

RUN_TMP, RUN_OLD = "_tmp-", "_old-"


def renameat2_exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def swap_in(tmp: Path, final: Path) -> None:
    """Make directory ``tmp`` (complete) the new ``final``: at every instant ``final`` (or, on filesystems
    without an atomic exchange, ``_old-<name>`` beside it) holds a complete old or new version."""
    import shutil

    fsync_dir(tmp)
    if not final.exists():
        os.rename(tmp, final)
    elif renameat2_exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old version
    else:
        old = final.with_name(RUN_OLD + final.name)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)  # readers fall back to _old-<name> until the next rename
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(final.parent)


def recover_runs(path) -> None:
    """Clean up after a run killed while swapping: restore ``_old-<name>`` when ``<name>`` is gone, drop temps."""
    import shutil

    path = as_path(path)
    for parent in (Key.TREES, Key.SAMPLES):
        d = path / parent
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.startswith(RUN_OLD):
                final = d / p.name[len(RUN_OLD) :]
                if final.exists():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.rename(p, final)
            elif p.name.startswith(RUN_TMP):
                shutil.rmtree(p, ignore_errors=True)


def run_key(root: zarr.Group, key: str) -> str:
    """``key``, or its ``_old-`` copy when a swap was killed between its two renames."""
    if key in root:
        return key
    parent, name = key.rsplit("/", 1)
    old = f"{parent}/{RUN_OLD}{name}"
    return old if old in root else key


def run_names(root: zarr.Group, parent: str) -> list[str]:
    """Names of the runs under ``tree`` or ``samples`` (temporaries left out)."""
    if parent not in root:
        return []
    names = set()
    for name, _ in root[parent].groups():
        if name.startswith(RUN_TMP):
            continue
        names.add(name.removeprefix(RUN_OLD))
    return sorted(names)


def write_run(store, key: str, identity: dict, build, *, overwrite: bool = False, what: str = "run"):
    """Write a named run (``tree/<name>``, ``samples/<name>``) under the store's write lock.

    ``identity``: the parameters and input digests that define the run. If the run exists with the same
    identity it is kept (returns False: nothing written); with another identity :class:`RunExistsError`
    unless ``overwrite=True``. The new run is built by ``build(group)`` under a temporary name and then
    swapped in atomically (:func:`swap_in`): a kill at any moment leaves the old or the new run readable.
    Returns True when written.
    """
    path = as_path(store)
    identity = json.loads(json.dumps(identity, sort_keys=True, default=_json_default))
    with write_lock(path):
        recover_runs(path)
        root = open_store(path, mode="a")
        if is_complete(root, key):
            old = dict(root[key].attrs.get("identity", {}))
            if old == identity:
                return False
            if not overwrite:

                def flat(d, pre=""):
                    out = {}
                    for k, v in d.items():
                        out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
                    return out

                fo, fn = flat(old), flat(identity)
                changed = sorted(k for k in set(fo) | set(fn) if fo.get(k) != fn.get(k))
                diff = "; ".join(f"{k}: {fo.get(k)!r} -> {fn.get(k)!r}" for k in changed)
                raise RunExistsError(
                    f"{what} {key.rsplit('/', 1)[1]!r} exists in {path} with other parameters or inputs ({diff}); "
                    "give another run name, or overwrite=True to replace it (the old run stays readable until the "
                    "new one is complete)"
                )
        parent, name = key.rsplit("/", 1)
        tmp_key = f"{parent}/{RUN_TMP}{name}-{os.getpid()}"
        g = root.create_group(tmp_key, overwrite=True)
        build(g)
        g.attrs["identity"] = identity
        mark_complete(g)
        swap_in(path / tmp_key, path / key)
        return True
