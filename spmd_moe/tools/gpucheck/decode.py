"""``decode``: a decode step beside the memory-bandwidth floor ``spmd-moe plan`` prints for
the same config, at a device copy bandwidth measured in the step."""
from __future__ import annotations

import json
import os
import sys
import time

from .common import (H200_DATASHEET_GBPS, failure_line, first_lines, run_command, run_timeout,
                     write_json)


# The decode step measured on the GPU: the paper's model and one rank's 8 sequences of
# 10,000 tokens, cut to 2 layers (every expert on the one rank), device-drawn weights.
DECODE_CONFIG = {
    "gpu": ["--preset", "paper", "--set", "n_layers=2", "--set", "batch_size=8",
            "--set", "seq_len=10000", "--init", "device"],
    "cpu": ["--preset", "tiny"],
}


DECODE_NEW_TOKENS = {"gpu": 8, "cpu": 4}


def copy_bandwidth(mode: str) -> tuple[float, str]:
    """``(GB/s, how)``: bytes read plus bytes written per second of a large device-to-device
    copy (CuPy, 2 GiB, median of 10) on the GPU; of a NumPy copy of 256 MiB in --cpu mode."""
    import numpy as np

    if mode == "gpu":
        import cupy

        nbytes = 2 << 30
        src = cupy.empty(nbytes, dtype=np.uint8)
        src.fill(1)
        dst = cupy.empty_like(src)
        runtime = cupy.cuda.runtime
        stream = cupy.cuda.get_current_stream()
        times = []
        for i in range(13):
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes,
                                runtime.memcpyDeviceToDevice, stream.ptr)
            stop.record()
            stop.synchronize()
            if i >= 3:
                times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
        del src, dst
        cupy.get_default_memory_pool().free_all_blocks()
        return 2 * nbytes / float(np.median(times)) / 1e9, \
            "device-to-device copy of 2 GiB (CuPy), read + write, median of 10"
    nbytes = 256 << 20
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    times = []
    for _ in range(5):
        began = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - began)
    return 2 * nbytes / float(np.median(times)) / 1e9, \
        "host copy of 256 MiB (NumPy), read + write, median of 5"


def decode_floor(config_args: list[str], new_tokens: int, gbps: float) -> dict:
    """The decode-step bytes and floor of rank 0 for the config, world size 1: the numbers
    ``spmd-moe plan --workload decode`` prints (plan.format_plan), from the same function."""
    from ...commands.cli import build_parser, config_from_args
    from ...core.costs import decode_step_bytes
    from ...commands.plan import make_plan
    from ...core.topology import Grid

    args = build_parser().parse_args(["plan", *config_args, "--world-size", "1",
                                      "--workload", "decode", "--new-tokens",
                                      str(new_tokens)])
    config = config_from_args(args)
    layout, _ = make_plan(config, 1, args.layout or config.layout)
    context = config.workload.seq_len + config.workload.new_tokens
    step = decode_step_bytes(config, Grid(layout, config.model, 0), context)
    total = sum(step.values())
    return {"bytes": step, "total_gb": total / 1e9, "context": context,
            "floor_ms": total / (gbps * 1e9) * 1e3, "gbps": gbps,
            "floor_ms_at_h200_datasheet": total / (H200_DATASHEET_GBPS * 1e9) * 1e3}


def decode(work: str, out_json: str, backend: str, mode: str) -> int:
    """A decode run beside its bandwidth floor: the copy bandwidth, ``spmd-moe plan`` (its
    text, at that bandwidth), then ``spmd-moe run --workload decode``; decode.json."""
    config_args = DECODE_CONFIG[mode]
    new_tokens = DECODE_NEW_TOKENS[mode]
    workload = ["--workload", "decode", "--new-tokens", str(new_tokens)]
    result: dict = {"config": config_args + workload, "backend": backend, "ok": False}
    try:
        gbps, how = copy_bandwidth(mode)
    except Exception as exc:
        print(f"copy bandwidth: failed ({type(exc).__name__}: {first_lines(exc)})")
        write_json(out_json, {**result, "error": f"copy bandwidth: {first_lines(exc)}"})
        return 1
    result["copy_gbps"], result["copy_how"] = gbps, how
    print(f"copy bandwidth: {gbps:.0f} GB/s ({how})")
    memory = ["--device-memory", "141"] if mode == "gpu" else []
    status, output, _ = run_command([sys.executable, "-m", "spmd_moe", "plan", *config_args,
                                     *workload, "--world-size", "1", "--hbm-gbps",
                                     f"{gbps:.0f}", *memory])
    print(output)
    result["plan_output"] = output
    result["floor"] = decode_floor(config_args, new_tokens, gbps)
    report = os.path.join(work, "decode-report.json")
    status, output, seconds = run_command([sys.executable, "-m", "spmd_moe", "run",
                                           *config_args, *workload, "--backend", backend,
                                           "--report", report],
                                          timeout=2.5 * run_timeout())
    result["seconds"] = round(seconds, 1)
    if status != 0:
        result["error"] = failure_line(status, output)
        write_json(out_json, result)
        return 1
    print("\n".join(output.strip().splitlines()[-20:]))
    with open(report) as handle:
        run = json.load(handle)
    per_token = run["decode"]["per_token_ms"]
    result.update(ok=True, decode=run["decode"], per_token_ms=per_token,
                  ratio_to_floor=per_token["mean"] / result["floor"]["floor_ms"],
                  run_backend=run.get("backend"))
    print(f"decode step: {per_token['mean']:.3f} ms per token (p50 {per_token['p50']:.3f}) "
          f"against a floor of {result['floor']['floor_ms']:.3f} ms "
          f"({result['floor']['total_gb']:.2f} GB at {gbps:.0f} GB/s): "
          f"{result['ratio_to_floor']:.2f}x")
    write_json(out_json, result)
    return 0
