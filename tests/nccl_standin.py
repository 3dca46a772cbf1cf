"""One torchrun rank of main.py on a node of two fake GPUs, with gloo standing in for NCCL under NCCL's rules.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/nccl_standin.py ARGS

runs main.main(ARGS) in each rank after patching torch, so that on a CPU-only torch main.py believes it trains on two
"NVIDIA H100 80GB HBM3" (torch.cuda.is_available() is True, device_count() is 2) while the model and every tensor
stay on the CPU (main.resolve_device answers "cpu"; pass --device=auto, so main.py still chooses its process group
for CUDA). What would break on real GPUs breaks here too, with the error real torch gives:

- A group made as "nccl" is made as "cuda:gloo": it has a backend for CUDA tensors only, so a CPU tensor in a
  collective fails with "No backend type associated with device type cpu", as on NCCL. "cpu:gloo,cuda:nccl" is
  made as "cpu:gloo,cuda:gloo", which takes both. device_id is recorded, not passed (gloo has no CUDA here).
- NCCL's device rule: a rank must call torch.cuda.set_device(cuda:LOCAL_RANK) before its first collective, or every
  rank of the node is on cuda:0 (NCCL refuses two ranks on one GPU, or hangs). Every torch.distributed collective
  called through the torch.distributed namespace checks this first and raises RuntimeError("collective before
  set_device: every rank is on cuda:0 ...") otherwise. The rule holds only for a group made for CUDA (nccl in its
  backend string); a plain "gloo" group has no device to set.
- torch.cuda.set_device refuses a bare "cuda" (as real torch does) and an index >= device_count().
- An object collective or barrier on a CUDA-only group runs, on NCCL, on the current GPU: with the device set it
  works. Here it cannot build a CUDA tensor, so it runs on a side gloo group (made right after the main group).
- DDP: its construction counts as a collective (device rule). Its weight broadcast and gradient all-reduces go
  through the group's C++ API, not through these wrappers. On "cpu:gloo,cuda:gloo" the CPU gradients go to gloo's
  CPU backend, as they would on a mixed group. On a CUDA-only group they would be CUDA tensors on NCCL, which works,
  so DDP is given the side gloo group there: the stand-in's CPU model must not fail where a GPU model would not.

Environment:
  NCCL_STANDIN_LOG   a folder: each rank writes rank<RANK>.json there, rewritten at each event and at exit: the
                     group's backend as asked and as made, device_id, the set_device calls, the order of init /
                     set_device / first collective, the first collective that failed (and main.py's functions that
                     called it), the first uncaught error and the exit code.
  NCCL_STANDIN_HOLD  N: the N-th optimizer step of this process waits (before it runs) until the process has got
                     SIGINT or SIGTERM, so a test's Ctrl-C lands mid-training however fast the steps are. Unset: no
                     waiting.
  NCCL_STANDIN_MAIN  the main.py to run (default: the one beside tests/).
"""

import functools
import importlib.util
import json
import os
import sys

import torch
import torch.distributed as tdist

from held_run import hold_at

HERE = os.path.dirname(os.path.abspath(__file__))
MAIN = os.environ.get("NCCL_STANDIN_MAIN") or os.path.join(os.path.dirname(HERE), "main.py")
N_GPUS = 2
GPU_NAME = "NVIDIA H100 80GB HBM3"
RANK, LOCAL_RANK = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
BACKENDS = {"nccl": "cuda:gloo", "cpu:gloo,cuda:nccl": "cpu:gloo,cuda:gloo", "cuda:nccl,cpu:gloo": "cpu:gloo,cuda:gloo"}
OBJECT_COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list")
COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
    "barrier",
    "monitored_barrier",
    *OBJECT_COLLECTIVES,
)

LOG = {
    "rank": RANK,
    "local_rank": LOCAL_RANK,
    "pid": os.getpid(),
    "backend_asked": None,
    "backend_made": None,
    "device_id": None,
    "set_device": [],
    "events": [],
    "collectives": {},
    "failed_collective": None,
    "first_error": None,
    "exit": None,
}
state = {"current": None, "cuda_group": False, "side_group": None}


def write_log():
    folder = os.environ.get("NCCL_STANDIN_LOG")
    if folder:
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".rank{RANK}.json.tmp")
        with open(tmp, "w") as f:
            json.dump(LOG, f, indent=1)
        os.replace(tmp, os.path.join(folder, f"rank{RANK}.json"))


def event(text):
    LOG["events"].append(text)
    write_log()


# --- two fake GPUs ---------------------------------------------------------------------------------------------


def set_device(device):
    if isinstance(device, int):
        d = torch.device("cuda", device)
    else:
        d = torch.device(device)
        if d.type != "cuda":
            raise ValueError(f"Expected a cuda device, but got: {d}")
        if d.index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
    if d.index >= N_GPUS:
        raise RuntimeError(f"CUDA error: invalid device ordinal (set_device({device!r}) with {N_GPUS} GPUs)")
    state["current"] = d.index
    LOG["set_device"].append(str(d))
    event(f"set_device {d}")


def current_device():
    return 0 if state["current"] is None else state["current"]


torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: N_GPUS
torch.cuda.get_device_name = lambda device=None: GPU_NAME
torch.cuda.is_bf16_supported = lambda *a, **k: True
torch.cuda.set_device = set_device
torch.cuda.current_device = current_device


# --- gloo standing in for NCCL ------------------------------------------------------------------------------------

real_init = tdist.init_process_group


@functools.wraps(real_init)
def init_process_group(backend=None, *args, device_id=None, **kwargs):
    made = BACKENDS.get(backend, backend)
    LOG.update(backend_asked=backend, backend_made=made, device_id=None if device_id is None else str(device_id))
    state["cuda_group"] = "nccl" in str(backend or "")
    event(f"init_process_group {backend} (made as {made}) device_id={LOG['device_id']}")
    real_init(made, *args, **kwargs)
    if made == "cuda:gloo":  # object collectives and barriers of a CUDA-only group: see the module docstring
        state["side_group"] = tdist.new_group(backend="gloo")


tdist.init_process_group = init_process_group


def device_rule(name):
    """NCCL's rule: this rank's current GPU is cuda:LOCAL_RANK before it talks to the group."""
    if not state["cuda_group"]:
        return
    if state["current"] is None:
        raise RuntimeError(
            f"collective before set_device: every rank is on cuda:0 (rank {RANK}, local rank "
            f"{LOCAL_RANK}, called {name} before torch.cuda.set_device(cuda:{LOCAL_RANK}); NCCL "
            "refuses two ranks on one GPU, or hangs)"
        )
    if state["current"] != LOCAL_RANK:
        raise RuntimeError(
            f"collective on the wrong GPU: rank {RANK} (local rank {LOCAL_RANK}) called {name} on "
            f"cuda:{state['current']}, not cuda:{LOCAL_RANK}"
        )


def wrap(name, real):
    @functools.wraps(real)
    def collective(*args, **kwargs):
        counts = LOG["collectives"]
        if not counts:
            event(f"collective {name}")
        counts[name] = counts.get(name, 0) + 1
        side = state["side_group"]
        if side is not None and (name in OBJECT_COLLECTIVES or name.endswith("barrier")):
            group = kwargs.get("group")
            if group is None or group is tdist.group.WORLD:
                kwargs["group"] = side
        try:
            device_rule(name)
            return real(*args, **kwargs)
        except Exception:
            if LOG.get("failed_collective") is None:
                LOG["failed_collective"] = f"{name}, called from {callers()}"
                write_log()
            raise

    return collective


def callers():
    """main.py's functions on the stack, innermost first: where a failed collective came from."""
    frame, names = sys._getframe(1), []
    while frame is not None:
        if os.path.abspath(frame.f_code.co_filename) == os.path.abspath(MAIN):
            names.append(frame.f_code.co_name)
        frame = frame.f_back
    return " <- ".join(names[:4]) or "outside main.py"


for _name in COLLECTIVES:
    if hasattr(tdist, _name):
        setattr(tdist, _name, wrap(_name, getattr(tdist, _name)))

DDP = torch.nn.parallel.DistributedDataParallel
real_ddp_init = DDP.__init__


@functools.wraps(real_ddp_init)
def ddp_init(self, module, *args, **kwargs):
    """DDP's construction broadcasts the weights: a collective under the same device rule. On a CUDA-only group its
    traffic (the weights, then the gradients) would be CUDA tensors on NCCL, which works: here the model is on the
    CPU, so it goes to the side gloo group instead."""
    wrap("DistributedDataParallel", lambda: None)()
    side = state["side_group"]
    if side is not None and len(args) < 6 and kwargs.get("process_group") is None:
        kwargs["process_group"] = side
    return real_ddp_init(self, module, *args, **kwargs)


DDP.__init__ = ddp_init


# --- the run on the CPU, a signal to wait for ---------------------------------------------------------------------

hold_at(
    int(os.environ.get("NCCL_STANDIN_HOLD") or 0),
    lambda n: event(f"holding at optimizer step {n} for a signal"),
    lambda signalled: event(f"released (signal: {signalled})"),
)


def load_main():
    sys.path.insert(0, os.path.dirname(MAIN))
    spec = importlib.util.spec_from_file_location("main", MAIN)
    module = importlib.util.module_from_spec(spec)
    sys.modules["main"] = module
    spec.loader.exec_module(module)
    module.resolve_device = lambda requested, local_rank=0: "cpu"
    return module


def run(argv):
    main = load_main()
    code = 1
    try:
        main.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        raise
    except BaseException as e:
        LOG["first_error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        LOG["exit"] = code
        write_log()


if __name__ == "__main__":
    run(sys.argv[1:])
