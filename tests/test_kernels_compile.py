"""The fused CUDA kernels' sources and how they are built and attached (backend/kernels/
compile.py, kernels/__init__.py), without a GPU: every source compiles with NVRTC for sm_90a
and sm_80 with the options the run time uses (one list); the attention kernels are built on
tensor-core instructions and do not spill at head dim 128 (64- and 128-query tiles); every
kernel name the launch code can ask for exists; the on-disk cache compiles once per (source,
options, target, NVRTC) and the run time loads exactly its cubin; the ``SPMD_MOE_KERNELS=0``,
NumPy-backend and no-device paths of attach().
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from fakes.kernels import compiled

from spmd_moe.backend import kernels
from spmd_moe.backend.kernels import compile as kernel_compile
from spmd_moe.backend.kernels import schedule as sch
from spmd_moe.backend.kernels.compile import (KERNEL_DIR, SOURCES, compile_source, entry_points,
                                              source)

ARCHS = ("sm_90a", "sm_80")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", SOURCES)
def test_source_compiles_to_cubin(name, arch):
    result = compiled(name, arch)
    assert len(result.cubin) > 1000
    assert result.cubin[:4] == b"\x7fELF"
    assert "warning" not in result.log.lower(), result.log


def test_one_list_of_options_for_run_time_and_tests(monkeypatch):
    """compile_source hands NVRTC the target and OPTIONS (with CuPy's -ftz=true), and the
    run time loads compile_source's cubin (test_load_module_runs_the_cached_cubin)."""
    from cupy.cuda import nvrtc

    seen = []
    real = nvrtc.compileProgram
    monkeypatch.setattr(nvrtc, "compileProgram",
                        lambda program, options: (seen.append(list(options)),
                                                  real(program, options))[1])
    compile_source("expert_ffn.cu", "sm_80")
    assert seen == [["--gpu-architecture=sm_80", *kernel_compile.OPTIONS]]
    assert "-ftz=true" in kernel_compile.OPTIONS and "-std=c++17" in kernel_compile.OPTIONS


def test_device_arch():
    assert kernel_compile.device_arch("90") == "sm_90a"
    assert kernel_compile.device_arch(80) == "sm_80"
    assert kernel_compile.device_arch("100") == "sm_100"


SMALL_SOURCES = ("expert_ffn.cu", "permute.cu")   # fast to compile; flash_attention is ~20 s


def test_cache_compiles_once_per_source_and_target(tmp_path, monkeypatch):
    monkeypatch.setenv("SPMD_MOE_KERNEL_CACHE", str(tmp_path / "cache"))
    first = kernels.precompile("sm_80", SMALL_SOURCES)
    assert [(name, compiled) for name, _, compiled in first] == [(n, True) for n in SMALL_SOURCES]
    again = kernels.precompile("sm_80", SMALL_SOURCES)
    assert [compiled for _, _, compiled in again] == [False, False]
    path, compiled = kernel_compile.cubin_path("expert_ffn.cu", "sm_80")
    assert not compiled and path.read_bytes() == compile_source("expert_ffn.cu", "sm_80").cubin
    assert set(kernel_compile.cached_entry_points(path)) == {
        "gelu_bf16_inplace", "gelu_f32_inplace", "swiglu_bf16", "swiglu_f32"}
    # Another target, other options or another source text are other entries.
    assert kernel_compile.cubin_path("expert_ffn.cu", "sm_90a")[1]
    monkeypatch.setattr(kernel_compile, "OPTIONS", (*kernel_compile.OPTIONS, "-DUNUSED=1"))
    assert kernel_compile.cubin_path("expert_ffn.cu", "sm_80")[1]
    assert not list((tmp_path / "cache").glob("*.partial"))


def test_load_module_runs_the_cached_cubin(tmp_path, monkeypatch):
    """The run time's RawModule is built from the cache's cubin for the device's target,
    and fetches every kernel of it at load (a missing one fails in attach())."""
    import cupy

    monkeypatch.setenv("SPMD_MOE_KERNEL_CACHE", str(tmp_path))
    made = []

    class Module:
        def __init__(self, path):
            self.path, self.fetched = path, []
            made.append(self)

        def get_function(self, name):
            self.fetched.append(name)

    monkeypatch.setattr(cupy, "RawModule", lambda path: Module(path))
    monkeypatch.setattr(cupy.cuda, "Device",
                        lambda: SimpleNamespace(id=7, compute_capability="90"))
    monkeypatch.setattr(kernel_compile, "_modules", {})
    module = kernel_compile.load_module("permute.cu")
    assert kernel_compile.load_module("permute.cu") is module and len(made) == 1
    path, compiled = kernel_compile.cubin_path("permute.cu", "sm_90a")
    assert module.path == str(path) and not compiled
    assert set(module.fetched) == set(entry_points(compile_source("permute.cu", "sm_90a").ptx))


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_runs_on_tensor_cores(arch):
    ptx = compiled("flash_attention.cu", arch).ptx
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in ptx
    assert "cp.async.cg.shared.global" in ptx


def ptxas_report(arch: str, kernel: str) -> dict[str, int]:
    """ptxas' resource report of one kernel: stack frame, spill bytes, registers."""
    log = compiled("flash_attention.cu", arch).log
    entry = re.search(rf"Compiling entry function '{kernel}'.*?(\d+) bytes stack frame, "
                      r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers",
                      log, re.DOTALL)
    assert entry is not None, log
    return dict(zip(("stack", "spill_stores", "spill_loads", "registers"),
                    map(int, entry.groups())))


@pytest.mark.parametrize("kernel", ["flash_attention_bf16_m64_d128_v16",
                                    "flash_attention_bf16_m64_d128_v4",
                                    "flash_attention_bf16_m128_d128_v16"])
def test_paper_attention_kernels_do_not_spill(kernel):
    """Head dim 128 keeps its Q fragments and O accumulator in registers, with 4 warps (at
    most 255 registers; up to 184 fit two CTAs per SM) and with 8 (one CTA of 256
    threads)."""
    report = ptxas_report("sm_90a", kernel)
    assert report["spill_stores"] == report["spill_loads"] == report["stack"] == 0, report
    assert report["registers"] <= 255
    if "_m64_" in kernel:
        # Two 4-warp CTAs per SM: registers are allocated per warp in units of 256.
        per_warp = -(-report["registers"] * 32 // 256) * 256
        assert 2 * 4 * per_warp <= 65536, report


@pytest.mark.parametrize("name", ["flash_attention.cu", "expert_ffn.cu", "mla.cu"])
def test_no_kernel_spills_for_sm_90a(name):
    """Every instantiation (every head dim, tile height, copy width, float32; the GELU and
    SwiGLU passes), whatever the head layout: the group size of grouped-query attention
    is a run-time argument, so no variant was added for it."""
    log = compiled(name, "sm_90a").log
    reports = re.findall(r"Compiling entry function '(\w+)'.*?(\d+) bytes stack frame, "
                         r"(\d+) bytes spill stores, (\d+) bytes spill loads", log, re.DOTALL)
    names = set(entry_points(compiled(name, "sm_90a").ptx))
    assert {kernel for kernel, *_ in reports} == names
    spilled = [r for r in reports if r[1:] != ("0", "0", "0")]
    assert not spilled, spilled


def test_sources_need_no_headers():
    for name in SOURCES:
        assert not re.search(r"^\s*#include", source(name), re.MULTILINE), name


def test_every_launch_name_exists():
    entries = {name: set(entry_points(compiled(name, "sm_80").ptx)) for name in SOURCES}
    attention = entries["flash_attention.cu"]
    dims = [(d, d) for d in range(2, 129, 2)] + [(d, v) for d in range(130, 193, 2)
                                                  for v in (2, 64, 128)] + [(12, 6), (192, 8)]
    for head_dim, v_dim in dims:
        for dtype in ("bfloat16", "float32"):
            for block_m in sch.TILE_ROWS:
                for pointers in ((256, 512, 1024), (256, 516, 1024)):
                    variant = sch.attention_variant(head_dim, dtype, block_m, pointers, v_dim)
                    assert variant.kernel in attention
                    assert variant.combine_kernel in attention
    assert {"mla_decode_bf16", "mla_decode_f32"} == entries["mla.cu"]
    assert {"gelu_bf16_inplace", "gelu_f32_inplace", "swiglu_bf16",
            "swiglu_f32"} <= entries["expert_ffn.cu"]
    permute = entries["permute.cu"]
    assert {f"gather_rows_v{w}" for w in (16, 4, 2)} <= permute
    assert {"inverse_permutation", "unpermute_weighted_bf16_v16", "unpermute_weighted_bf16_v2",
            "unpermute_weighted_f32_v16", "unpermute_weighted_f32_v4"} <= permute
    assert {f"{kernel}_{dtype}" for dtype in ("bf16", "f32") for kernel in (
        "rms_norm", "add_rms_norm", "residual_add", "bias_add",
        *(f"rope_{kind}" for kind in sch.QK_KINDS))} | {
        "router_topk", "expert_order"} == entries["rowwise.cu"]


def test_python_constants_match_the_kernel_source():
    text = (KERNEL_DIR / "flash_attention.cu").read_text()
    defined = dict(re.findall(r"^#define (\w+) (\d+)", text, re.MULTILINE))
    for name in ("BLOCK_M", "BLOCK_M_LONG", "BLOCK_N", "TILE_FIELDS", "COMBINE_FIELDS",
                 "F32_THREADS", "COMBINE_THREADS", "SMEM_PAD"):
        assert int(defined[name]) == getattr(sch, name), name
    assert sch.F32_THREADS == sch.BLOCK_M                # one thread per query row
    # The launch bounds of each tile height are the threads the launch code starts.
    bounds = dict(re.findall(r"^#define BOUNDS_M(\d+) __launch_bounds__\((\d+)", text,
                             re.MULTILINE))
    assert {int(m): int(t) for m, t in bounds.items()} == {
        m: sch.bf16_threads(m) for m in sch.TILE_ROWS}
    assert sch.bf16_threads(64) == 128 and sch.bf16_threads(128) == 256
    rowwise = (KERNEL_DIR / "rowwise.cu").read_text()
    defined = dict(re.findall(r"^#define (\w+) (\d+)", rowwise, re.MULTILINE))
    for name in ("ROW_THREADS", "ROUTER_THREADS", "ORDER_THREADS", "MAX_EXPERTS_PER_LANE",
                 "MAX_HEADS", "MAX_HEAD_DIM"):
        assert int(defined[name]) == getattr(sch, name), name
    assert [int(defined[f"QK_{kind.upper()}"]) for kind in sch.QK_KINDS] == [0, 1, 2, 3]
    mla = dict(re.findall(r"^#define (\w+) (\d+)", (KERNEL_DIR / "mla.cu").read_text(),
                          re.MULTILINE))
    for name in ("MLA_THREADS", "MLA_HEADS", "MLA_KEYS", "MLA_MAX_LATENT", "MLA_TILE_FIELDS"):
        assert int(mla[name]) == getattr(sch, name), name
    assert sch.MLA_THREADS == 32 * sch.MLA_HEADS // 4 and sch.MLA_KEYS == 32


# --- attach() without a GPU --------------------------------------------------------------

class FakeBackend:
    def __init__(self, on_gpu: bool):
        self.on_gpu = on_gpu
        self.kernels = "unset"
        self.kernels_reason = "unset"


def test_env_switch_disables_kernels(monkeypatch):
    monkeypatch.setenv("SPMD_MOE_KERNELS", "0")
    backend = FakeBackend(on_gpu=True)
    kernels.attach(backend)
    assert backend.kernels is None
    assert "SPMD_MOE_KERNELS=0" in backend.kernels_reason
    assert "SPMD_MOE_KERNELS=0" in kernels.kernel_status()
    assert "\n" not in kernels.kernel_status()


def test_numpy_backend_gets_no_kernels(monkeypatch):
    monkeypatch.delenv("SPMD_MOE_KERNELS", raising=False)
    backend = FakeBackend(on_gpu=False)
    kernels.attach(backend)
    assert backend.kernels is None and "NumPy" in backend.kernels_reason


def test_no_device_is_a_reason_not_a_crash(monkeypatch):
    from spmd_moe.backend.array import probe_cupy

    if probe_cupy()[0] is not None:
        pytest.skip("a CUDA device is usable here")
    monkeypatch.delenv("SPMD_MOE_KERNELS", raising=False)
    backend = FakeBackend(on_gpu=True)
    kernels.attach(backend)
    assert backend.kernels is None
    assert backend.kernels_reason.startswith("unavailable")
    assert kernels.kernel_status() == backend.kernels_reason


@pytest.mark.gpu
def test_cupy_backend_attaches_the_kernels(monkeypatch):
    from spmd_moe.backend.array import Backend, choose_backend

    monkeypatch.delenv("SPMD_MOE_KERNELS", raising=False)
    backend = Backend(choose_backend("cupy"), "bfloat16")
    assert backend.kernels is not None, backend.kernels_reason
    assert "fused" in backend.kernels_reason
