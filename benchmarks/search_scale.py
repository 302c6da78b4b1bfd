"""Compressed tile search at 10^7 x 384: the ``ivfpq`` index (IVF-HNSW + PQ codes) with exact re-rank.

    make benchmarks SCALE=1 BENCHMARKS=search_scale        # 10^7, the committed figure (~70 min on 2 shared cores)
    python benchmarks/search_scale.py --n 10000000          # the same, by hand
    python benchmarks/search_scale.py --n 1000000           # 10^6 (~20 min; reuses the 10^7 array's prefix if present)
    python benchmarks/search_scale.py --n 10000000 --cache /tmp/wb_scale/cache   # saves / reuses the built indexes
    python benchmarks/search_scale.py --cleanup             # delete the on-disk array afterwards

Without ``--n`` the size follows the benchmark mode (:func:`_results.scale_rows`): 10^5 quick, 10^6 with
``BENCH_FULL=1``, 10^7 with ``BENCH_SCALE=1``; only the 10^7 run writes ``benchmarks/results/search_scale.json``.

Data (:mod:`scale_data`): a hard mixture — 2,000 isotropic Gaussian components, noise 0.6, L2-normalised,
float16 in an uncompressed Zarr array on disk (``/tmp/wb_scale/x.zarr``, 7.7 GB at 10^7, kept for
``assign_scale.py``), written chunk by chunk (never all in memory). Queries: 500 held-out draws of the same
mixture. Ground truth: exact cosine top-10 over each database prefix, computed in one chunked pass.

For each size on the curve (10^5, 10^6, 10^7 rows; prefixes of the same array) the benchmark builds
:class:`workbench.search.retrieval.TileIndex` ``"ivfpq"`` with the library's defaults for that n and d
(:meth:`IVFPQKind.defaults`: nlist, pq_m, nprobe, rerank; trained on a sample, filled chunk by chunk from the
Zarr array) and sweeps ``nprobe`` x ``rerank`` around them. For every setting it reports the recall@10 after
the exact re-rank (candidates re-scored from the float16 rows, read from the memory-mapped chunk files —
the layout :func:`build_store_index` writes for a store, see ``rerank_rows`` in the JSON) and the recall of
the candidate list itself (how many of the true top-10 the PQ codes put among the ``rerank`` candidates):
where recall is lost. Latency is the median wall time of a one-vector query (nq = 1, faiss on 1 thread)
including the re-rank. Index memory is the size of the serialised faiss index (codes, ids, coarse quantizer
and its graph). Each size reports the library-default setting and the fastest setting with recall@10 >= 0.9;
the last line (JSON) gives the largest size's default figures (``n``, ``d``, ``index_bytes``, ``query_ms``,
``recall_at_10``), the whole ``curve``, the 1-minute load average sampled through the run, build time and
peak RSS. The machine is shared (2 cores): the load average says how much.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_data import CHUNK, DEFAULT_PATH, exact_topk, mixture_store, queries

from workbench.search.speed import recall_at, single_query_ms

log = logging.getLogger("benchmarks.search_scale")
TARGET_RECALL = 0.9
RESULTS = Path(__file__).resolve().parent / "results" / "search_scale.json"


class Prefix:
    """The first ``n`` rows of a Zarr array, as TileIndex.fit reads them (slices; random rows via FeatureRows).

    ``copy``: the raw float16 re-rank copy of the whole array (:func:`write_rerank_rows`, what
    ``build_store_index`` writes beside a compressed index); the re-rank reads its first n rows.
    """

    def __init__(self, arr, n: int, copy=None):
        from workbench.search.retrieval import FeatureRows

        self.arr, self.shape, self.dtype = arr, (int(n), int(arr.shape[1])), arr.dtype
        self.rows = FeatureRows(copy[:n] if copy is not None else arr, n=n)

    def __getitem__(self, sl):
        start, stop, _ = sl.indices(self.shape[0])
        return self.arr[start:stop]

    def get_orthogonal_selection(self, sel):
        return self.rows(sel[0])


def index_bytes(index) -> int:
    import faiss

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "i.faiss")
        faiss.write_index(index, p)
        return os.path.getsize(p)


class LoadSampler:
    """The 1-minute load average, sampled every ``every`` seconds in a thread (the machine is shared)."""

    def __init__(self, every: float = 15.0):
        import threading

        self.samples, self._stop = [], threading.Event()
        self._t = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._t.start()

    def _run(self, every):
        while True:
            self.samples.append(round(os.getloadavg()[0], 2))
            if self._stop.wait(every):
                return

    def summary(self) -> dict:
        self._stop.set()
        s = self.samples or [float("nan")]
        return {"min": min(s), "median": float(np.median(s)), "max": max(s), "samples": len(s), "every_s": 15}


def rss_parts() -> dict:
    """This process's resident memory now: anonymous (heap: the index, arrays) and file-backed (mapped files)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = {"RssAnon:": "rss_anon_bytes", "RssFile:": "rss_file_bytes"}.get(line.split(":")[0] + ":")
            if key:
                out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def candidate_recall(idx, q: np.ndarray, truth: np.ndarray, fetch: int) -> float:
    """Share of the true top-10 among the ``fetch`` candidates the PQ codes rank first (before the re-rank)."""
    _, cand = idx._to_rows(*idx.spec.search(idx, idx.index_, idx._prepare(q), fetch, None))
    return float(np.mean([np.isin(t, c).mean() for t, c in zip(truth, cand)]))


def rerank_read_ms(rows_reader, n: int, fetch: int, reps: int = 50) -> float:
    """Median ms to read ``fetch`` scattered rows (sorted per chunk) for one query's re-rank."""
    rng = np.random.default_rng(5)
    times = []
    for _ in range(reps):
        ids = rng.integers(0, n, fetch)
        t0 = time.perf_counter()
        rows_reader(ids)
        times.append(time.perf_counter() - t0)
    return round(1e3 * float(np.median(times)), 3)


def rerank_copy(arr, path: str):
    """The raw float16 copy of ``arr`` the re-rank reads (written once, ~1-2 min at 10^7; reused when complete)."""
    from workbench.search.retrieval import open_rerank_rows, write_rerank_rows

    digest = json.dumps(arr.attrs.get("spec"), sort_keys=True)
    got = open_rerank_rows(path, digest, arr.shape)
    if got is None:
        t0 = time.perf_counter()
        got = write_rerank_rows(arr, path, digest, block_rows=CHUNK)
        log.info("wrote the re-rank copy %s in %.0f s", path, time.perf_counter() - t0)
    return got


def run_size(
    arr, copy, n: int, q: np.ndarray, truth: np.ndarray, *, nprobes, reranks, overrides: dict, cache=None
) -> dict:
    from workbench.search.retrieval import KINDS, TileIndex

    defaults = KINDS["ivfpq"].defaults(n, int(arr.shape[1]))
    params = {**defaults, **{k: v for k, v in overrides.items() if v is not None}}
    t0 = time.perf_counter()
    tag = "-".join(f"{k}{v}" for k, v in sorted(params.items()))
    saved = Path(cache) / f"ivfpq-{n}-{tag}.faiss" if cache else None
    if saved is not None and saved.exists():  # an index this benchmark built and saved before (--cache)
        idx = TileIndex.load(saved, features=Prefix(arr, n, copy).rows)
        build_s = idx.build_seconds_
        log.info("n=%d: loaded %s (built in %.0f s)", n, saved, build_s)
    else:
        idx = TileIndex("ivfpq", progress=True, batch_rows=CHUNK, **params).fit(Prefix(arr, n), digest=f"bench-{n}")
        idx.attach_features(Prefix(arr, n, copy).rows)
        build_s = time.perf_counter() - t0
        if saved is not None:
            idx.save(saved)
    cold_ms = rerank_read_ms(idx._features, n, int(params["rerank"]), reps=20)  # first touches of the mapping
    warm_s = idx._features.warm()  # what a search service does once after loading
    log.info("n=%d: re-rank reads %.2f ms cold; warmed the mapping in %.1f s", n, cold_ms, warm_s)
    import faiss

    faiss.omp_set_num_threads(1)  # queries: one thread (the build used every core)
    size = index_bytes(idx.index_)
    grid = sorted({(int(params["nprobe"]), int(params["rerank"]))} | {(a, b) for a in nprobes for b in reranks})
    settings = []
    for nprobe, rerank in grid:
        idx.nprobe, idx.rerank = nprobe, rerank
        idx.spec.configure(idx, idx.index_)
        _, ids = idx.search(q, 10)
        rec = recall_at(ids, truth)
        cand = candidate_recall(idx, q, truth, rerank)
        ms = single_query_ms(idx, q[:200])
        cpu_ms = single_query_ms(idx, q[:200], clock=time.thread_time)
        settings.append(
            {
                "nprobe": nprobe,
                "rerank": rerank,
                "query_ms": round(ms, 3),
                "query_cpu_ms": round(cpu_ms, 3),
                "recall_at_10": round(rec, 4),
                "candidate_recall": round(cand, 4),
                "default": (nprobe, rerank) == (int(params["nprobe"]), int(params["rerank"])),
            }
        )
        log.info(
            "n=%d nprobe=%d rerank=%d: %.2f ms/query (%.2f ms CPU), recall@10 %.3f (candidates hold %.3f of the "
            "true top-10)",
            n,
            nprobe,
            rerank,
            ms,
            cpu_ms,
            rec,
            cand,
        )
    default = next(s for s in settings if s["default"])
    mem = rss_parts()  # after the sweep: index loaded, re-rank copy mapped and warm
    ok = [s for s in settings if s["recall_at_10"] >= TARGET_RECALL]
    fastest = min(ok, key=lambda s: s["query_ms"]) if ok else max(settings, key=lambda s: s["recall_at_10"])
    ivf = idx.spec._ivf(idx.index_)
    return {
        "n": n,
        "nlist": int(ivf.nlist),
        "pq_subquantizers": int(ivf.pq.M),
        "pq_bits": int(ivf.pq.nbits),
        "code_bytes_per_row": int(ivf.code_size) if not hasattr(ivf, "bbs") else int(ivf.pq.M * ivf.pq.nbits // 8),
        "factory": idx.spec.factory_string(idx, arr.shape[1], n),
        "index_bytes": size,
        **mem,
        "build_s": round(build_s, 1),
        "rerank_read_ms": rerank_read_ms(idx._features, n, int(params["rerank"])),
        "rerank_read_ms_cold": cold_ms,
        "warm_s": round(warm_s, 1),
        "nprobe": default["nprobe"],
        "rerank": default["rerank"],
        "query_ms": default["query_ms"],
        "query_cpu_ms": default["query_cpu_ms"],
        "recall_at_10": default["recall_at_10"],
        "candidate_recall": default["candidate_recall"],
        "fastest_at_0.9": {k: fastest[k] for k in ("nprobe", "rerank", "query_ms", "recall_at_10")},
        "settings": settings,
    }


def store_layout_read_ms(arr, rows: int, fetch: int) -> float:
    """The same scattered reads from the store's own layout (zstd-3 + crc32c, 65,536-row chunks), for contrast."""
    import zarr
    from zarr.codecs import Crc32cCodec, ZstdCodec

    from workbench.search.retrieval import FeatureRows

    with tempfile.TemporaryDirectory(dir=str(Path(DEFAULT_PATH).parent)) as d:
        z = zarr.create_array(
            os.path.join(d, "store.zarr"),
            shape=(rows, arr.shape[1]),
            chunks=(65536, arr.shape[1]),
            dtype="float16",
            compressors=[ZstdCodec(level=3), Crc32cCodec()],
        )
        for a in range(0, rows, 65536):
            z[a : a + 65536] = arr[a : min(a + 65536, rows)]
        return rerank_read_ms(FeatureRows(z), rows, fetch, reps=5)


def main(argv=None) -> dict:
    from _results import finish, scale_rows, write

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=None, help="database rows (default: 10^5 quick, 10^6 full, 10^7 scale)")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--nq", type=int, default=500)
    ap.add_argument("--nlist", type=int, default=None, help="override the library default for every size")
    ap.add_argument("--pq-m", type=int, default=None, help="bytes per row (library default d/4: 96 at 384-d)")
    ap.add_argument("--pq-bits", type=int, default=None, help="4 (fast-scan, the default) or 8")
    ap.add_argument("--nprobe", default="16,32", help="nprobe values swept besides the default")
    ap.add_argument("--rerank", default="256,1000", help="rerank values swept besides the default")
    ap.add_argument("--path", default=DEFAULT_PATH)
    ap.add_argument("--cleanup", action="store_true", help="delete the on-disk array at the end")
    ap.add_argument(
        "--cache",
        default=None,
        help="directory to save each built index and the exact top-10 in, and to load them from on a rerun "
        "(build_s is then the first build's)",
    )
    ap.add_argument(
        "--build-run",
        default=None,
        help="the JSON of the run that built the cached indexes: its peak RSS, total time and load go into "
        "build_run (a rerun that loads the indexes measures queries only)",
    )
    args = ap.parse_args(argv)
    args.n = args.n or scale_rows()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import faiss

    faiss.omp_set_num_threads(1)  # single-query latency is measured on one thread; the build uses both cores
    t0 = time.perf_counter()
    load = LoadSampler()
    import zarr

    try:  # a complete mixture array with at least n rows (e.g. the 10^7 one, for a quicker smaller run)
        arr = zarr.open_array(args.path, mode="r")
        if not arr.attrs.get("complete") or arr.shape[0] < args.n or arr.shape[1] != args.d:
            raise FileNotFoundError
    except Exception:
        arr = mixture_store(args.path, args.n, args.d)
    sizes = [s for s in (10**5, 10**6, 10**7) if s < args.n] + [args.n]
    copy = rerank_copy(arr, args.path.rstrip("/").removesuffix(".zarr") + ".rerank.f16")
    q = queries(args.nq, args.d)
    t1 = time.perf_counter()
    tfile = Path(args.cache) / f"truth-{args.n}-{args.nq}.npz" if args.cache else None
    if tfile is not None and tfile.exists():
        with np.load(tfile) as z:
            truth = {int(k): z[k] for k in z.files}
    else:
        truth = exact_topk(arr, q, 10, sizes)
        if tfile is not None:
            tfile.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tfile, **{str(k): v for k, v in truth.items()})
    truth_s = time.perf_counter() - t1
    log.info("exact top-10 of %d queries over %d rows in %.0f s", args.nq, args.n, truth_s)
    curve = []
    for n in sizes:
        faiss.omp_set_num_threads(os.cpu_count() or 1)  # build on every core
        over = {"nlist": args.nlist, "pq_m": args.pq_m, "pq_bits": args.pq_bits}
        row = run_size(
            arr,
            copy,
            n,
            q,
            truth[n],
            nprobes=[int(v) for v in args.nprobe.split(",")],
            reranks=[int(v) for v in args.rerank.split(",")],
            overrides=over,
            cache=args.cache,
        )
        curve.append(row)
        log.info("n=%d: %s", n, {k: v for k, v in row.items() if k != "settings"})
    top = curve[-1]
    store_ms = store_layout_read_ms(arr, min(args.n, 10 * 65536), top["rerank"])
    out = {
        "n": args.n,
        "d": args.d,
        "index_bytes": top["index_bytes"],
        "rss_anon_bytes": top.get("rss_anon_bytes"),
        "rss_file_bytes": top.get("rss_file_bytes"),
        "memory_note": "index_bytes: the serialised faiss index (codes, ids, coarse quantizer + graph), what the "
        "index holds in memory; rss_anon_bytes: the process's heap after the 10^7 sweep (index, queries, truth, "
        "Python); rss_file_bytes: pages of the mapped re-rank copy (OS page cache, shared, reclaimable)",
        "query_ms": top["query_ms"],
        "query_cpu_ms": top["query_cpu_ms"],
        "recall_at_10": top["recall_at_10"],
        "candidate_recall": top["candidate_recall"],
        "nprobe": top["nprobe"],
        "rerank": top["rerank"],
        "nlist": top["nlist"],
        "pq_subquantizers": top["pq_subquantizers"],
        "pq_bits": top["pq_bits"],
        "code_bytes_per_row": top["code_bytes_per_row"],
        "factory": top["factory"],
        "settings_source": "library defaults for n and d (IVFPQKind.defaults)"
        if not (args.nlist or args.pq_m or args.pq_bits)
        else f"overrides nlist={args.nlist} pq_m={args.pq_m} pq_bits={args.pq_bits}",
        "build_s": top["build_s"],
        "n_queries": args.nq,
        "data": {"components": 2000, "noise": 0.6, "dtype": "float16", "path": args.path},
        "rerank_rows": {
            "benchmark": "the index is filled from the zarr v3 float16 array (uncompressed, 50,000-row chunks); "
            "the re-rank reads a raw float16 row-major copy of it (one file, memory-mapped, rows sorted, one gather)",
            "store": "features: zarr float16, zstd-3 + crc32c, up to 65,536-row chunks per slide; build_store_index "
            "writes the same raw float16 copy (<store>.indexes/<encoder>-ivfpq.rerank.f16) and load_store_index "
            "memory-maps it: the benchmark's read path",
            "read_ms_uncompressed": top["rerank_read_ms"],
            "read_ms_uncompressed_cold": top["rerank_read_ms_cold"],
            "warm": "after the build the benchmark faults in the copy's pages once (FeatureRows.warm, as a search "
            "service would after loading); query_ms is measured warm, read_ms_uncompressed_cold before",
            "read_ms_store_compressed": store_ms,
            "fetch": top["rerank"],
            "page_cache": "the re-rank copy (7.7 GB at 10^7, on disk) is served from the OS page cache (23 GB RAM): "
            "file-backed pages, not the index's memory; peak_rss_bytes counts those mapped pages too",
        },
        "latency": "query_ms: median wall time of single-vector queries (nq=1), re-rank included, faiss on 1 "
        "thread; query_cpu_ms: median CPU time of the same queries in that thread (user + system, page faults "
        "included): the cost with a core to itself, which the shared machine's load does not inflate",
        "faiss_threads_query": 1,
        "cpu_count": os.cpu_count(),
        "exact_truth_s": round(truth_s, 1),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "total_s": round(time.perf_counter() - t0, 1),
        "load_avg_1min_during_run": load.summary(),
        "machine_note": "2 cores shared with other jobs during the run",
        "bars_met": bool(top["index_bytes"] < 2 * 2**30 and top["query_ms"] < 5 and top["recall_at_10"] >= 0.9),
        "curve": [{k: v for k, v in r.items() if k != "settings"} | {"settings": r["settings"]} for r in curve],
    }
    if args.build_run:
        b = json.loads(Path(args.build_run).read_text())
        out["build_run"] = {
            k: b.get(k) for k in ("peak_rss_bytes", "total_s", "exact_truth_s", "load_avg_1min_during_run", "build_s")
        }
        out["build_run"]["note"] = (
            "the run that built and saved the indexes (same code for the index; its query figures were taken "
            "before the re-rank read path was sped up and are superseded by this run's)"
        )
    if args.cleanup:
        shutil.rmtree(args.path, ignore_errors=True)
        for p in (copy.filename, Path(copy.filename).with_suffix(".json")):
            Path(p).unlink(missing_ok=True)
    # the committed figure (benchmarks/results/search_scale.json) is the 10^7 run; smaller runs go to results/quick/
    out = finish("search_scale", out, full=args.n >= 10**7)
    if args.n >= 10**7:
        out["mode"] = "scale"
    path = write("search_scale", out, full=args.n >= 10**7)
    log.info("wrote %s", path)
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
