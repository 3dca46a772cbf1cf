"""Do two-rank torchrun runs end cleanly? N tiny runs that finish and N that are stopped with Ctrl-C.

    python benchmarks/torchrun_exits.py            # 20 + 20 runs, about 15 minutes on a 2-core CPU box
    python benchmarks/torchrun_exits.py --n=5 --keep

Runs ../main.py (the one beside this folder) under `python -m torch.distributed.run --standalone
--nproc_per_node=2` with --smoke, a tiny model and OMP_NUM_THREADS=1, each in its own out_dir:

- completion: --steps=4 --export_hf=true; expects exit 0 and out_dir/hf/ written;
- Ctrl-C: a long run, stopped with SIGINT to the launcher's whole process group (what a terminal's Ctrl-C does)
  once metrics.jsonl holds a train row; expects exit 130 or 1 (torchrun itself exits 1, with its own
  SignalException traceback, which is not counted) and a ckpt.pt.

Counts per kind: exit codes, and runs whose output has a 'terminate called', 'Aborted', 'SIGABRT', 'Signals.' (a
rank killed by a signal, as torchrun reports it) or 'Traceback' line. Prints a summary table, and the first
offending lines of each bad run. Exit status 0 when every run was clean. --keep keeps the out_dirs and logs.
Extra environment for the runs (e.g. PYTHONFAULTHANDLER=1) passes through.
"""

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MAIN = os.path.normpath(os.path.join(HERE, "..", "main.py"))
TINY = [
    "--smoke",
    "--n_layer=1",
    "--n_head=2",
    "--n_embd=32",
    "--seq_len=32",
    "--batch_size=2",
    "--eval_iters=2",
    "--sample_tokens=2",
    "--warmup_steps=1",
]
BAD = {
    "terminate called": re.compile(r"terminate called"),
    "Aborted": re.compile(r"Aborted|SIGABRT"),
    "signal": re.compile(r"Signals\.|exitcode\s*:\s*-\d+"),
    "Traceback": re.compile(r"Traceback"),
}


def launch(out_dir, args, log):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        MAIN,
        *TINY,
        f"--out_dir={out_dir}",
        *args,
    ]
    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.path.dirname(MAIN), start_new_session=True
    )  # its own process group: SIGINT to it is a terminal's Ctrl-C


def train_rows(out_dir):
    try:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            return sum(1 for line in f if line.strip() and json.loads(line).get("kind") == "train")
    except (OSError, ValueError):
        return 0


def wait(p, timeout):
    """The exit code; on timeout the whole group is killed and None returned."""
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return None


def launcher_tracebacks_removed(text):
    """The log without torchrun's own traceback for the Ctrl-C it received (it always prints one, ending in
    SignalException, and exits 1): that one is the launcher's, not a rank's."""
    blocks = re.split(r"(?m)^(?=Traceback \(most recent call last\):)", text)
    keep = [
        b
        for b in blocks
        if not (
            b.startswith("Traceback")
            and re.search(r"(?m)^torch\.distributed\.elastic\.multiprocessing\.api\.SignalException: ", b)
        )
    ]
    return "".join(keep)


def one_run(kind, i, root, timeout):
    out_dir = os.path.join(root, f"{kind}_{i:02d}")
    log_path = out_dir + ".log"
    with open(log_path, "w") as log:
        if kind == "complete":
            p = launch(out_dir, ["--steps=4", "--eval_every=2", "--export_hf=true"], log)
            rc = wait(p, timeout)
        else:
            p = launch(out_dir, ["--steps=100000", "--eval_every=100000", "--export_hf=true"], log)
            t0 = time.time()
            while p.poll() is None and train_rows(out_dir) == 0 and time.time() - t0 < timeout:
                time.sleep(0.2)
            if p.poll() is None:
                time.sleep(0.5)  # a few steps in, not at the very first row
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGINT)
            rc = wait(p, timeout)
    with open(log_path, errors="replace") as f:
        text = launcher_tracebacks_removed(f.read())
    bad = {name: [ln for ln in text.splitlines() if rx.search(ln)] for name, rx in BAD.items()}
    result = {
        "rc": rc,
        "bad": {k: v for k, v in bad.items() if v},
        "log": log_path,
        "hf": os.path.isfile(os.path.join(out_dir, "hf", "model.safetensors")),
        "ckpt": os.path.isfile(os.path.join(out_dir, "ckpt.pt")),
    }
    ok_rc = (0,) if kind == "complete" else (130, 1)
    result["clean"] = rc in ok_rc and not result["bad"] and result["hf" if kind == "complete" else "ckpt"]
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="runs of each kind (default 20)")
    ap.add_argument("--kinds", default="complete,ctrl-c", help="complete, ctrl-c, or both (default)")
    ap.add_argument("--timeout", type=float, default=180, help="seconds before a run is killed as hung")
    ap.add_argument("--keep", action="store_true", help="keep the out_dirs and logs (their folder is printed)")
    ap.add_argument(
        "--root", help="keep the out_dirs and logs in a new folder under this one (default: a temporary one)"
    )
    a = ap.parse_args()
    if a.root:
        os.makedirs(a.root, exist_ok=True)
    root = tempfile.mkdtemp(prefix="torchrun_exits_", dir=a.root)  # a fresh folder of its own: never a run's files
    print(f"main.py: {MAIN}\nruns in: {root}", flush=True)
    results = collections.defaultdict(list)
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    t_start = time.time()
    for i in range(a.n):
        for kind in kinds:
            r = one_run(kind, i, root, a.timeout)
            results[kind].append(r)
            tag = (
                "clean"
                if r["clean"]
                else "BAD: " + (", ".join(r["bad"]) or f"rc={r['rc']} hf={r['hf']} ckpt={r['ckpt']}")
            )
            print(f"{kind:>8} {i + 1:2d}/{a.n}: exit {r['rc']}  {tag}", flush=True)
    print(f"\n{time.time() - t_start:.0f}s\n")
    cols = ["runs", "exit codes", "terminate called", "Aborted", "signal", "Traceback", "hf/ or ckpt", "clean"]
    print(" | ".join(["kind", *cols]))
    print(" | ".join(["---"] * (len(cols) + 1)))
    failed = 0
    for kind in kinds:
        rs = results[kind]
        codes = collections.Counter(r["rc"] for r in rs)
        wrote = sum(r["hf"] if kind == "complete" else r["ckpt"] for r in rs)
        row = [
            kind,
            len(rs),
            " ".join(f"{c}x{n}" for c, n in sorted(codes.items(), key=str)),
            *(sum(bool(r["bad"].get(k)) for r in rs) for k in BAD),
            f"{wrote} ({'hf/' if kind == 'complete' else 'ckpt.pt'})",
            sum(r["clean"] for r in rs),
        ]
        print(" | ".join(map(str, row)))
        failed += sum(not r["clean"] for r in rs)
    for kind in kinds:
        for r in results[kind]:
            if not r["clean"]:
                print(f"\n{kind}: exit {r['rc']}, log {r['log']}")
                for lines in r["bad"].values():
                    for ln in lines[:3]:
                        print("   ", ln[:200])
    if not a.keep and not a.root:
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
