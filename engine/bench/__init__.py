"""Benchmarks: ``umim bench fedavg | distill | scale``.

Each measures several ways of doing the same work side by side in one run and prints a
table of wall times, samples/s and ratios. They are commands, not timed tests; the tests
only run them at a small size to check that the comparison itself is correct.
"""
