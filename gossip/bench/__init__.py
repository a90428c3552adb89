"""Benchmarks run from the command line (``gossip-bench-store``: the message log)."""
