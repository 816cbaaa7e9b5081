"""spmd_moe: expert-parallel Mixture-of-Experts inference as an MPI SPMD program.

Each rank owns experts on its own device, runs attention for its own sequences and moves
tokens to and from the experts' ranks by Alltoallv in a bulk-synchronous layer loop.
See docs/ARCHITECTURE.md for the map of modules.
"""
__version__ = "0.1.0"
