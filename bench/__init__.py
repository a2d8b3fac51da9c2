"""Benchmark and sample-corpus tooling for chunkmesh (not installed with the package)."""
