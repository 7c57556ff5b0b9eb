"""Reference Queue Service and simulated executors for the demo, tests and benchmarks."""
