"""Benchmarks for main.py: numbers printed, nothing asserted (tests/ asserts behaviour).

    python benchmarks/bench.py prepare            # prepare with each tokenizer vs tiktoken's limit (~4 min)
    python benchmarks/bench.py train              # tok/s, MFU, memory: main.py vs the plain reference (CPU: tiny, mid)
    python benchmarks/bench.py train --gpu        # GPT-2 small, seq 1024, batch 16 and 32, on one GPU (<= 5 min)
    python benchmarks/bench.py train --gpu --ab   # main vs ref at batch 16, then candidate variants of main's step

`train` runs every configuration in a fresh process (so peak memory and compile time are that run's own) on random
tokens, and prints one JSON line each: tok/s (median over the timed steps), MFU (main.py's FLOP count and peak
table), peak memory (GPU allocator, or the process's peak RSS on the CPU) and the seconds from process start to the
end of the first optimizer step (imports, model build and compilation included). "main" is main.TorchBackend on its
default path for the device (compile=auto, dtype=auto); "ref" is benchmarks/reference_gpt.py, a nanoGPT-shaped model
and loop with fused AdamW on CUDA.
"""

import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

T_START = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

CPU_RUNS = [
    dict(model=m, n_layer=L, n_head=H, n_embd=D, seq_len=T, batch_size=B, steps=8)
    for L, H, D, T, B in ((2, 2, 128, 128, 8), (6, 6, 384, 256, 8))
    for m in ("main", "ref")
]
GPT2 = dict(n_layer=12, n_head=12, n_embd=768, seq_len=1024, steps=20)
GPU_RUNS = [
    dict(GPT2, model=m, batch_size=B, compile=c) for B in (16, 32) for m, c in (("main", "auto"), ("ref", "true"))
] + [dict(GPT2, model=m, batch_size=16, compile="false") for m in ("main", "ref")]
# --ab: the batch-16 pair again, then untried candidates for main's compiled step, each alone (~5 min in all):
# CUDA graphs (compile mode "reduce-overhead") and inductor's coordinate-descent tuning of its generated kernels.
# (cuDNN attention is not among them: it measured +-0 on an H200.)
AB_RUNS = GPU_RUNS[:2] + [
    dict(GPT2, model="main", batch_size=16, variant=v) for v in ("reduce_overhead", "coordinate_descent")
]


def one_run(spec):
    """Build one trainer, time spec['steps'] optimizer steps after 3 warm-up steps; return the numbers."""
    import numpy as np
    import torch

    import main
    from reference_gpt import RefTrainer

    device = main.resolve_device(spec.get("device", "auto"))
    cfg = main.TrainConfig(
        **{k: spec[k] for k in ("n_layer", "n_head", "n_embd", "seq_len", "batch_size")},
        device=device,
        compile=spec.get("compile", "auto"),
        backend="torch",
        warmup_steps=10,
    )
    if spec.get("variant") == "reduce_overhead":  # A/B: CUDA graphs around the compiled step
        compile_ = torch.compile
        torch.compile = lambda m, **k: compile_(m, mode="reduce-overhead", **k)
    if spec.get("variant") == "coordinate_descent":  # A/B: inductor tunes its generated kernels' launch configs
        import torch._inductor.config

        torch._inductor.config.coordinate_descent_tuning = True
    if spec["model"] == "main":
        b = main.TorchBackend(cfg, main.Dist())
        dtype, name = b.dtype, b.device_name

        def step(x, y):
            b.train_micro_step(x, y)
            return b.optimizer_step(cfg.lr, cfg.beta1)

    else:
        cuda = device.startswith("cuda")
        dtype = main.choose_dtype("auto", "cuda" if cuda else "cpu", cuda and torch.cuda.is_bf16_supported())
        r = RefTrainer(
            cfg.n_layer,
            cfg.n_head,
            cfg.n_embd,
            cfg.seq_len,
            device=device,
            autocast_dtype=getattr(torch, dtype) if dtype != "float32" else None,
            compile=main.choose_compile(cfg.compile, "cuda" if cuda else "cpu"),
        )
        name = torch.cuda.get_device_name(device) if cuda else "cpu"

        def step(x, y):
            r.train_micro_step(x, y)
            return r.optimizer_step()

    tokens = np.random.default_rng(0).integers(0, main.VOCAB_SIZE, size=1 << 22, dtype=np.uint16)
    stream = type(
        "Stream",
        (),
        {
            "n": len(tokens),
            "batch": lambda self, s, T: main.TokenStream.batch(self, s, T),
            "window": lambda self, s, n: tokens[s : s + n],
        },
    )()
    batches = main.TrainBatches(stream, cfg, 0, cfg.batch_size)
    times, first = [], None
    for _ in range(3 + spec["steps"]):
        t0 = time.perf_counter()
        loss = step(*batches.next())  # the loss read-back syncs the device once per step, as main.py's loop does
        batches.prefetch()
        times.append(time.perf_counter() - t0)
        first = first or time.perf_counter() - T_START
    tok_s = cfg.seq_len * cfg.batch_size / statistics.median(times[3:])
    peak = main.peak_flops(name, dtype, None)
    mem_gib = (
        torch.cuda.max_memory_allocated() / 2**30
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {
        **spec,
        "device": name,
        "torch": torch.__version__,
        "dtype": dtype,
        "tok_s": round(tok_s),
        "mfu": round(main.model_flops_per_token(cfg) * tok_s / peak, 4) if peak else None,
        "peak_mem_gib": round(mem_gib, 2),
        "first_step_s": round(first, 1),
        "last_loss": round(loss, 4),
        "ran": type(b.model).__name__ if spec["model"] == "main" else None,
    }  # OptimizedModule = compiled


def bench_train(gpu):
    """Each configuration in its own process, one JSON line each, then a side-by-side table."""
    rows = []
    for spec in (AB_RUNS if "--ab" in sys.argv else GPU_RUNS) if gpu else CPU_RUNS:
        p = subprocess.run([sys.executable, __file__, "_one", json.dumps(spec)], capture_output=True, text=True)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        row = json.loads(lines[-1]) if p.returncode == 0 and lines else {**spec, "error": p.stderr.strip()[-400:]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{'model':<5} {'compile':<7} {'B':>3} {'tok/s':>9} {'MFU':>6} {'peak GiB':>8} {'1st step s':>10}")
    for r in rows:
        if "error" not in r:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "?"
            print(
                f"{r['model'] + r.get('variant', ''):<5} {r.get('compile', 'auto'):<7} {r['batch_size']:>3} "
                f"{r['tok_s']:>9,} {mfu:>6} "
                f"{r['peak_mem_gib']:>8.2f} {r['first_step_s']:>10.1f}"
            )


def growing_vocabulary(texts, files, words):
    """Articles whose vocabulary keeps growing, as a whole dump's does: each file draws afresh from one Zipf law over
    the sample's words plus a million German-style compounds of them, so new rare words turn up in every file."""
    import random
    import re
    from collections import Counter

    import numpy as np

    vocab = [w for w, _ in Counter(re.findall(r"\w+|[^\w\s]", " ".join(texts))).most_common()]
    rng, top = random.Random(7), vocab[:20000]
    ext = vocab + [rng.choice(top) + rng.choice(top).lower() for _ in range(1_000_000)]
    for i in range(files):
        z = np.random.default_rng(100 + i).zipf(1.07, 2 * words)
        w = [ext[j] for j in z[z <= len(ext)][:words] - 1]
        yield [" ".join(w[k : k + 1800]) + ".\n\n" + " ".join(w[k + 1800 : k + 2000]) for k in range(0, words, 2000)]


def bench_prepare():
    """main.prepare at num_proc = cores with each tokenizer, side by side, as a ratio to tiktoken's own one-thread
    rate x cores (what a tiktoken prepare can reach), on (a) the sample's articles repeated, where fastokens' per-word
    cache hits almost every word, and (b) a corpus whose vocabulary keeps growing, where it helps least."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import main

    src = os.path.join(os.path.dirname(HERE), "..", "shared", "wiki_sample", "train.parquet")
    src = src if os.path.exists(src) else main.FIXTURE
    texts = [t for t in pq.read_table(src, columns=["text"]).column("text").to_pylist() if t]
    cores, enc = len(os.sched_getaffinity(0)), main.get_tokenizer()
    corpora = {"repeated": [texts * 240], "growing": list(growing_vocabulary(texts, 24, 1_000_000))}
    with tempfile.TemporaryDirectory() as tmp:
        for name, files in corpora.items():
            for i, articles in enumerate(files):
                pq.write_table(pa.table({"text": articles}), os.path.join(tmp, f"{name}-{i}.parquet"), 128)
            articles = [a for f in files for a in f]
            enc.encode_ordinary_batch(articles[:100], num_threads=1)  # warm-up, untimed
            t0 = time.perf_counter()
            limit = sum(map(len, enc.encode_ordinary_batch(articles, num_threads=1))) / (time.perf_counter() - t0)
            mb = sum(len(a.encode()) for a in articles) / 1e6
            row = {"corpus": name, "MB": round(mb), "tiktoken_1_thread_tok_s": round(limit), "cores": cores}
            for tokenizer in ("tiktoken", "fastokens"):
                out = os.path.join(tmp, f"{name}-{tokenizer}")
                files_glob = os.path.join(tmp, f"{name}-*.parquet")
                cfg = main.TrainConfig(data_files=files_glob, out_dir=out, num_proc=cores, tokenizer=tokenizer)
                s = timed(functools.partial(main.prepare, cfg, log=lambda *a: None))
                n = sum(main.read_json(os.path.join(out, "manifest.json"))["num_tokens"].values())
                row[tokenizer] = {"tok_s": round(n / s), "of_tiktoken_limit": round(n / s / (limit * cores), 2)}
            print(json.dumps(row), flush=True)


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "train"
    if what == "_one":
        print(json.dumps(one_run(json.loads(sys.argv[2]))))
    elif what == "prepare":
        bench_prepare()
    elif what == "train":
        bench_train("--gpu" in sys.argv)
    else:
        sys.exit(f"usage: {sys.argv[0]} prepare | train [--gpu [--ab]]")
