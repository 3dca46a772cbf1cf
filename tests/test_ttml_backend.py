"""The TT-Train (ttml) backend.

Two kinds of test, kept apart on purpose:
  * real_ttml: run TtmlBackend on TT-Train itself; skipped unless `main.import_ttml()` finds it (a tt-metal build with
    tt-train, and a Tenstorrent device).
  * contract: our glue against FakeTtml (tests/fake_ttml.py), a recording stand-in that mirrors the names in
    shared/ttml_api.md. They check which calls we make, in what order, with what arguments: they are not evidence
    that the backend works on hardware.
"""
import inspect
import os
import re
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import ROOT, main, read_jsonl, tiny_cfg
from fake_ttml import EVAL_LOSS, exposed_names, make_fake_ttml

NAMES_CANDIDATES = [os.environ.get("TTML_NAMES", ""), os.path.join(ROOT, "shared", "ttml_names.txt"),
                    os.path.join(os.path.dirname(ROOT), "shared", "ttml_names.txt")]
NAMES_FILE = next((p for p in NAMES_CANDIDATES if p and os.path.exists(p)), None)


def ttml_names():
    if NAMES_FILE is None:
        pytest.skip("shared/ttml_names.txt (the list of TT-Train's Python names) is not on this machine")
    with open(NAMES_FILE) as f:
        return {line.strip() for line in f if line.strip() and not line.startswith("#")}


def ttml_cfg(tmp_path, **kw):
    return tiny_cfg(tmp_path, backend="ttml", device="auto", **kw)


@pytest.fixture
def fake():
    return make_fake_ttml()


@pytest.fixture
def isolated_imports(monkeypatch):
    """import_ttml edits sys.path and imports modules: undo both after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("ttml", "_ttml"):
        if name in sys.modules:
            monkeypatch.setitem(sys.modules, name, sys.modules[name])
        else:
            monkeypatch.setitem(sys.modules, name, None)  # blocks the import, so nothing real leaks in
            monkeypatch.delitem(sys.modules, name)
    return monkeypatch


def block_ttml(monkeypatch):
    monkeypatch.setitem(sys.modules, "ttml", None)  # `import ttml` now raises ImportError
    monkeypatch.setitem(sys.modules, "_ttml", None)


def events(fake, *kinds):
    return [e for e in fake._log if e[0] in kinds]


def train_with(cfg, ttml):
    manifest = main.prepare(cfg, log=lambda *a: None)
    backend = main.TtmlBackend(cfg, main.Dist(), ttml)
    main.train(cfg, manifest, backend, main.Dist())
    return backend


# -----------------------------------------------------------------------------
# Real TT-Train (skipped without it)

_saved_path = list(sys.path)
REAL_TTML, WHY_NOT = main.import_ttml()
if REAL_TTML is None:
    sys.path[:] = _saved_path
real_ttml = pytest.mark.skipif(REAL_TTML is None, reason=f"TT-Train's ttml is not importable here: {WHY_NOT}")


@real_ttml
def test_real_ttml_trains_evaluates_samples_and_round_trips_a_checkpoint(tmp_path):
    cfg = ttml_cfg(tmp_path, n_layer=1, n_head=2, n_embd=64, steps=4, eval_every=2, lr=1e-3, warmup_steps=1)
    manifest = main.prepare(cfg, log=lambda *a: None)
    backend = main.make_backend(cfg, main.Dist())
    try:
        assert backend.name == "ttml"
        final = main.train(cfg, manifest, backend, main.Dist())
        rows = read_jsonl(tmp_path / "metrics.jsonl")
        assert np.isfinite(final) and all(np.isfinite(r.get("loss", r.get("val_loss"))) for r in rows)
        with main.no_grad(backend):
            logits = backend.next_token_logits(np.array([464, 2068, 286], dtype=np.int64))
        assert logits.shape == (main.VOCAB_SIZE,) and np.isfinite(logits).all()
        before = {k: backend._replica(t) for k, t in backend.model.parameters().items()}
        meta = backend.load(os.path.join(cfg.out_dir, "ckpt.pt"))
        assert meta["step"] == 4
        after = {k: backend._replica(t) for k, t in backend.model.parameters().items()}
        assert all(np.allclose(before[k], after[k], atol=1e-2) for k in before)
    finally:
        backend.close()


@real_ttml
def test_real_ttml_fits_one_repeated_batch(tmp_path):
    cfg = ttml_cfg(tmp_path, n_layer=1, n_head=2, n_embd=64, lr=3e-3, grad_clip=1.0)
    manifest = main.prepare(cfg, log=lambda *a: None)
    x, y = main.TrainBatches(main.TokenStream(cfg.out_dir, manifest["splits"]["train"]), cfg).next()
    backend = main.TtmlBackend(cfg, main.Dist(), REAL_TTML)
    try:
        losses = []
        for _ in range(15):
            backend.train_micro_step(x, y, 1.0)
            losses.append(backend.optimizer_step(cfg.lr, cfg.beta1))
        assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 1.0, losses
    finally:
        backend.close()


# -----------------------------------------------------------------------------
# Contract tests against the FakeTtml stand-in


def test_fake_exposes_only_real_ttml_names(fake):
    missing = sorted(set(exposed_names(fake)) - ttml_names())
    assert not missing, f"FakeTtml offers names TT-Train does not have: {missing}"


def test_backend_spells_only_listed_ttml_names():
    """Every `ttml.a.b.c` that the backend's source spells out is in ttml_names.txt. Two documented exceptions are
    reached through getattr fallbacks for older builds."""
    src = inspect.getsource(main.TtmlBackend) + inspect.getsource(main.import_ttml)
    used = set(re.findall(r"(?<![\w/])ttml\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)", src))
    assert "autograd.AutoContext.get_instance" in used  # the pattern does find the calls
    missing = sorted(used - ttml_names())
    assert not missing, f"main.TtmlBackend uses names TT-Train does not list: {missing}"
    fallbacks = {"core.distributed.synchronize_parameters"}  # the pre-rename name, in examples/python/transformers
    assert {"core.clip_grad_norm", "core.distributed.synchronize_gradients"} <= ttml_names()
    assert not fallbacks & ttml_names()  # if the list ever gains it, drop it from this set


def test_builds_tt_trains_gpt2_and_adamw_from_the_config(fake, tmp_path):
    cfg = ttml_cfg(tmp_path, n_layer=3, n_head=4, n_embd=64, dropout=0.1, lr=6e-4, beta1=0.8, beta2=0.97,
                   weight_decay=0.05)
    b = main.TtmlBackend(cfg, main.Dist(), fake)
    (_, model_cfg), = events(fake, "create_gpt2_model")
    assert model_cfg == {"num_heads": 4, "embedding_dim": 64, "num_blocks": 3, "vocab_size": 50272,
                         "max_sequence_length": 32, "dropout_prob": 0.1, "runner_type": "RunnerType.Default",
                         "weight_tying": "WeightTyingType.Enabled",
                         "positional_embedding_type": "PositionalEmbeddingType.Trainable"}
    assert events(fake, "AdamWConfig.make") == [("AdamWConfig.make", 6e-4, 0.8, 0.97, 1e-8, 0.05)]
    assert events(fake, "open_device") == [("open_device", None)] and not events(fake, "lazy_open_1x1")
    mask_calls = [e for e in events(fake, "from_numpy") if e[1] == (1, 1, 32, 32)]
    assert mask_calls == [("from_numpy", (1, 1, 32, 32), "Layout.TILE", "DataType.BFLOAT16", False)]
    assert (b.name, b.dtype, b.devices_per_process, b.fixed_beta1) == ("ttml", "bfloat16", 1, 0.8)
    b.close()
    assert events(fake, "close_device") == [("close_device",)]


def test_train_loop_contract_lr_scaling_and_window_ends(fake, tmp_path):
    cfg = ttml_cfg(tmp_path, steps=5, accumulation_steps=2, eval_every=4, warmup_steps=2, lr=1e-3, min_lr=1e-4)
    train_with(cfg, fake)
    # micro-steps come in windows 2, 2, 1; the optimizer acts only at each window's end, once
    expected = []
    for w in (2, 2, 1):
        expected += ["backward"] * w + ["clip_grad_norm", "set_lr", "step", "zero_grad"]
    assert [e[0] for e in events(fake, "backward", "clip_grad_norm", "set_lr", "step", "zero_grad")] == expected
    assert [e[1] for e in events(fake, "set_lr")] == [main.lr_at(k, cfg) for k in range(3)]
    # backward runs on loss x 1/window (the last, short window has 1 micro-step: unscaled), retain_graph=False
    assert events(fake, "backward") == [("backward", False, "GradMode.ENABLED", s) for s in (.5, .5, .5, .5, 1.)]
    assert set(events(fake, "clip_grad_norm")) == {("clip_grad_norm", cfg.grad_clip, 2.0, False)}
    # every backward is followed by reset_graph before anything else reaches the model
    log = [e[0] for e in fake._log]
    assert all(log[i + 1] == "reset_graph" for i, e in enumerate(log) if e == "backward")
    # the fake's training losses are 1, 2, 3, 4, 5: each logged loss is its window's mean
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["loss"] for r in rows if r["kind"] == "train"] == [1.5, 3.5, 5.0]
    assert [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "eval"] == [(0, EVAL_LOSS), (4, EVAL_LOSS),
                                                                                (5, EVAL_LOSS)]
    forwards = events(fake, "forward")
    assert [f[2:] for f in forwards].count(("GradMode.ENABLED", True)) == 5
    assert [f[2:] for f in forwards].count(("GradMode.DISABLED", False)) == 3 * cfg.eval_iters
    assert len(forwards) == 5 + 3 * cfg.eval_iters
    x_calls = [e for e in events(fake, "from_numpy") if e[1] == (cfg.batch_size, 1, 1, 32)]
    assert {e[2:] for e in x_calls} == {("Layout.ROW_MAJOR", "DataType.UINT32", False)}
    y_calls = [e for e in events(fake, "from_numpy") if e[1] == (cfg.batch_size, 32)]
    assert len(y_calls) == len(x_calls) and {e[2:] for e in y_calls} == {("Layout.ROW_MAJOR", "DataType.UINT32", False)}
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["backend"] == "ttml"


def test_losses_are_read_back_once_per_window_not_per_micro_step(fake, tmp_path):
    cfg = ttml_cfg(tmp_path)
    b = main.TtmlBackend(cfg, main.Dist(), fake)
    x = np.arange(4 * 32, dtype=np.uint16).reshape(4, 32)
    for _ in range(3):
        b.train_micro_step(x, x, 1 / 3)
    assert not events(fake, "to_numpy")  # nothing came back to the host during the window
    assert b.optimizer_step(1e-3, 0.9) == pytest.approx((1 + 2 + 3) / 3)
    assert len(events(fake, "to_numpy")) == 3
    assert set(events(fake, "to_numpy")) == {("to_numpy", "DataType.FLOAT32")}


def test_no_grad_disables_gradients_and_records_no_backward(fake, tmp_path):
    b = main.TtmlBackend(ttml_cfg(tmp_path), main.Dist(), fake)
    x = np.ones((4, 32), dtype=np.uint16)
    start = len(fake._log)
    with main.no_grad(b):
        with main.no_grad(b):  # nested: leaving the inner one must not re-enable gradients
            b.eval_loss(x, x)
        assert fake._state.grad == "GradMode.DISABLED"
        b.next_token_logits(np.array([1, 2, 3]))
    inside = fake._log[start:]
    assert inside[0] == ("set_gradient_mode", "GradMode.DISABLED")
    assert not [e for e in inside if e[0] == "backward"]
    assert {e[2:] for e in inside if e[0] == "forward"} == {("GradMode.DISABLED", False)}
    assert fake._state.grad == "GradMode.ENABLED" and inside[-1] == ("set_gradient_mode", "GradMode.ENABLED")
    assert ("train",) in inside[-2:] and b._training


def test_next_token_logits_reads_the_last_real_position_of_a_padded_row(fake, tmp_path):
    b = main.TtmlBackend(ttml_cfg(tmp_path), main.Dist(), fake)
    with main.no_grad(b):
        logits = b.next_token_logits(np.array([5, 6, 7], dtype=np.int64))
        assert logits.shape == (main.VOCAB_SIZE,) and int(np.argmax(logits)) == 8  # the fake predicts id + 1
        long = b.next_token_logits(np.arange(100, 150))  # longer than seq_len=32: the last 32 are used
        assert int(np.argmax(long)) == 150
        wrap = b.next_token_logits(np.array([main.VOCAB_SIZE - 1]))  # padded vocab columns are cut off
        assert int(np.argmax(wrap)) == 0
    assert {e[1] for e in events(fake, "from_numpy") if e[2] == "Layout.ROW_MAJOR"} == {(1, 1, 1, 32)}


def test_beta1_warmup_is_declined_in_one_line_and_metrics_log_the_beta1_used(fake, tmp_path, capsys):
    cfg = ttml_cfg(tmp_path, steps=4, eval_every=4, beta1_start=0.5, beta1_end=0.95, beta1_warmup_steps=3)
    train_with(cfg, fake)
    said = [line for line in capsys.readouterr().out.splitlines() if "beta1" in line]
    assert len(said) == 1 and "unavailable" in said[0] and "0.95" in said[0]
    assert events(fake, "AdamWConfig.make")[0][2] == 0.95
    assert [r["beta1"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"] == [0.95] * 4


def test_data_parallel_opens_a_mesh_shards_batches_and_averages_gradients(fake, tmp_path):
    cfg = ttml_cfg(tmp_path, data_parallel=2, steps=4, accumulation_steps=2, eval_every=4)
    b = train_with(cfg, fake)
    assert b.devices_per_process == 2
    names = [e[0] for e in fake._log]
    assert names.index("enable_fabric") < names.index("open_device") < names.index("from_numpy")
    assert events(fake, "enable_fabric") == [("enable_fabric", 2)] and ("open_device", [1, 2]) in fake._log
    assert not events(fake, "lazy_open_1x1")
    batches = [e for e in events(fake, "from_numpy") if e[2] == "Layout.ROW_MAJOR"]
    assert batches and all(e[-1] for e in batches)  # sharded over the mesh
    assert {e[1][0] for e in batches} == {2 * cfg.batch_size}  # batch_size rows per device
    expected = []
    for _ in range(2):
        expected += ["backward", "backward", "synchronize_gradients", "clip_grad_norm", "step"]
    assert [e[0] for e in events(fake, "backward", "synchronize_gradients", "clip_grad_norm", "step")] == expected
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["loss"] for r in rows if r["kind"] == "train"] == [1.5, 3.5]
    b.save(str(tmp_path / "dp.pt"), {"x": 1})  # replicated weights come back as one copy
    assert torch.load(tmp_path / "dp.pt", weights_only=False)["model"]["transformer/fc/weight"].shape == (1, 1, 8, 4)
    with main.no_grad(b):
        assert int(np.argmax(b.next_token_logits(np.array([9])))) == 10


def test_checkpoint_round_trips_weights_moments_and_step_count(tmp_path):
    cfg = ttml_cfg(tmp_path)
    a_ttml = make_fake_ttml()
    a = main.TtmlBackend(cfg, main.Dist(), a_ttml)
    x = np.ones((4, 32), dtype=np.uint16)
    for _ in range(2):
        a.train_micro_step(x, x, 1.0)
        a.optimizer_step(1e-3, 0.9)
    path = str(tmp_path / "ckpt.pt")
    a.save(path, {"step": 2, "rng": [a.rng_state()]})
    assert not os.path.exists(path + ".tmp")
    state = torch.load(path, weights_only=False)  # what --sample_only reads
    assert state["meta"]["step"] == 2 and state["optimizer"]["steps"] == 2

    b_ttml = make_fake_ttml()
    b = main.TtmlBackend(cfg, main.Dist(), b_ttml)
    meta = b.load(path)
    assert meta == {"step": 2, "rng": [{"seed": cfg.seed, "micro_steps": 2}]}
    for k, t in a.model.parameters().items():
        assert np.array_equal(t.to_numpy(), b.model.parameters()[k].to_numpy())
    moments = b.optimizer.get_state_dict()["first_moment"]
    assert all(np.array_equal(m.to_numpy(), np.full(m.shape(), 2.0, np.float32)) for m in moments.values())
    assert events(b_ttml, "set_state_dict") == [("set_state_dict", 2)]
    b.set_rng_state(meta["rng"][0])
    assert events(b_ttml, "set_seed")[-1] == ("set_seed", cfg.seed + 2)


def test_loading_a_torch_checkpoint_says_which_backend_wrote_it(fake, tmp_path):
    path = str(tmp_path / "ckpt.pt")
    torch.save({"model": {}, "optimizer": {}, "scaler": {}, "meta": {}}, path)
    b = main.TtmlBackend(ttml_cfg(tmp_path), main.Dist(), fake)
    with pytest.raises(main.ConfigError, match="torch backend"):
        b.load(path)


@pytest.mark.parametrize("kw, message", [(dict(seq_len=48), "multiples of 32"), (dict(n_embd=48, n_head=2),
                                                                                    "multiples of 32"),
                                         (dict(dtype="float32"), "bfloat16")])
def test_rejects_what_ttml_cannot_run_before_opening_a_device(fake, tmp_path, kw, message):
    with pytest.raises(main.ConfigError, match=message):
        main.TtmlBackend(ttml_cfg(tmp_path, **kw), main.Dist(), fake)
    assert not events(fake, "open_device")


def test_refuses_torchrun_and_closes_the_device_when_setup_fails(fake, tmp_path):
    with pytest.raises(main.ConfigError, match="without torchrun"):
        main.TtmlBackend(ttml_cfg(tmp_path), main.Dist(rank=0, world=2), fake)
    fake.models.gpt2.create_gpt2_model = None  # setup fails after the device is open
    with pytest.raises(TypeError):
        main.TtmlBackend(ttml_cfg(tmp_path), main.Dist(), fake)
    assert [e[0] for e in events(fake, "open_device", "close_device")] == ["open_device", "close_device"]


def test_run_and_sample_only_go_end_to_end_on_the_stand_in(isolated_imports, tmp_path, capsys):
    """main.run with backend=ttml: train, plot, sample, close; then --sample_only reads the ttml checkpoint."""
    fake = make_fake_ttml()
    isolated_imports.setitem(sys.modules, "ttml", fake)
    cfg = ttml_cfg(tmp_path, steps=2, eval_every=2, sample_prompt="The", sample_tokens=3)
    main.run(cfg)
    assert (tmp_path / "loss_curve.png").exists() and not (tmp_path / "hf").exists()
    assert events(fake, "close_device") == [("close_device",)]
    prompt = main.get_tokenizer().encode_ordinary("The")
    expected = main.get_tokenizer().decode(prompt + [prompt[-1] + 1, prompt[-1] + 2, prompt[-1] + 3])
    assert expected in capsys.readouterr().out  # greedy: the stand-in predicts id + 1
    main.run(ttml_cfg(tmp_path, sample_only=True, sample_prompt="The", sample_tokens=3))
    assert events(fake, "set_state_dict") and expected in capsys.readouterr().out


def test_export_hf_is_declined_in_one_line(fake, tmp_path, capsys):
    b = main.TtmlBackend(ttml_cfg(tmp_path), main.Dist(), fake)
    b.export_hf(str(tmp_path / "hf"))
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "torch-only" in out[0] and not (tmp_path / "hf").exists()


# -----------------------------------------------------------------------------
# Finding TT-Train (import_ttml / make_backend)


def test_impostor_ttml_package_is_named_as_not_tt_train(isolated_imports, tmp_path):
    pkg = tmp_path / "site" / "ttml"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Tensor-train decompositions (stand-in for PyPI ttml)."""\n'
                                     "def tt_svd(a):\n    return a\n")
    isolated_imports.syspath_prepend(str(tmp_path / "site"))
    isolated_imports.setitem(sys.modules, "_ttml", None)
    isolated_imports.setenv("TT_METAL_HOME", str(tmp_path / "tt-metal"))
    with pytest.raises(main.ConfigError, match="is not TT-Train") as e:
        main.make_backend(ttml_cfg(tmp_path), main.Dist())
    assert "pip uninstall ttml" in str(e.value) and "\n" not in str(e.value)


def test_missing_tt_metal_home_is_one_clear_error_naming_the_path(isolated_imports, tmp_path):
    isolated_imports.delenv("TT_METAL_HOME", raising=False)
    block_ttml(isolated_imports)
    with pytest.raises(main.ConfigError) as e:
        main.make_backend(ttml_cfg(tmp_path), main.Dist())
    msg = str(e.value)
    assert "TT_METAL_HOME" in msg and "tt-train/build/sources/ttml" in msg and "\n" not in msg


def test_auto_falls_back_to_torch_and_says_so_in_one_line(isolated_imports, tmp_path, capsys):
    isolated_imports.delenv("TT_METAL_HOME", raising=False)
    block_ttml(isolated_imports)
    b = main.make_backend(tiny_cfg(tmp_path, backend="auto"), main.Dist())
    assert isinstance(b, main.TorchBackend)
    out = capsys.readouterr().out.splitlines()
    assert out == ["backend: torch (ttml unavailable: TT_METAL_HOME is not set and no TT-Train ttml is installed)"]


def test_finds_an_old_builds_bare_ttml_extension_under_tt_metal_home(isolated_imports, tmp_path, capsys):
    """Old builds: only the nanobind `_ttml` module in $TT_METAL_HOME/tt-train/build/sources/ttml."""
    so_dir = tmp_path / "tt-metal" / "tt-train" / "build" / "sources" / "ttml"
    so_dir.mkdir(parents=True)
    (so_dir / "_ttml.py").write_text(textwrap.dedent("""\
        import fake_ttml
        globals().update({k: v for k, v in vars(fake_ttml.make_fake_ttml()).items() if not k.startswith("__")})
    """))
    isolated_imports.setenv("TT_METAL_HOME", str(tmp_path / "tt-metal"))
    isolated_imports.setitem(sys.modules, "ttml", None)  # no `ttml` package in this build
    isolated_imports.delitem(sys.modules, "_ttml", raising=False)
    b = main.make_backend(ttml_cfg(tmp_path), main.Dist())
    assert isinstance(b, main.TtmlBackend) and b.ttml.__name__ == "_ttml"
    assert str(so_dir) in sys.path
    assert capsys.readouterr().out.splitlines()[0] == "backend: ttml (TT-Train)"
    b.close()


def test_backend_ttml_uses_an_installed_tt_train(isolated_imports, tmp_path, fake):
    isolated_imports.delenv("TT_METAL_HOME", raising=False)  # a pip/.pth install needs no TT_METAL_HOME
    isolated_imports.setitem(sys.modules, "ttml", fake)
    b = main.make_backend(ttml_cfg(tmp_path), main.Dist())
    assert isinstance(b, main.TtmlBackend) and b.ttml is fake
