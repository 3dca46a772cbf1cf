"""`python main.py --backend=ttml` end to end through the CLI, on the pinned build's stand-in laid out as a user's
tt-metal checkout (TT_METAL_HOME=<root>, PYTHONPATH=<root>): prepare, train, eval, checkpoint, SIGTERM, resume,
sample, plot. The runs a signal stops are processes of their own (tests/held_run.py: main.py, holding at a step); the
others are main.main(ARGV) in this process, each on a fresh import of the stand-in, which saves a torch import
apiece. A model of GPT-2's padded vocabulary, so each run takes seconds."""

import os
import signal
import sys

import pytest
import torch

import fake_ttml
from conftest import FIXTURE, ROOT, copy_run, main, read_jsonl, start_held, wait_for

TT_RUN = dict(
    backend="ttml",
    data_files=FIXTURE,
    n_layer=2,
    n_head=2,
    n_embd=32,
    seq_len=32,
    batch_size=4,
    steps=8,
    eval_every=4,
    eval_iters=1,
    warmup_steps=2,
    lr=1e-2,
    sample_tokens=4,
    num_proc=1,
    export_hf="false",
)


@pytest.fixture(scope="module")
def tt_env(tmp_path_factory):
    home = fake_ttml.lay_out_tt_metal(str(tmp_path_factory.mktemp("tt-metal")))
    env = {k: v for k, v in os.environ.items() if k not in ("TT_METAL_RUNTIME_ROOT", "TT_MESH_GRAPH_DESC_PATH")}
    return {**env, "TT_METAL_HOME": home, "PYTHONPATH": os.pathsep.join([home, os.path.join(ROOT, "tests")])}


def args(out, **kw):
    return [f"--{k}={v}" for k, v in {**TT_RUN, "out_dir": str(out), **kw}.items()]


@pytest.fixture
def tt_here(tt_env, monkeypatch, capsys):
    """main.main(ARGV) in this process on tt_env's TT-Train: -> what it printed. Each call imports the stand-in
    afresh, as a new process would (its state lives in its modules); after the test sys.path and sys.modules are
    as before."""
    monkeypatch.setattr(sys, "path", [tt_env["TT_METAL_HOME"], *sys.path])  # PYTHONPATH=<root>: ttnn
    for k in ("TT_METAL_HOME", "TT_METAL_RUNTIME_ROOT", "TT_MESH_GRAPH_DESC_PATH"):
        monkeypatch.setenv(k, tt_env[k]) if k in tt_env else monkeypatch.delenv(k, raising=False)
    modules = set(sys.modules)

    def forget():
        for name in set(sys.modules) - modules:
            del sys.modules[name]

    def run(argv):
        forget()
        capsys.readouterr()
        main.main(argv)
        return capsys.readouterr().out

    yield run
    forget()


def tensors(out):
    state = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)
    flat = {}

    def walk(key, v):
        if isinstance(v, torch.Tensor):
            flat[key] = v
        elif isinstance(v, dict):
            for k, vv in v.items():
                walk(f"{key}/{k}", vv)

    walk("", {k: v for k, v in state.items() if k != "meta"})
    return flat, state["meta"]


def sigterm_at(argv, step, env, tmp_path):
    """The same run held before its optimizer step `step`, sent SIGTERM there: -> (exit code, stderr)."""
    proc, held = start_held(argv, step, tmp_path, env=env)
    assert wait_for(held.exists, proc), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


# Not bf16_stochastic: the pin's AdamW kernel seeds its rounding from std::random_device (adamw_program_factory.cpp),
# so no two of its runs are bit-identical; its checkpoint round trip is tested in test_ttml_backend.py.
@pytest.mark.parametrize("kind,dp", [("fp32_master", 1), ("fp32_master", 2), ("bf16", 2)])
def test_a_tt_run_stopped_by_sigterm_and_continued_equals_an_unbroken_one(
    tt_env, tt_here, shards, tmp_path, capsys, kind, dp
):
    """The run stopped by SIGTERM is a process of its own (tests/held_run.py: main.py, holding at a step) on the
    laid-out checkout; the unbroken run, the continuation and the refusal run in this process."""
    extra = dict(tt_optimizer=kind, data_parallel=dp)
    whole, broken = copy_run(shards, tmp_path / "whole"), copy_run(shards, tmp_path / "broken")
    printed = tt_here(args(whole, **extra))
    rows = [r for r in read_jsonl(os.path.join(whole, "metrics.jsonl")) if r["kind"] == "train"]
    assert len(rows) == 8 and rows[-1]["loss"] < rows[0]["loss"] - 0.5  # a real GPT learns the fixture
    assert os.path.exists(os.path.join(whole, "loss_curve.png")) and "The history of machine learning" in printed

    code, err = sigterm_at(args(broken, **extra), 5, tt_env, tmp_path)
    assert code == 143 and "Traceback" not in err, err[-3000:]
    assert tensors(broken)[1]["step"] == 5
    assert "continuing the run" in tt_here(args(broken, **extra))
    a, b = tensors(whole)[0], tensors(broken)[0]
    assert set(a) == set(b) and len(a) > 28
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    if dp == 1:  # the refusal is the same at any dp
        with pytest.raises(SystemExit) as e:
            tt_here(args(broken, **{**extra, "tt_optimizer": "bf16", "steps": 12}))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and f"tt_optimizer {kind} -> bf16" in err[0], err


def test_layernorm_gains_and_biases_get_no_weight_decay_through_the_cli(tt_here, tmp_path):
    # lr * weight_decay = 1: decoupled decay zeroes every decayed tensor in one step: what is not zero was not decayed
    out = tmp_path / "run"  # no shards yet: this run prepares them on its way
    tt_here(args(out, steps=2, warmup_steps=1, lr=1e-3, weight_decay=1000))
    model = {k: v.float() for k, v in tensors(out)[0].items() if k.startswith("/model/")}
    gains = [v for k, v in model.items() if "gamma" in k]
    biases = [v for k, v in model.items() if k.endswith("bias") or "beta" in k]
    matrices = [v for k, v in model.items() if "linear/weight" in k or "fc1/weight" in k]
    assert len(gains) == 5 and len(biases) >= 10 and matrices
    assert all(float((g - 1).abs().max()) < 0.1 for g in gains) and all(float(b.abs().max()) < 0.1 for b in biases)
    assert all(float(m.abs().max()) < 0.01 for m in matrices)  # the same step decayed the matrices to ~0
