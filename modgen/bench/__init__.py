"""Benchmark methodology: load generation, request metrics and FastGen's effective throughput."""
