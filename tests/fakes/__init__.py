"""Stand-ins the tests share (docs/GPU.md, "The GPU path without a GPU").

- device.py: an asynchronous fake CUDA device on host memory (streams, events, a pool that
  reuses freed memory while queued work still uses it, hazards, deadlocks);
- cupy.py: CuPy's array module on it (every operation CuPy would launch is queued), with
  ``cupy.cuda`` (memcpyAsync, pinned memory, streams, events, cuBLAS's gemmEx);
- kernels.py: the fused kernels' launch code on it (FakeModule: PTX-checked launches of the
  NumPy emulations in emulations.py);
- mpi.py: communicators whose buffers are checked against queued work at the host call;
- nccl.py: CuPy's NCCL on it, over MPI;
- engine.py: the CuPy backend and the device transports on it, for the engine's runs.
"""
