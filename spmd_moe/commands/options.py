"""What every command shares, below all of them: argument groups, the config the arguments
ask for, the workload plan and batch of the engine-running commands, rank-0 helpers, and the
way errors end a command.

``cli.py`` (``run``, ``plan``, ``info``, ``export``) and the commands in their own modules
(``bench``, ``compare``, ``generate``, ``plot``) import from here; nothing here imports a
command, so the commands form no import cycle.
"""
from __future__ import annotations

import argparse
import math
import traceback
from dataclasses import dataclass

import numpy as np

from ..core.config import PRESETS, RunConfig, build_run_config
from ..core.costs import GIB
from ..core.errors import (ConfigError, InputError, NumericalFault, SpmdMoeError, collective,
                           say)
from ..parallel.watchdog import DEFAULT_STALL_TIMEOUT, Watchdog



class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises (so that only rank 0 reports) instead of printing and exiting."""

    def error(self, message: str):
        raise ConfigError("arguments", f"{message} (see {self.prog} -h)")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and workload")
    group.add_argument("--model", metavar="DIR",
                       help="a Hugging Face model directory (config.json + safetensors): "
                            "Mixtral, Qwen3-MoE, OLMoE or an exported SPEC model "
                            "(docs/MODELS.md); instead of --preset/--config")
    group.add_argument("--preset", help=f"built-in config: {', '.join(PRESETS)} "
                                        "(default: tiny, or paper under --config)")
    group.add_argument("--config", help="JSON config file (SPEC names, or the paper's format)")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field (repeatable), e.g. --set n_layers=2")
    group.add_argument("--layout", help="ep=N[,pp=M] or tp=N[,pp=M] (default: ep = world size)")
    group.add_argument("--dtype", help="bfloat16 (default) or float32")
    group.add_argument("--seed", type=int, help="weight and input seed (default 0)")
    group.add_argument("--workload", choices=("prefill", "decode"), help="default prefill")
    group.add_argument("--new-tokens", type=int, help="tokens to generate per sequence (decode)")
    group.add_argument("--chunk-tokens", type=int, metavar="N",
                       help="prefill in micro-batches of at most N tokens per rank, chunks of "
                            "sequences packed (default: derived from the layout and batch; "
                            "run and plan print it)")
    group.add_argument("--micro-batches", type=int,
                       help="whole-sequence micro-batches per rank instead of chunks (and "
                            "for decode steps; default: one per stage)")
    overlap = group.add_mutually_exclusive_group()
    overlap.add_argument("--no-overlap", dest="overlap", action="store_const", const="off",
                         help="one micro-batch at a time: no exchange runs under another "
                              "micro-batch's compute (default: two in flight where it pays)")
    overlap.add_argument("--overlap", dest="overlap", action="store_const", const="on",
                         help="two micro-batches in flight wherever a stage has several ranks "
                              "and two micro-batches, even where the default judges it does "
                              "not pay (deep pipelines; NumPy pipelines)")
    group.add_argument("--init", choices=("host", "device"),
                       help="weights: SPEC generator on the host (default) or fast device RNG "
                            "(different weights)")


def add_execution_arguments(parser: argparse.ArgumentParser):
    """Options of the commands that run the engine (run, compare); returns the group."""
    io = parser.add_argument_group("inputs, outputs and execution")
    io.add_argument("--input", help=".npz with ids [B,S] and optional mask [B,S]")
    io.add_argument("--report", help="JSON report to write (rank 0)")
    io.add_argument("--trace", metavar="FILE.json",
                    help="a Chrome trace-event timeline of every rank (open it in Perfetto "
                         "or chrome://tracing; docs/PERFORMANCE.md)")
    io.add_argument("--warmup", type=int, default=0, help="untimed iterations (default 0)")
    io.add_argument("--iters", type=int, default=1, help="timed iterations (default 1)")
    io.add_argument("--backend", default="auto", help="auto | cupy | numpy")
    io.add_argument("--transport", default="auto", help="auto | mpi-cuda | mpi-host | nccl")
    io.add_argument("--memory-limit", type=float, metavar="GIB",
                    help="memory per rank for the pre-allocation check (default: free memory)")
    io.add_argument("--quiet", action="store_true",
                    help="no progress on stderr (default: a bar on a terminal, else a line "
                         "every few seconds, for steps that take more than 2 s)")
    add_stall_timeout(io)
    return io


def add_stall_timeout(group) -> None:
    """``--stall-timeout`` (run, compare, generate: the commands whose waits are marked)."""
    group.add_argument("--stall-timeout", type=float, default=DEFAULT_STALL_TIMEOUT,
                       metavar="SECONDS",
                       help="abort the job, naming the ranks that did not arrive, when a "
                            f"rank waits longer than this for the others (default "
                            f"{DEFAULT_STALL_TIMEOUT:g}; 0: off)")


# Options naming files a command reads (an output may never be one of them).
INPUT_OPTIONS = ("input", "config", "prompts", "cluster", "calibration", "against")


def command_inputs(args) -> tuple[tuple[str, str], ...]:
    """``(path, option)`` of every file the command's arguments make it read: the options
    of INPUT_OPTIONS, and the files of a ``--model`` directory (checkpoint.model_files)."""
    found = [(getattr(args, name), "--" + name) for name in INPUT_OPTIONS
             if isinstance(getattr(args, name, None), str)]
    if getattr(args, "model", None):
        from ..model.checkpoint import model_files

        found += [(path, "--model") for path in model_files(args.model)]
    return tuple(found)


def check_execution_arguments(args) -> None:
    """The range checks of add_execution_arguments' numbers (raises SpmdMoeError)."""
    if args.warmup < 0:
        raise ConfigError("--warmup", f"{args.warmup} must be >= 0")
    if args.iters < 1:
        raise ConfigError("--iters", f"{args.iters} must be >= 1")
    if getattr(args, "progress", False) and args.quiet:
        raise ConfigError("--progress", "a line per iteration cannot be combined with "
                                        "--quiet")
    check_memory_limit(args)


def positive_finite(value: float, flag: str, unit: str) -> float:
    """``value`` if it is a finite number > 0, else a ConfigError naming ``flag`` (the
    limits and rates of every command: memory, bandwidth, shard size, ...)."""
    if not 0 < value < math.inf:
        raise ConfigError(flag, f"{value} must be a finite number of {unit} > 0")
    return value


def check_memory_limit(args) -> None:
    if args.memory_limit is not None:
        positive_finite(args.memory_limit, "--memory-limit", "GiB")


def memory_limit_bytes(args) -> int | None:
    return int(args.memory_limit * GIB) if args.memory_limit else None


# Config fields a flag sets: an error in the field names the flag when the flag was given.
FLAG_OF_FIELD = {"new_tokens": "--new-tokens", "chunk_tokens": "--chunk-tokens",
                 "micro_batches": "--micro-batches", "seed": "--seed", "dtype": "--dtype",
                 "workload": "--workload", "layout": "--layout", "init": "--init"}


def flag_named(exc: ConfigError, args) -> ConfigError:
    """``exc`` naming the flag that set its field (``--new-tokens``, not ``new_tokens``)."""
    flag = FLAG_OF_FIELD.get(exc.field)
    if flag is None or getattr(args, flag[2:].replace("-", "_"), None) is None:
        return exc
    return ConfigError(flag, exc.message)


def config_from_args(args, **input_shape) -> RunConfig:
    """The config the arguments ask for (a preset or config file, or a checkpoint's
    config.json under ``--model``); ``input_shape`` (``batch_size``, ``seq_len``) is an input
    file's, which wins over every other source. An error in a field a flag set names the
    flag."""
    try:
        return _config_from_args(args, **input_shape)
    except ConfigError as exc:
        raise flag_named(exc, args) from None


def _config_from_args(args, **input_shape) -> RunConfig:
    overrides = dict(dtype=args.dtype, seed=args.seed, workload=args.workload,
                     new_tokens=args.new_tokens, micro_batches=args.micro_batches,
                     chunk_tokens=args.chunk_tokens, overlap=args.overlap, init=args.init,
                     layout=getattr(args, "layout", None), **input_shape)
    if getattr(args, "model", None):
        from ..model.checkpoint import checkpoint_run_config

        for flag, value in (("--preset", args.preset), ("--config", args.config)):
            if value:
                raise ConfigError(flag, "cannot be combined with --model (the model is the "
                                        "checkpoint's; --set sets the workload)")
        config = checkpoint_run_config(args.model, args.set, **overrides)
    else:
        config = build_run_config(args.preset, args.config, args.set, **overrides)
    if args.new_tokens is not None and config.workload.workload != "decode":
        raise ConfigError("--new-tokens", "generates tokens only with --workload decode "
                                          f"(the workload is {config.workload.workload})")
    return config


def start_watchdog(args):
    """Every rank's guard against signals and stalls (see watchdog.py), started before
    any other MPI call; ``--stall-timeout`` for the commands that have it, else signals
    only."""
    timeout = getattr(args, "stall_timeout", 0.0)
    if not 0 <= timeout < math.inf:
        raise ConfigError("--stall-timeout", f"{timeout} must be a finite number of seconds "
                                             ">= 0 (0: off)")
    from mpi4py import MPI

    from ..parallel.watchdog import Watchdog

    return Watchdog(MPI.COMM_WORLD, timeout)


def report_error(exc: SpmdMoeError, uses_mpi: bool) -> int:
    """One line on rank 0; every rank returns 2."""
    rank = 0
    if uses_mpi:
        from mpi4py import MPI

        rank = MPI.COMM_WORLD.Get_rank()
    if rank == 0:
        say(f"spmd-moe: error: {exc}")
    return 2


def abort_job(watchdog, fault: NumericalFault | None = None) -> int:
    """A fault: this rank's traceback (a NumericalFault: its one line), then the whole job
    down (exit 1)."""
    from ..parallel.watchdog import abort

    world = watchdog.world if watchdog is not None else None
    rank = world.Get_rank() if world is not None else 0
    if fault is not None:
        abort(world, 1, f"spmd-moe: error: rank {rank}: {fault}")
    abort(world, 1, f"spmd-moe: rank {rank} failed:\n{traceback.format_exc()}")
    return 1


def end_interrupted(exc: BaseException, watchdog, uses_mpi: bool) -> int:
    """A KeyboardInterrupt or SystemExit on the main thread: one line saying why, then the
    whole job down (128 + SIGINT for an interrupt, the exit status for an exit)."""
    from ..parallel.watchdog import abort

    world = watchdog.world if watchdog is not None else None
    rank = world.Get_rank() if world is not None else 0
    where = ""
    if watchdog is not None:
        phase, layer = watchdog.raised_at or watchdog.where()[:2]
        where = f" (in {phase}" + (f" at layer {layer}" if layer >= 0 else "") + ")"
    if isinstance(exc, KeyboardInterrupt):
        code, what = 128 + 2, f"interrupted: rank {rank} got KeyboardInterrupt{where}"
    else:
        status = exc.code if isinstance(exc, SystemExit) else None
        code = status if isinstance(status, int) and 0 < status < 256 else 1
        what = f"rank {rank} exited ({type(exc).__name__} {status}){where}"
    message = f"spmd-moe: error: {what}; ending the job"
    if not uses_mpi:
        say(message)
        return code
    abort(world, code, message)
    return code


@dataclass
class Workload:
    """What an engine-running command will run, known before its batch exists: the checked
    config (an ``--input`` file sets batch size and sequence length) and every sequence's
    real length; the input file (rank 0) with its headers and mask read, its ids not yet."""

    config: RunConfig
    lengths: np.ndarray          # int64 [B]
    input_path: str | None       # --input
    input_file: object | None    # its data.InputFile on rank 0, else None

    @property
    def new_tokens(self) -> int:
        work = self.config.workload
        return work.new_tokens if work.workload == "decode" else 0


def check_batch_size(comm, batch_size: int, seq_len: int, memory_limit: int | None,
                     field: str) -> None:
    """Collective: refuse, before any [B, S] array exists, a batch whose host copies do
    not fit in a rank's share of the host memory (or ``--memory-limit``)."""
    from mpi4py import MPI

    from ..model.inputs import batch_host_bytes
    from ..backend.host import host_memory

    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    node_size = node.Get_size()
    node.Free()

    def check() -> None:
        need = batch_host_bytes(batch_size, seq_len)
        limit, source = ((memory_limit, "--memory-limit") if memory_limit is not None
                         else host_memory(node_size))
        if need > limit:
            raise ConfigError(field, f"{batch_size} sequences x {seq_len} tokens need "
                                     f"{need / GIB:.2f} GiB of host memory per rank (ids and "
                                     f"mask, and their copies while built and shared) but a "
                                     f"rank has {limit / GIB:.2f} GiB ({source})")

    collective(comm, check)


def plan_workload(comm, args, extra_check=None) -> Workload:
    """Collective: check the arguments and output paths, then read what the run needs to
    be checked (an input file's headers and mask), then build the config of the workload
    the run will actually have. No [B, S] array is built before its size is checked; the
    ids are read by :func:`load_batch` once the run's memory check has passed.
    ``extra_check(args)`` may add the command's own checks (raising SpmdMoeError)."""
    from ..core.files import check_output_paths

    rank = comm.Get_rank()

    def checked_arguments() -> None:
        if extra_check is not None:
            extra_check(args)
        check_execution_arguments(args)
        if rank == 0:
            check_output_paths((getattr(args, "output", None), "--output"),
                               (args.report, "--report"), (args.trace, "--trace"),
                               inputs=command_inputs(args))

    watchdog = args.watchdog or Watchdog(None, 0)
    with watchdog.waiting("set-up"):
        return _plan_workload(comm, args, checked_arguments, watchdog)


def progress_reporter(comm, args):
    """Rank 0's progress.Reporter for ``--quiet`` / ``--progress`` (a line per iteration) /
    neither (a bar on a terminal, rate-limited lines otherwise); silent on other ranks."""
    from ..core.progress import Reporter, choose_mode

    return Reporter(choose_mode(args.quiet, getattr(args, "progress", False),
                                rank=comm.Get_rank()))


def start_trace(comm, args):
    """Collective: a trace.Tracer with the ranks' clocks aligned when ``--trace`` is given
    (else None)."""
    if not getattr(args, "trace", None):
        return None
    from ..core.trace import Tracer

    tracer = Tracer(comm)
    watchdog = args.watchdog or Watchdog(None, 0)
    with watchdog.waiting("aligning trace clocks"):
        tracer.align()
    return tracer


def gather_trace(comm, args, tracer) -> str | None:
    """Collective: the trace's JSON on rank 0 (None elsewhere, or without a tracer)."""
    if tracer is None:
        return None
    watchdog = args.watchdog or Watchdog(None, 0)
    with watchdog.waiting("gather trace"):
        return tracer.gather()


def on_rank_0(comm, watchdog, what: str, fn):
    """Collective: ``fn()`` on rank 0 (computing ``what``, for the watchdog, while the
    others wait), its SpmdMoeError raised on every rank; its value on rank 0, else None."""
    def run():
        if comm.Get_rank() != 0:
            return None
        with watchdog.phase(what):
            return fn()

    return collective(comm, run)


def _plan_workload(comm, args, checked_arguments, watchdog) -> Workload:
    from ..model.inputs import InputFile, synthetic_lengths

    rank = comm.Get_rank()
    collective(comm, checked_arguments)
    limit = memory_limit_bytes(args)
    if not args.input:
        config = collective(comm, config_from_args, args)
        work = config.workload
        check_batch_size(comm, work.batch_size, work.seq_len, limit, "batch_size")
        return Workload(config, synthetic_lengths(work, config.seed), None, None)

    source = on_rank_0(comm, watchdog, "reading input", lambda: InputFile(args.input))
    shape = comm.bcast(source.shape if rank == 0 else None, root=0)
    check_batch_size(comm, *shape, limit, "--input")
    lengths = comm.bcast(on_rank_0(comm, watchdog, "reading input", lambda: source.lengths()),
                         root=0)

    def input_config() -> RunConfig:
        try:
            return config_from_args(args, batch_size=len(lengths),
                                    seq_len=int(lengths.max()))
        except ConfigError as exc:
            if exc.field not in ("seq_len", "new_tokens", "--new-tokens"):
                raise
            # The prompt alone too long is the input's fault, else the new tokens'.
            field = "--input" if exc.field == "seq_len" else exc.field
            longest = int(np.argmax(lengths))
            raise InputError(field, f"{args.input}: sequence {longest}'s "
                                    f"{exc.message}") from None

    return Workload(collective(comm, input_config), lengths, args.input, source)


def load_batch(comm, workload: Workload, watchdog=None):
    """Collective: the batch on every rank, the input file's ids read and checked on rank 0
    and broadcast, or the synthetic batch of SPEC §1 built everywhere."""
    watchdog = watchdog or Watchdog(None, 0)
    with watchdog.waiting("input"):
        return _load_batch(comm, workload, watchdog)


def _load_batch(comm, workload: Workload, watchdog):
    from ..model.inputs import synthetic_input

    config = workload.config
    if workload.input_path is None:
        with watchdog.phase("building input"):
            return synthetic_input(config.workload, config.model, config.seed)
    source = workload.input_file
    batch = on_rank_0(comm, watchdog, "reading input",
                      lambda: source.batch(config.model, workload.new_tokens))
    if source is not None:
        source.close()
    return comm.bcast(batch, root=0)

