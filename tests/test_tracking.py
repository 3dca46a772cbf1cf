"""Experiment tracking: the W&B run (offline) gets what metrics.jsonl gets, the `run` row, the self-contained hf/."""
import dataclasses
import glob
import json
import os
import struct
import sys

import pytest
import torch

from conftest import cli_args, main, read_jsonl, run_main, tiny_cfg

WANDB_ARGS = dict(steps=8, eval_every=4, warmup_steps=2, lr=3e-3, export_hf="false", sample_tokens=4,
                  peak_flops=1e12, wandb_project="tracking-test")  # a peak FLOP/s so the CPU run has an MFU to log


def wandb_env(tmp_path):
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}


def offline_runs(tmp_path):
    """{run id: [.wandb files]}: an offline run's folder is wandb/offline-run-<time>-<id>."""
    runs = {}
    for f in sorted(glob.glob(os.path.join(tmp_path, "wandb", "offline-run-*", "*.wandb"))):
        runs.setdefault(os.path.basename(os.path.dirname(f)).rsplit("-", 1)[1], []).append(f)
    return runs


def wandb_records(path):
    """The protobuf Records of an offline run file: W&B's 7-byte header, then a LevelDB log (32 KiB blocks of
    chunks, each crc32, length, type; FULL=1 and LAST=4 end a record; a block tail under 7 bytes is padding)."""
    from wandb.proto import wandb_internal_pb2 as pb
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def wandb_history(paths):
    """{step: {key: value}} over the files' history records, and the config keys they set."""
    history, config = {}, {}
    for path in paths:
        for r in wandb_records(path):
            if r.HasField("history"):
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                history.setdefault(items.pop("_step"), {}).update(items)
            elif r.HasField("config"):
                config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    return history, config


def numbers(rows):
    return [r for r in rows if r["kind"] in ("train", "eval")]


def test_offline_wandb_run_holds_every_metrics_row_the_config_curve_and_samples(tmp_path):
    out = tmp_path / "run"
    p = run_main(cli_args(out, **WANDB_ARGS, wandb_run_name="tiny"), env=wandb_env(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    (run_id, files), = offline_runs(tmp_path).items()
    history, config = wandb_history(files)
    rows = numbers(read_jsonl(out / "metrics.jsonl"))
    assert {r["kind"] for r in rows} == {"train", "eval"}
    for r in rows:  # every number metrics.jsonl got, at the same micro-step
        for k in ("loss", "lr", "beta1", "tok_per_s", "mfu", "val_loss"):
            if k in r:
                assert history[r["step"]][k] == pytest.approx(r[k], rel=1e-6), (r["step"], k)
    assert config["n_embd"] == 32 and config["steps"] == 8  # the TrainConfig, as the run's config
    assert config["run"]["fingerprint"] == read_jsonl(out / "metrics.jsonl")[0]["fingerprint"]
    media = os.path.join(os.path.dirname(files[0]), "files", "media")
    assert glob.glob(os.path.join(media, "images", "loss_curve_*.png"))
    table, = glob.glob(os.path.join(media, "table", "samples_*.table.json"))
    with open(table) as f:
        assert json.load(f)["data"][0][1] == p.stdout.split("(greedy) ---\n", 1)[1].strip()
    assert torch.load(out / "ckpt.pt", weights_only=False)["meta"]["wandb_id"] == run_id


def test_resume_continues_the_wandb_run_and_adds_a_run_row(tmp_path):
    out = tmp_path / "run"
    assert run_main(cli_args(out, **WANDB_ARGS), env=wandb_env(tmp_path)).returncode == 0
    p = run_main(cli_args(out, **{**WANDB_ARGS, "steps": 12}) + ["--init_from=resume"], env=wandb_env(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    (run_id, files), = offline_runs(tmp_path).items()  # one W&B run id, in two offline run folders
    assert len(files) == 2
    assert torch.load(out / "ckpt.pt", weights_only=False)["meta"]["wandb_id"] == run_id
    history, _ = wandb_history(files[1:])
    assert min(history) > 8 and history[12]["val_loss"] > 0  # the resumed run logs on from the checkpoint
    rows = read_jsonl(out / "metrics.jsonl")
    runs = [r for r in rows if r["kind"] == "run"]
    assert rows[0] == runs[0] and runs[0]["resumed_from"] is None and runs[1]["resumed_from"] == 8
    assert runs[1]["config"]["steps"] == 12 and runs[1]["fingerprint"] == runs[0]["fingerprint"]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 4, 8, 12]


def test_run_row_opens_metrics_with_config_data_code_and_versions(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=4, eval_every=2)
    manifest = main.prepare(cfg, log=lambda *a: None)
    backend = main.make_backend(cfg, main.Dist(), None)
    main.train(cfg, manifest, backend, main.Dist())
    row = read_jsonl(tmp_path / "metrics.jsonl")[0]
    assert row == {"kind": "run", "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
                   "fingerprint": manifest["fingerprint"], "git": main.git_commit(), "torch": torch.__version__,
                   "ttml": None, "device": "cpu", "world": 1, "data_parallel": 1, "resumed_from": None,
                   "dist_backend": None, "changed": None}
    assert row["git"] is None or len(row["git"]) == 40


def test_pipeline_on_the_export_generates_main_py_greedy_text_offline(tmp_path, capsys):
    from transformers import AutoTokenizer, pipeline
    cfg = tiny_cfg(tmp_path, steps=20, eval_every=10, lr=3e-3, sample_tokens=12)
    main.run(cfg)
    ours = capsys.readouterr().out.split("(greedy) ---\n", 1)[1].strip()
    hf = str(tmp_path / "hf")
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
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    val = [r["val_loss"] for r in rows if r["kind"] == "eval"][-1]
    assert f"{val:.4f}" in card and f"{20 * 32 * 4:,}" in card and cfg.data_files in card and "lm_eval" in card


def test_wandb_project_without_wandb_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets when it is not installed
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main.main(cli_args(out, wandb_project="x"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install wandb" in err
    assert not out.exists()
