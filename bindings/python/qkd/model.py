"""Models: loading, parameter tensors as numpy arrays, the training passes
and export."""
from collections import namedtuple
import operator
from ctypes import byref, c_float, c_int, sizeof

import numpy as np

from . import _lib
from ._handle import (Handle, array_in, array_out, create, enum_value, f32p, fill, i32p,
                      require_state)

lib = _lib.lib

TENSOR_KINDS = {"token_embd": 0, "attn_norm": 1, "attn_q": 2, "attn_k": 3, "attn_v": 4,
                "attn_output": 5, "ffn_norm": 6, "ffn_gate": 7, "ffn_down": 8, "ffn_up": 9,
                "output_norm": 10, "output": 11, "quant_scale": 12, "quant_zero": 13}
# QKD_QUANT_TARGET_LINEAR: every attention and MLP projection.
TARGET_LINEAR = sum(1 << TENSOR_KINDS[k] for k in (
    "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_down", "ffn_up"))
SAVE_DTYPES = {"f32": 0, "f16": 1, "bf16": 2}
MATMUL_PRECISIONS = {"fp32": 0, "bf16": 1}

TensorInfo = namedtuple("TensorInfo", "index name kind layer shape")


def _gguf_type(name):
    if not isinstance(name, str):
        raise ValueError("a GGUF type is a name such as 'q4_0', not %r" % (name,))
    out = c_int()
    status = lib.qkd_gguf_type_from_name(name.encode(), byref(out))
    if status != 0:
        raise ValueError("unknown GGUF type %r" % name)
    return out.value


class Model(Handle):
    """A LLaMA-family model. Create with Model.load(ctx, path) or
    Model.create(ctx, **config); close() (or `with`) frees it together with
    the optimizers and runs that borrow it."""

    def __init__(self, ctx, ptr):
        super().__init__(ptr, lib.qkd_model_free, (ctx,), ctx)
        self._quantizer = None
        self._shape = None  # (B, T) of the last forward, for the logits' shape
        self._trainable = True

    @classmethod
    def load(cls, ctx, path):
        """A model from a GGUF file, a Hugging Face folder or a llama2.c .bin."""
        return cls(ctx, create(ctx, lib.qkd_model_load, _lib.ModelP, ctx._ptr,
                               str(path).encode()))

    @classmethod
    def create(cls, ctx, **config):
        """A zero model of the stories260K shape with config's fields changed
        (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
        max_seq_len, rope_theta, norm_eps, tied_embeddings)."""
        cfg = _lib.ModelConfig()
        lib.qkd_model_config_init(byref(cfg))
        fill(cfg, config, {})
        return cls(ctx, create(ctx, lib.qkd_model_create, _lib.ModelP, ctx._ptr, byref(cfg)))

    @property
    def config(self):
        cfg = _lib.ModelConfig()
        lib.qkd_model_config_init(byref(cfg))
        self._check(lib.qkd_model_get_config(self._ptr, byref(cfg)))
        return {name: getattr(cfg, name) for name, _ in cfg._fields_ if name != "size"}

    @property
    def n_params(self):
        return lib.qkd_model_n_params(self._ptr)

    @property
    def n_tensors(self):
        return lib.qkd_model_n_tensors(self._ptr)

    def init_random(self, seed, std=0.02):
        self._check(lib.qkd_model_init_random(self._ptr, seed, std))

    # ---- tensors ----------------------------------------------------------------

    def tensor_index(self, name):
        """The index of the tensor named name ("blk.0.attn_q.weight")."""
        index = c_int()
        self._check(lib.qkd_model_tensor_find(self._ptr, name.encode(), byref(index)))
        return index.value

    def tensor_info(self, tensor):
        """TensorInfo(index, name, kind, layer, shape) of an index or name."""
        index = self.tensor_index(tensor) if isinstance(tensor, str) else operator.index(tensor)
        info = _lib.TensorInfo(size=sizeof(_lib.TensorInfo))
        self._check(lib.qkd_model_tensor_info(self._ptr, index, byref(info)))
        shape = tuple(info.shape[:info.n_dims])
        kind = next(k for k, v in TENSOR_KINDS.items() if v == info.kind)
        return TensorInfo(index, info.name.decode(), kind, info.layer, shape)

    def _tensor_io(self, fn, tensor, arr, what, out):
        info = self.tensor_info(tensor)
        arr = (array_out if out else array_in)(arr, np.float32, info.shape, what)
        self._check(fn(self._ptr, info.index, f32p(arr), arr.size))
        return arr

    def get(self, tensor, out=None):
        """The weights of a tensor (index or name), into out if given."""
        return self._tensor_io(lib.qkd_model_tensor_get, tensor, out, "out", True)

    def set(self, tensor, values):
        """Set a tensor's weights from a C-contiguous float32 array of its shape."""
        self._tensor_io(lib.qkd_model_tensor_set, tensor, values, "values", False)

    def grad(self, tensor, out=None):
        """The accumulated gradient of a tensor, into out if given."""
        return self._tensor_io(lib.qkd_model_grad_get, tensor, out, "out", True)

    # ---- training passes ------------------------------------------------------------

    def forward(self, tokens):
        """Forward a (B, T) int32 array of token ids; the logits stay in the model."""
        array_in(tokens, np.int32, (None, None), "tokens")
        self._shape = None
        self._check(lib.qkd_model_forward(self._ptr, i32p(tokens), *tokens.shape))
        self._shape = tokens.shape

    def _last_shape(self):
        require_state(self._shape is not None, "the model has no forward yet")
        return self._shape

    def logits(self, out=None):
        """The last forward's logits as a (B, T, vocab) float32 array; out, a
        preallocated array of that shape, is filled without a copy."""
        vocab = self.config["vocab_size"]
        out = array_out(out, np.float32, self._last_shape() + (vocab,), "out")
        self._check(lib.qkd_model_logits(self._ptr, f32p(out), out.size))
        return out

    def targets_of(self, targets):
        """targets checked against the last forward: None or (B, T) int32."""
        if targets is not None:
            array_in(targets, np.int32, self._last_shape(), "targets")
        return targets

    def cross_entropy(self, targets, compute_grad=True):
        """Mean cross-entropy of the last forward against (B, T) targets."""
        if targets is None:
            raise ValueError("cross_entropy needs targets")
        self.targets_of(targets)
        loss = c_float()
        self._check(lib.qkd_model_cross_entropy(self._ptr, i32p(targets), int(compute_grad),
                                                byref(loss)))
        return loss.value

    def backward(self, dlogits=None):
        """Backward from (B, T, vocab) float32 dlogits, or from the gradient a
        loss stored on the model (None)."""
        if dlogits is not None:
            shape = self._last_shape() + (self.config["vocab_size"],)
            array_in(dlogits, np.float32, shape, "dlogits")
        self._check(lib.qkd_model_backward(self._ptr, f32p(dlogits)))

    def zero_grad(self):
        self._check(lib.qkd_model_zero_grad(self._ptr))

    def set_trainable(self, trainable):
        """False for a model only run forward, as a frozen teacher: its layers
        then share one set of activations and it has no gradient buffers
        (backward, cross_entropy(compute_grad=True), grad and an optimizer
        step raise StateError); with bf16 matmuls it keeps its weights
        rounded to bf16 once."""
        self._check(lib.qkd_model_set_trainable(self._ptr, int(bool(trainable))))
        if bool(trainable) != self._trainable:
            self._shape = None  # a change releases the activations, logits included
        self._trainable = bool(trainable)

    def set_logits_rows(self, rows):
        """0 (the default): the forward stores all logits. rows > 0: they are
        computed when read, a loss computing them `rows` positions at a time
        so that neither model's logits are ever stored whole."""
        self._check(lib.qkd_model_set_logits_rows(self._ptr, int(rows)))
        self._shape = None  # a change releases the activations

    def set_matmul_precision(self, precision):
        """"fp32" (the default) or "bf16" matmul inputs, fp32 accumulation."""
        self._check(lib.qkd_model_set_matmul_precision(
            self._ptr, enum_value(MATMUL_PRECISIONS, precision, "matmul precision")))

    # ---- quantization ----------------------------------------------------------------

    def set_quantizer(self, quantizer, targets=TARGET_LINEAR):
        """Make the model a student of quantizer (None: unbind). The model
        borrows the quantizer: closing the quantizer closes the model."""
        q = quantizer._ptr if quantizer is not None else None
        self._check(lib.qkd_model_set_quantizer(self._ptr, q, targets))
        if self._quantizer is not None:
            self._release(self._quantizer)
        self._quantizer = quantizer
        if quantizer is not None:
            self._borrow(quantizer)
        self._shape = None  # binding discards the last forward

    @property
    def quantizer(self):
        return self._quantizer

    # ---- export ------------------------------------------------------------------------

    def save_gguf(self, path, type="as_trained", embd_type="as_trained", name=None):
        """Write a GGUF file that llama.cpp runs (types by name: "q4_0", "f16")."""
        p = _lib.GgufParams()
        lib.qkd_gguf_params_init(byref(p))
        p.type, p.embd_type = _gguf_type(type), _gguf_type(embd_type)
        p.name = None if name is None else name.encode()
        self._check(lib.qkd_model_save_gguf(self._ptr, str(path).encode(), byref(p)))

    def save_safetensors(self, directory, dtype="f32", as_deployed=False):
        """Write a Hugging Face LlamaForCausalLM folder."""
        p = _lib.SafetensorsParams()
        lib.qkd_safetensors_params_init(byref(p))
        p.dtype = enum_value(SAVE_DTYPES, dtype, "dtype")
        p.as_deployed = int(as_deployed)
        self._check(lib.qkd_model_save_safetensors(self._ptr, str(directory).encode(),
                                                   byref(p)))
