"""The benchmarks drive main.py through the backend seam, as train() does: a seam change must not leave them broken
for the next session that is lent a GPU, whose few device minutes would go to a traceback."""

import importlib.util
import math
import os

from conftest import ROOT


def test_the_train_benchmark_times_main_and_the_reference_on_the_cpu():
    spec = importlib.util.spec_from_file_location("bench", os.path.join(ROOT, "benchmarks", "bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tiny = dict(n_layer=1, n_head=2, n_embd=32, seq_len=32, batch_size=2, steps=2, device="cpu", compile="false")
    rows = {m: bench.one_run(dict(tiny, model=m)) for m in ("main", "ref")}
    assert rows["main"]["ran"] == "GPT"  # main.TorchBackend's own model, eager as asked
    for row in rows.values():
        assert row["tok_s"] > 0 and math.isfinite(row["last_loss"]) and 9 < row["last_loss"] < 12  # ~ln(50257)
