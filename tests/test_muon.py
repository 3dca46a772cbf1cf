"""optimizer=muon: Muon on the blocks' matrices and AdamW on the rest, on the torch path (one process, SIGTERM and
resume, gloo data parallel) and on the TT stand-in (its Muon follows the pin's muon.cpp); bad input is one line."""

import os
import signal

import numpy as np
import pytest
import torch
from test_ttml_backend import batch, cfg_
from test_ttml_cli import args as tt_args
from test_ttml_cli import sigterm_at, tensors, tt_env, tt_here  # noqa: F401 - tt_env, tt_here: fixtures

from conftest import (
    ROOT,
    RUN,
    TWO_RANKS,
    cli_args,
    copy_run,
    logged,
    main,
    one_line_error,
    read_jsonl,
    start_held,
    torchrun,
    wait_for,
)

MUON = dict(RUN, optimizer="muon", export_hf="false")
TINY_CPU = dict(n_layer=2, n_head=2, n_embd=32, seq_len=32, device="cpu", backend="torch", compile="false")


@pytest.fixture(scope="module")
def muon_run(tmp_path_factory):
    """One unbroken Muon run of the shared run's model and batch, made in this process: its out_dir."""
    out = tmp_path_factory.mktemp("muon") / "run"
    main.main(cli_args(out, **MUON))
    return out


def checkpoint(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)


def test_muon_takes_the_block_matrices_and_its_momentum_warms_up():
    cfg = main.TrainConfig(**{**TINY_CPU, "optimizer": "muon", "beta1_start": 0.85, "beta1_warmup_steps": 10})
    b = main.TorchBackend(cfg, main.Dist())
    names = {id(p): n for n, p in b.raw.named_parameters()}
    assert sorted(names[id(p)] for p in b.muon.param_groups[0]["params"]) == sorted(
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    adamw = [names[id(p)] for g in b.optimizer.param_groups for p in g["params"]]
    assert "transformer.wte.weight" in adamw and len(adamw) + 8 == len(names)
    assert main.beta1_at(0, cfg) == 0.85 and main.beta1_at(10, cfg) == cfg.muon_momentum == 0.95
    x = np.random.default_rng(0).integers(0, 50257, (4, 32)).astype(np.uint16)
    b.train_micro_step(x, x)
    b.optimizer_step(cfg.lr / 2, 0.9)  # half the peak lr: Muon's lr is halved too; the momentum goes to Muon
    assert b.muon.param_groups[0]["lr"] == pytest.approx(cfg.muon_lr / 2) and b.muon.param_groups[0]["momentum"] == 0.9
    assert all(g["betas"][0] == cfg.beta1 for g in b.optimizer.param_groups)


def test_a_muon_run_stopped_by_sigterm_and_continued_ends_with_the_unbroken_runs_weights(muon_run, shards, tmp_path):
    cut = copy_run(shards, tmp_path / "cut")
    args = cli_args(cut, **MUON)
    proc, held = start_held(args, 6, tmp_path)
    reached = wait_for(held.exists, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert reached and proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert checkpoint(cut)["meta"]["step"] == 6
    main.main(args)
    a, b = checkpoint(muon_run), checkpoint(cut)
    assert len(a["muon"]["state"]) == 8  # one momentum buffer per block matrix
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for part in ("optimizer", "muon"):
        for i, s in a[part]["state"].items():
            assert all(torch.equal(v, b[part]["state"][i][k]) for k, v in s.items() if torch.is_tensor(v)), (part, i)
    assert logged(cut) == logged(muon_run)  # every train and eval number, bit for bit


def test_a_resume_refuses_to_change_the_optimizer(muon_run, tmp_path, capsys):
    run = copy_run(muon_run, tmp_path / "run")
    one_line_error(capsys, cli_args(run, **{**MUON, "optimizer": "adamw", "steps": 16}), "optimizer muon -> adamw")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_two_gloo_ranks_with_muon_stay_identical_and_match_one_process_with_the_doubled_batch(
    muon_run, shards, tmp_path
):
    script = tmp_path / "digests.py"  # main.py, with each rank writing a digest of its weights at the end
    script.write_text(
        "import hashlib, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import main\n"
        "real = main.finish\n"
        "def finish(cfg, backend, dist, *rest):\n"
        "    w = b''.join(t.numpy().tobytes() for t in backend.raw.state_dict().values())\n"
        f"    open({str(tmp_path)!r} + f'/rank{{dist.rank}}', 'w').write(hashlib.sha256(w).hexdigest())\n"
        "    real(cfg, backend, dist, *rest)\n"
        "main.finish = finish\n"
        "main.main(sys.argv[1:])\n"
    )
    out = copy_run(shards, tmp_path / "run")
    p = torchrun(cli_args(out, **{**TWO_RANKS, "optimizer": "muon"}), script=str(script))
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "rank0").read_text() == (tmp_path / "rank1").read_text()  # bit-identical replicas

    def evals(d):
        return {r["step"]: r["val_loss"] for r in read_jsonl(d / "metrics.jsonl") if r["kind"] == "eval"}

    a, b = evals(out), evals(muon_run)  # 2 ranks x batch 2 against 1 process x batch 4
    assert a.keys() == b.keys() == {0, 4, 8, 12}
    assert a[0] == pytest.approx(b[0], rel=1e-5)
    assert a[12] == pytest.approx(b[12], rel=0.02) and a[12] < a[0] - 1.0


def test_the_tt_stand_ins_muon_trains_and_resumes_exactly(monkeypatch):
    import test_ttml_backend

    import fake_ttml

    for name, value in (("VOCAB_SIZE", test_ttml_backend.V), ("EOS_ID", test_ttml_backend.V - 1), ("TT_VOCAB", 1024)):
        monkeypatch.setattr(main, name, value)
    monkeypatch.setenv("TT_METAL_RUNTIME_ROOT", "/opt/tt-metal")

    def backend():
        return main.TtmlBackend(cfg_(optimizer="muon", n_layer=2), *fake_ttml.make_fake_tt_train())

    x, y = batch(2)
    whole, losses = backend(), []
    for _ in range(3):
        whole.train_micro_step(x, y)
        losses.append(whole.optimizer_step(1e-2, 0.95))
    saved = whole.state_dict()
    assert sorted(saved["optimizer"]) == ["decay", "muon", "no_decay"] and saved["optimizer"]["muon"]["steps"] == 3
    assert len(saved["optimizer"]["muon"]["momentum_buffer"]) == 8
    resumed = backend()
    resumed.load_state_dict(saved)
    for b in (whole, resumed):
        for _ in range(2):
            b.train_micro_step(x, y)
            losses.append(b.optimizer_step(1e-2, 0.95))
    assert losses[2] < losses[0] - 0.5
    a, b = whole.state_dict(), resumed.state_dict()
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for group, state in a["optimizer"].items():
        for key, v in state.items():
            assert (
                v == b["optimizer"][group][key]
                if not isinstance(v, dict)
                else all(torch.equal(t, b["optimizer"][group][key][k]) for k, t in v.items())
            ), (group, key)


def test_a_tt_muon_run_stopped_by_sigterm_and_continued_equals_an_unbroken_one(tt_env, tt_here, shards, tmp_path):  # noqa: F811
    whole, broken = copy_run(shards, tmp_path / "whole"), copy_run(shards, tmp_path / "broken")
    tt_here(tt_args(whole, optimizer="muon"))  # in this process, as the continuation; the stopped run in its own
    rows = [r for r in read_jsonl(os.path.join(whole, "metrics.jsonl")) if r["kind"] == "train"]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    code, err = sigterm_at(tt_args(broken, optimizer="muon"), 5, tt_env, tmp_path)
    assert code == 143 and "Traceback" not in err, err[-3000:]
    assert "continuing the run" in tt_here(tt_args(broken, optimizer="muon"))
    a, b = tensors(whole)[0], tensors(broken)[0]
    assert any("/muon/momentum_buffer/" in k for k in a) and set(a) == set(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.parametrize(
    "given,words",
    [
        ("--optimizer=sgd", ["--optimizer", "'adamw', 'muon'"]),
        ("--muon_lr=0", ["muon_lr=0.0 must be positive"]),
        ("--muon_lr=-1", ["muon_lr=-1.0 must be positive"]),
        ("--muon_lr=nan", ["muon_lr=nan"]),
        ("--muon_lr=inf", ["muon_lr=inf must be a finite number"]),
        ("--muon_momentum=1", ["muon_momentum=1.0 must be in [0, 1)"]),
        ("--muon_momentum=-0.1", ["muon_momentum=-0.1 must be in [0, 1)"]),
    ],
)
def test_bad_muon_options_are_one_line(given, words, tmp_path, capsys):
    one_line_error(capsys, cli_args(tmp_path, **RUN) + [given], *words)
