"""--init_from=<a transformers GPT-2 folder or hub name>, --eval_only and bits per byte, checked against transformers
on tiny GPT-2s made here (no download): the same val loss and greedy sample, the round trip through hf/, a run
from the folder that trains and resumes, the TT stand-in's load and export, and one-line refusals of bad folders."""

import contextlib
import io
import json
import math
import os
import shutil
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fake_ttml
from conftest import FIXTURE, TINY, cli_args, logged, main, one_line_error, read_jsonl

SHAPE = dict(n_layer=2, n_head=2, n_embd=32)
# TINY without the model's shape: the folder's config.json gives it
FLAGS = {k: v for k, v in TINY.items() if k not in ("n_layer", "n_head", "n_embd", "seq_len")}
TRAIN = dict(steps=8, eval_every=4, lr=1e-2, warmup_steps=2, total_optim_steps=8)


def gpt2_folder(path, n_positions=64, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_positions=n_positions, **SHAPE)).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2") / "tiny"
    return types.SimpleNamespace(path=str(path), model=gpt2_folder(path))


def argv(out, **kw):
    return [f"--{k}={v}" for k, v in {"data_files": FIXTURE, "out_dir": str(out), **FLAGS, **kw}.items()]


def run(args):
    """main.main(args) in this process: -> what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main.main([str(a) for a in args])
    return printed.getvalue()


def windows(out, seq_len, batch_size=TINY["batch_size"], eval_iters=TINY["eval_iters"]):
    """The val batches main.py evaluates, read from the prepared shards."""
    manifest = main.read_json(os.path.join(out, "manifest.json"))
    cfg = types.SimpleNamespace(seq_len=seq_len, batch_size=batch_size, eval_iters=eval_iters)
    return main.val_batches(main.TokenStream(str(out), manifest["splits"]["val"]), cfg, batch_size, 1)


def hf_loss(model, batches):
    """transformers' mean cross-entropy over the windows, and its total nats."""
    losses = []
    with torch.no_grad():
        for x, y in batches:
            logits = model(torch.from_numpy(x.astype(np.int64))).logits
            losses.append(F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y.astype(np.int64)).flatten()))
    return float(sum(losses) / len(losses)), float(sum(losses)) * batches[0][1].size


def test_eval_only_gives_transformers_val_loss_bits_per_byte_and_greedy_sample(folder, tmp_path):
    out = tmp_path / "eval"
    printed = run(argv(out, init_from=folder.path, eval_only="true", sample_tokens=12))
    assert "n_layer 2, n_head 2, n_embd 32, seq_len 64" in printed  # taken from config.json, and said so
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["kind"] for r in rows] == ["run", "eval"]
    assert rows[0]["pretrained"]["path"] == os.path.abspath(folder.path) and rows[0]["config"]["n_embd"] == 32
    batches = windows(out, 64)
    loss, nats = hf_loss(folder.model, batches)
    enc = main.get_tokenizer()  # tiktoken's GPT-2 BPE, built offline
    nbytes = sum(len(enc.decode_bytes([t for t in y.ravel().tolist() if t != main.EOS_ID])) for _, y in batches)
    assert abs(rows[1]["val_loss"] - loss) < 1e-4
    assert abs(rows[1]["val_bpb"] - nats / (math.log(2) * nbytes)) < 1e-4
    assert f"val loss {loss:.4f}, {rows[1]['val_bpb']:.4f} bits per byte" in printed
    prompt = enc.encode_ordinary(main.TrainConfig.sample_prompt)
    greedy = folder.model.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=main.EOS_ID, attention_mask=None
    )
    assert printed.rstrip().endswith(enc.decode(greedy[0].tolist()))
    assert not {"ckpt.pt", "hf", "loss_curve.png"} & set(os.listdir(out))  # nothing trained, nothing saved


def test_padding_rows_take_no_loss_and_conv1d_weights_are_transposed(folder):
    from safetensors.torch import load_file

    cfg = main.TrainConfig(seq_len=64, **SHAPE)
    sd = main.from_hf(load_file(os.path.join(folder.path, "model.safetensors")), cfg, folder.path)
    hf = folder.model.state_dict()
    assert torch.equal(sd["transformer.h.0.mlp.c_fc.weight"], hf["transformer.h.0.mlp.c_fc.weight"].t())
    assert sd["lm_head.weight"] is sd["transformer.wte.weight"] and len(sd["lm_head.weight"]) == main.PADDED_VOCAB
    model = main.GPT(cfg)
    model.load_state_dict(sd)
    with torch.no_grad():
        model.transformer.wte.weight[main.VOCAB_SIZE :] = 100.0  # padding rows that would win every softmax
        x = torch.randint(0, main.VOCAB_SIZE, (2, 64))
        loss, logits = model(x, x), model(x)
        ref = folder.model(x).logits
    assert logits.shape[-1] == main.VOCAB_SIZE and torch.allclose(logits, ref, atol=1e-4)
    assert abs(float(loss) - float(F.cross_entropy(ref.flatten(0, 1), x.flatten()))) < 1e-4


def test_a_run_from_the_folder_trains_resumes_exactly_and_round_trips_through_hf(folder, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run(argv(whole, init_from=folder.path, **TRAIN))
    rows = read_jsonl(whole / "metrics.jsonl")
    train = [r["loss"] for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert train[-1] < train[0] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert [r["optim_step"] for r in rows if r["kind"] == "train"][0] == 0  # the schedule starts at step 0
    card = (whole / "hf" / "README.md").read_text()
    assert f"started from | {folder.path}" in card
    assert "bits/byte" in card and "val_bpb" in evals[-1]
    # the same command continues its own run: stopped at step 4, then run to 8, it logs what the whole run did
    run(argv(parts, init_from=folder.path, export_hf="false", **{**TRAIN, "steps": 4}))
    again = run(argv(parts, init_from=folder.path, export_hf="false", **TRAIN))
    assert "continuing the run" in again and logged(parts) == logged(whole)
    # out_dir/hf back in: its val loss is the run's own final one
    check = tmp_path / "check"
    run(argv(check, init_from=whole / "hf", eval_only="true"))
    assert abs(read_jsonl(check / "metrics.jsonl")[-1]["val_loss"] - evals[-1]["val_loss"]) < 1e-4


def test_a_hub_name_loads_from_the_cache_offline_and_without_it_says_what_to_download(
    folder, tmp_path, monkeypatch, capsys
):
    import huggingface_hub

    cache = tmp_path / "hub"  # the cache's layout: models--<org>--<name>/{refs/main, snapshots/<commit>/}
    snap = cache / "models--someone--tiny-gpt2" / "snapshots" / ("ab" * 20)
    shutil.copytree(folder.path, snap)
    (cache / "models--someone--tiny-gpt2" / "refs").mkdir()
    (cache / "models--someone--tiny-gpt2" / "refs" / "main").write_text("ab" * 20)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # conftest: no network
    run(argv(tmp_path / "o", init_from="someone/tiny-gpt2", eval_only="true"))
    assert read_jsonl(tmp_path / "o" / "metrics.jsonl")[0]["pretrained"]["revision"] == "ab" * 20
    one_line_error(capsys, argv(tmp_path / "n", init_from="someone/not-cached"), "hf download someone/not-cached")
    assert not (tmp_path / "n").exists()


def bad_folders(root, good):
    """name -> (a folder, a word its refusal names)."""
    made = {}

    def copy(name, edit=None, drop=()):
        d = root / name
        shutil.copytree(good, d)
        for f in drop:
            os.remove(d / f)
        if edit:
            c = json.loads((d / "config.json").read_text())
            c.update(edit)
            (d / "config.json").write_text(json.dumps(c))
        made[name] = d
        return d

    copy("llama", {"model_type": "llama"})
    copy("no_weights", drop=["model.safetensors"])
    copy("shape", {"n_embd": 64})
    d = copy("corrupt")
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000])
    from safetensors.torch import load_file, save_file

    d = copy("partial")
    sd = load_file(d / "model.safetensors")
    save_file({k: v for k, v in sd.items() if "h.1.mlp" not in k}, d / "model.safetensors")
    d = copy("pickle", drop=["model.safetensors"])
    torch.save(sd, d / "pytorch_model.bin")  # transformers' old pickle format
    return {
        "llama": (made["llama"], "model_type 'llama'"),
        "no_weights": (made["no_weights"], "safetensors only"),
        "shape": (made["shape"], "not (50304, 64)"),
        "corrupt": (made["corrupt"], "not a readable safetensors"),
        "partial": (made["partial"], "transformer.h.1.mlp"),
        "pickle": (made["pickle"], "a .bin is a pickle"),
    }


def test_bad_folders_and_clashing_flags_are_one_line_and_leave_out_dir_alone(folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("untouched")
    for path, word in bad_folders(tmp_path, folder.path).values():
        one_line_error(capsys, argv(out, init_from=path, eval_only="true"), word)
    one_line_error(capsys, argv(out, init_from=folder.path, n_layer=3), "--n_layer=3", "n_layer")
    one_line_error(capsys, argv(out, init_from=folder.path, seq_len=128), "n_positions 64")
    one_line_error(capsys, argv(out, init_from="no/such/dir"), "not a folder")
    assert sorted(os.listdir(out)) == ["keep.txt"]


def test_the_tt_stand_in_loads_the_folder_and_exports_what_transformers_reads(folder, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    monkeypatch.setenv("TT_METAL_RUNTIME_ROOT", "/opt/tt-metal")
    cfg = main.TrainConfig(seq_len=64, backend="ttml", dropout=0.0, **SHAPE)
    sd = main.from_hf(load_file(os.path.join(folder.path, "model.safetensors")), cfg, folder.path)
    for tt_optimizer in ("fp32_master", "bf16"):
        backend = main.TtmlBackend(
            main.dataclasses.replace(cfg, tt_optimizer=tt_optimizer), *fake_ttml.make_fake_tt_train()
        )
        backend.load_state_dict({"model": main.to_tt(sd)})
        ids = np.random.default_rng(0).integers(0, main.VOCAB_SIZE, 20)
        with torch.no_grad():
            ref = folder.model(torch.from_numpy(ids[None])).logits[0, -1].numpy()
        np.testing.assert_allclose(backend.next_logits(ids), ref, atol=0.02 * np.abs(ref).max(), rtol=0.02)
        # the optimizers hold the loaded weights (fp32_master: its masters): a step at lr 0 leaves them as they were
        x = np.random.default_rng(1).integers(0, main.VOCAB_SIZE, (1, 64)).astype(np.uint16)
        backend.train_micro_step(x, np.roll(x, -1, axis=1))
        backend.optimizer_step(0.0, 0.9)
        np.testing.assert_allclose(backend.next_logits(ids), ref, atol=0.02 * np.abs(ref).max(), rtol=0.02)
        exported = main.from_tt(backend.state_dict()["model"], cfg)
        backend.close()
        main.export_hf(exported, cfg, str(tmp_path / tt_optimizer), "card", 0)
        back = GPT2LMHeadModel.from_pretrained(tmp_path / tt_optimizer).eval()
        with torch.no_grad():
            got = back(torch.from_numpy(ids[None])).logits[0, -1].numpy()
        np.testing.assert_allclose(got, ref, atol=0.02 * np.abs(ref).max(), rtol=0.02)


def test_sharded_safetensors_and_bare_key_names_load_the_same_weights_and_a_missing_shard_is_refused(folder, tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = main.TrainConfig(init_from=folder.path)
    _, want, _ = main.read_pretrained(cfg)
    sharded, bare = tmp_path / "sharded", tmp_path / "bare"
    folder.model.save_pretrained(sharded, max_shard_size="2MB")
    assert (sharded / "model.safetensors.index.json").exists()
    shutil.copytree(folder.path, bare)  # the hub's openai-community/gpt2 layout: no `transformer.` prefix
    sd = load_file(bare / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in sd.items()}, bare / "model.safetensors")
    for path in (sharded, bare):
        got_cfg, got, source = main.read_pretrained(main.TrainConfig(init_from=str(path)))
        assert (got_cfg.n_embd, got_cfg.seq_len) == (32, 64) and source["from_config"]["n_embd"] == 32
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    os.remove(sorted(sharded.glob("model-*.safetensors"))[-1])
    with pytest.raises(main.UserError, match="has no model-0000"):
        main.read_pretrained(main.TrainConfig(init_from=str(sharded)))


def test_a_tt_run_from_the_folder_writes_the_hf_export_a_torch_eval_agrees_with(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(main, "import_ttml", fake_ttml.make_fake_tt_train)
    monkeypatch.setenv("TT_METAL_RUNTIME_ROOT", "/opt/tt-metal")
    out = tmp_path / "tt"
    run(argv(out, init_from=folder.path, backend="ttml", device="auto", steps=2, eval_every=2, lr=1e-3, warmup_steps=1))
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "eval"]
    loss, _ = hf_loss(folder.model, windows(out, 64))
    assert abs(evals[0]["val_loss"] - loss) < 0.02  # the loaded model, in bf16
    check = tmp_path / "check"
    run(argv(check, init_from=out / "hf", eval_only="true"))
    assert abs(read_jsonl(check / "metrics.jsonl")[-1]["val_loss"] - evals[-1]["val_loss"]) < 0.02


def test_on_ttml_padding_rows_take_no_share_of_the_loss_when_the_logits_are_far_below_zero(folder, monkeypatch):
    import copy

    monkeypatch.setenv("TT_METAL_RUNTIME_ROOT", "/opt/tt-metal")
    model, u = copy.deepcopy(folder.model), torch.nn.functional.normalize(torch.randn(32), dim=0)
    with torch.no_grad():  # every row shares a direction the final hidden state points away from, as in GPT-2
        model.transformer.wte.weight += 3 * u
        model.transformer.ln_f.bias.copy_(-10 * u)
    cfg = main.TrainConfig(seq_len=64, backend="ttml", dropout=0.0, **SHAPE)
    backend = main.TtmlBackend(cfg, *fake_ttml.make_fake_tt_train())
    backend.load_state_dict({"model": main.to_tt(main.from_hf(model.state_dict(), cfg, "test"))})
    x = np.random.default_rng(2).integers(0, main.VOCAB_SIZE, (2, 64)).astype(np.uint16)
    y = np.roll(x, -1, axis=1)
    with torch.no_grad():
        logits = model(torch.from_numpy(x.astype(np.int64))).logits
    assert logits.max() < -10  # where zero padding rows (logit 0) would take nearly all the mass
    ref = float(F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y.astype(np.int64)).flatten()))
    assert abs(backend.eval_loss(x, y) - ref) < 0.1
    backend.close()


def test_eval_only_on_a_runs_out_dir_measures_that_run_and_writes_no_checkpoint(run_copy, trained):
    before = {n: os.stat(run_copy / n).st_mtime_ns for n in ("ckpt.pt", "loss_curve.png", "hf")}
    final = read_jsonl(run_copy / "metrics.jsonl")[-1]
    printed = run([*trained.args, f"--out_dir={run_copy}", "--eval_only=true"])  # the last --out_dir wins
    rows = read_jsonl(run_copy / "metrics.jsonl")
    assert [r["kind"] for r in rows[-2:]] == ["run", "eval"] and rows[-1]["step"] == final["step"] == 12
    assert abs(rows[-1]["val_loss"] - final["val_loss"]) < 1e-6 and rows[-1]["val_bpb"] > 0
    assert f"eval_only at step 12: val loss {final['val_loss']:.4f}" in printed and "--- sample 1/1" in printed
    assert before == {n: os.stat(run_copy / n).st_mtime_ns for n in before}


def test_a_model_over_another_run_is_refused_unless_overwrite_and_then_it_is_a_new_run(folder, run_copy, capsys):
    args = cli_args(run_copy, init_from=folder.path, eval_only="true")
    one_line_error(capsys, args, "init_from=auto, not this one", "--overwrite=true")
    assert (run_copy / "ckpt.pt").exists()
    run([*args, "--overwrite=true"])
    rows = read_jsonl(run_copy / "metrics.jsonl")
    assert [r["kind"] for r in rows] == ["run", "eval"] and rows[0]["pretrained"]["init_from"] == folder.path
    assert not {"ckpt.pt", "hf", "loss_curve.png"} & set(os.listdir(run_copy))
