"""Two torchrun nodes on localhost (c10d rendezvous, gloo, one process each), in both storage layouts: node-local
(a different out_dir per node) and shared (one out_dir for both)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, cli_args, main, read_jsonl, run_main

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed"),
              pytest.mark.skipif(not os.path.isdir("/proc"), reason="kills a node's workers found through /proc")]
ARGS = dict(n_layer=1, n_embd=32, steps=30, eval_every=10, lr=3e-3, warmup_steps=4, total_optim_steps=30,
            export_hf="false", sample_tokens=4, eval_iters=4)
LAYOUTS = ("node-local", "shared")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_dirs(tmp, layout):
    return [tmp / "n0", tmp / ("n1" if layout == "node-local" else "n0")]


def start_nodes(tmp, layout, **kw):
    """Node 0 and node 1 of one torchrun job; each node's output goes to tmp/node{i}.log."""
    port, env = free_port(), {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = []
    for node, out in enumerate(node_dirs(tmp, layout)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", os.path.join(ROOT, "main.py")]
        with open(tmp / f"node{node}.log", "w") as log:
            procs.append(subprocess.Popen(cmd + cli_args(out, **{**ARGS, **kw}), stdout=log, stderr=subprocess.STDOUT,
                                          env=env, cwd=ROOT))
        if node == 0:  # node 0's agent hosts the rendezvous store, so killing node 1 leaves it standing
            wait_until(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, timeout=60)
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


def metrics_dir(tmp, layout):
    """The out_dir of the node that rank 0 ran on (metrics stay with global rank 0)."""
    return next(d for d in node_dirs(tmp, layout) if (d / "metrics.jsonl").exists())


def train_steps(tmp, layout):
    dirs = [d for d in node_dirs(tmp, layout) if (d / "metrics.jsonl").exists()]
    return [r["step"] for d in dirs for r in read_jsonl(d / "metrics.jsonl") if r["kind"] == "train"]


def wait_until(cond, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and not cond():
        time.sleep(0.01)
    return cond()


def rows(out_dir, kind, key):
    return {r["step"]: r[key] for r in read_jsonl(out_dir / "metrics.jsonl") if r["kind"] == kind}


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """One finished two-node run per layout: (its tmp dir, return codes, outputs)."""
    runs = {}
    for layout in LAYOUTS:
        tmp = tmp_path_factory.mktemp(layout)
        runs[layout] = (tmp, *finish(tmp, start_nodes(tmp, layout, batch_size=4)))
    return runs


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    p = run_main(cli_args(out, batch_size=8, **ARGS), env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    return rows(out, "eval", "val_loss")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_nodes_finish_and_match_one_process_with_the_same_global_batch(unbroken, single, layout):
    tmp, rcs, outs = unbroken[layout]
    assert rcs == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    got = rows(metrics_dir(tmp, layout), "eval", "val_loss")
    assert got.keys() == single.keys() == {0, 10, 20, 30}
    assert got[0] == pytest.approx(single[0], rel=1e-5)  # same init, same fixed val windows
    assert got[30] == pytest.approx(single[30], rel=0.02)  # other train windows per rank, same global batch
    assert sum("data_parallel 2; global batch 256 tokens" in o for o in outs) == 1  # rank 0 alone prints


def test_node_local_storage_each_node_prepares_and_checkpoints_its_own_out_dir(unbroken):
    tmp, _, outs = unbroken["node-local"]
    for d in node_dirs(tmp, "node-local"):
        shards = json.load(open(d / "manifest.json"))["splits"]["train"]
        assert {"ckpt.pt", *(s["file"] for s in shards)} <= set(os.listdir(d))
    assert sum((d / "metrics.jsonl").exists() for d in node_dirs(tmp, "node-local")) == 1
    assert all("prepare: 60 articles" in o for o in outs)  # built on both nodes


def test_shared_storage_one_node_builds_the_other_reuses(unbroken):
    _, _, outs = unbroken["shared"]
    assert sum("prepare: 60 articles" in o for o in outs) == 1
    assert sum("prepare: reusing" in o for o in outs) == 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kill_9_of_both_nodes_then_resume_ends_where_the_unbroken_run_ends(unbroken, tmp_path, layout):
    procs = start_nodes(tmp_path, layout, batch_size=4)
    # Past step 11, every node has written the step-10 checkpoint: node 1 saves before it joins step 11's all-reduce.
    # Before step 20, no node has begun the next one.
    mid = wait_until(lambda: any(11 <= s < 18 for s in train_steps(tmp_path, layout)))
    for p in procs:
        kill_node(p)
    assert mid, "the run never reached micro-step 11"
    rcs, outs = finish(tmp_path, start_nodes(tmp_path, layout, batch_size=4, init_from="resume"))
    assert rcs == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "resume: from" in "".join(outs)
    full, cut = metrics_dir(unbroken[layout][0], layout), metrics_dir(tmp_path, layout)
    assert rows(cut, "eval", "val_loss") == pytest.approx(rows(full, "eval", "val_loss"), rel=1e-6)
    assert rows(cut, "train", "loss") == pytest.approx(rows(full, "train", "loss"), rel=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_node_killed_mid_run_gives_one_line_on_the_other(tmp_path, layout):
    procs = start_nodes(tmp_path, layout, batch_size=4, steps=100000, total_optim_steps=100000)
    try:
        assert wait_until(lambda: any(s >= 3 for s in train_steps(tmp_path, layout))), "training never started"
        kill_node(procs[1])
        rc = procs[0].wait(timeout=120)
    finally:
        for p in procs:
            kill_node(p)
    out = (tmp_path / "node0.log").read_text()
    assert rc != 0
    errors = re.findall(r"^error: .*$", out, re.M)
    assert len(errors) == 1 and re.match(r"error: rank \d on node \d lost contact with rank \d", errors[0]), out[-3000:]
    assert 'main.py", line' not in out  # no traceback from main.py (torchrun prints its own summary)


def test_nodes_with_different_tokens_are_named_in_one_line(monkeypatch):
    monkeypatch.setattr(main, "gather_objects", lambda obj, dist: [(0, "aaa"), (0, "aaa"), (1, "bbb"), (2, "aaa")])
    with pytest.raises(main.UserError, match=r"node\(s\) 1 have content hash bbb, node 0 has aaa"):
        main.check_same_data({"content_hash": "aaa"}, None, None, main.Dist(0, 4))
