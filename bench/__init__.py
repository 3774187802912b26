"""Benchmarks (not tests: they take minutes and real data): each a module run as ``python -m bench.NAME``,
each writing a result file under bench/results/ with the commit, command, machine and data it came from.
Shared parts live in ``bench.common``; real servers come from ``harness``."""
