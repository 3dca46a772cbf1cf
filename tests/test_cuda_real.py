"""On a real GPU only (skipped elsewhere): main.py's default path end to end, as a new user runs it. Each test prints
its numbers (run with -s): `python -m pytest -s -q tests/test_cuda_real.py`."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, kill_9_when, read_jsonl, run_main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
RUN = ["--smoke", "--steps=200", "--eval_every=40", "--sample_tokens=8"]


def evals(out):
    return {r["step"]: r["val_loss"] for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["kind"] == "eval"}


def test_smoke_on_the_default_device_then_sample_only(tmp_path):
    p = run_main(["--smoke", f"--out_dir={tmp_path}"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "device: NVIDIA" in p.stdout and "(bfloat16)" in p.stdout
    s = run_main(["--smoke", "--sample_only", f"--out_dir={tmp_path}"])
    assert s.returncode == 0 and "The history of machine learning" in s.stdout, s.stderr[-2000:]
    print(f"\nGPU smoke: final val {evals(tmp_path)[120]:.4f} on {torch.cuda.get_device_name()}")


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled")
    p = run_main(RUN + [f"--out_dir={out}", "--compile=true"])
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_compiled_and_eager_loss_curves_agree_within_1_percent(tmp_path, compiled_run):
    p = run_main(RUN + [f"--out_dir={tmp_path}", "--compile=false"])
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = evals(compiled_run), evals(tmp_path)
    assert a.keys() == b.keys() == {0, 40, 80, 120, 160, 200}
    worst = max(abs(a[k] - b[k]) / b[k] for k in a)
    print(f"\ncompiled vs eager, 200 steps: worst relative val-loss gap {100 * worst:.3f}% ({a} vs {b})")
    assert worst < 0.01


def test_kill_9_then_resume_ends_near_the_unbroken_run(tmp_path, compiled_run):
    def checkpoint_past_80():
        try:
            return torch.load(tmp_path / "ckpt.pt", weights_only=False)["meta"]["step"] >= 80
        except Exception:
            return False

    assert kill_9_when(RUN + [f"--out_dir={tmp_path}", "--compile=true"], checkpoint_past_80)
    p = run_main(RUN + [f"--out_dir={tmp_path}", "--compile=true", "--init_from=resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resume: from" in p.stdout
    a, b = evals(compiled_run)[200], evals(tmp_path)[200]
    print(
        f"\nkill -9 + resume on GPU: final val {b:.5f} vs unbroken {a:.5f} (diff {b - a:+.5f}; GPU kernels are "
        "not bit-exact run to run)"
    )
    assert abs(a - b) / a < 0.01


def test_torchrun_one_gpu_makes_the_nccl_group_and_a_kill_9_continues(tmp_path):
    """One GPU under torchrun takes every collective, checkpoint and resume path that eight do (on NCCL)."""
    import signal
    import time

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        os.path.join(ROOT, "main.py"),
        "--smoke",
        f"--out_dir={tmp_path}",
        "--steps=160",
        "--eval_every=40",
        "--sample_tokens=8",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 400
    while (
        proc.poll() is None
        and time.time() < deadline
        and not any(r["kind"] == "eval" and r["step"] >= 40 for r in read_jsonl(tmp_path / "metrics.jsonl"))
    ):
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resume: from" in p.stdout
    runs = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "run"]
    assert runs[-1]["dist_backend"] == "cpu:gloo,cuda:nccl"
    print(f"\ntorchrun x1 on NCCL, kill -9 at step >= 40, rerun: final val {evals(tmp_path)[160]:.4f}")
