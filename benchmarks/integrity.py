"""What the layout-2 integrity costs: write and read of a features array with checksums + digests vs plain zstd.

Both sides write the same (N, d) float16 array with the same chunking and zstd level, in one thread, and
read it back whole (alternating, best of two); "checked" is the store's one write path (:func:`workbench.store.write_array`: zstd +
crc32c, every chunk written, per-chunk sha256 of the values and crc tails recorded) and reads through
:class:`workbench.store.CheckedStore` (crc32c verified before decoding, missing chunks refused);
"plain" is a layout-1 array (zstd only) read through zarr's own LocalStore. Also timed: the cheap
staleness check (:func:`workbench.store.check_fresh`, 4 bytes per chunk) and a full verify of the array.

    python benchmarks/integrity.py                 # 2,000,000 x 384 float16 (1.5 GB), ~1-2 min
    python benchmarks/integrity.py --n 200000      # quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--chunk-rows", type=int, default=21845)  # embed.write_features' 16 MiB chunks at d=384
    args = ap.parse_args(argv)
    zarr.config.set({"threading.max_workers": 1, "async.concurrency": 1})
    from zarr.codecs import ZstdCodec

    from workbench import store as st
    from workbench.dataset import check_array

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.dim)).astype(np.float16)
    tmp = Path(tempfile.mkdtemp(prefix="wb-integrity-"))
    try:
        t0 = time.perf_counter()
        g = zarr.open_group(str(tmp / "plain.zarr"), mode="w")
        a = g.create_array(
            "f", shape=x.shape, dtype=x.dtype, chunks=(args.chunk_rows, args.dim), compressors=[ZstdCodec(level=3)]
        )
        a[...] = x
        plain_write = time.perf_counter() - t0

        t0 = time.perf_counter()
        g2 = zarr.open_group(str(tmp / "checked.zarr"), mode="w")
        st.write_array(g2, "f", x, chunk_rows=args.chunk_rows)
        checked_write = time.perf_counter() - t0

        plain_read = checked_read = float("inf")
        for _ in range(2):  # alternate, best of two (both files are in the page cache after the first pass)
            t0 = time.perf_counter()
            y = zarr.open_group(str(tmp / "plain.zarr"), mode="r")["f"][...]
            plain_read = min(plain_read, time.perf_counter() - t0)
            t0 = time.perf_counter()
            arr = st.open_root(tmp / "checked.zarr")["f"]
            z = arr[...]
            checked_read = min(checked_read, time.perf_counter() - t0)
        assert np.array_equal(y, x) and np.array_equal(z, x)

        t0 = time.perf_counter()
        st.check_fresh(arr)
        fresh = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows: list = []
        check_array(arr, rows, values=True)
        verify_s = time.perf_counter() - t0
        assert rows and rows[-1]["status"] == "ok", rows
        size = sum(p.stat().st_size for p in (tmp / "checked.zarr").rglob("*") if p.is_file())
        psize = sum(p.stat().st_size for p in (tmp / "plain.zarr").rglob("*") if p.is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mb = x.nbytes / 2**20
    out = {
        "n": args.n,
        "dim": args.dim,
        "dtype": "float16",
        "chunk_rows": args.chunk_rows,
        "threads": 1,
        "zstd_level": 3,
        "n_chunks": int(-(-args.n // args.chunk_rows)),
        "plain_write_s": round(plain_write, 3),
        "checked_write_s": round(checked_write, 3),
        "write_overhead": round(checked_write / plain_write, 3),
        "plain_read_s": round(plain_read, 3),
        "checked_read_s": round(checked_read, 3),
        "read_overhead": round(checked_read / plain_read, 3),
        "checked_read_mb_s": round(mb / checked_read, 1),
        "staleness_check_s": round(fresh, 4),
        "verify_array_s": round(verify_s, 3),
        "bytes_plain": psize,
        "bytes_checked": size,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
