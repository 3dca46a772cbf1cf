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
    base = dict(seed=1, seq_len=32, n_layer=1, n_head=1, n_embd=32, dropout=0.0, lr=1e-2, beta1=0.9, beta2=0.95,
                beta1_start=None, beta1_end=None, weight_decay=0.0, grad_clip=1.0, accumulation_steps=1,
                batch_size=2, data_parallel=None, dtype="auto", out_dir="/tmp", tt_runner="default",
                tt_optimizer="fp32_master")
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


def weights(b):
    return b.model.parameters()["nanogpt/wte/weight"].get_value().parts


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
    assert losses[-1] < losses[0] < expected + 0.01


def test_data_parallel_replicas_agree_and_match_one_device_on_the_whole_batch():
    x, y = batch(4)
    one = backend()
    mesh = backend(data_parallel=2)
    assert mesh.replicas == 2
    for _ in range(2):
        one.train_micro_step(x, y)
        mesh.train_micro_step(x, y)  # each device gets 2 of the 4 rows
        assert mesh.optimizer_step(1e-2, 0.9) == pytest.approx(one.optimizer_step(1e-2, 0.9), rel=1e-4)
    a, b = weights(mesh)
    assert np.array_equal(a, b) and np.allclose(a, weights(one)[0], atol=2e-3)


def test_replicas_that_drift_apart_stop_the_run(monkeypatch):
    mesh = backend(data_parallel=2)
    monkeypatch.setattr(mesh.ttml.core.distributed, "synchronize_gradients", lambda *a: None)
    mesh.train_micro_step(*batch(4))
    with pytest.raises(UserError, match="differ"):
        mesh.optimizer_step(1e-2, 0.9)


def test_eight_devices_open_as_1x8_with_tt_trains_descriptor_and_fabric_needs_the_runtime_root(monkeypatch):
    b = backend(data_parallel=8)
    assert os.environ["TT_MESH_GRAPH_DESC_PATH"].endswith("t3k_1x8_mesh_graph_descriptor.textproto")
    assert b.replicas == 8 and len(weights(b)) == 8
    monkeypatch.delenv("TT_METAL_RUNTIME_ROOT")
    monkeypatch.delenv("TT_MESH_GRAPH_DESC_PATH")
    with pytest.raises(RuntimeError, match="TT_METAL_RUNTIME_ROOT is not set"):
        backend(data_parallel=2)


@pytest.mark.parametrize("kind", ["fp32_master", "bf16_stochastic", "bf16"])
def test_checkpoint_round_trips_through_torch_save_weights_only(tmp_path, kind):
    x, y = batch(2)
    a = backend(tt_optimizer=kind)
    for _ in range(2):
        a.train_micro_step(x, y), a.optimizer_step(1e-2, 0.9)
    path = tmp_path / "ckpt.pt"
    torch.save(a.state_dict(), path)
    state = torch.load(path, weights_only=True)
    b = backend(tt_optimizer=kind, seed=7)  # other init: everything must come from the checkpoint
    b.load_state_dict(state)
    again = b.state_dict()
    assert again["rng"] == state["rng"] and again["optimizer"]["steps"] == 2
    for part in ("model", "optimizer"):
        for k, v in state[part].items():
            if isinstance(v, dict):
                assert all(torch.equal(v[n], again[part][k][n]) for n in v), (part, k)
            else:
                assert torch.equal(v, again[part][k]) if isinstance(v, torch.Tensor) else v == again[part][k]
    if kind != "bf16_stochastic":  # the same next step on both
        for m in (a, b):
            m.train_micro_step(x, y)
        assert a.optimizer_step(1e-2, 0.9) == b.optimizer_step(1e-2, 0.9)
        assert np.array_equal(weights(a)[0], weights(b)[0])
    assert set(a.state_dict(weights=False)) == {"rng"}


def test_sample_only_load_and_a_misfit_parameter_is_one_line():
    a = backend()
    b = backend(seed=3)
    b.load_state_dict({"model": a.state_dict()["model"]})
    ids = np.array([5, 6, 7])
    assert np.array_equal(a.next_logits(ids), b.next_logits(ids))
    bad = {"model": {"nanogpt/wte/weight": torch.zeros(10, 32)}}
    with pytest.raises(UserError) as e:
        b.load_state_dict(bad)
    assert "does not fit" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="torch backend"):
        b.load_state_dict({"model": {"transformer.wte.weight": torch.zeros(1)}})


def test_fp32_master_weights_keep_updates_that_bf16_rounds_away():
    x, y = batch(1)
    moved = {}
    for kind in ("fp32_master", "bf16"):
        b = backend(tt_optimizer=kind, grad_clip=0.0)
        b.load_state_dict({"model": {"nanogpt/wte/weight": torch.full((tt.TT_VOCAB, 32), 0.5)}})
        for _ in range(3):  # Adam moves a weight by ~lr a step: under half a bf16 ulp of 0.5, three steps are not
            b.train_micro_step(x, y)
            b.optimizer_step(9e-4, 0.9)
        moved[kind] = int((weights(b)[0] != 0.5).sum())
    assert moved["bf16"] == 0 < moved["fp32_master"]


def test_next_logits_are_the_real_vocabulary_at_the_last_prompt_position_and_restore_training():
    b = backend(data_parallel=2)
    E = b.state_dict()["model"]["nanogpt/wte/weight"].numpy()
    for ids in (np.array([3]), np.array([3, 9, 11]), np.arange(40)):  # longer than seq_len keeps the last 32
        out = b.next_logits(ids)
        assert out.dtype == np.float32 and out.shape == (V,)
        np.testing.assert_allclose(out, (E[ids[-1]] @ E.T)[:V], rtol=1e-5, atol=1e-7)
    b.train_micro_step(*batch(4))  # gradients on and train mode again
    assert b.optimizer_step(1e-2, 0.9) > 0 and b.model.mode == "train"


def test_refusals_are_one_line():
    for kw, words in ((dict(beta1_start=0.85), "beta1"), (dict(seq_len=48), "multiples of 32"),
                      (dict(dtype="float32"), "bfloat16")):
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
    init.write_text(init.read_text() + "del optimizers.AdamWFullPrecision\n"
                    "del models.nanogpt.NanoGPTConfig.__dataclass_fields__['runner_type']\n")
    with pytest.raises(UserError) as e:
        tt.import_ttml()
    assert "lacks optimizers.AdamWFullPrecision, NanoGPTConfig.runner_type; build tt-metal" in str(e.value)  # all at once


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
