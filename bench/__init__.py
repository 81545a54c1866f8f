"""Benchmarks: `python -m bench` (or `make bench`) measures the scorer and the daemon end to end
and writes JSON + Markdown to bench/results/. See docs/benchmarks.md."""
