"""Embedding throughput: loader-only, model-only (synthetic input) and end-to-end tiles/s, in one run.

    python benchmarks/embedding.py [--encoder stain-texture] [--device cpu|cuda] [--batch-size N]
                                   [--num-workers N] [--size 8192] [--weights random]

Makes a synthetic slide and a store of its own (in a temporary folder; the slide enters the manifest
``--copies`` times), then measures
1. the loader alone (DataLoader + TileReader workers, tiles at the encoder's input size),
2. the model alone on random uint8 tiles already on the device (preprocess + forward, bf16 autocast on
   CUDA for networks), and
3. ``embed_slides`` end to end (read, encode, write float16 into the store),
so it is clear which side limits. Networks use random weights unless ``--weights`` names a file;
e.g. ``--encoder timm:vit_large_patch16_224`` (ViT-L/16) or ``--encoder h-optimus-0`` (ViT-g/14).
Last line: JSON with loader_tiles_per_s, model_tiles_per_s, end_to_end_tiles_per_s, encoder, device.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import pandas as pd

log = logging.getLogger("benchmarks.embedding")


def main(argv=None) -> dict:
    import torch

    from workbench import store as st
    from workbench.features import embed as E
    from workbench.io.synthetic import make_slide
    from workbench.io.tiling import tile_slides

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="stain-texture")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--num-workers", type=int, default=None)
    ap.add_argument("--size", type=int, default=8192, help="side of the synthetic slide, level-0 px at 0.25 mpp")
    ap.add_argument("--copies", type=int, default=8, help="the slide enters the manifest this many times")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--model-batches", type=int, default=10)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    device = E.pick_device(args.device)
    weights = None if args.weights in ("none", "") else args.weights
    enc, model = E._prepared(args.encoder, weights if args.encoder != "stain-texture" else None, device, args.compile)
    bs = args.batch_size or E.auto_batch_size(enc, device)
    nw = E._default_workers(device) if args.num_workers is None else args.num_workers
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_slide(tmp / "bench.tiff", width=args.size, height=args.size, mpp=0.25, seed=7, n_pieces=3)
        store = tmp / "bench.zarr"
        ids = [f"bench{i}" for i in range(args.copies)]
        tile_slides(
            pd.DataFrame({"slide_id": ids, "path": [str(tmp / "bench.tiff")] * len(ids)}), store, progress=False
        )
        root = st.open_store(store)
        jobs = [E.slide_job(root, s, enc) for s in ids]
        n = sum(len(j["coords"]) for j in jobs)
        log.info(
            "%d tiles, encoder %s (%s), device %s, batch %d, %d loader workers",
            n,
            enc.name,
            enc.architecture,
            device,
            bs,
            nw,
        )

        # 1. loader only
        ds = E.TileBatches(jobs, bs)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=nw, pin_memory=device != "cpu", prefetch_factor=4 if nw else None
        )
        t0 = time.perf_counter()
        got = sum(len(t) for _, _, t, _ in loader)
        loader_rate = got / (time.perf_counter() - t0)

        # 2. model only, synthetic uint8 tiles already on the device
        x = torch.randint(0, 256, (bs, enc.input_px, enc.input_px, 3), dtype=torch.uint8, device=device)
        amp = device.startswith("cuda") and enc.precision in ("bf16", "fp16")
        dtype = torch.bfloat16 if enc.precision == "bf16" else torch.float16

        def step():
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=amp):
                return model(enc.preprocess(x)).float()

        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.model_batches):
            out = step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        model_rate = args.model_batches * bs / (time.perf_counter() - t0)
        assert torch.isfinite(out).all(), "model produced non-finite features on random input"

        # 3. end to end into the store
        t0 = time.perf_counter()
        summary = E.embed_slides(
            store,
            args.encoder,
            weights=weights if not enc.checkpoint_free else None,
            device=device,
            batch_size=bs,
            num_workers=nw,
            compile=args.compile,
            progress=False,
        )
        e2e_rate = int(summary.n_tiles.sum()) / (time.perf_counter() - t0)
    result = {
        "loader_tiles_per_s": round(loader_rate, 1),
        "model_tiles_per_s": round(model_rate, 1),
        "end_to_end_tiles_per_s": round(e2e_rate, 1),
        "encoder": args.encoder,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "precision": enc.precision if amp else "fp32",
        "batch_size": bs,
        "num_workers": nw,
        "n_tiles": n,
        "limited_by": "loader" if loader_rate < model_rate else "model",
    }
    print(f"loader only   : {loader_rate:10.1f} tiles/s")
    print(f"model only    : {model_rate:10.1f} tiles/s ({result['precision']})")
    print(f"end to end    : {e2e_rate:10.1f} tiles/s")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
