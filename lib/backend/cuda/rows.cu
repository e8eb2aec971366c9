/* CUDA kernels over rows: RMSNorm, the softmax family, cross-entropy, the
 * distillation objectives, TSLD's token weights and the top-1
 * probability. One block per row, sums in double through the block
 * reductions of common.cuh, the formulas written as the reference writes
 * them (lib/backend/ref/ref_activation.c, ref_kd.c, ref_linear.c). */
#include "backend/cuda/common.cuh"
#include "qkd/loss.h"

/* log sum exp(x * it) over a row of V, NAN if the row holds a non-finite
 * value. Every thread of the block gets it. */
__device__ static double row_lse(const float *x, int V, double it)
{
    double mx = -INFINITY, bad = 0.0;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        bad += !isfinite(x[v]);
        mx = fmax(mx, x[v] * it);
    }
    mx = qkd__block_max(mx);
    if (qkd__block_sum(bad) > 0.0)
        return NAN;
    double s = 0.0;
    for (int v = threadIdx.x; v < V; v += blockDim.x)
        s += exp(x[v] * it - mx);
    return mx + log(qkd__block_sum(s));
}

static unsigned rows_grid(int N)
{
    return (unsigned)N;
}

/* ---- RMSNorm ----------------------------------------------------------------------- */

__global__ void rmsnorm_forward_kernel(float *out, float *rstd, const float *inp, const float *w,
                                       int C, float eps)
{
    const float *x = inp + (size_t)blockIdx.x * C;
    float *y = out + (size_t)blockIdx.x * C;
    double ss = 0.0;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        ss += (double)x[c] * x[c];
    double r = 1.0 / sqrt(qkd__block_sum(ss) / C + eps);
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        y[c] = (float)(x[c] * r * w[c]);
    if (threadIdx.x == 0)
        rstd[blockIdx.x] = (float)r;
}

/* dx_c += r w_c g_c - x_c r^3 / C * sum_i g_i w_i x_i */
__global__ void rmsnorm_dinp_kernel(float *dinp, const float *dout, const float *inp,
                                    const float *w, const float *rstd, int C)
{
    size_t off = (size_t)blockIdx.x * C;
    const float *x = inp + off, *g = dout + off;
    float *dx = dinp + off;
    double r = rstd[blockIdx.x], gwx = 0.0;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        gwx += (double)g[c] * w[c] * x[c];
    double k = r * r * r / C * qkd__block_sum(gwx);
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        dx[c] = (float)(dx[c] + r * w[c] * g[c] - x[c] * k);
}

/* Rows per chunk of the dw sums: chunk sums first, then the chunks in
 * order, so the sum is deterministic and its parallelism grows with N. */
#define DW_ROWS 64

__global__ void rmsnorm_dw_chunks_kernel(double *part, const float *dout, const float *inp,
                                         const float *rstd, int N, int C)
{
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C)
        return;
    int n0 = blockIdx.y * DW_ROWS, n1 = min(N, n0 + DW_ROWS);
    double acc = 0.0;
    for (int n = n0; n < n1; n++)
        acc += (double)dout[(size_t)n * C + c] * inp[(size_t)n * C + c] * rstd[n];
    part[(size_t)blockIdx.y * C + c] = acc;
}

__global__ void rmsnorm_dw_sum_kernel(float *dw, const double *part, int chunks, int C)
{
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C)
        return;
    double acc = 0.0;
    for (int k = 0; k < chunks; k++)
        acc += part[(size_t)k * C + c];
    dw[c] = (float)(dw[c] + acc);
}

extern "C" void qkd__cuda_rmsnorm_forward(qkd__backend *b, float *out, float *rstd,
                                          const float *inp, const float *w, int N, int C,
                                          float eps)
{
    if (N <= 0 || C <= 0)
        return;
    rmsnorm_forward_kernel<<<rows_grid(N), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(
        out, rstd, inp, w, C, eps);
    qkd__cuda_launched(b, "rmsnorm_forward");
}

extern "C" void qkd__cuda_rmsnorm_backward(qkd__backend *b, float *dinp, float *dw,
                                           const float *dout, const float *inp, const float *w,
                                           const float *rstd, int N, int C)
{
    if (N <= 0 || C <= 0)
        return;
    cudaStream_t st = qkd__cuda_of(b)->stream;
    rmsnorm_dinp_kernel<<<rows_grid(N), QKD__CUDA_THREADS, 0, st>>>(dinp, dout, inp, w, rstd, C);
    qkd__cuda_launched(b, "rmsnorm_backward");
    int chunks = (N + DW_ROWS - 1) / DW_ROWS;
    double *part = (double *)qkd__cuda_workspace(b, 2 * (size_t)chunks * C);
    if (!part)
        return;
    unsigned col_blocks = (unsigned)((C + QKD__CUDA_THREADS - 1) / QKD__CUDA_THREADS);
    rmsnorm_dw_chunks_kernel<<<dim3(col_blocks, (unsigned)chunks), QKD__CUDA_THREADS, 0, st>>>(
        part, dout, inp, rstd, N, C);
    rmsnorm_dw_sum_kernel<<<col_blocks, QKD__CUDA_THREADS, 0, st>>>(dw, part, chunks, C);
    qkd__cuda_launched(b, "rmsnorm_backward dw");
}

/* ---- softmax family ------------------------------------------------------------------ */

enum row_op { SOFTMAX, LOG_SOFTMAX };

__global__ void softmax_forward_kernel(float *out, const float *logits, int V, double it,
                                       int op)
{
    const float *x = logits + (size_t)blockIdx.x * V;
    float *y = out + (size_t)blockIdx.x * V;
    double lse = row_lse(x, V, it);
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        double lp = x[v] * it - lse;
        y[v] = (float)(op == SOFTMAX ? exp(lp) : lp);
    }
}

/* softmax: dx += it * p * (dp - sum(dp * p));
 * log-softmax: dx += it * (dlp - exp(lp) * sum(dlp)). */
__global__ void softmax_backward_kernel(float *dlogits, const float *dy, const float *y, int V,
                                        double it, int op)
{
    size_t off = (size_t)blockIdx.x * V;
    const float *p = y + off, *dp = dy + off;
    float *dx = dlogits + off;
    double s = 0.0;
    for (int v = threadIdx.x; v < V; v += blockDim.x)
        s += op == SOFTMAX ? (double)dp[v] * p[v] : (double)dp[v];
    s = qkd__block_sum(s);
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        double d = op == SOFTMAX ? it * p[v] * (dp[v] - s) : it * (dp[v] - exp((double)p[v]) * s);
        dx[v] = (float)(dx[v] + d);
    }
}

static void softmax_forward(qkd__backend *b, float *out, const float *logits, int N, int V,
                            float inv_temp, int op)
{
    if (N <= 0 || V <= 0)
        return;
    softmax_forward_kernel<<<rows_grid(N), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(
        out, logits, V, inv_temp, op);
    qkd__cuda_launched(b, op == SOFTMAX ? "softmax_forward" : "log_softmax_forward");
}

static void softmax_backward(qkd__backend *b, float *dlogits, const float *dy, const float *y,
                             int N, int V, float inv_temp, int op)
{
    if (N <= 0 || V <= 0)
        return;
    softmax_backward_kernel<<<rows_grid(N), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(
        dlogits, dy, y, V, inv_temp, op);
    qkd__cuda_launched(b, op == SOFTMAX ? "softmax_backward" : "log_softmax_backward");
}

extern "C" void qkd__cuda_softmax_forward(qkd__backend *b, float *probs, const float *logits,
                                          int N, int V, float inv_temp)
{
    softmax_forward(b, probs, logits, N, V, inv_temp, SOFTMAX);
}

extern "C" void qkd__cuda_softmax_backward(qkd__backend *b, float *dlogits, const float *dprobs,
                                           const float *probs, int N, int V, float inv_temp)
{
    softmax_backward(b, dlogits, dprobs, probs, N, V, inv_temp, SOFTMAX);
}

extern "C" void qkd__cuda_log_softmax_forward(qkd__backend *b, float *logp, const float *logits,
                                              int N, int V, float inv_temp)
{
    softmax_forward(b, logp, logits, N, V, inv_temp, LOG_SOFTMAX);
}

extern "C" void qkd__cuda_log_softmax_backward(qkd__backend *b, float *dlogits,
                                               const float *dlogp, const float *logp, int N,
                                               int V, float inv_temp)
{
    softmax_backward(b, dlogits, dlogp, logp, N, V, inv_temp, LOG_SOFTMAX);
}

/* ---- cross-entropy ----------------------------------------------------------------------- */

__global__ void cross_entropy_forward_kernel(float *losses, const float *logits,
                                             const int32_t *targets, int V)
{
    const float *x = logits + (size_t)blockIdx.x * V;
    int target = targets[blockIdx.x];
    if (target < 0) { /* the whole block agrees */
        if (threadIdx.x == 0)
            losses[blockIdx.x] = 0.0f;
        return;
    }
    double lse = row_lse(x, V, 1.0);
    if (threadIdx.x == 0)
        losses[blockIdx.x] = (float)(lse - x[target]);
}

__global__ void cross_entropy_backward_kernel(float *dlogits, const float *logits,
                                              const int32_t *targets, double scale, int V)
{
    int target = targets[blockIdx.x];
    if (target < 0)
        return;
    const float *x = logits + (size_t)blockIdx.x * V;
    float *dx = dlogits + (size_t)blockIdx.x * V;
    double lse = row_lse(x, V, 1.0);
    for (int v = threadIdx.x; v < V; v += blockDim.x)
        dx[v] = (float)(dx[v] + scale * (exp(x[v] - lse) - (v == target)));
}

extern "C" void qkd__cuda_cross_entropy_forward(qkd__backend *b, float *losses,
                                                const float *logits, const int32_t *targets,
                                                int N, int V)
{
    if (N <= 0 || V <= 0)
        return;
    cross_entropy_forward_kernel<<<rows_grid(N), QKD__CUDA_THREADS, 0,
                                   qkd__cuda_of(b)->stream>>>(losses, logits, targets, V);
    qkd__cuda_launched(b, "cross_entropy_forward");
}

extern "C" void qkd__cuda_cross_entropy_backward(qkd__backend *b, float *dlogits,
                                                 const float *logits, const int32_t *targets,
                                                 float scale, int N, int V)
{
    if (N <= 0 || V <= 0)
        return;
    cross_entropy_backward_kernel<<<rows_grid(N), QKD__CUDA_THREADS, 0,
                                    qkd__cuda_of(b)->stream>>>(dlogits, logits, targets, scale,
                                                               V);
    qkd__cuda_launched(b, "cross_entropy_backward");
}

/* ---- kd_loss (the math of each kind is in include/qkd/loss.h) ------------------------------
 * A block per row, three sweeps as in the reference: the log-normalisers,
 * the row's value, then the gradient (RKL, CAKLD and JSD need the value's
 * KL terms). */

struct kd_args {
    float *row_loss, *ds;
    const float *s, *t, *row_w;
    const int32_t *targets;
    double scale, tau, beta;
    int V, kind;
};

/* log(beta e^lp + (1-beta) e^lq) without underflow; exact at beta 0 and 1. */
__device__ static double log_mix(double lp, double lq, double beta)
{
    double a = beta > 0.0 ? log(beta) + lp : -INFINITY;
    double b = beta < 1.0 ? log1p(-beta) + lq : -INFINITY;
    double hi = fmax(a, b), lo = fmin(a, b);
    return hi + log1p(exp(lo - hi));
}

/* What the gradient sweep needs of a softmax kind's row. */
struct kd_row {
    double lse_s, lse_t, rkl, kqm;
};

/* The row's term of a softmax kind before the tau^2 factor; fills r. */
__device__ static double softmax_value(const kd_args &j, const float *s, const float *t,
                                       kd_row *r)
{
    const double it = 1.0 / j.tau;
    double fkl = 0.0, rkl = 0.0, xent = 0.0, kpm = 0.0, kqm = 0.0;
    for (int v = threadIdx.x; v < j.V; v += blockDim.x) {
        double lq = s[v] * it - r->lse_s, lp = t[v] * it - r->lse_t;
        double q = exp(lq), p = exp(lp);
        fkl += p * (lp - lq);
        rkl += q * (lq - lp);
        xent -= p * lq;
        if (j.kind == QKD_LOSS_JSD) {
            double lm = log_mix(lp, lq, j.beta);
            kpm += p * (lp - lm);
            kqm += q * (lq - lm);
        }
    }
    fkl = qkd__block_sum(fkl);
    r->rkl = rkl = qkd__block_sum(rkl);
    xent = qkd__block_sum(xent);
    if (j.kind == QKD_LOSS_JSD) {
        kpm = qkd__block_sum(kpm);
        r->kqm = kqm = qkd__block_sum(kqm);
    }
    switch (j.kind) {
    case QKD_LOSS_FKL: return fkl;
    case QKD_LOSS_RKL: return rkl;
    case QKD_LOSS_JSD: return j.beta * kpm + (1.0 - j.beta) * kqm;
    case QKD_LOSS_CAKLD: return j.beta * rkl + (1.0 - j.beta) * fkl;
    default: return xent; /* TSLD */
    }
}

/* d term / d (s/tau) at logit v for the softmax kinds. */
__device__ static double softmax_grad(const kd_args &j, const kd_row &r, float s, float t)
{
    const double it = 1.0 / j.tau;
    double lq = s * it - r.lse_s, lp = t * it - r.lse_t;
    double q = exp(lq), p = exp(lp);
    switch (j.kind) {
    case QKD_LOSS_RKL: return q * (lq - lp - r.rkl);
    case QKD_LOSS_JSD: return (1.0 - j.beta) * q * (lq - log_mix(lp, lq, j.beta) - r.kqm);
    case QKD_LOSS_CAKLD: return j.beta * q * (lq - lp - r.rkl) + (1.0 - j.beta) * (q - p);
    default: return q - p; /* FKL, TSLD */
    }
}

/* The row's term (tau^2 included); NAN if a logit it reads is not finite. */
__device__ static double kd_value(const kd_args &j, const float *s, const float *t, int y,
                                  kd_row *r)
{
    if (j.kind == QKD_LOSS_CE) {
        r->lse_s = row_lse(s, j.V, 1.0);
        return r->lse_s - s[y];
    }
    if (j.kind == QKD_LOSS_MSE) {
        double sum = 0.0;
        for (int v = threadIdx.x; v < j.V; v += blockDim.x) {
            double d = (double)s[v] - t[v];
            sum += d * d;
        }
        return qkd__block_sum(sum) / j.V;
    }
    r->lse_s = row_lse(s, j.V, 1.0 / j.tau);
    r->lse_t = row_lse(t, j.V, 1.0 / j.tau);
    if (isnan(r->lse_s) || isnan(r->lse_t))
        return NAN;
    return j.tau * j.tau * softmax_value(j, s, t, r);
}

__global__ void kd_loss_kernel(kd_args j)
{
    const size_t i = blockIdx.x;
    const float *s = j.s + i * j.V, *t = j.t ? j.t + i * j.V : NULL;
    int y = j.targets ? j.targets[i] : 0;
    if (j.targets && y < 0) { /* the whole block agrees */
        if (threadIdx.x == 0)
            j.row_loss[i] = 0.0f;
        return;
    }
    double w = j.row_w ? j.row_w[i] : 1.0;
    kd_row r = {0.0, 0.0, 0.0, 0.0};
    double value = kd_value(j, s, t, y, &r);
    if (threadIdx.x == 0)
        j.row_loss[i] = (float)(w * value);
    if (!j.ds || !isfinite(value))
        return;
    float *ds = j.ds + i * j.V;
    double coef = j.scale * w;
    for (int v = threadIdx.x; v < j.V; v += blockDim.x) {
        double g;
        if (j.kind == QKD_LOSS_CE)
            g = exp(s[v] - r.lse_s) - (v == y);
        else if (j.kind == QKD_LOSS_MSE)
            g = 2.0 * ((double)s[v] - t[v]) / j.V;
        else /* d/ds = (1/tau) d/d(s/tau), times tau^2 */
            g = j.tau * softmax_grad(j, r, s[v], t[v]);
        ds[v] = (float)(ds[v] + coef * g);
    }
}

extern "C" void qkd__cuda_kd_loss(qkd__backend *b, float *row_loss, float *ds, const float *s,
                                  const float *t, const int32_t *targets, const float *row_w,
                                  float scale, int N, int V, int kind, float temperature,
                                  float beta)
{
    if (N <= 0 || V <= 0)
        return;
    /* CE and MSE do not use the temperature. */
    int plain = kind == QKD_LOSS_CE || kind == QKD_LOSS_MSE;
    kd_args j = {row_loss, ds, s, t, row_w, targets, scale, plain ? 1.0 : (double)temperature,
                 beta, V, kind};
    kd_loss_kernel<<<rows_grid(N), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(j);
    qkd__cuda_launched(b, "kd_loss");
}

/* ---- TSLD token weights and the top-1 probability ------------------------------------------ */

/* w = softmax of c / tau over the positions with targets >= 0, 0 elsewhere;
 * one block per sequence. */
__global__ void tsld_weights_kernel(float *w, const float *c, const int32_t *targets, int T,
                                    double inv_tau)
{
    size_t off = (size_t)blockIdx.x * T;
    const int32_t *y = targets + off;
    double mx = -INFINITY, sum = 0.0;
    for (int i = threadIdx.x; i < T; i += blockDim.x)
        if (y[i] >= 0)
            mx = fmax(mx, c[off + i] * inv_tau);
    mx = qkd__block_max(mx);
    for (int i = threadIdx.x; i < T; i += blockDim.x)
        if (y[i] >= 0)
            sum += exp(c[off + i] * inv_tau - mx);
    sum = qkd__block_sum(sum);
    for (int i = threadIdx.x; i < T; i += blockDim.x)
        w[off + i] = y[i] >= 0 ? (float)(exp(c[off + i] * inv_tau - mx) / sum) : 0.0f;
}

/* max softmax = exp(max - lse) = 1 / sum of exp(x - max); NAN for a row
 * holding a non-finite value. */
__global__ void row_max_prob_kernel(float *out, const float *x, int V)
{
    const float *row = x + (size_t)blockIdx.x * V;
    double lse = row_lse(row, V, 1.0), mx = -INFINITY;
    for (int v = threadIdx.x; v < V; v += blockDim.x)
        mx = fmax(mx, (double)row[v]);
    mx = qkd__block_max(mx);
    if (threadIdx.x == 0)
        out[blockIdx.x] = isnan(lse) ? NAN : (float)exp(mx - lse);
}

extern "C" void qkd__cuda_tsld_weights(qkd__backend *b, float *w, const float *c,
                                       const int32_t *targets, int B, int T, float tau)
{
    if (B <= 0 || T <= 0)
        return;
    tsld_weights_kernel<<<rows_grid(B), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(
        w, c, targets, T, 1.0 / tau);
    qkd__cuda_launched(b, "tsld_weights");
}

extern "C" void qkd__cuda_row_max_prob(qkd__backend *b, float *out, const float *x, int N, int V)
{
    if (N <= 0 || V <= 0)
        return;
    row_max_prob_kernel<<<rows_grid(N), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(out, x,
                                                                                        V);
    qkd__cuda_launched(b, "row_max_prob");
}
