"""Data parallel with torchrun on CPU (gloo): two ranks match one process with the same global batch, and only rank 0
writes and prints. (Resume under torchrun: tests/test_nccl_paths.py, against this module's two-rank run.)"""

import json
import os

import pytest
import torch

from conftest import RUN, cli_args, one_line_error, read_jsonl

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch build has no torch.distributed"
)


def evals(out_dir):
    return {r["step"]: r["val_loss"] for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if r["kind"] == "eval"}


def test_two_ranks_match_one_process_with_the_same_global_batch(two_ranks, trained):
    out, stdout = two_ranks
    assert "data_parallel 2; global batch 128 tokens" in stdout
    a, b = evals(out), evals(trained.out)  # 2 ranks x batch 2 against the shared run's 1 process x batch 4
    assert a.keys() == b.keys() == {0, 4, 8, 12}
    assert a[0] == pytest.approx(b[0], rel=1e-5)  # same fixed val batches, same init: same number
    assert a[12] == pytest.approx(b[12], rel=0.02)  # different windows per rank, same global batch
    assert a[12] < a[0] - 1.0


def test_only_rank_0_writes_outputs_and_prints(two_ranks):
    out, stdout = two_ranks
    assert stdout.count("The history of machine learning") == 1
    assert stdout.count("device: cpu") == 1
    names = sorted(n for n in os.listdir(out) if not n.startswith("."))  # not the lock files
    splits = json.loads((out / "manifest.json").read_text())["splits"]
    shards = [s["file"] for split in ("train", "val") for s in splits[split]]
    assert names == sorted(["ckpt.pt", "loss_curve.png", "manifest.json", "metrics.jsonl", *shards])
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 13))  # one writer: no duplicated rows


def test_data_parallel_that_does_not_match_the_world_size_is_one_line(tmp_path, capsys):
    one_line_error(
        capsys,
        cli_args(tmp_path, **RUN, data_parallel=2),
        "data_parallel=2 but this run has 1 replica",
        "torchrun --nproc_per_node=2",
    )
