/* Internals of the reference backend: the kernels (one file per family,
 * assembled into the table by ref.c) and the parallel-for they share.
 *
 * Every kernel follows one rule that makes it deterministic: each output
 * element is written by exactly one task, and its sum runs in a fixed order
 * (accumulated in double) that does not depend on how the work is split.
 * So a result is bit-identical for any thread count. */
#ifndef QKD_LIB_BACKEND_REF_H
#define QKD_LIB_BACKEND_REF_H

#include "backend/backend.h"

/* Width of a column block: kernels that sum whole row segments keep one
 * block of double accumulators on the stack. */
#define QKD__REF_COLS 128
/* Floats per cache line: the column block of kernels partitioned over
 * columns, so two tasks never write the same line. */
#define QKD__REF_LINE 16

/* Processes items [begin, end) of a job described by arg. */
typedef void (*qkd__ref_range_fn)(const void *arg, int64_t begin, int64_t end);

/* Run fn over the items [0, n) in contiguous ranges on the context's pool.
 * cost is the rough number of flops per item, so that small jobs stay on
 * one thread. */
void qkd__ref_parallel(qkd__backend *b, int64_t n, int64_t cost, qkd__ref_range_fn fn,
                       const void *arg);

/* sum of x[i] * y[i] for i = 0..n-1 in that order, in double. */
double qkd__ref_dot(const float *x, const float *y, int n);

/* ---- ref_linear.c ------------------------------------------------------- */
void qkd__ref_matmul_forward(qkd__backend *b, float *out, const float *inp, const float *w,
                             int N, int C, int OC);
void qkd__ref_matmul_backward_input(qkd__backend *b, float *dinp, const float *dout,
                                    const float *w, int N, int C, int OC);
void qkd__ref_matmul_backward_weight(qkd__backend *b, float *dw, const float *dout,
                                     const float *inp, int N, int C, int OC);
/* The same products with every input rounded to bf16 (QKD_MATMUL_BF16). */
void qkd__ref_matmul_forward_bf16(qkd__backend *b, float *out, const float *inp,
                                  const float *w, int N, int C, int OC);
void qkd__ref_matmul_backward_input_bf16(qkd__backend *b, float *dinp, const float *dout,
                                         const float *w, int N, int C, int OC);
void qkd__ref_matmul_backward_weight_bf16(qkd__backend *b, float *dw, const float *dout,
                                          const float *inp, int N, int C, int OC);
/* The bf16-bits family (backend.h): operands that may be bf16 bits. */
void qkd__ref_matmul_forward_bf16_bits(qkd__backend *b, float *out, qkd__bf16_in inp,
                                       qkd__bf16_in w, int N, int C, int OC);
void qkd__ref_matmul_backward_input_bf16_bits(qkd__backend *b, float *dinp, qkd__bf16_in dout,
                                              qkd__bf16_in w, int N, int C, int OC,
                                              int accumulate);
void qkd__ref_matmul_forward_to_bf16_bits(qkd__backend *b, uint16_t *out, qkd__bf16_in inp,
                                          qkd__bf16_in w, int N, int C, int OC);
void qkd__ref_matmul_backward_input_to_bf16_bits(qkd__backend *b, uint16_t *dinp,
                                                 qkd__bf16_in dout, qkd__bf16_in w, int N,
                                                 int C, int OC);
void qkd__ref_matmul_backward_weight_bf16_bits(qkd__backend *b, float *dw, qkd__bf16_in dout,
                                               qkd__bf16_in inp, int N, int C, int OC,
                                               int accumulate);
void qkd__ref_embedding_forward(qkd__backend *b, float *out, const int32_t *ids,
                                const float *table, int N, int C);
void qkd__ref_embedding_backward(qkd__backend *b, float *dtable, const float *dout,
                                 const int32_t *ids, int N, int C, int V);
void qkd__ref_rmsnorm_forward(qkd__backend *b, float *out, float *rstd, const float *inp,
                              const float *w, int N, int C, float eps);
void qkd__ref_add_rmsnorm_forward_bf16_bits(qkd__backend *b, float *sum, uint16_t *out,
                                            float *rstd, const float *x, const uint16_t *y,
                                            const float *w, int N, int C, float eps);
void qkd__ref_rmsnorm_forward_bf16_bits(qkd__backend *b, uint16_t *out, float *rstd,
                                        const float *inp, const float *w, int N, int C,
                                        float eps);
void qkd__ref_rmsnorm_backward_bf16_bits(qkd__backend *b, float *dinp, uint16_t *dinp_bits,
                                         float *dw, const float *dout, const float *inp,
                                         const float *w, const float *rstd, int N, int C);
void qkd__ref_rmsnorm_backward(qkd__backend *b, float *dinp, float *dw, const float *dout,
                               const float *inp, const float *w, const float *rstd, int N,
                               int C);

/* ---- ref_attention.c ---------------------------------------------------- */
void qkd__ref_rope_forward(qkd__backend *b, float *x, int B, int T, int n_heads, int head_dim,
                           int pos0, float theta);
void qkd__ref_rope_backward(qkd__backend *b, float *dx, int B, int T, int n_heads,
                            int head_dim, int pos0, float theta);
size_t qkd__ref_attention_scratch_floats(qkd__backend *b, int B, int Tq, int kv_len,
                                         int n_heads, int n_kv, int hd);
void qkd__ref_attention_forward(qkd__backend *b, float *out, float *scratch, const float *q,
                                const float *k, const float *v, int B, int Tq, int pos0,
                                int kv_len, int n_heads, int n_kv, int hd);
void qkd__ref_attention_backward(qkd__backend *b, float *dq, float *dk, float *dv,
                                 const float *dout, float *scratch, const float *q,
                                 const float *k, const float *v, const float *out, int B,
                                 int T, int n_heads, int n_kv, int hd);
/* The same in bf16 precision (backend.h): inputs of each product rounded;
 * with rope_theta > 0, RoPE applied to q and k inside. */
void qkd__ref_attention_forward_bf16(qkd__backend *b, float *out, uint16_t *out_bits,
                                     float *scratch,
                                     const float *q, const float *k, const float *v, int B,
                                     int Tq, int pos0, int kv_len, int n_heads, int n_kv,
                                     int hd, float rope_theta);
void qkd__ref_attention_backward_bf16(qkd__backend *b, float *dq, float *dk, float *dv,
                                      const float *dout, float *scratch, const float *q,
                                      const float *k, const float *v, qkd__bf16_in out, int B,
                                      int T, int n_heads, int n_kv, int hd, float rope_theta,
                                      uint16_t *dqkv_bits);

/* ---- ref_activation.c --------------------------------------------------- */
void qkd__ref_swiglu_forward(qkd__backend *b, float *out, const float *gate, const float *up,
                             size_t n);
void qkd__ref_swiglu_forward_bf16_bits(qkd__backend *b, uint16_t *out, const uint16_t *gate,
                                       const uint16_t *up, size_t n);
void qkd__ref_swiglu_backward_bf16_bits(qkd__backend *b, uint16_t *dgate, uint16_t *dup,
                                        size_t ld, uint16_t *out, const uint16_t *dout,
                                        const uint16_t *gate, const uint16_t *up, size_t rows,
                                        size_t cols);
void qkd__ref_swiglu_backward(qkd__backend *b, float *dgate, float *dup, const float *dout,
                              const float *gate, const float *up, size_t n);
void qkd__ref_softmax_forward(qkd__backend *b, float *probs, const float *logits, int N, int V,
                              float inv_temp);
void qkd__ref_softmax_backward(qkd__backend *b, float *dlogits, const float *dprobs,
                               const float *probs, int N, int V, float inv_temp);
void qkd__ref_log_softmax_forward(qkd__backend *b, float *logp, const float *logits, int N,
                                  int V, float inv_temp);
void qkd__ref_log_softmax_backward(qkd__backend *b, float *dlogits, const float *dlogp,
                                   const float *logp, int N, int V, float inv_temp);
void qkd__ref_cross_entropy_forward(qkd__backend *b, float *losses, const float *logits,
                                    const int32_t *targets, int N, int V);
void qkd__ref_cross_entropy_backward(qkd__backend *b, float *dlogits, const float *logits,
                                     const int32_t *targets, float scale, int N, int V);

/* ---- ref_quant.c ---------------------------------------------------------- */
void qkd__ref_fakequant_forward(qkd__backend *b, float *wq, float *scales, float *zeros,
                                const float *w, int64_t rows, int64_t cols,
                                const qkd__quant_spec *spec);
/* SYM, ASYM and TERNARY only (the slot's schemes). */
void qkd__ref_fakequant_forward_bf16(qkd__backend *b, uint16_t *wq, float *scales,
                                     float *zeros, const float *w, int64_t rows, int64_t cols,
                                     const qkd__quant_spec *spec);
void qkd__ref_fakequant_backward(qkd__backend *b, float *dw, const float *dwq, const float *w,
                                 const float *scales, const float *zeros, int64_t rows,
                                 int64_t cols, const qkd__quant_spec *spec);
void qkd__ref_fakequant_lsq_forward(qkd__backend *b, float *wq, const float *w,
                                    const float *scales, const float *zeros, int64_t rows,
                                    int64_t cols, const qkd__quant_spec *spec);
void qkd__ref_fakequant_lsq_backward(qkd__backend *b, float *dw, float *dscales, float *dzeros,
                                     const float *dwq, const float *w, const float *scales,
                                     const float *zeros, int64_t rows, int64_t cols,
                                     const qkd__quant_spec *spec);
void qkd__ref_quant_rows(qkd__backend *b, float *out, const float *x, int64_t rows,
                         int64_t cols, int bits);
void qkd__ref_fakequant_groups(qkd__backend *b, float *scales, float *zeros, const float *w,
                               int64_t rows, int64_t cols, const qkd__quant_spec *spec);
void qkd__ref_matmul_forward_fq(qkd__backend *b, float *out, const float *inp,
                                const qkd__qweight *w, int N, int C, int OC);
void qkd__ref_matmul_backward_input_fq(qkd__backend *b, float *dinp, const float *dout,
                                       const qkd__qweight *w, int N, int C, int OC);

/* ---- ref_kd.c --------------------------------------------------------------- */
void qkd__ref_kd_loss(qkd__backend *b, float *row_loss, float *ds, uint16_t *ds_bits,
                      const float *s, const float *t, const int32_t *targets,
                      const float *row_w, int N, int V, const qkd__kd_term *term);
void qkd__ref_tsld_weights(qkd__backend *b, float *w, const float *c, const int32_t *targets,
                           int B, int T, float tau);
void qkd__ref_row_max_prob(qkd__backend *b, float *out, const float *x,
                           const int32_t *targets, int N, int V);

/* ---- ref_optim.c ------------------------------------------------------------- */
void qkd__ref_sgd_update(qkd__backend *b, float *p, const float *g, float *u, size_t n,
                         float lr, float momentum, float wd);

#endif
