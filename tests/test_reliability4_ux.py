"""Round 4, config and UX: refusals and notices at start-up, --help, what is printed to a terminal and to a log
file, what is meant for sharing (model card, plot), the prompt's <|endoftext|>, MFU's device table, the README's
metrics schema."""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import sys
import typing

import matplotlib.figure
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import FIXTURE, ROOT, RUN, TINY, cli_args, main, one_line_error, read_jsonl


def run(out_dir, capsys, **kw):
    """main.main(ARGS) in this process, as `python main.py ARGS` (no HF export unless asked): -> (stdout, stderr)."""
    capsys.readouterr()
    main.main(cli_args(out_dir, **{**RUN, "export_hf": "false", **kw}))
    return capsys.readouterr()


def train_rows(out_dir):
    return {r["step"]: r for r in read_jsonl(out_dir / "metrics.jsonl") if r["kind"] == "train"}


# --- refused at start-up -----------------------------------------------------------------------------------------


def test_min_lr_above_lr_is_refused_in_one_line(tmp_path, capsys):
    one_line_error(capsys, cli_args(tmp_path / "run", lr=1e-3, min_lr=5e-3), "min_lr=0.005", "lr=0.001")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["lr=nan", "lr=-inf", "min_lr=nan", "temperature=-inf", "dropout=nan", "beta2=inf"])
def test_a_nan_or_infinite_value_is_one_message(tmp_path, capsys, flag):
    err = one_line_error(capsys, cli_args(tmp_path, **dict([flag.split("=")])), flag, "finite")
    assert err.count(flag.split("=")[0] + "=") == 1, err


def test_prepare_only_with_sample_only_is_refused(tmp_path, capsys):
    one_line_error(capsys, cli_args(tmp_path, prepare_only="true", sample_only="true"), "prepare_only", "sample_only")


def test_one_replica_is_singular(tmp_path, capsys):
    one_line_error(capsys, cli_args(tmp_path, data_parallel=2), "this run has 1 replica (processes)")


def test_help_lists_the_allowed_values_of_every_choice_field(capsys):
    with pytest.raises(SystemExit):
        main.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    hints = typing.get_type_hints(main.TrainConfig, include_extras=True)
    for f in dataclasses.fields(main.TrainConfig):
        typ = typing.get_args(hints[f.name])[0]
        if typing.get_origin(typ) is typing.Literal:
            assert f"--{f.name} {{{','.join(typing.get_args(typ))}}}" in text, f.name
        elif typ is bool:
            assert f"--{f.name} [{{true,false}}]" in text, f.name


# --- start-up lines ----------------------------------------------------------------------------------------------


def test_a_run_shorter_than_its_warmup_says_so_at_start_up(run_copy, trained, capsys):
    out = run(run_copy, capsys, steps=16, warmup_steps=100, beta1_start=0.8, beta1_end=0.9, beta1_warmup_steps=30).out
    note = [line for line in out.splitlines() if line.startswith("note: warmup_steps")]
    assert len(note) == 1 and "lr peaks at 3.20e-03 (16.0% of lr)" in note[0] and "lower --warmup_steps" in note[0], out
    assert "note: beta1_warmup_steps outlasts the run: beta1 stops at 0.85; lower --beta1_warmup_steps" in out, out
    assert "warmup_steps" not in trained.stdout  # warmup 2 of 12 steps: nothing to say


def test_compile_on_the_cpu_is_named_in_the_start_up_line(run_copy, trained, capsys, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)  # the notice, not a 30 s compile
    out = run(run_copy, capsys, steps=16, compile="true").out
    assert re.search(r"^device: cpu .*torch\.compile on", out, re.M), out
    assert "torch.compile" not in trained.stdout  # compile=auto is off on the CPU


def test_a_torch_run_prints_no_backend_line(trained, tmp_path, capsys):
    capsys.readouterr()
    main.main(cli_args(tmp_path / "prep", prepare_only="true", max_docs=10))
    out = capsys.readouterr().out
    assert "val 1 article," in out and "train 9 articles" in out  # singular where it is one
    for printed in (out, trained.stdout):
        assert "backend" not in printed and "ttml" not in printed, printed


def test_sample_only_names_the_checkpoints_shape_when_the_flags_differ(run_copy, capsys):
    out = run(run_copy, capsys, sample_only="true", n_layer=3, seq_len=1024).out
    assert "model shape comes from the checkpoint" in out and "'n_layer': 2" in out and "'seq_len': 32" in out
    assert "model shape" not in run(run_copy, capsys, sample_only="true").out  # the flags agree


# --- the progress bar on a terminal, log lines in a file ---------------------------------------------------------


class RecordingBar:
    """tqdm as train() uses it, recording what the bar shows after each update."""

    shown = []

    def __init__(self, *a, disable=False, initial=0, **kw):
        self.disable, self.n = disable, initial

    def set_postfix(self, ordered_dict=None, refresh=True):
        self.postfix = dict(ordered_dict)

    def update(self, n):
        self.n += n
        if not self.disable:
            RecordingBar.shown.append((self.n, self.postfix["loss"]))

    def write(self, s):
        print(s)

    def close(self):
        pass

    __enter__ = lambda self: self  # noqa: E731
    __exit__ = lambda self, *exc: None  # noqa: E731


def test_on_a_terminal_the_bar_shows_each_steps_own_loss(run_copy, capsys, monkeypatch):
    monkeypatch.setattr(main, "tqdm", RecordingBar)
    monkeypatch.setattr(RecordingBar, "shown", [])
    for stream in (sys.stdout, sys.stderr):
        monkeypatch.setattr(stream, "isatty", lambda: True)
    out = run(run_copy, capsys, steps=16).out
    rows = train_rows(run_copy)
    assert RecordingBar.shown == [(s, f"{rows[s]['loss']:.3f}") for s in range(13, 17)]
    assert not re.search(r"^step \d+/", out, re.M)  # the bar, not log lines


def test_in_a_log_file_each_step_is_one_greppable_line_and_no_carriage_return(run_copy, capsys):
    printed = run(run_copy, capsys, steps=16, export_hf="true")  # the HF export writes no bar either
    rows, lines = train_rows(run_copy), re.findall(r"^step (\d+)/16 \| loss (\S+) \| lr (\S+) \|.*$", printed.out, re.M)
    assert [(int(s), float(loss), float(lr)) for s, loss, lr in lines] == [
        (s, round(rows[s]["loss"], 3), float(f"{rows[s]['lr']:.2e}")) for s in range(13, 17)
    ]
    assert "\r" not in printed.out + printed.err and os.path.exists(run_copy / "hf" / "model.safetensors")


# --- what is meant for sharing -----------------------------------------------------------------------------------


def test_the_model_card_holds_no_local_path_and_no_tt_metal_none(trained):
    card = (trained.out / "hf" / "README.md").read_text()
    config = json.loads(card.split("```json\n", 1)[1].split("```", 1)[0])
    assert "| data | wiki_fixture.parquet |" in card and "tt-metal" not in card
    assert os.path.dirname(FIXTURE) not in card and str(trained.out) not in card and ROOT not in card
    assert "data_files" not in config and "out_dir" not in config and config["n_layer"] == 2


@pytest.fixture
def plotted(monkeypatch):
    """What each loss_curve.png shows: its title and its lines (label, marker, y values)."""
    seen, save = [], matplotlib.figure.Figure.savefig

    def savefig(fig, *a, **kw):
        ax = fig.axes[0]
        seen.append((ax.get_title(), {ln.get_label(): (ln.get_marker(), ln.get_ydata()) for ln in ax.get_lines()}))
        return save(fig, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return seen


def test_plot_title_names_many_input_files_briefly_and_marks_a_one_point_series(tmp_path, capsys, plotted):
    inputs = tmp_path / "my data dir"
    inputs.mkdir()
    for i in range(5):
        shutil.copy(FIXTURE, inputs / f"part{i}.parquet")
    run(tmp_path / "run", capsys, data_files=inputs / "*.parquet", max_docs=12, steps=1, eval_every=1)
    title, lines = plotted[-1]
    assert title.splitlines()[-1] == "part0.parquet and 4 more files" and str(tmp_path) not in title
    assert lines["train (raw)"][0] == "o" and len(lines["train (raw)"][1]) == 1


def test_plot_smooths_the_train_loss_with_a_bias_corrected_ema(run_copy, capsys, plotted):
    run(run_copy, capsys, steps=16)
    loss = np.array([r["loss"] for r in train_rows(run_copy).values()])
    t = np.arange(1, len(loss) + 1)
    want = [(0.1 * 0.9 ** (k - t[:k]) * loss[:k]).sum() / (1 - 0.9**k) for k in t]
    assert np.allclose(plotted[-1][1]["train (EMA 0.9)"][1], want)


# --- the prompt's <|endoftext|> ------------------------------------------------------------------------------------


def sample_text(stdout):
    return stdout.split("--- sample 1/1 (greedy) ---\n", 1)[1][:-1]  # print's newline off


def test_endoftext_in_a_prompt_is_eos_in_main_py_and_in_the_exported_tokenizer(trained, run_copy, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fed, next_logits = [], main.TorchBackend.next_logits
    monkeypatch.setattr(main.TorchBackend, "next_logits", lambda b, ids: fed.append(list(ids)) or next_logits(b, ids))

    def sample(prompt):  # -> (main.py's greedy text, the ids its sampler started from)
        fed.clear()
        return sample_text(run(run_copy, capsys, sample_only="true", sample_prompt=prompt).out), fed[0]

    prompt = "<|endoftext|>The history of"
    ours, started = sample(prompt)
    tok = AutoTokenizer.from_pretrained(trained.out / "hf")
    ids = tok(prompt, return_tensors="pt").input_ids
    assert started == ids[0].tolist() and started[0] == main.EOS_ID and len(started) == 4
    model = AutoModelForCausalLM.from_pretrained(trained.out / "hf")
    theirs = tok.decode(model.generate(ids, max_new_tokens=TINY["sample_tokens"], do_sample=False)[0])
    assert ours.startswith(theirs) and theirs.startswith(prompt)  # transformers stops at EOS, main.py goes on
    # main.py's output for an empty prompt starts with <|endoftext|>; pasted back, it means the same
    empty = sample("")
    assert empty[0].startswith("<|endoftext|>") and sample("<|endoftext|>") == empty == (empty[0], [main.EOS_ID])


# --- MFU's device table ----------------------------------------------------------------------------------------------


def test_peak_flops_matches_whole_device_names_not_prefixes():
    table = main.PEAK_FLOPS
    assert any(a != b and b.startswith(a) for a in table for b in table)  # L4 / L40 / L40S, A10 / A100
    for key, (half, single) in table.items():
        assert main.peak_flops(f"NVIDIA {key}", "bfloat16") == half
        assert main.peak_flops(f"NVIDIA GeForce {key}", "float32") == single
    assert main.peak_flops("NVIDIA L40S", "bfloat16") == table["L40S"][0] != table["L4"][0]
    assert main.peak_flops("NVIDIA A100-SXM4-80GB", "bfloat16") == table["A100"][0]
    assert main.peak_flops("NVIDIA A10G", "bfloat16") is None  # not in the table: unknown, never the A10's
    assert main.peak_flops("NVIDIA L4", "bfloat16") == table["L4"][0]


# --- the README's metrics schema -----------------------------------------------------------------------------------


def test_readme_metrics_schema_lists_every_key_the_rows_hold(trained):
    readme = pathlib.Path(os.path.join(ROOT, "README.md")).read_text()
    for kind, keys in main.ROW_KEYS.items():
        assert f'{{"kind":"{kind}",' + ",".join(f'"{k}"' for k in keys) + "}" in readme, kind
    for row in read_jsonl(trained.out / "metrics.jsonl"):
        assert sorted(row) == sorted(["kind", *main.ROW_KEYS[row["kind"]]])


# --- wording -------------------------------------------------------------------------------------------------------


def test_damaged_input_before_any_shard_says_so_without_a_count(tmp_path, capsys):
    raw = [b"fine text " * 50, b"bad \xc3\x28 bytes " * 40]  # a string column holding invalid UTF-8
    offsets = pa.py_buffer(np.array([0, len(raw[0]), len(raw[0]) + len(raw[1])], np.int32).tobytes())
    text = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"".join(raw))])
    pq.write_table(pa.table({"text": text}), tmp_path / "bad.parquet")
    err = one_line_error(
        capsys, cli_args(tmp_path / "run", data_files=tmp_path / "bad.parquet", prepare_only="true"), "damaged"
    )
    assert "no shard was finished" in err and "0 finished" not in err
