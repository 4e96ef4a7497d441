"""Benchmarks of lightkv (installed as ``lightkv_perf``; run them with ``lightkv bench``)."""
