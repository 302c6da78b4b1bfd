"""Reliability suite (issue 7): bad inputs, killed runs, dying workers, concurrent writers, full disks,
non-finite embeddings and unsafe files, across the pipeline.

Every bad input must give a clear error or a recorded skip that names the slide; every fault must leave a
store that a re-run completes, with outputs byte-identical to a clean run's. The default tier is fast;
``-m slow`` adds 20 more SIGKILLs. ``make reliability`` runs every tier of this file.

Cases that need a stage that has not landed yet (``workbench.features.embed``, ``workbench.features.prefilter``,
``workbench.curate.sample``) skip with a reason that names the missing module.
"""

from __future__ import annotations

import ast
import errno
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import zarr
from conftest import SHARED_DATA
from reliability_helpers import (
    PYTHON,
    ROOT,
    corrupt_tiles,
    he_image,
    make_slides,
    run_and_kill,
    store_arrays,
    time_child,
    write_slide_tiff,
)

from workbench import store as st
from workbench.io.manifest import ManifestError, read_manifest
from workbench.io.slides import SlideError, TileReader, open_slide
from workbench.io.tiling import tile_slides

pytestmark = pytest.mark.reliability

N_SLIDES = 6
IDS = [f"r{i}" for i in range(N_SLIDES)]
PACKAGE = ROOT / "workbench"


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _skip_unless(module: str, what: str):
    if not _has(module):
        pytest.skip(f"{module} has not landed yet: {what}")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def rel_set(tmp_path_factory):
    """Six 2048² tissue slides at 0.5 mpp (about 20–45 tiles each) and their manifest file."""
    d = tmp_path_factory.mktemp("rel_slides")
    df = make_slides(d, n=N_SLIDES)
    df.to_csv(d / "manifest.csv", index=False)
    return SimpleNamespace(df=df, dir=d, manifest=d / "manifest.csv")


def _chunk_files(path: Path, ids) -> dict:
    """Raw bytes of every file of each slide's coords and tissue arrays (metadata and chunks)."""
    out = {}
    for sid in ids:
        for name in ("coords", "tissue"):
            base = path / "slides" / sid / name
            for f in sorted(base.rglob("*")):
                if f.is_file():
                    out[str(f.relative_to(path))] = f.read_bytes()
    return out


@pytest.fixture(scope="module")
def clean(rel_set, tmp_path_factory):
    """A clean, uninterrupted tiling run: the reference every faulty run is compared with."""
    path = tmp_path_factory.mktemp("clean") / "clean.zarr"
    t0 = time.perf_counter()
    summary = tile_slides(rel_set.manifest, path, progress=False)
    seconds = time.perf_counter() - t0
    assert (summary.status == "tiled").all(), summary
    arrays = store_arrays(path, IDS)
    assert set(arrays) == set(IDS)
    counts = [len(np.frombuffer(arrays[s][0], np.int32)) // 2 for s in IDS]
    assert min(counts) >= 5, counts
    return SimpleNamespace(path=path, arrays=arrays, files=_chunk_files(path, IDS), seconds=seconds, counts=counts)


def assert_matches_clean(path: Path, clean, *, require_all: bool = True) -> int:
    """Every complete slide equals the clean run byte for byte; returns the number of complete slides."""
    got = store_arrays(path, IDS)
    for sid, (coords, tissue) in got.items():
        assert coords == clean.arrays[sid][0], f"slide {sid} is marked complete with coords that differ"
        assert tissue == clean.arrays[sid][1], f"slide {sid} is marked complete with tissue that differs"
    if require_all:
        assert set(got) == set(IDS), f"incomplete slides: {set(IDS) - set(got)}"
        files = _chunk_files(path, IDS)
        assert files.keys() == clean.files.keys()
        diff = [k for k in files if files[k] != clean.files[k]]
        assert not diff, f"stored files differ from the clean run: {diff[:5]}"
    return len(got)


# =========================================================================== manifests
# tests/test_manifest.py covers: missing columns, duplicate ids, missing paths, a directory as a path, an
# empty slide file, mpp 0 / negative / text, bad slide ids, non-UTF-8 CSV, a missing manifest. Here: what
# it leaves out, and what tiling does with a bad manifest.


def test_manifest_that_is_a_directory(tmp_path):
    (tmp_path / "m.csv").mkdir()
    with pytest.raises(ManifestError, match=r"m\.csv is a directory"):
        read_manifest(tmp_path / "m.csv")


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "is empty"),
        (b'slide_id,path\na,"a.svs\n', "not a readable CSV"),
        (b"slide_id;path\na;a.svs\n", r"lacks required column\(s\) \['slide_id', 'path'\]"),
        ("slide_id,path\nsl\xeff,a.svs\n".encode("cp1252"), "not UTF-8"),
        (b"slide_id,path,mpp\na,a.svs,inf\n", r"'a'\) mpp: in_range"),
        (b"slide_id,path,mpp\na,a.svs,0.5um\n", "not a number: '0.5um'"),
        (b"slide_id,path\na,a.svs\n a ,a.svs\n", r"'a'\) slide_id: field_uniqueness"),  # equal after stripping
    ],
)
def test_bad_manifest_csv(tmp_path, content, match):
    (tmp_path / "a.svs").write_bytes(b"x")
    p = tmp_path / "m.csv"
    p.write_bytes(content)
    with pytest.raises(ManifestError, match=match):
        read_manifest(p)


def test_utf8_bom_manifest_reads(tmp_path):
    """Spreadsheet exports start with a byte-order mark; the first column must still be 'slide_id'."""
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "m.csv").write_bytes("\ufeffslide_id,path,mpp\na,a.svs,0.25\n".encode())
    df = read_manifest(tmp_path / "m.csv")
    assert df.slide_id.tolist() == ["a"] and df.mpp[0] == 0.25


@pytest.mark.parametrize(
    "frame, match",
    [
        (
            pd.DataFrame({"slide_id": ["a", "a"], "path": ["a.svs", "a.svs"]}),
            r"slide_id 'a'\) slide_id: field_uniqueness",
        ),
        (pd.DataFrame({"slide_id": ["a"], "file": ["a.svs"]}), r"lacks required column\(s\) \['path'\]"),
        (pd.DataFrame({"slide_id": ["a"], "path": ["a.svs"], "mpp": ["fast"]}), "not a number: 'fast'"),
        (pd.DataFrame({"slide_id": ["a"], "path": ["a.svs"], "mpp": [-0.25]}), r"'a'\) mpp: in_range"),
    ],
)
def test_bad_parquet_manifest(tmp_path, frame, match):
    (tmp_path / "a.svs").write_bytes(b"x")
    frame.to_parquet(tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=match):
        read_manifest(tmp_path / "m.parquet")


def test_corrupt_parquet_manifest(tmp_path):
    (tmp_path / "m.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        read_manifest(tmp_path / "m.parquet")


def test_tiling_refuses_bad_manifest_before_writing(rel_set, tmp_path):
    """Missing / empty / directory paths and a zero mpp are listed at once, by slide, and nothing is created."""
    (tmp_path / "zero.tiff").write_bytes(b"")
    (tmp_path / "folder.tiff").mkdir()
    df = pd.concat(
        [
            rel_set.df.iloc[:2],
            pd.DataFrame(
                {
                    "slide_id": ["gone", "zero", "folder", "badmpp"],
                    "path": [
                        str(tmp_path / "gone.tiff"),
                        str(tmp_path / "zero.tiff"),
                        str(tmp_path / "folder.tiff"),
                        rel_set.df.path[0],
                    ],
                    "mpp": [None, None, None, 0.0],
                }
            ),
        ],
        ignore_index=True,
    )
    with pytest.raises(ManifestError) as info:
        tile_slides(df, tmp_path / "s.zarr", progress=False)
    msg = str(info.value)
    for needle in ["'gone'", "does not exist", "'zero'", "empty", "'folder'", "directory", "'badmpp'"]:
        assert needle in msg, (needle, msg)
    assert not (tmp_path / "s.zarr").exists()


# =========================================================================== slide files


@pytest.fixture(scope="module")
def bad_batch(rel_set, tmp_path_factory):
    """One tiling run over two good slides and every kind of bad slide file (on_error='skip')."""
    import cv2

    d = tmp_path_factory.mktemp("bad_slides")
    good = Path(rel_set.df.path[0]).read_bytes()
    rows = []

    def add(sid, path, mpp=None):
        rows.append({"slide_id": sid, "path": str(path), "mpp": mpp})

    add("good0", rel_set.df.path[0])
    (d / "half.tiff").write_bytes(good[: len(good) // 2])
    add("half", d / "half.tiff")
    (d / "ninety.tiff").write_bytes(good[: len(good) * 9 // 10])
    add("ninety", d / "ninety.tiff")
    (d / "text.svs").write_text("this is not an image\n" * 50)
    add("text", d / "text.svs")
    (d / "noise.tiff").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    add("noise", d / "noise.tiff")
    cv2.imwrite(str(d / "plain.png"), he_image(1024, 2)[..., ::-1])
    add("png", d / "plain.png")
    cv2.imwrite(str(d / "plain.jpg"), he_image(1024, 2)[..., ::-1])
    add("jpg", d / "plain.jpg", 0.5)
    add("pngmpp", d / "plain.png", 0.5)
    write_slide_tiff(d / "nompp.tiff", he_image(1024, 2), mpp=None)
    add("nompp", d / "nompp.tiff")
    write_slide_tiff(d / "tiny.tiff", he_image(200, 1), tile=64)
    add("tiny", d / "tiny.tiff")
    write_slide_tiff(d / "white.tiff", he_image(2048, 1, "white"))
    add("white", d / "white.tiff")
    write_slide_tiff(d / "pen.tiff", he_image(2048, 1, "pen"))
    add("pen", d / "pen.tiff")
    add("good1", rel_set.df.path[1])
    df = pd.DataFrame(rows)
    path = d / "bad.zarr"
    summary = tile_slides(df, path, progress=False)
    root = st.open_store(path)
    return SimpleNamespace(
        summary=summary.set_index("slide_id"), errors=st.error_table(root).set_index("slide_id"), root=root, path=path
    )


UNREADABLE = "not a slide format OpenSlide can read"
BAD_SLIDES = [
    ("half", UNREADABLE),  # a valid pyramid cut in half
    ("ninety", UNREADABLE),  # cut at 90 %
    ("text", UNREADABLE),
    ("noise", UNREADABLE),
    ("png", UNREADABLE),  # a plain PNG: no pyramid, no mpp
    ("pngmpp", UNREADABLE),  # ... even with an mpp from the manifest
    ("jpg", UNREADABLE),
    ("nompp", "states no microns per pixel"),
]


@pytest.mark.parametrize("sid, match", BAD_SLIDES)
def test_bad_slide_file_recorded_by_name(bad_batch, sid, match):
    row = bad_batch.summary.loc[sid]
    assert row.status == "error" and row.n_tiles == 0
    err = bad_batch.errors.loc[sid]
    assert err.stage == "tile"
    assert f"slide {sid!r}" in err.error and match in err.error, err.error
    assert not st.is_complete(bad_batch.root, st.Key.slide(sid))


@pytest.mark.parametrize("sid", ["tiny", "white"])
def test_slide_without_tiles_is_complete_empty_and_recorded(bad_batch, sid):
    """Smaller than one tile / no tissue: a complete slide with 0 tiles, and a row in the error table."""
    assert bad_batch.summary.loc[sid].status == "empty"
    assert bad_batch.root[st.Key.coords(sid)].shape == (0, 2)
    assert st.is_complete(bad_batch.root, st.Key.slide(sid))
    assert "no tile has tissue" in bad_batch.errors.loc[sid].error


def test_good_slides_in_bad_batch_unaffected(bad_batch, clean):
    assert bad_batch.summary.loc["good0"].status == "tiled" and bad_batch.summary.loc["good1"].status == "tiled"
    for sid, ref in (("good0", "r0"), ("good1", "r1")):
        np.testing.assert_array_equal(
            bad_batch.root[st.Key.coords(sid)][:], np.frombuffer(clean.arrays[ref][0], np.int32).reshape(-1, 2)
        )
    assert set(bad_batch.errors.index) == {s for s, _ in BAD_SLIDES} | {"tiny", "white"}
    assert st.slide_ids(bad_batch.root)[:1] == ["good0"]


def test_bad_batch_on_error_raise_names_every_bad_slide(bad_batch, tmp_path):
    df = pd.DataFrame(
        {
            "slide_id": bad_batch.summary.index,
            "path": [str(p) for p in _manifest_paths(bad_batch)],
            "mpp": _manifest_mpps(bad_batch),
        }
    )
    with pytest.raises(SlideError) as info:
        tile_slides(df, tmp_path / "raise.zarr", progress=False, on_error="raise")
    for sid, _ in BAD_SLIDES:
        assert f"{sid}:" in str(info.value)
    # the good slides were still written before raising
    root = st.open_store(tmp_path / "raise.zarr")
    assert st.is_complete(root, st.Key.slide("good0")) and st.is_complete(root, st.Key.slide("good1"))


def _manifest_paths(batch):
    recs = {r["slide_id"]: r for r in batch.root.attrs["manifest"]}
    return [recs[s]["path"] for s in batch.summary.index]


def _manifest_mpps(batch):
    recs = {r["slide_id"]: r for r in batch.root.attrs["manifest"]}
    return [recs[s]["mpp"] for s in batch.summary.index]


def test_all_pen_slide_is_tiled_for_the_prefilter(bad_batch):
    """Pen ink is saturated like tissue: every grid tile is kept (the prefilter, not tiling, flags pen)."""
    assert bad_batch.summary.loc["pen"].status == "tiled"
    assert bad_batch.summary.loc["pen"].n_tiles == (2048 // 224) ** 2
    np.testing.assert_array_equal(bad_batch.root[st.Key.tissue("pen")][:], 1.0)


@pytest.fixture(scope="module")
def corrupt_slide(rel_set, clean, tmp_path_factory):
    """Slide r0 with two stored level-0 tiles under its tissue overwritten with garbage."""
    d = tmp_path_factory.mktemp("corrupt")
    path = d / "r0c.tiff"
    shutil.copy(rel_set.df.path[0], path)
    coords = np.frombuffer(clean.arrays["r0"][0], np.int32).reshape(-1, 2)
    mid = coords[len(coords) // 2]
    across = -(-2048 // 256)
    hit = int(mid[1] // 256 * across + mid[0] // 256)
    corrupt_tiles(path, [hit, hit + 1])
    far = coords[np.abs(coords // 256 - mid // 256).max(axis=1) >= 3]  # tiles that touch no corrupt block
    return SimpleNamespace(path=path, coords=coords, far=far)


def test_corrupt_tiles_tiling_still_matches(corrupt_slide, clean, tmp_path):
    """Tiling reads a coarser level, so it may succeed; its coords equal the intact slide's."""
    df = pd.DataFrame({"slide_id": ["r0c"], "path": [str(corrupt_slide.path)]})
    summary = tile_slides(df, tmp_path / "c.zarr", progress=False)
    assert summary.status[0] == "tiled"
    got = st.open_store(tmp_path / "c.zarr")[st.Key.coords("r0c")][:]
    assert got.tobytes() == clean.arrays["r0"][0]


@pytest.mark.parametrize("fast", [True, False], ids=["tiff-direct", "openslide"])
def test_corrupt_tiles_fail_reading_by_name(corrupt_slide, fast):
    with open_slide(corrupt_slide.path, slide_id="r0c") as s:
        reader = TileReader(s, fast=fast)
        assert reader.backend == ("tiff-direct" if fast else "openslide")
        if fast:  # tiles away from the damage still read
            assert len(corrupt_slide.far) > 0
            tiles = reader.read(corrupt_slide.far[:4])
            assert tiles.shape == (4, 224, 224, 3) and tiles.std() > 5
        with pytest.raises(SlideError, match=r"slide 'r0c' \(.*r0c\.tiff\).*(decoding stored tiles|reading region)"):
            reader.read(corrupt_slide.coords)
        reader.close()


# --------------------------------------------------------------------------- real broken files


@pytest.mark.realdata
def test_real_broken_fixtures_recorded(tmp_path):
    fixtures = SHARED_DATA / "openslide-fixtures"
    if not fixtures.is_dir():
        pytest.skip(f"{fixtures} not found")
    df = pd.DataFrame(
        {
            "slide_id": ["unreadable", "unopenable", "small"],
            "path": [str(fixtures / n) for n in ("unreadable.svs", "unopenable.tiff", "small.svs")],
        }
    )
    summary = tile_slides(df, tmp_path / "real.zarr", progress=False).set_index("slide_id")
    errors = st.error_table(st.open_store(tmp_path / "real.zarr")).set_index("slide_id")
    assert summary.loc["unreadable"].status == "error"
    assert "slide 'unreadable'" in errors.loc["unreadable"].error and "failed" in errors.loc["unreadable"].error
    assert summary.loc["unopenable"].status == "error"
    assert "OpenSlide cannot open it" in errors.loc["unopenable"].error
    assert summary.loc["small"].status == "empty"  # 16 × 16 px: smaller than one tile
    assert "no tile has tissue" in errors.loc["small"].error
    root = st.open_store(tmp_path / "real.zarr")
    assert not st.is_complete(root, st.Key.slide("unreadable")) and not st.is_complete(root, st.Key.slide("unopenable"))


@pytest.mark.realdata
@pytest.mark.parametrize("fast", [True, False], ids=["tiff-direct", "openslide"])
def test_real_unreadable_tiles_fail_by_name(fast):
    path = SHARED_DATA / "openslide-fixtures" / "unreadable.svs"
    if not path.exists():
        pytest.skip(f"{path} not found")
    with open_slide(path, slide_id="unreadable") as s:
        reader = TileReader(s, tile_px=16, tile_mpp=s.mpp, fast=fast)
        with pytest.raises(SlideError, match=r"slide 'unreadable' \(.*unreadable\.svs\)"):
            reader.read([[0, 0]])
        reader.close()


# =========================================================================== the store


def test_old_layout_store_is_refused_and_untouched(clean, rel_set, tmp_path):
    path = tmp_path / "old.zarr"
    shutil.copytree(clean.path, path)
    zarr.open_group(str(path), mode="a").attrs["layout_version"] = 0
    before = {str(f): f.read_bytes() for f in path.rglob("*") if f.is_file() and f.name != ".lock"}
    with pytest.raises(st.StoreError, match="layout version 0.*nothing was changed"):
        tile_slides(rel_set.manifest, path, progress=False)
    after = {str(f): f.read_bytes() for f in path.rglob("*") if f.is_file() and f.name != ".lock"}
    assert after == before


def test_folder_that_is_not_a_store_is_refused(rel_set, tmp_path):
    path = tmp_path / "mine.zarr"
    path.mkdir()
    (path / "notes.txt").write_text("not a store")
    with pytest.raises(st.StoreError, match="not a workbench store"):
        tile_slides(rel_set.manifest, path, progress=False)
    assert sorted(p.name for p in path.iterdir()) == [".lock", "notes.txt"]


@pytest.mark.parametrize("damage", ["no-complete", "array-metadata-gone", "chunks-gone", "empty-group", "root-only"])
def test_half_written_store_is_completed(clean, rel_set, tmp_path, damage):
    """The states a killed run can leave (attrs, arrays and chunks are each written atomically by zarr)."""
    path = tmp_path / "half.zarr"
    shutil.copytree(clean.path, path)
    root = zarr.open_group(str(path), mode="a")
    g = root[st.Key.slide("r3")]
    if damage == "no-complete":
        del g.attrs["complete"]
        root[st.Key.coords("r3")][:3] = 0
    elif damage == "array-metadata-gone":
        del g.attrs["complete"]
        (path / "slides" / "r3" / "tissue" / "zarr.json").unlink()
    elif damage == "chunks-gone":
        del g.attrs["complete"]
        shutil.rmtree(path / "slides" / "r3" / "coords" / "c")
    elif damage == "empty-group":
        root.create_group(st.Key.slide("r3"), overwrite=True)
    elif damage == "root-only":  # killed right after creating the store
        shutil.rmtree(path / "slides")
    summary = tile_slides(rel_set.manifest, path, progress=False)
    redone = {"r3"} if damage != "root-only" else set(IDS)
    assert set(summary.slide_id[summary.status == "tiled"]) == redone
    assert assert_matches_clean(path, clean) == N_SLIDES


def _store_set_failing(monkeypatch, store_dir: Path, key_part: str, value_part: bytes | None = None):
    """Make zarr's local store raise ENOSPC when writing a key containing ``key_part`` (once per key)."""
    from zarr.storage import LocalStore

    original = LocalStore.set
    hits = []

    async def failing_set(self, key, value):
        if (
            Path(str(self.root)).resolve() == store_dir.resolve()
            and key_part in key
            and (value_part is None or value_part in value.to_bytes())
        ):
            hits.append(key)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(store_dir / key))
        return await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", failing_set)
    return hits


@pytest.mark.parametrize(
    "key_part, value_part",
    [
        ("slides/r3/tissue/c", None),  # a chunk, mid-slide: coords written, tissue not
        ("slides/r3/mask/zarr.json", None),  # an array's metadata
        ("slides/r3/zarr.json", b'"complete": true'),  # the last write of the slide
    ],
    ids=["tissue-chunk", "mask-metadata", "complete-attr"],
)
def test_full_disk_mid_slide(clean, rel_set, tmp_path, monkeypatch, key_part, value_part):
    path = tmp_path / "full.zarr"
    hits = _store_set_failing(monkeypatch, path, key_part, value_part)
    with pytest.raises(st.StoreError, match=r"slide 'r3'.*No space left on device"):
        tile_slides(rel_set.manifest, path, progress=False, scheduler="synchronous")
    assert hits, "the simulated full disk was never hit"
    root = st.open_store(path)
    assert not st.is_complete(root, st.Key.slide("r3"))
    assert_matches_clean(path, clean, require_all=False)  # what is complete is right
    monkeypatch.undo()  # space freed
    summary = tile_slides(rel_set.manifest, path, progress=False)
    assert "r3" in set(summary.slide_id[summary.status == "tiled"])
    assert assert_matches_clean(path, clean) == N_SLIDES


def test_full_disk_on_error_table_raises(clean, rel_set, tmp_path, monkeypatch):
    """Recording a bad slide's error can itself hit the full disk: the run raises, slides stay right."""
    df = pd.concat(
        [rel_set.df.iloc[:2], pd.DataFrame({"slide_id": ["bad"], "path": [str(ROOT / "README.md")]})], ignore_index=True
    )
    path = tmp_path / "full.zarr"

    def full(root, record):  # the error table is an append-only file beside the Zarr nodes (issue 14)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(st._errors_path(root)))

    monkeypatch.setattr(st, "_append_error_line", full)
    with pytest.raises(OSError, match="No space left"):
        tile_slides(df, path, progress=False)
    monkeypatch.undo()
    summary = tile_slides(df, path, progress=False)
    assert summary.set_index("slide_id").status.to_dict() == {"r0": "skipped", "r1": "skipped", "bad": "error"}
    assert st.error_table(st.open_store(path)).slide_id.tolist() == ["bad"]


_HELD_TILER = """
import os, time
import workbench.io.tiling as tl
from workbench.io.tiling import tile_slides
orig, first = tl.tile_slide, []
def held(*a, **k):  # the first slide waits, lock held, until the test says go
    if not first:
        first.append(1)
        print("READY", flush=True)
        t0 = time.monotonic()
        while not os.path.exists({go!r}) and time.monotonic() - t0 < 120:
            time.sleep(0.05)
    return orig(*a, **k)
tl.tile_slide = held
tile_slides({manifest!r}, {store!r}, progress=False, num_workers=1)
print("DONE", flush=True)
"""

_PLAIN_TILER = """
from workbench.io.tiling import tile_slides
tile_slides({manifest!r}, {store!r}, progress=False)
"""


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_two_runs_at_once_second_refuses(clean, rel_set, tmp_path):
    """Two real processes on one store: the second is refused at once, naming the holder; no interleaving."""
    path = tmp_path / "shared.zarr"
    go = tmp_path / "go"
    first = subprocess.Popen(
        [PYTHON, "-c", _HELD_TILER.format(manifest=str(rel_set.manifest), store=str(path), go=str(go))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=str(ROOT),
    )
    try:
        assert "READY" in first.stdout.readline()  # holds the lock and is tiling
        t0 = time.monotonic()
        second = subprocess.run(
            [PYTHON, "-c", _PLAIN_TILER.format(manifest=str(rel_set.manifest), store=str(path))],
            capture_output=True,
            text=True,
            env=_env(),
            cwd=str(ROOT),
            timeout=120,
        )
        refused_after = time.monotonic() - t0
        assert second.returncode != 0
        assert "StoreError" in second.stderr and "being written by another run" in second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert first.poll() is None, "the first run ended before the second was refused: no overlap tested"
        go.touch()
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0 and "DONE" in out, err
    assert refused_after < 60
    assert assert_matches_clean(path, clean) == N_SLIDES
    assert st.error_table(st.open_store(path)).empty


def test_lock_released_when_holder_is_killed(tmp_path):
    path = tmp_path / "s.zarr"
    script = f"""
from workbench.store import write_lock
import time
with write_lock({str(path)!r}):
    print("READY", flush=True)
    time.sleep(60)
"""
    assert run_and_kill(script, 0.1) is None  # SIGKILLed while holding the lock
    with st.write_lock(path):  # the kernel released it: no stale lock
        pass


# =========================================================================== faults: SIGKILL during tiling

_KILL_TILER = """
import dask, dask.diagnostics, openslide, cv2  # lazy imports first, so timing starts at READY
from workbench.io.tiling import tile_slides
print("READY", flush=True)
tile_slides({manifest!r}, {store!r}, progress=False)
"""


@pytest.fixture(scope="module")
def tiling_window(rel_set, tmp_path_factory) -> float:
    """How long an uninterrupted tiling child runs after READY: kills are spread over this window."""
    path = tmp_path_factory.mktemp("calib") / "calib.zarr"
    return time_child(_KILL_TILER.format(manifest=str(rel_set.manifest), store=str(path)))


def _kill_and_resume(rel_set, clean, window, tmp_path, trial: int, n_trials: int, seed: int):
    """SIGKILL a tiling run at a random moment of stratum ``trial``, check what it left, re-run, compare."""
    rng = np.random.default_rng(seed)
    window = 1.1 * window
    delay = window * (trial + rng.uniform()) / n_trials
    path = tmp_path / f"kill{trial}.zarr"
    rc = run_and_kill(_KILL_TILER.format(manifest=str(rel_set.manifest), store=str(path)), delay)
    assert rc in (None, 0), f"child failed with exit code {rc}"
    n_complete = 0
    if (path / "zarr.json").exists():
        st.open_store(path)  # a killed run never leaves a root without its layout version
        n_complete = assert_matches_clean(path, clean, require_all=False)  # no complete slide with partial data
    print(f"tiling killed at {delay:.3f} s: exit {rc}, {n_complete} of {N_SLIDES} slides complete before the re-run")
    summary = tile_slides(rel_set.manifest, path, progress=False)
    assert set(summary.status) <= {"tiled", "skipped"}, summary
    assert (summary.status == "skipped").sum() == n_complete
    assert assert_matches_clean(path, clean) == N_SLIDES
    assert st.error_table(st.open_store(path)).empty


@pytest.mark.parametrize("trial", range(3))
def test_sigkill_tiling_then_resume(rel_set, clean, tiling_window, tmp_path, trial):
    _kill_and_resume(rel_set, clean, tiling_window, tmp_path, trial, 3, seed=trial)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(20))
def test_sigkill_tiling_then_resume_slow(rel_set, clean, tiling_window, tmp_path, trial):
    _kill_and_resume(rel_set, clean, tiling_window, tmp_path, trial, 20, seed=1000 + trial)


# =========================================================================== faults: a Dask worker dies


def _plant_worker_killer(marker: str, slide_id: str):
    """Run on every worker: the first worker to mark ``slide_id`` complete kills itself instead (once)."""
    import os

    import workbench.store as wst

    original = getattr(wst, "_original_mark_complete", wst.mark_complete)
    wst._original_mark_complete = original

    def mark_complete(node):
        if node.path.rstrip("/").endswith(f"slides/{slide_id}"):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)  # dies with the slide's arrays written, not marked complete
        original(node)

    wst.mark_complete = mark_complete
    return os.getpid()


@pytest.mark.slow  # a process LocalCluster costs 10-25 s on 2 cores
def test_dask_worker_death_is_retried(clean, rel_set, tmp_path):
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    marker = tmp_path / "killed-once"
    path = tmp_path / "dist.zarr"
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.CRITICAL
        ) as cluster,
        Client(cluster) as client,
    ):
        pids = client.run(_plant_worker_killer, str(marker), "r2")
        assert len(pids) == 2
        summary = tile_slides(rel_set.manifest, path, client=client, progress=False)
    assert marker.exists() and int(marker.read_text()) in pids.values(), "no worker was killed"
    # a result lost with the dead worker is recomputed too: the slide is then found complete ("skipped")
    assert set(summary.status) <= {"tiled", "skipped"} and summary.status.eq("tiled").any(), summary
    assert assert_matches_clean(path, clean) == N_SLIDES


# =========================================================================== determinism


def test_tiling_is_deterministic_across_schedulers(clean, rel_set, tmp_path):
    path = tmp_path / "again.zarr"
    tile_slides(rel_set.manifest, path, progress=False, scheduler="synchronous")
    assert assert_matches_clean(path, clean) == N_SLIDES
    a, b = zarr.open_group(str(clean.path), mode="r"), zarr.open_group(str(path), mode="r")
    for sid in IDS:
        np.testing.assert_array_equal(a[f"slides/{sid}/mask"][:], b[f"slides/{sid}/mask"][:])
        assert dict(a[st.Key.slide(sid)].attrs) == dict(b[st.Key.slide(sid)].attrs)


def test_synthetic_slides_are_deterministic(tmp_path):
    _skip_unless("workbench.io.synthetic", "same seed must give identical slide files")
    from workbench.io.synthetic import make_slide

    for name in ("a", "b"):
        make_slide(tmp_path / f"{name}.tiff", width=1024, height=1024, seed=7, pen=True, blur=True)
    assert (tmp_path / "a.tiff").read_bytes() == (tmp_path / "b.tiff").read_bytes()


def _features_store(clean, tmp_path, encoder="rel-enc", bad_rows=None) -> Path:
    """A copy of the clean store with deterministic (n, 8) float16 features per slide (3 blobs)."""
    path = tmp_path / "feat.zarr"
    shutil.copytree(clean.path, path)
    root = st.open_store(path, mode="a")
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, size=(3, 8))
    offset = 0
    for sid in IDS:
        n = root[st.Key.coords(sid)].shape[0]
        x = centres[(np.arange(n) + offset) % 3] + rng.normal(0, 0.3, size=(n, 8))
        x = x.astype(np.float16)
        for (s, r), value in (bad_rows or {}).items():
            if s == sid:
                x[r] = value
        key = st.Key.features(sid, encoder)
        g = root.require_group(key.rsplit("/", 1)[0])
        arr = st.write_array(g, key.rsplit("/", 1)[1], x, attrs={"encoder": encoder, "weights_digest": "test"})
        st.mark_complete(arr)
        offset += n
    return path


def test_tree_and_sample_are_deterministic(clean, tmp_path):
    from workbench.curate.cluster import fit_store, load_tree

    path = _features_store(clean, tmp_path)
    params = dict(levels=[6, 3], resampling_steps=1, sample_per_cluster=3, random_state=5, backend="torch")
    fit_store(path, "rel-enc", "a", **params)
    fit_store(path, "rel-enc", "b", **params)
    a, b = load_tree(path, "a"), load_tree(path, "b")
    np.testing.assert_array_equal(a.labels, b.labels)
    for ca, cb in zip(a.centroids, b.centroids):
        np.testing.assert_array_equal(ca, cb)
    from workbench.curate.sample import HierarchicalSampler, sample_store

    n = len(a.labels) // 3
    s1 = sample_store(path, "a", "s1", n, random_state=3)
    s2 = sample_store(path, "b", "s2", n, random_state=3)
    np.testing.assert_array_equal(s1, s2)
    assert len(np.unique(s1)) == len(s1) and 0 < len(s1) <= n
    np.testing.assert_array_equal(HierarchicalSampler(n, random_state=3).fit_sample(a), s1)


# =========================================================================== non-finite embeddings

BAD_ROWS = {("r1", 0): np.nan, ("r1", 3): np.inf, ("r4", 2): -np.inf}


def test_nonfinite_embeddings_excluded_from_tree(clean, tmp_path, caplog):
    from workbench.curate.cluster import fit_store

    path = _features_store(clean, tmp_path, bad_rows=BAD_ROWS)
    offsets = dict(zip(IDS, np.concatenate([[0], np.cumsum(clean.counts)[:-1]])))
    bad = sorted(int(offsets[s] + r) for s, r in BAD_ROWS)
    with caplog.at_level(logging.WARNING, logger="workbench.curate.cluster"):
        tree = fit_store(path, "rel-enc", "nan", levels=[3, 2], random_state=0, backend="torch")
    assert any("3 of" in r.getMessage() and "NaN/Inf" in r.getMessage() for r in caplog.records), caplog.text
    assert (tree.labels[bad] == -1).all()
    good = np.setdiff1d(np.arange(len(tree.labels)), bad)
    assert (tree.labels[good] >= 0).all()
    assert all(np.isfinite(c).all() for c in tree.centroids)
    # the 3 blobs are found exactly, as if the bad rows were not there
    truth = (np.arange(len(tree.labels)) % 3)[good]
    pairs = set(zip(truth.tolist(), tree.labels[good, 0].tolist()))
    assert len(pairs) == 3


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_nonfinite_embeddings_excluded_from_index(kind, caplog):
    from workbench.search.retrieval import TileIndex

    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 16)).astype(np.float32)
    bad = [3, 7, 11]
    x[3], x[7, 2], x[11, 5] = np.nan, np.inf, -np.inf
    with caplog.at_level(logging.WARNING):
        index = TileIndex(kind, nlist=8, random_state=0).fit(x)
    assert "NaN" in caplog.text or "non-finite" in caplog.text, "non-finite rows were not reported"
    queries = rng.normal(size=(100, 16)).astype(np.float32)
    _, ids = index.search(queries, 50)
    assert not np.isin(ids, bad).any()
    assert (ids >= 0).all()
    assert index.nonfinite_rows_.tolist() == bad
    # the row-id map survives a save/load round trip
    with tempfile.TemporaryDirectory() as tmp:
        again = TileIndex.load(index.save(Path(tmp) / "x.faiss"))
        np.testing.assert_array_equal(again.search(queries, 50)[1], ids)


# =========================================================================== security of what we load


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "<expr>")  # x().eval() is not eval()
    return ".".join(reversed(parts))


def _unsafe_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        const = {k: v.value for k, v in kw.items() if isinstance(v, ast.Constant)}
        leaf = name.rsplit(".", 1)[-1]
        if name in ("os.system", "os.popen", "eval", "exec") or name.startswith(("os.exec", "os.spawn")):
            found.append(name)
        elif name.startswith("subprocess.") and "shell" in kw and const.get("shell") is not False:
            found.append(f"{name}(shell=...)")
        elif (
            name
            in (
                "pickle.load",
                "pickle.loads",
                "pickle.Unpickler",
                "cloudpickle.load",
                "cloudpickle.loads",
                "joblib.load",
                "dill.load",
                "dill.loads",
                "shelve.open",
            )
            or leaf == "read_pickle"
        ):
            found.append(name)
        elif leaf == "load" and name.split(".")[0] == "torch" and const.get("weights_only") is not True:
            found.append("torch.load without weights_only=True")
        elif name in ("np.load", "numpy.load") and const.get("allow_pickle", False) is not False:
            found.append("np.load(allow_pickle=True)")
    return found


def test_package_has_no_shell_and_no_unsafe_loads():
    """No shell (manifest paths are used as given), no pickle loads; torch.load only with weights_only=True."""
    bad = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        calls = _unsafe_calls(ast.parse(f.read_text(), filename=str(f)))
        if calls:
            bad[str(f.relative_to(ROOT))] = calls
    assert not bad, bad


def test_scanner_catches_what_it_should():
    src = (
        "import os, subprocess, torch, pickle, numpy as np\n"
        "os.system('x'); subprocess.run('x', shell=True); torch.load(p); pickle.loads(b)\n"
        "np.load(p, allow_pickle=True); torch.load(p, weights_only=True); subprocess.run(['ls'])\n"
    )
    assert _unsafe_calls(ast.parse(src)) == [
        "os.system",
        "subprocess.run(shell=...)",
        "torch.load without weights_only=True",
        "pickle.loads",
        "np.load(allow_pickle=True)",
    ]


def test_shell_metacharacters_in_paths_are_just_names(rel_set, tmp_path):
    """A slide whose file name is a shell command is tiled as a file; nothing is executed."""
    d = tmp_path / "sh"
    d.mkdir()
    name = "$(touch PWNED); `touch PWNED2` & echo 'x' | y.tiff"
    shutil.copy(rel_set.df.path[0], d / name)
    df = pd.DataFrame({"slide_id": ["weird"], "path": [str(d / name)]})
    summary = tile_slides(df, tmp_path / "s.zarr", progress=False)
    assert summary.status[0] == "tiled"
    assert not list(tmp_path.rglob("PWNED*")) and not list(ROOT.glob("PWNED*"))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))  # runs on unpickling if the loader is unsafe


@pytest.mark.parametrize("fmt", ["torch-zip", "raw-pickle"])
def test_malicious_checkpoint_in_weights_dir_is_refused(tmp_path, monkeypatch, fmt):
    """A pickle planted where the loader looks for a model on its own ($WORKBENCH_WEIGHTS_DIR) is refused."""
    import pickle

    import torch

    from workbench.features.encoders import WeightsError, get_encoder

    marker = str(tmp_path / "code-ran")
    path = tmp_path / "weights" / "timm-vit_tiny_patch16_224.pth"
    path.parent.mkdir()
    if fmt == "torch-zip":
        torch.save({"model": _Evil(marker)}, str(path))
    else:
        path.write_bytes(pickle.dumps({"model": _Evil(marker)}))
    monkeypatch.setenv("WORKBENCH_WEIGHTS_DIR", str(path.parent))
    with pytest.raises(WeightsError, match=r"refused.*weights_only"):
        get_encoder("timm:vit_tiny_patch16_224")
    assert not os.path.exists(marker), "the planted pickle ran code"


def _assert_no_pickle(files):
    import zipfile

    for f in files:
        head = f.read_bytes()[:2]
        assert not (head[:1] == b"\x80" and head[1:2] in bytes(range(2, 6))), f"{f} is a pickle"
        if zipfile.is_zipfile(f):
            names = zipfile.ZipFile(f).namelist()
            assert not any(n.endswith(".pkl") for n in names), f"{f} holds a pickle: {names}"
            if f.suffix == ".npz":
                with np.load(f, allow_pickle=False) as z:
                    [z[k] for k in z.files]  # loads without pickle


def test_index_saved_without_pickle(tmp_path):
    from workbench.search.retrieval import TileIndex

    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    TileIndex("flat").fit(x, groups=np.arange(300) // 10).save(tmp_path / "idx.faiss")
    files = [f for f in tmp_path.iterdir() if f.is_file()]
    assert {f.suffix for f in files} >= {".faiss", ".json"}
    _assert_no_pickle(files)


def test_tree_saved_as_plain_arrays(clean, tmp_path):
    import json

    from workbench.curate.cluster import fit_store

    path = _features_store(clean, tmp_path)
    fit_store(path, "rel-enc", "plain", levels=[4, 2], random_state=0, backend="torch")
    tree_dir = path / "tree" / "plain"
    files = [f for f in tree_dir.rglob("*") if f.is_file()]
    _assert_no_pickle(files)
    for meta in tree_dir.rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        if doc["node_type"] == "array":
            assert doc["data_type"] in ("int32", "int64", "float32", "float64"), (meta, doc["data_type"])


def test_prefilter_saved_as_json_and_pickle_refused(tmp_path):
    import json
    import pickle

    from workbench.features.prefilter import MarkerPrefilter

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 6))
    y = (X[:, 0] > 0).astype(int)
    pf = MarkerPrefilter(random_state=0).fit(X, y)
    path = pf.save(tmp_path / "marker.json")
    _assert_no_pickle([path])
    assert json.loads(path.read_text())["coef"]
    np.testing.assert_array_equal(MarkerPrefilter.load(path).predict_proba(X), pf.predict_proba(X))
    marker = str(tmp_path / "code-ran")
    path.write_bytes(pickle.dumps(_Evil(marker)))  # planted where the model is expected
    with pytest.raises(ValueError):
        MarkerPrefilter.load(path)
    assert not os.path.exists(marker)


# =========================================================================== embedding

EMB = dict(encoder="stain-texture", num_workers=0, batch_size=16, progress=False)


@pytest.fixture(scope="module")
def emb_set(rel_set, clean, tmp_path_factory):
    """The clean store plus two all-pen slides, tiled (not embedded), and a clean embedding of it."""
    d = tmp_path_factory.mktemp("emb")
    pens = []
    for i, name in enumerate(("penA", "penB")):
        write_slide_tiff(d / f"{name}.tiff", he_image(1024, 10 + i, "pen"))
        pens.append({"slide_id": name, "path": str(d / f"{name}.tiff"), "patient_id": f"q{i}"})
    df = pd.concat([rel_set.df, pd.DataFrame(pens)], ignore_index=True)
    df.to_csv(d / "manifest.csv", index=False)
    tiled = d / "tiled.zarr"
    shutil.copytree(clean.path, tiled)
    summary = tile_slides(d / "manifest.csv", tiled, progress=False)
    assert summary.set_index("slide_id").status.to_dict() == {
        **{s: "skipped" for s in IDS},
        "penA": "tiled",
        "penB": "tiled",
    }
    from workbench.features.embed import embed_slides

    ref = d / "embedded.zarr"
    shutil.copytree(tiled, ref)
    t0 = time.perf_counter()
    summary = embed_slides(ref, **EMB)
    seconds = time.perf_counter() - t0
    assert (summary.status == "embedded").all(), summary
    ids = list(df.slide_id)
    return SimpleNamespace(tiled=tiled, ref=ref, ids=ids, feats=_features(ref, ids), seconds=seconds)


def _features(path, ids, encoder="stain-texture") -> dict:
    root = zarr.open_group(str(path), mode="r", zarr_format=3)
    return {
        s: root[st.Key.features(s, encoder)][:].tobytes()
        for s in ids
        if st.is_complete(root, st.Key.features(s, encoder))
    }


def test_all_pen_slide_flagged_by_prefilter(emb_set):
    """Trained on one all-pen slide and three tissue slides, the prefilter flags every tile of another pen slide."""
    from workbench.features.prefilter import MarkerPrefilter

    root = st.open_store(emb_set.ref)
    feats = {s: root[st.Key.features(s, "stain-texture")][:].astype(np.float32) for s in emb_set.ids}
    X = np.concatenate([feats["penA"]] + [feats[s] for s in ("r0", "r1", "r2")])
    y = np.r_[np.ones(len(feats["penA"])), np.zeros(len(X) - len(feats["penA"]))]
    pf = MarkerPrefilter(random_state=0).fit(X, y)
    assert pf.predict(feats["penB"]).mean() == 1.0
    tissue = np.concatenate([feats[s] for s in ("r3", "r4", "r5")])
    assert pf.predict(tissue).mean() <= 0.02


def test_corrupt_tiles_embedding_not_marked_complete(corrupt_slide, clean, rel_set, tmp_path):
    from workbench.features.embed import embed_slides

    df = pd.DataFrame({"slide_id": ["r0", "r0c"], "path": [rel_set.df.path[0], str(corrupt_slide.path)]})
    path = tmp_path / "c.zarr"
    assert set(tile_slides(df, path, progress=False).status) == {"tiled"}
    summary = embed_slides(path, **EMB).set_index("slide_id")
    assert summary.loc["r0"].status == "embedded" and summary.loc["r0c"].status == "error"
    root = st.open_store(path)
    assert st.is_complete(root, st.Key.features("r0", "stain-texture"))
    assert not st.is_complete(root, st.Key.features("r0c", "stain-texture"))
    errors = st.error_table(root).set_index("slide_id")
    assert errors.loc["r0c"].stage == "embed"
    assert "slide 'r0c'" in errors.loc["r0c"].error and "decoding stored tiles failed" in errors.loc["r0c"].error
    with pytest.raises(st.StoreError, match="r0c.*no complete"):
        st.features_array(root, "stain-texture")
    # a re-run skips the recorded failure (issue 14); asked to retry, it still refuses it; the good one is left alone
    again = embed_slides(path, **EMB).set_index("slide_id")
    assert again.loc["r0"].status == "skipped" and again.loc["r0c"].status == "failed-earlier"
    again = embed_slides(path, **EMB, retry_failed=True).set_index("slide_id")
    assert again.loc["r0"].status == "skipped" and again.loc["r0c"].status == "error"


def test_nonfinite_embeddings_detected_reported_and_excluded(emb_set, tmp_path, monkeypatch, caplog):
    """A model that emits NaN/Inf for some tiles: rows listed per slide, in the error table, left out of the tree."""
    import workbench.features.embed as em
    from workbench.curate.cluster import fit_store

    original = em._prepared

    def broken_prepared(name, weights, device, compile):
        enc, model = original(name, weights, device, compile)

        def broken(x):
            out = model(x).clone()
            out[0] = float("nan")  # the first two tiles of every batch
            if len(out) > 1:  # a slide's last batch may hold one tile
                out[1, 0] = float("inf")
            return out

        return enc, broken

    monkeypatch.setattr(em, "_prepared", broken_prepared)
    path = tmp_path / "nan.zarr"
    shutil.copytree(emb_set.tiled, path)
    with caplog.at_level(logging.WARNING):
        summary = em.embed_slides(path, **EMB).set_index("slide_id")
    root = st.open_store(path)
    counts = st.tile_counts(root, emb_set.ids)
    errors = st.error_table(root).set_index("slide_id")
    expected_global = []
    offset = 0
    for sid, n in zip(emb_set.ids, counts):
        rows = sorted(r for start in range(0, n, 16) for r in (start, start + 1) if r < n)
        arr = root[st.Key.features(sid, "stain-texture")]
        assert arr.attrs["nonfinite_rows"] == rows and summary.loc[sid].n_nonfinite == len(rows)
        assert st.is_complete(root, st.Key.features(sid, "stain-texture"))
        assert "non-finite" in errors.loc[sid].error and errors.loc[sid].stage == "embed"
        assert f"slide {sid!r}" in caplog.text
        expected_global += [offset + r for r in rows]
        offset += int(n)
    tree = fit_store(path, "stain-texture", "nan", levels=[4, 2], random_state=0, backend="torch")
    bad = np.zeros(len(tree.labels), bool)
    bad[expected_global] = True
    assert (tree.labels[bad] == -1).all() and (tree.labels[~bad] >= 0).all()
    assert all(np.isfinite(c).all() for c in tree.centroids)


_KILL_EMBEDDER = """
import torch, openslide, cv2, workbench.features.encoders, workbench.io.slides
from workbench.features.embed import embed_slides
print("READY", flush=True)
embed_slides({store!r}, encoder="stain-texture", num_workers=0, batch_size=16, progress=False)
"""


@pytest.fixture(scope="module")
def embedding_window(emb_set, tmp_path_factory) -> float:
    """How long an uninterrupted embedding child runs after READY (slow tier: calibrated by a real run)."""
    path = tmp_path_factory.mktemp("ecalib") / "calib.zarr"
    shutil.copytree(emb_set.tiled, path)
    return time_child(_KILL_EMBEDDER.format(store=str(path)))


def _kill_and_resume_embedding(emb_set, window, tmp_path, trial: int, n_trials: int, seed: int):
    from workbench.features.embed import embed_slides

    rng = np.random.default_rng(seed)
    window = 1.1 * window
    delay = window * (trial + rng.uniform()) / n_trials
    path = tmp_path / f"ekill{trial}.zarr"
    shutil.copytree(emb_set.tiled, path)
    rc = run_and_kill(_KILL_EMBEDDER.format(store=str(path)), delay)
    assert rc in (None, 0), f"child failed with exit code {rc}"
    got = _features(path, emb_set.ids)
    for sid, b in got.items():  # nothing is complete with partial features
        assert b == emb_set.feats[sid], f"slide {sid}: complete features differ from the clean run's"
    summary = embed_slides(path, **EMB)
    assert set(summary.status) <= {"embedded", "skipped"}, summary
    assert (summary.status == "skipped").sum() == len(got)
    assert _features(path, emb_set.ids) == emb_set.feats
    assert st.error_table(st.open_store(path)).empty
    print(
        f"embedding killed at {delay:.3f} s: exit {rc}, {len(got)} of {len(emb_set.ids)} slides complete "
        "before the re-run"
    )


def test_sigkill_embedding_then_resume(emb_set, tmp_path):
    # one kill in the first half of the in-process run time (a calibration run would cost a torch import)
    _kill_and_resume_embedding(emb_set, emb_set.seconds, tmp_path, 0, 2, seed=7)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(20))
def test_sigkill_embedding_then_resume_slow(emb_set, embedding_window, tmp_path, trial):
    _kill_and_resume_embedding(emb_set, embedding_window, tmp_path, trial, 20, seed=2000 + trial)
