/* The grid and the value functions of fake quantization on the device,
 * shared by quant.cu's kernels and the optimizer's update that quantizes
 * the weights it writes (elementwise.cu): one definition, so both give
 * the same bits. quant.cu's opening comment explains the forms. */
#ifndef QKD_BACKEND_CUDA_QUANT_CUH
#define QKD_BACKEND_CUDA_QUANT_CUH

#include <float.h>

#include "backend/cuda/common.cuh"
#include "qkd/quant.h"

/* One group's grid. [lo, hi] is the clip range, [qmin, qmax] the code
 * range, d TERNARY's threshold. */
struct grid {
    double lo, hi, qmin, qmax, d;
    float s, z;
};

__device__ static inline float scale_floor(double s)
{
    return s >= FLT_MIN ? (float)s : FLT_MIN;
}

__device__ static inline double clampd(double x, double lo, double hi)
{
    return x < lo ? lo : x > hi ? hi : x;
}

__device__ static inline double sigmoid(double x)
{
    return 1.0 / (1.0 + exp(-x));
}

__device__ static inline double mean_abs_clamped(const float *w, int64_t n, double lo, double hi)
{
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++)
        sum += fabs(clampd(w[i], lo, hi));
    return sum / (double)n;
}

/* The grid of a group of n values w whose largest and smallest (zero
 * included) are mx and mn. */
__device__ static inline grid grid_of(double mx, double mn, const float *w, int64_t n,
                               const qkd__quant_spec &sp)
{
    const double r = sp.clip_ratio;
    grid g = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0f, 0.0f};
    if (sp.scheme == QKD_QUANT_ASYM) {
        g.lo = mn * r;
        g.hi = mx * r;
        g.qmax = (double)((1 << sp.bits) - 1);
        return g;
    }
    g.hi = fmax(mx, -mn) * r;
    g.lo = -g.hi;
    if (sp.scheme == QKD_QUANT_SYM) {
        g.qmax = (double)((1 << (sp.bits - 1)) - 1);
    } else {
        g.qmax = 1.0;
        g.d = 0.7 * mean_abs_clamped(w, n, g.lo, g.hi);
    }
    g.qmin = -g.qmax;
    return g;
}

__device__ static inline grid group_range(const float *w, int64_t n, const qkd__quant_spec &sp)
{
    double mx = 0.0, mn = 0.0; /* zero always lies in the range */
    for (int64_t i = 0; i < n; i++) {
        mx = fmax(mx, (double)w[i]);
        mn = fmin(mn, (double)w[i]);
    }
    return grid_of(mx, mn, w, n, sp);
}

__device__ static inline void group_scale(grid *g, const float *w, int64_t n,
                                          const qkd__quant_spec &sp)
{
    if (sp.scheme == QKD_QUANT_ASYM) {
        g->s = scale_floor((g->hi - g->lo) / g->qmax);
        g->z = (float)clampd(-round(g->lo / g->s), 0.0, g->qmax) + 0.0f; /* never -0 */
    } else if (sp.scheme == QKD_QUANT_SYM) {
        g->s = scale_floor(g->hi / g->qmax);
    } else {
        double sum = 0.0;
        int64_t count = 0;
        for (int64_t i = 0; i < n; i++) {
            if (fabs(w[i]) > g->d) {
                sum += fabs(clampd(w[i], g->lo, g->hi));
                count++;
            }
        }
        g->s = scale_floor(count ? sum / (double)count : 0.0);
    }
}

/* ---- rounding and clamping, hard and smooth (ref_quant.c explains them) ---------------- */

__device__ static inline double round_smooth(double u, double T)
{
    double f = floor(u), t = tanh(0.25 * T);
    return f + 0.5 * (tanh(0.5 * T * (u - f - 0.5)) + t) / t;
}

__device__ static inline double round_smooth_grad(double u, double T)
{
    double f = floor(u), h = tanh(0.5 * T * (u - f - 0.5));
    return T * (1.0 - h * h) / (4.0 * tanh(0.25 * T));
}

__device__ static inline double soft_clamp(double x, double a, double b, double k)
{
    return x * sigmoid(k * (x - a)) * sigmoid(k * (b - x)) + a * sigmoid(k * (a - x)) +
           b * sigmoid(k * (x - b));
}

__device__ static inline double gate_grad(double u, double k)
{
    double g = sigmoid(k * u);
    return k * g * (1.0 - g);
}

__device__ static inline double soft_clamp_grad(double x, double a, double b, double k)
{
    double ga = sigmoid(k * (x - a)), gb = sigmoid(k * (b - x));
    return ga * gb + x * (gate_grad(x - a, k) * gb - ga * gate_grad(b - x, k)) -
           a * gate_grad(a - x, k) + b * gate_grad(x - b, k);
}

__device__ static inline double ternary_smooth(const grid &g, double w, double T)
{
    return sigmoid(T * (w - g.d) / g.s) - sigmoid(T * (-w - g.d) / g.s);
}

__device__ static inline double ternary_smooth_grad(const grid &g, double w, double T)
{
    double a = T * (w - g.d) / g.s, b = T * (-w - g.d) / g.s;
    double sa = sigmoid(a), sb = sigmoid(b);
    return T * (sa * (1.0 - sa) + sb * (1.0 - sb));
}

__device__ static inline float quantize_value(const grid &g, float w, const qkd__quant_spec &sp)
{
    double code;
    if (sp.scheme == QKD_QUANT_TERNARY) {
        code = sp.continuous ? ternary_smooth(g, w, sp.round_T)
                             : (fabs(w) > g.d ? copysign(1.0, (double)w) : 0.0);
        return (float)(code * g.s);
    }
    double u = (double)w / g.s;
    if (sp.continuous)
        code = soft_clamp(round_smooth(u, sp.round_T) + g.z, g.qmin, g.qmax, sp.clamp_T);
    else
        code = clampd(round(u) + g.z, g.qmin, g.qmax);
    return (float)((code - g.z) * g.s);
}

/* quantize_value of SYM and ASYM, hard rounding in float where that
 * decides alike: w * inv_s (inv_s = 1 / s in float) is within 2^-23 of
 * w / s, relatively, so a quotient farther than 2^-21 of itself from a
 * half-integer rounds as the double one does; nearer (ties included) or
 * not finite, the double path decides. The codes and code - z are small
 * integers, exact in float, and their product with s is one rounding in
 * either precision: the same bits, at a fraction of the double work (the
 * forward runs over every weight each step). Smooth rounding keeps its
 * double functions. */
__device__ static inline float quantize_grid(const grid &g, float inv_s, float w,
                                      const qkd__quant_spec &sp)
{
    const float u = w * inv_s;
    if (sp.continuous || !(fabsf(u - floorf(u) - 0.5f) > fabsf(u) * 0x1p-21f))
        return quantize_value(g, w, sp);
    const float code = fminf(fmaxf(roundf(u) + g.z, (float)g.qmin), (float)g.qmax);
    return (code - g.z) * g.s;
}

__device__ static inline double value_grad(const grid &g, float w, const qkd__quant_spec &sp)
{
    if (!sp.continuous)
        return w >= g.lo && w <= g.hi; /* STE, zero where the clip clamped */
    if (sp.scheme == QKD_QUANT_TERNARY)
        return ternary_smooth_grad(g, w, sp.round_T);
    double u = (double)w / g.s;
    return soft_clamp_grad(round_smooth(u, sp.round_T) + g.z, g.qmin, g.qmax, sp.clamp_T) *
           round_smooth_grad(u, sp.round_T);
}

/* The grid of a SYM or ASYM group of n values from its range alone
 * (those schemes read no values for it). */
__device__ static inline grid range_grid(float mx, float mn, int64_t n, const qkd__quant_spec &sp)
{
    grid g = grid_of(mx, mn, nullptr, n, sp);
    group_scale(&g, nullptr, n, sp);
    return g;
}


/* ---- segments: groups of 4 seg values (seg a power of two up to 32) over
 * seg neighbouring lanes of a warp, a float4 a lane (quant.cu's segment
 * kernel, and the optimizer's update that quantizes what it writes).
 *
 * A grid costs two double divisions, and a warp issues them once for all
 * its lanes: were every lane to compute its own group's grid, the warp
 * would issue them once for each of its K float4s. Instead, for K > 1,
 * lane r of a segment computes item r's grid (items seg apart share a
 * pass when seg < K) and the segment's lanes take scale, zero point and
 * 1/scale by shuffles: one pass of the double work for K items. Every
 * lane of the warp must construct it (dead lanes with zeros: a group is
 * live in all its lanes or none). */
/* The lanes a group of `group` values takes in segment form (4 values a
 * lane: seg a power of two up to 32), or 0 if it cannot. */
__host__ __device__ inline int segment_lanes(int64_t group)
{
    const int64_t seg = group / 4;
    return group % 4 == 0 && seg >= 1 && seg <= 32 && (seg & (seg - 1)) == 0 ? (int)seg : 0;
}

template <int K> struct segment_grids {
    float s[K], z[K], inv_s[K];

    __device__ segment_grids(const float4 (&v)[K], int seg, const qkd__quant_spec &sp)
    {
        const auto max = [](float a, float b) { return fmaxf(a, b); };
        const auto min = [](float a, float b) { return fminf(a, b); };
        float mx[K], mn[K];
#pragma unroll
        for (int k = 0; k < K; k++) {
            mx[k] = qkd__lanes_reduce(
                fmaxf(fmaxf(fmaxf(v[k].x, v[k].y), fmaxf(v[k].z, v[k].w)), 0.0f), max, seg);
            mn[k] = qkd__lanes_reduce(
                fminf(fminf(fminf(v[k].x, v[k].y), fminf(v[k].z, v[k].w)), 0.0f), min, seg);
        }
        if constexpr (K == 1) { /* every lane holds its group's range: no plan to share */
            const grid g = range_grid(mx[0], mn[0], 4 * seg, sp);
            s[0] = g.s;
            z[0] = g.z;
            inv_s[0] = 1.0f / g.s;
        } else {
            const int first = (threadIdx.x & 31) & ~(seg - 1), rank = (threadIdx.x & 31) - first;
            for (int pass = 0; pass * seg < K; pass++) {
                const int mine = pass * seg + rank; /* the item this lane plans */
                float hi = 0.0f, lo = 0.0f;
#pragma unroll
                for (int k = 0; k < K; k++) { /* selects, not an indexed (local) array */
                    hi = k == mine ? mx[k] : hi;
                    lo = k == mine ? mn[k] : lo;
                }
                const grid g = range_grid(hi, lo, 4 * seg, sp);
                const float inv = 1.0f / g.s;
#pragma unroll
                for (int k = 0; k < K; k++) {
                    const int from = k - pass * seg; /* the rank that planned item k */
                    if (from >= 0 && from < seg) {
                        s[k] = __shfl_sync(0xffffffffu, g.s, first + from);
                        z[k] = __shfl_sync(0xffffffffu, g.z, first + from);
                        inv_s[k] = __shfl_sync(0xffffffffu, inv, first + from);
                    }
                }
            }
        }
    }

    /* Q(v), item k, as float4 i of wq; the segment's first lane writes the
     * grid of group i / seg. */
    template <typename T>
    __device__ void store(T *wq, float *scales, float *zeros, size_t i, float4 v, int k, int seg,
                          const qkd__quant_spec &sp) const
    {
        /* the code range, recomputed: held across the loop it took 6 registers */
        grid g = grid_of(0.0, 0.0, nullptr, 4 * seg, sp);
        g.s = s[k];
        g.z = z[k];
        qkd__store4(wq, i,
                    make_float4(quantize_grid(g, inv_s[k], v.x, sp),
                                quantize_grid(g, inv_s[k], v.y, sp),
                                quantize_grid(g, inv_s[k], v.z, sp),
                                quantize_grid(g, inv_s[k], v.w, sp)));
        if ((threadIdx.x & (seg - 1)) == 0) {
            const size_t at = i >> (__ffs(seg) - 1); /* seg is a power of two */
            scales[at] = g.s;
            zeros[at] = g.z;
        }
    }
};

#endif
