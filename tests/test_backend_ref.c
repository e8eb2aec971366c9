/* The reference backend against plain double-precision computations
 * written here, its backward kernels against central finite differences of
 * its forward kernels, and its results against thread count.
 *
 * Finite differences: inputs are O(1), the probe is L = sum(out * R) for a
 * random R (summed in double), the step is eps = 1e-2 and an analytic
 * gradient must be within FD_TOL * (1 + |numeric|) of the central
 * difference. With float outputs the rounding noise of the difference is
 * about 1e-6 / eps = 1e-4 and the truncation error about eps^2 = 1e-4,
 * while a wrong gradient is off by O(1). */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/half.h"
#include "core/core.h"
#include "testutil.h"

#define FD_EPS 1e-2
#define FD_TOL 2e-3
/* Forward kernels against double references: a few float roundings. */
#define FWD_TOL 1e-5

/* ---- helpers ------------------------------------------------------------------ */

static double weighted_sum(const float *y, const float *R, size_t n)
{
    double s = 0.0;
    for (size_t i = 0; i < n; i++)
        s += (double)y[i] * R[i];
    return s;
}

/* Every got[i] within tol * (1 + |want[i]|) of want[i]. */
static void assert_close(const char *what, const float *got, const double *want, size_t n,
                         double tol)
{
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(fabs(got[i] - want[i]) <= tol * (1.0 + fabs(want[i])),
                      "%s[%zu]: got %.9g, want %.9g", what, i, got[i], want[i]);
}

/* L = sum(out * R), computed through the forward kernel. */
typedef double (*probe_fn)(const void *state);

/* Central differences of probe with respect to every x[i] against the
 * analytic gradient grad - prior (backward kernels add into their outputs;
 * prior NULL means the gradient started at zero). */
static void check_gradient(const char *what, float *x, size_t n, const float *grad,
                           const float *prior, probe_fn probe, const void *state)
{
    for (size_t i = 0; i < n; i++) {
        float saved = x[i];
        float up = (float)(saved + FD_EPS), down = (float)(saved - FD_EPS);
        x[i] = up;
        double lp = probe(state);
        x[i] = down;
        double lm = probe(state);
        x[i] = saved;
        double numeric = (lp - lm) / ((double)up - down);
        double analytic = (double)grad[i] - (prior ? prior[i] : 0.0f);
        ck_assert_msg(fabs(numeric - analytic) <= FD_TOL * (1.0 + fabs(numeric)),
                      "%s[%zu]: analytic %.7g, finite difference %.7g", what, i, analytic,
                      numeric);
    }
}

/* ---- the table and memory ---------------------------------------------------------- */

START_TEST(test_table_complete)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    ck_assert_uint_eq(b->abi, QKD__BACKEND_ABI);
    ck_assert_str_eq(b->name, "ref");
    ck_assert_ptr_eq(b->ctx, ctx);
#define SLOT(name) {#name, b->name != NULL}
    const struct {
        const char *name;
        bool set;
    } slots[] = {
        SLOT(destroy), SLOT(extra), SLOT(alloc), SLOT(free), SLOT(upload), SLOT(download),
        SLOT(sync), SLOT(fill), SLOT(copy), SLOT(add), SLOT(axpy), SLOT(scale), SLOT(sum),
        SLOT(sum_squares), SLOT(matmul_forward), SLOT(matmul_backward_input),
        SLOT(matmul_backward_weight), SLOT(matmul_forward_bf16),
        SLOT(matmul_backward_input_bf16), SLOT(matmul_backward_weight_bf16),
        SLOT(embedding_forward), SLOT(embedding_backward),
        SLOT(rmsnorm_forward), SLOT(rmsnorm_backward), SLOT(rope_forward), SLOT(rope_backward),
        SLOT(attention_scratch_floats), SLOT(attention_forward), SLOT(attention_backward),
        SLOT(attention_forward_bf16), SLOT(attention_backward_bf16),
        SLOT(swiglu_forward), SLOT(swiglu_backward), SLOT(softmax_forward),
        SLOT(softmax_backward), SLOT(log_softmax_forward), SLOT(log_softmax_backward),
        SLOT(cross_entropy_forward), SLOT(cross_entropy_backward), SLOT(adamw_update),
    };
#undef SLOT
    for (size_t i = 0; i < sizeof slots / sizeof slots[0]; i++)
        ck_assert_msg(slots[i].set, "slot %s is NULL", slots[i].name);
    ck_assert_ptr_null(b->extra(b, "flash_attention"));
    /* probabilities [B][n_heads][Tq][kv_len], then the bf16 slots' room:
     * rotated q and k, dq, dk and dv, the output's values */
    ck_assert_uint_eq(b->attention_scratch_floats(b, 2, 3, 5, 4, 2, 8),
                      2 * 4 * 3 * 5 + 3 * (2 * 3 * 4 * 8) + 3 * (2 * 5 * 2 * 8));
    qkd_context_free(ctx);
}
END_TEST

START_TEST(test_memory_roundtrip)
{
    qkd_context *ctx = test_context(1);
    qkd__backend *b = ctx->backend;
    unsigned char src[100], back[100];
    for (int i = 0; i < 100; i++)
        src[i] = (unsigned char)(i * 7 + 3);
    void *dev = NULL;
    ck_assert_int_eq(b->alloc(b, sizeof src, &dev), QKD_OK);
    ck_assert_ptr_nonnull(dev);
    ck_assert_uint_eq((uintptr_t)dev % 64, 0);
    ck_assert_int_eq(b->upload(b, dev, src, sizeof src), QKD_OK);
    ck_assert_int_eq(b->download(b, back, dev, sizeof back), QKD_OK);
    ck_assert_int_eq(b->sync(b), QKD_OK);
    ck_assert_mem_eq(src, back, sizeof src);
    b->free(b, dev);
    b->free(b, NULL);

    ck_assert_int_eq(b->alloc(b, 0, &dev), QKD_ERR_INVALID_ARG);
    ck_assert_ptr_null(dev);
    qkd_context_free(ctx);
}
END_TEST

static int fail_allocs;

static void *failing_alloc(void *user, size_t size)
{
    (void)user;
    return fail_allocs ? NULL : malloc(size);
}

static void plain_free(void *user, void *ptr)
{
    (void)user;
    free(ptr);
}

START_TEST(test_memory_out_of_memory)
{
    qkd_context_params p;
    qkd_context_params_init(&p);
    p.n_threads = 1;
    p.backend = QKD_BACKEND_REF;
    p.alloc = failing_alloc;
    p.free = plain_free;
    qkd_context *ctx = NULL;
    fail_allocs = 0;
    ck_assert_int_eq(qkd_context_create(&p, &ctx), QKD_OK);
    qkd__backend *b = ctx->backend;
    void *dev = (void *)&p;
    fail_allocs = 1;
    ck_assert_int_eq(b->alloc(b, 4096, &dev), QKD_ERR_NO_MEMORY);
    fail_allocs = 0;
    ck_assert_ptr_null(dev);
    ck_assert_msg(strstr(qkd_context_last_error(ctx), "4096") != NULL,
                  "message names the size: %s", qkd_context_last_error(ctx));
    qkd_context_free(ctx);
}
END_TEST

/* ---- elementwise ---------------------------------------------------------------------- */

START_TEST(test_elementwise)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(1);
    enum { n = 37 };
    float *x = test_vec_rand(n, -1, 1), *y = test_vec_rand(n, -1, 1), *out = test_vec_new(n);
    double want[n];

    b->fill(b, out, 0.25f, n);
    for (int i = 0; i < n; i++)
        ck_assert_float_eq(out[i], 0.25f);
    b->copy(b, out, x, n);
    ck_assert_mem_eq(out, x, n * sizeof *x);

    b->add(b, out, x, y, n);
    for (int i = 0; i < n; i++)
        want[i] = (double)x[i] + y[i];
    assert_close("add", out, want, n, 1e-7);

    b->copy(b, out, y, n);
    b->axpy(b, out, -1.5f, x, n);
    for (int i = 0; i < n; i++)
        want[i] = y[i] - 1.5 * x[i];
    assert_close("axpy", out, want, n, 1e-7);

    b->copy(b, out, x, n);
    b->scale(b, out, 3.0f, n);
    for (int i = 0; i < n; i++)
        want[i] = 3.0 * x[i];
    assert_close("scale", out, want, n, 1e-7);

    double s = 0.0, ss = 0.0;
    for (int i = 0; i < n; i++) {
        s += x[i];
        ss += (double)x[i] * x[i];
    }
    float got;
    b->sum(b, &got, x, n);
    assert_close("sum", &got, &s, 1, 1e-7);
    b->sum_squares(b, &got, x, n);
    assert_close("sum_squares", &got, &ss, 1, 1e-7);
    free(x);
    free(y);
    free(out);
    qkd_context_free(ctx);
}
END_TEST

/* ---- matmul ----------------------------------------------------------------------------- */

/* Ragged shapes, the second one spanning two column blocks of the kernel. */
static const int matmul_shapes[][3] = {{7, 13, 5}, {3, 130, 4}};

struct matmul_probe {
    qkd__backend *b;
    float *out;
    const float *inp, *w, *R;
    int N, C, OC;
};

static double matmul_probe_fn(const void *state)
{
    const struct matmul_probe *s = state;
    s->b->matmul_forward(s->b, s->out, s->inp, s->w, s->N, s->C, s->OC);
    return weighted_sum(s->out, s->R, (size_t)s->N * s->OC);
}

START_TEST(test_matmul_forward)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(2);
    for (int s = 0; s < 2; s++) {
        int N = matmul_shapes[s][0], C = matmul_shapes[s][1], OC = matmul_shapes[s][2];
        float *inp = test_vec_rand((size_t)N * C, -1, 1), *w = test_vec_rand((size_t)OC * C, -1, 1);
        float *out = test_vec_new((size_t)N * OC);
        double *want = test_dvec_new((size_t)N * OC);
        for (int n = 0; n < N; n++)
            for (int o = 0; o < OC; o++)
                for (int c = 0; c < C; c++)
                    want[n * OC + o] += (double)inp[n * C + c] * w[o * C + c];
        b->matmul_forward(b, out, inp, w, N, C, OC);
        assert_close("matmul out", out, want, (size_t)N * OC, FWD_TOL);
        free(inp);
        free(w);
        free(out);
        free(want);
    }
    qkd_context_free(ctx);
}
END_TEST

/* which = 0: gradient of the input, 1: of the weight. */
static void matmul_backward_case(int which)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(3 + (uint64_t)which);
    for (int s = 0; s < 2; s++) {
        int N = matmul_shapes[s][0], C = matmul_shapes[s][1], OC = matmul_shapes[s][2];
        size_t n_inp = (size_t)N * C, n_w = (size_t)OC * C;
        float *inp = test_vec_rand(n_inp, -1, 1), *w = test_vec_rand(n_w, -1, 1);
        float *R = test_vec_rand((size_t)N * OC, -1, 1), *out = test_vec_new((size_t)N * OC);
        struct matmul_probe st = {b, out, inp, w, R, N, C, OC};
        if (which == 0) {
            float *prior = test_vec_rand(n_inp, -1, 1), *g = test_vec_copy(prior, n_inp);
            b->matmul_backward_input(b, g, R, w, N, C, OC);
            check_gradient("matmul dinp", inp, n_inp, g, prior, matmul_probe_fn, &st);
            free(prior);
            free(g);
        } else {
            float *prior = test_vec_rand(n_w, -1, 1), *g = test_vec_copy(prior, n_w);
            b->matmul_backward_weight(b, g, R, inp, N, C, OC);
            check_gradient("matmul dw", w, n_w, g, prior, matmul_probe_fn, &st);
            free(prior);
            free(g);
        }
        free(inp);
        free(w);
        free(R);
        free(out);
    }
    qkd_context_free(ctx);
}

START_TEST(test_matmul_backward_input)
{
    matmul_backward_case(0);
}
END_TEST

START_TEST(test_matmul_backward_weight)
{
    matmul_backward_case(1);
}
END_TEST

/* x rounded to bfloat16, nearest even (finite x), by its bits: written
 * apart from lib/core/half.c so the test does not check the library
 * against itself. */
static double bf16(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    float r;
    memcpy(&r, &u, sizeof r);
    return r;
}

/* The bf16 products: every input rounded to bf16, sums in double. */
START_TEST(test_matmul_bf16)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(5);
    const int N = 9, C = 70, OC = 11;
    float *x = test_vec_rand((size_t)N * C, -1, 1), *w = test_vec_rand((size_t)OC * C, -1, 1);
    float *dy = test_vec_rand((size_t)N * OC, -1, 1);
    float *y = test_vec_new((size_t)N * OC), *dx = test_vec_new((size_t)N * C);
    float *dw = test_vec_new((size_t)OC * C);
    double *want_y = test_dvec_new((size_t)N * OC), *want_dx = test_dvec_new((size_t)N * C);
    double *want_dw = test_dvec_new((size_t)OC * C);
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++)
            for (int c = 0; c < C; c++) {
                want_y[n * OC + o] += bf16(x[n * C + c]) * bf16(w[o * C + c]);
                want_dx[n * C + c] += bf16(dy[n * OC + o]) * bf16(w[o * C + c]);
                want_dw[o * C + c] += bf16(dy[n * OC + o]) * bf16(x[n * C + c]);
            }
    b->matmul_forward_bf16(b, y, x, w, N, C, OC);
    b->matmul_backward_input_bf16(b, dx, dy, w, N, C, OC);
    b->matmul_backward_weight_bf16(b, dw, dy, x, N, C, OC);
    assert_close("bf16 matmul out", y, want_y, (size_t)N * OC, FWD_TOL);
    assert_close("bf16 matmul dinp", dx, want_dx, (size_t)N * C, FWD_TOL);
    assert_close("bf16 matmul dw", dw, want_dw, (size_t)OC * C, FWD_TOL);
    /* ... and the rounding is real: the fp32 product differs. */
    float *y32 = test_vec_new((size_t)N * OC);
    b->matmul_forward(b, y32, x, w, N, C, OC);
    double most = 0.0;
    for (int i = 0; i < N * OC; i++)
        most = fmax(most, fabs((double)y32[i] - y[i]));
    ck_assert_double_gt(most, 1e-3);
    free(x), free(w), free(dy), free(y), free(dx), free(dw), free(y32);
    free(want_y), free(want_dx), free(want_dw);
    qkd_context_free(ctx);
}
END_TEST

/* n bf16 bits from a vector of floats: their rounding. */
static uint16_t *bits_of(const float *x, size_t n)
{
    uint16_t *b = malloc((n ? n : 1) * sizeof *b);
    ck_assert_ptr_nonnull(b);
    for (size_t i = 0; i < n; i++)
        b[i] = qkd__f32_to_bf16(x[i]);
    return b;
}

/* x rounded to bf16 in place by the backend, against the bits' values. */
static void assert_rounds(qkd__backend *b, float *x, size_t n)
{
    uint16_t *want = bits_of(x, n);
    b->round_to_bf16(b, x, n);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(x[i] == qkd__bf16_to_f32(want[i]), "round_to_bf16 [%zu]: %.9g", i,
                      (double)x[i]);
    free(want);
}

static void assert_bits(const char *what, const uint16_t *got, const float *f32, size_t n)
{
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(got[i] == qkd__f32_to_bf16(f32[i]), "%s [%zu]: 0x%04x, fp32 %.9g", what,
                      i, got[i], (double)f32[i]);
}

/* The bf16-bits family: the products on bits equal the bf16 products on
 * the values the bits decode to, and the producers (the products written
 * as bits too) write their fp32 forms' outputs rounded (SwiGLU's
 * backward: into zeroed gradients), bit for bit. */
START_TEST(test_bf16_bits_family)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(6);
    const int N = 9, C = 70, OC = 11;
    const size_t nx = (size_t)N * C, nw = (size_t)OC * C, ny = (size_t)N * OC;
    float *x = test_vec_rand(nx, -1, 1), *w = test_vec_rand(nw, -1, 1);
    float *dy = test_vec_rand(ny, -1, 1);
    uint16_t *xb = bits_of(x, nx), *wb = bits_of(w, nw), *dyb = bits_of(dy, ny);
    float *y = test_vec_new(ny), *dx = test_vec_new(nx), *dw = test_vec_new(nw);
    float *y2 = test_vec_new(ny), *dx2 = test_vec_new(nx), *dw2 = test_vec_new(nw);
    b->matmul_forward_bf16(b, y, x, w, N, C, OC);
    b->matmul_backward_input_bf16(b, dx, dy, w, N, C, OC);
    b->matmul_backward_weight_bf16(b, dw, dy, x, N, C, OC);
    const qkd__bf16_in xi = {.bits = xb}, wi = {.bits = wb}, dyi = {.bits = dyb};
    b->matmul_forward_bf16_bits(b, y2, xi, wi, N, C, OC);
    b->matmul_backward_input_bf16_bits(b, dx2, dyi, wi, N, C, OC, 1);
    b->matmul_backward_weight_bf16_bits(b, dw2, dyi, xi, N, C, OC, 1);
    ck_assert_mem_eq(y2, y, ny * sizeof *y);
    ck_assert_mem_eq(dx2, dx, nx * sizeof *dx);
    ck_assert_mem_eq(dw2, dw, nw * sizeof *dw);
    /* accumulate 0 writes: NaN in the buffer is not read */
    for (size_t i = 0; i < nx; i++)
        dx2[i] = NAN;
    for (size_t i = 0; i < nw; i++)
        dw2[i] = NAN;
    b->matmul_backward_input_bf16_bits(b, dx2, dyi, wi, N, C, OC, 0);
    b->matmul_backward_weight_bf16_bits(b, dw2, dyi, xi, N, C, OC, 0);
    ck_assert_mem_eq(dx2, dx, nx * sizeof *dx);
    ck_assert_mem_eq(dw2, dw, nw * sizeof *dw);
    uint16_t *yb16 = bits_of(y, ny), *dxb16 = bits_of(dx, nx); /* overwritten */
    memset(yb16, 0xff, ny * sizeof *yb16);
    memset(dxb16, 0xff, nx * sizeof *dxb16);
    b->matmul_forward_to_bf16_bits(b, yb16, xi, wi, N, C, OC);
    b->matmul_backward_input_to_bf16_bits(b, dxb16, dyi, wi, N, C, OC);
    assert_bits("matmul_forward_to_bf16_bits", yb16, y, ny);
    assert_bits("matmul_backward_input_to_bf16_bits", dxb16, dx, nx);
    free(yb16), free(dxb16);

    float *nw_ = test_vec_rand((size_t)C, 0.5, 1.5), *r = test_vec_new((size_t)N);
    float *r2 = test_vec_new((size_t)N);
    uint16_t *yb = bits_of(x, nx); /* overwritten */
    b->rmsnorm_forward(b, dx, r, x, nw_, N, C, 1e-5f);
    b->rmsnorm_forward_bf16_bits(b, yb, r2, x, nw_, N, C, 1e-5f);
    assert_bits("rmsnorm_forward_bf16_bits", yb, dx, nx);
    ck_assert_mem_eq(r2, r, (size_t)N * sizeof *r);
    /* the residual add of bits y and its norm: `add` of y's values, then the above */
    float *sum = test_vec_new(nx), *sum2 = test_vec_new(nx), *yv = test_vec_new(nx);
    uint16_t *nb = bits_of(x, nx);
    for (size_t i = 0; i < nx; i++)
        yv[i] = qkd__bf16_to_f32(xb[i]);
    b->add(b, sum, dx, yv, nx);
    b->rmsnorm_forward_bf16_bits(b, yb, r, sum, nw_, N, C, 1e-5f);
    b->add_rmsnorm_forward_bf16_bits(b, sum2, nb, r2, dx, xb, nw_, N, C, 1e-5f);
    ck_assert_mem_eq(sum2, sum, nx * sizeof *sum);
    ck_assert_mem_eq(nb, yb, nx * sizeof *yb);
    ck_assert_mem_eq(r2, r, (size_t)N * sizeof *r);
    free(sum), free(sum2), free(yv), free(nb);

    /* SwiGLU's inputs as bits against their rounded values as floats */
    float *gate = test_vec_rand(nx, -8, 8), *up = test_vec_rand(nx, -2, 2);
    float *dg = test_vec_new(nx), *du = test_vec_new(nx);
    uint16_t *dgb = bits_of(x, nx), *dub = bits_of(x, nx);
    uint16_t *gateb = bits_of(gate, nx), *upb = bits_of(up, nx);
    assert_rounds(b, gate, nx);
    assert_rounds(b, up, nx);
    b->swiglu_forward(b, dx, gate, up, nx);
    b->swiglu_forward_bf16_bits(b, yb, gateb, upb, nx);
    assert_bits("swiglu_forward_bf16_bits", yb, dx, nx);
    assert_rounds(b, x, nx); /* now xb's values: the gradient flowing in */
    b->swiglu_backward(b, dg, du, x, gate, up, nx); /* into zeroed dg, du */
    b->swiglu_backward_bf16_bits(b, dgb, dub, (size_t)C, NULL, xb, gateb, upb, (size_t)N,
                                 (size_t)C);
    assert_bits("swiglu_backward_bf16_bits dgate", dgb, dg, nx);
    assert_bits("swiglu_backward_bf16_bits dup", dub, du, nx);
    /* in rows: a row of dgate, then its row of dup; and the forward's
     * output again, bit for bit */
    uint16_t *rows = malloc(2 * nx * sizeof *rows), *again = bits_of(x, nx);
    ck_assert_ptr_nonnull(rows);
    b->swiglu_backward_bf16_bits(b, rows, rows + C, 2 * (size_t)C, again, xb, gateb, upb,
                                 (size_t)N, (size_t)C);
    for (size_t i = 0; i < nx; i++) {
        const size_t at = i / (size_t)C * 2 * (size_t)C + i % (size_t)C;
        ck_assert_uint_eq(rows[at], dgb[i]);
        ck_assert_uint_eq(rows[at + (size_t)C], dub[i]);
    }
    ck_assert_mem_eq(again, yb, nx * sizeof *yb);
    free(rows), free(again);

    for (int scheme = QKD_QUANT_SYM; scheme <= QKD_QUANT_TERNARY; scheme++) {
        const qkd__quant_spec spec = {.scheme = scheme, .bits = 4, .group = 32, .clip_ratio = 0.9f};
        float s1[3 * 9], z1[3 * 9], s2[3 * 9], z2[3 * 9]; /* 9 rows of 70: 3 groups each */
        b->fakequant_forward(b, dx, s1, z1, x, N, C, &spec);
        b->fakequant_forward_bf16(b, yb, s2, z2, x, N, C, &spec);
        assert_bits("fakequant_forward_bf16", yb, dx, nx);
        ck_assert_mem_eq(s2, s1, sizeof s1);
        ck_assert_mem_eq(z2, z1, sizeof z1);
    }
    free(x), free(w), free(dy), free(xb), free(wb), free(dyb), free(y), free(dx), free(dw);
    free(y2), free(dx2), free(dw2), free(nw_), free(r), free(r2), free(yb);
    free(gate), free(up), free(dg), free(du), free(dgb), free(dub), free(gateb), free(upb);
    qkd_context_free(ctx);
}
END_TEST

/* Attention in bf16 precision, written plainly in double: scores from
 * bf16 q and k; out from the float probabilities and v, both rounded;
 * the backward's probability gradients from bf16 dout and v with the
 * unrounded row term dout . out; dq, dk, dv from the rounded float score
 * gradients, probabilities, q, k and dout. B 1, one kv head for two
 * query heads, hd 9, T 6. */
enum { AB_T = 6, AB_NH = 2, AB_HD = 9 };

static void attention_bf16_direct(const float *q, const float *k, const float *v,
                                  const float *dout, const float *out, double *want_out,
                                  double *dq, double *dk, double *dv)
{
    const double scale = 1.0 / sqrt((double)AB_HD);
    for (int h = 0; h < AB_NH; h++)
        for (int t = 0; t < AB_T; t++) {
            const float *qr = q + (t * AB_NH + h) * AB_HD, *gr = dout + (t * AB_NH + h) * AB_HD;
            double sc[AB_T], mx = -INFINITY, sum = 0.0, d = 0.0;
            float p[AB_T];
            for (int j = 0; j <= t; j++) {
                sc[j] = 0.0;
                for (int c = 0; c < AB_HD; c++)
                    sc[j] += bf16(qr[c]) * bf16(k[j * AB_HD + c]);
                sc[j] *= scale;
                mx = fmax(mx, sc[j]);
            }
            for (int j = 0; j <= t; j++)
                sum += exp(sc[j] - mx);
            for (int c = 0; c < AB_HD; c++)
                d += (double)gr[c] * out[(t * AB_NH + h) * AB_HD + c];
            for (int j = 0; j <= t; j++) {
                p[j] = (float)(exp(sc[j] - mx) / sum);
                double dp = 0.0;
                for (int c = 0; c < AB_HD; c++)
                    dp += bf16(gr[c]) * bf16(v[j * AB_HD + c]);
                double ds = bf16((float)(p[j] * (dp - d)));
                for (int c = 0; c < AB_HD; c++) {
                    want_out[(t * AB_NH + h) * AB_HD + c] += bf16(p[j]) * bf16(v[j * AB_HD + c]);
                    dq[(t * AB_NH + h) * AB_HD + c] += scale * ds * bf16(k[j * AB_HD + c]);
                    dk[j * AB_HD + c] += scale * ds * bf16(qr[c]);
                    dv[j * AB_HD + c] += bf16(p[j]) * bf16(gr[c]);
                }
            }
        }
}

START_TEST(test_attention_bf16)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(6);
    const size_t nq = AB_T * AB_NH * AB_HD, nkv = AB_T * AB_HD;
    float *q = test_vec_rand(nq, -2, 2), *k = test_vec_rand(nkv, -2, 2), *v = test_vec_rand(nkv, -1, 1);
    float *dout = test_vec_rand(nq, -1, 1), *out = test_vec_new(nq), *out32 = test_vec_new(nq);
    float *dq = test_vec_new(nq), *dk = test_vec_new(nkv), *dv = test_vec_new(nkv), *dq32 = test_vec_new(nq);
    float *dk32 = test_vec_new(nkv), *dv32 = test_vec_new(nkv);
    float *P = test_vec_new(b->attention_scratch_floats(b, 1, AB_T, AB_T, AB_NH, 1, AB_HD));
    double *want_out = test_dvec_new(nq), *want_dq = test_dvec_new(nq), *want_dk = test_dvec_new(nkv);
    double *want_dv = test_dvec_new(nkv);
    b->attention_forward_bf16(b, out, NULL, P, q, k, v, 1, AB_T, 0, AB_T, AB_NH, 1, AB_HD, 0.0f);
    b->attention_backward_bf16(b, dq, dk, dv, dout, P, q, k, v, qkd__bf16_f32(out), 1, AB_T,
                               AB_NH, 1, AB_HD, 0.0f, NULL);
    attention_bf16_direct(q, k, v, dout, out, want_out, want_dq, want_dk, want_dv);
    assert_close("bf16 attention out", out, want_out, nq, FWD_TOL);
    assert_close("bf16 attention dq", dq, want_dq, nq, FWD_TOL);
    assert_close("bf16 attention dk", dk, want_dk, nkv, FWD_TOL);
    assert_close("bf16 attention dv", dv, want_dv, nkv, FWD_TOL);
    /* ... and the rounding is real: the fp32 slots differ. */
    b->attention_forward(b, out32, P, q, k, v, 1, AB_T, 0, AB_T, AB_NH, 1, AB_HD);
    b->attention_backward(b, dq32, dk32, dv32, dout, P, q, k, v, out32, 1, AB_T, AB_NH, 1,
                          AB_HD);
    double most_out = 0.0, most_dq = 0.0, most_dk = 0.0, most_dv = 0.0;
    for (size_t i = 0; i < nq; i++) {
        most_out = fmax(most_out, fabs((double)out32[i] - out[i]));
        most_dq = fmax(most_dq, fabs((double)dq32[i] - dq[i]));
    }
    for (size_t i = 0; i < nkv; i++) {
        most_dk = fmax(most_dk, fabs((double)dk32[i] - dk[i]));
        most_dv = fmax(most_dv, fabs((double)dv32[i] - dv[i]));
    }
    ck_assert_double_gt(most_out, 1e-4);
    ck_assert_double_gt(most_dq, 1e-4);
    ck_assert_double_gt(most_dk, 1e-4);
    ck_assert_double_gt(most_dv, 1e-4);
    free(q), free(k), free(v), free(dout), free(out), free(out32), free(dq), free(dk);
    free(dv), free(dq32), free(dk32), free(dv32), free(P);
    free(want_out), free(want_dq), free(want_dk), free(want_dv);
    qkd_context_free(ctx);
}
END_TEST

/* n floats of NaN. */
static float *nan_vec(size_t n)
{
    float *x = test_vec_new(n);
    for (size_t i = 0; i < n; i++)
        x[i] = NAN;
    return x;
}

/* RoPE inside the bf16 slots (rope_theta > 0) is rope_forward on q and k
 * (query row t at pos0 + t, key j at j) and then the slot without it; the
 * backward writes rope_backward of the rotated inputs' gradients into dq
 * and dk. Bit for bit: the same kernels in the same order. The forward's
 * out_bits hold its output rounded to bf16, the backward's dqkv_bits its
 * gradients. */
enum { AR_B = 2, AR_H = 4, AR_KV = 2, AR_HD = 6, AR_T = 7 };
#define AR_THETA 500.0f

static void attention_rope_case(qkd__backend *b, int Tq, int pos0, int kv_len)
{
    const size_t nq = (size_t)AR_B * Tq * AR_H * AR_HD, nk = (size_t)AR_B * kv_len * AR_KV * AR_HD;
    const size_t np = b->attention_scratch_floats(b, AR_B, Tq, kv_len, AR_H, AR_KV, AR_HD);
    float *q = test_vec_rand(nq, -2, 2), *k = test_vec_rand(nk, -2, 2);
    float *v = test_vec_rand(nk, -1, 1);
    float *qr = test_vec_new(nq), *kr = test_vec_new(nk), *P = test_vec_new(np);
    float *P_want = test_vec_new(np), *out = test_vec_new(nq), *want = test_vec_new(nq);
    uint16_t *bits = calloc(nq, sizeof *bits);
    memcpy(qr, q, nq * sizeof *q);
    memcpy(kr, k, nk * sizeof *k);
    b->rope_forward(b, qr, AR_B, Tq, AR_H, AR_HD, pos0, AR_THETA);
    b->rope_forward(b, kr, AR_B, kv_len, AR_KV, AR_HD, 0, AR_THETA);
    b->attention_forward_bf16(b, out, bits, P, q, k, v, AR_B, Tq, pos0, kv_len, AR_H, AR_KV,
                              AR_HD, AR_THETA);
    b->attention_forward_bf16(b, want, NULL, P_want, qr, kr, v, AR_B, Tq, pos0, kv_len, AR_H, AR_KV,
                              AR_HD, 0.0f);
    ck_assert_mem_eq(out, want, nq * sizeof *out);
    for (size_t i = 0; i < nq; i++) /* out_bits: the output rounded */
        ck_assert_uint_eq(bits[i], qkd__f32_to_bf16(out[i]));
    uint16_t *only = calloc(nq, sizeof *only); /* out NULL: the bits alone, the same */
    b->attention_forward_bf16(b, NULL, only, P, q, k, v, AR_B, Tq, pos0, kv_len, AR_H, AR_KV,
                              AR_HD, AR_THETA);
    ck_assert_mem_eq(only, bits, nq * sizeof *bits);
    free(only);
    if (pos0 == 0 && kv_len == Tq) {
        /* every gradient starts as NaN: the bf16 backward writes them */
        float *dout = test_vec_rand(nq, -1, 1), *dq = nan_vec(nq), *dk = nan_vec(nk);
        float *dv = nan_vec(nk), *gq = nan_vec(nq), *gk = nan_vec(nk), *gv = nan_vec(nk);
        float *gq_rot = test_vec_new(nq);
        b->attention_backward_bf16(b, gq, gk, gv, dout, P_want, qr, kr, v, qkd__bf16_f32(want),
                                   AR_B, Tq, AR_H, AR_KV, AR_HD, 0.0f, NULL);
        for (size_t i = 0; i < nq; i++)
            ck_assert(isfinite(gq[i]));
        for (size_t i = 0; i < nk; i++)
            ck_assert(isfinite(gk[i]) && isfinite(gv[i]));
        memcpy(gq_rot, gq, nq * sizeof *gq);
        b->rope_backward(b, gq, AR_B, Tq, AR_H, AR_HD, 0, AR_THETA);
        b->rope_backward(b, gk, AR_B, Tq, AR_KV, AR_HD, 0, AR_THETA);
        b->attention_backward_bf16(b, dq, dk, dv, dout, P, q, k, v, qkd__bf16_f32(out), AR_B,
                                   Tq, AR_H, AR_KV, AR_HD, AR_THETA, NULL);
        ck_assert_mem_eq(dq, gq, nq * sizeof *dq);
        ck_assert_mem_eq(dk, gk, nk * sizeof *dk);
        ck_assert_mem_eq(dv, gv, nk * sizeof *dv);
        /* dqkv_bits: the same gradients rounded, dq then dk then dv */
        uint16_t *gbits = calloc(nq + 2 * nk, sizeof *gbits);
        b->attention_backward_bf16(b, NULL, NULL, NULL, dout, P, q, k, v, qkd__bf16_f32(out),
                                   AR_B, Tq, AR_H, AR_KV, AR_HD, AR_THETA, gbits);
        for (size_t i = 0; i < nq; i++)
            ck_assert_uint_eq(gbits[i], qkd__f32_to_bf16(dq[i]));
        for (size_t i = 0; i < nk; i++) {
            ck_assert_uint_eq(gbits[nq + i], qkd__f32_to_bf16(dk[i]));
            ck_assert_uint_eq(gbits[nq + nk + i], qkd__f32_to_bf16(dv[i]));
        }
        free(gbits);
        /* out given as its bits: the backward of the values they decode to */
        float *outr = test_vec_new(nq), *rq = nan_vec(nq), *bq = nan_vec(nq);
        for (size_t i = 0; i < nq; i++)
            outr[i] = qkd__bf16_to_f32(bits[i]);
        b->attention_backward_bf16(b, rq, gk, gv, dout, P, q, k, v, qkd__bf16_f32(outr), AR_B,
                                   Tq, AR_H, AR_KV, AR_HD, AR_THETA, NULL);
        b->attention_backward_bf16(b, bq, gk, gv, dout, P, q, k, v,
                                   (qkd__bf16_in){.bits = bits}, AR_B, Tq, AR_H, AR_KV, AR_HD,
                                   AR_THETA, NULL);
        ck_assert_mem_eq(bq, rq, nq * sizeof *rq);
        ck_assert(memcmp(rq, dq, nq * sizeof *dq) != 0); /* the rounding moved dq */
        free(outr), free(rq), free(bq);
        /* the rotation is real: the rotated copy's gradient differs */
        ck_assert(memcmp(gq_rot, dq, nq * sizeof *dq) != 0);
        free(dout), free(dq), free(dk), free(dv), free(gq), free(gk), free(gv), free(gq_rot);
    }
    free(q), free(k), free(v), free(qr), free(kr), free(P), free(P_want), free(out), free(want);
    free(bits);
}

START_TEST(test_attention_bf16_rope)
{
    qkd_context *ctx = test_context(2);
    test_rng_seed(16);
    attention_rope_case(ctx->backend, AR_T, 0, AR_T);     /* training */
    attention_rope_case(ctx->backend, 2, 3, 5);           /* decoding: keys at 0..4 */
    qkd_context_free(ctx);
}
END_TEST

/* ---- embedding -------------------------------------------------------------------------- */

enum { EMB_N = 7, EMB_C = 13, EMB_V = 9 };
static const int32_t emb_ids[EMB_N] = {3, 0, 8, 3, 5, 3, 0}; /* repeats; rows 1,2,4,6,7 unused */

START_TEST(test_embedding_forward)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(5);
    float *table = test_vec_rand(EMB_V * EMB_C, -1, 1), *out = test_vec_new(EMB_N * EMB_C);
    b->embedding_forward(b, out, emb_ids, table, EMB_N, EMB_C);
    for (int i = 0; i < EMB_N; i++)
        ck_assert_mem_eq(out + i * EMB_C, table + emb_ids[i] * EMB_C, EMB_C * sizeof *out);
    free(table);
    free(out);
    qkd_context_free(ctx);
}
END_TEST

struct embedding_probe {
    qkd__backend *b;
    float *out;
    const float *table, *R;
};

static double embedding_probe_fn(const void *state)
{
    const struct embedding_probe *s = state;
    s->b->embedding_forward(s->b, s->out, emb_ids, s->table, EMB_N, EMB_C);
    return weighted_sum(s->out, s->R, EMB_N * EMB_C);
}

START_TEST(test_embedding_backward)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(6);
    float *table = test_vec_rand(EMB_V * EMB_C, -1, 1), *out = test_vec_new(EMB_N * EMB_C);
    float *R = test_vec_rand(EMB_N * EMB_C, -1, 1);
    float *prior = test_vec_rand(EMB_V * EMB_C, -1, 1), *g = test_vec_copy(prior, EMB_V * EMB_C);
    b->embedding_backward(b, g, R, emb_ids, EMB_N, EMB_C, EMB_V);
    struct embedding_probe st = {b, out, table, R};
    check_gradient("embedding dtable", table, EMB_V * EMB_C, g, prior, embedding_probe_fn, &st);
    free(table);
    free(out);
    free(R);
    free(prior);
    free(g);
    qkd_context_free(ctx);
}
END_TEST

/* ---- RMSNorm ---------------------------------------------------------------------------- */

enum { NORM_N = 7, NORM_C = 13 };
#define NORM_EPS 1e-5f

START_TEST(test_rmsnorm_forward)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(7);
    float *inp = test_vec_rand(NORM_N * NORM_C, -2, 2), *w = test_vec_rand(NORM_C, 0.5, 1.5);
    float *out = test_vec_new(NORM_N * NORM_C), *rstd = test_vec_new(NORM_N);
    double want[NORM_N * NORM_C], want_rstd[NORM_N];
    for (int n = 0; n < NORM_N; n++) {
        double ms = 0.0;
        for (int c = 0; c < NORM_C; c++)
            ms += (double)inp[n * NORM_C + c] * inp[n * NORM_C + c] / NORM_C;
        want_rstd[n] = 1.0 / sqrt(ms + NORM_EPS);
        for (int c = 0; c < NORM_C; c++)
            want[n * NORM_C + c] = inp[n * NORM_C + c] * want_rstd[n] * w[c];
    }
    b->rmsnorm_forward(b, out, rstd, inp, w, NORM_N, NORM_C, NORM_EPS);
    assert_close("rmsnorm out", out, want, NORM_N * NORM_C, FWD_TOL);
    assert_close("rmsnorm rstd", rstd, want_rstd, NORM_N, FWD_TOL);
    free(inp);
    free(w);
    free(out);
    free(rstd);
    qkd_context_free(ctx);
}
END_TEST

struct rmsnorm_probe {
    qkd__backend *b;
    float *out, *rstd;
    const float *inp, *w, *R;
};

static double rmsnorm_probe_fn(const void *state)
{
    const struct rmsnorm_probe *s = state;
    s->b->rmsnorm_forward(s->b, s->out, s->rstd, s->inp, s->w, NORM_N, NORM_C, NORM_EPS);
    return weighted_sum(s->out, s->R, NORM_N * NORM_C);
}

START_TEST(test_rmsnorm_backward)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(8);
    size_t n = NORM_N * NORM_C;
    float *inp = test_vec_rand(n, -2, 2), *w = test_vec_rand(NORM_C, 0.5, 1.5);
    float *out = test_vec_new(n), *rstd = test_vec_new(NORM_N), *R = test_vec_rand(n, -1, 1);
    float *prior_x = test_vec_rand(n, -1, 1), *gx = test_vec_copy(prior_x, n);
    float *prior_w = test_vec_rand(NORM_C, -1, 1), *gw = test_vec_copy(prior_w, NORM_C);
    b->rmsnorm_forward(b, out, rstd, inp, w, NORM_N, NORM_C, NORM_EPS);
    b->rmsnorm_backward(b, gx, gw, R, inp, w, rstd, NORM_N, NORM_C);
    struct rmsnorm_probe st = {b, out, rstd, inp, w, R};
    check_gradient("rmsnorm dinp", inp, n, gx, prior_x, rmsnorm_probe_fn, &st);
    check_gradient("rmsnorm dw", w, NORM_C, gw, prior_w, rmsnorm_probe_fn, &st);
    free(inp);
    free(w);
    free(out);
    free(rstd);
    free(R);
    free(prior_x);
    free(gx);
    free(prior_w);
    free(gw);
    qkd_context_free(ctx);
}
END_TEST

/* ---- RoPE ---------------------------------------------------------------------------------- */

enum { ROPE_B = 2, ROPE_T = 3, ROPE_H = 2, ROPE_HD = 6, ROPE_POS0 = 4 };
#define ROPE_N (ROPE_B * ROPE_T * ROPE_H * ROPE_HD)
#define ROPE_THETA 10000.0f

START_TEST(test_rope_forward)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(9);
    float *x = test_vec_rand(ROPE_N, -1, 1), *y = test_vec_copy(x, ROPE_N);
    double want[ROPE_N];
    for (int bt = 0; bt < ROPE_B * ROPE_T; bt++) {
        int pos = ROPE_POS0 + bt % ROPE_T;
        for (int h = 0; h < ROPE_H; h++) {
            const float *xr = x + (bt * ROPE_H + h) * ROPE_HD;
            double *wr = want + (bt * ROPE_H + h) * ROPE_HD;
            for (int i = 0; i < ROPE_HD / 2; i++) {
                double angle = pos * pow(ROPE_THETA, -2.0 * i / ROPE_HD);
                wr[2 * i] = xr[2 * i] * cos(angle) - xr[2 * i + 1] * sin(angle);
                wr[2 * i + 1] = xr[2 * i] * sin(angle) + xr[2 * i + 1] * cos(angle);
            }
        }
    }
    b->rope_forward(b, y, ROPE_B, ROPE_T, ROPE_H, ROPE_HD, ROPE_POS0, ROPE_THETA);
    assert_close("rope", y, want, ROPE_N, FWD_TOL);
    free(x);
    free(y);
    qkd_context_free(ctx);
}
END_TEST

struct rope_probe {
    qkd__backend *b;
    float *work;
    const float *x, *R;
};

static double rope_probe_fn(const void *state)
{
    const struct rope_probe *s = state;
    memcpy(s->work, s->x, ROPE_N * sizeof *s->work);
    s->b->rope_forward(s->b, s->work, ROPE_B, ROPE_T, ROPE_H, ROPE_HD, ROPE_POS0, ROPE_THETA);
    return weighted_sum(s->work, s->R, ROPE_N);
}

START_TEST(test_rope_backward)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(10);
    float *x = test_vec_rand(ROPE_N, -1, 1), *R = test_vec_rand(ROPE_N, -1, 1);
    float *work = test_vec_new(ROPE_N), *g = test_vec_copy(R, ROPE_N);
    /* In place: the gradient of the output becomes that of the input. */
    b->rope_backward(b, g, ROPE_B, ROPE_T, ROPE_H, ROPE_HD, ROPE_POS0, ROPE_THETA);
    struct rope_probe st = {b, work, x, R};
    check_gradient("rope dx", x, ROPE_N, g, NULL, rope_probe_fn, &st);
    free(x);
    free(R);
    free(work);
    free(g);
    qkd_context_free(ctx);
}
END_TEST

START_TEST(test_rope_roundtrip)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(11);
    float *x = test_vec_rand(ROPE_N, -1, 1), *y = test_vec_copy(x, ROPE_N);
    double want[ROPE_N];
    for (int i = 0; i < ROPE_N; i++)
        want[i] = x[i];
    b->rope_forward(b, y, ROPE_B, ROPE_T, ROPE_H, ROPE_HD, ROPE_POS0, ROPE_THETA);
    b->rope_backward(b, y, ROPE_B, ROPE_T, ROPE_H, ROPE_HD, ROPE_POS0, ROPE_THETA);
    assert_close("rope roundtrip", y, want, ROPE_N, 1e-6);
    free(x);
    free(y);
    qkd_context_free(ctx);
}
END_TEST

/* ---- attention ------------------------------------------------------------------------------ */

struct attn_shape {
    int B, Tq, pos0, kv_len, nh, nkv, hd;
};

/* Causal GQA in double, written plainly: out [B][Tq][nh][hd] and the
 * probabilities [B][nh][Tq][kv_len] (zero past the causal limit). */
static void attention_direct(const struct attn_shape *s, const float *q, const float *k,
                             const float *v, double *out, double *probs)
{
    int rep = s->nh / s->nkv;
    double *sc = test_dvec_new((size_t)s->kv_len);
    for (int b = 0; b < s->B; b++)
        for (int t = 0; t < s->Tq; t++)
            for (int h = 0; h < s->nh; h++) {
                int g = h / rep, n_keys = s->pos0 + t + 1;
                const float *qr = q + ((b * s->Tq + t) * s->nh + h) * s->hd;
                double mx = -INFINITY, sum = 0.0;
                for (int j = 0; j < n_keys; j++) {
                    const float *kr = k + ((b * s->kv_len + j) * s->nkv + g) * s->hd;
                    sc[j] = 0.0;
                    for (int c = 0; c < s->hd; c++)
                        sc[j] += (double)qr[c] * kr[c];
                    sc[j] /= sqrt((double)s->hd);
                    mx = fmax(mx, sc[j]);
                }
                for (int j = 0; j < n_keys; j++)
                    sum += exp(sc[j] - mx);
                double *pr = probs + ((b * s->nh + h) * s->Tq + t) * s->kv_len;
                double *o = out + ((b * s->Tq + t) * s->nh + h) * s->hd;
                for (int j = 0; j < s->kv_len; j++)
                    pr[j] = j < n_keys ? exp(sc[j] - mx) / sum : 0.0;
                for (int c = 0; c < s->hd; c++) {
                    o[c] = 0.0;
                    for (int j = 0; j < n_keys; j++)
                        o[c] += pr[j] * v[((b * s->kv_len + j) * s->nkv + g) * s->hd + c];
                }
            }
    free(sc);
}

static size_t q_size(const struct attn_shape *s)
{
    return (size_t)s->B * s->Tq * s->nh * s->hd;
}

static size_t kv_size(const struct attn_shape *s)
{
    return (size_t)s->B * s->kv_len * s->nkv * s->hd;
}

START_TEST(test_attention_forward)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(12);
    /* training form, then a chunk of 3 rows after 2 cached ones */
    const struct attn_shape shapes[] = {{2, 5, 0, 5, 4, 2, 6}, {2, 3, 2, 6, 4, 2, 6}};
    for (int i = 0; i < 2; i++) {
        const struct attn_shape *s = &shapes[i];
        float *q = test_vec_rand(q_size(s), -1.5, 1.5), *k = test_vec_rand(kv_size(s), -1.5, 1.5);
        float *v = test_vec_rand(kv_size(s), -1, 1), *out = test_vec_new(q_size(s));
        /* the probabilities lead the scratch; every one must be written */
        size_t n_p = (size_t)s->B * s->nh * s->Tq * s->kv_len;
        float *probs = test_vec_rand(
            b->attention_scratch_floats(b, s->B, s->Tq, s->kv_len, s->nh, s->nkv, s->hd), 5, 6);
        double *want = test_dvec_new(q_size(s)), *want_p = test_dvec_new(n_p);
        attention_direct(s, q, k, v, want, want_p);
        b->attention_forward(b, out, probs, q, k, v, s->B, s->Tq, s->pos0, s->kv_len, s->nh,
                             s->nkv, s->hd);
        assert_close("attention out", out, want, q_size(s), FWD_TOL);
        assert_close("attention probs", probs, want_p, n_p, FWD_TOL);
        free(q);
        free(k);
        free(v);
        free(out);
        free(probs);
        free(want);
        free(want_p);
    }
    qkd_context_free(ctx);
}
END_TEST

struct attention_probe {
    qkd__backend *b;
    const struct attn_shape *s;
    float *out, *scratch;
    const float *q, *k, *v, *R;
};

static double attention_probe_fn(const void *state)
{
    const struct attention_probe *p = state;
    const struct attn_shape *s = p->s;
    p->b->attention_forward(p->b, p->out, p->scratch, p->q, p->k, p->v, s->B, s->Tq, 0,
                            s->Tq, s->nh, s->nkv, s->hd);
    return weighted_sum(p->out, p->R, q_size(s));
}

START_TEST(test_attention_backward)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(13);
    /* GQA 4/2 with hd 6; and hd 130, spanning two column blocks */
    const struct attn_shape shapes[] = {{2, 5, 0, 5, 4, 2, 6}, {1, 3, 0, 3, 2, 1, 130}};
    for (int i = 0; i < 2; i++) {
        const struct attn_shape *s = &shapes[i];
        size_t nq = q_size(s), nkv = kv_size(s);
        float *q = test_vec_rand(nq, -1.5, 1.5), *k = test_vec_rand(nkv, -1.5, 1.5);
        float *v = test_vec_rand(nkv, -1, 1), *R = test_vec_rand(nq, -1, 1), *out = test_vec_new(nq);
        float *scratch =
            test_vec_new(b->attention_scratch_floats(b, s->B, s->Tq, s->Tq, s->nh, s->nkv, s->hd));
        float *pq = test_vec_rand(nq, -1, 1), *pk = test_vec_rand(nkv, -1, 1), *pv = test_vec_rand(nkv, -1, 1);
        float *dq = test_vec_copy(pq, nq), *dk = test_vec_copy(pk, nkv), *dv = test_vec_copy(pv, nkv);
        b->attention_forward(b, out, scratch, q, k, v, s->B, s->Tq, 0, s->Tq, s->nh, s->nkv,
                             s->hd);
        b->attention_backward(b, dq, dk, dv, R, scratch, q, k, v, out, s->B, s->Tq, s->nh,
                              s->nkv, s->hd);
        struct attention_probe st = {b, s, out, scratch, q, k, v, R};
        check_gradient("attention dq", q, nq, dq, pq, attention_probe_fn, &st);
        check_gradient("attention dk", k, nkv, dk, pk, attention_probe_fn, &st);
        check_gradient("attention dv", v, nkv, dv, pv, attention_probe_fn, &st);
        free(q);
        free(k);
        free(v);
        free(R);
        free(out);
        free(scratch);
        free(pq);
        free(pk);
        free(pv);
        free(dq);
        free(dk);
        free(dv);
    }
    qkd_context_free(ctx);
}
END_TEST

START_TEST(test_attention_decode_matches_full)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(14);
    enum { B = 2, T = 7, NH = 4, NKV = 2, HD = 6 };
    size_t nq = B * T * NH * HD, nkv = B * T * NKV * HD;
    float *q = test_vec_rand(nq, -1.5, 1.5), *k = test_vec_rand(nkv, -1.5, 1.5), *v = test_vec_rand(nkv, -1, 1);
    float *full = test_vec_new(nq);
    float *scratch = test_vec_new(b->attention_scratch_floats(b, B, T, T, NH, NKV, HD));
    b->attention_forward(b, full, scratch, q, k, v, B, T, 0, T, NH, NKV, HD);
    for (int p = 0; p < T; p++) {
        /* Decode rows see only keys 0..p: the cache past p holds NaN. */
        float *kc = test_vec_copy(k, nkv), *vc = test_vec_copy(v, nkv);
        for (int bb = 0; bb < B; bb++)
            for (int j = p + 1; j < T; j++)
                for (int c = 0; c < NKV * HD; c++) {
                    kc[(bb * T + j) * NKV * HD + c] = NAN;
                    vc[(bb * T + j) * NKV * HD + c] = NAN;
                }
        float qd[B * NH * HD], od[B * NH * HD];
        float *sd = test_vec_new(b->attention_scratch_floats(b, B, 1, T, NH, NKV, HD));
        double want[B * NH * HD];
        for (int bb = 0; bb < B; bb++)
            for (int c = 0; c < NH * HD; c++) {
                qd[bb * NH * HD + c] = q[(bb * T + p) * NH * HD + c];
                want[bb * NH * HD + c] = full[(bb * T + p) * NH * HD + c];
            }
        b->attention_forward(b, od, sd, qd, kc, vc, B, 1, p, T, NH, NKV, HD);
        assert_close("decode row", od, want, B * NH * HD, 1e-6);
        free(sd);
        free(kc);
        free(vc);
    }
    free(q);
    free(k);
    free(v);
    free(full);
    free(scratch);
    qkd_context_free(ctx);
}
END_TEST

/* ---- SwiGLU --------------------------------------------------------------------------------- */

enum { ACT_N = 7 * 13 };

START_TEST(test_swiglu_forward)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(15);
    float *gate = test_vec_rand(ACT_N, -4, 4), *up = test_vec_rand(ACT_N, -2, 2), *out = test_vec_new(ACT_N);
    double want[ACT_N];
    for (int i = 0; i < ACT_N; i++)
        want[i] = gate[i] / (1.0 + exp(-(double)gate[i])) * up[i];
    b->swiglu_forward(b, out, gate, up, ACT_N);
    assert_close("swiglu", out, want, ACT_N, FWD_TOL);
    free(gate);
    free(up);
    free(out);
    qkd_context_free(ctx);
}
END_TEST

struct swiglu_probe {
    qkd__backend *b;
    float *out;
    const float *gate, *up, *R;
};

static double swiglu_probe_fn(const void *state)
{
    const struct swiglu_probe *s = state;
    s->b->swiglu_forward(s->b, s->out, s->gate, s->up, ACT_N);
    return weighted_sum(s->out, s->R, ACT_N);
}

START_TEST(test_swiglu_backward)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(16);
    float *gate = test_vec_rand(ACT_N, -4, 4), *up = test_vec_rand(ACT_N, -2, 2), *out = test_vec_new(ACT_N);
    float *R = test_vec_rand(ACT_N, -1, 1);
    float *pg = test_vec_rand(ACT_N, -1, 1), *pu = test_vec_rand(ACT_N, -1, 1);
    float *dg = test_vec_copy(pg, ACT_N), *du = test_vec_copy(pu, ACT_N);
    b->swiglu_backward(b, dg, du, R, gate, up, ACT_N);
    struct swiglu_probe st = {b, out, gate, up, R};
    check_gradient("swiglu dgate", gate, ACT_N, dg, pg, swiglu_probe_fn, &st);
    check_gradient("swiglu dup", up, ACT_N, du, pu, swiglu_probe_fn, &st);
    free(gate);
    free(up);
    free(out);
    free(R);
    free(pg);
    free(pu);
    free(dg);
    free(du);
    qkd_context_free(ctx);
}
END_TEST

/* ---- softmax, log-softmax ------------------------------------------------------------------ */

enum { SM_N = 7, SM_V = 13 };
#define SM_INV_TEMP 0.7f

/* log_softmax(x * inv_temp) of every row, in double. */
static void log_softmax_direct(const float *x, double inv_temp, double *out)
{
    for (int n = 0; n < SM_N; n++) {
        double mx = -INFINITY, sum = 0.0;
        for (int v = 0; v < SM_V; v++)
            mx = fmax(mx, x[n * SM_V + v] * inv_temp);
        for (int v = 0; v < SM_V; v++)
            sum += exp(x[n * SM_V + v] * inv_temp - mx);
        for (int v = 0; v < SM_V; v++)
            out[n * SM_V + v] = x[n * SM_V + v] * inv_temp - mx - log(sum);
    }
}

START_TEST(test_softmax_forward)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(17);
    float *x = test_vec_rand(SM_N * SM_V, -3, 3), *p = test_vec_new(SM_N * SM_V);
    double want[SM_N * SM_V];
    log_softmax_direct(x, SM_INV_TEMP, want);
    for (int i = 0; i < SM_N * SM_V; i++)
        want[i] = exp(want[i]);
    b->softmax_forward(b, p, x, SM_N, SM_V, SM_INV_TEMP);
    assert_close("softmax", p, want, SM_N * SM_V, FWD_TOL);
    free(x);
    free(p);
    qkd_context_free(ctx);
}
END_TEST

START_TEST(test_log_softmax_forward)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(18);
    float *x = test_vec_rand(SM_N * SM_V, -3, 3), *lp = test_vec_new(SM_N * SM_V);
    double want[SM_N * SM_V];
    log_softmax_direct(x, SM_INV_TEMP, want);
    b->log_softmax_forward(b, lp, x, SM_N, SM_V, SM_INV_TEMP);
    assert_close("log_softmax", lp, want, SM_N * SM_V, FWD_TOL);
    /* Stable for large logits: 1000 would overflow exp without the max. */
    for (int i = 0; i < SM_N * SM_V; i++)
        x[i] += 1000.0f;
    log_softmax_direct(x, SM_INV_TEMP, want);
    b->log_softmax_forward(b, lp, x, SM_N, SM_V, SM_INV_TEMP);
    assert_close("log_softmax of large logits", lp, want, SM_N * SM_V, 1e-4);
    free(x);
    free(lp);
    qkd_context_free(ctx);
}
END_TEST

struct softmax_probe {
    qkd__backend *b;
    float *out;
    const float *x, *R;
    int log; /* 1: log_softmax */
};

static double softmax_probe_fn(const void *state)
{
    const struct softmax_probe *s = state;
    if (s->log)
        s->b->log_softmax_forward(s->b, s->out, s->x, SM_N, SM_V, SM_INV_TEMP);
    else
        s->b->softmax_forward(s->b, s->out, s->x, SM_N, SM_V, SM_INV_TEMP);
    return weighted_sum(s->out, s->R, SM_N * SM_V);
}

static void softmax_backward_case(int log)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(19 + (uint64_t)log);
    size_t n = SM_N * SM_V;
    float *x = test_vec_rand(n, -3, 3), *y = test_vec_new(n), *R = test_vec_rand(n, -1, 1);
    float *prior = test_vec_rand(n, -1, 1), *g = test_vec_copy(prior, n);
    struct softmax_probe st = {b, y, x, R, log};
    softmax_probe_fn(&st); /* y = the forward output the backward reads */
    if (log)
        b->log_softmax_backward(b, g, R, y, SM_N, SM_V, SM_INV_TEMP);
    else
        b->softmax_backward(b, g, R, y, SM_N, SM_V, SM_INV_TEMP);
    check_gradient(log ? "log_softmax dlogits" : "softmax dlogits", x, n, g, prior,
                   softmax_probe_fn, &st);
    free(x);
    free(y);
    free(R);
    free(prior);
    free(g);
    qkd_context_free(ctx);
}

START_TEST(test_softmax_backward)
{
    softmax_backward_case(0);
}
END_TEST

START_TEST(test_log_softmax_backward)
{
    softmax_backward_case(1);
}
END_TEST

/* ---- cross-entropy ----------------------------------------------------------------------------- */

static const int32_t ce_targets[SM_N] = {4, -1, 0, 12, 7, -1, 4};
#define CE_SCALE (1.0f / 5) /* mean over the 5 rows with a target */

START_TEST(test_cross_entropy_forward)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(21);
    float *x = test_vec_rand(SM_N * SM_V, -3, 3), *losses = test_vec_rand(SM_N, 5, 6);
    x[2 * SM_V + 5] = 1000.0f; /* stable with a huge logit: row 2's loss is about 1000 */
    double logp[SM_N * SM_V], want[SM_N];
    log_softmax_direct(x, 1.0, logp);
    for (int n = 0; n < SM_N; n++)
        want[n] = ce_targets[n] < 0 ? 0.0 : -logp[n * SM_V + ce_targets[n]];
    b->cross_entropy_forward(b, losses, x, ce_targets, SM_N, SM_V);
    assert_close("cross_entropy", losses, want, SM_N, FWD_TOL);
    ck_assert_float_eq(losses[1], 0.0f);
    free(x);
    free(losses);
    qkd_context_free(ctx);
}
END_TEST

struct ce_probe {
    qkd__backend *b;
    float *losses;
    const float *x;
};

/* L = CE_SCALE * sum(losses): the loss whose gradient the backward adds. */
static double ce_probe_fn(const void *state)
{
    const struct ce_probe *s = state;
    s->b->cross_entropy_forward(s->b, s->losses, s->x, ce_targets, SM_N, SM_V);
    double sum = 0.0;
    for (int n = 0; n < SM_N; n++)
        sum += s->losses[n];
    return CE_SCALE * sum;
}

START_TEST(test_cross_entropy_backward)
{
    qkd_context *ctx = test_context(2);
    qkd__backend *b = ctx->backend;
    test_rng_seed(22);
    size_t n = SM_N * SM_V;
    float *x = test_vec_rand(n, -3, 3), *losses = test_vec_new(SM_N);
    float *prior = test_vec_rand(n, -1, 1), *g = test_vec_copy(prior, n);
    b->cross_entropy_backward(b, g, x, ce_targets, CE_SCALE, SM_N, SM_V);
    /* rows without a target get nothing */
    ck_assert_mem_eq(g + 1 * SM_V, prior + 1 * SM_V, SM_V * sizeof *g);
    ck_assert_mem_eq(g + 5 * SM_V, prior + 5 * SM_V, SM_V * sizeof *g);
    struct ce_probe st = {b, losses, x};
    check_gradient("cross_entropy dlogits", x, n, g, prior, ce_probe_fn, &st);
    free(x);
    free(losses);
    free(prior);
    free(g);
    qkd_context_free(ctx);
}
END_TEST

/* ---- thread-count invariance -----------------------------------------------------------------
 * Shapes big enough that the kernels split into several tasks. Each kernel
 * runs on a 1-thread and a 3-thread context from the same inputs and the
 * same starting gradients; the results must be the same bits. */

struct two_backends {
    qkd_context *ctx[2];
    qkd__backend *b[2];
};

static struct two_backends two_backends_new(void)
{
    struct two_backends t;
    t.ctx[0] = test_context(1);
    t.ctx[1] = test_context(3);
    ck_assert_int_eq(qkd_context_n_threads(t.ctx[1]), 3);
    for (int i = 0; i < 2; i++)
        t.b[i] = t.ctx[i]->backend;
    return t;
}

static void two_backends_free(struct two_backends *t)
{
    qkd_context_free(t->ctx[0]);
    qkd_context_free(t->ctx[1]);
}

START_TEST(test_threads_matmul_backward_weight)
{
    struct two_backends t = two_backends_new();
    test_rng_seed(23);
    enum { N = 64, C = 200, OC = 48 };
    float *dout = test_vec_rand(N * OC, -1, 1), *inp = test_vec_rand(N * C, -1, 1);
    float *prior = test_vec_rand(OC * C, -1, 1), *dw[2];
    for (int i = 0; i < 2; i++) {
        dw[i] = test_vec_copy(prior, OC * C);
        t.b[i]->matmul_backward_weight(t.b[i], dw[i], dout, inp, N, C, OC);
    }
    ck_assert_mem_eq(dw[0], dw[1], OC * C * sizeof(float));
    free(dout);
    free(inp);
    free(prior);
    free(dw[0]);
    free(dw[1]);
    two_backends_free(&t);
}
END_TEST

START_TEST(test_threads_attention_backward)
{
    struct two_backends t = two_backends_new();
    test_rng_seed(24);
    enum { B = 2, T = 33, NH = 4, NKV = 2, HD = 16 };
    size_t nq = B * T * NH * HD, nkv = B * T * NKV * HD;
    float *q = test_vec_rand(nq, -1, 1), *k = test_vec_rand(nkv, -1, 1), *v = test_vec_rand(nkv, -1, 1);
    float *dout = test_vec_rand(nq, -1, 1), *out = test_vec_new(nq);
    float *scratch =
        test_vec_new(t.b[0]->attention_scratch_floats(t.b[0], B, T, T, NH, NKV, HD));
    float *d[2][3];
    t.b[0]->attention_forward(t.b[0], out, scratch, q, k, v, B, T, 0, T, NH, NKV, HD);
    for (int i = 0; i < 2; i++) {
        d[i][0] = test_vec_new(nq);
        d[i][1] = test_vec_new(nkv);
        d[i][2] = test_vec_new(nkv);
        t.b[i]->attention_backward(t.b[i], d[i][0], d[i][1], d[i][2], dout, scratch, q, k, v,
                                   out, B, T, NH, NKV, HD);
    }
    ck_assert_mem_eq(d[0][0], d[1][0], nq * sizeof(float));
    ck_assert_mem_eq(d[0][1], d[1][1], nkv * sizeof(float));
    ck_assert_mem_eq(d[0][2], d[1][2], nkv * sizeof(float));
    free(q);
    free(k);
    free(v);
    free(dout);
    free(out);
    free(scratch);
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 3; j++)
            free(d[i][j]);
    two_backends_free(&t);
}
END_TEST

START_TEST(test_threads_embedding_backward)
{
    struct two_backends t = two_backends_new();
    test_rng_seed(25);
    enum { N = 1000, C = 160, V = 37 };
    int32_t *ids = malloc(N * sizeof *ids);
    ck_assert_ptr_nonnull(ids);
    for (int i = 0; i < N; i++)
        ids[i] = (int32_t)(test_rng_next(0, V));
    float *dout = test_vec_rand(N * C, -1, 1), *dt[2];
    for (int i = 0; i < 2; i++) {
        dt[i] = test_vec_new(V * C);
        t.b[i]->embedding_backward(t.b[i], dt[i], dout, ids, N, C, V);
    }
    ck_assert_mem_eq(dt[0], dt[1], V * C * sizeof(float));
    free(ids);
    free(dout);
    free(dt[0]);
    free(dt[1]);
    two_backends_free(&t);
}
END_TEST

/* ---- AdamW ------------------------------------------------------------------------------------ */

START_TEST(test_adamw_two_steps)
{
    qkd_context *ctx = test_context(1);
    qkd__backend *b = ctx->backend;
    /* lr 0.1, b1 0.9, b2 0.999, eps 1e-8, wd 0.01. Parameter 0 sees
     * gradients 0.5 then -0.25; parameter 1 sees none, so only decays. */
    float p[2] = {1.0f, -2.0f}, m[2] = {0}, v[2] = {0};
    const float g1[2] = {0.5f, 0.0f}, g2[2] = {-0.25f, 0.0f};

    /* t=1: m = 0.1*0.5 = 0.05, v = 0.001*0.25 = 0.00025; m/bc1 = 0.05/0.1 = 0.5,
     * v/bc2 = 0.00025/0.001 = 0.25, step = 0.5/(0.5+1e-8) + 0.01*1 = 1.00999998,
     * p = 1 - 0.1*1.00999998 = 0.899000002. p1 = -2 - 0.1*(0.01*-2) = -1.998. */
    b->adamw_update(b, p, g1, m, v, 2, 0.1f, 0.9f, 0.999f, 1e-8f, 0.01f, 1);
    const double want_p1[2] = {0.899000002, -1.998}, want_m1[2] = {0.05, 0.0};
    const double want_v1[2] = {0.00025, 0.0};
    assert_close("adamw p t=1", p, want_p1, 2, 1e-6);
    assert_close("adamw m t=1", m, want_m1, 2, 1e-7);
    assert_close("adamw v t=1", v, want_v1, 2, 1e-7);

    /* t=2: m = 0.9*0.05 + 0.1*-0.25 = 0.02, v = 0.999*0.00025 + 0.001*0.0625 =
     * 0.00031225; bc1 = 1-0.81 = 0.19, bc2 = 1-0.998001 = 0.001999;
     * m/bc1 = 0.105263158, v/bc2 = 0.156203102, sqrt = 0.395225381,
     * step = 0.266337033 + 0.01*0.899000002 = 0.275327033,
     * p = 0.899000002 - 0.0275327033 = 0.871467299.
     * p1 = -1.998 - 0.1*(0.01*-1.998) = -1.996002. */
    b->adamw_update(b, p, g2, m, v, 2, 0.1f, 0.9f, 0.999f, 1e-8f, 0.01f, 2);
    const double want_p2[2] = {0.871467299, -1.996002}, want_m2[2] = {0.02, 0.0};
    const double want_v2[2] = {0.00031225, 0.0};
    assert_close("adamw p t=2", p, want_p2, 2, 1e-6);
    assert_close("adamw m t=2", m, want_m2, 2, 1e-7);
    assert_close("adamw v t=2", v, want_v2, 2, 1e-7);
    qkd_context_free(ctx);
}
END_TEST

Suite *suite_backend_ref(void)
{
    Suite *s = suite_create("backend_ref");
    TCase *tc = tcase_create("kernels");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_table_complete);
    tcase_add_test(tc, test_memory_roundtrip);
    tcase_add_test(tc, test_memory_out_of_memory);
    tcase_add_test(tc, test_elementwise);
    tcase_add_test(tc, test_matmul_forward);
    tcase_add_test(tc, test_matmul_backward_input);
    tcase_add_test(tc, test_matmul_backward_weight);
    tcase_add_test(tc, test_matmul_bf16);
    tcase_add_test(tc, test_bf16_bits_family);
    tcase_add_test(tc, test_attention_bf16);
    tcase_add_test(tc, test_attention_bf16_rope);
    tcase_add_test(tc, test_embedding_forward);
    tcase_add_test(tc, test_embedding_backward);
    tcase_add_test(tc, test_rmsnorm_forward);
    tcase_add_test(tc, test_rmsnorm_backward);
    tcase_add_test(tc, test_rope_forward);
    tcase_add_test(tc, test_rope_backward);
    tcase_add_test(tc, test_rope_roundtrip);
    tcase_add_test(tc, test_attention_forward);
    tcase_add_test(tc, test_attention_backward);
    tcase_add_test(tc, test_attention_decode_matches_full);
    tcase_add_test(tc, test_swiglu_forward);
    tcase_add_test(tc, test_swiglu_backward);
    tcase_add_test(tc, test_softmax_forward);
    tcase_add_test(tc, test_softmax_backward);
    tcase_add_test(tc, test_log_softmax_forward);
    tcase_add_test(tc, test_log_softmax_backward);
    tcase_add_test(tc, test_cross_entropy_forward);
    tcase_add_test(tc, test_cross_entropy_backward);
    tcase_add_test(tc, test_threads_matmul_backward_weight);
    tcase_add_test(tc, test_threads_attention_backward);
    tcase_add_test(tc, test_threads_embedding_backward);
    tcase_add_test(tc, test_adamw_two_steps);
    suite_add_tcase(s, tc);
    return s;
}
