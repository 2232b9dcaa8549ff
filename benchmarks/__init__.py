"""Benchmarks behind benchmark.py: training step vs backbone-only step, head vs official head, retrieval at scale."""
