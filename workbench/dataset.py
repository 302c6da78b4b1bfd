"""The :class:`Dataset` handle: the one public door to a store.

>>> ds = workbench.open_dataset("runs/demo/demo.zarr")      # doctest: +SKIP
>>> print(ds)                                               # doctest: +SKIP
Dataset runs/demo/demo.zarr  (layout 2, 12 slides, 4,310 tiles)
  tiling    tile_px=224 tile_mpp=0.5 min_tissue=0.5   digest 3f2a9c01d2
  features  stain-texture (12 slides, d=64)            digest 81c0aa3e17
  trees     hkm-demo: levels=[32, 8] over stain-texture digest 5d0e...
  ...

Every stage function takes a Dataset or a path as its first argument (a Dataset is ``os.PathLike``: it
converts at the edge). The handle owns the names (:class:`workbench.store.Key`), the slides, tilings,
feature sets, trees, samples, indexes and the error table, and :meth:`Dataset.verify` walks every chunk
and every lineage link.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from workbench import store as st
from workbench.errors import IntegrityError, WorkbenchError

log = logging.getLogger(__name__)

__all__ = ["Dataset", "as_dataset", "open_dataset", "run_column", "verify"]


class Dataset:
    """A dataset store opened for reading (``mode="r"``) or writing (``"a"``); see the module docstring."""

    def __init__(self, path, mode: str = "r"):
        if mode not in ("r", "a"):
            raise st.StoreError(f"mode must be 'r' or 'a', not {mode!r}")
        self.path = st.as_path(path)
        self.mode = mode
        self.root = st.open_store(self.path, mode=mode)

    # ---- path-like: every stage function accepts a Dataset where it takes a store path
    def __fspath__(self) -> str:
        return str(self.path)

    # ---- group-like: functions that read an open store group (``root[key]``, ``root.attrs``) take a Dataset too
    def __getitem__(self, key):
        return self.root[key]

    def __contains__(self, key) -> bool:
        return key in self.root

    def __getattr__(self, name):
        if name in ("root", "path", "mode") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.root, name)  # attrs, store, groups(), arrays(), ...

    def reload(self) -> Dataset:
        """Re-open the store (after another process wrote to it)."""
        self.root = st.open_store(self.path, mode=self.mode)
        return self

    # ---- names and tables
    key = st.Key

    @property
    def slide_ids(self) -> list[str]:
        """Complete slides in store order (the order that defines global tile ids)."""
        return st.slide_ids(self.root)

    @property
    def manifest(self):
        import pandas as pd

        return pd.DataFrame(self.root.attrs.get("manifest", []))

    @property
    def tiling(self) -> dict:
        return dict(self.root.attrs.get("tiling", {}))

    def tiling_digest(self) -> str:
        return st.tiling_digest(self.root)

    @property
    def slides(self):
        """One row per slide: slide_id, path, mpp, n_tiles, complete, file (ok / changed / missing / not recorded)."""
        import pandas as pd

        rows = []
        for rec in self.root.attrs.get("manifest", []):
            sid = rec["slide_id"]
            key = st.Key.slide(sid)
            done = st.is_complete(self.root, key)
            a = dict(self.root[key].attrs) if done else {}
            change = st.identity_change(a.get("file_identity"), a.get("path", "")) if done else None
            rows.append(
                {
                    "slide_id": sid,
                    "path": a.get("path", rec.get("path")),
                    "mpp": a.get("mpp"),
                    "n_tiles": int(self.root[st.Key.coords(sid)].shape[0]) if done else 0,
                    "complete": done,
                    "file": ("changed" if change else "ok") if a.get("file_identity") else "not recorded",
                }
            )
        return pd.DataFrame(rows, columns=["slide_id", "path", "mpp", "n_tiles", "complete", "file"])

    def tile_counts(self) -> np.ndarray:
        return st.tile_counts(self.root)

    def tile_index(self):
        """global tile id -> slide_id, tile, x, y (DataFrame)."""
        return st.tile_index(self.root)

    def slide(self, slide_id: str) -> dict:
        """A complete slide's attrs with its coords and tissue arrays."""
        return st.read_slide(self.root, slide_id)

    def coords(self, slide_id: str) -> np.ndarray:
        return self.root[st.Key.coords(slide_id)][:]

    def mask(self, slide_id: str) -> np.ndarray:
        """The slide's tissue mask (at the slide's ``mask_downsample``)."""
        return self.root[f"{st.Key.slide(slide_id)}/mask"][:]

    def open_slide(self, slide_id: str):
        """Open a slide's file after checking it is the file that was tiled (:class:`StaleError` if not)."""
        from workbench.io.slides import open_slide

        a = st.check_slide_file(self.root, slide_id)
        return open_slide(a["path"], slide_id=slide_id, mpp=a.get("mpp"))

    def truth_path(self, slide_id: str) -> Path | None:
        """The ground-truth file of a synthetic slide (``<slide>.truth.npz``), or None."""
        return st.Key.truth(self.root[st.Key.slide(slide_id)].attrs["path"])

    def tile_columns(self, slide_id: str) -> list[str]:
        """Per-tile columns of a slide (tissue, qc, prefilter/<name>, tree/<run>/level_<l>, samples/<run>)."""
        from workbench.ui.napari._data import list_columns

        return list_columns(self.root, slide_id)

    def column(self, slide_id: str, name: str) -> np.ndarray:
        """(n,) values of one per-tile column for a slide's tiles (lineage-checked for trees and samples)."""
        from workbench.ui.napari._data import column_values

        return column_values(self.root, slide_id, name)

    # ---- feature sets
    def encoders(self) -> list[str]:
        """Encoders with complete features on at least one slide."""
        out = []
        for s in self.slide_ids:
            if st.Key.features_group(s) in self.root:
                for _, arr in self.root[st.Key.features_group(s)].arrays():
                    enc = arr.attrs.get("encoder")
                    if enc and arr.attrs.get("complete") and enc not in out:
                        out.append(enc)
        return out

    @property
    def feature_sets(self):
        import pandas as pd

        rows = []
        ids = self.slide_ids
        for enc in self.encoders():
            have = [s for s in ids if st.is_complete(self.root, st.Key.features(s, enc))]
            arr = self.root[st.Key.features(have[0], enc)]
            try:
                digest = st.features_digest(self.root, enc, have)[:10] if len(have) == len(ids) else "partial"
            except WorkbenchError as exc:
                digest = f"STALE: {type(exc).__name__}"
            rows.append(
                {
                    "encoder": enc,
                    "n_slides": len(have),
                    "dim": int(arr.shape[1]),
                    "weights_digest": str(arr.attrs.get("weights_digest"))[:10],
                    "digest": digest,
                }
            )
        return pd.DataFrame(rows, columns=["encoder", "n_slides", "dim", "weights_digest", "digest"])

    def features(self, encoder: str):
        """(N, d) lazy Dask array of one encoder's features over all slides (chunks checked on read)."""
        return st.features_array(self.root, encoder)

    def features_digest(self, encoder: str) -> str:
        return st.features_digest(self.root, encoder)

    # ---- runs
    def _runs(self, parent: str):
        import pandas as pd

        rows = []
        for run in st.run_names(self.root, parent):
            key = st.run_key(self.root, f"{parent}/{run}")
            g = self.root[key]
            p = dict(g.attrs.get("parameters", {}))
            status = "incomplete"
            if g.attrs.get("complete"):
                try:
                    self.tree(run) if parent == st.Key.TREES else self.sample(run)
                    status = "ok"
                except WorkbenchError as exc:
                    status = f"{type(exc).__name__}"
            lin = dict(g.attrs.get("lineage", {}))
            row = {"run": run, "status": status, "digest": st.node_digest(g)[:10]}
            if parent == st.Key.TREES:
                row.update(
                    {
                        "encoder": p.get("encoder"),
                        "levels": p.get("levels"),
                        "n_tiles": p.get("n_tiles"),
                        "features_digest": str(lin.get("features_digest"))[:10],
                    }
                )
            else:
                row.update(
                    {
                        "tree_run": p.get("tree_run"),
                        "n": p.get("n"),
                        "n_sampled": p.get("n_sampled"),
                        "strategy": p.get("strategy"),
                        "tree_digest": str(lin.get("tree_digest"))[:10],
                    }
                )
            rows.append(row)
        return pd.DataFrame(rows)

    @property
    def trees(self):
        """One row per tree run: run, status (ok / stale error), digest, encoder, levels, n_tiles, inputs."""
        return self._runs(st.Key.TREES)

    @property
    def samples(self):
        return self._runs(st.Key.SAMPLES)

    @property
    def runs(self):
        """Every named run (trees and samples) with its kind and status."""
        import pandas as pd

        t, s = self.trees, self.samples
        t.insert(0, "kind", "tree") if len(t) else None
        s.insert(0, "kind", "sample") if len(s) else None
        return pd.concat([t, s], ignore_index=True) if len(t) or len(s) else pd.DataFrame(columns=["kind", "run"])

    def tree(self, run: str):
        from workbench.curate.cluster import load_tree

        return load_tree(self, run)

    def sample(self, run: str, **kw) -> np.ndarray:
        from workbench.curate.sample import load_sample

        return load_sample(self, run, **kw)

    # ---- indexes
    @property
    def index_dir(self) -> Path:
        return st.Key.index_dir(self.path)

    @property
    def indexes(self):
        """Saved indexes (``<store>.indexes/``): encoder, kind, n, digest and whether it is fresh."""
        import pandas as pd

        rows = []
        for enc, kind, sidecar in _index_files(self):
            meta = json.loads(sidecar.read_text())
            status = "ok"
            try:
                from workbench.search.retrieval import features_digest, open_for_index

                _, table = open_for_index(self.path, enc)
                if features_digest(self.root, enc, list(table["slide_id"])) != meta.get("digest"):
                    status = "stale"
            except WorkbenchError as exc:
                status = f"stale ({type(exc).__name__})"
            rows.append(
                {
                    "encoder": enc,
                    "kind": kind,
                    "n": meta.get("n"),
                    "digest": str(meta.get("digest"))[:10],
                    "status": status,
                }
            )
        return pd.DataFrame(rows, columns=["encoder", "kind", "n", "digest", "status"])

    def index(self, encoder: str, kind: str = "flat", **kw):
        from workbench.search.retrieval import load_store_index

        return load_store_index(self, encoder, kind, **kw)

    # ---- errors
    @property
    def errors(self):
        return st.error_table(self.root)

    def verify(self, *, values: bool = True):
        """Walk every array, chunk and lineage link; returns the table (see :func:`verify`)."""
        return verify(self, values=values)

    def __repr__(self) -> str:
        lines = []
        counts = self.tile_counts() if self.slide_ids else np.zeros(0)
        lines.append(
            f"Dataset {self.path}  (layout {self.root.attrs.get('layout_version')}, "
            f"{len(self.slide_ids)} slides, {int(counts.sum()):,} tiles)"
        )
        t = self.tiling
        try:
            td = self.tiling_digest()[:10]
        except WorkbenchError as exc:
            td = type(exc).__name__
        lines.append(
            f"  tiling    tile_px={t.get('tile_px')} tile_mpp={t.get('tile_mpp')} "
            f"min_tissue={t.get('min_tissue')}  digest {td}"
        )
        for r in self.feature_sets.itertuples():
            lines.append(
                f"  features  {r.encoder}: {r.n_slides} slides, d={r.dim}, weights {r.weights_digest}  "
                f"digest {r.digest}"
            )
        for r in self.trees.itertuples():
            lines.append(
                f"  tree      {r.run}: levels={r.levels} over {r.encoder} ({r.n_tiles} tiles)  "
                f"digest {r.digest}  from features {r.features_digest}  [{r.status}]"
            )
        for r in self.samples.itertuples():
            lines.append(
                f"  sample    {r.run}: {r.n_sampled} of n={r.n} ({r.strategy}) from tree {r.tree_run}  "
                f"digest {r.digest}  [{r.status}]"
            )
        for r in self.indexes.itertuples():
            lines.append(f"  index     {r.encoder}-{r.kind}: {r.n} rows  digest {r.digest}  [{r.status}]")
        n_err = len(self.errors)
        if n_err:
            lines.append(f"  errors    {n_err} recorded (ds.errors)")
        return "\n".join(lines)


def open_dataset(path, mode: str = "r") -> Dataset:
    """Open a dataset store: ``ds = workbench.open_dataset("runs/demo/demo.zarr")``."""
    return Dataset(path, mode)


def as_dataset(x, mode: str = "r") -> Dataset:
    """``x`` if it is a Dataset, else the store at path ``x`` opened."""
    return x if isinstance(x, Dataset) else Dataset(x, mode)


def _index_files(ds: Dataset):
    """(encoder, kind, sidecar path) of each saved index next to the store."""
    if not ds.index_dir.is_dir():
        return []
    names = {}
    for s in ds.slide_ids:
        if st.Key.features_group(s) in ds.root:
            for name, arr in ds.root[st.Key.features_group(s)].arrays():
                names[name] = arr.attrs.get("encoder", name)
    out = []
    for sidecar in sorted(ds.index_dir.glob("*.json")):
        if sidecar.name.endswith(".sha256.json"):
            continue
        stem = sidecar.name[: -len(".json")]
        for key in sorted(names, key=len, reverse=True):
            if stem.startswith(key + "-"):
                out.append((names[key], stem[len(key) + 1 :], sidecar))
                break
    return out


def run_column(root, name: str):
    """The array behind a ``tree/<run>/level_<l>`` column ((N,) labels) or a ``samples/<run>`` column ((m,)
    global ids), after checking its lineage: a stale tree raises :class:`~workbench.errors.StaleError`, and a
    sample's ids are re-derived from its tile keys if the slides were re-tiled."""
    parts = name.split("/")
    if parts[0] == st.Key.TREES and len(parts) == 3:
        from workbench.curate.cluster import check_tree_lineage

        key = st.run_key(root, st.Key.tree(parts[1]))
        check_tree_lineage(root, parts[1], dict(root[key].attrs))
        return root[f"{key}/{parts[2]}"]
    if parts[0] == st.Key.SAMPLES and len(parts) == 2:
        key = st.run_key(root, st.Key.sample(parts[1]))
        if root[key].attrs.get("lineage"):
            from workbench.curate.sample import load_sample

            return load_sample(st.store_path(root), parts[1], check_tree=False)
        return root[f"{key}/indices"]
    raise KeyError(f"{name!r} is not a tree level (tree/<run>/level_<l>) or a sample (samples/<run>)")


# --------------------------------------------------------------------------- verify


def check_array(arr, rows: list, values: bool) -> None:
    path = arr.path
    what = st.describe_key(path)
    a = arr.attrs
    if st.WRITTEN not in a:
        rows.append(
            {
                "node": path,
                "check": "checksum",
                "status": "FAULT",
                "detail": f"{what}: written without checksums or digests (outside the workbench, or layout 1)",
            }
        )
        return
    keys = st.chunk_keys(arr)
    if a.get(st.WRITTEN) != len(keys):
        rows.append(
            {
                "node": path,
                "check": "chunks",
                "status": "FAULT",
                "detail": f"{what}: {len(keys)} chunks for a shape that was written with {a.get(st.WRITTEN)}",
            }
        )
        return
    want = a.get("wb_sha256", [])
    rows_per = int(arr.chunks[0]) if arr.ndim else 1
    faults = 0
    for i, key in enumerate(keys):
        try:
            block = arr[i * rows_per : (i + 1) * rows_per] if arr.ndim else arr[...]
        except IntegrityError as exc:
            rows.append({"node": path, "check": "chunk " + key, "status": "FAULT", "detail": str(exc)})
            faults += 1
            continue
        except Exception as exc:  # a chunk that cannot be decoded at all
            rows.append(
                {
                    "node": path,
                    "check": "chunk " + key,
                    "status": "FAULT",
                    "detail": f"{what}: chunk {key} cannot be decoded ({type(exc).__name__}: {exc})",
                }
            )
            faults += 1
            continue
        if values and i < len(want):
            if hashlib.sha256(np.ascontiguousarray(block).tobytes()).hexdigest() != want[i]:
                rows.append(
                    {
                        "node": path,
                        "check": "values " + key,
                        "status": "FAULT",
                        "detail": f"{what}: chunk {key} holds other values than were written (rewritten in "
                        "place); re-run the stage that writes it",
                    }
                )
                faults += 1
    if not faults:
        rows.append({"node": path, "check": "chunks", "status": "ok", "detail": f"{len(keys)} chunks"})


def _walk(group, rows, values):
    for name, arr in sorted(group.arrays(), key=lambda x: x[0]):
        if not name.startswith(st.RUN_TMP):
            check_array(arr, rows, values)
    for name, sub in sorted(group.groups(), key=lambda x: x[0]):
        if name.startswith(st.RUN_TMP):
            continue
        _walk(sub, rows, values)


def verify(store, *, values: bool = True):
    """Check a whole store: every chunk of every array (checksum, presence, and with ``values`` the sha256
    of its values against the one kept at write time) and every lineage link (slide files, features over
    their tiles, trees, samples, saved indexes). Returns a DataFrame: node, check, status (ok / FAULT), detail.
    """
    import pandas as pd

    path = st.as_path(store)
    rows: list[dict] = []
    try:
        ds = as_dataset(path)
    except WorkbenchError as exc:
        return pd.DataFrame([{"node": str(path), "check": "open", "status": "FAULT", "detail": str(exc)}])
    root = ds.root
    _walk(root, rows, values)
    ids = ds.slide_ids
    for rec in root.attrs.get("manifest", []):
        s = rec["slide_id"]
        key = st.Key.slide(s)
        if s not in ids:
            if key in root:
                rows.append(
                    {
                        "node": key,
                        "check": "complete",
                        "status": "FAULT",
                        "detail": f"slide {s!r} is incomplete: re-run tile_slides",
                    }
                )
            continue
        try:
            a = st.check_attrs(root[key], f"slide {s!r}")
        except IntegrityError as exc:
            rows.append({"node": key, "check": "attributes", "status": "FAULT", "detail": str(exc)})
            a = dict(root[key].attrs)
        for name in ("coords", "tissue"):
            if name not in root[key]:
                rows.append(
                    {
                        "node": f"{key}/{name}",
                        "check": "present",
                        "status": "FAULT",
                        "detail": f"slide {s!r}: array {name!r} is gone",
                    }
                )
        if "coords" not in root[key]:
            continue
        change = st.identity_change(a.get("file_identity"), a.get("path", ""))
        rows.append(
            {
                "node": key,
                "check": "slide file",
                "status": "FAULT" if change else "ok",
                "detail": change or ("same file as at tiling" if a.get("file_identity") else "not recorded"),
            }
        )
        cd = st.array_digest_of(root[st.Key.coords(s)])
        if st.Key.features_group(s) in root:
            for name, arr in root[st.Key.features_group(s)].arrays():
                if arr.attrs.get("complete") and arr.attrs.get("coords_digest") not in (None, cd):
                    rows.append(
                        {
                            "node": arr.path,
                            "check": "lineage",
                            "status": "FAULT",
                            "detail": f"slide {s!r}: features {name!r} were computed over other tiles; re-embed",
                        }
                    )
                elif arr.attrs.get("complete") and arr.shape[0] != root[st.Key.coords(s)].shape[0]:
                    rows.append(
                        {
                            "node": arr.path,
                            "check": "lineage",
                            "status": "FAULT",
                            "detail": f"slide {s!r}: {arr.shape[0]} feature rows for "
                            f"{root[st.Key.coords(s)].shape[0]} tiles; re-embed",
                        }
                    )
    for parent, load in ((st.Key.TREES, ds.tree), (st.Key.SAMPLES, ds.sample)):
        for run in st.run_names(root, parent):
            node = f"{parent}/{run}"
            try:
                load(run)
                rows.append({"node": node, "check": "lineage", "status": "ok", "detail": "inputs unchanged"})
            except WorkbenchError as exc:
                rows.append({"node": node, "check": "lineage", "status": "FAULT", "detail": str(exc)})
    for enc, kind, sidecar in _index_files(ds):
        node = str(sidecar.with_suffix(".faiss").name)
        try:
            ds.index(enc, kind, use_gpu=False)
            rows.append({"node": node, "check": "lineage", "status": "ok", "detail": "built from the current features"})
        except (WorkbenchError, OSError, ValueError, RuntimeError) as exc:
            rows.append({"node": node, "check": "lineage", "status": "FAULT", "detail": str(exc)})
    return pd.DataFrame(rows, columns=["node", "check", "status", "detail"])
