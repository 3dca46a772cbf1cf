"""Data parallel with torchrun on CPU (gloo): matches a single process with the same global batch; resume."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, cli_args, read_jsonl, run_main

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
DDP_ARGS = dict(steps=40, eval_every=20, lr=3e-3, warmup_steps=4, n_embd=64, export_hf="false", sample_tokens=4,
                eval_iters=4, total_optim_steps=40)


def torchrun(args, nproc=2):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "main.py")] + args
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def evals(out_dir):
    return {r["step"]: r["val_loss"] for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if r["kind"] == "eval"}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    p = torchrun(cli_args(out, batch_size=4, **DDP_ARGS))
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


def test_two_ranks_match_one_process_with_the_same_global_batch(two_ranks, tmp_path):
    out, p = two_ranks
    assert "data_parallel 2; global batch 256 tokens" in p.stdout
    single = run_main(cli_args(tmp_path, batch_size=8, **DDP_ARGS))
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = evals(out), evals(tmp_path)
    assert a.keys() == b.keys() == {0, 20, 40}
    assert a[0] == pytest.approx(b[0], rel=1e-5)  # same fixed val batches, same init: same number
    assert a[40] == pytest.approx(b[40], rel=0.02)  # different windows per rank, same global batch
    assert a[40] < a[0] - 2.0


def test_only_rank_0_writes_outputs_and_prints(two_ranks):
    out, p = two_ranks
    assert p.stdout.count("The history of machine learning") == 1
    assert p.stdout.count("device: cpu") == 1
    names = sorted(n for n in os.listdir(out) if not n.startswith("."))  # not the lock files
    shards = [s["file"] for split in ("train", "val") for s in json.load(open(out / "manifest.json"))["splits"][split]]
    assert names == sorted(["ckpt.pt", "loss_curve.png", "manifest.json", "metrics.jsonl", *shards])
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 41))  # one writer: no duplicated rows


def test_resume_under_ddp_continues_exactly(two_ranks, tmp_path):
    out, _ = two_ranks
    first = torchrun(cli_args(tmp_path, batch_size=4, **{**DDP_ARGS, "steps": 20}))
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = torchrun(cli_args(tmp_path, batch_size=4, init_from="resume", **DDP_ARGS))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resume: from" in resumed.stdout
    full, cut = evals(out), evals(tmp_path)
    assert full.keys() == cut.keys()
    for step in full:
        assert cut[step] == pytest.approx(full[step], rel=1e-6)
    a = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    b = [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert b == pytest.approx(a, rel=1e-6)


def test_data_parallel_that_does_not_match_the_world_size_is_an_error(tmp_path):
    p = torchrun(cli_args(tmp_path, data_parallel=4, steps=2, eval_every=2))
    assert p.returncode != 0 and "data_parallel=4 but this run has 2 replicas" in p.stderr
