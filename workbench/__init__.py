"""Pathology curation workbench: whole-slide images to a curated, searchable tile-embedding dataset.

Stages, one module each: ``manifest`` → ``slides`` → ``segment`` → ``tiling`` → ``encoders``/``embed`` →
``prefilter`` → ``cluster`` → ``sample`` → ``retrieval``/``evaluate``; ``store`` holds the Zarr layout and
``synthetic`` makes slides with ground truth. Heavy libraries (torch, faiss, cuML, napari) load lazily.
"""
__version__ = "0.1.0"
