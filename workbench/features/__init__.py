"""Tile features: encoders, the checkpoint-free descriptor, embedding, pixel QC, marker prefilter."""
