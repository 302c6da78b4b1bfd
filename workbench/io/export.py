"""Mussel / CLAM / TRIDENT interchange: features as PyTorch tensors, coordinates as HDF5, the slide table.

Export (the MSK datasheet's layout): per slide ``features/<slide_id>.pt`` — a (n, d) tensor — and
``tiles/<slide_id>.h5`` with dataset ``coords`` (n, 2) level-0 x, y and attrs ``patch_size`` (the tile's
side at ``patch_level``, so ``read_region(coord, patch_level, (patch_size, patch_size))`` reads exactly the
tile's footprint), ``patch_level``, plus ``patch_size_level0``, ``tile_px``, ``tile_mpp``, ``mpp``; and the
slide table (slide_id, workflow_id, tiles_h5_path, features_tensor_path) as CSV and Parquet.

Import: :func:`import_coords_h5` reads a CLAM/TRIDENT coords file into a slide's ``coords``, after
checking its shape, values and that its tile footprint matches the store's tiling.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from workbench import store as st

log = logging.getLogger(__name__)

TABLE_COLUMNS = ["slide_id", "workflow_id", "tiles_h5_path", "features_tensor_path"]


def _atomic(path: Path, write) -> None:
    with st.atomic_path(path) as tmp:  # unique temp name, fsync, rename
        write(tmp)


def write_coords_h5(path, coords: np.ndarray, *, patch_size: int, patch_level: int, **attrs) -> None:
    """CLAM-style HDF5: dataset ``coords`` (n, 2) int64 with attrs patch_size, patch_level (+ extra attrs)."""
    import h5py

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            d = f.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
            d.attrs["patch_size"] = int(patch_size)
            d.attrs["patch_level"] = int(patch_level)
            for k, v in attrs.items():
                if v is not None:
                    d.attrs[k] = v

    _atomic(Path(path), write)


def export_mussel(
    store_path,
    out_dir,
    encoder: str,
    *,
    workflow_id: str | None = None,
    dtype: str = "float32",
    ids: list[str] | None = None,
) -> pd.DataFrame:
    """Write per-slide feature tensors + coords HDF5 and the slide table; returns the table.

    ``dtype`` of the tensors: ``"float32"`` (as Mussel writes) or ``"float16"`` (as stored).
    """
    import torch

    root = st.open_store(store_path)
    out = Path(out_dir)
    (out / "features").mkdir(parents=True, exist_ok=True)
    (out / "tiles").mkdir(parents=True, exist_ok=True)
    workflow_id = workflow_id or f"workbench-{st.encoder_key(encoder)}"
    rows = []
    for s in st.slide_ids(root) if ids is None else ids:
        key = st.Key.features(s, encoder)
        if not st.is_complete(root, key):
            raise st.StoreError(f"slide {s!r} has no complete {encoder!r} features: run embed_slides first")
        g = root[st.Key.slide(s)]
        a = dict(g.attrs)
        feats = torch.from_numpy(np.asarray(root[key][:]).astype(dtype))
        fpath, hpath = out / "features" / f"{s}.pt", out / "tiles" / f"{s}.h5"
        _atomic(fpath, lambda tmp, feats=feats: torch.save(feats, str(tmp)))
        level = int(a.get("read_level", 0))
        ds = _level_downsample(a, level)
        write_coords_h5(
            hpath,
            g["coords"][:],
            patch_size=int(round(a["size0"] / ds)),
            patch_level=level,
            patch_size_level0=int(a["size0"]),
            tile_px=int(a["tile_px"]),
            tile_mpp=float(a["tile_mpp"]),
            mpp=float(a["mpp"]),
            slide_path=str(a["path"]),
        )
        rows.append(
            {
                "slide_id": s,
                "workflow_id": workflow_id,
                "tiles_h5_path": str(hpath.resolve()),
                "features_tensor_path": str(fpath.resolve()),
            }
        )
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    _atomic(out / "slides.csv", lambda tmp: table.to_csv(tmp, index=False))
    _atomic(out / "slides.parquet", lambda tmp: table.to_parquet(tmp, index=False))
    return table


def _level_downsample(attrs: dict, level: int) -> float:
    if level == 0:
        return 1.0
    from workbench.io.slides import open_slide

    with open_slide(attrs["path"], mpp=attrs.get("mpp")) as slide:
        return float(slide.level_downsamples[level])


def read_coords_h5(path) -> tuple[np.ndarray, dict]:
    """``coords`` (n, 2) int64 and its attrs from a CLAM/TRIDENT/Mussel HDF5 file, validated."""
    import h5py

    path = Path(path)
    with h5py.File(path, "r") as f:
        if "coords" not in f:
            raise ValueError(f"{path}: no 'coords' dataset (has {list(f.keys())})")
        d = f["coords"]
        coords, attrs = d[:], {k: (v.item() if hasattr(v, "item") else v) for k, v in d.attrs.items()}
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"{path}: coords must be (n, 2), got {coords.shape}")
    if not np.issubdtype(coords.dtype, np.number) or not np.isfinite(coords).all():
        raise ValueError(f"{path}: coords must be finite numbers")
    if (coords != np.round(coords)).any() or (coords < 0).any():
        raise ValueError(f"{path}: coords must be non-negative integers (level-0 pixels)")
    if "patch_size" not in attrs or "patch_level" not in attrs:
        raise ValueError(f"{path}: coords lacks the 'patch_size' / 'patch_level' attributes")
    return coords.astype(np.int64), attrs


def import_coords_h5(store_path, slide_id: str, h5_path, *, overwrite: bool = False) -> int:
    """Replace a tiled slide's coords by those of a CLAM/TRIDENT HDF5 file; returns the tile count.

    Checks: coords inside the slide; the file's footprint (``patch_size_level0`` or patch_size × the
    level's downsample) equals the store's tile footprint (within 2 %). Features and prefilter scores of
    the slide no longer match new coords, so a slide that has any is refused unless ``overwrite=True``
    (which deletes them).
    """
    coords, attrs = read_coords_h5(h5_path)
    root = st.open_store(store_path, mode="a")
    key = st.Key.slide(slide_id)
    if key not in root:
        raise st.StoreError(f"slide {slide_id!r} is not in {store_path}: tile it first (its attrs give the geometry)")
    g = root[key]
    a = dict(g.attrs)
    size0 = int(a["size0"])
    if "patch_size_level0" in attrs:
        theirs = float(attrs["patch_size_level0"])
    else:
        theirs = float(attrs["patch_size"]) * _level_downsample(a, int(attrs["patch_level"]))
    if abs(theirs / size0 - 1) > 0.02:
        raise ValueError(
            f"{h5_path}: tiles of {theirs:.0f} level-0 px, but the store tiles slide {slide_id!r} "
            f"with {size0} level-0 px ({a['tile_px']} px at {a['tile_mpp']} mpp)"
        )
    w, h = int(a["width"]), int(a["height"])
    outside = (coords[:, 0] + size0 > w) | (coords[:, 1] + size0 > h)
    if outside.any():
        raise ValueError(f"{h5_path}: {int(outside.sum())} tiles extend beyond slide {slide_id!r} ({w}x{h})")
    with st.write_lock(store_path):
        derived = [p for p in ("features", "prefilter", "qc") if p in g]
        if derived and not overwrite:
            raise st.StoreError(f"slide {slide_id!r} already has {derived}; pass overwrite=True to delete them")
        g.attrs["complete"] = False
        for p in derived:
            del g[p]
        st.write_array(g, "coords", coords.astype(np.int32))
        st.write_array(g, "tissue", np.full(len(coords), np.nan, np.float32))
        g.attrs.update({"n_tiles": int(len(coords)), "coords_source": str(h5_path)})
        st.seal_attrs(g)
        st.mark_complete(g)
    return int(len(coords))


def export_contours(store_path, out_dir, *, slide_ids: list[str] | None = None) -> list[Path]:
    """Write each slide's tissue contours as ``<out_dir>/<slide_id>.geojson`` (level-0 pixels; QuPath reads it)."""
    import json

    root = st.open_store(store_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for sid in slide_ids or st.slide_ids(root):
        attrs = st.read_slide(root, sid)
        path = out_dir / f"{sid}.geojson"
        _atomic(path, lambda tmp, gj=attrs["contours"]: Path(tmp).write_text(json.dumps(gj)))
        paths.append(path)
    return paths


def export_tile_pngs(store_path, out_dir, *, slide_ids: list[str] | None = None, batch: int = 256) -> pd.DataFrame:
    """Write every tile as ``<out_dir>/<slide_id>/<slide_id>_x<x>_y<y>.png`` for tile-folder tools.

    Tiles are read at the store's tile size and mpp with :class:`~workbench.io.slides.TileReader`. Returns a
    table (slide_id, tile, x, y, path). A slide whose folder is complete (``.complete`` marker) is skipped.
    """
    import cv2

    from workbench.io.slides import TileReader, open_slide

    root = st.open_store(store_path)
    out_dir = Path(out_dir)
    rows = []
    for sid in slide_ids or st.slide_ids(root):
        info = st.read_slide(root, sid)
        st.check_slide_file(root, sid)  # never export pixels of another file at these coordinates
        folder = out_dir / sid
        folder.mkdir(parents=True, exist_ok=True)
        coords = info["coords"]
        names = [folder / f"{sid}_x{x}_y{y}.png" for x, y in coords]
        if not (folder / ".complete").exists():
            with (
                open_slide(info["path"], slide_id=sid, mpp=info["mpp"]) as slide,
                TileReader(slide, tile_px=info["tile_px"], tile_mpp=info["tile_mpp"]) as reader,
            ):
                for start in range(0, len(coords), batch):
                    for name, tile in zip(names[start : start + batch], reader.read(coords[start : start + batch])):
                        if not cv2.imwrite(str(name), cv2.cvtColor(tile, cv2.COLOR_RGB2BGR)):
                            raise OSError(f"slide {sid!r}: could not write {name}")
            (folder / ".complete").write_text(str(len(coords)))
        rows += [(sid, i, int(x), int(y), str(n)) for i, ((x, y), n) in enumerate(zip(coords, names))]
    return pd.DataFrame(rows, columns=["slide_id", "tile", "x", "y", "path"])
