"""The benchmarks drive main.py through the backend seam, as train() does: a seam change must not leave them broken
for the next session that is lent a GPU, whose few device minutes would go to a traceback."""

import importlib.util
import math
import os

from conftest import FIXTURE, ROOT, run_main


def test_the_train_benchmark_times_main_and_the_reference_on_the_cpu():
    spec = importlib.util.spec_from_file_location("bench", os.path.join(ROOT, "benchmarks", "bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tiny = dict(n_layer=1, n_head=2, n_embd=32, seq_len=32, batch_size=2, steps=2, device="cpu", compile="false")
    rows = {m: bench.one_run(dict(tiny, model=m)) for m in ("main", "ref")}
    assert rows["main"]["ran"] == "GPT"  # main.TorchBackend's own model, eager as asked
    for row in rows.values():
        assert row["tok_s"] > 0 and math.isfinite(row["last_loss"]) and 9 < row["last_loss"] < 12  # ~ln(50257)


def test_the_optimizer_benchmark_prints_the_step_and_time_ratios(tmp_path):
    p = run_main(
        [
            f"--data_files={FIXTURE}",
            "--seeds=1",
            "--eval_every=2",
            *(f"--{k}={v}" for k, v in dict(n_layer=1, n_head=2, n_embd=32, seq_len=32, batch_size=2).items()),
            "--steps=4",
            "--warmup_steps=1",
            "--eval_iters=1",
        ],
        script=os.path.join("benchmarks", "optimizers.py"),
    )
    assert p.returncode == 0, p.stderr[-2000:]
    seed, total = p.stdout.strip().splitlines()
    assert seed.startswith("seed 1: val loss at step 4: adamw ") and "muon reaches adamw's final loss at step" in seed
    assert total.startswith("1 seeds, ") and "steps to adamw's final loss" in total and "time per step" in total
