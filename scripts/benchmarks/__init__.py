"""Throughput and memory benchmarks: each writes its section of docs/BENCHMARKS.md; `all` runs every one."""
