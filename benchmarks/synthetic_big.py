"""Big synthetic slides: make a scanner-sized slide by streaming, then tile and embed it, each stage's memory
measured in its own child process.

    python benchmarks/synthetic_big.py [--side 150000] [--dir /tmp] [--keep] [--embed-max 20000]

Defaults: ``--side`` 40,000 (quick); ``BENCH_FULL=1``: 150,000 (the committed
``benchmarks/results/synthetic_big.json``). The slide is 0.25 mpp, lymphocyte-dominant (the densest nuclei:
the most per-block work and the most nuclei held), with pen and blur, written to a temporary folder under
``--dir`` and deleted afterwards unless ``--keep``.

Stages, each a fresh Python process (``--stage``) whose own peak RSS (``ru_maxrss`` of itself and of its
children, reported by the child at exit) and the parent's sampled RSS of the whole process tree (psutil,
every 0.2 s) are recorded; the wall time covers the whole stage including imports:

1. ``make``: :func:`workbench.io.synthetic.make_slide` (2 JPEG threads).
2. ``pipeline``: ``tile_slides`` on a one-slide manifest into a fresh store (224-px tiles at 0.5 mpp, the
   default ``mussel`` rule, thread scheduler), then ``embed_slides`` with the demo's encoder
   (``stain-texture``: hand-crafted, CPU, no weights) on CPU. Tiling covers the whole slide; when the slide has
   more than ``--embed-max`` tiles, every n-th tile (n = ceil(tiles / embed-max), stated in the JSON) goes
   through the embedding stage's reader (``TileBatches`` in a DataLoader) and model, features not stored;
   otherwise ``embed_slides`` embeds every tile into the store.

Ground truth (checked in the parent, outside the measured stages): tiles found vs the tissue area of the
truth file in tile footprints (``tiles_vs_truth``; the Mussel rule also keeps edge tiles, so a little over 1),
and the number of tiles whose footprint has ≥ 50 % truth tissue.

Last line: JSON with ``side_px``, ``peak_rss_bytes`` (the generator's), ``level0_rgb_bytes``,
``pipeline_peak_rss_bytes``, ``tiles``, ``embedded_tiles``, seconds per stage, ``file_bytes`` and machine info.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _results import emit, full_mode  # noqa: E402

ENCODER = "stain-texture"
SLIDE = dict(mpp=0.25, seed=11, dominant="lymphocytes", n_pieces=3, pen=True, blur=True)


def _own_peak() -> dict:
    kb = 1024  # ru_maxrss is in KiB on Linux
    return {
        "self_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kb,
        "children_peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kb,
    }


def stage_make(work: Path, side: int) -> dict:
    from workbench.io.synthetic import make_slide

    t0 = time.perf_counter()
    truth = make_slide(work / "big.tiff", width=side, height=side, **SLIDE)
    return {"seconds": time.perf_counter() - t0, "tissue_fraction": float(truth["tissue"].mean()), **_own_peak()}


def stage_pipeline(work: Path, embed_max: int) -> dict:
    import pandas as pd

    import workbench
    from workbench import store as st
    from workbench.features.embed import embed_slides
    from workbench.io.tiling import tile_slides

    slide = work / "big.tiff"
    store = work / "big.zarr"
    t0 = time.perf_counter()
    table = tile_slides(pd.DataFrame({"slide_id": ["big"], "path": [str(slide)]}), store, progress=False, num_workers=2)
    t_tile = time.perf_counter() - t0
    if table["status"].iloc[0] != "tiled":
        print(table.to_string(), file=sys.stderr)
    ds = workbench.open_dataset(store)
    root = st.open_store(store)
    n = int(root[st.Key.slide("big")].attrs["n_tiles"])
    step = max(1, math.ceil(n / embed_max))
    t1 = time.perf_counter()
    if step == 1:  # the embedding stage as the notebooks run it: every tile, features into the store
        summary = embed_slides(store, ENCODER, device="cpu", progress=False)
        n_emb, status = int(summary["n_tiles"].sum()), str(summary["status"].iloc[0])
    else:  # every step-th tile through the same reader (TileBatches, DataLoader) and model, not stored
        import torch

        from workbench.features import embed as E

        enc, model = E._prepared(ENCODER, None, "cpu", False)
        job = E.slide_job(root, "big", enc)
        job["coords"] = job["coords"][::step]
        bs = E.auto_batch_size(enc, "cpu")
        batches = E.TileBatches([job], bs)
        loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=E._default_workers("cpu"))
        n_emb, finite = 0, True
        try:
            with torch.inference_mode():
                for _, _, tiles, err in loader:
                    if err:
                        raise RuntimeError(err)
                    feats = model(enc.preprocess(tiles)).float()
                    finite &= bool(torch.isfinite(feats).all())
                    n_emb += len(tiles)
        finally:
            batches.close()
        status = "embedded (subset, not stored)" if finite else "non-finite features"
    t_embed = time.perf_counter() - t1
    return {
        "tile_seconds": t_tile,
        "embed_seconds": t_embed,
        "tiles": int(n),
        "embedded_tiles": n_emb,
        "embed_every_nth": step,
        "embed_status": status,
        "dataset": str(ds.path) if hasattr(ds, "path") else str(store),
        **_own_peak(),
    }


def truth_check(work: Path) -> dict:
    """Tiles found vs the truth file: the tissue area in tile footprints, and tiles with ≥ 50 % truth tissue."""
    from workbench import store as st
    from workbench.io.synthetic import load_truth, tile_truth

    g = st.open_store(work / "big.zarr")[st.Key.slide("big")]
    coords, size0 = g["coords"][:], float(g.attrs["size0"])
    truth = load_truth(work / "big.tiff")
    tt = tile_truth(truth, coords, size0)
    return {
        "tile_size0_px": size0,
        "tiles_expected_from_truth": float(truth["tissue"].sum()) * truth["downsample"] ** 2 / size0**2,
        "tiles_with_half_truth_tissue": int((tt["tissue"] >= 0.5).sum()),
    }


def run_stage(args_list: list[str]) -> tuple[dict, float, int]:
    """Run this script as a child with ``args_list``; (its JSON, wall seconds, sampled tree peak RSS)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, *args_list], stdout=subprocess.PIPE, text=True, env=None, cwd=str(HERE.parent)
    )
    peak = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            procs = [ps, *ps.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    out = proc.stdout.read()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"stage {args_list[:2]} failed with exit {proc.returncode}:\n{out}")
    return json.loads(out.strip().splitlines()[-1]), wall, peak


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=150_000 if full_mode() else 40_000)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--embed-max", type=int, default=20_000, help="embed at most about this many tiles")
    ap.add_argument("--stage", choices=["make", "pipeline"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.stage:
        work = Path(args.work)
        res = stage_make(work, args.side) if args.stage == "make" else stage_pipeline(work, args.embed_max)
        print(json.dumps(res), flush=True)
        return res

    free = shutil.disk_usage(args.dir).free
    need = args.side**2 * 3 // 15 + (1 << 30)  # JPEG q90 at ~1/20 of raw, plus the level-1 spill (raw/16)
    if free < need:
        raise SystemExit(f"{args.dir}: {free / 2**30:.1f} GiB free, need about {need / 2**30:.1f} GiB")
    work = Path(tempfile.mkdtemp(prefix="synthetic_big_", dir=args.dir))
    try:
        common = ["--side", str(args.side), "--work", str(work), "--embed-max", str(args.embed_max)]
        made, make_wall, make_tree = run_stage(["--stage", "make", *common])
        file_bytes = (work / "big.tiff").stat().st_size
        pipe, pipe_wall, pipe_tree = run_stage(["--stage", "pipeline", *common])
        pipe.update(truth_check(work))  # here, outside the measured stages
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    level0 = args.side**2 * 3
    result = {
        "side_px": args.side,
        "slide": {**SLIDE, "tile_px": 256, "jpeg_quality": 90, "levels_4x_apart": True},
        "peak_rss_bytes": made["self_peak_rss_bytes"],
        "peak_rss_tree_sampled_bytes": make_tree,
        "level0_rgb_bytes": level0,
        "peak_rss_over_level0": round(made["self_peak_rss_bytes"] / level0, 4),
        "make_seconds": round(made["seconds"], 1),
        "make_wall_seconds_incl_start": round(make_wall, 1),
        "file_bytes": file_bytes,
        "tissue_fraction_truth": round(made["tissue_fraction"], 4),
        "pipeline_peak_rss_bytes": max(pipe_tree, pipe["self_peak_rss_bytes"]),  # tree: DataLoader workers too
        "pipeline_self_peak_rss_bytes": pipe["self_peak_rss_bytes"],
        "pipeline_children_peak_rss_bytes": pipe["children_peak_rss_bytes"],
        "pipeline_peak_rss_tree_sampled_bytes": pipe_tree,
        "tile_seconds": round(pipe["tile_seconds"], 1),
        "embed_seconds": round(pipe["embed_seconds"], 1),
        "pipeline_wall_seconds_incl_start": round(pipe_wall, 1),
        "tiles": pipe["tiles"],
        "tiles_expected_from_truth_area": round(pipe["tiles_expected_from_truth"], 1),
        "tiles_vs_truth": round(pipe["tiles"] / max(pipe["tiles_expected_from_truth"], 1), 3),
        "tiles_with_half_truth_tissue": pipe["tiles_with_half_truth_tissue"],
        "embedded_tiles": pipe["embedded_tiles"],
        "embed_every_nth_tile": pipe["embed_every_nth"],
        "embed_status": pipe["embed_status"],
        "tiling": {"tile_px": 224, "tile_mpp": 0.5, "tile_rule": "mussel", "scheduler": "threads", "workers": 2},
        "encoder": {"name": ENCODER, "device": "cpu"},
        "generator_threads": {"render": 2, "jpeg": 2},
        "note": "2-core machine shared with other jobs while measured",
    }
    return emit("synthetic_big", result)


if __name__ == "__main__":
    main()
