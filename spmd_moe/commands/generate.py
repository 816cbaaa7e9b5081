"""``spmd-moe generate``: text in, text out, for a ``--model`` checkpoint (SPEC §8).

Rank 0 reads the prompts (``--prompt``, repeatable, and/or ``--prompts FILE.jsonl`` with one
``{"prompt": "..."}`` per line), tokenises them with the checkpoint's tokenizer.json, pads
them on the left and broadcasts the batch; every rank then runs the usual prefill and greedy
decode (runner.run_decode) in the layout asked for, up to ``--new-tokens`` tokens or the
checkpoint's end-of-sequence token (generation_config.json, else config.json; one id or a
list). Rank 0 writes one JSON object per prompt: the prompt, the generated text and token
ids, why it stopped, the time to the first token and the latency of each later token.
Times are the batch's: all prompts decode together, so they share the clock.

:func:`generate_text` is the Python API (collective); the command is a thin layer over it.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace

from ..core.errors import ConfigError, InputError, collective, say

DEFAULT_NEW_TOKENS = 32


def check_prompt(text: str, where: str) -> str:
    """``text`` if it can be encoded as UTF-8 (a lone surrogate, as a non-UTF-8 byte of the
    command line or a ``\\ud800`` escape in JSON becomes, cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError("--prompt" if where.startswith("prompt") else "--prompts",
                         f"{where} is not valid UTF-8 text (character {exc.start}: "
                         f"{text[exc.start]!r}, a lone surrogate or a byte that is not "
                         "UTF-8)") from None
    return text


def read_prompts(prompts: list[str], path: str | None) -> list[str]:
    """``--prompt`` texts, then those of a JSONL file (``{"prompt": ...}`` per line), read
    through the read door (a regular file of at most 64 MiB of UTF-8)."""
    from ..core.files import JsonFields, parse_json, read_text

    texts = [check_prompt(text, f"prompt {number}") for number, text in enumerate(prompts, 1)]
    if path is not None:
        for number, line in enumerate(read_text(path, "--prompts", "prompts").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                item = JsonFields(parse_json(line, where, "--prompts", "prompts"), "--prompts",
                                  where)
                text = item.get("prompt", "string")
            except InputError as exc:
                raise InputError("--prompts", f"{where}: expected {{\"prompt\": \"...\"}} "
                                              f"({exc.message})") from None
            texts.append(check_prompt(text, where))
    if not texts:
        raise ConfigError("--prompt", "give --prompt TEXT (repeatable) or --prompts FILE.jsonl")
    return texts


def prepare(config, directory: str, texts: list[str]):
    """Tokenise and left-pad ``texts`` -> (Batch, prompt ids, eos ids, tokenizer).
    Checks that every prompt has tokens, the ids fit the vocabulary and the prompt plus the
    new tokens fit ``max_seq_len``."""
    from ..model.checkpoint import eos_token_ids
    from ..core.config import check_sequence_fits
    from ..model.inputs import validate_batch
    from ..model.tokenizer import TextTokenizer, left_pad

    tokenizer = TextTokenizer(directory)
    encoded = tokenizer.encode(texts)
    for number, ids in enumerate(encoded, 1):
        if not ids:
            raise InputError("--prompt", f"prompt {number} ({texts[number - 1]!r}) has no "
                                         "tokens")
    model = config.model
    top = max(max(ids) for ids in encoded)
    if top >= model.vocab_size:
        raise InputError("--model", f"tokenizer.json gives id {top} but the model's "
                                    f"vocab_size is {model.vocab_size}")
    new_tokens = config.workload.new_tokens
    check_sequence_fits(model, max(len(ids) for ids in encoded), new_tokens, "--prompt",
                        "--new-tokens")
    ids, mask = left_pad(encoded)
    batch = validate_batch(ids, mask, model, new_tokens, source="prompt")
    return batch, encoded, eos_token_ids(directory, model.vocab_size), tokenizer


def generate_text(comm, config, texts: list[str], backend: str = "auto",
                  transport: str = "auto", memory_limit: int | None = None,
                  watchdog=None, progress=None) -> list[dict] | None:
    """Greedy generation for ``texts`` with ``config`` (a ``--model`` RunConfig whose
    workload is decode with ``new_tokens``). Collective; the results on rank 0 (one dict per
    prompt), None elsewhere. ``progress``: rank 0's progress.Reporter (none: silent)."""
    from ..core.progress import SILENT
    from ..engine.runner import open_session, run_decode
    from ..parallel.watchdog import Watchdog
    from .options import on_rank_0

    directory = config.checkpoint
    watchdog = watchdog or Watchdog(None, 0)
    with watchdog.waiting("set-up"):
        prepared = on_rank_0(comm, watchdog, "tokenising prompts",
                             lambda: prepare(config, directory, texts))
        batch, encoded, eos = comm.bcast(prepared[:3] if prepared else None, root=0)
    config = replace(config, workload=replace(config.workload, batch_size=batch.batch_size,
                                              seq_len=batch.seq_len))
    new_tokens = config.workload.new_tokens
    session = open_session(config, comm, batch, backend=backend, transport=transport,
                           new_tokens=new_tokens, memory_limit=memory_limit,
                           watchdog=watchdog, progress=progress or SILENT)
    try:
        result = run_decode(session, batch, new_tokens, eos or None, collect=True)
    finally:
        session.close()
    if comm.Get_rank() != 0:
        return None
    tokenizer = prepared[3]
    ttft_ms = result.prefill_timing.wall * 1e3
    steps_ms = [t.wall * 1e3 for t in result.step_timings]
    rows = []
    for text, prompt_ids, tokens in zip(texts, encoded, result.outputs["tokens"]):
        generated = [int(t) for t in tokens if t >= 0]
        stopped = bool(generated) and generated[-1] in eos
        rows.append({
            "prompt": text,
            "text": tokenizer.decode(generated),
            "prompt_ids": [int(i) for i in prompt_ids],
            "token_ids": generated,
            "finish_reason": "eos" if stopped else "length",
            "ttft_ms": ttft_ms,
            "per_token_ms": steps_ms[:max(0, len(generated) - 1)],
        })
    return rows


# --- the command -----------------------------------------------------------------------

def add_parser(commands) -> None:
    from .options import add_stall_timeout

    parser = commands.add_parser(
        "generate", help="text in, text out for a --model checkpoint: tokenise, prefill, "
                         "greedy decode to --new-tokens or EOS; JSONL out")
    group = parser.add_argument_group("model and prompts")
    group.add_argument("--model", metavar="DIR", help="Hugging Face model directory with "
                                                      "tokenizer.json (required)")
    group.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                       help="a prompt (repeatable)")
    group.add_argument("--prompts", metavar="FILE.jsonl",
                       help='prompts, one {"prompt": "..."} per line')
    group.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS,
                       help=f"most tokens to generate per prompt (default "
                            f"{DEFAULT_NEW_TOKENS}; fewer at EOS)")
    group.add_argument("--output", metavar="FILE.jsonl",
                       help="write the results here (rank 0) instead of stdout")
    group.add_argument("--layout", help="ep=N[,pp=M] or tp=N[,pp=M] (default: ep = world "
                                        "size)")
    group.add_argument("--dtype", help="bfloat16 or float32 (default: the checkpoint's)")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="workload settings, e.g. --set micro_batches=2")
    run = parser.add_argument_group("execution")
    run.add_argument("--backend", default="auto", help="auto | cupy | numpy")
    run.add_argument("--transport", default="auto", help="auto | mpi-cuda | mpi-host | nccl")
    run.add_argument("--memory-limit", type=float, metavar="GIB",
                     help="memory per rank for the pre-allocation check (default: free "
                          "memory)")
    run.add_argument("--quiet", action="store_true",
                     help="no progress on stderr (default: loading the weights and the "
                          "decode steps show it when they take more than 2 s)")
    add_stall_timeout(run)
    parser.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from mpi4py import MPI

    from ..core.files import check_output_paths, text_writer, write_files
    from ..model.checkpoint import checkpoint_run_config
    from .options import (check_memory_limit, command_inputs, flag_named, memory_limit_bytes,
                          on_rank_0, progress_reporter)

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()

    def checked():
        if not args.model:
            raise ConfigError("--model", "required: the model directory to generate with")
        if args.new_tokens < 1:
            raise ConfigError("--new-tokens", f"{args.new_tokens} must be >= 1")
        check_memory_limit(args)
        if rank == 0:
            check_output_paths((args.output, "--output"), inputs=command_inputs(args))
        try:
            config = checkpoint_run_config(args.model, args.set, dtype=args.dtype,
                                           layout=args.layout, workload="decode",
                                           new_tokens=args.new_tokens, seq_len=1,
                                           batch_size=1)
        except ConfigError as exc:
            raise flag_named(exc, args) from None
        texts = read_prompts(args.prompt, args.prompts) if rank == 0 else []
        return config, texts

    with args.watchdog.waiting("set-up"):
        config, texts = collective(comm, checked)
        texts = comm.bcast(texts, root=0)
    limit = memory_limit_bytes(args)
    rows = generate_text(comm, config, texts, args.backend, args.transport, limit,
                         args.watchdog, progress_reporter(comm, args))
    lines = "".join(json.dumps(row) + "\n" for row in rows) if rank == 0 else ""
    if args.output:
        # Rank 0 writes; a failure (a full disk) is every rank's one-line error.
        with args.watchdog.waiting("write outputs"):
            on_rank_0(comm, args.watchdog, "writing outputs", lambda: write_files(
                [(args.output, "--output", text_writer(lines))]))
    if rank == 0:
        if args.output:
            say(f"spmd-moe generate: {len(rows)} prompt(s) -> {args.output}; time to "
                f"first token {rows[0]['ttft_ms']:.1f} ms")
        else:
            sys.stdout.write(lines)
            sys.stdout.flush()
    return 0
