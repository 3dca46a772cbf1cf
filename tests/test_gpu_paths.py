"""The CUDA paths, guarded on a CPU-only machine: a faked single-GPU torch drives main.py up to placing the model on
the GPU, and resume gets CPU generator states whatever device the checkpoint's tensors are mapped to."""

import os

import pytest
import torch

from conftest import RUN, cli_args, main, one_line_error, tiny_cfg


class PlacedOnCuda(Exception):
    pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """One 'NVIDIA H100' as far as main.py can tell; set_device rejects a bare "cuda" as the real one does
    ("Expected a torch.device with a specified index"), and moving a module onto CUDA stops the run there."""
    calls = {"set_device": []}

    def set_device(device):
        d = torch.device(device)
        if d.type == "cuda" and d.index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        calls["set_device"].append(str(d))

    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cuda":
            raise PlacedOnCuda(str(torch.device(target)))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    return calls


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_smoke_on_a_single_gpu_reaches_the_model_on_cuda_0(tmp_path, fake_cuda, device):
    with pytest.raises(PlacedOnCuda, match="^cuda:0$"):
        main.main(["--smoke", f"--out_dir={tmp_path}", f"--device={device}", "--steps=4", "--eval_every=2"])
    assert fake_cuda["set_device"] == ["cuda:0"]


def test_compile_auto_is_on_for_cuda_on_linux_only(monkeypatch):
    monkeypatch.setattr(main.sys, "platform", "linux")
    assert main.choose_compile("auto", "cuda")
    monkeypatch.setattr(main.sys, "platform", "win32")
    assert not main.choose_compile("auto", "cuda")
    assert not main.choose_compile("auto", "cpu") and main.choose_compile("true", "cpu")


def test_cuda_asked_for_on_a_cpu_only_machine_is_one_line_before_prepare(tmp_path, capsys):
    one_line_error(capsys, cli_args(tmp_path / "run", device="cuda"), "no CUDA GPU")
    assert not (tmp_path / "run").exists()  # nothing was prepared


@pytest.mark.parametrize(
    "device,says", [("mps", "no usable Apple MPS"), ("gpu", "expected auto, cpu, cuda"), ("cuda:3", "no CUDA GPU")]
)
def test_unavailable_or_misspelled_devices_are_one_line(tmp_path, device, says):
    with pytest.raises(main.UserError, match=says):
        main.resolve_device(device)


def test_resume_restores_rng_from_cpu_tensors_whatever_the_map_location(run_copy, monkeypatch):
    """What broke resume on CUDA: the checkpoint was loaded onto the training device, so the CPU generator's state
    came back as a CUDA tensor. Here torch.load sends tensors to the 'meta' device for any map_location but an
    explicit "cpu" (as if the training device were elsewhere), which fails the same way on a CPU-only machine."""
    real_load = torch.load

    def load_elsewhere(f, map_location=None, **kw):
        return real_load(
            f, map_location="cpu" if isinstance(map_location, str) and map_location == "cpu" else "meta", **kw
        )

    monkeypatch.setattr(torch, "load", load_elsewhere)
    seen = []
    real_set = torch.set_rng_state
    monkeypatch.setattr(torch, "set_rng_state", lambda s: (seen.append((s.device.type, s.dtype)), real_set(s)))
    main.run(tiny_cfg(run_copy, **{**RUN, "steps": 16}, init_from="resume", export_hf=False))
    assert seen == [("cpu", torch.uint8)]
    rows = main.read_jsonl(os.path.join(run_copy, "metrics.jsonl"))
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 4, 8, 12, 16]


def test_compile_failure_falls_back_to_eager_with_one_line(tmp_path, monkeypatch, capsys):
    class Broken(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a):
            raise RuntimeError("inductor: no working C compiler\nlong details")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: Broken(model))
    cfg = tiny_cfg(tmp_path, steps=4, eval_every=2, compile="true", export_hf=False)
    main.run(cfg)
    out = capsys.readouterr().out
    assert "compile: failed (RuntimeError: inductor: no working C compiler); training eager" in out
    assert len([r for r in main.read_jsonl(os.path.join(tmp_path, "metrics.jsonl")) if r["kind"] == "train"]) == 4
