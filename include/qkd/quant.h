/* libqkd quantizers: the low-bit grids a student is trained on.
 *
 * A quantizer maps each group of weights (a row slice of group_size values
 * along the input dimension) to integer codes and a per-group scale (and
 * offset), and back. Bound to a student model (qkd_model_set_quantizer),
 * every forward of the student uses the fake-quantized weights Q(w) and
 * every backward maps dL/dQ(w) to dL/dw through the chosen gradient
 * estimator, so the host's training loop is unchanged.
 *
 * Schemes (b = bits, G = one group, R(x) rounds half away from zero,
 * lo = min(min G, 0), hi = max(max G, 0)):
 *   SYM      s = max|G| / (2^(b-1) - 1), code c = R(w / s) in
 *            [-(2^(b-1) - 1), 2^(b-1) - 1], Q = c s.
 *   ASYM     s = (hi - lo) / (2^b - 1),
 *            z = clamp(-R(lo / s), 0, 2^b - 1),
 *            c = clamp(R(w / s) + z, 0, 2^b - 1), Q = (c - z) s.
 *            This is BitDistiller's grid for a group holding both signs;
 *            widening the range to include 0 keeps zero exactly
 *            representable and lets a group of one sign (a constant group)
 *            be reproduced, where BitDistiller's [min, max] would clamp it.
 *   TERNARY  D = 0.7 mean|G|, m = |w| > D, s = sum(|w| m) / sum(m),
 *            c = sign(w) m in {-1, 0, 1}, Q = c s (TWN, as TSLD).
 * Scales are computed in double and stored as float; w / s is computed in
 * double from the float scale. A scale never falls below FLT_MIN (the
 * smallest normal float; BitDistiller floors the range at 1e-5 instead,
 * which would flatten a group of tiny values), so an all-zero group gets
 * a finite scale and codes 0, and a constant group is reproduced to within
 * a float rounding. NaN or Inf weights are an error (NON_FINITE).
 *
 * Groups: group_size > 0 splits each row of length C into ceil(C / G)
 * groups; when G does not divide C the LAST group of each row is partial
 * (C mod G values) and has its own scale: stories260K's FFN width 172 with
 * G = 32 gives groups of 32, 32, 32, 32, 32 and 12. G >= C is one group per
 * row. group_size 0 means one group per output row (per channel), -1 one
 * group for the whole tensor.
 *
 * Clipping shrinks the range before quantizing: FIXED multiplies lo and hi
 * (SYM, TERNARY: max|G|) by clip_ratio and values beyond are clamped (for
 * TERNARY the clamped values give D and s). SEARCH_WEIGHT and
 * SEARCH_OUTPUT pick, per group, shrink factors (1 - i/20 for the max,
 * 1 - j/20 for the min, i, j in 0..9; SYM and TERNARY shrink max|G| by
 * 1 - i/20 only) that minimise the squared error of the quantized weights
 * or, as BitDistiller does, the mean squared error of the group's partial
 * dot products with calibration activations (qkd_quantizer_calibrate). A
 * searched clip is applied once to the weights as a hard clamp.
 *
 * Gradient estimators, the group's scale, zero point and threshold held
 * constant: STE passes dL/dQ through unchanged (zero where a FIXED clip
 * clamped the weight). CONTINUOUS replaces rounding by
 *   round_T(x) = floor(x) + (sigmoid(T (f - 1/2)) - sigmoid(-T/2))
 *                           / (sigmoid(T/2) - sigmoid(-T/2)),
 * f = x - floor(x): the sigmoid step of the continuous approximations
 * paper, rescaled on each unit interval so that round_T is continuous and
 * exact at integers (T -> infinity gives R, T -> 0 the identity). T is
 * round_sharpness, annealed by qkd_quantizer_set_sharpness. The hard clamp
 * of the codes to their range [a, b] becomes SoftClamp(x, a, b) =
 * x g(x-a) g(b-x) + a g(a-x) + b g(x-b), g(u) = sigmoid(clamp_sharpness u),
 * so weights outside the range still get gradient:
 *   SYM, ASYM  Q = (SoftClamp(round_T(w / s) + z, a, b) - z) s;
 *   TERNARY    Q = s (sigmoid(T (w - D) / s) - sigmoid(T (-w - D) / s)).
 * The student's training forward (qkd_model_forward) uses these smooth
 * functions; decoding, qkd_quantizer_quantize and export always use hard
 * rounding (switch to STE with qkd_quantizer_set_estimator to evaluate a
 * CONTINUOUS student's forward with hard rounding).
 *
 * Learned scales (learn_scales = 1; SYM, ASYM and TERNARY). Each group's
 * scale s, and for ASYM its zero point z, become trainable parameters of
 * the student (LSQ; the zero point as in EfficientQAT): while the
 * quantizer is bound, the model's tensor table (qkd/model.h) gains, per
 * targeted weight W of rows x cols, a tensor "<W>.scale" of kind
 * QKD_TENSOR_QUANT_SCALE and, for ASYM, "<W>.zero" of kind
 * QKD_TENSOR_QUANT_ZERO, each of shape [rows][ceil(cols / G)] (per
 * channel [rows][1], per tensor [1][1]) holding the groups in the order of
 * qkd_quantizer_quantize. Binding sets them to the scales and zero points
 * the quantizer computes from the weights (min-max, a FIXED clip applied)
 * and qkd_quantizer_calibrate sets them again from the clamped weights, so
 * an untrained student's Q(w) is bit for bit the one of a quantizer
 * without learn_scales; from then on only the optimizer (or
 * qkd_model_tensor_set) changes them. The forward reads them instead of
 * computing them from the group: s' = max(s, FLT_MIN), z' = clamp(R(z), 0,
 * 2^b - 1) (the floor and the rounding pass gradients straight through),
 * and Q = s' (clamp(R(w / s') + z', a, b) - z') with [a, b] the scheme's
 * code range (SYM: z' = 0). The backward adds, besides dL/dw, the
 * gradients of every group's s and z (summed over the group):
 *   STE, code k = R(w / s') + z' inside [a, b]:
 *        dQ/dw = 1, dQ/ds = R(w / s') - w / s' (LSQ), dQ/dz = 0;
 *   STE, k outside (clamped):
 *        dQ/dw = 0 (the mask), dQ/ds = clamp(k, a, b) - z', dQ/dz = -s';
 *   CONTINUOUS: the exact derivatives of the smooth forward above in w
 *        and s, and dQ/dz = s' (SoftClamp'(k) - 1), k = round_T(w / s') +
 *        z' (straight through the rounding of z).
 * TERNARY learns its s only (the threshold D still comes from the group):
 * Q = s' c, dQ/ds = c, dQ/dw as without learn_scales (STE), or the smooth
 * form's derivatives. LSQ's gradient scale 1/sqrt(group size * b) (b the
 * top code) is not applied: a scale's gradient is the plain gradient of
 * the straight-through forms above, and qkd_optimizer_set_group gives the
 * scale tensors a learning rate of their own where needed. Create the
 * optimizer after binding (it sees the table of its creation).
 * qkd_quantizer_quantize, which sees a quantizer alone, computes min-max
 * scales; a learned student's Q(w) is what its own forward reads.
 *
 * Format schemes (QKD_QUANT_Q8_0 .. QKD_QUANT_TQ2_0) are llama.cpp's GGUF
 * storage types: Q(w) of each row is exactly ggml's reference dequantize(
 * quantize(row)) (imatrix-free), block by block, so a student's weights
 * equal, bit for bit, the dequantized weights of the GGUF file that
 * qkd_model_save_gguf writes. Blocks lie along each row (the input
 * dimension): 32 values for Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; 256 for Q4_K,
 * Q6_K, TQ2_0. Scales are fp16 and codes are rounded as ggml rounds them
 * (docs/formats.md gives each layout). A row whose length the block does
 * not divide falls back: a 256-value format to Q8_0 when 32 divides the
 * row, and any format to F16 (each weight rounded to the nearest half,
 * ties to even) otherwise; stories260K's ffn_down (rows of 172) is F16
 * under every format, its other linears (rows of 64) Q8_0 under Q4_K,
 * Q6_K and TQ2_0. bits, group_size and clip_ratio are ignored; clip
 * must be NONE and the estimator STE (a plain
 * straight-through gradient). Groups are the format's sub-blocks, each
 * with one scale and one offset: value = code * scale + offset, exactly
 * in float (Q8_0: 32 values, offset 0; Q4_0 and Q5_0: 32, offset -8 d and
 * -16 d; Q4_1 and Q5_1: 32, offset m; Q4_K: 32, scale d sc, offset
 * -dmin mn; Q6_K: 16, scale d sc, offset -32 d sc; TQ2_0: 256, offset -d).
 * Codes are the stored ones (Q8_0 -128..127; Q4_0, Q4_1, Q4_K 0..15;
 * Q5_0, Q5_1 0..31; Q6_K 0..63; TQ2_0 0..2); an F16 fallback row has no
 * groups and its codes are the binary16 bit patterns.
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
    QKD_QUANT_TERNARY = 2,
    /* llama.cpp's GGUF formats (see above). @since 0.1 */
    QKD_QUANT_Q8_0 = 3,
    QKD_QUANT_Q4_0 = 4,
    QKD_QUANT_Q4_1 = 5,
    QKD_QUANT_Q5_0 = 6,
    QKD_QUANT_Q5_1 = 7,
    QKD_QUANT_Q4_K = 8,
    QKD_QUANT_Q6_K = 9,
    QKD_QUANT_TQ2_0 = 10
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
    int act_bits;             /* 0: off; else (2..16) the input of every
                                 targeted linear is fake-quantized per
                                 token, symmetric, dynamic (LLM-QAT), STE */
    int kv_bits;              /* 0: off; else (2..16) keys and values per
                                 token, symmetric, before RoPE (LLM-QAT),
                                 STE */
    int learn_scales;         /* 0 or 1: each group's scale (and ASYM zero
                                 point) is a trainable tensor of the bound
                                 student (see above); SYM, ASYM, TERNARY */
} qkd_quant_params;

/* Defaults: ASYM, 4 bits, group 128, no clip (clip_ratio 1), STE,
 * sharpness 10 / 10, activations and KV cache in float, scales computed
 * from the weights (learn_scales 0). @since 0.1 */
QKD_API void qkd_quant_params_init(qkd_quant_params *p);

/* *p is copied. *out: owned, free with qkd_quantizer_free (after every
 * model it is bound to is freed or unbound); NULL on error. Errors:
 * INVALID_ARG (size field, unknown scheme, clip mode or estimator, bits not
 * in {2,3,4,8} for SYM/ASYM, a format scheme with a clip or the
 * CONTINUOUS estimator, group_size < -1, clip_ratio outside (0,1],
 * sharpness not positive and finite, act_bits/kv_bits neither 0 nor in
 * [2, 16], learn_scales neither 0 nor 1 or set with a format scheme),
 * UNSUPPORTED (learn_scales on a backend without its kernels), NO_MEMORY.
 * A quantizer is used by one thread at a time, with the models bound to
 * it. @since 0.1 */
QKD_API qkd_status qkd_quantizer_create(qkd_context *ctx, const qkd_quant_params *p,
                                        qkd_quantizer **out);
/* Accepts NULL. @since 0.1 */
QKD_API void qkd_quantizer_free(qkd_quantizer *q);

/* Number of groups a rows x cols weight has (per row: ceil(cols / G);
 * rows per channel; 1 per tensor; a format scheme: rows x cols / (the
 * group of the row's format), 0 for an F16 fallback); 0 for NULL q or an
 * empty shape. @since 0.1 */
QKD_API int64_t qkd_quantizer_n_groups(const qkd_quantizer *q, int64_t rows, int64_t cols);

/* Quantize a host weight w[rows][cols] with hard rounding, on the
 * context's backend (the very kernel a student's forward runs, so wq is
 * bit for bit what a bound student computes). Any output may be NULL:
 * wq[rows][cols] the dequantized values, codes[rows][cols] the integer
 * codes as deployed (SYM/TERNARY signed, ASYM in 0..2^b-1; wq = (codes -
 * zeros) * scales), scales[n_groups] and zeros[n_groups] (ASYM's integer
 * zero point; 0 for others), groups in row-major order (row, then group
 * along the row). Format schemes give the file's codes, and each group's
 * scale and offset in scales and zeros (wq = codes * scales + zeros). A
 * FIXED clip applies. All outputs are copied (caller's memory). Errors: INVALID_ARG (NULL q or w, empty shape), NON_FINITE (a
 * NaN/Inf weight: the message gives its index, row and column), NO_MEMORY,
 * BACKEND. @since 0.1 */
QKD_API qkd_status qkd_quantizer_quantize(qkd_quantizer *q, const float *w,
                                          int64_t rows, int64_t cols, float *wq,
                                          int32_t *codes, float *scales, float *zeros);

/* ---- binding to a student ------------------------------------------------ */

/* Which linear weights a bound quantizer covers (bit mask of
 * 1u << qkd_tensor_kind). QKD_QUANT_TARGET_LINEAR is every attention and
 * MLP projection; the output head and embeddings stay in float unless
 * named. A tied model's head is token_embd: naming OUTPUT or TOKEN_EMBD
 * quantizes that one tensor for both uses, as a deployed file stores it
 * once. */
#define QKD_QUANT_TARGET(kind) (1u << (kind))
#define QKD_QUANT_TARGET_LINEAR                                                     \
    (QKD_QUANT_TARGET(QKD_TENSOR_ATTN_Q) | QKD_QUANT_TARGET(QKD_TENSOR_ATTN_K) |    \
     QKD_QUANT_TARGET(QKD_TENSOR_ATTN_V) | QKD_QUANT_TARGET(QKD_TENSOR_ATTN_OUTPUT) | \
     QKD_QUANT_TARGET(QKD_TENSOR_FFN_GATE) | QKD_QUANT_TARGET(QKD_TENSOR_FFN_DOWN) | \
     QKD_QUANT_TARGET(QKD_TENSOR_FFN_UP))

/* Make `model` a student: from now on its forward uses Q(w) for every
 * targeted tensor and its backward applies the estimator. q is borrowed
 * until the model is freed or unbound (q == NULL unbinds; targets is then
 * ignored); binding again replaces the binding.
 *
 * Q(w) lives in a device copy of each targeted tensor, refreshed from the
 * latent weights at the start of every qkd_model_forward (so optimizer
 * steps and qkd_model_tensor_set take effect at the next forward) and, with
 * hard rounding, when qkd_model_decode starts a sequence (pos 0). The
 * backward collects dL/dQ(w) in a buffer of its own and ADDS the
 * estimator's dL/dw to the model's gradient, so micro-batches accumulate;
 * qkd_model_grad_get reads dL/dw. With act_bits, every targeted linear's
 * input is quantized per token (symmetric, dynamic) and with kv_bits the
 * key and value projections' outputs, before RoPE (LLM-QAT); both pass
 * gradients straight through, in training and in decoding. Buffers are
 * allocated here and at the first forward of a shape: a training step of
 * a known shape allocates nothing. Binding and unbinding discard the last
 * forward and the decode cache. With learn_scales, binding appends the
 * quantizer's scale (and zero point) tensors to the model's table and sets
 * them from the weights; binding another quantizer or unbinding removes
 * them (their values are lost).
 *
 * Errors: INVALID_ARG (NULL model, targets empty, naming no tensor kind or
 * naming norm tensors, q from another context), NON_FINITE (a targeted
 * weight is NaN/Inf: the message names the tensor and index), NO_MEMORY;
 * on error the previous binding is kept. @since 0.1 */
QKD_API qkd_status qkd_model_set_quantizer(qkd_model *model, qkd_quantizer *q,
                                           unsigned targets);

/* Calibrate a SEARCH clip on model (already bound to q) and clamp its
 * latent weights in place. SEARCH_OUTPUT forwards the calibration batch
 * tokens[B*T] through the float model (weights, activations and cache
 * unquantized), keeps each targeted linear's inputs (every layer sees the
 * unclipped layers below it, as in BitDistiller) and scores each group on
 * at most 512 input rows, spread evenly over the B*T (row k*B*T/n); an
 * untied token_embd has no input and is scored on its weight error.
 * SEARCH_WEIGHT needs no data (tokens may be NULL). Each group keeps the
 * candidate with the least error, the unclipped one on ties, so the error
 * never grows. Learned scales (learn_scales) are then set again from the
 * clamped weights. While it runs, SEARCH_OUTPUT holds the inputs' Gram
 * blocks: cols x min(G, cols) doubles per tensor, cols x cols per channel
 * or per tensor. Discards the last forward. Errors: INVALID_ARG
 * (NULL), STATE (not bound to q, or clip is not a SEARCH mode),
 * NON_FINITE, NO_MEMORY, plus those of qkd_model_forward. @since 0.1 */
QKD_API qkd_status qkd_quantizer_calibrate(qkd_quantizer *q, qkd_model *model,
                                           const int32_t *tokens, int B, int T);

/* Anneal the CONTINUOUS estimator's rounding sharpness T (> 0, finite),
 * from the next forward on. Errors: INVALID_ARG. @since 0.1 */
QKD_API qkd_status qkd_quantizer_set_sharpness(qkd_quantizer *q, float round_sharpness);

/* Switch the estimator of q (and so of every student bound to it) from
 * the next forward on: e.g. STE to evaluate a CONTINUOUS student with hard
 * rounding, then back. Errors: INVALID_ARG. @since 0.1 */
QKD_API qkd_status qkd_quantizer_set_estimator(qkd_quantizer *q, qkd_estimator estimator);

#ifdef __cplusplus
}
#endif
#endif
