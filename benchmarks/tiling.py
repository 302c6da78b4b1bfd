"""Tiling reads: our batched TIFF tile reader vs OpenSlide read_region once per tile, same tiles, same process.

Reads the first ``--n`` tissue-grid tiles (row-major, 224 px at the slide's own mpp, as DESIGN.md §8) from a
synthetic pyramidal JPEG TIFF (256-px stored tiles), in batches of ``--batch``. Best of ``--repeats``.
Last line: JSON with batched_tiles_per_s (ours), per_tile_tiles_per_s (OpenSlide), ratio (batched / per-tile),
plus the resampled case (0.25 → 0.5 mpp, read at level 0 and shrunk).
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from workbench.io.slides import TileReader, open_slide
from workbench.io.synthetic import make_slide


def rate(reader_factory, coords, batch, repeats):
    best = 0.0
    for _ in range(repeats):
        reader = reader_factory()  # fresh reader: no warm decode cache between repeats
        t0 = time.perf_counter()
        for i in range(0, len(coords), batch):
            reader.read(coords[i:i + batch])
        best = max(best, len(coords) / (time.perf_counter() - t0))
        reader.close() if hasattr(reader, "close") else None
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=12288)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.tiff"
        make_slide(path, width=args.size, height=args.size, mpp=0.25, seed=7, n_pieces=3, pen=False)
        results = {}
        with open_slide(path) as slide:
            for label, tile_mpp in (("native", 0.25), ("resampled", 0.5)):
                size0 = round(224 * tile_mpp / 0.25)
                grid = np.array([(x, y) for y in range(0, args.size - size0, size0)
                                 for x in range(0, args.size - size0, size0)])[: args.n]
                ref = rate(lambda: TileReader(slide, tile_mpp=tile_mpp, fast=False), grid, args.batch, args.repeats)
                ours = rate(lambda: TileReader(slide, tile_mpp=tile_mpp, workers=args.workers), grid, args.batch,
                            args.repeats)
                print(f"{label:10s} {len(grid)} tiles: openslide {ref:8.0f} tiles/s   ours {ours:8.0f} tiles/s   "
                      f"ratio {ours / ref:.2f}x")
                results[label] = (ref, ours, len(grid))
    ref, ours, n = results["native"]
    rref, rours, _ = results["resampled"]
    print(json.dumps({"n_tiles": n, "per_tile_tiles_per_s": round(ref, 1), "batched_tiles_per_s": round(ours, 1),
                      "ratio": round(ours / ref, 2), "resampled_per_tile_tiles_per_s": round(rref, 1),
                      "resampled_batched_tiles_per_s": round(rours, 1), "resampled_ratio": round(rours / rref, 2),
                      "workers": args.workers}))


if __name__ == "__main__":
    main()
