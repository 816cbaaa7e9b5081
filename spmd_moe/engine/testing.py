"""Helpers the test suites share: run a layout through the Python API and hold its outputs
to the float64 reference of SPEC §1 with the tolerances the project promises."""
from __future__ import annotations

import os

import numpy as np

from ..core.config import RunConfig
from ..model.inputs import Batch
from ..model.reference import reference_forward
from .runner import open_session, run_decode, run_prefill

# Relative error bounds against the float64 reference (README, docs/ARCHITECTURE.md).
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """Relative Frobenius error ||got - want|| / ||want|| in float64."""
    want = np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(got, dtype=np.float64) - want)
                 / max(np.linalg.norm(want), 1e-300))


def check_against_reference(outputs: dict, reference: dict, dtype: str) -> dict[str, float]:
    """Assert ``hidden`` and ``logits`` match within the dtype's bound and (float32)
    ``expert_counts`` match exactly; returns the errors."""
    errors = {key: relative_error(outputs[key], reference[key]) for key in ("hidden", "logits")
              if key in outputs}
    for key, error in errors.items():
        assert np.isfinite(error) and error < TOLERANCE[dtype], f"{key}: {error:.3g}"
    if "hidden" in outputs:
        assert outputs["hidden"].dtype == np.float32
    if dtype == "float32":
        assert np.array_equal(outputs["expert_counts"], reference["expert_counts"]), (
            outputs["expert_counts"], reference["expert_counts"])
    return errors


def run_layout(comm, config: RunConfig, batch: Batch, layout: str | None = None,
               decode_tokens: int = 0, eos_id: int | None = None):
    """Run prefill (or decode with ``decode_tokens``) on ``comm``; outputs on rank 0."""
    session = open_session(config, comm, batch, layout=layout, backend="numpy",
                           new_tokens=decode_tokens)
    try:
        if decode_tokens:
            return run_decode(session, batch, decode_tokens, eos_id).outputs
        return run_prefill(session, batch).outputs
    finally:
        session.close()


def reference_for(config: RunConfig, batch: Batch) -> dict:
    return reference_forward(config.model, batch.ids, batch.mask, config.seed)


def broken_inputs(tmp_path, vocab_size: int) -> dict:
    """Input files broken in every way a user meets (in ``tmp_path``): name -> (path, the
    reason the one-line error must give)."""
    good = tmp_path / "good.npz"
    ids = np.arange(40 * 30).reshape(40, 30) % vocab_size
    np.savez(good, ids=ids, mask=np.ones_like(ids))
    raw = good.read_bytes()
    out = {}

    def put(name, data, reason):
        (tmp_path / name).write_bytes(data)
        out[name] = (tmp_path / name, reason)

    put("text.npz", b"ids = [[1, 2, 3]]\n", "is not an .npz (zip) archive")
    put("empty.npz", b"", "is empty (0 bytes)")
    put("truncated.npz", raw[:len(raw) // 2], "is truncated or not a valid .npz")
    at = raw.index(b"\x93NUMPY") + 200              # inside ids' data (stored, no deflate)
    put("crc.npz", raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1:],
        "is corrupt (ids.npy: Bad CRC-32")
    np.savez_compressed(tmp_path / "packed.npz", ids=ids)
    packed = (tmp_path / "packed.npz").read_bytes()
    at = len(packed) // 2
    put("deflate.npz", packed[:at] + bytes(b ^ 0x5A for b in packed[at:at + 8])
        + packed[at + 8:], "is corrupt (ids.npy")
    np.save(tmp_path / "single.npy", ids)
    put("single.npz", (tmp_path / "single.npy").read_bytes(), "is a single .npy array")
    np.savez(tmp_path / "objects.npz", ids=np.array([[1, None]], dtype=object))
    out["objects.npz"] = (tmp_path / "objects.npz", "holds Python objects (pickled data)")
    os.mkfifo(tmp_path / "fifo.npz")
    out["fifo.npz"] = (tmp_path / "fifo.npz", "is a FIFO, not a regular file")
    out["dir.npz"] = (tmp_path, "is a directory, not a regular file")
    out["/dev/zero"] = ("/dev/zero", "is a character device, not a regular file")
    return out
