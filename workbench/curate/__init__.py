"""Curation: k-means kernels, the hierarchical k-means tree, balanced sampling."""
