"""Hostile and odd input (issue 14): nothing executed, nothing silent, no batch lost to one row.

One test (or parametrised family) per finding of the issue, each asserting the exact outcome: the error
class and the slide or parameter it names, the rows that still completed, the marker file absent.
Run with ``make reliability`` (marker ``reliability``).
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from reliability_helpers import ROOT, he_image, make_slides

from workbench import store as st
from workbench.errors import IntegrityError, ManifestError, ParameterError, SlideError, SweepError, WorkbenchError
from workbench.io.manifest import validate_manifest
from workbench.io.tiling import tile_slides

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Three 1024² tissue slides at 0.5 mpp (r0..r2, patients p0, p0, p1)."""
    d = tmp_path_factory.mktemp("hostile_slides")
    df = make_slides(d, n=3, size=1024)
    return SimpleNamespace(df=df, dir=d)


def _statuses(summary) -> dict:
    return summary.set_index("slide_id").status.to_dict()


def _errors(path) -> pd.DataFrame:
    return st.error_table(st.open_store(path)).set_index("slide_id")


# =========================================================================== 1. parameters are data


def _payload(marker: Path) -> str:
    return f"\"+__import__('os').system('touch {marker}')+\""


def _sweep(tmp_path, body: str) -> Path:
    p = tmp_path / "s.yml"
    p.write_text(
        'name: hostile\nnotebooks: ["01"]\nmanifest: '
        + str(ROOT / "data_manifests" / "demo.csv")
        + "\nfixed:\n  show_slides: 1\n"
        + body
    )
    return p


@pytest.mark.parametrize("route", ["binary", "python-apply", "python-name", "set", "alias", "merge-binary"])
def test_sweep_file_tags_refused_with_line_and_key(tmp_path, monkeypatch, route):
    from workbench.runs.sweep import load_spec

    monkeypatch.chdir(ROOT)
    marker = tmp_path / "MARK"
    b64 = base64.b64encode(_payload(marker).encode()).decode()
    body = {
        "binary": f"  threshold: !!binary {b64}\n",
        "python-apply": f"  threshold: !!python/object/apply:os.system ['touch {marker}']\n",
        "python-name": "  threshold: !!python/name:os.system\n",
        "set": "  threshold: !!set {a, b}\n",
        "alias": "  threshold: &x 15\n  median_ksize: *x\n",
        "merge-binary": f"  <<: {{threshold: !!binary {b64}}}\n",
    }[route]
    with pytest.raises(SweepError) as exc:
        load_spec(_sweep(tmp_path, body))
    msg = str(exc.value)
    assert "s.yml" in msg
    if route != "alias":
        assert ", line 6" in msg and "threshold" in msg and "not allowed" in msg
    else:
        assert "aliases" in msg
    assert not marker.exists()


@pytest.mark.parametrize(
    "value, match",
    [
        ("!!binary {b64}", "tag:yaml.org,2002:binary' is not allowed"),
        ("!!python/object/apply:os.system ['touch {marker}']", "is not allowed"),
        ("!!set {{a: null}}", "tag:yaml.org,2002:set' is not allowed"),
        ("'0.5'", "parameter 'tile_mpp'.*'0.5' \\(str\\) is not of its declared type float\\|int"),
        (".nan", "not a plain literal"),
        ("[1, !!binary {b64}]", "is not allowed"),
    ],
)
def test_set_override_refused_nothing_runs(tmp_path, monkeypatch, capsys, value, match):
    import papermill

    from workbench.runs import sweep

    monkeypatch.chdir(ROOT)
    ran = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: ran.append(a))
    marker = tmp_path / "MARK"
    b64 = base64.b64encode(_payload(marker).encode()).decode()
    key = "tile_mpp" if "0.5" in value or "nan" in value else "threshold"
    rc = sweep.main(
        [
            str(ROOT / "sweeps" / "demo.yml"),
            "--out",
            str(tmp_path / "out"),
            "--set",
            f"{key}=" + value.format(b64=b64, marker=marker),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    import re

    assert re.search(match, err), err
    assert f"--set {key}" in err or f"key '{key}'" in err
    assert not ran and not marker.exists() and not (tmp_path / "out" / "results.parquet").exists()


def test_text_with_quotes_and_newlines_is_rendered_as_a_literal(tmp_path):
    """A legitimate text value full of quotes and newlines reaches the notebook as exactly that text."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from workbench.runs.notebooks import check_parameters

    marker = tmp_path / "MARK"
    text = f'x"\n__import__("os").system("touch {marker}")\n#\'\'\'"""\\' + "\u202e"
    nb_path = ROOT / "notebooks" / "02_prefilter_and_embedding.ipynb"
    check_parameters(nb_path, {"encoder": text})  # text is allowed for notebook 02's encoder
    nb = parameterize_notebook(load_notebook_node(str(nb_path)), {"encoder": text, "batch_size": 8})  # as papermill
    cell = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    ns: dict = {}
    exec(compile(cell.source, "injected-parameters", "exec"), {"__builtins__": {}}, ns)
    assert ns == {"encoder": text, "batch_size": 8}
    assert not marker.exists()
    with pytest.raises(ParameterError, match=r"'2020-01-01' \(str\) is not of its declared type 'otsu'\|float\|int"):
        check_parameters(ROOT / "notebooks" / "01_segmentation_and_tiling.ipynb", {"threshold": "2020-01-01"})


@pytest.mark.parametrize(
    "value, cls",
    [
        (b"\"+__import__('os')+\"", "bytes"),
        ({1, 2}, "set"),
        (float("inf"), "float"),
        (pd.Timestamp("2020-01-01"), "Timestamp"),
        ({"a": object()}, "dict"),
    ],
)
def test_run_notebook_refuses_non_literals_before_papermill(tmp_path, monkeypatch, value, cls):
    import papermill

    from workbench.runs.notebooks import run_notebook

    ran = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: ran.append(a))
    with pytest.raises(ParameterError, match=f"parameter 'threshold'.*{cls}"):
        run_notebook(ROOT / "notebooks" / "01_segmentation_and_tiling.ipynb", tmp_path, {"threshold": value})
    assert not ran


# =========================================================================== 2. one row, one outcome


@pytest.mark.parametrize(
    "sid, reason",
    [
        ("zarr.json", "Zarr reserves"),
        (".zattrs", "Zarr reserves"),
        ("__meta", "Zarr reserves"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("a..b", "contains '..'"),
        ("bell\x07", "control"),
        ("tab\tx", "control"),
        ("café", "non-ASCII"),
        ("zwsp\u200b", "control or invisible"),
    ],
)
def test_unsafe_slide_ids_named_at_the_manifest(sid, reason):
    df = pd.DataFrame({"slide_id": ["ok1", sid], "path": ["/x/a.svs", "/x/b.svs"]})
    with pytest.raises(ManifestError) as exc:
        validate_manifest(df, check_files=False)
    msg = str(exc.value)
    assert f"row 1 (slide_id {sid!r})" in msg and reason in msg and "ok1" not in msg


def test_case_clash_slide_ids_named():
    df = pd.DataFrame({"slide_id": ["Case1", "case1"], "path": ["/x/a.svs", "/x/b.svs"]})
    with pytest.raises(ManifestError, match=r"row 1 \(slide_id 'case1'\).*differs from slide id 'Case1'.*letter case"):
        validate_manifest(df, check_files=False)


def test_extreme_values_cost_one_row_each_and_rerun_skips(slides, tmp_path):
    """Manifest mpp 100 (→ a tile under one pixel) and tile_px 16 / tile_mpp 0.05 end per row, by name."""
    df = pd.concat(
        [slides.df.iloc[:2], pd.DataFrame({"slide_id": ["coarse"], "path": [slides.df.path[2]], "mpp": [100.0]})],
        ignore_index=True,
    )
    path = tmp_path / "x.zarr"
    summary = tile_slides(df, path, progress=False)
    assert _statuses(summary) == {"r0": "tiled", "r1": "tiled", "coarse": "error"}
    err = _errors(path)
    assert list(err.index) == ["coarse"] and err.loc["coarse", "stage"] == "tile"
    assert err.loc["coarse", "error_class"] == "SlideError" and "upsample" in err.loc["coarse", "error"]
    # a re-run skips the recorded failure, unless asked to retry it
    again = tile_slides(df, path, progress=False)
    assert _statuses(again) == {"r0": "skipped", "r1": "skipped", "coarse": "failed-earlier"}
    retried = tile_slides(df, path, progress=False, retry_failed=True)
    assert _statuses(retried)["coarse"] == "error"
    # the combination on a new store: every row gets its own recorded outcome, none a ZeroDivisionError
    path2 = tmp_path / "y.zarr"
    summary = tile_slides(df, path2, tile_px=16, tile_mpp=0.05, progress=False)
    assert set(summary.status) == {"error"} and len(summary) == 3
    err = _errors(path2)
    assert set(err.index) == {"r0", "r1", "coarse"} and set(err.error_class) == {"SlideError"}
    assert not err.error.str.contains("ZeroDivision").any()


def test_unexpected_exception_in_one_slide_is_its_row(slides, tmp_path, monkeypatch):
    import workbench.io.tiling as tl

    real = tl.tile_slide

    def flaky(path, params, *, slide_id=None, **kw):
        if slide_id == "r1":
            raise ZeroDivisionError("division by zero inside a stage")
        return real(path, params, slide_id=slide_id, **kw)

    monkeypatch.setattr(tl, "tile_slide", flaky)
    summary = tile_slides(slides.df, tmp_path / "z.zarr", progress=False, scheduler="synchronous")
    assert _statuses(summary) == {"r0": "tiled", "r1": "error", "r2": "tiled"}
    err = _errors(tmp_path / "z.zarr")
    assert err.loc["r1", "error_class"] == "ZeroDivisionError" and "slide 'r1'" in err.loc["r1", "error"]


def test_embedding_model_failure_costs_one_slide(tiled_store, tmp_path, monkeypatch):
    import shutil

    import workbench.features.embed as E

    path = tmp_path / "e.zarr"
    shutil.copytree(tiled_store, path)
    ids = st.slide_ids(st.open_store(path))
    enc, model = E._prepared("stain-texture", None, "cpu", False)
    n_first = int(st.tile_counts(st.open_store(path), ids[:1])[0])
    seen = {"n": 0}

    def broken(x):
        seen["n"] += len(x)
        if n_first < seen["n"] <= n_first + len(x):  # the first batch of the second slide
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return model(x)

    monkeypatch.setitem(E._ENCODERS, ("stain-texture", "None", "cpu", False), (enc, broken))
    summary = E.embed_slides(
        path, "stain-texture", device="cpu", num_workers=0, batch_size=4096, progress=False
    ).set_index("slide_id")
    assert summary.loc[ids[1], "status"] == "error" and "illegal memory access" in summary.loc[ids[1], "error"]
    assert (summary.drop(ids[1]).status == "embedded").all()
    err = _errors(path)
    assert list(err[err.stage == "embed"].index) == [ids[1]]
    assert err.loc[ids[1], "error_class"] == "RuntimeError"


def test_pixel_qc_failure_costs_one_slide(tiled_store, tmp_path):
    import shutil

    from workbench.features.tile_qc import METRICS, compute_store

    path = tmp_path / "q.zarr"
    shutil.copytree(tiled_store, path)
    root = st.open_store(path, mode="a")
    ids = st.slide_ids(root)
    broken = tmp_path / "gone.tiff"
    broken.write_bytes(b"II*\x00 not a slide any more")
    root[st.Key.slide(ids[2])].attrs["path"] = str(broken)
    st.seal_attrs(root[st.Key.slide(ids[2])])  # a sealed edit: the file it names is what fails
    done = compute_store(path, progress=False)
    assert set(done) == set(ids) - {ids[2]} and all(n > 0 for n in done.values())
    err = _errors(path)
    # the file it names is not the file that was tiled: refused before any pixel is measured
    assert list(err[err.stage == "qc"].index) == [ids[2]] and err.loc[ids[2], "error_class"] == "StaleError"
    assert "gone.tiff" in err.loc[ids[2], "error"]
    assert compute_store(path, progress=False) == {}  # the re-run skips the recorded failure
    root[st.Key.slide(ids[2])].attrs["path"] = str(Path(tiled_store).parent.parent / "x")  # still bad
    st.seal_attrs(root[st.Key.slide(ids[2])])
    assert compute_store(path, progress=False, retry_failed=True) == {}
    assert not st.is_complete(st.open_store(path), st.Key.pixel_qc(ids[2], METRICS[-1]))


# =========================================================================== 3. sanity before work


def _tiff_with_tags(path, rgb, xres, yres, unit):
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        tw.write(
            rgb,
            tile=(256, 256),
            compression="jpeg",
            photometric="rgb",
            resolution=(xres, yres),
            resolutionunit=unit,
            metadata=None,
        )
    return path


def test_resolution_tags_refused_by_name_unless_manifest_mpp(slides, tmp_path):
    img = he_image(1024, 7)
    dpi = _tiff_with_tags(tmp_path / "scan300dpi.tiff", img, 300, 300, "INCH")
    aniso = _tiff_with_tags(tmp_path / "aniso.tiff", img, 1e4 / 0.5, 1e4 / 1.0, "CENTIMETER")
    df = pd.DataFrame(
        {
            "slide_id": ["r0", "dpi", "dpi_mpp", "aniso"],
            "path": [slides.df.path[0], dpi, dpi, aniso],
            "mpp": [None, None, 0.5, None],
        }
    )
    df["path"] = df.path.astype(str)
    path = tmp_path / "res.zarr"
    summary = tile_slides(df, path, progress=False)
    assert _statuses(summary) == {"r0": "tiled", "dpi": "error", "dpi_mpp": "tiled", "aniso": "error"}
    err = _errors(path)
    assert "84.67 µm/px, which is not a microscope" in err.loc["dpi", "error"]
    assert "slide 'dpi'" in err.loc["dpi", "error"]
    assert (
        "anisotropic pixels" in err.loc["aniso", "error"] and "x 0.5 µm/px and y 1 µm/px" in err.loc["aniso", "error"]
    )
    assert set(err.error_class) == {"SlideError"}
    n_ok = summary.set_index("slide_id").n_tiles
    assert n_ok["dpi_mpp"] > 0 and n_ok["dpi_mpp"] < 30  # 1024² at 0.5 mpp: a handful of 224-px tiles


def test_size_and_tile_count_limits_refuse_by_name(slides, tmp_path):
    s1 = tile_slides(slides.df.iloc[:2], tmp_path / "a.zarr", progress=False, max_pixels=1024 * 1024 - 1)
    assert set(s1.status) == {"error"}
    assert (
        _errors(tmp_path / "a.zarr").error.str.contains("beyond the sanity limit of 1,048,575 \\(max_pixels\\)").all()
    )
    s2 = tile_slides(slides.df.iloc[:1], tmp_path / "b.zarr", progress=False, max_tiles=3)
    assert _statuses(s2) == {"r0": "error"}
    assert "16 tiles of 224 level-0 px" in _errors(tmp_path / "b.zarr").loc["r0", "error"]


def test_time_limit_records_timeout_and_frees_the_worker(slides, tmp_path, monkeypatch):
    """A slide whose reads never end (a huge declared image with little behind it) stops at the limit."""
    from workbench.io import slides as sl

    real = sl.Slide.segmentation_image

    def endless(self, *args, **kwargs):
        if self.slide_id != "r1":
            return real(self, *args, **kwargs)
        while True:  # e.g. 200k x 200k declared: read after read
            self.read_region(0, 0, 0, 64, 64)
            time.sleep(0.01)

    monkeypatch.setattr(sl.Slide, "segmentation_image", endless)
    t0 = time.perf_counter()
    summary = tile_slides(slides.df, tmp_path / "t.zarr", progress=False, time_limit=2.0, num_workers=2)
    elapsed = time.perf_counter() - t0
    assert _statuses(summary) == {"r0": "tiled", "r1": "timeout", "r2": "tiled"}
    assert elapsed < 30
    row = summary.set_index("slide_id").loc["r1"]
    assert 2.0 <= row.seconds < 6.0
    err = _errors(tmp_path / "t.zarr")
    assert err.loc["r1", "error_class"] == "SlideTimeoutError" and "time limit of 2 s" in err.loc["r1", "error"]


def test_embedding_time_limit_records_timeout(tiled_store, tmp_path, monkeypatch):
    import shutil

    import workbench.features.embed as E
    from workbench.io import slides as sl

    path = tmp_path / "et.zarr"
    shutil.copytree(tiled_store, path)
    ids = st.slide_ids(st.open_store(path))
    real = sl.TileReader.read

    def slow(self, coords):
        if self.slide.slide_id == ids[0]:
            time.sleep(0.4)
        return real(self, coords)

    monkeypatch.setattr(sl.TileReader, "read", slow)
    t0 = time.perf_counter()
    summary = E.embed_slides(
        path, "stain-texture", device="cpu", num_workers=0, batch_size=4, time_limit=1.0, progress=False
    ).set_index("slide_id")
    assert time.perf_counter() - t0 < 60
    assert summary.loc[ids[0], "status"] == "error" and "time limit of 1 s" in summary.loc[ids[0], "error"]
    assert (summary.drop(ids[0]).status == "embedded").all()
    assert _errors(path).loc[ids[0], "error_class"] == "SlideTimeoutError"


def test_permission_denied_is_named(slides, tmp_path, monkeypatch):
    locked = str(slides.df.path[1])
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if str(p) == locked else real(p, mode, *a, **k))
    summary = tile_slides(slides.df, tmp_path / "p.zarr", progress=False)
    assert _statuses(summary) == {"r0": "tiled", "r1": "error", "r2": "tiled"}
    msg = _errors(tmp_path / "p.zarr").loc["r1", "error"]
    assert "permission denied" in msg and "not a slide format" not in msg


# =========================================================================== 4. duplicates across patients


def test_same_file_under_two_patients_refused(slides, tmp_path):
    copy = tmp_path / "copy_of_r0.tiff"
    copy.write_bytes(Path(slides.df.path[0]).read_bytes())
    df = pd.DataFrame(
        {
            "slide_id": ["a", "b", "c"],
            "path": [slides.df.path[0], str(copy), slides.df.path[1]],
            "patient_id": ["p0", "p9", "p1"],
        }
    )
    with pytest.raises(
        ManifestError, match=r"row 1 \(slide_id 'b'\) path: is the same file as slide 'a'.*'p9' vs 'p0'"
    ):
        validate_manifest(df)
    ok = validate_manifest(df, allow_duplicates=True)
    assert ok.duplicate_of.fillna("").tolist() == ["", "a", ""]
    assert ok.file_key[0] == ok.file_key[1] != ok.file_key[2]
    same = validate_manifest(df.assign(patient_id=["p0", "p0", "p1"]))  # same patient: listed, not refused
    assert same.duplicate_of.fillna("").tolist() == ["", "a", ""]


def test_leave_one_patient_out_refused_on_duplicate_files(tmp_path):
    from test_retrieval import make_feature_store

    from workbench.search import retrieval as R
    from workbench.search.evaluate import evaluate_slides, evaluate_tiles

    path, labels = make_feature_store(tmp_path / "dup.zarr")
    root = zarr_open(path)
    man = list(root.attrs["manifest"])
    man[2] = {**man[2], "path": man[0]["path"]}  # s02 (patient p01) is the file of s00 (patient p00)
    root.attrs["manifest"] = man
    si = R.build_store_index(path, "toy", "flat", save=False)
    with pytest.raises(ManifestError, match=r"'s00' \(patient:p00\) and 's02' \(patient:p01\)"):
        evaluate_tiles(si, labels, ks=(1, 5), n_queries=50)
    with pytest.raises(ManifestError, match="same file"):
        evaluate_slides(si, ks=(1,))
    table, _ = evaluate_tiles(si, labels, ks=(1, 5), n_queries=50, allow_duplicate_files=True)
    assert 0.0 <= table.loc["overall", "mv@5"] <= 1.0


def zarr_open(path):
    import zarr

    return zarr.open_group(str(path), mode="a", zarr_format=3)


# =========================================================================== 5. atomic writes


def test_index_rebuild_killed_mid_write_leaves_old_index_readable(tmp_path, monkeypatch):
    from workbench.search.retrieval import TileIndex

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    old = TileIndex("flat").fit(x, groups=np.arange(300) // 10, digest="d1")
    p = old.save(tmp_path / "i.faiss")
    want = old.search(x[:5], 3)[1]
    new = TileIndex("flat").fit(x[::-1].copy(), groups=np.arange(300) // 7, digest="d2")
    for target in ("savez", "save"):  # killed while writing the groups, then while writing the row ids

        def die(*a, **k):
            a[0].write(b"PK\x03\x04 half a zip")  # what a SIGKILL mid-write leaves behind
            raise KeyboardInterrupt("killed")

        with monkeypatch.context() as m:
            m.setattr(np, target, die)
            new.row_ids_ = np.arange(300)
            with pytest.raises(KeyboardInterrupt):
                new.save(p)
        back = TileIndex.load(p, expected_digest="d1")
        np.testing.assert_array_equal(back.search(x[:5], 3)[1], want)
    assert not list(tmp_path.glob(".*tmp")), "temporary files left behind"
    new.row_ids_ = None
    new.save(p)
    assert TileIndex.load(p).digest_ == "d2"
    assert sorted(f.name for f in tmp_path.iterdir() if ".groups" in f.name).__len__() == 1  # old version removed


def test_damaged_index_file_is_an_integrity_error(tmp_path):
    from workbench.search.retrieval import TileIndex

    x = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
    p = TileIndex("flat").fit(x, groups=np.arange(50) // 5).save(tmp_path / "i.faiss")
    meta = json.loads(p.with_suffix(".json").read_text())
    (tmp_path / meta["files"]["groups"]).write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(IntegrityError, match=r"i\.faiss cannot be read \(BadZipFile.*rebuild"):
        TileIndex.load(p)


def test_json_write_is_atomic_under_failure(tmp_path, monkeypatch):
    p = tmp_path / "a.json"
    st.write_json_atomic(p, {"v": 1})

    def boom(*a, **k):
        raise KeyboardInterrupt("killed just before the rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        st.write_json_atomic(p, {"v": 2})
    monkeypatch.undo()
    assert json.loads(p.read_text()) == {"v": 1} and [f.name for f in tmp_path.iterdir()] == ["a.json"]


# =========================================================================== 6. named errors at the public edge


def test_string_and_fractional_parameters_are_named(tmp_path, tiled_store):
    from workbench.curate.sample import HierarchicalSampler, StratifiedBatchSampler
    from workbench.features.embed import embed_slides
    from workbench.search.retrieval import TileIndex

    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    cases = [
        (lambda: tile_slides(pd.DataFrame(), tmp_path / "s.zarr", tile_mpp="0.5"), "tile_mpp='0.5' \\(str\\)"),
        (lambda: tile_slides(pd.DataFrame(), tmp_path / "s.zarr", tile_px=224.0), "tile_px=224.0 \\(float\\)"),
        (lambda: HierarchicalSampler("150").fit(np.zeros((10, 1), int)), "n='150'"),
        (lambda: TileIndex("ivf", nprobe="x").fit(x), "nprobe='x'"),
        (lambda: TileIndex("flat").fit(x).search(x[:1], "5"), "k='5'"),
        (lambda: embed_slides(tiled_store, batch_size=0), "batch_size=0 is out of range"),
        (lambda: embed_slides(tiled_store, batch_size=2.5), "batch_size=2.5 \\(float\\)"),
        (lambda: StratifiedBatchSampler(np.zeros(10, int), 2.5), "batch_size=2.5"),
        (lambda: StratifiedBatchSampler(np.zeros(10, int), 11), "batch_size=11 is out of range.*in \\[1, 10\\]"),
    ]
    for call, match in cases:
        with pytest.raises(ParameterError, match=match):
            call()


def test_k_bounded_by_what_exists_and_tile_ids_checked(tmp_path):
    from test_retrieval import make_feature_store

    from workbench.search import retrieval as R

    x = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
    idx = R.TileIndex("flat").fit(x, groups=np.arange(100) // 10)
    t0 = time.perf_counter()
    scores, ids = idx.search(x[:3], 10**9, exclude_groups=[0, 0, 1])
    assert time.perf_counter() - t0 < 5 and ids.shape == (3, 100)
    assert (ids[:, :90] >= 0).all() and (ids[:, 90:] == -1).all()
    path, _ = make_feature_store(tmp_path / "k.zarr")
    si = R.build_store_index(path, "toy", "flat", save=False)
    n = int(si.slides.n_tiles.sum())
    with pytest.raises(ParameterError, match=f"tile id {n} is out of range: this store has tiles 0..{n - 1}"):
        si.query_tiles([0, n], 5)
    with pytest.raises(ParameterError, match="tile id -3"):
        si.read_tiles([-3])


# =========================================================================== 7. O(1) error recording


def _writer(path, k, n):
    for i in range(n):
        st.record_error(Path(path), f"w{k}-{i}", "tile", f"SlideError: writer {k} row {i}")


def test_error_recording_is_constant_time_and_safe_for_concurrent_writers(tmp_path):
    import zarr

    path = tmp_path / "e.zarr"
    zarr.create_group(str(path), zarr_format=3, attributes={"layout_version": st.LAYOUT_VERSION})
    root = st.open_store(path, mode="a")
    times = []
    for i in range(2000):
        t0 = time.perf_counter()
        st.record_error(root, f"s{i}", "tile", ValueError(f"bad row {i}"))
        times.append(time.perf_counter() - t0)
    assert sum(times) < 10, f"2,000 errors took {sum(times):.1f} s"
    first, last = np.median(times[:200]), np.median(times[-200:])
    assert last < 3 * first + 1e-3, (first, last)  # row 1,800 costs what row 10 costs
    table = st.error_table(root)
    assert len(table) == 2000 and table.error_class.eq("ValueError").all()
    assert list(table.columns) == ["slide_id", "stage", "error", "time", "error_class"]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), k, 150)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    table = st.error_table(root)
    assert len(table) == 2000 + 600
    assert {f"w{k}-{i}" for k in range(4) for i in range(150)} <= set(table.slide_id)
    st.clear_error(root, "s5", "tile")
    assert "s5" not in set(st.error_table(root).slide_id) and len(st.error_table(root)) == 2599


def test_workbench_errors_are_the_only_ones_at_the_edge(tmp_path):
    """Each refusal above is a WorkbenchError subclass (catching the base catches them all)."""
    for cls in (ParameterError, ManifestError, SlideError, SweepError, IntegrityError):
        assert issubclass(cls, WorkbenchError)
