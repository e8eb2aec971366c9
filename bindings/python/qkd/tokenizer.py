"""Tokenizers: llama2.c / GGUF vocabularies and the byte-level one."""
from ctypes import byref, c_size_t, string_at

import numpy as np

from . import _lib
from ._handle import Handle, create, i32p
from .errors import RangeError

lib = _lib.lib

ENCODE_BOS, ENCODE_EOS = 1, 2


class Tokenizer(Handle):
    """Tokenizer.load(ctx, path) or Tokenizer.bytes(ctx)."""

    def __init__(self, ctx, ptr):
        super().__init__(ptr, lib.qkd_tokenizer_free, (ctx,), ctx)

    @classmethod
    def load(cls, ctx, path):
        return cls(ctx, create(ctx, lib.qkd_tokenizer_load, _lib.TokenizerP, ctx._ptr,
                               str(path).encode()))

    @classmethod
    def bytes(cls, ctx):
        return cls(ctx, create(ctx, lib.qkd_tokenizer_create_bytes, _lib.TokenizerP,
                               ctx._ptr))

    @property
    def vocab_size(self):
        return lib.qkd_tokenizer_vocab_size(self._ptr)

    @property
    def bos(self):
        return lib.qkd_tokenizer_bos(self._ptr)

    @property
    def eos(self):
        return lib.qkd_tokenizer_eos(self._ptr)

    def encode(self, text, bos=True, eos=False):
        """The ids of text (str) as an int32 array."""
        data = text.encode("utf-8")
        flags = (ENCODE_BOS if bos else 0) | (ENCODE_EOS if eos else 0)
        n = c_size_t()
        out = np.empty(len(data) + 3, np.int32)  # len + 2 suffice, + 1 for EOS
        while True:
            status = lib.qkd_tokenizer_encode(self._ptr, data, len(data), flags, i32p(out),
                                              out.size, byref(n))
            if status != RangeError.status or n.value <= out.size:
                break
            out = np.empty(n.value, np.int32)  # a vocabulary without the space piece
        self._check(status)
        return out[:n.value].copy()

    def decode(self, ids):
        """The text of a sequence of ids (invalid UTF-8 replaced)."""
        parts, prev, n = [], -1, c_size_t()
        for token in ids:
            text = lib.qkd_tokenizer_decode(self._ptr, prev, int(token), byref(n))
            if text is None:
                raise ValueError("token id %d is outside the vocabulary" % token)
            parts.append(string_at(text, n.value))
            prev = int(token)
        return b"".join(parts).decode("utf-8", "replace")
