"""Benchmark and profiling scripts, run as modules: python -m bench.scripts.<name>."""
