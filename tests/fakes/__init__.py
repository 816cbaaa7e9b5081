"""Stand-ins the tests share: the fused kernels' launch code on a fake device (kernels.py)
and the NumPy emulations of the kernels behind it (emulations.py)."""
