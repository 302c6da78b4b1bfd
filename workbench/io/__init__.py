"""Slides in: manifests, slide reading, tissue segmentation, tiling, synthetic slides, exports."""
