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
#include "backend/cuda/quant.cuh"

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
 * take 74 registers (76 since the segment code moved to quant.cuh's
 * segment_grids), three blocks an SM; four took 94, two blocks, and
 * ran slower (TinyLlama's step: 40,291 tokens/s at four, 40,545 at three,
 * 40,243 for the kernel before, one run each in one command). */
#define FQ_ITEMS 3

/* SYM and ASYM over whole groups of 4 seg values (seg a power of two up to
 * 32): thread i owns values 4i .. 4i+3 (one float4), a group's seg threads
 * are neighbours in one warp (quant.cuh's segments). Each pass of the loop
 * loads FQ_ITEMS float4s a grid's stride apart and plans their grids
 * together. The loop's bound is the same for a whole block, so every lane
 * reaches every shuffle. Same results as the warp kernel: a range is
 * order-free, and each grid is computed by the same function from it. */
template <typename T>
__global__ void fakequant_forward_seg_kernel(T *wq, float *scales, float *zeros,
                                             const float4 *w, size_t n4, int seg,
                                             qkd__quant_spec sp)
{
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i0 - threadIdx.x < n4;
         i0 += FQ_ITEMS * stride) {
        float4 v[FQ_ITEMS];
#pragma unroll
        for (int k = 0; k < FQ_ITEMS; k++) {
            const size_t i = i0 + k * stride; /* a group's threads are all live or none */
            v[k] = i < n4 ? w[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
        segment_grids<FQ_ITEMS> g(v, seg, sp);
#pragma unroll
        for (int k = 0; k < FQ_ITEMS; k++) {
            const size_t i = i0 + k * stride;
            if (i < n4)
                g.store(wq, scales, zeros, i, v[k], k, seg, sp);
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
    const int seg = segment_lanes(spec->group);
    if ((spec->scheme != QKD_QUANT_SYM && spec->scheme != QKD_QUANT_ASYM) || !seg ||
        cols % spec->group || (uintptr_t)w % 16 || (uintptr_t)wq % (4 * sizeof(T)))
        return 0;
    return seg;
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
