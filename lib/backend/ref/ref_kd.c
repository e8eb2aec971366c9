/* Reference kernels of the distillation objectives (the math of each kind is
 * in include/qkd/loss.h), TSLD's token weights and the teacher's top-1
 * probability.
 *
 * A row of kd_loss takes three sweeps over the vocabulary: (1) the
 * log-sum-exp of s/tau and t/tau, CHUNK logits at a time with a running max
 * and sum (online softmax); (2) the row's value from log q and log p;
 * (3) the gradient, which for RKL, CAKLD and JSD needs the value of (2).
 * So nothing larger than a chunk is ever held per row. Sums run in double
 * and rows are split over threads, each row written by one task.
 *
 * row_w scales both the row's value and its gradient: row_loss[i] is
 * w_i * term_i (TSLD's row term includes its weight), ds gets
 * scale * w_i * d term_i / ds. A row holding a NaN or Inf logit gets a
 * non-finite row_loss and a NaN gradient row. */
#include <math.h>

#include "backend/ref/ref.h"
#include "core/half.h"
#include "qkd/loss.h"

#define CHUNK 256

/* ---- online softmax -------------------------------------------------------- */

/* sum = sum of exp(x * inv_temp - max) over the logits seen so far. */
struct lse_acc {
    double max, sum;
};

/* Fold one chunk into acc; 0 if the chunk holds a non-finite logit. */
static int lse_add_chunk(struct lse_acc *acc, const float *x, int n, double inv_temp)
{
    double m = -INFINITY;
    for (int v = 0; v < n; v++) {
        if (!isfinite(x[v]))
            return 0;
        m = fmax(m, x[v] * inv_temp);
    }
    double s = 0.0;
    for (int v = 0; v < n; v++)
        s += exp(x[v] * inv_temp - m);
    if (m > acc->max) {
        acc->sum = acc->sum * exp(acc->max - m) + s;
        acc->max = m;
    } else {
        acc->sum += s * exp(m - acc->max);
    }
    return 1;
}

/* The running max and sum of a whole row; 0 if it holds a non-finite logit. */
static int row_softmax(const float *x, int V, double inv_temp, struct lse_acc *acc)
{
    acc->max = -INFINITY;
    acc->sum = 0.0;
    for (int v0 = 0; v0 < V; v0 += CHUNK)
        if (!lse_add_chunk(acc, x + v0, V - v0 < CHUNK ? V - v0 : CHUNK, inv_temp))
            return 0;
    return 1;
}

/* log sum exp(x * inv_temp), NAN if x holds a non-finite logit. */
static double row_lse(const float *x, int V, double inv_temp)
{
    struct lse_acc acc;
    return row_softmax(x, V, inv_temp, &acc) ? acc.max + log(acc.sum) : NAN;
}

/* ---- kd_loss ------------------------------------------------------------------- */

struct kd_job {
    float *row_loss, *ds;
    uint16_t *ds_bits;
    const float *s, *t, *row_w;
    const int32_t *targets;
    double scale, tau, beta;
    int V, kind, accumulate;
};

/* One row: its logits, log-normalisers, and the KL values its gradient uses. */
struct kd_row {
    const float *s, *t;
    int y;              /* target (CE) */
    double lse_s, lse_t; /* log sum exp of s/tau and t/tau */
    double rkl;          /* KL(q||p) */
    double kqm;          /* KL(q||m), JSD's mixture m */
};

/* log(beta e^lp + (1-beta) e^lq) without underflow; exact at beta 0 and 1. */
static double log_mix(double lp, double lq, double beta)
{
    double a = beta > 0.0 ? log(beta) + lp : -INFINITY;
    double b = beta < 1.0 ? log1p(-beta) + lq : -INFINITY;
    double hi = fmax(a, b), lo = fmin(a, b);
    return hi + log1p(exp(lo - hi));
}

static double mse_value(const struct kd_row *r, int V)
{
    double sum = 0.0;
    for (int v = 0; v < V; v++) {
        double d = (double)r->s[v] - r->t[v];
        sum += d * d;
    }
    return sum / V;
}

/* The row's term for the softmax kinds, before the tau^2 factor; fills
 * r->rkl and r->kqm. */
static double softmax_value(const struct kd_job *j, struct kd_row *r)
{
    double fkl = 0.0, rkl = 0.0, xent = 0.0, kpm = 0.0, kqm = 0.0;
    const double it = 1.0 / j->tau;
    for (int v = 0; v < j->V; v++) {
        double lq = r->s[v] * it - r->lse_s, lp = r->t[v] * it - r->lse_t;
        double q = exp(lq), p = exp(lp);
        fkl += p * (lp - lq);
        rkl += q * (lq - lp);
        xent -= p * lq;
        if (j->kind == QKD_LOSS_JSD) {
            double lm = log_mix(lp, lq, j->beta);
            kpm += p * (lp - lm);
            kqm += q * (lq - lm);
        }
    }
    r->rkl = rkl;
    r->kqm = kqm;
    switch (j->kind) {
    case QKD_LOSS_FKL: return fkl;
    case QKD_LOSS_RKL: return rkl;
    case QKD_LOSS_JSD: return j->beta * kpm + (1.0 - j->beta) * kqm;
    case QKD_LOSS_CAKLD: return j->beta * rkl + (1.0 - j->beta) * fkl;
    default: return xent; /* TSLD */
    }
}

/* d term / d (s/tau) at logit v for the softmax kinds. */
static double softmax_grad(const struct kd_job *j, const struct kd_row *r, int v)
{
    const double it = 1.0 / j->tau;
    double lq = r->s[v] * it - r->lse_s, lp = r->t[v] * it - r->lse_t;
    double q = exp(lq), p = exp(lp);
    switch (j->kind) {
    case QKD_LOSS_RKL: return q * (lq - lp - r->rkl);
    case QKD_LOSS_JSD: return (1.0 - j->beta) * q * (lq - log_mix(lp, lq, j->beta) - r->kqm);
    case QKD_LOSS_CAKLD:
        return j->beta * q * (lq - lp - r->rkl) + (1.0 - j->beta) * (q - p);
    default: return q - p; /* FKL, TSLD */
    }
}

/* The row's term (tau^2 included); NAN if a logit it reads is not finite. */
static double row_value(const struct kd_job *j, struct kd_row *r)
{
    switch (j->kind) {
    case QKD_LOSS_CE:
        r->lse_s = row_lse(r->s, j->V, 1.0);
        return r->lse_s - r->s[r->y];
    case QKD_LOSS_MSE:
        return mse_value(r, j->V);
    default:
        r->lse_s = row_lse(r->s, j->V, 1.0 / j->tau);
        r->lse_t = row_lse(r->t, j->V, 1.0 / j->tau);
        if (isnan(r->lse_s) || isnan(r->lse_t))
            return NAN;
        return j->tau * j->tau * softmax_value(j, r);
    }
}

/* Gradient element v of row i: x added to or written over ds, or written
 * as the bf16 bits of the float it would be. */
static void put_grad(const struct kd_job *j, int64_t i, int v, double x)
{
    const size_t at = (size_t)i * j->V + v;
    if (j->ds_bits)
        j->ds_bits[at] = qkd__f32_to_bf16((float)x);
    else
        j->ds[at] = (float)(j->accumulate ? j->ds[at] + x : x);
}

/* Row i's gradient: coef * d term / ds; coef already holds scale * w. */
static void row_grad(const struct kd_job *j, const struct kd_row *r, int64_t i, double coef)
{
    for (int v = 0; v < j->V; v++) {
        double g;
        if (j->kind == QKD_LOSS_CE)
            g = exp(r->s[v] - r->lse_s) - (v == r->y);
        else if (j->kind == QKD_LOSS_MSE)
            g = 2.0 * ((double)r->s[v] - r->t[v]) / j->V;
        else /* d/ds = (1/tau) d/d(s/tau), times tau^2 */
            g = j->tau * softmax_grad(j, r, v);
        put_grad(j, i, v, coef * g);
    }
}

/* Row i's gradient set to x (added, where ds accumulates). */
static void fill_grad_row(const struct kd_job *j, int64_t i, double x)
{
    for (int v = 0; v < j->V; v++)
        put_grad(j, i, v, x);
}

static void kd_loss_range(const void *arg, int64_t begin, int64_t end)
{
    const struct kd_job *j = arg;
    const int grad = j->ds || j->ds_bits;
    for (int64_t i = begin; i < end; i++) {
        struct kd_row r = {.s = j->s + (size_t)i * j->V,
                           .t = j->t ? j->t + (size_t)i * j->V : NULL,
                           .y = j->targets ? j->targets[i] : 0};
        if (j->targets && r.y < 0) {
            j->row_loss[i] = 0.0f;
            if (grad && !j->accumulate)
                fill_grad_row(j, i, 0.0);
            continue;
        }
        double w = j->row_w ? j->row_w[i] : 1.0;
        double value = row_value(j, &r);
        j->row_loss[i] = (float)(w * value);
        if (grad && isfinite(value))
            row_grad(j, &r, i, j->scale * w);
        else if (grad)
            fill_grad_row(j, i, NAN);
    }
}

void qkd__ref_kd_loss(qkd__backend *b, float *row_loss, float *ds, uint16_t *ds_bits,
                      const float *s, const float *t, const int32_t *targets,
                      const float *row_w, int N, int V, const qkd__kd_term *term)
{
    /* CE and MSE do not use the temperature. */
    int plain = term->kind == QKD_LOSS_CE || term->kind == QKD_LOSS_MSE;
    struct kd_job job = {.row_loss = row_loss, .ds = ds, .ds_bits = ds_bits, .s = s, .t = t,
                         .row_w = row_w, .targets = targets, .scale = term->scale,
                         .tau = plain ? 1.0 : term->temperature,
                         .beta = term->beta_dev ? *term->beta_dev : term->beta, .V = V,
                         .kind = term->kind, .accumulate = term->accumulate};
    qkd__ref_parallel(b, N, 100 * (int64_t)V, kd_loss_range, &job);
}

/* ---- TSLD token weights -------------------------------------------------------- */

struct tsld_job {
    float *w;
    const float *c;
    const int32_t *targets;
    int T;
    double inv_tau;
};

static void tsld_weights_range(const void *arg, int64_t begin, int64_t end)
{
    const struct tsld_job *j = arg;
    for (int64_t b = begin; b < end; b++) {
        const int32_t *y = j->targets + b * j->T;
        const float *c = j->c + b * j->T;
        float *w = j->w + b * j->T;
        double mx = -INFINITY, sum = 0.0;
        for (int i = 0; i < j->T; i++)
            if (y[i] >= 0)
                mx = fmax(mx, c[i] * j->inv_tau);
        for (int i = 0; i < j->T; i++)
            if (y[i] >= 0)
                sum += exp(c[i] * j->inv_tau - mx);
        for (int i = 0; i < j->T; i++)
            w[i] = y[i] >= 0 ? (float)(exp(c[i] * j->inv_tau - mx) / sum) : 0.0f;
    }
}

void qkd__ref_tsld_weights(qkd__backend *b, float *w, const float *c, const int32_t *targets,
                           int B, int T, float tau)
{
    struct tsld_job job = {.w = w, .c = c, .targets = targets, .T = T,
                           .inv_tau = 1.0 / tau};
    qkd__ref_parallel(b, B, 60 * (int64_t)T, tsld_weights_range, &job);
}

/* ---- the teacher's top-1 probability ---------------------------------------------- */

struct max_prob_job {
    float *out;
    const float *x;
    const int32_t *targets;
    int V;
};

/* max softmax = exp(max - lse) = 1 / sum of exp(x - max). */
static void row_max_prob_range(const void *arg, int64_t begin, int64_t end)
{
    const struct max_prob_job *j = arg;
    for (int64_t i = begin; i < end; i++) {
        if (j->targets && j->targets[i] < 0) {
            j->out[i] = 0.0f;
            continue;
        }
        struct lse_acc acc;
        int finite = row_softmax(j->x + (size_t)i * j->V, j->V, 1.0, &acc);
        j->out[i] = finite ? (float)(1.0 / acc.sum) : NAN;
    }
}

void qkd__ref_row_max_prob(qkd__backend *b, float *out, const float *x,
                           const int32_t *targets, int N, int V)
{
    struct max_prob_job job = {.out = out, .x = x, .targets = targets, .V = V};
    qkd__ref_parallel(b, N, 30 * (int64_t)V, row_max_prob_range, &job);
}
