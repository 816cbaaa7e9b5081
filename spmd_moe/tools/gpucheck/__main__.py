"""``python -m spmd_moe.tools.gpucheck STEP [args]``: run one step of bin/gpu-check.

Every step reports what it found and ends with an exit status; none lets an exception
through (a failure is one line, exit 1; 3 for the preflight).
"""
from __future__ import annotations

import signal
import sys

from .common import first_lines, stop_children
from .decode import decode
from .facts import compile_kernels, facts
from .preflight import preflight
from .runs import compare, transport
from .summary import summary


# --- entry point -----------------------------------------------------------------------------

STEPS = {
    "preflight": (preflight, 1),
    "compile": (compile_kernels, 1),
    "facts": (facts, 2),
    "compare": (compare, 3),
    "transport": (transport, 4),
    "decode": (decode, 4),
    "summary": (summary, 5),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in STEPS or len(argv) - 1 != STEPS[argv[0]][1]:
        print(f"usage: python -m spmd_moe.tools.gpucheck {{{'|'.join(STEPS)}}} ARGS "
              "(run by bin/gpu-check)", file=sys.stderr)
        return 2
    step, _ = STEPS[argv[0]]
    signal.signal(signal.SIGTERM, stop_children)
    try:
        return step(*argv[1:])
    except Exception as exc:       # the boundary: one line, never a traceback
        print(f"gpu-check: {argv[0]} failed: {type(exc).__name__}: {first_lines(exc, 3)}",
              flush=True)
        return 3 if argv[0] == "preflight" else 1


if __name__ == "__main__":
    sys.exit(main())
