/* CUDA fake-quantization kernels of the SYM, ASYM and TERNARY schemes
 * (include/qkd/quant.h gives the math), with computed or learned (LSQ)
 * scales, and the dynamic per-row quantization. One thread owns a group
 * and walks it in order, in double, exactly as the reference does
 * (lib/backend/ref/ref_quant.c), so hard rounding gives bit-identical
 * codes, scales and zero points; the smooth (CONTINUOUS) functions differ
 * only by the device's double tanh and exp.
 * A group per thread is the simple form: enough parallelism for grouped
 * weights, slow for one group per tensor. The forward of SYM and ASYM,
 * which runs every step, gives each group a warp instead, or, for groups
 * of 4 to 128 values in whole float4s, a segment of a warp, rounding in
 * float wherever that decides as double does (quantize_grid; same
 * results). The forwards write Q(w) in fp32 or rounded to bf16 (the bf16
 * products' operand, written in the same pass). */
#include <float.h>

#include "backend/cuda/common.cuh"
#include "qkd/quant.h"

/* One group's grid. [lo, hi] is the clip range, [qmin, qmax] the code
 * range, d TERNARY's threshold. */
struct grid {
    double lo, hi, qmin, qmax, d;
    float s, z;
};

__device__ static float scale_floor(double s)
{
    return s >= FLT_MIN ? (float)s : FLT_MIN;
}

__device__ static double clampd(double x, double lo, double hi)
{
    return x < lo ? lo : x > hi ? hi : x;
}

__device__ static double sigmoid(double x)
{
    return 1.0 / (1.0 + exp(-x));
}

__device__ static double mean_abs_clamped(const float *w, int64_t n, double lo, double hi)
{
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++)
        sum += fabs(clampd(w[i], lo, hi));
    return sum / (double)n;
}

/* The grid of a group of n values w whose largest and smallest (zero
 * included) are mx and mn. */
__device__ static grid grid_of(double mx, double mn, const float *w, int64_t n,
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

__device__ static grid group_range(const float *w, int64_t n, const qkd__quant_spec &sp)
{
    double mx = 0.0, mn = 0.0; /* zero always lies in the range */
    for (int64_t i = 0; i < n; i++) {
        mx = fmax(mx, (double)w[i]);
        mn = fmin(mn, (double)w[i]);
    }
    return grid_of(mx, mn, w, n, sp);
}

__device__ static void group_scale(grid *g, const float *w, int64_t n, const qkd__quant_spec &sp)
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

__device__ static double round_smooth(double u, double T)
{
    double f = floor(u), t = tanh(0.25 * T);
    return f + 0.5 * (tanh(0.5 * T * (u - f - 0.5)) + t) / t;
}

__device__ static double round_smooth_grad(double u, double T)
{
    double f = floor(u), h = tanh(0.5 * T * (u - f - 0.5));
    return T * (1.0 - h * h) / (4.0 * tanh(0.25 * T));
}

__device__ static double soft_clamp(double x, double a, double b, double k)
{
    return x * sigmoid(k * (x - a)) * sigmoid(k * (b - x)) + a * sigmoid(k * (a - x)) +
           b * sigmoid(k * (x - b));
}

__device__ static double gate_grad(double u, double k)
{
    double g = sigmoid(k * u);
    return k * g * (1.0 - g);
}

__device__ static double soft_clamp_grad(double x, double a, double b, double k)
{
    double ga = sigmoid(k * (x - a)), gb = sigmoid(k * (b - x));
    return ga * gb + x * (gate_grad(x - a, k) * gb - ga * gate_grad(b - x, k)) -
           a * gate_grad(a - x, k) + b * gate_grad(x - b, k);
}

__device__ static double ternary_smooth(const grid &g, double w, double T)
{
    return sigmoid(T * (w - g.d) / g.s) - sigmoid(T * (-w - g.d) / g.s);
}

__device__ static double ternary_smooth_grad(const grid &g, double w, double T)
{
    double a = T * (w - g.d) / g.s, b = T * (-w - g.d) / g.s;
    double sa = sigmoid(a), sb = sigmoid(b);
    return T * (sa * (1.0 - sa) + sb * (1.0 - sb));
}

__device__ static float quantize_value(const grid &g, float w, const qkd__quant_spec &sp)
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
__device__ static float quantize_grid(const grid &g, float inv_s, float w,
                                      const qkd__quant_spec &sp)
{
    const float u = w * inv_s;
    if (sp.continuous || !(fabsf(u - floorf(u) - 0.5f) > fabsf(u) * 0x1p-21f))
        return quantize_value(g, w, sp);
    const float code = fminf(fmaxf(roundf(u) + g.z, (float)g.qmin), (float)g.qmax);
    return (code - g.z) * g.s;
}

__device__ static double value_grad(const grid &g, float w, const qkd__quant_spec &sp)
{
    if (!sp.continuous)
        return w >= g.lo && w <= g.hi; /* STE, zero where the clip clamped */
    if (sp.scheme == QKD_QUANT_TERNARY)
        return ternary_smooth_grad(g, w, sp.round_T);
    double u = (double)w / g.s;
    return soft_clamp_grad(round_smooth(u, sp.round_T) + g.z, g.qmin, g.qmax, sp.clamp_T) *
           round_smooth_grad(u, sp.round_T);
}

/* ---- kernels ------------------------------------------------------------------------------ */

/* Group `item` (row-major over rows, then groups along a row): its offset
 * in the weight and its length (a row's last group may be partial). */
__device__ static size_t group_at(int64_t item, int64_t cols, int64_t per_row, int64_t group,
                                  int64_t *n)
{
    int64_t row = item / per_row, first = (item % per_row) * group;
    *n = cols - first < group ? cols - first : group;
    return (size_t)(row * cols + first);
}

template <typename T>
__global__ void fakequant_forward_kernel(T *wq, float *scales, float *zeros, const float *w,
                                         int64_t cols, int64_t per_row, size_t n_groups,
                                         qkd__quant_spec sp)
{
    QKD__CUDA_FOR(item, n_groups)
    {
        int64_t n;
        size_t at = group_at((int64_t)item, cols, per_row, sp.group, &n);
        grid g = group_range(w + at, n, sp);
        group_scale(&g, w + at, n, sp);
        for (int64_t i = 0; i < n; i++)
            qkd__store(wq, at + i, quantize_value(g, w[at + i], sp));
        scales[item] = g.s;
        zeros[item] = g.z;
    }
}

/* The grid of a SYM or ASYM group of n values from its range alone
 * (those schemes read no values for it). */
__device__ static grid range_grid(float mx, float mn, int64_t n, const qkd__quant_spec &sp)
{
    grid g = grid_of(mx, mn, nullptr, n, sp);
    group_scale(&g, nullptr, n, sp);
    return g;
}

/* SYM and ASYM: a warp per group, its lanes striding over the group
 * (coalesced, where a thread per group reads 64 floats alone). The range
 * is a max and a min, which no order changes, and each value's code
 * depends on the grid alone, so the results equal the thread-per-group
 * kernel's bit for bit. TERNARY's sums keep that kernel (their order). */
template <typename T>
__global__ void fakequant_forward_warp_kernel(T *wq, float *scales, float *zeros,
                                              const float *w, int64_t cols, int64_t per_row,
                                              size_t n_groups, qkd__quant_spec sp)
{
    const size_t warps = (size_t)gridDim.x * (blockDim.x / 32);
    const int lane = threadIdx.x & 31;
    for (size_t item = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32; item < n_groups;
         item += warps) {
        int64_t n;
        const size_t at = group_at((int64_t)item, cols, per_row, sp.group, &n);
        float mx = 0.0f, mn = 0.0f;
        for (int64_t i = lane; i < n; i += 32) {
            mx = fmaxf(mx, w[at + i]);
            mn = fminf(mn, w[at + i]);
        }
        mx = qkd__warp_reduce(mx, qkd__max_op<float>());
        mn = -qkd__warp_reduce(-mn, qkd__max_op<float>());
        const grid g = range_grid(mx, mn, n, sp);
        const float inv_s = 1.0f / g.s;
        for (int64_t i = lane; i < n; i += 32)
            qkd__store(wq, at + i, quantize_grid(g, inv_s, w[at + i], sp));
        if (lane == 0) {
            scales[item] = g.s;
            zeros[item] = g.z;
        }
    }
}

/* float4s a thread of the segment kernel loads before computing any (one
 * load, then a long dependent chain, left the memory system idle). Three
 * take 74 registers, three blocks an SM; four took 94, two blocks, and
 * ran slower (TinyLlama's step: 40,291 tokens/s at four, 40,545 at three,
 * 40,243 for the kernel before, one run each in one command). */
#define FQ_ITEMS 3

/* SYM and ASYM over whole groups of 4 seg values (seg a power of two up to
 * 32): thread i owns values 4i .. 4i+3 (one float4), a group's seg threads
 * are neighbours in one warp and combine their range with shuffles. Each
 * pass of the loop loads FQ_ITEMS float4s a grid's stride apart.
 *
 * A grid costs two double divisions, and a warp issues them once for all
 * its lanes: were every lane to compute its own group's grid, the warp
 * would issue them once an item. Instead lane r of a segment computes
 * item r's grid (items seg apart share a pass when seg < FQ_ITEMS) and
 * the segment's lanes take scale, zero point and 1/scale by shuffles: one
 * pass of the double work for FQ_ITEMS items. The loop's bound is the same
 * for a whole block, so every lane reaches every shuffle. Same results as
 * the warp kernel: a range is order-free, and each grid is computed by
 * the same function from it. */
template <typename T>
__global__ void fakequant_forward_seg_kernel(T *wq, float *scales, float *zeros,
                                             const float4 *w, size_t n4, int seg,
                                             qkd__quant_spec sp)
{
    const auto max = [](float a, float b) { return fmaxf(a, b); };
    const auto min = [](float a, float b) { return fminf(a, b); };
    const int first = (threadIdx.x & 31) & ~(seg - 1), rank = (threadIdx.x & 31) - first;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i0 - threadIdx.x < n4;
         i0 += FQ_ITEMS * stride) {
        float4 v[FQ_ITEMS];
        float mx[FQ_ITEMS], mn[FQ_ITEMS], s[FQ_ITEMS], z[FQ_ITEMS], inv_s[FQ_ITEMS];
#pragma unroll
        for (int k = 0; k < FQ_ITEMS; k++) {
            const size_t i = i0 + k * stride; /* a group's threads are all live or none */
            v[k] = i < n4 ? w[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int k = 0; k < FQ_ITEMS; k++) {
            mx[k] = qkd__lanes_reduce(
                fmaxf(fmaxf(fmaxf(v[k].x, v[k].y), fmaxf(v[k].z, v[k].w)), 0.0f), max, seg);
            mn[k] = qkd__lanes_reduce(
                fminf(fminf(fminf(v[k].x, v[k].y), fminf(v[k].z, v[k].w)), 0.0f), min, seg);
        }
        for (int pass = 0; pass * seg < FQ_ITEMS; pass++) {
            const int mine = pass * seg + rank; /* the item this lane plans */
            float hi = 0.0f, lo = 0.0f;
#pragma unroll
            for (int k = 0; k < FQ_ITEMS; k++) { /* selects, not an indexed (local) array */
                hi = k == mine ? mx[k] : hi;
                lo = k == mine ? mn[k] : lo;
            }
            const grid g = range_grid(hi, lo, 4 * seg, sp);
            const float inv = 1.0f / g.s;
#pragma unroll
            for (int k = 0; k < FQ_ITEMS; k++) {
                const int from = k - pass * seg; /* the rank that planned item k */
                if (from >= 0 && from < seg) {
                    s[k] = __shfl_sync(0xffffffffu, g.s, first + from);
                    z[k] = __shfl_sync(0xffffffffu, g.z, first + from);
                    inv_s[k] = __shfl_sync(0xffffffffu, inv, first + from);
                }
            }
        }
#pragma unroll
        for (int k = 0; k < FQ_ITEMS; k++) {
            const size_t i = i0 + k * stride;
            if (i >= n4)
                continue;
            /* the code range, recomputed: held across the loop it took 6 registers */
            grid g = grid_of(0.0, 0.0, nullptr, 4 * seg, sp);
            g.s = s[k];
            g.z = z[k];
            qkd__store4(wq, i,
                        make_float4(quantize_grid(g, inv_s[k], v[k].x, sp),
                                    quantize_grid(g, inv_s[k], v[k].y, sp),
                                    quantize_grid(g, inv_s[k], v[k].z, sp),
                                    quantize_grid(g, inv_s[k], v[k].w, sp)));
            if (rank == 0) {
                const size_t at = i >> (__ffs(seg) - 1); /* seg is a power of two */
                scales[at] = g.s;
                zeros[at] = g.z;
            }
        }
    }
}

__global__ void fakequant_backward_kernel(float *dw, const float *dwq, const float *w,
                                          const float *scales, const float *zeros, int64_t cols,
                                          int64_t per_row, size_t n_groups, qkd__quant_spec sp)
{
    QKD__CUDA_FOR(item, n_groups)
    {
        int64_t n;
        size_t at = group_at((int64_t)item, cols, per_row, sp.group, &n);
        grid g = group_range(w + at, n, sp);
        g.s = scales[item];
        g.z = zeros[item];
        for (int64_t i = 0; i < n; i++)
            dw[at + i] = (float)(dw[at + i] + value_grad(g, w[at + i], sp) * dwq[at + i]);
    }
}

/* The plain STE (format schemes too): dw += dwq. */
__global__ void ste_kernel(float *dw, const float *dwq, size_t n)
{
    QKD__CUDA_FOR(i, n)
    dw[i] += dwq[i];
}

static int64_t groups_per_row(int64_t cols, int64_t group)
{
    return (cols + group - 1) / group;
}

/* Threads per group of the segment kernel, or 0 when it does not apply:
 * SYM or ASYM, groups of 4 seg values with seg a power of two up to 32
 * that tile the rows, and aligned vectors. */
template <typename T>
static int segment_of(const T *wq, const float *w, int64_t cols, const qkd__quant_spec *spec)
{
    const int64_t g = spec->group, seg = g / 4;
    if ((spec->scheme != QKD_QUANT_SYM && spec->scheme != QKD_QUANT_ASYM) || g % 4 ||
        seg > 32 || (seg & (seg - 1)) || cols % g || (uintptr_t)w % 16 ||
        (uintptr_t)wq % (4 * sizeof(T)))
        return 0;
    return (int)seg;
}

template <typename T>
static void fakequant_launch(qkd__backend *b, T *wq, float *scales, float *zeros,
                             const float *w, int64_t rows, int64_t cols,
                             const qkd__quant_spec *spec, const char *what)
{
    int64_t per_row = groups_per_row(cols, spec->group);
    size_t n_groups = (size_t)(rows * per_row);
    if (!n_groups)
        return;
    cudaStream_t st = qkd__cuda_of(b)->stream;
    const int seg = segment_of(wq, w, cols, spec);
    if (seg) {
        const size_t n4 = n_groups * (size_t)seg;
        fakequant_forward_seg_kernel<<<qkd__cuda_blocks((n4 + FQ_ITEMS - 1) / FQ_ITEMS),
                                       QKD__CUDA_THREADS, 0, st>>>(
            wq, scales, zeros, (const float4 *)w, n4, seg, *spec);
    } else if (spec->scheme == QKD_QUANT_TERNARY) {
        fakequant_forward_kernel<<<qkd__cuda_blocks(n_groups), QKD__CUDA_THREADS, 0, st>>>(
            wq, scales, zeros, w, cols, per_row, n_groups, *spec);
    } else {
        fakequant_forward_warp_kernel<<<qkd__cuda_blocks(32 * n_groups), QKD__CUDA_THREADS, 0,
                                        st>>>(wq, scales, zeros, w, cols, per_row, n_groups,
                                              *spec);
    }
    qkd__cuda_launched(b, what);
}

extern "C" void qkd__cuda_fakequant_groups(qkd__backend *b, float *wq, float *scales,
                                           float *zeros, const float *w, int64_t rows,
                                           int64_t cols, const qkd__quant_spec *spec)
{
    fakequant_launch(b, wq, scales, zeros, w, rows, cols, spec, "fakequant_forward");
}

extern "C" void qkd__cuda_fakequant_forward_bf16(qkd__backend *b, uint16_t *wq, float *scales,
                                                 float *zeros, const float *w, int64_t rows,
                                                 int64_t cols, const qkd__quant_spec *spec)
{
    fakequant_launch(b, wq, scales, zeros, w, rows, cols, spec, "fakequant_forward_bf16");
}

extern "C" void qkd__cuda_fakequant_backward(qkd__backend *b, float *dw, const float *dwq,
                                             const float *w, const float *scales,
                                             const float *zeros, int64_t rows, int64_t cols,
                                             const qkd__quant_spec *spec)
{
    cudaStream_t st = qkd__cuda_of(b)->stream;
    if (rows <= 0 || cols <= 0)
        return;
    if (!spec->continuous && spec->clip_ratio >= 1.0f) {
        size_t n = (size_t)(rows * cols);
        ste_kernel<<<qkd__cuda_blocks(n), QKD__CUDA_THREADS, 0, st>>>(dw, dwq, n);
    } else {
        int64_t per_row = groups_per_row(cols, spec->group);
        size_t n_groups = (size_t)(rows * per_row);
        fakequant_backward_kernel<<<qkd__cuda_blocks(n_groups), QKD__CUDA_THREADS, 0, st>>>(
            dw, dwq, w, scales, zeros, cols, per_row, n_groups, *spec);
    }
    qkd__cuda_launched(b, "fakequant_backward");
}

/* ---- learned scales (LSQ) --------------------------------------------------------------
 * The group's stored scale (floored at FLT_MIN) and, for ASYM, its zero
 * point rounded and clamped to the code range replace the computed ones;
 * the clip range and TERNARY's threshold still come from the group. */

__device__ static grid learned_grid(const float *w, int64_t n, const qkd__quant_spec &sp,
                                    const float *scales, const float *zeros, size_t item)
{
    grid g = group_range(w, n, sp);
    g.s = scale_floor(scales[item]);
    if (zeros)
        g.z = (float)clampd(round((double)zeros[item]), 0.0, g.qmax) + 0.0f; /* never -0 */
    return g;
}

/* dQ/dw, dQ/ds and dQ/dz of one value. */
struct lsq_grad {
    double w, s, z;
};

__device__ static lsq_grad ternary_lsq_grad(const grid &g, float w, const qkd__quant_spec &sp)
{
    if (!sp.continuous) { /* Q = s c: the code does not depend on s */
        lsq_grad d = {(double)(w >= g.lo && w <= g.hi),
                      fabs(w) > g.d ? copysign(1.0, (double)w) : 0.0, 0.0};
        return d;
    }
    const double T = sp.round_T, a = T * (w - g.d) / g.s, b = T * (-w - g.d) / g.s;
    const double sa = sigmoid(a), sb = sigmoid(b), da = sa * (1.0 - sa), db = sb * (1.0 - sb);
    lsq_grad d = {T * (da + db), sa - sb - da * a + db * b, 0.0};
    return d;
}

__device__ static lsq_grad lsq_value_grad(const grid &g, float w, const qkd__quant_spec &sp)
{
    if (sp.scheme == QKD_QUANT_TERNARY)
        return ternary_lsq_grad(g, w, sp);
    const double u = (double)w / g.s;
    if (sp.continuous) { /* Q = s (SoftClamp(round_T(u) + z) - z), exactly */
        const double T = sp.round_T, dr = round_smooth_grad(u, T);
        const double k = round_smooth(u, T) + g.z;
        const double c = soft_clamp(k, g.qmin, g.qmax, sp.clamp_T);
        const double dc = soft_clamp_grad(k, g.qmin, g.qmax, sp.clamp_T);
        lsq_grad d = {dc * dr, c - g.z - dc * dr * u, g.s * (dc - 1.0)};
        return d;
    }
    const double k = round(u) + g.z; /* the code before its clamp */
    lsq_grad inside = {1.0, round(u) - u, 0.0};
    lsq_grad outside = {0.0, clampd(k, g.qmin, g.qmax) - g.z, -(double)g.s};
    return k >= g.qmin && k <= g.qmax ? inside : outside;
}

__global__ void lsq_forward_kernel(float *wq, const float *w, const float *scales,
                                   const float *zeros, int64_t cols, int64_t per_row,
                                   size_t n_groups, qkd__quant_spec sp)
{
    QKD__CUDA_FOR(item, n_groups)
    {
        int64_t n;
        size_t at = group_at((int64_t)item, cols, per_row, sp.group, &n);
        grid g = learned_grid(w + at, n, sp, scales, zeros, item);
        for (int64_t i = 0; i < n; i++)
            wq[at + i] = quantize_value(g, w[at + i], sp);
    }
}

__global__ void lsq_backward_kernel(float *dw, float *dscales, float *dzeros, const float *dwq,
                                    const float *w, const float *scales, const float *zeros,
                                    int64_t cols, int64_t per_row, size_t n_groups,
                                    qkd__quant_spec sp)
{
    QKD__CUDA_FOR(item, n_groups)
    {
        int64_t n;
        size_t at = group_at((int64_t)item, cols, per_row, sp.group, &n);
        grid g = learned_grid(w + at, n, sp, scales, zeros, item);
        double ds = 0.0, dz = 0.0;
        for (int64_t i = 0; i < n; i++) {
            lsq_grad d = lsq_value_grad(g, w[at + i], sp);
            dw[at + i] = (float)(dw[at + i] + d.w * dwq[at + i]);
            ds += d.s * dwq[at + i];
            dz += d.z * dwq[at + i];
        }
        dscales[item] = (float)(dscales[item] + ds);
        if (dzeros)
            dzeros[item] = (float)(dzeros[item] + dz);
    }
}

extern "C" void qkd__cuda_fakequant_lsq_forward(qkd__backend *b, float *wq, const float *w,
                                                const float *scales, const float *zeros,
                                                int64_t rows, int64_t cols,
                                                const qkd__quant_spec *spec)
{
    int64_t per_row = groups_per_row(cols, spec->group);
    size_t n_groups = (size_t)(rows * per_row);
    if (!n_groups)
        return;
    lsq_forward_kernel<<<qkd__cuda_blocks(n_groups), QKD__CUDA_THREADS, 0,
                         qkd__cuda_of(b)->stream>>>(wq, w, scales, zeros, cols, per_row,
                                                    n_groups, *spec);
    qkd__cuda_launched(b, "fakequant_lsq_forward");
}

extern "C" void qkd__cuda_fakequant_lsq_backward(qkd__backend *b, float *dw, float *dscales,
                                                 float *dzeros, const float *dwq, const float *w,
                                                 const float *scales, const float *zeros,
                                                 int64_t rows, int64_t cols,
                                                 const qkd__quant_spec *spec)
{
    int64_t per_row = groups_per_row(cols, spec->group);
    size_t n_groups = (size_t)(rows * per_row);
    if (!n_groups)
        return;
    lsq_backward_kernel<<<qkd__cuda_blocks(n_groups), QKD__CUDA_THREADS, 0,
                          qkd__cuda_of(b)->stream>>>(dw, dscales, dzeros, dwq, w, scales, zeros,
                                                     cols, per_row, n_groups, *spec);
    qkd__cuda_launched(b, "fakequant_lsq_backward");
}

/* ---- dynamic per-row quantization ----------------------------------------------------------
 * Symmetric, one group per row: a block per row finds max |x| (a max is
 * exact in any order), then every thread quantizes its values. */

__global__ void quant_rows_kernel(float *out, const float *x, int64_t cols, qkd__quant_spec sp)
{
    const float *row = x + (size_t)blockIdx.x * cols;
    float *o = out + (size_t)blockIdx.x * cols;
    double hi = 0.0;
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x)
        hi = fmax(hi, fabs((double)row[i]));
    hi = qkd__block_max(hi); /* every read of x precedes the writes (out may be x) */
    double qmax = (double)((1 << (sp.bits - 1)) - 1);
    grid g = {-hi, hi, -qmax, qmax, 0.0, 0.0f, 0.0f};
    group_scale(&g, row, cols, sp);
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x)
        o[i] = quantize_value(g, row[i], sp);
}

extern "C" void qkd__cuda_quant_rows(qkd__backend *b, float *out, const float *x, int64_t rows,
                                     int64_t cols, int bits)
{
    if (rows <= 0 || cols <= 0)
        return;
    qkd__quant_spec sp = {QKD_QUANT_SYM, bits, cols, 1.0f, 0, 0.0f, 0.0f};
    quant_rows_kernel<<<(unsigned)rows, QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(
        out, x, cols, sp);
    qkd__cuda_launched(b, "quant_rows");
}
