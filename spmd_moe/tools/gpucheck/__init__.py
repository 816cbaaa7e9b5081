"""The steps of ``bin/gpu-check`` in Python (``python -m spmd_moe.tools.gpucheck STEP``).

bin/gpu-check is the one command a session lent a GPU machine runs (docs/GPU.md): it
installs the carried wheels and runs these steps (and pytest and ``spmd-moe bench``) as
time-boxed stages, leaving its files in ``$OUT``.

- preflight.py, ``preflight MODE``: within seconds, the MPI library loads, a launcher starts
  2 ranks that see each other, CuPy sees the GPU, NVRTC compiles one kernel; else one line
  naming what is missing, exit 3.
- facts.py, ``compile MODE``: every kernel into the on-disk cache (and loaded on the GPU);
  ``facts BACKEND FACTS_JSON``: versions, the device, the bf16 census, the MPI library.
- runs.py, ``compare WORK OUT_JSON BACKEND``: ``spmd-moe run`` on the backend under test at
  1 and 2 ranks against NumPy; ``transport WORK OUT_JSON BACKEND MODE``: ``spmd-moe bench
  --transport-only`` at 2 and 4 ranks.
- decode.py, ``decode WORK OUT_JSON BACKEND MODE``: a decode step beside the memory-
  bandwidth floor ``spmd-moe plan`` prints, at a copy bandwidth measured in the step.
- summary.py, ``summary OUT STAGES FACTS_JSON SECONDS MODE``: the stage table and the
  numbers as the section to paste into docs/PERFORMANCE.md.
"""
