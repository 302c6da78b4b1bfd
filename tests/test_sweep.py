"""Papermill experiment sweeps: planning, end-to-end runs on notebook 01, resume, failures and stage reuse.

The end-to-end tests run real notebooks on two small synthetic slides (2048², 0.25 mpp) and compare the
table's mask IoU with the same computation done directly (tile_slide + mask_iou against the ground truth).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from workbench import store as st
from workbench.runs import sweep as sw

NB01 = "01"
GOOD = [
    {"threshold": 5, "median_ksize": 3},
    {"threshold": 15, "median_ksize": 11},
    {"threshold": 40, "median_ksize": 11},
]
BAD = {"threshold": 15, "median_ksize": 4}  # even kernel size: SegmentParams.validate raises


def _write_downstream_notebook(path: Path) -> Path:
    """A tiny stage after 01: reads the store's tile count and scales it by ``factor``."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(
        'store = ""\nrun_dir = ""\nfactor = 1\nthreshold = 0.5  # unused: name shared with 01'
    )
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        params,
        nbformat.v4.new_code_cell(
            "from workbench import store as st\nfrom workbench.runs.notebooks import write_metrics\n"
            "n = int(st.tile_counts(st.open_store(store)).sum())\n"
            'write_metrics(run_dir, "98", {"n_tiles": n, "scaled": n * factor})'
        ),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def sweep_data(tmp_path_factory) -> dict:
    from workbench.io.synthetic import make_slide

    root = tmp_path_factory.mktemp("sweep")
    paths = []
    for i, dominant in enumerate(["tumour", "stroma"]):
        p = root / f"t{i}.tiff"
        make_slide(
            p, width=2048, height=2048, mpp=0.25, seed=10 + i, dominant=dominant, n_pieces=1, pen=False, blur=False
        )
        paths.append(p)
    manifest = root / "manifest.csv"
    pd.DataFrame({"slide_id": ["t0", "t1"], "path": [str(p) for p in paths]}).to_csv(manifest, index=False)
    spec = {
        "name": "e2e",
        "notebooks": [NB01],
        "manifest": str(manifest),
        "fixed": {"show_slides": 1},
        "points": GOOD + [BAD],
        "metric": "01.mask_iou_mean",
        "goal": "max",
    }
    spec_path = root / "e2e.yml"
    spec_path.write_text(yaml.safe_dump(spec))
    return {
        "root": root,
        "manifest": manifest,
        "slides": paths,
        "spec": spec_path,
        "downstream": _write_downstream_notebook(root / "98_downstream.ipynb"),
    }


@pytest.fixture(scope="module")
def e2e(sweep_data) -> dict:
    out = sweep_data["root"] / "runs" / "e2e"
    t0 = time.perf_counter()
    table = sw.run_sweep(sweep_data["spec"], out=out, max_workers=2)
    return {"out": out, "table": table, "seconds": time.perf_counter() - t0}


def _direct_iou(slides, threshold, median_ksize) -> tuple[float, int]:
    """Reference: the notebook's mean mask IoU and tile count, computed without papermill."""
    from workbench.io import segment, synthetic, tiling

    ious, n = [], 0
    for p in slides:
        params = tiling.TilingParams(segment=segment.SegmentParams(threshold=threshold, median_ksize=median_ksize))
        r = tiling.tile_slide(str(p), params)
        ious.append(segment.mask_iou(synthetic.load_truth(p)["tissue"], r["mask"]))
        n += len(r["coords"])
    return float(np.mean(ious)), n


# --------------------------------------------------------------------------- pure planning


def test_grid_points_and_ids(sweep_data):
    pts = sw.expand_points({"a": [1, 2], "b": ["x", "y"]}, [{"a": 3, "b": "x"}, {"a": 1, "b": "x"}])
    assert pts == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}, {"a": 3, "b": "x"}]
    assert sw.expand_points([{"a": [1]}, {"b": [2, 3]}]) == [{"a": 1}, {"b": 2}, {"b": 3}]
    pid = sw.point_id({"threshold": 8, "median_ksize": 5}, {"threshold": 8, "median_ksize": 5, "show_slides": 1})
    assert pid.startswith("threshold-8_median_ksize-5-") and len(pid.rsplit("-", 1)[1]) == 8
    assert pid == sw.point_id(
        {"threshold": 8, "median_ksize": 5}, {"median_ksize": 5, "threshold": 8, "show_slides": 1}
    )


def test_stage_keys_follow_parameters(sweep_data, tmp_path):
    spec = sw.load_spec(
        {
            "name": "plan",
            "notebooks": [NB01, str(sweep_data["downstream"])],
            "manifest": str(sweep_data["manifest"]),
            "points": [
                {"threshold": 15, "factor": 1},
                {"threshold": 15, "factor": 2},
                {"threshold": 20, "factor": 1},
                {"threshold": 15, "factor": 1, "show_slides": 2},
                {"threshold": 15, "median_ksize": 11, "factor": 1},
            ],
        }
    )
    plans = sw.plan_points(spec, tmp_path)
    k01 = [p.stages[0]["key"] for p in plans]
    k98 = [p.stages[1]["key"] for p in plans]
    assert k01[0] == k01[1] != k01[2]  # downstream-only change shares the tiling stage
    assert plans[0].store == plans[1].store != plans[2].store
    assert plans[0].store == tmp_path / "stores" / f"{k01[0]}.zarr"
    assert k98[0] != k98[1]
    assert k01[3] == k01[0] and k98[3] == k98[0]  # show_* is display only
    assert k01[4] == k01[0]  # an explicit default is the same stage as the implicit one
    assert len({p.point_id for p in plans}) == 5
    assert plans[1].stages[1]["params"] == {"factor": 2, "threshold": 15, "store": str(plans[1].store)}
    assert plans[0].stages[0]["params"]["manifest"] == str(sweep_data["manifest"])
    # "98.threshold" is notebook 98's only; a plain name goes to every notebook declaring it
    scoped = sw.plan_points(
        sw.load_spec(
            {
                "name": "scoped",
                "notebooks": [NB01, str(sweep_data["downstream"])],
                "manifest": str(sweep_data["manifest"]),
                "fixed": {"threshold": 15},
                "grid": {"98.threshold": [0.5, 0.9]},
            }
        ),
        tmp_path,
    )
    assert [p.stages[0]["params"]["threshold"] for p in scoped] == [15, 15]
    assert [p.stages[1]["params"]["threshold"] for p in scoped] == [0.5, 0.9]
    assert scoped[0].stages[0]["key"] == scoped[1].stages[0]["key"] == k01[0]
    assert scoped[0].stages[1]["key"] != scoped[1].stages[1]["key"]
    assert scoped[0].point_id.startswith("98.threshold-0.5-")
    with pytest.raises(ValueError, match="99.threshold"):
        sw.load_spec({"notebooks": [NB01], "grid": {"99.threshold": [1, 2]}})
    with pytest.raises(ValueError, match="thresold"):
        sw.load_spec({"notebooks": [NB01], "grid": {"thresold": [1, 2]}})
    with pytest.raises(ValueError, match="unknown keys"):
        sw.load_spec({"notebooks": [NB01], "gird": {"threshold": [1, 2]}})


def test_best_point_and_arrow_safe_table():
    t = pd.DataFrame(
        {
            "point_id": ["a", "b", "c", "d"],
            "status": ["ok", "ok", "failed", "ok"],
            "m": [0.5, 0.9, 2.0, np.nan],
            "threshold": [5, "otsu", 15, 20],
        }
    )
    assert sw.best_point(t, "m", "max")["point_id"] == "b"
    assert sw.best_point(t, "m", "min")["point_id"] == "a"
    safe = sw._arrow_safe(t)
    assert list(safe["threshold"]) == ["5", "otsu", "15", "20"]
    import pyarrow as pa

    pa.Table.from_pandas(safe)  # does not raise


# --------------------------------------------------------------------------- end to end


def test_sweep_end_to_end_with_a_failing_point(sweep_data, e2e):
    table, out = e2e["table"], e2e["out"]
    assert len(table) == 4
    assert [(r.threshold, r.median_ksize) for r in table.itertuples()] == [
        (p["threshold"], p["median_ksize"]) for p in GOOD + [BAD]
    ]
    assert list(table.status) == ["ok", "ok", "ok", "failed"], table.error.tolist()
    bad = table.iloc[3]
    assert "median_ksize must be an odd positive integer" in bad.error and bad.error.startswith("notebook 01")
    assert np.isnan(bad["01.mask_iou_mean"])
    for row, p in zip(table.iloc[:3].itertuples(), GOOD):
        iou, n_tiles = _direct_iou(sweep_data["slides"], p["threshold"], p["median_ksize"])
        rec = table.loc[row.Index]
        assert rec["01.mask_iou_mean"] == pytest.approx(iou, abs=1e-9)
        assert rec["01.n_tiles"] == n_tiles
        assert iou > 0.8  # the ground truth is recovered
        pdir = out / row.point_id
        assert (pdir / "01_segmentation_and_tiling.ipynb").exists()
        metrics = json.loads((pdir / "01_metrics.json").read_text())
        assert metrics["threshold"] == p["threshold"] and metrics["mask_iou_mean"] == rec["01.mask_iou_mean"]
        point = json.loads((pdir / "point.json").read_text())
        assert point["status"] == "ok" and point["stages"][0]["ran"] is True
        records = sw.stage_records(rec["store"])  # the stage is recorded in its own store
        assert list(records) == [point["stages"][0]["key"]]
        assert records[point["stages"][0]["key"]]["metrics"]["mask_iou_mean"] == rec["01.mask_iou_mean"]
    assert table.store.nunique() == 4  # each tiling has its own store
    csv = pd.read_csv(out / "results.csv")
    parquet = sw.load_results(out)
    assert list(csv.point_id) == list(parquet.point_id) == list(table.point_id)
    assert np.allclose(
        parquet["01.mask_iou_mean"].to_numpy(float), table["01.mask_iou_mean"].to_numpy(float), equal_nan=True
    )


def test_rerun_finishes_only_remaining_points(sweep_data, e2e):
    """Simulate a kill during point 2: its point.json and its store's stage record never got written."""
    out, table = e2e["out"], e2e["table"]
    victim, failed = table.iloc[1], table.iloc[3]
    before = {pid: (out / pid / "point.json").stat().st_mtime_ns for pid in table.point_id}
    (out / victim.point_id / "point.json").unlink()
    with st.write_lock(victim.store):
        root = st.open_store(victim.store, "a")
        root.attrs["sweep_stages"] = {}
    again = sw.run_sweep(sweep_data["spec"], out=out, max_workers=2)
    after = {pid: (out / pid / "point.json").stat().st_mtime_ns for pid in table.point_id}
    for pid in (table.iloc[0].point_id, table.iloc[2].point_id):
        assert after[pid] == before[pid]  # finished points are not touched
    assert after[failed.point_id] > before[failed.point_id]  # failed points are retried
    assert list(again.status) == ["ok", "ok", "ok", "failed"], again.error.tolist()
    row = again.set_index("point_id").loc[victim.point_id]
    assert row.stages_run == "01"  # ran again, with the same result
    assert row["01.mask_iou_mean"] == victim["01.mask_iou_mean"]


def test_upstream_stage_reused(sweep_data, e2e):
    """A downstream sweep shares tiling: 01 reused from the earlier sweep's store, or run once per tiling."""
    spec = {
        "name": "reuse",
        "notebooks": [NB01, str(sweep_data["downstream"])],
        "manifest": str(sweep_data["manifest"]),
        "stores_dir": str(e2e["out"] / "stores"),
        "fixed": {"show_slides": 1, "median_ksize": 11},
        "grid": {"threshold": [15, 30], "factor": [1, 3]},
    }
    out = sweep_data["root"] / "runs" / "reuse"
    table = sw.run_sweep(spec, out=out, max_workers=2)
    assert list(table.status) == ["ok"] * 4, table.error.tolist()
    prior = e2e["table"].set_index(["threshold", "median_ksize"]).loc[(15, 11)]
    t15, t30 = table[table.threshold == 15], table[table.threshold == 30]
    # threshold 15 was tiled by the first sweep: reused (same store, same metrics), only 98 ran
    assert list(t15.stages_reused) == ["01", "01"] and list(t15.stages_run) == ["98", "98"]
    assert set(t15.store) == {prior.store}
    assert (t15["01.mask_iou_mean"] == prior["01.mask_iou_mean"]).all()
    # threshold 30 is new: tiled once for both of its points
    assert list(t30.stages_run) == ["01,98", "01,98"] and t30.store.nunique() == 1
    stage_dirs = sorted(p.name for p in (out / "stages").iterdir())
    assert [d for d in stage_dirs if d.startswith("01-")] == [Path(t30.store.iloc[0]).stem]
    keys = [json.loads((out / pid / "point.json").read_text())["stages"][0]["key"] for pid in t30.point_id]
    assert keys[0] == keys[1]
    assert (table["98.scaled"] == table["factor"] * table["98.n_tiles"]).all()
    assert (table["98.n_tiles"] == table["01.n_tiles"]).all()
    # the store records both stages of every point
    rec = sw.stage_records(t30.store.iloc[0])
    assert len([k for k in rec if k.startswith("98-")]) == 2 and len([k for k in rec if k.startswith("01-")]) == 1


@pytest.mark.slow
def test_killed_sweep_resumes(sweep_data, tmp_path):
    """Kill the CLI after the first point finished; the re-run finishes only the others."""
    spec = yaml.safe_load(sweep_data["spec"].read_text())
    spec.update(name="kill", points=GOOD)
    spec_path = tmp_path / "kill.yml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "workbench.runs.sweep", str(spec_path), "--out", str(out), "--max-workers", "1"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(out.glob("*/point.json")):
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = list(out.glob("*/point.json"))
    assert len(first) == 1, "the first point did not finish in time"
    mtime = first[0].stat().st_mtime_ns
    table = sw.run_sweep(spec_path, out=out, max_workers=2)
    assert list(table.status) == ["ok"] * 3
    assert first[0].stat().st_mtime_ns == mtime
    # every point has its tiling stage, run by the killed sweep or the re-run (or recorded just before the kill)
    assert all("01" in (r.stages_run, r.stages_reused) for r in table.itertuples())


@pytest.mark.slow
def test_report_notebook(sweep_data, e2e, tmp_path):
    from workbench.runs.notebooks import run_notebook

    run_notebook(
        Path(__file__).resolve().parents[1] / "notebooks" / "07_sweep_report.ipynb",
        tmp_path,
        {"sweep": str(sweep_data["spec"]), "results": str(e2e["out"] / "results.parquet")},
    )
    m = json.loads((tmp_path / "07_metrics.json").read_text())
    table = e2e["table"]
    ok = table[table.status == "ok"]
    best = ok.loc[ok["01.mask_iou_mean"].idxmax()]
    assert m == {
        "n_points": 4,
        "n_ok": 3,
        "n_failed": 1,
        "best_point": best.point_id,
        "best_value": pytest.approx(best["01.mask_iou_mean"]),
        "metric": "01.mask_iou_mean",
    }
