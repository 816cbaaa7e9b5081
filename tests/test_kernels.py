"""The fused CUDA kernels (spmd_moe/backend/kernels).

Without a GPU (CI):
- every source compiles with NVRTC for sm_90a and sm_80 with the options the run time uses
  (one list); the attention kernels are built on tensor-core instructions and do not spill
  at head dim 128 (64- and 128-query tiles); every kernel name the launch code can ask for
  exists; the on-disk cache compiles once per (source, options, target, NVRTC) and the run
  time loads exactly its cubin;
- the host-side planning (tile lists, tile heights, split-K, variants, alignment, chunking,
  vector widths, which tile and heads a CTA runs) against NumPy, with a float64 emulation
  of the kernels' tiled online softmax over the schedule;
- the launch code (fused.py) on a fake device: NumPy emulations of each kernel behind it,
  every launch checked against the kernel's PTX parameter types, outputs poisoned;
  grouped-query attention at groups of 1, 2, 4 and 8 query heads per K/V head, SwiGLU
  experts with the NumPy path's rounding points;
- the engine running each checkpoint family (tests/data/hf) through that launch code on
  the fake device, against transformers' logits and greedy tokens;
- the ``SPMD_MOE_KERNELS=0``, NumPy-backend and no-device paths of attach(), and what
  ``fit_kernels_to_family`` leaves fused (and says) for each family and head dim.

With a GPU (``@pytest.mark.gpu``): the same kernel-against-float64 tests on the compiled
kernels, random shapes and lengths, outputs poisoned with NaN so that an unwritten element
fails.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import hf_fixtures as hf
import numpy as np
import pytest

from spmd_moe.backend import kernels
from spmd_moe.backend.array import BF16, F32
from spmd_moe.backend.kernels import compile as kernel_compile, schedule as sch
from spmd_moe.backend.kernels.compile import (KERNEL_DIR, SOURCES, compile_source, entry_points,
                                              source)
from spmd_moe.backend.kernels.fused import FusedKernels

ARCHS = ("sm_90a", "sm_80")


# --- compilation (no GPU) ------------------------------------------------------------------

_compiled: dict = {}


def compiled(name: str, arch: str):
    """One NVRTC compile per (source, arch) for the whole module, with ptxas statistics."""
    if (name, arch) not in _compiled:
        _compiled[name, arch] = compile_source(name, arch, extra_options=("--ptxas-options=-v",))
    return _compiled[name, arch]


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


# --- host-side planning (no GPU) -----------------------------------------------------------

def test_attention_variant_choice():
    assert sch.attention_variant(8, "bfloat16").kernel == "flash_attention_bf16_m64_d16_v16"
    assert sch.attention_variant(6, "bfloat16").kernel == "flash_attention_bf16_m64_d16_v4"
    assert sch.attention_variant(40, "bfloat16").kernel == "flash_attention_bf16_m64_d64_v16"
    assert sch.attention_variant(128, "bfloat16").kernel == "flash_attention_bf16_m64_d128_v16"
    assert sch.attention_variant(32, "float32").kernel == "flash_attention_f32_d32"
    long = sch.attention_variant(128, "bfloat16", 128)
    assert (long.kernel, long.block_m, long.threads) == ("flash_attention_bf16_m128_d128_v16",
                                                         128, 256)
    # float32 has 64-row tiles only.
    assert sch.attention_variant(64, "float32", 128).block_m == 64
    for bad in (0, 7, 130, 256):
        with pytest.raises(ValueError, match="head dim"):
            sch.attention_variant(bad, "bfloat16")
    with pytest.raises(ValueError, match="float16"):
        sch.attention_variant(64, "float16")
    with pytest.raises(ValueError, match="64 or 128"):
        sch.attention_variant(64, "bfloat16", 32)
    # Shared memory fits an sm_80 (163 KiB) and an H100 (227 KiB) block.
    for head_dim in (16, 32, 64, 128):
        for dtype in ("bfloat16", "float32"):
            for block_m in sch.TILE_ROWS:
                assert sch.attention_variant(head_dim, dtype, block_m).shared_bytes <= 163 * 1024


def test_16_byte_copies_need_16_byte_aligned_bases():
    """cp.async of 16 bytes faults on an address that is not 16-byte aligned: one base
    pointer off the boundary takes the 4-byte copies (and 64-row tiles)."""
    aligned = (1 << 20, 2 << 20, 3 << 20)
    for block_m in sch.TILE_ROWS:
        assert sch.attention_variant(64, "bfloat16", block_m, aligned).kernel.endswith("_v16")
    for skewed in ((8, 0, 0), (0, 4, 0), (0, 0, 1028)):
        pointers = tuple(a + b for a, b in zip(aligned, skewed))
        for block_m in sch.TILE_ROWS:
            variant = sch.attention_variant(64, "bfloat16", block_m, pointers)
            assert variant.kernel == "flash_attention_bf16_m64_d64_v4"
            assert variant.block_m == 64 and variant.threads == 128


def test_tile_rows_take_128_queries_for_long_bf16_prefill():
    paper = np.full(8, 10000)
    assert sch.tile_rows(paper, heads=32, n_sm=132, dtype_name="bfloat16") == 128
    assert sch.tile_rows(paper, heads=32, n_sm=132, dtype_name="float32") == 64
    assert sch.tile_rows(np.ones(8), heads=32, n_sm=132, dtype_name="bfloat16") == 64  # decode
    assert sch.tile_rows(np.full(8, 300), heads=32, n_sm=132, dtype_name="bfloat16") == 64
    # Long but too few CTAs to fill the device without splitting: 64 rows.
    assert sch.tile_rows(np.array([1024]), heads=2, n_sm=132, dtype_name="bfloat16") == 64
    assert sch.tile_rows(np.zeros(0), heads=2, n_sm=132, dtype_name="bfloat16") == 64


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def random_sequences(rng, n_seqs, max_len, decode=False, gap=0):
    """Packed q rows and (possibly cache-laid-out) k rows: host int64 arrays [b]."""
    k_lengths = rng.integers(1, max_len + 1, n_seqs)
    q_lengths = np.ones(n_seqs, np.int64) if decode else np.minimum(
        k_lengths, rng.integers(1, max_len + 1, n_seqs))
    if not decode and rng.random() < 0.5:
        q_lengths = k_lengths.copy()                     # a plain prefill
    q_starts = np.concatenate([[0], np.cumsum(q_lengths)[:-1]])
    k_slot = k_lengths + gap                             # cache rows with unused tails
    k_starts = np.concatenate([[0], np.cumsum(k_slot)[:-1]])
    return q_starts, q_lengths, k_starts, k_lengths


def reference_attention(q, q_starts, q_lengths, k, v, k_starts, k_lengths, scale):
    """Float64 causal attention, the semantics of model.causal_attention: q [Tq, h, D],
    k [Tk, hk, D], v [Tk, hk, Dv], query head j reading K/V head j // (h/hk).
    -> [Tq, h*Dv]."""
    n_q, heads, head_dim = q.shape
    kv_of_head = np.arange(heads) // (heads // k.shape[1])                  # [h]
    out = np.zeros((n_q, heads, v.shape[2]))
    for q0, nq, k0, nk in zip(q_starts, q_lengths, k_starts, k_lengths):
        if nq == 0:
            continue
        qs = q[q0:q0 + nq].astype(np.float64)                           # [nq, h, D]
        ks = k[k0:k0 + nk][:, kv_of_head].astype(np.float64)            # [nk, h, D]
        vs = v[k0:k0 + nk][:, kv_of_head].astype(np.float64)
        scores = np.einsum("qhd,khd->hqk", qs, ks) * scale               # [h, nq, nk]
        visible = np.arange(nk)[None, :] <= (nk - nq + np.arange(nq))[:, None]
        scores = np.where(visible, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[q0:q0 + nq] = np.einsum("hqk,khd->qhd", p, vs)
    return out.reshape(n_q, heads * v.shape[2])


# Float64 NumPy emulations of each kernel, argument for argument (pointers are arrays).
# They model what the CUDA code computes (tiles, causal bound, base-2 online softmax,
# split partials and their merge, the permutation's float32 operation order), not how;
# with a fake device they run the launch code of fused.py without a GPU.

def emulate_flash_attention(q, k, v, out, part_o, part_lse, tiles, n_tiles, heads, kv_heads,
                            head_dim, v_dim, scale_log2, block_m):
    """out [Tq, h*Dv] (rows of whole tiles), part_o [slots, h, BM, Dv], part_lse
    [slots, h, BM]; q [Tq, h, D], k [Tk, hk, D], v [Tk, hk, Dv] (query head j reads K/V
    head j // (h/hk)).
    Rows go in warps of 16, and a warp skips a key block wholly past its last row's causal
    bound, as the bf16 kernel does (the float32 kernel does the same arithmetic per row)."""
    out3 = out.reshape(out.shape[0], heads, v_dim)
    assert part_o.shape[2] == part_lse.shape[2] == block_m
    q = q.reshape(q.shape[0], heads, head_dim)
    k = k.reshape(k.shape[0], kv_heads, head_dim)
    v = v.reshape(v.shape[0], kv_heads, v_dim)
    kv_of_head = np.arange(heads) // (heads // kv_heads)                   # [h]
    for q_row0, n_rows, k_row0, diag, kb_begin, kb_end, slot, _ in tiles[:n_tiles]:
        assert 1 <= n_rows <= block_m
        qs = q[q_row0:q_row0 + n_rows].astype(np.float64)                # [r, h, D]
        row_max = np.full((heads, n_rows), -np.inf)
        row_sum = np.zeros((heads, n_rows))
        acc = np.zeros((heads, n_rows, v_dim))
        key_end = diag + n_rows
        rows = np.arange(n_rows)
        warp_last_row = rows // 16 * 16 + 15                             # [r]
        for kb in range(kb_begin, kb_end):
            keys = np.arange(kb * sch.BLOCK_N, min((kb + 1) * sch.BLOCK_N, key_end))
            ks = k[k_row0 + keys][:, kv_of_head].astype(np.float64)      # [n, h, D]
            vs = v[k_row0 + keys][:, kv_of_head].astype(np.float64)
            # Rows of warps that skip this block keep their running state.
            active = (kb * sch.BLOCK_N <= diag + warp_last_row)[None, :]  # [1, r]
            s = np.einsum("rhd,nhd->hrn", qs, ks) * float(scale_log2)
            s = np.where(keys[None, None, :] > diag + rows[None, :, None], -np.inf, s)
            new_max = np.where(active, np.maximum(row_max, s.max(-1)), row_max)
            shift = np.where(new_max == -np.inf, 0.0, new_max)
            rescale = np.exp2(row_max - shift)
            p = np.where(active[..., None], np.exp2(s - shift[..., None]), 0.0)
            row_sum = row_sum * rescale + p.sum(-1)
            acc = acc * rescale[..., None] + np.einsum("hrn,nhd->hrd", p, vs)
            row_max = new_max
        if slot < 0:
            out3[q_row0:q_row0 + n_rows] = (acc / row_sum[..., None]).transpose(1, 0, 2)
        else:
            seen = row_sum > 0
            safe = np.where(seen, row_sum, 1.0)
            part_o[slot, :, :n_rows] = np.where(seen[..., None], acc / safe[..., None], 0.0)
            part_lse[slot, :, :n_rows] = np.where(seen, row_max + np.log2(safe), -np.inf)


def emulate_attention_combine(part_o, part_lse, combine, out, heads, head_dim, block_m):
    assert part_o.shape[2] == block_m
    out3 = out.reshape(out.shape[0], heads, head_dim)
    for q_row0, n_rows, slot0, n_splits in combine:
        lse = part_lse[slot0:slot0 + n_splits, :, :n_rows].astype(np.float64)   # [s, h, r]
        o = part_o[slot0:slot0 + n_splits, :, :n_rows].astype(np.float64)       # [s, h, r, D]
        w = np.where(lse == -np.inf, 0.0, np.exp2(lse - lse.max(0)))
        merged = (w[..., None] * o).sum(0) / w.sum(0)[..., None]                 # [h, r, D]
        out3[q_row0:q_row0 + n_rows] = merged.transpose(1, 0, 2)


def emulate_gelu(x, n):
    from spmd_moe.backend.array import erfc_numpy

    flat = x.reshape(-1)[:n]
    xf = flat.astype(np.float32)
    flat[...] = 0.5 * xf * erfc_numpy(xf * np.float32(-0.7071067811865476))


def emulate_swiglu(gate, up, out, n):
    """out = silu(gate) * up in float32, rounded once to out's dtype: experts.silu's
    operations (NumPy's exp for CUDA's expf, the only difference on the GPU)."""
    from spmd_moe.moe.experts import silu

    assert all(address(a) % 16 == 0 for a in (gate, up, out)), "vector loads need 16 bytes"
    g, u = gate.reshape(-1)[:n].astype(np.float32), up.reshape(-1)[:n].astype(np.float32)
    out.reshape(-1)[:n] = (silu(SimpleNamespace(xp=np), g) * u).astype(out.dtype)


def emulate_gather_rows(x, order, out, n_rows, row_vecs, top_k, width):
    assert row_vecs * width == out.shape[1] * out.dtype.itemsize
    src = x.view(np.uint8).reshape(x.shape[0], -1)
    out.view(np.uint8).reshape(n_rows, -1)[...] = src[order // top_k]


def emulate_inverse_permutation(order, inverse, n):
    inverse[order[:n]] = np.arange(n, dtype=np.int32)


def emulate_unpermute_weighted(rows, inverse, weights, out, n_tokens, d, top_k):
    pairs = inverse.reshape(n_tokens, top_k)
    for j in range(top_k):
        term = weights[:, j, None] * rows[pairs[:, j]].astype(np.float32)
        out[...] = term if j == 0 else out + term


F32_1 = np.float32(1.0)


def _inv_rms(sums, width, eps):
    """1/sqrt(sums/width + eps) in float32, each operation rounded (rowwise.cu's inv_rms)."""
    return F32_1 / np.sqrt(sums.astype(np.float32) / np.float32(width) + np.float32(eps))


def _square_sums(xf):
    """Row sums of squares in float32 (the kernels' tree sums differ in the last bits)."""
    return (xf * xf).sum(axis=-1, keepdims=True, dtype=np.float32)


def emulate_rms_norm(x, gain, out, n_rows, d, eps, y=None, h=None):
    rows = x.reshape(-1, d)[:n_rows]
    xf = rows.astype(np.float32)
    if y is not None:
        xf = (xf + y.reshape(-1, d)[:n_rows].astype(np.float32)).astype(x.dtype)
        h.reshape(-1, d)[:n_rows] = xf
        xf = xf.astype(np.float32)
    inv = _inv_rms(_square_sums(xf), d, eps)
    out.reshape(-1, d)[:n_rows] = (xf * inv * gain.astype(np.float32)).astype(out.dtype)


def emulate_qk_norm_rope(kind, q, k, q_gain, k_gain, positions, sums, n, heads, kv_heads,
                         head_dim, q_width, kv_width, eps, inv_freq, scale, interleave):
    """rowwise.cu's qk_norm_rope on q (grid.y 0) and k (grid.y 1), in place; its angles,
    cos and sin are model.rope_tables' (float64, times ``scale``, rounded to float32), of
    pairs (j, j + D/2), or (2j, 2j + 1) with ``interleave``."""
    from spmd_moe.model.blocks import RopeSpec, rope_tables

    half = head_dim // 2
    assert inv_freq.dtype == np.float64 and inv_freq.shape == (half,)
    spec = RopeSpec(np.asarray(inv_freq), float(scale), bool(interleave))
    c, sn = rope_tables(SimpleNamespace(xp=np), np.asarray(positions)[:n], spec)
    for which, (u, gain, h, width) in enumerate(((q, q_gain, heads, q_width),
                                                 (k, k_gain, kv_heads, kv_width))):
        u3 = u.reshape(n, h, head_dim)
        uf = u3.astype(np.float32)
        if kind == "head":
            inv = _inv_rms(_square_sums(uf), head_dim, eps)                    # [n, h, 1]
            uf = (uf * inv * gain.astype(np.float32)).astype(u.dtype).astype(np.float32)
        elif kind in ("full", "summed"):
            flat = uf.reshape(n, h * head_dim)
            total = (_square_sums(flat) if kind == "full"
                     else sums.reshape(n, 2)[:, which:which + 1])
            inv = _inv_rms(total, width if kind == "summed" else h * head_dim, eps)
            uf = (flat * inv * gain.astype(np.float32)).astype(u.dtype).astype(
                np.float32).reshape(n, h, head_dim)
        if interleave:
            even, odd = uf[..., 0::2].copy(), uf[..., 1::2].copy()
            uf[..., 0::2], uf[..., 1::2] = even * c - odd * sn, odd * c + even * sn
            u3[...] = uf.astype(u.dtype)
        else:
            rotated = np.concatenate([-uf[..., half:], uf[..., :half]], axis=-1)
            u3[...] = (uf * c + rotated * sn).astype(u.dtype)


def emulate_router_topk(logits, experts, weights, n, n_experts, top_k, renormalize):
    from spmd_moe.backend.array import Backend, BackendChoice
    from spmd_moe.moe.router import route

    bk = Backend(BackendChoice("numpy", "emulation"), "float32")
    identity = np.eye(n_experts, dtype=np.float32)
    got_experts, got_weights = route(bk, np.asarray(logits, np.float32).reshape(n, n_experts),
                                     identity, top_k, bool(renormalize))
    experts.reshape(n, top_k)[...] = got_experts
    weights.reshape(n, top_k)[...] = got_weights


def emulate_mla_decode(q, rows, out, part_o, part_lse, tiles, heads, width, latent,
                       scale_log2):
    """mla.cu: per tile, the query q[q_row] [h, W] against rows k_row0 + its key blocks'
    keys (all below k_len visible), values their first ``latent`` columns; the output or
    a normalised float32 partial and its log2-sum-exp (block_m 1)."""
    q3 = q.reshape(-1, heads, width).astype(np.float64)
    out3 = out.reshape(out.shape[0], heads, latent)
    for q_row, k_row0, k_len, kb_begin, kb_end, slot in tiles:
        keys = np.arange(kb_begin * sch.MLA_KEYS, min(kb_end * sch.MLA_KEYS, k_len))
        block = rows[k_row0 + keys].astype(np.float64)                        # [n, W]
        s = q3[q_row] @ block.T * scale_log2                                  # [h, n]
        top = s.max(-1, keepdims=True)
        p = np.exp2(s - top)
        o = p @ block[:, :latent] / p.sum(-1, keepdims=True)                  # [h, c]
        if slot < 0:
            out3[q_row] = o
        else:
            part_o[slot, :, 0] = o
            part_lse[slot, :, 0] = top[:, 0] + np.log2(p.sum(-1))


def emulate_expert_order(experts, order, counts, n_pairs, n_experts):
    flat = np.asarray(experts).reshape(-1)[:n_pairs]
    order[:n_pairs] = np.argsort(flat, kind="stable")
    counts[:n_experts] = np.bincount(flat, minlength=n_experts)


def run_schedule(schedule, q, k, v, scale):
    """Both attention kernels over ``schedule`` -> [Tq, h*D] float64, NaN where unwritten."""
    n_q, heads, head_dim = q.shape
    out = np.full((n_q, heads * head_dim), np.nan)
    part_o = np.full((max(schedule.n_slots, 1), heads, schedule.block_m, head_dim), np.nan)
    part_lse = np.full((max(schedule.n_slots, 1), heads, schedule.block_m), np.nan)
    emulate_flash_attention(q, k, v, out, part_o, part_lse, schedule.tiles, schedule.n_tiles,
                            heads, k.shape[1], head_dim, head_dim, scale * np.log2(np.e),
                            schedule.block_m)
    emulate_attention_combine(part_o, part_lse, schedule.combine, out, heads, head_dim,
                              schedule.block_m)
    return out


@pytest.mark.parametrize("case", range(16))
def test_schedule_emulation_matches_reference(case):
    rng = np.random.default_rng(case)
    decode = case % 3 == 0
    kv_heads, head_dim = int(rng.integers(1, 4)), int(rng.choice([8, 16, 32]))
    heads = kv_heads * (1, 2, 4, 8)[case % 4]
    lengths = random_sequences(rng, int(rng.integers(1, 6)), int(rng.choice([5, 70, 400])),
                               decode=decode, gap=int(rng.integers(0, 3)))
    # Few SMs: long tiles stay whole; many SMs: the schedule splits them (split-K).
    n_sm = int(rng.choice([1, 1000]))
    block_m = sch.TILE_ROWS[case % 2]
    schedule = sch.attention_schedule(*lengths, heads=heads, n_sm=n_sm, block_m=block_m)
    n_q = int(lengths[1].sum())
    n_k = int((lengths[2] + lengths[3]).max()) + 2
    q = rng.standard_normal((n_q, heads, head_dim))
    k = rng.standard_normal((n_k, kv_heads, head_dim))
    v = rng.standard_normal((n_k, kv_heads, head_dim))
    scale = head_dim ** -0.5
    got = run_schedule(schedule, q, k, v, scale)
    want = reference_attention(q, *lengths[:2], k, v, *lengths[2:], scale)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def tiles_by_field(schedule):
    names = ("q_row0", "n_rows", "k_row0", "diag", "kb_begin", "kb_end", "slot")
    return {n: schedule.tiles[:, i].astype(np.int64) for i, n in enumerate(names)}


@pytest.mark.parametrize("block_m", sch.TILE_ROWS)
def test_schedule_covers_each_query_once_and_skips_masked_blocks(block_m):
    rng = np.random.default_rng(7)
    q_starts, q_lengths, k_starts, k_lengths = random_sequences(rng, 9, 300)
    for n_sm in (1, 1000):
        schedule = sch.attention_schedule(q_starts, q_lengths, k_starts, k_lengths, heads=2,
                                          n_sm=n_sm, block_m=block_m)
        assert schedule.block_m == block_m
        t = tiles_by_field(schedule)
        assert (t["n_rows"] >= 1).all() and (t["n_rows"] <= block_m).all()
        # Whole tiles write rows directly; split tiles through exactly one combine group.
        written = np.zeros(int(q_lengths.sum()), np.int64)
        for q0, n, slot in zip(t["q_row0"], t["n_rows"], t["slot"]):
            if slot < 0:
                written[q0:q0 + n] += 1
        for q0, n, slot0, splits in schedule.combine:
            written[q0:q0 + n] += 1
            pieces = np.flatnonzero((t["slot"] >= slot0) & (t["slot"] < slot0 + splits))
            assert len(pieces) == splits
            ranges = sorted(zip(t["kb_begin"][pieces], t["kb_end"][pieces]))
            assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert (written == 1).all()
        # The last visited block holds a visible key; no block past the causal bound.
        key_end = t["diag"] + t["n_rows"]
        last_whole = t["slot"] < 0
        assert ((t["kb_end"][last_whole] - 1) * sch.BLOCK_N < key_end[last_whole]).all()
        assert (t["kb_end"] * sch.BLOCK_N < key_end + sch.BLOCK_N).all()
        assert set(np.unique(t["slot"][t["slot"] >= 0])) == set(range(schedule.n_slots))


def test_schedule_orders_tiles_by_sequence_longest_first():
    q_lengths = np.array([200, 130, 64])
    starts = np.concatenate([[0], np.cumsum(q_lengths)[:-1]])
    schedule = sch.attention_schedule(starts, q_lengths, starts, q_lengths, heads=32, n_sm=1)
    t = tiles_by_field(schedule)
    seq_of_tile = np.searchsorted(starts, t["q_row0"], side="right") - 1
    assert (np.diff(seq_of_tile) >= 0).all()
    work = t["kb_end"] - t["kb_begin"]
    for s in range(3):
        assert (np.diff(work[seq_of_tile == s]) <= 0).all()


def test_split_k_only_when_the_device_would_idle():
    # Paper prefill: 8 x 10000 tokens, 32 heads -> 1256 tiles x 32 heads: never split.
    lengths = np.full(8, 10000)
    starts = np.arange(8) * 10000
    prefill = sch.attention_schedule(starts, lengths, starts, lengths, heads=32, n_sm=132)
    assert prefill.n_slots == 0 and len(prefill.combine) == 0
    assert prefill.n_tiles == 8 * -(-10000 // sch.BLOCK_M)
    long = sch.attention_schedule(starts, lengths, starts, lengths, heads=32, n_sm=132,
                                  block_m=128)
    assert long.n_slots == 0 and long.n_tiles == 8 * -(-10000 // 128)
    # Decode of 8 sequences against 10000 cached keys: 256 CTAs on 132 SMs -> split.
    ones = np.ones(8, np.int64)
    decode = sch.attention_schedule(np.arange(8), ones, starts, lengths, heads=32, n_sm=132)
    assert decode.n_slots > 0 and len(decode.combine) == 8
    assert decode.n_tiles * 32 >= sch.SPLIT_TARGET_PER_SM * 132
    # A short cache is not worth splitting.
    short = sch.attention_schedule(np.arange(8), ones, starts, np.full(8, 100), heads=32,
                                   n_sm=132)
    assert short.n_slots == 0


def test_schedule_of_nothing():
    empty = np.zeros(0, np.int64)
    schedule = sch.attention_schedule(empty, empty, empty, empty, heads=4, n_sm=132)
    assert schedule.n_tiles == 0 and schedule.tiles.shape == (0, sch.TILE_FIELDS)
    zero_q = sch.attention_schedule([0], [0], [0], [5], heads=4, n_sm=132)
    assert zero_q.n_tiles == 0


@pytest.mark.parametrize("heads,kv_heads", [(1, 1), (5, 5), (8, 4), (8, 2), (8, 1), (12, 3)])
def test_cta_work_puts_a_group_s_query_heads_side_by_side(heads, kv_heads):
    n_tiles, group = 7, heads // kv_heads
    tile, head, kv_head = sch.cta_work(np.arange(n_tiles * heads), n_tiles, heads, kv_heads)
    pairs = sorted(zip(tile.tolist(), head.tolist()))
    assert pairs == [(t, h) for t in range(n_tiles) for h in range(heads)]
    assert (kv_head == head // group).all()
    # Blocks g*i .. g*i + g-1 are one tile of one K/V head, its g query heads in order.
    for first in range(0, n_tiles * heads, group):
        span = slice(first, first + group)
        assert len(set(tile[span])) == len(set(kv_head[span])) == 1
        assert head[span].tolist() == list(range(head[first], head[first] + group))
    if group == 1:                                   # multi-head: head * n_tiles + tile
        blocks = np.arange(n_tiles * heads)
        assert (tile == blocks % n_tiles).all() and (head == blocks // n_tiles).all()


def test_cta_work_mirrors_the_kernel_source():
    """The Python mirror and CtaWork in flash_attention.cu compute the same thing: the
    kernel's formula, evaluated here as written (unsigned division)."""
    text = (KERNEL_DIR / "flash_attention.cu").read_text()
    body = re.search(r"struct CtaWork \{.*?\n\};", text, re.DOTALL).group(0)
    for line in ("const unsigned group = unsigned(heads) / unsigned(kv_heads);",
                 "const unsigned pair = unsigned(block) / group;",
                 "tile = pair % unsigned(n_tiles);", "kv_head = pair / unsigned(n_tiles);",
                 "head = kv_head * group + unsigned(block) % group;"):
        assert line in body, line
    # Both kernels (bf16 and float32) take their tile and heads from it.
    assert text.count("const CtaWork work(blockIdx.x, n_tiles, heads, kv_heads);") == 2


def test_schedule_rejects_more_queries_than_keys():
    with pytest.raises(AssertionError, match="as many keys as queries"):
        sch.attention_schedule([0], [5], [0], [4], heads=1, n_sm=1)


def test_ffn_row_chunk_bounds_the_hidden():
    # Everything fits: one pass.
    assert sch.ffn_row_chunk(1000, 40, 2, 512 << 20) == 1000
    # Paper: 160000 rows x F 16384 bf16 is 5 GB; 512 MiB gives 16384-row passes.
    rows = sch.ffn_row_chunk(160000, 16384, 2, 512 << 20)
    assert rows == 16384 and rows * 16384 * 2 <= 512 << 20
    for n_rows, d_ff, itemsize, budget in [(10**6, 1000, 4, 10**8), (5000, 3, 2, 1000)]:
        rows = sch.ffn_row_chunk(n_rows, d_ff, itemsize, budget)
        assert rows % 128 == 0 and rows >= 128
        assert rows * d_ff * itemsize <= max(budget, 128 * d_ff * itemsize)


def test_row_vector_bytes_and_block():
    assert sch.row_vector_bytes(4096 * 2, 256, 512) == 16
    assert sch.row_vector_bytes(4096 * 2, 256, 516) == 4
    assert sch.row_vector_bytes(10 * 2, 256, 256) == 4
    assert sch.row_vector_bytes(11 * 2, 256, 256) == 2
    assert sch.row_block(512) == (128, 1)
    assert sch.row_block(4) == (4, 32)
    assert sch.row_block(5) == (8, 16)
    assert sch.row_block(1) == (1, 128)
    assert sch.row_grid(10**6, 1, 132) == 32 * 132
    assert sch.row_grid(3, 32, 132) == 1


# --- the launch code on a fake device (no GPU) ----------------------------------------------

class FakeArray(np.ndarray):
    """A NumPy array posing as a CuPy one: ``.data.ptr`` and ``.get()``."""

    @property
    def data(self):
        return SimpleNamespace(ptr=self.__array_interface__["data"][0])

    def get(self):
        return np.asarray(self)


class FakeCupy:
    """The part of CuPy that fused.py uses, on NumPy. New arrays come poisoned (NaN, or -7
    for integers) so that an element no kernel writes shows up."""

    @staticmethod
    def _wrap(a):
        return np.asarray(a).view(FakeArray)

    def empty(self, shape, dtype):
        a = np.empty(shape, dtype=dtype)
        a[...] = -7 if np.dtype(dtype).kind in "iu" else np.nan
        return self._wrap(a)

    def full(self, shape, value, dtype):
        return self._wrap(np.full(shape, value, dtype=dtype))

    def asarray(self, a, dtype=None):
        return self._wrap(np.array(a, dtype=dtype))

    def ascontiguousarray(self, a, dtype=None):
        return self._wrap(np.ascontiguousarray(a, dtype=dtype))

    def matmul(self, a, b, out=None):
        """float32 accumulation, result rounded to the inputs' dtype, as cuBLAS does."""
        result = (np.asarray(a, np.float32) @ np.asarray(b, np.float32)).astype(a.dtype)
        if out is None:
            return self._wrap(result)
        assert out.flags.c_contiguous and out.shape == result.shape
        out[...] = result
        return out


_PTX_TYPE = {np.dtype(np.int32): "u32", np.dtype(np.int64): "u64", np.dtype(np.float32): "f32",
             np.dtype(np.float64): "f64"}


class FakeKernel:
    """A compiled kernel's stand-in: checks each launch's arguments against the parameter
    types in the PTX (a Python int or a wrong-width scalar would be a silent bug on the
    GPU), the shared-memory opt-in, then runs the kernel's emulation."""

    def __init__(self, name: str, params: list[str], emulate):
        self.name, self.params, self.emulate = name, params, emulate
        self.max_dynamic_shared_size_bytes = 48 << 10
        self.launches = 0

    def __call__(self, grid, block, args, shared_mem=0):
        assert len(args) == len(self.params), (self.name, len(args), self.params)
        for i, (arg, ptype) in enumerate(zip(args, self.params)):
            if isinstance(arg, np.ndarray):
                assert ptype == "u64", (self.name, i, "array passed for", ptype)
            else:
                assert isinstance(arg, np.generic), (self.name, i, type(arg))
                assert _PTX_TYPE[arg.dtype] == ptype, (self.name, i, arg.dtype, ptype)
        assert shared_mem <= self.max_dynamic_shared_size_bytes, (self.name, shared_mem)
        assert all(g >= 1 for g in grid) and np.prod(block) <= 1024
        self.launches += 1
        self.emulate(grid, block, *args)


class FakeModule:
    def __init__(self, source_name: str):
        ptx = compiled(source_name, "sm_80").ptx
        self.params = {m.group(1): re.findall(r"\.param \.(\w+)", m.group(2))
                       for m in re.finditer(r"\.visible \.entry (\w+)\(([^)]*)\)", ptx)}
        self.kernels: dict[str, FakeKernel] = {}

    def get_function(self, name: str) -> FakeKernel:
        if name not in self.kernels:
            self.kernels[name] = FakeKernel(name, self.params[name], _emulation(name))
        return self.kernels[name]


def address(array) -> int:
    return array.__array_interface__["data"][0]


def _emulation(name: str):
    """The emulation of kernel ``name`` plus checks of its launch shape and of what the
    hardware would fault on: cp.async of 16 (4) bytes needs 16 (4)-byte aligned sources,
    and the bf16 kernels store output pairs as 4-byte words."""
    if name.startswith("flash_attention_"):
        block_m = int(re.search(r"_m(\d+)_", name).group(1)) if "bf16" in name else sch.BLOCK_M

        def run(grid, block, q, k, v, out, part_o, part_lse, tiles, n_tiles, heads, kv_heads,
                d, dv, scale):
            assert grid == (int(n_tiles) * int(heads),)
            # Every (tile, query head) pair runs in exactly one CTA.
            tile, head, kv_head = sch.cta_work(np.arange(grid[0]), int(n_tiles), int(heads),
                                               int(kv_heads))
            assert len(set(zip(tile.tolist(), head.tolist()))) == grid[0]
            assert (kv_head == head // (int(heads) // int(kv_heads))).all()
            assert block == ((sch.bf16_threads(block_m) if "bf16" in name
                              else sch.F32_THREADS),)
            if "bf16" in name:
                copy = 16 if name.endswith("_v16") else 4
                assert all(address(a) % copy == 0 for a in (q, k, v)), (name, "misaligned")
                assert address(out) % 4 == 0
            emulate_flash_attention(q, k, v, out, part_o, part_lse, tiles, int(n_tiles),
                                    int(heads), int(kv_heads), int(d), int(dv), scale, block_m)
        return run
    if name.startswith("attention_combine_"):
        def run(grid, block, part_o, part_lse, combine, out, heads, d, block_m):
            assert grid == (len(combine) * int(heads),)
            emulate_attention_combine(part_o, part_lse, combine, out, int(heads), int(d),
                                      int(block_m))
        return run
    if name.startswith("gelu_"):
        return lambda grid, block, x, n: emulate_gelu(x, int(n))
    if name.startswith("swiglu_"):
        def run(grid, block, gate, up, out, n):
            assert out.dtype == (BF16 if name == "swiglu_bf16" else F32)
            emulate_swiglu(gate, up, out, int(n))
        return run
    if name.startswith("gather_rows_v"):
        width = int(name.rsplit("_v", 1)[1])
        return lambda grid, block, x, order, out, n_rows, row_vecs, top_k: emulate_gather_rows(
            x, order, out, int(n_rows), int(row_vecs), int(top_k), width)
    if name == "inverse_permutation":
        return lambda grid, block, order, inverse, n: emulate_inverse_permutation(
            order, inverse, int(n))
    if name.startswith("unpermute_weighted_"):
        return lambda grid, block, rows, inverse, weights, out, n_tokens, d, top_k: \
            emulate_unpermute_weighted(rows, inverse, weights, out, int(n_tokens), int(d),
                                       int(top_k))
    if name.startswith(("rms_norm_", "add_rms_norm_", "rope_")):
        storage = BF16 if name.endswith("bf16") else F32

        def checked(grid, block, arrays, n_rows):
            assert block == (sch.ROW_THREADS,) and grid[0] <= max(1, int(n_rows))
            assert all(a.dtype == storage for a in arrays), (name, [a.dtype for a in arrays])
    if name.startswith("rms_norm_"):
        def run(grid, block, x, gain, out, n_rows, d, eps):
            checked(grid, block, (x, gain, out), n_rows)
            emulate_rms_norm(x, gain, out, int(n_rows), int(d), eps)
        return run
    if name.startswith("add_rms_norm_"):
        def run(grid, block, x, y, gain, h, out, n_rows, d, eps):
            checked(grid, block, (x, y, gain, h, out), n_rows)
            emulate_rms_norm(x, gain, out, int(n_rows), int(d), eps, y=y, h=h)
        return run
    if name.startswith("rope_"):
        kind = name.split("_")[1]

        def run(grid, block, q, k, q_gain, k_gain, positions, sums, n, heads, kv_heads,
                head_dim, q_width, kv_width, eps, inv_freq, scale, interleave):
            checked(grid, block, (q, k) if kind == "none" else (q, k, q_gain, k_gain), n)
            assert grid[1] == 2 and positions.dtype == np.int32
            assert kind != "summed" or sums.dtype == F32
            emulate_qk_norm_rope(kind, q, k, q_gain, k_gain, positions, sums, int(n),
                                 int(heads), int(kv_heads), int(head_dim), q_width, kv_width,
                                 eps, inv_freq, scale, int(interleave))
        return run
    if name.startswith("mla_decode_"):
        def run(grid, block, q, rows, out, part_o, part_lse, tiles, heads, width, latent,
                scale):
            assert block == (sch.MLA_THREADS,) and q.dtype == rows.dtype == out.dtype
            assert grid == (len(tiles), -(-int(heads) // sch.MLA_HEADS))
            assert tiles.dtype == np.int32 and tiles.shape[1] == sch.MLA_TILE_FIELDS
            emulate_mla_decode(q, rows, out, part_o, part_lse, tiles, int(heads), int(width),
                               int(latent), float(scale))
        return run
    if name.startswith("bias_add_"):
        def run(grid, block, y, bias, out, n, width):
            assert block == (sch.ROW_THREADS,) and y.dtype == bias.dtype == F32
            assert out.dtype == (BF16 if name.endswith("bf16") else F32)
            n, width = int(n), int(width)
            out.reshape(-1)[:n] = (y.reshape(-1, width) + bias).reshape(-1)[:n].astype(
                out.dtype)
        return run
    if name.startswith("residual_add_"):
        def run(grid, block, h, moe, out, n):
            assert block == (sch.ROW_THREADS,) and moe.dtype == F32 and out.dtype == h.dtype
            n = int(n)
            out.reshape(-1)[:n] = (h.reshape(-1)[:n].astype(np.float32)
                                   + moe.reshape(-1)[:n]).astype(out.dtype)
        return run
    if name == "router_topk":
        def run(grid, block, logits, experts, weights, n, n_experts, top_k, renormalize):
            assert block == (sch.ROUTER_THREADS,) and logits.dtype == weights.dtype == F32
            assert int(n_experts) <= sch.MAX_ROUTER_EXPERTS and experts.dtype == np.int32
            assert grid[0] * sch.ROUTER_THREADS // 32 >= min(int(n), 32 * 132)
            emulate_router_topk(logits, experts, weights, int(n), int(n_experts), int(top_k),
                                int(renormalize))
        return run
    if name == "expert_order":
        def run(grid, block, experts, order, counts, n_pairs, n_experts):
            assert grid == (int(n_experts),) and block == (sch.ORDER_THREADS,)
            assert experts.dtype == np.int32 and order.dtype == counts.dtype == np.int64
            emulate_expert_order(experts, order, counts, int(n_pairs), int(n_experts))
        return run
    raise AssertionError(f"no emulation for {name}")


def make_fake_fused():
    return FusedKernels(FakeCupy(), "90", n_sm=132, shared_limit=227 << 10, load=FakeModule)


def test_fused_kernels_refuse_old_devices():
    with pytest.raises(RuntimeError, match="sm_80"):
        FusedKernels(FakeCupy(), "75", n_sm=40, shared_limit=64 << 10, load=FakeModule)


def test_attention_schedule_is_kept_for_a_pass_and_rebuilt_for_new_lengths():
    fused, fake = make_fake_fused(), FakeCupy()
    rng = np.random.default_rng(0)
    q = fake.asarray(rng.standard_normal((10, 2, 16)).astype(BF16))
    k = fake.asarray(rng.standard_normal((20, 2, 16)).astype(BF16))
    fused.attention(q, [0], [10], k, k, [0], [10], 0.25)
    first = fused._schedule
    fused.attention(q, [0], [10], k, k, [0], [10], 0.25)          # the next layer
    assert fused._schedule is first
    second = fused.attention(q, [0], [10], k, k, [0], [20], 0.25)  # the next decode step
    assert fused._schedule is not first
    want = reference_attention(np.asarray(q), [0], [10], np.asarray(k), np.asarray(k), [0],
                               [20], 0.25)
    assert relative_error(second, want) < 1e-2
    kernel = fused.attention_module.kernels["flash_attention_bf16_m64_d16_v16"]
    assert kernel.launches == 3 and kernel.max_dynamic_shared_size_bytes == 48 << 10


def test_large_shared_memory_is_opted_in():
    fused, fake = make_fake_fused(), FakeCupy()
    q = fake.asarray(np.ones((3, 1, 128), BF16))
    fused.attention(q, [0], [3], q, q, [0], [3], 0.1)
    kernel = fused.attention_module.kernels["flash_attention_bf16_m64_d128_v16"]
    assert kernel.max_dynamic_shared_size_bytes == sch.attention_variant(
        128, "bfloat16").shared_bytes > 48 << 10
    fused.attention(q, [0], [3], q, q, [0], [3], 0.1, tile_rows=128)
    kernel = fused.attention_module.kernels["flash_attention_bf16_m128_d128_v16"]
    assert kernel.max_dynamic_shared_size_bytes == sch.attention_variant(
        128, "bfloat16", 128).shared_bytes


def launched(fused) -> dict[str, int]:
    """Launches per attention kernel (not the split-K merges)."""
    return {name: kernel.launches for name, kernel in fused.attention_module.kernels.items()
            if kernel.launches and name.startswith("flash_attention_")}


def offset_view(fake, values, offset_bytes: int):
    """``values`` copied into a FakeArray whose base address is ``offset_bytes`` past a
    64-byte boundary (a view into a larger buffer, C-contiguous)."""
    flat = np.zeros(values.size + 64, values.dtype)
    start = (-address(flat) % 64 + offset_bytes) // values.dtype.itemsize
    view = flat[start:start + values.size].reshape(values.shape)
    view[...] = values
    assert address(view) % 64 == offset_bytes
    return view.view(FakeArray)


@pytest.mark.parametrize("offset,kernel", [(0, "flash_attention_bf16_m64_d32_v16"),
                                           (8, "flash_attention_bf16_m64_d32_v4"),
                                           (2, "flash_attention_bf16_m64_d32_v16")])
def test_attention_checks_base_alignment(offset, kernel):
    """k starting 8 bytes off a 16-byte boundary takes the 4-byte copies; 2 bytes off (an
    odd bf16 element) is copied to an aligned array first. The fake kernels fail on a
    misaligned cp.async source, as the hardware would."""
    fused, fake = make_fake_fused(), FakeCupy()
    rng = np.random.default_rng(offset)
    q = fake.asarray(rng.standard_normal((70, 2, 32)).astype(BF16))
    k_values = rng.standard_normal((90, 2, 32)).astype(BF16)
    k = offset_view(fake, k_values, offset)
    got = fused.attention(q, [0], [70], k, k, [0], [90], 0.2)
    assert launched(fused) == {kernel: 1}
    want = reference_attention(np.asarray(q), [0], [70], k_values, k_values, [0], [90], 0.2)
    assert relative_error(got, want) < 1e-2


def test_attention_tile_height_by_length_and_by_request(monkeypatch):
    fused, fake = make_fake_fused(), FakeCupy()
    fused.n_sm = 1                 # so that one long sequence fills the "device"
    rng = np.random.default_rng(5)
    q = fake.asarray(rng.standard_normal((1100, 2, 16)).astype(BF16))
    fused.attention(q, [0], [1100], q, q, [0], [1100], 0.25)                  # long prefill
    fused.attention(q[:1], [0], [1], q, q, [0], [1100], 0.25)                 # a decode step
    fused.attention(q, [0], [1100], q, q, [0], [1100], 0.25, tile_rows=64)   # forced
    assert launched(fused) == {"flash_attention_bf16_m128_d16_v16": 1,
                               "flash_attention_bf16_m64_d16_v16": 2}
    monkeypatch.setenv("SPMD_MOE_ATTENTION_TILE", "128")
    forced = make_fake_fused()
    forced.attention(q[:1], [0], [1], q, q, [0], [1100], 0.25)
    assert launched(forced) == {"flash_attention_bf16_m128_d16_v16": 1}
    assert "128-query tiles (SPMD_MOE_ATTENTION_TILE)" in forced.describe()
    monkeypatch.setenv("SPMD_MOE_ATTENTION_TILE", "96")
    with pytest.raises(ValueError, match="SPMD_MOE_ATTENTION_TILE='96' is not auto, 64 or 128"):
        make_fake_fused()


def test_expert_ffn_runs_one_gelu_per_chunk():
    fused, fake = make_fake_fused(), FakeCupy()
    fused.ffn_workspace_bytes = 128 * 40 * 2                      # 3 passes: 128, 128, 44
    x, w1, w2 = (fake.asarray(np.ones(shape, BF16)) for shape in ((300, 24), (24, 40), (40, 24)))
    fused.expert_ffn(x, w1, w2)
    assert fused.ffn_module.kernels["gelu_bf16_inplace"].launches == 3


def test_ffn_workspace_from_the_environment(monkeypatch):
    monkeypatch.setenv("SPMD_MOE_FFN_WORKSPACE_MB", "32")
    assert make_fake_fused().ffn_workspace_bytes == 32 << 20


# --- kernels against float64 NumPy: on the fake device everywhere, on the GPU where usable ---

@pytest.fixture(params=["fake", pytest.param("gpu", marks=pytest.mark.gpu)])
def device(request):
    """(array module, FusedKernels): the NumPy emulations behind the real launch code, and,
    where a CUDA device is usable, the compiled kernels."""
    if request.param == "fake":
        return FakeCupy(), make_fake_fused()
    import cupy

    loaded, reason = kernels.load_kernels()
    assert loaded is not None, reason
    return cupy, loaded


def poisoned(xp, shape, dtype):
    """An array of NaN on the device (made on the host: CuPy's fill may lack a bf16 loop),
    so that any element a kernel leaves unwritten fails the comparison."""
    return xp.asarray(np.full(shape, np.nan, dtype=dtype))


def reference_ffn(x, w1, w2):
    from spmd_moe.backend.array import erfc_numpy

    h = x.astype(np.float64) @ w1.astype(np.float64)
    return (0.5 * h * erfc_numpy(-h / np.sqrt(2))) @ w2.astype(np.float64)


def dtype_id(value):
    """Readable test ids for dtype parameters."""
    return {BF16: "bf16", F32: "f32"}.get(value) if isinstance(value, np.dtype) else None


def tolerance(dtype) -> float:
    """Relative Frobenius error allowed: bf16 storage (8-bit mantissa) or float32."""
    return 1e-2 if dtype == BF16 else 1e-5


ATTENTION_CASES = [(head_dim, head_dim, dtype, mode, 64) for head_dim in (8, 16, 32, 64, 128)
                   for dtype in (BF16, F32) for mode in ("prefill", "decode")]
# 4-byte row copies (6), and head dims padded to the next instantiation (40, 96).
ATTENTION_CASES += [(6, 6, BF16, "prefill", 64), (40, 40, BF16, "decode", 64),
                    (96, 96, BF16, "prefill", 64)]
# 128-query tiles (8 warps), every instantiated head dim, prefill and decode.
ATTENTION_CASES += [(head_dim, head_dim, BF16, mode, 128)
                    for head_dim in (8, 16, 32, 40, 64, 128) for mode in ("prefill", "decode")]
# MLA's prefill: values narrower than queries and keys (the tiny fixtures' 12 and 6, in the
# kernels of head dim 16; DeepSeek-V3's 192 and 128, in their own), both tile heights.
ATTENTION_CASES += [(12, 6, dtype, mode, 64) for dtype in (BF16, F32)
                    for mode in ("prefill", "decode")]
ATTENTION_CASES += [(192, 128, dtype, mode, tiles) for dtype, tiles in
                    ((BF16, 64), (BF16, 128), (F32, 64)) for mode in ("prefill", "decode")]


@pytest.mark.parametrize("head_dim,v_dim,dtype,mode,tile_rows", ATTENTION_CASES, ids=dtype_id)
def test_flash_attention_matches_float64(device, head_dim, v_dim, dtype, mode, tile_rows):
    xp, fused = device
    rng = np.random.default_rng(head_dim * 7 + len(mode) + (v_dim != head_dim) * v_dim)
    heads = int(rng.integers(1, 5))
    lengths = random_sequences(rng, int(rng.integers(1, 7)), int(rng.choice([37, 300, 1500])),
                               decode=mode == "decode", gap=int(rng.integers(0, 5)))
    n_q, n_k = int(lengths[1].sum()), int((lengths[2] + lengths[3]).max())
    q = rng.standard_normal((n_q, heads, head_dim)).astype(dtype)
    k = rng.standard_normal((n_k, heads, head_dim)).astype(dtype)
    v = rng.standard_normal((n_k, heads, v_dim)).astype(dtype)
    scale = head_dim ** -0.5
    out = poisoned(xp, (n_q, heads * v_dim), dtype)
    fused.attention(xp.asarray(q), *lengths[:2], xp.asarray(k), xp.asarray(v), *lengths[2:],
                    scale, out=out, tile_rows=tile_rows)
    got = out.get().astype(np.float64)
    assert np.isfinite(got).all(), "rows left unwritten"
    want = reference_attention(q, *lengths[:2], k, v, *lengths[2:], scale)
    assert relative_error(got, want) < tolerance(dtype)
    assert fused.fits_attention(head_dim, v_dim) and not fused.fits_attention(192, 130)


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (8, 2)])
@pytest.mark.parametrize("dtype", [BF16, F32], ids=dtype_id)
def test_flash_attention_split_k_decode(device, dtype, heads, kv_heads):
    """Few sequences against long caches: the schedule splits, the combine merges (also
    with 4 query heads per cached K/V head)."""
    xp, fused = device
    rng = np.random.default_rng(3)
    k_lengths = np.array([5000, 1, 3000, 64])
    q_lengths = np.ones(4, np.int64)
    k_starts = np.array([0, 5000, 6000, 9000])
    schedule = sch.attention_schedule(np.arange(4), q_lengths, k_starts, k_lengths,
                                      heads=heads, n_sm=fused.n_sm)
    assert schedule.n_slots > 0
    q = rng.standard_normal((4, heads, 64)).astype(dtype)
    k = rng.standard_normal((9064, kv_heads, 64)).astype(dtype)
    v = rng.standard_normal((9064, kv_heads, 64)).astype(dtype)
    out = poisoned(xp, (4, heads * 64), dtype)
    fused.attention(xp.asarray(q), np.arange(4), q_lengths, xp.asarray(k), xp.asarray(v),
                    k_starts, k_lengths, 0.125, out=out)
    want = reference_attention(q, np.arange(4), q_lengths, k, v, k_starts, k_lengths, 0.125)
    assert relative_error(out.get(), want) < tolerance(dtype)


# Grouped-query attention: 1, 2, 4 and 8 query heads per K/V head, head dims 64 and 128
# (the published families') and 6 (4-byte copies, padded to 16), prefill against packed
# keys and decode against a KV cache holding only the K/V heads (rows with unused tails),
# odd lengths, both tile heights (bf16) and float32.
GQA_CASES = [(group, head_dim, dtype, mode, tile_rows)
             for group in (1, 2, 4, 8) for head_dim in (64, 128)
             for dtype, tile_rows in ((BF16, 64), (BF16, 128), (F32, 64))
             for mode in ("prefill", "decode")]
GQA_CASES += [(group, 6, BF16, mode, 64) for group in (2, 8) for mode in ("prefill", "decode")]


@pytest.mark.parametrize("group,head_dim,dtype,mode,tile_rows", GQA_CASES, ids=dtype_id)
def test_grouped_query_attention_matches_float64(device, group, head_dim, dtype, mode,
                                                 tile_rows):
    xp, fused = device
    rng = np.random.default_rng(group * 1000 + head_dim + len(mode) + tile_rows)
    kv_heads = int(rng.integers(1, 3))
    heads = kv_heads * group
    lengths = random_sequences(rng, int(rng.integers(2, 6)), int(rng.choice([37, 131, 301])),
                               decode=mode == "decode", gap=int(rng.integers(1, 6)))
    n_q, n_k = int(lengths[1].sum()), int((lengths[2] + lengths[3]).max())
    q = rng.standard_normal((n_q, heads, head_dim)).astype(dtype)
    k = rng.standard_normal((n_k, kv_heads, head_dim)).astype(dtype)
    v = rng.standard_normal((n_k, kv_heads, head_dim)).astype(dtype)
    scale = head_dim ** -0.5
    out = poisoned(xp, (n_q, heads * head_dim), dtype)
    fused.attention(xp.asarray(q), *lengths[:2], xp.asarray(k), xp.asarray(v), *lengths[2:],
                    scale, out=out, tile_rows=tile_rows)
    got = out.get().astype(np.float64)
    assert np.isfinite(got).all(), "rows left unwritten"
    want = reference_attention(q, *lengths[:2], k, v, *lengths[2:], scale)
    assert relative_error(got, want) < tolerance(dtype)
    if group > 1:
        # Each query head reads its own group's K/V head: attending to another one (or to
        # K/V head 0 for all) would be far off.
        wrong = reference_attention(q, *lengths[:2], np.roll(k, 1, axis=1),
                                    np.roll(v, 1, axis=1), *lengths[2:], scale)
        assert kv_heads == 1 or relative_error(got, wrong) > 0.1


def test_attention_refuses_k_v_heads_that_do_not_divide_the_query_heads():
    fused, fake = make_fake_fused(), FakeCupy()
    q = fake.asarray(np.ones((3, 6, 16), BF16))
    k = fake.asarray(np.ones((3, 4, 16), BF16))
    with pytest.raises(AssertionError):
        fused.attention(q, [0], [3], k, k, [0], [3], 0.25)


@pytest.mark.parametrize("dtype,tile_rows", [(BF16, 64), (F32, 64), (BF16, 128)], ids=dtype_id)
@pytest.mark.parametrize("head_dim", [16, 128])
def test_flash_attention_split_k_prefill(device, dtype, head_dim, tile_rows, monkeypatch):
    """Splits of 64- and 128-query tiles (partials from every warp, rows with no visible
    key in a split, warps skipping whole blocks), forced by pretending the device has many
    SMs."""
    xp, fused = device
    monkeypatch.setattr(fused, "n_sm", 100000)
    rng = np.random.default_rng(head_dim)
    lengths = (np.array([0, 900]), np.array([900, 700]), np.array([0, 900]),
               np.array([900, 1000]))
    assert sch.attention_schedule(*lengths, heads=2, n_sm=100000,
                                  block_m=tile_rows).n_slots > 0
    q = rng.standard_normal((1600, 2, head_dim)).astype(dtype)
    k = rng.standard_normal((1900, 2, head_dim)).astype(dtype)
    v = rng.standard_normal((1900, 2, head_dim)).astype(dtype)
    out = poisoned(xp, (1600, 2 * head_dim), dtype)
    fused.attention(xp.asarray(q), *lengths[:2], xp.asarray(k), xp.asarray(v), *lengths[2:],
                    head_dim ** -0.5, out=out, tile_rows=tile_rows)
    want = reference_attention(q, *lengths[:2], k, v, *lengths[2:], head_dim ** -0.5)
    assert relative_error(out.get(), want) < tolerance(dtype)


def reference_mla_decode(q, rows, k_starts, k_lengths, latent, scale):
    """Float64: each sequence's one query [h, W] against its cached rows [k, W], values the
    rows' first ``latent`` columns -> [b, h*latent]."""
    out = []
    for i, (start, length) in enumerate(zip(k_starts, k_lengths)):
        block = rows[start:start + length].astype(np.float64)
        s = q[i].astype(np.float64) @ block.T * scale
        p = np.exp(s - s.max(-1, keepdims=True))
        out.append((p / p.sum(-1, keepdims=True)) @ block[:, :latent])
    return np.stack(out).reshape(len(k_lengths), -1)


@pytest.mark.parametrize("dtype", [BF16, F32], ids=dtype_id)
@pytest.mark.parametrize("heads,latent,rope,n_sm", [(4, 12, 4, 1), (20, 512, 64, 1),
                                                    (3, 40, 8, 100000), (16, 64, 16, 132)])
def test_mla_decode_matches_float64(device, dtype, heads, latent, rope, n_sm, monkeypatch):
    """MLA's absorbed decode over the latent cache: one query per sequence, heads in blocks
    of 16 (some partial), lengths around the 32-key blocks, split-K (forced by a large
    device) merged by the attention combine."""
    xp, fused = device
    monkeypatch.setattr(fused, "n_sm", n_sm)
    rng = np.random.default_rng(heads * latent + n_sm % 7)
    k_lengths = rng.permutation(np.array([1, 31, 32, 33, 700]))
    k_starts = np.concatenate([[0], np.cumsum(k_lengths + 3)[:-1]])     # unused tails
    width = latent + rope
    n_rows = int(k_starts[-1] + k_lengths[-1] + 3)
    rows = (rng.standard_normal((n_rows, width)) / 3).astype(dtype)
    q = rng.standard_normal((len(k_lengths), heads, width)).astype(dtype)
    schedule = sch.mla_schedule(k_starts, k_lengths, heads, n_sm)
    assert (schedule.n_slots > 0) == (n_sm > 1)
    out = poisoned(xp, (len(k_lengths), heads * latent), dtype)
    fused.mla_decode(xp.asarray(q), xp.asarray(rows), k_starts, k_lengths, latent, width ** -0.5,
                     out=out)
    got = out.get().astype(np.float64)
    assert np.isfinite(got).all(), "rows left unwritten"
    want = reference_mla_decode(q, rows, k_starts, k_lengths, latent, width ** -0.5)
    assert relative_error(got, want) < tolerance(dtype)


def test_mla_schedule_covers_every_key_block_once():
    k_lengths = np.array([1, 64, 65, 5000, 3])
    k_starts = np.arange(5) * 6000
    for n_sm in (1, 132, 10**5):
        schedule = sch.mla_schedule(k_starts, k_lengths, 128, n_sm)
        tiles = schedule.tiles
        for seq, length in enumerate(k_lengths):
            mine = tiles[tiles[:, 0] == seq]
            blocks = sorted(b for t in mine for b in range(t[3], t[4]))
            assert blocks == list(range(-(-length // sch.MLA_KEYS)))
            assert (mine[:, 1] == k_starts[seq]).all() and (mine[:, 2] == length).all()
            assert (mine[:, 5] >= 0).all() == (len(mine) > 1)
        assert schedule.n_slots == int((tiles[:, 5] >= 0).sum())
        for q_row, n_rows, slot0, n_splits in schedule.combine:
            assert n_rows == 1 and sorted(tiles[tiles[:, 0] == q_row][:, 5]) == list(
                range(slot0, slot0 + n_splits))
    assert len(sch.mla_schedule(k_starts, k_lengths, 128, 1).tiles) == 5      # unsplit


@pytest.mark.parametrize("dtype,out_dtype", [(BF16, None), (F32, None), (BF16, F32)],
                         ids=dtype_id)
@pytest.mark.parametrize("n_rows,d,d_ff", [(1, 32, 40), (300, 64, 200), (1000, 256, 1024)])
def test_expert_ffn_matches_float64(device, dtype, out_dtype, n_rows, d, d_ff, monkeypatch):
    xp, fused = device
    rng = np.random.default_rng(n_rows)
    x = rng.standard_normal((n_rows, d)).astype(dtype)
    w1 = (rng.standard_normal((d, d_ff)) * d ** -0.5).astype(dtype)
    w2 = (rng.standard_normal((d_ff, d)) * d_ff ** -0.5).astype(dtype)
    # A small workspace forces several row chunks (and a short last one).
    monkeypatch.setattr(fused, "ffn_workspace_bytes", 128 * d_ff * dtype.itemsize)
    out = poisoned(xp, (n_rows, d), out_dtype or dtype)
    fused.expert_ffn(xp.asarray(x), xp.asarray(w1), xp.asarray(w2), out_dtype, out=out)
    assert relative_error(out.get(), reference_ffn(x, w1, w2)) < tolerance(dtype)


def reference_swiglu_ffn(x, w1, w2, w3):
    from spmd_moe.moe.experts import silu

    gate = x.astype(np.float64) @ w1.astype(np.float64)
    up = x.astype(np.float64) @ w3.astype(np.float64)
    return (silu(SimpleNamespace(xp=np), gate) * up) @ w2.astype(np.float64)


def swiglu_weights(rng, d, d_ff, dtype):
    return ((rng.standard_normal((d, d_ff)) * d ** -0.5).astype(dtype),
            (rng.standard_normal((d_ff, d)) * d_ff ** -0.5).astype(dtype),
            (rng.standard_normal((d, d_ff)) * d ** -0.5).astype(dtype))


@pytest.mark.parametrize("dtype,out_dtype", [(BF16, None), (F32, None), (BF16, F32)],
                         ids=dtype_id)
@pytest.mark.parametrize("n_rows,d,d_ff", [(1, 32, 40), (301, 64, 197), (1000, 256, 1024)])
def test_swiglu_expert_ffn_matches_float64(device, dtype, out_dtype, n_rows, d, d_ff,
                                           monkeypatch):
    """Odd widths (F = 197: rows of float32 gate/up not 16-byte multiples) and several row
    chunks under a small workspace."""
    xp, fused = device
    rng = np.random.default_rng(n_rows + 1)
    x = rng.standard_normal((n_rows, d)).astype(dtype)
    w1, w2, w3 = swiglu_weights(rng, d, d_ff, dtype)
    monkeypatch.setattr(fused, "ffn_workspace_bytes",
                        128 * d_ff * sch.swiglu_element_bytes(dtype.itemsize))
    out = poisoned(xp, (n_rows, d), out_dtype or dtype)
    fused.expert_ffn(xp.asarray(x), xp.asarray(w1), xp.asarray(w2), out_dtype,
                     w3=xp.asarray(w3), out=out)
    assert relative_error(out.get(), reference_swiglu_ffn(x, w1, w2, w3)) < tolerance(dtype)


@pytest.mark.parametrize("dtype,out_dtype", [(BF16, None), (F32, None), (BF16, F32)],
                         ids=dtype_id)
def test_swiglu_expert_ffn_rounds_where_the_numpy_path_does(device, dtype, out_dtype):
    """Against experts.expert_ffn on NumPy (the generic path, float32 GEMM outputs, the
    product rounded once): bit for bit on the fake device, whose GEMMs and SwiGLU pass are
    that arithmetic; on the GPU within what cuBLAS's summation order and CUDA's expf (2
    ulp) leave, far below one bf16 rounding of the gate or up projections."""
    from spmd_moe.backend.array import Backend, BackendChoice
    from spmd_moe.moe.experts import expert_ffn

    xp, fused = device
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((211, 96)) * 2).astype(dtype)
    w1, w2, w3 = swiglu_weights(rng, 96, 150, dtype)
    numpy_bk = Backend(BackendChoice("numpy", "test"), "bfloat16" if dtype == BF16 else "float32")
    want = expert_ffn(numpy_bk, x, numpy_bk.param(w1), numpy_bk.param(w2), out_dtype,
                      numpy_bk.param(w3))
    got = fused.expert_ffn(xp.asarray(x), xp.asarray(w1), xp.asarray(w2), out_dtype,
                           w3=xp.asarray(w3)).get()
    assert got.dtype == want.dtype
    if xp is np or isinstance(xp, FakeCupy):
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
    else:
        assert relative_error(got, want) < (2e-3 if got.dtype == BF16 else 1e-6)


@pytest.mark.parametrize("dtype", [BF16, F32], ids=dtype_id)
@pytest.mark.parametrize("n", [1, 7, 4096 + 3])
def test_swiglu_pass_matches_the_numpy_product(device, dtype, n):
    """The elementwise pass alone (vector body and tail): silu(gate) * up from float32
    gate and up, rounded once. The fake device is the formula; the GPU's expf may differ
    from NumPy's exp by an ulp or two, which moves a bf16 rounding only at a tie."""
    from spmd_moe.moe.experts import silu

    xp, fused = device
    rng = np.random.default_rng(n)
    gate = (rng.standard_normal(n) * 6).astype(np.float32)
    gate[:3] = [0.0, -120.0, 95.0][:min(3, n)]             # exp(-|g|) underflow, large g
    up = rng.standard_normal(n).astype(np.float32)
    want = (silu(SimpleNamespace(xp=np), gate) * up).astype(dtype)
    out = poisoned(xp, (n,), dtype)
    device_gate = xp.asarray(gate)
    fused.swiglu(device_gate, xp.asarray(up), out)
    got = out.get()
    if dtype == F32:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)
        # In place over gate (what the float32 FFN does).
        fused.swiglu(device_gate, xp.asarray(up), device_gate)
        np.testing.assert_allclose(device_gate.get(), want, rtol=1e-6, atol=1e-30)
    else:
        differ = got.view(np.uint16) != want.view(np.uint16)
        assert differ.mean() <= 0.01
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32),
                                   rtol=2 ** -7, atol=0)


def test_expert_ffn_runs_one_swiglu_per_chunk_within_the_workspace():
    fused, fake = make_fake_fused(), FakeCupy()
    element = sch.swiglu_element_bytes(2)
    assert element == 10 and sch.swiglu_element_bytes(4) == 8
    fused.ffn_workspace_bytes = 128 * 40 * element                # 3 passes: 128, 128, 44
    x, w1, w2, w3 = (fake.asarray(np.full(shape, 0.5, BF16))
                     for shape in ((300, 24), (24, 40), (40, 24), (24, 40)))
    made = []
    real_empty = fake.empty
    fake.empty = lambda shape, dtype: (made.append((shape, np.dtype(dtype))),
                                       real_empty(shape, dtype))[1]
    fused.cp = fake
    fused.expert_ffn(x, w1, w2, w3=w3)
    assert fused.ffn_module.kernels["swiglu_bf16"].launches == 3
    assert "gelu_bf16_inplace" not in fused.ffn_module.kernels
    workspace = [(shape, dtype) for shape, dtype in made if shape[-1] == 40]
    assert sorted(workspace, key=str) == sorted([((128, 40), F32), ((128, 40), F32),
                                                 ((128, 40), BF16)], key=str)


@pytest.mark.parametrize("dtype", [BF16, F32], ids=dtype_id)
@pytest.mark.parametrize("n_tokens,d,top_k", [(37, 32, 2), (500, 4096, 2), (9, 11, 3),
                                              (64, 10, 1), (0, 8, 2)])
def test_permutation_matches_numpy(device, dtype, n_tokens, d, top_k):
    """Bit for bit: a gather is a copy, and the weighted sum does the NumPy path's float32
    operations in the same order."""
    xp, fused = device
    rng = np.random.default_rng(d)
    x = rng.standard_normal((n_tokens, d)).astype(dtype)
    order = np.argsort(rng.integers(0, 8, n_tokens * top_k), kind="stable")   # [R]
    sent = poisoned(xp, (n_tokens * top_k, d), dtype)
    fused.gather_rows(xp.asarray(x), xp.asarray(order), top_k, out=sent)
    np.testing.assert_array_equal(sent.get(), x[order // top_k])

    rows = rng.standard_normal((n_tokens * top_k, d)).astype(dtype)          # expert outputs
    weights = rng.random((n_tokens, top_k)).astype(np.float32)
    moe = poisoned(xp, (n_tokens, d), F32)
    fused.unpermute_weighted(xp.asarray(rows), xp.asarray(order), xp.asarray(weights),
                             out=moe)
    unsorted = np.empty_like(rows)
    unsorted[order] = rows
    unsorted = unsorted.reshape(n_tokens, top_k, d)
    want = weights[:, 0, None] * unsorted[:, 0].astype(np.float32)
    for j in range(1, top_k):
        want += weights[:, j, None] * unsorted[:, j].astype(np.float32)
    np.testing.assert_array_equal(moe.get(), want)


# --- the row-wise kernels: against the generic array code and float64 -------------------

def generic_backend(dtype):
    from spmd_moe.backend.array import Backend, BackendChoice

    return Backend(BackendChoice("numpy", "test"), "bfloat16" if dtype == BF16 else "float32")


def close_to_generic(got, want, dtype):
    """The kernels' tree sums round differently from NumPy's pairwise ones: the same
    values to float32 rounding, or to one bf16 rounding step."""
    rtol, atol = (2**-7, 2**-7) if dtype == BF16 else (2e-6, 1e-6)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=rtol, atol=atol)


def rms64(x, gain, eps, axis_width=None):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * gain.astype(np.float64)


@pytest.mark.parametrize("dtype", [BF16, F32], ids=dtype_id)
@pytest.mark.parametrize("n_rows,d", [(37, 32), (5, 4096), (3, 11), (0, 8), (300, 6)])
def test_rms_norm_kernels_match_the_generic_code_and_float64(device, dtype, n_rows, d):
    from spmd_moe.model import blocks as model

    xp, fused = device
    rng = np.random.default_rng(n_rows + d)
    x, y = (rng.standard_normal((n_rows, d)).astype(dtype) for _ in range(2))
    gain = (1 + 0.1 * rng.standard_normal(d)).astype(dtype)
    out = poisoned(xp, (n_rows, d), dtype)
    fused.rms_norm(xp.asarray(x), xp.asarray(gain), 1e-5, out=out)
    bk = generic_backend(dtype)
    close_to_generic(out.get(), model.rms_norm(bk, x, gain, 1e-5), dtype)
    assert relative_error(out.get(), rms64(x, gain, 1e-5)) < tolerance(dtype)

    moe = rng.standard_normal((n_rows, d)).astype(np.float32)
    summed = fused.residual_add(xp.asarray(x), xp.asarray(moe))
    np.testing.assert_array_equal(summed.get(), model.residual_add(bk, x, moe))   # bit for bit

    h, normed = fused.add_rms_norm(xp.asarray(x), xp.asarray(y), xp.asarray(gain), 1e-5)
    want_h, want = model.add_rms_norm(bk, x, y, gain, 1e-5)
    np.testing.assert_array_equal(h.get(), want_h)            # one rounded float32 add
    close_to_generic(normed.get(), want, dtype)
    assert relative_error(normed.get(), rms64(want_h, gain, 1e-5)) < tolerance(dtype)


def rope64(u, positions, inv_freq, scale=1.0, interleaved=False):
    """Float64 RoPE of u [n, h, D]: pairs (j, j + D/2), or (2j, 2j + 1) written in place."""
    ang = positions.astype(np.float64)[:, None, None] * inv_freq                # [n, 1, D/2]
    c, sn = np.cos(ang) * scale, np.sin(ang) * scale
    if interleaved:
        out = u.copy()
        out[..., 0::2] = u[..., 0::2] * c - u[..., 1::2] * sn
        out[..., 1::2] = u[..., 1::2] * c + u[..., 0::2] * sn
        return out
    half = u.shape[-1] // 2
    c, sn = np.concatenate([c, c], axis=-1), np.concatenate([sn, sn], axis=-1)
    rotated = np.concatenate([-u[..., half:], u[..., :half]], axis=-1)
    return u * c + rotated * sn


ROTATIONS = {"half": (1.0, False, None), "interleaved": (1.0, True, None),
             # YaRN-like: frequencies of their own and cos/sin times an attention factor.
             "scaled": (1.07, True, 0.25)}


@pytest.mark.parametrize("dtype", [BF16, F32], ids=dtype_id)
@pytest.mark.parametrize("kind,rotation", [(kind, "half") for kind in
                                           ("none", "head", "full", "summed")]
                         + [("none", "interleaved"), ("none", "scaled"), ("head", "scaled")])
@pytest.mark.parametrize("n,heads,kv_heads,head_dim", [(29, 4, 2, 16), (5, 8, 8, 128),
                                                       (1, 3, 1, 6), (0, 2, 2, 4)])
def test_qk_norm_rope_matches_the_generic_code_and_float64(device, dtype, kind, rotation, n,
                                                           heads, kv_heads, head_dim):
    """One launch for q and k: each family's q/k norm (``summed``: OLMoE's whole-projection
    norm under TP, from the group's square sums), then RoPE at positions up to 10^4:
    rotate-half, interleaved pairs (DeepSeek), and YaRN's frequencies and cos/sin scale."""
    from spmd_moe.model import blocks as model

    xp, fused = device
    scale, interleaved, slow = ROTATIONS[rotation]
    rng = np.random.default_rng(n * heads + head_dim)
    q = rng.standard_normal((n, heads, head_dim)).astype(dtype)
    k = rng.standard_normal((n, kv_heads, head_dim)).astype(dtype)
    positions = rng.integers(0, 10**4, n).astype(np.int32)
    inv_freq = 1e4 ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if slow is not None:
        inv_freq[len(inv_freq) // 2:] *= slow
    gain_shape = {"head": (head_dim,), "none": (head_dim,)}
    q_gain, k_gain = ((1 + 0.1 * rng.standard_normal(
        gain_shape.get(kind, (h * head_dim,)))).astype(dtype) for h in (heads, kv_heads))
    bk = generic_backend(dtype)
    summed = None
    if kind == "summed":
        # As if another rank held as many more columns with the same sums (width doubled).
        summed = 2 * model.qk_square_sums(bk, q, k)                       # [T, 2]
    generic_kind = "full" if kind == "summed" else kind
    q_width, kv_width = 2 * heads * head_dim, 2 * kv_heads * head_dim
    spec = model.RopeSpec(inv_freq, scale, interleaved)
    want_q, want_k = model.qk_norm_rope(bk, generic_kind, q.copy(), k.copy(), q_gain, k_gain,
                                        1e-6, q_width, kv_width, summed,
                                        model.Rope(bk, positions, spec))
    got_q, got_k = xp.asarray(q), xp.asarray(k)
    fused.qk_norm_rope(generic_kind, got_q, got_k, xp.asarray(q_gain), xp.asarray(k_gain),
                       1e-6, q_width, kv_width, None if summed is None else xp.asarray(summed),
                       xp.asarray(positions), xp.asarray(inv_freq), scale, interleaved)
    for got, want, u, gain in ((got_q, want_q, q, q_gain), (got_k, want_k, k, k_gain)):
        close_to_generic(got.get(), want, dtype)
        u64 = u.astype(np.float64)
        if kind == "head":
            u64 = rms64(u64, gain, 1e-6)
        elif kind in ("full", "summed"):
            flat = u64.reshape(n, u.shape[1] * head_dim)
            mean = (flat * flat).mean(-1, keepdims=True)      # summed: twice over twice the width
            u64 = (flat / np.sqrt(mean + 1e-6) * gain.astype(np.float64)).reshape(u.shape)
        assert relative_error(got.get(), rope64(u64, positions, inv_freq, scale,
                                                interleaved)) < 2 * tolerance(dtype)


@pytest.mark.parametrize("dtype,out_dtype", [(BF16, None), (F32, None), (BF16, F32)],
                         ids=dtype_id)
@pytest.mark.parametrize("n,width", [(7, 24), (0, 8), (300, 130)])
def test_bias_add_matches_the_generic_linear(device, dtype, out_dtype, n, width):
    """blocks.linear's bias (Qwen2-MoE's q/k/v): added to the GEMM's float32 accumulator and
    rounded once, bit for bit the generic ``store(y + b)``; float32 out in place."""
    from spmd_moe.model import blocks as model

    xp, fused = device
    rng = np.random.default_rng(n + width)
    x = rng.standard_normal((n, 16)).astype(dtype)
    w = (rng.standard_normal((16, width)) / 4).astype(np.float32)
    bias = rng.standard_normal(width).astype(np.float32)
    want = model.linear(generic_backend(dtype), x, w, bias, out_dtype)
    y = xp.asarray((x.astype(np.float32) @ w).astype(np.float32))
    got = fused.bias_add(y, xp.asarray(bias), out_dtype or dtype)
    assert got.dtype == want.dtype and np.array_equal(got.get(), want)
    if (out_dtype or dtype) == F32 and n:
        assert got.data.ptr == y.data.ptr                     # in place


@pytest.mark.parametrize("n,n_experts,top_k,renormalize", [
    (37, 8, 2, True), (5, 64, 8, False), (300, 128, 8, True), (3, 256, 4, True),
    (0, 8, 2, True), (33, 5, 5, True), (7, 40, 1, False)])
def test_router_kernel_matches_the_generic_code_and_float64(device, n, n_experts, top_k,
                                                            renormalize):
    """Softmax, k rounds of argmax with ties to the lower expert, renormalised or not; the
    winners exactly the generic code's (exact ties included), weights to float32 rounding."""
    from spmd_moe.moe.router import route

    xp, fused = device
    rng = np.random.default_rng(n + n_experts)
    logits = rng.standard_normal((n, n_experts)).astype(np.float32)
    if n > 2:
        logits[1, :] = 0.5                                     # all tied: experts 0..k-1
        logits[2, n_experts // 2:] = logits[2, :n_experts - n_experts // 2].max() + 1
    experts, weights = fused.route(xp.asarray(logits), top_k, renormalize)
    want_e, want_w = route(generic_backend(F32), logits, np.eye(n_experts, dtype=np.float32),
                           top_k, renormalize)
    np.testing.assert_array_equal(experts.get(), want_e)
    np.testing.assert_allclose(weights.get(), want_w, rtol=2e-6, atol=1e-7)
    p = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    chosen = np.take_along_axis(p, want_e.astype(np.int64), axis=-1)
    if renormalize:
        chosen /= chosen.sum(-1, keepdims=True)
    assert relative_error(weights.get(), chosen) < 1e-5


@pytest.mark.parametrize("n_pairs,n_experts", [(74, 8), (4800, 16), (9, 128), (0, 4),
                                               (1000, 3)])
def test_expert_order_is_the_stable_sort_and_counts(device, n_pairs, n_experts):
    xp, fused = device
    rng = np.random.default_rng(n_pairs)
    # Skewed: some experts get nothing, one gets most.
    experts = np.minimum(rng.geometric(0.3, n_pairs) - 1, n_experts - 1).astype(np.int32)
    order, counts = fused.expert_order(xp.asarray(experts.reshape(-1, 1)), n_experts)
    np.testing.assert_array_equal(order.get(), np.argsort(experts, kind="stable"))
    np.testing.assert_array_equal(counts.get(), np.bincount(experts, minlength=n_experts))


def test_router_and_q_k_pieces_beyond_the_kernels_limits_say_so():
    fused = make_fake_fused()
    assert fused.fit_rowwise(256, 64, 8, "head") is fused
    fitted = fused.fit_rowwise(257, 300, 4, "head")
    assert fused.fuses("router") and not fitted.fuses("router")
    assert not fitted.fuses("qk_rope") and fused.fit_rowwise(8, 300, 4, "full").fuses("qk_rope")
    wide = fused.fit_rowwise(8, 4, 4, "none", head_dim=1024)
    assert wide.fuses("router") and not wide.fuses("qk_rope")
    assert "q/k norm and RoPE: generic array code (head dim 1024; the fused rotation takes " \
        "at most 512)" in wide.describe()
    text = fitted.describe()
    assert "router: generic array code (257 experts; the fused router holds at most 256)" \
        in text and "q/k norm and RoPE: generic array code (300 heads per rank" in text
    assert "router softmax" not in text and "RMSNorm with the residual add" in text


@pytest.mark.gpu
def test_cupy_backend_attaches_the_kernels(monkeypatch):
    from spmd_moe.backend.array import Backend, choose_backend

    monkeypatch.delenv("SPMD_MOE_KERNELS", raising=False)
    backend = Backend(choose_backend("cupy"), "bfloat16")
    assert backend.kernels is not None, backend.kernels_reason
    assert "fused" in backend.kernels_reason


# --- which pieces run fused for a model, and the engine on the fake device ---------------

def fake_backend(dtype: str = "float32"):
    """A NumPy backend carrying the fake device's FusedKernels (as attach() would give a
    CuPy one), whose launch code the engine then runs (HostFusedKernels)."""
    from spmd_moe.backend.array import Backend, BackendChoice

    bk = Backend(BackendChoice("numpy", "test"), dtype)
    bk.kernels = HostFusedKernels(FakeCupy(), "90", n_sm=132, shared_limit=227 << 10,
                                  load=FakeModule)
    bk.kernels_reason = bk.kernels.describe()
    return bk


def test_unsupported_head_dim_leaves_only_attention_to_the_generic_code():
    bk = fake_backend()
    loaded = bk.kernels
    kernels.fit_model(bk, 128)
    assert bk.kernels is loaded and bk.kernels.fused_attention
    kernels.fit_model(bk, 256)
    assert bk.kernels is not None and not bk.kernels.fused_attention
    assert loaded.fused_attention            # the process's shared kernels are untouched
    assert ("attention: generic array code (fused attention supports even head dims up to "
            "128 (and 192 with values up to 128), not 256)") in bk.kernels_reason
    assert "expert FFN (cuBLAS + in-place GELU or SwiGLU), permutation" in bk.kernels_reason
    reason = bk.kernels_reason
    kernels.fit_model(bk, 256)
    assert bk.kernels_reason == reason


def family_reason(model) -> tuple[object, str]:
    from spmd_moe.engine.engine import fit_kernels_to_family

    bk = fake_backend()
    fit_kernels_to_family(bk, model)
    first = bk.kernels_reason
    fit_kernels_to_family(bk, model)                       # idempotent
    assert bk.kernels_reason == first
    return bk.kernels, first


def test_every_family_runs_fused_and_says_so():
    from dataclasses import replace

    from spmd_moe.model.checkpoint import checkpoint_run_config
    from spmd_moe.core.config import build_run_config

    spec = build_run_config("tiny").model
    fused, reason = family_reason(spec)
    assert fused.fused_attention
    assert reason.endswith("; spmd model: fused multi-head attention of head dim 8 and gelu "
                           "experts")
    for name, group, head_dim in (("mixtral", 2, 4), ("qwen3_moe", 2, 6), ("olmoe", 2, 4),
                                  ("qwen2_moe", 2, 4)):
        model = checkpoint_run_config(hf.path(name)).model
        fused, reason = family_reason(model)
        assert fused is not None and fused.fused_attention, reason
        assert reason.endswith(f"; {name} model: fused grouped-query ({group} query heads per "
                               f"K/V head) attention of head dim {head_dim} and swiglu "
                               "experts"), reason
        assert "generic" not in reason and "MLA decode" not in reason
    model = checkpoint_run_config(hf.path("deepseek_v3")).model
    fused, reason = family_reason(model)
    assert fused.fused_attention and fused.fuses("mla_decode") and fused.fuses("router")
    assert "MLA decode over the latent cache" in reason and ", expert order" in reason
    assert "router: generic array code (sigmoid scores with a selection bias and expert " \
           "groups)" in reason
    assert reason.endswith("; deepseek_v3 model: fused latent attention (prefill of head dim "
                           "12 with values of 6, decode over the latent cache) and swiglu "
                           "experts"), reason
    fused, reason = family_reason(replace(spec, d_model=1024, n_heads=4))   # head dim 256
    assert fused is not None and not fused.fused_attention
    assert "attention: generic array code (fused attention supports even head dims up to " \
           "128 (and 192 with values up to 128), not 256)" in reason \
        and reason.endswith("; spmd model: fused gelu experts")
    wide = replace(model, kv_lora_rank=1024)                         # beyond the registers
    fused, reason = family_reason(wide)
    assert not fused.fuses("mla_decode") and "MLA decode: generic array code (latent 1024" \
        in reason and reason.endswith("(prefill of head dim 12 with values of 6) and swiglu "
                                      "experts")


def _on_fake_device(method):
    """``method`` of FusedKernels taking the engine's NumPy arrays: each is viewed as a
    FakeArray (what the launch code reads device pointers from), the result handed back
    as a plain array."""
    def call(self, *args, **kwargs):
        fake = lambda a: a.view(FakeArray) if isinstance(a, np.ndarray) else a  # noqa: E731
        result = method(self, *map(fake, args), **{k: fake(v) for k, v in kwargs.items()})
        if isinstance(result, tuple):
            return tuple(np.asarray(r) for r in result)
        return np.asarray(result)
    return call


class HostFusedKernels(FusedKernels):
    """The launch code on the fake device, called by the engine with NumPy arrays."""

    attention = _on_fake_device(FusedKernels.attention)
    expert_ffn = _on_fake_device(FusedKernels.expert_ffn)
    gather_rows = _on_fake_device(FusedKernels.gather_rows)
    unpermute_weighted = _on_fake_device(FusedKernels.unpermute_weighted)
    rms_norm = _on_fake_device(FusedKernels.rms_norm)
    add_rms_norm = _on_fake_device(FusedKernels.add_rms_norm)
    qk_norm_rope = _on_fake_device(FusedKernels.qk_norm_rope)
    residual_add = _on_fake_device(FusedKernels.residual_add)
    route = _on_fake_device(FusedKernels.route)
    expert_order = _on_fake_device(FusedKernels.expert_order)
    bias_add = _on_fake_device(FusedKernels.bias_add)
    mla_decode = _on_fake_device(FusedKernels.mla_decode)


def launches(fused) -> dict[str, int]:
    return {name: kernel.launches
            for module in (fused.attention_module, fused.ffn_module, fused.permute_module,
                           fused.rowwise_module, fused.mla_module)
            for name, kernel in module.kernels.items() if kernel.launches}


def run_on_fake_device(monkeypatch, config, batch, decode_tokens=0, eos=None, layout=None):
    """The engine through the fused kernels' launch code (emulated kernels) at one rank:
    (outputs, kernel launches)."""
    from mpi4py import MPI

    from spmd_moe.engine import runner
    from spmd_moe.engine.testing import run_layout

    made = []

    class FusedBackend(runner.Backend):
        def __init__(self, choice, dtype):
            super().__init__(choice, dtype)
            fake = fake_backend(dtype)
            self.kernels, self.kernels_reason = fake.kernels, fake.kernels_reason
            made.append(self)

    monkeypatch.setattr(runner, "Backend", FusedBackend)
    outputs = run_layout(MPI.COMM_SELF, config, batch, layout, decode_tokens, eos)
    (bk,) = made
    assert bk.kernels is not None and bk.kernels.fused_attention, bk.kernels_reason
    return outputs, launches(bk.kernels)


@pytest.mark.parametrize("name", hf.FLOAT32 + hf.LOW_PRECISION)
def test_each_family_through_the_fused_launch_code_matches_transformers(monkeypatch, name):
    """Each family through the kernels' launch code: grouped-query attention over the KV
    cache of the K/V heads, MLA (its prefill with values of their own width, its decode
    over the latent cache), SwiGLU experts, shared experts and dense layers, q/k/v biases,
    interleaved and YaRN RoPE: the same tolerance and greedy tokens as the generic path."""
    config, batch, want, eos = hf.setup(name, dtype="float32", decode=True)
    model = config.model
    logits, tokens = hf.float32_expected(name, want)
    prefill, ran = run_on_fake_device(monkeypatch, config, batch)
    assert relative_error(prefill["logits"], logits) < 1e-4
    assert ran["swiglu_f32"] > 0 and ran["gather_rows_v16"] > 0
    assert ran["unpermute_weighted_f32_v16"] > 0
    layers, moe_layers = model.n_layers, model.moe_layers
    assert sum(n for k, n in ran.items() if k.startswith("flash_attention_f32_d16")) == layers
    # The row-wise kernels: one each per layer (RMSNorm: attention's, MLA's two low-rank
    # norms, and the final norm).
    assert ran[f"rope_{model.qk_norm}_f32"] == layers
    assert ran["expert_order"] == ran.get("router_topk", moe_layers) == moe_layers
    assert ran["add_rms_norm_f32"] == ran["residual_add_f32"] == layers
    norms = 1 + (model.attention == "mla") + (model.q_lora_rank > 0)
    assert ran["rms_norm_f32"] == norms * layers + 1
    assert ran.get("bias_add_f32", 0) == (3 * layers if model.qkv_bias else 0)
    # SwiGLU passes: each layer's experts with rows, the shared expert, a dense MLP.
    assert ran["swiglu_f32"] >= moe_layers * (1 + bool(model.d_shared)) + len(
        model.dense_layers)
    assert ("router_topk" in ran) == (model.router_score == "softmax")
    decode, ran = run_on_fake_device(monkeypatch, config, batch, hf.NEW_TOKENS, eos)
    assert np.array_equal(decode["tokens"], tokens)
    if model.attention == "mla":
        # Decode steps attend over the latent cache: one MLA launch per layer and step.
        assert ran["mla_decode_f32"] >= layers * (hf.NEW_TOKENS - 1) // 2
        assert sum(n for k, n in ran.items() if k.startswith("flash_attention_")) == layers
    else:
        assert ran["flash_attention_f32_d16"] > layers                 # prefill, then steps


@pytest.mark.parametrize("kv_heads", [8, 4, 2, 1])
def test_grouped_query_spec_model_through_the_fused_launch_code(monkeypatch, kv_heads):
    """SPEC §1's model with 8 query heads of dim 16 over 8, 4, 2 or 1 K/V heads and SwiGLU
    experts, prefill and decode, against the generic NumPy path."""
    from mpi4py import MPI

    from spmd_moe.core.config import build_run_config
    from spmd_moe.model.inputs import synthetic_input
    from spmd_moe.engine.testing import run_layout

    config = build_run_config("tiny", sets=["dtype=float32", "pad_fraction=0.3", "n_heads=8",
                                            "d_head=16", f"n_kv_heads={kv_heads}",
                                            "activation=swiglu", "n_layers=2"])
    batch = synthetic_input(config.workload, config.model, config.seed)
    want = run_layout(MPI.COMM_SELF, config, batch)
    got, ran = run_on_fake_device(monkeypatch, config, batch)
    for key in ("hidden", "logits"):
        assert relative_error(got[key], want[key]) < 1e-5, key
    assert np.array_equal(got["expert_counts"], want["expert_counts"])
    assert ran["flash_attention_f32_d16"] == 2 and ran["swiglu_f32"] > 0
    want = run_layout(MPI.COMM_SELF, config, batch, decode_tokens=4)
    got, _ = run_on_fake_device(monkeypatch, config, batch, decode_tokens=4)
    assert np.array_equal(got["tokens"], want["tokens"])
