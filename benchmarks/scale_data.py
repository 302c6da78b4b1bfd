"""Shared data for the 10^7-row benchmarks (search_scale.py, assign_scale.py): a hard Gaussian mixture on disk.

``mixture_store(path, n, d)`` writes (or reuses, when its attrs match) an (n, d) float16 Zarr array of
L2-normalised draws from a mixture of ``components`` (2,000) isotropic Gaussians: centres are random unit
vectors, each row is ``centre + noise * g / sqrt(d)`` with g standard normal (noise 0.6: a row is as far from
its centre as 0.6 of the centre's length, so the nearest neighbours of a point are a thin shell inside its
component, which makes compressed codes work hard). Rows are generated chunk by chunk (50,000 rows, each
from its own seed) and written uncompressed, so nothing holds more than a chunk. ``queries(...)`` draws held-out
rows from the same mixture with another seed. ``exact_topk`` computes the exact cosine top-k of the queries
over prefixes of the array in one chunked pass (ground truth for several database sizes at once).

    python benchmarks/scale_data.py --n 10000000      # write the array (~7.7 GB at 10^7 x 384), ~3-6 min
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("benchmarks.scale_data")
CHUNK = 50_000
DEFAULT_PATH = "/tmp/wb_scale/x.zarr"


def _centres(d: int, components: int, seed: int) -> np.ndarray:
    c = np.random.default_rng([seed, 0]).standard_normal((components, d)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def draw(rng: np.random.Generator, centres: np.ndarray, m: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """m unit rows of the mixture (float32) and their component."""
    k, d = centres.shape
    comp = rng.integers(0, k, m)
    x = rng.standard_normal((m, d), dtype=np.float32)
    x *= noise / np.sqrt(d)
    x += centres[comp]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, comp


def mixture_store(
    path=DEFAULT_PATH,
    n: int = 10**7,
    d: int = 384,
    *,
    components: int = 2000,
    noise: float = 0.6,
    seed: int = 0,
    chunk: int = CHUNK,
):
    """The (n, d) float16 Zarr array at ``path`` (written chunk by chunk unless already there)."""
    import zarr
    from tqdm.auto import tqdm

    spec = {"n": n, "d": d, "components": components, "noise": noise, "seed": seed, "chunk": chunk}
    path = Path(path)
    if path.exists():
        try:
            arr = zarr.open_array(str(path), mode="r")
            if arr.attrs.get("spec") == spec and arr.attrs.get("complete"):
                log.info("reusing %s", path)
                return arr
        except Exception:
            pass
    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = zarr.create_array(
        str(path), shape=(n, d), chunks=(chunk, d), dtype="float16", compressors=None, overwrite=True
    )
    centres = _centres(d, components, seed)
    for i, a in enumerate(tqdm(range(0, n, chunk), desc="write mixture", unit="chunk")):
        m = min(chunk, n - a)
        x, _ = draw(np.random.default_rng([seed, 1, i]), centres, m, noise)
        arr[a : a + m] = x.astype(np.float16)
    arr.attrs.update({"spec": spec, "complete": True})
    log.info("wrote %s (%d x %d float16) in %.0f s", path, n, d, time.perf_counter() - t0)
    return arr


def queries(nq: int, d: int = 384, *, components: int = 2000, noise: float = 0.6, seed: int = 0) -> np.ndarray:
    """Held-out query rows of the same mixture (a seed stream the database never uses), float32."""
    x, _ = draw(np.random.default_rng([seed, 2]), _centres(d, components, seed), nq, noise)
    return x.astype(np.float16).astype(np.float32)  # stored precision, as a database row would be


def exact_topk(arr, q: np.ndarray, k: int, prefixes: list[int], *, chunk: int = CHUNK) -> dict[int, np.ndarray]:
    """Exact inner-product top-k ids of ``q`` over ``arr[:p]`` for each prefix p, in one chunked pass."""
    from tqdm.auto import tqdm

    n = max(prefixes)
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    out = {}
    for a in tqdm(range(0, n, chunk), desc="exact top-k", unit="chunk"):
        b = min(a + chunk, n)
        x = np.asarray(arr[a:b], np.float32)
        s = q @ x.T
        kk = min(k, b - a)
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        cs = np.concatenate([best_s, np.take_along_axis(s, part, 1)], 1)
        ci = np.concatenate([best_i, part + a], 1)
        order = np.argsort(-cs, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cs, order, 1), np.take_along_axis(ci, order, 1)
        for p in prefixes:
            if a < p <= b:
                if p != b:
                    raise ValueError(f"prefix {p} is not a multiple of the chunk {chunk}")
                out[p] = best_i.copy()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10**7)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--path", default=DEFAULT_PATH)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    arr = mixture_store(args.path, args.n, args.d)
    print(json.dumps({"path": args.path, "shape": list(arr.shape), "dtype": str(arr.dtype)}))


if __name__ == "__main__":
    main()
