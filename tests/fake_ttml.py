"""A stand-in for TT-Train's `ttml` and the bits of tt-metal's `ttnn` that TtmlBackend calls, for ONE build: tt-metal
00cb91b3141186a0769ac82c74fdc52d98bbd45d (names as its nanobind bindings and ttml/models/nanogpt spell them). Toy
numerics (a tied-embedding bigram model: logits = E[x] @ E^T), real rules:

  * install layout: lay_out_tt_metal(root) writes $TT_METAL_HOME with _ttml at build/tt-train/sources/ttml and the
    package at tt-train/sources/ttml/ttml, whose __init__ does `from . import _ttml` and searches no build folder;
  * environment: enable_fabric(N) throws "TT_METAL_RUNTIME_ROOT is not set" without it (or TT_MESH_GRAPH_DESC_PATH),
    and for 8 devices picks the [2, 4] T3K descriptor, which a [1, 8] open then refuses;
  * a device opens lazily as 1x1 on first use, after which open_device([1, N]) throws;
  * one array per device: a mapper shards dim 0, no mapper replicates; reading a mesh tensor needs the composer;
  * synchronize_gradients(params, [1]) averages the devices' gradients; without it replicas drift apart;
  * AdamW keeps bf16 weights (round to nearest: tiny updates vanish), stochastic_rounding dithers, AdamWFullPrecision
    keeps fp32 master weights and shows their bf16 view;
  * ttnn: argmax refuses TILE (old ttnn; ttml's own sample() untilizes first), topk refuses rows wider than 32768,
    from_numpy takes 32-bit numpy only, backward needs its retain_graph argument and gradients on.
Passing tests show the glue drives these rules; they are not evidence that the backend works on hardware.
"""
import dataclasses
import os
import types

import numpy as np

COMMIT = "00cb91b3141186a0769ac82c74fdc52d98bbd45d"
_STATE = {}


def bf16(a):
    """Round float32 to the nearest bfloat16 (ties to even), kept as float32."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)


def lay_out_tt_metal(root, build="build"):
    """A fake $TT_METAL_HOME as ./build_metal.sh --build-tt-train leaves it at the pinned commit."""
    so_dir = os.path.join(root, build, "tt-train", "sources", "ttml")
    pkg = os.path.join(root, "tt-train", "sources", "ttml", "ttml")
    os.makedirs(so_dir, exist_ok=True)
    os.makedirs(pkg, exist_ok=True)
    with open(os.path.join(so_dir, "_ttml.py"), "w") as f:  # stands for _ttml.cpython-*.so
        f.write("import sys, fake_ttml\nfake_ttml.populate(sys.modules[__name__])\n")
    with open(os.path.join(pkg, "__init__.py"), "w") as f:
        f.write("from . import _ttml\nfrom ._ttml import *  # noqa\n")
    os.makedirs(os.path.join(root, "build", "lib"), exist_ok=True)
    return root


class Layout:
    ROW_MAJOR, TILE = "ROW_MAJOR", "TILE"


class DataType:
    UINT32, BFLOAT16, FLOAT32 = "UINT32", "BFLOAT16", "FLOAT32"


class DeviceTensor:
    """Stands for a ttnn.Tensor: one numpy array per device."""

    def __init__(self, parts, dtype, layout=Layout.TILE):
        self.parts, self.dtype, self.layout = parts, dtype, layout


def _ttnn_slice(t, starts, ends):
    idx = tuple(slice(s, e) for s, e in zip(starts, ends))
    return DeviceTensor([p[idx] for p in t.parts], t.dtype, t.layout)


def _ttnn_argmax(t, dim=None, keepdim=False):
    if t.layout == Layout.TILE:
        raise RuntimeError("argmax: input must be ROW_MAJOR")
    return DeviceTensor([np.argmax(p, axis=dim, keepdims=keepdim).astype(np.uint32) for p in t.parts], "UINT32")


def _ttnn_topk(t, k, dim=-1, largest=True, sorted=True):
    if t.parts[0].shape[dim] > 32768:
        raise RuntimeError("topk: single-core path, row too wide for L1")
    raise NotImplementedError


def make_ttnn():
    device = types.SimpleNamespace(is_blackhole=lambda d: d.arch == "blackhole")
    return types.SimpleNamespace(Layout=Layout, DataType=DataType, slice=_ttnn_slice, argmax=_ttnn_argmax,
                                 topk=_ttnn_topk, device=device, bfloat16=DataType.BFLOAT16)


def populate(mod):
    """Fill a module object with this build's ttml names (what NB_MODULE(_ttml) would register)."""
    st = types.SimpleNamespace(devices=None, grad=True, graph_live=False, mgd_shape=None, seed=0)
    _STATE["st"] = st
    ns = types.SimpleNamespace

    def ensure_device():
        if st.devices is None:  # auto_context.cpp: get_device() opens a 1x1 device when none is open
            st.devices = 1

    class Tensor:
        def __init__(self, value, requires_grad=True):
            self._value, self.grad, self._bw = value, None, None

        @staticmethod
        def from_numpy(a, layout=Layout.TILE, new_type=None, mapper=None):
            a = np.asarray(a)
            if a.dtype not in (np.float32, np.int32, np.uint32):
                raise TypeError(f"Unsupported precision: {a.dtype}")
            ensure_device()
            if mapper is not None:
                assert a.shape[0] % st.devices == 0, "shard: batch not divisible by the mesh"
                parts = [p.copy() for p in np.split(a, st.devices)]
            else:
                parts = [a.copy() for _ in range(st.devices)]
            dtype = new_type or ("FLOAT32" if a.dtype == np.float32 else "UINT32")
            if dtype == "BFLOAT16":
                parts = [bf16(p) for p in parts]
            return Tensor(DeviceTensor(parts, dtype, layout))

        def to_numpy(self, new_type=None, composer=None):
            parts = self._value.parts
            if len(parts) > 1 and composer != ("concat", 0):
                raise RuntimeError("reading a tensor on a mesh needs concat_mesh_to_tensor_composer")
            v = np.concatenate(parts) if len(parts) > 1 else parts[0]
            return v.astype(np.float32) if new_type == "FLOAT32" else v.copy()

        def get_value(self):
            return self._value

        def shape(self):
            return list(self._value.parts[0].shape)

        def dtype(self):
            return self._value.dtype

        def assign(self, other):
            assert other.shape() == self.shape(), (other.shape(), self.shape())
            self._value.parts = [p.copy() for p in other._value.parts]

        def backward(self, retain_graph):
            if not st.grad:
                raise RuntimeError("backward with gradients disabled")
            self._bw(1.0)
            st.graph_live = True

    class AutoContext:
        _inst = None

        @classmethod
        def get_instance(cls):
            cls._inst = cls._inst or cls()
            return cls._inst

        def open_device(self, mesh_shape=None, device_ids=None):
            shape = list(mesh_shape or [1, 1])
            if st.devices is not None:
                raise RuntimeError("device already opened")
            if shape[0] * shape[1] > 1 and st.mgd_shape != shape:
                raise RuntimeError(f"mesh shape {shape} does not match the mesh graph descriptor {st.mgd_shape}")
            st.devices = shape[0] * shape[1]

        def get_device(self):
            ensure_device()
            return ns(arch="wormhole_b0", compute_with_storage_grid_size=lambda: ns(x=8, y=8))

        def close_device(self):
            st.devices = None

        def set_seed(self, s):
            st.seed = s

        def reset_graph(self):
            st.graph_live = False

        def set_gradient_mode(self, mode):
            st.grad = mode == GradMode.ENABLED

        def initialize_parallelism_context(self, cfg):
            st.pctx = cfg

    class GradMode:
        ENABLED, DISABLED = "ENABLED", "DISABLED"

    def enable_fabric(n):
        mgd = os.environ.get("TT_MESH_GRAPH_DESC_PATH")
        if not mgd:
            root = os.environ.get("TT_METAL_RUNTIME_ROOT")
            if not root:
                raise RuntimeError("TT_METAL_RUNTIME_ROOT is not set")
            st.mgd_shape = [2, 4] if n == 8 else None  # tt_metal.cpp get_mgd_path: t3k for 8, none otherwise
        else:
            st.mgd_shape = [1, 8] if "1x8" in mgd else [2, 4] if "t3k" in mgd else None
        if st.mgd_shape is None:
            st.mgd_shape = [1, n]

    def synchronize_gradients(params, cluster_axes):
        for t in params.values():
            if t.grad is not None:
                mean = sum(t.grad) / len(t.grad)
                t.grad = [mean.copy() for _ in t.grad]

    def clip_grad_norm(params, max_norm, p_norm_type=2.0, error_if_nonfinite=False):
        for d in range(st.devices):
            gs = [t.grad[d] for t in params.values() if t.grad is not None]
            norm = float(np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in gs)))
            for g in gs:
                g *= min(1.0, max_norm / (norm + 1e-6))

    @dataclasses.dataclass
    class NanoGPTConfig:
        vocab_size: int = 50304
        block_size: int = 1024
        n_embd: int = 768
        n_layer: int = 12
        n_head: int = 12
        dropout: float = 0.2
        bias: bool = True
        runner_type: str = "Default"
        weight_tying: str = "Disabled"
        positional_embedding_type: str = "trainable"
        experimental: object = None

    class NanoGPT:
        """Toy: logits[b, t] = E[x[b, t]] @ E^T, so the loss depends on every weight and training lowers it."""

        def __init__(self, cfg):
            rng = np.random.default_rng(st.seed)
            e = (rng.standard_normal((cfg.vocab_size, cfg.n_embd)) * 0.02).astype(np.float32)
            self.cfg, self.mode = cfg, "train"
            self.E = Tensor.from_numpy(e, Layout.TILE, "BFLOAT16")

        def parameters(self):
            return {"nanogpt/wte/weight": self.E}

        def train(self):
            self.mode = "train"

        def eval(self):
            self.mode = "eval"

        def __call__(self, idx, mask=None):
            if st.graph_live:
                raise RuntimeError("forward before reset_graph")
            assert mask is None or mask.shape()[-1] == idx.shape()[-1]
            assert idx.shape()[-1] == self.cfg.block_size, "the model takes exactly block_size tokens"
            outs, caches = [], []
            for d, x in enumerate(idx.get_value().parts):
                E = self.E.get_value().parts[d]
                h = E[x[:, 0, 0, :].astype(np.int64)]  # B, T, C
                outs.append((h @ E.T)[:, None])  # B, 1, T, V
                caches.append((x[:, 0, 0, :].astype(np.int64), h, E))
            out = Tensor(DeviceTensor(outs, "BFLOAT16"))
            out._caches, out._model = caches, self
            return out

    def cross_entropy_loss(logits, target, reduce):
        assert reduce == ReduceType.MEAN
        vals, dls = [], []
        for lg, y in zip(logits.get_value().parts, target.get_value().parts):
            p = lg[:, 0] - lg[:, 0].max(-1, keepdims=True)  # float32 softmax, in place
            np.exp(p, out=p)
            p /= p.sum(-1, keepdims=True)
            yi = y.astype(np.int64)[..., None]
            picked = np.take_along_axis(p, yi, -1)
            vals.append(np.array([[-np.log(picked.astype(np.float64)).mean()]], np.float32))
            np.put_along_axis(p, yi, picked - 1, -1)
            p /= yi.size
            dls.append(p)
        loss = Tensor(DeviceTensor(vals, "FLOAT32"))

        def bw(scale):
            model = logits._model
            for d, ((x, h, E), dl) in enumerate(zip(logits._caches, dls)):
                g = scale * (dl.reshape(-1, dl.shape[-1]).T @ h.reshape(-1, h.shape[-1]))  # d(logits)/dE^T
                np.add.at(g, x.reshape(-1), scale * (dl.reshape(-1, dl.shape[-1]) @ E))  # d(logits)/dE[x]
                grads = model.E.grad or [np.zeros_like(p) for p in model.E.get_value().parts]
                grads[d] = grads[d] + g.astype(np.float32)
                model.E.grad = grads
        loss._bw = bw
        return loss

    def mul(t, s):
        out = Tensor(DeviceTensor([p * s for p in t.get_value().parts], t.dtype()))
        out._bw = lambda scale: t._bw(scale * s)
        return out

    class ReduceType:
        NONE, MEAN, SUM = "NONE", "MEAN", "SUM"

    def adamw_factory(full_precision):
        class Opt:
            def __init__(self, params, cfg):
                self.params, self.cfg, self.steps = params, cfg, 0
                mk = lambda: {k: Tensor(DeviceTensor([np.zeros_like(p) for p in t.get_value().parts], "FLOAT32"))
                              for k, t in params.items()}
                self.state = {"exp_avg": mk(), "exp_avg_sq": mk()}
                if full_precision:
                    self.state["master_weights"] = {
                        k: Tensor(DeviceTensor([p.copy() for p in t.get_value().parts], "FLOAT32"))
                        for k, t in params.items()}
                self.rng = np.random.default_rng(0)

            def zero_grad(self):
                for t in self.params.values():
                    t.grad = None

            def set_lr(self, lr):
                self.cfg = dataclasses.replace(self.cfg, lr=lr)

            def get_lr(self):
                return self.cfg.lr

            def step(self):
                c, self.steps = self.cfg, self.steps + 1
                for k, t in self.params.items():
                    if t.grad is None:
                        continue
                    for d, g in enumerate(t.grad):
                        m = self.state["exp_avg"][k].get_value().parts[d]
                        v = self.state["exp_avg_sq"][k].get_value().parts[d]
                        m[...] = c.beta1 * m + (1 - c.beta1) * g
                        v[...] = c.beta2 * v + (1 - c.beta2) * g * g
                        mh, vh = m / (1 - c.beta1 ** self.steps), v / (1 - c.beta2 ** self.steps)
                        w = (self.state["master_weights"][k].get_value().parts[d] if full_precision
                             else t.get_value().parts[d].copy())
                        w[...] = w - c.lr * (mh / (np.sqrt(vh) + c.epsilon) + c.weight_decay * w)
                        if full_precision or not c.stochastic_rounding:
                            t.get_value().parts[d] = bf16(w)
                        else:  # dither below the bf16 ulp, then truncate: unbiased in expectation
                            u = w.view(np.uint32) + self.rng.integers(0, 1 << 16, w.shape, dtype=np.uint32)
                            t.get_value().parts[d] = (u & 0xFFFF0000).astype(np.uint32).view(np.float32)

            def get_state_dict(self):
                return {**self.state, "steps": self.steps}

            def set_state_dict(self, d):
                self.steps = int(d["steps"])
        return Opt

    @dataclasses.dataclass
    class AdamWConfig:
        lr: float = 1e-3
        beta1: float = 0.9
        beta2: float = 0.999
        epsilon: float = 1e-8
        weight_decay: float = 0.01
        amsgrad: bool = False
        stochastic_rounding: bool = False

        @staticmethod
        def make(lr, beta1, beta2, epsilon, weight_decay, amsgrad=False, stochastic_rounding=False):
            return AdamWConfig(lr, beta1, beta2, epsilon, weight_decay, amsgrad, stochastic_rounding)

    class AdamWFullPrecisionConfig:
        @staticmethod
        def make(lr, beta1, beta2, epsilon, weight_decay, amsgrad=False):
            return AdamWConfig(lr, beta1, beta2, epsilon, weight_decay, amsgrad, False)

    mod.autograd = ns(AutoContext=AutoContext, Tensor=Tensor, GradMode=GradMode,
                      DistributedConfig=lambda enable_ddp=False, enable_tp=False: ns(ddp=enable_ddp, tp=enable_tp))
    mod.core = ns(clip_grad_norm=clip_grad_norm, distributed=ns(
        enable_fabric=enable_fabric, synchronize_gradients=synchronize_gradients,
        shard_tensor_to_mesh_mapper=lambda device, dim, cluster_axis=None: ("shard", dim),
        concat_mesh_to_tensor_composer=lambda mesh_device, dim: ("concat", dim)))
    mod.models = ns(RunnerType=ns(Default="Default", MemoryEfficient="MemoryEfficient"),
                    WeightTyingType=ns(Disabled="Disabled", Enabled="Enabled"),
                    nanogpt=ns(NanoGPTConfig=NanoGPTConfig, NanoGPT=NanoGPT, create_nanogpt=NanoGPT))
    mod.ops = ns(ReduceType=ReduceType, binary=ns(mul=mul), loss=ns(cross_entropy_loss=cross_entropy_loss))
    mod.optimizers = ns(AdamW=adamw_factory(False), AdamWFullPrecision=adamw_factory(True), AdamWConfig=AdamWConfig,
                        AdamWFullPrecisionConfig=AdamWFullPrecisionConfig)
    mod._state = st
    return mod


def make_fake_tt_train():
    """A fresh (ttml, ttnn) pair without the install layout, for tests of the backend itself."""
    return populate(types.ModuleType("ttml")), make_ttnn()
