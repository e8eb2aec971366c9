"""libqkd for Python: quantization-aware training with knowledge
distillation of LLaMA-family models, over the C library through ctypes.

    import numpy as np, qkd
    with qkd.Context() as ctx:
        teacher = qkd.Model.load(ctx, "stories260K.bin")
        student = qkd.Model.load(ctx, "stories260K.bin")
        student.set_quantizer(qkd.Quantizer(ctx, bits=4, group_size=32))
        ...

Every handle has close() and works as a context manager; closing a handle
closes the handles that borrow it (a context closes everything made from
it), and a closed handle raises ClosedError. Failed calls raise the
QkdError subclass of their status with the library's message; arrays go
to and from C without copies and must be C-contiguous numpy arrays of the
exact dtype (float32 weights and logits, int32 token ids), else ValueError.
examples/distill.py is the complete training loop.
"""
from . import _lib
from ._lib import ABI_MAJOR, LibraryNotFound, LibraryVersionError
from .context import Context
from .data import Dataset, eval_ce
from .distill import Distill, DistillStats
from .errors import (BackendError, CancelledError, ClosedError, FormatError, InvalidArgError,
                     IoError, NoMemoryError, NonFiniteError, NotFoundError, QkdError,
                     RangeError, ShapeError, StateError, UnsupportedError, VersionError)
from .loss import Loss
from .model import TARGET_LINEAR, Model, TensorInfo
from .optim import Optimizer, StepInfo
from .quant import Quantizer
from .tokenizer import Tokenizer

library_path = _lib.path
version = _lib.lib.qkd_version_string().decode()

__all__ = [
    "ABI_MAJOR", "BackendError", "CancelledError", "ClosedError", "Context", "Dataset",
    "Distill", "DistillStats", "FormatError", "InvalidArgError", "IoError",
    "LibraryNotFound", "LibraryVersionError", "Loss", "Model", "NoMemoryError",
    "NonFiniteError", "NotFoundError", "Optimizer", "QkdError", "Quantizer", "RangeError",
    "ShapeError", "StateError", "StepInfo", "TARGET_LINEAR", "TensorInfo", "Tokenizer",
    "UnsupportedError", "VersionError", "eval_ce", "library_path", "version",
]
