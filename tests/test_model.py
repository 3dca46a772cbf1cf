"""GPT-2 model, schedule, accumulation and no_grad() on the PyTorch backend."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import main, tiny_cfg


def backend(tmp_path, **kw):
    return main.TorchBackend(tiny_cfg(tmp_path, **kw), main.Dist())


def random_batch(rows, seq_len, seed=0):
    w = np.random.default_rng(seed).integers(0, main.VOCAB_SIZE, size=(rows, seq_len + 1)).astype(np.uint16)
    return w[:, :-1], w[:, 1:]


def test_logits_equal_transformers_gpt2_with_the_same_weights(tmp_path):
    from transformers import GPT2LMHeadModel
    b = backend(tmp_path, n_layer=3, n_head=4, n_embd=64)
    for p in b.raw.parameters():  # random weights everywhere, biases and LayerNorms included
        torch.nn.init.normal_(p, std=0.05)
    b.export_hf(str(tmp_path / "hf"))
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    x = torch.from_numpy(random_batch(3, 32)[0].astype(np.int64))
    with torch.no_grad():
        ours, _ = b.raw.eval()(x)
        theirs = hf(input_ids=x).logits
    assert ours.shape == theirs.shape == (3, 32, main.VOCAB_SIZE)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()


def test_padded_vocab_never_wins_and_embeddings_are_tied(tmp_path):
    b = backend(tmp_path)
    assert b.raw.lm_head.weight is b.raw.transformer.wte.weight
    assert b.raw.transformer.wte.weight.shape[0] % 64 == 0
    logits, _ = b.raw(torch.zeros(1, 5, dtype=torch.long))
    assert logits.shape[-1] == main.VOCAB_SIZE


@pytest.mark.parametrize("compiled", [False, True])
def test_padded_columns_take_no_probability_mass_in_the_loss(tmp_path, compiled):
    """The loss runs over the padded vocabulary (faster shapes), so the padding must be kept out of the softmax:
    the loss equals cross-entropy over the real 50257 columns, and no gradient reaches the padding rows."""
    b = backend(tmp_path)
    with torch.no_grad():  # make the padding columns tempting: they would win every softmax if they took part
        b.raw.lm_head.weight[main.VOCAB_SIZE:] = 10 * b.raw.lm_head.weight[:1]
    x, y = (torch.from_numpy(a.astype(np.int64)) for a in random_batch(2, 32, seed=3))
    model = torch.compile(b.raw) if compiled else b.raw
    _, loss = model(x, y)
    logits, _ = b.raw(x)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.view(-1, main.VOCAB_SIZE), y.view(-1)).item(), rel=1e-5)
    loss.backward()
    assert b.raw.lm_head.weight.grad[main.VOCAB_SIZE:].abs().max().item() == 0.0


def test_fp16_with_grad_scaler_skips_a_step_with_inf_gradients_and_backs_off(tmp_path):
    b = backend(tmp_path, dtype="float16")
    assert b.scaler.is_enabled()
    x, y = random_batch(2, 32, seed=4)
    b.train_micro_step(x, y, 1.0)
    loss, _ = b.optimizer_step(1e-3, 0.9)
    assert np.isfinite(loss)
    before, scale = [p.detach().clone() for p in b.raw.parameters()], b.scaler.get_scale()
    b.train_micro_step(x, y, 1.0)
    next(b.raw.parameters()).grad[0, 0] = float("inf")  # an fp16 overflow
    b.optimizer_step(1e-3, 0.9)
    assert all(torch.equal(p, q) for p, q in zip(b.raw.parameters(), before))  # the step was skipped
    assert b.scaler.get_scale() == scale / 2


def test_gpt2_init_scales_residual_projections(tmp_path):
    b = backend(tmp_path, n_layer=8, n_embd=256, n_head=4)
    proj = b.raw.transformer.h[0].mlp.c_proj.weight.std().item()
    fc = b.raw.transformer.h[0].mlp.c_fc.weight.std().item()
    assert fc == pytest.approx(0.02, rel=0.05) and proj == pytest.approx(0.02 / 4, rel=0.05)


def test_k_micro_batches_equal_one_batch_of_k_times_b(tmp_path):
    k, b = 4, 2
    x, y = random_batch(k * b, 32, seed=1)
    accum, whole = backend(tmp_path, accumulation_steps=k), backend(tmp_path)
    for i in range(k):
        accum.train_micro_step(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b], 1.0 / k, sync=i == k - 1)
    whole.train_micro_step(x, y, 1.0)
    la, lw = accum.optimizer_step(1e-3, 0.9), whole.optimizer_step(1e-3, 0.9)
    assert la == pytest.approx(lw, rel=1e-5)
    for pa, pw in zip(accum.raw.parameters(), whole.raw.parameters()):
        assert torch.allclose(pa, pw, atol=1e-6)
    assert all(p.grad is None for p in accum.raw.parameters())  # zeroed at the window's end


def sched(**kw):
    return main.TrainConfig(lr=1.0, min_lr=0.1, steps=100, **kw)


def test_lr_warmup_decay_boundaries_without_hold():
    c = sched(warmup_steps=10, hold_steps=0)
    assert main.lr_at(0, c) == pytest.approx(0.1)  # first step already learns
    assert main.lr_at(9, c) == pytest.approx(1.0)  # end of warmup
    assert main.lr_at(10, c) == pytest.approx(1.0)  # decay starts from the peak
    assert main.lr_at(55, c) == pytest.approx(1.0 - 0.9 * 45 / 90)
    assert main.lr_at(99, c) == pytest.approx(1.0 - 0.9 * 89 / 90)  # last step
    assert main.lr_at(100, c) == pytest.approx(0.1) and main.lr_at(500, c) == pytest.approx(0.1)


def test_lr_with_hold_and_explicit_total():
    c = sched(warmup_steps=10, hold_steps=20, total_optim_steps=50)
    assert main.lr_at(10, c) == main.lr_at(29, c) == 1.0  # hold
    assert main.lr_at(30, c) == pytest.approx(1.0)
    assert main.lr_at(40, c) == pytest.approx(0.55)
    assert main.lr_at(50, c) == pytest.approx(0.1)
    assert main.lr_at(0, sched(warmup_steps=0)) == 1.0  # no warmup


def test_total_optim_steps_defaults_to_micro_steps_over_accumulation():
    assert main.TrainConfig(steps=12, accumulation_steps=3).optim_steps == 4
    assert main.TrainConfig(steps=12, accumulation_steps=3, total_optim_steps=9).optim_steps == 9


def test_beta1_warmup_and_default():
    c = main.TrainConfig(beta1_start=0.8, beta1_end=0.9, beta1_warmup_steps=10)
    assert main.beta1_at(0, c) == pytest.approx(0.8)
    assert main.beta1_at(5, c) == pytest.approx(0.85)
    assert main.beta1_at(10, c) == main.beta1_at(1000, c) == 0.9
    assert main.beta1_at(3, main.TrainConfig(beta1=0.93)) == 0.93
    assert main.beta1_at(0, main.TrainConfig(beta1_start=0.5, beta1=0.95)) == 0.95  # warmup of 0 steps


def test_no_grad_disables_autograd_and_eval_mode_then_restores_even_on_error(tmp_path):
    b = backend(tmp_path, dropout=0.1)
    x, y = random_batch(2, 32)
    with main.no_grad(b):
        assert not torch.is_grad_enabled() and not b.raw.training
        b.eval_loss(x, y)
        b.next_token(np.array([1, 2, 3]), 1.0, 5, 1)
    assert torch.is_grad_enabled() and b.raw.training
    assert all(p.grad is None for p in b.raw.parameters())
    with pytest.raises(RuntimeError):
        with main.no_grad(b):
            raise RuntimeError("boom")
    assert torch.is_grad_enabled() and b.raw.training


def test_sampling_chooses_on_the_device_like_the_host_rule_it_replaced(tmp_path):
    """Greedy equals numpy's argmax of the last logits (as generate() computed it before); top-k draws stay inside the
    k best; a seed draws the same token every time, and the padded vocab columns are never reachable."""
    b = backend(tmp_path, n_layer=1, n_head=2, n_embd=32)
    for p in b.raw.parameters():  # spread the logits out, so top-k has a clear inside and outside
        torch.nn.init.normal_(p, std=0.5)
    ids = np.array([464, 2106, 286])
    with main.no_grad(b):
        logits = b.raw(torch.from_numpy(ids)[None])[0][0, -1].float().numpy()
        assert b.next_token(ids, 0.0, None, 0) == int(np.argmax(logits))
        top5 = set(np.argsort(logits)[-5:].tolist())
        k5 = [b.next_token(ids, 2.0, 5, s) for s in range(1, 60)]
        free = [b.next_token(ids, 2.0, None, s) for s in range(1, 60)]
        assert set(k5) <= top5 and not set(free) <= top5  # hot enough that sampling leaves the top 5 without top_k
        assert free == [b.next_token(ids, 2.0, None, s) for s in range(1, 60)]
        assert max(free) < main.VOCAB_SIZE
