"""Benchmarks and long-running reliability checks (loopback only, bounded in count and time)."""
