"""The demo: build the synthetic demo slides, then run every numbered notebook into a run folder.

``python -m workbench.runs.demo --run-dir runs/demo`` (what ``make demo`` calls). The slides are generated
deterministically into ``data/demo/`` once (kept between runs); the manifest is ``data_manifests/demo.csv``
with paths relative to it. Each notebook is executed with papermill into ``<run-dir>/`` and writes
``<run-dir>/NN_metrics.json``; the store is ``<run-dir>/demo.zarr``. Before notebook 07 a small
segmentation sweep (``sweeps/demo.yml``) runs into ``<run-dir>/sweep/``. A summary of all metrics is printed
and written to ``<run-dir>/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from workbench.runs.notebooks import declared_types, numbered_notebooks, read_metrics, run_notebook

log = logging.getLogger("workbench.runs.demo")


def build_demo_data(data_dir: Path, manifest_path: Path, *, n_slides: int, size: int, seed: int) -> Path:
    """Generate the demo slides (skipped when they exist with the same settings) and their manifest."""
    from workbench.io.synthetic import make_demo_set

    stamp = data_dir / "settings.json"
    settings = {"n_slides": n_slides, "size": size, "seed": seed}
    if stamp.exists() and json.loads(stamp.read_text()) == settings and manifest_path.exists():
        log.info("demo slides already in %s", data_dir)
        return manifest_path
    data_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    df = make_demo_set(data_dir, n_slides=n_slides, size=size, seed=seed, manifest_path=manifest_path)
    from workbench.store import write_json_atomic

    write_json_atomic(stamp, settings)
    log.info("made %d demo slides in %.1f s", len(df), time.perf_counter() - t0)
    return manifest_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--data-dir", default="data/demo")
    ap.add_argument("--manifest", default="data_manifests/demo.csv")
    ap.add_argument("--n-slides", type=int, default=24)
    ap.add_argument("--size", type=int, default=6144, help="slide side in level-0 pixels (0.25 mpp)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--notebooks", nargs="*", help="notebook numbers to run (default: all)")
    ap.add_argument("--fresh", action="store_true", help="delete the run's store first")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)

    run_dir = Path(args.run_dir).resolve()
    manifest = build_demo_data(
        Path(args.data_dir).resolve(),
        Path(args.manifest).resolve(),
        n_slides=args.n_slides,
        size=args.size,
        seed=args.seed,
    )
    store = run_dir / "demo.zarr"
    if args.fresh and store.exists():
        import shutil

        shutil.rmtree(store)
    params = {"manifest": str(manifest), "store": str(store)}
    notebooks = numbered_notebooks()
    if args.notebooks:
        notebooks = [nb for nb in notebooks if nb.name[:2] in {n.zfill(2) for n in args.notebooks}]
    t0 = time.perf_counter()
    for nb in notebooks:
        t = time.perf_counter()
        nb_params = params
        if nb.name.startswith("07"):  # the sweep report needs a sweep: a few segmentation points
            from workbench.runs.sweep import run_demo_sweep

            nb_params = {**params, **run_demo_sweep(manifest, run_dir)}
        declared = declared_types(nb)  # each notebook gets the demo parameters it declares, no others
        nb_params = {k: v for k, v in nb_params.items() if k in declared}
        run_notebook(nb, run_dir, nb_params, relative=True)  # the executed copies carry run-relative paths
        log.info("%s done in %.1f s", nb.name, time.perf_counter() - t)
    metrics = read_metrics(run_dir)
    metrics["demo.seconds"] = round(time.perf_counter() - t0, 1)
    from workbench.store import write_json_atomic

    write_json_atomic(run_dir / "metrics.json", metrics)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
