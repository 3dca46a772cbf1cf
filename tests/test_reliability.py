"""Nothing the user has is lost, and no input or fault ends in a traceback: reruns, overwrite, corrupt checkpoints,
bad out_dirs, a full disk, a partial metrics line, Ctrl-C / SIGTERM, and two processes on one out_dir."""

import errno
import os
import signal

import pytest
import torch

from conftest import RUN, cli_args, copy_run, logged, main, one_line_error, read_jsonl, start_held, wait_for


def run(out_dir, capsys, **kw):
    """main.main(ARGS) in this process, as `python main.py ARGS`: -> what it printed (stdout)."""
    capsys.readouterr()
    main.main(cli_args(out_dir, **{**RUN, "export_hf": "false", **kw}))
    return capsys.readouterr().out


def test_rerunning_a_finished_run_reports_and_keeps_everything(run_copy, capsys):
    before = (run_copy / "ckpt.pt").read_bytes(), logged(run_copy)
    out = run(run_copy, capsys)
    assert "init_from=auto: continuing the run" in out and "has finished all 12 steps" in out
    assert ((run_copy / "ckpt.pt").read_bytes(), logged(run_copy)) == before


def test_auto_continues_a_run_with_more_steps(run_copy, capsys):
    run(run_copy, capsys, steps=16)
    assert [r["step"] for r in read_jsonl(run_copy / "metrics.jsonl") if r["kind"] == "eval"] == [0, 4, 8, 12, 16]


def test_scratch_over_a_run_needs_overwrite_and_other_shapes_are_refused(run_copy, capsys):
    one_line_error(capsys, cli_args(run_copy, **RUN, init_from="scratch"), "--overwrite=true", "--out_dir")
    one_line_error(
        capsys,
        cli_args(run_copy, **RUN, n_layer=3),
        "cannot continue with these changes",
        "n_layer 2 -> 3",
        "--overwrite=true",
    )


def test_overwrite_replaces_the_run(run_copy, capsys):
    run(run_copy, capsys, steps=4, n_layer=1, init_from="scratch", overwrite="true")
    assert [r["step"] for r in logged(run_copy) if r["kind"] == "eval"] == [0, 4]
    assert torch.load(run_copy / "ckpt.pt", weights_only=False)["meta"]["config"]["n_layer"] == 1


def test_a_damaged_checkpoint_is_one_line_for_resume_and_sample_only(trained, tmp_path, capsys):
    good = (trained.out / "ckpt.pt").read_bytes()
    for damage in (good[: len(good) // 2], b"", os.urandom(4096)):
        out = tmp_path / "damaged"
        os.makedirs(out, exist_ok=True)
        (out / "ckpt.pt").write_bytes(damage)
        for extra in ({"init_from": "resume"}, {"sample_only": "true"}):
            one_line_error(capsys, cli_args(out, **RUN, **extra), "not a readable checkpoint")


def test_bad_out_dirs_are_one_line_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out in (a_file, a_file / "below"):
        one_line_error(capsys, cli_args(out, **RUN), "not a writable directory")
    one_line_error(capsys, cli_args("", **RUN), "out_dir is empty")


def test_a_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "x.json"
    with pytest.raises(main.UserError, match="no space left on device while writing .*x.json"):
        main.write_json_atomic(str(target), {"a": 1})
    assert os.listdir(tmp_path) == []


def test_a_partial_last_metrics_line_is_dropped_on_resume_and_an_empty_prompt_samples(run_copy, capsys):
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a kill in the middle of a write
    run(run_copy, capsys, steps=16)
    assert [r["step"] for r in read_jsonl(run_copy / "metrics.jsonl") if r["kind"] == "eval"] == [0, 4, 8, 12, 16]
    assert "--- sample 1/1" in run(run_copy, capsys, steps=16, sample_only="true", sample_prompt="")


def test_ctrl_c_checkpoints_at_a_step_boundary_and_the_rerun_continues_bit_exact(trained, shards, tmp_path, capsys):
    """The one end-to-end Ctrl-C: SIGINT to the process group mid-training (during micro-step 3, between evals)."""
    cut = copy_run(shards, tmp_path / "cut")
    args = cli_args(cut, **RUN, export_hf="false")
    proc, held = start_held(args, 3, tmp_path)
    reached = wait_for(held.exists, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, err = proc.communicate(timeout=300)
    assert reached and proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "stopped: SIGINT at micro-step 3; checkpoint saved" in err and "the same command continues" in err
    printed = run(cut, capsys)  # the same command, in this process
    assert "resume: from" in printed and "at micro-step 3" in printed
    assert logged(cut) == logged(trained.out)  # every train and eval number, bit for bit (CPU)


def test_sigterm_stops_with_143_at_a_step_boundary_and_the_rerun_continues_bit_exact(
    trained, tmp_path, capsys, monkeypatch
):
    """What SLURM or Kubernetes send before a kill, here to this process during micro-step 6 (main.main in-process
    installs its own handler for the run and puts the previous one back)."""
    real_step, calls = torch.optim.AdamW.step, []

    def step(self, *a, **kw):
        calls.append(1)
        if len(calls) == 6 and signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    cut = tmp_path / "cut"
    with pytest.raises(SystemExit) as e:
        run(cut, capsys)
    err = capsys.readouterr().err
    assert e.value.code == 143 and "stopped: SIGTERM at micro-step 6; checkpoint saved" in err, err[-2000:]
    assert torch.load(cut / "ckpt.pt", weights_only=False)["meta"]["step"] == 6
    assert "resume: from" in run(cut, capsys)
    assert logged(cut) == logged(trained.out)


def test_an_inherited_ignored_sigint_stays_ignored_in_training_and_sigterm_still_saves(tmp_path, capsys, monkeypatch):
    """`cmd &` in a script starts main.py with SIGINT ignored (as here, in-process): a Ctrl-C at micro-step 6 leaves
    the run alone, and a SIGTERM right after it still stops at the step boundary with a checkpoint."""
    real_step, calls, during = torch.optim.AdamW.step, [], []

    def step(self, *a, **kw):
        calls.append(1)
        if len(calls) == 6:
            during.append(signal.getsignal(signal.SIGINT))
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    cut = tmp_path / "cut"
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(SystemExit) as e:
            run(cut, capsys)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # and ignored it stays after the run
    finally:
        signal.signal(signal.SIGINT, before)
    err = capsys.readouterr().err
    assert during == [signal.SIG_IGN] and "SIGINT" not in err, err[-2000:]
    assert e.value.code == 143 and "stopped: SIGTERM at micro-step 6; checkpoint saved" in err, err[-2000:]
    assert torch.load(cut / "ckpt.pt", weights_only=False)["meta"]["step"] == 6


def test_a_crafted_checkpoint_runs_no_code_and_is_one_line(run_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"meta": {}, "model": Evil()}, run_copy / "ckpt.pt")
    for extra in ({}, {"sample_only": "true"}):
        one_line_error(capsys, cli_args(run_copy, **RUN, **extra), "not a readable checkpoint")
        assert not marker.exists()


def test_another_backends_checkpoint_names_the_backend_to_resume_or_sample_with(run_copy, capsys):
    state = torch.load(run_copy / "ckpt.pt", weights_only=True)
    state["meta"]["config"]["backend"] = "ttml"
    torch.save(state, run_copy / "ckpt.pt")
    one_line_error(capsys, cli_args(run_copy, **RUN), "ttml backend; use it with --backend=ttml")
    one_line_error(capsys, cli_args(run_copy, **RUN, sample_only="true"), "ttml backend; use it with --backend=ttml")


def test_resume_refuses_a_changed_step_meaning_and_announces_allowed_changes(run_copy, capsys):
    before = (run_copy / "ckpt.pt").read_bytes()
    one_line_error(
        capsys,
        cli_args(run_copy, **{**RUN, "accumulation_steps": 2, "batch_size": 8}),
        "accumulation_steps 1 -> 2",
        "batch_size 4 -> 8",
    )
    assert (run_copy / "ckpt.pt").read_bytes() == before
    out = run(run_copy, capsys, steps=16, lr=1e-3)
    assert "lr 0.02 -> 0.001" in out and "steps 12 -> 16" in out
    assert [r for r in read_jsonl(run_copy / "metrics.jsonl") if r["kind"] == "run"][-1]["changed"]["steps"] == [12, 16]


def test_the_export_is_redone_when_older_than_the_checkpoint(trained, run_copy, capsys):
    assert main.read_json(str(trained.out / "hf" / "trained.json")) == {"step": 12}
    (run_copy / "hf" / "trained.json").write_text('{"step": 4}')  # an export a kill left behind
    run(run_copy, capsys, export_hf="true")
    assert main.read_json(str(run_copy / "hf" / "trained.json")) == {"step": 12}
    assert oct(os.stat(run_copy / "hf" / "model.safetensors").st_mode & 0o777) != "0o600"


def test_a_second_process_on_an_out_dir_in_use_is_refused_naming_the_holder(tmp_path, capsys):
    held = main.claim_out_dir(str(tmp_path))  # another main.py holds the run's lock
    try:
        one_line_error(capsys, cli_args(tmp_path, **RUN), "in use by another main.py")
    finally:
        held.release()
    (tmp_path / ".lock").write_text("999999\n")  # left by a process that died: no flock is held, so no block
    main.main(cli_args(tmp_path, **RUN, prepare_only="true"))
    assert (tmp_path / "manifest.json").exists()
