"""End to end against the peers: slide → tissue mask → tile grid → every tile read as a 224-px array at 0.5 mpp.

Sides (each run alone in a fresh subprocess, so its peak memory is its own):

``ours``           :func:`workbench.io.tiling.tile_slide` with the defaults (CLAM's/Mussel's segmentation level,
                   the Mussel rule), then :class:`workbench.io.slides.TileReader` on ``--threads`` threads, in
                   batches of 256.
``ours_before``    the same calls on the code before this change (``--before-src``, a checkout of the older
                   ``workbench`` package; skipped when not given).
``histoprep``      HistoPrep's ``SlideReader``: ``get_tissue_mask()``, ``get_tile_coordinates(mask, width)`` with
                   its defaults (``max_background=0.95``), ``yield_regions(..., num_workers=--threads)``; tiles
                   read at level 0 and shrunk to 224 px with ``cv2.INTER_AREA`` in its workers when the footprint
                   is larger (as ours does).
``tiatoolbox``     TIAToolbox's ``WSIReader.open``, ``tissue_mask()`` (its default Otsu at 1.25×), the
                   ``SlidingWindow`` patch extractor at 224 px, resolution in ``baseline`` units (0.5 mpp),
                   iterated (one thread: it has no parallel reader).
``lazyslide``      LazySlide's ``find_tissues``/``tile_tissues`` and tile iteration, when installed.

Per slide and side: ``tiles``; ``mask_grid_s`` (open the slide, mask, grid); ``end_to_end_s`` (that plus reading
every tile into memory); ``tiles_per_s`` (tiles read / end-to-end seconds); ``peak_rss_bytes`` (the subprocess's
peak, libraries included) and ``import_rss_bytes`` (its peak after imports only); ``jaccard_positions``
(Jaccard of the sets of level-0 top-left corners against ours) and ``jaccard_area`` (of the level-0 areas the
tiles cover, on a 16-px raster: grids with different origins still compare). Import time is not counted on
any side. Slides: the shared real SVS and a large synthetic slide (``--big-size``², 0.25 mpp, made once under
``data/bench/``). The peers run in the interpreter ``--peer-python`` (default: ``.venv/bin/python`` of this
checkout when it has them: ``pip install -e '.[bench]'``). The last line is JSON; also written to
``benchmarks/results/peers.json``.

    python benchmarks/peers.py [--big-size 40000] [--threads 2] [--before-src DIR]
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TILE, MPP = 224, 0.5


def _real_slide():
    for cand in (
        ROOT.parent / "shared" / "data" / "CMU-1-Small-Region.svs",
        Path("/work/shared/data/CMU-1-Small-Region.svs"),
    ):
        if cand.exists():
            return cand
    return None


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------- the sides (run in a subprocess)


def side_ours(path, threads):
    import imagecodecs  # noqa: F401  (imported lazily by the reader: import time is left out on every side)
    import openslide  # noqa: F401
    import tifffile  # noqa: F401

    from workbench.io.slides import TileReader, open_slide
    from workbench.io.tiling import TilingParams, tile_slide

    import_rss = _rss()
    t0 = time.perf_counter()
    res = tile_slide(str(path), TilingParams(tile_px=TILE, tile_mpp=MPP))
    coords = np.asarray(res["coords"])
    size0 = int(res["attrs"]["size0"])
    t_mask = time.perf_counter() - t0
    n = 0
    with open_slide(path) as slide, TileReader(slide, tile_px=TILE, tile_mpp=MPP, workers=threads) as reader:
        for i in range(0, len(coords), 256):
            batch = reader.read(coords[i : i + 256])
            n += len(batch)
    return dict(
        tiles=n,
        coords=coords.tolist(),
        size0=size0,
        mask_grid_s=t_mask,
        end_to_end_s=time.perf_counter() - t0,
        import_rss_bytes=import_rss,
    )


def _shrink(tile):
    import cv2

    tile = np.asarray(tile)[..., :3]
    if tile.shape[0] != TILE:
        tile = cv2.resize(tile, (TILE, TILE), interpolation=cv2.INTER_AREA)
    return tile


def side_histoprep(path, threads):
    from histoprep import SlideReader

    import_rss = _rss()
    t0 = time.perf_counter()
    reader = SlideReader(str(path))
    mpp = _mpp(path)
    size0 = int(round(TILE * MPP / mpp)) if abs(MPP / mpp - 1) > 0.02 else TILE
    _, mask = reader.get_tissue_mask()
    coords = reader.get_tile_coordinates(mask, width=size0)
    t_mask = time.perf_counter() - t0
    n = 0
    for tile, _xywh in reader.yield_regions(coords, num_workers=threads, transform=_shrink):
        n += 1
    return dict(
        tiles=n,
        coords=[(int(x), int(y)) for x, y, *_ in coords.coordinates],
        size0=size0,
        mask_grid_s=t_mask,
        end_to_end_s=time.perf_counter() - t0,
        import_rss_bytes=import_rss,
    )


def side_tiatoolbox(path, threads):
    import warnings

    from tiatoolbox.tools.patchextraction import get_patch_extractor
    from tiatoolbox.wsicore.wsireader import WSIReader

    warnings.simplefilter("ignore")
    import_rss = _rss()
    t0 = time.perf_counter()
    wsi = WSIReader.open(str(path))
    mpp = _mpp(path)
    scale = mpp / MPP if abs(MPP / mpp - 1) > 0.02 else 1.0  # baseline units: 1.0 = level 0
    mask = wsi.tissue_mask()
    ext = get_patch_extractor(
        "SlidingWindow",
        input_img=wsi,
        input_mask=mask,
        patch_size=(TILE, TILE),
        stride=(TILE, TILE),
        resolution=scale,
        units="baseline",
    )
    coords = [(int(round(x / scale)), int(round(y / scale))) for x, y in np.asarray(ext.coordinate_list)[:, :2]]
    t_mask = time.perf_counter() - t0
    n = 0
    for patch in ext:
        assert patch.shape[:2] == (TILE, TILE)
        n += 1
    return dict(
        tiles=n,
        coords=coords,
        size0=int(round(TILE / scale)),
        mask_grid_s=t_mask,
        end_to_end_s=time.perf_counter() - t0,
        import_rss_bytes=import_rss,
    )


def side_lazyslide(path, threads):
    import lazyslide as zs
    from wsidata import open_wsi

    import_rss = _rss()
    t0 = time.perf_counter()
    wsi = open_wsi(str(path))
    zs.pp.find_tissues(wsi)
    zs.pp.tile_tissues(wsi, TILE, mpp=MPP)
    tiles_table = wsi["tiles"]
    coords = [(int(x), int(y)) for x, y in zip(tiles_table.bounds.minx, tiles_table.bounds.miny)]
    t_mask = time.perf_counter() - t0
    n = 0
    for _ in wsi.iter.tile_images("tiles"):
        n += 1
    return dict(
        tiles=n,
        coords=coords,
        size0=int(round(TILE * MPP / _mpp(path))),
        mask_grid_s=t_mask,
        end_to_end_s=time.perf_counter() - t0,
        import_rss_bytes=import_rss,
    )


def _mpp(path) -> float:
    import openslide

    p = openslide.OpenSlide(str(path)).properties
    if p.get("openslide.mpp-x"):
        return float(p["openslide.mpp-x"])
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        page = tif.pages[0]
        res = page.tags["XResolution"].value
        return 1e4 / (res[0] / res[1])  # pixels per centimetre → µm per pixel


SIDES = {
    "ours": side_ours,
    "ours_before": side_ours,
    "histoprep": side_histoprep,
    "tiatoolbox": side_tiatoolbox,
    "lazyslide": side_lazyslide,
}


def child(args):
    out = SIDES[args.child](Path(args.slide), args.threads)
    out["peak_rss_bytes"] = _rss()
    Path(args.result).write_text(json.dumps(out))


# --------------------------------------------------------------------------- the parent


def run_side(side, python, slide, threads, env_extra=None, timeout=1200):
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "r.json"
        env = dict(os.environ, **(env_extra or {}))
        cmd = [
            python,
            str(Path(__file__).resolve()),
            "--child",
            side,
            "--slide",
            str(slide),
            "--result",
            str(result),
            "--threads",
            str(threads),
        ]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": [f"did not finish within {timeout} s (--side-timeout)"]}
        if proc.returncode != 0 or not result.exists():
            return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
        return json.loads(result.read_text())


def _area_cells(coords, size0, cell=16):
    """Level-0 area covered by the tiles, as the set of indices of the 16-px cells they cover."""
    coords = np.asarray(sorted(coords), np.int64).reshape(-1, 2)
    if not len(coords):
        return set()
    lo = np.maximum(coords // cell, 0)
    hi = (coords + size0 - 1) // cell + 1
    h, w = int(hi[:, 1].max()), int(hi[:, 0].max())
    raster = np.zeros((h + 1, w + 1), np.int32)  # 2-D difference array, then prefix sums
    np.add.at(raster, (lo[:, 1], lo[:, 0]), 1)
    np.add.at(raster, (lo[:, 1], hi[:, 0]), -1)
    np.add.at(raster, (hi[:, 1], lo[:, 0]), -1)
    np.add.at(raster, (hi[:, 1], hi[:, 0]), 1)
    covered = raster.cumsum(0).cumsum(1) > 0
    ys, xs = np.nonzero(covered)
    return set((ys.astype(np.int64) << 32 | xs).tolist())


def _jaccard(a, b):
    return round(len(a & b) / max(1, len(a | b)), 3)


def _torchvision_stand_in(python):
    """An empty ``torchvision`` on the path when the real one does not import (TIAToolbox imports it at load)."""
    ok = subprocess.run([python, "-c", "import torchvision"], capture_output=True).returncode == 0
    if ok:
        return None
    stub = Path(tempfile.mkdtemp(prefix="peers_stub_")) / "torchvision"
    stub.mkdir()
    (stub / "__init__.py").write_text("# stand-in: see benchmarks/peers.py\n")
    return {"PYTHONPATH": str(stub.parent)}


def _peer_python(arg):
    if arg:
        return arg
    cand = ROOT / ".venv" / "bin" / "python"
    if cand.exists():
        return str(cand)
    return sys.executable


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--slide")
    ap.add_argument("--result")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--big-size", type=int, default=40000)
    ap.add_argument("--peer-python")
    ap.add_argument("--before-src", help="folder holding the older workbench package (for ours_before)")
    ap.add_argument("--peers", default="histoprep,tiatoolbox,lazyslide")
    ap.add_argument("--slides", default="real,big")
    ap.add_argument("--side-timeout", type=int, default=1200, help="seconds one side may take on one slide")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peers.json"))
    args = ap.parse_args()
    if args.child:
        return child(args)

    slides = {}
    if "real" in args.slides and _real_slide():
        slides["real"] = _real_slide()
    if "big" in args.slides:
        big = ROOT / "data" / "bench" / f"synthetic_{args.big_size // 1000}k.tiff"
        if not big.exists():
            from workbench.io.synthetic import make_slide

            big.parent.mkdir(parents=True, exist_ok=True)
            print(f"making {big} ({args.big_size}² px) ...", flush=True)
            make_slide(big, width=args.big_size, height=args.big_size, mpp=0.25, seed=7, n_pieces=3, pen=False)
        slides["big"] = big
    peer_python = _peer_python(args.peer_python)
    ours_env = {"PYTHONPATH": str(ROOT)}
    results = {}
    for key, slide in slides.items():
        res = {"ours": run_side("ours", sys.executable, slide, args.threads, ours_env, args.side_timeout)}
        if args.before_src:
            res["ours_before"] = run_side(
                "ours_before",
                sys.executable,
                slide,
                args.threads,
                {"PYTHONPATH": str(Path(args.before_src).resolve())},
                args.side_timeout,
            )
        for peer in [p for p in args.peers.split(",") if p]:
            env = _torchvision_stand_in(peer_python) if peer == "tiatoolbox" else None
            res[peer] = run_side(peer, peer_python, slide, args.threads, env, args.side_timeout)
            if env:
                res[peer]["note"] = (
                    "torchvision did not import in the peer environment; an empty stand-in module "
                    "satisfied TIAToolbox's import of its registration tool (patch extraction "
                    "does not use torchvision)"
                )
        ours = res["ours"]
        ours_pos = set(map(tuple, ours.get("coords", [])))
        ours_area = _area_cells(ours_pos, ours.get("size0", TILE)) if "coords" in ours else set()
        for side, r in res.items():
            if "coords" not in r:
                print(f"{key:5s} {side:12s} skipped: {r.get('error')}", flush=True)
                continue
            pos = set(map(tuple, r.pop("coords")))
            r["jaccard_positions"] = _jaccard(pos, ours_pos)
            r["jaccard_area"] = _jaccard(_area_cells(pos, r["size0"]), ours_area)
            r["tiles_per_s"] = round(r["tiles"] / r["end_to_end_s"], 1)
            r["mask_grid_s"] = round(r["mask_grid_s"], 3)
            r["end_to_end_s"] = round(r["end_to_end_s"], 3)
            print(
                f"{key:5s} {side:12s} tiles {r['tiles']:6d}  mask+grid {r['mask_grid_s']:7.3f} s  "
                f"end-to-end {r['end_to_end_s']:8.2f} s  {r['tiles_per_s']:7.1f} tiles/s  "
                f"peak RSS {r['peak_rss_bytes'] / 2**20:7.0f} MiB  J(pos) {r['jaccard_positions']:.2f}  "
                f"J(area) {r['jaccard_area']:.2f}",
                flush=True,
            )
        peers_ok = {p: r for p, r in res.items() if p not in ("ours", "ours_before") and "tiles" in r}
        summary = {}
        if peers_ok and "tiles" in ours:
            fast_mask = min(peers_ok, key=lambda p: peers_ok[p]["mask_grid_s"])
            fast_e2e = min(peers_ok, key=lambda p: peers_ok[p]["end_to_end_s"])
            summary = {
                "fastest_peer_mask_grid": fast_mask,
                "mask_grid_ratio": round(peers_ok[fast_mask]["mask_grid_s"] / ours["mask_grid_s"], 2),
                "fastest_peer_end_to_end": fast_e2e,
                "end_to_end_ratio": round(peers_ok[fast_e2e]["end_to_end_s"] / ours["end_to_end_s"], 2),
            }
            if "tiles" in res.get("ours_before", {}):
                summary["peak_rss_before_bytes"] = res["ours_before"]["peak_rss_bytes"]
                summary["peak_rss_after_bytes"] = ours["peak_rss_bytes"]
        results[key] = {"slide": Path(slide).name, "sides": res, **summary}
    out = {
        "tile_px": TILE,
        "tile_mpp": MPP,
        "threads": args.threads,
        "big_size": args.big_size,
        "slides": results,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "shared_with_other_jobs": True},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
