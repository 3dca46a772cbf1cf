"""Round 4, the input side: a benchmark never touches a run's files; --data_files that names nothing, directories,
commas; articles with no text; every input error names its file and tells damage from a read that passes; a
prepared out_dir needs no input; Ctrl-C while writing a checkpoint or while torch loads; no W&B run for a run that
never trained."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import FIXTURE, ROOT, TINY, cli_args, main, one_line_error, run_main, tiny_cfg
from test_tracking import fake_wandb

TRAIN = dict(steps=2, eval_every=2, export_hf="false")


def tree(d):
    """Every file under d, by relative path, with its bytes: what must stay byte-identical."""
    return {
        os.path.relpath(os.path.join(r, n), d): open(os.path.join(r, n), "rb").read()
        for r, _, names in os.walk(d)
        for n in names
    }


def test_ckpt_write_benchmark_on_a_runs_out_dir_leaves_the_run_byte_identical(run_copy):
    before = tree(run_copy)
    shape = [f"--{k}={TINY[k]}" for k in ("n_layer", "n_head", "n_embd", "seq_len")]
    p = run_main([f"--out_dir={run_copy}", *shape], script="benchmarks/ckpt_write.py")
    assert p.returncode == 0 and "written" in p.stdout and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert tree(run_copy) == before
    p = run_main([f"--out_dir={run_copy}/missing", *shape], script="benchmarks/ckpt_write.py")
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [p.stderr.strip()] and "not a directory" in p.stderr
