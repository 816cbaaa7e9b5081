"""The permutation (permute.cu: gather_rows, inverse_permutation, unpermute_weighted), bit
for bit against the NumPy path, on the fake device and on a GPU where usable."""
from __future__ import annotations

import numpy as np
import pytest
from kernel_cases import dtype_id, poisoned

from spmd_moe.backend.array import BF16, F32


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
