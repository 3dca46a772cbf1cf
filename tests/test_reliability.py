"""Nothing the user has is lost, and no input or fault ends in a traceback: reruns, overwrite, corrupt checkpoints,
bad out_dirs, a full disk, a partial metrics line, Ctrl-C, and two processes on one out_dir."""
import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, cli_args, main, read_jsonl, run_main

RUN = dict(steps=8, eval_every=4, export_hf="false")


def one_line_error(p, *words):
    err = p.stderr.strip()
    return p.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1 and all(w in err for w in words)


def logged(out):
    return [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] in ("train", "eval")]


def digest(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    p = run_main(cli_args(out, **RUN))
    assert p.returncode == 0, p.stderr[-2000:]
    return out


def test_rerunning_a_finished_run_reports_and_keeps_everything(finished):
    before = digest(finished / "ckpt.pt"), logged(finished)
    p = run_main(cli_args(finished, **RUN))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "init_from=auto: continuing the run" in p.stdout and "has finished all 8 steps" in p.stdout
    assert (digest(finished / "ckpt.pt"), logged(finished)) == before


def copy_of(run, out):
    os.makedirs(out)
    for name in ("ckpt.pt", "metrics.jsonl"):
        (out / name).write_bytes((run / name).read_bytes())
    return out


def test_auto_continues_a_run_with_more_steps(finished, tmp_path):
    out = copy_of(finished, tmp_path / "more")
    p = run_main(cli_args(out, **{**RUN, "steps": 12}))
    assert p.returncode == 0, p.stderr[-2000:]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "eval"] == [0, 4, 8, 12]


def test_scratch_over_a_run_needs_overwrite_and_other_shapes_are_refused(finished, tmp_path):
    p = run_main(cli_args(finished, **RUN, init_from="scratch"))
    assert one_line_error(p, "--overwrite=true", "--out_dir")
    p = run_main(cli_args(finished, **{**RUN, "n_layer": 3}))
    assert one_line_error(p, "cannot continue with these changes", "n_layer 2 -> 3", "--overwrite=true")


def test_overwrite_replaces_the_run(finished, tmp_path):
    out = copy_of(finished, tmp_path / "over")
    p = run_main(cli_args(out, **{**RUN, "steps": 4, "n_layer": 1}, init_from="scratch", overwrite="true"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert [r["step"] for r in logged(out) if r["kind"] == "eval"] == [0, 4]


@pytest.mark.parametrize("damage", [lambda b: b[:len(b) // 2], lambda b: b"", lambda b: os.urandom(4096)])
def test_a_damaged_checkpoint_is_one_line_for_resume_and_sample_only(finished, tmp_path, damage):
    out = tmp_path / "damaged"
    os.makedirs(out)
    (out / "ckpt.pt").write_bytes(damage((finished / "ckpt.pt").read_bytes()))
    for extra in ({"init_from": "resume"}, {"sample_only": "true"}):
        p = run_main(cli_args(out, **RUN, **extra))
        assert one_line_error(p, "not a readable checkpoint"), p.stderr[-500:]


def test_bad_out_dirs_are_one_line_before_any_work(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out in (a_file, a_file / "below"):
        assert one_line_error(run_main(cli_args(out, **RUN)), "not a writable directory")
    assert one_line_error(run_main(cli_args("", **RUN)), "out_dir is empty")


def test_a_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "x.json"
    with pytest.raises(main.UserError, match="no space left on device while writing .*x.json"):
        main.write_json_atomic(str(target), {"a": 1})
    assert os.listdir(tmp_path) == []


def test_a_partial_last_metrics_line_is_dropped_on_resume_and_an_empty_prompt_samples(tmp_path):
    assert run_main(cli_args(tmp_path, **RUN)).returncode == 0
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')
    p = run_main(cli_args(tmp_path, **{**RUN, "steps": 12}))
    assert p.returncode == 0, p.stderr[-2000:]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "eval"] == [0, 4, 8, 12]
    p = run_main(cli_args(tmp_path, **RUN, sample_only="true", sample_prompt=""))
    assert p.returncode == 0 and "--- sample 1/1" in p.stdout, p.stderr[-2000:]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_checkpoints_at_a_step_boundary_and_the_rerun_continues_bit_exact(tmp_path, sig, code):
    args = cli_args(tmp_path, steps=120, eval_every=60, sample_tokens=2, export_hf="false")
    full = tmp_path / "full"
    assert run_main(args + [f"--out_dir={full}"]).returncode == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py")] + args + [f"--out_dir={cut}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = cut / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and len(read_jsonl(metrics)) >= 20):
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code and "Traceback" not in err, err[-2000:]
    assert "checkpoint saved" in err and "the same command continues" in err
    p = run_main(args + [f"--out_dir={cut}"])
    assert p.returncode == 0, p.stderr[-2000:]
    numbers = lambda d: [{k: v for k, v in r.items() if k not in ("tok_per_s", "mfu")} for r in logged(d)]  # noqa
    assert numbers(cut) == numbers(full)  # every train and eval number, bit for bit (CPU)


def test_a_crafted_checkpoint_runs_no_code_and_is_one_line(finished, tmp_path):
    import shutil
    import torch
    d, marker = tmp_path / "evil", tmp_path / "pwned"
    shutil.copytree(finished, d, ignore=shutil.ignore_patterns(".lock", ".prepare.lock"))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"meta": {}, "model": Evil()}, d / "ckpt.pt")
    for extra in ([], ["--sample_only=true"]):
        p = run_main(cli_args(d, **RUN) + extra)
        assert one_line_error(p, "not a readable checkpoint") and not marker.exists()


def test_resume_refuses_a_changed_step_meaning_and_announces_allowed_changes(finished, tmp_path):
    import shutil
    d = tmp_path / "r"
    shutil.copytree(finished, d, ignore=shutil.ignore_patterns(".lock", ".prepare.lock"))
    before = digest(d / "ckpt.pt")
    p = run_main(cli_args(d, **{**RUN, "accumulation_steps": 2, "batch_size": 8}))
    assert one_line_error(p, "accumulation_steps 1 -> 2", "batch_size 4 -> 8") and digest(d / "ckpt.pt") == before
    p = run_main(cli_args(d, **{**RUN, "steps": 12, "lr": 1e-3}))
    assert p.returncode == 0 and "lr 0.0003 -> 0.001" in p.stdout and "steps 8 -> 12" in p.stdout, p.stderr
    assert [r for r in read_jsonl(d / "metrics.jsonl") if r["kind"] == "run"][-1]["changed"]["steps"] == [8, 12]


def test_the_export_is_redone_when_older_than_the_checkpoint(finished, tmp_path):
    import shutil
    d = tmp_path / "x"
    shutil.copytree(finished, d, ignore=shutil.ignore_patterns(".lock", ".prepare.lock"))
    p = run_main(cli_args(d, **{**RUN, "export_hf": "true"}))
    assert p.returncode == 0 and main.read_json(str(d / "hf" / "trained.json")) == {"step": 8}
    (d / "hf" / "trained.json").write_text('{"step": 4}')  # an export a kill left behind
    p = run_main(cli_args(d, **{**RUN, "export_hf": "true"}))
    assert p.returncode == 0 and main.read_json(str(d / "hf" / "trained.json")) == {"step": 8}
    assert oct(os.stat(d / "hf" / "model.safetensors").st_mode & 0o777) != "0o600"


def test_a_second_process_on_an_out_dir_in_use_is_refused_naming_the_holder(tmp_path):
    held = main.claim_out_dir(str(tmp_path))  # this test process holds the run's lock
    try:
        p = run_main(cli_args(tmp_path, **RUN))
        assert one_line_error(p, "in use by another main.py")
    finally:
        held.release()
    (tmp_path / ".lock").write_text("999999\n")  # left by a process that died: no flock is held, so no block
    assert run_main(cli_args(tmp_path, **RUN)).returncode == 0
