"""The fused kernels on the fake device (device.py): :class:`FakeModule`, a compiled module
whose kernels check each launch against the PTX parameter types (a Python int or a
wrong-width scalar would be a silent bug on the GPU) and queue the NumPy emulation of
emulations.py on the current stream; :func:`make_fake_fused`, fused.FusedKernels on the
fake CuPy (its float32-output GEMMs through the backend's cublasGemmEx, on the fake
cuBLAS)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from .cupy import FakeCupy
from .device import current
from .emulations import (address, emulate_attention_combine, emulate_expert_order,
                         emulate_flash_attention, emulate_gather_rows, emulate_gelu,
                         emulate_inverse_permutation, emulate_mla_decode, emulate_qk_norm_rope,
                         emulate_rms_norm, emulate_router_topk, emulate_swiglu,
                         emulate_unpermute_weighted)
from spmd_moe.backend.array import BF16, F32, CublasGemm
from spmd_moe.backend.kernels import schedule as sch
from spmd_moe.backend.kernels.compile import cache_dir, cache_key, compile_source
from spmd_moe.backend.kernels.fused import FusedKernels

_compiled: dict = {}


def compiled(name: str, arch: str):
    """One NVRTC compile per (source, arch) for the whole module, with ptxas statistics."""
    if (name, arch) not in _compiled:
        _compiled[name, arch] = compile_source(name, arch, extra_options=("--ptxas-options=-v",))
    return _compiled[name, arch]


_PTX_TYPE = {np.dtype(np.int32): "u32", np.dtype(np.int64): "u64", np.dtype(np.float32): "f32",
             np.dtype(np.float64): "f64"}


class FakeKernel:
    """A compiled kernel's stand-in: checks each launch's arguments against the parameter
    types in the PTX and the shared-memory opt-in, then queues the kernel's emulation."""

    def __init__(self, name: str, params: list[str], emulate):
        self.name, self.params, self.emulate = name, params, emulate
        self.max_dynamic_shared_size_bytes = 48 << 10
        self.launches = 0

    def __call__(self, grid, block, args, shared_mem=0):
        """Check the launch now; queue the emulation (on views that do not keep the
        arguments alive: freed memory may be reused while the launch is queued)."""
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
        device = current()
        raw = [device.raw(arg) for arg in args]
        arrays = [arg for arg in args if isinstance(arg, np.ndarray)]
        device.enqueue(self.name, lambda: self.emulate(grid, block, *raw), reads=arrays,
                       writes=arrays)


def kernel_params(source_name: str) -> dict[str, list[str]]:
    """Each kernel's PTX parameter types, from one NVRTC compile kept in the kernel cache
    beside the cubins (so that the ranks of an MPI test do not each compile the sources)."""
    path = cache_dir() / (f"{Path(source_name).stem}-sm_80-{cache_key(source_name, 'sm_80')}"
                          ".params.json")
    if path.is_file():
        return json.loads(path.read_text())
    ptx = compiled(source_name, "sm_80").ptx
    params = {m.group(1): re.findall(r"\.param \.(\w+)", m.group(2))
              for m in re.finditer(r"\.visible \.entry (\w+)\(([^)]*)\)", ptx)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(params))
    os.replace(partial, path)
    return params


class FakeModule:
    def __init__(self, source_name: str):
        self.params = kernel_params(source_name)
        self.kernels: dict[str, FakeKernel] = {}

    def get_function(self, name: str) -> FakeKernel:
        if name not in self.kernels:
            self.kernels[name] = FakeKernel(name, self.params[name], _emulation(name))
        return self.kernels[name]


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


def make_fake_fused() -> FusedKernels:
    """FusedKernels of an H100-like device (132 SMs, 227 KiB shared memory) on the current
    fake device."""
    cp = FakeCupy(current())
    gemm = CublasGemm(cp)
    return FusedKernels(cp, "90", n_sm=132, shared_limit=227 << 10, load=FakeModule,
                        gemm=lambda a, b, out: gemm(a, b, out.dtype, out=out))


def launches(fused) -> dict[str, int]:
    """Launches per kernel name, of the kernels that ran."""
    return {name: kernel.launches
            for module in (fused.attention_module, fused.ffn_module, fused.permute_module,
                           fused.rowwise_module, fused.mla_module)
            for name, kernel in module.kernels.items() if kernel.launches}
