"""Search: tile indexes, slide search, retrieval metrics."""
