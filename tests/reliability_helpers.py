"""Helpers for the reliability suite: small slide files with known content, and ways to break them.

The slides are written here (not by ``workbench.io.synthetic``) so that each bad-input case controls
exactly what is in the file: an all-white slide, an all-pen slide, a slide smaller than one tile,
a pyramid whose stored level-0 tiles are overwritten with garbage.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
PEN_RGB = (40, 70, 190)  # a blue marker


def he_image(size: int, seed: int, kind: str = "tissue") -> np.ndarray:
    """(size, size, 3) uint8 RGB: H&E-like blobs on white (``tissue``), plain ``white`` glass, or all ``pen``."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 245, np.uint8)
    if kind == "white":
        return (img + rng.integers(0, 8, img.shape)).clip(0, 255).astype(np.uint8)
    if kind == "pen":
        img[:] = PEN_RGB
    else:
        for _ in range(2 + seed % 3):
            c = tuple(int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
            axes = tuple(int(v) for v in rng.integers(size // 8, size // 3, 2))
            colour = (int(rng.integers(170, 215)), int(rng.integers(60, 120)), int(rng.integers(150, 200)))
            cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    noise = rng.normal(0, 6, img.shape)
    return (img + noise).clip(0, 255).astype(np.uint8)


def write_slide_tiff(path, rgb: np.ndarray, mpp: float | None = 0.5, *, tile: int = 256, factor: int = 4) -> Path:
    """Write a JPEG-tiled pyramidal TIFF (generic-tiff for OpenSlide) with levels ``factor`` apart."""
    import tifffile

    path = Path(path)
    levels = [rgb]
    while min(levels[-1].shape[:2]) >= factor * tile:
        lv = levels[-1]
        levels.append(cv2.resize(lv, (lv.shape[1] // factor, lv.shape[0] // factor), interpolation=cv2.INTER_AREA))
    with tifffile.TiffWriter(path) as tw:
        for i, lv in enumerate(levels):
            kw = {}
            if mpp is not None:
                ds = rgb.shape[1] / lv.shape[1]
                kw = {"resolution": (1e4 / (mpp * ds), 1e4 / (mpp * ds)), "resolutionunit": "CENTIMETER"}
            tw.write(
                lv,
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": 90},
                photometric="rgb",
                subfiletype=0 if i == 0 else 1,
                metadata=None,
                **kw,
            )
    return path


def make_slides(out_dir, n: int = 6, size: int = 2048, mpp: float = 0.5, seed: int = 0) -> pd.DataFrame:
    """``n`` small tissue slides and their manifest (slide ids ``r0`` … ``r{n-1}``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        p = write_slide_tiff(out_dir / f"r{i}.tiff", he_image(size, seed + i), mpp)
        rows.append({"slide_id": f"r{i}", "path": str(p), "patient_id": f"p{i // 2}"})
    return pd.DataFrame(rows)


def stored_tiles(path, page: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and byte counts of the stored tiles of one TIFF page."""
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        p = tif.pages[page]
        return np.asarray(p.dataoffsets), np.asarray(p.databytecounts)


def corrupt_tiles(path, indices, page: int = 0, seed: int = 0) -> None:
    """Overwrite the bytes of some stored tiles of a TIFF page with random garbage (in place)."""
    offsets, counts = stored_tiles(path, page)
    rng = np.random.default_rng(seed)
    with open(path, "r+b") as f:
        for i in indices:
            f.seek(int(offsets[i]))
            f.write(rng.integers(0, 256, int(counts[i]), dtype=np.uint8).tobytes())


def store_arrays(store_path, slide_ids) -> dict:
    """{slide_id: (coords bytes, tissue bytes)} of the complete slides of a store."""
    import zarr

    from workbench import store as st

    root = zarr.open_group(str(store_path), mode="r", zarr_format=3)
    out = {}
    for sid in slide_ids:
        if st.is_complete(root, st.Key.slide(sid)):
            g = root[st.Key.slide(sid)]
            out[sid] = (g["coords"][:].tobytes(), g["tissue"][:].tobytes())
    return out


def run_and_kill(script: str, delay: float, *, ready: str = "READY", timeout: float = 120.0) -> int | None:
    """Run ``python -c script``; SIGKILL it ``delay`` s after it prints ``ready`` (None if it finished first).

    Returns the exit code when the script finished before the kill, else None.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [PYTHON, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(ROOT), text=True
    )
    t_end = time.monotonic() + timeout
    line = proc.stdout.readline()  # blocks until the child is set up (imports done)
    if ready not in line:
        proc.wait(timeout=timeout)
        raise RuntimeError(f"child did not start: {line!r} {proc.stderr.read()}")
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            proc.stdout.close()
            proc.stderr.close()
            return proc.returncode
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=max(1.0, t_end - time.monotonic()))
    proc.stdout.close()
    proc.stderr.close()
    return None if proc.returncode == -signal.SIGKILL else proc.returncode


def time_child(script: str, *, ready: str = "READY", timeout: float = 300.0) -> float:
    """Seconds from the child's ``ready`` line to its successful exit (to aim kills inside the real work)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [PYTHON, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(ROOT), text=True
    )
    line = proc.stdout.readline()
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=timeout)
    if ready not in line or proc.returncode != 0:
        raise RuntimeError(f"calibration child failed ({proc.returncode}): {line!r} {err[-2000:]}")
    return time.monotonic() - t0
