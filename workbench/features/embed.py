"""Batched tile embedding into the store: ``slides/<id>/features/<encoder>`` (n, d) float16.

Per slide, a torch ``DataLoader`` whose worker processes each open their own slide handle and read
whole batches with :class:`~workbench.io.slides.TileReader` (one batched decode per batch), straight at
the encoder's input size over the tile's footprint (so resizing happens in the workers, with
``cv2.INTER_AREA``); pinned memory and ``non_blocking`` copies on CUDA; ``torch.inference_mode``;
bf16 (or fp16) autocast on CUDA for networks, fp32 on CPU and for the hand-crafted descriptor;
optional ``torch.compile``. The device is chosen at run time (CUDA when present).

Resumable per slide: a slide whose features for this encoder are complete *with the same weights
digest* is skipped; the ``complete`` attribute is written last, so a killed run redoes only the slide
it was writing. Another encoder writes a second array beside the first. A slide that fails is
recorded in the store's error table (``on_error="skip"``) and the run goes on: an unreadable slide, a
failing read or a model error in one slide's batch costs that slide's row only; a re-run skips slides
whose failure with this encoder is recorded (status ``failed-earlier``) unless ``retry_failed=True``. Rows whose features
are NaN/Inf (e.g. fp16 overflow) are kept as NaN, listed in the array's ``nonfinite_rows`` attribute,
logged and recorded in the error table: never silently written as valid.

Scale-out: with a ``dask.distributed`` client, each slide is one task; each worker builds the encoder
once and writes its own slide's group (disjoint paths; the calling process holds the store's write
lock for the whole run). One worker per GPU: ``dask_cuda.LocalCUDACluster()`` when installed::

    from dask_cuda import LocalCUDACluster
    from distributed import Client
    with LocalCUDACluster() as cluster, Client(cluster) as client:
        embed_slides("data.zarr", "uni", client=client)
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time

import numpy as np
import pandas as pd

from workbench import store as st

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ["slide_id", "status", "n_tiles", "n_nonfinite", "seconds", "tiles_per_s", "error"]
_ENCODERS: dict = {}  # per process: (name, weights) -> (Encoder, device, prepared model)


def pick_device(device: str | None = None) -> str:
    """``device`` if given, else ``"cuda"`` when available, else ``"cpu"``."""
    import torch

    if device:
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for, but CUDA is not available here")
        return str(device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def worker_order(batches: list, workers: int) -> list:
    """Order one slide's batches so that each DataLoader worker reads one contiguous run of tiles.

    A DataLoader hands item ``p`` to worker ``p mod workers``; in tile order, neighbouring batches (which share
    stored TIFF tiles above, below and beside them) would go to different workers, each decoding the shared
    tiles again (+26 % decodes with 2 or 4 workers on a 32k × 16k synthetic slide, +21.5 % on 16k × 8k). Here
    the batches are split into ``workers`` contiguous spans, the longer ones first, and interleaved round by
    round, so worker ``(offset + j) mod workers`` reads span ``j`` (+1–2 % decodes on 32k × 16k, +3–6 % on
    16k × 8k: only at span borders; tests/test_embed.py). A short last round
    is a prefix, so the next slide's spans keep the same property.
    """
    if workers <= 1 or len(batches) <= 1:
        return list(batches)
    spans = [list(sp) for sp in np.array_split(np.arange(len(batches)), workers) if len(sp)]
    order = []
    for r in range(len(spans[0])):
        order += [batches[sp[r]] for sp in spans if r < len(sp)]
    return order


class TileBatches:
    """Map-style dataset over the batches of several slides: ``ds[i] -> (slide index, start, tiles, error)``.

    Items run slide after slide, so one DataLoader keeps the device busy across slide boundaries; within a
    slide, ``workers`` (the DataLoader's) gives each worker one contiguous run of tiles (:func:`worker_order`),
    so neighbouring tiles' stored blocks are decoded once. Each worker process opens its own slide handle on
    first use and keeps the last one open; a slide that cannot be read yields an empty batch with the error
    text instead of killing the loader.
    """

    def __init__(self, slides: list[dict], batch_size: int, time_limit: float | None = None, workers: int = 0):
        self.slides, self.batch_size = slides, int(batch_size)
        self.time_limit = time_limit  # seconds of reading per slide (per loader worker); None: no limit
        self._started: dict = {}
        self.items = []
        for k, s in enumerate(slides):
            batches = [
                (k, start, min(start + self.batch_size, len(s["coords"])))
                for start in range(0, len(s["coords"]), self.batch_size)
            ]
            self.items += worker_order(batches, workers)
        self._open = None  # (slide index, TileReader)

    def __len__(self):
        return len(self.items)

    def _reader(self, k: int):
        from workbench.io.slides import TileReader, open_slide

        if self._open is not None and self._open[0] == k:
            return self._open[1]
        self.close()
        s = self.slides[k]
        slide = open_slide(s["path"], slide_id=s["slide_id"], mpp=s["mpp"])
        self._open = (k, TileReader(slide, tile_px=s["read_px"], tile_mpp=s["read_mpp"]))
        return self._open[1]

    def __getitem__(self, i: int):
        import torch

        from workbench.io.slides import deadline

        k, start, stop = self.items[i]
        remaining = None
        if self.time_limit is not None:
            remaining = self.time_limit - (time.monotonic() - self._started.setdefault(k, time.monotonic()))
        try:
            if remaining is not None and remaining <= 0:
                return (
                    k,
                    start,
                    torch.zeros(0, dtype=torch.uint8),
                    (
                        f"SlideTimeoutError: slide {self.slides[k]['slide_id']!r}: timed out after the per-slide time "
                        f"limit of {self.time_limit:g} s (raise time_limit to allow more)"
                    ),
                )
            with deadline(remaining, self.slides[k]["slide_id"], self.time_limit):
                tiles = self._reader(k).read(self.slides[k]["coords"][start:stop])
        except Exception as exc:  # reported per slide by the consumer, never silently dropped
            return k, start, torch.zeros(0, dtype=torch.uint8), f"{type(exc).__name__}: {exc}"
        return k, start, torch.from_numpy(tiles), ""

    def close(self):
        if self._open is not None:
            reader = self._open[1]
            reader.close()
            reader.slide.close()
            self._open = None

    def __getstate__(self):  # a worker gets the description, never an open handle
        return {**self.__dict__, "_open": None, "_started": {}}


def read_geometry(slide_attrs: dict, tiling: dict, input_px: int) -> tuple[int, float]:
    """(tile_px, tile_mpp) to read the store's tiles at ``input_px`` over the same footprint."""
    tile_px = int(slide_attrs.get("tile_px", tiling.get("tile_px", 224)))
    tile_mpp = float(slide_attrs.get("tile_mpp", tiling.get("tile_mpp", 0.5)))
    return int(input_px), tile_mpp * tile_px / int(input_px)


def _default_workers(device: str) -> int:
    if multiprocessing.current_process().daemon:  # e.g. inside a dask worker: no child processes allowed
        return 0
    n = os.cpu_count() or 1
    return max(1, min(8, n - 1)) if device.startswith("cuda") else max(1, min(4, n // 2))


def auto_batch_size(encoder, device: str, *, start: int = 512, floor: int = 8) -> int:
    """Largest batch (halving from ``start``) that runs the model on ``device`` without running out of memory."""
    import torch

    if not device.startswith("cuda"):
        return 256 if encoder.checkpoint_free else 32
    if encoder.checkpoint_free:
        return 512
    bs = start
    dtype = torch.bfloat16 if encoder.precision == "bf16" else torch.float16
    model = encoder.model.to(device)
    while bs > floor:
        try:
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
                model(torch.zeros(bs, 3, encoder.input_px, encoder.input_px, device=device))
            torch.cuda.synchronize(device)
            break
        except torch.cuda.OutOfMemoryError:
            bs //= 2
        finally:
            torch.cuda.empty_cache()
    return max(bs // 2, floor)  # headroom for the loader's pinned buffers and fragmentation


def _prepared(name: str, weights, device: str, compile: bool):
    """The encoder and its model on ``device`` (built once per process)."""
    from workbench.features.encoders import get_encoder

    key = (name, str(weights), device, bool(compile))
    if key not in _ENCODERS:
        enc = get_encoder(name, weights=weights)
        model = enc.model.to(device).eval()
        if compile and not enc.checkpoint_free:
            import torch

            model = torch.compile(model)
        _ENCODERS[key] = (enc, model)
    return _ENCODERS[key]


def slide_job(root, slide_id: str, enc) -> dict:
    """What the loader needs to read one tiled slide at the encoder's input size."""
    g = root[st.Key.slide(slide_id)]
    attrs = st.check_slide_file(root, slide_id)  # StaleError if the file is not the one that was tiled
    px, mpp = read_geometry(attrs, root.attrs.get("tiling", {}), enc.input_px)
    if enc.mpp is not None and abs(float(attrs.get("tile_mpp", 0.5)) - enc.mpp) > 1e-6:
        log.warning(
            "slide %r: tiles are at %s mpp, encoder %r was trained at %s mpp; each tile's footprint is "
            "resized to %d px",
            slide_id,
            attrs.get("tile_mpp"),
            enc.name,
            enc.mpp,
            enc.input_px,
        )
    coords = g["coords"]
    return {
        "slide_id": slide_id,
        "path": attrs["path"],
        "mpp": attrs.get("mpp"),
        "coords": coords[:],
        "coords_digest": st.array_digest_of(coords),
        "read_px": px,
        "read_mpp": mpp,
        "attrs": attrs,
    }


def run_slides(
    root,
    jobs: list[dict],
    enc,
    model,
    device: str,
    *,
    batch_size: int,
    num_workers: int,
    on_error: str = "skip",
    progress=None,
    time_limit: float | None = None,
) -> list[dict]:
    """Embed slides through one DataLoader and write each slide's features as soon as it is complete."""
    import torch

    cuda = device.startswith("cuda")
    amp = cuda and enc.precision in ("bf16", "fp16")
    dtype = torch.bfloat16 if enc.precision == "bf16" else torch.float16
    rows, pending = [], {}
    for job in jobs:
        if len(job["coords"]) == 0:
            rows.append(write_features(root, job, enc, np.zeros((0, enc.dim), np.float32), device, 0.0))
    jobs = [j for j in jobs if len(j["coords"])]
    ds = TileBatches(jobs, batch_size, time_limit, workers=num_workers)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=cuda,
        prefetch_factor=4 if num_workers else None,
    )
    try:
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=amp):
            for k, start, tiles, err in loader:
                job = jobs[int(k)]
                state = pending.setdefault(int(k), {"out": None, "done": 0, "error": None, "t0": time.perf_counter()})
                stop = min(int(start) + batch_size, len(job["coords"]))
                if err and state["error"] is None:
                    state["error"] = err
                    if on_error == "raise":
                        raise RuntimeError(f"slide {job['slide_id']!r}: {err}")
                if state["error"] is None:
                    if state["out"] is None:
                        state["out"] = np.empty((len(job["coords"]), enc.dim), np.float32)
                    try:
                        feats = model(enc.preprocess(tiles.to(device, non_blocking=True)))
                        state["out"][int(start) : stop] = feats.float().cpu().numpy()
                    except Exception as exc:
                        if on_error == "raise":
                            raise
                        state["error"] = (
                            f"{type(exc).__name__}: slide {job['slide_id']!r}, tiles {int(start)}–{stop}: {exc}"
                        )
                state["done"] += stop - int(start)
                if progress is not None:
                    progress.update(stop - int(start))
                if state["done"] == len(job["coords"]):
                    del pending[int(k)]
                    if state["error"] is not None:
                        rows.append(_row(job["slide_id"], "error", len(job["coords"]), error=state["error"]))
                    else:
                        rows.append(
                            write_features(root, job, enc, state["out"], device, time.perf_counter() - state["t0"])
                        )
    finally:
        ds.close()
    return rows


def write_features(root, job: dict, enc, feats: np.ndarray, device: str, seconds: float) -> dict:
    """Write one slide's features as float16 with the encoder's attrs; ``complete`` last; non-finite rows listed."""
    slide_id, n = job["slide_id"], len(feats)
    half = feats.astype(np.float16)
    bad = np.flatnonzero(~np.isfinite(half).all(1)) if n else np.zeros(0, np.int64)
    msg = None
    if len(bad):
        msg = f"{len(bad)} of {n} tiles gave non-finite {enc.name} features (rows {bad[:20].tolist()})"
        log.warning("slide %r: %s", slide_id, msg)
    attrs = job["attrs"]
    chunk_rows = int(min(65536, max(1024, (16 << 20) // max(1, 2 * enc.dim))))
    fg = root.require_group(st.Key.features_group(slide_id))
    name = st.Key.features(slide_id, enc.name).rsplit("/", 1)[1]
    cuda = device.startswith("cuda")
    arr = st.write_array(
        fg,
        name,
        half,
        chunk_rows=chunk_rows,
        attrs={
            **enc.attrs(),
            "tile_px": attrs.get("tile_px"),
            "tile_mpp": attrs.get("tile_mpp"),
            "read_px": job["read_px"],
            "device": device,
            "precision": enc.precision if cuda else "fp32",
            "n_tiles": int(n),
            "n_nonfinite": int(len(bad)),
            "nonfinite_rows": bad.tolist(),
            "seconds": round(seconds, 3),
            "coords_digest": job.get("coords_digest"),
        },
    )
    st.mark_complete(arr)
    return {
        "slide_id": slide_id,
        "status": "embedded",
        "n_tiles": int(n),
        "n_nonfinite": int(len(bad)),
        "seconds": seconds,
        "tiles_per_s": n / seconds if seconds > 0 else float("nan"),
        "error": msg,
    }


def _is_done(root, slide_id: str, enc) -> bool:
    """Complete features of these weights, over the slide's current tiles, whose chunks are as written."""
    key = st.Key.features(slide_id, enc.name)
    if not (st.is_complete(root, key) and root[key].attrs.get("weights_digest") == enc.weights_digest):
        return False
    arr = root[key]
    if arr.attrs.get("coords_digest") != st.array_digest_of(root[st.Key.coords(slide_id)]):
        log.warning("slide %r: %s features were computed over other tiles: re-embedding", slide_id, enc.name)
        return False
    try:
        st.check_fresh(arr)
    except st.StoreError as exc:
        log.warning("%s: re-embedding", exc)
        return False
    return True


def _slide_task(
    store_path: str,
    slide_id: str,
    name: str,
    weights,
    device: str | None,
    batch_size: int | None,
    num_workers: int | None,
    compile: bool,
) -> dict:
    """One slide on a dask worker: build (or reuse) the encoder, embed, write the slide's own group."""
    device = pick_device(device)
    enc, model = _prepared(name, weights, device, compile)
    root = st.open_root(store_path, mode="a")
    if _is_done(root, slide_id, enc):
        return _row(slide_id, "skipped", int(root[st.Key.coords(slide_id)].shape[0]))
    bs = batch_size or auto_batch_size(enc, device)
    nw = _default_workers(device) if num_workers is None else num_workers
    try:
        return run_slides(root, [slide_job(root, slide_id, enc)], enc, model, device, batch_size=bs, num_workers=nw)[0]
    except Exception as exc:  # reported per slide to the driver, which records it
        return _row(slide_id, "error", 0, error=f"{type(exc).__name__}: {exc}")


def gpu_cluster(gpus="all", *, n_visible: int | None = None):
    """A dask-cuda ``LocalCUDACluster`` with one worker per GPU (``gpus``: "all", a count or device ids).

    Raises :class:`~workbench.errors.ParameterError` for a bad ``gpus`` and ``ImportError`` naming the package
    when dask-cuda is not installed. ``n_visible`` (default: torch's CUDA device count) bounds the devices.
    """
    from workbench.errors import ParameterError

    if n_visible is None:
        import torch

        n_visible = torch.cuda.device_count()
    if gpus == "all":
        devices = list(range(n_visible))
    elif isinstance(gpus, int) and not isinstance(gpus, bool):
        devices = list(range(gpus))
    elif isinstance(gpus, (list, tuple)) and all(isinstance(g, int) for g in gpus):
        devices = list(gpus)
    else:
        raise ParameterError(f"gpus must be 'all', a number of GPUs or a list of device ids, not {gpus!r}")
    if not devices or max(devices) >= n_visible or min(devices) < 0:
        raise ParameterError(f"gpus={gpus!r} asks for devices {devices}, but {n_visible} CUDA device(s) are visible")
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as err:
        raise ImportError(
            "embed_slides(gpus=...) starts one worker per GPU with dask-cuda, which is not installed: "
            "pip install dask-cuda (or pass client= with your own cluster)"
        ) from err
    return LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(map(str, devices)), threads_per_worker=1)


def _row(slide_id, status, n_tiles, *, error=None) -> dict:
    return {
        "slide_id": slide_id,
        "status": status,
        "n_tiles": n_tiles,
        "n_nonfinite": 0,
        "seconds": 0.0,
        "tiles_per_s": float("nan"),
        "error": error,
    }


def embed_slides(
    store_path: str | os.PathLike,
    encoder: str = "stain-texture",
    *,
    weights=None,
    device: str | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    compile: bool = False,
    on_error: str = "skip",
    client=None,
    progress: bool = True,
    retry_failed: bool = False,
    time_limit: float | None = 1800.0,
    gpus=None,
) -> pd.DataFrame:
    """Embed every complete slide of a store with one encoder (resumable; see the module docstring).

    Parameters
    ----------
    store_path : the ``.zarr`` dataset store (tiled)
    encoder : registry name (``workbench.features.encoders.list_encoders()``) or ``timm:<model>``
    weights : checkpoint file, ``"random"``, or None to search the usual places
    device : ``"cuda"``, ``"cuda:1"``, ``"cpu"``; None picks CUDA when present
    batch_size : tiles per batch; None fits it to the device's memory
    num_workers : DataLoader worker processes; None picks from the CPU count (0 inside daemon processes)
    compile : ``torch.compile`` the model
    on_error : ``"skip"`` records a failing slide and goes on; ``"raise"`` raises at the first one
    client : a ``dask.distributed.Client``: one task per slide on its workers (one worker per GPU)
    progress : a tqdm bar over tiles
    retry_failed : retry slides whose failure with this encoder is recorded (default: skip, ``failed-earlier``)
    time_limit : seconds of reading per slide (None: no limit); a slide past it is recorded as timed out
    gpus : ``"all"``, a number of GPUs or a list of device ids: start dask-cuda's ``LocalCUDACluster`` (one
        worker per GPU, :func:`gpu_cluster`) for this run when no ``client`` is given

    Returns
    -------
    DataFrame, one row per slide: slide_id, status (embedded / skipped / error), n_tiles, n_nonfinite,
    seconds, tiles_per_s, error. ``summary.attrs`` has encoder, weights_digest, device, tiles_per_s.
    """
    from workbench.validate import check_bool, check_choice, check_int, check_optional, check_str

    check_choice("on_error", on_error, ("skip", "raise"))
    check_str("encoder", encoder, max_len=500)
    check_optional(check_str, "device", device, max_len=50)
    check_optional(check_int, "batch_size", batch_size, 1, 65536)
    check_optional(check_int, "num_workers", num_workers, 0, 256)
    check_bool("compile", compile)
    check_bool("retry_failed", retry_failed)
    from workbench.validate import check_float

    check_optional(check_float, "time_limit", time_limit, 0, lo_open=True)
    if gpus is not None and client is None:
        from distributed import Client

        with gpu_cluster(gpus) as cluster, Client(cluster) as gpu_client:
            log.info("embedding on %d GPU workers (dask-cuda)", len(cluster.workers))
            return embed_slides(
                store_path,
                encoder,
                weights=weights,
                device=device,
                batch_size=batch_size,
                num_workers=num_workers,
                compile=compile,
                on_error=on_error,
                client=gpu_client,
                progress=progress,
                retry_failed=retry_failed,
                time_limit=time_limit,
            )
    store_path = str(st.as_path(store_path))
    root = st.open_store(store_path, mode="a")
    ids = st.slide_ids(root)
    if not ids:
        raise st.StoreError(f"store {store_path} has no tiled slides: run tiling first")
    failed = {} if retry_failed else st.failed_slides(root, "embed", encoder=encoder)
    skipped_failed = [_row(s, "failed-earlier", 0, error=failed[s]) for s in ids if s in failed]
    ids = [s for s in ids if s not in failed]
    rows = []
    t0 = time.perf_counter()
    with st.write_lock(store_path):
        if client is not None:
            futures = [
                client.submit(
                    _slide_task,
                    store_path,
                    s,
                    encoder,
                    weights,
                    device,
                    batch_size,
                    num_workers,
                    compile,
                    pure=False,
                    key=f"embed-{encoder}-{s}",
                )
                for s in ids
            ]
            rows = client.gather(futures)
            enc = None
            dev = device or "dask workers"
        else:
            dev = pick_device(device)
            enc, model = _prepared(encoder, weights, dev, compile)
            bs = batch_size or auto_batch_size(enc, dev)
            if len(ids):  # a batch is bounded by the largest slide's tile count (at least 1)
                bs = max(1, min(bs, int(st.tile_counts(root, ids).max()) or 1))
            nw = _default_workers(dev) if num_workers is None else num_workers
            todo = [s for s in ids if not _is_done(root, s, enc)]
            bar = _progress(progress, int(st.tile_counts(root, todo).sum()) if todo else 0, enc.name)
            log.info(
                "embedding %d slides (%d already done) with %s on %s, batch %d, %d workers",
                len(todo),
                len(ids) - len(todo),
                enc.name,
                dev,
                bs,
                nw,
            )
            rows = [_row(s, "skipped", int(root[st.Key.coords(s)].shape[0])) for s in ids if s not in todo]
            jobs = []
            for s in todo:
                try:
                    jobs.append(slide_job(root, s, enc))
                except Exception as exc:
                    if on_error == "raise":
                        raise
                    rows.append(_row(s, "error", 0, error=f"{type(exc).__name__}: slide {s!r}: {exc}"))
            rows += run_slides(
                root,
                jobs,
                enc,
                model,
                dev,
                batch_size=bs,
                num_workers=nw,
                on_error=on_error,
                progress=bar,
                time_limit=time_limit,
            )
            order = {s: i for i, s in enumerate(ids)}
            rows.sort(key=lambda r: order[r["slide_id"]])
            if bar is not None:
                bar.close()
        recorded = st.failed_slides(root, "embed")
        for r in rows:
            if r["status"] == "error":
                st.record_failure(root, r["slide_id"], "embed", r["error"], encoder=encoder)
            elif r.get("n_nonfinite"):  # embedded, with rows flagged: listed, not skipped on a re-run
                st.record_failure(root, r["slide_id"], "embed", r["error"], "NonFiniteFeatures")
            elif r["status"] == "embedded" and r["slide_id"] in recorded:
                st.clear_error(root, r["slide_id"], "embed")
        if skipped_failed:
            order = {s: i for i, s in enumerate(st.slide_ids(root))}
            rows = sorted(rows + skipped_failed, key=lambda r: order.get(r["slide_id"], 0))
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    done = summary[summary.status == "embedded"]
    seconds = time.perf_counter() - t0
    summary.attrs.update(
        {
            "encoder": encoder,
            "weights_digest": enc.weights_digest if enc else None,
            "device": dev,
            "tiles_per_s": float(done.n_tiles.sum() / seconds) if len(done) else float("nan"),
        }
    )
    bad = summary[summary.status.isin(["error", "failed-earlier"])]
    if on_error == "raise" and len(bad):
        raise RuntimeError("embedding failed for " + "; ".join(f"{r.slide_id}: {r.error}" for r in bad.itertuples()))
    return summary


def _progress(progress: bool, total: int, name: str):
    if not progress or total == 0:
        return None
    from workbench.progress import progress_bar

    return progress_bar(total=total, desc=f"embed {name}", unit="tile")


def stored_throughput(root, encoder: str) -> float:
    """Tiles per second of the embedding runs recorded in the store (from each array's ``seconds``)."""
    n, seconds = 0, 0.0
    for s in st.slide_ids(root):
        key = st.Key.features(s, encoder)
        if st.is_complete(root, key):
            a = root[key].attrs
            n, seconds = n + int(a.get("n_tiles", 0)), seconds + float(a.get("seconds", 0.0))
    return n / seconds if seconds > 0 else float("nan")
