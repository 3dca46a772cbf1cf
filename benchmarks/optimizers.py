"""AdamW vs Muon: the same shards, config and seeds; how many steps Muon needs to reach AdamW's final val loss, and
what a step costs. Numbers printed, nothing asserted.

    python benchmarks/optimizers.py --data_files=train.parquet,validation.parquet --val_fraction=0.1667 \\
        --seeds=1337,1338 [--eval_every=10] [any other main.py option, given to both optimizers]

The defaults are issue 35's bar: n_layer=4 n_head=4 n_embd=256 seq_len=256 batch_size=8, 300 steps, warmup 30,
AdamW at lr 1e-3, Muon at main.py's muon_lr and muon_momentum. The shards are prepared once into a temporary
directory and copied into each run's out_dir; every run is `python main.py` in a fresh process, one at a time, and
is read back from its metrics.jsonl. Per seed: both final val losses, the first eval step at which Muon's val loss
is at or below AdamW's final one (as a fraction of AdamW's steps), and the ratio of the median wall time of an
optimizer step (evals left out). Then the mean and spread over the seeds.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAR = dict(n_layer=4, n_head=4, n_embd=256, seq_len=256, batch_size=8, steps=300, warmup_steps=30, lr=1e-3)
QUIET = dict(export_hf="false", sample_tokens=1, device="cpu", backend="torch")


def main_py(options):
    args = [sys.executable, os.path.join(ROOT, "main.py")] + [f"--{k}={v}" for k, v in options.items()]
    p = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        sys.exit(f"main.py failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}")


def one_run(data_dir, out_dir, options):
    """Train once in out_dir (shards copied from data_dir); -> {eval step: val loss}, median seconds per step."""
    shutil.copytree(data_dir, out_dir, ignore=shutil.ignore_patterns(".*"))
    main_py({**options, "out_dir": out_dir})
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    window = options["seq_len"] * options["batch_size"]
    evals = {r["step"]: r["val_loss"] for r in rows if r["kind"] == "eval"}
    return evals, statistics.median(window / r["tok_per_s"] for r in rows if r["kind"] == "train")


def steps_to_reach(evals, target):
    return next((step for step, loss in sorted(evals.items()) if loss <= target), None)


def spread(values):
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1337,1338")
    parser.add_argument("--eval_every", type=int, default=10)
    args, rest = parser.parse_known_args(argv)
    given = dict(a[2:].split("=", 1) for a in rest)
    options = {**BAR, **QUIET, "eval_every": args.eval_every, "num_proc": 1, **given}
    options["seq_len"], options["batch_size"] = int(options["seq_len"]), int(options["batch_size"])
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        main_py({**options, "out_dir": data, "prepare_only": "true"})
        ratios, times, finals = [], [], {"adamw": [], "muon": []}
        for seed in args.seeds.split(","):
            runs = {}
            for opt in ("adamw", "muon"):
                runs[opt] = one_run(
                    data, os.path.join(tmp, f"{opt}-{seed}"), {**options, "seed": seed, "optimizer": opt}
                )
                finals[opt].append(runs[opt][0][max(runs[opt][0])])
            (adamw, t_adamw), (muon, t_muon) = runs["adamw"], runs["muon"]
            last = max(adamw)
            reach = steps_to_reach(muon, adamw[last])
            ratios.append(reach / last if reach is not None else float("nan"))
            times.append(t_muon / t_adamw)
            print(
                f"seed {seed}: val loss at step {last}: adamw {adamw[last]:.3f}, muon {muon[last]:.3f}; muon reaches "
                f"adamw's final loss at step {reach} ({ratios[-1]:.2f}x adamw's steps); s/step adamw {t_adamw:.3f}, "
                f"muon {t_muon:.3f} ({times[-1]:.2f}x)",
                flush=True,
            )
    print(
        f"{len(ratios)} seeds, {' '.join(f'{k}={v}' for k, v in options.items() if k in BAR)}: final val loss adamw "
        f"{spread(finals['adamw'])}, muon {spread(finals['muon'])}; steps to adamw's final loss "
        f"{statistics.mean(ratios):.2f}x; time per step {statistics.mean(times):.2f}x"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
