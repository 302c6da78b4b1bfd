"""Error-table cost: recording N bad manifest rows, before (rewrite the whole attrs list per row) and now
(append one JSON line per row to ``<store>/errors.jsonl``), in one run on the same kind of fresh store.

    python benchmarks/error_table.py [--rows 2000]

Both sides record the same N (slide_id, stage, error) rows one by one into a new store in a temporary
folder, single process, and read the table back once at the end (the whole job). Also times the 100
appends around row 10 and around row N for the new side (constant cost per row).
Last line: JSON with rewrite_seconds, append_seconds, speedup, append_ms_at_row_10, append_ms_at_row_N.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import zarr

from workbench import store as st


def _fresh(path: Path):
    zarr.create_group(str(path), zarr_format=3, attributes={"layout_version": st.LAYOUT_VERSION})
    return st.open_store(path, mode="a")


def record_rewrite(root, slide_id: str, stage: str, text: str) -> None:
    """The former implementation: read the whole records list, filter it, append, write it all back."""
    g = root.require_group(st.Key.ERRORS)
    records = list(g.attrs.get("records", []))
    records = [r for r in records if not (r["slide_id"] == slide_id and r["stage"] == stage)]
    records.append({"slide_id": slide_id, "stage": stage, "error": text, "time": time.time()})
    g.attrs["records"] = records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    args = ap.parse_args(argv)
    n = args.rows
    rows = [(f"bad{i:06d}", "tile", f"ManifestError: row {i}: file does not exist") for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        root = _fresh(Path(tmp) / "old.zarr")
        t0 = time.perf_counter()
        for sid, stage, text in rows:
            record_rewrite(root, sid, stage, text)
        old_n = len(root[st.Key.ERRORS].attrs["records"])
        rewrite = time.perf_counter() - t0

        root = _fresh(Path(tmp) / "new.zarr")
        per = np.empty(n)
        t0 = time.perf_counter()
        for i, (sid, stage, text) in enumerate(rows):
            t = time.perf_counter()
            st.record_error(root, sid, stage, text)
            per[i] = time.perf_counter() - t
        new_n = len(st.error_table(root))
        append = time.perf_counter() - t0
    assert old_n == new_n == n
    early, late = per[:110][10:].mean() * 1e3, per[-100:].mean() * 1e3
    print(
        f"{n} rows: rewrite {rewrite:.2f} s, append {append:.2f} s; append at row 10 {early:.3f} ms, "
        f"at row {n} {late:.3f} ms"
    )
    print(
        json.dumps(
            {
                "rows": n,
                "rewrite_seconds": round(rewrite, 3),
                "append_seconds": round(append, 3),
                "speedup": round(rewrite / append, 1),
                "append_ms_at_row_10": round(early, 4),
                f"append_ms_at_row_{n}": round(late, 4),
                "settings": {
                    "rewrite": "zarr group attrs list rewritten per row (before issue 14)",
                    "append": "errors.jsonl, O_APPEND + flock per row, no fsync",
                    "processes": 1,
                    "read_back": "once at the end, both sides",
                },
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
