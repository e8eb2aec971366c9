/* Reference kernels of the activation family: SwiGLU, softmax,
 * log-softmax and the fused cross-entropy. Row kernels split over rows. */
#include <math.h>

#include "backend/ref/ref.h"
#include "core/half.h"

/* ---- SwiGLU ---------------------------------------------------------------------- */

struct swiglu_job {
    float *out, *dgate, *dup;
    uint16_t *out_bits, *dgate_bits, *dup_bits; /* the bf16-bits forms' outputs */
    const float *dout, *gate, *up;
    const uint16_t *dout_bits, *gate_bits, *up_bits; /* and their inputs */
    int64_t cols, ld; /* the backward's bits: rows of cols, ld apart */
};

/* Element i of an input given as floats or (bits not NULL) bf16 bits. */
static double in_at(const float *x, const uint16_t *bits, int64_t i)
{
    return bits ? qkd__bf16_to_f32(bits[i]) : x[i];
}

static double sigmoid(double x)
{
    return 1.0 / (1.0 + exp(-x));
}

/* silu(gate[i]) up[i]: the forward's value, which the bf16 backward
 * writes again. */
static float silu_times(const struct swiglu_job *j, int64_t i)
{
    double x = in_at(j->gate, j->gate_bits, i);
    return (float)(x * sigmoid(x) * in_at(j->up, j->up_bits, i));
}

static void swiglu_forward_range(const void *arg, int64_t begin, int64_t end)
{
    const struct swiglu_job *j = arg;
    for (int64_t i = begin; i < end; i++) {
        const float v = silu_times(j, i);
        if (j->out_bits)
            j->out_bits[i] = qkd__f32_to_bf16(v);
        else
            j->out[i] = v;
    }
}

/* silu'(x) = s (1 + x (1 - s)) with s = sigmoid(x). */
static void swiglu_backward_range(const void *arg, int64_t begin, int64_t end)
{
    const struct swiglu_job *j = arg;
    for (int64_t i = begin; i < end; i++) {
        double x = in_at(j->gate, j->gate_bits, i), s = sigmoid(x);
        const double g = in_at(j->dout, j->dout_bits, i), u = in_at(j->up, j->up_bits, i);
        const double dg = g * u * s * (1.0 + x * (1.0 - s)), du = g * x * s;
        if (j->dgate_bits) { /* written: what adding to zero gives */
            const int64_t at = i / j->cols * j->ld + i % j->cols;
            j->dgate_bits[at] = qkd__f32_to_bf16((float)(0.0f + dg));
            j->dup_bits[at] = qkd__f32_to_bf16((float)(0.0f + du));
            if (j->out_bits)
                j->out_bits[i] = qkd__f32_to_bf16(silu_times(j, i));
        } else {
            j->dgate[i] = (float)(j->dgate[i] + dg);
            j->dup[i] = (float)(j->dup[i] + du);
        }
    }
}

void qkd__ref_swiglu_forward(qkd__backend *b, float *out, const float *gate, const float *up,
                             size_t n)
{
    struct swiglu_job job = {.out = out, .gate = gate, .up = up};
    qkd__ref_parallel(b, (int64_t)n, 30, swiglu_forward_range, &job);
}

void qkd__ref_swiglu_backward(qkd__backend *b, float *dgate, float *dup, const float *dout,
                              const float *gate, const float *up, size_t n)
{
    struct swiglu_job job = {.dgate = dgate, .dup = dup, .dout = dout, .gate = gate, .up = up};
    qkd__ref_parallel(b, (int64_t)n, 40, swiglu_backward_range, &job);
}

void qkd__ref_swiglu_forward_bf16_bits(qkd__backend *b, uint16_t *out, const uint16_t *gate,
                                       const uint16_t *up, size_t n)
{
    struct swiglu_job job = {.out_bits = out, .gate_bits = gate, .up_bits = up};
    qkd__ref_parallel(b, (int64_t)n, 30, swiglu_forward_range, &job);
}

void qkd__ref_swiglu_backward_bf16_bits(qkd__backend *b, uint16_t *dgate, uint16_t *dup,
                                        size_t ld, uint16_t *out, const uint16_t *dout,
                                        const uint16_t *gate, const uint16_t *up, size_t rows,
                                        size_t cols)
{
    struct swiglu_job job = {.dgate_bits = dgate, .dup_bits = dup, .out_bits = out,
                             .dout_bits = dout, .gate_bits = gate, .up_bits = up,
                             .cols = (int64_t)cols, .ld = (int64_t)ld};
    qkd__ref_parallel(b, (int64_t)(rows * cols), 40, swiglu_backward_range, &job);
}

/* ---- softmax family ------------------------------------------------------------------ */

struct rows_job {
    float *out;
    const float *x, *dy, *y;
    const int32_t *targets;
    int V;
    double inv_temp, scale;
};

/* log(sum_v exp(x[v] * inv_temp)), with the max subtracted for stability. */
static double logsumexp(const float *x, int V, double inv_temp)
{
    double mx = -INFINITY, sum = 0.0;
    for (int v = 0; v < V; v++)
        mx = fmax(mx, x[v] * inv_temp);
    for (int v = 0; v < V; v++)
        sum += exp(x[v] * inv_temp - mx);
    return mx + log(sum);
}

static void softmax_forward_range(const void *arg, int64_t begin, int64_t end)
{
    const struct rows_job *j = arg;
    for (int64_t i = begin; i < end; i++) {
        const float *x = j->x + (size_t)i * j->V;
        float *p = j->out + (size_t)i * j->V;
        double lse = logsumexp(x, j->V, j->inv_temp);
        for (int v = 0; v < j->V; v++)
            p[v] = (float)exp(x[v] * j->inv_temp - lse);
    }
}

/* dlogits += inv_temp * p * (dp - sum(dp * p)) */
static void softmax_backward_range(const void *arg, int64_t begin, int64_t end)
{
    const struct rows_job *j = arg;
    for (int64_t i = begin; i < end; i++) {
        const float *p = j->y + (size_t)i * j->V;
        const float *dp = j->dy + (size_t)i * j->V;
        float *dx = j->out + (size_t)i * j->V;
        double s = qkd__ref_dot(dp, p, j->V);
        for (int v = 0; v < j->V; v++)
            dx[v] = (float)(dx[v] + j->inv_temp * p[v] * (dp[v] - s));
    }
}

static void log_softmax_forward_range(const void *arg, int64_t begin, int64_t end)
{
    const struct rows_job *j = arg;
    for (int64_t i = begin; i < end; i++) {
        const float *x = j->x + (size_t)i * j->V;
        float *lp = j->out + (size_t)i * j->V;
        double lse = logsumexp(x, j->V, j->inv_temp);
        for (int v = 0; v < j->V; v++)
            lp[v] = (float)(x[v] * j->inv_temp - lse);
    }
}

/* dlogits += inv_temp * (dlogp - softmax * sum(dlogp)) */
static void log_softmax_backward_range(const void *arg, int64_t begin, int64_t end)
{
    const struct rows_job *j = arg;
    for (int64_t i = begin; i < end; i++) {
        const float *lp = j->y + (size_t)i * j->V;
        const float *dlp = j->dy + (size_t)i * j->V;
        float *dx = j->out + (size_t)i * j->V;
        double s = 0.0;
        for (int v = 0; v < j->V; v++)
            s += dlp[v];
        for (int v = 0; v < j->V; v++)
            dx[v] = (float)(dx[v] + j->inv_temp * (dlp[v] - exp(lp[v]) * s));
    }
}

static void cross_entropy_forward_range(const void *arg, int64_t begin, int64_t end)
{
    const struct rows_job *j = arg;
    for (int64_t i = begin; i < end; i++) {
        const float *x = j->x + (size_t)i * j->V;
        int target = j->targets[i];
        j->out[i] = target < 0 ? 0.0f : (float)(logsumexp(x, j->V, 1.0) - x[target]);
    }
}

static void cross_entropy_backward_range(const void *arg, int64_t begin, int64_t end)
{
    const struct rows_job *j = arg;
    for (int64_t i = begin; i < end; i++) {
        int target = j->targets[i];
        if (target < 0)
            continue;
        const float *x = j->x + (size_t)i * j->V;
        float *dx = j->out + (size_t)i * j->V;
        double lse = logsumexp(x, j->V, 1.0);
        for (int v = 0; v < j->V; v++)
            dx[v] = (float)(dx[v] + j->scale * (exp(x[v] - lse) - (v == target)));
    }
}

static void run_rows(qkd__backend *b, const struct rows_job *job, int N,
                     qkd__ref_range_fn fn)
{
    qkd__ref_parallel(b, N, 30 * (int64_t)job->V, fn, job);
}

void qkd__ref_softmax_forward(qkd__backend *b, float *probs, const float *logits, int N, int V,
                              float inv_temp)
{
    struct rows_job job = {.out = probs, .x = logits, .V = V, .inv_temp = inv_temp};
    run_rows(b, &job, N, softmax_forward_range);
}

void qkd__ref_softmax_backward(qkd__backend *b, float *dlogits, const float *dprobs,
                               const float *probs, int N, int V, float inv_temp)
{
    struct rows_job job = {.out = dlogits, .dy = dprobs, .y = probs, .V = V,
                           .inv_temp = inv_temp};
    run_rows(b, &job, N, softmax_backward_range);
}

void qkd__ref_log_softmax_forward(qkd__backend *b, float *logp, const float *logits, int N,
                                  int V, float inv_temp)
{
    struct rows_job job = {.out = logp, .x = logits, .V = V, .inv_temp = inv_temp};
    run_rows(b, &job, N, log_softmax_forward_range);
}

void qkd__ref_log_softmax_backward(qkd__backend *b, float *dlogits, const float *dlogp,
                                   const float *logp, int N, int V, float inv_temp)
{
    struct rows_job job = {.out = dlogits, .dy = dlogp, .y = logp, .V = V,
                           .inv_temp = inv_temp};
    run_rows(b, &job, N, log_softmax_backward_range);
}

void qkd__ref_cross_entropy_forward(qkd__backend *b, float *losses, const float *logits,
                                    const int32_t *targets, int N, int V)
{
    struct rows_job job = {.out = losses, .x = logits, .targets = targets, .V = V};
    run_rows(b, &job, N, cross_entropy_forward_range);
}

void qkd__ref_cross_entropy_backward(qkd__backend *b, float *dlogits, const float *logits,
                                     const int32_t *targets, float scale, int N, int V)
{
    struct rows_job job = {.out = dlogits, .x = logits, .targets = targets, .V = V,
                           .scale = scale};
    run_rows(b, &job, N, cross_entropy_backward_range);
}
