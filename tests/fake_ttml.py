"""A small STAND-IN for TT-Train's `ttml` module and the parts of tt-metal's `ttnn` that main.py uses.

It offers only the names main.TtmlBackend calls, spelled as tt-train's nanobind bindings spell them (digested in
shared/ttml_api.md; every ttml name it exposes must be in tests/data/ttml_names.txt, which a test checks). Instead of
recording calls it models the behaviour the glue depends on, with toy numbers:

  * every device tensor holds one array per device of the open mesh: sharded along dim 0 when a mapper is given,
    otherwise one copy each; reading a mesh tensor back needs the concat composer;
  * backward adds, on each device, loss_scale x (the mean token id of that device's shard) to every weight's
    gradient, so the devices' gradients differ whenever their shards do;
  * synchronize_gradients averages them over the devices only as core/distributed/distributed.cpp @01c8afe does:
    with explicit cluster axes (nanobind/nb_core.cpp @01b9eef), or with none once initialize_parallelism_context ran
    (DDP on the long axis of a [1, N] mesh, autograd/auto_context.cpp @013f857); otherwise it returns at once;
  * step() moves each device's weights by its own gradient (first moment 0.9 m + 0.1 g, then w -= lr x m) and logs
    the backward passes since zero_grad and the lr, so tests can check each accumulation window;
  * training losses count 1, 2, 3, ...; eval losses are EVAL_LOSS; the "logits" after token id rank id + 1 first,
    then id + 2, id + 3, ... (wrapping around the real vocabulary), and the padded columns last;
  * sampling: ttnn.argmax/topk/lt/full_like/where and ttml.ops.sample.sample_op act per device with numpy semantics
    (sample_op: Gumbel-max from its seed, the padding mask subtracted, then argmax, as ops/sampling_op.cpp @9ded1a3);
    every device-to-host read is logged with its shape, so tests see how much came back;
  * a few documented rules of the real thing: 32-bit numpy only into from_numpy, backward's retain_graph passed
    explicitly and never with gradients off, reset_graph after each backward, a device opened lazily as 1x1 on first
    use (after which open_device fails), the model taking exactly max_sequence_length tokens.

Build variants (make_fake_tt_train's arguments) stand for tt-train versions: Layout/DataType in ttml or only in ttnn
(ttml/__init__.py @6a66fb2), synchronize_gradients with or without the axes overload (nb_core.cpp @b9dd067), no
parallelism context at all (nb_autograd.cpp @2e72286, where the sync always averages), an AdamW that cannot take
a Python int for its step count (serializable.hpp before @04b3405), and a build without ops.sample.sample_op or
ttnn.topk (sampling_ops=False). padded_columns_win=True plays an untrained model whose padded vocab columns
outscore every real token.

Tests that pass against it show our glue drives that behaviour as intended. They are NOT evidence that the backend
works on Tenstorrent hardware, nor that the real ttml behaves like this stand-in.
"""
import types

import numpy as np

EVAL_LOSS = 4.0
VOCAB = 50257  # GPT-2's; the fake logits wrap token ids around it


def make_fake_tt_train(enums_in_ttml=True, sync_takes_axes=True, parallelism_context=True, int_steps_ok=True,
                       sampling_ops=True, padded_columns_win=False):
    """A fresh (ttml, ttnn) pair. ttml._state holds what tests inspect: devices (mesh size), grad (mode), steps (one
    dict per optimizer step: backwards, lr), pctx (the parallelism config or None) and log (a few notable calls)."""
    st = types.SimpleNamespace(devices=None, grad=None, losses=0, backwards=0, graph_live=False, pctx=None,
                               model=None, steps=[], log=[])
    mesh_device = object()

    def ensure_device():
        if st.devices is None:  # auto_context.cpp: get_device() opens a 1x1 device when none is open
            st.devices = 1
            st.log.append(("lazy_open_1x1",))

    class Layout:
        ROW_MAJOR = "Layout.ROW_MAJOR"
        TILE = "Layout.TILE"

    class DataType:
        UINT32 = "DataType.UINT32"
        BFLOAT16 = "DataType.BFLOAT16"
        FLOAT32 = "DataType.FLOAT32"

    class GradMode:
        ENABLED = "GradMode.ENABLED"
        DISABLED = "GradMode.DISABLED"

    st.grad = GradMode.ENABLED

    class ReduceType:
        MEAN = "ReduceType.MEAN"

    class DeviceTensor:
        """Stands for a ttnn.Tensor: one array per device (a callable defers building big logits until read)."""

        def __init__(self, parts, dtype, sharded=False):
            self._parts, self.dtype, self.sharded = parts, dtype, sharded

        @property
        def parts(self):
            if callable(self._parts):
                self._parts = self._parts()
            return self._parts

    def ttnn_slice(tensor, starts, ends):
        index = tuple(slice(s, e) for s, e in zip(starts, ends))
        return DeviceTensor(lambda: [p[index] for p in tensor.parts], tensor.dtype, tensor.sharded)

    def per_device(fn, *tensors, dtype=None):
        """A ttnn op applied on each device to that device's parts."""
        out = [fn(*parts) for parts in zip(*(t.parts for t in tensors))]
        return DeviceTensor(out, dtype or tensors[0].dtype, tensors[0].sharded)

    def argmax(input_tensor, dim=None, keepdim=False):
        st.log.append(("argmax", dim, keepdim))
        return per_device(lambda p: np.argmax(p, axis=dim, keepdims=keepdim).astype(np.uint32), input_tensor,
                          dtype=DataType.UINT32)

    def topk(input_tensor, k, dim=-1, largest=True, sorted=True):
        assert largest and sorted and k <= input_tensor.parts[0].shape[dim]
        st.log.append(("topk", k, dim))
        order = per_device(lambda p: np.argsort(-p, axis=dim, kind="stable").take(range(k), axis=dim), input_tensor,
                           dtype=DataType.UINT32)
        values = per_device(lambda p, i: np.take_along_axis(p, i.astype(np.int64), axis=dim), input_tensor, order)
        return values, order

    def lt(a, b):
        return per_device(lambda x, y: (x < y).astype(np.float32), a, b)

    def full_like(tensor, fill_value, dtype=None):
        return per_device(lambda p: np.full_like(p, fill_value, dtype=np.float32), tensor, dtype=dtype)

    def where(condition, x, y):
        return per_device(lambda c, a, b: np.where(c != 0, a, b), condition, x, y, dtype=x.dtype)

    class Tensor:
        def __init__(self, value, requires_grad=True):
            self._value, self._grad = value, None
            self._scale, self._signal = 1.0, None  # what backward differentiates: loss_scale, per-device shard mean

        @staticmethod
        def from_numpy(numpy_tensor, layout=Layout.TILE, new_type=None, mapper=None):
            a = np.asarray(numpy_tensor)
            if a.dtype not in (np.float32, np.int32, np.uint32):  # nb_util.cpp takes 32-bit numpy only
                raise TypeError(f"Unsupported precision: {a.dtype}")
            assert layout in (Layout.ROW_MAJOR, Layout.TILE) and new_type in (None, *vars(DataType).values())
            ensure_device()
            if mapper is not None:
                assert mapper == ("shard", 0) and a.shape[0] % st.devices == 0, (mapper, a.shape)
                parts = np.split(a.copy(), st.devices)
            else:
                parts = [a.copy() for _ in range(st.devices)]
            st.log.append(("from_numpy", a.shape, layout, new_type, mapper is not None))
            dtype = new_type or (DataType.FLOAT32 if a.dtype == np.float32 else DataType.UINT32)
            return Tensor(DeviceTensor(parts, dtype, sharded=mapper is not None))

        def to_numpy(self, new_type=None, composer=None):
            parts = self._value.parts
            if len(parts) > 1 and composer != ("concat", 0):  # the stand-in's rule for mesh readbacks
                raise RuntimeError("reading a tensor on a mesh needs concat_mesh_to_tensor_composer")
            v = np.concatenate(parts) if composer else parts[0]
            st.log.append(("to_numpy", v.shape, new_type))
            return v.astype(np.float32) if new_type == DataType.FLOAT32 else v.copy()

        def get_value(self):
            return self._value

        def backward(self, retain_graph):
            assert st.grad == GradMode.ENABLED and not retain_graph, (st.grad, retain_graph)
            for p in st.model._params.values():
                p._grad = [g + self._scale * s for g, s in zip(p._grad, self._signal)]
            st.backwards += 1
            st.graph_live = True

        def dtype(self):
            return self._value.dtype

        def shape(self):
            return list(self._value.parts[0].shape)

        def assign(self, other):
            assert other.shape() == self.shape(), (other.shape(), self.shape())
            self._value = DeviceTensor([p.astype(np.float32) for p in other._value.parts], self._value.dtype)

    def device_zeros(shape):
        return Tensor(DeviceTensor([np.zeros(shape, np.float32) for _ in range(st.devices)], DataType.BFLOAT16))

    class NamedParameters:
        def __init__(self, d=None):
            self._d = dict(d or {})

        def items(self):
            return self._d.items()

        def keys(self):
            return self._d.keys()

        def values(self):
            return self._d.values()

        def __getitem__(self, k):
            return self._d[k]

        def __contains__(self, k):
            return k in self._d

        def __iter__(self):
            return iter(self._d)

        def __len__(self):
            return len(self._d)

    class DistributedConfig:
        def __init__(self, enable_ddp=False, enable_tp=False):
            self.enable_ddp, self.enable_tp = enable_ddp, enable_tp

    class AutoContext:
        _instance = None

        @staticmethod
        def get_instance():
            if AutoContext._instance is None:
                AutoContext._instance = AutoContext()
            return AutoContext._instance

        def open_device(self, mesh_shape=None, device_ids=None):
            if st.devices is not None:
                raise RuntimeError("a device is already open (ttml opens 1x1 on first use: open the mesh first)")
            st.devices = 1 if mesh_shape is None else mesh_shape[0] * mesh_shape[1]
            st.log.append(("open_device", mesh_shape))

        def close_device(self):
            st.log.append(("close_device",))
            st.devices = st.pctx = None

        def get_device(self):
            ensure_device()
            return mesh_device

        def set_seed(self, seed):
            st.log.append(("set_seed", seed))

        def reset_graph(self):
            st.graph_live = False

        def set_gradient_mode(self, mode):
            st.grad = mode

        def initialize_parallelism_context(self, config):
            ensure_device()  # auto_context.cpp @013f857: one parallelism on a line mesh, on its long axis
            if st.pctx is not None or config.enable_ddp + config.enable_tp != 1:
                raise RuntimeError("ParallelismContext is already initialized, or not exactly one parallelism")
            st.pctx = config

    class RunnerType:
        Default = "RunnerType.Default"

    class WeightTyingType:
        Disabled = "WeightTyingType.Disabled"
        Enabled = "WeightTyingType.Enabled"

    class PositionalEmbeddingType:
        Trainable = "PositionalEmbeddingType.Trainable"

    class GPT2TransformerConfig:
        __slots__ = ("num_heads", "embedding_dim", "num_blocks", "vocab_size", "max_sequence_length",
                     "dropout_prob", "runner_type", "weight_tying", "positional_embedding_type")

        def __init__(self):  # the C++ defaults (models/gpt2.hpp); a misspelt field raises AttributeError
            self.num_heads, self.embedding_dim, self.num_blocks = 6, 384, 6
            self.vocab_size, self.max_sequence_length, self.dropout_prob = 256, 256, 0.2
            self.runner_type, self.weight_tying = RunnerType.Default, WeightTyingType.Disabled
            self.positional_embedding_type = PositionalEmbeddingType.Trainable

    class ModuleBase:
        def __call__(self, x, mask):
            T = self._cfg.max_sequence_length
            assert x.dtype() == DataType.UINT32 and x.shape()[1:] == [1, 1, T], x.shape()
            assert mask.shape() == [1, 1, T, T] and mask.dtype() == DataType.BFLOAT16
            assert not (st.graph_live and st.grad == GradMode.ENABLED), "reset_graph() after backward, first"
            ids = [p.reshape(p.shape[0], T) for p in x._value.parts]
            st.log.append(("forward", sum(len(i) for i in ids), st.grad, self._training))

            def logits():  # [B, 1, T, padded vocab] per device: -d/8 for the column d places after id + 1
                out = []
                columns = np.arange(self._cfg.vocab_size)
                for i in ids:
                    d = (columns - (i.astype(np.int64)[:, None, :, None] + 1)) % VOCAB
                    o = -d.astype(np.float32) / 8
                    o[..., VOCAB:] = 50.0 if padded_columns_win else -1e3
                    out.append(o)
                return out
            y = Tensor(DeviceTensor(logits, DataType.BFLOAT16, x._value.sharded))
            y._signal = [float(i.mean()) for i in ids]
            return y

        def parameters(self):
            return NamedParameters(self._params)

        def train(self):
            self._training = True

        def eval(self):
            self._training = False

    class GPT2Transformer(ModuleBase):
        def __init__(self, config):
            ensure_device()
            self._cfg, self._training = config, True
            rng = np.random.default_rng(0)
            shapes = {"transformer/fc/weight": (1, 1, 8, 4), "transformer/ln_fc/gamma": (1, 1, 1, 4)}
            self._params = {}
            for k, s in shapes.items():
                w = rng.standard_normal(s).astype(np.float32)
                self._params[k] = p = Tensor(DeviceTensor([w.copy() for _ in range(st.devices)], DataType.BFLOAT16))
                p._grad = [np.zeros(s, np.float32) for _ in range(st.devices)]

    def create_gpt2_model(config):
        st.log.append(("create_gpt2_model", {k: getattr(config, k) for k in GPT2TransformerConfig.__slots__}))
        st.model = GPT2Transformer(config)
        return st.model

    def cross_entropy_loss(prediction, target, reduce=ReduceType.MEAN):
        assert target.dtype() == DataType.UINT32 and len(target.shape()) == 2 and reduce == ReduceType.MEAN
        if st.grad == GradMode.ENABLED:
            st.losses += 1
            value = float(st.losses)
        else:
            value = EVAL_LOSS
        parts = [np.full((1, 1, 1, 1), value, np.float32) for _ in range(st.devices)]  # each shard's mean
        loss = Tensor(DeviceTensor(parts, DataType.BFLOAT16, prediction._value.sharded))
        loss._signal = prediction._signal
        return loss

    def sample_op(logits, temperature, seed, logits_padding_mask=None):
        """Gumbel-max at temperature > 0 (plain argmax at 0), the mask subtracted, argmax over the vocab: [.., 1]."""
        assert isinstance(logits, Tensor) and isinstance(temperature, float) and 0 <= seed < 2**32
        assert logits_padding_mask is None or isinstance(logits_padding_mask, Tensor)  # nb_ops.cpp @0152e58
        st.log.append(("sample_op", temperature, seed, logits_padding_mask is not None))

        def choose(p, mask):
            z = p.astype(np.float64)
            if temperature > 0:  # the same seed on every device: the same noise, as with no seed_axes
                u = np.random.default_rng(seed).uniform(1e-5, 0.99, size=z.shape)
                z = z / temperature - np.log(-np.log(u))
            return np.argmax(z - mask, axis=3, keepdims=True).astype(np.uint32)
        masks = [0.0] * st.devices if logits_padding_mask is None else logits_padding_mask._value.parts
        return Tensor(DeviceTensor([choose(p, m) for p, m in zip(logits._value.parts, masks)], DataType.UINT32))

    def mul(a, b):
        out = Tensor(DeviceTensor([p * b for p in a._value.parts], a.dtype(), a._value.sharded))
        out._scale, out._signal = a._scale * b, a._signal
        return out

    class AdamWConfig:
        @staticmethod
        def make(lr, beta1, beta2, epsilon, weight_decay, amsgrad=False, stochastic_rounding=False):
            st.log.append(("AdamWConfig.make", lr, beta1, beta2, epsilon, weight_decay))
            return types.SimpleNamespace(lr=lr, beta1=beta1)

    class OptimizerBase:
        def get_lr(self):
            return self._lr

        def set_lr(self, lr):
            self._lr = lr

        def step(self):
            self._steps += 1
            for k, p in self._params.items():
                m = self._m1[k]
                m._value = DeviceTensor([0.9 * a + 0.1 * g for a, g in zip(m._value.parts, p._grad)], m.dtype())
                p._value = DeviceTensor([w - self._lr * a for w, a in zip(p._value.parts, m._value.parts)], p.dtype())
            st.steps.append({"backwards": st.backwards, "lr": self._lr})

        def zero_grad(self):
            for p in self._params.values():
                p._grad = [np.zeros_like(g) for g in p._grad]
            st.backwards = 0

        def get_state_dict(self):  # the keys and kinds of optimizers/adamw.cpp @013b217's state dict
            return {"steps": self._steps, "lr": self._lr, "exp_avg": NamedParameters(self._m1),
                    "exp_avg_sq": NamedParameters(self._m2), "amsgrad": False}

        def set_state_dict(self, dict):
            if not int_steps_ok:  # a Python int arrives as `int`; old get_value_type wants exactly size_t
                raise RuntimeError("std::bad_variant_access")
            self._steps, self._lr = dict["steps"], dict["lr"]
            self._m1, self._m2 = dict["exp_avg"]._d, dict["exp_avg_sq"]._d

    class AdamW(OptimizerBase):
        def __init__(self, parameters, config):
            self._params, self._lr, self._steps = dict(parameters.items()), config.lr, 0
            self._m1 = {k: device_zeros(p.shape()) for k, p in parameters.items()}
            self._m2 = {k: device_zeros(p.shape()) for k, p in parameters.items()}

    def clip_grad_norm(parameters, max_norm, p_norm_type=2.0, error_if_nonfinite=False):
        st.log.append(("clip_grad_norm", max_norm, p_norm_type, error_if_nonfinite))
        return Tensor(DeviceTensor([np.ones((1, 1, 1, 1), np.float32)], DataType.BFLOAT16))

    def enable_fabric(num_devices):
        st.log.append(("enable_fabric", num_devices))

    def shard_tensor_to_mesh_mapper(device, dim, cluster_axis=None):
        assert device is mesh_device
        return ("shard", dim)

    def concat_mesh_to_tensor_composer(mesh_device_, dim):
        assert mesh_device_ is mesh_device
        return ("concat", dim)

    def average_gradients(parameters):
        for p in parameters.values():
            mean = sum(p._grad) / len(p._grad)
            p._grad = [mean.copy() for _ in p._grad]
        st.log.append(("gradients_averaged",))

    def synchronize_gradients(parameters, cluster_axes=None):
        if cluster_axes is not None:  # nb_core.cpp @01b9eef: average over the named axes of the [1, N] mesh
            if 1 in cluster_axes:
                average_gradients(parameters)
        elif st.pctx is not None and st.pctx.enable_ddp:  # distributed.cpp @01c8afe: the context's DDP axis
            average_gradients(parameters)

    def synchronize_gradients_parameters_only(parameters):  # nb_core.cpp @b9dd067's signature
        synchronize_gradients(parameters)

    def synchronize_gradients_always(parameters):  # before the parallelism context existed
        average_gradients(parameters)

    if not parallelism_context:
        del AutoContext.initialize_parallelism_context
        sync = synchronize_gradients_always
    else:
        sync = synchronize_gradients if sync_takes_axes else synchronize_gradients_parameters_only

    ttnn = types.ModuleType("ttnn", "Stand-in for the parts of tt-metal's ttnn that main.py uses.")
    ttnn.Layout, ttnn.DataType, ttnn.Tensor, ttnn.slice = Layout, DataType, DeviceTensor, ttnn_slice
    ttnn.argmax, ttnn.lt, ttnn.full_like, ttnn.where, ttnn.bfloat16 = argmax, lt, full_like, where, DataType.BFLOAT16
    if sampling_ops:
        ttnn.topk = topk

    ns = types.SimpleNamespace
    ttml = types.ModuleType("ttml", "Stand-in for TT-Train's ttml (tests/fake_ttml.py); not the real thing.")
    ttml.NamedParameters = NamedParameters
    ttml.autograd = ns(AutoContext=AutoContext, Tensor=Tensor, GradMode=GradMode, DistributedConfig=DistributedConfig)
    if enums_in_ttml:  # some builds re-export ttnn's enums, others define neither (ttml/__init__.py @6a66fb2)
        ttml.Layout, ttml.autograd.DataType = Layout, DataType
    ttml.models = ns(RunnerType=RunnerType, WeightTyingType=WeightTyingType,
                     gpt2=ns(GPT2TransformerConfig=GPT2TransformerConfig, GPT2Transformer=GPT2Transformer,
                             PositionalEmbeddingType=PositionalEmbeddingType, create_gpt2_model=create_gpt2_model))
    ttml.modules = ns(ModuleBase=ModuleBase)
    ttml.ops = ns(ReduceType=ReduceType, loss=ns(cross_entropy_loss=cross_entropy_loss), binary=ns(mul=mul))
    if sampling_ops:
        ttml.ops.sample = ns(sample_op=sample_op)
    ttml.optimizers = ns(AdamWConfig=AdamWConfig, OptimizerBase=OptimizerBase, AdamW=AdamW)
    ttml.core = ns(clip_grad_norm=clip_grad_norm,
                   distributed=ns(enable_fabric=enable_fabric, shard_tensor_to_mesh_mapper=shard_tensor_to_mesh_mapper,
                                  concat_mesh_to_tensor_composer=concat_mesh_to_tensor_composer,
                                  synchronize_gradients=sync))
    ttml._state = st
    return ttml, ttnn


_DUNDERS = {"__call__", "__getitem__", "__contains__", "__iter__", "__len__"}


def exposed_names(obj, prefix=""):
    """Every dotted name the stand-in offers (namespaces, classes and their own members), relative to the package
    root as ttml_names.txt spells them; private helpers (leading underscore) are not part of the imitation."""
    for name, value in vars(obj).items():
        if name.startswith("_") and name not in _DUNDERS:
            continue
        yield prefix + name
        if isinstance(value, (types.SimpleNamespace, type)):
            yield from exposed_names(value, prefix + name + ".")
