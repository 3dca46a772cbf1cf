"""How long main.py takes to write a GPT-2 small checkpoint (weights + AdamW moments, ~1.5 GB) into out_dir: what
a scheduler's grace period after SIGTERM must cover. Prints the seconds and the size.

    python benchmarks/ckpt_write.py [--out_dir=/path/on/the/disk/to/measure]
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402
import torch  # noqa: E402

import main  # noqa: E402

out = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--out_dir=")), tempfile.mkdtemp())
cfg = main.TrainConfig(device="cpu", compile="false", backend="torch", out_dir=out)
b = main.TorchBackend(cfg, main.Dist())
x = np.zeros((1, cfg.seq_len), dtype=np.uint16)
b.train_micro_step(x, x)  # one step, so AdamW's moments exist and are saved too
b.optimizer_step(1e-4, 0.9)
os.makedirs(out, exist_ok=True)
path = os.path.join(out, "ckpt.pt")
for _ in range(3):
    t = time.perf_counter()
    state = b.state_dict()
    state.pop("rng")
    with main.atomic_write(path) as f:
        torch.save({**state, "meta": {"step": 0}}, f)
    print(
        f"GPT-2 small checkpoint: {os.path.getsize(path) / 1e9:.2f} GB written (fsync included) in "
        f"{time.perf_counter() - t:.1f} s to {out}"
    )
os.remove(path)
