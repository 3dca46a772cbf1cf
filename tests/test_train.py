"""The train loop: the schedule delivered to the optimizer, a tiny model that learns, deterministic batches, the NaN
stop, resume after kill -9 (end to end), and the smoke run as a user starts it."""

import signal

import numpy as np
import pytest
import torch

from conftest import RUN, cli_args, copy_run, logged, main, read_jsonl, start_held, tiny_cfg, wait_for


def run_train(cfg, backend=None):
    manifest = main.prepare(cfg, log=lambda *a: None)
    backend = backend or main.TorchBackend(cfg, main.Dist())
    return main.train(cfg, manifest, backend, main.Dist(), None, None, None), backend


def test_optimizer_receives_the_schedule_once_per_optimizer_step(tmp_path):
    cfg = tiny_cfg(
        tmp_path,
        steps=10,
        accumulation_steps=2,
        eval_every=10,
        warmup_steps=2,
        hold_steps=1,
        lr=1e-3,
        min_lr=1e-4,
        beta1_start=0.7,
        beta1_end=0.9,
        beta1_warmup_steps=3,
    )
    b = main.TorchBackend(cfg, main.Dist())
    seen, real_step = [], b.optimizer.step

    def recording_step(*a, **kw):
        g = b.optimizer.param_groups[0]
        seen.append((g["lr"], g["betas"][0]))
        return real_step(*a, **kw)

    b.optimizer.step = recording_step
    run_train(cfg, b)
    assert seen == [(main.lr_at(k, cfg), main.beta1_at(k, cfg)) for k in range(5)]
    assert len(set(seen)) == 5  # warmup, hold, decay and the beta1 warmup all show
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [(r["step"], r["optim_step"]) for r in rows] == [(2 * (k + 1), k) for k in range(5)]
    assert [(r["lr"], r["beta1"]) for r in rows] == seen
    assert all(r["tok_per_s"] > 0 and np.isfinite(r["loss"]) for r in rows)


def test_tiny_model_lowers_val_loss_and_writes_plot_checkpoint_and_sample(trained):
    ev = [r for r in read_jsonl(trained.out / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in ev] == [0, 4, 8, 12]
    assert ev[0]["val_loss"] == pytest.approx(np.log(main.VOCAB_SIZE), abs=0.3)  # ~uniform at init
    assert ev[-1]["val_loss"] < ev[0]["val_loss"] - 1.0  # learns: perplexity down by more than e
    assert (trained.out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = torch.load(trained.out / "ckpt.pt", weights_only=False)["meta"]
    assert (meta["step"], meta["optim_step"]) == (12, 12)
    assert "--- sample 1/1 (greedy) ---\nThe history of machine learning" in trained.stdout


def test_loss_plot_draws_the_raw_and_smoothed_train_loss_and_the_val_loss_of_every_row(trained, tmp_path, monkeypatch):
    import matplotlib.figure

    drawn, real_savefig = [], matplotlib.figure.Figure.savefig

    def savefig(fig, *a, **kw):
        drawn.append({line.get_label(): line.get_xydata().tolist() for line in fig.axes[0].get_lines()})
        return real_savefig(fig, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    cfg, manifest = main.parse_config(trained.args), main.read_json(str(trained.out / "manifest.json"))
    main.plot_losses(str(trained.out / "metrics.jsonl"), str(tmp_path / "curve.png"), cfg, manifest)
    rows = read_jsonl(trained.out / "metrics.jsonl")
    train = [[r["step"], r["loss"]] for r in rows if r["kind"] == "train"]
    (lines,) = drawn
    assert lines["train (raw)"] == train and len(train) == 12
    assert lines["val"] == [[r["step"], r["val_loss"]] for r in rows if r["kind"] == "eval"]
    ema, m = lines["train (EMA 0.9)"], 0.0
    assert [s for s, _ in ema] == [s for s, _ in train] and ema[0][1] == pytest.approx(train[0][1])  # no pull to 0
    for t, ((_, e), (_, raw)) in enumerate(zip(ema, train, strict=True), 1):
        m = 0.9 * m + 0.1 * raw
        assert e == pytest.approx(m / (1 - 0.9**t))  # bias-corrected, as Adam's moments
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_val_batches_are_fixed_across_runs_and_seeds(trained):
    cfg = tiny_cfg(trained.out)
    stream = main.TokenStream(cfg.out_dir, main.load_manifest(cfg.out_dir)[0]["splits"]["val"])
    a = main.val_batches(stream, cfg, cfg.batch_size, 1)
    b = main.val_batches(stream, tiny_cfg(trained.out, seed=7), cfg.batch_size, 1)
    assert len(a) == cfg.eval_iters and all((x1 == x2).all() for (x1, _), (x2, _) in zip(a, b, strict=True))
    x, y = a[0]
    assert x.shape == (cfg.batch_size, cfg.seq_len) and (x[:, 1:] == y[:, :-1]).all()


def test_train_batches_are_deterministic_per_seed_and_rank(tmp_path):
    cfg = tiny_cfg(tmp_path, shard_tokens=3000)  # windows cross shard boundaries
    m = main.prepare(cfg, log=lambda *a: None)
    s = main.TokenStream(cfg.out_dir, m["splits"]["train"])
    flat = np.concatenate([np.asarray(mm) for mm in s.maps])
    assert (s.window(2990, 40) == flat[2990:3030]).all()

    def draw(seed, rank):
        return main.TrainBatches(s, tiny_cfg(tmp_path, seed=seed), rank, cfg.batch_size).next()[0]

    assert (draw(1, 0) == draw(1, 0)).all()
    assert not (draw(1, 0) == draw(2, 0)).all() and not (draw(1, 0) == draw(1, 1)).all()


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=8, eval_every=4)
    b = main.TorchBackend(cfg, main.Dist())
    real, calls = b.optimizer_step, []

    def poisoned(lr, beta1):
        calls.append(1)
        loss = real(lr, beta1)
        return float("nan") if len(calls) == 6 else loss

    b.optimizer_step = poisoned
    with pytest.raises(main.TrainingDiverged, match="loss is nan at micro-step 6"):
        run_train(cfg, b)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["meta"]["step"] == 4


def test_resume_after_kill_9_reproduces_the_uninterrupted_losses(trained, shards, tmp_path, capsys):
    """The one end-to-end kill -9: a run SIGKILLed mid-training (at micro-step 7, past the step-4 checkpoint), then
    the same command again (in this process), ends with the numbers of the shared unbroken run."""
    cut = copy_run(shards, tmp_path / "cut")
    args = cli_args(cut, **RUN, export_hf="false")
    proc, held = start_held(args, 7, tmp_path)
    reached = wait_for(held.exists, proc)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert reached and proc.returncode == -signal.SIGKILL, err[-2000:]
    steps = [r["step"] for r in read_jsonl(cut / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # rows past the step-4 checkpoint, which the resumed run must replace
    capsys.readouterr()
    main.main(args)
    printed = capsys.readouterr().out
    assert "resume: from" in printed and "at micro-step 4" in printed
    assert logged(cut) == pytest.approx(logged(trained.out), rel=1e-6, abs=1e-6)


def test_resume_rejects_another_model_shape_or_missing_checkpoint(run_copy, tmp_path):
    other = tiny_cfg(run_copy, **{**RUN, "steps": 16}, n_layer=3, init_from="resume")
    with pytest.raises(main.UserError, match="n_layer 2 -> 3"):
        main.run(other)
    with pytest.raises(main.UserError, match="no checkpoint"):
        main.run(tiny_cfg(tmp_path / "fresh", init_from="resume"))


def test_smoke_runs_the_whole_pipeline_offline(tmp_path, capsys):
    out = tmp_path / "smoke"
    main.main(["--smoke", "--steps=2", "--eval_every=2", "--eval_iters=1", f"--out_dir={out}", "--sample_tokens=4"])
    printed = capsys.readouterr().out
    assert "The history of machine learning" in printed and "global batch 1,024 tokens" in printed
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "hf" / "config.json").exists() and (out / "hf" / "model.safetensors").exists()
    assert len([r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]) == 2
