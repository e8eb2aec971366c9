/* The distillation objectives: the backend's kd_loss, tsld_weights and
 * row_max_prob against plain double-precision computations written here
 * (softmax, the definitions of include/qkd/loss.h, and the gradient through
 * the softmax Jacobian from dL/dq), kd_loss's gradient against central
 * finite differences of its value, and the qkd_loss handle on two tiny
 * random models end to end.
 *
 * Tolerances: kernels accumulate in double and round once to float, so
 * values agree to REL_TOL relative and gradients to REL_TOL of the row's
 * largest entry. Finite differences probe a direction r (multiples of
 * 1/16 signed like the gradient, so the derivative is not flat) with step
 * 2^-7 over logits on the grid 2^-12, so every perturbed logit is exact;
 * the float row values then limit the difference to about 1e-4 and the
 * truncation error is about eps^2 = 6e-5, while a wrong gradient is off by
 * the derivative itself (checked to be > 0.01). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/core.h"
#include "core/half.h"
#include "model/model.h"
#include "qkd/loss.h"
#include "testutil.h"

#define REL_TOL 1e-5
#define FD_EPS (1.0 / 128.0)
#define FD_TOL 3e-4

/* ---- helpers ------------------------------------------------------------------- */

static uint64_t rng_state; /* each test seeds it */

/* Uniform in [lo, hi) from the shared splitmix64 sequence. */
static double rng_uniform(double lo, double hi)
{
    return test_rng_uniform(&rng_state, lo, hi);
}

static int rng_int(int n)
{
    return (int)rng_uniform(0.0, n);
}

/* Random logits in [-4, 4) on the grid 2^-12 (see the header comment). */
static float *rand_logits(size_t n)
{
    float *x = malloc(n * sizeof *x);
    ck_assert_ptr_nonnull(x);
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(floor(rng_uniform(-4.0, 4.0) * 4096.0) / 4096.0);
    return x;
}

static void *dev_alloc(qkd__backend *be, size_t bytes)
{
    void *p = NULL;
    ck_assert_int_eq(be->alloc(be, bytes, &p), QKD_OK);
    return p;
}

/* A device copy of host memory (NULL stays NULL). */
static void *dev_copy(qkd__backend *be, const void *src, size_t bytes)
{
    if (!src)
        return NULL;
    void *p = dev_alloc(be, bytes);
    ck_assert_int_eq(be->upload(be, p, src, bytes), QKD_OK);
    return p;
}

static void dev_get(qkd__backend *be, void *dst, const void *src, size_t bytes)
{
    ck_assert_int_eq(be->sync(be), QKD_OK);
    ck_assert_int_eq(be->download(be, dst, src, bytes), QKD_OK);
}

static double max_abs(const double *x, size_t n)
{
    double m = 0.0;
    for (size_t i = 0; i < n; i++)
        m = fmax(m, fabs(x[i]));
    return m;
}

/* ---- the plain double-precision reference ------------------------------------ */

/* softmax(x / tau) in double */
static double *ref_softmax(const float *x, int V, double tau)
{
    double *p = test_calloc((size_t)V, sizeof *p), mx = -INFINITY, sum = 0.0;
    for (int v = 0; v < V; v++)
        mx = fmax(mx, x[v] / tau);
    for (int v = 0; v < V; v++)
        sum += p[v] = exp(x[v] / tau - mx);
    for (int v = 0; v < V; v++)
        p[v] /= sum;
    return p;
}

/* One row's term, written from the definitions in loss.h, and its gradient
 * d term / ds into grad (if not NULL): dL/dq by hand, then through the
 * softmax Jacobian, d/ds_j = (1/tau) q_j (g_j - sum_i g_i q_i). */
static double ref_row(int kind, const float *s, const float *t, int V, int y, double tau,
                      double beta, double *grad)
{
    if (kind == QKD_LOSS_MSE) {
        double L = 0.0;
        for (int v = 0; v < V; v++) {
            L += ((double)s[v] - t[v]) * ((double)s[v] - t[v]) / V;
            if (grad)
                grad[v] = 2.0 * ((double)s[v] - t[v]) / V;
        }
        return L;
    }
    if (kind == QKD_LOSS_CE)
        tau = 1.0;
    double *q = ref_softmax(s, V, tau), *p = t ? ref_softmax(t, V, tau) : NULL;
    double *g = test_calloc((size_t)V, sizeof *g), L = 0.0, t2 = tau * tau;
    for (int v = 0; v < V; v++) {
        double fkl = 0, rkl = 0, dfkl = 0, drkl = 0;
        if (p) {
            fkl = p[v] * log(p[v] / q[v]);
            rkl = q[v] * log(q[v] / p[v]);
            dfkl = -p[v] / q[v];
            drkl = log(q[v] / p[v]) + 1.0;
        }
        double m = p ? beta * p[v] + (1.0 - beta) * q[v] : 0.0;
        switch (kind) {
        case QKD_LOSS_CE:
            if (v == y) {
                L = -log(q[v]);
                g[v] = -1.0 / q[v];
            }
            break;
        case QKD_LOSS_FKL:
            L += t2 * fkl;
            g[v] = t2 * dfkl;
            break;
        case QKD_LOSS_RKL:
            L += t2 * rkl;
            g[v] = t2 * drkl;
            break;
        case QKD_LOSS_CAKLD:
            L += t2 * (beta * rkl + (1.0 - beta) * fkl);
            g[v] = t2 * (beta * drkl + (1.0 - beta) * dfkl);
            break;
        case QKD_LOSS_JSD:
            L += t2 * (beta * p[v] * log(p[v] / m) + (1.0 - beta) * q[v] * log(q[v] / m));
            g[v] = t2 * (-beta * p[v] * (1.0 - beta) / m +
                         (1.0 - beta) * (log(q[v] / m) + 1.0) -
                         (1.0 - beta) * q[v] * (1.0 - beta) / m);
            break;
        case QKD_LOSS_TSLD:
            L -= t2 * p[v] * log(q[v]);
            g[v] = -t2 * p[v] / q[v];
            break;
        }
    }
    if (grad) {
        double gq = 0.0;
        for (int v = 0; v < V; v++)
            gq += g[v] * q[v];
        for (int v = 0; v < V; v++)
            grad[v] = q[v] * (g[v] - gq) / tau;
    }
    free(q);
    free(p);
    free(g);
    return L;
}

/* ---- kd_loss against the reference --------------------------------------------- */

struct kd_case {
    int kind, V;
    double tau, beta;
};

/* kd_loss's term for case c. */
static qkd__kd_term kd_term(const struct kd_case *c, float scale, int accumulate)
{
    return (qkd__kd_term){.kind = c->kind, .temperature = (float)c->tau,
                          .beta = (float)c->beta, .scale = scale, .accumulate = accumulate};
}

/* ds after one kernel call against base (NULL: written) plus scale * w_i
 * times ref_row's gradient, 0 at the masked row. */
static void check_kd_grad(const struct kd_case *c, const float *s, const float *t,
                          const int32_t *y, const float *w, int N, float scale, const float *base,
                          const float *ds)
{
    const int V = c->V;
    double *grad = test_calloc((size_t)V, sizeof *grad);
    for (int i = 0; i < N; i++) {
        if (y[i] >= 0)
            ref_row(c->kind, s + (size_t)i * V, t + (size_t)i * V, V, y[i], c->tau, c->beta,
                    grad);
        double gmax = max_abs(grad, (size_t)V);
        for (int v = 0; v < V; v++) {
            double want = (base ? base[(size_t)i * V + v] : 0.0) +
                          (y[i] < 0 ? 0.0 : scale * w[i] * grad[v]);
            double got = ds[(size_t)i * V + v];
            ck_assert_msg(fabs(got - want) <= REL_TOL * scale * w[i] * gmax + 1e-6 * fabs(want),
                          "kind %d V %d tau %g beta %g %s: ds[%d][%d] = %.9g, want %.9g",
                          c->kind, V, c->tau, c->beta, base ? "added" : "written", i, v, got,
                          want);
        }
    }
    free(grad);
}

/* N rows with a masked one, row weights, scale 0.7 and a non-zero ds: the
 * kernel adds to it, then writes over it (the masked row zeroed):
 * row_loss and ds against ref_row, and the values again without ds. */
static void check_kd_case(qkd__backend *be, const struct kd_case *c)
{
    enum { N = 4 };
    const int V = c->V;
    const size_t NV = (size_t)N * V;
    const float scale = 0.7f;
    float *s = rand_logits(NV), *t = rand_logits(NV), *ds0 = rand_logits(NV);
    int32_t y[N];
    float w[N], loss[N], *ds = test_calloc(NV, sizeof *ds);
    for (int i = 0; i < N; i++) {
        y[i] = i == 1 ? -1 : rng_int(V);
        w[i] = (float)rng_uniform(0.5, 1.5);
    }
    float *s_d = dev_copy(be, s, NV * 4), *t_d = dev_copy(be, t, NV * 4);
    float *ds_d = dev_copy(be, ds0, NV * 4), *w_d = dev_copy(be, w, sizeof w);
    int32_t *y_d = dev_copy(be, y, sizeof y);
    float *loss_d = dev_alloc(be, sizeof loss);
    qkd__kd_term add = kd_term(c, scale, 1), write = kd_term(c, scale, 0);
    be->kd_loss(be, loss_d, ds_d, NULL, s_d, t_d, y_d, w_d, N, V, &add);
    dev_get(be, loss, loss_d, sizeof loss);
    dev_get(be, ds, ds_d, NV * 4);
    for (int i = 0; i < N; i++) {
        const float *si = s + (size_t)i * V, *ti = t + (size_t)i * V;
        double ref = y[i] < 0 ? 0.0 : w[i] * ref_row(c->kind, si, ti, V, y[i], c->tau, c->beta,
                                                     NULL);
        ck_assert_msg(fabs(loss[i] - ref) <= REL_TOL * fabs(ref) + 1e-7,
                      "kind %d V %d tau %g beta %g row %d: value %.9g, want %.9g", c->kind, V,
                      c->tau, c->beta, i, (double)loss[i], ref);
    }
    check_kd_grad(c, s, t, y, w, N, scale, ds0, ds);
    be->kd_loss(be, loss_d, ds_d, NULL, s_d, t_d, y_d, w_d, N, V, &write);
    dev_get(be, ds, ds_d, NV * 4);
    check_kd_grad(c, s, t, y, w, N, scale, NULL, ds);
    /* as bf16 bits: those of the floats just written */
    uint16_t *bits = test_calloc(NV, sizeof *bits), *bits_d = dev_alloc(be, NV * 2);
    be->kd_loss(be, loss_d, NULL, bits_d, s_d, t_d, y_d, w_d, N, V, &write);
    dev_get(be, bits, bits_d, NV * 2);
    for (size_t e = 0; e < NV; e++)
        ck_assert_msg(bits[e] == qkd__f32_to_bf16(ds[e]), "kind %d: bits[%zu] %04x, want %04x",
                      c->kind, e, bits[e], qkd__f32_to_bf16(ds[e]));
    free(bits);
    be->free(be, bits_d);
    /* values only */
    float loss2[N];
    be->kd_loss(be, loss_d, NULL, NULL, s_d, t_d, y_d, w_d, N, V, &add);
    dev_get(be, loss2, loss_d, sizeof loss2);
    ck_assert_mem_eq(loss, loss2, sizeof loss);

    free(s);
    free(t);
    free(ds0);
    free(ds);
    be->free(be, s_d);
    be->free(be, t_d);
    be->free(be, ds_d);
    be->free(be, w_d);
    be->free(be, y_d);
    be->free(be, loss_d);
}

static const int all_kinds[] = {QKD_LOSS_CE, QKD_LOSS_FKL, QKD_LOSS_RKL, QKD_LOSS_JSD,
                                QKD_LOSS_CAKLD, QKD_LOSS_TSLD, QKD_LOSS_MSE};
#define N_KINDS ((int)(sizeof all_kinds / sizeof all_kinds[0]))

/* V below one chunk, past one chunk (not a multiple), and many chunks. */
START_TEST(test_kd_against_reference)
{
    static const int Vs[] = {37, 300, 5000};
    static const double taus[] = {1.0, 2.0, 0.5};
    static const double betas[] = {0.2, 0.9};
    qkd_context *ctx = test_context(2);
    rng_state = 1;
    for (int k = 0; k < N_KINDS; k++)
        for (int iv = 0; iv < 3; iv++)
            for (int it = 0; it < 3; it++)
                for (int ib = 0; ib < 2; ib++) {
                    struct kd_case c = {all_kinds[k], Vs[iv], taus[it], betas[ib]};
                    check_kd_case(ctx->backend, &c);
                }
    qkd_context_free(ctx);
}
END_TEST

/* Sum of the kernel's row values at s (targets y, no weights). */
static double kd_total(qkd__backend *be, float *s_d, const float *s, const float *t_d,
                       const int32_t *y_d, float *loss_d, int N, const struct kd_case *c)
{
    float loss[8];
    ck_assert_int_eq(be->upload(be, s_d, s, (size_t)N * c->V * 4), QKD_OK);
    qkd__kd_term term = kd_term(c, 1.0f, 0);
    be->kd_loss(be, loss_d, NULL, NULL, s_d, t_d, y_d, NULL, N, c->V, &term);
    dev_get(be, loss, loss_d, (size_t)N * sizeof *loss);
    double sum = 0.0;
    for (int i = 0; i < N; i++)
        sum += loss[i];
    return sum;
}

/* The kernel's gradient along a random direction against the central
 * difference of its own values. */
static void check_kd_fd(qkd__backend *be, const struct kd_case *c)
{
    enum { N = 3 };
    const size_t NV = (size_t)N * c->V;
    float *s = rand_logits(NV), *t = rand_logits(NV), *r = test_calloc(NV, sizeof *r);
    float *sp = test_calloc(NV, sizeof *sp), *ds = test_calloc(NV, sizeof *ds);
    int32_t y[N];
    for (int i = 0; i < N; i++)
        y[i] = rng_int(c->V);
    float *s_d = dev_copy(be, s, NV * 4), *t_d = dev_copy(be, t, NV * 4);
    float *ds_d = dev_copy(be, ds, NV * 4), *loss_d = dev_alloc(be, N * sizeof(float));
    int32_t *y_d = dev_copy(be, y, sizeof y);

    qkd__kd_term term = kd_term(c, 1.0f, 0);
    be->kd_loss(be, loss_d, ds_d, NULL, s_d, t_d, y_d, NULL, N, c->V, &term);
    dev_get(be, ds, ds_d, NV * 4);
    /* random steps along the gradient's signs, so the derivative is not
     * flat: any direction is a valid probe */
    for (size_t i = 0; i < NV; i++)
        r[i] = (ds[i] < 0 ? -1.0f : 1.0f) * (float)(rng_int(16) + 1) / 16.0f;
    double analytic = 0.0;
    for (size_t i = 0; i < NV; i++)
        analytic += (double)ds[i] * r[i];
    for (size_t i = 0; i < NV; i++)
        sp[i] = (float)(s[i] + FD_EPS * r[i]);
    double up = kd_total(be, s_d, sp, t_d, y_d, loss_d, N, c);
    for (size_t i = 0; i < NV; i++)
        sp[i] = (float)(s[i] - FD_EPS * r[i]);
    double down = kd_total(be, s_d, sp, t_d, y_d, loss_d, N, c);
    double numeric = (up - down) / (2.0 * FD_EPS);
    ck_assert_msg(fabs(numeric) > 0.01, "kind %d: direction too flat to test", c->kind);
    ck_assert_msg(fabs(analytic - numeric) <= FD_TOL + 2e-3 * fabs(numeric),
                  "kind %d V %d tau %g beta %g: directional derivative %.7g, finite "
                  "difference %.7g",
                  c->kind, c->V, c->tau, c->beta, analytic, numeric);
    free(s);
    free(t);
    free(r);
    free(sp);
    free(ds);
    be->free(be, s_d);
    be->free(be, t_d);
    be->free(be, ds_d);
    be->free(be, loss_d);
    be->free(be, y_d);
}

START_TEST(test_kd_finite_differences)
{
    static const int Vs[] = {37, 300};
    static const double taus[] = {1.0, 2.0, 0.7};
    qkd_context *ctx = test_context(2);
    rng_state = 2;
    for (int k = 0; k < N_KINDS; k++)
        for (int iv = 0; iv < 2; iv++)
            for (int it = 0; it < 3; it++) {
                struct kd_case c = {all_kinds[k], Vs[iv], taus[it], 0.3};
                check_kd_fd(ctx->backend, &c);
            }
    qkd_context_free(ctx);
}
END_TEST

/* Row values and ds of one kernel call (N rows, no targets, no weights). */
static void kd_eval(qkd__backend *be, int kind, const float *s, const float *t, int N, int V,
                    double tau, double beta, float *loss, float *ds)
{
    const size_t NV = (size_t)N * V;
    float *s_d = dev_copy(be, s, NV * 4), *t_d = dev_copy(be, t, NV * 4);
    float *ds_d = dev_alloc(be, NV * 4), *loss_d = dev_alloc(be, (size_t)N * 4);
    qkd__kd_term term = {.kind = kind, .temperature = (float)tau, .beta = (float)beta,
                         .scale = 1.0f};
    be->kd_loss(be, loss_d, ds_d, NULL, s_d, t_d, NULL, NULL, N, V, &term);
    dev_get(be, loss, loss_d, (size_t)N * 4);
    dev_get(be, ds, ds_d, NV * 4);
    be->free(be, s_d);
    be->free(be, t_d);
    be->free(be, ds_d);
    be->free(be, loss_d);
}

static void assert_close(const float *a, const float *b, size_t n, double tol, const char *what)
{
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(fabs((double)a[i] - b[i]) <= tol * (1.0 + fabs(b[i])),
                      "%s: [%zu] %.9g vs %.9g", what, i, (double)a[i], (double)b[i]);
}

/* CAKLD with beta 0 is FKL and with beta 1 is RKL; JSD at beta 0.5 is
 * symmetric in its two distributions; KL terms vanish when s = t. */
START_TEST(test_kd_identities)
{
    enum { N = 3, V = 700 };
    qkd_context *ctx = test_context(2);
    qkd__backend *be = ctx->backend;
    rng_state = 3;
    float *s = rand_logits(N * V), *t = rand_logits(N * V);
    float la[N], lb[N], *da = test_calloc(N * V, 4), *db = test_calloc(N * V, 4);

    kd_eval(be, QKD_LOSS_CAKLD, s, t, N, V, 1.5, 0.0, la, da);
    kd_eval(be, QKD_LOSS_FKL, s, t, N, V, 1.5, 0.7, lb, db);
    assert_close(la, lb, N, 1e-6, "CAKLD(0) vs FKL value");
    assert_close(da, db, N * V, 1e-6, "CAKLD(0) vs FKL gradient");
    kd_eval(be, QKD_LOSS_CAKLD, s, t, N, V, 1.5, 1.0, la, da);
    kd_eval(be, QKD_LOSS_RKL, s, t, N, V, 1.5, 0.2, lb, db);
    assert_close(la, lb, N, 1e-6, "CAKLD(1) vs RKL value");
    assert_close(da, db, N * V, 1e-6, "CAKLD(1) vs RKL gradient");

    kd_eval(be, QKD_LOSS_JSD, s, t, N, V, 2.0, 0.5, la, da);
    kd_eval(be, QKD_LOSS_JSD, t, s, N, V, 2.0, 0.5, lb, db);
    assert_close(la, lb, N, 1e-5, "JSD(0.5) symmetry");
    for (int i = 0; i < N; i++)
        ck_assert(la[i] > 0.0f && la[i] <= 4.0f * (float)log(2.0));

    static const int kl_kinds[] = {QKD_LOSS_FKL, QKD_LOSS_RKL, QKD_LOSS_JSD, QKD_LOSS_CAKLD,
                                   QKD_LOSS_MSE};
    for (int k = 0; k < 5; k++) {
        kd_eval(be, kl_kinds[k], s, s, N, V, 0.8, 0.4, la, da);
        for (int i = 0; i < N; i++)
            ck_assert_msg(fabs(la[i]) < 1e-6, "kind %d: value %g at s = t", kl_kinds[k],
                          (double)la[i]);
        for (int i = 0; i < N * V; i++)
            ck_assert(fabs(da[i]) < 1e-7);
    }
    free(s);
    free(t);
    free(da);
    free(db);
    qkd_context_free(ctx);
}
END_TEST

/* Results do not depend on the thread count. */
START_TEST(test_kd_threads)
{
    enum { N = 37, V = 777 };
    qkd_context *c1 = test_context(1), *c4 = test_context(4);
    rng_state = 4;
    float *s = rand_logits(N * V), *t = rand_logits(N * V);
    float l1[N], l4[N], *d1 = test_calloc(N * V, 4), *d4 = test_calloc(N * V, 4);
    for (int k = 0; k < N_KINDS; k++) {
        if (all_kinds[k] == QKD_LOSS_CE)
            continue; /* needs targets; the other kinds share its sweeps */
        kd_eval(c1->backend, all_kinds[k], s, t, N, V, 1.3, 0.4, l1, d1);
        kd_eval(c4->backend, all_kinds[k], s, t, N, V, 1.3, 0.4, l4, d4);
        ck_assert_mem_eq(l1, l4, sizeof l1);
        ck_assert_mem_eq(d1, d4, (size_t)N * V * 4);
    }
    free(s);
    free(t);
    free(d1);
    free(d4);
    qkd_context_free(c1);
    qkd_context_free(c4);
}
END_TEST

/* A NaN or Inf logit makes its row's value non-finite and its gradient
 * NaN; other rows are unaffected. */
START_TEST(test_kd_non_finite_row)
{
    enum { N = 2, V = 300 };
    qkd_context *ctx = test_context(1);
    qkd__backend *be = ctx->backend;
    rng_state = 5;
    float *s = rand_logits(N * V), *t = rand_logits(N * V);
    float loss[N], *ds = test_calloc(N * V, 4);
    for (int k = 0; k < N_KINDS; k++) {
        if (all_kinds[k] == QKD_LOSS_CE)
            continue;
        float saved = s[290];
        s[290] = k % 2 ? NAN : INFINITY;
        kd_eval(be, all_kinds[k], s, t, N, V, 1.0, 0.5, loss, ds);
        s[290] = saved;
        ck_assert_msg(!isfinite(loss[0]), "kind %d", all_kinds[k]);
        ck_assert(isfinite(loss[1]));
        for (int v = 0; v < V; v++)
            ck_assert_msg(isnan(ds[v]) && isfinite(ds[V + v]), "kind %d logit %d",
                          all_kinds[k], v);
    }
    free(s);
    free(t);
    free(ds);
    qkd_context_free(ctx);
}
END_TEST

/* ---- tsld_weights and row_max_prob ----------------------------------------------- */

START_TEST(test_tsld_weights)
{
    enum { B = 4, T = 9 };
    qkd_context *ctx = test_context(2);
    qkd__backend *be = ctx->backend;
    rng_state = 6;
    float c[B * T], w[B * T];
    int32_t y[B * T];
    for (int i = 0; i < B * T; i++) {
        c[i] = (float)rng_uniform(0.0, 30.0);
        y[i] = i / T == 2 || rng_int(4) == 0 ? -1 : rng_int(100);
    }
    y[3 * T] = 5; /* sequence 3 keeps at least one counted position */
    float *c_d = dev_copy(be, c, sizeof c), *w_d = dev_alloc(be, sizeof w);
    int32_t *y_d = dev_copy(be, y, sizeof y);
    const double tau = 7.0;
    be->tsld_weights(be, w_d, c_d, y_d, B, T, (float)tau);
    dev_get(be, w, w_d, sizeof w);
    for (int b = 0; b < B; b++) {
        double z = 0.0, sum = 0.0;
        for (int i = b * T; i < (b + 1) * T; i++)
            z += y[i] >= 0 ? exp(c[i] / tau) : 0.0;
        for (int i = b * T; i < (b + 1) * T; i++) {
            double want = y[i] >= 0 ? exp(c[i] / tau) / z : 0.0;
            ck_assert_msg(fabs(w[i] - want) <= 1e-6 * want + (y[i] < 0 ? 0.0 : 1e-9),
                          "w[%d] = %g, want %g", i, (double)w[i], want);
            sum += w[i];
        }
        /* sequence 2 is fully masked: all zero */
        ck_assert(fabs(sum - (b == 2 ? 0.0 : 1.0)) < 1e-6);
    }
    be->free(be, c_d);
    be->free(be, w_d);
    be->free(be, y_d);
    qkd_context_free(ctx);
}
END_TEST

START_TEST(test_row_max_prob)
{
    enum { N = 5, V = 1000 };
    qkd_context *ctx = test_context(2);
    qkd__backend *be = ctx->backend;
    rng_state = 7;
    float *x = rand_logits(N * V), out[N];
    x[2 * V + 999] = 30.0f; /* a confident row, its max in the last chunk */
    float *x_d = dev_copy(be, x, (size_t)N * V * 4), *o_d = dev_alloc(be, sizeof out);
    be->row_max_prob(be, o_d, x_d, NULL, N, V);
    dev_get(be, out, o_d, sizeof out);
    /* a masked row reads 0, the others as without targets */
    int32_t y[N] = {1, 2, 3, -1, 4};
    float masked[N];
    int32_t *y_d = dev_copy(be, y, sizeof y);
    be->row_max_prob(be, o_d, x_d, y_d, N, V);
    dev_get(be, masked, o_d, sizeof masked);
    for (int i = 0; i < N; i++)
        ck_assert(masked[i] == (y[i] < 0 ? 0.0f : out[i]));
    be->free(be, y_d);
    for (int i = 0; i < N; i++) {
        double *p = ref_softmax(x + (size_t)i * V, V, 1.0), mx = 0.0;
        for (int v = 0; v < V; v++)
            mx = fmax(mx, p[v]);
        ck_assert_msg(fabs(out[i] - mx) <= 1e-6 * mx, "row %d: %g vs %g", i, (double)out[i],
                      mx);
        free(p);
    }
    ck_assert(out[2] > 0.99f);
    free(x);
    be->free(be, x_d);
    be->free(be, o_d);
    qkd_context_free(ctx);
}
END_TEST

/* ---- the qkd_loss handle on two tiny models ----------------------------------------- */

enum { MB = 3, MT = 6, MV = 300 };

struct pair {
    qkd_context *ctx;
    qkd_model *student, *teacher;
    int32_t tokens[MB * MT], targets[MB * MT];
    float *s, *t; /* host copies of the last forward's logits */
};

static qkd_model *tiny_model(qkd_context *ctx, int vocab, uint64_t seed)
{
    qkd_model_config cfg;
    qkd_model_config_init(&cfg);
    cfg.dim = 16;
    cfg.hidden_dim = 24;
    cfg.n_layers = 1;
    cfg.n_heads = 2;
    cfg.n_kv_heads = 1;
    cfg.vocab_size = vocab;
    cfg.max_seq_len = 16;
    return test_model(ctx, &cfg, seed, 0.5f);
}

/* Student and teacher forwarded on the same tokens; targets with masked
 * positions and sequence 1 fully masked. */
static void pair_open(struct pair *pr, qkd_context *ctx)
{
    memset(pr, 0, sizeof *pr);
    pr->ctx = ctx;
    pr->student = tiny_model(ctx, MV, 11);
    pr->teacher = tiny_model(ctx, MV, 22);
    rng_state = 8;
    for (int i = 0; i < MB * MT; i++) {
        pr->tokens[i] = rng_int(MV);
        pr->targets[i] = i / MT == 1 || i % 4 == 3 ? -1 : rng_int(MV);
    }
    ck_assert_int_eq(qkd_model_forward(pr->student, pr->tokens, MB, MT), QKD_OK);
    ck_assert_int_eq(qkd_model_forward(pr->teacher, pr->tokens, MB, MT), QKD_OK);
    pr->s = test_calloc((size_t)MB * MT * MV, 4);
    pr->t = test_calloc((size_t)MB * MT * MV, 4);
    ck_assert_int_eq(qkd_model_logits(pr->student, pr->s, (size_t)MB * MT * MV), QKD_OK);
    ck_assert_int_eq(qkd_model_logits(pr->teacher, pr->t, (size_t)MB * MT * MV), QKD_OK);
}

/* Frees the models, the host copies and the context pair_open was given. */
static void pair_close(struct pair *pr)
{
    qkd_model_free(pr->student);
    qkd_model_free(pr->teacher);
    free(pr->s);
    free(pr->t);
    qkd_context_free(pr->ctx);
}

/* TSLD's weight of each position of sequence b (1 for other kinds). */
static void ref_token_weights(const struct pair *pr, const qkd_loss_term *term, int b,
                              double *w)
{
    double z = 0.0;
    for (int j = 0; j < MT; j++) {
        int i = b * MT + j, y = pr->targets[i];
        w[j] = 1.0;
        if (y < 0 || term->kind != QKD_LOSS_TSLD)
            continue;
        double c = ref_row(QKD_LOSS_CE, pr->t + (size_t)i * MV, NULL, MV, y, 1.0, 0.0, NULL);
        z += w[j] = exp(c / term->tsld_tau);
    }
    for (int j = 0; term->kind == QKD_LOSS_TSLD && j < MT; j++)
        w[j] /= z;
}

/* A term over the batch, from loss.h's definitions: returns its value and
 * adds weight * d value / ds to ds[MB*MT*MV]. */
static double ref_term(const struct pair *pr, const qkd_loss_term *term, double *ds)
{
    double *g = test_calloc(MV, sizeof *g), sum = 0.0, w[MT];
    int n_rows = 0, n_seqs = 0;
    for (int b = 0; b < MB; b++) {
        int counted = 0;
        for (int j = 0; j < MT; j++)
            counted += pr->targets[b * MT + j] >= 0;
        n_rows += counted;
        n_seqs += counted > 0;
    }
    double denom = term->kind == QKD_LOSS_TSLD ? n_seqs : n_rows;
    for (int b = 0; b < MB; b++) {
        ref_token_weights(pr, term, b, w);
        for (int j = 0; j < MT; j++) {
            int i = b * MT + j, y = pr->targets[i];
            if (y < 0)
                continue;
            sum += w[j] * ref_row(term->kind, pr->s + (size_t)i * MV, pr->t + (size_t)i * MV,
                                  MV, y, term->temperature, term->beta, g);
            for (int v = 0; v < MV; v++)
                ds[(size_t)i * MV + v] += term->weight * w[j] * g[v] / denom;
        }
    }
    free(g);
    return sum / denom;
}

/* The gradient the loss stored on the student. */
static float *stored_dlogits(qkd_model *student)
{
    size_t n = (size_t)MB * MT * MV;
    float *ds = test_calloc(n, sizeof *ds);
    qkd__backend *be = qkd__model_context(student)->backend;
    float *dev = NULL;
    ck_assert_int_eq(qkd__model_dlogits_f32(student, &dev), QKD_OK);
    dev_get(be, ds, dev, n * sizeof *ds);
    return ds;
}

static void assert_grad_close(const float *got, const double *want, size_t n, const char *what)
{
    double gmax = max_abs(want, n);
    ck_assert(gmax > 0.0);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(fabs(got[i] - want[i]) <= REL_TOL * gmax,
                      "%s: dlogits[%zu] = %.9g, want %.9g (max %.3g)", what, i,
                      (double)got[i], want[i], gmax);
}

static void term_set(qkd_loss_term *t, int kind, float weight, float tau, float beta,
                     float tsld_tau)
{
    qkd_loss_term_init(t, (qkd_loss_kind)kind);
    t->weight = weight;
    t->temperature = tau;
    t->beta = beta;
    t->tsld_tau = tsld_tau;
}

/* Each kind alone: value, term value and the stored gradient. */
START_TEST(test_loss_each_term)
{
    struct pair pr;
    pair_open(&pr, test_context(2));
    const size_t n = (size_t)MB * MT * MV;
    for (int k = 0; k < N_KINDS; k++) {
        qkd_loss *loss = NULL;
        ck_assert_int_eq(qkd_loss_create(pr.ctx, &loss), QKD_OK);
        qkd_loss_term term;
        term_set(&term, all_kinds[k], 0.8f, 1.7f, 0.35f, 5.0f);
        ck_assert_int_eq(qkd_loss_add(loss, &term), QKD_OK);
        float value, tv;
        ck_assert_int_eq(qkd_loss_compute(loss, pr.student, pr.teacher, pr.targets, &value),
                         QKD_OK);
        double *ds = test_calloc(n, sizeof *ds);
        double want = ref_term(&pr, &term, ds);
        ck_assert_msg(fabs(value - 0.8 * want) <= REL_TOL * fabs(want),
                      "kind %d: value %.9g, want %.9g", all_kinds[k], (double)value, 0.8 * want);
        ck_assert_int_eq(qkd_loss_term_value(loss, 0, &tv), QKD_OK);
        ck_assert(fabs(tv - want) <= REL_TOL * fabs(want));
        float *got = stored_dlogits(pr.student);
        assert_grad_close(got, ds, n, "single term");
        free(got);
        free(ds);
        qkd_loss_free(loss);
    }
    pair_close(&pr);
}
END_TEST

/* Every kind at once: the weighted sum, each term's value, and the
 * parameter gradient of backward(student, NULL) against backward with the
 * test's own double-precision dlogits. */
START_TEST(test_loss_weighted_sum_backward)
{
    struct pair pr;
    pair_open(&pr, test_context(2));
    const size_t n = (size_t)MB * MT * MV;
    qkd_loss_term terms[N_KINDS];
    static const float weights[N_KINDS] = {1.0f, 0.5f, 0.25f, 0.3f, 0.4f, 0.6f, 0.05f};
    qkd_loss *loss = NULL;
    ck_assert_int_eq(qkd_loss_create(pr.ctx, &loss), QKD_OK);
    for (int k = 0; k < N_KINDS; k++) {
        term_set(&terms[k], all_kinds[k], weights[k], 0.6f + 0.3f * (float)k,
                 0.1f + 0.12f * (float)k, 3.0f);
        ck_assert_int_eq(qkd_loss_add(loss, &terms[k]), QKD_OK);
    }
    double *ds = test_calloc(n, sizeof *ds), want = 0.0;
    float value;
    ck_assert_int_eq(qkd_loss_compute(loss, pr.student, pr.teacher, pr.targets, &value),
                     QKD_OK);
    for (int k = 0; k < N_KINDS; k++) {
        double tk = ref_term(&pr, &terms[k], ds);
        float got;
        ck_assert_int_eq(qkd_loss_term_value(loss, k, &got), QKD_OK);
        ck_assert_msg(fabs(got - tk) <= REL_TOL * fabs(tk), "term %d: %.9g vs %.9g", k,
                      (double)got, tk);
        want += weights[k] * tk;
    }
    ck_assert_msg(fabs(value - want) <= REL_TOL * fabs(want), "sum %.9g vs %.9g",
                  (double)value, want);
    float *stored = stored_dlogits(pr.student);
    assert_grad_close(stored, ds, n, "weighted sum");

    /* end to end through the model's backward */
    int nt = qkd_model_n_tensors(pr.student);
    float **g1 = test_calloc((size_t)nt, sizeof *g1);
    ck_assert_int_eq(qkd_model_zero_grad(pr.student), QKD_OK);
    ck_assert_int_eq(qkd_model_backward(pr.student, NULL), QKD_OK);
    for (int i = 0; i < nt; i++) {
        qkd_tensor_info info = {.size = sizeof info};
        ck_assert_int_eq(qkd_model_tensor_info(pr.student, i, &info), QKD_OK);
        g1[i] = test_calloc((size_t)info.n_elements, 4);
        ck_assert_int_eq(qkd_model_grad_get(pr.student, i, g1[i], (size_t)info.n_elements),
                         QKD_OK);
    }
    float *dsf = test_calloc(n, 4);
    for (size_t i = 0; i < n; i++)
        dsf[i] = (float)ds[i];
    ck_assert_int_eq(qkd_model_zero_grad(pr.student), QKD_OK);
    ck_assert_int_eq(qkd_model_backward(pr.student, dsf), QKD_OK);
    for (int i = 0; i < nt; i++) {
        qkd_tensor_info info = {.size = sizeof info};
        ck_assert_int_eq(qkd_model_tensor_info(pr.student, i, &info), QKD_OK);
        size_t ne = (size_t)info.n_elements;
        float *g2 = test_calloc(ne, 4);
        ck_assert_int_eq(qkd_model_grad_get(pr.student, i, g2, ne), QKD_OK);
        double gmax = 0.0;
        for (size_t e = 0; e < ne; e++)
            gmax = fmax(gmax, fabs(g2[e]));
        ck_assert_msg(gmax > 0.0, "%s: zero gradient", info.name);
        for (size_t e = 0; e < ne; e++)
            ck_assert_msg(fabs(g1[i][e] - g2[e]) <= REL_TOL * gmax, "%s[%zu]: %.9g vs %.9g",
                          info.name, e, (double)g1[i][e], (double)g2[e]);
        free(g2);
        free(g1[i]);
    }
    free(g1);
    free(dsf);
    free(stored);
    free(ds);
    qkd_loss_free(loss);
    pair_close(&pr);
}
END_TEST

/* Without targets every position counts. */
START_TEST(test_loss_no_targets)
{
    struct pair pr;
    pair_open(&pr, test_context(1));
    const size_t n = (size_t)MB * MT * MV;
    for (int i = 0; i < MB * MT; i++)
        pr.targets[i] = 0; /* the reference's "all counted" */
    qkd_loss *loss = NULL;
    ck_assert_int_eq(qkd_loss_create(pr.ctx, &loss), QKD_OK);
    qkd_loss_term term;
    term_set(&term, QKD_LOSS_JSD, 1.0f, 1.0f, 0.5f, 1.0f);
    ck_assert_int_eq(qkd_loss_add(loss, &term), QKD_OK);
    float value;
    ck_assert_int_eq(qkd_loss_compute(loss, pr.student, pr.teacher, NULL, &value), QKD_OK);
    double *ds = test_calloc(n, sizeof *ds), want = ref_term(&pr, &term, ds);
    ck_assert(fabs(value - want) <= REL_TOL * want);
    float *got = stored_dlogits(pr.student);
    assert_grad_close(got, ds, n, "no targets");
    free(got);
    free(ds);
    qkd_loss_free(loss);
    pair_close(&pr);
}
END_TEST

START_TEST(test_loss_confidence)
{
    struct pair pr;
    pair_open(&pr, test_context(2));
    double sum_all = 0.0, sum_counted = 0.0;
    int counted = 0;
    for (int i = 0; i < MB * MT; i++) {
        double *p = ref_softmax(pr.t + (size_t)i * MV, MV, 1.0), mx = 0.0;
        for (int v = 0; v < MV; v++)
            mx = fmax(mx, p[v]);
        free(p);
        sum_all += mx;
        if (pr.targets[i] >= 0) {
            sum_counted += mx;
            counted++;
        }
    }
    float conf;
    ck_assert_int_eq(qkd_loss_teacher_confidence(pr.teacher, pr.targets, &conf), QKD_OK);
    ck_assert(fabs(conf - sum_counted / counted) <= 1e-6 * conf);
    ck_assert_int_eq(qkd_loss_teacher_confidence(pr.teacher, NULL, &conf), QKD_OK);
    ck_assert(fabs(conf - sum_all / (MB * MT)) <= 1e-6 * conf);
    ck_assert(conf > 1.0f / MV && conf < 1.0f);

    qkd_model *fresh = tiny_model(pr.ctx, MV, 3);
    ck_assert_int_eq(qkd_loss_teacher_confidence(fresh, NULL, &conf), QKD_ERR_STATE);
    ck_assert_int_eq(qkd_loss_teacher_confidence(pr.teacher, NULL, NULL),
                     QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_loss_teacher_confidence(NULL, NULL, &conf), QKD_ERR_INVALID_ARG);
    qkd_model_free(fresh);
    pair_close(&pr);
}
END_TEST

/* ---- allocation ------------------------------------------------------------------- */

static qkd_loss *tsld_fkl_loss(qkd_context *ctx)
{
    qkd_loss *loss = NULL;
    ck_assert_int_eq(qkd_loss_create(ctx, &loss), QKD_OK);
    qkd_loss_term term;
    qkd_loss_term_init(&term, QKD_LOSS_TSLD);
    ck_assert_int_eq(qkd_loss_add(loss, &term), QKD_OK);
    qkd_loss_term_init(&term, QKD_LOSS_FKL);
    ck_assert_int_eq(qkd_loss_add(loss, &term), QKD_OK);
    return loss;
}

/* Scratch is allocated on the first compute of a shape, never in a step of
 * a shape already seen (nor a smaller one). */
START_TEST(test_loss_no_step_allocation)
{
    test_alloc a;
    struct pair pr;
    pair_open(&pr, test_counting_context(&a, 1));
    qkd_loss *loss = tsld_fkl_loss(pr.ctx);
    float value;
    ck_assert_int_eq(qkd_loss_compute(loss, pr.student, pr.teacher, pr.targets, &value),
                     QKD_OK);
    long before = a.n;
    ck_assert_int_eq(qkd_loss_compute(loss, pr.student, pr.teacher, pr.targets, &value),
                     QKD_OK);
    ck_assert_int_eq(a.n, before);
    ck_assert_int_eq(qkd_model_forward(pr.student, pr.tokens, 2, MT), QKD_OK);
    ck_assert_int_eq(qkd_model_forward(pr.teacher, pr.tokens, 2, MT), QKD_OK);
    before = a.n;
    ck_assert_int_eq(qkd_loss_compute(loss, pr.student, pr.teacher, pr.targets, &value),
                     QKD_OK);
    ck_assert_int_eq(a.n, before);
    qkd_loss_free(loss);
    pair_close(&pr);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

/* The allocations of a TSLD + FKL loss's create and first compute on the
 * pair, counted; *live: the live blocks before them. */
static long count_compute_allocs(test_alloc *a, struct pair *pr, long *live)
{
    *live = a->live;
    const long base = a->n;
    qkd_loss *loss = tsld_fkl_loss(pr->ctx);
    float value;
    ck_assert_int_eq(qkd_loss_compute(loss, pr->student, pr->teacher, pr->targets, &value),
                     QKD_OK);
    qkd_loss_free(loss);
    ck_assert_int_eq(a->live, *live);
    return a->n - base;
}

/* Failing each of those allocations in turn: NO_MEMORY, nothing leaked. */
static void fail_each_alloc(test_alloc *a, struct pair *pr, long total, long live)
{
    for (long k = 1; k <= total; k++) {
        test_alloc_fail_in(a, k - 1, 0);
        qkd_loss *loss = NULL;
        float value;
        qkd_status st = qkd_loss_create(pr->ctx, &loss);
        if (st == QKD_OK) {
            qkd_loss_term term;
            qkd_loss_term_init(&term, QKD_LOSS_TSLD);
            ck_assert_int_eq(qkd_loss_add(loss, &term), QKD_OK);
            st = qkd_loss_compute(loss, pr->student, pr->teacher, pr->targets, &value);
        }
        ck_assert_int_eq(st, QKD_ERR_NO_MEMORY);
        qkd_loss_free(loss);
        ck_assert_int_eq(a->live, live);
    }
    a->fail_at = -1;
}

/* Failing each allocation of create and a first compute in turn, with
 * the logits whole and by block: NO_MEMORY, no crash, nothing leaked. */
START_TEST(test_loss_alloc_failures)
{
    test_alloc a;
    struct pair pr;
    pair_open(&pr, test_counting_context(&a, 1));
    long live;
    long total = count_compute_allocs(&a, &pr, &live);
    ck_assert(total >= 3);
    fail_each_alloc(&a, &pr, total, live);
    /* the logits by block: the loss's block buffers too */
    ck_assert_int_eq(qkd_model_set_logits_rows(pr.student, 4), QKD_OK);
    ck_assert_int_eq(qkd_model_set_logits_rows(pr.teacher, 4), QKD_OK);
    ck_assert_int_eq(qkd_model_forward(pr.student, pr.tokens, MB, MT), QKD_OK);
    ck_assert_int_eq(qkd_model_forward(pr.teacher, pr.tokens, MB, MT), QKD_OK);
    total = count_compute_allocs(&a, &pr, &live);
    ck_assert(total >= 4);
    fail_each_alloc(&a, &pr, total, live);
    /* a reader of all the logits computes them into memory of their own */
    test_alloc_fail_in(&a, 0, 0);
    ck_assert_int_eq(qkd_model_logits(pr.student, pr.s, (size_t)MB * MT * MV),
                     QKD_ERR_NO_MEMORY);
    a.fail_at = -1;
    ck_assert_int_eq(qkd_model_logits(pr.student, pr.s, (size_t)MB * MT * MV), QKD_OK);
    pair_close(&pr);
}
END_TEST

/* ---- errors ------------------------------------------------------------------------- */

START_TEST(test_loss_bad_params)
{
    qkd_context *ctx = test_context(1);
    qkd_loss *loss = NULL;
    ck_assert_int_eq(qkd_loss_create(NULL, &loss), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_loss_create(ctx, NULL), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_loss_create(ctx, &loss), QKD_OK);
    qkd_loss_term t;
    qkd_loss_term_init(&t, QKD_LOSS_CAKLD);
    ck_assert(t.size == sizeof t && t.weight == 1.0f && t.temperature == 1.0f &&
              t.beta == 0.5f && t.tsld_tau == 10.0f && t.kind == QKD_LOSS_CAKLD);
    qkd_loss_term_init(NULL, QKD_LOSS_CE); /* no crash */

    struct {
        float weight, tau, beta, tsld_tau;
        int kind;
    } bad[] = {
        {INFINITY, 1, 0.5f, 1, QKD_LOSS_FKL}, {NAN, 1, 0.5f, 1, QKD_LOSS_FKL},
        {1, 0, 0.5f, 1, QKD_LOSS_FKL},        {1, -1, 0.5f, 1, QKD_LOSS_FKL},
        {1, NAN, 0.5f, 1, QKD_LOSS_FKL},      {1, INFINITY, 0.5f, 1, QKD_LOSS_FKL},
        {1, 1, -0.1f, 1, QKD_LOSS_JSD},       {1, 1, 1.5f, 1, QKD_LOSS_CAKLD},
        {1, 1, NAN, 1, QKD_LOSS_CAKLD},       {1, 1, 0.5f, 0, QKD_LOSS_TSLD},
        {1, 1, 0.5f, -2, QKD_LOSS_TSLD},      {1, 1, 0.5f, 1, 7},
        {1, 1, 0.5f, 1, -1},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        term_set(&t, bad[i].kind, bad[i].weight, bad[i].tau, bad[i].beta, bad[i].tsld_tau);
        ck_assert_msg(qkd_loss_add(loss, &t) == QKD_ERR_INVALID_ARG, "bad term %zu", i);
        ck_assert(strlen(qkd_context_last_error(ctx)) > 0);
    }
    qkd_loss_term_init(&t, QKD_LOSS_FKL);
    t.size = 0;
    ck_assert_int_eq(qkd_loss_add(loss, &t), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_loss_add(loss, NULL), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_loss_add(NULL, &t), QKD_ERR_INVALID_ARG);

    float v;
    ck_assert_int_eq(qkd_loss_term_value(loss, 0, &v), QKD_ERR_RANGE);
    qkd_loss_term_init(&t, QKD_LOSS_CAKLD);
    for (int i = 0; i < 8; i++)
        ck_assert_int_eq(qkd_loss_add(loss, &t), QKD_OK);
    ck_assert_int_eq(qkd_loss_add(loss, &t), QKD_ERR_RANGE);
    ck_assert_int_eq(qkd_loss_term_value(loss, 0, &v), QKD_ERR_STATE);
    ck_assert_int_eq(qkd_loss_term_value(loss, 0, NULL), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_loss_set_beta(loss, 8, 0.5f), QKD_ERR_RANGE);
    ck_assert_int_eq(qkd_loss_set_beta(loss, -1, 0.5f), QKD_ERR_RANGE);
    ck_assert_int_eq(qkd_loss_set_beta(loss, 3, 1.01f), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_loss_set_beta(loss, 3, NAN), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_loss_set_beta(NULL, 0, 0.5f), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_loss_set_beta(loss, 3, 0.0f), QKD_OK);
    ck_assert_int_eq(qkd_loss_set_beta(loss, 3, 1.0f), QKD_OK);
    qkd_loss_free(loss);
    qkd_loss_free(NULL);
    qkd_context_free(ctx);
}
END_TEST

/* set_beta changes what compute evaluates: CAKLD at beta 1 equals RKL. */
START_TEST(test_loss_set_beta)
{
    struct pair pr;
    pair_open(&pr, test_context(1));
    qkd_loss *cakld = test_one_term_loss(pr.ctx, QKD_LOSS_CAKLD, 0);
    qkd_loss *rkl = test_one_term_loss(pr.ctx, QKD_LOSS_RKL, 0);
    float a, b;
    ck_assert_int_eq(qkd_loss_compute(cakld, pr.student, pr.teacher, NULL, &a), QKD_OK);
    ck_assert_int_eq(qkd_loss_compute(rkl, pr.student, pr.teacher, NULL, &b), QKD_OK);
    ck_assert(fabs(a - b) > 1e-3 * b);
    ck_assert_int_eq(qkd_loss_set_beta(cakld, 0, 1.0f), QKD_OK);
    ck_assert_int_eq(qkd_loss_compute(cakld, pr.student, pr.teacher, NULL, &a), QKD_OK);
    ck_assert(fabs(a - b) <= 1e-6 * b);
    qkd_loss_free(cakld);
    qkd_loss_free(rkl);
    pair_close(&pr);
}
END_TEST

/* A deferred compute stores the gradient a waiting one stores, bit for
 * bit, and qkd_loss_value / qkd_loss_term_value read its values later.
 * A compute writes every row, so positions masked after a batch that
 * counted them hold 0, not the earlier gradient. */
START_TEST(test_loss_deferred)
{
    struct pair pr;
    pair_open(&pr, test_context(2));
    qkd_loss *loss = tsld_fkl_loss(pr.ctx);
    float waited, deferred, term_w[2], term_d[2];
    ck_assert_int_eq(qkd_loss_compute(loss, pr.student, pr.teacher, pr.targets, &waited),
                     QKD_OK);
    for (int k = 0; k < 2; k++)
        ck_assert_int_eq(qkd_loss_term_value(loss, k, &term_w[k]), QKD_OK);
    float *before = stored_dlogits(pr.student);

    int32_t all[MB * MT];
    for (int i = 0; i < MB * MT; i++)
        all[i] = pr.tokens[(i + 1) % (MB * MT)];
    ck_assert_int_eq(qkd_loss_compute(loss, pr.student, pr.teacher, all, NULL), QKD_OK);
    ck_assert_int_eq(qkd_loss_compute(loss, pr.student, pr.teacher, pr.targets, NULL), QKD_OK);
    ck_assert_int_eq(qkd_loss_value(loss, &deferred), QKD_OK);
    for (int k = 0; k < 2; k++)
        ck_assert_int_eq(qkd_loss_term_value(loss, k, &term_d[k]), QKD_OK);
    float *after = stored_dlogits(pr.student);
    ck_assert(waited == deferred && waited > 0.0f);
    ck_assert_mem_eq(term_w, term_d, sizeof term_w);
    ck_assert_mem_eq(before, after, (size_t)MB * MT * MV * 4);
    for (int i = 0; i < MB * MT; i++)
        for (int v = 0; pr.targets[i] < 0 && v < MV; v++)
            ck_assert(after[(size_t)i * MV + v] == 0.0f);
    free(before);
    free(after);
    qkd_loss_free(loss);
    pair_close(&pr);
}
END_TEST

/* beta_from_teacher: each compute gives what qkd_loss_set_beta with that
 * batch's qkd_loss_teacher_confidence gives (the mean is a float sum on
 * the device, so within float rounding); it is CAKLD's only. */
START_TEST(test_loss_beta_from_teacher)
{
    struct pair pr;
    pair_open(&pr, test_context(2));
    qkd_loss *fixed = test_one_term_loss(pr.ctx, QKD_LOSS_CAKLD, 0);
    qkd_loss *from = test_one_term_loss(pr.ctx, QKD_LOSS_CAKLD, 1);
    const int32_t *targets[2] = {pr.targets, NULL};
    for (int c = 0; c < 2; c++) {
        float conf, a, b;
        ck_assert_int_eq(qkd_loss_teacher_confidence(pr.teacher, targets[c], &conf), QKD_OK);
        ck_assert(fabsf(conf - 0.5f) > 1e-3f); /* the default beta would differ */
        ck_assert_int_eq(qkd_loss_set_beta(fixed, 0, conf), QKD_OK);
        ck_assert_int_eq(qkd_loss_compute(fixed, pr.student, pr.teacher, targets[c], &a),
                         QKD_OK);
        float *want = stored_dlogits(pr.student);
        ck_assert_int_eq(qkd_loss_compute(from, pr.student, pr.teacher, targets[c], NULL),
                         QKD_OK);
        ck_assert_int_eq(qkd_loss_value(from, &b), QKD_OK);
        float *got = stored_dlogits(pr.student);
        ck_assert_msg(fabsf(a - b) <= 1e-5f * a, "targets %d: %.9g vs %.9g", c, (double)a,
                      (double)b);
        for (size_t i = 0; i < (size_t)MB * MT * MV; i++)
            ck_assert(fabsf(got[i] - want[i]) <= 1e-5f * fabsf(want[i]) + 1e-9f);
        free(want);
        free(got);
    }
    qkd_loss_term t;
    qkd_loss_term_init(&t, QKD_LOSS_FKL);
    t.beta_from_teacher = 1;
    ck_assert_int_eq(qkd_loss_add(fixed, &t), QKD_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(pr.ctx), "CAKLD only"));
    qkd_loss_term_init(&t, QKD_LOSS_CAKLD);
    t.beta_from_teacher = 2;
    ck_assert_int_eq(qkd_loss_add(fixed, &t), QKD_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(pr.ctx), "not 0 or 1"));
    qkd_loss_free(fixed);
    qkd_loss_free(from);
    pair_close(&pr);
}
END_TEST

static qkd_status compute_one(struct pair *pr, int kind, qkd_model *teacher,
                              const int32_t *targets)
{
    qkd_loss *loss = test_one_term_loss(pr->ctx, (qkd_loss_kind)kind, 0);
    float value = 1.0f;
    qkd_status st = qkd_loss_compute(loss, pr->student, teacher, targets, &value);
    if (st != QKD_OK) {
        ck_assert(value == 0.0f);
        ck_assert(strlen(qkd_context_last_error(pr->ctx)) > 0);
    }
    qkd_loss_free(loss);
    return st;
}

START_TEST(test_loss_compute_errors)
{
    struct pair pr;
    pair_open(&pr, test_context(1));
    qkd_loss *empty = NULL;
    float value;
    ck_assert_int_eq(qkd_loss_create(pr.ctx, &empty), QKD_OK);
    ck_assert_int_eq(qkd_loss_compute(empty, pr.student, pr.teacher, pr.targets, &value),
                     QKD_ERR_STATE);
    ck_assert_int_eq(qkd_loss_compute(NULL, pr.student, pr.teacher, pr.targets, &value),
                     QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_loss_compute(empty, NULL, pr.teacher, pr.targets, &value),
                     QKD_ERR_INVALID_ARG);
    /* a deferred compute checks its arguments as one that waits */
    ck_assert_int_eq(qkd_loss_compute(empty, pr.student, pr.teacher, pr.targets, NULL),
                     QKD_ERR_STATE);
    ck_assert_int_eq(qkd_loss_value(empty, &value), QKD_ERR_STATE);
    ck_assert_int_eq(qkd_loss_value(empty, NULL), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_loss_value(NULL, &value), QKD_ERR_INVALID_ARG);
    qkd_loss_free(empty);

    /* targets and teacher required */
    ck_assert_int_eq(compute_one(&pr, QKD_LOSS_CE, NULL, NULL), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(compute_one(&pr, QKD_LOSS_TSLD, pr.teacher, NULL), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(compute_one(&pr, QKD_LOSS_FKL, NULL, pr.targets), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(compute_one(&pr, QKD_LOSS_CE, NULL, pr.targets), QKD_OK);
    ck_assert_int_eq(compute_one(&pr, QKD_LOSS_MSE, pr.teacher, NULL), QKD_OK);

    /* a target past the vocabulary */
    int32_t y[MB * MT];
    memcpy(y, pr.targets, sizeof y);
    y[4] = MV;
    ck_assert_int_eq(compute_one(&pr, QKD_LOSS_FKL, pr.teacher, y), QKD_ERR_RANGE);

    /* no forward, other shapes, another vocabulary */
    qkd_model *other = tiny_model(pr.ctx, MV, 33);
    ck_assert_int_eq(compute_one(&pr, QKD_LOSS_FKL, other, NULL), QKD_ERR_STATE);
    ck_assert_int_eq(qkd_model_forward(other, pr.tokens, MB, MT - 1), QKD_OK);
    ck_assert_int_eq(compute_one(&pr, QKD_LOSS_FKL, other, NULL), QKD_ERR_SHAPE);
    ck_assert_int_eq(qkd_model_forward(other, pr.tokens, MB - 1, MT), QKD_OK);
    ck_assert_int_eq(compute_one(&pr, QKD_LOSS_RKL, other, NULL), QKD_ERR_SHAPE);
    qkd_model_free(other);
    other = tiny_model(pr.ctx, MV + 1, 33);
    ck_assert_int_eq(qkd_model_forward(other, pr.tokens, MB, MT), QKD_OK);
    ck_assert_int_eq(compute_one(&pr, QKD_LOSS_JSD, other, NULL), QKD_ERR_SHAPE);
    qkd_model_free(other);

    /* a teacher on another context */
    qkd_context *ctx2 = test_context(1);
    other = tiny_model(ctx2, MV, 22);
    ck_assert_int_eq(qkd_model_forward(other, pr.tokens, MB, MT), QKD_OK);
    ck_assert_int_eq(compute_one(&pr, QKD_LOSS_FKL, other, NULL), QKD_ERR_INVALID_ARG);
    qkd_model_free(other);
    qkd_context_free(ctx2);

    qkd_model *fresh = tiny_model(pr.ctx, MV, 44);
    qkd_model *student = pr.student;
    pr.student = fresh;
    ck_assert_int_eq(compute_one(&pr, QKD_LOSS_FKL, pr.teacher, NULL), QKD_ERR_STATE);
    pr.student = student;
    qkd_model_free(fresh);

    pair_close(&pr);
}
END_TEST

/* Set every element of the model's output norm to x, so every logit is x
 * times something (NaN: all logits NaN). */
static void poison(qkd_model *m, float x)
{
    int idx = qkd__model_tensor_index(m, QKD_TENSOR_OUTPUT_NORM, -1);
    float w[16];
    for (int i = 0; i < 16; i++)
        w[i] = x;
    ck_assert_int_eq(qkd_model_tensor_set(m, idx, w, 16), QKD_OK);
}

/* A NaN logit in either model: NON_FINITE, and the gradient stored by an
 * earlier compute is left as it was. */
START_TEST(test_loss_non_finite)
{
    struct pair pr;
    pair_open(&pr, test_context(1));
    qkd_loss *loss = tsld_fkl_loss(pr.ctx);
    float value;
    ck_assert_int_eq(qkd_loss_compute(loss, pr.student, pr.teacher, pr.targets, &value),
                     QKD_OK);
    float *before = stored_dlogits(pr.student);

    poison(pr.teacher, NAN);
    ck_assert_int_eq(qkd_model_forward(pr.teacher, pr.tokens, MB, MT), QKD_OK);
    ck_assert_int_eq(qkd_loss_compute(loss, pr.student, pr.teacher, pr.targets, &value),
                     QKD_ERR_NON_FINITE);
    ck_assert(value == 0.0f);
    float *after = stored_dlogits(pr.student);
    ck_assert_mem_eq(before, after, (size_t)MB * MT * MV * 4);
    free(after);

    /* deferred: queued, reported by qkd_loss_value, and the NaN gradient
     * makes the optimizer skip its step */
    ck_assert_int_eq(qkd_loss_compute(loss, pr.student, pr.teacher, pr.targets, NULL), QKD_OK);
    value = 1.0f;
    ck_assert_int_eq(qkd_loss_value(loss, &value), QKD_ERR_NON_FINITE);
    ck_assert(value == 0.0f);
    after = stored_dlogits(pr.student);
    ck_assert(isnan(after[0]));
    free(after);
    qkd_optimizer *opt = NULL;
    qkd_optim_params op;
    qkd_optim_params_init(&op);
    ck_assert_int_eq(qkd_optimizer_create(pr.student, &op, &opt), QKD_OK);
    ck_assert_int_eq(qkd_model_zero_grad(pr.student), QKD_OK);
    ck_assert_int_eq(qkd_model_backward(pr.student, NULL), QKD_OK);
    ck_assert_int_eq(qkd_optimizer_step(opt, NULL), QKD_ERR_NON_FINITE);
    qkd_optimizer_free(opt);

    /* the student's own logits, right after its forward: nothing to backward */
    poison(pr.student, INFINITY);
    ck_assert_int_eq(qkd_model_forward(pr.student, pr.tokens, MB, MT), QKD_OK);
    ck_assert_int_eq(compute_one(&pr, QKD_LOSS_CE, NULL, pr.targets), QKD_ERR_NON_FINITE);
    ck_assert_int_eq(qkd_model_backward(pr.student, NULL), QKD_ERR_STATE);
    float conf;
    ck_assert_int_eq(qkd_loss_teacher_confidence(pr.teacher, NULL, &conf), QKD_ERR_NON_FINITE);

    free(before);
    qkd_loss_free(loss);
    pair_close(&pr);
}
END_TEST

/* ---- logits computed when read ------------------------------------------------
 * qkd_model_set_logits_rows: a loss computes each model's logits a block
 * of rows at a time. Every objective, alone or in a sum (TSLD's weights
 * and CAKLD's beta_from_teacher need the whole batch first), then gives
 * the value and gradient of logits stored whole, bit for bit, in fp32
 * and with a bf16 student's gradient in bits, and neither model ever
 * holds all its logits. */

/* The loss on the pair's tokens with rows rs (student) and rt (teacher);
 * *ds: the stored gradient's bytes (bits: the first half of the buffer). */
static float blocks_compute(struct pair *pr, qkd_loss *loss, int rs, int rt, void **ds,
                            size_t bytes)
{
    ck_assert_int_eq(qkd_model_set_logits_rows(pr->student, rs), QKD_OK);
    ck_assert_int_eq(qkd_model_set_logits_rows(pr->teacher, rt), QKD_OK);
    ck_assert_int_eq(qkd_model_forward(pr->student, pr->tokens, MB, MT), QKD_OK);
    ck_assert_int_eq(qkd_model_forward(pr->teacher, pr->tokens, MB, MT), QKD_OK);
    float value = 0.0f;
    ck_assert_int_eq(qkd_loss_compute(loss, pr->student, pr->teacher, pr->targets, &value),
                     QKD_OK);
    /* what computed the logits by block kept none of them whole */
    ck_assert_int_eq(qkd__model_logits_chunk(pr->student), rs);
    ck_assert_int_eq(qkd__model_logits_chunk(pr->teacher), rt);
    *ds = test_calloc(bytes, 1);
    qkd__backend *be = pr->ctx->backend;
    const size_t cells = (size_t)MB * MT * MV;
    uint16_t *bits = qkd__model_dlogits_bits_dev(pr->student);
    float *f32 = NULL;
    if (bytes == cells * 4)
        ck_assert_int_eq(qkd__model_dlogits_f32(pr->student, &f32), QKD_OK);
    dev_get(be, *ds, f32 ? (const void *)f32 : (const void *)bits, bytes);
    return value;
}

/* The losses compared: each kind alone, CAKLD with beta_from_teacher,
 * TSLD + FKL. */
static int block_losses(qkd_context *ctx, qkd_loss **out)
{
    int n = 0;
    for (int k = 0; k < N_KINDS; k++)
        out[n++] = test_one_term_loss(ctx, (qkd_loss_kind)all_kinds[k], 0);
    out[n++] = test_one_term_loss(ctx, QKD_LOSS_CAKLD, 1);
    out[n++] = tsld_fkl_loss(ctx);
    return n;
}

START_TEST(test_loss_logits_rows)
{
    static const int rows[][2] = {{0, 0}, {4, 0}, {0, 5}, {4, 7}, {1, 1}, {MB * MT, 2}};
    const int n_rows = (int)(sizeof rows / sizeof rows[0]);
    const qkd_matmul_precision prec[2] = {QKD_MATMUL_FP32, QKD_MATMUL_BF16};
    for (int p = 0; p < 2; p++) {
        struct pair pr;
        pair_open(&pr, test_context(1));
        ck_assert_int_eq(qkd_model_set_matmul_precision(pr.student, prec[p]), QKD_OK);
        ck_assert_int_eq(qkd_model_set_matmul_precision(pr.teacher, prec[p]), QKD_OK);
        qkd_loss *losses[N_KINDS + 2];
        const int n_losses = block_losses(pr.ctx, losses);
        for (int l = 0; l < n_losses; l++) {
            /* a single term writes a bf16 student's gradient as bits */
            const size_t cells = (size_t)MB * MT * MV;
            const size_t bytes = cells * (p && l < n_losses - 1 ? 2 : 4);
            void *want = NULL;
            const float v0 = blocks_compute(&pr, losses[l], 0, 0, &want, bytes);
            for (int r = 1; r < n_rows; r++) {
                void *got = NULL;
                const float v = blocks_compute(&pr, losses[l], rows[r][0], rows[r][1], &got,
                                               bytes);
                ck_assert_msg(v == v0 && memcmp(got, want, bytes) == 0,
                              "precision %d, loss %d, rows %d and %d: value %.9g, whole %.9g",
                              p, l, rows[r][0], rows[r][1], (double)v, (double)v0);
                free(got);
            }
            free(want);
            qkd_loss_free(losses[l]);
        }
        /* a reader of all the logits computes them all: the forward's */
        float *all = test_calloc((size_t)MB * MT * MV, 4);
        ck_assert_int_eq(qkd_model_logits(pr.teacher, all, (size_t)MB * MT * MV), QKD_OK);
        ck_assert_int_eq(qkd__model_logits_chunk(pr.teacher), 0);
        ck_assert_int_eq(qkd_model_set_logits_rows(pr.teacher, 0), QKD_OK);
        ck_assert_int_eq(qkd_model_forward(pr.teacher, pr.tokens, MB, MT), QKD_OK);
        ck_assert_int_eq(qkd_model_logits(pr.teacher, pr.t, (size_t)MB * MT * MV), QKD_OK);
        ck_assert_mem_eq(all, pr.t, (size_t)MB * MT * MV * 4);
        free(all);
        pair_close(&pr);
    }
}
END_TEST

/* A NaN logit met block by block: NON_FINITE, and neither the rows
 * written before it nor the value are left to use. */
START_TEST(test_loss_logits_rows_non_finite)
{
    struct pair pr;
    pair_open(&pr, test_context(1));
    qkd_loss *loss = tsld_fkl_loss(pr.ctx);
    ck_assert_int_eq(qkd_model_set_logits_rows(pr.teacher, 4), QKD_OK);
    ck_assert_int_eq(qkd_model_set_logits_rows(pr.student, 4), QKD_OK);
    ck_assert_int_eq(qkd_model_forward(pr.student, pr.tokens, MB, MT), QKD_OK);
    ck_assert_int_eq(qkd_model_forward(pr.teacher, pr.tokens, MB, MT), QKD_OK);
    float value = 0.0f;
    ck_assert_int_eq(qkd_loss_compute(loss, pr.student, pr.teacher, pr.targets, &value),
                     QKD_OK);
    ck_assert(value > 0.0f);
    poison(pr.teacher, NAN);
    ck_assert_int_eq(qkd_model_forward(pr.teacher, pr.tokens, MB, MT), QKD_OK);
    ck_assert_int_eq(qkd_loss_compute(loss, pr.student, pr.teacher, pr.targets, &value),
                     QKD_ERR_NON_FINITE);
    ck_assert(value == 0.0f);
    ck_assert_int_eq(qkd_model_backward(pr.student, NULL), QKD_ERR_STATE);
    ck_assert_int_eq(qkd_loss_value(loss, &value), QKD_ERR_STATE);
    ck_assert_int_eq(qkd_model_set_logits_rows(pr.student, -1), QKD_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(pr.ctx), "negative"));
    ck_assert_int_eq(qkd__model_logits_chunk(pr.student), 4); /* kept as it was */
    ck_assert_int_eq(qkd_model_set_logits_rows(NULL, 4), QKD_ERR_INVALID_ARG);
    qkd_loss_free(loss);
    pair_close(&pr);
}
END_TEST

Suite *suite_loss(void)
{
    Suite *s = suite_create("loss");
    TCase *tc = tcase_create("kernels");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_kd_against_reference);
    tcase_add_test(tc, test_kd_finite_differences);
    tcase_add_test(tc, test_kd_identities);
    tcase_add_test(tc, test_kd_threads);
    tcase_add_test(tc, test_kd_non_finite_row);
    tcase_add_test(tc, test_tsld_weights);
    tcase_add_test(tc, test_row_max_prob);
    suite_add_tcase(s, tc);

    tc = tcase_create("handle");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_loss_each_term);
    tcase_add_test(tc, test_loss_weighted_sum_backward);
    tcase_add_test(tc, test_loss_no_targets);
    tcase_add_test(tc, test_loss_confidence);
    tcase_add_test(tc, test_loss_set_beta);
    tcase_add_test(tc, test_loss_deferred);
    tcase_add_test(tc, test_loss_beta_from_teacher);
    tcase_add_test(tc, test_loss_no_step_allocation);
    tcase_add_test(tc, test_loss_alloc_failures);
    tcase_add_test(tc, test_loss_logits_rows);
    suite_add_tcase(s, tc);

    tc = tcase_create("errors");
    tcase_add_test(tc, test_loss_bad_params);
    tcase_add_test(tc, test_loss_compute_errors);
    tcase_add_test(tc, test_loss_non_finite);
    tcase_add_test(tc, test_loss_logits_rows_non_finite);
    suite_add_tcase(s, tc);
    return s;
}
