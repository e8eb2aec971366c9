"""Token datasets and the deterministic batches of a run."""
from ctypes import byref, c_double, c_int64

import numpy as np

from . import _lib
from ._handle import Handle, array_in, array_out, create, enum_value, i32p

lib = _lib.lib

SPLITS = {"train": 0, "eval": 1}


class Dataset(Handle):
    """Dataset.from_text(ctx, tokenizer, path) or
    Dataset.from_tokens(ctx, ids, vocab_size)."""

    def __init__(self, ctx, ptr):
        super().__init__(ptr, lib.qkd_dataset_free, (ctx,), ctx)

    @classmethod
    def from_text(cls, ctx, tokenizer, path):
        """A UTF-8 file encoded with tokenizer, BOS first."""
        return cls(ctx, create(ctx, lib.qkd_dataset_from_text, _lib.DatasetP, ctx._ptr,
                               tokenizer._ptr, str(path).encode()))

    @classmethod
    def from_tokens(cls, ctx, ids, vocab_size):
        """A copy of a 1-D int32 array of ids below vocab_size."""
        array_in(ids, np.int32, (None,), "ids")
        return cls(ctx, create(ctx, lib.qkd_dataset_from_tokens, _lib.DatasetP, ctx._ptr,
                               i32p(ids), ids.size, vocab_size))

    @property
    def n_tokens(self):
        return lib.qkd_dataset_n_tokens(self._ptr)

    def set_split(self, seed=1, n_eval=0):
        """Seed of the training order; the last n_eval windows are held out."""
        self._check(lib.qkd_dataset_set_split(self._ptr, seed, n_eval))

    def n_windows(self, T, split="train"):
        return lib.qkd_dataset_n_windows(self._ptr, T, enum_value(SPLITS, split, "split"))

    def batch(self, step, B, T, out=None):
        """Training batch `step`: (tokens, targets), two (B, T) int32 arrays
        (out: a preallocated pair, filled in place)."""
        tokens, targets = out if out is not None else (None, None)
        tokens = array_out(tokens, np.int32, (B, T), "tokens")
        targets = array_out(targets, np.int32, (B, T), "targets")
        self._check(lib.qkd_dataset_batch(self._ptr, step, B, T, i32p(tokens),
                                          i32p(targets)))
        return tokens, targets


def eval_ce(model, data, B=8, T=64):
    """Mean cross-entropy (nats/token) of model on data's held-out windows,
    and the number of tokens scored. It overwrites the model's last forward."""
    ce, n = c_double(), c_int64()
    ctx = model._ctx
    model._shape = None
    model._check(lib.qkd_distill_eval_ce(ctx._ptr, model._ptr, data._ptr, B, T, byref(ce),
                                         byref(n)))
    return ce.value, n.value
