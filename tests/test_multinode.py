"""Two torchrun nodes on localhost (c10d rendezvous, gloo, one process each), in both storage layouts: node-local
(a different out_dir per node) runs to the end and matches one process, then resumes each node from its own ckpt.pt;
shared (one out_dir for both) prepares once, and when one node is killed mid-run the other stops with one line."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, RUN, TWO_RANKS, cli_args, copy_run, made_once, main, read_jsonl, wait_for

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed"),
    pytest.mark.skipif(not os.path.isdir("/proc"), reason="kills a node's workers found through /proc"),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_dirs(tmp, layout):
    return [tmp / "n0", tmp / ("n1" if layout == "node-local" else "n0")]


def start_nodes(tmp, layout, node1_env=None, node1_script="main.py", **kw):
    """Node 0 and node 1 of one torchrun job (TWO_RANKS: the shared run's model and global batch); each node's output
    goes to tmp/node{i}.log."""
    port, env = free_port(), {**os.environ, "PYTHONUNBUFFERED": "1"}  # a killed node's last lines reach its log
    procs = []
    for node, out in enumerate(node_dirs(tmp, layout)):
        script = os.path.join(ROOT, node1_script if node == 1 else "main.py")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={node}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}",
            script,
        ]
        with open(tmp / f"node{node}.log", "w") as log:
            procs.append(
                subprocess.Popen(
                    cmd + cli_args(out, **{**TWO_RANKS, **kw}),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**env, **(node1_env or {})} if node else env,
                    cwd=ROOT,
                )
            )
        if node == 0:  # node 0's agent hosts the rendezvous store, so killing node 1 leaves it standing
            wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, timeout=60)
    return procs


def finish(tmp, procs, timeout=300):
    """Wait for both nodes: their return codes and their output."""
    rcs = [p.wait(timeout=timeout) for p in procs]
    return rcs, [(tmp / f"node{i}.log").read_text() for i in range(len(procs))]


def kill_node(proc):
    """SIGKILL a torchrun agent and its workers (torchrun starts each worker in a session of its own)."""
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        if ppid == proc.pid:
            os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait()


def rows(out_dir, kind, key):
    return {r["step"]: r[key] for r in read_jsonl(out_dir / "metrics.jsonl") if r["kind"] == kind}


@pytest.fixture(scope="module")
def node_local(tmp_path_factory):
    """One finished two-node run on node-local storage, which the tests only read: (its tmp dir, return codes,
    outputs)."""
    tmp, (rcs, outs) = made_once(
        tmp_path_factory, "node-local", lambda tmp: finish(tmp, start_nodes(tmp, "node-local"))
    )
    return tmp, rcs, outs


def test_two_nodes_finish_and_match_one_process_with_the_same_global_batch(node_local, trained):
    tmp, rcs, outs = node_local
    assert rcs == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    rank_0_dir = next(d for d in node_dirs(tmp, "node-local") if (d / "metrics.jsonl").exists())
    got, single = rows(rank_0_dir, "eval", "val_loss"), rows(trained.out, "eval", "val_loss")
    assert got.keys() == single.keys() == {0, 4, 8, 12}
    assert got[0] == pytest.approx(single[0], rel=1e-5)  # same init, same fixed val windows
    assert got[12] == pytest.approx(single[12], rel=0.02)  # other train windows per rank, same global batch
    assert sum("data_parallel 2; global batch 128 tokens" in o for o in outs) == 1  # rank 0 alone prints


def test_node_local_storage_each_node_prepares_and_checkpoints_its_own_out_dir(node_local):
    tmp, _, outs = node_local
    for d in node_dirs(tmp, "node-local"):
        shards = json.loads((d / "manifest.json").read_text())["splits"]["train"]
        assert {"ckpt.pt", *(s["file"] for s in shards)} <= set(os.listdir(d))
    assert sum((d / "metrics.jsonl").exists() for d in node_dirs(tmp, "node-local")) == 1  # global rank 0's
    assert all("prepare: 60 articles" in o for o in outs)  # built on both nodes


def test_node_local_storage_resumes_each_node_from_its_own_checkpoint(node_local, trained, tmp_path, capsys):
    """Both nodes rerun the finished run with 4 more steps: each node reads the ckpt.pt in its own out_dir, both
    continue at micro-step 12, and the run goes on as one process continuing the same run would."""
    src, rcs, _ = node_local
    assert rcs == [0, 0]
    for d in node_dirs(src, "node-local"):
        copy_run(d, tmp_path / d.name)
    rcs, outs = finish(tmp_path, start_nodes(tmp_path, "node-local", steps=16))
    assert rcs == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert sum("continuing the run in" in o and "at micro-step 12" in o for o in outs) == 1, outs  # rank 0 prints
    for d in node_dirs(tmp_path, "node-local"):
        assert torch.load(d / "ckpt.pt", weights_only=False)["meta"]["step"] == 16
    # torchrun's rendezvous may put rank 0 on the other node this time: its out_dir has the new eval
    resumed = [rows(d, "eval", "val_loss") for d in node_dirs(tmp_path, "node-local") if (d / "metrics.jsonl").exists()]
    resumed = [r for r in resumed if 16 in r]
    one = copy_run(trained.out, tmp_path / "one")
    capsys.readouterr()
    main.main(cli_args(one, **{**RUN, "export_hf": "false", "steps": 16}))
    assert len(resumed) == 1 and resumed[0][16] == pytest.approx(rows(one, "eval", "val_loss")[16], rel=0.02)


def test_nodes_whose_checkpoints_differ_are_named_in_one_line(monkeypatch):
    monkeypatch.setattr(main, "gather_objects", lambda obj, dist: [(0, 12), (0, 12), (1, 8), (2, None)])
    msg = r"checkpoints disagree \(node 0: micro-step 12, node 1: micro-step 8, node 2: no checkpoint\)"
    with pytest.raises(main.UserError, match=msg):
        main.check_same_start({"meta": {"step": 12}}, main.Dist(0, 4))


def test_shared_storage_prepares_once_and_a_node_killed_mid_run_gives_one_line_on_the_other(tmp_path):
    held = tmp_path / "node1-holding"  # node 1 waits before its optimizer step 3, until it is killed
    procs = start_nodes(
        tmp_path,
        "shared",
        node1_env={"HOLD_AT": "3", "HOLD_FILE": str(held)},
        node1_script=os.path.join("tests", "held_run.py"),
    )
    try:
        assert wait_for(held.exists, procs[1]), "node 1 never reached training"
        kill_node(procs[1])
        rc = procs[0].wait(timeout=300)
    finally:
        for p in procs:
            kill_node(p)
    out, out1 = (tmp_path / "node0.log").read_text(), (tmp_path / "node1.log").read_text()
    assert sum("prepare: 60 articles" in o for o in (out, out1)) == 1  # one node builds the shards ...
    assert sum("prepare: reusing" in o for o in (out, out1)) == 1  # ... the other finds them on the shared disk
    assert rc != 0
    errors = re.findall(r"^error: .*$", out, re.M)
    assert len(errors) == 1 and re.match(r"error: rank \d on node \d lost contact with rank \d", errors[0]), out[-3000:]
    assert 'main.py", line' not in out  # no traceback from main.py (torchrun prints its own summary)


def test_nodes_with_different_tokens_are_named_in_one_line(monkeypatch):
    monkeypatch.setattr(main, "gather_objects", lambda obj, dist: [(0, "aaa"), (0, "aaa"), (1, "bbb"), (2, "aaa")])
    with pytest.raises(main.UserError, match=r"node\(s\) 1 have content hash bbb, node 0 has aaa"):
        main.check_same_data({"content_hash": "aaa"}, None, None, main.Dist(0, 4))
