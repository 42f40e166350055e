"""The trainer (nima_edge.train once installed)."""
