"""The latency suite (nima_edge.benchmarks once installed)."""
