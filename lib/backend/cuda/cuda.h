/* The CUDA backend: the backend table over device memory on one GPU.
 *
 * Everything is enqueued on one stream; `sync` is a stream synchronize,
 * `download` synchronizes before it returns, `upload` returns once the
 * host buffer may be reused. Matmuls are cuBLAS SGEMMs in plain fp32 (the
 * default math mode, so TF32 tensor cores stay off and results match the
 * reference to float rounding); the bf16 slots convert both operands to
 * bf16 in the workspace and run cuBLASLt on the tensor cores with fp32
 * accumulation, each shape's algorithm timed at its first use (gemm.c;
 * the bf16_bits slots take operands that may already be bf16, as the
 * fake quantization, RMSNorm and SwiGLU can write them). Attention is
 * flash-style in fp32 (attention.cu) or bf16 (attention_bf16.cu). The
 * other kernels are straightforward CUDA, many of them computing in
 * double like the reference (the objects
 * are built with -fmad=false, so the updates, axpy and hard fake
 * quantization round exactly as the reference does).
 *
 * Errors: kernels report none through the table, so the first failing
 * CUDA or cuBLAS call (a launch included) is recorded on the context as
 * QKD_ERR_BACKEND with the CUDA error string and stays pending: every
 * later sync, upload and download returns it, since the results after a
 * failed kernel cannot be trusted.
 *
 * The file split: cuda.c holds the table, memory, errors and the cuBLAS
 * matmuls (plain C against the runtime API), gemm.c the bf16 products'
 * plans; the kernels live in the .cu files, each exporting the launch
 * functions declared below. */
#ifndef QKD_LIB_BACKEND_CUDA_H
#define QKD_LIB_BACKEND_CUDA_H

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "backend/backend.h"

/* A bf16 product C = op(A) op(B) + beta C, column-major, fp32 C (gemm.c). */
typedef struct qkd__cuda_gemm {
    cublasOperation_t ta, tb;
    int m, n, k, lda, ldb, ldc;
    float beta;
    bool c16; /* C in bf16 (rounded to nearest even from fp32), else fp32 */
} qkd__cuda_gemm;

/* A shape's cuBLASLt descriptors and chosen algorithm (gemm.c). */
typedef struct qkd__cuda_gemm_plan {
    qkd__cuda_gemm g;  /* the shape; of beta only whether it is 0 counts */
    unsigned align[3]; /* of A, B and C, bytes: the heuristic's assumption */
    cublasLtMatmulDesc_t op; /* NULL: an empty slot */
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatmulAlgo_t algo;
} qkd__cuda_gemm_plan;

/* Plans kept: SmolLM's KD-QAT step makes 21. */
#define QKD__CUDA_GEMM_PLANS 128

/* The backend's private state (b->impl). */
typedef struct qkd__cuda {
    int device;
    int sm; /* compute capability, major * 10 + minor */
    int n_sm; /* multiprocessors */
    /* the driver's cuTensorMapEncodeTiled, NULL where it has none (then
     * the Hopper attention kernels, which load tiles by tensor map, are
     * not used) */
    PFN_cuTensorMapEncodeTiled_v12000 map_encode;
    cudaStream_t stream;
    cublasHandle_t blas;  /* the fp32 products */
    cublasLtHandle_t lt;  /* the bf16 products (gemm.c) */
    void *lt_ws;          /* their workspace */
    qkd__cuda_gemm_plan plans[QKD__CUDA_GEMM_PLANS]; /* a ring */
    int next_plan;        /* the slot the next new shape takes */
    qkd_status status;  /* first failure, kept (see above) */
    double *partials;   /* per-block partial sums of sum and sum_squares */
    float *ws;          /* grown on demand: attention's backward, bf16 operands */
    size_t ws_bytes;
    unsigned long writes; /* device writes enqueued so far (kernels, copies, ...) */
    /* bf16 copies of a product's activation-side operands (cuda.c): [0]
     * the B operand, [1] the input of a weight gradient */
    struct qkd__cuda_bf16 {
        uint16_t *buf;
        size_t bytes, n;
        const float *src;     /* what buf copies; NULL: nothing */
        unsigned long writes; /* writes when buf was last known current */
    } b16[2];
    void *rope;           /* RoPE's (cos, sin) per position and pair (attention.cu) */
    size_t rope_bytes;
    int rope_len, rope_hd; /* rope covers positions [0, rope_len) of this head size */
    float rope_theta;
    void *spans;          /* the multi-tensor updates' span table (elementwise.cu) */
    size_t spans_bytes;
    qkd__backend *host; /* reference backend for the format schemes */
    float *host_buf;    /* their host copy of a weight, grown on demand */
    size_t host_floats;
} qkd__cuda;

/* Create the CUDA backend on ctx: UNSUPPORTED (recorded) when no CUDA
 * device is present, BACKEND when the device cannot be set up. */
qkd_status qkd__backend_cuda_create(qkd_context *ctx, qkd__backend **out);

/* Record err (when not cudaSuccess and none is pending) as BACKEND with
 * its CUDA error string; `what` names the call. Returns the pending
 * status. */
qkd_status qkd__cuda_check(qkd__backend *b, cudaError_t err, const char *what);
/* The same for a cuBLAS status. */
qkd_status qkd__cuda_check_blas(qkd__backend *b, cublasStatus_t st, const char *what);
/* *buf (*cap bytes) grown to at least `bytes`, its contents lost when it
 * grows; NULL (recorded) when it cannot. */
void *qkd__cuda_grow(qkd__backend *b, void **buf, size_t *cap, size_t bytes);
/* Host memory of at least `floats` floats, grown on demand (shared by the
 * format schemes' round trip and the span tables); NULL (recorded). */
float *qkd__cuda_host_buffer(qkd__backend *b, size_t floats);
/* Device workspace of at least `floats` floats, valid until the next call;
 * NULL (recorded) when it cannot grow. */
float *qkd__cuda_workspace(qkd__backend *b, size_t floats);

static inline qkd__cuda *qkd__cuda_of(qkd__backend *b)
{
    return (qkd__cuda *)b->impl;
}

/* Blocks per grid of elementwise grid-stride loops. */
#define QKD__CUDA_MAX_BLOCKS 65535
/* Block count of the two-pass sums (partials holds this many doubles). */
#define QKD__CUDA_SUM_BLOCKS 1024

/* ---- gemm.c ------------------------------------------------------------------ */
/* cuBLASLt's handle and workspace; BACKEND or NO_MEMORY (recorded). */
qkd_status qkd__cuda_gemm_setup(qkd__backend *b);
/* Frees what setup and the plans hold. */
void qkd__cuda_gemm_teardown(qkd__cuda *c);
/* g's product on bf16 A and B into fp32 C, by the shape's plan (made,
 * and timed, at its first use); a failure is recorded, naming `what`. */
void qkd__cuda_gemm_bf16(qkd__backend *b, const qkd__cuda_gemm *g, const uint16_t *A,
                         const uint16_t *B, void *C, const char *what);
/* The bytes g's C spans, from its first element to its last. */
size_t qkd__cuda_gemm_c_bytes(const qkd__cuda_gemm *g);
/* For the tests: g's product by the i-th of the candidates the plan
 * chooses among (none when i is past them); their count. */
int qkd__cuda_gemm_bf16_candidate(qkd__backend *b, const qkd__cuda_gemm *g, int i,
                                  const uint16_t *A, const uint16_t *B, void *C);

/* ---- elementwise.cu ------------------------------------------------------ */
void qkd__cuda_fill(qkd__backend *b, float *x, float value, size_t n);
void qkd__cuda_add(qkd__backend *b, float *out, const float *x, const float *y, size_t n);
void qkd__cuda_axpy(qkd__backend *b, float *y, float alpha, const float *x, size_t n);
void qkd__cuda_scale(qkd__backend *b, float *x, float alpha, size_t n);
/* dst[i] = src[i] rounded to bf16 (nearest even), as raw bf16 bits. */
void qkd__cuda_to_bf16(qkd__backend *b, uint16_t *dst, const float *src, size_t n);
/* x[i] rounded to bf16 (nearest even) in place, as floats. */
void qkd__cuda_round_to_bf16(qkd__backend *b, float *x, size_t n);
void qkd__cuda_sum(qkd__backend *b, float *out, const float *x, size_t n);
void qkd__cuda_sum_squares(qkd__backend *b, float *out, const float *x, size_t n);
void qkd__cuda_swiglu_forward(qkd__backend *b, float *out, const float *gate, const float *up,
                              size_t n);
void qkd__cuda_swiglu_forward_bf16_bits(qkd__backend *b, uint16_t *out, const uint16_t *gate,
                                        const uint16_t *up, size_t n);
void qkd__cuda_swiglu_backward(qkd__backend *b, float *dgate, float *dup, const float *dout,
                               const float *gate, const float *up, size_t n);
void qkd__cuda_swiglu_backward_bf16_bits(qkd__backend *b, uint16_t *dgate, uint16_t *dup,
                                         size_t ld, uint16_t *out, const uint16_t *dout,
                                         const uint16_t *gate, const uint16_t *up, size_t rows,
                                         size_t cols);
void qkd__cuda_adamw_update(qkd__backend *b, float *p, const float *g, float *m, float *v,
                            size_t n, float lr, float b1, float b2, float eps, float wd, int t);
void qkd__cuda_sgd_update(qkd__backend *b, float *p, const float *g, float *u, size_t n,
                          float lr, float momentum, float wd);
void qkd__cuda_sum_squares_multi(qkd__backend *b, float *out, const qkd__update_span *spans,
                                 int n_spans);
void qkd__cuda_adamw_update_multi(qkd__backend *b, const qkd__update_span *spans, int n_spans,
                                  float gscale, float b1, float b2, float eps, float wd, int t);
void qkd__cuda_adamw_update_multi_dev(qkd__backend *b, const qkd__update_span *spans,
                                      int n_spans, const qkd__step_state *st, float b1,
                                      float b2, float eps, float wd, const qkd__quant_spec *fq);
void qkd__cuda_step_decide(qkd__backend *b, qkd__step_state *st, const float *norms, int n,
                           float max_norm, float b1, float b2);
void qkd__cuda_embedding_forward(qkd__backend *b, float *out, const int32_t *ids,
                                 const float *table, int N, int C);
void qkd__cuda_embedding_backward(qkd__backend *b, float *dtable, const float *dout,
                                  const int32_t *ids, int N, int C, int V);

/* ---- rows.cu --------------------------------------------------------------- */
void qkd__cuda_rmsnorm_forward(qkd__backend *b, float *out, float *rstd, const float *inp,
                               const float *w, int N, int C, float eps);
void qkd__cuda_add_rmsnorm_forward_bf16_bits(qkd__backend *b, float *sum, uint16_t *out,
                                             float *rstd, const float *x, const uint16_t *y,
                                             const float *w, int N, int C, float eps);
void qkd__cuda_rmsnorm_forward_bf16_bits(qkd__backend *b, uint16_t *out, float *rstd,
                                         const float *inp, const float *w, int N, int C,
                                         float eps);
void qkd__cuda_rmsnorm_backward_bf16_bits(qkd__backend *b, float *dinp, uint16_t *dinp_bits,
                                          float *dw, const float *dout, const float *inp,
                                          const float *w, const float *rstd, int N, int C);
void qkd__cuda_rmsnorm_backward(qkd__backend *b, float *dinp, float *dw, const float *dout,
                                const float *inp, const float *w, const float *rstd, int N,
                                int C);
void qkd__cuda_softmax_forward(qkd__backend *b, float *probs, const float *logits, int N,
                               int V, float inv_temp);
void qkd__cuda_softmax_backward(qkd__backend *b, float *dlogits, const float *dprobs,
                                const float *probs, int N, int V, float inv_temp);
void qkd__cuda_log_softmax_forward(qkd__backend *b, float *logp, const float *logits, int N,
                                   int V, float inv_temp);
void qkd__cuda_log_softmax_backward(qkd__backend *b, float *dlogits, const float *dlogp,
                                    const float *logp, int N, int V, float inv_temp);
void qkd__cuda_cross_entropy_forward(qkd__backend *b, float *losses, const float *logits,
                                     const int32_t *targets, int N, int V);
void qkd__cuda_cross_entropy_backward(qkd__backend *b, float *dlogits, const float *logits,
                                      const int32_t *targets, float scale, int N, int V);
void qkd__cuda_kd_loss(qkd__backend *b, float *row_loss, float *ds, uint16_t *ds_bits,
                       const float *s, const float *t, const int32_t *targets,
                       const float *row_w, int N, int V, const qkd__kd_term *term);
void qkd__cuda_tsld_weights(qkd__backend *b, float *w, const float *c, const int32_t *targets,
                            int B, int T, float tau);
void qkd__cuda_row_max_prob(qkd__backend *b, float *out, const float *x,
                            const int32_t *targets, int N, int V);
void qkd__cuda_kd_loss_confidence(qkd__backend *b, float *row_loss, float *ds,
                                  uint16_t *ds_bits, const float *s, const float *t,
                                  const int32_t *targets, const float *row_w, int N, int V,
                                  const qkd__kd_term *term, float *beta, int n_rows);

/* ---- attention.cu ------------------------------------------------------------ */
void qkd__cuda_rope_forward(qkd__backend *b, float *x, int B, int T, int n_heads, int head_dim,
                            int pos0, float theta);
void qkd__cuda_rope_backward(qkd__backend *b, float *dx, int B, int T, int n_heads,
                             int head_dim, int pos0, float theta);
void qkd__cuda_attention_forward(qkd__backend *b, float *out, float *scratch, const float *q,
                                 const float *k, const float *v, int B, int Tq, int pos0,
                                 int kv_len, int n_heads, int n_kv, int hd);
void qkd__cuda_attention_backward(qkd__backend *b, float *dq, float *dk, float *dv,
                                  const float *dout, float *scratch, const float *q,
                                  const float *k, const float *v, const float *out, int B,
                                  int T, int n_heads, int n_kv, int hd);
/* true when hd <= max, else records UNSUPPORTED (naming the head size). */
bool qkd__cuda_attention_head_ok(qkd__backend *b, int hd, int max);

/* RoPE's (cos, sin) for positions [0, len) of head size hd at theta,
 * [pos][pair] in double, or NULL (recorded): rope_forward's rotation. */
const double2 *qkd__cuda_rope_table(qkd__backend *b, int len, int hd, float theta);

/* ---- attention_bf16.cu: the same on the tensor cores, bf16 inputs ----------------- */
/* The attention scratch: each query row's logsumexp (all the fp32
 * attention keeps), then, for head sizes the bf16 attention takes, its
 * forward's bf16 copies of q, k and v, which its backward reads. */
size_t qkd__cuda_attention_scratch_floats(int B, int Tq, int kv_len, int n_heads, int n_kv,
                                          int hd);
void qkd__cuda_attention_forward_bf16(qkd__backend *b, float *out, uint16_t *out_bits,
                                      float *scratch,
                                      const float *q, const float *k, const float *v, int B,
                                      int Tq, int pos0, int kv_len, int n_heads, int n_kv,
                                      int hd, float rope_theta);
void qkd__cuda_attention_backward_bf16(qkd__backend *b, float *dq, float *dk, float *dv,
                                       const float *dout, float *scratch, const float *q,
                                       const float *k, const float *v, qkd__bf16_in out, int B,
                                       int T, int n_heads, int n_kv, int hd, float rope_theta,
                                       uint16_t *dqkv_bits);

/* ---- quant.cu ------------------------------------------------------------------ */
/* The SYM, ASYM and TERNARY schemes (cuda.c sends the format schemes to
 * the reference kernels on the host). */
void qkd__cuda_fakequant_groups(qkd__backend *b, float *wq, float *scales, float *zeros,
                                const float *w, int64_t rows, int64_t cols,
                                const qkd__quant_spec *spec);
/* The same with Q(w) rounded to bf16 (raw bits): the slot fakequant_forward_bf16. */
void qkd__cuda_fakequant_forward_bf16(qkd__backend *b, uint16_t *wq, float *scales,
                                      float *zeros, const float *w, int64_t rows, int64_t cols,
                                      const qkd__quant_spec *spec);
void qkd__cuda_fakequant_backward(qkd__backend *b, float *dw, const float *dwq, const float *w,
                                  const float *scales, const float *zeros, int64_t rows,
                                  int64_t cols, const qkd__quant_spec *spec);
void qkd__cuda_quant_rows(qkd__backend *b, float *out, const float *x, int64_t rows,
                          int64_t cols, int bits);
void qkd__cuda_fakequant_lsq_forward(qkd__backend *b, float *wq, const float *w,
                                     const float *scales, const float *zeros, int64_t rows,
                                     int64_t cols, const qkd__quant_spec *spec);
void qkd__cuda_fakequant_lsq_backward(qkd__backend *b, float *dw, float *dscales, float *dzeros,
                                      const float *dwq, const float *w, const float *scales,
                                      const float *zeros, int64_t rows, int64_t cols,
                                      const qkd__quant_spec *spec);

#ifdef __cplusplus
}
#endif

#endif
