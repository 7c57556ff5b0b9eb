"""Benchmarks of the queue worker (``python -m bench.run``); see docs/PERFORMANCE.md."""
