"""Pathology curation workbench: whole-slide images to a curated, searchable tile-embedding dataset.

Stages, one module each: ``manifest`` → ``slides`` → ``segment`` → ``tiling`` → ``tile_qc`` →
``encoders``/``embed`` → ``prefilter`` → ``kmeans``/``cluster`` → ``sample`` → ``retrieval``/``slidesearch`` →
``evaluate``; ``store`` holds the Zarr layout, ``synthetic`` makes slides with ground truth, ``sweep`` runs
papermill sweeps, ``napari`` and ``widgets`` show it all. Heavy libraries (torch, faiss, cuML, napari) load lazily.
"""
__version__ = "0.1.0"

__all__ = ["Dataset", "open_dataset", "as_dataset", "__version__"]


def __getattr__(name):  # the Dataset API, loaded on first use so ``import workbench`` stays light
    if name in ("Dataset", "open_dataset", "as_dataset"):
        from workbench import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
