"""PyTorch on the same shapes as a bench layer step, in the same process: causal
``scaled_dot_product_attention``, two plain bf16 GEMMs with and without GELU, and an eager
whole step (norms, projections, RoPE, SDPA, router, gather, FFN, scatter-add). A peer to
measure against, never a dependency: returns ``{"available": False}`` without torch.
"""
from __future__ import annotations

import time

from .bench_shapes import BenchShape, stats


def torch_peer(shape: BenchShape, iters: int, warmup: int, on_gpu: bool, seed: int = 0) -> dict:
    """The same shapes in PyTorch, when it imports: SDPA, the FFN's two GEMMs (with and
    without GELU), and an eager whole step. Each part reports its own failure (say, out of
    memory) without stopping the others."""
    try:
        import torch
        import torch.nn.functional as F
    except Exception as exc:  # ImportError, or a torch that fails to load its libraries
        return {"available": False, "reason": f"import torch failed ({type(exc).__name__}: "
                                              f"{str(exc).splitlines()[0] if str(exc) else ''})"}
    if on_gpu and not torch.cuda.is_available():
        return {"available": False, "reason": "torch has no usable CUDA device"}
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if shape.dtype == "bfloat16" else torch.float32
    result = {"available": True, "torch": torch.__version__, "device": (
        torch.cuda.get_device_name() if on_gpu else "cpu"), "phases_ms": {}, "errors": {}}
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def randn(*dims, scale=1.0):
        return (torch.randn(*dims, generator=gen, device=device, dtype=torch.float32)
                * scale).to(dtype)

    def timed(name, fn):
        try:
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(iters):
                if on_gpu:
                    start = torch.cuda.Event(enable_timing=True)
                    stop = torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    stop.record()
                    stop.synchronize()
                    times.append(start.elapsed_time(stop))
                else:
                    t0 = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - t0) * 1e3)
            result["phases_ms"][name] = stats(times)
        except Exception as exc:  # a peer failure is a reported fact, not a crash
            result["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        finally:
            if on_gpu:
                torch.cuda.empty_cache()

    b, seq, heads, dh, d = shape.seqs, shape.seq_len, shape.heads, shape.head_dim, shape.d_model
    rows, f = shape.expert_rows, shape.d_ff

    # Each part allocates in its own scope, so its memory is gone before the next starts.
    def attention():
        q, k, v = (randn(b, heads, seq, dh) for _ in range(3))               # [B, H, L, Dh]
        timed("sdpa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def ffn():
        x = randn(rows, d)
        w1, w2 = randn(d, f, scale=d ** -0.5), randn(f, d, scale=f ** -0.5)
        hidden = torch.empty(rows, f, device=device, dtype=dtype)
        out = torch.empty(rows, d, device=device, dtype=dtype)
        timed("ffn_gemms", lambda: torch.matmul(torch.matmul(x, w1, out=hidden), w2, out=out))
        timed("ffn_gelu", lambda: torch.matmul(F.gelu(x @ w1), w2))

    def eager_step():
        timed("eager_step", _torch_eager_step(torch, F, shape, randn, device, dtype))

    with torch.no_grad():
        for name, part in (("sdpa", attention), ("ffn", ffn), ("eager_step", eager_step)):
            try:
                part()
            except Exception as exc:   # e.g. out of memory while allocating the inputs
                result["errors"][name] = f"{type(exc).__name__}: {str(exc)[:200]}"
            if on_gpu:
                torch.cuda.empty_cache()
    return result


def _torch_eager_step(torch, F, shape: BenchShape, randn, device, dtype):
    """A closure doing the layer step as plain eager PyTorch would: unfused RMSNorm and RoPE,
    cuBLAS projections, SDPA, a float32 top-k router, gather, one expert's FFN and a
    weighted scatter-add (index_add_)."""
    b, seq, heads, dh, d = shape.seqs, shape.seq_len, shape.heads, shape.head_dim, shape.d_model
    t, k_top, rows = shape.tokens, shape.top_k, shape.expert_rows
    routed = shape.routed_rows
    eps = 1e-5
    x = randn(t, d)
    wq, wk, wv, wo = (randn(d, d, scale=d ** -0.5) for _ in range(4))
    wr = randn(d, shape.experts, scale=d ** -0.5)
    w1 = randn(d, shape.d_ff, scale=d ** -0.5)
    w2 = randn(shape.d_ff, d, scale=shape.d_ff ** -0.5)
    g1 = torch.ones(d, device=device, dtype=dtype)
    g2 = torch.ones(d, device=device, dtype=dtype)
    pos = torch.arange(seq, device=device, dtype=torch.float64).repeat(b)           # [T]
    inv_freq = 10000.0 ** (-torch.arange(0, dh, 2, device=device, dtype=torch.float64) / dh)
    ang = pos[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)[:, None, :]                                 # [T, 1, Dh]
    cos, sin = ang.cos().float(), ang.sin().float()
    to_expert = None if rows == routed else torch.arange(rows, device=device) % routed
    from_expert = None if rows == routed else torch.arange(routed, device=device) % rows

    def rms_norm(u, g):
        uf = u.float()
        return (uf * torch.rsqrt(uf.pow(2).mean(-1, keepdim=True) + eps) * g.float()).to(dtype)

    def rope(u):
        uf = u.float()
        half = dh // 2
        rotated = torch.cat([-uf[..., half:], uf[..., :half]], dim=-1)
        return (uf * cos + rotated * sin).to(dtype)

    def step():
        a = rms_norm(x, g1)
        q = rope((a @ wq).view(t, heads, dh))
        k = rope((a @ wk).view(t, heads, dh))
        v = (a @ wv).view(t, heads, dh)
        q, k, v = (u.view(b, seq, heads, dh).transpose(1, 2) for u in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)             # [B,H,L,Dh]
        att = att.transpose(1, 2).reshape(t, d)
        h = (x.float() + (att @ wo).float()).to(dtype)
        bn = rms_norm(h, g2)
        probs = torch.softmax(bn.float() @ wr.float(), dim=-1)                     # [T, E]
        weights, experts = probs.topk(k_top, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        order = torch.argsort(experts.reshape(-1), stable=True)                    # [R]
        token = order // k_top
        send = bn.index_select(0, token)                                           # [R, d]
        expert_in = send if to_expert is None else send[to_expert]
        out = F.gelu(expert_in @ w1) @ w2
        back = out if from_expert is None else out[from_expert]
        moe = torch.zeros(t, d, device=device, dtype=torch.float32)
        moe.index_add_(0, token, back.float() * weights.reshape(-1)[order, None])
        return (h.float() + moe).to(dtype)

    return step
