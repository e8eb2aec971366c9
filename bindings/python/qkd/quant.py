"""Quantizers: the low-bit grids a student trains on."""
from ctypes import byref

import numpy as np

from . import _lib
from ._handle import Handle, array_in, create, enum_value, f32p, fill, i32p

lib = _lib.lib

SCHEMES = {"sym": 0, "asym": 1, "ternary": 2, "q8_0": 3, "q4_0": 4, "q4_1": 5, "q5_0": 6,
           "q5_1": 7, "q4_k": 8, "q6_k": 9, "tq2_0": 10}
CLIPS = {"none": 0, "fixed": 1, "search_weight": 2, "search_output": 3}
ESTIMATORS = {"ste": 0, "continuous": 1}


class Quantizer(Handle):
    """Quantizer(ctx, **params): the defaults of qkd_quant_params_init (ASYM,
    4 bits, group 128, STE) with the given fields changed: scheme, bits,
    group_size, clip, clip_ratio, estimator, round_sharpness,
    clamp_sharpness, act_bits, kv_bits (enums by name: scheme="q4_0").
    A model bound to it (Model.set_quantizer) borrows it."""

    def __init__(self, ctx, **params):
        p = _lib.QuantParams()
        lib.qkd_quant_params_init(byref(p))
        fill(p, params, {"scheme": SCHEMES, "clip": CLIPS, "estimator": ESTIMATORS})
        ptr = create(ctx, lib.qkd_quantizer_create, _lib.QuantizerP, ctx._ptr, byref(p))
        super().__init__(ptr, lib.qkd_quantizer_free, (ctx,), ctx)

    def n_groups(self, rows, cols):
        return lib.qkd_quantizer_n_groups(self._ptr, rows, cols)

    def quantize(self, w):
        """Hard-round a (rows, cols) float32 weight: (wq, codes, scales, zeros)
        with wq and codes of w's shape, scales and zeros one per group."""
        array_in(w, np.float32, (None, None), "w")
        rows, cols = w.shape
        groups = self.n_groups(rows, cols)
        wq, codes = np.empty_like(w), np.empty(w.shape, np.int32)
        scales, zeros = np.empty(groups, np.float32), np.empty(groups, np.float32)
        self._check(lib.qkd_quantizer_quantize(self._ptr, f32p(w), rows, cols, f32p(wq),
                                               i32p(codes), f32p(scales), f32p(zeros)))
        return wq, codes, scales, zeros

    def set_estimator(self, estimator):
        """Switch every bound student's gradient estimator ("ste", "continuous")."""
        value = enum_value(ESTIMATORS, estimator, "estimator")
        self._check(lib.qkd_quantizer_set_estimator(self._ptr, value))
