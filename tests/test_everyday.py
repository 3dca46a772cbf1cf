"""Everyday use: sampling from a checkpoint, device and precision choice, MFU arithmetic, bounded prepare memory."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import FIXTURE, ROOT, RUN, cli_args, main, one_line_error, read_jsonl, tiny_cfg, torch_backend


def sample_text(stdout):
    return stdout.split("--- sample 1/1 (greedy) ---\n", 1)[1].strip()


def test_sample_only_prints_the_end_of_training_greedy_text_without_training(trained, run_copy, capsys):
    rows = read_jsonl(run_copy / "metrics.jsonl")
    main.main(cli_args(run_copy, **RUN, sample_only="true"))
    sampled = capsys.readouterr().out
    assert sample_text(sampled) == sample_text(trained.stdout)
    assert sample_text(sampled).startswith("The history of machine learning")
    assert len(sample_text(sampled)) > len("The history of machine learning")
    assert read_jsonl(run_copy / "metrics.jsonl") == rows  # nothing trained


def test_sample_only_without_checkpoint_is_one_clear_error(tmp_path, capsys):
    one_line_error(capsys, ["--sample_only=true", f"--out_dir={tmp_path}"], "no checkpoint at")


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return torch_backend(tmp_path_factory.mktemp("b"))


def test_sampling_with_a_fixed_seed_is_reproducible(backend, tmp_path):
    cfg = tiny_cfg(tmp_path, temperature=1.0, top_k=50, sample_tokens=10)

    def draw(seed):
        return main.generate(backend, [464, 2106], cfg, np.random.default_rng(seed))

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
    greedy = tiny_cfg(tmp_path, sample_tokens=10)
    assert main.generate(backend, [464, 2106], greedy, np.random.default_rng(0)) == main.generate(
        backend, [464, 2106], greedy, np.random.default_rng(9)
    )


def test_top_k_1_sampling_equals_greedy(backend, tmp_path):
    k1 = main.generate(backend, [464], tiny_cfg(tmp_path, temperature=0.7, top_k=1), np.random.default_rng(0))
    assert k1 == main.generate(backend, [464], tiny_cfg(tmp_path), None)


def test_context_is_cropped_to_seq_len_when_sampling(backend, tmp_path):
    cfg = tiny_cfg(tmp_path, sample_tokens=40)  # 10 + 40 tokens: more than the position table's 32
    assert len(main.generate(backend, list(range(10)), cfg, None)) == 50


@pytest.mark.parametrize("cuda,mps,want", [(True, True, "cuda:0"), (False, True, "mps"), (False, False, "cpu")])
def test_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(cuda))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert main.resolve_device("auto") == want
    assert main.resolve_device("cpu") == "cpu"


def test_precision_bf16_on_modern_gpus_fp16_with_scaler_on_older_fp32_elsewhere():
    assert main.choose_dtype("auto", "cuda", bf16_ok=True) == "bfloat16"
    assert main.choose_dtype("auto", "cuda", bf16_ok=False) == "float16"  # V100, T4: GradScaler path
    assert main.choose_dtype("auto", "cpu", bf16_ok=False) == "float32"
    assert main.choose_dtype("auto", "mps", bf16_ok=False) == "float32"
    assert main.choose_dtype("float32", "cuda", bf16_ok=True) == "float32"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_grad_scaler_is_only_enabled_for_fp16(tmp_path, dtype):
    b = torch_backend(tmp_path, dtype=dtype)
    assert b.dtype == dtype and b.scaler.is_enabled() == (dtype == "float16")


def test_flops_per_token_matches_a_hand_count_of_the_real_model(tmp_path):
    cfg = tiny_cfg(tmp_path, n_layer=3, n_embd=64, n_head=4, seq_len=32)
    model = main.GPT(cfg)
    matmul_weights = sum(m.weight.numel() for m in model.transformer.h.modules() if isinstance(m, main.nn.Linear))
    by_hand = 6 * (matmul_weights + main.VOCAB_SIZE * 64) + 12 * 3 * 64 * 32
    assert main.model_flops_per_token(cfg) == by_hand
    # GPT-2 small at seq 1024: the well-known ~0.85 GFLOP/token
    assert main.model_flops_per_token(main.TrainConfig()) == pytest.approx(
        6 * 124.3e6 - 6 * 786432 + 12 * 12 * 768 * 1024, rel=0.01
    )


def test_peak_flops_table_override_and_unknown_device():
    assert main.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert main.peak_flops("NVIDIA A100-SXM4-40GB", "float32") == 156e12
    assert main.peak_flops("Tesla T4", "float16") == 65e12
    assert main.peak_flops("cpu", "float32") is None  # unknown: MFU shown as unknown, not guessed
    assert main.peak_flops("cpu", "float32", override=1e12) == 1e12


def peak_rss_kb_after_each_prepare(*jobs):
    """Run prepare (num_proc=1, so it is all one process) on each (data, out_dir) in turn in one fresh interpreter;
    its peak RSS in kB after each. A peak only grows: a later, bigger input that needed more memory raises it."""
    code = (
        f"import json, resource, sys; sys.path.insert(0, {ROOT!r}); import main\n"
        f"for data, out_dir in json.loads(sys.argv[1]):\n"
        "    main.main([f'--data_files={data}', f'--out_dir={out_dir}', '--prepare_only=true', '--num_proc=1',"
        " '--shard_tokens=1000000'])\n"
        "    print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    given = json.dumps([[str(d), str(o)] for d, o in jobs])
    p = subprocess.run([sys.executable, "-c", code, given], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return [int(line.split()[1]) for line in p.stdout.splitlines() if line.startswith("peak ")]


def test_prepare_peak_memory_does_not_grow_with_the_input(tmp_path):
    # x5, not x1: a prepare's first few MB of text warm up pyarrow's and the BPE library's allocations (~15 MB more
    # with fastokens than with tiktoken), which is not growth with the input
    small, big = tmp_path / "x5.parquet", tmp_path / "x25.parquet"
    table = pq.read_table(FIXTURE)
    pq.write_table(pa.concat_tables([table] * 5), small, row_group_size=32)
    pq.write_table(pa.concat_tables([table] * 25), big, row_group_size=32)  # 20 x the fixture more: 9.5 MB as uint16
    k5, k25 = peak_rss_kb_after_each_prepare((small, tmp_path / "a"), (big, tmp_path / "b"))
    assert k25 - k5 < 25 * 1024, f"peak RSS x5 {k5 // 1024} MB, x25 {k25 // 1024} MB"
