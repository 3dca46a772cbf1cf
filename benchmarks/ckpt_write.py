"""How long main.py takes to write a GPT-2 small checkpoint (weights + AdamW moments, ~1.5 GB) into out_dir: what
a scheduler's grace period after SIGTERM must cover. Prints the seconds and the size.

    python benchmarks/ckpt_write.py [--out_dir=/path/on/the/disk/to/measure] [--n_layer=... any model field]

It writes into a fresh folder of its own inside out_dir and removes only that folder, so it may point at a run's
out_dir (even one that is training) and never touches the run's files.
"""

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402
import torch  # noqa: E402

import main  # noqa: E402

try:
    cfg = main.parse_config(
        [f"--out_dir={tempfile.gettempdir()}", "--device=cpu", "--compile=false", "--backend=torch", *sys.argv[1:]]
    )
    if not os.path.isdir(cfg.out_dir):
        raise main.UserError(f"--out_dir={cfg.out_dir} is not a directory; name one on the disk to measure")
except main.UserError as e:
    sys.exit(f"error: {e}")
b = main.TorchBackend(cfg, main.Dist())
x = np.zeros((1, cfg.seq_len), dtype=np.uint16)
b.train_micro_step(x, x)  # one step, so AdamW's moments exist and are saved too
b.optimizer_step(1e-4, 0.9)
own = tempfile.mkdtemp(prefix="ckpt_write_", dir=cfg.out_dir)
try:
    path = os.path.join(own, "ckpt.pt")
    for _ in range(3):
        t = time.perf_counter()
        state = b.state_dict()
        state.pop("rng")
        with main.atomic_write(path) as f:
            torch.save({**state, "meta": {"step": 0}}, f)
        print(
            f"checkpoint (n_layer {cfg.n_layer}, n_embd {cfg.n_embd}): {os.path.getsize(path) / 1e9:.2f} GB written "
            f"(fsync included) in {time.perf_counter() - t:.1f} s to {cfg.out_dir}"
        )
finally:
    shutil.rmtree(own)
