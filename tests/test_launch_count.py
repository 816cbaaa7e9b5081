"""perfmodel's GPU op table against a count of the engine's device calls.

The engine runs on the fake device (tests/launch_count.py: the fused kernels' launch code
with NumPy emulations behind it, every kernel launch, cuBLAS GEMM, host<->device copy and
generic array operation counted per phase, as CuPy would issue them), for SPEC §1's model
and each checkpoint family, through a chunked prefill (every chunk writes and reads the KV
cache) and decode steps, in bf16 (its greedy tokens those of the NumPy path); a layer that
is not a pass's first is compared with ``compute.gpu_layer_ops`` phase by phase. So the
model cannot claim a launch the engine does not save, nor miss one it makes.
"""
from __future__ import annotations

import hf_fixtures as hf
import numpy as np
import pytest
from fakes.mpi import checked_comm
from launch_count import counting
from mpi4py import MPI

from spmd_moe.core.config import build_run_config
from spmd_moe.engine.testing import run_layout
from spmd_moe.model.inputs import synthetic_input
from spmd_moe.perf import compute
from spmd_moe.perf.cluster import DEFAULT_RATES

COMPUTE = ("attention", "router", "permute", "experts", "unpermute", "residual")


def counted_run(monkeypatch, config, batch, decode_tokens):
    """The decode run on the counting backend; its greedy tokens must be the NumPy path's
    (bf16 through the fused kernels' launch code, no op left out of the computation)."""
    want = run_layout(MPI.COMM_SELF, config, batch, decode_tokens=decode_tokens)
    with counting(monkeypatch) as counter:
        outputs = run_layout(checked_comm(MPI.COMM_SELF), config, batch,
                             decode_tokens=decode_tokens)
    assert np.array_equal(outputs["tokens"], want["tokens"])
    return counter, outputs


def check_layer(counter, pass_index: int, layer: int, model, local_experts: int):
    counted = {phase: n for phase, n in counter.ops(pass_index, layer).items()
               if phase in COMPUTE}
    # The experts that got rows run (a decode step's few rows leave some idle).
    ffn_calls = sum(n for name, n in counter.detail(pass_index, layer, "experts").items()
                    if name.startswith(("gelu_", "swiglu_")))
    assert 1 <= ffn_calls <= local_experts
    want = compute.gpu_layer_ops(local_experts, model.activation == "swiglu", cached=True,
                                   with_rows=ffn_calls)
    assert counted == want, {phase: dict(counter.detail(pass_index, layer, phase))
                             for phase in COMPUTE}
    return counted


def check_run(counter, config, decode_tokens: int):
    """Every pass: its later layers match the model exactly; its first layer adds the
    attention schedule's two uploads, and outside the layers it uploads its positions
    (GPU_OPS['pass'], all three)."""
    model = config.model
    passes = counter.pass_index + 1
    assert passes > 2 + decode_tokens - 1
    for p in range(passes):
        for layer in range(1, model.n_layers):
            check_layer(counter, p, layer, model, model.n_experts)
        first = counter.ops(p, 0)
        later = counter.ops(p, 1)
        assert first["attention"] - later["attention"] == 2            # tiles, combine lists
    outside = sum(c["host->device"] for (p, _, phase), c in counter.counts.items()
                  if phase is None and p >= 0)
    assert outside == passes                 # each pass's positions (weights come before)
    assert compute.GPU_OPS["pass"] == 2 + 1


def test_spec_model_chunked_prefill_and_decode_launches_match_the_model(monkeypatch):
    config = build_run_config("tiny", sets=["n_layers=3", "chunk_tokens=5", "n_experts=4",
                                            "top_k=2", "workload=decode", "new_tokens=3"])
    batch = synthetic_input(config.workload, config.model, config.seed)
    counter, _ = counted_run(monkeypatch, config, batch, 3)
    check_run(counter, config, 3)
    # The whole GPU layer of the SPEC model at one expert per rank (the paper's ep=16):
    per_layer = sum(compute.gpu_layer_ops(1, False, cached=True).values())
    assert per_layer == 22


@pytest.mark.parametrize("name", ("mixtral", "qwen3_moe", "olmoe"))
def test_each_family_s_launches_match_the_model(monkeypatch, name):
    """q/k norms (none, per head, whole projection), SwiGLU experts, renormalised or not:
    the same count; every chunk of a prefill chunked by 7 and every decode step."""
    config, batch, _, eos = hf.setup(name, dtype="bfloat16", decode=True)
    from dataclasses import replace

    config = replace(config, workload=replace(config.workload, chunk_tokens=7))
    counter, _ = counted_run(monkeypatch, config, batch, hf.NEW_TOKENS)
    check_run(counter, config, hf.NEW_TOKENS)


def test_the_model_s_gpu_layer_is_the_counted_one():
    """layer_compute charges gpu_layer_ops' counts (x op_us) on the GPU, whatever the
    device work: a layer with no tokens costs exactly its launches."""
    from spmd_moe.core.config import Layout
    from spmd_moe.perf.compute import layer_compute, rank_shape
    from spmd_moe.core.topology import Grid

    config = build_run_config("tiny", sets=["n_experts=4", "top_k=2"])
    grid = Grid(Layout.parse("ep=2", 2), config.model, 0)
    shape = rank_shape(config, grid, "cupy")
    rates = DEFAULT_RATES
    phases = layer_compute(config, shape, rates, np.zeros(1, dtype=np.int64), 0.0,
                           starts=np.zeros(1, dtype=np.int64))
    want = compute.gpu_layer_ops(shape.local_experts, False, cached=True)
    for phase in COMPUTE:
        assert phases[phase] == pytest.approx(want[phase] * rates.op_us * 1e-6), phase


@pytest.mark.parametrize("chunk", [None, 4])
def test_the_bench_times_the_engine_s_device_calls(monkeypatch, chunk):
    """The bench's layer step is the engine's layer (Engine.layer_steps through a loop-back
    dispatcher): on the fake device its device calls per compute phase are the GPU op
    table's for one expert per rank, the table the engine's own count matches (above); per
    micro-batch when chunked (through the KV cache). Its loop-backs start no exchange."""
    from fakes.device import FakeDevice
    from fakes.engine import CHOICE
    from launch_count import CountingBackend, CountingTimer, LaunchCounter

    from spmd_moe.perf.bench_shapes import BenchShape
    from spmd_moe.perf.layer_step import LayerStep

    shape = BenchShape(seqs=2, seq_len=6, d_model=32, d_ff=40, heads=4, experts=4, top_k=2,
                       chunk_tokens=chunk)
    with FakeDevice(seed=0) as device:
        counter = LaunchCounter()
        device.listeners.append(counter)
        monkeypatch.setattr(CountingTimer, "counter", counter)
        bk = CountingBackend(CHOICE, "bfloat16")
        step = LayerStep(bk, shape)
        step.run(bk.timer())               # the attention schedules are uploaded once
        counter.counts.clear()
        counter.layer = 0
        step.run(bk.timer())
        device.synchronize()
    micro = step.micro_batches
    assert micro == (1 if chunk is None else 3)
    want = compute.gpu_layer_ops(1, False, cached=chunk is not None)
    counted = {phase: n for phase, n in counter.ops(-1, 0).items() if phase in COMPUTE}
    assert counted == {phase: micro * n for phase, n in want.items()}, {
        phase: dict(counter.detail(-1, 0, phase)) for phase in COMPUTE}
    assert any(name.startswith("flash_attention_bf16")
               for name in counter.detail(-1, 0, "attention"))
    assert not any(name.startswith("nccl") for c in counter.counts.values() for name in c)


@pytest.mark.parametrize("transport", ["nccl", "mpi-cuda", "mpi-host"])
def test_no_layer_synchronises_the_device_and_waits_are_counted(monkeypatch, transport):
    """Per layer the host never synchronises a stream or the device: it waits for the
    expert counts' copy (an event) and, on the MPI transports, for one event per exchange
    that hands MPI device or staging memory (compute.GPU_WAITS, which the cluster model
    charges); NCCL waits for nothing else."""
    config = build_run_config("tiny", sets=["n_layers=3", "n_experts=4", "top_k=2",
                                            "batch_size=3", "seq_len=5"])
    batch = synthetic_input(config.workload, config.model, config.seed)
    with counting(monkeypatch, transport) as counter:
        run_layout(checked_comm(MPI.COMM_SELF), config, batch)
    passes = counter.pass_index + 1
    assert passes >= 1
    want = compute.gpu_layer_waits(transport)
    for p in range(passes):
        for layer in range(config.model.n_layers):
            waits = counter.layer_waits(p, layer)
            assert waits["stream"] == waits["device"] == waits["read"] == 0, waits
            by_phase = {phase: c["event"] for (q, at, phase), c in counter.waits.items()
                        if q == p and at == layer and c["event"]}
            assert by_phase == want, (transport, p, layer, by_phase)
