"""Running HealthAgent as real processes and reading their state from /proc, for the tests and
the benchmarks alike (it imports neither)."""
