"""The TT-Train (ttml) backend.

Two kinds of test, kept apart on purpose:
  * real_ttml: run TtmlBackend on TT-Train itself; skipped unless `main.import_ttml()` finds it (a tt-metal build with
    tt-train, and a Tenstorrent device).
  * contract: our glue against tests/fake_ttml.py, a stand-in that models what the glue depends on (per-device
    gradients, when they are averaged, the enums' two homes, the state dict). They check behaviour per accumulation
    window, not call sequences, and they are not evidence that the backend works on hardware.
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
from fake_ttml import EVAL_LOSS, exposed_names, make_fake_tt_train

NAMES_FILE = os.path.join(ROOT, "tests", "data", "ttml_names.txt")  # a copy of shared/ttml_names.txt


def ttml_names():
    with open(NAMES_FILE) as f:
        return {line.strip() for line in f if line.strip() and not line.startswith("#")}


def ttml_cfg(tmp_path, **kw):
    return tiny_cfg(tmp_path, backend="ttml", device="auto", **kw)


@pytest.fixture(params=[True, False], ids=["enums-in-ttml", "enums-in-ttnn"])
def fake(request):
    """A fresh (ttml, ttnn) stand-in; Layout/DataType live in ttml on some builds and only in ttnn on others."""
    return make_fake_tt_train(enums_in_ttml=request.param)


def backend_on(cfg, fake, dist=None):
    return main.TtmlBackend(cfg, dist or main.Dist(), *fake)


def train_with(cfg, fake):
    manifest = main.prepare(cfg, log=lambda *a: None)
    backend = backend_on(cfg, fake)
    main.train(cfg, manifest, backend, main.Dist())
    return backend


def state_of(fake):
    return fake[0]._state


def logged(fake, kind):
    return [e for e in state_of(fake).log if e[0] == kind]


def replicas(tensor):
    """Each device's copy of a stand-in tensor."""
    return tensor.get_value().parts


@pytest.fixture
def isolated_imports(monkeypatch):
    """import_ttml edits sys.path and imports modules: undo both after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("ttml", "_ttml", "ttnn"):
        if name in sys.modules:
            monkeypatch.setitem(sys.modules, name, sys.modules[name])
        else:
            monkeypatch.setitem(sys.modules, name, None)  # blocks the import, so nothing real leaks in
            monkeypatch.delitem(sys.modules, name)
    return monkeypatch


def block_ttml(monkeypatch):
    monkeypatch.setitem(sys.modules, "ttml", None)  # `import ttml` now raises ImportError
    monkeypatch.setitem(sys.modules, "_ttml", None)


# -----------------------------------------------------------------------------
# Real TT-Train (skipped without it)

_saved_path = list(sys.path)
REAL_MODULES, WHY_NOT = main.import_ttml()
if REAL_MODULES is None:
    sys.path[:] = _saved_path
real_ttml = pytest.mark.skipif(REAL_MODULES is None, reason=f"TT-Train's ttml is not importable here: {WHY_NOT}")


@real_ttml
def test_real_ttml_trains_evaluates_samples_and_round_trips_a_checkpoint(tmp_path):
    cfg = ttml_cfg(tmp_path, n_layer=1, n_head=2, n_embd=64, steps=4, eval_every=2, lr=1e-3, warmup_steps=1)
    manifest = main.prepare(cfg, log=lambda *a: None)
    backend = main.make_backend(cfg, main.Dist())
    try:
        assert isinstance(backend, main.TtmlBackend)
        final = main.train(cfg, manifest, backend, main.Dist())
        rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] in ("train", "eval")]
        assert np.isfinite(final) and all(np.isfinite(r.get("loss", r.get("val_loss"))) for r in rows)
        with main.no_grad(backend):
            greedy = backend.next_token(np.array([464, 2068, 286], dtype=np.int64), 0.0, None, 0)
            sampled = [backend.next_token(np.array([464, 2068, 286]), 1.0, k, 7) for k in (None, 50, None)]
        assert 0 <= greedy < main.VOCAB_SIZE and all(0 <= t < main.VOCAB_SIZE for t in sampled)
        assert sampled[0] == sampled[2]  # the same seed draws the same token
        before = {k: backend._replica(t) for k, t in backend.model.parameters().items()}
        backend.load(main.read_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt")))
        after = {k: backend._replica(t) for k, t in backend.model.parameters().items()}
        assert all(np.allclose(before[k], after[k], atol=1e-2) for k in before)
    finally:
        backend.close()


@real_ttml
def test_real_ttml_fits_one_repeated_batch(tmp_path):
    cfg = ttml_cfg(tmp_path, n_layer=1, n_head=2, n_embd=64, lr=3e-3, grad_clip=1.0)
    manifest = main.prepare(cfg, log=lambda *a: None)
    x, y = main.TrainBatches(main.TokenStream(cfg.out_dir, manifest["splits"]["train"]), cfg).next()
    backend = main.TtmlBackend(cfg, main.Dist(), *REAL_MODULES)
    try:
        losses = []
        for _ in range(15):
            backend.train_micro_step(x, y, 1.0)
            losses.append(backend.optimizer_step(cfg.lr, cfg.beta1)[0])
        assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 1.0, losses
    finally:
        backend.close()


# -----------------------------------------------------------------------------
# The stand-in speaks TT-Train's names


def test_fake_exposes_only_real_ttml_names():
    ttml, _ = make_fake_tt_train()
    missing = sorted(set(exposed_names(ttml)) - ttml_names())
    assert not missing, f"the stand-in offers names TT-Train does not have: {missing}"


def test_backend_spells_only_listed_ttml_names():
    """Every `ttml.a.b.c` that the backend's source spells out is in ttml_names.txt, except one older name that an
    example shows (examples/python/transformers/training_ddp.py @578b4d2) and the list does not."""
    src = inspect.getsource(main.TtmlBackend) + inspect.getsource(main.import_ttml)
    used = set(re.findall(r"(?<![\w/])ttml\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)", src))
    assert "autograd.AutoContext.get_instance" in used  # the pattern does find the calls
    fallbacks = {"core.distributed.synchronize_parameters"}
    missing = sorted(used - ttml_names() - fallbacks)
    assert not missing, f"main.TtmlBackend uses names TT-Train does not list: {missing}"
    assert not fallbacks & ttml_names()  # if the list ever gains it, drop it from this set


# -----------------------------------------------------------------------------
# Building, training, evaluating, sampling


def test_builds_tt_trains_gpt2_and_adamw_from_the_config(fake, tmp_path):
    cfg = ttml_cfg(tmp_path, n_layer=3, n_head=4, n_embd=64, dropout=0.1, lr=6e-4, beta1=0.8, beta2=0.97,
                   weight_decay=0.05)
    b = backend_on(cfg, fake)
    (_, model_cfg), = logged(fake, "create_gpt2_model")
    assert model_cfg == {"num_heads": 4, "embedding_dim": 64, "num_blocks": 3, "vocab_size": 50272,
                         "max_sequence_length": 32, "dropout_prob": 0.1, "runner_type": "RunnerType.Default",
                         "weight_tying": "WeightTyingType.Enabled",
                         "positional_embedding_type": "PositionalEmbeddingType.Trainable"}
    assert logged(fake, "AdamWConfig.make") == [("AdamWConfig.make", 6e-4, 0.8, 0.97, 1e-8, 0.05)]
    assert logged(fake, "open_device") == [("open_device", None)] and not logged(fake, "lazy_open_1x1")
    mask = [e for e in logged(fake, "from_numpy") if e[1] == (1, 1, 32, 32)]
    assert mask == [("from_numpy", (1, 1, 32, 32), "Layout.TILE", "DataType.BFLOAT16", False)]
    assert (b.dtype, b.devices_per_process) == ("bfloat16", 1)
    b.close()
    assert state_of(fake).devices is None


def test_each_window_runs_its_micro_steps_then_one_step_at_the_scheduled_lr(fake, tmp_path):
    cfg = ttml_cfg(tmp_path, steps=6, accumulation_steps=2, eval_every=4, warmup_steps=2, lr=1e-3, min_lr=1e-4)
    train_with(cfg, fake)
    st = state_of(fake)
    assert st.steps == [{"backwards": 2, "lr": main.lr_at(k, cfg)} for k in range(3)]
    assert set(logged(fake, "clip_grad_norm")) == {("clip_grad_norm", cfg.grad_clip, 2.0, False)}
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["loss"] for r in rows if r["kind"] == "train"] == [1.5, 3.5, 5.5]  # the stand-in's losses 1..6
    assert [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "eval"] == [(0, EVAL_LOSS), (4, EVAL_LOSS),
                                                                                (6, EVAL_LOSS)]
    forwards = [e[2:] for e in logged(fake, "forward")]
    assert forwards.count(("GradMode.ENABLED", True)) == 6  # training: gradients on, dropout on
    assert forwards.count(("GradMode.DISABLED", False)) == 3 * cfg.eval_iters == len(forwards) - 6
    batches = [e for e in logged(fake, "from_numpy") if e[2] == "Layout.ROW_MAJOR"]
    assert {e[1] for e in batches} == {(cfg.batch_size, 1, 1, 32), (cfg.batch_size, 32)}
    assert {e[3:] for e in batches} == {("DataType.UINT32", False)}
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["backend"] == "ttml"


def test_losses_are_read_back_once_per_window_not_per_micro_step(fake, tmp_path):
    b = backend_on(ttml_cfg(tmp_path), fake)
    x = np.arange(4 * 32, dtype=np.uint16).reshape(4, 32)
    for _ in range(3):
        b.train_micro_step(x, x, 1 / 3)
    assert not logged(fake, "to_numpy")  # nothing came back to the host during the window
    loss, beta1 = b.optimizer_step(1e-3, 0.5)
    assert loss == pytest.approx((1 + 2 + 3) / 3) and beta1 == b.cfg.beta1  # beta1 is AdamW's, fixed when built
    assert len(logged(fake, "to_numpy")) == 3 and state_of(fake).steps == [{"backwards": 3, "lr": 1e-3}]


def test_no_grad_disables_gradients_and_dropout_and_restores_both(fake, tmp_path):
    b = backend_on(ttml_cfg(tmp_path), fake)
    x = np.ones((4, 32), dtype=np.uint16)
    with main.no_grad(b):
        with main.no_grad(b):  # nested: leaving the inner one must not re-enable gradients
            assert b.eval_loss(x, x) == EVAL_LOSS
        assert state_of(fake).grad == "GradMode.DISABLED"
        b.next_token(np.array([1, 2, 3]), 0.0, None, 0)
    assert {e[2:] for e in logged(fake, "forward")} == {("GradMode.DISABLED", False)}
    assert state_of(fake).grad == "GradMode.ENABLED" and b._training
    b.train_micro_step(x, x, 1.0)  # the stand-in refuses backward with gradients off, so this shows they are on


def test_greedy_cuts_the_last_real_position_and_chooses_on_the_device(fake, tmp_path):
    b = backend_on(ttml_cfg(tmp_path), fake)
    with main.no_grad(b):
        assert b.next_token(np.array([5, 6, 7], dtype=np.int64), 0.0, None, 0) == 8  # the stand-in ranks id + 1 first
        assert b.next_token(np.arange(100, 150), 0.0, None, 0) == 150  # longer than seq_len=32: the last 32 are used
        assert b.next_token(np.array([main.VOCAB_SIZE - 1]), 0.0, None, 0) == 0
    assert logged(fake, "argmax") == [("argmax", 3, True)] * 3
    assert {e[1] for e in logged(fake, "to_numpy")} == {(1, 1, 1, 1)}  # one id came back per token, not a row


SAMPLING_BUILDS = {"sample-op": {}, "no-sample-op-or-topk": {"sampling_ops": False}}


def draw(b, temperature, top_k, seeds, prompt=(5, 6, 7)):
    with main.no_grad(b):
        return [b.next_token(np.array(prompt), temperature, top_k, s) for s in seeds]


@pytest.mark.parametrize("build", SAMPLING_BUILDS.values(), ids=SAMPLING_BUILDS.keys())
def test_sampling_is_reproducible_per_seed_and_keeps_to_the_top_k(build, tmp_path):
    fake = make_fake_tt_train(**build)
    b = backend_on(ttml_cfg(tmp_path), fake)
    seeds = range(1, 41)
    free = draw(b, 1.0, None, seeds)
    assert free == draw(b, 1.0, None, seeds) and len(set(free)) > 3  # the same seeds draw the same tokens
    assert not set(free) <= {8, 9, 10}  # the stand-in's logits fall off slowly: without top_k, more than 3 show up
    assert set(draw(b, 1.0, 3, seeds)) <= {8, 9, 10}  # the 3 best after token 7
    assert draw(b, 0.7, 1, seeds[:3]) == [8] * 3  # top_k = 1 is greedy
    rows = {e[1] for e in logged(fake, "to_numpy")}
    if hasattr(fake[0].ops, "sample"):  # one id came back per token, the padding mask passed to sample_op
        assert rows == {(1, 1, 1, 1)} and {e[3] for e in logged(fake, "sample_op")} == {True}
        assert {e[1] for e in logged(fake, "topk")} == {3, 1}
    else:  # the host path: the whole row came back
        assert rows == {(1, 1, 1, 50272)} and not logged(fake, "topk")


@pytest.mark.parametrize("build", SAMPLING_BUILDS.values(), ids=SAMPLING_BUILDS.keys())
def test_padded_vocab_columns_are_never_chosen_even_when_they_score_highest(build, tmp_path):
    fake = make_fake_tt_train(padded_columns_win=True, **build)
    b = backend_on(ttml_cfg(tmp_path), fake)
    assert draw(b, 0.0, None, [0]) == [8]  # greedy = the host argmax over the real vocabulary
    assert max(draw(b, 1.0, None, range(1, 30)) + draw(b, 1.0, 20, range(1, 30))) < main.VOCAB_SIZE


def test_generate_on_the_stand_in_matches_its_greedy_rule_and_its_seeds(fake, tmp_path):
    b = backend_on(ttml_cfg(tmp_path), fake)
    assert main.generate(b, [5], ttml_cfg(tmp_path, sample_tokens=4), None) == [5, 6, 7, 8, 9]
    cfg = ttml_cfg(tmp_path, temperature=1.0, top_k=5, sample_tokens=6)
    one = main.generate(b, [5], cfg, np.random.default_rng(3))
    assert one == main.generate(b, [5], cfg, np.random.default_rng(3))
    assert all(0 < s < 2**32 for s in (e[2] for e in logged(fake, "sample_op")))  # seed 0 would mean "host entropy"


def test_beta1_warmup_is_declined_in_one_line_and_metrics_log_the_beta1_used(fake, tmp_path, capsys):
    cfg = ttml_cfg(tmp_path, steps=4, eval_every=4, beta1_start=0.5, beta1_end=0.95, beta1_warmup_steps=3)
    train_with(cfg, fake)
    said = [line for line in capsys.readouterr().out.splitlines() if "beta1" in line]
    assert len(said) == 1 and "unavailable" in said[0] and "0.95" in said[0]
    assert logged(fake, "AdamWConfig.make")[0][2] == 0.95
    assert [r["beta1"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"] == [0.95] * 4


# -----------------------------------------------------------------------------
# Data parallel: the devices must end every step with the same weights

BUILDS = {  # tt-train versions the stand-in can play (see tests/fake_ttml.py)
    "sync-with-axes": {},
    "sync-needs-context": {"sync_takes_axes": False},
    "before-parallelism-context": {"parallelism_context": False},
    "enums-in-ttnn": {"enums_in_ttml": False},
}


@pytest.mark.parametrize("build", BUILDS.values(), ids=BUILDS.keys())
def test_data_parallel_shards_batches_and_keeps_the_replicas_identical(build, tmp_path):
    fake = make_fake_tt_train(**build)
    cfg = ttml_cfg(tmp_path, data_parallel=2, steps=4, accumulation_steps=2, eval_every=4)
    b = train_with(cfg, fake)
    assert b.devices_per_process == 2 and logged(fake, "enable_fabric") == [("enable_fabric", 2)]
    assert logged(fake, "open_device") == [("open_device", [1, 2])] and not logged(fake, "lazy_open_1x1")
    batches = [e for e in logged(fake, "from_numpy") if e[2] == "Layout.ROW_MAJOR"]
    assert batches and all(e[-1] for e in batches)  # sharded over the mesh
    assert {e[1][0] for e in batches} == {2 * cfg.batch_size}  # batch_size rows per device
    assert state_of(fake).steps == [{"backwards": 2, "lr": main.lr_at(k, cfg)} for k in range(2)]
    assert len(logged(fake, "gradients_averaged")) == 2  # once per optimizer step
    for name, p in b.model.parameters().items():  # shards differ, so only averaged gradients keep these equal
        first, second = replicas(p)
        assert np.array_equal(first, second), name
    assert [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"] == [1.5, 3.5]
    b.save(str(tmp_path / "dp.pt"), {"x": 1})  # replicated weights come back as one copy
    assert torch.load(tmp_path / "dp.pt", weights_only=False)["model"]["transformer/fc/weight"].shape == (1, 1, 8, 4)
    with main.no_grad(b):
        assert b.next_token(np.array([9]), 0.0, None, 0) == 10
        assert b.next_token(np.array([9]), 1.0, 1, 5) == 10  # top-1 sampling on the mesh


def test_a_gradient_sync_that_does_nothing_stops_the_run_at_the_first_step(tmp_path):
    fake = make_fake_tt_train()
    fake[0].core.distributed.synchronize_gradients = lambda *args: None  # a build whose sync is a silent no-op
    cfg = ttml_cfg(tmp_path, data_parallel=2, steps=4, eval_every=4)
    with pytest.raises(main.UserError, match="differ after the first optimizer step") as e:
        train_with(cfg, fake)
    assert "\n" not in str(e.value) and len(state_of(fake).steps) == 1


# -----------------------------------------------------------------------------
# Checkpoints


def trained_checkpoint(tmp_path, cfg):
    """Two optimizer steps on a fresh stand-in, saved as ckpt.pt; returns (backend, read_checkpoint's dict)."""
    fake = make_fake_tt_train()
    a = backend_on(cfg, fake)
    x = np.ones((4, 32), dtype=np.uint16)
    for _ in range(2):
        a.train_micro_step(x, x, 1.0)
        a.optimizer_step(1e-3, 0.9)
    path = str(tmp_path / "ckpt.pt")
    a.save(path, {"step": 2, "rng": [a.rng_state()], "model_shape": main.model_shape(cfg), "config": {}})
    assert not os.path.exists(path + ".tmp")
    return a, main.read_checkpoint(path)


@pytest.mark.parametrize("int_steps_ok", [True, False], ids=["steps-restored", "steps-refused"])
def test_checkpoint_round_trips_weights_and_moments_and_says_when_the_step_count_cannot(tmp_path, capsys,
                                                                                         int_steps_ok):
    cfg = ttml_cfg(tmp_path)
    a, state = trained_checkpoint(tmp_path, cfg)
    assert state["optimizer"]["steps"] == 2
    fake = make_fake_tt_train(int_steps_ok=int_steps_ok)
    b = backend_on(cfg, fake)
    capsys.readouterr()
    b.load(state)
    for k, t in a.model.parameters().items():
        assert np.array_equal(t.to_numpy(), b.model.parameters()[k].to_numpy())
    for key in ("exp_avg", "exp_avg_sq"):
        saved, live = a.optimizer.get_state_dict()[key], b.optimizer.get_state_dict()[key]
        assert all(np.array_equal(saved[k].to_numpy(), live[k].to_numpy()) for k in saved)
    said = capsys.readouterr().out.splitlines()
    if int_steps_ok:
        assert b.optimizer.get_state_dict()["steps"] == 2 and said == []
    else:
        assert b.optimizer.get_state_dict()["steps"] == 0
        assert len(said) == 1 and "step count (2)" in said[0] and "bias correction" in said[0]
    b.set_rng_state(state["meta"]["rng"][0])
    assert logged(fake, "set_seed")[-1] == ("set_seed", cfg.seed + 2)


def test_loading_a_torch_checkpoint_says_which_backend_wrote_it(fake, tmp_path):
    b = backend_on(ttml_cfg(tmp_path), fake)
    with pytest.raises(main.UserError, match="torch backend"):
        b.load({"model": {}, "optimizer": {}, "scaler": {}, "meta": {}})


# -----------------------------------------------------------------------------
# Refusals, the whole run, export


@pytest.mark.parametrize("kw, message", [(dict(seq_len=48), "multiples of 32"),
                                         (dict(n_embd=48, n_head=2), "multiples of 32"),
                                         (dict(dtype="float32"), "bfloat16")])
def test_rejects_what_ttml_cannot_run_before_opening_a_device(fake, tmp_path, kw, message):
    with pytest.raises(main.UserError, match=message):
        backend_on(ttml_cfg(tmp_path, **kw), fake)
    assert not logged(fake, "open_device")


def test_refuses_torchrun_and_closes_the_device_when_setup_fails(fake, tmp_path):
    with pytest.raises(main.UserError, match="without torchrun"):
        backend_on(ttml_cfg(tmp_path), fake, main.Dist(rank=0, world=2))
    fake[0].models.gpt2.create_gpt2_model = None  # setup fails after the device is open
    with pytest.raises(TypeError):
        backend_on(ttml_cfg(tmp_path), fake)
    assert [e[0] for e in state_of(fake).log if "device" in e[0]] == ["open_device", "close_device"]


def install(monkeypatch, fake):
    monkeypatch.setitem(sys.modules, "ttml", fake[0])
    monkeypatch.setitem(sys.modules, "ttnn", fake[1])


def test_run_and_sample_only_go_end_to_end_on_the_stand_in(isolated_imports, tmp_path, capsys):
    """main.run with backend=ttml: train, plot, sample, close; then --sample_only reads the ttml checkpoint."""
    fake = make_fake_tt_train()
    install(isolated_imports, fake)
    cfg = ttml_cfg(tmp_path, steps=2, eval_every=2, sample_prompt="The", sample_tokens=3)
    main.run(cfg)
    assert (tmp_path / "loss_curve.png").exists() and not (tmp_path / "hf").exists()
    assert state_of(fake).devices is None  # closed
    prompt = main.get_tokenizer().encode_ordinary("The")
    expected = main.get_tokenizer().decode(prompt + [prompt[-1] + 1, prompt[-1] + 2, prompt[-1] + 3])
    assert expected in capsys.readouterr().out  # greedy: the stand-in predicts id + 1
    main.run(ttml_cfg(tmp_path, sample_only=True, sample_prompt="The", sample_tokens=3))
    assert expected in capsys.readouterr().out


def test_export_hf_is_declined_in_one_line(fake, tmp_path, capsys):
    b = backend_on(ttml_cfg(tmp_path), fake)
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
    with pytest.raises(main.UserError, match="is not TT-Train") as e:
        main.make_backend(ttml_cfg(tmp_path), main.Dist())
    assert "pip uninstall ttml" in str(e.value) and "\n" not in str(e.value)


def test_missing_tt_metal_home_is_one_clear_error_naming_the_path(isolated_imports, tmp_path):
    isolated_imports.delenv("TT_METAL_HOME", raising=False)
    block_ttml(isolated_imports)
    with pytest.raises(main.UserError) as e:
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


def test_finds_the_bare_ttml_extension_in_the_seeds_documented_place(isolated_imports, tmp_path, capsys):
    """$TT_METAL_HOME/tt-train/build/sources/ttml holding only the nanobind module `_ttml`, no `ttml` package."""
    so_dir = tmp_path / "tt-metal" / "tt-train" / "build" / "sources" / "ttml"
    so_dir.mkdir(parents=True)
    (so_dir / "_ttml.py").write_text(textwrap.dedent("""\
        import sys, fake_ttml
        ttml, sys.modules["ttnn"] = fake_ttml.make_fake_tt_train()
        globals().update({k: v for k, v in vars(ttml).items() if not k.startswith("__")})
    """))
    isolated_imports.setenv("TT_METAL_HOME", str(tmp_path / "tt-metal"))
    isolated_imports.setitem(sys.modules, "ttml", None)  # no `ttml` package in this build
    b = main.make_backend(ttml_cfg(tmp_path), main.Dist())
    assert isinstance(b, main.TtmlBackend) and b.ttml.__name__ == "_ttml" and sys.path[0] == str(so_dir)
    assert capsys.readouterr().out.splitlines()[0] == "backend: ttml (TT-Train)"
    b.close()


def test_backend_ttml_uses_an_installed_tt_train(isolated_imports, tmp_path):
    isolated_imports.delenv("TT_METAL_HOME", raising=False)  # a pip/.pth install needs no TT_METAL_HOME
    fake = make_fake_tt_train()
    install(isolated_imports, fake)
    b = main.make_backend(ttml_cfg(tmp_path), main.Dist())
    assert isinstance(b, main.TtmlBackend) and (b.ttml, b.ttnn) == fake


def test_tt_train_without_ttnn_is_one_clear_error(isolated_imports, tmp_path):
    isolated_imports.setitem(sys.modules, "ttml", make_fake_tt_train()[0])
    isolated_imports.setitem(sys.modules, "ttnn", None)
    with pytest.raises(main.UserError, match="ttnn does not") as e:
        main.make_backend(ttml_cfg(tmp_path), main.Dist())
    assert "\n" not in str(e.value)
