"""GPT-2 model, schedule, accumulation and no_grad() on the PyTorch backend."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import main, torch_backend


def random_batch(rows, seq_len, seed=0):
    w = np.random.default_rng(seed).integers(0, main.VOCAB_SIZE, size=(rows, seq_len + 1)).astype(np.uint16)
    return w[:, :-1], w[:, 1:]


def test_logits_equal_transformers_gpt2_with_the_same_weights(tmp_path):
    from transformers import GPT2LMHeadModel

    b = torch_backend(tmp_path, n_layer=3, n_head=4, n_embd=64)
    for p in b.raw.parameters():  # random weights everywhere, biases and LayerNorms included
        torch.nn.init.normal_(p, std=0.05)
    main.export_hf(b.raw.state_dict(), b.cfg, str(tmp_path / "hf"), "", 0)
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    x = torch.from_numpy(random_batch(3, 32)[0].astype(np.int64))
    with torch.no_grad():
        ours = b.raw.eval()(x)
        theirs = hf(input_ids=x).logits
    assert ours.shape == theirs.shape == (3, 32, main.VOCAB_SIZE)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()


def test_padded_vocab_never_wins_and_embeddings_are_tied(tmp_path):
    """The 50257 ids padded to a multiple of 64 (faster matmuls), lm_head tied to wte: sampling sees the real columns
    only, even when a padding column has the largest logit of all."""
    b = torch_backend(tmp_path)
    assert b.raw.lm_head.weight is b.raw.transformer.wte.weight
    assert b.raw.transformer.wte.weight.shape[0] % 64 == 0 and b.raw.transformer.wte.weight.shape[0] > main.VOCAB_SIZE
    prompt = np.array([464, 2106])
    best = int(np.argmax(b.next_logits(prompt)))
    with torch.no_grad():  # each padding row a scaled copy of the winner's: each padding logit beats the winner's
        w = b.raw.lm_head.weight
        w[main.VOCAB_SIZE :] = (10 if b.next_logits(prompt)[best] > 0 else -10) * w[best]
    padded = []
    hook = b.raw.lm_head.register_forward_hook(lambda module, args, out: padded.append(out[0, -1]))
    logits = b.next_logits(prompt)
    hook.remove()
    assert padded[0][main.VOCAB_SIZE :].max() > padded[0][: main.VOCAB_SIZE].max()  # a padding column would win
    assert logits.shape == (main.VOCAB_SIZE,) and int(np.argmax(logits)) == best


@pytest.mark.parametrize("compiled", [False, True])
def test_padded_columns_take_no_probability_mass_in_the_loss(tmp_path, compiled):
    """The loss runs over the padded vocabulary (faster shapes), so the padding must be kept out of the softmax:
    the loss equals cross-entropy over the real 50257 columns, and no gradient reaches the padding rows. Compiled:
    traced by torch.compile with inductor's decompositions and partitioner but run without its code generation
    (on a CPU that is half a minute of C++ compiling); inductor's own kernels are compared with eager on a GPU
    (tests/test_cuda_real.py)."""
    b = torch_backend(tmp_path)
    with torch.no_grad():  # make the padding columns tempting: they would win every softmax if they took part
        b.raw.lm_head.weight[main.VOCAB_SIZE :] = 10 * b.raw.lm_head.weight[:1]
    x, y = (torch.from_numpy(a.astype(np.int64)) for a in random_batch(2, 32, seed=3))
    model = torch.compile(b.raw, backend="aot_eager_decomp_partition") if compiled else b.raw
    loss = model(x, y)
    logits = b.raw(x)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.view(-1, main.VOCAB_SIZE), y.view(-1)).item(), rel=1e-5)
    loss.backward()
    assert b.raw.lm_head.weight.grad[main.VOCAB_SIZE :].abs().max().item() == 0.0


def test_fp16_with_grad_scaler_skips_a_step_with_inf_gradients_and_backs_off(tmp_path):
    b = torch_backend(tmp_path, dtype="float16")
    assert b.scaler.is_enabled()
    x, y = random_batch(2, 32, seed=4)
    b.train_micro_step(x, y)
    loss = b.optimizer_step(1e-3, 0.9)
    assert np.isfinite(loss)
    before, scale = [p.detach().clone() for p in b.raw.parameters()], b.scaler.get_scale()
    b.train_micro_step(x, y)
    next(b.raw.parameters()).grad[0, 0] = float("inf")  # an fp16 overflow
    b.optimizer_step(1e-3, 0.9)
    assert all(torch.equal(p, q) for p, q in zip(b.raw.parameters(), before, strict=True))  # the step was skipped
    assert b.scaler.get_scale() == scale / 2


def test_gpt2_init_scales_residual_projections(tmp_path):
    b = torch_backend(tmp_path, n_layer=8, n_embd=256, n_head=4)
    proj = b.raw.transformer.h[0].mlp.c_proj.weight.std().item()
    fc = b.raw.transformer.h[0].mlp.c_fc.weight.std().item()
    assert fc == pytest.approx(0.02, rel=0.05) and proj == pytest.approx(0.02 / 4, rel=0.05)


def test_k_micro_batches_equal_one_batch_of_k_times_b(tmp_path):
    k, b = 4, 2
    x, y = random_batch(k * b, 32, seed=1)
    accum, whole = torch_backend(tmp_path, accumulation_steps=k), torch_backend(tmp_path)
    for i in range(k):
        accum.train_micro_step(x[i * b : (i + 1) * b], y[i * b : (i + 1) * b])
    whole.train_micro_step(x, y)
    la, lw = accum.optimizer_step(1e-3, 0.9), whole.optimizer_step(1e-3, 0.9)
    assert la == pytest.approx(lw, rel=1e-5)
    for pa, pw in zip(accum.raw.parameters(), whole.raw.parameters(), strict=True):
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
    assert main.optim_steps(main.TrainConfig(steps=12, accumulation_steps=3)) == 4
    assert main.optim_steps(main.TrainConfig(steps=12, accumulation_steps=3, total_optim_steps=9)) == 9


def test_beta1_warmup_and_default():
    c = main.TrainConfig(beta1_start=0.8, beta1_end=0.9, beta1_warmup_steps=10)
    assert main.beta1_at(0, c) == pytest.approx(0.8)
    assert main.beta1_at(5, c) == pytest.approx(0.85)
    assert main.beta1_at(10, c) == main.beta1_at(1000, c) == 0.9
    assert main.beta1_at(3, main.TrainConfig(beta1=0.93)) == 0.93
    assert main.beta1_at(0, main.TrainConfig(beta1_start=0.5, beta1=0.95)) == 0.95  # warmup of 0 steps


def test_eval_and_sampling_switch_no_grad_and_eval_mode_inside_and_restore(tmp_path):
    b = torch_backend(tmp_path, dropout=0.1)
    x, y = random_batch(2, 32)
    seen = []
    b.raw.register_forward_hook(lambda m, a, out: seen.append((torch.is_grad_enabled(), m.training)))
    b.eval_loss(x, y)
    b.next_logits(np.array([1, 2, 3]))
    assert seen == [(False, False), (False, False)]
    assert torch.is_grad_enabled() and b.raw.training
    assert all(p.grad is None for p in b.raw.parameters())


def test_host_sampler_greedy_top_k_and_seeds(tmp_path):
    """Greedy is the argmax of the last logits; top-k draws stay inside the k best; a seed draws the same tokens
    every time; the padded vocab columns are never reachable (next_logits holds the real vocabulary only)."""
    b = torch_backend(tmp_path, n_layer=1, n_head=2, n_embd=32)
    for p in b.raw.parameters():  # spread the logits out, so top-k has a clear inside and outside
        torch.nn.init.normal_(p, std=0.5)
    ids = np.array([464, 2106, 286])
    logits = b.next_logits(ids)
    assert logits.shape == (main.VOCAB_SIZE,)
    assert main.sample_token(logits, 0.0, None, None) == int(np.argmax(logits))
    top5 = set(np.argsort(logits)[-5:].tolist())

    def draw(k, seed):
        return [main.sample_token(logits, 2.0, k, np.random.default_rng(seed)) for _ in range(60)]

    assert set(draw(5, 1)) <= top5 and not set(draw(None, 1)) <= top5
    assert draw(None, 7) == draw(None, 7)
    assert main.sample_token(logits, 1e-40, None, np.random.default_rng(0)) == int(np.argmax(logits))  # no nan
