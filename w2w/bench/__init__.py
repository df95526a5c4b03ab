"""Benchmarks: decode vs transformers, reducer scale, planning speed, GPU engines."""
