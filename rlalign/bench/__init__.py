"""Benchmarks: ours against a peer doing the same work in the same process (`rlalign bench NAME`)."""
