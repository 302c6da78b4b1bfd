"""Shared fixtures: small synthetic slides with ground truth, and a tiled store over them.

Real slides from ../shared/data are used only by tests marked ``realdata``, which skip when it is absent.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import pandas as pd
import pytest

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"

# (slide_id, dominant class, pen, patient)
SMALL_SET = [
    ("s0", "tumour", True, "p0"),
    ("s1", "stroma", False, "p0"),
    ("s2", "lymphocytes", True, "p1"),
    ("s3", "fat", False, "p2"),
    ("s4", "necrosis", True, "p3"),
    ("s5", "tumour", False, "p4"),
]


@contextlib.contextmanager
def hold_store_lock(store, *, timeout: float = 10.0):
    """Hold the store's write lock in another thread, as another run would; yields an Event that releases it."""
    from workbench import store as st

    held, release = threading.Event(), threading.Event()

    def holder():
        with st.write_lock(store):
            held.set()
            release.wait(timeout)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    try:
        yield release
    finally:
        release.set()
        thread.join()


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real test slide {name} not found under {SHARED_DATA}")
    return path


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory) -> Path:
    """Six 3072² synthetic slides at 0.25 mpp (≈ 30–40 tiles of 224 px at 0.5 mpp each)."""
    from workbench.io.synthetic import make_slide

    out = tmp_path_factory.mktemp("slides")
    for i, (sid, dominant, pen, _) in enumerate(SMALL_SET):
        make_slide(
            out / f"{sid}.tiff",
            width=3072,
            height=3072,
            mpp=0.25,
            seed=100 + i,
            dominant=dominant,
            n_pieces=1 + i % 2,
            pen=pen,
            blur=(i % 3 == 0),
        )
    return out


@pytest.fixture(scope="session")
def small_manifest(slide_dir) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "slide_id": [s for s, *_ in SMALL_SET],
            "path": [str(slide_dir / f"{s}.tiff") for s, *_ in SMALL_SET],
            "patient_id": [p for *_, p in SMALL_SET],
            "site": ["breast", "breast", "lung", "colon", "lung", "colon"],
            "diagnosis": [d for _, d, _, _ in SMALL_SET],
        }
    )


@pytest.fixture(scope="session")
def tiled_store(tmp_path_factory, small_manifest) -> Path:
    """A store with the six small slides tiled (read-only for tests: copy it to modify)."""
    from workbench.io.tiling import tile_slides

    path = tmp_path_factory.mktemp("store") / "small.zarr"
    summary = tile_slides(small_manifest, path, progress=False)
    assert (summary.status == "tiled").all(), summary
    return path
