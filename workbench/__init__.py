"""Pathology curation workbench: whole-slide images to a curated, searchable tile-embedding dataset.

The pipeline, one subpackage per stage, around one data object (:class:`Dataset`, ``workbench.dataset``)
and its store (``workbench.store``):

- ``workbench.io``: manifests → slides → tissue segmentation → tiling (and synthetic slides, exports)
- ``workbench.features``: encoders → embedding, pixel QC, marker prefilter
- ``workbench.curate``: k-means → hierarchical tree → balanced sampling
- ``workbench.search``: tile indexes → slide search → retrieval metrics
- ``workbench.ui``: notebook widgets, plots, QC labels, the napari plugin
- ``workbench.runs``: the notebook runner, papermill sweeps, the demo

The public names below are importable from ``workbench`` itself; heavy libraries (torch, faiss, cuML,
napari) load only when used. Every error raised on purpose derives from :class:`WorkbenchError`.
"""

__version__ = "0.2.0.dev0"

_PUBLIC = {
    # the data object
    "Dataset": "workbench.dataset",
    "open_dataset": "workbench.dataset",
    "as_dataset": "workbench.dataset",
    # stages
    "read_manifest": "workbench.io.manifest",
    "open_slide": "workbench.io.slides",
    "SegmentParams": "workbench.io.segment",
    "tile_slides": "workbench.io.tiling",
    "list_encoders": "workbench.features.encoders",
    "get_encoder": "workbench.features.encoders",
    "embed_slides": "workbench.features.embed",
    "MarkerPrefilter": "workbench.features.prefilter",
    "HierarchicalKMeans": "workbench.curate.cluster",
    "HierarchicalSampler": "workbench.curate.sample",
    "StratifiedBatchSampler": "workbench.curate.sample",
    "TileIndex": "workbench.search.retrieval",
    # errors
    "WorkbenchError": "workbench.errors",
}

__all__ = [*sorted(_PUBLIC), "__version__"]


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'workbench' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__():
    return __all__
