"""``spmd-moe bench``: one rank's layer step at paper shapes, phase by phase, against the
device's matmul peak and PyTorch on the same work (SPEC §7); or, with ``--transport-only``
under ``mpiexec``, the dispatch and combine against a raw Alltoallv.

The measurements live in perf/ (bench_shapes, layer_step, torch_peer, transport_bench);
this module parses, opens the backend and transport, prints and writes ``--json``. Every
size has a flag (defaults: the paper's), so tests run the same code tiny on NumPy;
``--model DIR`` takes a checkpoint's shapes and family (random weights). Timings are
reported, never asserted.
"""
from __future__ import annotations

import json

from ..core.errors import ConfigError, collective, say
from ..perf.bench_shapes import LAYER_PHASES, BenchShape
from ..perf.layer_step import run_layer_step
from ..perf.transport_bench import run_transport


# --- printing --------------------------------------------------------------------------

def format_layer(result: dict) -> str:
    shape, backend = result["shape"], result["backend"]
    lines = [
        f"spmd-moe bench: one rank's layer step, {shape['seqs']} x {shape['seq_len']} tokens, "
        f"d={shape['d_model']} H={shape['heads']} F={shape['d_ff']} E={shape['experts']} "
        f"k={shape['top_k']}, {shape['expert_rows']} expert rows, {shape['dtype']}"
        + (f"; chunks of {shape['chunk_tokens']} tokens: {result['micro_batches']} "
           "micro-batches, attention through a KV cache" if shape.get("chunk_tokens") else ""),
        f"  backend {backend['name']} ({backend['device']}); kernels: "
        f"{'on' if backend['kernels'] else 'off'} ({backend['kernels_reason']})",
        f"  peak {result['peak']['tflops']:.4g} TFLOP/s ({result['peak']['source']}); "
        f"step {result['flops']['step'] / 1e12:.4g} TFLOP, floor "
        f"{result['floor_ms']:.4g} ms" if result["floor_ms"] else "  peak unknown",
        f"  {'phase':<15}{'mean ms':>8}{'min ms':>11}{'GFLOP':>12}{'TFLOP/s':>10}{'MFU':>8}",
    ]
    rows = [(p, result["phases_ms"][p]) for p in LAYER_PHASES] + [
        ("step", result["step_ms"])]
    if "attention_core_ms" in result:
        rows.append(("attention_core", result["attention_core_ms"]))
    for name, st in rows:
        fl = result["flops"].get(name, 0.0)
        tf = result["tflops"].get(name)
        mfu = result["mfu"].get(name)
        lines.append(f"  {name:<15}{st['mean']:>8.3f}{st['min']:>11.3f}{fl / 1e9:>12.5g}"
                     + (f"{tf:>10.4g}{mfu * 100:>7.1f}%" if tf is not None else ""))
    lines.append("  (the engine's layer; attention_core: the attention core alone, inside "
                 "attention;")
    lines.append("   the exchanges looped back, not in the step: " + ", ".join(
        f"{p} {st['mean']:.3f} ms" for p, st in result["loopback_ms"].items()) + ")")
    lines.append(f"  step wall (events around the step) {result['step_wall_ms']['mean']:.3f} ms")
    tiles = result.get("attention_tiles", {})
    if tiles.get("available"):
        lines.append("  attention core by tile height (same inputs): " + ", ".join(
            f"{rows} queries {st['mean']:.3f} ms ({tiles['tflops'][rows]:.4g} TFLOP/s)"
            for rows, st in tiles["ms"].items())
            + f"; the schedule picks {tiles['chosen']}; outputs "
            + ("identical" if tiles["outputs_identical"]
               else f"differ (relative {tiles['outputs_max_rel_diff']:.2g})"))
    elif tiles:
        lines.append(f"  attention tile heights: not timed ({tiles['reason']})")
    peer = result.get("peer", {})
    if peer.get("available"):
        lines.append(f"  PyTorch {peer['torch']} on {peer['device']}:")
        for name, st in peer["phases_ms"].items():
            lines.append(f"    {name:<12}{st['mean']:>11.3f} ms")
        for name, err in peer.get("errors", {}).items():
            lines.append(f"    {name:<12} failed: {err}")
    else:
        lines.append(f"  PyTorch peer: not run ({peer.get('reason', 'n/a')})")
    lines.append("  SPEC §7 targets (ratio ours/reference; lower is better):")
    for row in result["targets"]:
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "  n/a"
        req = f"<= {row['required']:.2f}x" if row["required"] is not None else "  -   "
        lines.append(f"    {row['name']:<36}{ratio:>8}  required {req}  aim <= "
                     f"{row['aim']:.2f}x  {row['status']}")
    return "\n".join(lines)


def format_transport(result: dict) -> str:
    shape = result["shape"]
    lines = [
        f"spmd-moe bench --transport-only: {result['world_size']} ranks, transport "
        f"{result['transport']['name']} ({result['transport']['reason']}), backend "
        f"{result['backend']['name']}",
        f"  {shape['tokens_per_rank']} tokens x k={shape['top_k']} per rank, d="
        f"{shape['d_model']} {shape['dtype']}, E={shape['experts']}; sent per rank "
        f"{result['bytes_sent_per_rank']['dispatch']['mean'] / 1e6:.1f} MB each way",
        f"  dispatch+combine {result['dispatch_combine_ms']['mean']:.3f} ms, raw host "
        f"Alltoallv x2 {result['raw_alltoallv_ms']['mean']:.3f} ms: ratio "
        + (f"{result['ratio']:.2f}x" if result["ratio"] else "n/a")
        + f" (required <= {result['target']['required']}x: {result['target']['status']})",
        f"  rows came back intact: {'yes' if result['roundtrip_ok'] else 'NO'} "
        f"(max abs error {result['roundtrip_max_abs_error']:.3g})",
        f"  {'phase (max over ranks)':<24}{'mean ms':>11}",
    ]
    for name, st in result["phases_max_ms"].items():
        lines.append(f"  {name:<24}{st['mean']:>11.3f}")
    return "\n".join(lines)


# --- the command -------------------------------------------------------------------------

MODEL_SIZE_FLAGS = (("--d-model", "d_model"), ("--d-ff", "d_ff"), ("--heads", "heads"),
                    ("--experts", "experts"), ("--top-k", "top_k"))


def shape_from_args(args) -> BenchShape:
    """The BenchShape of the command line: flags over the paper's defaults, or (``--model``)
    a checkpoint's sizes, which those flags may not change."""
    if args.model:
        from ..model.checkpoint import read_hf_config
        from ..model.families import model_config_from_hf

        for flag, name in MODEL_SIZE_FLAGS:
            if getattr(args, name) is not None:
                raise ConfigError(flag, "fixed by --model's config.json")
        dtype = None
        if args.dtype is not None:
            from ..core.config import DTYPE_ALIASES

            dtype = DTYPE_ALIASES.get(str(args.dtype).lower(), args.dtype)
        model = model_config_from_hf(read_hf_config(args.model),
                                     dtype if dtype in ("bfloat16", "float32") else None)
        variants = [what for what, present in (
            ("multi-head latent attention", model.attention == "mla"),
            ("q/k/v biases", model.qkv_bias), ("shared experts", model.d_shared),
            ("dense layers", model.dense_layers), ("a sigmoid router", model.router_score
                                                   != "softmax")) if present]
        if variants:
            # The bench's layer step is the multi-head, routed-experts-only one.
            raise ConfigError("--model", f"{model.family}: the layer step of "
                                         f"{', '.join(variants)} is not benched yet (spmd-moe "
                                         "run --model times every phase)")
        return BenchShape.for_model(model, args.seqs, args.seq_len, args.rows,
                                    dtype or model.dtype, args.chunk_tokens)
    defaults = BenchShape()
    sizes = {name: getattr(args, name) if getattr(args, name) is not None
             else getattr(defaults, name) for _, name in MODEL_SIZE_FLAGS}
    return BenchShape(args.seqs, args.seq_len, args.rows, dtype=args.dtype or defaults.dtype,
                      chunk_tokens=args.chunk_tokens, **sizes)


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "bench", help="one rank's layer step at paper shapes per phase, MFU and the PyTorch "
                      "peer; or --transport-only under mpiexec")
    sizes = parser.add_argument_group("shapes (default: the paper's, one rank of 16)")
    defaults = BenchShape()
    sizes.add_argument("--model", metavar="DIR",
                       help="take the model's sizes and family from DIR/config.json (a "
                            "Hugging Face checkpoint; no weights are read)")
    sizes.add_argument("--seqs", type=int, default=defaults.seqs, help="sequences (default 8)")
    sizes.add_argument("--seq-len", type=int, default=defaults.seq_len,
                       help="tokens per sequence (default 10000)")
    sizes.add_argument("--rows", type=int, help="rows through the expert (default: "
                                                "seqs*seq-len*top-k)")
    for flag, name in MODEL_SIZE_FLAGS:
        sizes.add_argument(flag, type=int, help=f"default {getattr(defaults, name)}, or the "
                                                "model's under --model")
    sizes.add_argument("--dtype", help="bfloat16 (default, or the model's) or float32")
    sizes.add_argument("--chunk-tokens", type=int, metavar="N",
                       help="layer step: the same work as the engine's chunked prefill, in "
                            "micro-batches of N tokens reading a KV cache (default: one "
                            "micro-batch of whole sequences)")
    run = parser.add_argument_group("execution and output")
    run.add_argument("--iters", type=int, default=3, help="timed iterations (default 3)")
    run.add_argument("--warmup", type=int, default=1, help="untimed iterations (default 1)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--backend", default="auto", help="auto | cupy | numpy")
    run.add_argument("--peer", choices=("auto", "none"), default="auto",
                     help="time PyTorch on the same shapes when it imports (default auto)")
    run.add_argument("--transport-only", action="store_true",
                     help="time dispatch+combine against a raw host Alltoallv (run under "
                          "mpiexec; tokens per rank = seqs*seq-len)")
    run.add_argument("--transport", default="auto", help="auto | mpi-cuda | mpi-host | nccl")
    run.add_argument("--memory-limit", type=float, metavar="GIB",
                     help="memory for the pre-allocation check (default: free memory)")
    run.add_argument("--json", help="write the result as JSON (rank 0)")
    run.add_argument("--trace", metavar="FILE.json",
                     help="a Chrome trace-event timeline of the timed phases (Perfetto, "
                          "chrome://tracing)")
    run.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from mpi4py import MPI

    from ..backend import kernels  # noqa: F401  (registers the fused kernels with the backend)
    from ..backend.array import Backend
    from ..parallel.connect import choose_backend_and_transport, make_transport
    from .options import (check_execution_arguments, command_inputs, gather_trace,
                          memory_limit_bytes, start_trace)
    from ..core.files import check_output_paths, text_writer, write_files

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()

    def checked() -> BenchShape:
        shape = shape_from_args(args).validate(layer_step=not args.transport_only)
        check_execution_arguments(args)
        if args.transport_only and shape.experts % comm.Get_size():
            raise ConfigError("--experts", f"{shape.experts} experts must divide among "
                                           f"{comm.Get_size()} ranks")
        if not args.transport_only and comm.Get_size() > 1:
            raise ConfigError("bench", "the layer step is one rank's work: run it without "
                                       "mpiexec, or add --transport-only")
        if rank == 0:
            check_output_paths((args.json, "--json"), (args.trace, "--trace"),
                               inputs=command_inputs(args))
        return shape

    shape = collective(comm, checked)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    try:
        # The layer step moves nothing between ranks: its transport is never built.
        choice, _, transport_choice = choose_backend_and_transport(
            comm, args.backend, args.transport if args.transport_only else "auto",
            node.Get_rank(), node.Get_size())
    finally:
        node.Free()
    bk = Backend(choice, shape.dtype)

    def progress(text: str) -> None:
        if rank == 0 and not args.quiet:
            say(f"spmd-moe bench: {text}")

    limit = memory_limit_bytes(args)
    tracer = start_trace(comm, args)
    if args.transport_only:
        transport = collective(comm, make_transport, transport_choice, bk)
        if tracer is not None:
            tracer.deployment(f"rank {rank}: dispatch + combine")
        try:
            result = run_transport(comm, bk, transport, shape, args.iters, args.warmup,
                                   args.seed, progress, tracer)
        finally:
            transport.free()
        text = format_transport(result) if result else ""
    else:
        if tracer is not None:
            tracer.deployment("rank 0: layer step")
        result = run_layer_step(bk, shape, args.iters, args.warmup, args.seed, args.peer,
                                limit, progress, tracer)
        text = format_layer(result)
    trace = gather_trace(comm, args, tracer)

    def write_outputs() -> None:
        if rank != 0:
            return
        files = []
        if args.json:
            files.append((args.json, "--json",
                          text_writer(json.dumps(result, indent=2) + "\n")))
        if args.trace:
            files.append((args.trace, "--trace", text_writer(trace)))
        write_files(files)

    if args.json or args.trace:
        collective(comm, write_outputs)
    if rank == 0:
        print(text, flush=True)
    return 0
