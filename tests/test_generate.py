"""``spmd-moe generate``: text in, text out; the greedy tokens are transformers' generate()
tokens for the same prompts (tests/data/hf), EOS (one id or several) stops a prompt, and bad
prompts are refused on every rank."""
import json
import os
import shutil

import hf_fixtures as hf
import pytest
from mpi4py import MPI
from test_cli import check_refused, spmd_moe

from spmd_moe.commands.generate import generate_text, read_prompts
from spmd_moe.core.errors import ConfigError, InputError
from spmd_moe.model.checkpoint import checkpoint_run_config


def expected_rows(name: str) -> list[tuple[str, list[int]]]:
    want = hf.expected(name)
    return [(str(p), [int(t) for t in row if t >= 0])
            for p, row in zip(want["prompts"], want["tokens"])]


def test_generate_python_api_matches_transformers():
    config = checkpoint_run_config(hf.path("qwen3_moe"), ["workload=decode",
                                                           f"new_tokens={hf.NEW_TOKENS}"])
    rows = generate_text(MPI.COMM_WORLD, config, [p for p, _ in expected_rows("qwen3_moe")],
                         backend="numpy")
    for row, (prompt, tokens) in zip(rows, expected_rows("qwen3_moe")):
        assert row["prompt"] == prompt and row["token_ids"] == tokens
        assert row["finish_reason"] == "length" and row["ttft_ms"] > 0
        assert len(row["per_token_ms"]) == hf.NEW_TOKENS - 1


def test_generate_command_stops_at_either_eos_and_writes_jsonl(tmp_path):
    cases = expected_rows("mixtral")       # generation_config.json: eos_token_id [2, 27]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p, _ in cases[1:]) + "\n")
    out = tmp_path / "out.jsonl"
    result = spmd_moe("generate", "--model", hf.path("mixtral"), "--prompt", cases[0][0],
                      "--prompts", str(prompts), "--new-tokens", str(hf.NEW_TOKENS),
                      "--layout", "ep=2", "--output", str(out), ranks=2)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p for p, _ in cases]
    reasons = []
    for row, (_, tokens) in zip(rows, cases):
        assert row["token_ids"] == tokens
        assert len(row["per_token_ms"]) == len(tokens) - 1 and row["ttft_ms"] > 0
        reasons.append(row["finish_reason"])
        assert isinstance(row["text"], str) and row["prompt_ids"][0] == 1   # <s> first
    # Prompt 0 stops at the second EOS id (27), prompt 1 at the first (2).
    assert reasons[0] == "eos" and rows[0]["token_ids"][-1] == 27
    assert reasons[1] == "eos" and rows[1]["token_ids"][-1] == 2
    assert "length" in reasons


def test_generate_prints_jsonl_without_output():
    result = spmd_moe("generate", "--model", hf.path("olmoe"), "--prompt", "a small model",
                      "--new-tokens", "3")
    assert result.returncode == 0, result.stderr
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(row["token_ids"]) == 3 and row["text"] is not None


def test_read_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "b"}\n\n{"prompt": "c", "id": 3}\n')
    assert read_prompts(["a"], str(path)) == ["a", "b", "c"]
    path.write_text('{"prompt": "b"}\n["c"]\n')
    with pytest.raises(InputError, match="line 2: expected"):
        read_prompts([], str(path))
    with pytest.raises(ConfigError, match="--prompt: give --prompt"):
        read_prompts([], None)


def without_tokenizer(tmp_path):
    target = tmp_path / "no-tokenizer"
    shutil.copytree(hf.path("olmoe"), target)
    os.remove(target / "tokenizer.json")
    return str(target)


def with_config_fifo(tmp_path):
    target = tmp_path / "fifo-config"
    shutil.copytree(hf.path("olmoe"), target)
    os.remove(target / "config.json")
    os.mkfifo(target / "config.json")
    return str(target)


def with_eos(tmp_path, value):
    target = tmp_path / "eos"
    shutil.copytree(hf.path("olmoe"), target)
    (target / "generation_config.json").write_text(json.dumps({"eos_token_id": value}))
    return str(target)


def prompts_file(tmp_path, raw: bytes) -> str:
    (tmp_path / "p.jsonl").write_bytes(raw)
    return str(tmp_path / "p.jsonl")


BAD = {
    "no prompt": (lambda t: [], "--prompt: give --prompt TEXT"),
    "memory limit inf": (lambda t: ["--prompt", "x", "--memory-limit", "inf"],
                         "--memory-limit: inf must be a finite number of GiB > 0"),
    "memory limit nan": (lambda t: ["--prompt", "x", "--memory-limit", "nan"],
                         "--memory-limit: nan must be a finite number of GiB > 0"),
    "new tokens past max_seq_len": (lambda t: ["--prompt", "x", "--new-tokens", "1000000000"],
                                    "--new-tokens: prompt length 1 + new_tokens 1000000000"),
    "config.json a FIFO": (lambda t: ["--model", with_config_fifo(t), "--prompt", "x"],
                           "config.json: " + str("{t}") + "/fifo-config/config.json is a FIFO"),
    "eos id past the vocabulary": (lambda t: ["--model", with_eos(t, 100), "--prompt", "x"],
                                   "generation_config.json eos_token_id: 100 is not a token id"),
    "eos id not an integer": (lambda t: ["--model", with_eos(t, 1e26), "--prompt", "x"],
                              "generation_config.json eos_token_id: 1e+26 must be an integer"),
    "prompts not UTF-8": (lambda t: ["--prompts", prompts_file(t, b'{"prompt": "caf\xe9"}')],
                          "--prompts: " + "{t}/p.jsonl is not UTF-8 text (byte 15"),
    "prompt with a lone surrogate": (
        lambda t: ["--prompts", prompts_file(t, b'{"prompt": "\\ud800"}\n')],
        "--prompts: {t}/p.jsonl line 1 is not valid UTF-8 text (character 0: '\\ud800'"),
    "prompts a directory": (lambda t: ["--prompts", str(t)],
                            "--prompts: {t} is a directory, not a regular file"),
    "prompts written over": (lambda t: ["--prompts", prompts_file(t, b'{"prompt": "a"}\n'),
                                        "--output", str(t / "p.jsonl")],
                             "--output: {t}/p.jsonl is the input --prompts"),
    "no tokenizer": (lambda t: ["--model", without_tokenizer(t), "--prompt", "x"],
                     "has no tokenizer.json"),
    "too long": (lambda t: ["--prompt", "a small model", "--new-tokens", "100"],
                 "exceeds max_seq_len=64"),
    "bad prompts file": (lambda t: ["--prompts", str(t / "missing.jsonl")],
                         "--prompts: cannot read"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_generate_input_is_refused_on_every_rank(case, tmp_path):
    make_args, message = BAD[case]
    args = make_args(tmp_path)
    if "--model" not in args:
        args = ["--model", hf.path("olmoe"), *args]
    out = tmp_path / "out.jsonl"
    if "--output" not in args:
        args += ["--output", str(out)]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.jsonl")}
    result = spmd_moe("generate", *args, ranks=2, per_rank_status=True, timeout=60)
    check_refused(result, message.format(t=tmp_path), out)
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.jsonl")}


def test_a_lone_surrogate_on_the_command_line_is_one_line():
    # A byte that is not UTF-8 reaches Python's argv as a lone surrogate.
    with pytest.raises(InputError, match="^--prompt: prompt 2 is not valid UTF-8 text "
                                         r"\(character 1: '\\udcff'"):
        read_prompts(["fine", "a\udcff"], None)


@pytest.mark.slow
def test_a_stopped_rank_is_named_by_generate_s_watchdog(tmp_path):
    """generate has --stall-timeout: a rank stopped at layer 0 hung it forever before."""
    result = spmd_moe("generate", "--model", hf.path("olmoe"), "--prompt", "a small model",
                      "--new-tokens", "3", "--stall-timeout", "2", ranks=2,
                      env={"SPMD_MOE_FAULT": "1:0:stop"}, timeout=60)
    assert result.returncode == 3, result.stderr
    stall = [l for l in result.stderr.splitlines() if l.startswith("spmd-moe: error: stall:")]
    assert len(stall) == 1 and "rank 1 did not" in stall[0], result.stderr
