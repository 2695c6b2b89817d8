"""Benchmarks (``make bench``): scripts, not tests. See ``docs/PERFORMANCE.md`` for the results."""
