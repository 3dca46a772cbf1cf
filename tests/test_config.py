"""TrainConfig defaults and the --field=value command line."""

import dataclasses
import importlib.util
import os
import pathlib
import re
import sys

import pytest

from conftest import main, one_line_error


def test_defaults_match_the_spec(monkeypatch):
    monkeypatch.delenv("WIKI_DUMP", raising=False)
    c = main.TrainConfig()
    assert (c.seq_len, c.batch_size, c.accumulation_steps, c.steps, c.eval_every) == (1024, 16, 1, 5000, 200)
    assert (c.lr, c.min_lr, c.warmup_steps, c.hold_steps, c.total_optim_steps) == (3e-4, 0.0, 2000, 0, None)
    assert (c.beta1_start, c.beta1_end, c.beta1_warmup_steps) == (None, None, 0)
    assert (c.n_layer, c.n_head, c.n_embd, c.max_docs) == (12, 12, 768, None)
    assert (c.shard_tokens, c.val_fraction, c.wiki_config) == (134217728, 0.1, "20231101.en")
    assert c.out_dir == "./wiki_memmap_gpt2"


def test_wiki_dump_env_var_sets_the_default(monkeypatch):
    monkeypatch.setenv("WIKI_DUMP", "20231101.de")
    assert main.TrainConfig().wiki_config == "20231101.de"
    assert main.parse_config(["--wiki_config=20231101.fr"]).wiki_config == "20231101.fr"


def test_overrides_are_typed_from_the_dataclass():
    c = main.parse_config(
        [
            "--max_docs=1000",
            "--n_layer=2",
            "--lr=0.001",
            "--prepare_only=true",
            "--compile=true",
            "--data_files=a.parquet",
            "--top_k=None",
            "--beta1_start=0.85",
        ]
    )
    assert c.max_docs == 1000 and isinstance(c.max_docs, int)
    assert c.n_layer == 2 and c.lr == 1e-3 and c.prepare_only is True and c.compile == "true"
    assert c.data_files == "a.parquet" and c.top_k is None and c.beta1_start == 0.85
    assert main.parse_config(["--prepare_only=false"]).prepare_only is False


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--no_such_field=1"], ["unknown option", "--help"]),
        (["--n_layer=two"], ["--n_layer", "expected int", "'two'"]),
        (["--prepare_only=maybe"], ["true or false"]),
        (["--seq_len"], ["--seq_len", "expected one argument"]),
        (["lr=3"], ["unknown option"]),
        (["--eval_every=3", "--accumulation_steps=2"], ["multiple of accumulation_steps"]),
        (["--n_embd=100", "--n_head=3"], ["divisible"]),
        (["--compile=yes"], ["'auto', 'true', 'false'"]),
        (["--steps=7", "--accumulation_steps=2", "--eval_every=2"], ["steps=7 must be a multiple"]),
        (["--out_dir="], ["out_dir is empty"]),
        (["--seed=-1"], ["seed=-1"]),
        (["--seed=4294967296"], ["seed=4294967296"]),
        (["--dropout=1.5"], ["dropout=1.5 must be in [0, 1)"]),
        (["--beta2=2"], ["beta2=2.0"]),
        (["--beta1_start=1.5", "--beta1_warmup_steps=5"], ["beta1_start=1.5"]),
        (["--lr=nan"], ["lr=nan must be"]),
        (["--temperature=inf"], ["temperature=inf"]),
        (["--peak_flops=nan"], ["peak_flops=nan"]),
        (["--grad_clip=-1"], ["grad_clip=-1.0 must be >= 0"]),
        (["--weight_decay=-0.1"], ["weight_decay"]),
        (["--sample_tokens=-1"], ["sample_tokens"]),
        (["--total_optim_steps=-5"], ["total_optim_steps"]),
        (["--shard_tokens=1000000000000"], ["2**30"]),
    ],
)
def test_bad_command_lines_are_one_clear_error(argv, words):
    with pytest.raises(main.UserError) as e:
        main.parse_config(argv)
    for w in words:
        assert w in str(e.value)


def test_smoke_preset_yields_to_explicit_fields():
    c = main.parse_config(["--smoke", "--steps=7"])
    assert c.steps == 7 and c.n_layer == main.SMOKE_PRESET["n_layer"] and c.data_files == main.FIXTURE


def test_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        main.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for f in dataclasses.fields(main.TrainConfig):
        assert f"--{f.name}" in out
    assert "tokens per uint16 shard file (256 MiB) (default 134217728)" in " ".join(out.split())


def test_unknown_option_exits_2_with_one_line(capsys):
    one_line_error(capsys, ["--bogus=1"], "unknown option")


def test_out_dir_expands_the_home_directory():
    assert main.parse_config(["--out_dir=~/runs/a"]).out_dir == os.path.expanduser("~/runs/a")


def test_optional_fields_parse_whether_spelled_optional_or_union_with_none(monkeypatch):
    """ruff's UP045 fix rewrites `Optional[X]` as `X | None` (a types.UnionType, not a typing.Union): main.py with
    every annotation in the new spelling parses the same command line to the same config."""
    src = re.sub(r"\bOptional\[(\w+)\]", r"\1 | None", pathlib.Path(main.__file__).read_text())
    assert "Optional[" not in src
    spec = importlib.util.spec_from_loader("main_pep604", loader=None)
    pep604 = importlib.util.module_from_spec(spec)
    pep604.__file__ = main.__file__
    monkeypatch.setitem(sys.modules, "main_pep604", pep604)
    exec(compile(src, main.__file__, "exec"), pep604.__dict__)
    argv = ["--max_docs=1000", "--top_k=None", "--beta1_start=0.85", "--data_files=a.parquet", "--peak_flops=None"]
    got = pep604.parse_config(argv)
    assert dataclasses.asdict(got) == dataclasses.asdict(main.parse_config(argv))
    assert (got.max_docs, got.top_k, got.beta1_start, got.peak_flops) == (1000, None, 0.85, None)
    with pytest.raises(pep604.UserError, match="--max_docs.*expected int, got 'many'"):
        pep604.parse_config(["--max_docs=many"])
