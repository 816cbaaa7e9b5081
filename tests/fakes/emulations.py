"""Float64 NumPy emulations of the fused kernels, argument for argument (pointers are arrays).

They model what the CUDA code computes (tiles, causal bound, base-2 online softmax, split
partials and their merge, the permutation's float32 operation order), not how; behind the
fake device's kernels (kernels.py) they run the launch code of fused.py without a GPU.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from spmd_moe.backend.kernels import schedule as sch


def address(array) -> int:
    return array.__array_interface__["data"][0]


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
    """The router's rule after its GEMM (router.select): the fused kernel's contract."""
    from spmd_moe.backend.array import Backend, BackendChoice
    from spmd_moe.moe.router import select

    bk = Backend(BackendChoice("numpy", "emulation"), "float32")
    with np.errstate(invalid="ignore"):
        got_experts, got_weights = select(bk, np.asarray(logits, np.float32).reshape(
            n, n_experts), top_k, bool(renormalize))
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
