"""The fused kernels' launch code on a fake device: :class:`FakeCupy` (the part of CuPy
that fused.py uses, on NumPy), :class:`FakeModule` (a compiled module whose kernels check
each launch against the PTX parameter types and run the NumPy emulation of emulations.py),
and the FusedKernels built on them."""
from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np

from spmd_moe.backend.array import BF16, F32
from spmd_moe.backend.kernels import schedule as sch
from spmd_moe.backend.kernels.compile import compile_source
from spmd_moe.backend.kernels.fused import FusedKernels

from .emulations import (
    address,
    emulate_attention_combine,
    emulate_expert_order,
    emulate_flash_attention,
    emulate_gather_rows,
    emulate_gelu,
    emulate_inverse_permutation,
    emulate_qk_norm_rope,
    emulate_rms_norm,
    emulate_router_topk,
    emulate_swiglu,
    emulate_unpermute_weighted,
)

_compiled: dict = {}


def compiled(name: str, arch: str):
    """One NVRTC compile per (source, arch) for the whole module, with ptxas statistics."""
    if (name, arch) not in _compiled:
        _compiled[name, arch] = compile_source(name, arch, extra_options=("--ptxas-options=-v",))
    return _compiled[name, arch]


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


def _emulation(name: str):
    """The emulation of kernel ``name`` plus checks of its launch shape and of what the
    hardware would fault on: cp.async of 16 (4) bytes needs 16 (4)-byte aligned sources,
    and the bf16 kernels store output pairs as 4-byte words."""
    if name.startswith("flash_attention_"):
        block_m = int(re.search(r"_m(\d+)_", name).group(1)) if "bf16" in name else sch.BLOCK_M

        def run(grid, block, q, k, v, out, part_o, part_lse, tiles, n_tiles, heads, kv_heads,
                d, scale):
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
                                    int(heads), int(kv_heads), int(d), scale, block_m)
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
                head_dim, q_width, kv_width, eps, theta):
            checked(grid, block, (q, k) if kind == "none" else (q, k, q_gain, k_gain), n)
            assert grid[1] == 2 and positions.dtype == np.int32
            assert kind != "summed" or sums.dtype == F32
            emulate_qk_norm_rope(kind, q, k, q_gain, k_gain, positions, sums, int(n),
                                 int(heads), int(kv_heads), int(head_dim), q_width, kv_width,
                                 eps, theta)
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


def launches(fused) -> dict[str, int]:
    return {name: kernel.launches
            for module in (fused.attention_module, fused.ffn_module, fused.permute_module,
                           fused.rowwise_module)
            for name, kernel in module.kernels.items() if kernel.launches}
