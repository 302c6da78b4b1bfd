"""One dataset, one truth: planted faults must raise a named error or be refused, never give other numbers.

Each test plants one fault in a copy of a small real store (four JPEG-tiled TIFF slides, tiled and
embedded with the hand-crafted encoder) and checks what the workbench now does with it, and that
``python -m workbench verify`` finds it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from reliability_helpers import (
    ROOT,
    he_image,
    make_slides,
    run_and_kill,
    time_child,
    write_slide_tiff,
)

import workbench
from workbench import store as st
from workbench.errors import (
    ChecksumError,
    LayoutVersionError,
    MissingChunkError,
    RunExistsError,
    StaleError,
    StaleIndexError,
)

ENC = "stain-texture"
TREE = dict(levels=[6, 2], backend="torch", device="cpu", random_state=0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(slides folder, manifest, tiled + embedded store) shared read-only by the tests (copy to modify)."""
    from workbench.features.embed import embed_slides
    from workbench.io.tiling import tile_slides

    d = tmp_path_factory.mktemp("integrity")
    man = make_slides(d / "slides", n=4, size=2048)
    store = d / "ds.zarr"
    assert (tile_slides(man, store, progress=False).status == "tiled").all()
    assert (embed_slides(store, ENC, num_workers=0, progress=False).status == "embedded").all()
    return d / "slides", man, store


def copy_store(base, tmp_path) -> Path:
    dst = tmp_path / "ds.zarr"
    shutil.copytree(base[2], dst)
    return dst


def chunk_file(store: Path, key: str) -> Path:
    files = sorted((store / key / "c").rglob("*"))
    files = [f for f in files if f.is_file()]
    assert files, key
    return files[0]


def faults(store) -> pd.DataFrame:
    from workbench.dataset import verify

    t = verify(store)
    return t[t.status != "ok"]


def cli_verify(store) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "workbench", "verify", str(store)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=300,
    )


# --------------------------------------------------------------------------- checksums and missing chunks


def test_clean_store_verifies_and_prints_its_lineage(base, tmp_path):
    store = copy_store(base, tmp_path)
    from workbench.curate.cluster import fit_store
    from workbench.curate.sample import sample_store

    ds = workbench.open_dataset(store)
    fit_store(ds, ENC, "a", **TREE)
    sample_store(ds, "a", "s", 30)
    text = repr(ds)
    assert "4 slides" in text and f"features  {ENC}" in text and "tree      a: levels=[6, 2]" in text
    assert "sample    s: 30 of n=30" in text and "[ok]" in text
    assert len(faults(store)) == 0
    out = cli_verify(store)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 fault(s)" in out.stdout


def test_bit_flip_in_features_chunk_raises_checksum_error_naming_slide_and_array(base, tmp_path):
    from workbench.search.retrieval import build_store_index

    store = copy_store(base, tmp_path)
    f = chunk_file(store, st.Key.features("r2", ENC))
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # one bit in the middle of the compressed chunk
    f.write_bytes(bytes(raw))
    ds = workbench.open_dataset(store)
    with pytest.raises(ChecksumError, match=r"slide 'r2', array 'features/stain-texture'"):
        ds.root[st.Key.features("r2", ENC)][:]
    with pytest.raises(ChecksumError, match="r2"):
        ds.features(ENC).compute()  # the Dask path too
    with pytest.raises(ChecksumError, match="r2"):
        build_store_index(store, ENC, "flat", save=False)
    np.testing.assert_array_equal(ds.root[st.Key.features("r1", ENC)][:].shape[0], ds.coords("r1").shape[0])
    bad = faults(store)
    assert len(bad) >= 1 and bad.node.str.contains("slides/r2/features").all()
    assert bad.detail.str.contains("checksum").any()
    out = cli_verify(store)
    assert out.returncode == 1 and "r2" in out.stdout


def test_bit_flip_in_coords_is_refused_too(base, tmp_path):
    store = copy_store(base, tmp_path)
    f = chunk_file(store, st.Key.coords("r0"))
    raw = bytearray(f.read_bytes())
    raw[5] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="slide 'r0', array 'coords'"):
        workbench.open_dataset(store).coords("r0")


def test_changed_slide_attributes_are_refused(base, tmp_path):
    """A flipped digit in a slide's zarr.json (its mpp, tile footprint or path) would read other pixels."""
    store = copy_store(base, tmp_path)
    meta_path = store / st.Key.slide("r1") / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["size0"] += 2
    meta_path.write_text(json.dumps(meta))
    ds = workbench.open_dataset(store)
    with pytest.raises(ChecksumError, match="slide 'r1': its attributes"):
        ds.slide("r1")
    with pytest.raises(ChecksumError, match="slide 'r1'"):
        ds.open_slide("r1")
    assert (faults(store).check == "attributes").any()


def test_deleted_chunk_is_an_error_not_zeros(base, tmp_path):
    from workbench.curate.cluster import fit_store

    store = copy_store(base, tmp_path)
    chunk_file(store, st.Key.features("r1", ENC)).unlink()
    ds = workbench.open_dataset(store)
    with pytest.raises(MissingChunkError, match=r"slide 'r1', array 'features/stain-texture'.*missing"):
        ds.root[st.Key.features("r1", ENC)][:]
    with pytest.raises(MissingChunkError):
        fit_store(store, ENC, "t", **TREE)
    bad = faults(store)
    assert bad.node.str.contains("slides/r1/features").any() and bad.detail.str.contains("missing").any()
    # a deleted coords chunk too (the array that defines the tiles)
    chunk_file(store, st.Key.coords("r3")).unlink()
    with pytest.raises(MissingChunkError, match="slide 'r3', array 'coords'"):
        workbench.open_dataset(store).coords("r3")
    assert cli_verify(store).returncode == 1


# --------------------------------------------------------------------------- lineage


def test_features_rewritten_in_place_make_index_and_tree_stale(base, tmp_path):
    from workbench.curate.cluster import fit_store, load_tree
    from workbench.search.retrieval import build_store_index, load_store_index

    store = copy_store(base, tmp_path)
    fit_store(store, ENC, "a", **TREE)
    build_store_index(store, ENC, "flat")
    load_store_index(store, ENC, "flat")  # fresh: loads
    # rewrite r1's features in place with zarr itself (bypassing the workbench: attrs untouched)
    arr = zarr.open_array(str(store / st.Key.features("r1", ENC)), mode="r+")
    vals = arr[:]
    arr[:] = vals[::-1].copy()  # the same numbers on other rows: every stored checksum stays valid
    with pytest.raises(StaleIndexError, match=r"slide 'r1'.*rewritten"):
        load_store_index(store, ENC, "flat")
    with pytest.raises(StaleError, match="r1"):
        load_tree(store, "a")
    bad = faults(store)
    assert bad.detail.str.contains("rewritten").any()
    assert (bad.node == "stain-texture-flat.faiss").any() and (bad.node == "tree/a").any()


def test_corrupted_index_file_is_refused(base, tmp_path):
    from workbench.errors import ChecksumError
    from workbench.search.retrieval import (
        build_store_index,
        index_path,
        load_store_index,
    )

    store = copy_store(base, tmp_path)
    build_store_index(store, ENC, "flat")
    path = index_path(store, ENC, "flat")
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x01  # one bit of one stored vector
    path.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="fails its sha256"):
        load_store_index(store, ENC, "flat")
    assert (faults(store).node == "stain-texture-flat.faiss").any()


def test_features_rewritten_through_the_store_api_make_the_index_stale(base, tmp_path):
    from workbench.search.retrieval import build_store_index, load_store_index

    store = copy_store(base, tmp_path)
    build_store_index(store, ENC, "flat")
    root = st.open_store(store, mode="a")
    a = root[st.Key.features("r3", ENC)]
    attrs = dict(a.attrs)
    vals = a[:]
    vals[0] += 1
    new = st.write_array(
        root[f"{st.Key.slide('r3')}/features"],
        a.basename,
        vals,
        attrs={k: v for k, v in attrs.items() if not k.startswith("wb_") and k != "digest"},
    )
    assert new.attrs["digest"] != attrs["digest"]
    with pytest.raises(StaleIndexError, match="rebuild"):
        load_store_index(store, ENC, "flat")


def test_new_patient_ids_make_the_saved_index_stale(base, tmp_path):
    """The index keeps each row's patient for leave-one-patient-out search: a manifest that regroups slides
    must not leave it excluding the old patients."""
    from workbench.io.tiling import tile_slides
    from workbench.search.retrieval import build_store_index, load_store_index

    store = copy_store(base, tmp_path)
    build_store_index(store, ENC, "flat")
    man = base[1].copy()
    man.loc[man.slide_id == "r2", "patient_id"] = "p0"
    tile_slides(man, store, progress=False)
    with pytest.raises(StaleIndexError, match="rebuild"):
        load_store_index(store, ENC, "flat")


def test_reordered_manifest_keeps_every_tile_id_and_sample(base, tmp_path):
    from workbench.curate.cluster import fit_store, load_tree
    from workbench.curate.sample import load_sample, sample_store
    from workbench.io.tiling import tile_slides

    store = copy_store(base, tmp_path)
    man = base[1]
    fit_store(store, ENC, "a", **TREE)
    idx = sample_store(store, "a", "s", 40, random_state=1)
    table = st.tile_index(st.open_store(store))
    keys = table.iloc[idx][["slide_id", "x", "y"]].to_numpy().tolist()
    labels = load_tree(store, "a").labels
    tile_slides(man.iloc[::-1].reset_index(drop=True), store, progress=False)  # same slides, reversed
    assert workbench.open_dataset(store).slide_ids == ["r0", "r1", "r2", "r3"]
    idx2 = load_sample(store, "s")
    table2 = st.tile_index(st.open_store(store))
    assert table2.iloc[idx2][["slide_id", "x", "y"]].to_numpy().tolist() == keys
    np.testing.assert_array_equal(load_tree(store, "a").labels, labels)
    # a manifest without r0: global ids move, so the tree is stale and the sample refuses by default,
    # and re-derives the same tiles from its keys when asked for the tiles alone
    tile_slides(man.iloc[[3, 1, 2]].reset_index(drop=True), store, progress=False)
    with pytest.raises(StaleError, match="tiles"):
        load_tree(store, "a")
    with pytest.raises(StaleError, match="tree 'a'"):
        load_sample(store, "s")
    rest = [k for k in keys if k[0] != "r0"]
    if len(rest) == len(keys):  # no sampled tile on r0: all are re-derived
        idx3 = load_sample(store, "s", check_tree=False)
        table3 = st.tile_index(st.open_store(store))
        assert table3.iloc[idx3][["slide_id", "x", "y"]].to_numpy().tolist() == keys
    else:
        with pytest.raises(StaleError, match="no longer exist"):
            load_sample(store, "s", check_tree=False)


def test_manifest_with_a_new_file_for_an_old_slide_id_is_refused(base, tmp_path):
    from workbench.io.tiling import tile_slides

    store = copy_store(base, tmp_path)
    man = base[1].copy()
    other = write_slide_tiff(tmp_path / "other.tiff", he_image(2048, 99))
    man.loc[man.slide_id == "r2", "path"] = str(other)
    with pytest.raises(StaleError, match=r"slide 'r2' was tiled from .*another file"):
        tile_slides(man, store, progress=False)
    # the same file under another path is accepted (moved, not changed)
    moved = tmp_path / "moved.tiff"
    shutil.copy2(base[1].loc[2, "path"], moved)
    man.loc[man.slide_id == "r2", "path"] = str(moved)
    out = tile_slides(man, store, progress=False)
    assert (out.status == "skipped").all()
    assert workbench.open_dataset(store).slide("r2")["path"] == str(moved)


def test_slide_file_replaced_after_tiling_embedding_refuses(base, tmp_path):
    from workbench.features.embed import embed_slides
    from workbench.io.tiling import tile_slides

    man = make_slides(tmp_path / "slides", n=2, size=2048, seed=5)
    store = tmp_path / "ds.zarr"
    tile_slides(man, store, progress=False)
    write_slide_tiff(man.loc[1, "path"], he_image(2048, 77))  # another slide written over r1's file
    with pytest.raises(StaleError, match=r"slide 'r1'.*changed since tiling"):
        embed_slides(store, ENC, num_workers=0, progress=False, on_error="raise")
    out = embed_slides(store, ENC, num_workers=0, progress=False)
    assert out.set_index("slide_id").loc["r1", "status"] == "error"
    assert out.set_index("slide_id").loc["r0", "status"] == "embedded"
    root = st.open_store(store)
    assert not st.is_complete(root, st.Key.features("r1", ENC))
    assert "changed since tiling" in st.error_table(root).set_index("slide_id").loc["r1", "error"]
    ds = workbench.open_dataset(store)
    with pytest.raises(StaleError):
        ds.open_slide("r1")
    assert ds.slides.set_index("slide_id").loc["r1", "file"] == "changed"
    assert faults(store).node.str.contains("slides/r1").any()


# --------------------------------------------------------------------------- named runs


def test_second_tree_run_with_other_params_leaves_the_first_intact(base, tmp_path):
    from workbench.curate.cluster import fit_store, load_tree

    store = copy_store(base, tmp_path)
    t1 = fit_store(store, ENC, "a", **TREE)
    with pytest.raises(RunExistsError, match=r"tree .a. exists.*params.levels: \[6, 2\] -> \[8, 2\].*overwrite=True"):
        fit_store(store, ENC, "a", **{**TREE, "levels": [8, 2]})
    np.testing.assert_array_equal(load_tree(store, "a").labels, t1.labels)
    # unnamed runs are named from their parameters: other params -> another run, same params -> reused
    t2 = fit_store(store, ENC, **{**TREE, "levels": [8, 2]})
    t3 = fit_store(store, ENC, **{**TREE, "levels": [4, 2]})
    runs = workbench.open_dataset(store).trees
    assert len(runs) == 3 and (runs.status == "ok").all()
    assert t2.attrs["run"] != t3.attrs["run"]
    mtime = (store / "tree" / t2.attrs["run"] / "zarr.json").stat().st_mtime_ns
    again = fit_store(store, ENC, **{**TREE, "levels": [8, 2]})
    assert (store / "tree" / t2.attrs["run"] / "zarr.json").stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.labels, t2.labels)
    np.testing.assert_array_equal(load_tree(store, "a").labels, t1.labels)
    # replacing needs overwrite=True, and then the run holds the new tree
    t4 = fit_store(store, ENC, "a", overwrite=True, **{**TREE, "levels": [8, 2]})
    assert [len(c) for c in load_tree(store, "a").centroids] == [8, 2]
    np.testing.assert_array_equal(load_tree(store, "a").labels, t4.labels)


_OVERWRITE = """
import sys
from workbench.curate.cluster import fit_store
print("READY", flush=True)
fit_store(sys.argv[1] if len(sys.argv) > 1 else {store!r}, "stain-texture", "a", overwrite=True,
          levels=[8, 2], backend="torch", device="cpu", random_state=1, n_iter=200, resampling_steps=[3, 2])
"""


@pytest.mark.reliability
def test_sigkill_during_overwrite_leaves_the_old_or_new_run_readable(base, tmp_path):
    from workbench.curate.cluster import fit_store, load_tree

    store = copy_store(base, tmp_path)
    old = fit_store(store, ENC, "a", **TREE).labels
    script = _OVERWRITE.format(store=str(store))
    total = time_child(script)  # one full overwrite, to aim the kills inside it
    new = load_tree(store, "a").labels
    assert [len(c) for c in load_tree(store, "a").centroids] == [8, 2]
    fit_store(store, ENC, "a", overwrite=True, **TREE)  # back to the old tree
    seen = set()
    for frac in (0.3, 0.7, 0.95, 1.0):
        run_and_kill(script, total * frac)
        tree = load_tree(store, "a")  # never raises: the old or the new run is there, complete
        if np.array_equal(tree.labels, old):
            seen.add("old")
        else:
            np.testing.assert_array_equal(tree.labels, new)
            seen.add("new")
            fit_store(store, ENC, "a", overwrite=True, **TREE)
    assert "old" in seen
    assert len(faults(store)) == 0


def test_swap_killed_between_the_fallback_renames_keeps_the_old_run(base, tmp_path):
    """Filesystems without an atomic exchange use two renames; a kill between them is undone on read/write."""
    from workbench.curate.cluster import fit_store, load_tree

    store = copy_store(base, tmp_path)
    old = fit_store(store, ENC, "a", **TREE).labels
    os.rename(store / "tree" / "a", store / "tree" / f"{st.RUN_OLD}a")  # the state after the first rename
    np.testing.assert_array_equal(load_tree(store, "a").labels, old)  # readers fall back to it
    fit_store(store, ENC, "b", **TREE)  # the next writer restores it
    assert (store / "tree" / "a").is_dir() and not (store / "tree" / f"{st.RUN_OLD}a").exists()
    np.testing.assert_array_equal(load_tree(store, "a").labels, old)


def test_sample_runs_are_named_and_follow_their_tree(base, tmp_path):
    from workbench.curate.cluster import fit_store
    from workbench.curate.sample import load_sample, sample_store

    store = copy_store(base, tmp_path)
    fit_store(store, ENC, "a", **TREE)
    s1 = sample_store(store, "a", "s", 30, random_state=0)
    with pytest.raises(RunExistsError, match="sample 's'"):
        sample_store(store, "a", "s", 50, random_state=0)
    np.testing.assert_array_equal(load_sample(store, "s"), s1)
    fit_store(store, ENC, "a", overwrite=True, **{**TREE, "levels": [8, 2]})
    with pytest.raises(StaleError, match="replaced"):
        load_sample(store, "s")
    np.testing.assert_array_equal(load_sample(store, "s", check_tree=False), s1)


# --------------------------------------------------------------------------- layout version 1 and migrate


def downgrade_to_v1(src: Path, dst: Path) -> None:
    """Write ``src`` as a layout-version-1 store would have been: plain zstd, no checksums, no lineage."""
    from zarr.codecs import ZstdCodec

    shutil.rmtree(dst, ignore_errors=True)
    s = zarr.open_group(str(src), mode="r")
    attrs = {**dict(s.attrs), "layout_version": 1}
    d = zarr.create_group(str(dst), zarr_format=3, attributes=attrs)
    drop = {
        st.WRITTEN,
        "wb_sha256",
        "wb_crc32c",
        "digest",
        "coords_digest",
        "file_identity",
        "manifest_path",
        "lineage",
        "identity",
    }

    def copy(sg, dg):
        for name, arr in sg.arrays():
            data = arr[...]
            rows = max(1, min(65536, len(data)))
            a = dg.create_array(
                name,
                shape=data.shape,
                dtype=data.dtype,
                chunks=(rows,) + data.shape[1:],
                compressors=[ZstdCodec(level=0)],
            )
            if data.size:
                a[...] = data
            a.attrs.update({k: v for k, v in arr.attrs.items() if k not in drop})
        for name, sub in sg.groups():
            copy(sub, dg.require_group(name))
        dg.attrs.update({k: v for k, v in sub_attrs(sg).items() if k not in drop})

    def sub_attrs(g):
        return dict(g.attrs)

    copy(s, d)
    meta = json.loads((dst / "zarr.json").read_text())
    meta["attributes"] = {
        **meta["attributes"],
        "layout_version": 1,
    }  # (zarr keeps and mutates the attrs dict it was given)
    (dst / "zarr.json").write_text(json.dumps(meta))


def _arrays(path) -> dict:
    g = zarr.open_group(str(path), mode="r")
    out = {}

    def walk(g, prefix=""):
        for n, a in g.arrays():
            out[prefix + n] = a[...]
        for n, sub in g.groups():
            walk(sub, prefix + n + "/")

    walk(g)
    return out


_MIGRATE = """
import sys
from workbench.migrate import migrate
print("READY", flush=True)
migrate({store!r})
"""


@pytest.mark.reliability
def test_v1_store_is_refused_by_name_and_migrate_survives_sigkill(base, tmp_path):
    from workbench.curate.cluster import fit_store, load_tree
    from workbench.curate.sample import load_sample, sample_store

    src = copy_store(base, tmp_path)
    fit_store(src, ENC, "a", **TREE)
    sample_store(src, "a", "s", 25)
    v1 = tmp_path / "v1.zarr"
    downgrade_to_v1(src, v1)
    before = {k: v for k, v in _arrays(v1).items()}
    with pytest.raises(LayoutVersionError, match=r"python -m workbench migrate"):
        workbench.open_dataset(v1)
    script = _MIGRATE.format(store=str(v1))
    total = time_child(script)
    downgrade_to_v1(src, v1)
    for frac in (0.2, 0.5, 0.8, 0.95):
        run_and_kill(script, total * frac)
        # the store is whole: still v1 (old, untouched, usable) or already v2
        try:
            ds = workbench.open_dataset(v1)
        except LayoutVersionError:
            now = _arrays(v1)
            assert set(now) == set(before)
            for k in before:
                np.testing.assert_array_equal(now[k], before[k])
        else:
            assert ds.root.attrs["layout_version"] == 2
            downgrade_to_v1(src, v1)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "workbench", "migrate", str(v1)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert not Path(str(v1) + ".migrating").exists()
    ds = workbench.open_dataset(v1)
    assert ds.root.attrs["layout_version"] == 2
    after = _arrays(v1)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    np.testing.assert_array_equal(load_tree(v1, "a").labels, load_tree(src, "a").labels)
    np.testing.assert_array_equal(load_sample(v1, "s"), load_sample(src, "s"))
    assert len(faults(v1)) == 0
    # and the migrated store has checksums: a flipped bit is caught
    f = chunk_file(v1, st.Key.features("r0", ENC))
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    f.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="slide 'r0'"):
        workbench.open_dataset(v1).features(ENC).compute()
