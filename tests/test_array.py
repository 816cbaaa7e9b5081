"""The array backend (spmd_moe/backend/array.py) on NumPy: the choice and its refusals,
storage rounding, float32 accumulation, bit-exact row moves, ties, the phase timer."""
import numpy as np
import pytest

from spmd_moe.backend.array import (BF16, F32, Backend, BackendChoice, choose_backend,
                                    storage_dtype)
from spmd_moe.core.errors import ConfigError


def numpy_backend(dtype="bfloat16"):
    return Backend(BackendChoice("numpy", "test"), dtype)


def test_the_choice_is_made_once_and_never_silently():
    assert choose_backend("numpy").name == "numpy"
    with pytest.raises(ConfigError, match="backend: 'torch' is not one of auto, cupy, numpy"):
        choose_backend("torch")
    auto = choose_backend("auto")
    assert auto.name in ("numpy", "cupy") and auto.reason.startswith("auto:")
    if auto.name == "numpy":                       # no usable device here: cupy is refused
        with pytest.raises(ConfigError, match="cupy requested but"):
            choose_backend("cupy")


def test_storage_dtype_and_rounding():
    assert storage_dtype("bfloat16") == BF16 and storage_dtype("float32") == F32
    bk = numpy_backend()
    x = np.array([1.0 + 2.0**-9, 3.0], dtype=F32)
    assert bk.store(x).dtype == BF16 and bk.store(x)[0] == 1.0          # rounded to bf16
    assert numpy_backend("float32").store(x)[0] == x[0]


def test_matmul_accumulates_in_float32_and_rounds_once():
    bk = numpy_backend()
    # The float32 sum of 256 products is exact; the stored result is it rounded once.
    a = np.full((1, 256), 1 + 2.0**-7, dtype=BF16)
    b = np.full((256, 1), 1.0, dtype=BF16)
    exact = 256 * (1 + 2.0**-7)
    assert bk.matmul(a, b, out_dtype=F32)[0, 0] == pytest.approx(exact, rel=1e-7)
    stored = bk.matmul(a, b)
    assert stored.dtype == BF16 and stored[0, 0] == BF16.type(exact)


def test_row_moves_are_bit_exact_and_argmax_takes_the_first():
    bk = numpy_backend()
    rows = np.arange(12, dtype=F32).reshape(4, 3).astype(BF16)
    index = np.array([3, 0, 3])
    taken = bk.take_rows(rows, index)
    assert taken.dtype == BF16 and np.array_equal(taken.view(np.uint16),
                                                  rows[index].view(np.uint16))
    out = np.zeros_like(rows)
    bk.put_rows(out, np.array([2, 1]), rows[:2])
    assert np.array_equal(out[[2, 1]].view(np.uint16), rows[:2].view(np.uint16))
    assert bk.argmax(np.array([[1.0, 3.0, 3.0]], dtype=BF16)).tolist() == [1]


def test_the_phase_timer_adds_time_bytes_and_counts():
    bk = numpy_backend()
    timer = bk.timer()
    for _ in range(2):
        with timer.phase("experts"):
            sum(range(1000))
    timer.add_bytes("dispatch", 100)
    timer.add_bytes("dispatch", 20)
    timer.count("expert_rows", 7)
    totals = timer.totals()
    assert set(totals) == {"experts"} and totals["experts"] > 0
    assert timer.bytes_sent == {"dispatch": 120} and timer.counters == {"expert_rows": 7}
