"""`python tests/held_run.py ARGS` is `python main.py ARGS`, except that one optimizer step waits for the test:

    HOLD_AT=N HOLD_FILE=path python tests/held_run.py ARGS

Before the N-th optimizer step of this process runs, it creates HOLD_FILE and waits there until the process gets
SIGINT or SIGTERM (main.py's handler has run by then; the step then runs and the loop stops at its end), or until
something kills it (kill -9). So a test's signal lands mid-training at a known step, however fast or slow the
machine: the test waits for HOLD_FILE to appear, not for a guessed number of seconds. Without HOLD_AT nothing waits.
"""

import os
import signal
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
state = {"signalled": False, "steps": 0}
real_signal = signal.signal


def patched_signal(signum, handler):
    """main.py's SIGINT/SIGTERM handler, with a note that the signal came."""
    if signum in (signal.SIGINT, signal.SIGTERM) and callable(handler):
        inner = handler

        def handler(s, frame):
            state["signalled"] = True
            return inner(s, frame)

        handler.inner = inner
    prev = real_signal(signum, handler)
    return getattr(prev, "inner", prev)


def hold_at(n, on_hold, on_release=lambda signalled: None, target=(torch.optim.AdamW, "step")):
    """From now on, the n-th optimizer step of this process (0: none) calls on_hold(n), then waits until a SIGINT or
    SIGTERM has come (or 600 s, so a test that died meanwhile leaves nothing behind), then on_release(signalled).
    target: the (class, method) that makes one optimizer step; torch's AdamW, or a backend's optimizer_step."""
    owner, name = target
    real_step = getattr(owner, name)

    def step(self, *args, **kwargs):
        state["steps"] += 1
        if state["steps"] == n:
            on_hold(n)
            deadline = time.time() + 600
            while not state["signalled"] and time.time() < deadline:
                time.sleep(0.05)
            on_release(state["signalled"])
        return real_step(self, *args, **kwargs)

    signal.signal = patched_signal
    setattr(owner, name, step)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    import main

    target = (main.TtmlBackend, "optimizer_step") if "--backend=ttml" in sys.argv else (torch.optim.AdamW, "step")
    hold_at(int(os.environ.get("HOLD_AT", "0")), lambda n: open(os.environ["HOLD_FILE"], "w").close(), target=target)
    main.main(sys.argv[1:])
