"""``spmd-moe plan``: what a layout places where and what each rank must hold, move and
compute, before any GPU or MPI job is started; layouts that cannot work are refused.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..core.chunks import overlap_enabled
from ..core.config import Layout, RunConfig
from ..core.costs import (GIB, RankCost, checkpoint_share_bytes, decode_step_bytes,
                          parameter_counts, plan_costs)
from ..core.errors import ConfigError, LayoutError, say
from ..core.topology import Grid
from ..perf.cluster import CLUSTERS, load_cluster, load_rates
from ..perf.perfmodel import PAPER_CLAIMS, against_report, predict, predict_paper
from ..perf.tables import format_against, format_paper, format_prediction
from .options import add_config_arguments, config_from_args, positive_finite


def _span(r: range) -> str:
    if len(r) == 0:
        return "-"
    return str(r.start) if len(r) == 1 else f"{r.start}-{r.stop - 1}"


def plan_rows(costs: list[RankCost], limit: int = 64) -> list[RankCost]:
    """All ranks for small worlds; one representative per stage for large ones."""
    if len(costs) <= limit:
        return costs
    seen, rows = set(), []
    for cost in costs:
        if cost.stage not in seen:
            seen.add(cost.stage)
            rows.append(cost)
    return rows


def format_plan(config: RunConfig, layout: Layout, costs: list[RankCost],
                device_bytes: float, hbm_gbps: float = 3350.0, backend: str = "cupy") -> str:
    """The plan's text. ``hbm_gbps``: device memory bandwidth for the decode floor (default
    the H100 SXM datasheet's 3.35 TB/s; pass a measured copy bandwidth when known)."""
    model, work = config.model, config.workload
    total, active = parameter_counts(model)
    lines = [
        f"model: L={model.n_layers} d={model.d_model} H={model.n_heads} E={model.n_experts} "
        f"F={model.d_ff} top-{model.top_k} V={model.vocab_size} {model.dtype}",
        *([family_line(config)] if model.family != "spmd" or config.checkpoint else []),
        f"parameters: {total / 1e9:.2f} B, {active / 1e9:.2f} B active per token",
        f"batch: {work.batch_size} x {work.seq_len} tokens"
        + (f", decode {work.new_tokens} tokens" if work.workload == "decode" else ""),
        f"layout: {layout} on {layout.world_size} ranks ({layout.pp} stage(s) x "
        f"{layout.group} {'tensor' if layout.tp > 1 else 'expert'}-parallel rank(s)); "
        "routing assumed balanced",
        "",
        f"{'rank':>5} {'stage':>5} {layout.kind + '-rank':>7} {'layers':>7} {'experts':>7} "
        f"{'seqs':>7} {'tokens':>9} {'weights':>8} {'activ.':>8} {'KV':>7} {'total':>8} "
        f"{'TFLOP':>8} {'send/layer':>11}",
    ]
    rows = plan_rows(costs)
    for c in rows:
        send = sum(v for k, v in c.send_bytes_per_layer.items() if k != "stage_send")
        lines.append(
            f"{c.rank:>5} {c.stage:>5} {c.group_rank:>7} {_span(c.layers):>7} "
            f"{_span(c.experts):>7} {_span(c.sequences):>7} {c.tokens:>9} "
            f"{c.weight_bytes / GIB:>7.2f}G {c.activation_bytes / GIB:>7.2f}G "
            f"{c.kv_bytes / GIB:>6.2f}G {c.memory_bytes / GIB:>7.2f}G "
            f"{c.total_flops / 1e12:>8.2f} {send / 1e6:>9.1f}MB")
    if len(rows) < len(costs):
        lines.append(f"  ({len(costs)} ranks: one row per stage shown; ranks of a stage "
                     "differ only in experts and sequences)")
    worst = max(costs, key=lambda c: c.memory_bytes)
    per_layer = worst.send_bytes_per_layer
    flops = costs[0].flops
    lines += ["", *schedule_lines(config, layout, worst, backend)]
    if model.fp8_block is not None:
        shipped = checkpoint_share_bytes(model, Grid(layout, model, worst.rank))
        lines.append(f"weights (rank {worst.rank}): {worst.weight_bytes / GIB:.2f} GiB as loaded "
                     f"({model.dtype}, dequantised), {shipped / GIB:.2f} GiB read from the FP8 "
                     "checkpoint as shipped")
    if model.attention == "mla":
        expanded = model.n_heads * (model.head_dim + model.v_dim)
        lines.append(f"KV cache: the latent, {model.cache_width} numbers per token and layer "
                     f"({model.kv_lora_rank} + {model.rope_width}; {model.n_heads} heads' "
                     f"expanded keys and values would be {expanded}, "
                     f"{expanded / model.cache_width:.0f}x more)")
    lines += [
        f"memory: max {worst.memory_bytes / GIB:.2f} GiB per rank (rank {worst.rank}) of "
        f"{device_bytes / GIB:.0f} GiB",
        "bytes sent per rank per layer: " + ", ".join(
            f"{k} {v / 1e6:.1f} MB" for k, v in per_layer.items()),
        "FLOPs per rank per forward (rank 0): " + ", ".join(
            f"{k} {v / 1e12:.2f} T" for k, v in flops.items()) +
        f"; total {sum(c.total_flops for c in costs) / 1e15:.3f} PFLOP over all ranks",
    ]
    if work.workload == "decode":
        grid = Grid(layout, model, worst.rank)
        context = work.seq_len + work.new_tokens
        step = decode_step_bytes(config, grid, context)
        total = sum(step.values())
        lines.append(
            f"decode step (rank {worst.rank}, {context}-token context): reads "
            f"{total / 1e9:.2f} GB (" + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in step.items())
            + f"); bandwidth floor {total / (hbm_gbps * 1e9) * 1e3:.2f} ms at {hbm_gbps:.0f} GB/s")
    return "\n".join(lines)


def family_line(config: RunConfig) -> str:
    """What the checkpoint's family changes, in one line."""
    model = config.model
    if model.attention == "mla":
        query = (f"q rank {model.q_lora_rank}" if model.q_lora_rank else "one q projection")
        attention = (f"latent attention ({query}, q/k head dim {model.head_dim} = "
                     f"{model.nope_dim} + {model.rope_width} rope, values {model.v_dim}, "
                     f"latent {model.kv_lora_rank})")
    else:
        attention = f"KV heads {model.kv_heads}, head dim {model.head_dim}"
    parts = [attention, f"{model.activation} experts", f"q/k norm {model.qk_norm}"]
    if model.qkv_bias:
        parts.append("q/k/v biases")
    if model.rope_interleave:
        parts.append("interleaved RoPE")
    if model.yarn is not None:
        parts.append(f"YaRN x{model.yarn.factor:g} from {model.yarn.original_max}")
    router = "sigmoid router" if model.router_score == "sigmoid" else "top-k"
    if model.n_group > 1:
        router += f" ({model.topk_group} of {model.n_group} groups)"
    router += " renormalised" if model.router_renorm else " not renormalised"
    if model.routed_scale != 1:
        router += f" x{model.routed_scale:g}"
    parts.append(router)
    if model.d_shared:
        parts.append(f"shared expert of {model.d_shared}"
                     + (" (gated)" if model.shared_gate else ""))
    if model.dense_layers:
        parts.append(f"{len(model.dense_layers)} dense layer(s) of {model.d_ff_dense}")
    if model.fp8_block is not None:
        parts.append(f"FP8 {model.fp8_block[0]}x{model.fp8_block[1]} blocks, dequantised "
                     "at load")
    if model.tie_word_embeddings:
        parts.append("tied embeddings")
    notes = ""
    if config.checkpoint:
        from ..model.checkpoint import read_hf_config
        from ..model.families import ignored

        notes = "".join(f"; {note}" for note in ignored(read_hf_config(config.checkpoint)))
    return (f"family: {model.family}: {', '.join(parts)}" + notes
            + (f" ({config.checkpoint})" if config.checkpoint else ""))


def schedule_lines(config: RunConfig, layout: Layout, cost: RankCost,
                   backend: str = "cupy") -> list[str]:
    """The prefill schedule ``cost``'s rank runs: chunk size and why, micro-batches, the
    ideal bubble, whether two are in flight, and what bounds its memory."""
    schedule = cost.schedule
    count, chunk = schedule.count, schedule.chunk
    what = (f"chunks of <= {chunk.tokens} tokens per rank ({chunk.reason})"
            if chunk.tokens else f"{chunk.reason}")
    overlap = ("two in flight (overlap)" if overlap_enabled(
        config.workload.overlap, count, layout.pp, layout.group, backend) else "one at a time")
    bubble = (layout.pp - 1) / (count + layout.pp - 1)
    return [f"prefill: {what}",
            f"  {count} micro-batch(es) per rank, {overlap}; ideal bubble {bubble:.1%} over "
            f"{layout.pp} stage(s); activations are per micro-batch, the KV cache per batch"
            + (" (kept: chunks of a sequence span micro-batches)"
               if schedule.splits_sequences else "")]


def check_fit(costs: list[RankCost], device_bytes: float) -> None:
    worst = max(costs, key=lambda c: c.memory_bytes)
    if worst.memory_bytes > device_bytes:
        raise LayoutError("layout", (
            f"rank {worst.rank} needs {worst.memory_bytes / GIB:.1f} GiB (weights "
            f"{worst.weight_bytes / GIB:.1f}, activations {worst.activation_bytes / GIB:.1f}, "
            f"KV {worst.kv_bytes / GIB:.1f}) but a device has {device_bytes / GIB:.0f} GiB: "
            "use more ranks or more stages, or a smaller --chunk-tokens"))


def make_plan(config: RunConfig, world_size: int, layout_text: str | None,
              backend: str = "cupy") -> tuple[Layout, list[RankCost]]:
    """Validate the layout for ``world_size`` and cost every rank (synthetic batch)."""
    if world_size < 1:
        raise LayoutError("--world-size", f"{world_size} must be >= 1")
    layout = Layout.parse(layout_text, world_size).validate(config.model, world_size)
    work = config.workload
    lengths = np.full(work.batch_size, work.seq_len, dtype=np.int64)
    new_tokens = work.new_tokens if work.workload == "decode" else 0
    return layout, plan_costs(config, layout, lengths, backend, new_tokens)


def print_plan(config: RunConfig, world_size: int, layout_text: str | None,
               device_bytes: float, backend: str = "cupy", hbm_gbps: float = 3350.0) -> int:
    layout, costs = make_plan(config, world_size, layout_text, backend)
    print(format_plan(config, layout, costs, device_bytes, hbm_gbps, backend), flush=True)
    try:
        check_fit(costs, device_bytes)
    except LayoutError as exc:
        say(f"spmd-moe: error: {exc}")
        return 2
    print("fits: yes")
    return 0


def add_arguments(parser) -> None:
    group = parser.add_argument_group("performance prediction (--predict)")
    group.add_argument("--predict", action="store_true",
                       help="predict times on a cluster instead of printing the plan table")
    group.add_argument("--cluster", default="h100-ib", metavar="NAME|FILE",
                       help=f"built-in ({', '.join(CLUSTERS)}, the default) or a JSON file "
                            "(docs/CLUSTER.md)")
    group.add_argument("--calibration", metavar="FILE",
                       help="kernel rates: JSON with {\"rates\": {gemm_tflops, "
                            "attention_tflops, hbm_gbps}} (e.g. spmd-moe bench --json "
                            "output); default: H100 assumptions")
    group.add_argument("--paper-deployments", action="store_true",
                       help="predict the paper's three deployments (ep=16,pp=16 on 256, "
                            "ep=16 on 16, tp=8,pp=2 on 16) beside its claims; --world-size "
                            "and --layout are then ignored")
    group.add_argument("--routing-imbalance", type=float, default=1.0, metavar="F",
                       help="expert parallel: routed rows of the busiest expert rank over "
                            "the mean (default 1: balanced routing)")
    group.add_argument("--against", metavar="REPORT",
                       help="a spmd-moe run --report JSON of the same layout: print predicted "
                            "vs measured")
    group.add_argument("--json", dest="predict_json", metavar="FILE",
                       help="write the prediction(s) as JSON")


def cmd_predict(args, config: RunConfig) -> int:
    from ..core.files import check_output_paths, read_json, write_text
    from .options import command_inputs

    cluster = load_cluster(args.cluster)
    rates = load_rates(args.calibration)
    device_bytes = args.device_memory * GIB
    if args.predict_json:
        check_output_paths((args.predict_json, "--json"), inputs=command_inputs(args))
    if args.paper_deployments:
        rows = predict_paper(config, cluster, rates, args.backend, device_bytes,
                             args.routing_imbalance)
        print(format_paper(rows), flush=True)
        result: Any = {"deployments": rows, "paper_claims": PAPER_CLAIMS}
    else:
        world = args.world_size
        if world < 1:
            raise LayoutError("--world-size", f"{world} must be >= 1")
        layout = Layout.parse(args.layout or config.layout, world).validate(config.model,
                                                                            world)
        result = predict(config, layout, cluster, rates, args.backend, device_bytes,
                         args.routing_imbalance)
        print(format_prediction(result), flush=True)
        if args.against:
            report = read_json(args.against, "--against", "report", error=ConfigError)
            comparison = against_report(result, report)
            print(format_against(comparison), flush=True)
            result = {"prediction": result, "against": comparison}
    if args.predict_json:
        write_text(args.predict_json, json.dumps(result, indent=2) + "\n", "--json")
    return 0


def add_parser(commands) -> None:
    plan = commands.add_parser("plan", help="placement, memory, bytes and FLOPs per rank; "
                                            "no GPU or MPI job needed")
    add_config_arguments(plan)
    plan.add_argument("--world-size", type=int,
                      help="number of ranks (required unless --predict --paper-deployments)")
    plan.add_argument("--device-memory", type=float, default=80.0, metavar="GIB",
                      help="memory per device to check against (default 80, an H100)")
    plan.add_argument("--backend", default="cupy", choices=("cupy", "numpy"),
                      help="whose weight storage to count (default cupy)")
    plan.add_argument("--hbm-gbps", type=float, default=3350.0,
                      help="device memory bandwidth for the decode-step floor (default 3350, "
                           "the H100 SXM datasheet)")
    plan.set_defaults(func=cmd_plan)
    add_arguments(plan)


def cmd_plan(args) -> int:
    positive_finite(args.device_memory, "--device-memory", "GiB")
    positive_finite(args.hbm_gbps, "--hbm-gbps", "GB/s")
    config = config_from_args(args)
    if args.world_size is None and not (args.predict and args.paper_deployments):
        raise ConfigError("--world-size", "required: the number of ranks to plan for")
    if args.predict:
        return cmd_predict(args, config)
    return print_plan(config, args.world_size, args.layout or config.layout,
                      args.device_memory * GIB, args.backend, args.hbm_gbps)
