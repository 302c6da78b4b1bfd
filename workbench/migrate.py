"""Upgrade a layout-version-1 store to version 2 in place, crash-safely (``python -m workbench migrate STORE``).

Version 1 wrote zstd chunks without a checksum and kept no lineage. Migration builds the version-2 store
beside the old one (``<store>.migrating``: every array re-encoded through :func:`workbench.store.write_array`,
so it gets crc32c chunks and value digests; slides get their file identity; trees and samples get the
lineage of the store as it is now, samples their stable tile keys), fsyncs it, and then swaps the two
folders in one atomic ``renameat2(RENAME_EXCHANGE)`` (on filesystems without it: two renames, undone by
:func:`recover` if a kill falls between them). Until the swap the old store is untouched and usable; a
killed migration is completed by running it again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import zarr

from workbench import store as st
from workbench.errors import LayoutVersionError, StoreError

log = logging.getLogger(__name__)

MIGRATING, OLD = ".migrating", ".v1-old"


def _side(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def recover(path) -> None:
    """Undo what a migration killed between its two fallback renames left: put the old store back."""
    path = Path(path)
    old = _side(path, OLD)
    if old.is_dir():
        if not (path / "zarr.json").exists():
            if path.exists():
                shutil.rmtree(path)
            os.rename(old, path)
            log.warning("store %s: a killed migration was rolled back; run `python -m workbench migrate` again", path)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            except OSError:
                pass
        st.fsync_dir(Path(dirpath))


def _copy(src: zarr.Group, dst: zarr.Group) -> None:
    """Copy a v1 group into a v2 group: arrays re-encoded with checksums and digests, attrs last."""
    for name, arr in src.arrays():
        data = arr[...]
        rows = int(arr.chunks[0]) if arr.ndim else 1
        attrs = {k: v for k, v in dict(arr.attrs).items() if k != "complete"}
        new = st.write_array(dst, name, data, chunk_rows=rows, attrs=attrs)
        if arr.attrs.get("complete"):
            st.mark_complete(new)
    for name, sub in src.groups():
        _copy(sub, dst.require_group(name))
    attrs = dict(src.attrs)
    complete = attrs.pop("complete", None)
    dst.attrs.update(attrs)
    if complete:
        st.mark_complete(dst)


def _add_lineage(path: Path) -> None:
    """Lineage for a freshly copied store: slide file identities, features' coords digests, and the trees'
    and samples' inputs as they are now (a v1 store refused a tree over another slide set; that check is
    redone first)."""
    from workbench.curate.cluster import FIT_PARAMS, lineage_digest, tree_lineage

    root = st.open_root(path, "a")
    ids = st.slide_ids(root)
    for s in ids:
        g = root[st.Key.slide(s)]
        p = g.attrs.get("path")
        if p and Path(p).exists() and "file_identity" not in g.attrs:
            g.attrs["file_identity"] = st.file_identity(p)
        st.seal_attrs(g)
        coords_digest = st.array_digest_of(root[st.Key.coords(s)])
        if "features" in g:
            for _, arr in g["features"].arrays():
                arr.attrs["coords_digest"] = coords_digest
    for run in st.run_names(root, "tree"):
        g = root[st.Key.tree(run)]
        params = dict(g.attrs.get("parameters", {}))
        enc = params.get("encoder")
        if params.get("slide_ids_digest") not in (None, lineage_digest(ids)) or not enc:
            log.warning("tree %r was fitted on another slide set: left without lineage (load_tree refuses it)", run)
            g.attrs["lineage"] = {
                "encoder": enc or "?",
                "tiling_digest": "unknown (v1)",
                "features_digest": "?",
                "prefilter_digest": "?",
            }
            continue
        lineage = tree_lineage(root, enc)
        g.attrs["lineage"] = lineage
        g.attrs["identity"] = json.loads(
            json.dumps({**lineage, "params": {k: v for k, v in params.items() if k in FIT_PARAMS}}, sort_keys=True)
        )
    table = st.tile_index(root, ids)
    pos = {s: i for i, s in enumerate(ids)}
    tiling = st.tiling_digest(root, ids)
    for run in st.run_names(root, "samples"):
        g = root[st.Key.sample(run)]
        idx = g["indices"][:].astype(np.int64)
        if len(idx) and idx.max() >= len(table):
            log.warning("sample %r points past the store's tiles: left without lineage", run)
            continue
        rows = table.iloc[idx]
        st.write_array(g, "slide", rows["slide_id"].map(pos).to_numpy(np.int32))
        st.write_array(g, "xy", rows[["x", "y"]].to_numpy(np.int32).reshape(-1, 2))
        g.attrs["slide_ids"] = ids
        params = dict(g.attrs.get("parameters", {}))
        tree_run = params.get("tree_run")
        tree_digest = st.node_digest(root[st.Key.tree(tree_run)]) if tree_run in st.run_names(root, "tree") else None
        g.attrs["lineage"] = {"tree_run": tree_run, "tree_digest": tree_digest, "tiling_digest": tiling}


def migrate(path, *, _after_copy=None) -> str:
    """Upgrade the store at ``path`` to the current layout in place; returns what was done.

    Crash-safe: the old store stays complete until one atomic swap; re-running after a kill completes it.
    """
    path = st.as_path(path)
    recover(path)
    if not (path / "zarr.json").exists():
        raise StoreError(f"{path} is not a workbench store (no zarr.json)")
    with st.write_lock(path):
        version = json.loads((path / "zarr.json").read_text()).get("attributes", {}).get("layout_version")
        if version == st.LAYOUT_VERSION:
            shutil.rmtree(_side(path, MIGRATING), ignore_errors=True)
            return f"store {path} already has layout version {version}: nothing to do"
        if version != 1:
            raise LayoutVersionError(
                f"store {path} has layout version {version!r}: no migration to {st.LAYOUT_VERSION} from it"
            )
        tmp = _side(path, MIGRATING)
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed earlier attempt left
        src = zarr.open_group(str(path), mode="r", zarr_format=3)
        attrs = {**dict(src.attrs), "layout_version": st.LAYOUT_VERSION, "migrated_from": 1}
        dst = zarr.create_group(str(tmp), zarr_format=3, attributes={"layout_version": 0})  # not a store until done
        for name, sub in src.groups():
            _copy(sub, dst.require_group(name))
        for name, arr in src.arrays():
            st.write_array(dst, name, arr[...], attrs=dict(arr.attrs))
        dst.attrs.update(attrs)
        _add_lineage(tmp)
        if _after_copy is not None:
            _after_copy()
        _fsync_tree(tmp)
        if st.renameat2_exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old v1 store
        else:
            old = _side(path, OLD)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        st.fsync_dir(path.parent)
    return f"store {path} migrated from layout version 1 to {st.LAYOUT_VERSION} (indexes next to it must be rebuilt)"
