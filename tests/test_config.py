"""Config: presets, JSON files (SPEC names, nested, the seed paper's format), --set, and
one clear error naming the field for every bad value."""
import json

import pytest

from spmd_moe.core.config import PRESETS, Layout, build_run_config
from spmd_moe.core.errors import ConfigError, LayoutError


def test_presets_are_valid_and_paper_is_the_papers_model():
    for config in PRESETS.values():
        config.validate()
    paper = PRESETS["paper"]
    m = paper.model
    assert (m.vocab_size, m.d_model, m.n_heads, m.n_layers, m.n_experts, m.d_ff, m.top_k,
            m.dtype) == (100256, 4096, 32, 16, 16, 16384, 2, "bfloat16")
    assert (paper.workload.batch_size, paper.workload.seq_len) == (128, 10000)
    assert PRESETS["paper-baseline"].layout == "tp=8,pp=2"
    assert PRESETS["paper-baseline"].model == m


def write(tmp_path, data):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_flat_json_with_spec_names(tmp_path):
    path = write(tmp_path, {"preset": "tiny", "d_model": 48, "n_heads": 6, "batch_size": 3})
    config = build_run_config(config_file=path)
    assert config.model.d_model == 48 and config.model.n_heads == 6
    assert config.workload.batch_size == 3
    assert config.model.vocab_size == PRESETS["tiny"].model.vocab_size


def test_nested_json_and_layout(tmp_path):
    path = write(tmp_path, {"preset": "tiny", "model": {"n_layers": 2, "dtype": "fp32"},
                            "input": {"batch_size": 2, "sequence_length": 7},
                            "layout": {"ep": 2, "pp": 1}})
    config = build_run_config(config_file=path)
    assert config.model.n_layers == 2 and config.model.dtype == "float32"
    assert (config.workload.batch_size, config.workload.seq_len) == (2, 7)
    assert config.layout == "ep=2,pp=1"


def test_seed_paper_json_loads_as_it_is(tmp_path):
    paper_format = {"model": {"num_layers": 16, "experts_per_layer": 16,
                              "token_dimension": 4096, "mlp_hidden_size": 16384,
                              "attention_heads": 32, "precision": "bf16"},
                    "input": {"batch_size": 128, "sequence_length": 10000}}
    config = build_run_config(config_file=write(tmp_path, paper_format))
    assert config.model == PRESETS["paper"].model
    assert config.workload == PRESETS["paper"].workload


def test_set_overrides_win_and_take_aliases():
    config = build_run_config("tiny", sets=["num_layers=2", "dtype=float32", "eos_id=5",
                                            "pad_fraction=0.25"])
    assert config.model.n_layers == 2 and config.model.dtype == "float32"
    assert config.workload.eos_id == 5 and config.workload.pad_fraction == 0.25


@pytest.mark.parametrize("sets, field", [
    (["d_model=30"], "d_model"),              # 30 % 4 heads
    (["n_heads=32"], "n_heads"),              # head dim 1: odd, RoPE rotates halves
    (["top_k=13"], "top_k"),
    (["dtype=float16"], "dtype"),
    (["n_layers=0"], "n_layers"),
    (["n_layers=two"], "n_layers"),
    (["pad_fraction=1.5"], "pad_fraction"),
    (["workload=train"], "workload"),
    (["workload=decode"], "new_tokens"),
    (["seq_len=60", "workload=decode", "new_tokens=10"], "new_tokens"),   # the prompt fits
    (["seq_len=70", "workload=decode", "new_tokens=10"], "seq_len"),
    (["eos_id=101"], "eos_id"),
    (["norm_eps=-1"], "norm_eps"),
    (["norm_eps=inf"], "norm_eps"),           # all-zero logits
    (["norm_eps=nan"], "norm_eps"),
    (["rope_theta=Infinity"], "rope_theta"),
    (["n_layers=99999999999999999999"], "n_layers"),   # not an OverflowError later
    (["batch_size=99999999999999999999"], "batch_size"),
    (["micro_batches=6"], "micro_batches"),   # tiny has 5 sequences
    (["micro_batches=-1"], "micro_batches"),
    (["colour=blue"], "colour"),
    (["d_model"], "--set"),
    (["chunk_tokens=-1"], "chunk_tokens"),
    (["chunk_tokens=2.5"], "chunk_tokens"),
    (["chunk_tokens=4", "micro_batches=2"], "chunk_tokens"),
    (["overlap=perhaps"], "overlap"),
])
def test_bad_values_name_the_field(sets, field):
    with pytest.raises(ConfigError) as info:
        build_run_config("tiny", sets=sets)
    assert info.value.field == field
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, match", [
    ('{"preset": "tiny", "norm_eps": Infinity}', "Infinity is not a JSON number"),
    ('{"preset": "tiny", "norm_eps": NaN}', "NaN is not a JSON number"),
    ('{"preset": "tiny", "rope_theta": 1e400}', "number 1e400 is out of range"),
])
def test_non_finite_numbers_in_a_json_file_are_refused(tmp_path, text, match):
    # Python's json accepts Infinity and NaN, and reads 1e400 as inf; the read door does not.
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^--config: .*is not valid JSON: {match}"):
        build_run_config(config_file=str(path))
    with pytest.raises(ConfigError, match="^norm_eps: inf must be a finite positive number"):
        build_run_config("tiny", sets=["norm_eps=inf"])


def test_a_config_must_be_a_small_regular_file(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo.json")          # opening it would block forever
    (tmp_path / "big.json").write_text(" " * (2 << 20) + "{}")
    (tmp_path / "deep.json").write_text("[" * 100000)
    for path, match in (("/dev/zero", "/dev/zero is a character device, not a regular file"),
                        (tmp_path / "fifo.json", "fifo.json is a FIFO, not a regular file"),
                        (tmp_path, "is a directory, not a regular file"),
                        (tmp_path / "big.json", "big.json is 2097154 bytes; a JSON config may "
                                                "have at most 1048576"),
                        (tmp_path / "deep.json", "deep.json nests deeper than 32 levels")):
        with pytest.raises(ConfigError, match=f"^--config: .*{match}"):
            build_run_config(config_file=str(path))


def test_chunk_and_overlap_settings():
    config = build_run_config("tiny", sets=["chunk_tokens=7", "overlap=false"])
    assert config.workload.chunk_tokens == 7 and config.workload.overlap == "off"
    assert build_run_config("tiny", sets=["overlap=1"]).workload.overlap == "on"
    assert build_run_config("tiny", sets=["overlap=Auto"]).workload.overlap == "auto"
    assert build_run_config("tiny").workload.overlap == "auto"
    assert build_run_config("tiny").workload.chunk_tokens == 0      # the derived default


def test_unknown_preset_and_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="preset: 'huge' is not one of tiny"):
        build_run_config("huge")
    with pytest.raises(ConfigError, match="--config: cannot read"):
        build_run_config(config_file=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_run_config(config_file=str(bad))


def test_prompt_too_long_for_decode_gives_the_numbers():
    with pytest.raises(ConfigError, match=r"prompt length 60 \+ new_tokens 10 = 70 exceeds "
                                          r"max_seq_len=64"):
        build_run_config("tiny", sets=["seq_len=60", "workload=decode", "new_tokens=10"])


@pytest.mark.parametrize("text, world, expected", [
    (None, 4, Layout(ep=4, tp=1, pp=1)),
    ("pp=2", 4, Layout(ep=2, tp=1, pp=2)),
    ("ep=2", 4, Layout(ep=2, tp=1, pp=2)),
    ("tp=2", 4, Layout(ep=1, tp=2, pp=2)),
    ("tp=8,pp=2", 16, Layout(ep=1, tp=8, pp=2)),
    ("ep=16,pp=16", 256, Layout(ep=16, tp=1, pp=16)),
    # tp=1 means no tensor parallelism: the ep asked for is the ep run.
    ("ep=2,tp=1", 4, Layout(ep=2, tp=1, pp=2)),
    ("tp=1,ep=2", 4, Layout(ep=2, tp=1, pp=2)),
    ("ep=1,tp=4", 4, Layout(ep=1, tp=4, pp=1)),
    ("tp=1", 4, Layout(ep=1, tp=1, pp=4)),
])
def test_layout_parse(text, world, expected):
    assert Layout.parse(text, world) == expected


@pytest.mark.parametrize("text, world, match", [
    ("ep=3", 4, "needs pp\\*ep = 3 ranks but the world size is 4"),
    ("ep=5", 5, "ep=5 must divide n_experts=12"),
    ("tp=3", 3, "tp=3 must divide n_heads=4"),
    ("ep=1,pp=6", 6, "pp=6 stages is more than n_layers=5"),
])
def test_layouts_that_cannot_work_are_refused(text, world, match):
    model = PRESETS["tiny"].model
    with pytest.raises(LayoutError, match=match):
        Layout.parse(text, world).validate(model, world)


def test_layout_syntax_errors():
    for text in ("ep=2,tp=2", "xp=2", "ep=two", "ep=0", "ep", "ep=4,ep=2", "pp=2,pp=2",
                 "ep=99999999999999999999"):
        with pytest.raises(LayoutError) as info:
            Layout.parse(text, 4)
        assert info.value.field == "layout"


def test_tp_must_divide_d_ff():
    model = build_run_config("tiny", sets=["d_ff=42"]).model
    with pytest.raises(LayoutError, match="tp=4 must divide d_ff=42"):
        Layout.parse("tp=4", 4).validate(model, 4)
