"""The workers: the pool that keeps one process per core, the worker loop, reading a chunk's ranges and running the task."""
