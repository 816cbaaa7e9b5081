"""Runs under the launcher: ``compare`` (``spmd-moe run`` on the backend under test at 1
and 2 ranks against a NumPy run, by relative error) and ``transport`` (``spmd-moe bench
--transport-only`` at 2 and 4 ranks: dispatch + combine against a raw Alltoallv)."""
from __future__ import annotations

import json
import os
import sys

from .common import failure_line, ranks_command, run_command, write_json


CASES = [("tiny", "bfloat16"), ("tiny", "float32"), ("small", "bfloat16")]


def compare(work: str, out_json: str, backend: str) -> int:
    """spmd-moe run on ``backend`` at 1 then 2 ranks (mpi-host) against a NumPy run per
    case. compare.json is rewritten after every run, so a stage cut short keeps what it
    measured; the 2-rank runs come last, so a launcher problem cannot hide the 1-rank
    results."""
    import numpy as np

    from ...engine.testing import TOLERANCE, relative_error

    results: list[dict] = []
    reference: dict = {}

    def run(tag, ranks, preset, dtype, backend_name, transport):
        path = os.path.join(work, f"{tag}.npz")
        cmd = ranks_command(ranks, [sys.executable, "-m", "spmd_moe", "run", "--preset",
                                    preset, "--dtype", dtype, "--backend", backend_name,
                                    "--transport", transport, "--output", path])
        if isinstance(cmd, str):
            return None, cmd, 0.0
        status, output, seconds = run_command(cmd)
        if status != 0:
            return None, failure_line(status, output), seconds
        return dict(np.load(path)), "", seconds

    def save():
        ok = len(results) == 2 * len(CASES) and all(r["ok"] for r in results)
        write_json(out_json, {"backend": backend, "against": "numpy", "cases": results,
                               "ok": ok})
        return ok

    for ranks in (1, 2):
        for preset, dtype in CASES:
            row = {"preset": preset, "dtype": dtype, "ranks": ranks, "backend": backend,
                   "transport": "mpi-host"}
            if (preset, dtype) not in reference:
                reference[preset, dtype] = run(f"{preset}-{dtype}-numpy", 1, preset, dtype,
                                               "numpy", "auto")
            want, why, _ = reference[preset, dtype]
            got, error, seconds = run(f"{preset}-{dtype}-{backend}-{ranks}", ranks, preset,
                                      dtype, backend, "mpi-host")
            row["seconds"] = round(seconds, 1)
            problems = ([f"numpy run: {why}"] if want is None else []) + (
                [error] if got is None else [])
            if problems:
                row.update(ok=False, error="; ".join(problems))
            else:
                tolerance = TOLERANCE[dtype]
                for key in ("hidden", "logits"):
                    row[f"{key}_rel_err"] = relative_error(got[key], want[key])
                same = bool(np.array_equal(got["expert_counts"], want["expert_counts"]))
                row.update(expert_counts_identical=same, tolerance=tolerance,
                           expert_counts_differing=int(np.count_nonzero(
                               got["expert_counts"] != want["expert_counts"])))
                # bf16 near-ties may route a token differently; float32 must not.
                row["ok"] = bool(row["hidden_rel_err"] <= tolerance
                                 and row["logits_rel_err"] <= tolerance
                                 and (same or dtype != "float32")
                                 and got["expert_counts"].sum() == want["expert_counts"].sum())
            results.append(row)
            save()
    ok = save()
    print(format_compare(results))
    return 0 if ok else 1


def format_compare(results: list[dict]) -> str:
    lines = [f"{'preset':<7}{'dtype':<10}{'ranks':>6}{'hidden err':>12}{'logits err':>12}"
             f"{'counts':>10}  result"]
    for r in results:
        if "hidden_rel_err" in r:
            counts = ("same" if r["expert_counts_identical"]
                      else f"{r['expert_counts_differing']} diff")
            lines.append(f"{r['preset']:<7}{r['dtype']:<10}{r['ranks']:>6}"
                         f"{r['hidden_rel_err']:>12.2e}{r['logits_rel_err']:>12.2e}"
                         f"{counts:>10}  {'ok' if r['ok'] else 'FAIL'}")
        else:
            lines.append(f"{r['preset']:<7}{r['dtype']:<10}{r['ranks']:>6}  FAIL: {r['error']}")
    return "\n".join(lines)


TRANSPORT_SIZES = {"gpu": ["--seqs", "1", "--seq-len", "8192"],
                   "cpu": ["--seqs", "2", "--seq-len", "64", "--d-model", "64",
                           "--experts", "4"]}


def transport(work: str, out_json: str, backend: str, mode: str) -> int:
    """``spmd-moe bench --transport-only`` over mpi-host at 2 and 4 ranks; transport.json
    holds both results (rewritten after each)."""
    results: dict = {}
    ok = True
    for ranks in (2, 4):
        path = os.path.join(work, f"transport-{ranks}.json")
        cmd = ranks_command(ranks, [sys.executable, "-m", "spmd_moe", "bench",
                                    "--transport-only", "--backend", backend, "--transport",
                                    "mpi-host", *TRANSPORT_SIZES[mode], "--iters", "3",
                                    "--warmup", "1", "--quiet", "--json", path])
        if isinstance(cmd, str):
            results[str(ranks)] = {"ok": False, "error": cmd}
        else:
            status, output, _ = run_command(cmd)
            if status == 0:
                with open(path) as handle:
                    results[str(ranks)] = {"ok": True, **json.load(handle)}
                print("\n".join(output.strip().splitlines()[-8:]))
            else:
                results[str(ranks)] = {"ok": False, "error": failure_line(status, output)}
        ok = ok and results[str(ranks)]["ok"] and results[str(ranks)].get("roundtrip_ok", False)
        write_json(out_json, results)
    return 0 if ok else 1
