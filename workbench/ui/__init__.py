"""Looking at it: notebook widgets, plots, QC labels, the napari plugin."""
