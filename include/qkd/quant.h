/* libqkd quantizers: the low-bit grids a student is trained on.
 *
 * A quantizer maps each group of weights (a row slice of group_size values
 * along the input dimension) to integer codes and a per-group scale (and
 * offset), and back. Bound to a student model (qkd_model_set_quantizer),
 * every forward of the student uses the fake-quantized weights Q(w) and
 * every backward maps dL/dQ(w) to dL/dw through the chosen gradient
 * estimator, so the host's training loop is unchanged.
 *
 * Schemes (b = bits, G = one group, R(x) rounds half away from zero):
 *   SYM      s = max|G| / (2^(b-1) - 1), code c = R(w / s) in
 *            [-(2^(b-1) - 1), 2^(b-1) - 1], Q = c s.
 *   ASYM     s = max(max G - min G, 1e-5) / (2^b - 1),
 *            z = clamp(-R(min G / s), 0, 2^b - 1),
 *            c = clamp(R(w / s) + z, 0, 2^b - 1), Q = (c - z) s
 *            (BitDistiller's grid; zero is exactly representable).
 *   TERNARY  D = 0.7 mean|G|, m = |w| > D, s = sum(|w| m) / sum(m),
 *            c = sign(w) m in {-1, 0, 1}, Q = c s (TWN, as TSLD).
 * A group whose values are all equal (or all zero) gets a finite scale and
 * reproduces its values; NaN or Inf weights are an error (NON_FINITE).
 *
 * Groups: group_size > 0 splits each row of length C into ceil(C / G)
 * groups; when G does not divide C the LAST group of each row is partial
 * (C mod G values) and has its own scale. group_size 0 means one group per
 * output row (per channel), -1 one group for the whole tensor.
 *
 * Clipping shrinks the range before quantizing: FIXED multiplies the
 * group's max and min by clip_ratio; SEARCH_WEIGHT and SEARCH_OUTPUT pick,
 * per group, the shrink factors (1 - i/20 for the max, 1 - j/20 for the
 * min, i, j in 0..9) that minimise the weight's squared error or, as
 * BitDistiller does, the squared error of the group's partial dot products
 * with calibration activations (qkd_quantizer_calibrate). A searched clip is
 * applied once to the weights as a hard clamp.
 *
 * Gradient estimators: STE passes dL/dQ through unchanged (zero where a
 * FIXED clip clamped the weight). CONTINUOUS replaces rounding by
 * round_T(x) = floor(x) + sigmoid(T (x - floor(x) - 0.5)) in the forward
 * and backward (T = round_sharpness, annealed by qkd_quantizer_set_sharpness)
 * and the hard clamp by SoftClamp(x, a, b) = x g(x-a) g(b-x) + a g(a-x)
 * + b g(x-b), g(u) = sigmoid(clamp_sharpness u), so weights outside the
 * range still get gradient. Evaluation and export always use hard rounding.
 */
#ifndef QKD_QUANT_H
#define QKD_QUANT_H

#include "core.h"
#include "model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct qkd_quantizer qkd_quantizer;

typedef enum qkd_quant_scheme {
    QKD_QUANT_SYM = 0,
    QKD_QUANT_ASYM = 1,
    QKD_QUANT_TERNARY = 2
} qkd_quant_scheme;

typedef enum qkd_clip_mode {
    QKD_CLIP_NONE = 0,
    QKD_CLIP_FIXED = 1,
    QKD_CLIP_SEARCH_WEIGHT = 2,
    QKD_CLIP_SEARCH_OUTPUT = 3
} qkd_clip_mode;

typedef enum qkd_estimator {
    QKD_ESTIMATOR_STE = 0,
    QKD_ESTIMATOR_CONTINUOUS = 1
} qkd_estimator;

typedef struct qkd_quant_params {
    size_t size;              /* sizeof(qkd_quant_params), set by _init */
    qkd_quant_scheme scheme;
    int bits;                 /* 2, 3, 4 or 8; ignored for TERNARY */
    int group_size;           /* > 0, 0 per output row, -1 per tensor */
    qkd_clip_mode clip;
    float clip_ratio;         /* FIXED: in (0, 1] */
    qkd_estimator estimator;
    float round_sharpness;    /* CONTINUOUS: T of round_T, > 0 */
    float clamp_sharpness;    /* CONTINUOUS: gate steepness, > 0 */
    int act_bits;             /* 0: off; else the input of every targeted
                                 linear is fake-quantized per token,
                                 symmetric, dynamic (LLM-QAT), STE */
    int kv_bits;              /* 0: off; else keys and values per token,
                                 symmetric, before RoPE (LLM-QAT), STE */
} qkd_quant_params;

/* Defaults: ASYM, 4 bits, group 128, no clip, STE, sharpness 10 / 10,
 * activations and KV cache in float.
 * @since 0.1 */
QKD_API void qkd_quant_params_init(qkd_quant_params *p);

/* *out: owned, free with qkd_quantizer_free (after every model it is bound
 * to is freed or unbound). Errors: INVALID_ARG (bits not in {2,3,4,8},
 * group_size < -1, clip_ratio outside (0,1], sharpness <= 0), NO_MEMORY.
 * @since 0.1 */
QKD_API qkd_status qkd_quantizer_create(qkd_context *ctx, const qkd_quant_params *p,
                                        qkd_quantizer **out);
/* Accepts NULL. @since 0.1 */
QKD_API void qkd_quantizer_free(qkd_quantizer *q);

/* Number of groups a rows x cols weight has (per row: ceil(cols / G)).
 * @since 0.1 */
QKD_API int64_t qkd_quantizer_n_groups(const qkd_quantizer *q, int64_t rows, int64_t cols);

/* Quantize a host weight w[rows][cols] with hard rounding. Any output may be
 * NULL: wq[rows][cols] the dequantized values, codes[rows][cols] the integer
 * codes as deployed (SYM/TERNARY signed, ASYM in 0..2^b-1), scales[n_groups]
 * and zeros[n_groups] (ASYM's integer zero point; 0 for others), groups in
 * row-major order (row, then group along the row). A FIXED clip applies.
 * Errors: INVALID_ARG, NON_FINITE (a NaN/Inf weight: the message gives its
 * index). @since 0.1 */
QKD_API qkd_status qkd_quantizer_quantize(qkd_quantizer *q, const float *w,
                                          int64_t rows, int64_t cols, float *wq,
                                          int32_t *codes, float *scales, float *zeros);

/* ---- binding to a student ------------------------------------------------ */

/* Which linear weights a bound quantizer covers (bit mask of
 * 1u << qkd_tensor_kind). QKD_QUANT_TARGET_LINEAR is every attention and
 * MLP projection; the output head and embeddings stay in float unless
 * named. */
#define QKD_QUANT_TARGET(kind) (1u << (kind))
#define QKD_QUANT_TARGET_LINEAR                                                     \
    (QKD_QUANT_TARGET(QKD_TENSOR_ATTN_Q) | QKD_QUANT_TARGET(QKD_TENSOR_ATTN_K) |    \
     QKD_QUANT_TARGET(QKD_TENSOR_ATTN_V) | QKD_QUANT_TARGET(QKD_TENSOR_ATTN_OUTPUT) | \
     QKD_QUANT_TARGET(QKD_TENSOR_FFN_GATE) | QKD_QUANT_TARGET(QKD_TENSOR_FFN_DOWN) | \
     QKD_QUANT_TARGET(QKD_TENSOR_FFN_UP))

/* Make `model` a student: from now on its forward uses Q(w) for every
 * targeted tensor and its backward applies the estimator. q is borrowed
 * until the model is freed or unbound (q == NULL unbinds). Errors:
 * INVALID_ARG (targets empty or naming norm tensors), NON_FINITE.
 * @since 0.1 */
QKD_API qkd_status qkd_model_set_quantizer(qkd_model *model, qkd_quantizer *q,
                                           unsigned targets);

/* Calibrate a SEARCH clip on model (already bound to q): forward the
 * calibration batch tokens[B*T] through the float model, keep each
 * targeted layer's inputs, search the clip per group and clamp the
 * weights in place. Errors: STATE (not bound, or clip is not a SEARCH
 * mode), plus those of qkd_model_forward. @since 0.1 */
QKD_API qkd_status qkd_quantizer_calibrate(qkd_quantizer *q, qkd_model *model,
                                           const int32_t *tokens, int B, int T);

/* Anneal the CONTINUOUS estimator's rounding sharpness T (> 0).
 * @since 0.1 */
QKD_API qkd_status qkd_quantizer_set_sharpness(qkd_quantizer *q, float round_sharpness);

#ifdef __cplusplus
}
#endif
#endif
