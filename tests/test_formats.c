/* GGUF block formats: our blocks and dequantized values against ggml's
 * reference vectors (../shared/quant_ref/ggml_vectors, byte and value
 * exact), TQ2_0's documented layout, the float -> half and bfloat16
 * conversions on hand-picked values, and the format-matched quantizers
 * (the fake-quantized weights are the dequantized blocks, with the stated
 * fallbacks). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

#include "core/core.h"
#include "core/half.h"
#include "backend/backend.h"
#include "qkd/quant.h"
#include "quant/ggml_blocks.h"

/* ---- helpers ------------------------------------------------------------------ */

static uint64_t rng_state;

/* Uniform in [lo, hi), in float arithmetic, from the shared splitmix64 sequence. */
static float rng_uniform(float lo, float hi)
{
    return lo + (hi - lo) * (float)test_rng_unit(&rng_state);
}

static float *random_weights(int64_t n, uint64_t seed)
{
    float *w = malloc((size_t)n * sizeof *w);
    ck_assert_ptr_nonnull(w);
    rng_state = seed;
    for (int64_t i = 0; i < n; i++)
        w[i] = rng_uniform(-1.0f, 1.0f) * (1.0f + (float)(i % 7)) * 0.05f;
    return w;
}

/* Quantize n values with format f and dequantize them again. */
static void round_trip(const qkd__ggml_format *f, const float *x, float *y, int64_t n)
{
    void *blocks = malloc(qkd__ggml_row_bytes(f, n));
    ck_assert_ptr_nonnull(blocks);
    qkd__ggml_quantize_row(f, x, blocks, n);
    qkd__ggml_dequantize_row(f, blocks, y, n);
    free(blocks);
}

/* ---- ggml's reference vectors ---------------------------------------------------- */

typedef struct vec_case {
    const char *input;
    const char *suffix; /* as in the file names */
    uint32_t type;
} vec_case;

static const vec_case vec_cases[] = {
    {"ramp0to127", "q4_0", QKD__GGML_Q4_0},   {"ramp0to127", "q4_1", QKD__GGML_Q4_1},
    {"ramp0to127", "q5_0", QKD__GGML_Q5_0},   {"ramp0to127", "q5_1", QKD__GGML_Q5_1},
    {"ramp0to127", "q8_0", QKD__GGML_Q8_0},   {"sincos2048", "q4_0", QKD__GGML_Q4_0},
    {"sincos2048", "q4_1", QKD__GGML_Q4_1},   {"sincos2048", "q5_0", QKD__GGML_Q5_0},
    {"sincos2048", "q5_1", QKD__GGML_Q5_1},   {"sincos2048", "q8_0", QKD__GGML_Q8_0},
    {"sincos2048", "q4_K", QKD__GGML_Q4_K},   {"sincos2048", "q6_K", QKD__GGML_Q6_K},
};
enum { N_VEC_CASES = sizeof vec_cases / sizeof vec_cases[0] };

static void *read_vector(const char *input, const char *suffix, size_t *len)
{
    char rel[256];
    snprintf(rel, sizeof rel, "quant_ref/ggml_vectors/%s.%s", input, suffix);
    const char *path = test_shared(rel);
    return path ? test_read_file(path, len) : NULL;
}

/* Our blocks equal ggml's byte for byte; our dequantization of ggml's
 * blocks and of ours equals ggml's values bit for bit. */
START_TEST(test_ggml_vectors)
{
    const vec_case *c = &vec_cases[_i];
    char suffix[64];
    size_t n_in, n_blocks, n_deq;
    float *x = read_vector(c->input, "input.f32le.bin", &n_in);
    if (!x)
        return;
    snprintf(suffix, sizeof suffix, "%s.blocks.bin", c->suffix);
    uint8_t *want_blocks = read_vector(c->input, suffix, &n_blocks);
    snprintf(suffix, sizeof suffix, "%s.dequant.f32le.bin", c->suffix);
    float *want = read_vector(c->input, suffix, &n_deq);
    ck_assert_ptr_nonnull(want_blocks);
    ck_assert_ptr_nonnull(want);

    const qkd__ggml_format *f = qkd__ggml_format_of(c->type);
    ck_assert_ptr_nonnull(f);
    const int64_t n = (int64_t)(n_in / sizeof(float));
    ck_assert_uint_eq(n_deq, n_in);
    ck_assert_uint_eq(n_blocks, qkd__ggml_row_bytes(f, n));

    uint8_t *blocks = malloc(n_blocks);
    float *y = malloc(n_in);
    ck_assert(blocks && y);
    qkd__ggml_quantize_row(f, x, blocks, n);
    for (size_t i = 0; i < n_blocks; i++)
        ck_assert_msg(blocks[i] == want_blocks[i], "%s %s: byte %zu is %02x, ggml has %02x",
                      c->input, c->suffix, i, blocks[i], want_blocks[i]);
    qkd__ggml_dequantize_row(f, want_blocks, y, n);
    ck_assert_msg(memcmp(y, want, n_in) == 0, "%s %s: dequantized ggml blocks differ",
                  c->input, c->suffix);
    round_trip(f, x, y, n);
    ck_assert_msg(memcmp(y, want, n_in) == 0, "%s %s: round trip differs", c->input,
                  c->suffix);
    free(blocks);
    free(y);
    free(x);
    free(want_blocks);
    free(want);
}
END_TEST

/* The group scales and offsets reproduce every dequantized value exactly
 * as code * scale + offset, and the codes stay in the format's range. */
START_TEST(test_groups_and_codes)
{
    static const uint32_t types[] = {QKD__GGML_Q8_0, QKD__GGML_Q4_0, QKD__GGML_Q4_1,
                                     QKD__GGML_Q5_0, QKD__GGML_Q5_1, QKD__GGML_Q4_K,
                                     QKD__GGML_Q6_K, QKD__GGML_TQ2_0};
    static const int lo[] = {-128, 0, 0, 0, 0, 0, 0, 0}, hi[] = {127, 15, 15, 31, 31, 15, 63, 2};
    float *x = random_weights(QKD__QK_K, 11);
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
        const qkd__ggml_format *f = qkd__ggml_format_of(types[t]);
        uint8_t blk[QKD__GGML_MAX_BLOCK_BYTES];
        int32_t codes[QKD__QK_K];
        float y[QKD__QK_K], s[QKD__QK_K], o[QKD__QK_K];
        for (int b = 0; b < QKD__QK_K; b += f->block) {
            f->quantize(x + b, blk);
            f->dequantize(blk, y);
            f->codes(blk, codes);
            f->groups(blk, s, o);
            for (int i = 0; i < f->block; i++) {
                ck_assert_int_ge(codes[i], lo[t]);
                ck_assert_int_le(codes[i], hi[t]);
                float v = (float)codes[i] * s[i / f->group] + o[i / f->group];
                ck_assert_msg(v == y[i], "%s: value %d: %a * %a + %a = %a, dequantized %a",
                              f->name, b + i, (double)codes[i], (double)s[i / f->group],
                              (double)o[i / f->group], (double)v, (double)y[i]);
            }
        }
    }
    free(x);
}
END_TEST

/* TQ2_0 has no reference vectors: check the documented layout directly.
 * Inputs are multiples of a that never sit on a rounding boundary. */
START_TEST(test_tq2_0_layout)
{
    const qkd__ggml_format *f = qkd__ggml_format_of(QKD__GGML_TQ2_0);
    ck_assert_int_eq(f->block, 256);
    ck_assert_uint_eq(f->bytes, 66);
    static const float pattern[] = {-1.0f, 0.0f, 1.0f, 0.3f, -0.7f, 0.45f, -0.2f};
    float x[QKD__QK_K], y[QKD__QK_K];
    const float a = 0.8125f; /* exactly a half */
    for (int i = 0; i < QKD__QK_K; i++)
        x[i] = a * pattern[(i * 5 + i / 32) % 7];
    x[77] = -a; /* make sure max |x| = a */
    uint8_t blk[66];
    f->quantize(x, blk);
    uint16_t d;
    memcpy(&d, blk + 64, 2);
    ck_assert_uint_eq(d, qkd__f32_to_f16(a));
    for (int i = 0; i < QKD__QK_K; i++) {
        int m = i % 32, n = i % 128 / 32, h = i / 128;
        int q = blk[32 * h + m] >> (2 * n) & 3;
        double r = (double)x[i] / a;
        int want = (int)(r < 0 ? -floor(-r + 0.5) : floor(r + 0.5)) + 1;
        ck_assert_msg(q == want, "value %d: code %d, expected %d", i, q, want);
    }
    f->dequantize(blk, y);
    for (int i = 0; i < QKD__QK_K; i++) {
        double r = (double)x[i] / a;
        double want = (r > 0.5 ? 1.0 : r < -0.5 ? -1.0 : 0.0) * a;
        ck_assert_msg((double)y[i] == want, "value %d: %g, expected %g", i, (double)y[i], want);
    }
    /* an all-zero block: d = 0, every code 1 */
    memset(x, 0, sizeof x);
    f->quantize(x, blk);
    for (int i = 0; i < 64; i++)
        ck_assert_uint_eq(blk[i], 0x55);
    ck_assert(blk[64] == 0 && blk[65] == 0);
}
END_TEST

/* ---- half and bfloat16 conversions ------------------------------------------------- */

START_TEST(test_f32_to_f16_hand_picked)
{
    static const struct {
        float f;
        uint16_t h;
    } cases[] = {
        {1.0f, 0x3c00},
        {-2.0f, 0xc000},
        {0.0f, 0x0000},
        {-0.0f, 0x8000},
        {0.1f, 0x2e66},
        {65504.0f, 0x7bff},
        {65519.99f, 0x7bff},       /* just below the tie: stays finite */
        {65520.0f, 0x7c00},        /* tie with 65536: to even, infinity */
        {1e6f, 0x7c00},
        {-1e30f, 0xfc00},
        {1.00048828125f, 0x3c00},  /* 1 + 2^-11: tie, to even (1.0) */
        {1.00146484375f, 0x3c02},  /* 1 + 3 2^-11: tie, to even (1 + 2^-9) */
        {1.0009765625f, 0x3c01},   /* 1 + 2^-10 exactly */
        {0x1p-14f, 0x0400},        /* smallest normal */
        {0x1p-24f, 0x0001},        /* smallest subnormal */
        {0x1p-25f, 0x0000},        /* half of it: tie, to even (0) */
        {0x1.8p-25f, 0x0001},      /* above the tie */
        {0x1.8p-24f, 0x0002},      /* 1.5 units: tie, to even (2) */
        {0x1.4p-23f, 0x0002},      /* 2.5 units: tie, to even (2) */
        {0x1.ffcp-15f, 0x0400},    /* 1023.5 units: tie, to even: carries into the normals */
        {0x1.ff8p-15f, 0x03ff},    /* 1023 units: the largest subnormal */
        {-0x1p-24f, 0x8001},
        {0x1p-30f, 0x0000},
        {INFINITY, 0x7c00},
        {-INFINITY, 0xfc00},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        ck_assert_msg(qkd__f32_to_f16(cases[i].f) == cases[i].h, "%a -> %04x, expected %04x",
                      (double)cases[i].f, qkd__f32_to_f16(cases[i].f), cases[i].h);
    uint16_t n = qkd__f32_to_f16(NAN);
    ck_assert_uint_eq(n & 0x7c00, 0x7c00);
    ck_assert_uint_ne(n & 0x03ff, 0);
    ck_assert(isnan(qkd__f16_to_f32(qkd__f32_to_f16(-NAN))));
}
END_TEST

/* Every finite half converts to float and back unchanged, and a value
 * between two neighbouring halves goes to the nearer (even on ties). */
START_TEST(test_f16_round_trip_all)
{
    for (uint32_t h = 0; h < 0x10000; h++) {
        if ((h & 0x7c00) == 0x7c00)
            continue;
        float f = qkd__f16_to_f32((uint16_t)h);
        ck_assert_uint_eq(qkd__f32_to_f16(f), h);
        if ((h & 0x7fff) == 0x7bff)
            continue;
        if (h & 0x8000)
            continue;
        double next = qkd__f16_to_f32((uint16_t)(h + 1));
        float mid = (float)(((double)f + next) / 2); /* exact: halves have 11 bits */
        uint16_t even = (h & 1) ? (uint16_t)(h + 1) : (uint16_t)h;
        ck_assert_uint_eq(qkd__f32_to_f16(mid), even);
        ck_assert_uint_eq(qkd__f32_to_f16(nextafterf(mid, 0.0f)), h);
        ck_assert_uint_eq(qkd__f32_to_f16(nextafterf(mid, INFINITY)), h + 1);
    }
}
END_TEST

START_TEST(test_f32_to_bf16)
{
    ck_assert_uint_eq(qkd__f32_to_bf16(1.0f), 0x3f80);
    ck_assert_uint_eq(qkd__f32_to_bf16(-2.0f), 0xc000);
    ck_assert_uint_eq(qkd__f32_to_bf16(1.00390625f), 0x3f80);  /* 1 + 2^-8: tie, to even */
    ck_assert_uint_eq(qkd__f32_to_bf16(1.01171875f), 0x3f82);  /* 1 + 3 2^-8: tie, to even */
    ck_assert_uint_eq(qkd__f32_to_bf16(1.0078125f), 0x3f81);
    ck_assert_uint_eq(qkd__f32_to_bf16(3.4e38f), 0x7f80);      /* rounds up to infinity */
    ck_assert_uint_eq(qkd__f32_to_bf16(INFINITY), 0x7f80);
    ck_assert_uint_eq(qkd__f32_to_bf16(0x1p-130f), 0x0008);    /* subnormals kept */
    ck_assert(isnan(qkd__bf16_to_f32(qkd__f32_to_bf16(NAN))));
}
END_TEST

/* ---- format-matched quantizers ------------------------------------------------- */

static qkd_quantizer *format_quantizer(qkd_context *ctx, qkd_quant_scheme scheme)
{
    qkd_quant_params p;
    qkd_quant_params_init(&p);
    p.scheme = scheme;
    qkd_quantizer *q = NULL;
    ck_assert_int_eq(qkd_quantizer_create(ctx, &p, &q), QKD_OK);
    return q;
}

typedef struct scheme_case {
    qkd_quant_scheme scheme;
    uint32_t type;
} scheme_case;

static const scheme_case scheme_cases[] = {
    {QKD_QUANT_Q8_0, QKD__GGML_Q8_0}, {QKD_QUANT_Q4_0, QKD__GGML_Q4_0},
    {QKD_QUANT_Q4_1, QKD__GGML_Q4_1}, {QKD_QUANT_Q5_0, QKD__GGML_Q5_0},
    {QKD_QUANT_Q5_1, QKD__GGML_Q5_1}, {QKD_QUANT_Q4_K, QKD__GGML_Q4_K},
    {QKD_QUANT_Q6_K, QKD__GGML_Q6_K}, {QKD_QUANT_TQ2_0, QKD__GGML_TQ2_0},
};
enum { N_SCHEME_CASES = sizeof scheme_cases / sizeof scheme_cases[0] };

/* A rows x cols weight through the quantizer equals the blocks of the
 * stated type: wq exactly, codes, and scales/zeros as groups. */
static void check_quantizer(qkd_quantizer *q, uint32_t type, int64_t rows, int64_t cols,
                            uint64_t seed)
{
    const qkd__ggml_format *f = qkd__ggml_format_of(type);
    const int64_t n = rows * cols;
    const int64_t ng = f->group ? n / f->group : 0;
    ck_assert_int_eq(qkd_quantizer_n_groups(q, rows, cols), ng);
    float *w = random_weights(n, seed), *wq = malloc((size_t)n * 4), *want = malloc((size_t)n * 4);
    float *scales = malloc((size_t)(ng + 1) * 4), *zeros = malloc((size_t)(ng + 1) * 4);
    int32_t *codes = malloc((size_t)n * 4);
    ck_assert(wq && want && scales && zeros && codes);
    ck_assert_int_eq(qkd_quantizer_quantize(q, w, rows, cols, wq, codes, scales, zeros), QKD_OK);
    round_trip(f, w, want, n);
    ck_assert_msg(memcmp(wq, want, (size_t)n * 4) == 0, "%s: fake quantization differs",
                  f->name);
    uint8_t blk[QKD__GGML_MAX_BLOCK_BYTES];
    int32_t bc[QKD__QK_K];
    for (int64_t b = 0; b < n; b += f->block) {
        f->quantize(w + b, blk);
        f->codes(blk, bc);
        ck_assert(memcmp(codes + b, bc, (size_t)f->block * 4) == 0);
        for (int i = 0; f->group && i < f->block; i++) {
            int64_t g = (b + i) / f->group;
            ck_assert((float)codes[b + i] * scales[g] + zeros[g] == wq[b + i]);
        }
    }
    free(w);
    free(wq);
    free(want);
    free(scales);
    free(zeros);
    free(codes);
}

START_TEST(test_format_quantizer_equals_blocks)
{
    const scheme_case *c = &scheme_cases[_i];
    qkd_context *ctx = test_context(2);
    qkd_quantizer *q = format_quantizer(ctx, c->scheme);
    check_quantizer(q, c->type, 3, 512, 21 + (uint64_t)_i);
    /* a row of 96: the 256-value formats fall back to Q8_0 */
    int k_quant = qkd__ggml_format_of(c->type)->block == QKD__QK_K;
    check_quantizer(q, k_quant ? QKD__GGML_Q8_0 : c->type, 2, 96, 31 + (uint64_t)_i);
    /* stories260K's ffn_down rows (172): F16 for every format */
    check_quantizer(q, QKD__GGML_F16, 4, 172, 41 + (uint64_t)_i);
    qkd_quantizer_free(q);
    qkd_context_free(ctx);
}
END_TEST

/* The F16 fallback is each weight rounded to the nearest half, and the
 * codes are the half bit patterns. */
START_TEST(test_f16_fallback_values)
{
    qkd_context *ctx = test_context(1);
    qkd_quantizer *q = format_quantizer(ctx, QKD_QUANT_Q4_0);
    float w[2 * 33], wq[2 * 33];
    int32_t codes[2 * 33];
    for (int i = 0; i < 66; i++)
        w[i] = 0.001f * (float)(i * i) - 1.3f;
    w[5] = 70000.0f; /* beyond the half range */
    ck_assert_int_eq(qkd_quantizer_n_groups(q, 2, 33), 0);
    ck_assert_int_eq(qkd_quantizer_quantize(q, w, 2, 33, wq, codes, NULL, NULL), QKD_OK);
    for (int i = 0; i < 66; i++) {
        ck_assert(wq[i] == qkd__f16_to_f32(qkd__f32_to_f16(w[i])));
        ck_assert_int_eq(codes[i], qkd__f32_to_f16(w[i]));
        ck_assert(i == 5 || fabsf(wq[i] - w[i]) <= fabsf(w[i]) * 0x1p-11f);
    }
    ck_assert(isinf(wq[5]));
    qkd_quantizer_free(q);
    qkd_context_free(ctx);
}
END_TEST

START_TEST(test_format_params_checked)
{
    qkd_context *ctx = test_context(1);
    qkd_quant_params p;
    qkd_quantizer *q = NULL;
    qkd_quant_params_init(&p);
    p.scheme = QKD_QUANT_Q4_1;
    p.clip = QKD_CLIP_FIXED;
    p.clip_ratio = 0.9f;
    ck_assert_int_eq(qkd_quantizer_create(ctx, &p, &q), QKD_ERR_INVALID_ARG);
    ck_assert_ptr_null(q);
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(ctx), "clip"));
    qkd_quant_params_init(&p);
    p.scheme = QKD_QUANT_Q6_K;
    p.estimator = QKD_ESTIMATOR_CONTINUOUS;
    ck_assert_int_eq(qkd_quantizer_create(ctx, &p, &q), QKD_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(ctx), "STE"));
    qkd_quant_params_init(&p);
    p.scheme = (qkd_quant_scheme)11;
    ck_assert_int_eq(qkd_quantizer_create(ctx, &p, &q), QKD_ERR_INVALID_ARG);
    qkd_quant_params_init(&p);
    p.scheme = QKD_QUANT_TQ2_0;
    p.bits = 3; /* ignored by format schemes */
    p.group_size = -1;
    ck_assert_int_eq(qkd_quantizer_create(ctx, &p, &q), QKD_OK);
    ck_assert_int_eq(qkd_quantizer_n_groups(q, 2, 512), 4);
    qkd_quantizer_free(q);
    qkd_context_free(ctx);
}
END_TEST

/* The kernels: the same result on 1 and 2 threads, and the STE backward
 * passes the gradient through unchanged. */
START_TEST(test_format_kernels)
{
    const int64_t rows = 5, cols = 256, n = rows * cols;
    float *w = random_weights(n, 77), *dq = random_weights(n, 78);
    float *host[2], dw[1280];
    for (int t = 0; t < 2; t++) {
        qkd_context *ctx = test_context(t + 1);
        qkd_quantizer *q = format_quantizer(ctx, QKD_QUANT_Q4_K);
        host[t] = malloc((size_t)n * 4);
        ck_assert_int_eq(qkd_quantizer_quantize(q, w, rows, cols, host[t], NULL, NULL, NULL),
                         QKD_OK);
        qkd__backend *be = ctx->backend;
        qkd__quant_spec spec = {.scheme = QKD_QUANT_Q4_K, .bits = 4, .group = cols,
                                .clip_ratio = 1.0f};
        float *dev;
        ck_assert_int_eq(be->alloc(be, (size_t)n * 3 * 4, (void **)&dev), QKD_OK);
        ck_assert_int_eq(be->upload(be, dev, w, (size_t)n * 4), QKD_OK);
        ck_assert_int_eq(be->upload(be, dev + n, dq, (size_t)n * 4), QKD_OK);
        be->fill(be, dev + 2 * n, 0.5f, (size_t)n);
        be->fakequant_backward(be, dev + 2 * n, dev + n, dev, NULL, NULL, rows, cols, &spec);
        ck_assert_int_eq(be->sync(be), QKD_OK);
        ck_assert_int_eq(be->download(be, dw, dev + 2 * n, (size_t)n * 4), QKD_OK);
        for (int64_t i = 0; i < n; i++)
            ck_assert(dw[i] == 0.5f + dq[i]);
        be->free(be, dev);
        qkd_quantizer_free(q);
        qkd_context_free(ctx);
    }
    ck_assert(memcmp(host[0], host[1], (size_t)n * 4) == 0);
    free(host[0]);
    free(host[1]);
    free(w);
    free(dq);
}
END_TEST

Suite *suite_formats(void)
{
    Suite *s = suite_create("formats");
    TCase *tc = tcase_create("blocks");
    tcase_add_loop_test(tc, test_ggml_vectors, 0, N_VEC_CASES);
    tcase_add_test(tc, test_groups_and_codes);
    tcase_add_test(tc, test_tq2_0_layout);
    suite_add_tcase(s, tc);

    tc = tcase_create("half");
    tcase_add_test(tc, test_f32_to_f16_hand_picked);
    tcase_add_test(tc, test_f16_round_trip_all);
    tcase_add_test(tc, test_f32_to_bf16);
    suite_add_tcase(s, tc);

    tc = tcase_create("quantizers");
    tcase_add_loop_test(tc, test_format_quantizer_equals_blocks, 0, N_SCHEME_CASES);
    tcase_add_test(tc, test_f16_fallback_values);
    tcase_add_test(tc, test_format_params_checked);
    tcase_add_test(tc, test_format_kernels);
    suite_add_tcase(s, tc);
    return s;
}
