/* The SIMD backend against the reference backend (the oracle), kernel by
 * kernel, forward and backward, for every instruction set this CPU runs;
 * its results against thread count; and a whole stories260K forward and
 * backward on a SIMD context against a reference context.
 *
 * Tolerances. A SIMD kernel sums in float, in another order than the
 * reference (which sums in double), so each element may differ by a few
 * float roundings of the terms it sums: an element is within
 * TOL * (the sum of the magnitudes of its terms) of the reference, with
 * TOL = 1e-5 (about 100 float epsilons; the terms here number at most a
 * few hundred per sum, and a wrong index or a lost term is off by O(1)).
 * Results must be bit-identical for any thread count. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/core.h"
#include "qkd/loss.h"
#include "qkd/optim.h"
#include "qkd/quant.h"
#include "testutil.h"
#ifdef QKD_HAVE_SIMD
#include "backend/simd/simd.h"
#endif

#define TOL 1e-5

/* ---- helpers ------------------------------------------------------------------- */

/* The helpers below look for the first violation and assert once: Check
 * writes to its result pipe on every assertion, too slow per element. */

/* |got[i] - want[i]| <= tol * scale[i] for every i (scale NULL: 1). */
static void assert_close(const char *what, const float *got, const float *want,
                         const double *scale, size_t n, double tol)
{
    for (size_t i = 0; i < n; i++) {
        double bound = tol * (scale ? scale[i] : 1.0);
        double err = fabs((double)got[i] - want[i]);
        if (!(err <= bound))
            ck_abort_msg("%s[%zu]: simd %.9g, ref %.9g (err %.3g > %.3g)", what, i,
                         (double)got[i], (double)want[i], err, bound);
    }
}

/* Row-relative: |got - want| <= tol * (the largest |want| of its row of
 * row_len values) for every element. */
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
            if (!(err <= tol * mag))
                ck_abort_msg("%s[%zu]: simd %.9g, ref %.9g (err %.3g > %.3g)", what, i,
                             (double)got[i], (double)want[i], err, tol * mag);
        }
    }
}

static void assert_same(const char *what, const float *a, const float *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof *a) != 0)
            ck_abort_msg("%s[%zu] differs across thread counts: %.9g vs %.9g", what, i,
                         (double)a[i], (double)b[i]);
}

#ifdef QKD_HAVE_SIMD

/* ---- the instruction sets under test ----------------------------------------- */

struct isa {
    const char *name;
    void (*install)(qkd__backend *b);
    int (*supported)(void);
};

#ifdef __aarch64__

/* NEON is part of every AArch64 CPU. */
static int has_neon(void)
{
    return 1;
}

static const struct isa isas[] = {
    {"neon", qkd__simd_install_neon, has_neon},
};

#else

static int has_avx512(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
}

static int has_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

static const struct isa isas[] = {
    {"avx512", qkd__simd_install_avx512, has_avx512},
    {"avx2", qkd__simd_install_avx2, has_avx2},
};

#endif
#define N_ISAS ((int)(sizeof isas / sizeof isas[0]))

/* A SIMD context running instruction set i, or NULL (test skipped) if the
 * CPU lacks it. */
static qkd_context *simd_context_with(void (*install)(qkd__backend *b), int n_threads)
{
    qkd_context_params p;
    qkd_context_params_init(&p);
    p.n_threads = n_threads;
    p.backend = QKD_BACKEND_SIMD;
    qkd_context *ctx = NULL;
    ck_assert_int_eq(qkd_context_create(&p, &ctx), QKD_OK);
    ck_assert_str_eq(qkd_context_backend_name(ctx), "simd");
    install(ctx->backend);
    return ctx;
}

static qkd_context *simd_context(int i, int n_threads)
{
    if (!isas[i].supported()) {
        fprintf(stderr, "SKIP: this CPU has no %s\n", isas[i].name);
        return NULL;
    }
    return simd_context_with(isas[i].install, n_threads);
}

/* ---- matmul ------------------------------------------------------------------------ */

/* Ragged shapes: none a multiple of the register tiles (6 or 12 rows, 16
 * or 32 columns), depths past one K block (384), and more rows or columns
 * than one outer block (3072), besides exact ones. */
static const int mm_shapes[][3] = {
    {1, 1, 1},   {2, 7, 5},     {3, 33, 17},   {4, 64, 64},    {5, 19, 100},
    {13, 31, 47}, {12, 32, 64}, {37, 300, 29}, {100, 65, 130}, {64, 520, 96},
    {3100, 9, 40}, {20, 9, 3100}, /* past the 3072 rows packed at once */
    {13, 1536, 3100},             /* K blocks packed in two runs */
};

/* Magnitude scales of the three products: sum of |terms| (+ |initial|). */
static void mm_scales(const float *x, const float *w, const float *dout, const float *dx0,
                      const float *dw0, int N, int C, int OC, double *s_out, double *s_dx,
                      double *s_dw)
{
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++)
            for (int c = 0; c < C; c++) {
                double xw = fabs((double)x[n * C + c] * w[o * C + c]);
                s_out[n * OC + o] += xw;
                s_dx[n * C + c] += fabs((double)dout[n * OC + o] * w[o * C + c]);
                s_dw[o * C + c] += fabs((double)dout[n * OC + o] * x[n * C + c]);
            }
    for (int i = 0; i < N * C; i++)
        s_dx[i] += fabs(dx0[i]) + 1e-30;
    for (int i = 0; i < OC * C; i++)
        s_dw[i] += fabs(dw0[i]) + 1e-30;
    for (int i = 0; i < N * OC; i++)
        s_out[i] += 1e-30;
}

/* The three products of backend sb against rb's on every shape: fp32, or
 * (bf16) the slots that round every input to bf16. Products of bf16 values
 * are exact in fp32, so the bf16 slots differ from the reference's like
 * the fp32 ones, by the float summation: the same TOL holds. Skipping the
 * rounding would be off by up to 2^-9 of each term, past TOL. */
static void matmul_case(qkd__backend *sb, qkd__backend *rb, int bf16)
{
    test_rng_seed(11);
    for (size_t s = 0; s < sizeof mm_shapes / sizeof mm_shapes[0]; s++) {
        int N = mm_shapes[s][0], C = mm_shapes[s][1], OC = mm_shapes[s][2];
        float *x = test_vec_rand((size_t)N * C, -1, 1), *w = test_vec_rand((size_t)OC * C, -1, 1);
        float *dout = test_vec_rand((size_t)N * OC, -1, 1);
        float *dx0 = test_vec_rand((size_t)N * C, -1, 1), *dw0 = test_vec_rand((size_t)OC * C, -1, 1);
        double *s_out = test_dvec_new((size_t)N * OC), *s_dx = test_dvec_new((size_t)N * C);
        double *s_dw = test_dvec_new((size_t)OC * C);
        mm_scales(x, w, dout, dx0, dw0, N, C, OC, s_out, s_dx, s_dw);

        float *out_s = test_vec_new((size_t)N * OC), *out_r = test_vec_new((size_t)N * OC);
        (bf16 ? sb->matmul_forward_bf16 : sb->matmul_forward)(sb, out_s, x, w, N, C, OC);
        (bf16 ? rb->matmul_forward_bf16 : rb->matmul_forward)(rb, out_r, x, w, N, C, OC);
        assert_close(bf16 ? "matmul_forward_bf16" : "matmul_forward", out_s, out_r, s_out,
                     (size_t)N * OC, TOL);

        float *dx_s = test_vec_copy(dx0, (size_t)N * C), *dx_r = test_vec_copy(dx0, (size_t)N * C);
        (bf16 ? sb->matmul_backward_input_bf16 : sb->matmul_backward_input)(sb, dx_s, dout, w,
                                                                            N, C, OC);
        (bf16 ? rb->matmul_backward_input_bf16 : rb->matmul_backward_input)(rb, dx_r, dout, w,
                                                                            N, C, OC);
        assert_close(bf16 ? "matmul_backward_input_bf16" : "matmul_backward_input", dx_s, dx_r,
                     s_dx, (size_t)N * C, TOL);

        float *dw_s = test_vec_copy(dw0, (size_t)OC * C), *dw_r = test_vec_copy(dw0, (size_t)OC * C);
        (bf16 ? sb->matmul_backward_weight_bf16 : sb->matmul_backward_weight)(sb, dw_s, dout,
                                                                              x, N, C, OC);
        (bf16 ? rb->matmul_backward_weight_bf16 : rb->matmul_backward_weight)(rb, dw_r, dout,
                                                                              x, N, C, OC);
        assert_close(bf16 ? "matmul_backward_weight_bf16" : "matmul_backward_weight", dw_s,
                     dw_r, s_dw, (size_t)OC * C, TOL);

        free(x); free(w); free(dout); free(dx0); free(dw0);
        free(s_out); free(s_dx); free(s_dw);
        free(out_s); free(out_r); free(dx_s); free(dx_r); free(dw_s); free(dw_r);
    }
}

/* fp32, then the bf16 slots (inputs rounded to bf16 while packing). */
START_TEST(matmul_matches_ref)
{
    qkd_context *sc = simd_context(_i, 2);
    if (!sc)
        return;
    qkd_context *rc = test_context(2);
    matmul_case(sc->backend, rc->backend, 0);
    matmul_case(sc->backend, rc->backend, 1);
    qkd_context_free(sc);
    qkd_context_free(rc);
}
END_TEST

#ifndef __aarch64__
/* The bf16 slots on VDPBF16PS (AVX512_BF16), which AUTO picks on such a
 * CPU. */
START_TEST(matmul_bf16_vdpbf16ps_matches_ref)
{
    if (!has_avx512() || !__builtin_cpu_supports("avx512bf16")) {
        fprintf(stderr, "SKIP: this CPU has no avx512_bf16: the VDPBF16PS products are not "
                        "tested\n");
        return;
    }
    qkd_context *sc = simd_context_with(qkd__simd_install_avx512bf16, 2);
    qkd_context *rc = test_context(2);
    matmul_case(sc->backend, rc->backend, 1);
    qkd_context_free(sc);
    qkd_context_free(rc);
}
END_TEST
#endif

/* The products of a shape big enough to be split over threads, for a
 * context of n_threads. */
static void matmul_run(int isa, int n_threads, int N, int C, int OC, float *out, float *dx,
                       float *dw)
{
    qkd_context *ctx = simd_context(isa, n_threads);
    qkd__backend *b = ctx->backend;
    test_rng_seed(5);
    float *x = test_vec_rand((size_t)N * C, -1, 1), *w = test_vec_rand((size_t)OC * C, -1, 1);
    float *dout = test_vec_rand((size_t)N * OC, -1, 1);
    b->matmul_forward(b, out, x, w, N, C, OC);
    b->matmul_backward_input(b, dx, dout, w, N, C, OC);
    b->matmul_backward_weight(b, dw, dout, x, N, C, OC);
    free(x); free(w); free(dout);
    qkd_context_free(ctx);
}

START_TEST(matmul_thread_invariant)
{
    if (!isas[_i].supported())
        return;
    enum { N = 301, C = 290, OC = 333 };
    float *out[2], *dx[2], *dw[2];
    const int threads[2] = {1, 3};
    for (int t = 0; t < 2; t++) {
        out[t] = test_vec_new((size_t)N * OC);
        dx[t] = test_vec_new((size_t)N * C);
        dw[t] = test_vec_new((size_t)OC * C);
        matmul_run(_i, threads[t], N, C, OC, out[t], dx[t], dw[t]);
    }
    assert_same("matmul_forward", out[0], out[1], (size_t)N * OC);
    assert_same("matmul_backward_input", dx[0], dx[1], (size_t)N * C);
    assert_same("matmul_backward_weight", dw[0], dw[1], (size_t)OC * C);
    for (int t = 0; t < 2; t++) {
        free(out[t]); free(dx[t]); free(dw[t]);
    }
}
END_TEST

/* ---- RMSNorm ------------------------------------------------------------------------ */

START_TEST(rmsnorm_matches_ref)
{
    qkd_context *sc = simd_context(_i, 2);
    if (!sc)
        return;
    qkd_context *rc = test_context(2);
    qkd__backend *sb = sc->backend, *rb = rc->backend;
    static const int shapes[][2] = {{1, 1}, {3, 7}, {5, 16}, {33, 64}, {7, 67}, {40, 288}};
    test_rng_seed(21);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s][0], C = shapes[s][1];
        size_t nc = (size_t)N * C;
        float *x = test_vec_rand(nc, -2, 2), *w = test_vec_rand((size_t)C, 0.5, 1.5);
        float *g = test_vec_rand(nc, -1, 1), *dx0 = test_vec_rand(nc, -1, 1), *dw0 = test_vec_rand((size_t)C, -1, 1);
        float *y_s = test_vec_new(nc), *y_r = test_vec_new(nc), *r_s = test_vec_new((size_t)N), *r_r = test_vec_new((size_t)N);
        sb->rmsnorm_forward(sb, y_s, r_s, x, w, N, C, 1e-5f);
        rb->rmsnorm_forward(rb, y_r, r_r, x, w, N, C, 1e-5f);
        assert_close_rows("rmsnorm_forward", y_s, y_r, (size_t)N, (size_t)C, TOL);
        assert_close_rows("rmsnorm rstd", r_s, r_r, (size_t)N, 1, TOL);

        float *dx_s = test_vec_copy(dx0, nc), *dx_r = test_vec_copy(dx0, nc);
        float *dw_s = test_vec_copy(dw0, (size_t)C), *dw_r = test_vec_copy(dw0, (size_t)C);
        sb->rmsnorm_backward(sb, dx_s, dw_s, g, x, w, r_r, N, C);
        rb->rmsnorm_backward(rb, dx_r, dw_r, g, x, w, r_r, N, C);
        assert_close_rows("rmsnorm_backward dinp", dx_s, dx_r, (size_t)N, (size_t)C, TOL);
        assert_close_rows("rmsnorm_backward dw", dw_s, dw_r, 1, (size_t)C, TOL);
        free(x); free(w); free(g); free(dx0); free(dw0); free(y_s); free(y_r);
        free(r_s); free(r_r); free(dx_s); free(dx_r); free(dw_s); free(dw_r);
    }
    qkd_context_free(sc);
    qkd_context_free(rc);
}
END_TEST

/* ---- RoPE --------------------------------------------------------------------------- */

START_TEST(rope_matches_ref)
{
    qkd_context *sc = simd_context(_i, 2);
    if (!sc)
        return;
    qkd_context *rc = test_context(2);
    qkd__backend *sb = sc->backend, *rb = rc->backend;
    static const int hds[] = {2, 7, 8, 34, 48};
    static const int pos0s[] = {0, 17};
    test_rng_seed(31);
    for (size_t hi = 0; hi < sizeof hds / sizeof hds[0]; hi++)
        for (size_t pi = 0; pi < 2; pi++) {
            int B = 2, T = 5, H = 3, hd = hds[hi];
            size_t n = (size_t)B * T * H * hd;
            float *x = test_vec_rand(n, -1, 1);
            float *xs = test_vec_copy(x, n), *xr = test_vec_copy(x, n);
            sb->rope_forward(sb, xs, B, T, H, hd, pos0s[pi], 10000.0f);
            rb->rope_forward(rb, xr, B, T, H, hd, pos0s[pi], 10000.0f);
            assert_close_rows("rope_forward", xs, xr, n / hd, (size_t)hd, TOL);
            memcpy(xs, x, n * sizeof *x);
            memcpy(xr, x, n * sizeof *x);
            sb->rope_backward(sb, xs, B, T, H, hd, pos0s[pi], 500.0f);
            rb->rope_backward(rb, xr, B, T, H, hd, pos0s[pi], 500.0f);
            assert_close_rows("rope_backward", xs, xr, n / hd, (size_t)hd, TOL);
            free(x); free(xs); free(xr);
        }
    /* two models of other head sizes and bases on one context, in turn,
     * each keep their table: after the first call of each, no allocation */
    {
        qkd_context_params cp;
        qkd_context_params_init(&cp);
        cp.n_threads = 2;
        cp.backend = QKD_BACKEND_SIMD;
        test_alloc a;
        test_alloc_hooks(&cp, &a);
        qkd_context *ac = NULL;
        ck_assert_int_eq(qkd_context_create(&cp, &ac), QKD_OK);
        isas[_i].install(ac->backend);
        float x[4 * 3 * 16];
        for (int round = 0; round < 3; round++) {
            long before = a.n;
            for (int k = 0; k < 2; k++) {
                for (size_t i = 0; i < sizeof x / sizeof x[0]; i++)
                    x[i] = (float)test_rng_next(-1, 1);
                ac->backend->rope_forward(ac->backend, x, 1, 4, 3, k ? 16 : 8, 0,
                                          k ? 500.0f : 10000.0f);
            }
            if (round > 0)
                ck_assert_msg(a.n == before, "round %d: %ld allocations", round, a.n - before);
        }
        qkd_context_free(ac);
    }
    /* one position a call, as decoding does: the backend's table grows */
    for (int pos0 = 0; pos0 < 40; pos0++) {
        float x[2 * 8], y[2 * 8];
        for (int i = 0; i < 16; i++)
            x[i] = y[i] = (float)test_rng_next(-1, 1);
        sb->rope_forward(sb, x, 1, 1, 2, 8, pos0, 10000.0f);
        rb->rope_forward(rb, y, 1, 1, 2, 8, pos0, 10000.0f);
        assert_close_rows("rope_forward decode", x, y, 2, 8, TOL);
    }
    qkd_context_free(sc);
    qkd_context_free(rc);
}
END_TEST

/* ---- attention ------------------------------------------------------------------------ */

struct attn_shape {
    int B, Tq, pos0, kv_len, n_heads, n_kv, hd;
};

/* Training shapes (pos0 0, kv_len Tq: forward and backward) and decoding
 * ones (forward only); T past one and two vectors of keys, odd head sizes,
 * rows in blocks of a vector after cached ones, and a job of several tasks. */
static const struct attn_shape attn_shapes[] = {
    {1, 1, 0, 1, 1, 1, 1},   {2, 5, 0, 5, 2, 1, 8},    {1, 17, 0, 17, 4, 2, 5},
    {2, 33, 0, 33, 6, 6, 48}, {1, 40, 0, 40, 8, 4, 17}, {1, 1, 9, 20, 8, 4, 8},
    {2, 3, 30, 40, 6, 3, 48}, {1, 20, 7, 30, 4, 2, 8},  {2, 130, 0, 130, 8, 4, 8},
};

static void attention_case(qkd__backend *sb, qkd__backend *rb, const struct attn_shape *a)
{
    size_t nq = (size_t)a->B * a->Tq * a->n_heads * a->hd;
    size_t nkv = (size_t)a->B * a->kv_len * a->n_kv * a->hd;
    size_t np =
        rb->attention_scratch_floats(rb, a->B, a->Tq, a->kv_len, a->n_heads, a->n_kv, a->hd);
    size_t ns =
        sb->attention_scratch_floats(sb, a->B, a->Tq, a->kv_len, a->n_heads, a->n_kv, a->hd);
    float *q = test_vec_rand(nq, -2, 2), *k = test_vec_rand(nkv, -2, 2), *v = test_vec_rand(nkv, -1, 1);
    float *o_s = test_vec_new(nq), *o_r = test_vec_new(nq), *p_r = test_vec_new(np);
    float *p_s = test_vec_rand(ns, 5, 6); /* the kernels must not rely on what it held */
    sb->attention_forward(sb, o_s, p_s, q, k, v, a->B, a->Tq, a->pos0, a->kv_len, a->n_heads,
                          a->n_kv, a->hd);
    rb->attention_forward(rb, o_r, p_r, q, k, v, a->B, a->Tq, a->pos0, a->kv_len, a->n_heads,
                          a->n_kv, a->hd);
    assert_close_rows("attention_forward out", o_s, o_r, nq / a->hd, (size_t)a->hd, TOL);
    assert_attention_lse("simd", p_s, q, k, a->B, a->Tq, a->pos0, a->kv_len, a->n_heads,
                         a->n_kv, a->hd, TOL);
    if (a->pos0 == 0 && a->kv_len == a->Tq) {
        float *dout = test_vec_rand(nq, -1, 1), *dq0 = test_vec_rand(nq, -1, 1);
        float *dk0 = test_vec_rand(nkv, -1, 1), *dv0 = test_vec_rand(nkv, -1, 1);
        float *dq_s = test_vec_copy(dq0, nq), *dq_r = test_vec_copy(dq0, nq);
        float *dk_s = test_vec_copy(dk0, nkv), *dk_r = test_vec_copy(dk0, nkv);
        float *dv_s = test_vec_copy(dv0, nkv), *dv_r = test_vec_copy(dv0, nkv);
        sb->attention_backward(sb, dq_s, dk_s, dv_s, dout, p_s, q, k, v, o_s, a->B, a->Tq,
                               a->n_heads, a->n_kv, a->hd);
        rb->attention_backward(rb, dq_r, dk_r, dv_r, dout, p_r, q, k, v, o_r, a->B, a->Tq,
                               a->n_heads, a->n_kv, a->hd);
        assert_close_rows("attention_backward dq", dq_s, dq_r, nq / a->hd, (size_t)a->hd, TOL);
        assert_close_rows("attention_backward dk", dk_s, dk_r, nkv / a->hd, (size_t)a->hd, TOL);
        assert_close_rows("attention_backward dv", dv_s, dv_r, nkv / a->hd, (size_t)a->hd, TOL);
        free(dout); free(dq0); free(dk0); free(dv0);
        free(dq_s); free(dq_r); free(dk_s); free(dk_r); free(dv_s); free(dv_r);
    }
    free(q); free(k); free(v); free(o_s); free(o_r); free(p_s); free(p_r);
}

START_TEST(attention_matches_ref)
{
    qkd_context *sc = simd_context(_i, 2);
    if (!sc)
        return;
    qkd_context *rc = test_context(2);
    test_rng_seed(41);
    for (size_t s = 0; s < sizeof attn_shapes / sizeof attn_shapes[0]; s++)
        attention_case(sc->backend, rc->backend, &attn_shapes[s]);
    qkd_context_free(sc);
    qkd_context_free(rc);
}
END_TEST

/* ---- elementwise and sums --------------------------------------------------------------- */

START_TEST(elementwise_matches_ref)
{
    qkd_context *sc = simd_context(_i, 2);
    if (!sc)
        return;
    qkd_context *rc = test_context(2);
    qkd__backend *sb = sc->backend, *rb = rc->backend;
    static const size_t sizes[] = {1, 15, 17, 1000, 100003, 1000001};
    test_rng_seed(55);
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        size_t n = sizes[s];
        float *x = test_vec_rand(n, -2, 2), *y = test_vec_rand(n, -2, 2);
        float *o_s = test_vec_rand(n, -1, 1), *o_r = test_vec_copy(o_s, n);
        sb->fill(sb, o_s, 0.25f, n);
        rb->fill(rb, o_r, 0.25f, n);
        ck_assert_msg(memcmp(o_s, o_r, n * sizeof *o_s) == 0, "fill differs");
        sb->add(sb, o_s, x, y, n);
        rb->add(rb, o_r, x, y, n);
        ck_assert_msg(memcmp(o_s, o_r, n * sizeof *o_s) == 0, "add differs");
        sb->scale(sb, o_s, -0.3f, n);
        rb->scale(rb, o_r, -0.3f, n);
        ck_assert_msg(memcmp(o_s, o_r, n * sizeof *o_s) == 0, "scale differs");
        sb->axpy(sb, o_s, 1.7f, x, n);
        rb->axpy(rb, o_r, 1.7f, x, n);
        double *mag = test_dvec_new(n);
        for (size_t k = 0; k < n; k++)
            mag[k] = fabs(o_r[k]) + fabs(1.7 * x[k]);
        /* one rounding against the reference's two (double, then float) */
        assert_close("axpy", o_s, o_r, mag, n, 1e-7);
        /* sums in double, in another order: a double rounding apart */
        float sum_s, sum_r, sq_s, sq_r;
        double abs_sum = 0.0;
        for (size_t k = 0; k < n; k++)
            abs_sum += fabs(x[k]);
        sb->sum(sb, &sum_s, x, n);
        rb->sum(rb, &sum_r, x, n);
        ck_assert_msg(fabs((double)sum_s - sum_r) <= 1e-7 * (fabs(sum_r) + 1e-6 * abs_sum),
                      "sum of %zu: simd %.9g ref %.9g", n, (double)sum_s, (double)sum_r);
        sb->sum_squares(sb, &sq_s, x, n);
        rb->sum_squares(rb, &sq_r, x, n);
        ck_assert_msg(fabs((double)sq_s - sq_r) <= 1e-7 * sq_r, "sum_squares of %zu: %.9g vs %.9g",
                      n, (double)sq_s, (double)sq_r);
        free(x); free(y); free(o_s); free(o_r); free(mag);
    }
    qkd_context_free(sc);
    qkd_context_free(rc);
}
END_TEST

/* ---- SwiGLU ----------------------------------------------------------------------------- */

START_TEST(swiglu_matches_ref)
{
    qkd_context *sc = simd_context(_i, 2);
    if (!sc)
        return;
    qkd_context *rc = test_context(2);
    qkd__backend *sb = sc->backend, *rb = rc->backend;
    static const size_t sizes[] = {1, 15, 17, 1000, 40000};
    test_rng_seed(51);
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        size_t n = sizes[s];
        float *gate = test_vec_rand(n, -12, 12), *up = test_vec_rand(n, -2, 2), *g = test_vec_rand(n, -1, 1);
        gate[0] = -100.0f; /* exp(100) overflows float: the gate closes, as in double */
        float *o_s = test_vec_new(n), *o_r = test_vec_new(n);
        sb->swiglu_forward(sb, o_s, gate, up, n);
        rb->swiglu_forward(rb, o_r, gate, up, n);
        float *dg0 = test_vec_rand(n, -1, 1), *du0 = test_vec_rand(n, -1, 1);
        float *dg_s = test_vec_copy(dg0, n), *dg_r = test_vec_copy(dg0, n);
        float *du_s = test_vec_copy(du0, n), *du_r = test_vec_copy(du0, n);
        sb->swiglu_backward(sb, dg_s, du_s, g, gate, up, n);
        rb->swiglu_backward(rb, dg_r, du_r, g, gate, up, n);
        double *mag = test_dvec_new(n), *one = test_dvec_new(n);
        for (size_t i = 0; i < n; i++) {
            mag[i] = fabs(o_r[i]) + 1e-30;
            one[i] = 1.0;
        }
        assert_close("swiglu_forward", o_s, o_r, mag, n, TOL);
        /* the backward adds O(1) terms to O(1) values */
        assert_close("swiglu_backward dgate", dg_s, dg_r, one, n, TOL);
        assert_close("swiglu_backward dup", du_s, du_r, one, n, TOL);
        free(gate); free(up); free(g); free(o_s); free(o_r); free(dg0); free(du0);
        free(dg_s); free(dg_r); free(du_s); free(du_r); free(mag); free(one);
    }
    qkd_context_free(sc);
    qkd_context_free(rc);
}
END_TEST

/* ---- softmax family and cross-entropy -------------------------------------------------- */

static const int row_shapes[][2] = {{1, 1}, {3, 7}, {2, 16}, {5, 33}, {4, 512}, {3, 1000}};

START_TEST(softmax_family_matches_ref)
{
    qkd_context *sc = simd_context(_i, 2);
    if (!sc)
        return;
    qkd_context *rc = test_context(2);
    qkd__backend *sb = sc->backend, *rb = rc->backend;
    static const float inv_temps[] = {1.0f, 0.5f};
    test_rng_seed(61);
    for (size_t s = 0; s < sizeof row_shapes / sizeof row_shapes[0]; s++)
        for (size_t ti = 0; ti < 2; ti++) {
            int N = row_shapes[s][0], V = row_shapes[s][1];
            size_t n = (size_t)N * V;
            float it = inv_temps[ti];
            float *x = test_vec_rand(n, -8, 8), *dy = test_vec_rand(n, -1, 1), *d0 = test_vec_rand(n, -1, 1);
            float *y_s = test_vec_new(n), *y_r = test_vec_new(n);
            float *d_s = test_vec_copy(d0, n), *d_r = test_vec_copy(d0, n);

            sb->softmax_forward(sb, y_s, x, N, V, it);
            rb->softmax_forward(rb, y_r, x, N, V, it);
            assert_close_rows("softmax_forward", y_s, y_r, (size_t)N, (size_t)V, TOL);
            sb->softmax_backward(sb, d_s, dy, y_r, N, V, it);
            rb->softmax_backward(rb, d_r, dy, y_r, N, V, it);
            assert_close_rows("softmax_backward", d_s, d_r, (size_t)N, (size_t)V, TOL);

            sb->log_softmax_forward(sb, y_s, x, N, V, it);
            rb->log_softmax_forward(rb, y_r, x, N, V, it);
            assert_close_rows("log_softmax_forward", y_s, y_r, (size_t)N, (size_t)V, TOL);
            memcpy(d_s, d0, n * sizeof *d0);
            memcpy(d_r, d0, n * sizeof *d0);
            sb->log_softmax_backward(sb, d_s, dy, y_r, N, V, it);
            rb->log_softmax_backward(rb, d_r, dy, y_r, N, V, it);
            assert_close_rows("log_softmax_backward", d_s, d_r, (size_t)N, (size_t)V, TOL);
            free(x); free(dy); free(d0); free(y_s); free(y_r); free(d_s); free(d_r);
        }
    qkd_context_free(sc);
    qkd_context_free(rc);
}
END_TEST

START_TEST(cross_entropy_matches_ref)
{
    qkd_context *sc = simd_context(_i, 2);
    if (!sc)
        return;
    qkd_context *rc = test_context(2);
    qkd__backend *sb = sc->backend, *rb = rc->backend;
    test_rng_seed(71);
    for (size_t s = 0; s < sizeof row_shapes / sizeof row_shapes[0]; s++) {
        int N = row_shapes[s][0], V = row_shapes[s][1];
        size_t n = (size_t)N * V;
        float *x = test_vec_rand(n, -8, 8), *d0 = test_vec_rand(n, -1, 1);
        int32_t *targets = malloc((size_t)N * sizeof *targets);
        ck_assert_ptr_nonnull(targets);
        for (int i = 0; i < N; i++)
            targets[i] = i == 1 ? -1 : (int32_t)(test_rng_next(0, 1) * V);
        float *l_s = test_vec_new((size_t)N), *l_r = test_vec_new((size_t)N);
        sb->cross_entropy_forward(sb, l_s, x, targets, N, V);
        rb->cross_entropy_forward(rb, l_r, x, targets, N, V);
        double *mag = test_dvec_new((size_t)N);
        for (int i = 0; i < N; i++)
            mag[i] = 1.0 + fabs(l_r[i]); /* |log-sum-exp| <= 8 + log V */
        assert_close("cross_entropy_forward", l_s, l_r, mag, (size_t)N, TOL);
        float *d_s = test_vec_copy(d0, n), *d_r = test_vec_copy(d0, n);
        sb->cross_entropy_backward(sb, d_s, x, targets, 0.25f, N, V);
        rb->cross_entropy_backward(rb, d_r, x, targets, 0.25f, N, V);
        assert_close_rows("cross_entropy_backward", d_s, d_r, (size_t)N, (size_t)V, TOL);
        free(x); free(d0); free(targets); free(l_s); free(l_r); free(mag); free(d_s); free(d_r);
    }
    qkd_context_free(sc);
    qkd_context_free(rc);
}
END_TEST

/* ---- optimizer updates: the same double arithmetic as the reference ----------------------- */

START_TEST(optimizers_equal_ref)
{
    qkd_context *sc = simd_context(_i, 2);
    if (!sc)
        return;
    qkd_context *rc = test_context(2);
    qkd__backend *sb = sc->backend, *rb = rc->backend;
    test_rng_seed(81);
    const size_t n = 1237;
    float *p0 = test_vec_rand(n, -1, 1), *g = test_vec_rand(n, -1, 1), *m0 = test_vec_rand(n, -0.1, 0.1);
    float *v0 = test_vec_rand(n, 0, 0.01);
    float *p_s = test_vec_copy(p0, n), *p_r = test_vec_copy(p0, n), *m_s = test_vec_copy(m0, n);
    float *m_r = test_vec_copy(m0, n), *v_s = test_vec_copy(v0, n), *v_r = test_vec_copy(v0, n);
    for (int t = 1; t <= 3; t++) {
        sb->adamw_update(sb, p_s, g, m_s, v_s, n, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, t);
        rb->adamw_update(rb, p_r, g, m_r, v_r, n, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, t);
    }
    ck_assert_msg(memcmp(p_s, p_r, n * sizeof *p_s) == 0, "adamw p differs");
    ck_assert_msg(memcmp(m_s, m_r, n * sizeof *m_s) == 0, "adamw m differs");
    ck_assert_msg(memcmp(v_s, v_r, n * sizeof *v_s) == 0, "adamw v differs");
    for (int t = 1; t <= 3; t++) {
        sb->sgd_update(sb, p_s, g, m_s, n, 0.05f, 0.9f, 0.01f);
        rb->sgd_update(rb, p_r, g, m_r, n, 0.05f, 0.9f, 0.01f);
    }
    ck_assert_msg(memcmp(p_s, p_r, n * sizeof *p_s) == 0, "sgd p differs");
    ck_assert_msg(memcmp(m_s, m_r, n * sizeof *m_s) == 0, "sgd u differs");
    free(p0); free(g); free(m0); free(v0); free(p_s); free(p_r); free(m_s); free(m_r);
    free(v_s); free(v_r);
    qkd_context_free(sc);
    qkd_context_free(rc);
}
END_TEST

/* ---- distillation objectives ---------------------------------------------------------- */

/* log sum exp(x * it) in double */
static double lse_d(const float *x, int V, double it)
{
    double m = -INFINITY, sum = 0.0;
    for (int v = 0; v < V; v++)
        m = fmax(m, x[v] * it);
    for (int v = 0; v < V; v++)
        sum += exp(x[v] * it - m);
    return m + log(sum);
}

/* The magnitudes a row's value and gradient are computed from, per
 * element v: m_v = (p_v + q_v)(1 + |log p_v| + |log q_v| + |s_v / tau| +
 * |t_v / tau|) for the softmax kinds (their log-ratios are formed from the
 * logits in float), (1 + q_v) for CE. The value's scale is tau^2 sum m_v
 * (CE: |lse| + |s_y|), the gradient's |scale w| tau m_v (1 + |value|),
 * plus the |ds| it is added to; for MSE, sum (|s_v| + |t_v|)^2 / V and
 * |scale w| 2 (|s_v| + |t_v|) / V. */
struct kd_scales {
    double value;
    double *grad; /* [V] */
};

static void kd_row_scales(const float *s, const float *t, const float *ds0, int y, int V,
                          int kind, double tau, double coef, double value, struct kd_scales *k)
{
    double ls = lse_d(s, V, 1.0 / tau), lt = kind == QKD_LOSS_CE ? 0.0 : lse_d(t, V, 1.0 / tau);
    double sum = 0.0;
    for (int v = 0; v < V; v++) {
        double lq = s[v] / tau - ls, lp = t[v] / tau - lt, m;
        if (kind == QKD_LOSS_MSE) {
            double st = fabs(s[v]) + fabs(t[v]);
            sum += st * st / V;
            k->grad[v] = fabs(coef) * 2.0 * st / V + fabs(ds0[v]) + 1e-30;
            continue;
        }
        if (kind == QKD_LOSS_CE)
            m = 1.0 + exp(lq);
        else
            m = (exp(lp) + exp(lq)) * (1.0 + fabs(lp) + fabs(lq) + fabs(s[v] / tau) +
                                       fabs(t[v] / tau));
        sum += m;
        k->grad[v] = fabs(coef) * tau * m * (1.0 + fabs(value)) + fabs(ds0[v]) + 1e-30;
    }
    k->value = kind == QKD_LOSS_CE ? fabs(ls) + fabs(s[y]) : tau * tau * sum + 1e-30;
}

static void kd_case(qkd__backend *sb, qkd__backend *rb, int N, int V, int kind, float tau,
                    int weighted, int with_grad, int accumulate)
{
    size_t n = (size_t)N * V;
    const float scale = 0.7f;
    float *s = test_vec_rand(n, -8, 8), *t = test_vec_rand(n, -8, 8), *w = test_vec_rand((size_t)N, 0.5, 2);
    float *ds0 = test_vec_rand(n, -1e-3, 1e-3);
    int32_t *y = malloc((size_t)N * sizeof *y);
    ck_assert_ptr_nonnull(y);
    for (int i = 0; i < N; i++)
        y[i] = i == 1 ? -1 : (int32_t)(test_rng_next(0, 1) * V);
    s[(size_t)(N - 1) * V] = NAN; /* the last row: no value, a NaN gradient */
    float *l_s = test_vec_new((size_t)N), *l_r = test_vec_new((size_t)N);
    float *d_s = test_vec_copy(ds0, n), *d_r = test_vec_copy(ds0, n);
    const float *row_w = weighted ? w : NULL;
    qkd__kd_term term = {.kind = kind, .temperature = tau, .beta = 0.3f, .scale = scale,
                         .accumulate = accumulate};
    sb->kd_loss(sb, l_s, with_grad ? d_s : NULL, NULL, s, t, y, row_w, N, V, &term);
    rb->kd_loss(rb, l_r, with_grad ? d_r : NULL, NULL, s, t, y, row_w, N, V, &term);
    double tau_k = kind == QKD_LOSS_CE || kind == QKD_LOSS_MSE ? 1.0 : tau;
    struct kd_scales k = {.grad = test_dvec_new((size_t)V)};
    char what[80];
    for (int i = 0; i < N; i++) {
        size_t off = (size_t)i * V;
        if (!isfinite(l_r[i])) {
            ck_assert_msg(!isfinite(l_s[i]), "kind %d row %d: simd %g, ref non-finite", kind,
                          i, (double)l_s[i]);
            for (int v = 0; v < V; v++)
                ck_assert_msg((isnan(d_s[off + v]) != 0) == with_grad,
                              "kind %d row %d: a non-finite row's gradient is not NaN", kind, i);
            continue;
        }
        double wi = weighted ? w[i] : 1.0;
        kd_row_scales(s + off, t + off, ds0 + off, y[i] < 0 ? 0 : y[i], V, kind, tau_k,
                      scale * wi, l_r[i] / wi, &k);
        ck_assert_msg(fabs((double)l_s[i] - l_r[i]) <= TOL * wi * k.value,
                      "kind %d V %d row %d: simd %.9g ref %.9g (scale %.3g)", kind, V, i,
                      (double)l_s[i], (double)l_r[i], wi * k.value);
        snprintf(what, sizeof what, "kd_loss kind %d V %d tau %g row %d ds", kind, V,
                 (double)tau, i);
        assert_close(what, d_s + off, d_r + off, k.grad, (size_t)V, TOL);
    }
    free(k.grad);
    free(s); free(t); free(w); free(ds0); free(y); free(l_s); free(l_r); free(d_s); free(d_r);
}

START_TEST(kd_loss_matches_ref)
{
    qkd_context *sc = simd_context(_i, 2);
    if (!sc)
        return;
    qkd_context *rc = test_context(2);
    static const int Vs[] = {1, 7, 33, 512, 1000};
    test_rng_seed(101);
    for (int kind = QKD_LOSS_CE; kind <= QKD_LOSS_MSE; kind++)
        for (size_t vi = 0; vi < sizeof Vs / sizeof Vs[0]; vi++)
            for (int variant = 0; variant < 4; variant++) /* 1: written, 3: values only */
                kd_case(sc->backend, rc->backend, 5, Vs[vi], kind, variant & 1 ? 2.5f : 1.0f,
                        variant & 2, variant != 3, !(variant & 1));
    qkd_context_free(sc);
    qkd_context_free(rc);
}
END_TEST

START_TEST(row_max_prob_matches_ref)
{
    qkd_context *sc = simd_context(_i, 2);
    if (!sc)
        return;
    qkd_context *rc = test_context(2);
    test_rng_seed(111);
    for (size_t r = 0; r < sizeof row_shapes / sizeof row_shapes[0]; r++) {
        int N = row_shapes[r][0], V = row_shapes[r][1];
        float *x = test_vec_rand((size_t)N * V, -8, 8);
        x[0] = INFINITY;
        float *o_s = test_vec_new((size_t)N), *o_r = test_vec_new((size_t)N);
        sc->backend->row_max_prob(sc->backend, o_s, x, NULL, N, V);
        rc->backend->row_max_prob(rc->backend, o_r, x, NULL, N, V);
        ck_assert(isnan(o_s[0]) && isnan(o_r[0]));
        assert_close_rows("row_max_prob", o_s + 1, o_r + 1, (size_t)N - 1, 1, TOL);
        /* targets: a masked row reads 0, the others as before */
        int32_t *y = calloc((size_t)N, sizeof *y);
        ck_assert_ptr_nonnull(y);
        y[N - 1] = -1;
        float *o_m = test_vec_new((size_t)N);
        sc->backend->row_max_prob(sc->backend, o_m, x, y, N, V);
        ck_assert(o_m[N - 1] == 0.0f);
        ck_assert_mem_eq(o_m, o_s, (size_t)(N - 1) * sizeof *o_m);
        free(x); free(o_s); free(o_r); free(o_m); free(y);
    }
    qkd_context_free(sc);
    qkd_context_free(rc);
}
END_TEST

/* ---- fake quantization: the reference's double arithmetic, bit for bit ----------------- */

START_TEST(fakequant_equals_ref)
{
    qkd_context *sc = simd_context(_i, 2);
    if (!sc)
        return;
    qkd_context *rc = test_context(2);
    qkd__backend *sb = sc->backend, *rb = rc->backend;
    static const int schemes[] = {QKD_QUANT_SYM, QKD_QUANT_ASYM, QKD_QUANT_TERNARY};
    static const int bits[] = {2, 4, 8};
    static const int64_t groups[] = {7, 32, 64};
    static const float clips[] = {1.0f, 0.8f};
    const int64_t rows = 5, cols = 96;
    const size_t n = (size_t)(rows * cols);
    test_rng_seed(121);
    float *w = test_vec_rand(n, -1, 1), *dq = test_vec_rand(n, -1, 1), *dw0 = test_vec_rand(n, -1, 1);
    for (size_t i = 0; i < n; i += 13)
        w[i] = (float)(0.125 * (int)(test_rng_next(-8, 8))); /* exact halves of some scales */
    for (size_t si = 0; si < 3; si++)
        for (size_t bi = 0; bi < 3; bi++)
            for (size_t gi = 0; gi < 3; gi++)
                for (size_t ci = 0; ci < 2; ci++) {
                    qkd__quant_spec spec = {.scheme = schemes[si], .bits = bits[bi],
                                            .group = groups[gi], .clip_ratio = clips[ci]};
                    size_t ng = (size_t)(rows * ((cols + spec.group - 1) / spec.group));
                    float *q_s = test_vec_new(n), *q_r = test_vec_new(n);
                    float *s_s = test_vec_new(ng), *s_r = test_vec_new(ng), *z_s = test_vec_new(ng);
                    float *z_r = test_vec_new(ng);
                    sb->fakequant_forward(sb, q_s, s_s, z_s, w, rows, cols, &spec);
                    rb->fakequant_forward(rb, q_r, s_r, z_r, w, rows, cols, &spec);
                    ck_assert_msg(memcmp(q_s, q_r, n * sizeof *q_s) == 0,
                                  "scheme %d bits %d group %d clip %g: wq differs", spec.scheme,
                                  spec.bits, (int)spec.group, (double)spec.clip_ratio);
                    ck_assert(memcmp(s_s, s_r, ng * sizeof *s_s) == 0);
                    ck_assert(memcmp(z_s, z_r, ng * sizeof *z_s) == 0);
                    float *d_s = test_vec_copy(dw0, n), *d_r = test_vec_copy(dw0, n);
                    sb->fakequant_backward(sb, d_s, dq, w, s_r, z_r, rows, cols, &spec);
                    rb->fakequant_backward(rb, d_r, dq, w, s_r, z_r, rows, cols, &spec);
                    ck_assert_msg(memcmp(d_s, d_r, n * sizeof *d_s) == 0,
                                  "scheme %d bits %d group %d clip %g: dw differs", spec.scheme,
                                  spec.bits, (int)spec.group, (double)spec.clip_ratio);
                    free(q_s); free(q_r); free(s_s); free(s_r); free(z_s); free(z_r);
                    free(d_s); free(d_r);
                }
    free(w); free(dq); free(dw0);
    qkd_context_free(sc);
    qkd_context_free(rc);
}
END_TEST

/* ---- fake quantization fused into the products ------------------------------------------ *
 * The fused slots read the latent weights and the groups; the unfused path
 * writes Q(w) with fakequant_forward and runs the plain products. With more
 * than DOT_ROWS rows both run the same GEMM on the same values, so they
 * must agree bit for bit; against the reference's fused slots (its
 * composition) within TOL. Shapes: ragged tiles, a partial last group
 * (172 = 5 x 32 + 12), K blocks that split groups (800 in blocks of 267),
 * a per-row group and more outputs than one packed block (3100). */

static const int fq_shapes[][3] = {
    {5, 172, 37}, {13, 64, 100}, {29, 800, 23}, {7, 33, 3100}, {40, 172, 172},
};

struct fq_case {
    int scheme, bits;
    int64_t group;
    float clip;
};

static const struct fq_case fq_cases[] = {
    {QKD_QUANT_ASYM, 4, 32, 1.0f}, {QKD_QUANT_ASYM, 3, 7, 0.8f},  {QKD_QUANT_SYM, 4, 32, 1.0f},
    {QKD_QUANT_SYM, 2, 32, 0.9f},  {QKD_QUANT_SYM, 8, 1 << 20, 1.0f}, /* one group per row */
    {QKD_QUANT_TERNARY, 0, 32, 1.0f}, {QKD_QUANT_TERNARY, 0, 7, 0.8f},
};

static void assert_bits(const char *what, const struct fq_case *fc, int N, int C, int OC,
                        const float *got, const float *want, size_t n)
{
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(memcmp(&got[i], &want[i], sizeof *got) == 0,
                      "%s, scheme %d bits %d group %lld, %d x %d x %d: [%zu] %.9g vs %.9g",
                      what, fc->scheme, fc->bits, (long long)fc->group, N, C, OC, i,
                      (double)got[i], (double)want[i]);
}

/* One shape and setting: groups, forward and backward-input products. */
static void fq_case_run(qkd__backend *sb, qkd__backend *rb, const struct fq_case *fc, int N,
                        int C, int OC)
{
    const qkd__quant_spec spec = {.scheme = fc->scheme, .bits = fc->bits, .group = fc->group,
                                  .clip_ratio = fc->clip};
    const size_t nw = (size_t)OC * C, ng = (size_t)OC * ((C + fc->group - 1) / fc->group);
    float *w = test_vec_rand(nw, -1, 1), *x = test_vec_rand((size_t)N * C, -1, 1);
    float *dout = test_vec_rand((size_t)N * OC, -1, 1), *dx0 = test_vec_rand((size_t)N * C, -1, 1);
    float *s_s = test_vec_new(ng), *z_s = test_vec_new(ng), *s_r = test_vec_new(ng), *z_r = test_vec_new(ng);
    float *wq = test_vec_new(nw), *s_q = test_vec_new(ng), *z_q = test_vec_new(ng), *scratch = test_vec_new(nw);

    sb->fakequant_groups(sb, s_s, z_s, w, OC, C, &spec);
    rb->fakequant_groups(rb, s_r, z_r, w, OC, C, &spec);
    assert_bits("fakequant_groups scales", fc, N, C, OC, s_s, s_r, ng);
    assert_bits("fakequant_groups zeros", fc, N, C, OC, z_s, z_r, ng);
    rb->fakequant_forward(rb, wq, s_q, z_q, w, OC, C, &spec);
    assert_bits("scales of fakequant_groups and fakequant_forward", fc, N, C, OC, s_s, s_q, ng);
    if (fc->scheme != QKD_QUANT_TERNARY) /* TERNARY's zeros hold the thresholds */
        assert_bits("zeros of fakequant_groups and fakequant_forward", fc, N, C, OC, z_s, z_q,
                    ng);

    const qkd__qweight qw = {.w = w, .scales = s_s, .zeros = z_s, .spec = &spec,
                             .scratch = scratch};
    double *s_out = test_dvec_new((size_t)N * OC), *s_dx = test_dvec_new((size_t)N * C);
    double *s_dw = test_dvec_new(nw);
    mm_scales(x, wq, dout, dx0, wq, N, C, OC, s_out, s_dx, s_dw);

    float *fused = test_vec_new((size_t)N * OC), *plain = test_vec_new((size_t)N * OC);
    float *ref = test_vec_new((size_t)N * OC);
    sb->matmul_forward_fq(sb, fused, x, &qw, N, C, OC);
    sb->matmul_forward(sb, plain, x, wq, N, C, OC);
    rb->matmul_forward_fq(rb, ref, x, &qw, N, C, OC);
    assert_bits("matmul_forward_fq against fakequant_forward + matmul_forward", fc, N, C, OC,
                fused, plain, (size_t)N * OC);
    assert_close("matmul_forward_fq against the reference", fused, ref, s_out, (size_t)N * OC,
                 TOL);

    float *dx_f = test_vec_copy(dx0, (size_t)N * C), *dx_p = test_vec_copy(dx0, (size_t)N * C);
    float *dx_r = test_vec_copy(dx0, (size_t)N * C);
    sb->matmul_backward_input_fq(sb, dx_f, dout, &qw, N, C, OC);
    sb->matmul_backward_input(sb, dx_p, dout, wq, N, C, OC);
    rb->matmul_backward_input_fq(rb, dx_r, dout, &qw, N, C, OC);
    assert_bits("matmul_backward_input_fq against fakequant_forward + matmul_backward_input",
                fc, N, C, OC, dx_f, dx_p, (size_t)N * C);
    assert_close("matmul_backward_input_fq against the reference", dx_f, dx_r, s_dx,
                 (size_t)N * C, TOL);

    free(w); free(x); free(dout); free(dx0); free(s_s); free(z_s); free(s_r); free(z_r);
    free(wq); free(s_q); free(z_q); free(scratch); free(s_out); free(s_dx); free(s_dw);
    free(fused); free(plain); free(ref); free(dx_f); free(dx_p); free(dx_r);
}

START_TEST(fused_fakequant_matmul)
{
    qkd_context *sc = simd_context(_i, 2);
    if (!sc)
        return;
    qkd_context *rc = test_context(2);
    test_rng_seed(151);
    for (size_t s = 0; s < sizeof fq_shapes / sizeof fq_shapes[0]; s++)
        for (size_t c = 0; c < sizeof fq_cases / sizeof fq_cases[0]; c++)
            fq_case_run(sc->backend, rc->backend, &fq_cases[c], fq_shapes[s][0],
                        fq_shapes[s][1], fq_shapes[s][2]);
    qkd_context_free(sc);
    qkd_context_free(rc);
}
END_TEST

/* ---- every slot ------------------------------------------------------------------------- */

START_TEST(table_complete)
{
    qkd_context *sc = simd_context(_i, 1);
    if (!sc)
        return;
    qkd_context *rc = test_context(1);
    /* The table is a run of pointers after its header; every slot the
     * reference fills the SIMD table fills too, but those it leaves out on
     * purpose: bf16 attention (its fp32 attention is faster than the
     * reference's bf16 one), the bf16-bits family and the RMSNorm forms
     * that write bits (the reference's scalar products would replace
     * its vector bf16 ones) and the
     * device-decided step (its vector AdamW runs the synchronous one). */
    const qkd__backend *b = sc->backend, *r = rc->backend;
    const char *first = (const char *)&b->destroy, *end = (const char *)(b + 1);
    const char *left_out[] = {
        (const char *)&b->attention_forward_bf16, (const char *)&b->attention_backward_bf16,
        (const char *)&b->matmul_forward_bf16_bits,
        (const char *)&b->matmul_backward_input_bf16_bits,
        (const char *)&b->matmul_backward_weight_bf16_bits,
        (const char *)&b->matmul_forward_to_bf16_bits,
        (const char *)&b->matmul_backward_input_to_bf16_bits,
        (const char *)&b->rmsnorm_forward_bf16_bits,
        (const char *)&b->add_rmsnorm_forward_bf16_bits,
        (const char *)&b->rmsnorm_backward_bf16_bits, (const char *)&b->swiglu_forward_bf16_bits,
        (const char *)&b->swiglu_backward_bf16_bits, (const char *)&b->fakequant_forward_bf16,
        (const char *)&b->step_decide, (const char *)&b->adamw_update_multi_dev};
    const size_t n_left_out = sizeof left_out / sizeof left_out[0];
    ck_assert_uint_eq(b->abi, QKD__BACKEND_ABI);
    for (const char *p = first; p + sizeof(void (*)(void)) <= end; p += sizeof(void (*)(void))) {
        void (*fn)(void), (*ref_fn)(void);
        memcpy(&fn, p, sizeof fn);
        memcpy(&ref_fn, (const char *)r + (p - (const char *)b), sizeof ref_fn);
        int out = 0;
        for (size_t k = 0; k < n_left_out; k++)
            out |= p == left_out[k];
        if (out)
            ck_assert_msg(fn == NULL, "slot at byte %td should stay empty", p - (const char *)b);
        else
            ck_assert_msg(fn != NULL || ref_fn == NULL,
                          "slot at byte %td of the simd table is empty", p - (const char *)b);
    }
    qkd_context_free(rc);
    qkd_context_free(sc);
}
END_TEST

START_TEST(auto_picks_simd)
{
    qkd_context_params p;
    qkd_context_params_init(&p);
    p.n_threads = 1;
    qkd_context *ctx = NULL;
    ck_assert_int_eq(qkd_context_create(&p, &ctx), QKD_OK);
    ck_assert_str_eq(qkd_context_backend_name(ctx), "simd");
    qkd_context_free(ctx);
}
END_TEST

/* ---- a whole model ---------------------------------------------------------------------- *
 * stories260K forward, cross-entropy and backward on B x T random tokens
 * (B * T = 90 rows: ragged for every tile), then a few decoding steps. */

#define MB 2
#define MT 45
#define DECODE_STEPS 12

START_TEST(model_matches_ref)
{
    const char *path = test_shared("models/stories260K/stories260K.bin");
    if (!path)
        return;
    qkd_context *sc = simd_context(_i, 2);
    if (!sc)
        return;
    qkd_context *rc = test_context(2);
    test_model_run s, r;
    test_model_run_do(sc, path, MB, MT, DECODE_STEPS, &s);
    test_model_run_do(rc, path, MB, MT, DECODE_STEPS, &r);
    ck_assert_uint_eq(s.n_grads, r.n_grads);
    ck_assert_msg(fabs(s.loss - r.loss) <= 1e-4 * fabs(r.loss), "loss simd %.9g ref %.9g",
                  (double)s.loss, (double)r.loss);
    test_assert_close_tensor("logits", s.logits, r.logits, s.n_logits, 1e-4);
    test_assert_close_tensor("gradients", s.grads, r.grads, s.n_grads, 1e-4);
    test_assert_close_tensor("decoded logits", s.decoded, r.decoded, s.n_decoded, 1e-4);
    test_model_run_free(&s);
    test_model_run_free(&r);
    qkd_context_free(sc);
    qkd_context_free(rc);
}
END_TEST

START_TEST(model_thread_invariant)
{
    const char *path = test_shared("models/stories260K/stories260K.bin");
    if (!path || !isas[_i].supported())
        return;
    test_model_run runs[2];
    const int threads[2] = {1, 3};
    for (int t = 0; t < 2; t++) {
        qkd_context *ctx = simd_context(_i, threads[t]);
        test_model_run_do(ctx, path, MB, MT, DECODE_STEPS, &runs[t]);
        qkd_context_free(ctx);
    }
    assert_same("logits", runs[0].logits, runs[1].logits, runs[0].n_logits);
    assert_same("gradients", runs[0].grads, runs[1].grads, runs[0].n_grads);
    assert_same("decoded logits", runs[0].decoded, runs[1].decoded, runs[0].n_decoded);
    test_model_run_free(&runs[0]);
    test_model_run_free(&runs[1]);
}
END_TEST

/* ---- a KD-QAT step ------------------------------------------------------------------------
 * The step of ../shared/bench/torch_kdqat.py on stories260K: teacher
 * forward, the student's forward with its linear weights fake-quantized
 * (W4 asymmetric, groups of 32, STE), CAKLD with the teacher's confidence
 * as beta, the student's backward and an AdamW step; then the loss of a
 * second forward from the updated weights. */

struct kdqat_run {
    float beta, loss, loss_after;
    float *grads, *weights;
    size_t n;
};

static void expect_ok(qkd_context *ctx, qkd_status st, const char *what)
{
    ck_assert_msg(st == QKD_OK, "%s: %s (%s)", what, qkd_status_name(st),
                  qkd_context_last_error(ctx));
}

/* Every tensor of m (weights, or gradients when grads) into one array. */
static float *model_tensors(qkd_model *m, int grads, size_t *n)
{
    *n = (size_t)qkd_model_n_params(m);
    float *all = test_vec_new(*n);
    size_t off = 0;
    for (int t = 0; t < qkd_model_n_tensors(m); t++) {
        qkd_tensor_info info = {.size = sizeof info};
        ck_assert_int_eq(qkd_model_tensor_info(m, t, &info), QKD_OK);
        ck_assert_uint_le(off + (size_t)info.n_elements, *n);
        qkd_status st = grads ? qkd_model_grad_get(m, t, all + off, (size_t)info.n_elements)
                              : qkd_model_tensor_get(m, t, all + off, (size_t)info.n_elements);
        ck_assert_int_eq(st, QKD_OK);
        off += (size_t)info.n_elements;
    }
    *n = off;
    return all;
}

static void kdqat_run(qkd_context *ctx, const char *path, struct kdqat_run *r)
{
    qkd_model *teacher = NULL, *student = NULL;
    qkd_quantizer *quant = NULL;
    qkd_loss *loss = NULL;
    qkd_optimizer *opt = NULL;
    expect_ok(ctx, qkd_model_load(ctx, path, &teacher), "load teacher");
    expect_ok(ctx, qkd_model_load(ctx, path, &student), "load student");
    qkd_quant_params qp;
    qkd_quant_params_init(&qp);
    qp.scheme = QKD_QUANT_ASYM;
    qp.bits = 4;
    qp.group_size = 32;
    qp.estimator = QKD_ESTIMATOR_STE;
    expect_ok(ctx, qkd_quantizer_create(ctx, &qp, &quant), "quantizer");
    expect_ok(ctx, qkd_model_set_quantizer(student, quant, QKD_QUANT_TARGET_LINEAR), "bind");
    loss = test_one_term_loss(ctx, QKD_LOSS_CAKLD, 0);
    qkd_optim_params op;
    qkd_optim_params_init(&op);
    op.lr = 1e-5f;
    expect_ok(ctx, qkd_optimizer_create(student, &op, &opt), "optimizer");

    int32_t tokens[MB * MT];
    test_rng_seed(131);
    for (int i = 0; i < MB * MT; i++)
        tokens[i] = (int32_t)(test_rng_next(0, 1) * 512);
    expect_ok(ctx, qkd_model_forward(teacher, tokens, MB, MT), "teacher forward");
    expect_ok(ctx, qkd_model_forward(student, tokens, MB, MT), "student forward");
    expect_ok(ctx, qkd_loss_teacher_confidence(teacher, NULL, &r->beta), "confidence");
    expect_ok(ctx, qkd_loss_set_beta(loss, 0, r->beta), "beta");
    expect_ok(ctx, qkd_loss_compute(loss, student, teacher, NULL, &r->loss), "CAKLD");
    expect_ok(ctx, qkd_model_zero_grad(student), "zero_grad");
    expect_ok(ctx, qkd_model_backward(student, NULL), "backward");
    r->grads = model_tensors(student, 1, &r->n);
    expect_ok(ctx, qkd_optimizer_step(opt, NULL), "optimizer step");
    r->weights = model_tensors(student, 0, &r->n);
    expect_ok(ctx, qkd_model_forward(student, tokens, MB, MT), "student forward 2");
    expect_ok(ctx, qkd_loss_compute(loss, student, teacher, NULL, &r->loss_after), "CAKLD 2");
    qkd_optimizer_free(opt);
    qkd_loss_free(loss);
    qkd_quantizer_free(quant);
    qkd_model_free(student);
    qkd_model_free(teacher);
}

/* ---- a fused student -------------------------------------------------------------------- *
 * A student's forward, cross-entropy and backward with the fused slots and
 * with them removed (the model then writes Q(w) and runs the plain
 * products): with 18 rows both run the same GEMM on the same values, so
 * logits and gradients must be the same bits. A small random model with
 * grouped-query attention and an untied, quantized head; every scheme. */

static void fused_student_run(int isa, int fused, const qkd_quant_params *qp, float **logits,
                              float **grads, size_t *n_logits, size_t *n_grads)
{
    enum { B = 2, T = 9 };
    qkd_context *ctx = simd_context(isa, 2);
    if (!fused) {
        ctx->backend->fakequant_groups = NULL;
        ctx->backend->matmul_forward_fq = NULL;
        ctx->backend->matmul_backward_input_fq = NULL;
    }
    qkd_model_config cfg;
    qkd_model_config_init(&cfg);
    cfg.dim = 64, cfg.hidden_dim = 172, cfg.n_layers = 2, cfg.n_heads = 4, cfg.n_kv_heads = 2;
    cfg.vocab_size = 100, cfg.max_seq_len = T, cfg.tied_embeddings = 0;
    qkd_model *m = NULL;
    qkd_quantizer *q = NULL;
    expect_ok(ctx, qkd_model_create(ctx, &cfg, &m), "model");
    expect_ok(ctx, qkd_model_init_random(m, 5, 0.05f), "init_random");
    expect_ok(ctx, qkd_quantizer_create(ctx, qp, &q), "quantizer");
    expect_ok(ctx, qkd_model_set_quantizer(m, q, QKD_QUANT_TARGET_LINEAR |
                                                     QKD_QUANT_TARGET(QKD_TENSOR_OUTPUT)),
              "bind");
    int32_t tokens[B * T], targets[B * T];
    test_rng_seed(161);
    for (int i = 0; i < B * T; i++) {
        tokens[i] = (int32_t)(test_rng_next(0, 1) * 100);
        targets[i] = (int32_t)(test_rng_next(0, 1) * 100);
    }
    float loss;
    expect_ok(ctx, qkd_model_forward(m, tokens, B, T), "forward");
    expect_ok(ctx, qkd_model_cross_entropy(m, targets, 1, &loss), "cross-entropy");
    expect_ok(ctx, qkd_model_zero_grad(m), "zero_grad");
    expect_ok(ctx, qkd_model_backward(m, NULL), "backward");
    *n_logits = (size_t)B * T * 100;
    *logits = test_vec_new(*n_logits);
    expect_ok(ctx, qkd_model_logits(m, *logits, *n_logits), "logits");
    *grads = model_tensors(m, 1, n_grads);
    qkd_model_free(m);
    qkd_quantizer_free(q);
    qkd_context_free(ctx);
}

START_TEST(fused_student_equals_unfused)
{
    if (!isas[_i].supported())
        return;
    static const struct {
        int scheme, bits, group;
        float clip;
    } cases[] = {{QKD_QUANT_ASYM, 4, 32, 1.0f}, {QKD_QUANT_SYM, 3, 0, 0.9f},
                 {QKD_QUANT_TERNARY, 2, 32, 1.0f}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        qkd_quant_params qp;
        qkd_quant_params_init(&qp);
        qp.scheme = cases[c].scheme;
        qp.bits = cases[c].bits;
        qp.group_size = cases[c].group;
        qp.estimator = QKD_ESTIMATOR_STE;
        if (cases[c].clip < 1.0f) {
            qp.clip = QKD_CLIP_FIXED;
            qp.clip_ratio = cases[c].clip;
        }
        float *l[2], *g[2];
        size_t nl, ng;
        for (int fused = 0; fused < 2; fused++)
            fused_student_run(_i, fused, &qp, &l[fused], &g[fused], &nl, &ng);
        ck_assert_msg(memcmp(l[0], l[1], nl * sizeof *l[0]) == 0,
                      "scheme %d: fused logits differ", qp.scheme);
        ck_assert_msg(memcmp(g[0], g[1], ng * sizeof *g[0]) == 0,
                      "scheme %d: fused gradients differ", qp.scheme);
        free(l[0]), free(l[1]), free(g[0]), free(g[1]);
    }
}
END_TEST

START_TEST(kdqat_step_matches_ref)
{
    const char *path = test_shared("models/stories260K/stories260K.bin");
    if (!path)
        return;
    qkd_context *sc = simd_context(_i, 2);
    if (!sc)
        return;
    qkd_context *rc = test_context(2);
    struct kdqat_run s, r;
    kdqat_run(sc, path, &s);
    kdqat_run(rc, path, &r);
    ck_assert_uint_eq(s.n, r.n);
    ck_assert_msg(fabs(s.beta - r.beta) <= 1e-4 * r.beta, "beta simd %.9g ref %.9g",
                  (double)s.beta, (double)r.beta);
    ck_assert_msg(fabs(s.loss - r.loss) <= 1e-4 * fabs(r.loss), "loss simd %.9g ref %.9g",
                  (double)s.loss, (double)r.loss);
    ck_assert_msg(fabs(s.loss_after - r.loss_after) <= 1e-4 * fabs(r.loss_after),
                  "loss after the step: simd %.9g ref %.9g", (double)s.loss_after,
                  (double)r.loss_after);
    test_assert_close_tensor("student gradients", s.grads, r.grads, s.n, 1e-4);
    test_assert_close_tensor("updated weights", s.weights, r.weights, s.n, 1e-4);
    free(s.grads); free(s.weights); free(r.grads); free(r.weights);
    qkd_context_free(sc);
    qkd_context_free(rc);
}
END_TEST

/* ---- the suite ------------------------------------------------------------------------- */

Suite *suite_backend_simd(void)
{
    Suite *s = suite_create("backend_simd");
    TCase *tc = tcase_create("kernels");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, matmul_matches_ref, 0, N_ISAS);
#ifndef __aarch64__
    tcase_add_test(tc, matmul_bf16_vdpbf16ps_matches_ref);
#endif
    tcase_add_loop_test(tc, matmul_thread_invariant, 0, N_ISAS);
    tcase_add_loop_test(tc, rmsnorm_matches_ref, 0, N_ISAS);
    tcase_add_loop_test(tc, rope_matches_ref, 0, N_ISAS);
    tcase_add_loop_test(tc, attention_matches_ref, 0, N_ISAS);
    tcase_add_loop_test(tc, elementwise_matches_ref, 0, N_ISAS);
    tcase_add_loop_test(tc, swiglu_matches_ref, 0, N_ISAS);
    tcase_add_loop_test(tc, softmax_family_matches_ref, 0, N_ISAS);
    tcase_add_loop_test(tc, cross_entropy_matches_ref, 0, N_ISAS);
    tcase_add_loop_test(tc, optimizers_equal_ref, 0, N_ISAS);
    tcase_add_loop_test(tc, kd_loss_matches_ref, 0, N_ISAS);
    tcase_add_loop_test(tc, row_max_prob_matches_ref, 0, N_ISAS);
    tcase_add_loop_test(tc, fakequant_equals_ref, 0, N_ISAS);
    tcase_add_loop_test(tc, fused_fakequant_matmul, 0, N_ISAS);
    tcase_add_loop_test(tc, table_complete, 0, N_ISAS);
    tcase_add_test(tc, auto_picks_simd);
    suite_add_tcase(s, tc);

    TCase *model = tcase_create("model");
    tcase_set_timeout(model, 120);
    tcase_add_loop_test(model, model_matches_ref, 0, N_ISAS);
    tcase_add_loop_test(model, model_thread_invariant, 0, N_ISAS);
    tcase_add_loop_test(model, kdqat_step_matches_ref, 0, N_ISAS);
    tcase_add_loop_test(model, fused_student_equals_unfused, 0, N_ISAS);
    suite_add_tcase(s, model);
    return s;
}

#else /* no SIMD backend in this build */

START_TEST(simd_not_built)
{
    qkd_context_params p;
    qkd_context_params_init(&p);
    p.backend = QKD_BACKEND_SIMD;
    qkd_context *ctx = NULL;
    ck_assert_int_eq(qkd_context_create(&p, &ctx), QKD_ERR_UNSUPPORTED);
    ck_assert_ptr_null(ctx);
}
END_TEST

Suite *suite_backend_simd(void)
{
    Suite *s = suite_create("backend_simd");
    TCase *tc = tcase_create("not_built");
    tcase_add_test(tc, simd_not_built);
    suite_add_tcase(s, tc);
    return s;
}

#endif
