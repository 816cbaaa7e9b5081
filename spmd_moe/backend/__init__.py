"""The array backend: CuPy or NumPy chosen once (array.py), host probes (host.py) and
the fused CUDA kernels (kernels/). Imports only core.
"""
