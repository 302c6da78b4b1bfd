"""Out-of-core level-1 k-means over a float16 zarr store: fit on a sample, assign every row by streaming.

``python benchmarks/kmeans_out_of_core.py --n 10000000 --dim 384 --k 4096``

1. Writes ``--n`` × ``--dim`` float16 embeddings from a skewed Gaussian mixture (``--k`` components,
   Dirichlet(0.3) sizes, a few NaN rows) into a zarr v3 array, chunk by chunk (never all in RAM).
2. Fits :class:`workbench.curate.cluster.HierarchicalKMeans` with levels ``[k, k/16, k/256]``, level 1 on a
   random sample of ``--sample-per-cluster`` (50) rows per cluster (no resampling at level 1, as the
   reference's web-scale config), then streams every row from the store and assigns it (tqdm bar);
   the levels above run on the centroids with 10 resampling steps.
3. Reports wall time per phase, peak RSS (``resource.getrusage``; plus a psutil sampler for the fit
   phase alone), NaN rows found, purity of level 1 against the mixture components, and an
   extrapolation of the fit to 10 M rows. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import threading
import time
from pathlib import Path

import numpy as np


def write_store(path: Path, n: int, dim: int, k: int, chunk: int, seed: int = 0):
    """Skewed Gaussian mixture into a float16 zarr array; returns the (n,) int16 component of each row."""
    import zarr

    rng = np.random.default_rng(seed)
    centres = (rng.normal(size=(k, dim)) * 0.6).astype(np.float32)
    p = rng.dirichlet(np.full(k, 0.3))
    arr = zarr.create_array(str(path), shape=(n, dim), chunks=(chunk, dim), dtype="float16", overwrite=True)
    truth = np.empty(n, np.int16 if k < 32768 else np.int32)
    for a in range(0, n, chunk):
        m = min(chunk, n - a)
        comp = rng.choice(k, size=m, p=p)
        x = centres[comp] + rng.normal(size=(m, dim)).astype(np.float32) * 0.25
        if a == 0:
            x[:3] = np.nan  # a few broken rows: must come out as -1
        arr[a : a + m] = x.astype(np.float16)
        truth[a : a + m] = comp
    return arr, truth


class PeakRSS:
    """Samples this process's RSS every 0.2 s in a thread (peak of a phase, not of the process)."""

    def __enter__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.2)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def purity(labels: np.ndarray, truth: np.ndarray) -> float:
    ok = labels >= 0
    lab, tru = labels[ok].astype(np.int64), truth[ok].astype(np.int64)
    kt = int(tru.max()) + 1
    table = np.bincount(lab * kt + tru, minlength=(int(lab.max()) + 1) * kt).reshape(-1, kt)
    return float(table.max(1).sum() / ok.sum())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _results import full_mode  # quick sizes unless BENCH_FULL=1 (make benchmarks)

    ap.add_argument("--n", type=int, default=10_000_000 if full_mode() else 200_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=4096 if full_mode() else 1024)
    ap.add_argument("--sample-per-cluster", type=int, default=50)
    ap.add_argument("--n-iter", type=int, default=50)
    ap.add_argument("--chunk", type=int, default=65536, help="rows per store chunk and per streamed read")
    ap.add_argument("--store", default="/tmp/kmeans_out_of_core.zarr")
    ap.add_argument("--keep", action="store_true", help="keep the store afterwards")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log = logging.getLogger("bench.ooc")

    from workbench.curate.cluster import HierarchicalKMeans

    path = Path(args.store)
    t0 = time.perf_counter()
    arr, truth = write_store(path, args.n, args.dim, args.k, args.chunk)
    t_write = time.perf_counter() - t0
    log.info("wrote %d x %d float16 (%.2f GB) in %.0f s", args.n, args.dim, args.n * args.dim * 2 / 1e9, t_write)

    import zarr

    X = zarr.open_array(str(path), mode="r")  # fresh handle: nothing cached from writing
    levels = [args.k, max(2, args.k // 16), max(2, args.k // 256)]
    hk = HierarchicalKMeans(
        levels=levels,
        resampling_steps=[0, 10, 10],
        n_iter=args.n_iter,
        backend="torch",
        device="cpu",
        chunk_size=args.chunk,
        fit_sample_per_cluster=args.sample_per_cluster,
        progress=True,
        random_state=0,
    )
    with PeakRSS() as mem:
        t1 = time.perf_counter()
        hk.fit(X)
        t_fit = time.perf_counter() - t1
    phases = dict(getattr(hk, "timings_", {}))
    lab = hk.labels_[0]
    out = {
        "n": args.n,
        "dim": args.dim,
        "k": args.k,
        "sample_per_cluster": args.sample_per_cluster,
        "levels": levels,
        "n_iter": args.n_iter,
        "write_s": round(t_write, 1),
        "fit_s": round(t_fit, 1),
        **{f"{k}_s": round(v, 1) for k, v in phases.items()},
        "fit_peak_rss_gb": round(mem.peak / 1e9, 2),
        "process_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2),
        "n_invalid": hk.n_invalid_,
        "purity_level_1": round(purity(lab, truth), 4),
        "n_iter_level_1": hk.n_iter_[0],
    }
    if "assign_s" in out and "sample_fit_s" in out:
        # the sample fit does not grow with n; reading the sample and assigning grow linearly
        scale = 10_000_000 / args.n
        out["extrapolated_10M_fit_min"] = round(
            (out["sample_fit_s"] + scale * (out.get("read_sample_s", 0) + out["assign_s"]) + out.get("upper_s", 0))
            / 60,
            1,
        )
    if not args.keep:
        shutil.rmtree(path, ignore_errors=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
