/* The vector layer the SIMD kernels are written in: one float vector type
 * `vf` of VL lanes and the few operations the kernels need, for the
 * instruction set the including file names with QKD_SIMD_ISA. The kernels
 * (the *.inc files) are written once against this layer and compiled once
 * per instruction set. On x86-64 every function of the including file is
 * compiled for that instruction set by the target pragma below, and only
 * called after the CPU was checked for it (simd.c); NEON is part of every
 * AArch64 CPU, so its file needs neither pragma nor check.
 *
 * Include this after every other header of the file. */
#ifndef QKD_LIB_BACKEND_SIMD_VEC_H
#define QKD_LIB_BACKEND_SIMD_VEC_H

#include <stdint.h>

#if QKD_SIMD_ISA == QKD__SIMD_NEON
#include <arm_neon.h>
#include <string.h>
#else
#include <immintrin.h>

#if QKD_SIMD_ISA == QKD__SIMD_AVX512
#define QKD_SIMD_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"
#elif QKD_SIMD_ISA == QKD__SIMD_AVX512BF16 /* AVX-512 with VDPBF16PS for bf16 products */
#define QKD_SIMD_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c"
#define QKD_SIMD_DPBF16 1
#elif QKD_SIMD_ISA == QKD__SIMD_AVX2
#define QKD_SIMD_TARGET "avx2,fma,f16c"
#else
#error "QKD_SIMD_ISA names no instruction set"
#endif

#define QKD_SIMD_PRAGMA(x) _Pragma(#x)
#ifdef __clang__
#define QKD_SIMD_PUSH(t) \
    QKD_SIMD_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#else
#define QKD_SIMD_PUSH(t) QKD_SIMD_PRAGMA(GCC target(t))
#endif
QKD_SIMD_PUSH(QKD_SIMD_TARGET)
#endif

#if QKD_SIMD_ISA == QKD__SIMD_AVX512 || QKD_SIMD_ISA == QKD__SIMD_AVX512BF16

#define VL 16
#define GEMM_MR 12 /* rows of a matmul micro-tile: 24 of the 32 registers */
typedef __m512 vf;
typedef __m512d vd; /* VL / 2 doubles */

static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vset1(float x) { return _mm512_set1_ps(x); }
static inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore(float *p, vf x) { _mm512_storeu_ps(p, x); }
static inline __mmask16 first_n(int n) { return (__mmask16)((1u << n) - 1u); }
/* The first n (0..VL) lanes from p, zeros after; reads only those lanes.
 * A whole vector takes the plain load or store: masked ones are slower. */
static inline vf vload_n(const float *p, int n)
{
    return n == VL ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(first_n(n), p);
}
static inline void vstore_n(float *p, vf x, int n)
{
    if (n == VL)
        _mm512_storeu_ps(p, x);
    else
        _mm512_mask_storeu_ps(p, first_n(n), x);
}
/* The first n lanes from p, `fill` after. */
static inline vf vload_n_or(const float *p, int n, float fill)
{
    if (n == VL)
        return _mm512_loadu_ps(p);
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), first_n(n), p);
}
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
/* max and min return b where either is NaN */
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline vf vsqrt(vf a) { return _mm512_sqrt_ps(a); }
/* a * b + c, one rounding */
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
/* (x1, x0, x3, x2, ...): the partner of each interleaved pair */
static inline vf vswap_pairs(vf x) { return _mm512_permute_ps(x, 0xB1); }
/* lanes where a < b take x, the others y */
static inline vf vselect_lt(vf a, vf b, vf x, vf y)
{
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x);
}
static inline float vhsum(vf x) { return _mm512_reduce_add_ps(x); }
static inline float vhmax(vf x) { return _mm512_reduce_max_ps(x); }
static inline vf vround(vf x)
{
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
/* x * 2^n for integral n in a float vector, -126 <= n <= 127: one
 * rounding, as x times the float 2^n (vpow2i on the other sets) */
static inline vf vscale2(vf x, vf n) { return _mm512_scalef_ps(x, n); }

static inline vd vd_load(const float *p) { return _mm512_cvtps_pd(_mm256_loadu_ps(p)); }
static inline void vd_store(float *p, vd x) { _mm256_storeu_ps(p, _mm512_cvtpd_ps(x)); }
static inline vd vd_set1(double x) { return _mm512_set1_pd(x); }
static inline vd vd_add(vd a, vd b) { return _mm512_add_pd(a, b); }
static inline vd vd_sub(vd a, vd b) { return _mm512_sub_pd(a, b); }
static inline vd vd_mul(vd a, vd b) { return _mm512_mul_pd(a, b); }
static inline vd vd_div(vd a, vd b) { return _mm512_div_pd(a, b); }
static inline vd vd_sqrt(vd a) { return _mm512_sqrt_pd(a); }
static inline vd vd_zero(void) { return _mm512_setzero_pd(); }
static inline vd vd_lo(vf x) { return _mm512_cvtps_pd(_mm512_castps512_ps256(x)); }
static inline vd vd_hi(vf x) { return _mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1)); }
static inline double vd_hsum(vd x) { return _mm512_reduce_add_pd(x); }
static inline vd vd_min(vd a, vd b) { return _mm512_min_pd(a, b); }
static inline vd vd_max(vd a, vd b) { return _mm512_max_pd(a, b); }
/* round half away from zero, as C's round() */
static inline vd vd_round_away(vd u)
{
    vd t = _mm512_roundscale_pd(u, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    vd sign = _mm512_and_pd(u, _mm512_set1_pd(-0.0));
    vd f = _mm512_andnot_pd(_mm512_set1_pd(-0.0), _mm512_sub_pd(u, t)); /* |u - t|, exact */
    __mmask8 up = _mm512_cmp_pd_mask(f, _mm512_set1_pd(0.5), _CMP_GE_OQ);
    return _mm512_mask_add_pd(t, up, t, _mm512_or_pd(_mm512_set1_pd(1.0), sign));
}
/* lanes with lo <= x <= hi keep y, the others become 0 */
static inline vf vkeep_in(vf x, vf lo, vf hi, vf y)
{
    __mmask16 in = _mm512_cmp_ps_mask(lo, x, _CMP_LE_OQ) & _mm512_cmp_ps_mask(x, hi, _CMP_LE_OQ);
    return _mm512_maskz_mov_ps(in, y);
}

#elif QKD_SIMD_ISA == QKD__SIMD_NEON

#define VL 4
/* Rows of a matmul micro-tile: gemm.inc packs a column-major A panel's rows
 * at one k with one vector (pack_a), so GEMM_MR is at most VL here. */
#define GEMM_MR 4
typedef float32x4_t vf;
typedef float64x2_t vd;

static inline vf vzero(void) { return vdupq_n_f32(0.0f); }
static inline vf vset1(float x) { return vdupq_n_f32(x); }
static inline vf vload(const float *p) { return vld1q_f32(p); }
static inline void vstore(float *p, vf x) { vst1q_f32(p, x); }
/* NEON has no masked loads or stores: a partial vector goes through a
 * buffer, so only the first n floats at p are touched. */
static inline vf vload_n_or(const float *p, int n, float fill)
{
    float t[VL] = {fill, fill, fill, fill};
    memcpy(t, p, (size_t)n * sizeof *p);
    return vld1q_f32(t);
}
static inline vf vload_n(const float *p, int n)
{
    return n == VL ? vld1q_f32(p) : vload_n_or(p, n, 0.0f);
}
static inline void vstore_n(float *p, vf x, int n)
{
    float t[VL];
    vst1q_f32(t, x);
    memcpy(p, t, (size_t)n * sizeof *p);
}
static inline vf vadd(vf a, vf b) { return vaddq_f32(a, b); }
static inline vf vsub(vf a, vf b) { return vsubq_f32(a, b); }
static inline vf vmul(vf a, vf b) { return vmulq_f32(a, b); }
static inline vf vdiv(vf a, vf b) { return vdivq_f32(a, b); }
/* NEON's fmax/fmin return NaN for a NaN operand: compare and select
 * instead, for x86's "b where either is NaN" */
static inline vf vmax(vf a, vf b) { return vbslq_f32(vcgtq_f32(a, b), a, b); }
static inline vf vmin(vf a, vf b) { return vbslq_f32(vcltq_f32(a, b), a, b); }
static inline vf vsqrt(vf a) { return vsqrtq_f32(a); }
static inline vf vfma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
static inline vf vswap_pairs(vf x) { return vrev64q_f32(x); }
static inline vf vselect_lt(vf a, vf b, vf x, vf y) { return vbslq_f32(vcltq_f32(a, b), x, y); }
static inline float vhsum(vf x) { return vaddvq_f32(x); }
static inline float vhmax(vf x) { return vmaxvq_f32(x); }
static inline vf vpow2i(vf n)
{
    int32x4_t e = vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127));
    return vreinterpretq_f32_s32(vshlq_n_s32(e, 23));
}
static inline vf vround(vf x) { return vrndnq_f32(x); } /* ties to even, as x86 */
static inline vf vscale2(vf x, vf n) { return vmulq_f32(x, vpow2i(n)); }

static inline vd vd_load(const float *p) { return vcvt_f64_f32(vld1_f32(p)); }
static inline void vd_store(float *p, vd x) { vst1_f32(p, vcvt_f32_f64(x)); }
static inline vd vd_set1(double x) { return vdupq_n_f64(x); }
static inline vd vd_add(vd a, vd b) { return vaddq_f64(a, b); }
static inline vd vd_sub(vd a, vd b) { return vsubq_f64(a, b); }
static inline vd vd_mul(vd a, vd b) { return vmulq_f64(a, b); }
static inline vd vd_div(vd a, vd b) { return vdivq_f64(a, b); }
static inline vd vd_sqrt(vd a) { return vsqrtq_f64(a); }
static inline vd vd_zero(void) { return vdupq_n_f64(0.0); }
static inline vd vd_lo(vf x) { return vcvt_f64_f32(vget_low_f32(x)); }
static inline vd vd_hi(vf x) { return vcvt_high_f64_f32(x); }
static inline double vd_hsum(vd x) { return vaddvq_f64(x); }
static inline vd vd_min(vd a, vd b) { return vbslq_f64(vcltq_f64(a, b), a, b); }
static inline vd vd_max(vd a, vd b) { return vbslq_f64(vcgtq_f64(a, b), a, b); }
static inline vd vd_round_away(vd u) { return vrndaq_f64(u); } /* FRINTA: C's round() */
static inline vf vkeep_in(vf x, vf lo, vf hi, vf y)
{
    uint32x4_t in = vandq_u32(vcleq_f32(lo, x), vcleq_f32(x, hi));
    return vreinterpretq_f32_u32(vandq_u32(in, vreinterpretq_u32_f32(y)));
}

#else /* AVX2 */

#define VL 8
#define GEMM_MR 6 /* rows of a matmul micro-tile: 12 of the 16 registers */
typedef __m256 vf;
typedef __m256d vd;

static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vset1(float x) { return _mm256_set1_ps(x); }
static inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
static inline void vstore(float *p, vf x) { _mm256_storeu_ps(p, x); }
static inline __m256i first_n(int n)
{
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vf vload_n(const float *p, int n)
{
    return n == VL ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first_n(n));
}
static inline void vstore_n(float *p, vf x, int n)
{
    if (n == VL)
        _mm256_storeu_ps(p, x);
    else
        _mm256_maskstore_ps(p, first_n(n), x);
}
static inline vf vload_n_or(const float *p, int n, float fill)
{
    if (n == VL)
        return _mm256_loadu_ps(p);
    __m256i m = first_n(n);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
}
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vsqrt(vf a) { return _mm256_sqrt_ps(a); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vswap_pairs(vf x) { return _mm256_permute_ps(x, 0xB1); }
static inline vf vselect_lt(vf a, vf b, vf x, vf y)
{
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ));
}
static inline float vhsum(vf x)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline float vhmax(vf x)
{
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline vf vpow2i(vf n)
{
    __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
static inline vf vround(vf x)
{
    return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline vf vscale2(vf x, vf n) { return _mm256_mul_ps(x, vpow2i(n)); }

static inline vd vd_load(const float *p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
static inline void vd_store(float *p, vd x) { _mm_storeu_ps(p, _mm256_cvtpd_ps(x)); }
static inline vd vd_set1(double x) { return _mm256_set1_pd(x); }
static inline vd vd_add(vd a, vd b) { return _mm256_add_pd(a, b); }
static inline vd vd_sub(vd a, vd b) { return _mm256_sub_pd(a, b); }
static inline vd vd_mul(vd a, vd b) { return _mm256_mul_pd(a, b); }
static inline vd vd_div(vd a, vd b) { return _mm256_div_pd(a, b); }
static inline vd vd_sqrt(vd a) { return _mm256_sqrt_pd(a); }
static inline vd vd_zero(void) { return _mm256_setzero_pd(); }
static inline vd vd_lo(vf x) { return _mm256_cvtps_pd(_mm256_castps256_ps128(x)); }
static inline vd vd_hi(vf x) { return _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)); }
static inline double vd_hsum(vd x)
{
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
static inline vd vd_min(vd a, vd b) { return _mm256_min_pd(a, b); }
static inline vd vd_max(vd a, vd b) { return _mm256_max_pd(a, b); }
static inline vd vd_round_away(vd u)
{
    vd t = _mm256_round_pd(u, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    vd sign = _mm256_and_pd(u, _mm256_set1_pd(-0.0));
    vd f = _mm256_andnot_pd(_mm256_set1_pd(-0.0), _mm256_sub_pd(u, t));
    vd up = _mm256_cmp_pd(f, _mm256_set1_pd(0.5), _CMP_GE_OQ);
    return _mm256_add_pd(t, _mm256_and_pd(up, _mm256_or_pd(_mm256_set1_pd(1.0), sign)));
}
static inline vf vkeep_in(vf x, vf lo, vf hi, vf y)
{
    vf in = _mm256_and_ps(_mm256_cmp_ps(lo, x, _CMP_LE_OQ), _mm256_cmp_ps(x, hi, _CMP_LE_OQ));
    return _mm256_and_ps(in, y);
}

#endif

/* Doubles per vd. */
#define VDL (VL / 2)

/* ---- small integer helpers the kernels share ---- */

static inline int min_i(int a, int b)
{
    return a < b ? a : b;
}

static inline int ceil_div(int a, int b)
{
    return (a + b - 1) / b;
}

static inline int round_up(int n, int m)
{
    return ceil_div(n, m) * m;
}

/* e^r for x = n ln2 + r, |r| <= ln2/2, from a degree-6 polynomial
 * (Cephes' expf coefficients, about 1 ulp); n = round(x / ln2). */
static inline vf vexp_reduced(vf x, vf *n_out)
{
    vf n = vround(vmul(x, vset1(1.44269504088896341f)));
    vf r = vfma(n, vset1(-0.693359375f), x);
    r = vfma(n, vset1(2.12194440e-4f), r);
    vf p = vset1(1.9875691500e-4f);
    p = vfma(p, r, vset1(1.3981999507e-3f));
    p = vfma(p, r, vset1(8.3334519073e-3f));
    p = vfma(p, r, vset1(4.1665795894e-2f));
    p = vfma(p, r, vset1(1.6666665459e-1f));
    p = vfma(p, r, vset1(5.0000001201e-1f));
    *n_out = n;
    return vfma(vmul(p, r), r, vadd(r, vset1(1.0f)));
}

#define VEXP_LO -87.33654f /* e^x rounds below the smallest normal float */

/* exp(x) in float, e^r times 2^n. Below -87.3 the result is 0, above 88.7
 * it is +inf; NaN stays NaN. */
static inline vf vexp(vf x)
{
    const vf lo = vset1(VEXP_LO), hi = vset1(88.72283f);
    vf n, p = vexp_reduced(vmin(hi, vmax(lo, x)), &n); /* max/min return x when it is NaN */
    /* 2^n in two halves keeps n = 128 (x near 88.7) representable */
    vf half = vround(vmul(n, vset1(0.5f)));
    vf e = vscale2(vscale2(p, half), vsub(n, half));
    e = vselect_lt(x, lo, vzero(), e);
    return vselect_lt(hi, x, vset1(__builtin_inff()), e);
}

/* 2^x for x <= 127, to about 2 ulp: 2^r for r = x - round(x), |r| <= 1/2,
 * from its degree-6 Taylor polynomial, times 2^round(x). Below -126 the
 * result is 0; NaN stays NaN. A softmax in base 2 (its arguments scaled by
 * log2(e) beforehand) spends fewer operations per value than vexp. */
static inline vf vexp2_le127(vf x)
{
    const vf lo = vset1(-126.0f);
    vf xc = vmax(lo, x), n = vround(xc), r = vsub(xc, n);
    vf p = vset1(1.5403530393381606e-4f); /* ln(2)^k / k!, k = 6 .. 1 */
    p = vfma(p, r, vset1(1.3333558146428443e-3f));
    p = vfma(p, r, vset1(9.6181291076284772e-3f));
    p = vfma(p, r, vset1(5.5504108664821580e-2f));
    p = vfma(p, r, vset1(2.4022650695910071e-1f));
    p = vfma(p, r, vset1(6.9314718055994531e-1f));
    p = vfma(p, r, vset1(1.0f));
    return vselect_lt(x, lo, vzero(), vscale2(p, n));
}

/* vexp(x), bit for bit, for x <= 88 (NaN stays NaN): the arguments of a
 * softmax, less their row's maximum, are <= 0. Cheaper, since 2^n is then
 * one normal float. */
static inline vf vexp_le88(vf x)
{
    const vf lo = vset1(VEXP_LO);
    vf n, p = vexp_reduced(vmax(lo, x), &n);
    return vselect_lt(x, lo, vzero(), vscale2(p, n));
}

#endif
