"""The performance model's results as text: a prediction, the paper's deployments beside
its claims, and a prediction beside a measured run."""
from __future__ import annotations

from ..core.phases import LAYER_COMM_PHASES
from .cluster import RATE_KEYS
from .perfmodel import PAPER_CLAIMS


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def format_prediction(p: dict) -> str:
    routing = ("balanced" if p["routing_imbalance"] == 1 else
               f"busiest expert rank at {p['routing_imbalance']:.2f}x the mean")
    lines = [
        f"prediction: {p['layout']} on {p['world_size']} GPU(s), {p['nodes']} node(s); "
        f"{p['batch_size']} x {p['seq_len']} tokens, {p['micro_batches']} micro-batch(es) per "
        f"rank; backend {p['backend']}",
        f"  cluster {_describe_cluster(p['cluster'])}",
        "  rates " + ", ".join(f"{k} {p['rates'][k]:g}" for k in RATE_KEYS)
        + _rate_sources(p["rates"]["source"]),
        f"  routing: {routing}; memory: max {p['memory_gib_max']:.1f} GiB per rank"
        + ("" if p["fits"] else "  (DOES NOT FIT the device: spmd-moe plan says why)"),
        "  prefill micro-batches: " + (f"chunks of <= {p['chunk_tokens']} tokens per rank "
                                       f"({p['chunk_reason']})" if p["chunk_tokens"]
                                       else p["chunk_reason"])
        + f"; ideal bubble {p['bubble_fraction_ideal'] * 100:.1f}%; overlap "
        + ("on (two micro-batches in flight)" if p["overlap"] else "off"),
        "  one layer, largest micro-batch, busiest stage (ms; max over the stage's ranks; "
        "comm exposed after overlap):",
    ]
    for name, ms in p["layer_ms"].items():
        kind = "compute"
        if name in LAYER_COMM_PHASES:
            kind = f"comm, {p['layer_exposed_ms'].get(name, ms):.3f} exposed"
        lines.append(f"    {name:<16}{ms:>12.3f}  {kind}")
    lines += [
        f"    {'total':<16}{sum(p['layer_ms'].values()):>12.3f}  "
        f"(communication {p['comm_fraction_of_layer'] * 100:.0f}%, "
        f"{p['comm_fraction_after_overlap'] * 100:.0f}% after overlap)",
        f"  stages: busy {', '.join(f'{b:.1f}' for b in p['stage_busy_ms'][:4])}"
        + (" ..." if len(p["stage_busy_ms"]) > 4 else "")
        + f" ms; stage-to-stage hop {p['stage_hop_ms']:.2f} ms; bubble "
          f"{p['bubble_fraction'] * 100:.0f}%",
        f"  prefill: {p['tokens']:,} tokens in {p['wall_s'] * 1e3:,.1f} ms -> "
        f"{_fmt_rate(p['tokens_per_s'])} tokens/s ({_fmt_rate(p['tokens_per_s_per_gpu'])} "
        "per GPU)",
        f"  decode step (batch {p['batch_size']}, context {p['decode']['context']:.0f}): "
        f"{p['decode']['step_ms']:.2f} ms -> {_fmt_rate(p['decode']['tokens_per_s'])} "
        "tokens/s",
        "  ms/token: decode step (this project's meaning) "
        f"{p['ms_per_token']['decode_step_ms']:.2f} ms; 1/throughput "
        f"{p['ms_per_token']['reciprocal_throughput_us']:.3f} us; prefill wall / seq_len "
        f"{p['ms_per_token']['prefill_ms_per_position']:.3f} ms",
    ]
    return "\n".join(lines)


def _describe_cluster(c: dict) -> str:
    intra, inter = c["intra_node"], c["inter_node"]
    nodes = f"{c['nodes']} x " if c.get("nodes") else ""
    return (f"{c['name']}: {nodes}{c['gpus_per_node']} GPUs/node, intra "
            f"{intra['bandwidth_gbytes_per_s']:g} GB/s {intra['latency_us']:g} us, inter "
            f"{inter['bandwidth_gbytes_per_s']:g} GB/s {inter['latency_us']:g} us")


def _rate_sources(source: dict) -> str:
    kinds = sorted(set(source.values()))
    return f" [{'; '.join(kinds)}]" if kinds else ""


def format_paper(rows: list[dict]) -> str:
    first = rows[0]
    lines = [
        f"paper-scale prediction: {first['batch_size']} x {first['seq_len']} tokens, backend "
        f"{first['backend']}",
        f"  cluster {_describe_cluster(first['cluster'])}",
        "  rates " + ", ".join(f"{k} {first['rates'][k]:g}" for k in RATE_KEYS)
        + _rate_sources(first["rates"]["source"]),
        "",
        f"  {'deployment':<34}{'GPUs':>5}{'chunk':>7}{'M':>5}{'tokens/s':>12}{'paper':>10}"
        f"{'/GPU':>9}{'1/thr us':>10}{'paper':>7}{'decode ms':>11}{'bubble':>8}"
        f"{'comm':>6}{'after':>7}{'fits':>6}",
    ]
    for r in rows:
        lines.append(
            f"  {r['label'] + ' ' + r['layout']:<34}{r['world_size']:>5}"
            f"{r['chunk_tokens'] or '-':>7}{r['micro_batches']:>5}"
            f"{_fmt_rate(r['tokens_per_s']):>12}{_fmt_rate(r['paper']['tokens_per_s']):>10}"
            f"{_fmt_rate(r['tokens_per_s_per_gpu']):>9}"
            f"{r['ms_per_token']['reciprocal_throughput_us']:>10.3f}"
            f"{r['paper']['ms_per_token']:>7.1f}{r['decode']['step_ms']:>11.2f}"
            f"{r['bubble_fraction'] * 100:>7.0f}%{r['comm_fraction_of_layer'] * 100:>5.0f}%"
            f"{r['comm_fraction_after_overlap'] * 100:>6.0f}%"
            f"{'yes' if r['fits'] else 'NO':>6}")
    ep256, ep16, base = rows
    claim = PAPER_CLAIMS["ep"]["tokens_per_s"] / PAPER_CLAIMS["baseline"]["tokens_per_s"]
    lines += [
        "",
        f"  ratio EP(256)/baseline(16): predicted "
        f"{ep256['tokens_per_s'] / base['tokens_per_s']:.2f}x, paper {claim:.2f}x; "
        "EP(16)/baseline(16), same GPUs: "
        f"{ep16['tokens_per_s'] / base['tokens_per_s']:.2f}x",
        "  chunk: prefill chunk tokens per rank; M: micro-batches per rank; comm: share of a",
        "  layer; after: exposed share once two micro-batches overlap their exchanges.",
        "  'paper' ms/token: 2.2 and 8.3 are 1e6/450,000 and 1e6/120,000, i.e. the reciprocal",
        "  throughput in microseconds (the '1/thr us' column), not a per-step latency; the",
        "  decode column is this project's ms/token (one decode step of the whole batch).",
    ]
    return "\n".join(lines)


def format_against(a: dict) -> str:
    lines = [f"predicted vs measured: {a['layout']} on {a['world_size']} rank(s): wall "
             f"{a['predicted_wall_ms']:.1f} vs {a['measured_wall_ms']:.1f} ms "
             f"(error {a['error'] * 100:+.0f}%)",
             f"  {'phase (max over ranks)':<24}{'predicted ms':>14}{'measured ms':>14}"]
    for name, row in a["phases"].items():
        lines.append(f"  {name:<24}{row['predicted_ms']:>14.3f}{row['measured_ms']:>14.3f}")
    return "\n".join(lines)
