"""Tile search speed vs database size: Flat (exact, the reference) / IVF / HNSW, with recall@10 against exact.

Database: clustered vectors shaped like tile embeddings, not uniform noise — a Gaussian mixture with
skewed cluster sizes (Zipf-like, weight ∝ 1 / (rank + 5)^1.2, about sqrt(N) clusters) where each cluster
spreads over its own random 24-dimensional subspace with a decaying spectrum plus a little isotropic
noise, L2-normalised (cosine). Queries are held-out draws of the same mixture. Latency is the mean
median wall time of one single-vector query (nq = 1, the interactive case); for IVF and HNSW the
benchmark sweeps nprobe / efSearch and reports each setting, then picks the fastest with
recall@10 >= 0.95 at the largest size.

    python benchmarks/retrieval.py                 # 1e3 ... 1e6 x 384 (~6-8 min on 2 cores)
    python benchmarks/retrieval.py --max-n 100000  # quick
"""
from __future__ import annotations

import argparse
import json
import logging
import time


from workbench.search.speed import (TARGET_RECALL, best_approx, clustered_vectors, recall_at,  # noqa: F401
                                    run_size, single_query_ms)

log = logging.getLogger("benchmarks.retrieval")


def format_table(rows: list[dict]) -> str:
    head = f"{'n':>9} {'index':<6} {'params':<22} {'build s':>8} {'query ms':>9} {'recall@10':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['n']:>9} {r['index']:<6} {r['params']:<22} {r['build_s']:>8.2f} {r['query_ms']:>9.3f} "
                     f"{r['recall_at_10']:>9.3f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-n", type=int, default=10**6)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--hnsw-max-n", type=int, default=10**6, help="skip HNSW (slow to build) above this size")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import faiss

    sizes = [n for n in (10**3, 10**4, 10**5, 10**6) if n <= args.max_n]
    log.info("faiss %s, %d threads, dim %d, sizes %s", faiss.__version__, faiss.omp_get_max_threads(), args.dim, sizes)
    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        rows.extend(run_size(n, args.dim, hnsw_max_n=args.hnsw_max_n))
        log.info("n = %d done in %.0f s", n, time.perf_counter() - t0)
    print(format_table(rows))
    n = sizes[-1]
    best = best_approx(rows, n)
    flat_ms = next(r["query_ms"] for r in rows if r["n"] == n and r["index"] == "flat")
    out = {"n": n, "dim": args.dim, "flat_query_ms": round(flat_ms, 3),
           "best_approx_index": best and f"{best['index']}({best['params']})",
           "best_approx_query_ms": best and round(best["query_ms"], 3),
           "recall_at_10": best and round(best["recall_at_10"], 4),
           "best_approx_build_s": best and round(best["build_s"], 1),
           "speedup_vs_flat": best and round(flat_ms / best["query_ms"], 1),
           "target_met": bool(best and best["query_ms"] < 1.0)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
