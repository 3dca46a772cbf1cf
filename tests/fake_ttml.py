"""A stand-in for TT-Train's `ttml` and the parts of tt-metal's `ttnn` that main.py calls, for ONE build: tt-metal
00cb91b3141186a0769ac82c74fdc52d98bbd45d. Names are spelled as its nanobind bindings and ttml/models/nanogpt spell
them. The numerics are a real causal GPT computed with torch on the CPU; the rules are the pin's, each with the source
it comes from (paths under tt-train/sources/ttml/; versions and ids as in ../shared/reports/tt-audit-00cb91b.md).
Where the source leaves a rule open, the stand-in takes the stricter reading and says so ("open:").

Passing tests show that main.py drives these rules; they are not evidence that the backend works on hardware.
"""

import dataclasses
import os
import types

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

COMMIT = "00cb91b3141186a0769ac82c74fdc52d98bbd45d"
_STATE = {}


def bf16(a):
    """Round float32 to the nearest bfloat16 (ties to even), kept as float32."""
    return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(torch.bfloat16).float().numpy()


def lay_out_tt_metal(root, build="build"):
    """A $TT_METAL_HOME as `./build_metal.sh --build-tt-train` leaves it at the pin, plus the python_env's ttnn:
    _ttml in build/tt-train/sources/ttml, the ttml package in tt-train/sources/ttml/ttml (its __init__ does
    `from . import _ttml` and searches no build folder), and ttnn importable from the root (PYTHONPATH=<root>)."""
    so_dir = os.path.join(root, build, "tt-train", "sources", "ttml")
    pkg = os.path.join(root, "tt-train", "sources", "ttml", "ttml")
    for d in (so_dir, pkg, os.path.join(root, "ttnn"), os.path.join(root, "build", "lib")):
        os.makedirs(d, exist_ok=True)
    files = {
        os.path.join(so_dir, "_ttml.py"): "import sys, fake_ttml\nfake_ttml.populate(sys.modules[__name__])\n",
        os.path.join(pkg, "__init__.py"): "from . import _ttml\nfrom ._ttml import *  # noqa\n",
        os.path.join(
            root, "ttnn", "__init__.py"
        ): "import sys, fake_ttml\nfake_ttml.fill_ttnn(sys.modules[__name__])\n",
    }
    for path, text in files.items():
        with open(path, "w") as f:
            f.write(text)
    return root


class Layout:
    ROW_MAJOR, TILE = "ROW_MAJOR", "TILE"


class DataType:
    UINT32, INT32, BFLOAT16, FLOAT32 = "UINT32", "INT32", "BFLOAT16", "FLOAT32"


class DeviceTensor:
    """Stands for a ttnn.Tensor on a mesh: one numpy array per device (float32 arrays hold bf16 values exactly)."""

    def __init__(self, parts, dtype, layout=Layout.TILE):
        self.parts, self.dtype, self.layout = parts, dtype, layout

    @property
    def shape(self):
        return tuple(self.parts[0].shape)


def typecast(v, dtype):
    """ttnn.typecast: a new device tensor; fp32 -> bf16 rounds to nearest."""
    parts = [bf16(p) if dtype == DataType.BFLOAT16 else p.astype(np.float32) for p in v.parts]
    return DeviceTensor(parts, dtype, v.layout)


def _ttnn_slice(t, starts, ends):
    idx = tuple(slice(s, e) for s, e in zip(starts, ends, strict=True))
    return DeviceTensor([p[idx].copy() for p in t.parts], t.dtype, t.layout)


def fill_ttnn(mod):
    device = types.SimpleNamespace(is_blackhole=lambda d: d.arch == "blackhole")
    for k, v in dict(
        Layout=Layout,
        DataType=DataType,
        slice=_ttnn_slice,
        typecast=typecast,
        device=device,
        bfloat16=DataType.BFLOAT16,
    ).items():
        setattr(mod, k, v)
    return mod


def make_ttnn():
    return fill_ttnn(types.ModuleType("ttnn"))


class NamedParameters:
    """serialization::NamedParameters, bound opaque (NB_MAKE_OPAQUE, nanobind/nb_optimizers.cpp:16): a map from
    name to the SAME tensor objects, not a Python dict. A dict converts implicitly where one is expected
    (ttml/common/muon_optimizer.py passes plain dicts of tensors to the optimizers)."""

    def __init__(self, items=()):
        self._d = dict(items.items() if hasattr(items, "items") else items)

    def items(self):
        return self._d.items()

    def keys(self):
        return self._d.keys()

    def values(self):
        return self._d.values()

    def __getitem__(self, k):
        return self._d[k]

    def __setitem__(self, k, v):
        self._d[k] = v

    def __contains__(self, k):
        return k in self._d

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)


def _variant_alternative(v):
    """Which alternative of serialization::ValueType (serialization/flatbuffer_file.hpp: bool, char, int, float,
    double, uint32_t, size_t, ...) nanobind's variant caster picks for a Python value: the first that takes it
    without conversion. A Python int lands in `int` whenever it fits."""
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        if -(2**31) <= v < 2**31:
            return "int"
        return "uint32_t" if 0 <= v < 2**32 else "size_t"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "std::string"
    raise TypeError(f"incompatible function arguments: {type(v).__name__} is no SerializableType")


def _get_value_type(d, key, want):
    """serialization::get_value_type<T>(dict, key). Open: the AI ULC versions of serialization/serializable.hpp
    (ids 3719997910, 42976184674) do `std::get<T>`, exact; a USA version (id 54930470092, before or after the pin)
    widens between integer types. The stand-in takes the exact one: a Python int is never a size_t."""
    held = _variant_alternative(d[key])
    if held != want:
        raise RuntimeError("std::bad_variant_access")
    return d[key]


def populate(mod):
    """Fill a module object with this build's ttml names (what NB_MODULE(_ttml) and the ttml package register)."""
    st = types.SimpleNamespace(
        mesh=None, grad=True, graph_live=False, tape=[], mgd_shape=None, seed=0, draws=0, pctx=None
    )
    _STATE["st"] = st
    ns = types.SimpleNamespace

    def devices():
        if st.mesh is None:  # autograd/auto_context.cpp: get_device() opens a 1x1 mesh when none is open
            st.mesh = [1, 1]
        return st.mesh[0] * st.mesh[1]

    class PreferredPrecision:
        HALF, FULL = "HALF", "FULL"

    class GradMode:
        ENABLED, DISABLED = "ENABLED", "DISABLED"

    class Tensor:
        """autograd::Tensor over a LAZY AutocastTensor (autograd/autocast_tensor.cpp, id 52583914104): set_value
        keeps only the value's own precision; the other view is a typecast made on first read and then cached,
        and nothing refreshes it when the native view changes in place."""

        def __init__(self, value=None, requires_grad=True):
            self._half = self._full = None
            self.grad, self._requires_grad, self._torch = None, requires_grad, None
            if value is not None:
                self.set_value(value)

        def set_value(self, value):
            if value.dtype == DataType.FLOAT32:
                self._full, self._half = value, None
            elif value.dtype == DataType.BFLOAT16:
                self._half, self._full = value, None
            else:  # integer ids: one view
                self._half = self._full = value

        def get_value(self, precision=PreferredPrecision.HALF):  # nanobind/nb_autograd.cpp:78-82: HALF by default
            if precision == PreferredPrecision.HALF:
                if self._half is None:
                    self._half = typecast(self._full, DataType.BFLOAT16)
                return self._half
            if self._full is None:
                self._full = typecast(self._half, DataType.FLOAT32)
            return self._full

        def assign(self, other):  # nb_autograd.cpp:103-106: self->set_value(other->get_value()), so through HALF
            self.set_value(other.get_value())

        @staticmethod
        def from_numpy(a, layout=Layout.TILE, new_type=None, mapper=None):
            a = np.asarray(a)
            if a.dtype not in (np.float32, np.int32, np.uint32):
                raise TypeError(f"Unsupported precision: {a.dtype}")
            n = devices()
            if mapper is not None:
                if a.shape[0] % n:
                    raise RuntimeError(f"shard_tensor_to_mesh_mapper: dim 0 ({a.shape[0]}) does not divide by {n}")
                parts = [p.copy() for p in np.split(a, n)]
            else:
                parts = [a.copy() for _ in range(n)]
            dtype = new_type or {np.dtype(np.float32): "FLOAT32", np.dtype(np.int32): "INT32"}.get(a.dtype, "UINT32")
            if dtype in (DataType.BFLOAT16, DataType.FLOAT32):
                parts = [bf16(p) if dtype == DataType.BFLOAT16 else p.astype(np.float32) for p in parts]
            return Tensor(DeviceTensor(parts, dtype, layout))

        def to_numpy(self, new_type=None, composer=None):  # nb_autograd.cpp:136-146: reads get_value(FULL)
            parts = self.get_value(PreferredPrecision.FULL).parts
            if len(parts) > 1 and composer != ("concat", 0):
                raise RuntimeError("reading a tensor on a mesh needs concat_mesh_to_tensor_composer")
            v = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
            return v.astype(np.float32) if new_type == DataType.FLOAT32 else v

        def shape(self):  # the per-device shape
            return list((self._full if self._half is None else self._half).shape)

        def dtype(self):  # nb_autograd.cpp:162-165: get_value(FULL).dtype(), so FLOAT32 for a bf16 parameter too
            return self.get_value(PreferredPrecision.FULL).dtype

        def is_grad_initialized(self):
            return self.grad is not None

        def backward(self, retain_graph):  # the argument is required (nb_autograd.cpp:99-100)
            if not st.grad or self._torch is None:
                raise RuntimeError("backward: no graph (gradients were disabled during the forward)")
            torch.autograd.backward(self._torch, [torch.ones_like(t) for t in self._torch], retain_graph=retain_graph)
            for param, d, leaf in st.tape:  # gradients are bf16 and add up (Tensor::add_grad)
                if leaf.grad is None:
                    continue
                g = leaf.grad.numpy()
                grads = param.grad or [np.zeros(param.shape(), np.float32) for _ in range(devices())]
                grads[d] = bf16(grads[d] + g)
                param.grad = grads
                leaf.grad = None

    def _result(values, torch_parts, dtype=DataType.BFLOAT16):
        out = Tensor(DeviceTensor(values, dtype))
        out._torch = torch_parts if st.grad else None
        return out

    class AutoContext:
        _inst = None

        @classmethod
        def get_instance(cls):
            cls._inst = cls._inst or cls()
            return cls._inst

        def open_device(self, mesh_shape=None, device_ids=None):  # nb_autograd.cpp: a list/tuple of 2 ints
            shape = [1, 1] if mesh_shape is None else list(mesh_shape)
            if len(shape) != 2:
                raise RuntimeError("mesh_shape must be a list/tuple of 2 integers: [rows, cols]")
            if st.mesh is not None:
                raise RuntimeError("device already opened")
            if shape[0] * shape[1] > 1 and st.mgd_shape != shape:
                raise RuntimeError(f"mesh shape {shape} does not match the mesh graph descriptor {st.mgd_shape}")
            st.mesh = shape

        def get_device(self):
            devices()
            return ns(arch="wormhole_b0", compute_with_storage_grid_size=lambda: ns(x=8, y=8))

        def close_device(self):
            st.mesh, st.pctx = None, None

        def set_seed(self, s):
            st.seed, st.draws = int(s), 0

        def get_seed(self):
            return st.seed

        def reset_graph(self):
            st.graph_live, st.tape = False, []

        def set_gradient_mode(self, mode):
            st.grad = mode == GradMode.ENABLED

        def get_gradient_mode(self):
            return GradMode.ENABLED if st.grad else GradMode.DISABLED

        def initialize_parallelism_context(self, cfg):
            st.pctx = cfg

        def is_parallelism_context_initialized(self):
            return st.pctx is not None

    def enable_fabric(n):
        """nb_core: ttnn_fixed::distributed::enable_fabric. Needs the runtime root (or a descriptor) and picks the
        default descriptor by device count: T3K [2, 4] for 8, a single Galaxy [4, 8] for 32."""
        mgd = os.environ.get("TT_MESH_GRAPH_DESC_PATH")
        if not mgd:
            if not os.environ.get("TT_METAL_RUNTIME_ROOT"):
                raise RuntimeError("TT_METAL_RUNTIME_ROOT is not set")
            st.mgd_shape = {8: [2, 4], 32: [4, 8]}.get(n, [1, n])
        else:
            st.mgd_shape = [1, 8] if "1x8" in mgd else [2, 4] if "t3k" in mgd else [1, n]

    def _average(params, groups):
        for t in params.values():
            if t.grad is not None:
                for group in groups:
                    mean = bf16(sum(t.grad[d].astype(np.float64) for d in group) / len(group))
                    for d in group:
                        t.grad[d] = mean.copy()

    def synchronize_gradients(params, cluster_axes=None):
        """core/distributed/distributed.cpp@01c8afe, both overloads (nb_core id 54524245037). (params): the
        parallelism context's DDP axis, a silent no-op without a context. (params, axes): all_reduce over the
        listed mesh axes, a no-op when their total size is 1."""
        params = NamedParameters(params)
        rows, cols = st.mesh or [1, 1]
        if cluster_axes is None:
            if st.pctx is None or not st.pctx.enable_ddp:
                return
            cluster_axes = [1]  # DDP on the [1, N] mesh's long axis
        axes = set(cluster_axes)
        if np.prod([[rows, cols][a] for a in axes]) == 1:
            return
        if axes == {1}:
            groups = [[r * cols + c for c in range(cols)] for r in range(rows)]
        elif axes == {0}:
            groups = [[r * cols + c for r in range(rows)] for c in range(cols)]
        else:
            groups = [list(range(rows * cols))]
        _average(params, groups)

    def clip_grad_norm(params, max_norm, p_norm_type=2.0, error_if_nonfinite=False):
        """nb_core: returns the norm as a tensor; each device clips its own gradients."""
        params, norms = NamedParameters(params), []
        for d in range(devices()):
            gs = [t.grad[d] for t in params.values() if t.grad is not None]
            norm = float(np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in gs)))
            for t in params.values():
                if t.grad is not None:
                    t.grad[d] = bf16(t.grad[d] * min(1.0, max_norm / (norm + 1e-6)))
            norms.append(np.full((1, 1, 1, 1), norm, np.float32))
        return Tensor(DeviceTensor(norms, DataType.FLOAT32), False)

    class RunnerType:
        Default, MemoryEfficient = "Default", "MemoryEfficient"

    class WeightTyingType:
        Disabled, Enabled = "Disabled", "Enabled"

    @dataclasses.dataclass
    class NanoGPTExperimentalConfig:
        use_composite_layernorm: bool = False

    @dataclasses.dataclass
    class NanoGPTConfig:  # ttml/models/nanogpt/__init__.py (id 51770522584)
        vocab_size: int = 50304
        block_size: int = 1024
        n_embd: int = 768
        n_layer: int = 12
        n_head: int = 12
        dropout: float = 0.2
        bias: bool = True
        runner_type: str = RunnerType.Default
        weight_tying: str = WeightTyingType.Disabled
        positional_embedding_type: str = "trainable"
        experimental: NanoGPTExperimentalConfig = dataclasses.field(default_factory=NanoGPTExperimentalConfig)

    def _block_tree(i, c, bias):
        """GPTBlock's parameters (nanogpt/gpt_block.py, multi_head_attention.py, gpt_mlp.py; names as
        nanogpt/safetensors_loader.py@01cac67 maps GPT-2's keys): Linear weights [1, 1, out, in], row vectors
        [1, 1, 1, n] for biases and LayerNorm gains."""
        p = f"NanoGPT/blocks/{i}/"
        tree = {
            p + "ln1/gamma": ("ones", c),
            p + "attention/qkv_linear/weight": ("normal", 3 * c, c),
            p + "attention/qkv_linear/bias": ("zeros", 3 * c),
            p + "attention/out_linear/weight": ("normal", c, c),
            p + "attention/out_linear/bias": ("zeros", c),
            p + "ln2/gamma": ("ones", c),
            p + "mlp/fc1/weight": ("normal", 4 * c, c),
            p + "mlp/fc1/bias": ("zeros", 4 * c),
            p + "mlp/fc2/weight": ("normal", c, 4 * c),
            p + "mlp/fc2/bias": ("zeros", c),
        }
        if bias:
            tree.update({p + "ln1/beta": ("zeros", c), p + "ln2/beta": ("zeros", c)})
        return tree

    class NanoGPT:
        """ttml/models/nanogpt NanoGPT: fc (the LM head, no bias), tok_emb (tied to fc's tensor when weight_tying
        is Enabled, so parameters() lists it once, as NanoGPT/fc/weight), trainable pos_emb, blocks, final LayerNorm.
        Init ttml.init.normal(0, 0.02), zero biases, unit gains. Open (audit row 17): whether every device of a mesh
        draws the same init; the stand-in takes the stricter reading, each device draws its own."""

        def __init__(self, cfg):
            c, v32 = cfg.n_embd, (cfg.vocab_size + 31) // 32 * 32
            tree = {"NanoGPT/fc/weight": ("normal", cfg.vocab_size, c)}
            if cfg.weight_tying != WeightTyingType.Enabled:
                tree["NanoGPT/tok_emb/weight"] = ("normal", v32, c)
            tree["NanoGPT/pos_emb/weight"] = ("normal", cfg.block_size, c)
            for i in range(cfg.n_layer):
                tree.update(_block_tree(i, c, cfg.bias))
            tree["NanoGPT/ln_f_gamma"] = ("ones", c)
            if cfg.bias:
                tree["NanoGPT/ln_f_beta"] = ("zeros", c)
            n = devices()
            rngs = [np.random.default_rng([st.seed, d]) for d in range(n)]
            self._params = {}
            for name, (kind, *shape) in tree.items():
                shape = [1, 1, *shape] if len(shape) == 2 else [1, 1, 1, *shape]
                make = {
                    "ones": lambda r, shape: np.ones(shape, np.float32),
                    "zeros": lambda r, shape: np.zeros(shape, np.float32),
                    "normal": lambda r, shape: (r.standard_normal(shape) * 0.02).astype(np.float32),
                }[kind]
                self._params[name] = Tensor(DeviceTensor([bf16(make(r, shape)) for r in rngs], DataType.BFLOAT16))
            self.cfg, self.mode = cfg, "train"

        def parameters(self):
            return NamedParameters(self._params)

        def train(self):
            self.mode = "train"

        def eval(self):
            self.mode = "eval"

        def get_run_mode(self):
            return self.mode

        def _dropout(self, x):
            if self.mode != "train" or self.cfg.dropout <= 0:
                return x
            g = torch.Generator().manual_seed(st.seed * 1_000_003 + st.draws)  # the context's generator
            st.draws += 1
            keep = torch.rand(x.shape, generator=g) >= self.cfg.dropout
            return x * keep / (1 - self.cfg.dropout)

        def _block(self, i, x, w):
            """Pre-LayerNorm block; mask=None is the fused SDPA kernel's causal mode (train_nanogpt.py@00cb91b)."""
            p, c, h = f"NanoGPT/blocks/{i}/", self.cfg.n_embd, self.cfg.n_head
            B, T, _ = x.shape

            def ln(t, name):
                beta = w.get(p + name + "/beta")
                return F.layer_norm(
                    t, (c,), w[p + name + "/gamma"].view(c), None if beta is None else beta.view(c), eps=1e-5
                )

            def lin(t, name):
                W = w[p + name + "/weight"]
                return t @ W.view(W.shape[-2], W.shape[-1]).T + w[p + name + "/bias"].view(-1)

            q, k, v = lin(ln(x, "ln1"), "attention/qkv_linear").split(c, dim=-1)
            q, k, v = (t.view(B, T, h, c // h).transpose(1, 2) for t in (q, k, v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, c)
            x = x + self._dropout(lin(a, "attention/out_linear"))
            m = lin(F.gelu(lin(ln(x, "ln2"), "mlp/fc1"), approximate="tanh"), "mlp/fc2")
            return x + self._dropout(m)

        def __call__(self, idx, mask=None):
            if st.grad and st.graph_live:
                raise RuntimeError("forward on a live graph: reset_graph() after the last backward")
            if mask is not None:
                raise NotImplementedError("the stand-in runs the causal (mask=None) SDPA path only")
            T = idx.shape()[-1]
            if self.cfg.block_size != T:
                raise RuntimeError(f"the model takes exactly block_size={self.cfg.block_size} tokens, not {T}")
            c, outs, values = self.cfg.n_embd, [], []
            tied = "NanoGPT/tok_emb/weight" not in self._params
            for d, ids in enumerate(idx.get_value().parts):
                ids = torch.from_numpy(ids.reshape(ids.shape[0], T).astype(np.int64))
                w = {}
                for name, t in self._params.items():
                    leaf = torch.from_numpy(t.get_value().parts[d].copy()).requires_grad_(st.grad)
                    w[name] = leaf
                    if st.grad:
                        st.tape.append((t, d, leaf))
                E = w["NanoGPT/fc/weight"].view(-1, c)
                tok = (E if tied else w["NanoGPT/tok_emb/weight"].view(-1, c))[ids]
                x = self._dropout(tok + w["NanoGPT/pos_emb/weight"].view(-1, c)[:T])
                for i in range(self.cfg.n_layer):
                    if self.cfg.runner_type == RunnerType.MemoryEfficient and st.grad:  # recompute in backward
                        x = torch.utils.checkpoint.checkpoint(self._block, i, x, w, use_reentrant=False)
                    else:
                        x = self._block(i, x, w)
                x = F.layer_norm(
                    x,
                    (c,),
                    w["NanoGPT/ln_f_gamma"].view(c),
                    w["NanoGPT/ln_f_beta"].view(c) if "NanoGPT/ln_f_beta" in w else None,
                    eps=1e-5,
                )
                logits = (x @ E.T)[:, None]  # [B, 1, T, V]
                outs.append(logits)
                values.append(bf16(logits.detach().numpy()))
            st.graph_live = st.grad
            return _result(values, outs)

    def memory_efficient_runner(block, x, mask):
        raise NotImplementedError("main.py reaches the runner through NanoGPTConfig.runner_type")

    def cross_entropy_loss(logits, target, reduce):
        if reduce != ReduceType.MEAN:
            raise NotImplementedError
        outs = []
        for lg, y in zip(
            logits._torch or [torch.from_numpy(p) for p in logits.get_value().parts],
            target.get_value().parts,
            strict=True,
        ):
            V = lg.shape[-1]
            outs.append(
                F.cross_entropy(lg.reshape(-1, V), torch.from_numpy(y.astype(np.int64)).reshape(-1)).reshape(1, 1, 1, 1)
            )
        return _result([o.detach().numpy().astype(np.float32) for o in outs], outs, DataType.FLOAT32)

    def mul(t, s):
        outs = [p * s for p in t._torch] if t._torch is not None else None
        vals = [p * np.float32(s) for p in t.get_value().parts]
        return _result(vals, outs, t.get_value().dtype)

    class ReduceType:
        NONE, MEAN, SUM = "NONE", "MEAN", "SUM"

    class Optimizer:
        """OptimizerBase as bound at nb_optimizers.cpp@04087d1: zero_grad, step, get_state_dict, set_state_dict,
        get_lr, set_lr (no set_steps, no beta setters). step() counts first and then skips every parameter whose
        gradient was never initialized (optimizers/adamw.cpp, adamw_full_precision.cpp); zero_grad leaves zeros."""

        full_precision = False

        def __init__(self, parameters, cfg):
            self.params, self.cfg = NamedParameters(parameters), cfg
            self.steps, self.b1pow, self.b2pow = 0, np.float32(1.0), np.float32(1.0)
            keep = DataType.FLOAT32 if self.full_precision else DataType.BFLOAT16
            view = PreferredPrecision.FULL if self.full_precision else PreferredPrecision.HALF

            def zeros(t):
                return Tensor(DeviceTensor([np.zeros_like(p) for p in t.get_value(view).parts], keep), False)

            self.exp_avg = NamedParameters({k: zeros(t) for k, t in self.params.items()})
            self.exp_avg_sq = NamedParameters({k: zeros(t) for k, t in self.params.items()})
            if self.full_precision:  # adamw_full_precision.cpp:21-47: fp32 copies of the weights, taken now
                self.master = NamedParameters(
                    {
                        k: Tensor(typecast(t.get_value(PreferredPrecision.FULL), keep), False)
                        for k, t in self.params.items()
                    }
                )

        def zero_grad(self):
            for t in self.params.values():
                if t.grad is not None:
                    t.grad = [np.zeros_like(g) for g in t.grad]

        def set_lr(self, lr):
            self.cfg = dataclasses.replace(self.cfg, lr=float(np.float32(lr)))

        def get_lr(self):
            return self.cfg.lr

        def step(self):
            c = self.cfg
            self.steps += 1
            self.b1pow, self.b2pow = (
                np.float32(self.b1pow * np.float32(c.beta1)),
                np.float32(self.b2pow * np.float32(c.beta2)),
            )
            f32 = np.float32
            step_size = f32(c.lr) / (f32(1) - self.b1pow)
            inv_sqrt_bc2 = f32(1) / np.sqrt(f32(1) - self.b2pow)
            decay = f32(1) - f32(c.lr) * f32(c.weight_decay)
            for k, t in self.params.items():
                if t.grad is None:
                    continue
                view = PreferredPrecision.FULL if self.full_precision else PreferredPrecision.HALF
                w_dev = (self.master[k] if self.full_precision else t).get_value(view)
                m_dev, v_dev = self.exp_avg[k].get_value(view), self.exp_avg_sq[k].get_value(view)
                for d, g in enumerate(t.grad):
                    m = f32(c.beta1) * m_dev.parts[d] + f32(1 - c.beta1) * g
                    v = f32(c.beta2) * v_dev.parts[d] + f32(1 - c.beta2) * g * g
                    w = w_dev.parts[d] * decay - step_size * m / (np.sqrt(v) * inv_sqrt_bc2 + f32(c.epsilon))
                    w, m, v = w.astype(np.float32), m.astype(np.float32), v.astype(np.float32)
                    if self.full_precision:
                        w_dev.parts[d][...], m_dev.parts[d][...], v_dev.parts[d][...] = w, m, v
                    else:  # the fused kernel writes the HALF views in place: a cached FULL view goes stale (#41657)
                        w_dev.parts[d][...] = self._round(w)
                        m_dev.parts[d][...], v_dev.parts[d][...] = bf16(m), bf16(v)
                if self.full_precision:  # adamw_full_precision.cpp:99-100
                    t.set_value(typecast(w_dev, DataType.BFLOAT16))

        def _round(self, w):
            if not self.cfg.stochastic_rounding:
                return bf16(w)
            # adamw_program_factory.cpp (AI ULC): per-core seeds from std::random_device, so no two runs round alike
            noise = np.frombuffer(os.urandom(4 * w.size), np.uint32).reshape(w.shape) >> 16
            return ((w.view(np.uint32) + noise) & 0xFFFF0000).astype(np.uint32).view(np.float32)

        def get_state_dict(self):
            d = {"steps": self.steps, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "amsgrad": False}
            if self.full_precision:
                d["master_weights"] = self.master
            return d

        def set_state_dict(self, d):
            self.steps = _get_value_type(d, "steps", "size_t")
            self.b1pow, self.b2pow = np.float32(self.cfg.beta1**self.steps), np.float32(self.cfg.beta2**self.steps)
            for key in ("exp_avg", "exp_avg_sq") + (("master_weights",) if self.full_precision else ()):
                if not isinstance(d[key], (NamedParameters, dict)):
                    raise TypeError(f"set_state_dict: {key} is no NamedParameters")
                setattr(self, {"master_weights": "master"}.get(key, key), NamedParameters(d[key]))

    class AdamW(Optimizer):
        pass

    class AdamWFullPrecision(Optimizer):
        full_precision = True

    def newtonschulz5(v, steps, eps):
        """ops/newton_schulz_op.cpp:13-53 (6d1aca4, AI ULC): X / (||X||_F + eps) over the last two dims, transposed
        while rows > cols, then `steps` times X <- aX + (bA + cA^2)X with A = XX^T, (a, b, c) = (3.4445, -4.7750,
        2.0315). Computed in float32; open: a bf16 input's intermediate roundings, here only its result is bf16."""
        a, b, c, out = np.float32(3.4445), np.float32(-4.7750), np.float32(2.0315), []
        for p in v.parts:
            X = p / (np.sqrt(np.square(p).sum(axis=(-2, -1), keepdims=True)) + np.float32(eps))
            tall = X.shape[-2] > X.shape[-1]
            X = X.swapaxes(-2, -1) if tall else X
            for _ in range(steps):
                A = X @ X.swapaxes(-2, -1)
                X = a * X + (b * A + c * (A @ A)) @ X
            X = (X.swapaxes(-2, -1) if tall else X).astype(np.float32)
            out.append(bf16(X) if v.dtype == DataType.BFLOAT16 else X)
        return DeviceTensor(out, v.dtype)

    class Muon(Optimizer):
        """optimizers/muon.cpp@c2c358f (AI ULC), bound at nb_optimizers.cpp@04087d1:273-277: a momentum buffer per
        parameter and Newton-Schulz on the last two dims; no weight decay, no nesterov, no per-shape lr scale.
        zero_grad, set_lr and get_lr as OptimizerBase's. Open: ttnn's binary ops return the first operand's dtype,
        so the buffer is bf16 after the first step (the gradient itself) and fp32 after later ones, and the
        parameter fp32 after every step (set_value of FULL - lr * update)."""

        def __init__(self, parameters, cfg):  # :18-29: fp32 zero buffers shaped like the FULL view
            self.params, self.cfg, self.steps = NamedParameters(parameters), cfg, 0
            full = {k: t.get_value(PreferredPrecision.FULL).parts for k, t in self.params.items()}
            self.momentum_buffer = NamedParameters(
                {
                    k: Tensor(DeviceTensor([np.zeros_like(p) for p in v], DataType.FLOAT32), False)
                    for k, v in full.items()
                }
            )

        def step(self):  # :39-68
            c, f32 = self.cfg, np.float32
            for k, buf in self.momentum_buffer.items():
                t = self.params[k]
                if t.grad is None:  # :47-49
                    continue
                grad = DeviceTensor([g.copy() for g in t.grad], DataType.BFLOAT16)
                if self.steps > 0 and c.momentum != 0.0:  # :53-58: the first step takes the gradient as it is
                    old = buf.get_value(PreferredPrecision.FULL).parts
                    grad = DeviceTensor(
                        [o * f32(c.momentum) + g for o, g in zip(old, grad.parts, strict=True)], DataType.FLOAT32
                    )
                buf.set_value(grad)  # :60
                update = newtonschulz5(grad, c.ns_steps, 1e-7)  # :62
                w = t.get_value(PreferredPrecision.FULL).parts  # :64-65
                t.set_value(
                    DeviceTensor([p - u * f32(c.lr) for p, u in zip(w, update.parts, strict=True)], DataType.FLOAT32)
                )
            self.steps += 1  # :67, also when no parameter had a gradient

        def get_state_dict(self):  # :70-75
            return {"momentum_buffer": self.momentum_buffer, "steps": self.steps}

        def set_state_dict(self, d):  # :77-80
            self.momentum_buffer = NamedParameters(d["momentum_buffer"])
            self.steps = _get_value_type(d, "steps", "size_t")

    @dataclasses.dataclass
    class MuonConfig:  # optimizers/muon.hpp@26d38dc; make() at nb_optimizers.cpp@04087d1:259-271
        lr: float = 1e-3
        momentum: float = 0.95
        ns_steps: int = 5

        @staticmethod
        def make(lr=1e-3, momentum=0.95, ns_steps=5):
            return MuonConfig(float(np.float32(lr)), float(np.float32(momentum)), int(ns_steps))

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
            if amsgrad:
                raise NotImplementedError("the stand-in has no amsgrad")
            return AdamWConfig(lr, beta1, beta2, epsilon, weight_decay, amsgrad, stochastic_rounding)

    class AdamWFullPrecisionConfig:
        @staticmethod
        def make(lr, beta1, beta2, epsilon, weight_decay, amsgrad=False):
            return AdamWConfig.make(lr, beta1, beta2, epsilon, weight_decay, amsgrad)

    @dataclasses.dataclass
    class DistributedConfig:
        enable_ddp: bool = False
        enable_tp: bool = False

    mod.NamedParameters = NamedParameters
    mod.autograd = ns(
        AutoContext=AutoContext,
        Tensor=Tensor,
        GradMode=GradMode,
        PreferredPrecision=PreferredPrecision,
        DistributedConfig=DistributedConfig,
    )
    mod.core = ns(
        clip_grad_norm=clip_grad_norm,
        distributed=ns(
            enable_fabric=enable_fabric,
            synchronize_gradients=synchronize_gradients,
            shard_tensor_to_mesh_mapper=lambda device, dim, cluster_axis=None: ("shard", dim),
            concat_mesh_to_tensor_composer=lambda mesh_device, dim: ("concat", dim),
        ),
    )
    mod.models = ns(
        RunnerType=RunnerType,
        WeightTyingType=WeightTyingType,
        memory_efficient_runner=memory_efficient_runner,
        nanogpt=ns(
            NanoGPTConfig=NanoGPTConfig,
            NanoGPTExperimentalConfig=NanoGPTExperimentalConfig,
            NanoGPT=NanoGPT,
            create_nanogpt=NanoGPT,
        ),
    )
    mod.ops = ns(ReduceType=ReduceType, binary=ns(mul=mul), loss=ns(cross_entropy_loss=cross_entropy_loss))
    mod.optimizers = ns(
        OptimizerBase=Optimizer,
        AdamW=AdamW,
        AdamWFullPrecision=AdamWFullPrecision,
        AdamWConfig=AdamWConfig,
        AdamWFullPrecisionConfig=AdamWFullPrecisionConfig,
        Muon=Muon,
        MuonConfig=MuonConfig,
    )
    mod._state = st
    return mod


def make_fake_tt_train():
    """A fresh (ttml, ttnn) pair without the install layout, for tests of the backend itself."""
    return populate(types.ModuleType("ttml")), make_ttnn()
