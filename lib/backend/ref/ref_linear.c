/* Reference kernels of the linear family: matmul, embedding, RMSNorm. */
#include <math.h>
#include <string.h>

#include "backend/ref/ref.h"
#include "core/half.h"

static int min_int(int a, int b)
{
    return a < b ? a : b;
}

static int n_blocks(int n, int width)
{
    return (n + width - 1) / width;
}

/* ---- matmul ------------------------------------------------------------------ */

/* Element i of a product's input: as an fp32 product reads it, or (bf16)
 * as a QKD_MATMUL_BF16 product does: fp32 values rounded to bf16, or bf16
 * bits decoded. */
static double in_at(qkd__bf16_in in, size_t i, int bf16)
{
    if (in.bits)
        return qkd__bf16_to_f32(in.bits[i]);
    return bf16 ? qkd__bf16_round(in.f32[i]) : in.f32[i];
}

struct matmul_job {
    float *out;
    uint16_t *out_bits; /* else out as bf16 bits (the fp32 result rounded) */
    qkd__bf16_in inp, w;
    int C, OC;
    int bf16; /* round every input to bf16 */
};

/* One item is one output element: a dot product over C. */
static void matmul_forward_range(const void *arg, int64_t begin, int64_t end)
{
    const struct matmul_job *j = arg;
    for (int64_t i = begin; i < end; i++) {
        const size_t x = (size_t)(i / j->OC) * j->C, w = (size_t)(i % j->OC) * j->C;
        double s;
        if (!j->bf16) {
            s = qkd__ref_dot(j->inp.f32 + x, j->w.f32 + w, j->C);
        } else {
            s = 0.0;
            for (int c = 0; c < j->C; c++)
                s += in_at(j->inp, x + c, 1) * in_at(j->w, w + c, 1);
        }
        if (j->out_bits)
            j->out_bits[i] = qkd__f32_to_bf16((float)s);
        else
            j->out[i] = (float)s;
    }
}

/* out, or out_bits where it is not NULL */
static void matmul_forward(qkd__backend *b, float *out, uint16_t *out_bits, qkd__bf16_in inp,
                           qkd__bf16_in w, int N, int C, int OC, int bf16)
{
    struct matmul_job job = {.out = out, .out_bits = out_bits, .inp = inp, .w = w, .C = C,
                             .OC = OC, .bf16 = bf16};
    qkd__ref_parallel(b, (int64_t)N * OC, 2 * (int64_t)C, matmul_forward_range, &job);
}

void qkd__ref_matmul_forward(qkd__backend *b, float *out, const float *inp, const float *w,
                             int N, int C, int OC)
{
    matmul_forward(b, out, NULL, qkd__bf16_f32(inp), qkd__bf16_f32(w), N, C, OC, 0);
}

void qkd__ref_matmul_forward_bf16(qkd__backend *b, float *out, const float *inp,
                                  const float *w, int N, int C, int OC)
{
    matmul_forward(b, out, NULL, qkd__bf16_f32(inp), qkd__bf16_f32(w), N, C, OC, 1);
}

void qkd__ref_matmul_forward_bf16_bits(qkd__backend *b, float *out, qkd__bf16_in inp,
                                       qkd__bf16_in w, int N, int C, int OC)
{
    matmul_forward(b, out, NULL, inp, w, N, C, OC, 1);
}

void qkd__ref_matmul_forward_to_bf16_bits(qkd__backend *b, uint16_t *out, qkd__bf16_in inp,
                                          qkd__bf16_in w, int N, int C, int OC)
{
    matmul_forward(b, NULL, out, inp, w, N, C, OC, 1);
}

/* out[r][c] += sum over k = 0..K-1 (ascending) of A[r*a_r + k*a_k] * M[k][c],
 * for out [R][C] and M [K][C]. Both backward products of a matmul have this
 * shape; an item is one column block of one output row. */
struct accum_job {
    float *out;
    uint16_t *out_bits; /* else out as bf16 bits, written (the fp32 sum rounded) */
    qkd__bf16_in A, M;
    int C, K;
    size_t a_r, a_k;
    int bf16;  /* round every input to bf16 */
    int write; /* out = the sum: out's old values are not read (as if 0) */
};

static void accum_range(const void *arg, int64_t begin, int64_t end)
{
    const struct accum_job *j = arg;
    int blocks = n_blocks(j->C, QKD__REF_COLS);
    double acc[QKD__REF_COLS];
    for (int64_t i = begin; i < end; i++) {
        size_t r = (size_t)(i / blocks);
        int c0 = (int)(i % blocks) * QKD__REF_COLS;
        int nc = min_int(QKD__REF_COLS, j->C - c0);
        for (int c = 0; c < nc; c++)
            acc[c] = 0.0;
        for (int k = 0; k < j->K; k++) {
            const double a = in_at(j->A, r * j->a_r + (size_t)k * j->a_k, j->bf16);
            const size_t m = (size_t)k * j->C + c0;
            if (!j->bf16) { /* the plain product's loop, kept tight */
                for (int c = 0; c < nc; c++)
                    acc[c] += a * j->M.f32[m + c];
            } else {
                for (int c = 0; c < nc; c++)
                    acc[c] += a * in_at(j->M, m + c, 1);
            }
        }
        const size_t o = r * j->C + c0;
        for (int c = 0; c < nc; c++) {
            if (j->out_bits)
                j->out_bits[o + c] = qkd__f32_to_bf16((float)(0.0 + acc[c]));
            else
                j->out[o + c] = (float)((j->write ? 0.0 : j->out[o + c]) + acc[c]);
        }
    }
}

static void run_accum(qkd__backend *b, struct accum_job *job, int R)
{
    int64_t items = (int64_t)R * n_blocks(job->C, QKD__REF_COLS);
    qkd__ref_parallel(b, items, 2 * (int64_t)job->K * min_int(job->C, QKD__REF_COLS),
                      accum_range, job);
}

/* dinp, or dinp_bits (written) where it is not NULL */
static void backward_input(qkd__backend *b, float *dinp, uint16_t *dinp_bits, qkd__bf16_in dout,
                           qkd__bf16_in w, int N, int C, int OC, int bf16, int accumulate)
{
    /* dinp[n][c] (+)= sum_o dout[n][o] * w[o][c] */
    struct accum_job job = {.out = dinp, .out_bits = dinp_bits, .A = dout, .M = w, .C = C,
                            .K = OC, .a_r = (size_t)OC, .a_k = 1, .bf16 = bf16,
                            .write = !accumulate};
    run_accum(b, &job, N);
}

static void backward_weight(qkd__backend *b, float *dw, qkd__bf16_in dout, qkd__bf16_in inp,
                            int N, int C, int OC, int bf16, int accumulate)
{
    /* dw[o][c] (+)= sum_n dout[n][o] * inp[n][c] */
    struct accum_job job = {.out = dw, .A = dout, .M = inp, .C = C, .K = N,
                            .a_r = 1, .a_k = (size_t)OC, .bf16 = bf16, .write = !accumulate};
    run_accum(b, &job, OC);
}

void qkd__ref_matmul_backward_input(qkd__backend *b, float *dinp, const float *dout,
                                    const float *w, int N, int C, int OC)
{
    backward_input(b, dinp, NULL, qkd__bf16_f32(dout), qkd__bf16_f32(w), N, C, OC, 0, 1);
}

void qkd__ref_matmul_backward_input_bf16(qkd__backend *b, float *dinp, const float *dout,
                                         const float *w, int N, int C, int OC)
{
    backward_input(b, dinp, NULL, qkd__bf16_f32(dout), qkd__bf16_f32(w), N, C, OC, 1, 1);
}

void qkd__ref_matmul_backward_input_bf16_bits(qkd__backend *b, float *dinp, qkd__bf16_in dout,
                                              qkd__bf16_in w, int N, int C, int OC,
                                              int accumulate)
{
    backward_input(b, dinp, NULL, dout, w, N, C, OC, 1, accumulate);
}

void qkd__ref_matmul_backward_input_to_bf16_bits(qkd__backend *b, uint16_t *dinp,
                                                 qkd__bf16_in dout, qkd__bf16_in w, int N,
                                                 int C, int OC)
{
    backward_input(b, NULL, dinp, dout, w, N, C, OC, 1, 0);
}

void qkd__ref_matmul_backward_weight(qkd__backend *b, float *dw, const float *dout,
                                     const float *inp, int N, int C, int OC)
{
    backward_weight(b, dw, qkd__bf16_f32(dout), qkd__bf16_f32(inp), N, C, OC, 0, 1);
}

void qkd__ref_matmul_backward_weight_bf16(qkd__backend *b, float *dw, const float *dout,
                                          const float *inp, int N, int C, int OC)
{
    backward_weight(b, dw, qkd__bf16_f32(dout), qkd__bf16_f32(inp), N, C, OC, 1, 1);
}

void qkd__ref_matmul_backward_weight_bf16_bits(qkd__backend *b, float *dw, qkd__bf16_in dout,
                                               qkd__bf16_in inp, int N, int C, int OC,
                                               int accumulate)
{
    backward_weight(b, dw, dout, inp, N, C, OC, 1, accumulate);
}

/* ---- embedding ------------------------------------------------------------------- */

void qkd__ref_embedding_forward(qkd__backend *b, float *out, const int32_t *ids,
                                const float *table, int N, int C)
{
    (void)b;
    for (int i = 0; i < N; i++)
        memcpy(out + (size_t)i * C, table + (size_t)ids[i] * C, (size_t)C * sizeof *out);
}

struct embedding_job {
    float *dtable;
    const float *dout;
    const int32_t *ids;
    int N, C;
};

/* An item is one column block: rows that repeat an id add into the same
 * table row, so the split is over columns, with rows in ascending order. */
static void embedding_backward_range(const void *arg, int64_t begin, int64_t end)
{
    const struct embedding_job *j = arg;
    for (int64_t blk = begin; blk < end; blk++) {
        int c0 = (int)blk * QKD__REF_LINE;
        int nc = min_int(QKD__REF_LINE, j->C - c0);
        for (int i = 0; i < j->N; i++) {
            float *d = j->dtable + (size_t)j->ids[i] * j->C + c0;
            const float *g = j->dout + (size_t)i * j->C + c0;
            for (int c = 0; c < nc; c++)
                d[c] += g[c];
        }
    }
}

void qkd__ref_embedding_backward(qkd__backend *b, float *dtable, const float *dout,
                                 const int32_t *ids, int N, int C, int V)
{
    (void)V; /* ids are checked by the caller */
    struct embedding_job job = {.dtable = dtable, .dout = dout, .ids = ids, .N = N, .C = C};
    qkd__ref_parallel(b, n_blocks(C, QKD__REF_LINE), (int64_t)N * QKD__REF_LINE,
                      embedding_backward_range, &job);
}

/* ---- RMSNorm ---------------------------------------------------------------------- */

struct rmsnorm_job {
    float *out, *dinp, *dw, *rstd_out;
    uint16_t *out_bits; /* the forward's output as bf16 bits instead of out */
    const float *dout, *inp, *w, *rstd;
    int N, C;
    float eps;
};

static void rmsnorm_forward_range(const void *arg, int64_t begin, int64_t end)
{
    const struct rmsnorm_job *j = arg;
    for (int64_t i = begin; i < end; i++) {
        const float *x = j->inp + (size_t)i * j->C;
        const size_t y = (size_t)i * j->C;
        double r = 1.0 / sqrt(qkd__ref_dot(x, x, j->C) / j->C + j->eps);
        for (int c = 0; c < j->C; c++) {
            const float v = (float)(x[c] * r * j->w[c]);
            if (j->out_bits)
                j->out_bits[y + c] = qkd__f32_to_bf16(v);
            else
                j->out[y + c] = v;
        }
        j->rstd_out[i] = (float)r;
    }
}

void qkd__ref_rmsnorm_forward(qkd__backend *b, float *out, float *rstd, const float *inp,
                              const float *w, int N, int C, float eps)
{
    struct rmsnorm_job job = {.out = out, .rstd_out = rstd, .inp = inp, .w = w,
                              .N = N, .C = C, .eps = eps};
    qkd__ref_parallel(b, N, 4 * (int64_t)C, rmsnorm_forward_range, &job);
}

void qkd__ref_rmsnorm_forward_bf16_bits(qkd__backend *b, uint16_t *out, float *rstd,
                                        const float *inp, const float *w, int N, int C,
                                        float eps)
{
    struct rmsnorm_job job = {.out_bits = out, .rstd_out = rstd, .inp = inp, .w = w,
                              .N = N, .C = C, .eps = eps};
    qkd__ref_parallel(b, N, 4 * (int64_t)C, rmsnorm_forward_range, &job);
}

/* The add (in float, as `add`), then the bits RMSNorm. */
void qkd__ref_add_rmsnorm_forward_bf16_bits(qkd__backend *b, float *sum, uint16_t *out,
                                            float *rstd, const float *x, const uint16_t *y,
                                            const float *w, int N, int C, float eps)
{
    for (size_t i = 0; i < (size_t)N * C; i++)
        sum[i] = x[i] + qkd__bf16_to_f32(y[i]);
    qkd__ref_rmsnorm_forward_bf16_bits(b, out, rstd, sum, w, N, C, eps);
}

/* y_c = x_c r w_c with r = (mean(x^2) + eps)^-1/2, so
 * dx_c = r w_c g_c - x_c r^3 / C * sum_i g_i w_i x_i. One item is a row. */
static void rmsnorm_dinp_range(const void *arg, int64_t begin, int64_t end)
{
    const struct rmsnorm_job *j = arg;
    for (int64_t i = begin; i < end; i++) {
        const float *x = j->inp + (size_t)i * j->C;
        const float *g = j->dout + (size_t)i * j->C;
        float *dx = j->dinp + (size_t)i * j->C;
        double r = j->rstd[i];
        double gwx = 0.0;
        for (int c = 0; c < j->C; c++)
            gwx += (double)g[c] * j->w[c] * x[c];
        double k = r * r * r / j->C * gwx;
        for (int c = 0; c < j->C; c++)
            dx[c] = (float)(dx[c] + r * j->w[c] * g[c] - x[c] * k);
    }
}

/* dw_c += sum_n g[n][c] x[n][c] r[n]. One item is a column block. */
static void rmsnorm_dw_range(const void *arg, int64_t begin, int64_t end)
{
    const struct rmsnorm_job *j = arg;
    double acc[QKD__REF_LINE];
    for (int64_t blk = begin; blk < end; blk++) {
        int c0 = (int)blk * QKD__REF_LINE;
        int nc = min_int(QKD__REF_LINE, j->C - c0);
        for (int c = 0; c < nc; c++)
            acc[c] = 0.0;
        for (int n = 0; n < j->N; n++) {
            const float *x = j->inp + (size_t)n * j->C + c0;
            const float *g = j->dout + (size_t)n * j->C + c0;
            for (int c = 0; c < nc; c++)
                acc[c] += (double)g[c] * x[c] * j->rstd[n];
        }
        for (int c = 0; c < nc; c++)
            j->dw[c0 + c] = (float)(j->dw[c0 + c] + acc[c]);
    }
}

void qkd__ref_rmsnorm_backward(qkd__backend *b, float *dinp, float *dw, const float *dout,
                               const float *inp, const float *w, const float *rstd, int N,
                               int C)
{
    struct rmsnorm_job job = {.dinp = dinp, .dw = dw, .dout = dout, .inp = inp, .w = w,
                              .rstd = rstd, .N = N, .C = C};
    qkd__ref_parallel(b, N, 6 * (int64_t)C, rmsnorm_dinp_range, &job);
    qkd__ref_parallel(b, n_blocks(C, QKD__REF_LINE), 3 * (int64_t)N * QKD__REF_LINE,
                      rmsnorm_dw_range, &job);
}

void qkd__ref_rmsnorm_backward_bf16_bits(qkd__backend *b, float *dinp, uint16_t *dinp_bits,
                                         float *dw, const float *dout, const float *inp,
                                         const float *w, const float *rstd, int N, int C)
{
    qkd__ref_rmsnorm_backward(b, dinp, dw, dout, inp, w, rstd, N, C);
    for (size_t i = 0, n = (size_t)N * C; i < n; i++)
        dinp_bits[i] = qkd__f32_to_bf16(dinp[i]);
}
