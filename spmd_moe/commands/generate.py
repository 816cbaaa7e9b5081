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


def read_prompts(prompts: list[str], path: str | None) -> list[str]:
    """``--prompt`` texts, then those of a JSONL file (``{"prompt": ...}`` per line)."""
    texts = list(prompts)
    if path is not None:
        try:
            with open(path) as handle:
                lines = handle.readlines()
        except OSError as exc:
            raise InputError("--prompts", f"cannot read {path}: {exc.strerror}") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError("--prompts", f"{path} line {number}: not JSON ({exc})") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise InputError("--prompts", f"{path} line {number}: expected "
                                              '{"prompt": "..."}')
            texts.append(item["prompt"])
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
    check_sequence_fits(model, max(len(ids) for ids in encoded), new_tokens, "--prompt")
    ids, mask = left_pad(encoded)
    batch = validate_batch(ids, mask, model, new_tokens, source="prompt")
    return batch, encoded, eos_token_ids(directory), tokenizer


def generate_text(comm, config, texts: list[str], backend: str = "auto",
                  transport: str = "auto", memory_limit: int | None = None,
                  watchdog=None, progress=None) -> list[dict] | None:
    """Greedy generation for ``texts`` with ``config`` (a ``--model`` RunConfig whose
    workload is decode with ``new_tokens``). Collective; the results on rank 0 (one dict per
    prompt), None elsewhere. ``progress``: rank 0's progress.Reporter (none: silent)."""
    from ..core.progress import SILENT
    from ..engine.runner import open_session, run_decode

    directory = config.checkpoint
    prepared = collective(comm, lambda: prepare(config, directory, texts)
                          if comm.Get_rank() == 0 else None)
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
    parser.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from mpi4py import MPI

    from ..model.checkpoint import checkpoint_run_config
    from .options import memory_limit_bytes, on_rank_0, progress_reporter
    from ..core.files import check_output_path, text_writer, write_files

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()

    def checked():
        if not args.model:
            raise ConfigError("--model", "required: the model directory to generate with")
        if args.new_tokens < 1:
            raise ConfigError("--new-tokens", f"{args.new_tokens} must be >= 1")
        if args.memory_limit is not None and args.memory_limit <= 0:
            raise ConfigError("--memory-limit", f"{args.memory_limit} must be > 0 GiB")
        config = checkpoint_run_config(args.model, args.set, dtype=args.dtype,
                                       layout=args.layout, workload="decode",
                                       new_tokens=args.new_tokens, seq_len=1, batch_size=1)
        texts = read_prompts(args.prompt, args.prompts) if rank == 0 else []
        if rank == 0 and args.output:
            check_output_path(args.output, "--output")
        return config, texts

    config, texts = collective(comm, checked)
    texts = comm.bcast(texts, root=0)
    limit = memory_limit_bytes(args)
    rows = generate_text(comm, config, texts, args.backend, args.transport, limit,
                         args.watchdog, progress_reporter(comm, args))
    lines = "".join(json.dumps(row) + "\n" for row in rows) if rank == 0 else ""
    if args.output:
        # Rank 0 writes; a failure (a full disk) is every rank's one-line error.
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
