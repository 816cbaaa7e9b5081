"""``compile MODE`` (every kernel source into the on-disk cache, and CuPy's own kernels warmed
into its cache, so later stages load instead of compiling) and ``facts BACKEND FACTS_JSON``
(versions, the device, the bf16 census, the MPI library)."""
from __future__ import annotations

import platform

from .common import distribution_version, first_lines, write_json


def compile_kernels(mode: str) -> int:
    """Every kernel source into the cache for the device's target (sm_90a in --cpu mode),
    then, on the GPU, the fused kernels loaded as a run loads them."""
    from ...backend.kernels import load_kernels, precompile
    from ...backend.kernels.compile import cache_dir, device_arch

    arch = "sm_90a"
    if mode == "gpu":
        import cupy

        arch = device_arch(cupy.cuda.Device(0).compute_capability)
    print(f"kernel cache: {cache_dir()}")
    for name, seconds, compiled in precompile(arch):
        print(f"  {name} for {arch}: {'compiled' if compiled else 'found'} in {seconds:.1f} s")
    if mode == "gpu":
        kernels, reason = load_kernels()
        print(f"on the GPU: {reason}")
        if kernels is None:
            return 1
        warm_cupy_kernels("cupy")
        return 0
    print("CuPy's own kernels: not warmed (--cpu: no device)")
    return 0


def warm_cupy_kernels(backend: str) -> list[str]:
    """CuPy compiles its own elementwise and reduction kernels on first use (NVRTC, seconds
    each on a cold cache) and keeps them in its on-disk cache: run what the later stages
    run, at tiny sizes (the engine's prefill and decode in bf16 and float32, the bench's
    layer step), so that their processes load them instead of spending their time limits
    compiling. Returns what ran, each printed with its seconds."""
    import time

    from mpi4py import MPI

    from ...core.config import build_run_config
    from ...engine.runner import open_session, run_decode
    from ...model.inputs import synthetic_input
    from ...perf.bench_shapes import BenchShape
    from ...perf.layer_step import run_layer_step

    ran = []
    for dtype in ("bfloat16", "float32"):
        began = time.monotonic()
        config = build_run_config("tiny", sets=[f"dtype={dtype}", "workload=decode",
                                                "new_tokens=2", "chunk_tokens=4"])
        batch = synthetic_input(config.workload, config.model, config.seed)
        session = open_session(config, MPI.COMM_SELF, batch, backend=backend, new_tokens=2)
        try:
            run_decode(session, batch, 2)
            shape = BenchShape(seqs=2, seq_len=32, d_model=64, d_ff=128, heads=4, experts=4,
                               dtype=dtype)
            run_layer_step(session.backend, shape, iters=1, warmup=0, peer="none")
        finally:
            session.close()
        ran.append(f"{dtype} prefill, decode and layer step")
        print(f"CuPy's own kernels warmed: {ran[-1]} in {time.monotonic() - began:.1f} s",
              flush=True)
    return ran


def facts(backend_name: str, facts_json: str) -> int:
    """Versions, the device, the MPI library, the bf16 census; the key facts as JSON (for
    the summary)."""
    record: dict = {"python": platform.python_version(), "platform": platform.platform()}

    def line(name, fn):
        """Print one fact; record it (None when unavailable: the printed line says why)."""
        try:
            record[name] = fn()
            print(f"{name}: {record[name]}", flush=True)
        except Exception as exc:
            record[name] = None
            print(f"{name}: unavailable ({type(exc).__name__}: {first_lines(exc, 1)})", flush=True)

    print(f"python {record['python']} on {record['platform']}")
    line("numpy", lambda: distribution_version("numpy"))
    line("ml_dtypes", lambda: distribution_version("ml_dtypes"))

    def mpi():
        import mpi4py
        from mpi4py import MPI

        return f"mpi4py {mpi4py.__version__}; {MPI.Get_library_version().splitlines()[0].strip()}"

    line("mpi", mpi)

    def device():
        import cupy

        rt = cupy.cuda.runtime
        props = rt.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        free, total = rt.memGetInfo()
        record["device_name"] = name
        return (f"cupy {cupy.__version__}, CUDA runtime {rt.runtimeGetVersion()}, driver "
                f"{rt.driverGetVersion()}, {rt.getDeviceCount()} device(s), device 0 {name} "
                f"sm_{props['major']}{props['minor']}, {free / 2**30:.1f}/{total / 2**30:.1f} "
                "GiB free")

    line("cupy", device)

    def nvrtc():
        from cupy.cuda import nvrtc as module

        return ".".join(map(str, module.getVersion()))

    line("nvrtc", nvrtc)

    def nccl():
        from cupy.cuda import nccl as module

        if not getattr(module, "available", True):
            return "not available (cupy.cuda.nccl.available is False: libnccl not loaded)"
        return f"NCCL {module.get_version()}"

    line("nccl", nccl)

    def cublas():
        import cupy

        return f"cuBLAS {cupy.cuda.cublas.getVersion(cupy.cuda.device.get_cublas_handle())}"

    line("cublas", cublas)

    def torch_facts():
        import torch

        return (f"torch {torch.__version__}, cuda available {torch.cuda.is_available()}"
                + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))

    line("torch (peer only)", torch_facts)
    try:
        from ...backend import kernels  # noqa: F401  (registers the fused kernels with the backend)
        from ...backend.array import Backend, bf16_census, choose_backend
        from ...parallel.transport import mpi_library

        library = mpi_library()
        record["mpi_cuda_aware"] = f"{library.cuda_aware} ({library.cuda_reason})"
        print(f"MPI CUDA-aware: {record['mpi_cuda_aware']}; libmpi {library.path}")
        bk = Backend(choose_backend(backend_name), "bfloat16")
        record["backend"] = f"{bk.name}: {bk.choice.reason}"
        record["kernels"] = bk.kernels_reason
        record["matmul_path"] = bk.matmul_path
        print(f"backend {record['backend']}; kernels: {bk.kernels_reason}")
        census = bf16_census(bk)
        record["bf16_census"] = census
        print(f"bf16 census ({bk.name}):")
        for op, status in census.items():
            print(f"  {op:<32} {status}")
        print(f"matmul path: {bk.matmul_path}")
    except Exception as exc:       # reported, and the stage fails
        print(f"backend facts failed: {type(exc).__name__}: {first_lines(exc)}")
        write_json(facts_json, record)
        return 1
    write_json(facts_json, record)
    return 0
