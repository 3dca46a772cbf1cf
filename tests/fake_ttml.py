"""FakeTtml: a small RECORDING STAND-IN for TT-Train's `ttml` module, for the contract tests of main.py's glue.

It mirrors only the names main.TtmlBackend calls, spelled as tt-train's nanobind bindings spell them (digested in
shared/ttml_api.md; every name it exposes must be in shared/ttml_names.txt, which a test checks). It records each call
in order and does no real math: training losses count 1, 2, 3, ..., eval losses are EVAL_LOSS, the "logits" put all
their weight on token id + 1, and step() nudges weights and moments by fixed amounts so checkpoints have something
to round-trip. It also enforces a few documented rules of the real thing: 32-bit numpy only into from_numpy,
backward's retain_graph passed explicitly, a device opened lazily as 1x1 on first use (after which open_device
fails), and the model accepting exactly max_sequence_length tokens.

Tests that pass against it show our glue calls that API in the intended order with the intended arguments. They are
NOT evidence that the backend works on Tenstorrent hardware, nor that the real ttml behaves like this stand-in.
"""
import types

import numpy as np

EVAL_LOSS = 4.0
VOCAB = 50257  # GPT-2's; the fake logits wrap token ids around it


def make_fake_ttml():
    """A fresh stand-in `ttml` module. Its calls are recorded as tuples in `module._log`; `module._state` holds the
    open mesh size, the gradient mode and the training-loss counter."""
    log = []
    st = types.SimpleNamespace(devices=None, grad=None, losses=0)
    mesh_device = object()

    def ensure_device():
        if st.devices is None:  # auto_context.cpp: get_device() opens a 1x1 device when none is open
            st.devices = 1
            log.append(("lazy_open_1x1",))

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
        SUM = "ReduceType.SUM"

    class Tensor:
        """Holds the global (all devices') value; `_sharded` says whether dim 0 is split over the mesh."""

        def __init__(self, value, dtype, sharded=False, scale=1.0):
            self._value, self._dtype, self._sharded = value, dtype, sharded
            self._scale = scale  # product of the float factors mul() applied: what backward() differentiates

        def _data(self):
            return self._value() if callable(self._value) else self._value

        @staticmethod
        def from_numpy(numpy_tensor, layout=Layout.TILE, new_type=None, mapper=None):
            a = np.asarray(numpy_tensor)
            if a.dtype not in (np.float32, np.int32, np.uint32):  # nb_util.cpp takes 32-bit numpy only
                raise TypeError(f"Unsupported precision: {a.dtype}")
            ensure_device()
            if mapper is not None:
                assert mapper == ("shard", 0) and a.shape[0] % st.devices == 0, (mapper, a.shape)
            log.append(("from_numpy", a.shape, layout, new_type, mapper is not None))
            dtype = new_type or {np.dtype(np.float32): DataType.FLOAT32}.get(a.dtype, DataType.UINT32)
            return Tensor(a.copy(), dtype, sharded=mapper is not None)

        def to_numpy(self, new_type=None, composer=None):
            v = self._data()
            if st.devices and st.devices > 1:
                if composer != ("concat", 0):  # the stand-in's rule: a mesh tensor is read through a composer
                    raise RuntimeError("reading a tensor on a mesh needs concat_mesh_to_tensor_composer")
                if not self._sharded:  # replicated: one copy per device, concatenated
                    v = np.concatenate([v] * st.devices)
            log.append(("to_numpy", new_type))
            return v.astype(np.float32) if new_type == DataType.FLOAT32 else v.copy()

        def backward(self, retain_graph):
            log.append(("backward", retain_graph, st.grad, self._scale))

        def dtype(self):
            return self._dtype

        def shape(self):
            return list(self._data().shape)

        def assign(self, other):
            assert other.shape() == self.shape(), (other.shape(), self.shape())
            self._value = other._data().astype(np.float32)

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
            log.append(("open_device", mesh_shape))

        def close_device(self):
            log.append(("close_device",))
            st.devices = None

        def get_device(self):
            ensure_device()
            return mesh_device

        def set_seed(self, seed):
            log.append(("set_seed", seed))

        def reset_graph(self):
            log.append(("reset_graph",))

        def set_gradient_mode(self, mode):
            st.grad = mode
            log.append(("set_gradient_mode", mode))

    class RunnerType:
        Default = "RunnerType.Default"

    class WeightTyingType:
        Disabled = "WeightTyingType.Disabled"
        Enabled = "WeightTyingType.Enabled"

    class PositionalEmbeddingType:
        Trainable = "PositionalEmbeddingType.Trainable"
        Fixed = "PositionalEmbeddingType.Fixed"

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
            assert x._dtype == DataType.UINT32 and x.shape()[1:] == [1, 1, T], x.shape()
            assert mask.shape() == [1, 1, T, T] and mask._dtype == DataType.BFLOAT16
            ids = x._data().reshape(x.shape()[0], T)
            log.append(("forward", ids.shape[0], st.grad, self._training))

            def logits():  # [B, 1, T, padded vocab]: all weight on (id + 1) mod VOCAB
                out = np.zeros((ids.shape[0], 1, T, self._cfg.vocab_size), np.float32)
                b, t = np.indices(ids.shape)
                out[b, 0, t, (ids.astype(np.int64) + 1) % VOCAB] = 1.0
                return out
            return Tensor(logits, DataType.BFLOAT16, sharded=x._sharded)

        def parameters(self):
            return self._params

        def train(self):
            self._training = True
            log.append(("train",))

        def eval(self):
            self._training = False
            log.append(("eval",))

    class GPT2Transformer(ModuleBase):
        def __init__(self, config):
            self._cfg, self._training = config, True
            rng = np.random.default_rng(0)
            shapes = {"transformer/fc/weight": (1, 1, 8, 4), "transformer/ln_fc/gamma": (1, 1, 1, 4)}
            self._params = NamedParameters({k: Tensor(rng.standard_normal(s).astype(np.float32), DataType.BFLOAT16)
                                            for k, s in shapes.items()})

    def create_gpt2_model(config):
        log.append(("create_gpt2_model", {k: getattr(config, k) for k in GPT2TransformerConfig.__slots__}))
        return GPT2Transformer(config)

    def cross_entropy_loss(prediction, target, reduce=ReduceType.MEAN):
        assert target._dtype == DataType.UINT32 and len(target.shape()) == 2
        if st.grad == GradMode.ENABLED:
            st.losses += 1
            value = float(st.losses)
        else:
            value = EVAL_LOSS
        log.append(("cross_entropy_loss", reduce, value))
        n = st.devices if prediction._sharded else 1  # one loss per device, each its shard's mean
        return Tensor(np.full((n, 1, 1, 1), value, np.float32), DataType.BFLOAT16, sharded=prediction._sharded)

    def mul(a, b):
        log.append(("mul", b))
        return Tensor(a._data() * b, a._dtype, a._sharded, a._scale * b)

    class AdamWConfig:
        @staticmethod
        def make(lr, beta1, beta2, epsilon, weight_decay, amsgrad=False, stochastic_rounding=False):
            log.append(("AdamWConfig.make", lr, beta1, beta2, epsilon, weight_decay))
            return types.SimpleNamespace(lr=lr, beta1=beta1)

    class OptimizerBase:
        def get_lr(self):
            return self._lr

        def set_lr(self, lr):
            self._lr = lr
            log.append(("set_lr", lr))

        def step(self):
            self._steps += 1
            for k, p in self._params.items():  # a recognisable change, not AdamW
                p._value = p._data() - 0.5
                self._m1[k]._value = self._m1[k]._data() + 1.0
            log.append(("step",))

        def zero_grad(self):
            log.append(("zero_grad",))

        def get_state_dict(self):  # the keys and kinds of optimizers/adamw.cpp's state dict
            return {"first_moment": NamedParameters(self._m1), "second_moment": NamedParameters(self._m2),
                    "kahan_compensation": NamedParameters(), "steps": self._steps}

        def set_state_dict(self, dict):
            self._m1, self._m2 = dict["first_moment"]._d, dict["second_moment"]._d
            self._steps = dict["steps"]
            log.append(("set_state_dict", self._steps))

    class AdamW(OptimizerBase):
        def __init__(self, parameters, config):
            self._params, self._lr, self._steps = parameters, config.lr, 0
            zeros = lambda: {k: Tensor(np.zeros(p.shape(), np.float32), DataType.BFLOAT16)
                             for k, p in parameters.items()}
            self._m1, self._m2 = zeros(), zeros()
            log.append(("AdamW", len(parameters)))

    def clip_grad_norm(parameters, max_norm, p_norm_type=2.0, error_if_nonfinite=False):
        log.append(("clip_grad_norm", max_norm, p_norm_type, error_if_nonfinite))
        return Tensor(np.ones((1, 1, 1, 1), np.float32), DataType.BFLOAT16)

    def enable_fabric(num_devices):
        log.append(("enable_fabric", num_devices))

    def shard_tensor_to_mesh_mapper(device, dim, cluster_axis=None):
        assert device is mesh_device
        return ("shard", dim)

    def concat_mesh_to_tensor_composer(mesh_device_, dim):
        assert mesh_device_ is mesh_device
        return ("concat", dim)

    def synchronize_gradients(parameters):
        log.append(("synchronize_gradients", len(parameters)))

    ns = types.SimpleNamespace
    ttml = types.ModuleType("ttml", "Recording stand-in for TT-Train's ttml (tests/fake_ttml.py); not the real thing.")
    ttml.Layout, ttml.NamedParameters = Layout, NamedParameters
    ttml.autograd = ns(AutoContext=AutoContext, Tensor=Tensor, DataType=DataType, GradMode=GradMode)
    ttml.models = ns(RunnerType=RunnerType, WeightTyingType=WeightTyingType,
                     gpt2=ns(GPT2TransformerConfig=GPT2TransformerConfig, GPT2Transformer=GPT2Transformer,
                             PositionalEmbeddingType=PositionalEmbeddingType, create_gpt2_model=create_gpt2_model))
    ttml.modules = ns(ModuleBase=ModuleBase)
    ttml.ops = ns(ReduceType=ReduceType, loss=ns(cross_entropy_loss=cross_entropy_loss), binary=ns(mul=mul))
    ttml.optimizers = ns(AdamWConfig=AdamWConfig, OptimizerBase=OptimizerBase, AdamW=AdamW)
    ttml.core = ns(clip_grad_norm=clip_grad_norm,
                   distributed=ns(enable_fabric=enable_fabric, shard_tensor_to_mesh_mapper=shard_tensor_to_mesh_mapper,
                                  concat_mesh_to_tensor_composer=concat_mesh_to_tensor_composer,
                                  synchronize_gradients=synchronize_gradients))
    ttml._log, ttml._state = log, st
    return ttml


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
