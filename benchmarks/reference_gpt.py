"""A plain PyTorch GPT-2 used only as a speed yardstick for main.py's model (benchmarks/bench.py).

Deliberately the most ordinary shape: nn.Linear projections, SDPA with is_causal, tanh GELU, pre-LayerNorm
blocks, tied input/output embeddings, a vocabulary padded to 50304, logits over the whole padded vocabulary
straight into F.cross_entropy, bf16 autocast on CUDA (fp32 elsewhere), torch.compile when asked, and
torch.optim.AdamW, fused on CUDA as nanoGPT's train.py does (torch's default implementation on the CPU).
"""

import contextlib
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REF_VOCAB = 50304  # 50257 rounded up to a multiple of 64


class RefAttention(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.n_head
        qkv = self.qkv(x).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)  # (3, b, h, t, d/h)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class RefBlock(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = RefAttention(d, n_head)
        self.norm2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.down(F.gelu(self.up(self.norm2(x)), approximate="tanh"))


class RefGPT(nn.Module):
    def __init__(self, n_layer, n_head, d, seq_len, vocab=REF_VOCAB):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList([RefBlock(d, n_head) for _ in range(n_layer)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # weight tying
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.out.weight, std=0.02 / math.sqrt(2 * n_layer))
            nn.init.normal_(blk.down.weight, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.norm(x))  # (b, t, 50304): the padded columns take part in the softmax
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


class RefTrainer:
    """main.TorchBackend's roles for the benchmark: train_micro_step(x, y), then optimizer_step() -> the loss."""

    def __init__(
        self,
        n_layer,
        n_head,
        n_embd,
        seq_len,
        lr=3e-4,
        weight_decay=0.1,
        grad_clip=1.0,
        seed=1337,
        device="cpu",
        autocast_dtype=None,
        compile=False,
    ):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.raw = RefGPT(n_layer, n_head, n_embd, seq_len).to(self.device)
        self.model = torch.compile(self.raw) if compile else self.raw
        # fp32 by default; on CUDA the benchmark passes bfloat16 so it compares like with like (main.py's auto dtype)
        self.autocast = (
            torch.autocast(self.device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        params = list(self.raw.parameters())
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=lr,
            betas=(0.9, 0.95),
            fused=self.device.type == "cuda",
        )
        self.grad_clip = grad_clip
        self._loss = torch.zeros((), device=self.device)

    def train_micro_step(self, x, y, loss_scale=1.0):
        """x, y: uint16 numpy arrays (B, T), converted the same way main.TorchBackend does."""
        x, y = (
            torch.from_numpy(a.astype(np.int64)).pin_memory().to(self.device, non_blocking=True)
            if self.device.type == "cuda"
            else torch.from_numpy(a.astype(np.int64))
            for a in (x, y)
        )
        with self.autocast:
            loss = self.model(x, y)
        (loss * loss_scale).backward()
        self._loss += loss.detach() * loss_scale

    def optimizer_step(self):
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.raw.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss, self._loss = self._loss.item(), torch.zeros((), device=self.device)  # one host sync per step
        return loss
