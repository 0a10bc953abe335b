"""Benchmarks run on a GPU (see benchmarks/README.md). Not part of the installed package."""
