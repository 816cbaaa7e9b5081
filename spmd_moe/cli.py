"""``spmd-moe run | plan | info | bench | compare``: parse, build, call the engine, report.

Errors a user can cause print one line on rank 0 (``spmd-moe: error: FIELD: ...``) and
every rank exits 2, with no output file. Anything else is a fault: the failing rank prints
its traceback and aborts the whole MPI job (exit 1), so no rank hangs in a collective.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import replace

from . import bench, compare, perfmodel
from .config import PRESETS, RunConfig, build_run_config
from .errors import ConfigError, SpmdMoeError, collective

GIB = 1 << 30
MPI_COMMANDS = ("run", "info", "bench", "compare")   # the commands that run under mpiexec


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises (so that only rank 0 reports) instead of printing and exiting."""

    def error(self, message: str):
        raise ConfigError("arguments", f"{message} (see spmd-moe {self.prog.split()[-1]} -h)")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and workload")
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
    io.add_argument("--warmup", type=int, default=0, help="untimed iterations (default 0)")
    io.add_argument("--iters", type=int, default=1, help="timed iterations (default 1)")
    io.add_argument("--backend", default="auto", help="auto | cupy | numpy")
    io.add_argument("--transport", default="auto", help="auto | mpi-cuda | mpi-host | nccl")
    io.add_argument("--memory-limit", type=float, metavar="GIB",
                    help="memory per rank for the pre-allocation check (default: free memory)")
    return io


def check_execution_arguments(args) -> None:
    """The range checks of add_execution_arguments' numbers (raises SpmdMoeError)."""
    if args.warmup < 0:
        raise ConfigError("--warmup", f"{args.warmup} must be >= 0")
    if args.iters < 1:
        raise ConfigError("--iters", f"{args.iters} must be >= 1")
    if args.memory_limit is not None and args.memory_limit <= 0:
        raise ConfigError("--memory-limit", f"{args.memory_limit} must be > 0 GiB")


def memory_limit_bytes(args) -> int | None:
    return int(args.memory_limit * GIB) if args.memory_limit else None


def config_from_args(args) -> RunConfig:
    return build_run_config(args.preset, args.config, args.set, dtype=args.dtype,
                            seed=args.seed, workload=args.workload, new_tokens=args.new_tokens,
                            micro_batches=args.micro_batches, chunk_tokens=args.chunk_tokens,
                            overlap=args.overlap, init=args.init,
                            layout=getattr(args, "layout", None))


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="spmd-moe", description="Expert-parallel MoE inference "
                            "as an MPI SPMD program.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    run = commands.add_parser("run", help="run prefill or decode under mpiexec (or alone)")
    add_config_arguments(run)
    io = add_execution_arguments(run)
    io.add_argument("--output", help=".npz to write (rank 0): hidden, logits, expert_counts"
                                     "[, tokens]")
    io.add_argument("--progress", action="store_true", help="a line per timed iteration")
    run.set_defaults(func=cmd_run)

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
    perfmodel.add_arguments(plan)

    bench.add_parser(commands)
    compare.add_parser(commands)

    info = commands.add_parser("info", help="MPI library, CUDA-awareness, GPUs, backend, "
                                            "transport")
    info.add_argument("--backend", default="auto")
    info.add_argument("--transport", default="auto")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except ConfigError as exc:
        return report_error(exc, uses_mpi=bool(argv) and argv[0] in MPI_COMMANDS)
    except SystemExit as exc:  # -h / --help
        return int(exc.code or 0)
    try:
        return args.func(args)
    except SpmdMoeError as exc:
        return report_error(exc, uses_mpi=args.command in MPI_COMMANDS)
    except Exception:
        return abort_job(uses_mpi=args.command in MPI_COMMANDS)


def report_error(exc: SpmdMoeError, uses_mpi: bool) -> int:
    """One line on rank 0; every rank returns 2."""
    rank = 0
    if uses_mpi:
        from mpi4py import MPI

        rank = MPI.COMM_WORLD.Get_rank()
    if rank == 0:
        print(f"spmd-moe: error: {exc}", file=sys.stderr, flush=True)
    return 2


def abort_job(uses_mpi: bool) -> int:
    """A fault: this rank's traceback, then the whole job down."""
    rank, size = 0, 1
    if uses_mpi:
        from mpi4py import MPI

        rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    print(f"spmd-moe: rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr,
          flush=True)
    if size > 1:
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(1)
    return 1


# --- run -------------------------------------------------------------------------------

def shared_batch(comm, config: RunConfig, input_path: str | None):
    """The batch on every rank: the input file read and checked on rank 0 and broadcast,
    or the synthetic batch of SPEC §1 built everywhere."""
    from .data import load_input, synthetic_input

    workload = config.workload
    new_tokens = workload.new_tokens if workload.workload == "decode" else 0
    if input_path is None:
        return synthetic_input(workload, config.model, config.seed)
    batch = collective(comm, lambda: load_input(input_path, config.model, new_tokens)
                       if comm.Get_rank() == 0 else None)
    return comm.bcast(batch, root=0)


def config_and_batch(comm, args, extra_check=None):
    """Collective: the checked config of an engine-running command and its batch (an
    ``--input`` file sets batch size and sequence length). ``extra_check(args)`` may add
    the command's own checks (raising SpmdMoeError)."""
    from .data import check_output_path

    def checked_config() -> RunConfig:
        if extra_check is not None:
            extra_check(args)
        config = config_from_args(args)
        check_execution_arguments(args)
        if comm.Get_rank() == 0:
            for path, name in ((getattr(args, "output", None), "--output"),
                               (args.report, "--report")):
                if path:
                    check_output_path(path, name)
        return config

    config = collective(comm, checked_config)
    batch = shared_batch(comm, config, args.input)
    if args.input:
        config = replace(config, workload=replace(config.workload,
                                                  batch_size=batch.batch_size,
                                                  seq_len=int(batch.lengths.max())))
    return config, batch


def cmd_run(args) -> int:
    from mpi4py import MPI

    from .data import write_npz
    from .report import build_report, format_report, write_report
    from .runner import open_session, run_decode, run_prefill

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    config, batch = config_and_batch(comm, args)
    workload = config.workload
    decode = workload.workload == "decode"
    session = open_session(config, comm, batch, backend=args.backend, transport=args.transport,
                           new_tokens=workload.new_tokens if decode else 0,
                           memory_limit=memory_limit_bytes(args))
    if decode:
        result = run_decode(session, batch, workload.new_tokens, workload.eos_id,
                            collect=bool(args.output), progress=args.progress)
    else:
        result = run_prefill(session, batch, args.warmup, args.iters,
                             collect=bool(args.output), progress=args.progress)
    report = build_report(session, batch, result)
    if rank == 0:
        if args.output:
            write_npz(args.output, **result.outputs)
        if args.report:
            write_report(args.report, report)
        print(format_report(report), flush=True)
    session.close()
    return 0


# --- plan ------------------------------------------------------------------------------

def cmd_plan(args) -> int:
    from .plan import print_plan

    config = config_from_args(args)
    if args.world_size is None and not (args.predict and args.paper_deployments):
        raise ConfigError("--world-size", "required: the number of ranks to plan for")
    if args.predict:
        return perfmodel.cmd_predict(args, config)
    return print_plan(config, args.world_size, args.layout or config.layout,
                      args.device_memory * GIB, args.backend, args.hbm_gbps)


# --- info ------------------------------------------------------------------------------

def cmd_info(args) -> int:
    from mpi4py import MPI

    from .backend import choose_backend, probe_cupy
    from .transport import choose_transport, mpi_library, nccl_available

    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    library = mpi_library()
    choice = collective(comm, choose_backend, args.backend, node.Get_rank(), node.Get_size())
    transport = collective(comm, choose_transport, args.transport, choice.name, library,
                           choice.name == "cupy" and nccl_available())
    cupy, why_not = probe_cupy()
    bindings = comm.gather((comm.Get_rank(), MPI.Get_processor_name(), choice.device_id), root=0)
    if comm.Get_rank() == 0:
        print(f"MPI library:   {library.version}")
        print(f"  loaded from: {library.path or 'unknown'}")
        print(f"  CUDA-aware:  {'yes' if library.cuda_aware else 'no'} ({library.cuda_reason})")
        print(f"  world size:  {comm.Get_size()}")
        if cupy is not None:
            count = cupy.cuda.runtime.getDeviceCount()
            names = [cupy.cuda.runtime.getDeviceProperties(i)["name"] for i in range(count)]
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
            print(f"GPUs:          {count}: {', '.join(names)}")
        else:
            print(f"GPUs:          none usable ({why_not})")
        print(f"backend:       {choice.name} ({choice.reason})")
        print(f"transport:     {transport.name} ({transport.reason})")
        if choice.name == "cupy":
            from .kernels import kernel_status

            print(f"fused kernels: {kernel_status()}")
        for rank, host, device in bindings:
            where = f"GPU {device}" if device is not None else "CPU"
            print(f"  rank {rank}: {host} {where}")
    node.Free()
    return 0
