"""Tile search speed vs database size: Flat (exact) / IVF / HNSW on clustered vectors, recall@10 against exact.

Used by ``benchmarks/retrieval.py`` (the full 1e6 run) and notebook 05 (the small sizes). The database is a
Gaussian mixture with skewed cluster sizes (Zipf-like, weight ∝ 1 / (rank + 5)^1.2, about sqrt(N)
clusters), each cluster spread over its own random 24-dimensional subspace with a decaying spectrum plus
a little isotropic noise, L2-normalised (cosine): shaped like tile embeddings, not uniform noise.
Latency is the median wall time of one single-vector query (nq = 1, the interactive case).
"""

from __future__ import annotations

import time

import numpy as np

__all__ = ["TARGET_RECALL", "best_approx", "clustered_vectors", "recall_at", "run_size", "single_query_ms"]

TARGET_RECALL = 0.95


def clustered_vectors(n: int, dim: int = 384, *, rank: int = 24, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 unit vectors from a skewed Gaussian mixture with low-rank clusters (see module doc)."""
    rng = np.random.default_rng(seed)
    n_clusters = max(10, int(np.sqrt(n)))
    w = 1.0 / (np.arange(n_clusters) + 5.0) ** 1.2
    sizes = rng.multinomial(n, w / w.sum())
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    scales = (1.0 / np.arange(1, rank + 1) ** 0.7).astype(np.float32)
    scales *= 0.6 / np.sqrt((scales**2).sum())
    x = np.empty((n, dim), np.float32)
    i = 0
    for c, m in enumerate(sizes):
        if m == 0:
            continue
        basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T.astype(np.float32)  # (rank, dim)
        z = rng.standard_normal((m, rank), dtype=np.float32) * scales
        x[i : i + m] = centres[c] + z @ basis + 0.02 * rng.standard_normal((m, dim), dtype=np.float32)
        i += m
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[rng.permutation(n)]


def single_query_ms(index, queries: np.ndarray, k: int = 10, *, clock=time.perf_counter) -> float:
    """Median time (ms) of one-vector searches by ``clock``: wall time by default (the median resists other jobs on
    a shared machine); ``clock=time.thread_time`` gives this thread's CPU time (user + system), what a query
    costs with a core to itself."""
    index.search(queries[:1], k)  # warm-up
    times = []
    for i in range(len(queries)):
        t0 = clock()
        index.search(queries[i : i + 1], k)
        times.append(clock() - t0)
    return 1e3 * float(np.median(times))


def recall_at(ids: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ids, truth)]))


def run_size(n: int, dim: int, *, n_queries: int = 200, hnsw_max_n: int = 10**6, seed: int = 0) -> list[dict]:
    """Rows (n, index, params, build_s, query_ms, recall_at_10) for one database size."""
    from workbench.search.retrieval import TileIndex

    x = clustered_vectors(n + n_queries, dim, seed=seed)
    q, x = x[n:], x[:n]
    rows = []
    exact = TileIndex("flat").fit(x, digest="bench")
    _, truth = exact.search(q, 10)
    lat_q = q[: min(n_queries, 20 if n >= 10**5 else n_queries)]  # exact single queries are slow at 1e6
    rows.append(
        {
            "n": n,
            "index": "flat",
            "params": "",
            "build_s": exact.build_seconds_,
            "query_ms": single_query_ms(exact.index_, lat_q),
            "recall_at_10": 1.0,
        }
    )
    del exact
    nlist = int(min(1024, max(8, 4 * np.sqrt(n))))
    ivf = TileIndex("ivf", nlist=nlist, nprobe=1).fit(x, digest="bench")
    for nprobe in (1, 2, 3, 4, 6, 8, 16, 32):
        if nprobe > nlist:
            break
        ivf.index_.nprobe = nprobe
        _, ids = ivf.index_.search(q, 10)
        rows.append(
            {
                "n": n,
                "index": "ivf",
                "params": f"nlist={nlist},nprobe={nprobe}",
                "build_s": ivf.build_seconds_,
                "query_ms": single_query_ms(ivf.index_, q),
                "recall_at_10": recall_at(ids, truth),
            }
        )
    del ivf
    if n <= hnsw_max_n:
        hnsw = TileIndex("hnsw", M=32, ef_construction=40).fit(x, digest="bench")
        for ef in (16, 32, 64, 128):
            hnsw.index_.hnsw.efSearch = ef
            _, ids = hnsw.index_.search(q, 10)
            rows.append(
                {
                    "n": n,
                    "index": "hnsw",
                    "params": f"M=32,efSearch={ef}",
                    "build_s": hnsw.build_seconds_,
                    "query_ms": single_query_ms(hnsw.index_, q),
                    "recall_at_10": recall_at(ids, truth),
                }
            )
    return rows


def best_approx(rows: list[dict], n: int) -> dict | None:
    """Fastest approximate setting at size n with recall@10 >= 0.95."""
    ok = [r for r in rows if r["n"] == n and r["index"] != "flat" and r["recall_at_10"] >= TARGET_RECALL]
    return min(ok, key=lambda r: r["query_ms"]) if ok else None
