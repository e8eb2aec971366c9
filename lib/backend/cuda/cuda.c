/* The CUDA backend's table, device and stream, memory, error recording,
 * the cuBLAS matmuls, and the format schemes' fake quantization, which
 * runs ggml's block quantizers on the host (the reference kernel) between
 * a download and an upload: those grids must match llama.cpp bit for bit,
 * and a device port is future work. cuda.h describes the whole backend. */

#include "backend/cuda/cuda.h"
#include "backend/ref/ref.h"
#include "quant/ggml_blocks.h"
#include "quant/quant.h"

/* ---- errors ---------------------------------------------------------------- */

qkd_status qkd__cuda_check(qkd__backend *b, cudaError_t err, const char *what)
{
    qkd__cuda *c = qkd__cuda_of(b);
    if (err != cudaSuccess && c->status == QKD_OK)
        c->status = qkd__error(b->ctx, QKD_ERR_BACKEND, "cuda backend: %s: %s (%s)", what,
                               cudaGetErrorString(err), cudaGetErrorName(err));
    return c->status;
}

qkd_status qkd__cuda_check_blas(qkd__backend *b, cublasStatus_t st, const char *what)
{
    qkd__cuda *c = qkd__cuda_of(b);
    c->writes++; /* a product wrote its output */
    if (st != CUBLAS_STATUS_SUCCESS && c->status == QKD_OK)
        c->status = qkd__error(b->ctx, QKD_ERR_BACKEND, "cuda backend: %s: cuBLAS %s", what,
                               cublasGetStatusString(st));
    return c->status;
}

/* ---- memory ---------------------------------------------------------------------- */

static qkd_status cuda_alloc(qkd__backend *b, size_t bytes, void **out)
{
    *out = NULL;
    if (bytes == 0)
        return qkd__error(b->ctx, QKD_ERR_INVALID_ARG, "cuda backend: allocation of 0 bytes");
    if (qkd__cuda_of(b)->status != QKD_OK)
        return qkd__cuda_of(b)->status;
    cudaError_t err = cudaMalloc(out, bytes);
    if (err == cudaErrorMemoryAllocation) {
        cudaGetLastError(); /* not sticky: the device stays usable */
        *out = NULL;
        return qkd__error(b->ctx, QKD_ERR_NO_MEMORY,
                          "cuda backend: out of device memory allocating %zu bytes", bytes);
    }
    if (err != cudaSuccess)
        *out = NULL;
    return qkd__cuda_check(b, err, "cudaMalloc");
}

static void cuda_free(qkd__backend *b, void *ptr)
{
    qkd__cuda_of(b)->writes++; /* the memory may come back holding other data */
    if (ptr)
        qkd__cuda_check(b, cudaFree(ptr), "cudaFree");
}

/* A pageable host source is staged before cudaMemcpyAsync returns, so the
 * caller may reuse it at once. */
static qkd_status cuda_upload(qkd__backend *b, void *dst, const void *src, size_t bytes)
{
    qkd__cuda *c = qkd__cuda_of(b);
    c->writes++;
    if (c->status != QKD_OK || bytes == 0)
        return c->status;
    return qkd__cuda_check(b, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->stream),
                           "upload");
}

static qkd_status cuda_download(qkd__backend *b, void *dst, const void *src, size_t bytes)
{
    qkd__cuda *c = qkd__cuda_of(b);
    if (c->status != QKD_OK || bytes == 0)
        return c->status;
    qkd__cuda_check(b, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->stream),
                    "download");
    return qkd__cuda_check(b, cudaStreamSynchronize(c->stream), "download");
}

static qkd_status cuda_sync(qkd__backend *b)
{
    qkd__cuda *c = qkd__cuda_of(b);
    if (c->status != QKD_OK)
        return c->status;
    return qkd__cuda_check(b, cudaStreamSynchronize(c->stream), "sync");
}

void *qkd__cuda_grow(qkd__backend *b, void **buf, size_t *cap, size_t bytes)
{
    qkd__cuda *c = qkd__cuda_of(b);
    if (bytes <= *cap)
        return *buf;
    /* kernels still queued may use the old one */
    if (qkd__cuda_check(b, cudaStreamSynchronize(c->stream), "workspace") != QKD_OK)
        return NULL;
    cuda_free(b, *buf);
    *buf = NULL;
    *cap = 0;
    if (cuda_alloc(b, bytes, buf) != QKD_OK) {
        if (c->status == QKD_OK) /* out of memory: the kernel's results are lost */
            c->status = QKD_ERR_NO_MEMORY;
        return NULL;
    }
    *cap = bytes;
    return *buf;
}

float *qkd__cuda_workspace(qkd__backend *b, size_t floats)
{
    qkd__cuda *c = qkd__cuda_of(b);
    return qkd__cuda_grow(b, (void **)&c->ws, &c->ws_bytes, floats * sizeof(float));
}

/* ---- elementwise copy --------------------------------------------------------------- */

static void cuda_copy(qkd__backend *b, float *dst, const float *src, size_t n)
{
    qkd__cuda_of(b)->writes++;
    if (n && dst != src)
        qkd__cuda_check(b, cudaMemcpyAsync(dst, src, n * sizeof *dst, cudaMemcpyDeviceToDevice,
                                           qkd__cuda_of(b)->stream),
                        "copy");
}

/* ---- matmuls: cuBLAS SGEMM, fp32 throughout ------------------------------------------
 * Row-major X[R][C] is column-major X^T with leading dimension C, so each
 * product is written for the transposes. */

static void sgemm(qkd__backend *b, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                  int k, const float *A, int lda, const float *B, int ldb, float beta, float *C,
                  int ldc, const char *what)
{
    if (m <= 0 || n <= 0 || k <= 0)
        return;
    const float one = 1.0f;
    qkd__cuda_check_blas(b,
                         cublasSgemm(qkd__cuda_of(b)->blas, ta, tb, m, n, k, &one, A, lda, B, ldb,
                                     &beta, C, ldc),
                         what);
}

/* out^T [OC][N] = w [OC][C] . inp^T */
static void cuda_matmul_forward(qkd__backend *b, float *out, const float *inp, const float *w,
                                int N, int C, int OC)
{
    sgemm(b, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, C, w, C, inp, C, 0.0f, out, OC, "matmul_forward");
}

/* dinp^T [C][N] += w^T [C][OC] . dout^T [OC][N] */
static void cuda_matmul_backward_input(qkd__backend *b, float *dinp, const float *dout,
                                       const float *w, int N, int C, int OC)
{
    sgemm(b, CUBLAS_OP_N, CUBLAS_OP_N, C, N, OC, w, C, dout, OC, 1.0f, dinp, C,
          "matmul_backward_input");
}

/* dw^T [C][OC] += inp^T [C][N] . dout [N][OC] */
static void cuda_matmul_backward_weight(qkd__backend *b, float *dw, const float *dout,
                                        const float *inp, int N, int C, int OC)
{
    sgemm(b, CUBLAS_OP_N, CUBLAS_OP_T, C, OC, N, inp, C, dout, OC, 1.0f, dw, C,
          "matmul_backward_weight");
}

/* ---- matmuls in bf16: both operands rounded to bf16 copies, tensor cores ----------------- */

/* Elements of a bf16 operand, rounded up to a whole number of 16 bytes. */
static size_t bf16_span(size_t n)
{
    return (n + 7) & ~(size_t)7;
}

/* The bf16 copies of activation-side operands: copy 0 holds the last
 * product's B operand (an activation or an output gradient), copy 1 the
 * input of the last weight gradient. A copy is reused while its source
 * range is unchanged: c->writes counts every device write (kernels,
 * copies, uploads, frees, memsets, cuBLAS calls) and a copy is current
 * while its `writes` equals it; a product keeps the copies current when
 * its output does not overlap their sources. The model reads one tensor in
 * several products in a row: q, k and v of one input (forward: B; weight
 * gradients: copy 1, across the input-gradient products between them),
 * gate and up of another, both gradients of one output gradient. */
typedef struct qkd__cuda_bf16 bf16_copy;

/* src (n elements) in bf16 through copy cp: reused if current at the
 * product's start (`entry` writes), else converted; NULL (recorded) on
 * failure. */
static const uint16_t *bf16_operand(qkd__backend *b, bf16_copy *cp, const float *src, size_t n,
                                    unsigned long entry)
{
    if (cp->src == src && cp->n == n && cp->writes == entry)
        return cp->buf;
    cp->src = NULL;
    if (!qkd__cuda_grow(b, (void **)&cp->buf, &cp->bytes, n * sizeof(uint16_t)))
        return NULL;
    qkd__cuda_to_bf16(b, cp->buf, src, n);
    cp->src = src;
    cp->n = n;
    cp->writes = entry; /* current: the conversions wrote bf16 buffers alone */
    return cp->buf;
}

/* Whether [p, p + pn) and [q, q + qn) (bytes) share a byte. */
static bool overlaps(const void *p, size_t pn, const void *q, size_t qn)
{
    return (uintptr_t)p < (uintptr_t)q + qn && (uintptr_t)q < (uintptr_t)p + pn;
}

/* The bf16 operand of `in` (n elements): its bits, or its fp32 values
 * rounded through copy cp (an activation-side operand) or, cp NULL, into
 * the workspace (a weight, converted each time); NULL (recorded) on
 * failure. */
static const uint16_t *bf16_input(qkd__backend *b, qkd__bf16_in in, bf16_copy *cp, size_t n,
                                  unsigned long entry)
{
    if (in.bits)
        return in.bits;
    if (cp)
        return bf16_operand(b, cp, in.f32, n, entry);
    uint16_t *ws = (uint16_t *)qkd__cuda_workspace(b, bf16_span(n) / 2);
    if (ws)
        qkd__cuda_to_bf16(b, ws, in.f32, n);
    return ws;
}

/* g's product on bf16 operands (gemm.c). A has na elements and is a
 * weight, or (A_act) the input of a weight gradient, kept in copy 1; B
 * (nb) is kept in copy 0. */
static void gemm_bf16(qkd__backend *b, const qkd__cuda_gemm *g, qkd__bf16_in A, size_t na,
                      bool A_act, qkd__bf16_in B, size_t nb, void *C, const char *what)
{
    if (g->m <= 0 || g->n <= 0 || g->k <= 0)
        return;
    qkd__cuda *c = qkd__cuda_of(b);
    const unsigned long entry = c->writes;
    const uint16_t *b16 = bf16_input(b, B, &c->b16[0], nb, entry);
    const uint16_t *a16 = bf16_input(b, A, A_act ? &c->b16[1] : NULL, na, entry);
    if (!a16 || !b16)
        return;
    qkd__cuda_gemm_bf16(b, g, a16, b16, C, what);
    /* the product wrote C alone: a copy current at entry holds unless C
     * covers its source */
    const size_t nc = qkd__cuda_gemm_c_bytes(g);
    for (int i = 0; i < 2; i++) {
        bf16_copy *cp = &c->b16[i];
        if (cp->src && cp->writes == entry &&
            !overlaps(C, nc, cp->src, cp->n * sizeof *cp->src))
            cp->writes = c->writes;
        else
            cp->src = NULL;
    }
}

static void cuda_matmul_forward_bf16_bits(qkd__backend *b, float *out, qkd__bf16_in inp,
                                          qkd__bf16_in w, int N, int C, int OC)
{
    const qkd__cuda_gemm g = {CUBLAS_OP_T, CUBLAS_OP_N, OC, N, C, C, C, OC, 0.0f, false};
    gemm_bf16(b, &g, w, (size_t)OC * C, false, inp, (size_t)N * C, out, "matmul_forward_bf16");
}

static void cuda_matmul_forward_to_bf16_bits(qkd__backend *b, uint16_t *out, qkd__bf16_in inp,
                                             qkd__bf16_in w, int N, int C, int OC)
{
    const qkd__cuda_gemm g = {CUBLAS_OP_T, CUBLAS_OP_N, OC, N, C, C, C, OC, 0.0f, true};
    gemm_bf16(b, &g, w, (size_t)OC * C, false, inp, (size_t)N * C, out,
              "matmul_forward_to_bf16_bits");
}

/* beta 0 when writing: cuBLAS then reads nothing of dinp */
static void cuda_matmul_backward_input_bf16_bits(qkd__backend *b, float *dinp,
                                                 qkd__bf16_in dout, qkd__bf16_in w, int N,
                                                 int C, int OC, int accumulate)
{
    const qkd__cuda_gemm g = {CUBLAS_OP_N, CUBLAS_OP_N, C, N, OC, C, OC, C,
                              accumulate ? 1.0f : 0.0f, false};
    gemm_bf16(b, &g, w, (size_t)OC * C, false, dout, (size_t)N * OC, dinp,
              "matmul_backward_input_bf16");
}

static void cuda_matmul_backward_input_to_bf16_bits(qkd__backend *b, uint16_t *dinp,
                                                    qkd__bf16_in dout, qkd__bf16_in w, int N,
                                                    int C, int OC)
{
    const qkd__cuda_gemm g = {CUBLAS_OP_N, CUBLAS_OP_N, C, N, OC, C, OC, C, 0.0f, true};
    gemm_bf16(b, &g, w, (size_t)OC * C, false, dout, (size_t)N * OC, dinp,
              "matmul_backward_input_to_bf16_bits");
}

static void cuda_matmul_backward_weight_bf16_bits(qkd__backend *b, float *dw,
                                                  qkd__bf16_in dout, qkd__bf16_in inp, int N,
                                                  int C, int OC, int accumulate)
{
    const qkd__cuda_gemm g = {CUBLAS_OP_N, CUBLAS_OP_T, C, OC, N, C, OC, C,
                              accumulate ? 1.0f : 0.0f, false};
    gemm_bf16(b, &g, inp, (size_t)N * C, true, dout, (size_t)N * OC, dw,
              "matmul_backward_weight_bf16");
}

/* Whether lin[0..n)'s weights lie one after the other in memory (all
 * bits or all fp32), [sum OC][C] from lin[0]'s on: one product then
 * covers them all. */
static bool stacked_weights(const qkd__bf16_linear *lin, int n, int C)
{
    for (int i = 1; i < n; i++) {
        const size_t before = (size_t)lin[i - 1].OC * C;
        const qkd__bf16_in a = lin[i - 1].w, b = lin[i].w;
        if (a.bits ? b.bits != a.bits + before : !b.f32 || b.f32 != a.f32 + before)
            return false;
    }
    return true;
}

/* Whether their weight gradients do, and they share one input: one
 * product then gives every gradient. */
static bool stacked_grads(const qkd__bf16_linear *lin, int n, int C)
{
    for (int i = 1; i < n; i++)
        if (lin[i].dw != lin[i - 1].dw + (size_t)lin[i - 1].OC * C ||
            lin[i].x.f32 != lin[0].x.f32 || lin[i].x.bits != lin[0].x.bits)
            return false;
    return true;
}

/* The backward of a group of linears from their gradients in rows (q, k
 * and v's; gate and up's): the input gradient as one product over the
 * weights where they are stacked, the weight gradients as one where those
 * are (and the linears share their input); else a product a linear,
 * reading its columns of dout. Apart, the small k and v products spend
 * more on reading and adding to dx than on their sums: q, k and v's input
 * gradients took 1.63x the stacked product's time at TinyLlama's shape and
 * 2.37x at SmolLM's (docs/benchmarks.md, "the q, k, v and gate, up products'
 * backward as groups"). */
static void cuda_linears_backward_bf16_bits(qkd__backend *b, float *dx, int accumulate_x,
                                            const uint16_t *dout, const qkd__bf16_linear *lin,
                                            int n, int N, int C, int accumulate_w)
{
    int ld = 0;
    for (int i = 0; i < n; i++)
        ld += lin[i].OC;
    const qkd__bf16_in d = {.bits = dout};
    const float beta_w = accumulate_w ? 1.0f : 0.0f;
    if (stacked_weights(lin, n, C)) {
        const qkd__cuda_gemm g = {CUBLAS_OP_N, CUBLAS_OP_N, C, N, ld, C, ld, C,
                                  accumulate_x ? 1.0f : 0.0f, false};
        gemm_bf16(b, &g, lin[0].w, (size_t)ld * C, false, d, (size_t)N * ld, dx,
                  "linears_backward_input_bf16");
    } else {
        for (int i = 0, col = 0; i < n; col += lin[i++].OC) {
            const qkd__cuda_gemm g = {CUBLAS_OP_N, CUBLAS_OP_N, C, N, lin[i].OC, C, ld, C,
                                      i || accumulate_x ? 1.0f : 0.0f, false};
            gemm_bf16(b, &g, lin[i].w, (size_t)lin[i].OC * C, false,
                      (qkd__bf16_in){.bits = dout + col}, (size_t)N * ld - col, dx,
                      "linears_backward_input_bf16");
        }
    }
    if (stacked_grads(lin, n, C)) {
        const qkd__cuda_gemm g = {CUBLAS_OP_N, CUBLAS_OP_T, C, ld, N, C, ld, C, beta_w, false};
        gemm_bf16(b, &g, lin[0].x, (size_t)N * C, true, d, (size_t)N * ld, lin[0].dw,
                  "linears_backward_weight_bf16");
        return;
    }
    for (int i = 0, col = 0; i < n; col += lin[i++].OC) {
        const qkd__cuda_gemm g = {CUBLAS_OP_N, CUBLAS_OP_T, C, lin[i].OC, N, C, ld, C, beta_w,
                                  false};
        gemm_bf16(b, &g, lin[i].x, (size_t)N * C, true, (qkd__bf16_in){.bits = dout + col},
                  (size_t)N * ld - col, lin[i].dw, "linears_backward_weight_bf16");
    }
}

static void cuda_matmul_forward_bf16(qkd__backend *b, float *out, const float *inp,
                                     const float *w, int N, int C, int OC)
{
    cuda_matmul_forward_bf16_bits(b, out, qkd__bf16_f32(inp), qkd__bf16_f32(w), N, C, OC);
}

static void cuda_matmul_backward_input_bf16(qkd__backend *b, float *dinp, const float *dout,
                                            const float *w, int N, int C, int OC)
{
    cuda_matmul_backward_input_bf16_bits(b, dinp, qkd__bf16_f32(dout), qkd__bf16_f32(w), N, C, OC,
                                         1);
}

static void cuda_matmul_backward_weight_bf16(qkd__backend *b, float *dw, const float *dout,
                                             const float *inp, int N, int C, int OC)
{
    cuda_matmul_backward_weight_bf16_bits(b, dw, qkd__bf16_f32(dout), qkd__bf16_f32(inp), N, C, OC,
                                          1);
}

/* ---- attention scratch (attention_bf16.cu) ------------------------------------------------ */

static size_t cuda_attention_scratch_floats(qkd__backend *b, int B, int Tq, int kv_len,
                                            int n_heads, int n_kv, int hd)
{
    (void)b;
    return qkd__cuda_attention_scratch_floats(B, Tq, kv_len, n_heads, n_kv, hd);
}

/* ---- fake quantization ---------------------------------------------------------------- */

float *qkd__cuda_host_buffer(qkd__backend *b, size_t floats)
{
    qkd__cuda *c = qkd__cuda_of(b);
    if (floats <= c->host_floats)
        return c->host_buf;
    float *buf = floats <= SIZE_MAX / sizeof *buf ? qkd__alloc(b->ctx, floats * sizeof *buf)
                                                  : NULL;
    if (!buf) {
        if (c->status == QKD_OK)
            c->status = qkd__error(b->ctx, QKD_ERR_NO_MEMORY,
                                   "cuda backend: out of host memory for %zu floats", floats);
        return NULL;
    }
    qkd__free(b->ctx, c->host_buf);
    c->host_buf = buf;
    c->host_floats = floats;
    return buf;
}

/* A format scheme (ggml type `type`): the reference kernel on a host copy. */
static void format_forward(qkd__backend *b, float *wq, float *scales, float *zeros,
                           const float *w, int64_t rows, int64_t cols,
                           const qkd__quant_spec *spec, int type)
{
    const qkd__ggml_format *f = qkd__ggml_format_of((uint32_t)type);
    size_t n = (size_t)(rows * cols), ng = f->group ? n / (size_t)f->group : 0;
    float *hw = qkd__cuda_host_buffer(b, 2 * n + 2 * ng);
    if (!hw || cuda_download(b, hw, w, n * sizeof *hw) != QKD_OK)
        return;
    float *hq = hw + n, *hs = hq + n, *hz = hs + ng;
    qkd__ref_fakequant_forward(qkd__cuda_of(b)->host, hq, hs, hz, hw, rows, cols, spec);
    cuda_upload(b, wq, hq, n * sizeof *hq);
    if (ng) {
        cuda_upload(b, scales, hs, ng * sizeof *hs);
        cuda_upload(b, zeros, hz, ng * sizeof *hz);
    }
}

static void cuda_fakequant_forward(qkd__backend *b, float *wq, float *scales, float *zeros,
                                   const float *w, int64_t rows, int64_t cols,
                                   const qkd__quant_spec *spec)
{
    const int type = qkd__quant_row_type(spec->scheme, cols);
    if (type >= 0)
        format_forward(b, wq, scales, zeros, w, rows, cols, spec, type);
    else
        qkd__cuda_fakequant_groups(b, wq, scales, zeros, w, rows, cols, spec);
}

/* ---- the table ----------------------------------------------------------------------------- */

static void *cuda_extra(qkd__backend *b, const char *name)
{
    (void)b;
    (void)name;
    return NULL;
}

static void cuda_destroy(qkd__backend *b)
{
    qkd__cuda *c = qkd__cuda_of(b);
    if (c) {
        if (c->stream)
            cudaStreamSynchronize(c->stream);
        cudaFree(c->partials);
        cudaFree(c->ws);
        cudaFree(c->b16[0].buf);
        cudaFree(c->b16[1].buf);
        cudaFree(c->rope);
        cudaFree(c->spans);
        if (c->blas)
            cublasDestroy(c->blas);
        qkd__cuda_gemm_teardown(c);
        if (c->stream)
            cudaStreamDestroy(c->stream);
        qkd__backend_free(c->host);
        qkd__free(b->ctx, c->host_buf);
        qkd__free(b->ctx, c);
    }
    qkd__free(b->ctx, b);
}

static const qkd__backend cuda_table = {
    .abi = QKD__BACKEND_ABI,
    .name = "cuda",
    .destroy = cuda_destroy,
    .extra = cuda_extra,
    .alloc = cuda_alloc,
    .free = cuda_free,
    .upload = cuda_upload,
    .download = cuda_download,
    .sync = cuda_sync,
    .fill = qkd__cuda_fill,
    .copy = cuda_copy,
    .add = qkd__cuda_add,
    .axpy = qkd__cuda_axpy,
    .scale = qkd__cuda_scale,
    .sum = qkd__cuda_sum,
    .sum_squares = qkd__cuda_sum_squares,
    .to_bf16_bits = qkd__cuda_to_bf16,
    .round_to_bf16 = qkd__cuda_round_to_bf16,
    .matmul_forward = cuda_matmul_forward,
    .matmul_backward_input = cuda_matmul_backward_input,
    .matmul_backward_weight = cuda_matmul_backward_weight,
    .matmul_forward_bf16 = cuda_matmul_forward_bf16,
    .matmul_backward_input_bf16 = cuda_matmul_backward_input_bf16,
    .matmul_backward_weight_bf16 = cuda_matmul_backward_weight_bf16,
    .matmul_forward_bf16_bits = cuda_matmul_forward_bf16_bits,
    .matmul_forward_to_bf16_bits = cuda_matmul_forward_to_bf16_bits,
    .matmul_backward_input_to_bf16_bits = cuda_matmul_backward_input_to_bf16_bits,
    .matmul_backward_input_bf16_bits = cuda_matmul_backward_input_bf16_bits,
    .matmul_backward_weight_bf16_bits = cuda_matmul_backward_weight_bf16_bits,
    .linears_backward_bf16_bits = cuda_linears_backward_bf16_bits,
    .embedding_forward = qkd__cuda_embedding_forward,
    .embedding_backward = qkd__cuda_embedding_backward,
    .rmsnorm_forward = qkd__cuda_rmsnorm_forward,
    .rmsnorm_forward_bf16_bits = qkd__cuda_rmsnorm_forward_bf16_bits,
    .add_rmsnorm_forward_bf16_bits = qkd__cuda_add_rmsnorm_forward_bf16_bits,
    .rmsnorm_backward = qkd__cuda_rmsnorm_backward,
    .rmsnorm_backward_bf16_bits = qkd__cuda_rmsnorm_backward_bf16_bits,
    .rope_forward = qkd__cuda_rope_forward,
    .rope_backward = qkd__cuda_rope_backward,
    .attention_scratch_floats = cuda_attention_scratch_floats,
    .attention_forward = qkd__cuda_attention_forward,
    .attention_backward = qkd__cuda_attention_backward,
    .attention_forward_bf16 = qkd__cuda_attention_forward_bf16,
    .attention_backward_bf16 = qkd__cuda_attention_backward_bf16,
    .attention_bf16_from_scratch = 1,
    .swiglu_forward = qkd__cuda_swiglu_forward,
    .swiglu_forward_bf16_bits = qkd__cuda_swiglu_forward_bf16_bits,
    .swiglu_backward_bf16_bits = qkd__cuda_swiglu_backward_bf16_bits,
    .swiglu_backward = qkd__cuda_swiglu_backward,
    .softmax_forward = qkd__cuda_softmax_forward,
    .softmax_backward = qkd__cuda_softmax_backward,
    .log_softmax_forward = qkd__cuda_log_softmax_forward,
    .log_softmax_backward = qkd__cuda_log_softmax_backward,
    .cross_entropy_forward = qkd__cuda_cross_entropy_forward,
    .cross_entropy_backward = qkd__cuda_cross_entropy_backward,
    .adamw_update = qkd__cuda_adamw_update,
    .sgd_update = qkd__cuda_sgd_update,
    .sum_squares_multi = qkd__cuda_sum_squares_multi,
    .adamw_update_multi = qkd__cuda_adamw_update_multi,
    .step_decide = qkd__cuda_step_decide,
    .adamw_update_multi_dev = qkd__cuda_adamw_update_multi_dev,
    .fakequant_forward = cuda_fakequant_forward,
    .fakequant_forward_bf16 = qkd__cuda_fakequant_forward_bf16,
    .fakequant_backward = qkd__cuda_fakequant_backward,
    .quant_rows = qkd__cuda_quant_rows,
    .fakequant_lsq_forward = qkd__cuda_fakequant_lsq_forward,
    .fakequant_lsq_backward = qkd__cuda_fakequant_lsq_backward,
    .kd_loss = qkd__cuda_kd_loss,
    .tsld_weights = qkd__cuda_tsld_weights,
    .row_max_prob = qkd__cuda_row_max_prob,
    .kd_loss_confidence = qkd__cuda_kd_loss_confidence,
};

/* The driver's cuTensorMapEncodeTiled, or NULL. Taken through the
 * runtime so that libqkd does not link the driver library itself. */
static PFN_cuTensorMapEncodeTiled_v12000 map_encoder(void)
{
    PFN_cuTensorMapEncodeTiled_v12000 fn = NULL;
    enum cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", (void **)&fn, 12000,
                                         cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
        cudaGetLastError();
        return NULL;
    }
    return fn;
}

/* Stream, cuBLAS handle (fp32 math: no TF32), cuBLASLt, sum partials and the host
 * backend of the format schemes. */
static qkd_status setup(qkd__backend *b, qkd__cuda *c)
{
    qkd_status st = qkd__cuda_check(b, cudaGetDevice(&c->device), "cudaGetDevice");
    int major = 0, minor = 0;
    if (st == QKD_OK)
        st = qkd__cuda_check(b, cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                                       c->device),
                             "cudaDeviceGetAttribute");
    if (st == QKD_OK)
        st = qkd__cuda_check(b, cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor,
                                                       c->device),
                             "cudaDeviceGetAttribute");
    c->sm = 10 * major + minor;
    if (st == QKD_OK)
        st = qkd__cuda_check(b, cudaDeviceGetAttribute(&c->n_sm, cudaDevAttrMultiProcessorCount,
                                                       c->device),
                             "cudaDeviceGetAttribute");
    c->map_encode = map_encoder();
    if (st == QKD_OK)
        st = qkd__cuda_check(b, cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking),
                             "cudaStreamCreate");
    if (st == QKD_OK)
        st = qkd__cuda_check_blas(b, cublasCreate(&c->blas), "cublasCreate");
    if (st == QKD_OK)
        st = qkd__cuda_check_blas(b, cublasSetStream(c->blas, c->stream), "cublasSetStream");
    if (st == QKD_OK)
        st = qkd__cuda_check_blas(b, cublasSetMathMode(c->blas, CUBLAS_DEFAULT_MATH),
                                  "cublasSetMathMode");
    if (st == QKD_OK)
        st = qkd__cuda_gemm_setup(b);
    if (st == QKD_OK)
        st = cuda_alloc(b, QKD__CUDA_SUM_BLOCKS * sizeof(double), (void **)&c->partials);
    if (st == QKD_OK)
        st = qkd__backend_ref_create(b->ctx, &c->host);
    return st;
}

qkd_status qkd__backend_cuda_create(qkd_context *ctx, qkd__backend **out)
{
    *out = NULL;
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
        cudaGetLastError();
        return qkd__error(ctx, QKD_ERR_UNSUPPORTED, "cuda backend: no CUDA device (%s)",
                          err != cudaSuccess ? cudaGetErrorString(err)
                                             : "cudaGetDeviceCount found none");
    }
    qkd__backend *b = qkd__alloc(ctx, sizeof *b);
    qkd__cuda *c = qkd__calloc(ctx, 1, sizeof *c);
    if (!b || !c) {
        qkd__free(ctx, b);
        qkd__free(ctx, c);
        return qkd__error(ctx, QKD_ERR_NO_MEMORY, "cuda backend: out of memory");
    }
    *b = cuda_table;
    b->ctx = ctx;
    b->impl = c;
    qkd_status st = setup(b, c);
    if (st != QKD_OK) {
        cuda_destroy(b);
        return st;
    }
    *out = b;
    return QKD_OK;
}
