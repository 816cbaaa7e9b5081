"""``spmd-moe run | plan | info | bench | compare | generate | export | plot``: parse, build, call
the engine, report.

Errors a user can cause print one line on rank 0 (``spmd-moe: error: FIELD: ...``) and
every rank exits 2, with no output file. Anything else is a fault: the failing rank prints
its traceback and aborts the whole MPI job (exit 1), so no rank hangs in a collective.
"""
from __future__ import annotations

import sys

from . import bench, compare, generate, plan, plot
from ..core.errors import ConfigError, NumericalFault, SpmdMoeError, collective
from .options import (ArgumentParser, abort_job, add_config_arguments, add_execution_arguments,
                      config_from_args, end_interrupted, gather_trace, load_batch,
                      memory_limit_bytes, on_rank_0, plan_workload, positive_finite,
                      progress_reporter, report_error, start_trace, start_watchdog)

# The commands that run under mpiexec.
MPI_COMMANDS = ("run", "info", "bench", "compare", "generate", "export")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="spmd-moe", description="Expert-parallel MoE inference "
                            "as an MPI SPMD program.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    run = commands.add_parser("run", help="run prefill or decode under mpiexec (or alone)")
    add_config_arguments(run)
    io = add_execution_arguments(run)
    io.add_argument("--output", help=".npz to write (rank 0): hidden, logits, expert_counts"
                                     "[, tokens]")
    io.add_argument("--progress", action="store_true",
                    help="a line for every timed iteration or decode step, even quick ones "
                         "(default: progress only for steps longer than 2 s)")
    run.set_defaults(func=cmd_run)

    plan.add_parser(commands)

    bench.add_parser(commands)
    compare.add_parser(commands)
    generate.add_parser(commands)
    plot.add_parser(commands)

    export = commands.add_parser("export", help="write a preset's generated weights as a "
                                                "Hugging Face model directory (--model loads "
                                                "it back)")
    add_config_arguments(export)
    export.add_argument("directory", help="the model directory to create (absent or empty)")
    export.add_argument("--max-shard-size", type=float, metavar="MB",
                        help="split the weights into shards of at most this size, with "
                             "model.safetensors.index.json (default: one file)")
    export.set_defaults(func=cmd_export)

    info = commands.add_parser("info", help="MPI library, CUDA-awareness, GPUs, backend, "
                                            "transport")
    info.add_argument("--backend", default="auto")
    info.add_argument("--transport", default="auto")
    info.add_argument("--model", metavar="DIR", help="also say whether the fused kernels run "
                                                    "this checkpoint's family (config.json)")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            raise ConfigError("arguments", f"unrecognized arguments: {' '.join(unknown)} "
                                           f"(see spmd-moe {args.command} -h)")
    except ConfigError as exc:
        return report_error(exc, uses_mpi=bool(argv) and argv[0] in MPI_COMMANDS)
    except SystemExit as exc:  # -h / --help
        return int(exc.code or 0)
    uses_mpi = args.command in MPI_COMMANDS
    args.watchdog = None
    try:
        if uses_mpi:
            args.watchdog = start_watchdog(args)
        code = args.func(args)
    except SpmdMoeError as exc:
        code = report_error(exc, uses_mpi)
    except NumericalFault as exc:
        return abort_job(args.watchdog, exc)
    except Exception:
        return abort_job(args.watchdog)
    except BaseException as exc:      # KeyboardInterrupt, SystemExit: never a silent exit
        return end_interrupted(exc, args.watchdog, uses_mpi)
    if args.watchdog is not None:
        args.watchdog.close()
    return code


# --- run -------------------------------------------------------------------------------


def cmd_run(args) -> int:
    from mpi4py import MPI

    from ..core.files import npz_writer, text_writer, write_files
    from .report import build_report, format_report, report_json
    from ..engine.runner import plan_session, run_decode, run_prefill, start_session, trace_session

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    planned = plan_workload(comm, args)
    config = planned.config
    workload = config.workload
    decode = workload.workload == "decode"
    tracer = start_trace(comm, args)
    plan = plan_session(config, comm, planned.lengths, backend=args.backend,
                        transport=args.transport, new_tokens=planned.new_tokens,
                        memory_limit=memory_limit_bytes(args), watchdog=args.watchdog)
    batch = load_batch(comm, planned, args.watchdog)
    started = tracer.now() if tracer else 0.0
    session = start_session(plan, progress_reporter(comm, args))
    if tracer is not None:
        trace_session(session, tracer)
        tracer.host_span("set-up (weights, buffers, peak)", started, tracer.now())
    if decode:
        result = run_decode(session, batch, workload.new_tokens, workload.eos_id,
                            collect=bool(args.output))
    else:
        result = run_prefill(session, batch, args.warmup, args.iters,
                             collect=bool(args.output))
    report = build_report(session, batch, result)
    trace = gather_trace(comm, args, tracer)
    session.close()

    def write_outputs() -> None:
        """Rank 0 writes both files or neither; a failure is every rank's error."""
        files = []
        if args.report:
            files.append((args.report, "--report", text_writer(report_json(report))))
        if args.output:
            files.append((args.output, "--output", npz_writer(result.outputs)))
        if args.trace:
            files.append((args.trace, "--trace", text_writer(trace)))
        write_files(files)

    with args.watchdog.waiting("write outputs"):
        on_rank_0(comm, args.watchdog, "writing outputs", write_outputs)
    if rank == 0:
        print(format_report(report), flush=True)
    return 0


# --- plan ------------------------------------------------------------------------------


# --- export ----------------------------------------------------------------------------

def cmd_export(args) -> int:
    """Rank 0 writes the directory (under mpiexec the other ranks only wait for it)."""
    from mpi4py import MPI

    from ..model.checkpoint import export_generated

    comm = MPI.COMM_WORLD

    def export():
        if args.model:
            raise ConfigError("--model", "export writes generated weights; give --preset or "
                                         "--config")
        config = config_from_args(args)
        limit = None
        if args.max_shard_size is not None:
            limit = int(positive_finite(args.max_shard_size, "--max-shard-size", "MB") * 1e6)
            if limit < 1:
                raise ConfigError("--max-shard-size", f"{args.max_shard_size} MB is less than "
                                                      "a byte")
        if comm.Get_rank() != 0:
            return config, []
        return config, export_generated(config, args.directory, limit)

    config, files = collective(comm, export)
    if comm.Get_rank() != 0:
        return 0
    print(f"spmd-moe export: {config.model.family} model (L={config.model.n_layers} "
          f"d={config.model.d_model} E={config.model.n_experts} {config.model.dtype}, seed "
          f"{config.seed}) -> {args.directory}: {', '.join(files)}", flush=True)
    return 0


# --- info ------------------------------------------------------------------------------

def model_kernels(choice, model) -> str:
    """What the backend does for ``model``'s family: the fused kernels, or which piece runs
    the generic array code and why (the report's kernels_reason for a run of it)."""
    from ..backend import kernels
    from ..backend.array import Backend
    from ..engine.engine import fit_kernels_to_family

    bk = Backend(choice, model.dtype)
    kernels.fit_model(bk, model.head_dim)
    fit_kernels_to_family(bk, model)
    return bk.kernels_reason

def cmd_info(args) -> int:
    from mpi4py import MPI

    from ..backend.array import probe_cupy
    from ..parallel.connect import choose_backend_and_transport

    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    choice, library, transport = choose_backend_and_transport(
        comm, args.backend, args.transport, node.Get_rank(), node.Get_size())
    cupy, why_not = probe_cupy()
    model = None
    if args.model:
        from ..model.checkpoint import read_hf_config
        from ..model.families import model_config_from_hf

        model = collective(comm, lambda: model_config_from_hf(read_hf_config(args.model),
                                                              "bfloat16"))
    bindings = comm.gather((comm.Get_rank(), MPI.Get_processor_name(), choice.device_id), root=0)
    if comm.Get_rank() == 0:
        print(f"MPI library:   {library.version}")
        print(f"  loaded from: {library.path or 'unknown'}")
        print(f"  CUDA-aware:  {'yes' if library.cuda_aware else 'no'} ({library.cuda_reason})")
        print(f"  world size:  {comm.Get_size()}")
        levels = {MPI.THREAD_SINGLE: "SINGLE", MPI.THREAD_FUNNELED: "FUNNELED",
                  MPI.THREAD_SERIALIZED: "SERIALIZED", MPI.THREAD_MULTIPLE: "MULTIPLE"}
        multiple = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        print(f"  threads:     MPI_THREAD_{levels.get(MPI.Query_thread(), '?')} ("
              + ("the watchdog can ask the other ranks and abort from its thread" if multiple
                 else "stalls are not watched; a signal ends the rank") + ")")
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
            from ..backend.kernels import kernel_status

            print(f"fused kernels: {kernel_status()}")
        if model is not None:
            print(f"--model:       {model.family} ({args.model}): {model_kernels(choice, model)}")
        for rank, host, device in bindings:
            where = f"GPU {device}" if device is not None else "CPU"
            print(f"  rank {rank}: {host} {where}")
    node.Free()
    return 0
