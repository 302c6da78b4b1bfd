"""k-means assignment over the store's chunks on a Dask cluster: 1 vs 2 single-threaded workers.

    make benchmarks SCALE=1 BENCHMARKS=assign_scale       # 10^7 x 384, k = 256: the committed figure
    python benchmarks/assign_scale.py --rows 10000000     # the same by hand (~5 min quiet, ~15 min at load 7)
    python benchmarks/assign_scale.py --rows 1000000      # 10^6 (~2 min at load 7)

Without ``--rows`` the size follows the benchmark mode (:func:`_results.scale_rows`): 10^5 quick, 10^6 with
``BENCH_FULL=1``, 10^7 with ``BENCH_SCALE=1``; only a 10^7 run writes ``benchmarks/results/assign_scale.json``.

Reuses the on-disk float16 Zarr array of :mod:`scale_data` (written if missing). Each run is the whole job:
start a ``distributed.LocalCluster`` (processes, ``threads_per_worker=1``; dask's nanny pins BLAS/OpenMP to
one thread per worker), assign every row to ``k`` fixed centroids with
:func:`workbench.curate.kmeans.assign_chunks` (one task per 50,000-row chunk, centroids broadcast, each worker
reads its own chunks, labels and partial counts/sums/inertia gathered), close the cluster. Same rows, same
centroids, same code on both sides; only the number of workers differs. ``identical``: the 1-worker and
2-worker labels, counts and sums are equal, and equal to the single-process path (no Dask) on the first
``--check-rows`` rows. Rows/s per core and the time 350 M tiles would take on N such workers (assignment at
this k scales with k·d per row) are in the JSON. ``profile`` times one chunk in this process (Zarr read,
:func:`block_partials`: float16 widening, row norms, matmul + argmin, partial sums) and the bytes a task sends
back (labels and squared distances, 8 bytes a row, straight from the worker to the client, not through the
scheduler; sums and counts per chunk). The machine is shared: other jobs depress the speedup.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import finish, scale_rows, write
from scale_data import DEFAULT_PATH, mixture_store

log = logging.getLogger("benchmarks.assign_scale")


class Head:
    """The first n rows of a Zarr array (picklable: a reference, not the data)."""

    def __init__(self, arr, n):
        self.arr, self.shape, self.chunks, self.dtype = arr, (int(n), int(arr.shape[1])), arr.chunks, arr.dtype

    def __getitem__(self, sl):
        a, b, _ = sl.indices(self.shape[0])
        return self.arr[a:b]


def run(X, C, workers: int) -> tuple[dict, float]:
    from distributed import Client, LocalCluster

    from workbench.curate.kmeans import assign_chunks

    t0 = time.perf_counter()
    with (
        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cl,
        Client(cl) as client,
    ):
        out = assign_chunks(X, C, client=client)
    return out, time.perf_counter() - t0


def profile_chunk(arr, C, rows: int = 50_000, reps: int = 3) -> dict:
    """Median seconds of one chunk's read and kernel in this process (1 torch thread, as on a worker)."""
    import torch

    from workbench.curate.kmeans import _float32_rows, block_partials

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = {"read_s": [], "widen_s": [], "block_partials_s": []}
        for _ in range(reps):
            t0 = time.perf_counter()
            block = np.asarray(arr[:rows])
            t1 = time.perf_counter()
            _float32_rows(block, torch.device("cpu"))
            t2 = time.perf_counter()
            p = block_partials(block, C, device="cpu")
            t3 = time.perf_counter()
            t["read_s"].append(t1 - t0)
            t["widen_s"].append(t2 - t1)
            t["block_partials_s"].append(t3 - t2)
    finally:
        torch.set_num_threads(threads)
    out = {k: round(float(np.median(v)), 3) for k, v in t.items()}
    out["rows"] = rows
    out["kernel_rows_per_s"] = round(rows / out["block_partials_s"])
    out["gflops_matmul"] = round(2 * rows * C.shape[0] * C.shape[1] / 1e9, 2)
    out["bytes_back_per_chunk"] = int(p["labels"].nbytes + p["sqdist"].nbytes + p["sums"].nbytes + p["counts"].nbytes)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=None, help="rows (default: 10^5 quick, 10^6 full, 10^7 scale)")
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--check-rows", type=int, default=500_000)
    ap.add_argument("--path", default=DEFAULT_PATH)
    args = ap.parse_args(argv)
    args.rows = args.rows or scale_rows()
    args.check_rows = min(args.check_rows, args.rows)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import zarr

    from workbench.curate.kmeans import assign_chunks

    try:  # reuse the search_scale array (any complete mixture array with enough rows)
        arr = zarr.open_array(args.path, mode="r")
        if not arr.attrs.get("complete") or arr.shape[0] < args.rows:
            raise FileNotFoundError
    except Exception:
        arr = mixture_store(args.path, args.rows)
    X = Head(arr, args.rows)
    rng = np.random.default_rng(0)
    C = np.asarray(arr[:50_000], np.float32)[rng.choice(50_000, args.k, replace=False)]
    prof = profile_chunk(arr, C)
    log.info("one chunk: %s", prof)
    one, t1 = run(X, C, 1)
    log.info("1 worker: %.1f s", t1)
    two, t2 = run(X, C, 2)
    log.info("2 workers: %.1f s", t2)
    local = assign_chunks(Head(arr, args.check_rows), C)
    same = bool(
        np.array_equal(one["labels"], two["labels"])
        and np.array_equal(one["counts"], two["counts"])
        and np.array_equal(one["sums"], two["sums"])
        and np.array_equal(one["labels"][: args.check_rows], local["labels"])
    )
    r1, r2 = args.rows / t1, args.rows / t2
    per_core = r2 / 2
    out = {
        "rows": args.rows,
        "d": int(arr.shape[1]),
        "k": args.k,
        "rows_per_s_1_worker": round(r1),
        "rows_per_s_2_workers": round(r2),
        "speedup": round(t1 / t2, 3),
        "identical": same,
        "seconds_1_worker": round(t1, 1),
        "seconds_2_workers": round(t2, 1),
        "rows_per_s_per_core": round(per_core),
        "hours_350M_tiles": {str(n): round(350e6 / (per_core * n) / 3600, 2) for n in (1, 8, 32, 128)},
        "settings": {
            "cluster": "LocalCluster(processes=True, threads_per_worker=1)",
            "chunk_rows": 50_000,
            "store": "zarr float16, uncompressed, on disk",
            "includes": "cluster start + assign + gather",
        },
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 1),
        "machine": "shared",
    }
    out["profile_one_chunk"] = prof
    out["seconds_per_chunk_1_worker"] = round(t1 / -(-args.rows // 50_000), 3)
    # the committed figure (benchmarks/results/assign_scale.json) is the 10^7 run; smaller runs go to results/quick/
    out = finish("assign_scale", out, full=args.rows >= 10**7)
    if args.rows >= 10**7:
        out["mode"] = "scale"
    log.info("wrote %s", write("assign_scale", out, full=args.rows >= 10**7))
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
