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
    print(f"\nkill -9 + resume on GPU: final val {b:.5f} vs unbroken {a:.5f} (diff {b - a:+.5f}; GPU kernels are "
          "not bit-exact run to run)")
    assert abs(a - b) / a < 0.01


def test_torchrun_one_process_smoke(tmp_path):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                        os.path.join(ROOT, "main.py"), "--smoke", f"--out_dir={tmp_path}", "--steps=40",
                        "--eval_every=20", "--sample_tokens=8"], capture_output=True, text=True, cwd=ROOT,
                       timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    print(f"\ntorchrun --nproc_per_node=1 smoke: final val {evals(tmp_path)[40]:.4f}")
