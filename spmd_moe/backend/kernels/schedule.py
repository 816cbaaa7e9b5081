"""Host-side launch planning for the fused kernels: pure NumPy, testable without a GPU.

- :func:`attention_schedule`: the tile list of the flash-attention kernel (one tile per
  sequence and block of ``BLOCK_M`` queries, grouped by sequence and longest first within
  it, split over key blocks when there are too few tiles to fill the device) and the
  combine list that merges the splits.
- :func:`attention_variant`: which compiled kernel serves a head dim, dtype, tile height and
  set of base addresses; :func:`tile_rows`: the tile height for a batch (128 query rows
  for long prefill, 64 otherwise); :func:`cta_work`: which tile and heads a CTA runs
  (grouped-query attention: the query heads of a K/V head side by side).
- :func:`ffn_row_chunk`: rows of the expert FFN per pass under a hidden-activation budget
  (:func:`swiglu_element_bytes`: what a SwiGLU hidden element costs).
- :func:`row_vector_bytes` and :func:`row_block`: vector width and block shape of the
  permutation kernels.
- :func:`mla_schedule`: the tiles of MLA's decode kernel (mla.cu): a sequence's keys, split
  when sequences are few, and the combine list that merges the splits.

The constants mirror the ``#define`` lines of flash_attention.cu (a test checks that).
Notation: b sequences, BM queries per tile, BN keys per key block, h query heads, hk
key/value heads (g = h/hk per group), D head dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_M = 64              # queries per tile (4 warps x 16 rows of mma.m16n8k16); float32: 64
BLOCK_M_LONG = 128        # queries per tile of the 8-warp bf16 variant (long prefill)
TILE_ROWS = (BLOCK_M, BLOCK_M_LONG)
BLOCK_N = 64              # keys per key block
TILE_FIELDS = 8           # int32 per tile descriptor (layout in flash_attention.cu)
COMBINE_FIELDS = 4        # int32 per combine descriptor
F32_THREADS = 64
COMBINE_THREADS = 128
SMEM_PAD = 8              # bf16 elements of padding per shared-memory row
PADDED_HEAD_DIMS = (16, 32, 64, 128)   # head dims the kernels are instantiated for
# Query/key widths padded to DP with value widths padded to DVP != DP (MLA's prefill):
# DeepSeek-V3's and Kimi K2's 128 + 64 with values of 128.
WIDE_QK_VARIANTS = {192: 128}

# Split-K policy: split tiles over their key blocks when fewer than SPLIT_TARGET_PER_SM CTAs
# per SM would run (about two waves at two resident CTAs per SM), keeping at least
# MIN_SPLIT_BLOCKS key blocks per split so that each split amortises its partial write.
SPLIT_TARGET_PER_SM = 4
MIN_SPLIT_BLOCKS = 4
# 128-row tiles: for bf16 batches whose longest sequence has at least this many queries, and
# only when their CTAs alone fill the device (no split-K). At 128 rows one CTA per SM is
# resident (207 registers x 256 threads) against two of the 64-row kernel: the same eight
# warps per SM, each K/V block loaded once for twice the queries.
LONG_QUERIES = 1024

INT32_MAX = np.iinfo(np.int32).max


@dataclass(frozen=True)
class AttentionVariant:
    """A compiled flash-attention kernel: its name, padded head dim, tile height (query rows
    per CTA), threads and dynamic shared bytes."""

    kernel: str
    combine_kernel: str
    padded_dim: int
    block_m: int
    threads: int
    shared_bytes: int
    padded_v_dim: int = 0


def bf16_threads(block_m: int) -> int:
    """Threads of the bf16 kernel: one warp per 16 query rows."""
    return block_m // 16 * 32


def padded_dims(head_dim: int, v_dim: int | None = None) -> tuple[int, int]:
    """(DP, DVP): the instantiated query/key and value widths that hold ``head_dim`` and
    ``v_dim`` (default: the head dim): the next of PADDED_HEAD_DIMS for both, or one of
    WIDE_QK_VARIANTS. ValueError for widths no kernel holds (odd ones among them: outputs
    are stored in pairs)."""
    v_dim = head_dim if v_dim is None else v_dim
    limit = max(PADDED_HEAD_DIMS[-1], *WIDE_QK_VARIANTS)
    if head_dim % 2 or v_dim % 2 or not 0 < head_dim <= limit or not 0 < v_dim:
        wide = ", ".join(f"{d} with values up to {v}" for d, v in WIDE_QK_VARIANTS.items())
        raise ValueError(f"fused attention supports even head dims up to "
                         f"{PADDED_HEAD_DIMS[-1]} (and {wide}), not {head_dim}"
                         + (f" with values of {v_dim}" if v_dim != head_dim else ""))
    padded = next((p for p in PADDED_HEAD_DIMS if p >= max(head_dim, v_dim)), None)
    if head_dim <= PADDED_HEAD_DIMS[-1] and padded is not None:
        return padded, padded
    wide = next(d for d in sorted(WIDE_QK_VARIANTS) if d >= head_dim)
    if v_dim > WIDE_QK_VARIANTS[wide]:
        raise ValueError(f"fused attention of head dim {head_dim} takes values of at most "
                         f"{WIDE_QK_VARIANTS[wide]}, not {v_dim}")
    return wide, WIDE_QK_VARIANTS[wide]


def attention_variant(head_dim: int, dtype_name: str, block_m: int = BLOCK_M,
                      pointers: tuple[int, ...] = (), v_dim: int | None = None
                      ) -> AttentionVariant:
    """The kernel for head dim ``head_dim`` and value width ``v_dim`` (default the head
    dim; :func:`padded_dims` says which are instantiated), dtype ``bfloat16`` or
    ``float32``, ``block_m`` query rows per tile (bf16: 64 or 128; float32: 64) and q/k/v
    base addresses ``pointers``. bf16 rows load in 16-byte copies (``cp.async ... 16``)
    when both widths are multiples of 8 and every base address is 16-byte aligned, else in
    4-byte ones, which the 128-row tiles do not have: those fall back to 64 rows."""
    v_dim = head_dim if v_dim is None else v_dim
    padded, v_padded = padded_dims(head_dim, v_dim)
    if block_m not in TILE_ROWS:
        raise ValueError(f"attention tiles have {' or '.join(map(str, TILE_ROWS))} query "
                         f"rows, not {block_m}")
    dims = f"d{padded}" if padded == v_padded else f"d{padded}v{v_padded}"
    if dtype_name == "bfloat16":
        wide = head_dim % 8 == 0 and v_dim % 8 == 0 and all(p % 16 == 0 for p in pointers)
        if not wide:
            block_m = BLOCK_M
        # Q [BM] and double-buffered K [2 x BN] rows of (padded + pad) bf16, V [2 x BN]
        # rows of (v_padded + pad).
        shared = ((block_m + 2 * BLOCK_N) * (padded + SMEM_PAD)
                  + 2 * BLOCK_N * (v_padded + SMEM_PAD)) * 2
        return AttentionVariant(
            f"flash_attention_bf16_m{block_m}_{dims}_{'v16' if wide else 'v4'}",
            "attention_combine_bf16", padded, block_m, bf16_threads(block_m), shared,
            v_padded)
    if dtype_name == "float32":
        # Q [BM][padded + 1], K [BN][padded] and V [BN][v_padded] float.
        shared = (BLOCK_M * (padded + 1) + BLOCK_N * (padded + v_padded)) * 4
        return AttentionVariant(f"flash_attention_f32_{dims}", "attention_combine_f32",
                                padded, BLOCK_M, F32_THREADS, shared, v_padded)
    raise ValueError(f"fused attention supports bfloat16 and float32, not {dtype_name}")


def cta_work(block: np.ndarray, n_tiles: int, heads: int, kv_heads: int):
    """``(tile, head, kv_head)`` of attention CTA ``block`` (int arrays), as the kernels'
    CtaWork computes them: ``block = (kv_head * n_tiles + tile) * g + j`` runs query head
    ``kv_head * g + j`` (g = heads / kv_heads), so the g query heads that share a K/V head
    take adjacent blocks for the same tile (with g = 1: ``head * n_tiles + tile``)."""
    assert heads % kv_heads == 0, (heads, kv_heads)
    block = np.asarray(block, dtype=np.int64)
    group = heads // kv_heads
    pair = block // group
    kv_head = pair // n_tiles
    return pair % n_tiles, kv_head * group + block % group, kv_head


def tile_rows(q_lengths: np.ndarray, heads: int, n_sm: int, dtype_name: str) -> int:
    """Query rows per tile for a batch: BLOCK_M_LONG for bf16 batches with a sequence of at
    least LONG_QUERIES queries whose 128-row tiles give at least SPLIT_TARGET_PER_SM CTAs
    per SM (so that nothing is split), BLOCK_M otherwise (decode, short prompts, float32).
    """
    q_lengths = np.asarray(q_lengths, dtype=np.int64)
    if dtype_name != "bfloat16" or q_lengths.max(initial=0) < LONG_QUERIES:
        return BLOCK_M
    long_tiles = int(_cdiv(q_lengths, BLOCK_M_LONG).sum())
    return BLOCK_M_LONG if long_tiles * heads >= SPLIT_TARGET_PER_SM * n_sm else BLOCK_M


@dataclass
class AttentionSchedule:
    """``tiles`` int32 [n_tiles, TILE_FIELDS], ``combine`` int32 [n_groups, COMBINE_FIELDS],
    ``n_slots`` partial slots (rows of the split workspace, each [h, block_m, D]),
    ``block_m`` query rows per tile."""

    tiles: np.ndarray
    combine: np.ndarray
    n_slots: int
    block_m: int = BLOCK_M

    @property
    def n_tiles(self) -> int:
        return len(self.tiles)


def _cdiv(a, b):
    return -(-a // b)


def attention_schedule(q_starts: np.ndarray, q_lengths: np.ndarray, k_starts: np.ndarray,
                       k_lengths: np.ndarray, heads: int, n_sm: int,
                       block_m: int = BLOCK_M, block_n: int = BLOCK_N) -> AttentionSchedule:
    """Tiles for sequences with ``q_lengths[i]`` queries at packed rows ``q_starts[i]..`` and
    ``k_lengths[i]`` keys at ``k_starts[i]..`` (int arrays [b]); query r of sequence i sees
    keys ``0 .. k_len - q_len + r``. Tile row r sees keys ``<= diag + r``, so a tile needs
    key blocks ``0 .. ceil((diag + n_rows) / BN)``: fully masked blocks are never visited.
    """
    q_starts, q_lengths, k_starts, k_lengths = (np.asarray(a, dtype=np.int64) for a in (
        q_starts, q_lengths, k_starts, k_lengths))
    assert q_starts.shape == q_lengths.shape == k_starts.shape == k_lengths.shape
    assert (q_lengths >= 0).all() and (q_lengths <= k_lengths).all(), \
        "every sequence needs at least as many keys as queries"
    assert (q_starts + q_lengths).max(initial=0) <= INT32_MAX
    assert (k_starts + k_lengths).max(initial=0) <= INT32_MAX

    # One tile per (sequence, block of BM queries): [n] arrays.
    per_seq = _cdiv(q_lengths, block_m)
    seq = np.repeat(np.arange(len(q_lengths)), per_seq)
    first_tile = np.cumsum(per_seq) - per_seq
    q_offset = (np.arange(len(seq)) - first_tile[seq]) * block_m
    n_rows = np.minimum(block_m, q_lengths[seq] - q_offset)
    diag = k_lengths[seq] - q_lengths[seq] + q_offset
    n_blocks = _cdiv(diag + n_rows, block_n)

    # Split-K where the device would otherwise sit idle (decode: b x h CTAs over long caches).
    target = SPLIT_TARGET_PER_SM * n_sm
    want = _cdiv(target, len(seq) * heads) if len(seq) and len(seq) * heads < target else 1
    splits = np.clip(np.minimum(want, n_blocks // MIN_SPLIT_BLOCKS), 1, None)

    # Split s of a tile with nb blocks in n pieces covers blocks [s*nb//n, (s+1)*nb//n).
    piece_tile = np.repeat(np.arange(len(seq)), splits)
    piece_first = np.cumsum(splits) - splits
    piece_index = np.arange(len(piece_tile)) - piece_first[piece_tile]
    nb, n = n_blocks[piece_tile], splits[piece_tile]
    kb_begin = piece_index * nb // n
    kb_end = (piece_index + 1) * nb // n
    is_split = n > 1
    # Partial slots are numbered piece by piece, so a tile's splits hold consecutive slots.
    slot = np.where(is_split, np.cumsum(is_split) - 1, -1)

    tiles = np.zeros((len(piece_tile), TILE_FIELDS), dtype=np.int64)
    tiles[:, 0] = (q_starts[seq] + q_offset)[piece_tile]
    tiles[:, 1] = n_rows[piece_tile]
    tiles[:, 2] = k_starts[seq][piece_tile]
    tiles[:, 3] = diag[piece_tile]
    tiles[:, 4] = kb_begin
    tiles[:, 5] = kb_end
    tiles[:, 6] = slot
    # Grouped by sequence (the kernel runs head by head, so CTAs in flight share one
    # sequence's K/V in L2), longest first within it: the causal triangle's long tiles
    # start early and the short ones fill the tail.
    tiles = tiles[np.lexsort((-(kb_end - kb_begin), seq[piece_tile]))]

    split_tiles = np.flatnonzero(splits > 1)
    combine = np.zeros((len(split_tiles), COMBINE_FIELDS), dtype=np.int64)
    combine[:, 0] = (q_starts[seq] + q_offset)[split_tiles]
    combine[:, 1] = n_rows[split_tiles]
    combine[:, 2] = slot[piece_first[split_tiles]]
    combine[:, 3] = splits[split_tiles]
    assert tiles.max(initial=0) <= INT32_MAX
    return AttentionSchedule(tiles.astype(np.int32), combine.astype(np.int32),
                             int(is_split.sum()), block_m)


def ffn_row_chunk(n_rows: int, d_ff: int, element_bytes: int, workspace_bytes: int) -> int:
    """Rows per pass of the expert FFN so that its [rows, F] intermediates fit in
    ``workspace_bytes``, ``element_bytes`` per hidden element in all (GELU: the hidden in
    the storage dtype; SwiGLU: float32 gate and up, plus the bf16 product): all rows when
    they fit, else a multiple of 128 (whole GEMM tiles)."""
    if n_rows * d_ff * element_bytes <= workspace_bytes:
        return max(n_rows, 1)
    rows = workspace_bytes // (d_ff * element_bytes)
    return max(128, rows // 128 * 128)


def swiglu_element_bytes(itemsize: int) -> int:
    """Bytes per hidden element of the SwiGLU FFN's workspace: float32 gate and up (the
    GEMMs' accumulators, so that the product is rounded once), and the product in the
    storage dtype, except float32, where it overwrites gate."""
    return 2 * 4 + (itemsize if itemsize != 4 else 0)


def row_vector_bytes(row_bytes: int, *pointers: int) -> int:
    """Widest copy (16, 4 or 2 bytes) that divides the row length and every base address."""
    for width in (16, 4, 2):
        if row_bytes % width == 0 and all(p % width == 0 for p in pointers):
            return width
    raise ValueError(f"rows of {row_bytes} bytes are not a whole number of 16-bit elements")


def row_block(row_vecs: int, threads: int = 128) -> tuple[int, int]:
    """Block shape (x, y) for the row kernels: x threads walk a row's ``row_vecs`` vectors
    (a power of two, at most ``threads``), y rows per block fill the rest."""
    x = 1
    while x < min(row_vecs, threads):
        x *= 2
    return x, threads // x


def row_grid(n_rows: int, rows_per_block: int, n_sm: int) -> int:
    """Blocks for a grid-stride loop over rows: enough for the rows, capped at a few waves."""
    return max(1, min(_cdiv(n_rows, rows_per_block), 32 * n_sm))


# --- the row-wise kernels (rowwise.cu) -------------------------------------------------------

ROW_THREADS = 256          # rms_norm, add_rms_norm, qk_norm_rope: one block per row
ROUTER_THREADS = 128       # router_topk: one warp per token
ORDER_THREADS = 256        # expert_order: one block per expert
MAX_EXPERTS_PER_LANE = 8   # router_topk keeps a token's probabilities in registers
MAX_ROUTER_EXPERTS = 32 * MAX_EXPERTS_PER_LANE
MAX_HEADS = 256            # qk_norm_rope's per-head norms of one row, in shared memory
MAX_HEAD_DIM = 512         # qk_norm_rope's cos/sin of one row, in shared memory
QK_KINDS = ("none", "head", "full", "summed")   # QK_NONE.. in rowwise.cu, in this order


# --- MLA's decode kernel (mla.cu) ------------------------------------------------------------

MLA_THREADS = 128          # 4 warps
MLA_HEADS = 16             # query heads per CTA
MLA_KEYS = 32              # keys per block (one per lane)
MLA_MAX_LATENT = 640       # latent widths the kernel's registers hold
MLA_TILE_FIELDS = 6        # q_row, k_row0, k_len, kb_begin, kb_end, slot


@dataclass
class MlaSchedule:
    """``tiles`` int32 [n, MLA_TILE_FIELDS], ``combine`` int32 [g, COMBINE_FIELDS]
    (flash_attention.cu's attention_combine with block_m 1), ``n_slots`` partials."""

    tiles: np.ndarray
    combine: np.ndarray
    n_slots: int


def mla_shared_bytes(width: int, itemsize: int) -> int:
    """The decode kernel's dynamic shared memory: the block's queries (float) and a key
    block of rows padded by one 4-byte word."""
    return MLA_HEADS * width * 4 + MLA_KEYS * (width * itemsize + 4)


def mla_schedule(k_starts: np.ndarray, k_lengths: np.ndarray, heads: int,
                 n_sm: int) -> MlaSchedule:
    """One decode query per sequence (query row i), sequence i's keys at rows
    ``k_starts[i]..`` (``k_lengths[i]`` >= 1): a tile per sequence, split over its key
    blocks (as attention_schedule: to about SPLIT_TARGET_PER_SM CTAs per SM, keeping at
    least MIN_SPLIT_BLOCKS blocks per split) when the sequences alone leave the device idle."""
    k_starts, k_lengths = (np.asarray(a, dtype=np.int64) for a in (k_starts, k_lengths))
    assert (k_lengths >= 1).all() and (k_starts + k_lengths).max(initial=0) <= INT32_MAX
    n_seqs = len(k_lengths)
    head_blocks = _cdiv(heads, MLA_HEADS)
    blocks = _cdiv(k_lengths, MLA_KEYS)
    target = SPLIT_TARGET_PER_SM * n_sm
    want = _cdiv(target, n_seqs * head_blocks) if n_seqs and n_seqs * head_blocks < target \
        else 1
    splits = np.clip(np.minimum(want, blocks // MIN_SPLIT_BLOCKS), 1, None)
    seq = np.repeat(np.arange(n_seqs), splits)
    first = np.cumsum(splits) - splits
    index = np.arange(len(seq)) - first[seq]
    is_split = splits[seq] > 1
    slot = np.where(is_split, np.cumsum(is_split) - 1, -1)
    tiles = np.stack([seq, k_starts[seq], k_lengths[seq], index * blocks[seq] // splits[seq],
                      (index + 1) * blocks[seq] // splits[seq], slot], axis=1)
    split = np.flatnonzero(splits > 1)
    combine = np.stack([split, np.ones_like(split), slot[first[split]], splits[split]], axis=1)
    return MlaSchedule(tiles.astype(np.int32).reshape(-1, MLA_TILE_FIELDS),
                       combine.astype(np.int32).reshape(-1, COMBINE_FIELDS),
                       int(is_split.sum()))
