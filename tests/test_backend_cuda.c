/* The CUDA backend against the reference backend (the oracle): every
 * kernel forward and backward on random shapes with ragged edges, a whole
 * stories260K forward, backward and decode, 50 KD-QAT steps whose loss
 * curve must follow the reference's, and the GGUF round trip of a student
 * trained on the GPU.
 *
 * Without a GPU (or without the backend built in) every test prints a SKIP
 * line saying so and passes without checking anything: a green run on a
 * machine without a GPU proves only that the backend compiles.
 *
 * Tolerances, by how a kernel computes:
 *   - bit-identical (memcmp): kernels that compute in double with only
 *     correctly rounded operations, in the reference's order (fill, copy,
 *     add, axpy, scale, embedding, AdamW, SGD, hard fake quantization with
 *     computed or learned scales, quant_rows, the format schemes, which
 *     run the reference on the host);
 *   - TOL_DOUBLE = 1e-6 of the row's largest magnitude: kernels in double
 *     that sum in another order or call the device's exp, tanh, pow (RMSNorm,
 *     RoPE, the softmax family, cross-entropy, TSLD weights, sums, smooth
 *     fake quantization);
 *   - SwiGLU runs in float: TOL_FLOAT of max(1, |value|) per element (a
 *     few float roundings; 1 + x (1 - s) cancels near x = -1.28);
 *   - kd_loss and the top-1 probability run in float (online log-sum-exp):
 *     TOL_KD = 1e-5 of the row's largest magnitude for gradients and the
 *     probability, and TOL_KD_VALUE = 1e-4 of max(1, |value|) for a row's
 *     value, which is a difference of expectations and log-normalisers of
 *     about 10 (a float ulp there is 1e-6), times tau^2 = 4 and a row
 *     weight up to 2; a wrong term or index is off by O(1);
 *   - TOL_FLOAT = 1e-5 (of the sum of the magnitudes of an element's terms
 *     for matmuls, of the row's largest magnitude for attention): fp32
 *     cuBLAS products (TF32 off) and the fp32 flash attention, about 100
 *     float epsilons, where a lost term or a wrong index is off by O(1);
 *   - TOL_BF16_MM = 1e-4 of the sum of the magnitudes of the terms: the
 *     bf16 matmul slots against the reference's. Both multiply the same
 *     bf16-rounded inputs exactly; only the accumulation differs (tensor
 *     cores in fp32, the reference in double). Leaving an input unrounded
 *     moves a product of depth 1 by up to 2^-8 of it, well past this;
 *   - attention's saved logsumexp: 1e-5 of max(1, |lse|) against one
 *     computed in double here from q and k (bf16-rounded for the bf16
 *     slots);
 *   - the bf16 attention slots against the reference's: TOL_BF16_ATT_OUT
 *     (absolute, 2^-8 + 1e-5) for the output and TOL_BF16_ATT = 1e-3 of
 *     the tensor's largest magnitude for the gradients (attention_case
 *     says why);
 *   - a whole model: 1e-4 of the largest magnitude; the KD-QAT loss curve:
 *     1e-3 relative at every step. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/core.h"
#include "core/half.h"
#include "qkd/loss.h"
#include "qkd/optim.h"
#include "qkd/quant.h"
#include "testutil.h"

#define TOL_DOUBLE 1e-6
#define TOL_FLOAT 1e-5
#define TOL_BF16_MM 1e-4
#define TOL_KD 1e-5
#define TOL_KD_VALUE 1e-4
#define TOL_BF16_ATT_OUT (1.0 / 256 + 1e-5)
#define TOL_BF16_ATT 1e-3

#ifdef QKD_HAVE_CUDA
#include "backend/cuda/cuda.h" /* gemm_candidates_agree reaches the plans */
#include "model/model_impl.h"     /* the layers' buffers */

/* ---- random data ------------------------------------------------------------------ */

static int32_t *ids_rand(size_t n, int V, int with_negative)
{
    int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
    ck_assert_ptr_nonnull(ids);
    for (size_t i = 0; i < n; i++)
        ids[i] = with_negative && i % 5 == 2 ? -1 : (int32_t)(test_rng_next(0, 1) * V);
    return ids;
}

/* ---- the two backends ---------------------------------------------------------------- */

/* A reference and a CUDA context; 0 (the test returns) when there is no
 * CUDA device, after saying so. */
struct pair {
    qkd_context *rc, *cc;
    qkd__backend *rb, *cb;
};

/* Keeps the last error logged while a context is created. */
static void keep_message(void *user, qkd_log_level level, const char *msg)
{
    (void)level;
    snprintf(user, 256, "%s", msg);
}

static qkd_context *cuda_context(void)
{
    static char why[256];
    qkd_context_params p;
    qkd_context_params_init(&p);
    p.n_threads = 2;
    p.backend = QKD_BACKEND_CUDA;
    p.log = keep_message;
    p.log_user = why;
    p.log_level = QKD_LOG_ERROR;
    qkd_context *ctx = NULL;
    why[0] = '\0';
    qkd_status st = qkd_context_create(&p, &ctx);
    if (st == QKD_ERR_UNSUPPORTED) {
        fprintf(stderr, "SKIP (backend_cuda): %s\n", why);
        return NULL;
    }
    ck_assert_msg(st == QKD_OK, "cuda context: %s", qkd_status_name(st));
    ck_assert_str_eq(qkd_context_backend_name(ctx), "cuda");
    return ctx;
}

static int pair_open(struct pair *p)
{
    p->cc = cuda_context();
    if (!p->cc)
        return 0;
    p->rc = test_context(2);
    p->rb = p->rc->backend;
    p->cb = p->cc->backend;
    return 1;
}

static void pair_close(struct pair *p)
{
    qkd_context_free(p->cc);
    qkd_context_free(p->rc);
}

static void expect_ok(qkd_context *ctx, qkd_status st, const char *what)
{
    ck_assert_msg(st == QKD_OK, "%s: %s (%s)", what, qkd_status_name(st),
                  qkd_context_last_error(ctx));
}

/* Device copy of n host values (bytes each). */
static void *dput_bytes(struct pair *p, const void *h, size_t n, size_t bytes)
{
    void *d = NULL;
    expect_ok(p->cc, p->cb->alloc(p->cb, (n ? n : 1) * bytes, &d), "alloc");
    if (n)
        expect_ok(p->cc, p->cb->upload(p->cb, d, h, n * bytes), "upload");
    return d;
}

static float *dput(struct pair *p, const float *h, size_t n)
{
    return dput_bytes(p, h, n, sizeof *h);
}

static int32_t *dput_ids(struct pair *p, const int32_t *h, size_t n)
{
    return dput_bytes(p, h, n, sizeof *h);
}

/* A device output poisoned with NaN, so an element never written fails. */
static float *dpoison(struct pair *p, size_t n)
{
    float *h = test_vec_new(n);
    for (size_t i = 0; i < n; i++)
        h[i] = NAN;
    float *d = dput(p, h, n);
    free(h);
    return d;
}

/* Download n values (bytes each) of d into a new host array and free d. */
static void *dtake_bytes(struct pair *p, void *d, size_t n, size_t bytes)
{
    void *h = malloc((n ? n : 1) * bytes);
    ck_assert_ptr_nonnull(h);
    expect_ok(p->cc, p->cb->sync(p->cb), "sync");
    if (n)
        expect_ok(p->cc, p->cb->download(p->cb, h, d, n * bytes), "download");
    p->cb->free(p->cb, d);
    return h;
}

static float *dtake(struct pair *p, float *d, size_t n)
{
    return dtake_bytes(p, d, n, sizeof *d);
}

static void dfree(struct pair *p, void *d)
{
    p->cb->free(p->cb, d);
}

/* h's n floats at float offset off of a new device array (off floats of
 * NaN before them), so the kernels see a pointer off the 16-byte boundary
 * when off is not a multiple of 4. */
static float *dput_off(struct pair *p, const float *h, size_t n, size_t off)
{
    float *d = dpoison(p, n + off);
    expect_ok(p->cc, p->cb->upload(p->cb, d + off, h, n * sizeof *h), "upload");
    return d + off;
}

/* dtake of an array from dput_off. */
static float *dtake_off(struct pair *p, float *d, size_t n, size_t off)
{
    float *h = test_vec_new(n);
    expect_ok(p->cc, p->cb->sync(p->cb), "sync");
    expect_ok(p->cc, p->cb->download(p->cb, h, d, n * sizeof *h), "download");
    p->cb->free(p->cb, d - off);
    return h;
}

/* ---- comparisons ---------------------------------------------------------------------- */

static void assert_same(const char *what, const float *got, const float *want, size_t n)
{
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(memcmp(&got[i], &want[i], sizeof *got) == 0,
                      "%s[%zu]: cuda %.9g, ref %.9g (must be identical)", what, i,
                      (double)got[i], (double)want[i]);
}

/* |got - want| <= tol * (the largest |want| of its row of row_len). */
static void assert_close_rows(const char *what, const float *got, const float *want,
                              size_t n_rows, size_t row_len, double tol)
{
    for (size_t r = 0; r < n_rows; r++) {
        double mag = 1e-30;
        for (size_t c = 0; c < row_len; c++)
            mag = fmax(mag, fabs(want[r * row_len + c]));
        for (size_t c = 0; c < row_len; c++) {
            size_t i = r * row_len + c;
            double err = fabs((double)got[i] - want[i]);
            /* a NaN or an infinity must be the same one */
            int same = (isnan(got[i]) && isnan(want[i])) || (isinf(want[i]) && got[i] == want[i]);
            ck_assert_msg(same || err <= tol * mag,
                          "%s[%zu]: cuda %.9g, ref %.9g (err %.3g > %.3g)", what, i,
                          (double)got[i], (double)want[i], err, tol * mag);
        }
    }
}

/* |got[i] - want[i]| <= tol * max(1, |want[i]|). */
static void assert_close_floor(const char *what, const float *got, const float *want, size_t n,
                               double tol)
{
    for (size_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - want[i]), lim = tol * fmax(1.0, fabs(want[i]));
        /* a NaN or an infinity must be the same one */
        int same = (isnan(got[i]) && isnan(want[i])) || (isinf(want[i]) && got[i] == want[i]);
        ck_assert_msg(same || err <= lim,
                      "%s[%zu]: cuda %.9g, ref %.9g (err %.3g > %.3g)", what, i,
                      (double)got[i], (double)want[i], err, lim);
    }
}

/* ---- elementwise, sums, optimizer updates ------------------------------------------------ */

static const size_t elem_sizes[] = {1, 15, 17, 1000, 100003};

START_TEST(elementwise_equal_ref)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    test_rng_seed(55);
    for (size_t s = 0; s < sizeof elem_sizes / sizeof elem_sizes[0]; s++) {
        size_t n = elem_sizes[s];
        float *x = test_vec_rand(n, -2, 2), *y = test_vec_rand(n, -2, 2), *o = test_vec_rand(n, -1, 1);
        float *dx = dput(&p, x, n), *dy = dput(&p, y, n), *dout = dpoison(&p, n);
        float *dcopy = dpoison(&p, n);
        p.rb->fill(p.rb, o, 0.25f, n);
        p.cb->fill(p.cb, dout, 0.25f, n);
        p.rb->add(p.rb, o, x, y, n);
        p.cb->add(p.cb, dout, dx, dy, n);
        p.rb->scale(p.rb, o, -0.3f, n);
        p.cb->scale(p.cb, dout, -0.3f, n);
        p.rb->axpy(p.rb, o, 1.7f, x, n);
        p.cb->axpy(p.cb, dout, 1.7f, dx, n);
        p.cb->copy(p.cb, dcopy, dout, n);
        float *got = dtake(&p, dout, n), *copied = dtake(&p, dcopy, n);
        assert_same("fill, add, scale, axpy", got, o, n);
        assert_same("copy", copied, o, n);
        /* +0 takes the memset path, -0 the kernel: each keeps its sign */
        for (int neg = 0; neg < 2; neg++) {
            float zero = neg ? -0.0f : 0.0f, *dz = dpoison(&p, n);
            p.rb->fill(p.rb, o, zero, n);
            p.cb->fill(p.cb, dz, zero, n);
            float *zeros = dtake(&p, dz, n);
            assert_same("fill with zero", zeros, o, n);
            free(zeros);
        }
        free(x); free(y); free(o); free(got); free(copied);
        dfree(&p, dx); dfree(&p, dy);
    }
    pair_close(&p);
}
END_TEST

START_TEST(sums_match_ref)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    static const size_t sizes[] = {0, 1, 33, 4099, 3000017};
    test_rng_seed(57);
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        size_t n = sizes[s];
        float *x = test_vec_rand(n, -1, 3), want[2], mag = 0.0f;
        for (size_t i = 0; i < n; i++)
            mag += fabsf(x[i]) * (1.0f + fabsf(x[i]));
        p.rb->sum(p.rb, &want[0], x, n);
        p.rb->sum_squares(p.rb, &want[1], x, n);
        float *dx = dput(&p, x, n), *dout = dpoison(&p, 2);
        p.cb->sum(p.cb, dout, dx, n);
        p.cb->sum_squares(p.cb, dout + 1, dx, n);
        float *got = dtake(&p, dout, 2);
        for (int k = 0; k < 2; k++)
            ck_assert_msg(fabs((double)got[k] - want[k]) <= TOL_DOUBLE * (mag + 1e-30),
                          "%s of %zu: cuda %.9g, ref %.9g", k ? "sum_squares" : "sum", n,
                          (double)got[k], (double)want[k]);
        if (n > 1) { /* from the second element: a start off the 16-byte boundary */
            float *d1 = dpoison(&p, 1), *g1;
            p.rb->sum(p.rb, &want[0], x + 1, n - 1);
            p.cb->sum(p.cb, d1, dx + 1, n - 1);
            g1 = dtake(&p, d1, 1);
            ck_assert_msg(fabs((double)g1[0] - want[0]) <= TOL_DOUBLE * (mag + 1e-30),
                          "sum of %zu from x + 1: cuda %.9g, ref %.9g", n - 1, (double)g1[0],
                          (double)want[0]);
            free(g1);
        }
        free(x); free(got);
        dfree(&p, dx);
    }
    pair_close(&p);
}
END_TEST

START_TEST(optimizers_equal_ref)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    test_rng_seed(81);
    const size_t n = 70001;
    float *w = test_vec_rand(n, -1, 1), *g = test_vec_rand(n, -1, 1), *m = test_vec_rand(n, -0.1, 0.1);
    float *v = test_vec_rand(n, 0, 0.01);
    float *dw = dput(&p, w, n), *dg = dput(&p, g, n), *dm = dput(&p, m, n), *dv = dput(&p, v, n);
    for (int t = 1; t <= 3; t++) {
        p.rb->adamw_update(p.rb, w, g, m, v, n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, t);
        p.cb->adamw_update(p.cb, dw, dg, dm, dv, n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, t);
    }
    p.rb->sgd_update(p.rb, w, g, m, n, 0.01f, 0.9f, 0.01f);
    p.cb->sgd_update(p.cb, dw, dg, dm, n, 0.01f, 0.9f, 0.01f);
    float *gw = dtake(&p, dw, n), *gm = dtake(&p, dm, n), *gv = dtake(&p, dv, n);
    assert_same("adamw + sgd weights", gw, w, n);
    assert_same("adamw + sgd first moment", gm, m, n);
    assert_same("adamw second moment", gv, v, n);
    free(w); free(g); free(m); free(v); free(gw); free(gm); free(gv);
    dfree(&p, dg);
    pair_close(&p);
}
END_TEST

/* Many tensors in one call against the reference's tensor-by-tensor
 * updates: identical AdamW results (the clipped case scales a copy of the
 * gradient on the reference side), squared norms within double rounding.
 * The sizes straddle the CUDA kernels' 2048-element chunks and their
 * float4 loads; the last span is not 16-byte aligned. */
START_TEST(multi_tensor_updates_match_ref)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    static const size_t sizes[] = {2049, 0, 1, 2048, 70001, 5, 4099};
    enum { NS = sizeof sizes / sizeof sizes[0] };
    const size_t off[NS] = {[NS - 1] = 1}; /* the last span off the float4 boundary */
    test_rng_seed(83);
    qkd__update_span spans[NS];
    float *h[NS][4], *d[NS][4]; /* p, g, m, v on each side */
    for (int s = 0; s < NS; s++) {
        size_t n = sizes[s] ? sizes[s] : 1; /* an empty span still gets a buffer */
        h[s][0] = test_vec_rand(n, -1, 1);
        h[s][1] = test_vec_rand(n, -1, 1);
        h[s][2] = test_vec_rand(n, -0.1, 0.1);
        h[s][3] = test_vec_rand(n, 0, 0.01);
        for (int k = 0; k < 4; k++)
            d[s][k] = dput_off(&p, h[s][k], n, off[s]);
        spans[s] = (qkd__update_span){.p = d[s][0], .g = d[s][1], .m = d[s][2], .v = d[s][3],
                                      .n = sizes[s], .lr = 1e-3f * (float)(s + 1)};
    }
    float *d_norms = dpoison(&p, NS), want[NS];
    p.cb->sum_squares_multi(p.cb, d_norms, spans, NS);
    float *norms = dtake(&p, d_norms, NS);
    for (int s = 0; s < NS; s++) {
        double mag = 0.0;
        for (size_t i = 0; i < sizes[s]; i++)
            mag += (double)h[s][1][i] * h[s][1][i];
        p.rb->sum_squares(p.rb, &want[s], h[s][1], sizes[s]);
        ck_assert_msg(fabs((double)norms[s] - want[s]) <= TOL_DOUBLE * (mag + 1e-30),
                      "sum_squares_multi span %d: cuda %.9g, ref %.9g", s, (double)norms[s],
                      (double)want[s]);
    }
    for (int t = 1; t <= 3; t++) {
        float gscale = t == 2 ? 0.37f : 1.0f;
        p.cb->adamw_update_multi(p.cb, spans, NS, gscale, 0.9f, 0.95f, 1e-8f, 0.1f, t);
        for (int s = 0; s < NS; s++) {
            float *g = test_vec_copy(h[s][1], sizes[s] ? sizes[s] : 1);
            p.rb->scale(p.rb, g, gscale, sizes[s]);
            p.rb->adamw_update(p.rb, h[s][0], g, h[s][2], h[s][3], sizes[s], spans[s].lr, 0.9f,
                               0.95f, 1e-8f, 0.1f, t);
            free(g);
        }
    }
    /* steps 4 to 6 decided on the device: unclipped, clipped, skipped (a
     * NaN norm), against the reference's decisions on host memory */
    qkd__step_state rst = {.t = 3}, *d_st = NULL;
    expect_ok(p.cc, p.cb->alloc(p.cb, sizeof rst, (void **)&d_st), "alloc");
    expect_ok(p.cc, p.cb->upload(p.cb, d_st, &rst, sizeof rst), "upload");
    static const float max_norms[] = {1e9f, 1.0f, 1.0f};
    for (int k = 0; k < 3; k++) {
        float sq[NS];
        memcpy(sq, want, sizeof sq);
        sq[4] = k == 2 ? NAN : sq[4];
        float *d_sq = dput(&p, sq, NS);
        p.cb->step_decide(p.cb, d_st, d_sq, NS, max_norms[k], 0.9f, 0.95f);
        p.cb->adamw_update_multi_dev(p.cb, spans, NS, d_st, 0.9f, 0.95f, 1e-8f, 0.1f, NULL);
        p.rb->step_decide(p.rb, &rst, sq, NS, max_norms[k], 0.9f, 0.95f);
        qkd__update_span hs[NS];
        for (int s = 0; s < NS; s++)
            hs[s] = (qkd__update_span){.p = h[s][0], .g = h[s][1], .m = h[s][2], .v = h[s][3],
                                       .n = sizes[s], .lr = spans[s].lr};
        p.rb->adamw_update_multi_dev(p.rb, hs, NS, &rst, 0.9f, 0.95f, 1e-8f, 0.1f, NULL);
        qkd__step_state got;
        expect_ok(p.cc, p.cb->sync(p.cb), "sync");
        expect_ok(p.cc, p.cb->download(p.cb, &got, d_st, sizeof got), "download");
        ck_assert_msg(got.t == rst.t && got.skipped == rst.skipped && got.clipped == rst.clipped &&
                          got.gscale == rst.gscale && (got.norm == rst.norm || k == 2),
                      "step_decide %d: t %lld/%lld skipped %d/%d clipped %d/%d gscale %g/%g", k,
                      (long long)got.t, (long long)rst.t, got.skipped, rst.skipped, got.clipped,
                      rst.clipped, (double)got.gscale, (double)rst.gscale);
        ck_assert_int_eq(got.clipped, k == 1);
        ck_assert_int_eq(got.skipped, k == 2);
        dfree(&p, d_sq);
    }
    dfree(&p, d_st);
    static const char *names[] = {"adamw_update_multi weights", "its gradient (unchanged)",
                                  "its first moment", "its second moment"};
    for (int s = 0; s < NS; s++) {
        for (int k = 0; k < 4; k++) {
            float *got = dtake_off(&p, d[s][k], sizes[s] ? sizes[s] : 1, off[s]);
            assert_same(names[k], got, h[s][k], sizes[s]);
            free(got);
            free(h[s][k]);
        }
    }
    free(norms);
    pair_close(&p);
}
END_TEST

/* One span of adamw_multi_quantizes on both sides: p, g, m, v, then the
 * bf16 bits, scales and zeros of Q(p). */
struct fq_span {
    float *h[4], *d[4], *h_sc, *h_z, *d_sc, *d_z;
    uint16_t *h_wq, *d_wq;
    size_t n, ng, off;
};

static void fq_span_open(struct pair *p, struct fq_span *f, size_t n, int64_t group, size_t off)
{
    *f = (struct fq_span){.n = n, .ng = n / (size_t)group, .off = off};
    f->h[0] = test_vec_rand(n, -1, 1);
    f->h[1] = test_vec_rand(n, -1, 1);
    f->h[2] = test_vec_rand(n, -0.1, 0.1);
    f->h[3] = test_vec_rand(n, 0, 0.01);
    for (int k = 0; k < 4; k++)
        f->d[k] = dput_off(p, f->h[k], n, off);
    f->h_sc = test_vec_new(f->ng);
    f->h_z = test_vec_new(f->ng);
    f->d_sc = dpoison(p, f->ng);
    f->d_z = dpoison(p, f->ng);
    f->h_wq = malloc(n * sizeof *f->h_wq);
    ck_assert_ptr_nonnull(f->h_wq);
    f->d_wq = dput_bytes(p, f->h_wq, n, sizeof *f->h_wq);
}

/* Both sides' Q(p) set to NaN bits, so that one the call fails to write fails. */
static void fq_span_poison(struct pair *p, struct fq_span *f)
{
    memset(f->h_wq, 0xff, f->n * sizeof *f->h_wq);
    expect_ok(p->cc, p->cb->upload(p->cb, f->d_wq, f->h_wq, f->n * sizeof *f->h_wq), "upload");
}

static void fq_span_check(struct pair *p, const struct fq_span *f, const char *what)
{
    static const char *names[] = {"weights", "gradient (unchanged)", "first moment",
                                  "second moment"};
    char name[160];
    for (int k = 0; k < 4; k++) {
        float *got = test_vec_new(f->n);
        expect_ok(p->cc, p->cb->sync(p->cb), "sync");
        expect_ok(p->cc, p->cb->download(p->cb, got, f->d[k], f->n * sizeof *got), "download");
        snprintf(name, sizeof name, "%s: %s", what, names[k]);
        assert_same(name, got, f->h[k], f->n);
        free(got);
    }
    uint16_t *wq = malloc(f->n * sizeof *wq);
    ck_assert_ptr_nonnull(wq);
    expect_ok(p->cc, p->cb->download(p->cb, wq, f->d_wq, f->n * sizeof *wq), "download");
    for (size_t i = 0; i < f->n; i++)
        ck_assert_msg(wq[i] == f->h_wq[i], "%s: Q(p)[%zu] bits 0x%04x, ref 0x%04x", what, i,
                      wq[i], f->h_wq[i]);
    free(wq);
    float *sc = test_vec_new(f->ng), *z = test_vec_new(f->ng);
    expect_ok(p->cc, p->cb->download(p->cb, sc, f->d_sc, f->ng * sizeof *sc), "download");
    expect_ok(p->cc, p->cb->download(p->cb, z, f->d_z, f->ng * sizeof *z), "download");
    snprintf(name, sizeof name, "%s: scales", what);
    assert_same(name, sc, f->h_sc, f->ng);
    snprintf(name, sizeof name, "%s: zeros", what);
    assert_same(name, z, f->h_z, f->ng);
    free(sc), free(z);
}

static void fq_span_close(struct pair *p, struct fq_span *f)
{
    for (int k = 0; k < 4; k++) {
        dfree(p, f->d[k] - f->off);
        free(f->h[k]);
    }
    dfree(p, f->d_sc), dfree(p, f->d_z), dfree(p, f->d_wq);
    free(f->h_sc), free(f->h_z), free(f->h_wq);
}

/* adamw_update_multi_dev with spans that quantize the weights they update
 * (a bf16 student's next forward then reads them): the reference's update
 * followed by its fakequant_forward_bf16, bit for bit, for SYM and ASYM;
 * groups of 4 to 128, which the update quantizes in its own pass, and a
 * group of 12, one of 256 and a span off the float4 boundary, which it
 * hands to the fake-quantization kernel; an applied step, then a skipped
 * one, which leaves the weights but still writes Q(p). */
START_TEST(adamw_multi_quantizes)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    static const int64_t groups[] = {4, 8, 16, 32, 64, 128, 12, 256};
    enum { NS = 3 };
    test_rng_seed(84);
    for (size_t gi = 0; gi < sizeof groups / sizeof groups[0]; gi++)
        for (int asym = 0; asym < 2; asym++) {
            const int64_t group = groups[gi];
            const qkd__quant_spec fq = {.scheme = asym ? QKD_QUANT_ASYM : QKD_QUANT_SYM,
                                        .bits = asym ? 4 : 3, .group = group,
                                        .clip_ratio = 1.0f};
            /* several chunks, one group, and an unaligned span */
            const size_t sizes[NS] = {(size_t)group * 37, (size_t)group, (size_t)group * 3};
            const size_t offs[NS] = {0, 0, 1};
            struct fq_span f[NS];
            qkd__update_span ds[NS], hs[NS];
            for (int s = 0; s < NS; s++) {
                fq_span_open(&p, &f[s], sizes[s], group, offs[s]);
                const float lr = 1e-3f * (float)(s + 1);
                ds[s] = (qkd__update_span){f[s].d[0], f[s].d[1], f[s].d[2], f[s].d[3],
                                           sizes[s], lr, f[s].d_wq, f[s].d_sc, f[s].d_z};
                hs[s] = (qkd__update_span){f[s].h[0], f[s].h[1], f[s].h[2], f[s].h[3],
                                           sizes[s], lr, f[s].h_wq, f[s].h_sc, f[s].h_z};
            }
            qkd__step_state rst = {.t = 2}, *d_st = NULL;
            expect_ok(p.cc, p.cb->alloc(p.cb, sizeof rst, (void **)&d_st), "alloc");
            expect_ok(p.cc, p.cb->upload(p.cb, d_st, &rst, sizeof rst), "upload");
            for (int skip = 0; skip < 2; skip++) {
                const float sq[NS] = {1.0f, skip ? NAN : 2.0f, 3.0f};
                float *d_sq = dput(&p, sq, NS);
                for (int s = 0; s < NS; s++)
                    fq_span_poison(&p, &f[s]);
                p.cb->step_decide(p.cb, d_st, d_sq, NS, 1e9f, 0.9f, 0.95f);
                p.cb->adamw_update_multi_dev(p.cb, ds, NS, d_st, 0.9f, 0.95f, 1e-8f, 0.1f, &fq);
                p.rb->step_decide(p.rb, &rst, sq, NS, 1e9f, 0.9f, 0.95f);
                p.rb->adamw_update_multi_dev(p.rb, hs, NS, &rst, 0.9f, 0.95f, 1e-8f, 0.1f, &fq);
                ck_assert_int_eq(rst.skipped, skip);
                for (int s = 0; s < NS; s++) {
                    char what[96];
                    snprintf(what, sizeof what, "%s group %lld span %d, %s step",
                             asym ? "ASYM" : "SYM", (long long)group, s,
                             skip ? "skipped" : "applied");
                    fq_span_check(&p, &f[s], what);
                }
                dfree(&p, d_sq);
            }
            dfree(&p, d_st);
            for (int s = 0; s < NS; s++)
                fq_span_close(&p, &f[s]);
        }
    pair_close(&p);
}
END_TEST

/* ---- matmul ------------------------------------------------------------------------------- */

/* n values rounded to bf16: their bits into bits, the values they decode
 * to back into x. */
static void round_bf16(float *x, uint16_t *bits, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        bits[i] = qkd__f32_to_bf16(x[i]);
        x[i] = qkd__bf16_to_f32(bits[i]);
    }
}

static uint16_t *bits_new(size_t n)
{
    uint16_t *b = malloc((n ? n : 1) * sizeof *b);
    ck_assert_ptr_nonnull(b);
    return b;
}

/* Ragged shapes besides exact ones, a depth past a few hundred. */
static const int mm_shapes[][3] = {
    {1, 1, 1},    {2, 7, 5},     {3, 33, 17},   {4, 64, 64},   {5, 19, 100},
    {13, 31, 47}, {37, 300, 29}, {100, 65, 130}, {64, 520, 96}, {301, 290, 333},
};

/* The sum of |terms| of every element of the three products (+ |initial|). */
static void mm_scales(const float *x, const float *w, const float *dout, const float *dx0,
                      const float *dw0, int N, int C, int OC, float *s_out, float *s_dx,
                      float *s_dw)
{
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++)
            for (int c = 0; c < C; c++) {
                s_out[n * OC + o] += fabsf(x[n * C + c] * w[o * C + c]);
                s_dx[n * C + c] += fabsf(dout[n * OC + o] * w[o * C + c]);
                s_dw[o * C + c] += fabsf(dout[n * OC + o] * x[n * C + c]);
            }
    for (int i = 0; i < N * C; i++)
        s_dx[i] += fabsf(dx0[i]);
    for (int i = 0; i < OC * C; i++)
        s_dw[i] += fabsf(dw0[i]);
}

/* |got - want| <= tol * scale, element by element */
static void assert_close_scaled(const char *what, const float *got, const float *want,
                                const float *scale, size_t n, double tol)
{
    for (size_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - want[i]);
        ck_assert_msg(err <= tol * ((double)scale[i] + 1e-30), "%s[%zu]: cuda %.9g, ref %.9g",
                      what, i, (double)got[i], (double)want[i]);
    }
}

/* Bits got against want as bf16 values: within the products' tolerance
 * (tol * scale) and the two roundings to bf16 (half a unit each). */
static void assert_bits_close(const char *what, const uint16_t *got, const uint16_t *want,
                              const float *scale, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const double g = qkd__bf16_to_f32(got[i]), r = qkd__bf16_to_f32(want[i]);
        ck_assert_msg(fabs(g - r) <= TOL_BF16_MM * scale[i] + 0x1p-9 * (fabs(g) + fabs(r)),
                      "%s[%zu]: cuda %.9g, ref %.9g", what, i, g, r);
    }
}

/* The forward and the written input gradient as bf16 bits on both
 * backends (the cuda outputs poisoned first: every element is written). */
static void mm_to_bits_case(struct pair *p, const float *x, const float *w, const float *dout,
                            const float *d_x, const float *d_w, const float *d_dout,
                            const float *s_out, const float *s_dx, int N, int C, int OC)
{
    qkd__backend *rb = p->rb, *cb = p->cb;
    const size_t nx = (size_t)N * C, no = (size_t)N * OC;
    uint16_t *out = bits_new(no), *dx = bits_new(nx), *got = bits_new(nx > no ? nx : no);
    memset(got, 0xff, (nx > no ? nx : no) * sizeof *got);
    uint16_t *d_out = dput_bytes(p, got, no, sizeof *got);
    uint16_t *d_dx = dput_bytes(p, got, nx, sizeof *got);
    rb->matmul_forward_to_bf16_bits(rb, out, qkd__bf16_f32(x), qkd__bf16_f32(w), N, C, OC);
    rb->matmul_backward_input_to_bf16_bits(rb, dx, qkd__bf16_f32(dout), qkd__bf16_f32(w), N, C,
                                           OC);
    cb->matmul_forward_to_bf16_bits(cb, d_out, qkd__bf16_f32(d_x), qkd__bf16_f32(d_w), N, C, OC);
    cb->matmul_backward_input_to_bf16_bits(cb, d_dx, qkd__bf16_f32(d_dout), qkd__bf16_f32(d_w), N,
                                           C, OC);
    expect_ok(p->cc, cb->sync(cb), "sync");
    expect_ok(p->cc, cb->download(cb, got, d_out, no * sizeof *got), "download");
    assert_bits_close("matmul_forward_to_bf16_bits", got, out, s_out, no);
    expect_ok(p->cc, cb->download(cb, got, d_dx, nx * sizeof *got), "download");
    assert_bits_close("matmul_backward_input_to_bf16_bits", got, dx, s_dx, nx);
    free(out); free(dx); free(got);
    dfree(p, d_out); dfree(p, d_dx);
}

/* The three products of one shape on both backends, in fp32 or bf16
 * (with the bf16 forms written as bits). */
static void mm_case(struct pair *p, int N, int C, int OC, int bf16)
{
    qkd__backend *rb = p->rb, *cb = p->cb;
    size_t nx = (size_t)N * C, nw = (size_t)OC * C, no = (size_t)N * OC;
    float *x = test_vec_rand(nx, -1, 1), *w = test_vec_rand(nw, -1, 1), *dout = test_vec_rand(no, -1, 1);
    float *dx = test_vec_rand(nx, -1, 1), *dw = test_vec_rand(nw, -1, 1), *out = test_vec_new(no);
    float *s_out = test_vec_new(no), *s_dx = test_vec_new(nx), *s_dw = test_vec_new(nw);
    mm_scales(x, w, dout, dx, dw, N, C, OC, s_out, s_dx, s_dw);
    float *d_x = dput(p, x, nx), *d_w = dput(p, w, nw), *d_dout = dput(p, dout, no);
    float *d_out = dpoison(p, no), *d_dx = dput(p, dx, nx), *d_dw = dput(p, dw, nw);
    if (bf16) {
        rb->matmul_forward_bf16(rb, out, x, w, N, C, OC);
        rb->matmul_backward_input_bf16(rb, dx, dout, w, N, C, OC);
        rb->matmul_backward_weight_bf16(rb, dw, dout, x, N, C, OC);
        cb->matmul_forward_bf16(cb, d_out, d_x, d_w, N, C, OC);
        cb->matmul_backward_input_bf16(cb, d_dx, d_dout, d_w, N, C, OC);
        cb->matmul_backward_weight_bf16(cb, d_dw, d_dout, d_x, N, C, OC);
    } else {
        rb->matmul_forward(rb, out, x, w, N, C, OC);
        rb->matmul_backward_input(rb, dx, dout, w, N, C, OC);
        rb->matmul_backward_weight(rb, dw, dout, x, N, C, OC);
        cb->matmul_forward(cb, d_out, d_x, d_w, N, C, OC);
        cb->matmul_backward_input(cb, d_dx, d_dout, d_w, N, C, OC);
        cb->matmul_backward_weight(cb, d_dw, d_dout, d_x, N, C, OC);
    }
    if (bf16)
        mm_to_bits_case(p, x, w, dout, d_x, d_w, d_dout, s_out, s_dx, N, C, OC);
    float *g_out = dtake(p, d_out, no), *g_dx = dtake(p, d_dx, nx), *g_dw = dtake(p, d_dw, nw);
    const double tol = bf16 ? TOL_BF16_MM : TOL_FLOAT;
    assert_close_scaled(bf16 ? "matmul_forward_bf16" : "matmul_forward", g_out, out, s_out, no,
                        tol);
    assert_close_scaled(bf16 ? "matmul_backward_input_bf16" : "matmul_backward_input", g_dx, dx,
                        s_dx, nx, tol);
    assert_close_scaled(bf16 ? "matmul_backward_weight_bf16" : "matmul_backward_weight", g_dw,
                        dw, s_dw, nw, tol);
    free(x); free(w); free(dout); free(dx); free(dw); free(out);
    free(s_out); free(s_dx); free(s_dw); free(g_out); free(g_dx); free(g_dw);
    dfree(p, d_x); dfree(p, d_w); dfree(p, d_dout);
}

START_TEST(matmul_matches_ref)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    test_rng_seed(11);
    for (size_t s = 0; s < sizeof mm_shapes / sizeof mm_shapes[0]; s++)
        mm_case(&p, mm_shapes[s][0], mm_shapes[s][1], mm_shapes[s][2], 0);
    pair_close(&p);
}
END_TEST

START_TEST(matmul_bf16_matches_ref)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    test_rng_seed(12);
    for (size_t s = 0; s < sizeof mm_shapes / sizeof mm_shapes[0]; s++)
        mm_case(&p, mm_shapes[s][0], mm_shapes[s][1], mm_shapes[s][2], 1);
    /* a depth-1 product of two values that bf16 rounds: the reference's
     * bf16 result differs from the fp32 one, and the GPU must give the
     * former (exactly: one product, no accumulation) */
    float x = 1.0115f, w = 3.007f, ref = 0.0f; /* bf16: 1.0078125 and 3 */
    float *d_x = dput(&p, &x, 1), *d_w = dput(&p, &w, 1), *d_out = dpoison(&p, 1);
    p.rb->matmul_forward_bf16(p.rb, &ref, &x, &w, 1, 1, 1);
    p.cb->matmul_forward_bf16(p.cb, d_out, d_x, d_w, 1, 1, 1);
    float *got = dtake(&p, d_out, 1);
    ck_assert_msg(fabsf(ref - x * w) > 1e-3f * fabsf(x * w), "bf16 rounding not visible");
    assert_same("matmul_forward_bf16 of one product", got, &ref, 1);
    free(got);
    dfree(&p, d_x); dfree(&p, d_w);
    pair_close(&p);
}
END_TEST

/* Every candidate a bf16 product's plan chooses among gives the same bits
 * (gemm.c: so the timing that chooses cannot change a result), the
 * planned product equals them whether it adds to C or writes it, in fp32
 * or in bf16, at its first use (timed) and after, and sampled elements
 * match a product in double. The shapes: a forward, an input gradient and
 * a weight gradient of SmolLM's (the last split over k), large enough to
 * be timed, and a ragged one that is not. */
START_TEST(gemm_candidates_agree)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    static const qkd__cuda_gemm shapes[] = {
        {CUBLAS_OP_T, CUBLAS_OP_N, 576, 2048, 576, 576, 576, 576, 0.0f, false},
        {CUBLAS_OP_N, CUBLAS_OP_N, 576, 4096, 192, 576, 192, 576, 0.0f, false},
        {CUBLAS_OP_N, CUBLAS_OP_T, 576, 192, 16384, 576, 192, 576, 0.0f, false},
        {CUBLAS_OP_N, CUBLAS_OP_N, 17, 33, 65, 17, 65, 17, 0.0f, false},
    };
    test_rng_seed(29);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        for (int form = 0; form < 3; form++) { /* C: fp32 written, fp32 added, bf16 written */
            qkd__cuda_gemm g = shapes[s];
            g.beta = form == 1 ? 1.0f : 0.0f;
            g.c16 = form == 2;
            const bool an = g.ta == CUBLAS_OP_N, bn = g.tb == CUBLAS_OP_N;
            const size_t na = (size_t)g.lda * (an ? g.k : g.m);
            const size_t nb = (size_t)g.ldb * (bn ? g.n : g.k), nc = (size_t)g.ldc * g.n;
            const size_t es = g.c16 ? sizeof(uint16_t) : sizeof(float);
            float *a = test_vec_rand(na, -1, 1), *bv = test_vec_rand(nb, -1, 1);
            float *c0 = test_vec_rand(nc, -1, 1); /* as bits for a bf16 C: any values */
            uint16_t *a16 = bits_new(na), *b16 = bits_new(nb);
            round_bf16(a, a16, na);
            round_bf16(bv, b16, nb);
            const uint16_t *d_a = dput_bytes(&p, a16, na, sizeof *a16);
            const uint16_t *d_b = dput_bytes(&p, b16, nb, sizeof *b16);
            void *d_c = dput_bytes(&p, c0, nc, es);
            const int n = qkd__cuda_gemm_bf16_candidate(p.cb, &g, 0, d_a, d_b, d_c);
            ck_assert_msg(n >= 1, "shape %zu form %d: no candidate", s, form);
            void *want = dtake_bytes(&p, d_c, nc, es);
            for (int i = 1; i < n; i++) {
                d_c = dput_bytes(&p, c0, nc, es);
                qkd__cuda_gemm_bf16_candidate(p.cb, &g, i, d_a, d_b, d_c);
                void *got = dtake_bytes(&p, d_c, nc, es);
                ck_assert_msg(memcmp(got, want, nc * es) == 0,
                              "shape %zu form %d: candidate %d's product differs", s, form, i);
                free(got);
            }
            d_c = dput_bytes(&p, c0, nc, es);
            for (int use = 0; use < 2; use++) { /* the first use plans and times */
                expect_ok(p.cc, p.cb->upload(p.cb, d_c, c0, nc * es), "upload");
                qkd__cuda_gemm_bf16(p.cb, &g, d_a, d_b, d_c, "gemm_candidates_agree");
                expect_ok(p.cc, p.cb->sync(p.cb), "planned product");
            }
            void *got = dtake_bytes(&p, d_c, nc, es);
            ck_assert_msg(memcmp(got, want, nc * es) == 0,
                          "shape %zu form %d: the planned product differs", s, form);
            for (int t = 0; t < 64; t++) { /* element (i, j) against double */
                const int i = (int)(test_rng_next(0, 1) * g.m), j = (int)(test_rng_next(0, 1) * g.n);
                const size_t at = (size_t)j * g.ldc + i;
                double sum = form == 1 ? c0[at] : 0.0, mag = fabs(sum);
                for (int k = 0; k < g.k; k++) {
                    const double x = an ? a[(size_t)k * g.lda + i] : a[(size_t)i * g.lda + k];
                    const double y = bn ? bv[(size_t)j * g.ldb + k] : bv[(size_t)k * g.ldb + j];
                    sum += x * y;
                    mag += fabs(x * y);
                }
                const double v = g.c16 ? qkd__bf16_to_f32(((uint16_t *)got)[at])
                                       : ((float *)got)[at];
                ck_assert_msg(fabs(v - sum) <= TOL_BF16_MM * mag + (g.c16 ? 0x1p-8 * fabs(sum) : 0),
                              "shape %zu form %d (%d, %d): %g, want %g", s, form, i, j, v, sum);
            }
            free(got); free(want); free(a); free(bv); free(c0); free(a16); free(b16);
            dfree(&p, (void *)d_a); dfree(&p, (void *)d_b);
        }
    }
    pair_close(&p);
}
END_TEST

/* The bf16-bits products, each operand given as bits or as fp32, equal
 * the bf16 products on the fp32 values those bits decode to, bit for bit:
 * the same operands reach the tensor cores. */
START_TEST(matmul_bf16_bits_equal_bf16)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    test_rng_seed(13);
    for (size_t s = 0; s < sizeof mm_shapes / sizeof mm_shapes[0]; s++) {
        const int N = mm_shapes[s][0], C = mm_shapes[s][1], OC = mm_shapes[s][2];
        const size_t nw = (size_t)OC * C, nx = (size_t)N * C, no = (size_t)N * OC;
        float *w = test_vec_rand(nw, -1, 1), *x = test_vec_rand(nx, -1, 1);
        float *dout = test_vec_rand(no, -1, 1), *dx0 = test_vec_rand(nx, -1, 1);
        float *dw0 = test_vec_rand(nw, -1, 1);
        uint16_t *w16 = bits_new(nw), *x16 = bits_new(nx), *g16 = bits_new(no);
        round_bf16(w, w16, nw);
        round_bf16(x, x16, nx);
        round_bf16(dout, g16, no);
        const uint16_t *d_w16 = dput_bytes(&p, w16, nw, sizeof *w16);
        const uint16_t *d_x16 = dput_bytes(&p, x16, nx, sizeof *x16);
        const uint16_t *d_g16 = dput_bytes(&p, g16, no, sizeof *g16);
        float *d_w = dput(&p, w, nw), *d_x = dput(&p, x, nx), *d_dout = dput(&p, dout, no);
        float *d_want = dpoison(&p, no), *d_dx = dput(&p, dx0, nx), *d_dw = dput(&p, dw0, nw);
        p.cb->matmul_forward_bf16(p.cb, d_want, d_x, d_w, N, C, OC);
        p.cb->matmul_backward_input_bf16(p.cb, d_dx, d_dout, d_w, N, C, OC);
        p.cb->matmul_backward_weight_bf16(p.cb, d_dw, d_dout, d_x, N, C, OC);
        float *zeros = test_vec_new(nx > nw ? nx : nw), *d_dx_only = dput(&p, zeros, nx);
        float *d_dw_only = dput(&p, zeros, nw);
        p.cb->matmul_backward_input_bf16(p.cb, d_dx_only, d_dout, d_w, N, C, OC);
        p.cb->matmul_backward_weight_bf16(p.cb, d_dw_only, d_dout, d_x, N, C, OC);
        float *want_dx_only = dtake(&p, d_dx_only, nx), *want_dw_only = dtake(&p, d_dw_only, nw);
        float *want = dtake(&p, d_want, no), *want_dx = dtake(&p, d_dx, nx);
        float *want_dw = dtake(&p, d_dw, nw);
        for (int form = 1; form < 8; form++) { /* as bits: 1 the input, 2 the weight, 4 dout */
            const qkd__bf16_in in = form & 1 ? (qkd__bf16_in){.bits = d_x16}
                                             : (qkd__bf16_in){.f32 = d_x};
            const qkd__bf16_in wt = form & 2 ? (qkd__bf16_in){.bits = d_w16}
                                             : (qkd__bf16_in){.f32 = d_w};
            const qkd__bf16_in go = form & 4 ? (qkd__bf16_in){.bits = d_g16}
                                             : (qkd__bf16_in){.f32 = d_dout};
            float *d_o = dpoison(&p, no);
            d_dx = dput(&p, dx0, nx);
            d_dw = dput(&p, dw0, nw);
            p.cb->matmul_forward_bf16_bits(p.cb, d_o, in, wt, N, C, OC);
            p.cb->matmul_backward_input_bf16_bits(p.cb, d_dx, go, wt, N, C, OC, 1);
            p.cb->matmul_backward_weight_bf16_bits(p.cb, d_dw, go, in, N, C, OC, 1);
            float *d_dxw = dpoison(&p, nx); /* accumulate 0 writes, reading no NaN */
            float *d_dww = dpoison(&p, nw);
            p.cb->matmul_backward_input_bf16_bits(p.cb, d_dxw, go, wt, N, C, OC, 0);
            p.cb->matmul_backward_weight_bf16_bits(p.cb, d_dww, go, in, N, C, OC, 0);
            float *o = dtake(&p, d_o, no), *dx = dtake(&p, d_dx, nx), *dw = dtake(&p, d_dw, nw);
            float *dxw = dtake(&p, d_dxw, nx), *dww = dtake(&p, d_dww, nw);
            assert_same("matmul_forward_bf16_bits", o, want, no);
            assert_same("matmul_backward_input_bf16_bits", dx, want_dx, nx);
            assert_same("matmul_backward_input_bf16_bits written", dxw, want_dx_only, nx);
            assert_same("matmul_backward_weight_bf16_bits", dw, want_dw, nw);
            assert_same("matmul_backward_weight_bf16_bits written", dww, want_dw_only, nw);
            free(o); free(dx); free(dw); free(dxw); free(dww);
        }
        free(w); free(x); free(dout); free(dx0); free(dw0); free(w16); free(x16); free(g16);
        free(want); free(want_dx); free(want_dw); free(zeros); free(want_dx_only);
        free(want_dw_only);
        dfree(&p, (void *)d_w16); dfree(&p, (void *)d_x16); dfree(&p, (void *)d_g16);
        dfree(&p, d_w); dfree(&p, d_x); dfree(&p, d_dout);
    }
    pair_close(&p);
}
END_TEST

/* A group of three linears for linears_backward_bf16_bits: N tokens, C
 * inputs, q's and k/v's outputs. */
static const int group_shapes[][4] = {
    {1, 1, 1, 1}, {2, 7, 7, 3}, {5, 33, 33, 17}, {37, 64, 64, 16}, {100, 130, 65, 20},
    {64, 288, 288, 96},
};

/* n values of h (elements of `bytes`) at device offsets at[0..3) of one
 * array of `total` elements, the rest NaN's bits: the three linears'
 * weights or weight gradients, stacked (at[i + 1] = at[i] + its size)
 * or apart. */
static void *dput_three(struct pair *p, void *const h[3], const size_t n[3], const size_t at[3],
                        size_t total, size_t bytes)
{
    char *all = malloc(total * bytes);
    ck_assert_ptr_nonnull(all);
    memset(all, 0xff, total * bytes);
    for (int i = 0; i < 3; i++)
        memcpy(all + at[i] * bytes, h[i], n[i] * bytes);
    void *d = dput_bytes(p, all, total, bytes);
    free(all);
    return d;
}

/* One group on the GPU against the reference's products linear by linear.
 * variant 0: weights and gradients stacked (one product each), one input
 * as bits, dx and dw written; 1: apart (a product a linear), one fp32
 * input, both added to; 2: weights stacked as fp32, each linear its own
 * input (weight gradients a product a linear), dx written, dw added to. */
static void group_case(struct pair *p, const int sh[4], int variant)
{
    qkd__backend *rb = p->rb, *cb = p->cb;
    const int N = sh[0], C = sh[1], OC[3] = {sh[2], sh[3], sh[3]}, ld = sh[2] + 2 * sh[3];
    const int acc_x = variant == 1, acc_w = variant != 0, apart = variant == 1;
    const size_t nx = (size_t)N * C, nd = (size_t)N * ld;
    size_t nw[3], at[3], total = 0;
    for (int i = 0; i < 3; i++) {
        nw[i] = (size_t)OC[i] * C;
        at[i] = total;
        total += nw[i] + (apart ? 64 : 0); /* apart: a gap of NaN */
    }
    /* dout in rows (bf16 values), and each linear's columns of it */
    float *dout = test_vec_rand(nd, -1, 1), *douti[3], *w[3], *x[3], *dw[3];
    uint16_t *dout16 = bits_new(nd), *w16[3];
    round_bf16(dout, dout16, nd);
    float *dx = test_vec_rand(nx, -1, 1), *zeros = test_vec_new(nx > total ? nx : total);
    float *s_out = test_vec_new(nd), *s_dx = test_vec_new(nx), *s_dw[3];
    uint16_t *x16 = bits_new(nx); /* x[0]'s bits, which variant 0 reads */
    for (int i = 0, col = 0; i < 3; col += OC[i++]) {
        douti[i] = test_vec_new((size_t)N * OC[i]);
        for (int t = 0; t < N; t++)
            memcpy(douti[i] + (size_t)t * OC[i], dout + (size_t)t * ld + col,
                   OC[i] * sizeof *dout);
        w[i] = test_vec_rand(nw[i], -1, 1);
        w16[i] = bits_new(nw[i]);
        round_bf16(w[i], w16[i], nw[i]);
        x[i] = i == 0 || variant == 2 ? test_vec_rand(nx, -1, 1) : x[0];
        if (i == 0)
            round_bf16(x[0], x16, nx);
        dw[i] = test_vec_rand(nw[i], -1, 1);
        s_dw[i] = test_vec_new(nw[i]);
        mm_scales(x[i], w[i], douti[i], i == 0 && acc_x ? dx : zeros, acc_w ? dw[i] : zeros,
                  N, C, OC[i], s_out, s_dx, s_dw[i]);
    }
    /* the GPU: weights as bits (variants 0, 1) or fp32 (2) */
    const int w_bits = variant != 2;
    uint16_t *d_dout = dput_bytes(p, dout16, nd, sizeof *dout16);
    void *d_w = w_bits ? dput_three(p, (void *const[3]){w16[0], w16[1], w16[2]}, nw, at, total,
                                    sizeof(uint16_t))
                       : dput_three(p, (void *const[3]){w[0], w[1], w[2]}, nw, at, total,
                                    sizeof(float));
    float *d_dw = dput_three(p, (void *const[3]){dw[0], dw[1], dw[2]}, nw, at, total,
                             sizeof(float));
    float *d_dx = acc_x ? dput(p, dx, nx) : dpoison(p, nx);
    float *d_x[3] = {NULL, NULL, NULL};
    uint16_t *d_x16 = variant == 0 ? dput_bytes(p, x16, nx, sizeof *x16) : NULL;
    for (int i = 0; i < 3; i++)
        d_x[i] = variant == 0 ? NULL : i == 0 || variant == 2 ? dput(p, x[i], nx) : d_x[0];
    qkd__bf16_linear lin[3];
    for (int i = 0; i < 3; i++)
        lin[i] = (qkd__bf16_linear){
            .w = w_bits ? (qkd__bf16_in){.bits = (uint16_t *)d_w + at[i]}
                        : qkd__bf16_f32((float *)d_w + at[i]),
            .x = d_x16 ? (qkd__bf16_in){.bits = d_x16} : qkd__bf16_f32(d_x[i]),
            .dw = d_dw + at[i],
            .OC = OC[i]};
    cb->linears_backward_bf16_bits(cb, d_dx, acc_x, d_dout, lin, 3, N, C, acc_w);
    /* the reference, linear by linear */
    for (int i = 0; i < 3; i++) {
        rb->matmul_backward_input_bf16_bits(rb, dx, qkd__bf16_f32(douti[i]),
                                            qkd__bf16_f32(w[i]), N, C, OC[i], i > 0 || acc_x);
        rb->matmul_backward_weight_bf16_bits(rb, dw[i], qkd__bf16_f32(douti[i]),
                                             qkd__bf16_f32(x[i]), N, C, OC[i], acc_w);
    }
    float *g_dx = dtake(p, d_dx, nx), *g_dw = dtake(p, d_dw, total);
    char what[96];
    snprintf(what, sizeof what, "linears_backward_bf16_bits dx (%d %d %d %d, variant %d)", N, C,
             OC[0], OC[1], variant);
    assert_close_scaled(what, g_dx, dx, s_dx, nx, TOL_BF16_MM);
    for (int i = 0; i < 3; i++) {
        snprintf(what, sizeof what, "linears_backward_bf16_bits dw%d (%d %d %d %d, variant %d)",
                 i, N, C, OC[0], OC[1], variant);
        assert_close_scaled(what, g_dw + at[i], dw[i], s_dw[i], nw[i], TOL_BF16_MM);
    }
    if (apart) /* the gaps between them untouched */
        for (int i = 0; i < 3; i++)
            for (size_t e = at[i] + nw[i]; e < (i < 2 ? at[i + 1] : total); e++)
                ck_assert_msg(isnan(g_dw[e]), "linears_backward_bf16_bits wrote a gap");
    for (int i = 0; i < 3; i++) {
        free(douti[i]); free(w[i]); free(w16[i]); free(dw[i]); free(s_dw[i]);
        if (i == 0 || variant == 2)
            free(x[i]);
        if (d_x[i] && (i == 0 || variant == 2))
            dfree(p, d_x[i]);
    }
    free(dout); free(dout16); free(dx); free(zeros); free(s_out); free(s_dx); free(x16);
    free(g_dx); free(g_dw);
    dfree(p, d_dout); dfree(p, d_w);
    if (d_x16)
        dfree(p, d_x16);
}

/* linears_backward_bf16_bits (q, k and v's gradient products as a group)
 * matches the reference's products linear by linear: stacked or apart,
 * weights as bits or fp32, one input or one each, written or added to. */
START_TEST(linears_backward_matches_ref)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    test_rng_seed(14);
    for (size_t s = 0; s < sizeof group_shapes / sizeof group_shapes[0]; s++)
        for (int variant = 0; variant < 3; variant++)
            group_case(&p, group_shapes[s], variant);
    pair_close(&p);
}
END_TEST

/* The producers' bf16-bits forms write exactly their fp32 outputs rounded
 * to bf16 (the SwiGLU backward's: into zeroed gradients): RMSNorm on its
 * shapes, SwiGLU on and off the vector boundary. The fused residual add
 * and RMSNorm writes exactly what `add` and the bits RMSNorm write; the
 * RMSNorm backward with bits adds exactly what the plain one adds. */
static void assert_bits_of(const char *what, const uint16_t *d_bits, const float *d_f32,
                           size_t n, struct pair *p)
{
    uint16_t *bits = bits_new(n);
    float *f = test_vec_new(n);
    expect_ok(p->cc, p->cb->sync(p->cb), "sync");
    expect_ok(p->cc, p->cb->download(p->cb, bits, d_bits, n * sizeof *bits), "download");
    expect_ok(p->cc, p->cb->download(p->cb, f, d_f32, n * sizeof *f), "download");
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(bits[i] == qkd__f32_to_bf16(f[i]), "%s [%zu]: bits 0x%04x, fp32 %.9g", what,
                      i, bits[i], (double)f[i]);
    free(bits);
    free(f);
}

START_TEST(bf16_bits_producers_round_fp32)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    /* widths of one column to 1,024 float4s: a lane's loop over a row
     * runs once or several times, with a partial last step */
    static const int shapes[][2] = {{1, 1},     {3, 7},    {33, 64}, {130, 1000},
                                    {7, 1100}, {9, 2048}, {5, 4096}};
    test_rng_seed(22);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int N = shapes[s][0], C = shapes[s][1];
        const size_t nc = (size_t)N * C;
        float *x = test_vec_rand(nc, -2, 2), *w = test_vec_rand((size_t)C, 0.5, 1.5);
        uint16_t *poison = bits_new(nc);
        memset(poison, 0xff, nc * sizeof *poison);
        float *d_x = dput(&p, x, nc), *d_w = dput(&p, w, (size_t)C), *d_y = dpoison(&p, nc);
        float *d_r = dpoison(&p, (size_t)N), *d_r16 = dpoison(&p, (size_t)N);
        uint16_t *d_y16 = dput_bytes(&p, poison, nc, sizeof *poison);
        p.cb->rmsnorm_forward(p.cb, d_y, d_r, d_x, d_w, N, C, 1e-5f);
        p.cb->rmsnorm_forward_bf16_bits(p.cb, d_y16, d_r16, d_x, d_w, N, C, 1e-5f);
        assert_bits_of("rmsnorm_forward_bf16_bits", d_y16, d_y, nc, &p);
        float *r = dtake(&p, d_r, (size_t)N), *r16 = dtake(&p, d_r16, (size_t)N);
        assert_same("rmsnorm_forward_bf16_bits rstd", r16, r, (size_t)N);
        float *y = test_vec_rand(nc, -2, 2);
        uint16_t *y16 = bits_new(nc);
        round_bf16(y, y16, nc); /* the fused add reads y's bits, `add` their values */
        float *d_yy = dput(&p, y, nc), *d_s = dpoison(&p, nc), *d_sf = dpoison(&p, nc);
        uint16_t *d_yb = dput_bytes(&p, y16, nc, sizeof *y16);
        float *d_ra = dpoison(&p, (size_t)N), *d_rf = dpoison(&p, (size_t)N);
        uint16_t *d_b = dput_bytes(&p, poison, nc, sizeof *poison);
        uint16_t *d_bf = dput_bytes(&p, poison, nc, sizeof *poison);
        p.cb->add(p.cb, d_s, d_x, d_yy, nc);
        p.cb->rmsnorm_forward_bf16_bits(p.cb, d_b, d_ra, d_s, d_w, N, C, 1e-5f);
        p.cb->add_rmsnorm_forward_bf16_bits(p.cb, d_sf, d_bf, d_rf, d_x, d_yb, d_w, N, C, 1e-5f);
        float *s = dtake(&p, d_s, nc), *sf = dtake(&p, d_sf, nc);
        float *ra = dtake(&p, d_ra, (size_t)N), *rf = dtake(&p, d_rf, (size_t)N);
        uint16_t *b = bits_new(nc), *bf = bits_new(nc);
        expect_ok(p.cc, p.cb->download(p.cb, b, d_b, nc * sizeof *b), "download");
        expect_ok(p.cc, p.cb->download(p.cb, bf, d_bf, nc * sizeof *bf), "download");
        for (size_t i = 0; i < nc; i++)
            ck_assert_float_eq(s[i], x[i] + y[i]);
        assert_same("add_rmsnorm_forward_bf16_bits sum", sf, s, nc);
        ck_assert_mem_eq(bf, b, nc * sizeof *b);
        assert_same("add_rmsnorm_forward_bf16_bits rstd", rf, ra, (size_t)N);
        free(y); free(y16); free(s); free(sf); free(ra); free(rf); free(b); free(bf);
        dfree(&p, d_yy); dfree(&p, d_yb); dfree(&p, d_b); dfree(&p, d_bf);
        float *g = test_vec_rand(nc, -1, 1), *dx0 = test_vec_rand(nc, -1, 1);
        float *dw0 = test_vec_rand((size_t)C, -1, 1), *d_g = dput(&p, g, nc);
        float *d_r2 = dput(&p, r, (size_t)N);
        float *d_dx = dput(&p, dx0, nc), *d_dxb = dput(&p, dx0, nc);
        float *d_dw = dput(&p, dw0, (size_t)C), *d_dwb = dput(&p, dw0, (size_t)C);
        uint16_t *d_dx16 = dput_bytes(&p, poison, nc, sizeof *poison);
        p.cb->rmsnorm_backward(p.cb, d_dx, d_dw, d_g, d_x, d_w, d_r2, N, C);
        p.cb->rmsnorm_backward_bf16_bits(p.cb, d_dxb, d_dx16, d_dwb, d_g, d_x, d_w, d_r2, N, C);
        assert_bits_of("rmsnorm_backward_bf16_bits dinp_bits", d_dx16, d_dxb, nc, &p);
        float *dx = dtake(&p, d_dx, nc), *dxb = dtake(&p, d_dxb, nc);
        float *dw = dtake(&p, d_dw, (size_t)C), *dwb = dtake(&p, d_dwb, (size_t)C);
        assert_same("rmsnorm_backward_bf16_bits dinp", dxb, dx, nc);
        assert_same("rmsnorm_backward_bf16_bits dw", dwb, dw, (size_t)C);
        free(g); free(dx0); free(dw0); free(dx); free(dxb); free(dw); free(dwb);
        dfree(&p, d_g); dfree(&p, d_r2); dfree(&p, d_dx16);
        free(x); free(w); free(poison); free(r); free(r16);
        dfree(&p, d_x); dfree(&p, d_w); dfree(&p, d_y); dfree(&p, d_y16);
    }
    for (size_t s = 0; s < 2 * sizeof elem_sizes / sizeof elem_sizes[0]; s++) {
        const size_t off = s % 2, n = elem_sizes[s / 2];
        /* SwiGLU's inputs as bits (off the vector boundary with off) against
         * the values they decode to as floats */
        float *gate = test_vec_rand(n, -12, 12), *up = test_vec_rand(n, -2, 2);
        float *g = test_vec_rand(n, -1, 1), *zeros = test_vec_new(n);
        uint16_t *gate16 = bits_new(n + off), *up16 = bits_new(n + off), *g16 = bits_new(n + off);
        round_bf16(gate, gate16 + off, n);
        round_bf16(up, up16 + off, n);
        round_bf16(g, g16 + off, n);
        uint16_t *poison = bits_new(n + off);
        memset(poison, 0xff, (n + off) * sizeof *poison);
        float *d_gate = dput(&p, gate, n), *d_up = dput(&p, up, n), *d_g = dput(&p, g, n);
        uint16_t *d_gate16 = dput_bytes(&p, gate16, n + off, sizeof *gate16);
        uint16_t *d_up16 = dput_bytes(&p, up16, n + off, sizeof *up16);
        uint16_t *d_g16 = dput_bytes(&p, g16, n + off, sizeof *g16);
        float *d_o = dpoison(&p, n), *d_dg = dput(&p, zeros, n), *d_du = dput(&p, zeros, n);
        uint16_t *d_o16 = dput_bytes(&p, poison, n + off, sizeof *poison);
        uint16_t *d_dg16 = dput_bytes(&p, poison, n + off, sizeof *poison);
        uint16_t *d_du16 = dput_bytes(&p, poison, n + off, sizeof *poison);
        p.cb->swiglu_forward(p.cb, d_o, d_gate, d_up, n);
        p.cb->swiglu_forward_bf16_bits(p.cb, d_o16 + off, d_gate16 + off, d_up16 + off, n);
        p.cb->swiglu_backward(p.cb, d_dg, d_du, d_g, d_gate, d_up, n);
        p.cb->swiglu_backward_bf16_bits(p.cb, d_dg16 + off, d_du16 + off, n, NULL, d_g16 + off,
                                        d_gate16 + off, d_up16 + off, 1, n);
        assert_bits_of("swiglu_forward_bf16_bits", d_o16 + off, d_o, n, &p);
        assert_bits_of("swiglu_backward_bf16_bits dgate", d_dg16 + off, d_dg, n, &p);
        assert_bits_of("swiglu_backward_bf16_bits dup", d_du16 + off, d_du, n, &p);
        /* in rows (linears_backward_bf16_bits's layout): a row of dgate,
         * then its row of dup; and the forward's output again, bit for bit */
        const size_t cols = n % 5 == 0 ? n / 5 : n, rows = n / cols;
        uint16_t *got_rows = bits_new(2 * n);
        memset(got_rows, 0xff, 2 * n * sizeof *got_rows);
        uint16_t *d_rows = dput_bytes(&p, got_rows, 2 * n, sizeof *got_rows);
        uint16_t *d_again = dput_bytes(&p, poison, n + off, sizeof *poison);
        p.cb->swiglu_backward_bf16_bits(p.cb, d_rows, d_rows + cols, 2 * cols, d_again + off,
                                        d_g16 + off, d_gate16 + off, d_up16 + off, rows, cols);
        uint16_t *again = dtake_bytes(&p, d_again, n + off, sizeof *again);
        uint16_t *fwd = bits_new(n + off);
        expect_ok(p.cc, p.cb->download(p.cb, fwd, d_o16, (n + off) * sizeof *fwd), "download");
        ck_assert_msg(memcmp(again + off, fwd + off, n * sizeof *fwd) == 0,
                      "swiglu_backward_bf16_bits: the forward's output again (n %zu)", n);
        free(again); free(fwd);
        free(got_rows);
        got_rows = dtake_bytes(&p, d_rows, 2 * n, sizeof *got_rows);
        float *want_dg = test_vec_new(n), *want_du = test_vec_new(n);
        expect_ok(p.cc, p.cb->download(p.cb, want_dg, d_dg, n * sizeof *want_dg), "download");
        expect_ok(p.cc, p.cb->download(p.cb, want_du, d_du, n * sizeof *want_du), "download");
        for (size_t i = 0; i < n; i++) {
            const size_t at = i / cols * 2 * cols + i % cols;
            ck_assert_msg(got_rows[at] == qkd__f32_to_bf16(want_dg[i]) &&
                              got_rows[at + cols] == qkd__f32_to_bf16(want_du[i]),
                          "swiglu_backward_bf16_bits in rows [%zu]", i);
        }
        free(got_rows); free(want_dg); free(want_du);
        /* to_bf16_bits, special values first: NaN, infinity, -0, a subnormal */
        static const float special[] = {NAN, -INFINITY, -0.0f, 0x1.ff8p-130f};
        memcpy(up, special, (n < 4 ? n : 4) * sizeof *up);
        float *d_x = dput_off(&p, up, n, off);
        uint16_t *d_x16 = dput_bytes(&p, poison, n + off, sizeof *poison);
        p.cb->to_bf16_bits(p.cb, d_x16 + off, d_x, n);
        assert_bits_of("to_bf16_bits", d_x16 + off, d_x, n, &p);
        /* round_to_bf16: in place, the values of to_bf16_bits's bits */
        p.cb->round_to_bf16(p.cb, d_x, n);
        float *rounded = dtake_off(&p, d_x, n, off);
        for (size_t i = 0; i < n; i++) {
            const float want = qkd__bf16_round(up[i]);
            ck_assert_msg(memcmp(&rounded[i], &want, sizeof want) == 0,
                          "round_to_bf16 [%zu]: %.9g, want %.9g", i, (double)rounded[i],
                          (double)want);
        }
        dfree(&p, d_x16);
        free(gate); free(up); free(g); free(zeros); free(poison); free(rounded);
        free(gate16); free(up16); free(g16);
        dfree(&p, d_gate); dfree(&p, d_up); dfree(&p, d_g);
        dfree(&p, d_gate16); dfree(&p, d_up16); dfree(&p, d_g16);
        dfree(&p, d_o); dfree(&p, d_dg); dfree(&p, d_du);
        dfree(&p, d_o16); dfree(&p, d_dg16); dfree(&p, d_du16);
    }
    pair_close(&p);
}
END_TEST

/* The backend keeps the bf16 copy of a product's activation operand for
 * the next product reading the same tensor: a kernel or an upload that
 * writes the tensor in between must be seen. */
START_TEST(matmul_bf16_sees_writes)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    test_rng_seed(13);
    const int N = 33, C = 40, OC = 24;
    float *x = test_vec_rand((size_t)N * C, -1, 1), *w = test_vec_rand((size_t)OC * C, -1, 1);
    float *x2 = test_vec_rand((size_t)N * C, -1, 1), *want = test_vec_new((size_t)N * OC);
    float *d_x = dput(&p, x, (size_t)N * C), *d_w = dput(&p, w, (size_t)OC * C);
    float *d_o1 = dpoison(&p, (size_t)N * OC), *d_o2 = dpoison(&p, (size_t)N * OC);
    float *d_o3 = dpoison(&p, (size_t)N * OC);
    p.cb->matmul_forward_bf16(p.cb, d_o1, d_x, d_w, N, C, OC);
    p.cb->scale(p.cb, d_x, 2.0f, (size_t)N * C); /* a kernel writes x */
    p.cb->matmul_forward_bf16(p.cb, d_o2, d_x, d_w, N, C, OC);
    expect_ok(p.cc, p.cb->upload(p.cb, d_x, x2, (size_t)N * C * sizeof *x2), "upload");
    p.cb->matmul_forward_bf16(p.cb, d_o3, d_x, d_w, N, C, OC);
    float *o1 = dtake(&p, d_o1, (size_t)N * OC), *o2 = dtake(&p, d_o2, (size_t)N * OC);
    float *o3 = dtake(&p, d_o3, (size_t)N * OC);
    for (size_t i = 0; i < (size_t)N * OC; i++) /* bf16(2x) is 2 bf16(x): exact */
        ck_assert_msg(o2[i] == 2.0f * o1[i], "after scale [%zu]: %.9g, want %.9g", i,
                      (double)o2[i], 2.0 * o1[i]);
    p.rb->matmul_forward_bf16(p.rb, want, x2, w, N, C, OC);
    test_assert_close_tensor("after upload", o3, want, (size_t)N * OC, TOL_BF16_MM);
    /* A weight gradient's input keeps its copy across a product that
     * writes elsewhere (q, k and v of one input), not across one that
     * writes the input itself. */
    const size_t nx = (size_t)N * C, ng = (size_t)N * OC, nw = (size_t)OC * C;
    float *g = test_vec_rand(ng, -1, 1), *d_g = dput(&p, g, ng), *d_y = dpoison(&p, nx);
    float *d_dw[3], *dw[3], *x3 = test_vec_new(nx), *want_dw = test_vec_new(nw);
    for (int k = 0; k < 3; k++)
        d_dw[k] = dput(&p, want_dw, nw); /* zeros */
    p.cb->fill(p.cb, d_y, 0.0f, nx);
    p.cb->matmul_backward_weight_bf16(p.cb, d_dw[0], d_g, d_x, N, C, OC);
    p.cb->matmul_backward_input_bf16(p.cb, d_y, d_g, d_w, N, C, OC);
    p.cb->matmul_backward_weight_bf16(p.cb, d_dw[1], d_g, d_x, N, C, OC);
    p.cb->matmul_backward_input_bf16(p.cb, d_x, d_g, d_w, N, C, OC); /* x += g w */
    p.cb->matmul_backward_weight_bf16(p.cb, d_dw[2], d_g, d_x, N, C, OC);
    expect_ok(p.cc, p.cb->download(p.cb, x3, d_x, nx * sizeof *x3), "download");
    for (int k = 0; k < 3; k++)
        dw[k] = dtake(&p, d_dw[k], nw);
    p.rb->matmul_backward_weight_bf16(p.rb, want_dw, g, x2, N, C, OC);
    test_assert_close_tensor("weight gradient", dw[0], want_dw, nw, TOL_BF16_MM);
    assert_same("weight gradient after a product elsewhere", dw[1], dw[0], nw);
    memset(want_dw, 0, nw * sizeof *want_dw);
    p.rb->matmul_backward_weight_bf16(p.rb, want_dw, g, x3, N, C, OC);
    test_assert_close_tensor("weight gradient after a product into its input", dw[2], want_dw, nw,
                        TOL_BF16_MM);
    free(x); free(w); free(x2); free(want); free(o1); free(o2); free(o3);
    free(g); free(x3); free(want_dw);
    for (int k = 0; k < 3; k++)
        free(dw[k]);
    dfree(&p, d_x); dfree(&p, d_w); dfree(&p, d_g); dfree(&p, d_y);
    pair_close(&p);
}
END_TEST

/* ---- embedding, RMSNorm, RoPE --------------------------------------------------------------- */

START_TEST(embedding_equals_ref)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    /* {N, C, V}: repeats (N > V), rows wider than a block, a large vocabulary */
    static const int shapes[][3] = {{1, 1, 1}, {9, 7, 5},          {300, 64, 37},
                                    {1000, 33, 2000}, {4096, 300, 61}, {2000, 40, 100000}};
    test_rng_seed(13);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s][0], C = shapes[s][1], V = shapes[s][2];
        size_t nt = (size_t)V * C, no = (size_t)N * C;
        int32_t *ids = ids_rand((size_t)N, V, 0); /* repeats: N > V for some */
        float *table = test_vec_rand(nt, -1, 1), *dout = test_vec_rand(no, -1, 1), *out = test_vec_new(no);
        float *dtable = test_vec_rand(nt, -1, 1);
        int32_t *d_ids = dput_ids(&p, ids, (size_t)N);
        float *d_table = dput(&p, table, nt), *d_dout = dput(&p, dout, no);
        float *d_out = dpoison(&p, no), *d_dtable = dput(&p, dtable, nt);
        p.rb->embedding_forward(p.rb, out, ids, table, N, C);
        p.rb->embedding_backward(p.rb, dtable, dout, ids, N, C, V);
        p.cb->embedding_forward(p.cb, d_out, d_ids, d_table, N, C);
        p.cb->embedding_backward(p.cb, d_dtable, d_dout, d_ids, N, C, V);
        float *g_out = dtake(&p, d_out, no), *g_dtable = dtake(&p, d_dtable, nt);
        assert_same("embedding_forward", g_out, out, no);
        assert_same("embedding_backward", g_dtable, dtable, nt);
        free(ids); free(table); free(dout); free(out); free(dtable); free(g_out); free(g_dtable);
        dfree(&p, d_ids); dfree(&p, d_table); dfree(&p, d_dout);
    }
    pair_close(&p);
}
END_TEST

START_TEST(rmsnorm_matches_ref)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    static const int shapes[][2] = {{1, 1}, {3, 7}, {5, 16}, {33, 64}, {7, 67}, {200, 288},
                                    {130, 1000}, {9, 2048}};
    test_rng_seed(21);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s][0], C = shapes[s][1];
        size_t nc = (size_t)N * C;
        float *x = test_vec_rand(nc, -2, 2), *w = test_vec_rand((size_t)C, 0.5, 1.5);
        float *g = test_vec_rand(nc, -1, 1), *dx = test_vec_rand(nc, -1, 1), *dw = test_vec_rand((size_t)C, -1, 1);
        float *y = test_vec_new(nc), *r = test_vec_new((size_t)N);
        float *d_x = dput(&p, x, nc), *d_w = dput(&p, w, (size_t)C), *d_g = dput(&p, g, nc);
        float *d_dx = dput(&p, dx, nc), *d_dw = dput(&p, dw, (size_t)C);
        float *d_y = dpoison(&p, nc), *d_r = dpoison(&p, (size_t)N);
        p.rb->rmsnorm_forward(p.rb, y, r, x, w, N, C, 1e-5f);
        p.rb->rmsnorm_backward(p.rb, dx, dw, g, x, w, r, N, C);
        p.cb->rmsnorm_forward(p.cb, d_y, d_r, d_x, d_w, N, C, 1e-5f);
        p.cb->rmsnorm_backward(p.cb, d_dx, d_dw, d_g, d_x, d_w, d_r, N, C);
        float *g_y = dtake(&p, d_y, nc), *g_r = dtake(&p, d_r, (size_t)N);
        float *g_dx = dtake(&p, d_dx, nc), *g_dw = dtake(&p, d_dw, (size_t)C);
        assert_close_rows("rmsnorm_forward", g_y, y, (size_t)N, (size_t)C, TOL_DOUBLE);
        assert_close_rows("rmsnorm rstd", g_r, r, (size_t)N, 1, TOL_DOUBLE);
        assert_close_rows("rmsnorm_backward dinp", g_dx, dx, (size_t)N, (size_t)C, TOL_DOUBLE);
        assert_close_rows("rmsnorm_backward dw", g_dw, dw, 1, (size_t)C, TOL_DOUBLE);
        free(x); free(w); free(g); free(dx); free(dw); free(y); free(r);
        free(g_y); free(g_r); free(g_dx); free(g_dw);
        dfree(&p, d_x); dfree(&p, d_w); dfree(&p, d_g);
    }
    pair_close(&p);
}
END_TEST

START_TEST(rope_matches_ref)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    static const int hds[] = {2, 7, 8, 34, 64};
    /* rising positions grow the CUDA backend's (cos, sin) table; far ones
     * check the angles (a float angle would be off by 4e-4 there) */
    static const int pos0s[] = {0, 17, 6000};
    test_rng_seed(31);
    for (size_t hi = 0; hi < sizeof hds / sizeof hds[0]; hi++)
        for (size_t pi = 0; pi < sizeof pos0s / sizeof pos0s[0]; pi++)
            for (int dir = 0; dir < 2; dir++) {
                int B = 2, T = 5, H = 3, hd = hds[hi];
                float theta = hi % 2 ? 500.0f : 10000.0f; /* a change rebuilds the table */
                size_t n = (size_t)B * T * H * hd;
                float *x = test_vec_rand(n, -1, 1);
                float *d = dput(&p, x, n);
                if (dir == 0) {
                    p.rb->rope_forward(p.rb, x, B, T, H, hd, pos0s[pi], theta);
                    p.cb->rope_forward(p.cb, d, B, T, H, hd, pos0s[pi], theta);
                } else {
                    p.rb->rope_backward(p.rb, x, B, T, H, hd, pos0s[pi], theta);
                    p.cb->rope_backward(p.cb, d, B, T, H, hd, pos0s[pi], theta);
                }
                float *got = dtake(&p, d, n);
                assert_close_rows(dir ? "rope_backward" : "rope_forward", got, x, n / hd,
                                  (size_t)hd, TOL_DOUBLE);
                free(x); free(got);
            }
    pair_close(&p);
}
END_TEST

/* ---- attention --------------------------------------------------------------------------------- */

struct attn_shape {
    int B, Tq, pos0, kv_len, n_heads, n_kv, hd;
};

/* Training shapes (pos0 0, kv_len Tq: forward and backward) and decoding
 * ones (forward only); odd head sizes (each padded size of the kernels:
 * 16, 32, 64, 128, 256), grouped heads, sequences of several tiles (head
 * size 64 on Hopper: the warpgroup forward, the last one with keys past
 * its queries' last). */
static const struct attn_shape attn_shapes[] = {
    {1, 1, 0, 1, 1, 1, 1},       {2, 5, 0, 5, 2, 1, 8},      {1, 17, 0, 17, 4, 2, 5},
    {2, 33, 0, 33, 6, 6, 48},    {1, 40, 0, 40, 8, 4, 17},   {3, 130, 0, 130, 9, 3, 64},
    {1, 1, 9, 10, 8, 4, 8},      {2, 3, 30, 40, 6, 3, 48},   {1, 300, 0, 300, 6, 2, 64},
    {2, 70, 0, 70, 4, 2, 100},   {1, 45, 0, 45, 2, 1, 256},  {1, 2, 70, 80, 4, 1, 128},
    {2, 70, 200, 277, 4, 2, 64},
};

/* x rounded to bf16, nearest even (finite x), by its bits: written apart
 * from the library so the test does not check it against itself. */
static float bf16_round(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&x, &u, sizeof x);
    return x;
}

static float *vec_bf16(const float *x, size_t n)
{
    float *y = test_vec_new(n);
    for (size_t i = 0; i < n; i++)
        y[i] = bf16_round(x[i]);
    return y;
}

/* The precision of a case: fp32, or bf16 with RoPE inside at theta
 * (0: none). */
struct attn_prec {
    int bf16;
    float theta;
};

/* Both backends' attention_forward (_bf16) on the host or device buffers;
 * o_bits: the bf16 form's output bits too (or NULL). */
static void attn_forward(qkd__backend *be, struct attn_prec pr, float *o, uint16_t *o_bits,
                         float *scratch, const float *q, const float *k, const float *v,
                         const struct attn_shape *a)
{
    if (pr.bf16)
        be->attention_forward_bf16(be, o, o_bits, scratch, q, k, v, a->B, a->Tq, a->pos0,
                                   a->kv_len, a->n_heads, a->n_kv, a->hd, pr.theta);
    else
        be->attention_forward(be, o, scratch, q, k, v, a->B, a->Tq, a->pos0, a->kv_len,
                              a->n_heads, a->n_kv, a->hd);
}

/* dqkv_bits: the bf16 form's gradients as bits instead (or NULL). */
static void attn_backward(qkd__backend *be, struct attn_prec pr, float *dq, float *dk,
                          float *dv, uint16_t *dqkv_bits, const float *dout, float *scratch,
                          const float *q, const float *k, const float *v, const float *o,
                          const struct attn_shape *a)
{
    if (pr.bf16)
        be->attention_backward_bf16(be, dq, dk, dv, dout, scratch, q, k, v, qkd__bf16_f32(o),
                                    a->B, a->Tq, a->n_heads, a->n_kv, a->hd, pr.theta,
                                    dqkv_bits);
    else
        be->attention_backward(be, dq, dk, dv, dout, scratch, q, k, v, o, a->B, a->Tq,
                               a->n_heads, a->n_kv, a->hd);
}

/* q and k as the bf16 products read them: rotated by the reference's own
 * rope_forward where the case applies RoPE, then rounded. */
static void attn_product_qk(qkd__backend *rb, struct attn_prec pr, const struct attn_shape *a,
                            const float *q, const float *k, size_t nq, size_t nkv, float **qr,
                            float **kr)
{
    *qr = vec_bf16(q, nq);
    *kr = vec_bf16(k, nkv);
    if (!(pr.theta > 0.0f))
        return;
    memcpy(*qr, q, nq * sizeof *q);
    memcpy(*kr, k, nkv * sizeof *k);
    rb->rope_forward(rb, *qr, a->B, a->Tq, a->n_heads, a->hd, a->pos0, pr.theta);
    rb->rope_forward(rb, *kr, a->B, a->kv_len, a->n_kv, a->hd, 0, pr.theta);
    for (size_t i = 0; i < nq; i++)
        (*qr)[i] = bf16_round((*qr)[i]);
    for (size_t i = 0; i < nkv; i++)
        (*kr)[i] = bf16_round((*kr)[i]);
}

/* The bf16 backward's gradients: within tol of the larger of the
 * tensor's largest magnitude and 1, the scale of the inputs. Without the
 * floor, a gradient that is all rounding (one key: dS = p (dout . v -
 * dout . out), exactly 0 unrounded) would be measured against itself,
 * and a bf16 rounding of dS that the order flips is 2^-8 of it. */
static void assert_close_grad(const char *what, const float *got, const float *want, size_t n)
{
    double mag = 1.0, err = 0.0;
    for (size_t i = 0; i < n; i++) {
        ck_assert_msg(isfinite(got[i]), "%s[%zu] = %g", what, i, (double)got[i]);
        mag = fmax(mag, fabs(want[i]));
        err = fmax(err, fabs((double)got[i] - want[i]));
    }
    ck_assert_msg(err <= TOL_BF16_ATT * mag, "%s: max error %.3g > %.3g * %.3g", what, err,
                  TOL_BF16_ATT, mag);
}

/* One shape on both backends, in fp32 or bf16. In bf16 the CUDA forward
 * rounds the probabilities before normalising them (attention_bf16.cu),
 * so its output is within 2^-8 sum p |v| <= 2^-8 (|v| <= 1) of the
 * reference's, plus float noise; both backwards then read the
 * reference's output, and differ only in accumulation order and the
 * rare bf16 rounding that order flips: 1e-3 of the tensor's largest
 * magnitude (an unrounded input or a wrong index is off by far more). */
static void attention_case(struct pair *p, const struct attn_shape *a, struct attn_prec pr)
{
    const int bf16 = pr.bf16;
    qkd__backend *rb = p->rb, *cb = p->cb;
    size_t nq = (size_t)a->B * a->Tq * a->n_heads * a->hd;
    size_t nkv = (size_t)a->B * a->kv_len * a->n_kv * a->hd;
    size_t np = rb->attention_scratch_floats(rb, a->B, a->Tq, a->kv_len, a->n_heads, a->n_kv,
                                            a->hd);
    /* the CUDA scratch leads with one logsumexp per query row (then the
     * bf16 copies the backward reads), not T x T */
    size_t nl = (size_t)a->B * a->n_heads * a->Tq;
    size_t ns =
        cb->attention_scratch_floats(cb, a->B, a->Tq, a->kv_len, a->n_heads, a->n_kv, a->hd);
    ck_assert_uint_ge(ns, nl);
    float *q = test_vec_rand(nq, -2, 2), *k = test_vec_rand(nkv, -2, 2), *v = test_vec_rand(nkv, -1, 1);
    float *o = test_vec_new(nq), *P = test_vec_new(np);
    float *d_q = dput(p, q, nq), *d_k = dput(p, k, nkv), *d_v = dput(p, v, nkv);
    float *d_o = dpoison(p, nq), *d_scr = dpoison(p, ns);
    /* the bf16 form writes its output's bits too, from a poisoned buffer */
    uint16_t *poison = bits_new(nq);
    memset(poison, 0xff, nq * sizeof *poison);
    uint16_t *d_o16 = bf16 ? dput_bytes(p, poison, nq, sizeof *poison) : NULL;
    attn_forward(rb, pr, o, NULL, P, q, k, v, a);
    attn_forward(cb, pr, d_o, d_o16, d_scr, d_q, d_k, d_v, a);
    if (bf16) {
        assert_bits_of("attention_forward_bf16 out_bits", d_o16, d_o, nq, p);
        /* out NULL: the bits alone, the same bits */
        uint16_t *d_only = dput_bytes(p, poison, nq, sizeof *poison);
        attn_forward(cb, pr, NULL, d_only, d_scr, d_q, d_k, d_v, a);
        uint16_t *got16 = dtake_bytes(p, d_only, nq, sizeof *got16);
        uint16_t *want16 = dtake_bytes(p, d_o16, nq, sizeof *want16);
        ck_assert_msg(memcmp(got16, want16, nq * sizeof *got16) == 0,
                      "attention_forward_bf16 with out NULL: other bits");
        free(got16); free(want16);
    }
    free(poison);
    float *g_o = dtake(p, d_o, nq), *g_lse = test_vec_new(nl);
    expect_ok(p->cc, cb->download(cb, g_lse, d_scr, nl * sizeof *g_lse), "download");
    if (a->pos0 == 0 && a->kv_len == a->Tq) {
        float *dout = test_vec_rand(nq, -1, 1), *dq = test_vec_rand(nq, -1, 1);
        float *dk = test_vec_rand(nkv, -1, 1), *dv = test_vec_rand(nkv, -1, 1);
        /* the fp32 backward adds to dq, dk, dv; the bf16 one writes them,
         * so its device buffers start as NaN */
        float *d_dout = dput(p, dout, nq);
        float *d_dq = bf16 ? dpoison(p, nq) : dput(p, dq, nq);
        float *d_dk = bf16 ? dpoison(p, nkv) : dput(p, dk, nkv);
        float *d_dv = bf16 ? dpoison(p, nkv) : dput(p, dv, nkv);
        /* the backward reads the forward's scratch */
        float *d_or = dput(p, o, nq);
        attn_backward(rb, pr, dq, dk, dv, NULL, dout, P, q, k, v, o, a);
        attn_backward(cb, pr, d_dq, d_dk, d_dv, NULL, d_dout, d_scr, d_q, d_k, d_v, d_or, a);
        float *g_dq = dtake(p, d_dq, nq), *g_dk = dtake(p, d_dk, nkv);
        float *g_dv = dtake(p, d_dv, nkv);
        if (bf16) {
            assert_close_grad("attention_backward_bf16 dq", g_dq, dq, nq);
            assert_close_grad("attention_backward_bf16 dk", g_dk, dk, nkv);
            assert_close_grad("attention_backward_bf16 dv", g_dv, dv, nkv);
            /* as bits instead: the same values rounded, in rows (the
             * backend has linears_backward_bf16_bits): a token's dq, dk,
             * then dv */
            ck_assert_ptr_nonnull(cb->linears_backward_bf16_bits);
            const size_t nb = nq + 2 * nkv, cq = (size_t)a->n_heads * a->hd;
            const size_t ckv = (size_t)a->n_kv * a->hd, ld = cq + 2 * ckv;
            uint16_t *bits = bits_new(nb);
            memset(bits, 0xff, nb * sizeof *bits);
            uint16_t *d_bits = dput_bytes(p, bits, nb, sizeof *bits);
            attn_backward(cb, pr, NULL, NULL, NULL, d_bits, d_dout, d_scr, d_q, d_k, d_v, d_or,
                          a);
            expect_ok(p->cc, cb->sync(cb), "sync");
            expect_ok(p->cc, cb->download(cb, bits, d_bits, nb * sizeof *bits), "download");
            for (size_t i = 0; i < nb; i++) {
                const size_t t = i / ld, c = i % ld;
                const float f = c < cq         ? g_dq[t * cq + c]
                                : c < cq + ckv ? g_dk[t * ckv + c - cq]
                                               : g_dv[t * ckv + c - cq - ckv];
                ck_assert_msg(bits[i] == qkd__f32_to_bf16(f), "dqkv_bits[%zu]: 0x%04x, fp32 %.9g",
                              i, bits[i], (double)f);
            }
            free(bits);
            dfree(p, d_bits);
            /* out given as its bits (as a bf16-bits model keeps it): the
             * backward of the values they decode to, bit for bit */
            uint16_t *o16 = bits_new(nq);
            float *orr = test_vec_new(nq);
            memcpy(orr, g_o, nq * sizeof *orr);
            round_bf16(orr, o16, nq);
            uint16_t *d_o16b = dput_bytes(p, o16, nq, sizeof *o16);
            float *d_orr = dput(p, orr, nq), *d_qa = dpoison(p, nq), *d_qb = dpoison(p, nq);
            float *d_kk = dpoison(p, nkv), *d_vv = dpoison(p, nkv);
            cb->attention_backward_bf16(cb, d_qa, d_kk, d_vv, d_dout, d_scr, d_q, d_k, d_v,
                                        qkd__bf16_f32(d_orr), a->B, a->Tq, a->n_heads, a->n_kv,
                                        a->hd, pr.theta, NULL);
            cb->attention_backward_bf16(cb, d_qb, d_kk, d_vv, d_dout, d_scr, d_q, d_k, d_v,
                                        (qkd__bf16_in){.bits = d_o16b}, a->B, a->Tq, a->n_heads,
                                        a->n_kv, a->hd, pr.theta, NULL);
            float *g_qa = dtake(p, d_qa, nq), *g_qb = dtake(p, d_qb, nq);
            assert_same("attention_backward_bf16 with out as bits", g_qb, g_qa, nq);
            free(o16); free(orr); free(g_qa); free(g_qb);
            dfree(p, d_o16b); dfree(p, d_orr); dfree(p, d_kk); dfree(p, d_vv);
        } else {
            assert_close_rows("attention_backward dq", g_dq, dq, nq / a->hd, (size_t)a->hd,
                              TOL_FLOAT);
            assert_close_rows("attention_backward dk", g_dk, dk, nkv / a->hd, (size_t)a->hd,
                              TOL_FLOAT);
            assert_close_rows("attention_backward dv", g_dv, dv, nkv / a->hd, (size_t)a->hd,
                              TOL_FLOAT);
        }
        free(dout); free(dq); free(dk); free(dv); free(g_dq); free(g_dk); free(g_dv);
        dfree(p, d_dout); dfree(p, d_or);
    }
    if (bf16) {
        float *qr, *kr;
        attn_product_qk(rb, pr, a, q, k, nq, nkv, &qr, &kr);
        assert_close_floor("attention_forward_bf16 out", g_o, o, nq, TOL_BF16_ATT_OUT);
        assert_attention_lse("cuda", g_lse, qr, kr, a->B, a->Tq, a->pos0, a->kv_len,
                             a->n_heads, a->n_kv, a->hd, TOL_FLOAT);
        free(qr); free(kr);
    } else {
        assert_close_rows("attention_forward out", g_o, o, nq / a->hd, (size_t)a->hd, TOL_FLOAT);
        assert_attention_lse("cuda", g_lse, q, k, a->B, a->Tq, a->pos0, a->kv_len, a->n_heads,
                             a->n_kv, a->hd, TOL_FLOAT);
    }
    free(q); free(k); free(v); free(o); free(P); free(g_o); free(g_lse);
    dfree(p, d_q); dfree(p, d_k); dfree(p, d_v); dfree(p, d_scr);
}

START_TEST(attention_matches_ref)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    test_rng_seed(41);
    for (size_t s = 0; s < sizeof attn_shapes / sizeof attn_shapes[0]; s++)
        attention_case(&p, &attn_shapes[s], (struct attn_prec){0, 0.0f});
    pair_close(&p);
}
END_TEST

/* The bf16 kernels hold head sizes up to 128; each shape without RoPE
 * and with it inside (odd head sizes leave their last column unrotated;
 * theta 500 turns the pairs far from the identity even at short range,
 * where a lost rotation, a wrong position or a forward rotation of a
 * gradient would show). */
START_TEST(attention_bf16_matches_ref)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    test_rng_seed(42);
    static const float thetas[] = {0.0f, 500.0f};
    for (size_t s = 0; s < sizeof attn_shapes / sizeof attn_shapes[0]; s++)
        for (int r = 0; r < 2; r++)
            if (attn_shapes[s].hd <= 128)
                attention_case(&p, &attn_shapes[s], (struct attn_prec){1, thetas[r]});
    pair_close(&p);
}
END_TEST

/* The CUDA forward of one shape and precision on q, k and v, downloaded. */
static float *attn_cuda_out(struct pair *p, struct attn_prec pr, const struct attn_shape *a,
                            const float *q, const float *k, const float *v)
{
    qkd__backend *cb = p->cb;
    const size_t nq = (size_t)a->B * a->Tq * a->n_heads * a->hd;
    const size_t nkv = (size_t)a->B * a->kv_len * a->n_kv * a->hd;
    const size_t ns =
        cb->attention_scratch_floats(cb, a->B, a->Tq, a->kv_len, a->n_heads, a->n_kv, a->hd);
    float *d_q = dput(p, q, nq), *d_k = dput(p, k, nkv), *d_v = dput(p, v, nkv);
    float *d_o = dpoison(p, nq), *d_scr = dpoison(p, ns);
    attn_forward(cb, pr, d_o, NULL, d_scr, d_q, d_k, d_v, a);
    float *o = dtake(p, d_o, nq);
    dfree(p, d_q); dfree(p, d_k); dfree(p, d_v); dfree(p, d_scr);
    return o;
}

/* Keys past the last query's position (a cache's stale tail) reach no
 * output: the kernels load whole tiles of keys, and a tile's keys past
 * its queries' last must not be read, since their probabilities are 0
 * and 0 * NaN would be NaN. With those keys NaN in k and v, every output
 * keeps its bits. */
START_TEST(attention_ignores_keys_past_queries)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    test_rng_seed(43);
    int cases = 0;
    for (size_t s = 0; s < sizeof attn_shapes / sizeof attn_shapes[0]; s++) {
        const struct attn_shape *a = &attn_shapes[s];
        if (a->pos0 + a->Tq >= a->kv_len)
            continue; /* no key past the last query */
        const size_t nq = (size_t)a->B * a->Tq * a->n_heads * a->hd;
        const size_t nkv = (size_t)a->B * a->kv_len * a->n_kv * a->hd;
        const size_t kv_row = (size_t)a->n_kv * a->hd; /* one position's k or v */
        float *q = test_vec_rand(nq, -2, 2), *k = test_vec_rand(nkv, -2, 2);
        float *v = test_vec_rand(nkv, -1, 1), *kn = test_vec_new(nkv), *vn = test_vec_new(nkv);
        memcpy(kn, k, nkv * sizeof *k);
        memcpy(vn, v, nkv * sizeof *v);
        for (int bi = 0; bi < a->B; bi++)
            for (size_t i = (size_t)(a->pos0 + a->Tq) * kv_row; i < (size_t)a->kv_len * kv_row;
                 i++) {
                kn[(size_t)bi * a->kv_len * kv_row + i] = NAN;
                vn[(size_t)bi * a->kv_len * kv_row + i] = NAN;
            }
        for (int bf16 = 0; bf16 < 2; bf16++) {
            if (bf16 && a->hd > 128)
                continue;
            const struct attn_prec pr = {bf16, bf16 ? 500.0f : 0.0f};
            float *o = attn_cuda_out(&p, pr, a, q, k, v), *on = attn_cuda_out(&p, pr, a, q, kn, vn);
            assert_same(bf16 ? "attention_forward_bf16, stale keys NaN"
                             : "attention_forward, stale keys NaN",
                        on, o, nq);
            free(o); free(on);
            cases++;
        }
        free(q); free(k); free(v); free(kn); free(vn);
    }
    /* head sizes 48, 128 and 64 (the Hopper forward's), both precisions */
    ck_assert_int_ge(cases, 6);
    pair_close(&p);
}
END_TEST

/* ---- SwiGLU ---------------------------------------------------------------------------------- */

START_TEST(swiglu_matches_ref)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    test_rng_seed(51);
    /* off 1: pointers off the 16-byte boundary take the scalar kernels */
    for (size_t s = 0; s < 2 * sizeof elem_sizes / sizeof elem_sizes[0]; s++) {
        size_t off = s % 2, n = elem_sizes[s / 2] - off;
        if (n == 0)
            continue;
        float *gate = test_vec_rand(n, -12, 12), *up = test_vec_rand(n, -2, 2), *g = test_vec_rand(n, -1, 1);
        gate[0] = -100.0f; /* exp(100) is past float: the gate closes, as in double */
        float *o = test_vec_new(n), *dg = test_vec_rand(n, -1, 1), *du = test_vec_rand(n, -1, 1);
        for (size_t i = 0; i < n; i++)
            o[i] = NAN; /* the device output starts poisoned */
        float *d_gate = dput_off(&p, gate, n, off), *d_up = dput_off(&p, up, n, off);
        float *d_g = dput_off(&p, g, n, off), *d_o = dput_off(&p, o, n, off);
        float *d_dg = dput_off(&p, dg, n, off), *d_du = dput_off(&p, du, n, off);
        p.rb->swiglu_forward(p.rb, o, gate, up, n);
        p.rb->swiglu_backward(p.rb, dg, du, g, gate, up, n);
        p.cb->swiglu_forward(p.cb, d_o, d_gate, d_up, n);
        p.cb->swiglu_backward(p.cb, d_dg, d_du, d_g, d_gate, d_up, n);
        float *g_o = dtake_off(&p, d_o, n, off), *g_dg = dtake_off(&p, d_dg, n, off);
        float *g_du = dtake_off(&p, d_du, n, off);
        /* element by element, in float (elementwise.cu) */
        assert_close_floor("swiglu_forward", g_o, o, n, TOL_FLOAT);
        assert_close_floor("swiglu_backward dgate", g_dg, dg, n, TOL_FLOAT);
        assert_close_floor("swiglu_backward dup", g_du, du, n, TOL_FLOAT);
        free(gate); free(up); free(g); free(o); free(dg); free(du);
        free(g_o); free(g_dg); free(g_du);
        dfree(&p, d_gate - off); dfree(&p, d_up - off); dfree(&p, d_g - off);
    }
    pair_close(&p);
}
END_TEST

/* ---- softmax family and cross-entropy ---------------------------------------------------------- */

static const int row_shapes[][2] = {{1, 1}, {3, 7}, {2, 16}, {5, 33}, {4, 512}, {3, 1000},
                                    {17, 5003}};

START_TEST(softmax_family_matches_ref)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    static const float inv_temps[] = {1.0f, 0.5f};
    test_rng_seed(61);
    for (size_t s = 0; s < sizeof row_shapes / sizeof row_shapes[0]; s++)
        for (size_t ti = 0; ti < 2; ti++)
            for (int logp = 0; logp < 2; logp++) {
                int N = row_shapes[s][0], V = row_shapes[s][1];
                size_t n = (size_t)N * V;
                float it = inv_temps[ti];
                float *x = test_vec_rand(n, -8, 8), *dy = test_vec_rand(n, -1, 1), *dx = test_vec_rand(n, -1, 1);
                float *y = test_vec_new(n);
                float *d_x = dput(&p, x, n), *d_dy = dput(&p, dy, n), *d_dx = dput(&p, dx, n);
                float *d_y = dpoison(&p, n);
                if (logp) {
                    p.rb->log_softmax_forward(p.rb, y, x, N, V, it);
                    p.rb->log_softmax_backward(p.rb, dx, dy, y, N, V, it);
                    p.cb->log_softmax_forward(p.cb, d_y, d_x, N, V, it);
                    p.cb->log_softmax_backward(p.cb, d_dx, d_dy, d_y, N, V, it);
                } else {
                    p.rb->softmax_forward(p.rb, y, x, N, V, it);
                    p.rb->softmax_backward(p.rb, dx, dy, y, N, V, it);
                    p.cb->softmax_forward(p.cb, d_y, d_x, N, V, it);
                    p.cb->softmax_backward(p.cb, d_dx, d_dy, d_y, N, V, it);
                }
                float *g_y = dtake(&p, d_y, n), *g_dx = dtake(&p, d_dx, n);
                assert_close_rows(logp ? "log_softmax_forward" : "softmax_forward", g_y, y,
                                  (size_t)N, (size_t)V, TOL_DOUBLE);
                assert_close_rows(logp ? "log_softmax_backward" : "softmax_backward", g_dx, dx,
                                  (size_t)N, (size_t)V, TOL_DOUBLE);
                free(x); free(dy); free(dx); free(y); free(g_y); free(g_dx);
                dfree(&p, d_x); dfree(&p, d_dy);
            }
    pair_close(&p);
}
END_TEST

START_TEST(cross_entropy_matches_ref)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    test_rng_seed(71);
    for (size_t s = 0; s < sizeof row_shapes / sizeof row_shapes[0]; s++) {
        int N = row_shapes[s][0], V = row_shapes[s][1];
        size_t n = (size_t)N * V;
        float *x = test_vec_rand(n, -8, 8), *dx = test_vec_rand(n, -1, 1), *loss = test_vec_new((size_t)N);
        int32_t *targets = ids_rand((size_t)N, V, 1);
        float *d_x = dput(&p, x, n), *d_dx = dput(&p, dx, n), *d_loss = dpoison(&p, (size_t)N);
        int32_t *d_t = dput_ids(&p, targets, (size_t)N);
        p.rb->cross_entropy_forward(p.rb, loss, x, targets, N, V);
        p.rb->cross_entropy_backward(p.rb, dx, x, targets, 0.37f, N, V);
        p.cb->cross_entropy_forward(p.cb, d_loss, d_x, d_t, N, V);
        p.cb->cross_entropy_backward(p.cb, d_dx, d_x, d_t, 0.37f, N, V);
        float *g_loss = dtake(&p, d_loss, (size_t)N), *g_dx = dtake(&p, d_dx, n);
        assert_close_rows("cross_entropy_forward", g_loss, loss, (size_t)N, 1, TOL_DOUBLE);
        assert_close_rows("cross_entropy_backward", g_dx, dx, (size_t)N, (size_t)V, TOL_DOUBLE);
        free(x); free(dx); free(loss); free(targets); free(g_loss); free(g_dx);
        dfree(&p, d_x); dfree(&p, d_t);
    }
    pair_close(&p);
}
END_TEST

/* ---- distillation objectives ----------------------------------------------------------------- */

static const int kd_kinds[] = {QKD_LOSS_CE,    QKD_LOSS_FKL,  QKD_LOSS_RKL, QKD_LOSS_JSD,
                               QKD_LOSS_CAKLD, QKD_LOSS_TSLD, QKD_LOSS_MSE};

/* One kd_loss case; variant bit 0: targets given, bit 1: row weights,
 * bit 2: values only (no ds), bit 3: ds written (not added), bit 4: beta
 * read on the device. */
static void kd_case(struct pair *p, int N, int V, int kind, int variant)
{
    size_t n = (size_t)N * V;
    float *s = test_vec_rand(n, -6, 6), *t = test_vec_rand(n, -6, 6), *ds = test_vec_rand(n, -1, 1);
    float *w = test_vec_rand((size_t)N, 0.2, 2), *loss = test_vec_new((size_t)N);
    int with_targets = (variant & 1) || kind == QKD_LOSS_CE, with_w = variant & 2;
    int with_ds = !(variant & 4);
    int32_t *targets = ids_rand((size_t)N, V, 1);
    if (N > 1 && (variant & 3) == 3)
        s[V + 1] = INFINITY; /* a row with a non-finite logit: NaN value and gradient */
    float *d_s = dput(p, s, n), *d_t = dput(p, t, n), *d_ds = dput(p, ds, n);
    float *d_w = dput(p, w, (size_t)N), *d_loss = dpoison(p, (size_t)N);
    float beta = 0.3f, *d_beta = dput(p, &beta, 1);
    int32_t *d_y = dput_ids(p, targets, (size_t)N);
    qkd__kd_term term = {.kind = kind, .temperature = 2.0f, .beta = variant & 16 ? 0.9f : beta,
                         .scale = 0.7f, .accumulate = !(variant & 8)};
    qkd__kd_term ref_term = term;
    ref_term.beta = beta;
    term.beta_dev = variant & 16 ? d_beta : NULL;
    p->rb->kd_loss(p->rb, loss, with_ds ? ds : NULL, NULL, s, t, with_targets ? targets : NULL,
                   with_w ? w : NULL, N, V, &ref_term);
    p->cb->kd_loss(p->cb, d_loss, with_ds ? d_ds : NULL, NULL, d_s, d_t,
                   with_targets ? d_y : NULL, with_w ? d_w : NULL, N, V, &term);
    float *g_loss = dtake(p, d_loss, (size_t)N), *g_ds = dtake(p, d_ds, n);
    char what[64];
    snprintf(what, sizeof what, "kd_loss kind %d variant %d V %d", kind, variant, V);
    assert_close_floor(what, g_loss, loss, (size_t)N, TOL_KD_VALUE);
    assert_close_rows(what, g_ds, ds, (size_t)N, (size_t)V, TOL_KD);
    if (with_ds && (variant & 8)) { /* written: again as bf16 bits, within one bf16 step */
        uint16_t *d_bits = (uint16_t *)dpoison(p, (n + 1) / 2), *bits = malloc(n * 2);
        float *wide = test_vec_new(n);
        ck_assert_ptr_nonnull(bits);
        p->cb->kd_loss(p->cb, d_loss, NULL, d_bits, d_s, d_t, with_targets ? d_y : NULL,
                       with_w ? d_w : NULL, N, V, &term);
        expect_ok(p->cc, p->cb->sync(p->cb), "sync");
        expect_ok(p->cc, p->cb->download(p->cb, bits, d_bits, n * 2), "download bits");
        for (size_t e = 0; e < n; e++)
            wide[e] = qkd__bf16_to_f32(bits[e]);
        assert_close_rows(what, wide, ds, (size_t)N, (size_t)V, TOL_KD + 1.0 / 256);
        free(bits); free(wide); dfree(p, d_bits);
    }
    free(s); free(t); free(ds); free(w); free(loss); free(targets); free(g_loss); free(g_ds);
    dfree(p, d_s); dfree(p, d_t); dfree(p, d_w); dfree(p, d_y); dfree(p, d_beta);
}

START_TEST(kd_loss_matches_ref)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    static const int shapes[][2] = {{1, 1}, {3, 7}, {5, 257}, {6, 1000}, {4, 5003}, {2, 49152}};
    test_rng_seed(101);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (size_t k = 0; k < sizeof kd_kinds / sizeof kd_kinds[0]; k++)
            for (int variant = 0; variant < 5; variant++) {
                kd_case(&p, shapes[s][0], shapes[s][1], kd_kinds[k], variant);
                if (variant < 4) /* again written over ds, then with beta on the device */
                    kd_case(&p, shapes[s][0], shapes[s][1], kd_kinds[k], variant | 8);
                if (variant == 3)
                    kd_case(&p, shapes[s][0], shapes[s][1], kd_kinds[k], variant | 16);
            }
    pair_close(&p);
}
END_TEST

/* got and want hold the same floats, NaNs of any payload alike. */
static void assert_same_or_nan(const char *what, const float *got, const float *want, size_t n)
{
    for (size_t i = 0; i < n; i++)
        ck_assert_msg((isnan(got[i]) && isnan(want[i])) ||
                          memcmp(&got[i], &want[i], sizeof *got) == 0,
                      "%s[%zu]: %.9g, %.9g (must be identical)", what, i, (double)got[i],
                      (double)want[i]);
}

/* One kd_loss_confidence case (variant bits as kd_case's, bit 3 also
 * checking the bf16 bits): against the reference's row_max_prob, sum,
 * scale and kd_loss within the kd tolerances, and bit for bit against
 * the same slots on CUDA, whose beta it must reproduce exactly. */
static void kd_confidence_case(struct pair *p, int N, int V, int variant)
{
    size_t n = (size_t)N * V;
    float *s = test_vec_rand(n, -6, 6), *t = test_vec_rand(n, -6, 6), *ds0 = test_vec_rand(n, -1, 1);
    float *ds = test_vec_copy(ds0, n), *w = test_vec_rand((size_t)N, 0.2, 2);
    float *loss = test_vec_new((size_t)N), *rows = test_vec_new((size_t)N), beta = 0.0f;
    int with_targets = variant & 1, with_ds = !(variant & 4), n_rows = N;
    int32_t *targets = ids_rand((size_t)N, V, 1), *y = with_targets ? targets : NULL;
    for (int i = 0; with_targets && i < N; i++)
        n_rows -= targets[i] < 0;
    if (N > 1 && (variant & 3) == 3)
        t[V + 1] = INFINITY; /* a non-finite teacher row: beta and every row NaN */
    const float *rw = variant & 2 ? w : NULL;
    qkd__kd_term term = {.kind = QKD_LOSS_CAKLD, .temperature = 1.0f, .scale = 0.7f,
                         .accumulate = !(variant & 8), .beta_dev = &beta};
    p->rb->row_max_prob(p->rb, rows, t, y, N, V);
    p->rb->sum(p->rb, &beta, rows, (size_t)N);
    p->rb->scale(p->rb, &beta, n_rows > 0 ? 1.0f / (float)n_rows : 0.0f, 1);
    p->rb->kd_loss(p->rb, loss, with_ds ? ds : NULL, NULL, s, t, y, rw, N, V, &term);

    float *d_s = dput(p, s, n), *d_t = dput(p, t, n), *d_w = dput(p, w, (size_t)N);
    int32_t *d_y = dput_ids(p, targets, (size_t)N), *dy = with_targets ? d_y : NULL;
    float *d_rw = variant & 2 ? d_w : NULL, *d_beta[2], *d_loss[2], *d_ds[2];
    for (int k = 0; k < 2; k++) {
        d_beta[k] = dpoison(p, 1);
        d_loss[k] = dpoison(p, (size_t)N);
        d_ds[k] = dput(p, ds0, n);
    }
    qkd__kd_term ct = term;
    ct.beta = 0.25f; /* neither side may read these */
    ct.beta_dev = NULL;
    p->cb->kd_loss_confidence(p->cb, d_loss[0], with_ds ? d_ds[0] : NULL, NULL, d_s, d_t, dy, d_rw,
                              N, V, &ct, d_beta[0], n_rows);
    float *d_rows = dpoison(p, (size_t)N);
    p->cb->row_max_prob(p->cb, d_rows, d_t, dy, N, V);
    p->cb->sum(p->cb, d_beta[1], d_rows, (size_t)N);
    p->cb->scale(p->cb, d_beta[1], n_rows > 0 ? 1.0f / (float)n_rows : 0.0f, 1);
    ct.beta_dev = d_beta[1];
    p->cb->kd_loss(p->cb, d_loss[1], with_ds ? d_ds[1] : NULL, NULL, d_s, d_t, dy, d_rw, N, V,
                   &ct);
    char what[80];
    snprintf(what, sizeof what, "kd_loss_confidence variant %d N %d V %d", variant, N, V);
    if (with_ds && (variant & 8)) { /* written: again as bf16 bits, both ways alike */
        uint16_t *bits[2];
        for (int k = 0; k < 2; k++) {
            uint16_t *d_bits = (uint16_t *)dpoison(p, (n + 1) / 2);
            if (k == 0)
                p->cb->kd_loss_confidence(p->cb, d_loss[0], NULL, d_bits, d_s, d_t, dy, d_rw, N,
                                          V, &ct, d_beta[0], n_rows);
            else
                p->cb->kd_loss(p->cb, d_loss[1], NULL, d_bits, d_s, d_t, dy, d_rw, N, V, &ct);
            bits[k] = malloc(n * 2);
            ck_assert_ptr_nonnull(bits[k]);
            expect_ok(p->cc, p->cb->sync(p->cb), "sync");
            expect_ok(p->cc, p->cb->download(p->cb, bits[k], d_bits, n * 2), "download bits");
            dfree(p, d_bits);
        }
        ck_assert_msg(memcmp(bits[0], bits[1], n * 2) == 0, "%s: bf16 gradients differ", what);
        free(bits[0]); free(bits[1]);
    }
    float *g[2][3];
    for (int k = 0; k < 2; k++) {
        g[k][0] = dtake(p, d_beta[k], 1);
        g[k][1] = dtake(p, d_loss[k], (size_t)N);
        g[k][2] = dtake(p, d_ds[k], n);
    }
    assert_same_or_nan(what, g[0][0], g[1][0], 1);
    assert_same_or_nan(what, g[0][1], g[1][1], (size_t)N);
    assert_same_or_nan(what, g[0][2], g[1][2], n);
    assert_close_floor(what, g[0][0], &beta, 1, TOL_KD);
    assert_close_floor(what, g[0][1], loss, (size_t)N, TOL_KD_VALUE);
    assert_close_rows(what, g[0][2], ds, (size_t)N, (size_t)V, TOL_KD);
    free(s); free(t); free(ds); free(ds0); free(w); free(loss); free(rows); free(targets);
    for (int k = 0; k < 2; k++)
        for (int c = 0; c < 3; c++)
            free(g[k][c]);
    dfree(p, d_s); dfree(p, d_t); dfree(p, d_w); dfree(p, d_y); dfree(p, d_rows);
}

START_TEST(kd_loss_confidence_matches)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    ck_assert_ptr_nonnull(p.cb->kd_loss_confidence);
    static const int shapes[][2] = {{1, 1}, {3, 7}, {5, 257}, {6, 1000}, {4, 5003}, {2, 49152}};
    test_rng_seed(107);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int variant = 0; variant < 16; variant++)
            kd_confidence_case(&p, shapes[s][0], shapes[s][1], variant);
    pair_close(&p);
}
END_TEST

START_TEST(tsld_and_max_prob_match_ref)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    test_rng_seed(111);
    for (size_t s = 0; s < sizeof row_shapes / sizeof row_shapes[0]; s++) {
        int N = row_shapes[s][0], V = row_shapes[s][1];
        size_t n = (size_t)N * V;
        float *x = test_vec_rand(n, -8, 8), *mp = test_vec_new((size_t)N), *tw = test_vec_new(n);
        int32_t *targets = ids_rand(n, 7, 1);
        float *d_x = dput(&p, x, n), *d_mp = dpoison(&p, (size_t)N), *d_tw = dpoison(&p, n);
        int32_t *d_y = dput_ids(&p, targets, n);
        /* row_max_prob's targets: the first N of the N x V */
        p.rb->row_max_prob(p.rb, mp, x, targets, N, V);
        p.rb->tsld_weights(p.rb, tw, x, targets, N, V, 0.8f); /* N sequences of V positions */
        p.cb->row_max_prob(p.cb, d_mp, d_x, d_y, N, V);
        p.cb->tsld_weights(p.cb, d_tw, d_x, d_y, N, V, 0.8f);
        float *g_mp = dtake(&p, d_mp, (size_t)N), *g_tw = dtake(&p, d_tw, n);
        assert_close_rows("row_max_prob", g_mp, mp, (size_t)N, 1, TOL_KD);
        assert_close_rows("tsld_weights", g_tw, tw, (size_t)N, (size_t)V, TOL_DOUBLE);
        free(x); free(mp); free(tw); free(targets); free(g_mp); free(g_tw);
        dfree(&p, d_x); dfree(&p, d_y);
    }
    pair_close(&p);
}
END_TEST

/* ---- fake quantization ------------------------------------------------------------------------- */

/* One fake-quantization case: forward (wq, scales, zeros) and backward. */
static void fq_case(struct pair *p, const float *w, const float *dq, const float *dw0,
                    int64_t rows, int64_t cols, const qkd__quant_spec *spec, int64_t ng)
{
    size_t n = (size_t)(rows * cols);
    float *q = test_vec_new(n), *sc = test_vec_new((size_t)ng), *z = test_vec_new((size_t)ng);
    float *dw = test_vec_copy(dw0, n);
    float *d_w = dput(p, w, n), *d_dq = dput(p, dq, n), *d_dw = dput(p, dw0, n);
    float *d_q = dpoison(p, n), *d_sc = dpoison(p, (size_t)ng), *d_z = dpoison(p, (size_t)ng);
    p->rb->fakequant_forward(p->rb, q, sc, z, w, rows, cols, spec);
    p->rb->fakequant_backward(p->rb, dw, dq, w, sc, z, rows, cols, spec);
    p->cb->fakequant_forward(p->cb, d_q, d_sc, d_z, d_w, rows, cols, spec);
    p->cb->fakequant_backward(p->cb, d_dw, d_dq, d_w, d_sc, d_z, rows, cols, spec);
    float *g_q = dtake(p, d_q, n), *g_sc = dtake(p, d_sc, (size_t)ng);
    float *g_z = dtake(p, d_z, (size_t)ng), *g_dw = dtake(p, d_dw, n);
    char what[96];
    snprintf(what, sizeof what, "fakequant scheme %d bits %d group %lld clip %g smooth %d",
             spec->scheme, spec->bits, (long long)spec->group, (double)spec->clip_ratio,
             spec->continuous);
    if (spec->continuous) {
        assert_close_rows(what, g_q, q, (size_t)rows, (size_t)cols, TOL_DOUBLE);
        assert_close_rows(what, g_dw, dw, (size_t)rows, (size_t)cols, TOL_DOUBLE);
    } else {
        assert_same(what, g_q, q, n);
        assert_same(what, g_dw, dw, n);
    }
    assert_same(what, g_sc, sc, (size_t)ng);
    assert_same(what, g_z, z, (size_t)ng);
    free(q); free(sc); free(z); free(dw); free(g_q); free(g_sc); free(g_z); free(g_dw);
    dfree(p, d_w); dfree(p, d_dq);
}

/* The learned-scale (LSQ) kernels on the same groups: scales small enough
 * that some codes clamp, zero points (ASYM) off the grid. */
static void lsq_case(struct pair *p, const float *w, const float *dq, const float *dw0,
                     int64_t rows, int64_t cols, const qkd__quant_spec *spec, int64_t ng)
{
    size_t n = (size_t)(rows * cols), g = (size_t)ng;
    int asym = spec->scheme == QKD_QUANT_ASYM;
    float *sc = test_vec_rand(g, 0.01, 0.2), *z = test_vec_rand(g, -1, 1 << spec->bits);
    float *dsc = test_vec_rand(g, -1, 1), *dz = test_vec_rand(g, -1, 1);
    float *q = test_vec_new(n), *dw = test_vec_copy(dw0, n);
    float *d_w = dput(p, w, n), *d_dq = dput(p, dq, n), *d_sc = dput(p, sc, g);
    float *d_z = dput(p, z, g), *d_dsc = dput(p, dsc, g), *d_dz = dput(p, dz, g);
    float *d_q = dpoison(p, n), *d_dw = dput(p, dw0, n);
    p->rb->fakequant_lsq_forward(p->rb, q, w, sc, asym ? z : NULL, rows, cols, spec);
    p->rb->fakequant_lsq_backward(p->rb, dw, dsc, asym ? dz : NULL, dq, w, sc,
                                  asym ? z : NULL, rows, cols, spec);
    p->cb->fakequant_lsq_forward(p->cb, d_q, d_w, d_sc, asym ? d_z : NULL, rows, cols, spec);
    p->cb->fakequant_lsq_backward(p->cb, d_dw, d_dsc, asym ? d_dz : NULL, d_dq, d_w, d_sc,
                                  asym ? d_z : NULL, rows, cols, spec);
    float *g_q = dtake(p, d_q, n), *g_dw = dtake(p, d_dw, n);
    float *g_dsc = dtake(p, d_dsc, g), *g_dz = dtake(p, d_dz, g);
    char what[96];
    snprintf(what, sizeof what, "lsq scheme %d bits %d group %lld clip %g smooth %d",
             spec->scheme, spec->bits, (long long)spec->group, (double)spec->clip_ratio,
             spec->continuous);
    double tol = spec->continuous ? TOL_DOUBLE : 0.0; /* hard rounding: identical */
    assert_close_rows(what, g_q, q, (size_t)rows, (size_t)cols, tol);
    assert_close_rows(what, g_dw, dw, (size_t)rows, (size_t)cols, tol);
    assert_close_rows(what, g_dsc, dsc, 1, g, tol);
    assert_close_rows(what, g_dz, dz, 1, g, tol);
    free(sc); free(z); free(dsc); free(dz); free(q); free(dw);
    free(g_q); free(g_dw); free(g_dsc); free(g_dz);
    dfree(p, d_w); dfree(p, d_dq); dfree(p, d_sc); dfree(p, d_z);
}

START_TEST(fakequant_matches_ref)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    static const int schemes[] = {QKD_QUANT_SYM, QKD_QUANT_ASYM, QKD_QUANT_TERNARY};
    static const int bits[] = {2, 4, 8};
    static const int64_t groups[] = {7, 32, 96, 480}; /* partial, exact, a row, the tensor */
    static const float clips[] = {1.0f, 0.8f};
    const int64_t rows = 5, cols = 96;
    const size_t n = (size_t)(rows * cols);
    test_rng_seed(121);
    float *w = test_vec_rand(n, -1, 1), *dq = test_vec_rand(n, -1, 1), *dw0 = test_vec_rand(n, -1, 1);
    for (size_t i = 0; i < n; i += 13)
        w[i] = (float)(0.125 * (int)(test_rng_next(-8, 8))); /* exact halves of some scales */
    for (size_t si = 0; si < 3; si++)
        for (size_t bi = 0; bi < 3; bi++)
            for (size_t gi = 0; gi < 4; gi++)
                for (size_t ci = 0; ci < 2; ci++)
                    for (int smooth = 0; smooth < 2; smooth++) {
                        /* per tensor: one row of rows * cols values */
                        int64_t r = groups[gi] == 480 ? 1 : rows, c = (int64_t)n / r;
                        qkd__quant_spec spec = {.scheme = schemes[si], .bits = bits[bi],
                                                .group = groups[gi], .clip_ratio = clips[ci],
                                                .continuous = smooth, .round_T = 8.0f,
                                                .clamp_T = 12.0f};
                        int64_t ng = r * ((c + spec.group - 1) / spec.group);
                        fq_case(&p, w, dq, dw0, r, c, &spec, ng);
                        lsq_case(&p, w, dq, dw0, r, c, &spec, ng);
                    }
    free(w); free(dq); free(dw0);
    pair_close(&p);
}
END_TEST

/* How many of the reference's hard-rounded SYM or ASYM values q differ
 * from rounding w * (1 / s) in float: the near-ties the CUDA forward must
 * settle in double (quantize_grid). */
static size_t float_rounding_misses(const float *w, const float *q, const float *sc,
                                    const float *z, int64_t rows, int64_t cols,
                                    const qkd__quant_spec *spec)
{
    if (spec->continuous || spec->scheme == QKD_QUANT_TERNARY)
        return 0;
    const int asym = spec->scheme == QKD_QUANT_ASYM;
    const float qmax = asym ? (float)((1 << spec->bits) - 1) : (float)((1 << (spec->bits - 1)) - 1);
    const float qmin = asym ? 0.0f : -qmax;
    const int64_t per_row = (cols + spec->group - 1) / spec->group;
    size_t misses = 0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) {
            const int64_t g = r * per_row + c / spec->group;
            const float zg = asym ? z[g] : 0.0f;
            const float code = fminf(fmaxf(roundf(w[r * cols + c] * (1.0f / sc[g])) + zg, qmin), qmax);
            misses += (code - zg) * sc[g] != q[r * cols + c];
        }
    return misses;
}

/* fakequant_forward_bf16 against the reference's fp32 Q(w) rounded to
 * bf16: the same bits under hard rounding (within one bf16 step for the
 * smooth forward, whose double functions may differ), the same scales and
 * zero points. Groups of 32, 64 and 128 along the rows take the segment
 * kernel; a partial group (7), 96, the whole tensor, TERNARY and a weight
 * off the 16-byte boundary the others. Returns float_rounding_misses. */
static size_t fq_bf16_case(struct pair *p, const float *w, int64_t rows, int64_t cols,
                           const qkd__quant_spec *spec, size_t off)
{
    const size_t n = (size_t)(rows * cols);
    const size_t ng = (size_t)(rows * ((cols + spec->group - 1) / spec->group));
    float *q = test_vec_new(n), *sc = test_vec_new(ng), *z = test_vec_new(ng);
    uint16_t *got = malloc(n * sizeof *got);
    ck_assert_ptr_nonnull(got);
    memset(got, 0xff, n * sizeof *got); /* NaN bits: an element never written fails */
    p->rb->fakequant_forward(p->rb, q, sc, z, w, rows, cols, spec);
    float *d_w = dput_off(p, w, n, off), *d_sc = dpoison(p, ng), *d_z = dpoison(p, ng);
    uint16_t *d_q = dput_bytes(p, got, n, sizeof *got);
    p->cb->fakequant_forward_bf16(p->cb, d_q, d_sc, d_z, d_w, rows, cols, spec);
    expect_ok(p->cc, p->cb->sync(p->cb), "sync");
    expect_ok(p->cc, p->cb->download(p->cb, got, d_q, n * sizeof *got), "download");
    for (size_t i = 0; i < n; i++) {
        const float want = qkd__bf16_round(q[i]);
        const float have = qkd__bf16_to_f32(got[i]);
        const int ok = spec->continuous ? fabsf(have - q[i]) <= 0x1p-8f * fabsf(q[i]) + 1e-6f
                                        : got[i] == qkd__f32_to_bf16(q[i]);
        ck_assert_msg(ok, "fakequant_forward_bf16 scheme %d group %lld clip %g smooth %d "
                          "off %zu: [%zu] = %.9g, want %.9g",
                      spec->scheme, (long long)spec->group, (double)spec->clip_ratio,
                      spec->continuous, off, i, (double)have, (double)want);
    }
    float *g_sc = dtake(p, d_sc, ng), *g_z = dtake(p, d_z, ng);
    assert_same("fakequant_forward_bf16 scales", g_sc, sc, ng);
    assert_same("fakequant_forward_bf16 zeros", g_z, z, ng);
    const size_t misses = float_rounding_misses(w, q, sc, z, rows, cols, spec);
    free(q); free(sc); free(z); free(got); free(g_sc); free(g_z);
    dfree(p, d_q);
    dfree(p, d_w - off);
    return misses;
}

START_TEST(fakequant_bf16_matches_ref)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    static const int schemes[] = {QKD_QUANT_SYM, QKD_QUANT_ASYM, QKD_QUANT_TERNARY};
    /* 4 to 128: every segment size of the segment kernel (1 to 32 lanes a
     * group: below FQ_ITEMS lanes, a lane plans its items' grids in
     * several passes) */
    static const int64_t groups[] = {4, 7, 8, 16, 32, 64, 96, 128, 1536};
    const int64_t rows = 4, cols = 384;
    const size_t n = (size_t)(rows * cols);
    test_rng_seed(122);
    float *w = test_vec_rand(n, -1, 1);
    for (size_t i = 0; i < n; i += 13)
        w[i] = (float)(0.125 * (int)(test_rng_next(-8, 8))); /* exact halves of some scales */
    /* Near-ties: rows 0 and 1 hold multiples of 0.05 under a group maximum
     * of 1.5 (ASYM's scale 0.1) or 0.7 (SYM's), w / s a hair off k + 0.5. */
    for (int64_t r = 0; r < 2; r++)
        for (int64_t c = 0; c < cols; c++)
            w[r * cols + c] = c % 32 ? 0.05f * (float)(c % (r ? 14 : 30)) : (r ? 0.7f : 1.5f);
    size_t misses = 0;
    for (size_t si = 0; si < 3; si++)
        for (size_t gi = 0; gi < sizeof groups / sizeof groups[0]; gi++)
            for (int clip = 0; clip < 2; clip++)
                for (int smooth = 0; smooth < 2; smooth++)
                    for (size_t off = 0; off < 2; off++) {
                        int64_t r = groups[gi] == (int64_t)n ? 1 : rows, c = (int64_t)n / r;
                        qkd__quant_spec spec = {.scheme = schemes[si], .bits = 4,
                                                .group = groups[gi],
                                                .clip_ratio = clip ? 0.8f : 1.0f,
                                                .continuous = smooth, .round_T = 8.0f,
                                                .clamp_T = 12.0f};
                        misses += fq_bf16_case(&p, w, r, c, &spec, off);
                    }
    ck_assert_msg(misses > 0, "no weight where rounding in float would differ: the near-ties "
                              "do not test the double fallback");
    free(w);
    pair_close(&p);
}
END_TEST

/* The format schemes (ggml's grids, run on the host) and their fallbacks:
 * Q4_K on rows of 256, Q4_K on rows of 64 (Q8_0), Q4_0 on rows of 172 (F16). */
START_TEST(format_fakequant_matches_ref)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    static const struct {
        int scheme;
        int64_t cols, group;
    } cases[] = {{QKD_QUANT_Q4_0, 64, 32}, {QKD_QUANT_Q4_1, 96, 32}, {QKD_QUANT_Q8_0, 64, 32},
                 {QKD_QUANT_Q4_K, 256, 32}, {QKD_QUANT_Q6_K, 256, 16},
                 {QKD_QUANT_Q4_K, 64, 32},  {QKD_QUANT_Q4_0, 172, 0}};
    test_rng_seed(123);
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        int64_t rows = 3, cols = cases[k].cols;
        size_t n = (size_t)(rows * cols);
        float *w = test_vec_rand(n, -1, 1), *dq = test_vec_rand(n, -1, 1), *dw0 = test_vec_rand(n, -1, 1);
        qkd__quant_spec spec = {.scheme = cases[k].scheme, .bits = 4, .group = 32,
                                .clip_ratio = 1.0f};
        int64_t ng = cases[k].group ? (int64_t)n / cases[k].group : 0; /* F16: no groups */
        fq_case(&p, w, dq, dw0, rows, cols, &spec, ng);
        free(w); free(dq); free(dw0);
    }
    pair_close(&p);
}
END_TEST

START_TEST(quant_rows_equal_ref)
{
    struct pair p;
    if (!pair_open(&p))
        return;
    static const int shapes[][2] = {{1, 1}, {3, 7}, {9, 64}, {5, 1000}};
    static const int bits[] = {2, 4, 8, 16};
    test_rng_seed(131);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (size_t bi = 0; bi < 4; bi++) {
            int64_t rows = shapes[s][0], cols = shapes[s][1];
            size_t n = (size_t)(rows * cols);
            float *x = test_vec_rand(n, -3, 3), *out = test_vec_new(n);
            float *d_x = dput(&p, x, n), *d_out = dpoison(&p, n);
            p.rb->quant_rows(p.rb, out, x, rows, cols, bits[bi]);
            p.cb->quant_rows(p.cb, d_out, d_x, rows, cols, bits[bi]);
            p.cb->quant_rows(p.cb, d_x, d_x, rows, cols, bits[bi]); /* in place */
            float *got = dtake(&p, d_out, n), *inplace = dtake(&p, d_x, n);
            assert_same("quant_rows", got, out, n);
            assert_same("quant_rows in place", inplace, out, n);
            free(x); free(out); free(got); free(inplace);
        }
    pair_close(&p);
}
END_TEST

/* ---- the table, errors and the choice of backend ---------------------------------------------- */

/* Whether the slot at byte offset `at` of the table is one the CUDA
 * backend leaves NULL on purpose: the fused fake-quantized products (the
 * model then writes Q(w) and runs the plain products). */
static int optional_slot(size_t at)
{
    return at == offsetof(qkd__backend, fakequant_groups) ||
           at == offsetof(qkd__backend, matmul_forward_fq) ||
           at == offsetof(qkd__backend, matmul_backward_input_fq);
}

START_TEST(table_complete)
{
    qkd_context *ctx = cuda_context();
    if (!ctx)
        return;
    /* The table is a run of pointers after its header; none may be NULL
     * but the optional ones above. */
    const qkd__backend *b = ctx->backend;
    const char *first = (const char *)&b->destroy, *end = (const char *)(b + 1);
    ck_assert_uint_eq(b->abi, QKD__BACKEND_ABI);
    for (const char *q = first; q + sizeof(void (*)(void)) <= end; q += sizeof(void (*)(void))) {
        void (*fn)(void);
        memcpy(&fn, q, sizeof fn);
        size_t at = (size_t)(q - (const char *)b);
        ck_assert_msg(fn != NULL || optional_slot(at),
                      "slot at byte %zu of the cuda table is empty", at);
    }
    qkd_context_free(ctx);
}
END_TEST

/* A failing CUDA call is reported as BACKEND with CUDA's message, and
 * stays pending: the results after it cannot be trusted. */
START_TEST(cuda_errors_are_reported)
{
    qkd_context *ctx = cuda_context();
    if (!ctx)
        return;
    qkd__backend *b = ctx->backend;
    void *d = NULL;
    ck_assert_int_eq(b->alloc(b, 0, &d), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(b->alloc(b, (size_t)1 << 62, &d), QKD_ERR_NO_MEMORY);
    ck_assert_ptr_null(d);
    expect_ok(ctx, b->alloc(b, 64, &d), "alloc after a refused one");
    float host[16] = {0};
    b->free(b, host); /* not device memory: cudaFree's invalid argument */
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(ctx), "cuda backend: cudaFree"));
    ck_assert_int_eq(b->sync(b), QKD_ERR_BACKEND);
    ck_assert_int_eq(b->upload(b, d, host, sizeof host), QKD_ERR_BACKEND);
    b->free(b, d);
    qkd_context_free(ctx);
}
END_TEST

/* A head size past the flash kernels' (256) is refused, not computed. */
START_TEST(attention_head_limit)
{
    qkd_context *ctx = cuda_context();
    if (!ctx)
        return;
    qkd__backend *b = ctx->backend;
    const int hd = 257;
    float *x = NULL, *lse = NULL;
    expect_ok(ctx, b->alloc(b, (size_t)hd * sizeof *x, (void **)&x), "alloc");
    expect_ok(ctx, b->alloc(b, sizeof *lse, (void **)&lse), "alloc");
    b->attention_forward(b, x, lse, x, x, x, 1, 1, 0, 1, 1, 1, hd);
    ck_assert_int_eq(b->sync(b), QKD_ERR_UNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(ctx), "head size 257"));
    b->free(b, x);
    b->free(b, lse);
    qkd_context_free(ctx);
    /* the bf16 kernels stop at 128 */
    ctx = cuda_context();
    b = ctx->backend;
    expect_ok(ctx, b->alloc(b, (size_t)hd * sizeof *x, (void **)&x), "alloc");
    expect_ok(ctx, b->alloc(b, sizeof *lse, (void **)&lse), "alloc");
    b->attention_forward_bf16(b, x, NULL, lse, x, x, x, 1, 1, 0, 1, 1, 1, 129, 0.0f);
    ck_assert_int_eq(b->sync(b), QKD_ERR_UNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(ctx), "head size 129"));
    b->free(b, x);
    b->free(b, lse);
    qkd_context_free(ctx);
}
END_TEST

START_TEST(auto_stays_on_cpu)
{
    qkd_context_params p;
    qkd_context_params_init(&p);
    p.n_threads = 1;
    qkd_context *ctx = NULL;
    ck_assert_int_eq(qkd_context_create(&p, &ctx), QKD_OK);
    ck_assert_str_ne(qkd_context_backend_name(ctx), "cuda");
    qkd_context_free(ctx);
}
END_TEST

/* ---- a whole model --------------------------------------------------------------------------------
 * stories260K forward, cross-entropy and backward on B x T random tokens,
 * then a few decoding steps. */

#define MB 2
#define MT 45
#define DECODE_STEPS 12

START_TEST(model_matches_ref)
{
    const char *path = test_shared("models/stories260K/stories260K.bin");
    if (!path)
        return;
    qkd_context *cc = cuda_context();
    if (!cc)
        return;
    qkd_context *rc = test_context(2);
    test_model_run c, r;
    test_model_run_do(cc, path, MB, MT, DECODE_STEPS, &c);
    test_model_run_do(rc, path, MB, MT, DECODE_STEPS, &r);
    ck_assert_uint_eq(c.n_grads, r.n_grads);
    ck_assert_msg(fabs(c.loss - r.loss) <= 1e-4 * fabs(r.loss), "loss cuda %.9g ref %.9g",
                  (double)c.loss, (double)r.loss);
    test_assert_close_tensor("logits", c.logits, r.logits, c.n_logits, 1e-4);
    test_assert_close_tensor("gradients", c.grads, r.grads, c.n_grads, 1e-4);
    test_assert_close_tensor("decoded logits", c.decoded, r.decoded, c.n_decoded, 1e-4);
    test_model_run_free(&c);
    test_model_run_free(&r);
    qkd_context_free(cc);
    qkd_context_free(rc);
}
END_TEST

/* Whether every layer of a forward of `model` on `tokens` writes its q,
 * k and v into layer 0's buffers. */
static int layers_share_qkv(qkd_context *cc, qkd_model *model, const int32_t *tokens)
{
    expect_ok(cc, qkd_model_forward(model, tokens, MB, MT), "forward");
    const qkd__layer_acts *la = model->acts.layers;
    int shared = 1;
    for (int l = 1; l < model->cfg.n_layers; l++) {
        const int same = la[l].q == la[0].q && la[l].k == la[0].k && la[l].v == la[0].v;
        ck_assert_int_eq(la[l].kcache == la[0].kcache, same);
        shared &= same;
    }
    return shared;
}

/* stories260K loaded on a CUDA context into *cc and *m, and tokens for a
 * forward of it (every stride-th id); 0 where it is skipped (no
 * ../shared, no GPU). */
static int stories_on_gpu(qkd_context **cc, qkd_model **m, int32_t tokens[MB * MT], int stride)
{
    const char *path = test_shared("models/stories260K/stories260K.bin");
    if (!path || !(*cc = cuda_context()))
        return 0;
    *m = NULL;
    expect_ok(*cc, qkd_model_load(*cc, path, m), "load");
    for (int i = 0; i < MB * MT; i++)
        tokens[i] = (int32_t)((i * stride) % (*m)->cfg.vocab_size);
    return 1;
}

/* A bf16 student's layers share one q, k and v: CUDA's bf16 attention
 * backward reads its own copies of them (its gradients are checked
 * against the reference by the curves below); the fp32 attention's
 * backward reads each layer's, which then keeps them. */
START_TEST(bf16_student_layers_share_qkv)
{
    qkd_context *cc;
    qkd_model *m;
    int32_t tokens[MB * MT];
    if (!stories_on_gpu(&cc, &m, tokens, 37))
        return;
    ck_assert_int_gt(m->cfg.n_layers, 1);
    ck_assert(!layers_share_qkv(cc, m, tokens));
    expect_ok(cc, qkd_model_set_matmul_precision(m, QKD_MATMUL_BF16), "precision");
    ck_assert(layers_share_qkv(cc, m, tokens));
    qkd_model_free(m);
    qkd_context_free(cc);
}
END_TEST

/* The logits of a forward of m on tokens (owned). */
static float *forward_logits(qkd_context *cc, qkd_model *m, const int32_t *tokens)
{
    const size_t n = (size_t)MB * MT * m->cfg.vocab_size;
    float *x = test_vec_new(n);
    expect_ok(cc, qkd_model_forward(m, tokens, MB, MT), "forward");
    expect_ok(cc, qkd_model_logits(m, x, n), "logits");
    return x;
}

/* A frozen bf16 teacher keeps its matrices on the host and its products
 * read its bf16 copy: the logits of the trainable model, bit for bit, and
 * its weights read back unchanged; trained again, they are back on the
 * device with the same logits. */
START_TEST(frozen_teacher_keeps_matrices_on_host)
{
    qkd_context *cc;
    qkd_model *m;
    int32_t tokens[MB * MT];
    if (!stories_on_gpu(&cc, &m, tokens, 41))
        return;
    expect_ok(cc, qkd_model_set_matmul_precision(m, QKD_MATMUL_BF16), "precision");
    const size_t n = (size_t)MB * MT * m->cfg.vocab_size;
    float *trained = forward_logits(cc, m, tokens);
    int iv; /* a matrix, which moves */
    expect_ok(cc, qkd_model_tensor_find(m, "blk.1.attn_v.weight", &iv), "find");
    const size_t nw = (size_t)(m->tensors[iv].rows * m->tensors[iv].cols);
    float *w = test_vec_new(nw), *got = test_vec_new(nw);
    expect_ok(cc, qkd_model_tensor_get(m, iv, w, nw), "tensor get");
    expect_ok(cc, qkd_model_set_trainable(m, 0), "freeze");
    float *frozen = forward_logits(cc, m, tokens);
    ck_assert_ptr_nonnull(m->matrices_host);
    ck_assert_mem_eq(frozen, trained, n * sizeof *frozen);
    expect_ok(cc, qkd_model_tensor_get(m, iv, got, nw), "tensor get");
    ck_assert_mem_eq(got, w, nw * sizeof *w);
    expect_ok(cc, qkd_model_set_trainable(m, 1), "train");
    ck_assert_ptr_null(m->matrices_host);
    float *again = forward_logits(cc, m, tokens);
    ck_assert_mem_eq(again, trained, n * sizeof *again);
    free(trained), free(frozen), free(again), free(w), free(got);
    qkd_model_free(m);
    qkd_context_free(cc);
}
END_TEST

/* ---- 50 KD-QAT steps ----------------------------------------------------------------------------
 * The step of ../shared/bench/torch_kdqat.py on stories260K: the frozen
 * teacher's forward, the student's forward with its linear weights
 * fake-quantized (W4 asymmetric, groups of 32, STE), CAKLD with the
 * teacher's confidence as beta, the student's backward and an AdamW step,
 * cycling over KD_BATCHES fixed batches of random tokens. Hard rounding is
 * discontinuous: float-level gradient differences can move a weight across
 * a code boundary on one backend only. At lr 1e-4 that parted the curves by
 * 1.5e-3 at step 23 (seen on an H200); at torch_kdqat.py's lr 1e-5 they
 * stay within about 1e-6. With `deferred` the step makes no host round
 * trip, as the benchmark runs it: beta_from_teacher, the loss computed
 * deferred (its value read after the step is queued) and
 * qkd_optimizer_step_deferred. */

#define KD_STEPS 50
#define KD_BATCHES 5
#define KD_BLOCK_ROWS 37 /* of MB * MT = 90: blocks of 37, 37 and 16 rows */

static void kdqat_curve(qkd_context *ctx, const char *path, qkd_matmul_precision prec,
                        int deferred, int logits_rows, float *curve)
{
    qkd_model *teacher = NULL, *student = NULL;
    qkd_quantizer *quant = NULL;
    qkd_loss *loss = NULL;
    qkd_optimizer *opt = NULL;
    expect_ok(ctx, qkd_model_load(ctx, path, &teacher), "load teacher");
    expect_ok(ctx, qkd_model_load(ctx, path, &student), "load student");
    expect_ok(ctx, qkd_model_set_matmul_precision(teacher, prec), "teacher precision");
    expect_ok(ctx, qkd_model_set_matmul_precision(student, prec), "student precision");
    expect_ok(ctx, qkd_model_set_logits_rows(teacher, logits_rows), "teacher logits rows");
    expect_ok(ctx, qkd_model_set_logits_rows(student, logits_rows), "student logits rows");
    qkd_quant_params qp;
    qkd_quant_params_init(&qp);
    qp.scheme = QKD_QUANT_ASYM;
    qp.bits = 4;
    qp.group_size = 32;
    qp.estimator = QKD_ESTIMATOR_STE;
    expect_ok(ctx, qkd_quantizer_create(ctx, &qp, &quant), "quantizer");
    expect_ok(ctx, qkd_model_set_quantizer(student, quant, QKD_QUANT_TARGET_LINEAR), "bind");
    loss = test_one_term_loss(ctx, QKD_LOSS_CAKLD, deferred);
    qkd_optim_params op;
    qkd_optim_params_init(&op);
    op.lr = 1e-5f; /* torch_kdqat.py's: the loss falls smoothly (0.093 to 0.039) */
    expect_ok(ctx, qkd_optimizer_create(student, &op, &opt), "optimizer");
    int32_t tokens[KD_BATCHES][MB * MT];
    test_rng_seed(141);
    for (int k = 0; k < KD_BATCHES; k++)
        for (int i = 0; i < MB * MT; i++)
            tokens[k][i] = (int32_t)(test_rng_next(0, 1) * 512);
    for (int step = 0; step < KD_STEPS; step++) {
        const int32_t *x = tokens[step % KD_BATCHES];
        float beta;
        expect_ok(ctx, qkd_model_forward(teacher, x, MB, MT), "teacher forward");
        expect_ok(ctx, qkd_model_forward(student, x, MB, MT), "student forward");
        if (!deferred) {
            expect_ok(ctx, qkd_loss_teacher_confidence(teacher, NULL, &beta), "confidence");
            expect_ok(ctx, qkd_loss_set_beta(loss, 0, beta), "beta");
        }
        expect_ok(ctx, qkd_loss_compute(loss, student, teacher, NULL,
                                        deferred ? NULL : &curve[step]),
                  "CAKLD");
        expect_ok(ctx, qkd_model_zero_grad(student), "zero_grad");
        expect_ok(ctx, qkd_model_backward(student, NULL), "backward");
        if (deferred) {
            expect_ok(ctx, qkd_optimizer_step_deferred(opt), "deferred optimizer step");
            expect_ok(ctx, qkd_loss_value(loss, &curve[step]), "loss value");
        } else {
            expect_ok(ctx, qkd_optimizer_step(opt, NULL), "optimizer step");
        }
    }
    qkd_optimizer_free(opt);
    qkd_loss_free(loss);
    qkd_quantizer_free(quant);
    qkd_model_free(student);
    qkd_model_free(teacher);
}

/* The loss curves of both backends in one precision: the first step's
 * losses within tol_first relative, every step's within tol_all, and both
 * curves must fall. */
static void kdqat_compare(qkd_matmul_precision prec, double tol_first, double tol_all)
{
    const char *path = test_shared("models/stories260K/stories260K.bin");
    if (!path)
        return;
    qkd_context *cc = cuda_context();
    if (!cc)
        return;
    qkd_context *rc = test_context(2);
    const char *name = prec == QKD_MATMUL_BF16 ? "bf16" : "fp32";
    float c[KD_STEPS], r[KD_STEPS], d[KD_STEPS], b[KD_STEPS];
    kdqat_curve(cc, path, prec, 0, 0, c);
    kdqat_curve(rc, path, prec, 0, 0, r);
    kdqat_curve(cc, path, prec, 1, 0, d);
    kdqat_curve(cc, path, prec, 1, KD_BLOCK_ROWS, b);
    double worst = 0.0;
    int at = 0;
    for (int step = 0; step < KD_STEPS; step++) {
        double rel = fabs(c[step] - r[step]) / fabs(r[step]);
        if (!(rel <= worst)) {
            worst = rel;
            at = step;
        }
    }
    fprintf(stderr, "kdqat %s: %d steps, loss %.6g -> %.6g (ref %.6g -> %.6g), largest "
                    "relative difference %.3g at step %d\n",
            name, KD_STEPS, (double)c[0], (double)c[KD_STEPS - 1], (double)r[0],
            (double)r[KD_STEPS - 1], worst, at);
    ck_assert_msg(fabs(c[0] - r[0]) <= tol_first * fabs(r[0]), "%s first step: loss cuda %.9g "
                  "ref %.9g", name, (double)c[0], (double)r[0]);
    ck_assert_msg(worst <= tol_all, "%s step %d: loss cuda %.9g ref %.9g", name, at,
                  (double)c[at], (double)r[at]);
    /* the same steps without a host round trip: beta's mean as a float sum
     * on the device, the bias correction's powers there too */
    for (int step = 0; step < KD_STEPS; step++)
        ck_assert_msg(fabs(d[step] - c[step]) <= tol_all * fabs(c[step]),
                      "%s step %d: deferred loss %.9g, synchronous %.9g", name, step,
                      (double)d[step], (double)c[step]);
    /* and with the logits computed by the objective, a block of rows at a
     * time (qkd_model_set_logits_rows), never stored whole */
    for (int step = 0; step < KD_STEPS; step++)
        ck_assert_msg(fabs(b[step] - d[step]) <= tol_all * fabs(d[step]),
                      "%s step %d: loss with logits by block %.9g, whole %.9g", name, step,
                      (double)b[step], (double)d[step]);
    /* the curve is a training curve: the last pass over the batches is lower */
    ck_assert_msg(r[KD_STEPS - KD_BATCHES] < r[0] && c[KD_STEPS - KD_BATCHES] < c[0],
                  "a backend did not learn: ref %g -> %g, cuda %g -> %g", (double)r[0],
                  (double)r[KD_STEPS - KD_BATCHES], (double)c[0],
                  (double)c[KD_STEPS - KD_BATCHES]);
    qkd_context_free(cc);
    qkd_context_free(rc);
}

START_TEST(kdqat_curve_follows_ref)
{
    kdqat_compare(QKD_MATMUL_FP32, 1e-3, 1e-3);
}
END_TEST

/* Both models in bf16 (the benchmark's mode): the GPU's tensor-core
 * products against the reference's bf16 slots. Here the curve is chaotic
 * at the level of float accumulation order: an activation a few float
 * ulps away rounds to another bf16 value (2^-8 apart), and a weight that
 * moves crosses another fake-quantization code. Measured (H100): the two
 * backends differ by 7e-5 at step 0 and at most 1.65e-2 (step 36); at
 * commit 25c227f, 2.4e-2 (step 18); at 382dbb8, after new orders of sums
 * in the attention's row dots and RMSNorm's dw, 3.0e-2 (step 37): the
 * figure moves with any change of float order, such as the gradient
 * norm's float4 sums; at 84b2229, after SwiGLU's operands and the
 * projections were stored in bf16 (more roundings, each a chance for a
 * one-unit flip), 7.4e-3 at step 0 and 3.4e-2 (step 41); the reference
 * against itself, with every initial
 * weight moved by one ulp, differs by 4.8e-3 at step 0 and at most
 * 1.8e-2. Attention in bf16 adds one more such point: the GPU rounds
 * each probability before the row's normalisation, the reference after
 * it (both within 2^-9 of the exact value). The first step's loss moves
 * by that alone: the reference with its probabilities rounded as
 * bf16(p c) / c instead differs by 1.1e-3 (c = 1.11), 1.3e-3 (1.7) and
 * 5.6e-3 (1.37) at step 0 (measured on the CPU); GPU against reference:
 * 4.7e-3 (H100). So: 1e-2 at the first step, where a wrong product is
 * off by far more, and 5e-2 after. */
START_TEST(kdqat_bf16_curve_follows_ref)
{
    kdqat_compare(QKD_MATMUL_BF16, 1e-2, 5e-2);
}
END_TEST

/* ---- export of a student trained on the GPU --------------------------------------------------
 * The GGUF issue's round trip for a student trained here: a few bf16
 * KD-QAT steps on the GPU, saved as trained, loaded on the reference
 * backend: the file gives bit for bit the logits of the reference
 * student holding the same latent weights. Q4_0 (a GGUF block type: the
 * file holds the codes and scales) and ASYM groups of 32 (the benchmark's
 * scheme: the file holds Q(w) as F32). */
static void export_round_trip(qkd_context *train, qkd_context *rc, const char *path,
                              const qkd_quant_params *qp, const char *file)
{
    qkd_model *teacher = NULL, *student = NULL, *mirror = NULL;
    qkd_quantizer *q = NULL, *rq = NULL;
    qkd_loss *loss = NULL;
    qkd_optimizer *opt = NULL;
    expect_ok(train, qkd_model_load(train, path, &teacher), "load teacher");
    expect_ok(train, qkd_model_load(train, path, &student), "load student");
    expect_ok(train, qkd_model_set_trainable(teacher, 0), "freeze teacher");
    expect_ok(train, qkd_model_set_matmul_precision(teacher, QKD_MATMUL_BF16), "precision");
    expect_ok(train, qkd_model_set_matmul_precision(student, QKD_MATMUL_BF16), "precision");
    expect_ok(train, qkd_quantizer_create(train, qp, &q), "quantizer");
    expect_ok(train, qkd_model_set_quantizer(student, q, QKD_QUANT_TARGET_LINEAR), "bind");
    loss = test_one_term_loss(train, QKD_LOSS_FKL, 0);
    qkd_optim_params op;
    qkd_optim_params_init(&op);
    op.lr = 1e-3f; /* enough to move weights across codes in a few steps */
    expect_ok(train, qkd_optimizer_create(student, &op, &opt), "optimizer");
    int32_t tokens[MB * MT];
    test_rng_seed(151);
    for (int i = 0; i < MB * MT; i++)
        tokens[i] = (int32_t)(test_rng_next(0, 1) * 512);
    for (int step = 0; step < 5; step++) {
        float value;
        expect_ok(train, qkd_model_forward(teacher, tokens, MB, MT), "teacher forward");
        expect_ok(train, qkd_model_forward(student, tokens, MB, MT), "student forward");
        expect_ok(train, qkd_loss_compute(loss, student, teacher, NULL, &value), "loss");
        expect_ok(train, qkd_model_zero_grad(student), "zero_grad");
        expect_ok(train, qkd_model_backward(student, NULL), "backward");
        expect_ok(train, qkd_optimizer_step(opt, NULL), "optimizer step");
    }
    expect_ok(train, qkd_model_save_gguf(student, file, NULL), "save");
    /* the same latent weights and quantizer on the reference */
    expect_ok(rc, qkd_model_load(rc, path, &mirror), "load mirror");
    expect_ok(rc, qkd_quantizer_create(rc, qp, &rq), "mirror quantizer");
    expect_ok(rc, qkd_model_set_quantizer(mirror, rq, QKD_QUANT_TARGET_LINEAR), "mirror bind");
    size_t moved = 0;
    for (int i = 0; i < qkd_model_n_tensors(student); i++) {
        qkd_tensor_info info = {.size = sizeof info};
        expect_ok(train, qkd_model_tensor_info(student, i, &info), "tensor info");
        const size_t n = (size_t)info.n_elements;
        float *w = test_vec_new(n), *w0 = test_vec_new(n);
        expect_ok(train, qkd_model_tensor_get(student, i, w, n), "tensor get");
        expect_ok(rc, qkd_model_tensor_get(mirror, i, w0, n), "mirror tensor get");
        for (size_t k = 0; k < n; k++)
            moved += w[k] != w0[k];
        expect_ok(rc, qkd_model_tensor_set(mirror, i, w, n), "mirror tensor set");
        free(w), free(w0);
    }
    ck_assert_msg(moved > 0, "training moved no weight");
    qkd_model *back = test_load_model(rc, file);
    const size_t nl = (size_t)MB * MT * 512;
    float *want = test_vec_new(nl), *got = test_vec_new(nl);
    expect_ok(rc, qkd_model_forward(mirror, tokens, MB, MT), "mirror forward");
    expect_ok(rc, qkd_model_logits(mirror, want, nl), "mirror logits");
    expect_ok(rc, qkd_model_forward(back, tokens, MB, MT), "file forward");
    expect_ok(rc, qkd_model_logits(back, got, nl), "file logits");
    ck_assert_msg(memcmp(got, want, nl * sizeof *got) == 0,
                  "scheme %d: the file's logits differ from the student's", qp->scheme);
    free(want), free(got);
    qkd_model_free(back), qkd_model_free(mirror), qkd_model_free(student);
    qkd_model_free(teacher);
    qkd_optimizer_free(opt), qkd_loss_free(loss);
    qkd_quantizer_free(q), qkd_quantizer_free(rq);
}

START_TEST(trained_student_exports)
{
    char *model = test_shared_dup("models/stories260K/stories260K.bin");
    if (!model)
        return;
    qkd_context *cc = cuda_context();
    if (!cc) {
        free(model);
        return;
    }
    qkd_context *rc = test_context(2);
    char *file = strdup(test_path_in(test_tmpdir(), "cuda_student.gguf"));
    ck_assert_ptr_nonnull(file);
    qkd_quant_params qp;
    qkd_quant_params_init(&qp);
    qp.scheme = QKD_QUANT_Q4_0;
    export_round_trip(cc, rc, model, &qp, file);
    qkd_quant_params_init(&qp);
    qp.scheme = QKD_QUANT_ASYM;
    qp.bits = 4;
    qp.group_size = 32;
    export_round_trip(cc, rc, model, &qp, file);
    free(model), free(file);
    qkd_context_free(cc);
    qkd_context_free(rc);
}
END_TEST

/* ---- the suite --------------------------------------------------------------------------------- */

Suite *suite_backend_cuda(void)
{
    Suite *s = suite_create("backend_cuda");
    TCase *tc = tcase_create("kernels");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, elementwise_equal_ref);
    tcase_add_test(tc, sums_match_ref);
    tcase_add_test(tc, optimizers_equal_ref);
    tcase_add_test(tc, multi_tensor_updates_match_ref);
    tcase_add_test(tc, adamw_multi_quantizes);
    tcase_add_test(tc, matmul_matches_ref);
    tcase_add_test(tc, matmul_bf16_matches_ref);
    tcase_add_test(tc, matmul_bf16_sees_writes);
    tcase_add_test(tc, matmul_bf16_bits_equal_bf16);
    tcase_add_test(tc, gemm_candidates_agree);
    tcase_add_test(tc, linears_backward_matches_ref);
    tcase_add_test(tc, bf16_bits_producers_round_fp32);
    tcase_add_test(tc, embedding_equals_ref);
    tcase_add_test(tc, rmsnorm_matches_ref);
    tcase_add_test(tc, rope_matches_ref);
    tcase_add_test(tc, attention_matches_ref);
    tcase_add_test(tc, attention_bf16_matches_ref);
    tcase_add_test(tc, attention_ignores_keys_past_queries);
    tcase_add_test(tc, swiglu_matches_ref);
    tcase_add_test(tc, softmax_family_matches_ref);
    tcase_add_test(tc, cross_entropy_matches_ref);
    tcase_add_test(tc, kd_loss_matches_ref);
    tcase_add_test(tc, kd_loss_confidence_matches);
    tcase_add_test(tc, tsld_and_max_prob_match_ref);
    tcase_add_test(tc, fakequant_matches_ref);
    tcase_add_test(tc, fakequant_bf16_matches_ref);
    tcase_add_test(tc, format_fakequant_matches_ref);
    tcase_add_test(tc, quant_rows_equal_ref);
    tcase_add_test(tc, table_complete);
    tcase_add_test(tc, cuda_errors_are_reported);
    tcase_add_test(tc, attention_head_limit);
    tcase_add_test(tc, auto_stays_on_cpu);
    suite_add_tcase(s, tc);

    TCase *model = tcase_create("model");
    tcase_set_timeout(model, 600);
    tcase_add_test(model, model_matches_ref);
    tcase_add_test(model, bf16_student_layers_share_qkv);
    tcase_add_test(model, frozen_teacher_keeps_matrices_on_host);
    tcase_add_test(model, kdqat_curve_follows_ref);
    tcase_add_test(model, kdqat_bf16_curve_follows_ref);
    tcase_add_test(model, trained_student_exports);
    suite_add_tcase(s, model);
    return s;
}

#else /* no CUDA backend in this build */

START_TEST(cuda_not_built)
{
    fprintf(stderr, "SKIP (backend_cuda): the CUDA backend is not built into this libqkd; "
                    "its kernels were not tested\n");
    qkd_context_params p;
    qkd_context_params_init(&p);
    p.backend = QKD_BACKEND_CUDA;
    qkd_context *ctx = NULL;
    ck_assert_int_eq(qkd_context_create(&p, &ctx), QKD_ERR_UNSUPPORTED);
    ck_assert_ptr_null(ctx);
}
END_TEST

Suite *suite_backend_cuda(void)
{
    Suite *s = suite_create("backend_cuda");
    TCase *tc = tcase_create("not_built");
    tcase_add_test(tc, cuda_not_built);
    suite_add_tcase(s, tc);
    return s;
}

#endif
