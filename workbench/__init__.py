"""Pathology curation workbench: whole-slide images to a curated, searchable tile-embedding dataset.

Stages, one module each: ``manifest`` → ``slides`` → ``segment`` → ``tiling`` → ``tile_qc`` →
``encoders``/``embed`` → ``prefilter`` → ``kmeans``/``cluster`` → ``sample`` → ``retrieval``/``slidesearch`` →
``evaluate``; ``store`` holds the Zarr layout, ``synthetic`` makes slides with ground truth, ``sweep`` runs
papermill sweeps, ``napari`` and ``widgets`` show it all. Heavy libraries (torch, faiss, cuML, napari) load lazily.
"""
__version__ = "0.2.0.dev0"
