/* ggml's reference quantizers and dequantizers, written from the
 * arithmetic of ggml-quants.c (quantize_row_*_ref, dequantize_row_*):
 * every step is in float in the same order, scales are rounded to half
 * with ties to even, and codes are rounded as ggml rounds them (truncation
 * after adding 0.5 or 8.5, roundf, or round-to-even), so the blocks match
 * byte for byte. The build compiles C in ISO mode, where GCC does not fuse
 * a multiply and an add: a fused one would change the last bit. */
#include "quant/ggml_blocks.h"

#include <float.h>
#include <math.h>
#include <string.h>

#include "core/half.h"

/* Below this a k-quant sub-block or super-block counts as all zero. */
#define GROUP_MAX_EPS 1e-15f

static float half(uint16_t h)
{
    return qkd__f16_to_f32(h);
}

/* Round to the nearest integer, ties to even (ggml's nearest_int; its
 * arguments stay far inside the int range). */
static int nearest_int(float x)
{
    return (int)rintf(x);
}

static int imin(int a, int b)
{
    return a < b ? a : b;
}

static int iclamp(int x, int lo, int hi)
{
    return x < lo ? lo : x > hi ? hi : x;
}

/* The value of largest magnitude (the first one on ties) and |it|. */
static float signed_absmax(const float *x, int n, float *amax)
{
    float max = 0.0f;
    *amax = 0.0f;
    for (int i = 0; i < n; i++) {
        if (*amax < fabsf(x[i])) {
            *amax = fabsf(x[i]);
            max = x[i];
        }
    }
    return max;
}

static void min_max(const float *x, int n, float *mn, float *mx)
{
    *mn = FLT_MAX;
    *mx = -FLT_MAX;
    for (int i = 0; i < n; i++) {
        if (x[i] < *mn)
            *mn = x[i];
        if (x[i] > *mx)
            *mx = x[i];
    }
}

static float inverse(float d)
{
    return d != 0.0f ? 1.0f / d : 0.0f;
}

/* Low 4 bits of 32 codes as nibbles (value j low, j + 16 high) and, for
 * the 5-bit formats, bit 4 of value j in bit j of qh. */
static void pack_nibbles(const uint8_t *q, uint8_t *qs, uint8_t *qh)
{
    uint32_t h = 0;
    for (int j = 0; j < QKD__QK / 2; j++) {
        qs[j] = (uint8_t)((q[j] & 0x0f) | (q[j + 16] & 0x0f) << 4);
        h |= (uint32_t)(q[j] >> 4 & 1) << j | (uint32_t)(q[j + 16] >> 4 & 1) << (j + 16);
    }
    if (qh)
        memcpy(qh, &h, 4);
}

static void unpack_nibbles(const uint8_t *qs, const uint8_t *qh, int32_t *q)
{
    uint32_t h = 0;
    if (qh)
        memcpy(&h, qh, 4);
    for (int j = 0; j < QKD__QK / 2; j++) {
        q[j] = (int32_t)((qs[j] & 0x0f) | (h >> j & 1) << 4);
        q[j + 16] = (int32_t)((qs[j] >> 4) | (h >> (j + 16) & 1) << 4);
    }
}

/* ---- symmetric 32-value formats: Q8_0, Q4_0, Q5_0 -------------------------- */

static void quantize_q8_0(const float *x, void *blk)
{
    qkd__block_q8_0 *y = blk;
    float amax = 0.0f;
    for (int j = 0; j < QKD__QK; j++)
        amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / 127, id = inverse(d);
    y->d = qkd__f32_to_f16(d);
    for (int j = 0; j < QKD__QK; j++)
        y->qs[j] = (int8_t)roundf(x[j] * id);
}

/* Q4_0 (zero 8) and Q5_0 (zero 16): d = max / -zero, where max is the
 * signed value of largest magnitude; code = min(top, trunc(x / d + zero +
 * 0.5)). */
static float quantize_sym(const float *x, int zero, uint8_t *q)
{
    float amax;
    const float d = signed_absmax(x, QKD__QK, &amax) / (float)-zero, id = inverse(d);
    const float bias = (float)zero + 0.5f;
    for (int j = 0; j < QKD__QK; j++)
        q[j] = (uint8_t)imin(2 * zero - 1, (int8_t)(x[j] * id + bias));
    return d;
}

static void quantize_q4_0(const float *x, void *blk)
{
    qkd__block_q4_0 *y = blk;
    uint8_t q[QKD__QK];
    y->d = qkd__f32_to_f16(quantize_sym(x, 8, q));
    pack_nibbles(q, y->qs, NULL);
}

static void quantize_q5_0(const float *x, void *blk)
{
    qkd__block_q5_0 *y = blk;
    uint8_t q[QKD__QK];
    y->d = qkd__f32_to_f16(quantize_sym(x, 16, q));
    pack_nibbles(q, y->qs, y->qh);
}

/* ---- min formats: Q4_1, Q5_1 -------------------------------------------------- */

/* d = (max - min) / top, code = trunc((x - min) / d + 0.5) (Q4_1 also
 * caps it at top, as ggml does). */
static void quantize_min(const float *x, int top, int cap, uint8_t *q, float *d, float *mn)
{
    float mx;
    min_max(x, QKD__QK, mn, &mx);
    *d = (mx - *mn) / (float)top;
    const float id = inverse(*d);
    for (int j = 0; j < QKD__QK; j++) {
        int c = (int)(uint8_t)((x[j] - *mn) * id + 0.5f);
        q[j] = (uint8_t)(cap ? imin(top, c) : c);
    }
}

static void quantize_q4_1(const float *x, void *blk)
{
    qkd__block_q4_1 *y = blk;
    uint8_t q[QKD__QK];
    float d, mn;
    quantize_min(x, 15, 1, q, &d, &mn);
    y->d = qkd__f32_to_f16(d);
    y->m = qkd__f32_to_f16(mn);
    pack_nibbles(q, y->qs, NULL);
}

static void quantize_q5_1(const float *x, void *blk)
{
    qkd__block_q5_1 *y = blk;
    uint8_t q[QKD__QK];
    float d, mn;
    quantize_min(x, 31, 0, q, &d, &mn);
    y->d = qkd__f32_to_f16(d);
    y->m = qkd__f32_to_f16(mn);
    pack_nibbles(q, y->qs, y->qh);
}

/* ---- 32-value formats: codes, groups, dequantization ---------------------------- */

static void codes_q8_0(const void *blk, int32_t *q)
{
    const qkd__block_q8_0 *b = blk;
    for (int j = 0; j < QKD__QK; j++)
        q[j] = b->qs[j];
}

static void codes_q4_0(const void *blk, int32_t *q)
{
    unpack_nibbles(((const qkd__block_q4_0 *)blk)->qs, NULL, q);
}

static void codes_q4_1(const void *blk, int32_t *q)
{
    unpack_nibbles(((const qkd__block_q4_1 *)blk)->qs, NULL, q);
}

static void codes_q5_0(const void *blk, int32_t *q)
{
    const qkd__block_q5_0 *b = blk;
    unpack_nibbles(b->qs, b->qh, q);
}

static void codes_q5_1(const void *blk, int32_t *q)
{
    const qkd__block_q5_1 *b = blk;
    unpack_nibbles(b->qs, b->qh, q);
}

static void groups_q8_0(const void *blk, float *s, float *o)
{
    s[0] = half(((const qkd__block_q8_0 *)blk)->d);
    o[0] = 0.0f;
}

static void groups_q4_0(const void *blk, float *s, float *o)
{
    s[0] = half(((const qkd__block_q4_0 *)blk)->d);
    o[0] = -8.0f * s[0];
}

static void groups_q5_0(const void *blk, float *s, float *o)
{
    s[0] = half(((const qkd__block_q5_0 *)blk)->d);
    o[0] = -16.0f * s[0];
}

static void groups_q4_1(const void *blk, float *s, float *o)
{
    s[0] = half(((const qkd__block_q4_1 *)blk)->d);
    o[0] = half(((const qkd__block_q4_1 *)blk)->m);
}

static void groups_q5_1(const void *blk, float *s, float *o)
{
    s[0] = half(((const qkd__block_q5_1 *)blk)->d);
    o[0] = half(((const qkd__block_q5_1 *)blk)->m);
}

/* (q - zero) * d, as ggml's dequantizers of the zero-point formats. */
static void dequantize_zero(const int32_t *q, int n, int zero, float d, float *y)
{
    for (int j = 0; j < n; j++)
        y[j] = (float)(q[j] - zero) * d;
}

/* q * d + m, as ggml's dequantizers of Q4_1 and Q5_1. */
static void dequantize_min(const int32_t *q, float d, float m, float *y)
{
    for (int j = 0; j < QKD__QK; j++)
        y[j] = (float)q[j] * d + m;
}

static void dequantize_q8_0(const void *blk, float *y)
{
    int32_t q[QKD__QK];
    codes_q8_0(blk, q);
    dequantize_zero(q, QKD__QK, 0, half(((const qkd__block_q8_0 *)blk)->d), y);
}

static void dequantize_q4_0(const void *blk, float *y)
{
    int32_t q[QKD__QK];
    codes_q4_0(blk, q);
    dequantize_zero(q, QKD__QK, 8, half(((const qkd__block_q4_0 *)blk)->d), y);
}

static void dequantize_q5_0(const void *blk, float *y)
{
    int32_t q[QKD__QK];
    codes_q5_0(blk, q);
    dequantize_zero(q, QKD__QK, 16, half(((const qkd__block_q5_0 *)blk)->d), y);
}

static void dequantize_q4_1(const void *blk, float *y)
{
    const qkd__block_q4_1 *b = blk;
    int32_t q[QKD__QK];
    codes_q4_1(blk, q);
    dequantize_min(q, half(b->d), half(b->m), y);
}

static void dequantize_q5_1(const void *blk, float *y)
{
    const qkd__block_q5_1 *b = blk;
    int32_t q[QKD__QK];
    codes_q5_1(blk, q);
    dequantize_min(q, half(b->d), half(b->m), y);
}

/* ---- k-quant helpers -------------------------------------------------------------- */

/* Weighted sums over codes l[i] (ggml's order of float operations). */
typedef struct lsums {
    float l, l2, xl;
} lsums;

/* Codes of x at scale 1/iscale from the offset mn, clamped to 0..top,
 * into L, with their weighted sums. */
static lsums codes_at(const float *x, const float *w, int n, int top, float iscale, float mn,
                      uint8_t *L)
{
    lsums s = {0.0f, 0.0f, 0.0f};
    for (int i = 0; i < n; i++) {
        int l = iclamp(nearest_int(iscale * (x[i] - mn)), 0, top);
        L[i] = (uint8_t)l;
        s.l += w[i] * (float)l;
        s.l2 += w[i] * (float)l * (float)l;
        s.xl += w[i] * (float)l * x[i];
    }
    return s;
}

static float weighted_error(const float *x, const float *w, const uint8_t *L, int n,
                            float scale, float mn)
{
    float err = 0.0f;
    for (int i = 0; i < n; i++) {
        float diff = scale * (float)L[i] + mn - x[i];
        err += w[i] * (diff * diff);
    }
    return err;
}

/* ggml's make_qkx2_quants with squared error: codes 0..top with a scale
 * and a non-positive offset min (returned negated in *neg_min), searched
 * over nstep + 1 trial scales (top + rmin + rdelta k) / (max - min) with
 * a weighted least-squares fit of scale and min at each. */
static float fit_scale_min(const float *x, const float *w, int n, int top, float rmin,
                           float rdelta, int nstep, uint8_t *L, float *neg_min)
{
    float mn = x[0], mx = x[0], sum_w = w[0], sum_x = w[0] * x[0];
    for (int i = 1; i < n; i++) {
        mn = x[i] < mn ? x[i] : mn;
        mx = x[i] > mx ? x[i] : mx;
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (mn > 0.0f)
        mn = 0.0f;
    if (mx == mn) {
        memset(L, 0, (size_t)n);
        *neg_min = -mn;
        return 0.0f;
    }
    float iscale = (float)top / (mx - mn), scale = 1.0f / iscale;
    codes_at(x, w, n, top, iscale, mn, L);
    float best = weighted_error(x, w, L, n, scale, mn);
    uint8_t aux[QKD__QK];
    for (int k = 0; k <= nstep; k++) {
        iscale = (rmin + rdelta * (float)k + (float)top) / (mx - mn);
        lsums s = codes_at(x, w, n, top, iscale, mn, aux);
        float D = sum_w * s.l2 - s.l * s.l;
        if (!(D > 0.0f))
            continue;
        float this_scale = (sum_w * s.xl - sum_x * s.l) / D;
        float this_min = (s.l2 * sum_x - s.l * s.xl) / D;
        if (this_min > 0.0f) {
            this_min = 0.0f;
            this_scale = s.xl / s.l2;
        }
        float err = weighted_error(x, w, aux, n, this_scale, this_min);
        if (err < best) {
            memcpy(L, aux, (size_t)n);
            best = err;
            scale = this_scale;
            mn = this_min;
        }
    }
    *neg_min = -mn;
    return scale;
}

/* Signed codes of x at inverse scale iscale, clamped to [-top, top - 1],
 * with the x^2-weighted sums sum(w x l) and sum(w l^2). */
static void signed_sums(const float *x, int n, int top, float iscale, int8_t *L, float *sumlx,
                        float *suml2)
{
    *sumlx = *suml2 = 0.0f;
    for (int i = 0; i < n; i++) {
        int l = iclamp(nearest_int(iscale * x[i]), -top, top - 1);
        if (L)
            L[i] = (int8_t)(l + top);
        float w = x[i] * x[i];
        *sumlx += w * x[i] * (float)l;
        *suml2 += w * (float)l * (float)l;
    }
}

/* ggml's make_qx_quants with x^2 weights (rmse_type 1): codes l + top in
 * 0..2 top - 1 and the scale of least weighted error over 19 trial
 * inverse scales -(top + k / 10) / max, k in -9..9. */
static float fit_scale_sym(const float *x, int n, int top, int8_t *L)
{
    float amax;
    const float mx = signed_absmax(x, n, &amax);
    if (amax < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.0f;
    }
    float sumlx, suml2;
    signed_sums(x, n, top, (float)-top / mx, L, &sumlx, &suml2);
    float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f, best = scale * sumlx;
    for (int k = -9; k <= 9; k++) {
        if (k == 0)
            continue;
        float iscale = -((float)top + 0.1f * (float)k) / mx;
        signed_sums(x, n, top, iscale, NULL, &sumlx, &suml2);
        if (suml2 > 0.0f && sumlx * sumlx > best * suml2) {
            signed_sums(x, n, top, iscale, L, &sumlx, &suml2);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* ---- Q4_K ----------------------------------------------------------------------- */

/* The 6-bit scale and min of sub-block j. */
static void q4_k_scale_min(const uint8_t *s, int j, int *sc, int *mn)
{
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | (s[j - 4] >> 6) << 4;
        *mn = (s[j + 4] >> 4) | (s[j] >> 6) << 4;
    }
}

static void q4_k_pack_scales(uint8_t *s, const uint8_t *ls, const uint8_t *lm)
{
    for (int j = 0; j < 4; j++) {
        s[j] = ls[j];
        s[j + 4] = lm[j];
    }
    for (int j = 4; j < 8; j++) {
        s[j + 4] = (uint8_t)((ls[j] & 0x0f) | (lm[j] & 0x0f) << 4);
        s[j - 4] |= (uint8_t)((ls[j] >> 4) << 6);
        s[j] |= (uint8_t)((lm[j] >> 4) << 6);
    }
}

/* A 6-bit code of v (ggml keeps the low 8 bits of the int, capped at 63). */
static uint8_t six_bits(float v)
{
    uint8_t l = (uint8_t)nearest_int(v);
    return l < 63 ? l : 63;
}

static void quantize_q4_k(const float *x, void *blk)
{
    enum { NSUB = QKD__QK_K / 32 };
    qkd__block_q4_k *y = blk;
    uint8_t L[QKD__QK_K], ls[NSUB], lm[NSUB];
    float scales[NSUB], mins[NSUB], w[32], max_scale = 0.0f, max_min = 0.0f;
    for (int j = 0; j < NSUB; j++) {
        const float *xs = x + 32 * j;
        float sum_x2 = 0.0f;
        for (int l = 0; l < 32; l++)
            sum_x2 += xs[l] * xs[l];
        const float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; l++)
            w[l] = av_x + fabsf(xs[l]);
        scales[j] = fit_scale_min(xs, w, 32, 15, -1.0f, 0.1f, 20, L + 32 * j, &mins[j]);
        max_scale = scales[j] > max_scale ? scales[j] : max_scale;
        max_min = mins[j] > max_min ? mins[j] : max_min;
    }
    const float inv_scale = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
    const float inv_min = max_min > 0.0f ? 63.0f / max_min : 0.0f;
    for (int j = 0; j < NSUB; j++) {
        ls[j] = six_bits(inv_scale * scales[j]);
        lm[j] = six_bits(inv_min * mins[j]);
    }
    q4_k_pack_scales(y->scales, ls, lm);
    y->d = qkd__f32_to_f16(max_scale / 63.0f);
    y->dmin = qkd__f32_to_f16(max_min / 63.0f);
    for (int j = 0; j < NSUB; j++) {
        int sc, mn;
        q4_k_scale_min(y->scales, j, &sc, &mn);
        const float d = half(y->d) * (float)sc;
        if (d == 0.0f)
            continue; /* keep the fit's codes */
        const float dm = half(y->dmin) * (float)mn;
        for (int i = 0; i < 32; i++)
            L[32 * j + i] = (uint8_t)iclamp(nearest_int((x[32 * j + i] + dm) / d), 0, 15);
    }
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++)
            y->qs[32 * c + l] = (uint8_t)(L[64 * c + l] | L[64 * c + 32 + l] << 4);
}

static void codes_q4_k(const void *blk, int32_t *q)
{
    const qkd__block_q4_k *b = blk;
    for (int c = 0; c < 4; c++) {
        for (int l = 0; l < 32; l++) {
            q[64 * c + l] = b->qs[32 * c + l] & 0x0f;
            q[64 * c + 32 + l] = b->qs[32 * c + l] >> 4;
        }
    }
}

static void groups_q4_k(const void *blk, float *s, float *o)
{
    const qkd__block_q4_k *b = blk;
    for (int j = 0; j < QKD__QK_K / 32; j++) {
        int sc, mn;
        q4_k_scale_min(b->scales, j, &sc, &mn);
        s[j] = half(b->d) * (float)sc;
        o[j] = -(half(b->dmin) * (float)mn);
    }
}

/* d sc q - dmin mn per sub-block, as ggml's dequantize_row_q4_K (adding
 * the negated min is the same IEEE operation as subtracting it). */
static void dequantize_q4_k(const void *blk, float *y)
{
    int32_t q[QKD__QK_K];
    float s[QKD__QK_K / 32], o[QKD__QK_K / 32];
    codes_q4_k(blk, q);
    groups_q4_k(blk, s, o);
    for (int i = 0; i < QKD__QK_K; i++)
        y[i] = s[i / 32] * (float)q[i] + o[i / 32];
}

/* ---- Q6_K ----------------------------------------------------------------------- */

static void quantize_q6_k(const float *x, void *blk)
{
    enum { NSUB = QKD__QK_K / 16 };
    qkd__block_q6_k *y = blk;
    int8_t L[QKD__QK_K];
    float scales[NSUB], max_scale = 0.0f, max_abs_scale = 0.0f;
    for (int j = 0; j < NSUB; j++) {
        scales[j] = fit_scale_sym(x + 16 * j, 16, 32, L + 16 * j);
        if (fabsf(scales[j]) > max_abs_scale) {
            max_abs_scale = fabsf(scales[j]);
            max_scale = scales[j];
        }
    }
    memset(y, 0, sizeof *y);
    if (max_abs_scale < GROUP_MAX_EPS)
        return;
    const float iscale = -128.0f / max_scale;
    y->d = qkd__f32_to_f16(1.0f / iscale);
    for (int j = 0; j < NSUB; j++)
        y->scales[j] = (int8_t)imin(127, nearest_int(iscale * scales[j]));
    for (int j = 0; j < NSUB; j++) {
        const float d = half(y->d) * (float)y->scales[j];
        if (d == 0.0f)
            continue; /* keep the fit's codes */
        for (int i = 0; i < 16; i++)
            L[16 * j + i] = (int8_t)(iclamp(nearest_int(x[16 * j + i] / d), -32, 31) + 32);
    }
    for (int h = 0; h < 2; h++) {
        const int8_t *Lh = L + 128 * h;
        uint8_t *ql = y->ql + 64 * h, *qh = y->qh + 32 * h;
        for (int l = 0; l < 32; l++) {
            ql[l] = (uint8_t)((Lh[l] & 0x0f) | (Lh[l + 64] & 0x0f) << 4);
            ql[l + 32] = (uint8_t)((Lh[l + 32] & 0x0f) | (Lh[l + 96] & 0x0f) << 4);
            qh[l] = (uint8_t)(Lh[l] >> 4 | (Lh[l + 32] >> 4) << 2 | (Lh[l + 64] >> 4) << 4 |
                              (Lh[l + 96] >> 4) << 6);
        }
    }
}

static void codes_q6_k(const void *blk, int32_t *q)
{
    const qkd__block_q6_k *b = blk;
    for (int h = 0; h < 2; h++) {
        const uint8_t *ql = b->ql + 64 * h, *qh = b->qh + 32 * h;
        for (int l = 0; l < 32; l++) {
            for (int k = 0; k < 4; k++) {
                int lo = ql[l + 32 * (k & 1)] >> (k < 2 ? 0 : 4) & 0x0f;
                q[128 * h + 32 * k + l] = lo | (qh[l] >> (2 * k) & 3) << 4;
            }
        }
    }
}

static void groups_q6_k(const void *blk, float *s, float *o)
{
    const qkd__block_q6_k *b = blk;
    for (int j = 0; j < QKD__QK_K / 16; j++) {
        s[j] = half(b->d) * (float)b->scales[j];
        o[j] = -32.0f * s[j];
    }
}

/* d sc (q - 32), as ggml's dequantize_row_q6_K. */
static void dequantize_q6_k(const void *blk, float *y)
{
    int32_t q[QKD__QK_K];
    float s[QKD__QK_K / 16], o[QKD__QK_K / 16];
    codes_q6_k(blk, q);
    groups_q6_k(blk, s, o);
    for (int i = 0; i < QKD__QK_K; i++)
        y[i] = s[i / 16] * (float)(q[i] - 32);
}

/* ---- TQ2_0 ------------------------------------------------------------------------ */

/* d = max|x|, code = roundf(x / d) + 1 (half away from zero). */
static void quantize_tq2_0(const float *x, void *blk)
{
    qkd__block_tq2_0 *y = blk;
    float amax = 0.0f;
    for (int j = 0; j < QKD__QK_K; j++)
        amax = fmaxf(amax, fabsf(x[j]));
    const float id = inverse(amax);
    y->d = qkd__f32_to_f16(amax);
    memset(y->qs, 0, sizeof y->qs);
    for (int i = 0; i < QKD__QK_K; i++) {
        int q = (int)roundf(x[i] * id) + 1, h = i / 128, n = i % 128 / 32, m = i % 32;
        y->qs[32 * h + m] |= (uint8_t)((q & 3) << (2 * n));
    }
}

static void codes_tq2_0(const void *blk, int32_t *q)
{
    const qkd__block_tq2_0 *b = blk;
    for (int i = 0; i < QKD__QK_K; i++)
        q[i] = b->qs[32 * (i / 128) + i % 32] >> (2 * (i % 128 / 32)) & 3;
}

static void groups_tq2_0(const void *blk, float *s, float *o)
{
    s[0] = half(((const qkd__block_tq2_0 *)blk)->d);
    o[0] = -s[0];
}

static void dequantize_tq2_0(const void *blk, float *y)
{
    int32_t q[QKD__QK_K];
    codes_tq2_0(blk, q);
    dequantize_zero(q, QKD__QK_K, 1, half(((const qkd__block_tq2_0 *)blk)->d), y);
}

/* ---- 32- and 16-bit floats ------------------------------------------------------------ */

static void store_f32(const float *x, void *blk)
{
    memcpy(blk, x, sizeof *x);
}

static void load_f32(const void *blk, float *y)
{
    memcpy(y, blk, sizeof *y);
}

static void store_f16(const float *x, void *blk)
{
    uint16_t h = qkd__f32_to_f16(*x);
    memcpy(blk, &h, sizeof h);
}

static void load_f16(const void *blk, float *y)
{
    uint16_t h;
    memcpy(&h, blk, sizeof h);
    *y = qkd__f16_to_f32(h);
}

static void store_bf16(const float *x, void *blk)
{
    uint16_t h = qkd__f32_to_bf16(*x);
    memcpy(blk, &h, sizeof h);
}

static void load_bf16(const void *blk, float *y)
{
    uint16_t h;
    memcpy(&h, blk, sizeof h);
    *y = qkd__bf16_to_f32(h);
}

static void bits16(const void *blk, int32_t *q)
{
    uint16_t h;
    memcpy(&h, blk, sizeof h);
    *q = h;
}

/* ---- the table ------------------------------------------------------------------------ */

static const qkd__ggml_format formats[] = {
    {QKD__GGML_F32, "F32", 1, 4, 0, store_f32, load_f32, NULL, NULL},
    {QKD__GGML_F16, "F16", 1, 2, 0, store_f16, load_f16, NULL, bits16},
    {QKD__GGML_BF16, "BF16", 1, 2, 0, store_bf16, load_bf16, NULL, bits16},
    {QKD__GGML_Q8_0, "Q8_0", QKD__QK, sizeof(qkd__block_q8_0), QKD__QK, quantize_q8_0,
     dequantize_q8_0, groups_q8_0, codes_q8_0},
    {QKD__GGML_Q4_0, "Q4_0", QKD__QK, sizeof(qkd__block_q4_0), QKD__QK, quantize_q4_0,
     dequantize_q4_0, groups_q4_0, codes_q4_0},
    {QKD__GGML_Q4_1, "Q4_1", QKD__QK, sizeof(qkd__block_q4_1), QKD__QK, quantize_q4_1,
     dequantize_q4_1, groups_q4_1, codes_q4_1},
    {QKD__GGML_Q5_0, "Q5_0", QKD__QK, sizeof(qkd__block_q5_0), QKD__QK, quantize_q5_0,
     dequantize_q5_0, groups_q5_0, codes_q5_0},
    {QKD__GGML_Q5_1, "Q5_1", QKD__QK, sizeof(qkd__block_q5_1), QKD__QK, quantize_q5_1,
     dequantize_q5_1, groups_q5_1, codes_q5_1},
    {QKD__GGML_Q4_K, "Q4_K", QKD__QK_K, sizeof(qkd__block_q4_k), 32, quantize_q4_k,
     dequantize_q4_k, groups_q4_k, codes_q4_k},
    {QKD__GGML_Q6_K, "Q6_K", QKD__QK_K, sizeof(qkd__block_q6_k), 16, quantize_q6_k,
     dequantize_q6_k, groups_q6_k, codes_q6_k},
    {QKD__GGML_TQ2_0, "TQ2_0", QKD__QK_K, sizeof(qkd__block_tq2_0), QKD__QK_K,
     quantize_tq2_0, dequantize_tq2_0, groups_tq2_0, codes_tq2_0},
};

const qkd__ggml_format *qkd__ggml_format_of(uint32_t type)
{
    for (size_t i = 0; i < sizeof formats / sizeof formats[0]; i++)
        if (formats[i].type == (int)type)
            return &formats[i];
    return NULL;
}

size_t qkd__ggml_row_bytes(const qkd__ggml_format *f, int64_t n)
{
    return (size_t)(n / f->block) * f->bytes;
}

void qkd__ggml_quantize_row(const qkd__ggml_format *f, const float *x, void *dst, int64_t n)
{
    if (f->type == QKD__GGML_F32) {
        memcpy(dst, x, (size_t)n * sizeof *x);
        return;
    }
    uint8_t *out = dst;
    for (int64_t i = 0; i < n; i += f->block, out += f->bytes)
        f->quantize(x + i, out);
}

void qkd__ggml_dequantize_row(const qkd__ggml_format *f, const void *src, float *y, int64_t n)
{
    if (f->type == QKD__GGML_F32) {
        memcpy(y, src, (size_t)n * sizeof *y);
        return;
    }
    const uint8_t *in = src;
    for (int64_t i = 0; i < n; i += f->block, in += f->bytes)
        f->dequantize(in, y + i);
}
