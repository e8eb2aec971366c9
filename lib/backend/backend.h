/* The backend table: every kernel the model and training need, as
 * function pointers over memory that lives on the backend's device.
 *
 * Rules every implementation follows (the reference backend is the oracle
 * the others are tested against):
 *   - Pointers passed to kernels are device pointers from `alloc`; the
 *     host only touches device memory through upload/download. A CUDA
 *     backend can therefore keep a whole training step on the GPU.
 *   - Kernels are enqueued; `sync` waits for all of them. Kernels report
 *     no errors (their arguments are validated by the caller); only
 *     memory and transfer calls return a status.
 *   - Matrices are row-major. A linear layer's weight W is [OC][C]
 *     (out features x in features), y = x W^T.
 *   - Forward kernels write (=) their outputs. Backward kernels ADD (+=)
 *     into every gradient they produce, activation gradients included;
 *     the caller zeroes gradient buffers when a pass starts (llm.c style).
 *   - Results must not depend on the thread count.
 *   - Optional slots may be NULL; the caller then uses a fallback built
 *     from other slots. Backend-specific extras are looked up by name
 *     through `extra`, never by growing the table.
 *
 * ABI: a backend fills `abi` with QKD__BACKEND_ABI; the registry refuses
 * a table of another version. Fill tables with designated initialisers. */
#ifndef QKD_LIB_BACKEND_H
#define QKD_LIB_BACKEND_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "core/core.h"

#define QKD__BACKEND_ABI 18

typedef struct qkd__backend qkd__backend;

/* An input of a bf16 product: fp32 values, rounded to bf16 (nearest even)
 * as they are read, or bf16 bits. Exactly one of the two is set. */
typedef struct qkd__bf16_in {
    const float *f32;
    const uint16_t *bits;
} qkd__bf16_in;

/* x as an fp32 input of a bf16 product. */
static inline qkd__bf16_in qkd__bf16_f32(const float *x)
{
    return (qkd__bf16_in){.f32 = x};
}

/* One linear of linears_backward_bf16_bits: y = x W^T. */
typedef struct qkd__bf16_linear {
    qkd__bf16_in w; /* W [OC][C] */
    qkd__bf16_in x; /* its input [N][C] */
    float *dw;      /* where W's gradient goes [OC][C] */
    int OC;
} qkd__bf16_linear;

/* One term of kd_loss: the qkd_loss_term fields a kernel reads, resolved. */
typedef struct qkd__kd_term {
    int kind;              /* a qkd_loss_kind */
    float temperature;     /* 1 for CE and MSE */
    float beta;            /* CAKLD's and JSD's weight when beta_dev is NULL */
    const float *beta_dev; /* else that weight, one float in backend memory */
    float scale;           /* factor of the gradient rows */
    int accumulate;        /* 1: add the gradient to ds; 0: write it */
} qkd__kd_term;

/* How fake_quant kernels quantize: one resolved quantizer setting (see
 * include/qkd/quant.h for the math of each scheme). */
typedef struct qkd__quant_spec {
    int scheme;        /* qkd_quant_scheme */
    int bits;          /* ignored for TERNARY */
    int64_t group;     /* values per group along a row (> 0); when it does
                          not divide the row, the row's last group is partial */
    float clip_ratio;  /* FIXED clip factor on the group's range; 1 = none */
    int continuous;    /* 0: hard round, STE; 1: round_T and SoftClamp */
    float round_T;     /* sharpness of round_T */
    float clamp_T;     /* sharpness of SoftClamp's gate */
} qkd__quant_spec;

/* A weight a fused product reads as Q(w): the latent weights, the groups
 * fakequant_groups computed from them, and the setting. */
typedef struct qkd__qweight {
    const float *w;              /* [OC][C] */
    const float *scales, *zeros; /* [OC][ceil(C / group)], fakequant_groups' */
    const qkd__quant_spec *spec; /* hard rounding; SYM, ASYM or TERNARY */
    float *scratch; /* [OC][C] floats a backend may write Q(w) to (the
                       reference composes through it); unspecified after */
} qkd__qweight;

/* One tensor of a multi-tensor optimizer update: parameters, gradient,
 * AdamW's two moments, the element count and the learning rate; and,
 * for adamw_update_multi_dev only, where to write the fake quantization
 * of the updated parameters (wq NULL: nowhere). */
typedef struct qkd__update_span {
    float *p;
    const float *g;
    float *m, *v;
    size_t n;
    float lr;
    uint16_t *wq;          /* Q(p) as bf16 bits, as fakequant_forward_bf16 writes it */
    float *scales, *zeros; /* [n / group]: each group's scale and zero point */
} qkd__update_span;

/* An optimizer step decided on the device (qkd_optimizer_step_deferred),
 * in backend memory: what step_decide writes and adamw_update_multi_dev
 * reads. */
typedef struct qkd__step_state {
    int64_t t;        /* steps applied */
    float rbc1, rbc2; /* qkd__adamw_rbc of b1 and b2 at t */
    double norm;      /* the last step's global gradient norm, before clipping */
    float gscale;     /* the last step's clip factor (1: not clipped) */
    int32_t clipped;  /* 1: the last step scaled its gradients down */
    int32_t skipped;  /* 1: the last step's norm was not finite; nothing applied */
} qkd__step_state;

#ifdef __CUDACC__
#define QKD__HOST_DEVICE __host__ __device__
#else
#define QKD__HOST_DEVICE
#endif

/* AdamW's constants at step t, in float. rbc is the reciprocal of the
 * bias correction 1 - b^t, computed in double and rounded once. */
typedef struct qkd__adamw_k {
    float b1, c1, b2, c2; /* c = 1 - b */
    float eps, wd, rbc1, rbc2;
} qkd__adamw_k;

static inline QKD__HOST_DEVICE float qkd__adamw_rbc(float b, int64_t t)
{
    return (float)(1.0 / (1.0 - pow((double)b, (double)t)));
}

static inline QKD__HOST_DEVICE qkd__adamw_k qkd__adamw_k_of(float b1, float b2, float eps,
                                                            float wd, float rbc1, float rbc2)
{
    qkd__adamw_k k = {b1, 1.0f - b1, b2, 1.0f - b2, eps, wd, rbc1, rbc2};
    return k;
}

static inline QKD__HOST_DEVICE qkd__adamw_k qkd__adamw_k_at(float b1, float b2, float eps,
                                                            float wd, int64_t t)
{
    return qkd__adamw_k_of(b1, b2, eps, wd, qkd__adamw_rbc(b1, t), qkd__adamw_rbc(b2, t));
}

/* AdamW on one parameter, in float as PyTorch keeps its state: every
 * backend computes these operations in this order, with no contraction
 * into FMA (the SIMD backend as vectors), so all give the same bits. In
 * double, the CUDA update that also quantizes was bound by its
 * instructions, not by memory (docs/benchmarks.md). */
static inline QKD__HOST_DEVICE void qkd__adamw_one(float *p, float g, float *m, float *v,
                                                   float lr, const qkd__adamw_k *k)
{
    const float mi = k->b1 * *m + k->c1 * g;
    const float vi = k->b2 * *v + k->c2 * g * g;
    const float step = mi * k->rbc1 / (sqrtf(vi * k->rbc2) + k->eps) + k->wd * *p;
    *m = mi;
    *v = vi;
    *p = *p - lr * step;
}

/* step_decide's decision from sum, the double sum of the squared norms:
 * one definition for every backend, host and device. */
static inline QKD__HOST_DEVICE void qkd__step_decide(qkd__step_state *st, double sum,
                                                     float max_norm, float b1, float b2)
{
    st->norm = sqrt(sum);
    st->skipped = !isfinite(st->norm);
    st->clipped = !st->skipped && max_norm > 0.0f && st->norm > max_norm;
    st->gscale = st->clipped ? (float)(max_norm / st->norm) : 1.0f;
    st->t += !st->skipped;
    st->rbc1 = qkd__adamw_rbc(b1, st->t);
    st->rbc2 = qkd__adamw_rbc(b2, st->t);
}

struct qkd__backend {
    uint32_t abi;
    const char *name;
    qkd_context *ctx; /* allocator and error reporting */
    void *impl;       /* the backend's private state */

    void (*destroy)(qkd__backend *b);
    /* Look up a backend-specific extra function by name; NULL if none. */
    void *(*extra)(qkd__backend *b, const char *name);

    /* ---- memory ---------------------------------------------------- */
    /* bytes > 0; *out is 64-byte aligned. NO_MEMORY or BACKEND on failure
     * (the error is recorded on ctx). */
    qkd_status (*alloc)(qkd__backend *b, size_t bytes, void **out);
    void (*free)(qkd__backend *b, void *ptr); /* accepts NULL */
    qkd_status (*upload)(qkd__backend *b, void *dst, const void *src, size_t bytes);
    qkd_status (*download)(qkd__backend *b, void *dst, const void *src, size_t bytes);
    qkd_status (*sync)(qkd__backend *b);

    /* ---- elementwise ------------------------------------------------ */
    void (*fill)(qkd__backend *b, float *x, float value, size_t n);
    void (*copy)(qkd__backend *b, float *dst, const float *src, size_t n);
    /* out = x + y (the residual add; its backward is the identity) */
    void (*add)(qkd__backend *b, float *out, const float *x, const float *y, size_t n);
    /* y += alpha * x */
    void (*axpy)(qkd__backend *b, float *y, float alpha, const float *x, size_t n);
    void (*scale)(qkd__backend *b, float *x, float alpha, size_t n);
    /* *out (one device float) = sum of x[i] (summed in double). */
    void (*sum)(qkd__backend *b, float *out, const float *x, size_t n);
    /* *out (one device float) = sum of x[i]^2 (summed in double). */
    void (*sum_squares)(qkd__backend *b, float *out, const float *x, size_t n);
    /* Optional: dst = x rounded to bf16 (nearest even), as raw bits. A
     * frozen model with bf16-bits products keeps its weights so, rounded
     * once instead of by every product (NULL: every product rounds them). */
    void (*to_bf16_bits)(qkd__backend *b, uint16_t *dst, const float *x, size_t n);
    /* x[i] rounded to bf16 (nearest even) in place, kept as float. Needed
     * with the bf16 products (matmul_*_bf16): a bf16 model stores the
     * products SwiGLU reads and the projections added to the residual in
     * bf16, as PyTorch's bf16 products do; without the bf16-bits family
     * it rounds their fp32 values so. */
    void (*round_to_bf16)(qkd__backend *b, float *x, size_t n);

    /* ---- linear layers ---------------------------------------------- */
    /* out[N][OC] = inp[N][C] . w[OC][C]^T */
    void (*matmul_forward)(qkd__backend *b, float *out, const float *inp,
                           const float *w, int N, int C, int OC);
    /* dinp[N][C] += dout[N][OC] . w[OC][C] */
    void (*matmul_backward_input)(qkd__backend *b, float *dinp, const float *dout,
                                  const float *w, int N, int C, int OC);
    /* dw[OC][C] += dout[N][OC]^T . inp[N][C] */
    void (*matmul_backward_weight)(qkd__backend *b, float *dw, const float *dout,
                                   const float *inp, int N, int C, int OC);
    /* Optional: the same three products with every input element rounded
     * to bf16 (nearest even) and fp32-or-better accumulation, for models
     * set to QKD_MATMUL_BF16. NULL when the backend has none: the model
     * then refuses that precision. */
    void (*matmul_forward_bf16)(qkd__backend *b, float *out, const float *inp,
                                const float *w, int N, int C, int OC);
    void (*matmul_backward_input_bf16)(qkd__backend *b, float *dinp, const float *dout,
                                       const float *w, int N, int C, int OC);
    void (*matmul_backward_weight_bf16)(qkd__backend *b, float *dw, const float *dout,
                                        const float *inp, int N, int C, int OC);
    /* Optional, the bf16-bits family (all of matmul_*_bf16_bits,
     * rmsnorm_forward_bf16_bits, add_rmsnorm_forward_bf16_bits,
     * swiglu_*_bf16_bits and fakequant_forward_bf16, or none): the three
     * bf16 products with operands that may already be bf16 bits
     * (qkd__bf16_in), equal to them on the fp32 values those bits decode
     * to. A model keeps its linear layers' inputs, some outputs and output
     * gradients and its quantized weights in bf16 with them, so no product
     * converts what a kernel could write in bf16 at once. The backward
     * products add (accumulate 1) or write (0: dinp = dout . w, dw =
     * dout^T . inp, the old contents, NaN included, not read), so the
     * first product into a gradient needs no zeroed buffer. */
    void (*matmul_forward_bf16_bits)(qkd__backend *b, float *out, qkd__bf16_in inp,
                                     qkd__bf16_in w, int N, int C, int OC);
    void (*matmul_backward_input_bf16_bits)(qkd__backend *b, float *dinp, qkd__bf16_in dout,
                                            qkd__bf16_in w, int N, int C, int OC,
                                            int accumulate);
    void (*matmul_backward_weight_bf16_bits)(qkd__backend *b, float *dw, qkd__bf16_in dout,
                                             qkd__bf16_in inp, int N, int C, int OC,
                                             int accumulate);
    /* matmul_forward_bf16_bits and matmul_backward_input_bf16_bits
     * (written, not added) with the product rounded to bf16 (nearest even)
     * as it is written, as raw bits: the gate, up and projection outputs,
     * SwiGLU's output gradient. */
    void (*matmul_forward_to_bf16_bits)(qkd__backend *b, uint16_t *out, qkd__bf16_in inp,
                                        qkd__bf16_in w, int N, int C, int OC);
    void (*matmul_backward_input_to_bf16_bits)(qkd__backend *b, uint16_t *dinp,
                                               qkd__bf16_in dout, qkd__bf16_in w, int N, int C,
                                               int OC);
    /* Optional, with the family: the backward of n linears from their
     * output gradients in rows (as this backend's attention_backward_bf16
     * writes q, k and v's, and swiglu_backward_bf16_bits gate and up's
     * with ld = 2 cols): row t holds each linear's gradient row t in turn,
     * dout[N][sum OC], the i-th from column sum_{j<i} OC_j on. dx
     * [N][C] = (accumulate_x: +=) sum_i dout_i . W_i, and dw_i +=
     * (accumulate_w; else =) dout_i^T . x_i, the products of
     * matmul_backward_*_bf16_bits; dx within fp32 rounding of their sum
     * (one accumulation may serve them all). A backend without the slot
     * writes those gradients one linear after the other instead (blocks:
     * dout_i [N][OC_i] from element N sum_{j<i} OC_j on), and the model
     * runs the products linear by linear. */
    void (*linears_backward_bf16_bits)(qkd__backend *b, float *dx, int accumulate_x,
                                       const uint16_t *dout, const qkd__bf16_linear *lin, int n,
                                       int N, int C, int accumulate_w);

    /* ---- embedding -------------------------------------------------- */
    /* out[N][C] = table[ids[i]][C]; ids are valid (checked by caller) */
    void (*embedding_forward)(qkd__backend *b, float *out, const int32_t *ids,
                              const float *table, int N, int C);
    /* dtable[ids[i]][C] += dout[i][C] */
    void (*embedding_backward)(qkd__backend *b, float *dtable, const float *dout,
                               const int32_t *ids, int N, int C, int V);

    /* ---- RMSNorm ------------------------------------------------------ */
    /* out = inp * rstd * w, rstd[i] = 1/sqrt(mean(inp[i]^2) + eps) (saved) */
    void (*rmsnorm_forward)(qkd__backend *b, float *out, float *rstd, const float *inp,
                            const float *w, int N, int C, float eps);
    /* Optional (the bf16-bits family): rmsnorm_forward with out rounded to
     * bf16 (nearest even, raw bits) as it is written. */
    void (*rmsnorm_forward_bf16_bits)(qkd__backend *b, uint16_t *out, float *rstd,
                                      const float *inp, const float *w, int N, int C,
                                      float eps);
    /* Optional (the bf16-bits family): a residual add of a projection's
     * output y, as bf16 bits, and the RMSNorm of its sum in one pass:
     * sum = x + y (N x C), then out and rstd as rmsnorm_forward_bf16_bits
     * writes them from sum. */
    void (*add_rmsnorm_forward_bf16_bits)(qkd__backend *b, float *sum, uint16_t *out,
                                          float *rstd, const float *x, const uint16_t *y,
                                          const float *w, int N, int C, float eps);
    /* dinp += ..., dw += ... from the saved rstd */
    void (*rmsnorm_backward)(qkd__backend *b, float *dinp, float *dw, const float *dout,
                             const float *inp, const float *w, const float *rstd,
                             int N, int C);
    /* Optional (NULL: the caller's products read dinp in fp32):
     * rmsnorm_backward that also writes dinp's new values rounded to bf16
     * (nearest even, raw bits) into dinp_bits, for the products that read
     * that gradient next. */
    void (*rmsnorm_backward_bf16_bits)(qkd__backend *b, float *dinp, uint16_t *dinp_bits,
                                       float *dw, const float *dout, const float *inp,
                                       const float *w, const float *rstd, int N, int C);

    /* ---- RoPE ----------------------------------------------------------
     * In place on x[B][T][n_heads][head_dim]; row t has position pos0 + t.
     * Interleaved pairs (x[2j], x[2j+1]) rotate by angle
     * pos * theta^(-2j/head_dim) (llama2.c / GGUF order). The backward
     * rotates the gradient by the opposite angle (also in place). */
    void (*rope_forward)(qkd__backend *b, float *x, int B, int T, int n_heads,
                         int head_dim, int pos0, float theta);
    void (*rope_backward)(qkd__backend *b, float *dx, int B, int T, int n_heads,
                          int head_dim, int pos0, float theta);

    /* ---- causal grouped-query attention ------------------------------------
     * q, out: [B][Tq][n_heads][hd]. k, v: [B][kv_len][n_kv][hd]; query row t
     * sits at position pos0 + t and attends keys 0..pos0+t (so
     * pos0 + Tq <= kv_len). Query head h uses kv head h / (n_heads/n_kv).
     * Scores are scaled by 1/sqrt(hd). `scratch` is the backend's: the
     * forward leaves in it what the backward needs (the reference: the
     * probabilities; SIMD: one logsumexp per query row; CUDA: that, and
     * its bf16 attention's copies of q, k and v), and kernels may use the
     * rest as working memory, so they allocate nothing. Its size in floats
     * comes from attention_scratch_floats. A backward reads the scratch of
     * the forward just before it on the same inputs. */
    size_t (*attention_scratch_floats)(qkd__backend *b, int B, int Tq, int kv_len,
                                       int n_heads, int n_kv, int hd);
    void (*attention_forward)(qkd__backend *b, float *out, float *scratch,
                              const float *q, const float *k, const float *v,
                              int B, int Tq, int pos0, int kv_len,
                              int n_heads, int n_kv, int hd);
    /* Training form only: pos0 = 0, kv_len = T. dq, dk, dv += ... */
    void (*attention_backward)(qkd__backend *b, float *dq, float *dk, float *dv,
                               const float *dout, float *scratch,
                               const float *q, const float *k, const float *v,
                               const float *out, int B, int T,
                               int n_heads, int n_kv, int hd);
    /* Optional: the same two in bf16 precision, for models set to
     * QKD_MATMUL_BF16 (NULL: such models keep fp32 attention). Every
     * input of a product is rounded to bf16 (nearest even) as it enters
     * it: q and k in the scores, the probabilities and v in the output,
     * dout and v in the probabilities' gradient, the probabilities and
     * dout in dv, the scores' gradients and k (q) in dq (dk). Softmax, the
     * row term dout . out and every accumulation stay fp32 or better.
     * Same scratch as the fp32 pair.
     * With rope_theta > 0 they also apply RoPE (rope_forward's rotation at
     * that theta), so that no pass of its own reads and writes q and k: q
     * and k arrive un-rotated, query row t is rotated to position pos0 + t
     * and key row j to position j, in fp32, before the rounding. The
     * backward's dq and dk are then the gradients of the un-rotated q and
     * k: R^T (the rotated q's gradient), as rope_backward on it would
     * give. rope_theta 0: q and k arrive rotated. Unlike the fp32 pair's,
     * this backward WRITES dq, dk and dv (their old contents, NaN
     * included, are not read), so the caller zeroes nothing; with
     * dqkv_bits it writes them there instead, as bf16 bits for the
     * products that read them, and dq, dk, dv go unused: in the layout of
     * linears_backward_bf16_bits's dout where the backend has that slot
     * (rows: each token's dq, dk then dv), else one after the other (B T
     * n_heads hd values of dq, then B T n_kv hd of dk and of dv).
     * out_bits: NULL, or where the forward also writes out rounded to
     * bf16 (nearest even, raw bits), the operand of the output projection;
     * with out_bits, out may be NULL: the bits alone are written. The
     * backward reads the forward's output (the row term dout . out) as
     * given: fp32 values, or those bits. */
    void (*attention_forward_bf16)(qkd__backend *b, float *out, uint16_t *out_bits,
                                   float *scratch,
                                   const float *q, const float *k, const float *v,
                                   int B, int Tq, int pos0, int kv_len,
                                   int n_heads, int n_kv, int hd, float rope_theta);
    void (*attention_backward_bf16)(qkd__backend *b, float *dq, float *dk, float *dv,
                                    const float *dout, float *scratch,
                                    const float *q, const float *k, const float *v,
                                    qkd__bf16_in out, int B, int T,
                                    int n_heads, int n_kv, int hd, float rope_theta,
                                    uint16_t *dqkv_bits);
    /* Nonzero where attention_backward_bf16 reads q, k and v from the
     * copies its forward left in the scratch alone, never from its q, k
     * and v: a training forward may then write every layer's q, k and v
     * into the same buffers. */
    int attention_bf16_from_scratch;

    /* ---- SwiGLU ---------------------------------------------------------- */
    /* out = silu(gate) * up, silu(x) = x / (1 + exp(-x)) */
    void (*swiglu_forward)(qkd__backend *b, float *out, const float *gate,
                           const float *up, size_t n);
    /* Optional (the bf16-bits family): swiglu_forward on gate and up as
     * bf16 bits, with out rounded to bf16 (nearest even, raw bits). */
    void (*swiglu_forward_bf16_bits)(qkd__backend *b, uint16_t *out, const uint16_t *gate,
                                     const uint16_t *up, size_t n);
    /* dgate += ..., dup += ... */
    void (*swiglu_backward)(qkd__backend *b, float *dgate, float *dup,
                            const float *dout, const float *gate, const float *up,
                            size_t n);
    /* Optional (the bf16-bits family): the gradients of swiglu_backward
     * on dout, gate and up ([rows][cols] bf16 bits), into zeroed buffers,
     * rounded to bf16 (raw bits) and WRITTEN, not added: the operands of
     * the gate and up products' backward. Row t of dgate and of dup lies
     * at t ld of each: ld = cols for two blocks, 2 cols with dup = dgate +
     * cols for linears_backward_bf16_bits's rows. out, where not NULL,
     * gets swiglu_forward_bf16_bits's output again, bit for bit ([rows]
     * [cols]): the down product's weight gradient reads it, so the
     * layers need not keep it from their forwards. */
    void (*swiglu_backward_bf16_bits)(qkd__backend *b, uint16_t *dgate, uint16_t *dup,
                                      size_t ld, uint16_t *out, const uint16_t *dout,
                                      const uint16_t *gate, const uint16_t *up, size_t rows,
                                      size_t cols);

    /* ---- softmax over rows of V ---------------------------------------- */
    /* probs = softmax(logits * inv_temp) row-wise */
    void (*softmax_forward)(qkd__backend *b, float *probs, const float *logits,
                            int N, int V, float inv_temp);
    /* dlogits += inv_temp * probs * (dprobs - sum(dprobs * probs)) */
    void (*softmax_backward)(qkd__backend *b, float *dlogits, const float *dprobs,
                             const float *probs, int N, int V, float inv_temp);
    /* logp = log_softmax(logits * inv_temp) row-wise */
    void (*log_softmax_forward)(qkd__backend *b, float *logp, const float *logits,
                                int N, int V, float inv_temp);
    /* dlogits += inv_temp * (dlogp - softmax * sum(dlogp)), from logp */
    void (*log_softmax_backward)(qkd__backend *b, float *dlogits, const float *dlogp,
                                 const float *logp, int N, int V, float inv_temp);

    /* ---- cross-entropy, fused with the softmax ------------------------------
     * losses[i] = -log softmax(logits[i])[targets[i]]; 0 where target < 0. */
    void (*cross_entropy_forward)(qkd__backend *b, float *losses, const float *logits,
                                  const int32_t *targets, int N, int V);
    /* dlogits[i] += scale * (softmax(logits[i]) - onehot(targets[i]));
     * rows with target < 0 get nothing. */
    void (*cross_entropy_backward)(qkd__backend *b, float *dlogits, const float *logits,
                                   const int32_t *targets, float scale, int N, int V);

    /* ---- optimizer updates ---------------------------------------------
     * AdamW on n parameters at step t (qkd__adamw_one, in float): m = b1 m
     * + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr * (m/bc1 / (sqrt(v/bc2) +
     * eps) + wd * p), where bc1 = 1-b1^t, bc2 = 1-b2^t. */
    void (*adamw_update)(qkd__backend *b, float *p, const float *g, float *m, float *v,
                         size_t n, float lr, float b1, float b2, float eps, float wd,
                         int t);
    /* SGD with momentum: u = momentum u + g; p -= lr * (u + wd * p). */
    void (*sgd_update)(qkd__backend *b, float *p, const float *g, float *u, size_t n,
                       float lr, float momentum, float wd);
    /* Optional (both or none): many tensors in one pass. spans is host
     * memory, read before the call returns. sum_squares_multi writes
     * out[i] = the sum of spans[i].g[j]^2 (summed in double, as
     * sum_squares); adamw_update_multi runs adamw_update on every span at
     * its lr, reading each g[j] as the float g[j] * gscale (what `scale` on
     * a copy gives; 1: g itself). NULL: the caller goes tensor by tensor. */
    void (*sum_squares_multi)(qkd__backend *b, float *out, const qkd__update_span *spans,
                              int n_spans);
    void (*adamw_update_multi)(qkd__backend *b, const qkd__update_span *spans, int n_spans,
                               float gscale, float b1, float b2, float eps, float wd, int t);
    /* Optional (both or none): a step decided on the device, with no host
     * round trip. step_decide reads n squared norms (as sum_squares_multi
     * writes them) and sets st->norm to the root of their double sum in
     * order, skipped (norm not finite), clipped and gscale (max_norm / norm
     * where 0 < max_norm < norm, in float, else 1), adding 1 to st->t
     * unless skipped, then rbc1 and rbc2 for b1 and b2 at that t (once,
     * not in every block of the update). adamw_update_multi_dev is
     * adamw_update_multi with gscale, rbc1 and rbc2 read from st, doing
     * nothing where st->skipped. A span with wq set also gets the fake
     * quantization of its updated p, by fq (hard rounding, SYM or ASYM, in
     * groups of fq->group that tile p: n a multiple of it): what
     * fakequant_forward_bf16(wq, scales, zeros, p, n / group, group, fq)
     * would write after the update, bit for bit, so that a student's next
     * forward need not quantize again (fq NULL: no span has wq). */
    void (*step_decide)(qkd__backend *b, qkd__step_state *st, const float *norms, int n,
                        float max_norm, float b1, float b2);
    void (*adamw_update_multi_dev)(qkd__backend *b, const qkd__update_span *spans, int n_spans,
                                   const qkd__step_state *st, float b1, float b2, float eps,
                                   float wd, const qkd__quant_spec *fq);

    /* ---- fake quantization ------------------------------------------------
     * wq[rows][cols] = Q(w) per group of spec->group values along each row
     * (hard rounding, or round_T / SoftClamp when spec->continuous);
     * scales and zeros [rows][ceil(cols / group)] receive each group's scale
     * and zero point (ASYM; 0 otherwise). Per-tensor quantization is a
     * single row of rows*cols values. */
    void (*fakequant_forward)(qkd__backend *b, float *wq, float *scales, float *zeros,
                              const float *w, int64_t rows, int64_t cols,
                              const qkd__quant_spec *spec);
    /* Optional (the bf16-bits family), for SYM, ASYM and TERNARY:
     * fakequant_forward with Q(w) rounded to bf16 (nearest even, raw bits)
     * in the same pass: a weight operand of the bf16-bits products, never
     * stored in fp32. */
    void (*fakequant_forward_bf16)(qkd__backend *b, uint16_t *wq, float *scales, float *zeros,
                                   const float *w, int64_t rows, int64_t cols,
                                   const qkd__quant_spec *spec);
    /* dw += dQ(w)/dw * dwq, from the forward's scales and zeros: the STE's 1
     * inside the clip range and 0 outside, or the smooth functions'
     * derivative when spec->continuous. */
    void (*fakequant_backward)(qkd__backend *b, float *dw, const float *dwq, const float *w,
                               const float *scales, const float *zeros, int64_t rows,
                               int64_t cols, const qkd__quant_spec *spec);
    /* out[rows][cols] = x quantized per row, symmetric, `bits` bits, scale
     * max|row| / (2^(bits-1) - 1) (dynamic activations and KV cache). The
     * STE backward is the identity, so there is no backward slot. out may
     * equal x. */
    void (*quant_rows)(qkd__backend *b, float *out, const float *x, int64_t rows,
                       int64_t cols, int bits);
    /* Learned scales (LSQ; SYM, ASYM, TERNARY): as fakequant_forward, but
     * each group's scale and zero point are read from scales and zeros
     * (zeros NULL: none) instead of computed from the group; the forms and
     * gradients are in include/qkd/quant.h (learn_scales). */
    void (*fakequant_lsq_forward)(qkd__backend *b, float *wq, const float *w,
                                  const float *scales, const float *zeros, int64_t rows,
                                  int64_t cols, const qkd__quant_spec *spec);
    /* dw += dQ/dw * dwq, dscales += sum over each group of dQ/ds * dwq, and
     * (when dzeros is not NULL) dzeros += sum of dQ/dz * dwq. */
    void (*fakequant_lsq_backward)(qkd__backend *b, float *dw, float *dscales, float *dzeros,
                                   const float *dwq, const float *w, const float *scales,
                                   const float *zeros, int64_t rows, int64_t cols,
                                   const qkd__quant_spec *spec);

    /* Optional (all three or none): fake quantization fused into the
     * products of a student's linear layer, so that Q(w) of the whole
     * weight is never written and read back. For hard rounding
     * (spec->continuous == 0) with SYM, ASYM or TERNARY in groups along
     * the rows. fakequant_groups is fakequant_forward without wq, except
     * that TERNARY's zeros receive each group's threshold D as the largest
     * float not above it (|w| > D exactly when |w| exceeds that float).
     * The two products equal matmul_forward and matmul_backward_input on
     * fakequant_forward's Q(w) (within the backend's matmul tolerance);
     * the weight gradient goes to dL/dQ(w) through matmul_backward_weight
     * and fakequant_backward as without fusion. NULL: the caller writes
     * Q(w) with fakequant_forward and runs the plain products. */
    void (*fakequant_groups)(qkd__backend *b, float *scales, float *zeros, const float *w,
                             int64_t rows, int64_t cols, const qkd__quant_spec *spec);
    /* out[N][OC] = inp[N][C] . Q(w)[OC][C]^T */
    void (*matmul_forward_fq)(qkd__backend *b, float *out, const float *inp,
                              const qkd__qweight *w, int N, int C, int OC);
    /* dinp[N][C] += dout[N][OC] . Q(w)[OC][C] */
    void (*matmul_backward_input_fq)(qkd__backend *b, float *dinp, const float *dout,
                                     const qkd__qweight *w, int N, int C, int OC);

    /* ---- distillation objectives --------------------------------------------
     * Row-wise objective between student logits s and teacher logits t,
     * both [N][V]; term->kind is a qkd_loss_kind (CE reads targets, not t).
     * The vocabulary is processed in chunks with a running max and sum, so
     * no [N][V] probability tensor is stored. With w_i = row_w[i] (1 if
     * row_w is NULL) and L_i the term of row i: row_loss[i] = w_i * L_i (0
     * where targets is given and targets[i] < 0), so the weighted total is
     * one `sum` away. The gradient row g_i = term->scale * w_i * dL_i / ds[i]
     * is added to ds (term->accumulate) or written over it, every row then
     * written (0 at a row targets leave out); or, with ds_bits instead of ds
     * (accumulate 0), written as bf16 bits: those of the float ds would
     * hold, rounded to nearest even. ds and ds_bits NULL: values only.
     * A row whose value is not finite (it reads a NaN or Inf logit) gets a
     * non-finite row_loss and a NaN gradient row, so nothing downstream can
     * mistake it for a finite gradient. */
    void (*kd_loss)(qkd__backend *b, float *row_loss, float *ds, uint16_t *ds_bits,
                    const float *s, const float *t, const int32_t *targets,
                    const float *row_w, int N, int V, const qkd__kd_term *term);
    /* TSLD's token weights: for each of B sequences of T positions,
     * w = softmax over the positions with targets >= 0 of c / tau (0 at the
     * others). c[B*T] is the teacher's per-position cross-entropy. */
    void (*tsld_weights)(qkd__backend *b, float *w, const float *c, const int32_t *targets,
                         int B, int T, float tau);
    /* out[i] = max_j softmax(x[i])_j, the teacher's top-1 probability (NAN
     * for a row holding a non-finite value); 0 where targets is given and
     * targets[i] < 0, so the mean over counted rows is one `sum` away. */
    void (*row_max_prob)(qkd__backend *b, float *out, const float *x, const int32_t *targets,
                         int N, int V);
    /* Optional: kd_loss of a CAKLD term at temperature 1 whose beta is the
     * teacher's confidence: first *beta (one float in backend memory) =
     * the mean top-1 probability of t over n_rows counted rows, what
     * row_max_prob, `sum` and a scale by 1 / n_rows (0 if n_rows is 0)
     * give, then kd_loss with beta_dev = beta (term->beta and beta_dev are
     * not read). row_loss is also its scratch. NULL: the caller runs
     * those slots. */
    void (*kd_loss_confidence)(qkd__backend *b, float *row_loss, float *ds, uint16_t *ds_bits,
                               const float *s, const float *t, const int32_t *targets,
                               const float *row_w, int N, int V, const qkd__kd_term *term,
                               float *beta, int n_rows);
};

/* Create the backend asked for (AUTO picks the best available) on ctx.
 * UNSUPPORTED if that backend is not built in; the error is recorded. */
qkd_status qkd__backend_create(qkd_context *ctx, qkd_backend_kind kind,
                               qkd__backend **out);
void qkd__backend_free(qkd__backend *b);

/* Each backend's constructor (registry.c calls them). */
qkd_status qkd__backend_ref_create(qkd_context *ctx, qkd__backend **out);

#endif
