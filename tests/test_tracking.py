"""Experiment tracking: the W&B run gets what metrics.jsonl gets (through a recording stand-in for the wandb module,
held to the real wandb's signatures where it is installed, and once through the real library offline), the `run`
row, the self-contained hf/."""

import contextlib
import dataclasses
import glob
import importlib.util
import inspect
import io
import json
import os
import pathlib
import struct
import sys
import types

import pytest
import torch

from conftest import RUN, cli_args, copy_run, main, read_jsonl

WANDB_ARGS = dict(
    RUN,
    steps=8,
    export_hf="false",
    peak_flops=1e12,  # a peak FLOP/s, so the CPU run has an MFU
    wandb_project="tracking-test",
)
REAL = importlib.import_module("wandb") if importlib.util.find_spec("wandb") else None


def check_call(real, *args, **kwargs):
    """The call must fit the real wandb's signature (when wandb is installed)."""
    if REAL is not None:
        inspect.signature(real(REAL)).bind(*args, **kwargs)


class FakeRun:
    def __init__(self, run_id):
        self.id, self.history, self.media, self.exit_code = run_id, {}, [], None
        self.config = types.SimpleNamespace(values={}, update=self.update_config)

    def update_config(self, d, allow_val_change=None):
        check_call(lambda w: w.Config.update, None, d, allow_val_change=allow_val_change)
        self.config.values.update(d)

    def log(self, data, step=None, commit=None):
        check_call(lambda w: w.Run.log, None, data, step=step, commit=commit)
        if step is None:
            self.media.append(data)
        else:
            self.history.setdefault(step, {}).update(data)

    def finish(self, exit_code=None):
        check_call(lambda w: w.Run.finish, None, exit_code=exit_code)
        self.exit_code = exit_code


def fake_wandb(monkeypatch):
    """A wandb module that records: .inits (each init's arguments) and .runs (FakeRun each)."""
    w = types.ModuleType("wandb")
    w.inits, w.runs, w.logins = [], [], []

    def init(**kw):
        check_call(lambda w: w.init, **kw)
        w.inits.append(kw)
        w.runs.append(FakeRun(kw.get("id") or f"fake{len(w.runs)}"))
        return w.runs[-1]

    def login(**kw):
        check_call(lambda w: w.login, **kw)
        w.logins.append(kw)
        return True

    def settings(**kw):
        check_call(lambda w: w.Settings, **kw)
        return kw

    def table(columns=None, data=None):
        check_call(lambda w: w.Table, columns=columns, data=data)
        return types.SimpleNamespace(columns=columns, data=data)

    def image(path):
        with open(path, "rb") as f:  # what W&B uploads: the PNG as it is when logged
            return types.SimpleNamespace(png=f.read())

    w.init, w.login, w.Settings, w.Table, w.Image = init, login, settings, table, image
    monkeypatch.setitem(sys.modules, "wandb", w)
    return w


def numbers(rows):
    return [r for r in rows if r["kind"] in ("train", "eval")]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """An 8-step run with --wandb_project: (its out_dir, the fake wandb it logged to, what it printed)."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        w = fake_wandb(mp)
        main.main(cli_args(out, **WANDB_ARGS, wandb_run_name="tiny"))
    return out, w, printed.getvalue()


def test_wandb_run_gets_every_metrics_row_the_config_the_curve_and_the_samples(tracked):
    out, w, printed = tracked
    (init,), (run,) = w.inits, w.runs
    assert (init["project"], init["name"], init["id"]) == ("tracking-test", "tiny", None)
    rows = numbers(read_jsonl(out / "metrics.jsonl"))
    assert {r["kind"] for r in rows} == {"train", "eval"}
    for r in rows:  # every number metrics.jsonl got, at the same micro-step
        for k in ("loss", "lr", "beta1", "tok_per_s", "mfu", "val_loss"):
            if k in r:
                assert run.history[r["step"]][k] == r[k], (r["step"], k)
    config = run.config.values
    assert config["n_embd"] == 32 and config["steps"] == 8  # the TrainConfig, as the run's config
    assert config["run"]["fingerprint"] == read_jsonl(out / "metrics.jsonl")[0]["fingerprint"]
    (media,) = run.media
    assert media["loss_curve"].png[:8] == b"\x89PNG\r\n\x1a\n"
    assert media["samples"].data[0][1] == printed.split("(greedy) ---\n", 1)[1].strip()
    assert run.exit_code == 0
    assert torch.load(out / "ckpt.pt", weights_only=False)["meta"]["wandb_id"] == run.id


def test_resume_continues_the_wandb_run_and_adds_a_run_row(tracked, tmp_path, monkeypatch):
    out = copy_run(tracked[0], tmp_path / "run")
    first = tracked[1].runs[0].id
    w = fake_wandb(monkeypatch)
    main.main(cli_args(out, **{**WANDB_ARGS, "steps": 12}, init_from="resume"))
    (init,), (run,) = w.inits, w.runs
    assert (init["id"], init["resume"]) == (first, "allow")  # the same W&B run, continued
    assert min(run.history) > 8 and run.history[12]["val_loss"] > 0  # it logs on from the checkpoint
    assert torch.load(out / "ckpt.pt", weights_only=False)["meta"]["wandb_id"] == first
    rows = read_jsonl(out / "metrics.jsonl")
    runs = [r for r in rows if r["kind"] == "run"]
    assert rows[0] == runs[0] and runs[0]["resumed_from"] is None and runs[1]["resumed_from"] == 8
    assert runs[1]["config"]["steps"] == 12 and runs[1]["fingerprint"] == runs[0]["fingerprint"]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 4, 8, 12]


def offline_records(run_dir):
    """The protobuf records of an offline run's .wandb file: W&B's 7-byte header, then a LevelDB log (32 KiB blocks
    of chunks, each crc32, length, type; FULL=1 and LAST=4 end a record; a block tail under 7 bytes is padding)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(os.path.join(run_dir, "*.wandb"))
    data = pathlib.Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            yield pb.Record.FromString(buf)
            buf = b""


@pytest.mark.skipif(REAL is None, reason="wandb is not installed (requirements-dev.txt has it)")
def test_the_real_wandb_offline_holds_every_metrics_row_the_config_and_a_clean_exit(tmp_path, monkeypatch):
    """The library itself, offline and without an account, as a user without a login runs it: its run file holds
    every number metrics.jsonl got at the same micro-step, the TrainConfig, the curve and the samples, and exit 0."""
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}
    for k, v in env.items():  # console capture off: pytest owns this process's stdout
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(sys.modules, "wandb", REAL)
    out = tmp_path / "run"
    try:
        main.main(cli_args(out, **WANDB_ARGS))
    finally:
        REAL.teardown()  # the W&B service process this run started
    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    history, config, exits = {}, {}, []
    for r in offline_records(run_dir):
        if r.HasField("history"):
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(items.pop("_step"), {}).update(items)
        elif r.HasField("config"):
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif r.HasField("exit"):
            exits.append(r.exit.exit_code)
    rows = numbers(read_jsonl(out / "metrics.jsonl"))
    assert {r["kind"] for r in rows} == {"train", "eval"}
    for r in rows:
        for k in ("loss", "lr", "beta1", "tok_per_s", "mfu", "val_loss"):
            if k in r:
                assert history[r["step"]][k] == pytest.approx(r[k], rel=1e-9), (r["step"], k)
    assert config["n_embd"] == 32 and config["steps"] == 8
    assert config["run"]["fingerprint"] == read_jsonl(out / "metrics.jsonl")[0]["fingerprint"]
    assert history[8]["loss_curve/_type"] == "image-file" and history[8]["samples/_type"] == "table-file"
    assert exits == [0]
    assert run_dir.endswith("-" + torch.load(out / "ckpt.pt", weights_only=False)["meta"]["wandb_id"])


def test_run_row_opens_metrics_with_config_data_code_and_versions(trained):
    cfg = main.parse_config(trained.args)
    row = read_jsonl(trained.out / "metrics.jsonl")[0]
    assert row == {
        "kind": "run",
        "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
        "fingerprint": main.load_manifest(str(trained.out))[0]["fingerprint"],
        "git": main.git_commit(),
        "torch": torch.__version__,
        "ttml": None,
        "device": "cpu",
        "world": 1,
        "data_parallel": 1,
        "resumed_from": None,
        "dist_backend": None,
        "changed": None,
        "pretrained": None,
    }
    assert row["git"] is None or len(row["git"]) == 40


def test_pipeline_on_the_export_generates_main_py_greedy_text_offline(trained):
    from transformers import AutoTokenizer, pipeline

    cfg = main.parse_config(trained.args)
    ours = trained.stdout.split("(greedy) ---\n", 1)[1].strip()
    hf = str(trained.out / "hf")
    tok = AutoTokenizer.from_pretrained(hf)
    text = "The history of machine learning <|endoftext|> don't 123\n\n  é"
    assert tok(text)["input_ids"] == main.get_tokenizer().encode(text, allowed_special="all")
    with open(os.path.join(hf, "generation_config.json")) as f:
        gen = json.load(f)
    assert gen["eos_token_id"] == gen["bos_token_id"] == main.EOS_ID
    generate = pipeline("text-generation", model=hf, device="cpu")
    theirs = generate(cfg.sample_prompt, max_new_tokens=cfg.sample_tokens, do_sample=False)[0]["generated_text"]
    assert theirs == ours.partition("<|endoftext|>")[0]  # transformers stops at EOS; main.py's sampler goes on
    with open(os.path.join(hf, "README.md")) as f:
        card = f.read()
    rows = read_jsonl(trained.out / "metrics.jsonl")
    val = [r["val_loss"] for r in rows if r["kind"] == "eval"][-1]
    assert f"{val:.4f}" in card and f"{12 * 32 * 4:,}" in card and "lm_eval" in card
    assert "| data | wiki_fixture.parquet |" in card and cfg.data_files not in card  # the name, not the local path


def test_wandb_project_without_wandb_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets when it is not installed
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main.main(cli_args(out, wandb_project="x"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install wandb" in err
    assert not out.exists()
