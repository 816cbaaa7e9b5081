"""``spmd-moe bench`` on the NumPy backend at tiny sizes: every phase timed, FLOPs as counted
by hand, the SPEC §7 target rows, the transport comparison under mpiexec, and no torch needed.
Times are checked for being measured (positive), never for being fast."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from mpi4py import MPI

from spmd_moe.backend.array import Backend, choose_backend
from spmd_moe.commands import bench
from spmd_moe.core.costs import layer_flops as engine_layer_flops
from spmd_moe.core.errors import ConfigError
from spmd_moe.parallel.transport import HostMpiTransport
from spmd_moe.perf import layer_step, torch_peer
from spmd_moe.perf.bench_shapes import (LAYER_PHASES, LOOPBACK_PHASES, TRANSPORT_PHASES,
                                        BenchShape, bench_flops)
from spmd_moe.perf.layer_step import layer_targets, run_layer_step
from spmd_moe.perf.transport_bench import run_transport

TINY = dict(seqs=3, seq_len=7, d_model=24, d_ff=40, heads=4, experts=4, top_k=2)
TINY_ARGS = ["--seqs", "3", "--seq-len", "7", "--d-model", "24", "--d-ff", "40", "--heads",
             "4", "--experts", "4", "--top-k", "2", "--iters", "2", "--warmup", "1", "--quiet"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numpy_backend(dtype="bfloat16"):
    return Backend(choose_backend("numpy"), dtype)


def hand_count(seqs, seq_len, d, d_ff, experts, rows):
    """FLOPs written out the long way: loops over sequences and query positions."""
    tokens = seqs * seq_len
    pairs = sum(i + 1 for _ in range(seqs) for i in range(seq_len))   # causal (query, key)
    core = pairs * (2 * d + 2 * d)                  # q.k over all heads, then p*v
    return {
        # Q, K, V and output projections ([T, d] x [d, d] each), and the core.
        "attention": 4 * (2 * tokens * d * d) + core,
        "attention_core": core,
        "router": 2 * tokens * d * experts,
        "experts": 2 * rows * d * d_ff + 2 * rows * d_ff * d,
    }


@pytest.fixture(scope="module")
def tiny_result():
    return run_layer_step(numpy_backend(), BenchShape(**TINY), iters=2, warmup=1, peer="none")


def test_every_phase_is_timed(tiny_result):
    """The engine's compute phases of a layer, the step their sum; the loop-back's stand-ins
    for the exchanges timed beside them; the attention core alone."""
    assert tiny_result["kind"] == "layer_step"
    assert LAYER_PHASES == ("attention", "router", "permute", "experts", "unpermute",
                            "residual")
    for phase in LAYER_PHASES:
        st = tiny_result["phases_ms"][phase]
        assert len(st["all"]) == 2 and all(t > 0 for t in st["all"]), phase
        assert st["min"] <= st["mean"] <= st["max"]
    steps = np.array(tiny_result["step_ms"]["all"])
    by_phase = np.sum([tiny_result["phases_ms"][p]["all"] for p in LAYER_PHASES], axis=0)
    assert np.allclose(steps, by_phase)
    assert set(tiny_result["loopback_ms"]) == set(LOOPBACK_PHASES)
    assert tiny_result["attention_core_ms"]["mean"] > 0
    assert all(t > 0 for t in tiny_result["step_wall_ms"]["all"])
    assert tiny_result["output_finite"]


def test_flops_match_a_hand_count(tiny_result):
    want = hand_count(3, 7, 24, 40, 4, rows=3 * 7 * 2)
    flops = tiny_result["flops"]
    for phase in LAYER_PHASES:
        assert flops[phase] == want.get(phase, 0), phase
    assert flops["step"] == want["attention"] + want["router"] + want["experts"]
    assert flops["attention_core"] == want["attention_core"]


def test_flops_are_the_engine_s_accounting():
    shape = BenchShape(**TINY, rows=50)
    ours = bench_flops(shape)
    model = shape.model()
    lengths = np.full(shape.seqs, shape.seq_len)
    engine = engine_layer_flops(model, shape.tokens, lengths, shape.heads, 50, shape.d_ff)
    assert ours["attention"] == engine["attention_proj"] + engine["attention_core"]
    assert ours["attention_core"] == engine["attention_core"]
    assert ours["router"] == engine["router"]
    assert ours["experts"] == engine["experts"] == hand_count(3, 7, 24, 40, 4, 50)["experts"]


def test_paper_shapes_are_spec_s_60_tflop():
    flops = bench_flops(BenchShape())
    assert BenchShape().expert_rows == 160_000
    step = sum(flops[p] for p in LAYER_PHASES)
    assert step / 1e12 == pytest.approx(60.2, abs=0.1)   # 60.25
    assert flops == {**{p: 0.0 for p in LAYER_PHASES},
                     **hand_count(8, 10000, 4096, 16384, 16, 160_000)}


def test_rates_and_mfu_follow_from_flops_and_times(tiny_result):
    r = tiny_result
    peak = r["peak"]["tflops"]
    assert peak > 0 and r["floor_ms"] == pytest.approx(r["flops"]["step"] / (peak * 1e12) * 1e3)
    for phase in ("attention", "router", "experts"):
        tflops = r["flops"][phase] / (r["phases_ms"][phase]["mean"] / 1e3) / 1e12
        assert r["tflops"][phase] == pytest.approx(tflops)
        assert r["mfu"][phase] == pytest.approx(tflops / peak)
    assert "permute" not in r["tflops"]             # no FLOPs counted, no rate claimed


def test_targets_are_reported_not_asserted(tiny_result):
    names = [row["name"] for row in tiny_result["targets"]]
    assert names == ["whole step vs PyTorch eager", "attention vs SDPA",
                     "expert FFN vs two GEMMs", "whole step vs matmul floor"]
    no_peer = [row for row in tiny_result["targets"] if row["reference_ms"] is None]
    assert len(no_peer) == 3 and all(row["status"].startswith("n/a") for row in no_peer)
    assert tiny_result["peer"] == {"available": False, "reason": "--peer none"}
    json.dumps(tiny_result)                          # the JSON file can hold it


def test_target_statuses():
    result = {"phases_ms": {"experts": {"mean": 10.0}}, "attention_core_ms": {"mean": 13.0},
              "step_ms": {"mean": 100.0}, "floor_ms": 76.0,
              "peer": {"phases_ms": {"sdpa": {"mean": 10.0}, "ffn_gemms": {"mean": 10.0},
                                     "eager_step": {"mean": 127.0}}}}
    rows = {row["name"]: row for row in layer_targets(result)}
    assert rows["attention vs SDPA"]["ratio"] == pytest.approx(1.3)
    assert rows["attention vs SDPA"]["status"] == "required met, aim not"
    assert rows["expert FFN vs two GEMMs"]["status"] == "aim met"
    assert rows["whole step vs PyTorch eager"]["status"] == "required met, aim not"
    assert rows["whole step vs matmul floor"]["ratio"] == pytest.approx(100 / 76)
    result["attention_core_ms"]["mean"] = 15.0
    assert {r["name"]: r for r in layer_targets(result)}["attention vs SDPA"]["status"] == \
        "missed"
    # Each attention tile height gets its own row against the same SDPA time.
    result["attention_tiles"] = {"available": True, "ms": {"64": {"mean": 12.0},
                                                           "128": {"mean": 10.5}}}
    rows = {row["name"]: row for row in layer_targets(result)}
    assert rows["attention, 64-query tiles vs SDPA"]["ratio"] == pytest.approx(1.2)
    assert rows["attention, 128-query tiles vs SDPA"]["ratio"] == pytest.approx(1.05)


def test_attention_tiles_need_the_fused_kernels(tiny_result):
    tiles = tiny_result["attention_tiles"]
    assert tiles["available"] is False and "no fused kernels" in tiles["reason"]
    assert "attention tile heights: not timed" in bench.format_layer(tiny_result)


class StubKernels:
    """The fused kernels' attention entry, on NumPy: records the tile heights asked for."""

    n_sm = 132
    fused_attention = True

    def __init__(self):
        self.tile_rows = []

    def attention(self, q, q_starts, q_lengths, k, v, k_starts, k_lengths, scale, tile_rows):
        self.tile_rows.append(tile_rows)
        return (q.astype(np.float32) * scale).astype(q.dtype).reshape(q.shape[0], -1)


def test_attention_tiles_time_each_height_on_the_same_inputs():
    bk = numpy_backend()
    bk.kernels = StubKernels()
    shape = BenchShape(**{**TINY, "seq_len": 1100})
    tiles = layer_step.time_attention_tiles(bk, shape, iters=2, warmup=1)
    assert bk.kernels.tile_rows == [64] * 3 + [128] * 3
    assert set(tiles["ms"]) == {"64", "128"} and all(len(st["all"]) == 2
                                                     for st in tiles["ms"].values())
    assert tiles["chosen"] == 64            # 3 x 9 tiles x 4 heads do not fill 132 SMs
    assert tiles["outputs_identical"] is True
    assert tiles["flops"] == bench_flops(shape)["attention_core"]
    assert tiles["tflops"]["64"] == pytest.approx(
        tiles["flops"] / (tiles["ms"]["64"]["mean"] / 1e3) / 1e12)
    float32 = layer_step.time_attention_tiles(numpy_backend("float32"), shape, 1, 0)
    bk32 = numpy_backend("float32")
    bk32.kernels = StubKernels()
    assert layer_step.time_attention_tiles(bk32, BenchShape(**{**TINY, "dtype": "float32"}), 1,
                                      0)["reason"] == "float32 attention has 64-query tiles only"
    assert float32["available"] is False


def test_expert_rows_can_differ_from_routed_rows():
    for rows in (5, 100):
        result = run_layer_step(numpy_backend("float32"), BenchShape(**TINY, rows=rows,
                                dtype="float32"), iters=1, warmup=0, peer="none")
        assert result["shape"]["expert_rows"] == rows
        assert result["flops"]["experts"] == 4 * rows * 24 * 40
        assert result["output_finite"]


def test_bad_shapes_name_the_flag():
    with pytest.raises(ConfigError, match="--heads"):
        BenchShape(**{**TINY, "heads": 5}).validate()
    with pytest.raises(ConfigError, match="--top-k"):
        BenchShape(**{**TINY, "top_k": 5}).validate()
    with pytest.raises(ConfigError, match="--rows"):
        BenchShape(**TINY, rows=0).validate()
    BenchShape(**{**TINY, "heads": 5}).validate(layer_step=False)   # transport: no heads


def test_memory_is_checked_before_allocating():
    with pytest.raises(ConfigError, match="GiB"):
        run_layer_step(numpy_backend(), BenchShape(), peer="none", memory_limit=1 << 30)


def test_transport_on_one_rank_returns_every_row():
    bk = numpy_backend()
    transport = HostMpiTransport(bk)
    result = run_transport(MPI.COMM_SELF, bk, transport, BenchShape(**TINY), iters=2, warmup=1)
    transport.free()
    assert result["roundtrip_ok"] and result["rows_received"] == [3 * 7 * 2]
    assert set(result["phases_max_ms"]) == set(TRANSPORT_PHASES)
    assert result["dispatch_combine_ms"]["mean"] > 0 and result["raw_alltoallv_ms"]["mean"] > 0
    assert result["bytes_sent_per_rank"]["dispatch"]["mean"] == 0     # nothing leaves a rank


# --- the command --------------------------------------------------------------------------

def run_cli(args, tmp_path, ranks=None, block_torch=True, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT)
    if block_torch:
        # A torch that cannot be imported, first on the path: the bench must not need it.
        fake = tmp_path / "no_torch" / "torch"
        fake.mkdir(parents=True, exist_ok=True)
        (fake / "__init__.py").write_text("raise ImportError('torch blocked by the test')\n")
        env["PYTHONPATH"] = f"{tmp_path / 'no_torch'}{os.pathsep}{ROOT}"
    command = [sys.executable, "-m", "spmd_moe", "bench", *args]
    if ranks:
        command = ["mpiexec", "-n", str(ranks), *command]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=tmp_path)


def test_cli_layer_step_without_torch(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli(TINY_ARGS + ["--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["kind"] == "layer_step"
    assert set(result["phases_ms"]) == set(LAYER_PHASES)
    assert all(result["phases_ms"][p]["mean"] > 0 for p in LAYER_PHASES)
    want = hand_count(3, 7, 24, 40, 4, 42)
    assert result["flops"]["step"] == want["attention"] + want["router"] + want["experts"]
    assert result["peer"]["available"] is False
    assert "torch blocked by the test" in result["peer"]["reason"]
    assert "SPEC §7 targets" in proc.stdout and "attention_core" in proc.stdout


def test_cli_transport_at_two_ranks(tmp_path):
    out = tmp_path / "transport.json"
    proc = run_cli(["--transport-only", "--seqs", "2", "--seq-len", "9", "--d-model", "16",
                    "--experts", "4", "--iters", "2", "--warmup", "1", "--quiet",
                    "--json", str(out)], tmp_path, ranks=2)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["kind"] == "transport" and result["world_size"] == 2
    assert result["transport"]["name"] == "mpi-host"
    assert result["roundtrip_ok"] is True
    assert sum(result["rows_received"]) == 2 * 2 * 9 * 2          # every routed row arrives
    assert set(result["phases_max_ms"]) == set(TRANSPORT_PHASES)
    assert all(result["phases_max_ms"][p]["mean"] > 0 for p in TRANSPORT_PHASES)
    assert result["dispatch_combine_ms"]["mean"] > 0 and result["raw_alltoallv_ms"]["mean"] > 0
    assert result["ratio"] == pytest.approx(result["dispatch_combine_ms"]["mean"]
                                            / result["raw_alltoallv_ms"]["mean"])
    assert result["target"]["required"] == 1.2
    assert "rows came back intact: yes" in proc.stdout


def test_cli_refuses_the_layer_step_under_mpiexec(tmp_path):
    proc = run_cli(TINY_ARGS, tmp_path, ranks=2)
    assert proc.returncode == 2
    assert proc.stderr.count("spmd-moe: error: bench:") == 1       # rank 0 only
    assert "--transport-only" in proc.stderr


def test_cli_bad_flag_is_one_line(tmp_path):
    proc = run_cli(TINY_ARGS + ["--heads", "5"], tmp_path)
    assert proc.returncode == 2
    assert "spmd-moe: error: --heads:" in proc.stderr and "Traceback" not in proc.stderr


def test_torch_peer_when_importable():
    pytest.importorskip("torch")
    peer = torch_peer.torch_peer(BenchShape(**TINY), iters=1, warmup=0, on_gpu=False)
    assert peer["available"] and not peer["errors"], peer
    assert set(peer["phases_ms"]) == {"sdpa", "ffn_gemms", "ffn_gelu", "eager_step"}


HF_QWEN = os.path.join(ROOT, "tests", "data", "hf", "qwen3_moe")


def test_layer_step_of_a_checkpoint_family_counts_its_shapes():
    # Qwen3-MoE's shapes: 4 query heads of 6 (24 wide on a 16-wide model), 2 K/V heads,
    # q/k norms per head, three expert matrices; the PyTorch peer says why it does not run.
    from spmd_moe.model.checkpoint import checkpoint_run_config

    model = checkpoint_run_config(HF_QWEN).model
    shape = BenchShape.for_model(model, seqs=2, seq_len=5, rows=7, dtype="float32")
    result = run_layer_step(numpy_backend("float32"), shape.validate(), iters=1, warmup=0)
    assert result["output_finite"]
    tokens, pairs = 10, 2 * sum(range(1, 6))
    flops = result["flops"]
    core = pairs * 4 * 24
    assert flops["attention_core"] == core
    assert flops["attention"] == (2 * tokens * 16 * (24 + 2 * 12)     # Q, K, V
                                  + 2 * tokens * 24 * 16 + core)      # output; the core
    assert flops["experts"] == 2 * 7 * 3 * 16 * 8
    assert not result["peer"]["available"] and "qwen3_moe" in result["peer"]["reason"]
    assert result["shape"]["family"]["qk_norm"] == "head"


def test_chunked_layer_step_of_a_checkpoint_family():
    # Grouped K/V heads in the step's KV cache (2 of 4), q/k norms per head, SwiGLU experts:
    # chunks of 3 tokens compute the whole-sequence step's output.
    from spmd_moe.model.checkpoint import checkpoint_run_config

    model = checkpoint_run_config(HF_QWEN).model
    bk = numpy_backend("float32")
    whole = layer_step.LayerStep(bk, BenchShape.for_model(model, 2, 5, None, "float32"))
    chunked = layer_step.LayerStep(bk, BenchShape.for_model(model, 2, 5, None, "float32", 3))
    assert chunked.micro_batches == 4 and chunked.cache.keys[0].shape == (10, 2, 6)
    assert np.allclose(chunked.run(bk.timer()), whole.run(bk.timer()), rtol=1e-5, atol=1e-5)


def test_bench_model_flag_takes_the_sizes_and_refuses_changing_them():
    common = [sys.executable, "-m", "spmd_moe", "bench", "--model", HF_QWEN, "--seqs", "2",
              "--seq-len", "4", "--iters", "1", "--warmup", "0", "--quiet", "--backend",
              "numpy"]
    done = subprocess.run(common, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "d=16 H=4 F=8 E=8 k=3" in done.stdout
    refused = subprocess.run(common + ["--d-model", "32"], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2
    assert "--d-model: fixed by --model's config.json" in refused.stderr


@pytest.mark.parametrize("chunk", [1, 5, 9])
def test_chunked_layer_step_computes_the_same_layer(chunk):
    """--chunk-tokens: the same work in micro-batches reading a KV cache gives the layer's
    output of the whole-sequence step (float32: to rounding), and the same FLOPs."""
    bk = numpy_backend("float32")
    whole = layer_step.LayerStep(bk, BenchShape(**TINY, dtype="float32"))
    chunked = layer_step.LayerStep(bk, BenchShape(**TINY, dtype="float32", chunk_tokens=chunk))
    assert whole.micro_batches == 1 and chunked.micro_batches == -(-21 // chunk)
    want = whole.run(bk.timer())
    timer = bk.timer()
    got = chunked.run(timer)
    assert got.shape == want.shape
    assert np.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert all(timer.seconds[p] > 0 for p in LAYER_PHASES)
    result = run_layer_step(bk, BenchShape(**TINY, chunk_tokens=chunk), iters=1, warmup=0,
                            peer="none")
    assert result["micro_batches"] == chunked.micro_batches
    assert result["flops"] == run_layer_step(bk, BenchShape(**TINY), iters=1, warmup=0,
                                             peer="none")["flops"]
    with pytest.raises(ConfigError, match="--chunk-tokens"):
        BenchShape(**TINY, chunk_tokens=-2).validate()
