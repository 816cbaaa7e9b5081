"""``summary``: the stage table and the numbers of a gpu-check run, as the section to paste
into docs/PERFORMANCE.md (``summary.md``)."""
from __future__ import annotations

import json
import os
import re
import time

from .common import H200_DATASHEET_GBPS


def _load(out: str, name: str):
    try:
        with open(os.path.join(out, name)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def pytest_outcome(log_path: str) -> dict:
    """Counts from pytest's last line and the FAILED/ERROR lines of ``-rfE``."""
    try:
        with open(log_path) as handle:
            lines = [line.rstrip() for line in handle if line.strip()]
    except OSError:
        return {"ran": False}
    counts = {}
    for line in reversed(lines):
        found = re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)",
                           line)
        if found:
            counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n)
                      for n, kind in found}
            break
    failures = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return {"ran": True, "counts": counts, "failures": failures,
            "last": lines[-1] if lines else ""}


def _ms(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def _ratio(value) -> str:
    return f"{value:.2f}x" if isinstance(value, (int, float)) else "n/a"


def summary_markdown(out: str, stages: list[tuple[str, str, str]], facts_record: dict,
                     seconds: str, mode: str, command: str, date: str) -> str:
    """The section for docs/PERFORMANCE.md, from the files under ``out``."""
    device = facts_record.get("device_name") or "unknown GPU"
    title = (f"## Measured on the {device.replace('NVIDIA ', '')} ({date})" if mode == "gpu"
             else f"## bin/gpu-check --cpu rehearsal ({date}): NumPy backend, not a GPU "
                  "measurement")
    software = [f"Python {facts_record['python']}" if facts_record.get("python") else None,
                f"NumPy {facts_record['numpy']}" if facts_record.get("numpy") else None,
                facts_record.get("mpi"),
                f"NVRTC {facts_record['nvrtc']}" if facts_record.get("nvrtc") else None,
                facts_record.get("nccl"), facts_record.get("cublas"),
                facts_record.get("torch (peer only)")]
    where = (facts_record.get("cupy") or device) if mode == "gpu" else \
        f"CPU (--cpu), {facts_record.get('platform', 'platform unknown')}"
    lines = [title, "",
             f"Command: `{command}`, {seconds} s in all. Device: {where}.",
             "Software: " + ("; ".join(item for item in software if item) or "unknown")
             + ".",
             f"Fused kernels: {facts_record.get('kernels', '?')}. Matmul: "
             f"{facts_record.get('matmul_path', '?')}. MPI CUDA-aware: "
             f"{facts_record.get('mpi_cuda_aware', '?')}.", "",
             "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {status} | {used} |" for name, status, used in stages]

    tests = pytest_outcome(os.path.join(out, "pytest-gpu.log"))
    lines += ["", "### GPU tests (`python -m pytest -m gpu tests`)", ""]
    if tests["ran"]:
        counts = tests["counts"]
        lines.append(", ".join(f"{n} {kind}" for kind, n in counts.items()) or tests["last"])
        lines += [f"- {line}" for line in tests["failures"][:30]]
    else:
        lines.append("not run")

    compare_result = _load(out, "compare.json")
    lines += ["", "### CuPy against NumPy (`spmd-moe run`, relative Frobenius error)", ""]
    if compare_result:
        lines += ["| preset | dtype | ranks | hidden | logits | expert counts | result |",
                  "|---|---|---|---|---|---|---|"]
        for r in compare_result["cases"]:
            if "hidden_rel_err" in r:
                counts = ("identical" if r["expert_counts_identical"]
                          else f"{r['expert_counts_differing']} differ")
                lines.append(f"| {r['preset']} | {r['dtype']} | {r['ranks']} | "
                             f"{r['hidden_rel_err']:.2e} | {r['logits_rel_err']:.2e} | {counts} "
                             f"| {'ok' if r['ok'] else 'FAIL'} (tolerance {r['tolerance']:g}) |")
            else:
                lines.append(f"| {r['preset']} | {r['dtype']} | {r['ranks']} | - | - | - | "
                             f"FAIL: {r['error']} |")
    else:
        lines.append("not run")

    bench_result = _load(out, "bench.json")
    lines += ["", "### Layer step, one rank's share at paper shapes (`spmd-moe bench`)", ""]
    if bench_result:
        lines += _bench_lines(bench_result)
    else:
        lines.append("not run")

    transport_result = _load(out, "transport.json")
    lines += ["", "### Dispatch + combine against a raw Alltoallv of the same bytes", ""]
    if transport_result:
        lines += ["| ranks | transport | tokens per rank | dispatch + combine ms | raw "
                  "Alltoallv x2 ms | ratio (SPEC: <= 1.2x) | rows intact |",
                  "|---|---|---|---|---|---|---|"]
        for ranks, r in transport_result.items():
            if r.get("ok"):
                lines.append(f"| {ranks} | {r['transport']['name']} | "
                             f"{r['shape']['tokens_per_rank']} | "
                             f"{_ms(r['dispatch_combine_ms']['mean'])} | "
                             f"{_ms(r['raw_alltoallv_ms']['mean'])} | {_ratio(r['ratio'])} | "
                             f"{'yes' if r['roundtrip_ok'] else 'NO'} |")
            else:
                lines.append(f"| {ranks} | - | - | - | - | - | FAIL: {r.get('error')} |")
        lines.append("")
        lines.append("Ranks share one GPU over mpi-host (pinned host staging): this measures "
                     "the staging and the host MPI, not a network.")
    else:
        lines.append("not run")

    decode_result = _load(out, "decode.json")
    lines += ["", "### Decode step against the memory-bandwidth floor", ""]
    if decode_result and decode_result.get("ok"):
        floor = decode_result["floor"]
        per_token = decode_result["per_token_ms"]
        lines += [f"`spmd-moe run {' '.join(decode_result['config'])}` at 1 rank: "
                  f"{_ms(per_token['mean'])} ms per token (p50 {_ms(per_token['p50'])}, p99 "
                  f"{_ms(per_token['p99'])}), time to first token "
                  f"{_ms(decode_result['decode']['ttft_ms'])} ms.",
                  f"Floor (`spmd-moe plan`, same config): {floor['total_gb']:.2f} GB per step ("
                  + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in floor["bytes"].items())
                  + f") at the measured {floor['gbps']:.0f} GB/s ({decode_result['copy_how']}) "
                  f"= {_ms(floor['floor_ms'])} ms; measured / floor = "
                  f"**{_ratio(decode_result['ratio_to_floor'])}** (at the "
                  f"{H200_DATASHEET_GBPS:.0f} GB/s datasheet: "
                  f"{_ms(floor['floor_ms_at_h200_datasheet'])} ms)."]
    elif decode_result:
        lines.append(f"FAIL: {decode_result.get('error')}")
    else:
        lines.append("not run")
    return "\n".join(lines) + "\n"


def _bench_lines(bench_result: dict) -> list[str]:
    shape = bench_result["shape"]
    peer = bench_result.get("peer", {})
    peer_ms = {k: v["mean"] for k, v in peer.get("phases_ms", {}).items()}
    lines = [f"{shape['seqs']} x {shape['seq_len']} tokens, d {shape['d_model']}, "
             f"{shape['heads']} heads, F {shape['d_ff']}, {shape['expert_rows']} expert rows, "
             f"{shape['dtype']}; {bench_result['iterations']} timed iterations after "
             f"{bench_result['warmup']} warm-up; peak {bench_result['peak']['tflops']:.4g} "
             f"TFLOP/s ({bench_result['peak']['source']}).", "",
             "| phase | ms | TFLOP/s | MFU |", "|---|---|---|---|"]
    rows = [(p, st) for p, st in bench_result["phases_ms"].items()] + [
        ("step", bench_result["step_ms"])]
    if "attention_core_ms" in bench_result:
        rows.append(("attention core (alone)", bench_result["attention_core_ms"]))
    for name, st in rows:
        key = "attention_core" if name.startswith("attention core") else name
        tflops = bench_result["tflops"].get(key)
        mfu = bench_result["mfu"].get(key)
        lines.append(f"| {name} | {_ms(st['mean'])} | "
                     + (f"{tflops:.4g} | {mfu * 100:.1f}% |" if tflops is not None else "- | - |"))
    tiles = bench_result.get("attention_tiles", {})
    lines.append("")
    if tiles.get("available"):
        lines.append("Attention core by tile height, same inputs: " + ", ".join(
            f"{rows} queries {_ms(st['mean'])} ms ({tiles['tflops'][rows]:.4g} TFLOP/s)"
            for rows, st in tiles["ms"].items())
            + f"; the schedule picks {tiles['chosen']}; outputs "
            + ("identical." if tiles["outputs_identical"]
               else f"differ (relative {tiles['outputs_max_rel_diff']:.2g})."))
    elif tiles:
        lines.append(f"Attention tile heights: not timed ({tiles.get('reason')}).")
    if peer.get("available"):
        lines.append(f"PyTorch {peer['torch']} in the same run (ms): " + ", ".join(
            f"{k} {_ms(v)}" for k, v in peer_ms.items())
            + ("; failed: " + "; ".join(f"{k}: {v}" for k, v in peer["errors"].items())
               if peer.get("errors") else "") + ".")
    else:
        lines.append(f"PyTorch peer: not run ({peer.get('reason')}).")
    lines += ["", "| SPEC §7 target | ours ms | reference | reference ms | ratio | required | aim "
              "| status |", "|---|---|---|---|---|---|---|---|"]
    for row in bench_result.get("targets", []):
        required = f"<= {row['required']:.2f}x" if row["required"] is not None else "-"
        lines.append(f"| {row['name']} | {_ms(row['ours_ms'])} | {row['reference']} | "
                     f"{_ms(row['reference_ms'])} | {_ratio(row.get('ratio'))} | {required} | "
                     f"<= {row['aim']:.2f}x | {row['status']} |")
    return lines


def summary(out: str, stages_path: str, facts_json: str, seconds: str, mode: str) -> int:
    """Write summary.md under ``out`` and print it."""
    stages = []
    with open(stages_path) as handle:
        for line in handle.read().splitlines():
            if line:
                name, status, used = line.split("|")
                stages.append((name, status, used))
    record = _load(os.path.dirname(facts_json) or ".", os.path.basename(facts_json)) or {}
    command = os.environ.get("GPU_CHECK_COMMAND", "bin/gpu-check")
    text = summary_markdown(out, stages, record, seconds, mode, command,
                            time.strftime("%Y-%m-%d", time.gmtime()))
    with open(os.path.join(out, "summary.md"), "w") as handle:
        handle.write(text)
    print(text)
    return 0
