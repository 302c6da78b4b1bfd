"""Tile reading, like for like: our TileReader against OpenSlide ``read_region``, same threads, same pixels.

Both sides read the same tiles (every tile of a non-overlapping 224-px grid at the slide's own mpp, row-major,
first ``--n``), in batches of ``--batch``, on ``--threads`` threads each, and hand back (n, 224, 224, 3) uint8
arrays. The OpenSlide side calls ``read_region`` once per tile from a thread pool (one OpenSlide handle, as
OpenSlide is thread-safe) and converts RGBA → RGB with a plain channel drop (``cv2.cvtColor``, no alpha
compositing: the slides are opaque); our side decodes each stored tile that a batch touches once, on its own
thread pool, and cuts the tiles from the decoded blocks. Each side's timing covers the whole job: opening
the slide, making the reader, reading every tile. The outputs are asserted identical, pixel for pixel.
Best of ``--repeats``.

Slides: a synthetic pyramidal JPEG TIFF (``--size``² at 0.25 mpp, 256-px stored tiles, from
:mod:`workbench.io.synthetic`, cached under ``data/bench/``) and the shared real SVS
(``../shared/data/CMU-1-Small-Region.svs``, when present). The last line is JSON: ``ratio`` (ours / OpenSlide
tiles per second on the synthetic slide), ``real_ratio``, each side's ``threads`` and ``pixel_work``. Also
written to ``benchmarks/results/tiling.json``.

    python benchmarks/tiling.py [--size 12288] [--threads 2]
"""

import argparse
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "CMU-1-Small-Region.svs"
for cand in (REAL, Path("/work/shared/data/CMU-1-Small-Region.svs")):
    if cand.exists():
        REAL = cand
        break

TILE = 224
PIXEL_WORK = {
    "openslide": "openslide.read_region per tile (RGBA, libjpeg decode of the stored tiles it touches, "
    "OpenSlide's tile cache) + cv2.cvtColor RGBA->RGB (no alpha compositing)",
    "ours": "decode each stored tile a batch touches once (imagecodecs, straight from the file) + copy the "
    "224x224 RGB tile out of the decoded blocks",
}


def grid(width, height, n):
    xy = [(x, y) for y in range(0, height - TILE + 1, TILE) for x in range(0, width - TILE + 1, TILE)]
    return np.array(xy[:n], np.int64)


def openslide_job(path, coords, batch, threads):
    import openslide

    t0 = time.perf_counter()
    osr = openslide.OpenSlide(str(path))

    def one(xy):
        rgba = np.asarray(osr.read_region((int(xy[0]), int(xy[1])), 0, (TILE, TILE)))
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)

    out = np.empty((len(coords), TILE, TILE, 3), np.uint8)
    with ThreadPoolExecutor(threads) as pool:
        for i in range(0, len(coords), batch):
            out[i : i + batch] = list(pool.map(one, coords[i : i + batch]))
    osr.close()
    return time.perf_counter() - t0, out


def ours_job(path, coords, batch, threads):
    from workbench.io.slides import DECODE_CACHE, TileReader, open_slide

    DECODE_CACHE.clear()  # a fresh job: nothing decoded by an earlier repeat
    t0 = time.perf_counter()
    with open_slide(path) as slide:
        reader = TileReader(slide, tile_px=TILE, tile_mpp=slide.mpp, workers=threads)
        assert reader.backend == "tiff-direct" and reader.read_px == TILE, (reader.backend, reader.read_px)
        out = np.empty((len(coords), TILE, TILE, 3), np.uint8)
        for i in range(0, len(coords), batch):
            out[i : i + batch] = reader.read(coords[i : i + batch])
        reader.close()
    return time.perf_counter() - t0, out


def compare(path, coords, args):
    best = {"openslide": float("inf"), "ours": float("inf")}
    outs = {}
    for _ in range(args.repeats):  # alternate sides so machine load affects both alike
        for name, job in (("openslide", openslide_job), ("ours", ours_job)):
            s, outs[name] = job(path, coords, args.batch, args.threads)
            best[name] = min(best[name], s)
    identical = bool(np.array_equal(outs["openslide"], outs["ours"]))
    assert identical, f"{path}: outputs differ in {(outs['openslide'] != outs['ours']).sum()} values"
    n = len(coords)
    res = {
        "n_tiles": n,
        "openslide_tiles_per_s": round(n / best["openslide"], 1),
        "ours_tiles_per_s": round(n / best["ours"], 1),
        "ratio": round(best["openslide"] / best["ours"], 2),
        "identical": identical,
    }
    print(
        f"{Path(path).name}: {n} tiles  openslide {res['openslide_tiles_per_s']:.0f}/s  "
        f"ours {res['ours_tiles_per_s']:.0f}/s  ratio {res['ratio']:.2f}x  identical={identical}",
        flush=True,
    )
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=12288, help="synthetic slide side (level-0 px, 0.25 mpp)")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tiling.json"))
    args = ap.parse_args()
    from workbench.io.synthetic import make_slide

    path = ROOT / "data" / "bench" / f"tiling_{args.size}.tiff"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        make_slide(path, width=args.size, height=args.size, mpp=0.25, seed=7, n_pieces=3, pen=False)
    synth = compare(path, grid(args.size, args.size, args.n), args)
    result = {"slide": f"synthetic {args.size}x{args.size} JPEG TIFF, 256-px stored tiles", **synth}
    if REAL.exists():
        import openslide

        w, h = openslide.OpenSlide(str(REAL)).dimensions
        real = compare(REAL, grid(w, h, args.n), args)
        result.update(
            {
                "real_slide": REAL.name,
                "real_n_tiles": real["n_tiles"],
                "real_openslide_tiles_per_s": real["openslide_tiles_per_s"],
                "real_ours_tiles_per_s": real["ours_tiles_per_s"],
                "real_ratio": real["ratio"],
                "real_identical": real["identical"],
            }
        )
    result.update(
        {
            "tile_px": TILE,
            "batch": args.batch,
            "repeats": args.repeats,
            "timing": "whole job: open + reader + read all, best of repeats",
            "openslide": {"threads": args.threads, "pixel_work": PIXEL_WORK["openslide"]},
            "ours": {"threads": args.threads, "pixel_work": PIXEL_WORK["ours"]},
            "machine": {
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "load_avg_1_5_15_at_end": [round(v, 2) for v in os.getloadavg()],
            },
        }
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
