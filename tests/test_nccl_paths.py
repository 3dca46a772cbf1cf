"""Data parallel on NCCL's terms, on a CPU-only torch (issue 22): two fake GPUs and gloo standing in for NCCL.

tests/nccl_standin.py runs main.py as a torchrun rank that believes it is on a node of two H100s: a group made as
"nccl" refuses CPU tensors ("No backend type associated with device type cpu", as NCCL does), and every collective
refuses to run before the rank has called torch.cuda.set_device(cuda:LOCAL_RANK) (else every rank is on cuda:0,
which NCCL refuses or hangs on). The model itself trains on the CPU. Two ranks go through a short run: eval,
checkpoint, Ctrl-C, and a rerun of the same command that continues to the end with every number of the unbroken
two-rank run of tests/test_ddp.py (this is the suite's end-to-end resume under torchrun); then one rank under
torchrun, which must make a process group too (that a plain run makes none, test_tracking's run row says)."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TWO_RANKS, cli_args, copy_run, logged, read_jsonl, wait_for

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch build has no torch.distributed"
)
STANDIN = os.path.join(ROOT, "tests", "nccl_standin.py")
# test_ddp's two-rank run, with the device left to main.py (so it takes its CUDA path) and its CPU defaults kept
SMALL = dict(TWO_RANKS, dtype="float32", compile="false", device="auto")
GROUP = "cpu:gloo,cuda:nccl"
HOLD_AT = 3  # the optimizer step at which each rank of the interrupted run waits for its Ctrl-C
REASONS = {  # what each failure of the stand-in means, in the words
    "collective before set_device": "issue 22: a collective ran before torch.cuda.set_device(cuda:LOCAL_RANK), so "
    "every rank of the node was on cuda:0 (NCCL refuses two ranks on one GPU)",
    "collective on the wrong GPU": "issue 22: a rank talked to the group from another rank's GPU",
    "No backend type associated with device type cpu": "issue 22: a CPU tensor went into a collective on a group "
    "with no CPU backend (NCCL refuses it)",
}


def command(nproc, out_dir, **kw):
    args = cli_args(out_dir, **{**SMALL, **kw})
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", STANDIN] + args


def start(cmd, logs, tmp_path, name, hold=None):
    """Popen in a session of its own (a terminal's Ctrl-C reaches the launcher's process group), output to files."""
    env = {**os.environ, "NCCL_STANDIN_LOG": str(logs)}
    env.pop("NCCL_STANDIN_HOLD", None)
    if hold:
        env["NCCL_STANDIN_HOLD"] = str(hold)
    proc_out, proc_err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with open(proc_out, "w") as out, open(proc_err, "w") as err:  # the child holds its own copies of the two
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT, start_new_session=True)
    proc.files = (proc_out, proc_err)
    return proc


def finish(proc, timeout=300):
    """Wait for proc (killing its group past the deadline); -> (returncode, stdout, stderr)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode, proc.files[0].read_text(), proc.files[1].read_text()


def rank_logs(logs):
    found = {}
    if os.path.isdir(logs):
        for name in os.listdir(logs):
            if m := re.fullmatch(r"rank(\d+)\.json", name):
                with open(os.path.join(logs, name)) as f:
                    found[int(m.group(1))] = json.load(f)
    return found


def first_errors(logs, output):
    """{who: the first error line it printed}: each rank's, from its log (an uncaught exception) or torchrun's
    "[rankN]:" lines; without any, the output's first error line (a run without torchrun, or torchrun's own)."""
    lines = {}
    error = r"((?:\w+\.)*\w*(?:Error|Exception)\b.*|error: .*)"
    for line in output.splitlines():
        if m := re.match(r"\[rank(\d+)\]:\s*" + error, line):
            lines.setdefault(f"rank {m.group(1)}", m.group(2))
    for rank, log in rank_logs(logs).items():
        if log.get("first_error"):
            lines[f"rank {rank}"] = log["first_error"]
        if f"rank {rank}" in lines and log.get("failed_collective"):
            lines[f"rank {rank}"] += f" (in {log['failed_collective']})"
    if not lines:
        first = next((line for line in output.splitlines() if re.match(error, line)), None)
        if first:
            lines["output"] = first
    return lines


def diagnosis(logs, rc, stdout, stderr):
    """One paragraph for an assertion: each rank's first error and which of the issue's reasons it is."""
    errors = first_errors(logs, stdout + "\n" + stderr)
    parts = [f"exit {rc}"]
    for who in sorted(errors):
        reason = next((r for k, r in REASONS.items() if k in errors[who]), "not one of issue 22's reasons")
        parts.append(f"{who} failed first with: {errors[who][:400]}  [{reason}]")
    if not errors and rc != 0:
        parts.append("no error line; output tail:\n" + (stdout + stderr)[-3000:])
    return "\n".join(parts)


def rows(out_dir, kind):
    path = os.path.join(out_dir, "metrics.jsonl")
    return [r for r in read_jsonl(path) if r["kind"] == kind] if os.path.exists(path) else []


def check_group_and_device(logs, nproc, why):
    """Every rank asked for the mixed group with device_id cuda:LOCAL_RANK, and set its own GPU before its first
    collective."""
    found = rank_logs(logs)
    assert sorted(found) == list(range(nproc)), f"rank logs {sorted(found)} in {logs}\n{why}"
    for rank, log in sorted(found.items()):
        me = f"cuda:{log['local_rank']}"
        assert log["backend_asked"] == GROUP, (
            f"rank {rank} made its group as {log['backend_asked']!r}, not {GROUP!r} (issue 22 items 1 and 3)\n{why}"
        )
        assert log["device_id"] == me, f"rank {rank} passed device_id={log['device_id']}, not {me}\n{why}"
        events = log["events"]
        sets = [i for i, e in enumerate(events) if e == f"set_device {me}"]
        collective = next((i for i, e in enumerate(events) if e.startswith("collective ")), len(events))
        assert sets and sets[0] < collective, (
            f"rank {rank} did not call set_device({me}) before its first collective (issue 22 item 2): {events}\n{why}"
        )
        assert log["set_device"][-1] == me, f"rank {rank} ended on {log['set_device'][-1]}, not {me}"


def test_two_ranks_eval_checkpoint_ctrl_c_and_resume_on_nccl_rules(shards, tmp_path, request):
    out = copy_run(shards, tmp_path / "run")
    cmd = command(2, out)

    # 1. Train until Ctrl-C: each rank holds at optimizer step HOLD_AT until its SIGINT has come, so the signal
    # lands mid-training whatever the speed of this machine.
    logs1 = tmp_path / "logs-interrupted"
    proc = start(cmd, logs1, tmp_path, "interrupted", hold=HOLD_AT)

    def holding():
        logs = rank_logs(logs1).values()
        return len(logs) == 2 and all(any(e.startswith("holding") for e in log["events"]) for log in logs)

    wait_for(holding, proc)
    running = proc.poll() is None
    if running:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends torchrun; it passes SIGINT to each rank
    rc, stdout, stderr = finish(proc)
    why = diagnosis(logs1, rc, stdout, stderr)
    assert running and rows(out, "train"), f"the two ranks never reached training\n{why}"
    assert rows(out, "eval") and rows(out, "eval")[0]["step"] == 0, f"no eval at step 0\n{why}"
    exits = {rank: log["exit"] for rank, log in rank_logs(logs1).items()}
    assert exits == {0: 130, 1: 130}, f"each rank should stop with 130 after Ctrl-C, got {exits}\n{why}"
    assert rc in (1, 130), why  # torchrun itself ends with its own SignalException (1) or passes 130 on
    assert re.search(rf"stopped: .*micro-step {HOLD_AT}; checkpoint saved", stderr), why
    assert (out / "ckpt.pt").exists(), why
    check_group_and_device(logs1, 2, why)
    assert [r["step"] for r in rows(out, "train")] == list(range(1, HOLD_AT + 1))

    # 2. The same command again continues the checkpoint to the end: the numbers of an unbroken run.
    logs2 = tmp_path / "logs-resumed"
    rc, stdout, stderr = finish(start(cmd, logs2, tmp_path, "resumed"))
    why = diagnosis(logs2, rc, stdout, stderr)
    assert rc == 0, f"the resumed run failed\n{why}"
    assert {rank: log["exit"] for rank, log in rank_logs(logs2).items()} == {0: 0, 1: 0}, why
    assert "resume: from" in stdout, why
    check_group_and_device(logs2, 2, why)
    runs = rows(out, "run")
    assert [r.get("dist_backend", "(no dist_backend)") for r in runs] == [GROUP, GROUP], runs
    assert runs[-1]["resumed_from"] == HOLD_AT
    assert [r["step"] for r in rows(out, "eval")] == [0, 4, 8, 12]
    assert [r["step"] for r in rows(out, "train")] == list(range(1, 13))  # one writer, no step twice or missing
    two_ranks = request.getfixturevalue("two_ranks")  # asked for last: meanwhile another worker may make it
    assert logged(out) == logged(two_ranks[0])  # every train and eval number, bit for bit (gloo on the CPU)


def test_one_rank_under_torchrun_makes_the_group(shards, tmp_path):
    one, logs = copy_run(shards, tmp_path / "torchrun1"), tmp_path / "logs-torchrun1"
    rc, stdout, stderr = finish(start(command(1, one, steps=2, eval_every=2), logs, tmp_path, "torchrun1"))
    why = diagnosis(logs, rc, stdout, stderr)
    assert rc == 0, why
    runs = rows(one, "run")
    assert runs and runs[0].get("dist_backend") == GROUP, (
        f"torchrun --nproc_per_node=1 must make a process group (issue 22 item 1); the run row has dist_backend="
        f"{runs[0].get('dist_backend', '(missing)') if runs else '(no run row)'}\n{why}"
    )
    check_group_and_device(logs, 1, why)
