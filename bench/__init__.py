"""Benchmarks for llm-sidecar against real baselines: `python -m bench`.

Every scenario starts the servers it needs on loopback (free ports) as
subprocesses, runs its baseline in the same run, and reports ratios. The
results go to `bench/results/latest.md` and PNG plots beside it.
"""
