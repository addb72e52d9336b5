"""Benchmarks for hubcore's latency tax and hot paths (`python -m bench.<name>`)."""
