"""Whole k-means fits, initialisation included: ours (torch, k-means|| start) vs faiss.Kmeans, same data, same threads.

    python benchmarks/kmeans.py                       # quick: 50k x 384, k = 250 and 500
    BENCH_FULL=1 python benchmarks/kmeans.py          # full: 200k x 384, k = 1000 and 2000 (committed figures)
    python benchmarks/kmeans.py --n 200000 --ks 1000 2000 --iters 20 --threads 2

Data: float32 Gaussian mixture, k components (the k being fitted) with centres N(0, 9·I), unit isotropic
noise, Dirichlet(0.5) component sizes (so many components are small), seed 0. ``--data sphere``: harder,
embedding-like rows (2k unit-vector centres, noise 0.6, L2-normalised), e.g.
``python benchmarks/kmeans.py --n 200000 --ks 1000 --data sphere --name kmeans_sphere --no-reference``.

Each side runs in its own fresh process (so each BLAS is loaded with its own settings), makes the same data,
then times the whole job that yields centroids *and* every row's label: ``workbench.curate.kmeans.kmeans``
(init + ``--iters`` Lloyd iterations + the final assignment) against ``faiss.Kmeans.train`` (random
start + ``--iters`` iterations, no subsampling: ``max_points_per_centroid = n``) + ``index.search(X, 1)``
for the labels. Both sides use ``--threads`` threads (torch.set_num_threads / faiss.omp_set_num_threads and
threadpoolctl over every BLAS). Final inertia = Σ squared distance of every row to its centroid (float64).
Ours stops early when an assignment leaves every label unchanged (a fixed point: the result equals running all
``--iters``; the iterations it made are in ``ours_iters``); faiss always runs ``--iters``.

Sides, per k:
* ``ours``        – our default start (k-means||), torch CPU (MKL inside torch).
* ``ours_plain``  – the same start with plain Lloyd iterations (every row against every centroid), to show
  what the group bounds save (``--no-plain`` skips it). ``ours`` and ``ours_kmeanspp`` use the bounds (exact:
  the same labels and centroids as plain Lloyd up to float ties, see tests/test_cluster.py).
* ``ours_kmeanspp`` – full greedy k-means++ start, the quality reference (``--no-reference`` skips it).
* ``faiss``       – faiss on its bundled OpenBLAS with the CPU's own kernel: ``OPENBLAS_CORETYPE`` as in the
  environment when threadpoolctl reports a kernel other than ``Prescott``, else set to ``Haswell`` (the AVX2
  kernel; Zen CPUs use it too).
* ``faiss_generic`` – the same with ``OPENBLAS_CORETYPE=Prescott`` (the generic kernel faiss's wheel falls back
  to on CPUs its OpenBLAS does not recognise), only for the ks in ``--generic-ks``.

Full mode also runs faiss, ours and ours_plain on ``--data sphere`` rows for the first k (``sphere`` key).

Keys: ``ratio`` = worst over k of ours / faiss whole-fit seconds (goal <= 1.2); ``inertia_ratio`` = worst
over k of ours / ours_kmeanspp final inertia (goal <= 1.02); ``inertia_ratio_vs_faiss``; ``init``;
per-k details under ``per_k``; each side's ``threads`` and threadpoolctl view under ``sides``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import emit, finish, full_mode, write


def mixture(n: int, dim: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)).astype(np.float32) * 3
    sizes = rng.dirichlet(np.full(k, 0.5))
    comp = rng.choice(k, size=n, p=sizes)
    return (centres[comp] + rng.normal(size=(n, dim)).astype(np.float32)).astype(np.float32)


def sphere_mixture(n: int, dim: int, k: int, seed: int = 0, noise: float = 0.6) -> np.ndarray:
    """Harder, embedding-like data: 2k unit-vector centres, each row ``centre + noise·g/√dim`` L2-normalised
    (the recipe of scale_data.py); clusters touch, so fewer rows keep their label for sure between iterations."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2 * k, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    X = centres[rng.integers(2 * k, size=n)] + rng.normal(size=(n, dim)).astype(np.float32) * (noise / dim**0.5)
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


DATA = {"mixture": mixture, "sphere": sphere_mixture}


def _blas_view() -> list[dict]:
    from threadpoolctl import threadpool_info

    return [
        {k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
        | {"lib": Path(i.get("filepath", "")).name}
        for i in threadpool_info()
        if i.get("user_api") == "blas"
    ]


def run_side(side: str, n: int, dim: int, k: int, iters: int, threads: int, seed: int, data: str = "mixture") -> dict:
    """One whole fit in this process → {seconds, inertia, blas, ...}."""
    from threadpoolctl import threadpool_limits

    X = DATA[data](n, dim, k, seed)
    if side.startswith("ours"):
        import torch

        from workbench.curate.kmeans import kmeans

        torch.set_num_threads(threads)
        init = "k-means++" if side == "ours_kmeanspp" else "k-means||"
        bounds = side != "ours_plain"
        stats = {}
        with threadpool_limits(threads):
            t0 = time.perf_counter()
            C, labels, dist, it = kmeans(
                X,
                k,
                rng=np.random.default_rng(seed),
                init=init,
                n_iter=iters,
                backend="torch",
                device="cpu",
                bounds=bounds,
                stats=stats,
            )
            dt = time.perf_counter() - t0
        inertia = float(np.sum(dist, dtype=np.float64))
        return {
            "side": side,
            "seconds": dt,
            "inertia": inertia,
            "init": init,
            "lloyd": "group bounds (Yinyang-style, exact)" if bounds else "every row every iteration",
            "init_s": round(stats["init_s"], 2),
            "lloyd_s": round(stats["lloyd_s"], 2),
            "distance_fraction": round(stats["distance_fraction"], 3) if "distance_fraction" in stats else 1.0,
            "iters": it,
            "threads": torch.get_num_threads(),
            "blas": f"torch {torch.__version__} " + ("MKL" if torch.backends.mkl.is_available() else "own"),
            "blas_seen": _blas_view(),
        }
    import faiss

    faiss.omp_set_num_threads(threads)
    with threadpool_limits(threads):
        t0 = time.perf_counter()
        km = faiss.Kmeans(
            dim, k, niter=iters, seed=seed + 1, verbose=False, max_points_per_centroid=n, min_points_per_centroid=1
        )
        km.train(X)
        D, labels = km.index.search(X, 1)
        dt = time.perf_counter() - t0
    return {
        "side": side,
        "seconds": dt,
        "inertia": float(np.sum(D, dtype=np.float64)),
        "init": "random",
        "iters": iters,
        "threads": faiss.omp_get_max_threads(),
        "faiss": faiss.__version__,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "blas_seen": _blas_view(),
    }


def _faiss_coretype() -> str | None:
    """OPENBLAS_CORETYPE for faiss's CPU-matched run: keep the environment's unless faiss's OpenBLAS is generic."""
    code = (
        "import faiss, json; from threadpoolctl import threadpool_info; "
        "print(json.dumps([i.get('architecture') for i in threadpool_info() "
        "if i.get('user_api') == 'blas' and 'faiss' in i.get('filepath', '')]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    try:
        arch = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        arch = []
    if arch and all(a and a.lower() != "prescott" for a in arch):
        return os.environ.get("OPENBLAS_CORETYPE")  # already matched
    return "Haswell"


def figures(r: dict) -> dict:
    """One k's figures from its sides' results (``r``: side → run_side output; faiss and ours always there)."""
    d = {
        **{f"{s}_s": round(v["seconds"], 2) for s, v in r.items()},
        **{f"{s}_inertia": v["inertia"] for s, v in r.items()},
        "ratio": round(r["ours"]["seconds"] / r["faiss"]["seconds"], 3),
        "inertia_ratio": (
            round(r["ours"]["inertia"] / r["ours_kmeanspp"]["inertia"], 4) if "ours_kmeanspp" in r else None
        ),
        "inertia_ratio_vs_faiss": round(r["ours"]["inertia"] / r["faiss"]["inertia"], 4),
    }
    if "faiss_generic" in r:
        d["ratio_vs_faiss_generic"] = round(r["ours"]["seconds"] / r["faiss_generic"]["seconds"], 3)
        d["faiss_generic_vs_faiss"] = round(r["faiss_generic"]["seconds"] / r["faiss"]["seconds"], 3)
    if "ours_kmeanspp" in r:
        d["ratio_kmeanspp_vs_faiss"] = round(r["ours_kmeanspp"]["seconds"] / r["faiss"]["seconds"], 3)
    if "ours_plain" in r:
        d["ratio_plain_lloyd_vs_faiss"] = round(r["ours_plain"]["seconds"] / r["faiss"]["seconds"], 3)
    for s, v in r.items():
        for key in ("init_s", "lloyd_s", "distance_fraction", "iters"):
            if key in v and s.startswith("ours"):
                d[f"{s}_{key}"] = v[key]
    return d


def spawn(side: str, args, k: int, coretype: str | None, data: str | None = None) -> dict:
    env = os.environ.copy()
    if side.startswith("faiss"):
        if coretype:
            env["OPENBLAS_CORETYPE"] = coretype
        else:
            env.pop("OPENBLAS_CORETYPE", None)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    cmd = [
        sys.executable,
        __file__,
        "--side",
        side,
        "--n",
        str(args.n),
        "--dim",
        str(args.dim),
        "--ks",
        str(k),
        "--iters",
        str(args.iters),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
        "--data",
        data or args.data,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{side} k={k} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"  k={k} {side:<14} {res['seconds']:8.1f} s  inertia {res['inertia']:.6e}  "
        f"blas {[b.get('architecture') for b in res['blas_seen']]}",
        flush=True,
    )
    return res


def main(argv=None) -> dict:
    full = full_mode()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000 if full else 50_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--ks", type=int, nargs="+", default=[1000, 2000] if full else [250, 500])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--generic-ks",
        type=int,
        nargs="*",
        default=None,
        help="ks for the faiss run on the generic Prescott kernel (default: the first k)",
    )
    ap.add_argument("--no-reference", action="store_true", help="skip the full k-means++ reference fit")
    ap.add_argument("--no-plain", action="store_true", help="skip ours with plain Lloyd (no bounds)")
    ap.add_argument(
        "--data", choices=sorted(DATA), default="mixture", help="mixture (default) or sphere (harder, embedding-like)"
    )
    ap.add_argument("--name", default="kmeans", help="results name (benchmarks/results/NAME.json)")
    ap.add_argument(
        "--sphere-ks",
        type=int,
        nargs="*",
        default=None,
        help="ks for the extra run on sphere data (default: the first k in full mode, none in quick mode)",
    )
    ap.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side in this process
    args = ap.parse_args(argv)
    if args.side:
        print(
            json.dumps(
                run_side(args.side, args.n, args.dim, args.ks[0], args.iters, args.threads, args.seed, args.data)
            )
        )
        return {}

    coretype = _faiss_coretype()
    generic = args.ks[:1] if args.generic_ks is None else args.generic_ks
    print(
        f"kmeans benchmark: n={args.n} dim={args.dim} ks={args.ks} iters={args.iters} threads={args.threads}; "
        f"faiss CPU-matched run with OPENBLAS_CORETYPE={coretype!r} (environment: "
        f"{os.environ.get('OPENBLAS_CORETYPE')!r})",
        flush=True,
    )
    per_k, sides, runs = {}, {}, {}

    def summary() -> dict:
        for k, r in runs.items():
            per_k[str(k)] = figures(r)
            for s, v in r.items():
                sides.setdefault(
                    s,
                    {
                        key: v[key]
                        for key in v
                        if key not in ("seconds", "inertia", "side", "iters", "init_s", "lloyd_s", "distance_fraction")
                    },
                )
        ir = [v["inertia_ratio"] for v in per_k.values() if v["inertia_ratio"] is not None]
        return {
            "n": args.n,
            "dim": args.dim,
            "data": args.data,
            "ks": args.ks,
            "iters": args.iters,
            "threads": args.threads,
            "init": "k-means||",
            "lloyd": "group bounds (Yinyang-style, exact); faiss: every row every iteration",
            "ratio": max(v["ratio"] for v in per_k.values()),
            "inertia_ratio": max(ir) if ir else None,
            "inertia_ratio_vs_faiss": max(v["inertia_ratio_vs_faiss"] for v in per_k.values()),
            "goal": "ratio <= 1.2 (whole fits, faiss on its CPU-matched kernel); inertia_ratio <= 1.02 vs full k-means++",
            "faiss_coretype_matched": coretype,
            "per_k": per_k,
            "sides": sides,
            "note": "each side in a fresh process; timings include initialisation and the final labels",
        }

    for k in args.ks:  # sides alternate so machine load hits both alike
        runs[k] = {"faiss": spawn("faiss", args, k, coretype), "ours": spawn("ours", args, k, coretype)}
        if not args.no_plain:
            runs[k]["ours_plain"] = spawn("ours_plain", args, k, coretype)
        if not args.no_reference:
            runs[k]["ours_kmeanspp"] = spawn("ours_kmeanspp", args, k, coretype)
        write(args.name, finish(args.name, {**summary(), "partial": True}))  # a long run leaves its figures so far
    for k in generic:
        runs[k]["faiss_generic"] = spawn("faiss_generic", args, k, "Prescott")
    out = summary()
    sphere = args.sphere_ks if args.sphere_ks is not None else (args.ks[:1] if full and args.data == "mixture" else [])
    if sphere:  # the same comparison on harder, embedding-like rows, where the bounds prune less
        print(f"sphere data (2k unit centres, noise 0.6, L2-normalised): ks={sphere}", flush=True)
        per = {}
        for k in sphere:
            per[str(k)] = figures({s: spawn(s, args, k, coretype, "sphere") for s in ("faiss", "ours", "ours_plain")})
        out["sphere"] = {"n": args.n, "dim": args.dim, "ratio": max(v["ratio"] for v in per.values()), "per_k": per}
    emit(args.name, out)
    return out


if __name__ == "__main__":
    main()
