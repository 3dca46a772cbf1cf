"""TtmlBackend against tests/fake_ttml.py (the pinned build's stand-in): outcomes, not call logs; no hardware."""

import os
import sys
import types

import numpy as np
import pytest
import torch

import fake_ttml
from conftest import main as tt  # noqa: E402

UserError = tt.UserError
GPT2_PADDED = tt.TT_VOCAB
# The glue does not depend on GPT-2's 50257 ids; a 1000-id vocabulary padded to 1024 keeps the stand-in's numpy fast.
V = 1000

ENV = ("TT_METAL_HOME", "TT_METAL_RUNTIME_ROOT", "TT_MESH_GRAPH_DESC_PATH")


def cfg_(**kw):
    base = dict(
        seed=1,
        seq_len=32,
        n_layer=1,
        n_head=1,
        n_embd=32,
        dropout=0.0,
        lr=1e-2,
        beta1=0.9,
        beta2=0.95,
        beta1_start=None,
        beta1_end=None,
        weight_decay=0.0,
        grad_clip=1.0,
        accumulation_steps=1,
        batch_size=2,
        data_parallel=None,
        dtype="auto",
        out_dir="/tmp",
        tt_runner="default",
        tt_optimizer="fp32_master",
        optimizer="adamw",
        muon_lr=0.02,
        muon_momentum=0.95,
    )
    return types.SimpleNamespace(**{**base, **kw})


def batch(rows, seed=0, T=32):
    x = np.random.default_rng(seed).integers(0, V, (rows, T)).astype(np.uint16)
    return x, np.roll(x, -1, axis=1)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name, value in (("VOCAB_SIZE", V), ("EOS_ID", V - 1), ("TT_VOCAB", 1024)):
        monkeypatch.setattr(tt, name, value)
    for k in ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TT_METAL_RUNTIME_ROOT", "/opt/tt-metal")  # as import_ttml leaves it


def backend(**kw):
    return tt.TtmlBackend(cfg_(**kw), *fake_ttml.make_fake_tt_train())


FC = "NanoGPT/fc/weight"  # the tied wte/lm_head, as ttml's NanoGPT registers it


def weights(b, name=FC):
    """Every device's copy of a parameter, as the device holds it (its HALF view)."""
    return b.model.parameters()[name].get_value().parts


def test_training_lowers_the_loss_and_accumulation_averages_micro_batches():
    b = backend(accumulation_steps=2)
    (x1, y1), (x2, y2) = batch(2, 1), batch(2, 2)
    expected = (b.eval_loss(x1, y1) + b.eval_loss(x2, y2)) / 2
    b.train_micro_step(x1, y1)
    b.train_micro_step(x2, y2)
    assert b.optimizer_step(1e-2, 0.9) == pytest.approx(expected, rel=1e-5)
    losses = []
    for _ in range(4):
        b.train_micro_step(x1, y1)
        b.train_micro_step(x1, y1)
        losses.append(b.optimizer_step(1e-2, 0.9))
    assert losses[-1] < losses[0] - 0.5 and losses[0] < expected + 0.01


def test_the_memory_efficient_runner_trains_the_same_model():
    x, y = batch(2)
    runs = [backend(tt_runner=r) for r in ("default", "memory_efficient")]
    for b in runs:
        b.train_micro_step(x, y)
        b.optimizer_step(1e-2, 0.9)
    assert np.array_equal(weights(runs[0])[0], weights(runs[1])[0])


def test_data_parallel_replicas_agree_and_match_one_device_on_the_whole_batch():
    x, y = batch(4)
    one = backend()
    mesh = backend(data_parallel=2)  # each device draws its own init: the backend gives every device device 0's
    assert mesh.replicas == 2 and np.array_equal(weights(mesh)[0], weights(mesh)[1])
    for _ in range(2):
        one.train_micro_step(x, y)
        mesh.train_micro_step(x, y)  # each device gets 2 of the 4 rows
        assert mesh.optimizer_step(1e-2, 0.9) == pytest.approx(one.optimizer_step(1e-2, 0.9), rel=1e-3)
    a, b = weights(mesh)
    # Adam turns tiny gradient differences (bf16 sums in another order) into whole steps of ~lr, so most, not all
    assert np.array_equal(a, b) and np.mean(np.abs(a - weights(one)[0]) < 2e-3) > 0.95


def test_replicas_that_drift_apart_stop_the_run(monkeypatch):
    mesh = backend(data_parallel=2)
    sync = mesh.ttml.core.distributed.synchronize_gradients
    monkeypatch.setattr(mesh.ttml.core.distributed, "synchronize_gradients", lambda p, axes: sync(p, [0]))
    mesh.train_micro_step(*batch(4))  # axis 0 of a [1, 2] mesh has one device: averaging over it does nothing
    with pytest.raises(UserError, match="differ"):
        mesh.optimizer_step(1e-2, 0.9)


def test_eight_devices_open_as_1x8_with_tt_trains_descriptor_and_fabric_needs_the_runtime_root(monkeypatch):
    b = backend(data_parallel=8)
    assert os.environ["TT_MESH_GRAPH_DESC_PATH"].endswith("t3k_1x8_mesh_graph_descriptor.textproto")
    assert b.replicas == 8 and len(weights(b)) == 8
    b.close()
    with pytest.raises(UserError, match=r"\[4, 8\].*TT_MESH_GRAPH_DESC_PATH"):
        monkeypatch.delenv("TT_MESH_GRAPH_DESC_PATH")
        backend(data_parallel=32)
    monkeypatch.delenv("TT_METAL_RUNTIME_ROOT")
    with pytest.raises(RuntimeError, match="TT_METAL_RUNTIME_ROOT is not set"):
        backend(data_parallel=2)


def bf16_exact(t):
    return torch.equal(t, t.to(torch.bfloat16).float())


@pytest.mark.parametrize("kind", ["fp32_master", "bf16_stochastic", "bf16"])
def test_checkpoint_round_trips_through_torch_save_weights_only(tmp_path, kind):
    x, y = batch(2)
    a = backend(tt_optimizer=kind)
    for _ in range(2):
        a.train_micro_step(x, y), a.optimizer_step(1e-2, 0.9)
    path = tmp_path / "ckpt.pt"
    torch.save(a.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert set(state["optimizer"]) == {"decay", "no_decay"}
    if kind == "fp32_master":  # fp32 state that a restore through assign (HALF) would round
        assert not bf16_exact(state["optimizer"]["decay"]["master_weights"][FC])
    b = backend(tt_optimizer=kind, seed=7)  # other init: everything must come from the checkpoint
    b.load_state_dict(state)
    again = b.state_dict()
    assert again["rng"] == state["rng"] and again["optimizer"]["decay"]["steps"] == 2
    flat = {}
    for part in ("model", "optimizer"):
        for k, v in state[part].items():
            for kk, vv in v.items() if isinstance(v, dict) else [(None, v)]:
                flat[(part, k, kk)] = (vv, again[part][k][kk] if kk is not None else again[part][k])
    for key, (saved, now) in flat.items():
        if isinstance(saved, dict):
            assert all(torch.equal(saved[n], now[n]) for n in saved), key
        else:
            assert torch.equal(saved, now) if isinstance(saved, torch.Tensor) else saved == now, key
    if kind != "bf16_stochastic":  # the same next step on both, bias correction included
        for m in (a, b):
            m.train_micro_step(x, y)
        assert a.optimizer_step(1e-2, 0.9) == b.optimizer_step(1e-2, 0.9)
        assert all(np.array_equal(weights(a, k)[0], weights(b, k)[0]) for k in a.model.parameters())
    assert set(a.state_dict(weights=False)) == {"rng"}


def test_the_pins_set_state_dict_takes_no_python_int_as_the_step_count():
    """Why load_state_dict counts with step() instead (the stricter reading of serialization/serializable.hpp)."""
    b = backend()
    live = b.optimizers["decay"].get_state_dict()
    with pytest.raises(RuntimeError, match="bad_variant_access"):
        b.optimizers["decay"].set_state_dict({**live, "steps": 2})


def test_sample_only_load_and_a_misfit_parameter_is_one_line():
    a = backend()
    b = backend(seed=3)
    b.load_state_dict({"model": a.state_dict()["model"]})
    ids = np.array([5, 6, 7])
    assert np.array_equal(a.next_logits(ids), b.next_logits(ids))
    bad = {"model": {FC: torch.zeros(10, 32)}}
    with pytest.raises(UserError) as e:
        b.load_state_dict(bad)
    assert "does not fit" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="torch backend"):
        b.load_state_dict({"model": {"transformer.wte.weight": torch.zeros(1)}})


def test_a_model_only_load_survives_the_first_step_and_fp32_masters_keep_sub_ulp_updates():
    """A load into a built AdamWFullPrecision is overwritten by its masters at the next step unless they are taken
    from the loaded weights; and then updates under half a bf16 ulp add up in fp32 and vanish in bf16."""
    x, y = batch(1)
    moved = {}
    for kind in ("fp32_master", "bf16"):
        b = backend(tt_optimizer=kind, grad_clip=0.0)
        b.load_state_dict({"model": {FC: torch.full((1, 1, tt.TT_VOCAB, 32), 0.5)}})
        for _ in range(3):  # Adam moves a weight by ~lr a step: under half a bf16 ulp of 0.5, three steps are not
            b.train_micro_step(x, y)
            b.optimizer_step(9e-4, 0.9)
        w = weights(b)[0]
        assert np.abs(w - 0.5).max() < 0.01, kind  # the loaded weights, not the init
        moved[kind] = int((w != 0.5).sum())
    assert moved["bf16"] == 0 < moved["fp32_master"]


def test_checkpoints_hold_the_current_bf16_weights_after_a_full_precision_read():
    """The fused bf16 AdamW updates the HALF view in place; a FULL view cached by an earlier read goes stale."""
    x, y = batch(2)
    b = backend(tt_optimizer="bf16", data_parallel=2)
    b.train_micro_step(*batch(4))
    b.optimizer_step(1e-2, 0.9)  # the replica check reads the weights
    p = b.model.parameters()[FC]
    p.to_numpy(b.ttnn.DataType.FLOAT32, composer=b.composer)  # caches FULL on the tensor
    b.train_micro_step(*batch(4, 3))
    b.optimizer_step(1e-2, 0.9)
    stale = p.to_numpy(b.ttnn.DataType.FLOAT32, composer=b.composer)[: tt.TT_VOCAB]
    saved = b.state_dict()["model"][FC].numpy()
    assert np.array_equal(saved, weights(b)[0]) and not np.array_equal(saved, stale)


def test_layernorm_gains_and_biases_get_no_weight_decay_as_on_torch():
    b = backend(weight_decay=1000.0, grad_clip=0.0)  # lr * wd = 1: decoupled decay zeroes a decayed tensor
    b.train_micro_step(*batch(2))
    b.optimizer_step(1e-3, 0.9)
    model = b.state_dict()["model"]
    gains = [v for k, v in model.items() if "gamma" in k]
    biases = [v for k, v in model.items() if k.endswith("bias") or "beta" in k]
    matrices = [v for k, v in model.items() if k.endswith("/weight")]
    assert len(gains) == 3 and len(biases) == 7 and len(matrices) == 6  # one block
    assert all(float((g - 1).abs().max()) < 0.01 for g in gains)
    assert all(float(v.abs().max()) < 0.01 for v in biases + matrices)
    assert max(float(v.abs().max()) for v in matrices) < 2e-3  # decayed to 0, then one Adam step of ~lr


def test_right_padding_cannot_reach_the_last_prompt_position(monkeypatch):
    b = backend()
    ids = np.array([3, 9, 11])
    rows = []
    for pad in (0, 5, V - 1):  # what fills the row after the prompt
        monkeypatch.setattr(tt, "EOS_ID", pad)
        rows.append(b.next_logits(ids))
    assert all(np.array_equal(rows[0], r) for r in rows[1:])
    assert not np.array_equal(b.next_logits(ids[:2]), rows[0])


def test_next_logits_are_the_real_vocabulary_at_the_last_prompt_position_and_restore_training():
    b = backend(data_parallel=2)
    for ids in (np.array([3]), np.array([3, 9, 11]), np.arange(40)):  # longer than seq_len keeps the last 32
        out = b.next_logits(ids)
        assert out.dtype == np.float32 and out.shape == (V,) and np.isfinite(out).all()
    b.train_micro_step(*batch(4))  # gradients on and train mode again
    assert b.optimizer_step(1e-2, 0.9) > 0 and b.model.mode == "train"


def test_refusals_are_one_line():
    for kw, words in (
        (dict(beta1_start=0.85), "beta1"),
        (dict(seq_len=48), "multiples of 32"),
        (dict(dtype="float32"), "bfloat16"),
    ):
        with pytest.raises(UserError, match=words):
            backend(**kw)


def test_peak_flops_from_the_core_count_and_vocab_padded_as_tt_trains_gpt2():
    assert GPT2_PADDED == 50304 and GPT2_PADDED % 128 == 0 and GPT2_PADDED >= 50257
    assert (backend().peak_flops, backend(data_parallel=2).peak_flops) == (64e12, 128e12)


@pytest.fixture
def imports(monkeypatch):
    """import_ttml edits sys.path and sys.modules: undo both; a fake ttnn stands in for tt-metal's."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("ttml", "_ttml", "ttml._ttml"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "ttnn", types.ModuleType("ttnn"))
    monkeypatch.delenv("TT_METAL_RUNTIME_ROOT")
    yield monkeypatch
    for name in ("ttml", "_ttml", "ttml._ttml"):
        sys.modules.pop(name, None)


def test_import_finds_the_current_layout_ahead_of_a_stale_old_build(tmp_path, imports):
    home = fake_ttml.lay_out_tt_metal(str(tmp_path))
    stale = tmp_path / "tt-train" / "build" / "sources" / "ttml"  # the pre-2025 layout, left behind
    stale.mkdir(parents=True)
    (stale / "_ttml.py").write_text("raise ImportError('stale build')\n")
    sys.path.insert(0, str(stale))
    imports.setenv("TT_METAL_HOME", home)
    ttml, ttnn = tt.import_ttml()
    assert ttml.autograd.AutoContext is not None and ttnn is sys.modules["ttnn"]
    assert os.environ["TT_METAL_RUNTIME_ROOT"] == home
    assert os.path.dirname(sys.modules["_ttml"].__file__).startswith(os.path.join(home, "build", "tt-train"))


def test_import_failures_say_what_was_tried_in_one_line(tmp_path, imports):
    imports.setenv("TT_METAL_HOME", str(tmp_path))
    with pytest.raises(UserError) as e:
        tt.import_ttml()
    msg, where = str(e.value), str(tmp_path / "build" / "tt-train" / "sources" / "ttml")
    assert "not installed" in msg and where in msg and "build_Release" in msg and tt.TT_METAL_COMMIT[:12] in msg
    assert "\n" not in msg


def test_a_broken_build_says_broken(tmp_path, imports):
    imports.setenv("TT_METAL_HOME", fake_ttml.lay_out_tt_metal(str(tmp_path)))
    so = tmp_path / "build" / "tt-train" / "sources" / "ttml" / "_ttml.py"
    so.write_text("raise ImportError('libtt_metal.so: cannot open shared object file')\n")
    with pytest.raises(UserError, match="broken.*libtt_metal"):
        tt.import_ttml()


def test_pypis_unrelated_ttml_is_named(tmp_path, imports):
    pkg = tmp_path / "site" / "ttml"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("# tensor-train machine learning\n")
    sys.path.insert(0, str(tmp_path / "site"))
    with pytest.raises(UserError, match="not TT-Train.*PyPI"):
        tt.import_ttml()


def test_a_build_without_what_we_call_is_the_wrong_build(tmp_path, imports):
    imports.setenv("TT_METAL_HOME", fake_ttml.lay_out_tt_metal(str(tmp_path)))
    init = tmp_path / "tt-train" / "sources" / "ttml" / "ttml" / "__init__.py"
    init.write_text(
        init.read_text() + "del optimizers.AdamWFullPrecision\n"
        "del models.nanogpt.NanoGPTConfig.__dataclass_fields__['runner_type']\n"
    )
    with pytest.raises(UserError) as e:
        tt.import_ttml()
    assert "lacks optimizers.AdamWFullPrecision, NanoGPTConfig.runner_type; build tt-metal" in str(
        e.value
    )  # all at once


def test_a_build_without_models_is_the_wrong_build_in_one_line(tmp_path, imports):
    imports.setenv("TT_METAL_HOME", fake_ttml.lay_out_tt_metal(str(tmp_path)))
    init = tmp_path / "tt-train" / "sources" / "ttml" / "ttml" / "__init__.py"
    init.write_text(init.read_text() + "del models\n")
    with pytest.raises(UserError, match=r"lacks models\.nanogpt\.NanoGPTConfig, .*build tt-metal"):
        tt.import_ttml()


def test_tt_signs(monkeypatch):
    monkeypatch.setattr(tt.glob, "glob", lambda p: [])
    monkeypatch.setattr(tt.importlib.util, "find_spec", lambda n: None)
    assert tt.tt_signs() == []
    monkeypatch.setenv("TT_METAL_HOME", "/opt/tt-metal")
    monkeypatch.setattr(tt.glob, "glob", lambda p: ["/dev/tenstorrent/0"])
    monkeypatch.setattr(tt.importlib.util, "find_spec", lambda n: object())
    assert tt.tt_signs() == ["TT_METAL_HOME is set", "/dev/tenstorrent exists", "ttnn is importable"]
