"""Moving data between ranks: the MPI host transport and the device transports (CUDA-
aware MPI, NCCL), the two-micro-batch flight driver (overlap.py) and the watchdog.
Imports core and backend.
"""
