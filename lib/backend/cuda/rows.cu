/* CUDA kernels over rows: RMSNorm, the softmax family, cross-entropy, the
 * distillation objectives, TSLD's token weights and the top-1
 * probability. One block per row (a warp for RMSNorm), the formulas
 * written as the reference writes them (lib/backend/ref/ref_activation.c,
 * ref_kd.c, ref_linear.c); sums in double through the block reductions of
 * common.cuh, except kd_loss and the top-1 probability, which sweep the
 * full-vocabulary logits of a batch and run in float (see kd_loss). */
#include "backend/cuda/common.cuh"
#include "qkd/loss.h"

/* log sum exp(x * it) over a row of V, NAN if the row holds a non-finite
 * value. Every thread of the block gets it. */
__device__ static double row_lse(const float *x, int V, double it)
{
    double mx = -INFINITY, bad = 0.0;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        bad += !isfinite(x[v]);
        mx = fmax(mx, x[v] * it);
    }
    mx = qkd__block_max(mx);
    if (qkd__block_sum(bad) > 0.0)
        return NAN;
    double s = 0.0;
    for (int v = threadIdx.x; v < V; v += blockDim.x)
        s += exp(x[v] * it - mx);
    return mx + log(qkd__block_sum(s));
}

static unsigned rows_grid(int N)
{
    return (unsigned)N;
}

/* ---- RMSNorm -----------------------------------------------------------------------
 * A warp per row (a block per row spends its time in the block
 * reduction's barriers at these widths), in double as the reference
 * computes it: the arithmetic costs nothing next to the memory traffic.
 * The pointers are __restrict__ so each lane's loads are issued ahead of
 * its stores: with possible aliasing, the dinp pass waited a full memory
 * latency per 32 columns and took 0.34 ms a call on SmolLM's 16k x 576
 * rows, 6x its traffic. */

/* Rows (warps) per block of the RMSNorm kernels. */
#define NORM_ROWS (QKD__CUDA_THREADS / 32)

__device__ inline double warp_sum(double v)
{
    return qkd__warp_reduce(v, qkd__sum_op<double>());
}

static unsigned norm_grid(int N)
{
    return (unsigned)((N + NORM_ROWS - 1) / NORM_ROWS);
}

/* The RMSNorm rows read 4 columns at a time (V 4: float4s, for C a
 * multiple of 4 and 16-byte aligned rows) or one (V 1). Both kernels of a
 * shape take the same V, so their sums run in the same order. */
template <int V> struct norm_vec;
template <> struct norm_vec<1> {
    static __device__ float4 load(const float *p, int i) { return make_float4(p[i], 0, 0, 0); }
    static __device__ float4 load(const uint16_t *p, int i)
    {
        return make_float4(qkd__load(p, (size_t)i), 0, 0, 0);
    }
    static __device__ void store(float *p, int i, float4 v) { p[i] = v.x; }
    template <typename T> static __device__ void put(T *p, int i, float4 v)
    {
        qkd__store(p, (size_t)i, v.x);
    }
};
template <> struct norm_vec<4> {
    static __device__ float4 load(const float *p, int i)
    {
        return reinterpret_cast<const float4 *>(p)[i];
    }
    static __device__ float4 load(const uint16_t *p, int i) { return qkd__load4(p, (size_t)i); }
    static __device__ void store(float *p, int i, float4 v)
    {
        reinterpret_cast<float4 *>(p)[i] = v;
    }
    template <typename T> static __device__ void put(T *p, int i, float4 v)
    {
        qkd__store4(p, (size_t)i, v);
    }
};

/* Vectors a lane of the forward norms loads before using the first: one
 * at a time, a warp waits a memory latency per 32 vectors (issued 4 at a
 * time, TinyLlama's add_rmsnorm took 47.1 us a call against 49.8, ncu on
 * an H100). */
#define NORM_FWD_U 4

/* y = x r w for the warp's row x, r = 1 / sqrt(mean(x^2) + eps) saved to
 * *rstd. T: the output's type, fp32 or bf16 bits (qkd__store). The sum
 * of squares runs over each lane's groups of V columns, in order. */
template <int V, typename T>
__device__ inline void norm_row(T *__restrict__ y, float *__restrict__ rstd,
                                const float *__restrict__ x, const float *__restrict__ w, int C,
                                float eps, int lane)
{
    typedef norm_vec<V> NV;
    const int n = C / V;
    double ss = 0.0;
    for (int c0 = lane; c0 < n; c0 += 32 * NORM_FWD_U) {
        float4 v[NORM_FWD_U];
#pragma unroll
        for (int u = 0; u < NORM_FWD_U; u++)
            if (c0 + 32 * u < n)
                v[u] = NV::load(x, c0 + 32 * u);
#pragma unroll
        for (int u = 0; u < NORM_FWD_U; u++) {
            if (c0 + 32 * u >= n)
                break;
            ss += (double)v[u].x * v[u].x;
            if (V == 4)
                ss += (double)v[u].y * v[u].y + (double)v[u].z * v[u].z +
                      (double)v[u].w * v[u].w;
        }
    }
    double r = 1.0 / sqrt(warp_sum(ss) / C + eps);
    for (int c0 = lane; c0 < n; c0 += 32 * NORM_FWD_U) {
        float4 v[NORM_FWD_U], g[NORM_FWD_U];
#pragma unroll
        for (int u = 0; u < NORM_FWD_U; u++)
            if (c0 + 32 * u < n)
                v[u] = NV::load(x, c0 + 32 * u), g[u] = NV::load(w, c0 + 32 * u);
#pragma unroll
        for (int u = 0; u < NORM_FWD_U; u++)
            if (c0 + 32 * u < n)
                NV::put(y, c0 + 32 * u,
                        make_float4((float)(v[u].x * r * g[u].x), (float)(v[u].y * r * g[u].y),
                                    (float)(v[u].z * r * g[u].z), (float)(v[u].w * r * g[u].w)));
    }
    if (lane == 0)
        *rstd = (float)r;
}

template <int V, typename T>
__global__ void rmsnorm_forward_kernel(T *__restrict__ out, float *__restrict__ rstd,
                                       const float *__restrict__ inp,
                                       const float *__restrict__ w, int N, int C, float eps)
{
    const int row = blockIdx.x * NORM_ROWS + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (row >= N) /* the whole warp agrees */
        return;
    const size_t off = (size_t)row * C;
    norm_row<V>(out + off, rstd + row, inp + off, w, C, eps, lane);
}

/* sum = x + y (y as bf16 bits), then norm_row of sum: the norm reads back
 * the sum its own lane just wrote (same columns), from cache rather than
 * memory. */
template <int V>
__global__ void add_rmsnorm_forward_kernel(float *__restrict__ sum, uint16_t *__restrict__ out,
                                           float *__restrict__ rstd,
                                           const float *__restrict__ x,
                                           const uint16_t *__restrict__ y,
                                           const float *__restrict__ w, int N, int C, float eps)
{
    typedef norm_vec<V> NV;
    const int row = blockIdx.x * NORM_ROWS + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (row >= N)
        return;
    const size_t off = (size_t)row * C;
    for (int c0 = lane; c0 < C / V; c0 += 32 * NORM_FWD_U) {
        float4 a[NORM_FWD_U], b[NORM_FWD_U];
#pragma unroll
        for (int u = 0; u < NORM_FWD_U; u++) {
            const int c = c0 + 32 * u;
            if (c < C / V)
                a[u] = NV::load(x + off, c), b[u] = NV::load(y + off, c);
        }
#pragma unroll
        for (int u = 0; u < NORM_FWD_U; u++) {
            const int c = c0 + 32 * u;
            if (c < C / V)
                NV::store(sum + off, c,
                          make_float4(a[u].x + b[u].x, a[u].y + b[u].y, a[u].z + b[u].z,
                                      a[u].w + b[u].w));
        }
    }
    norm_row<V>(out + off, rstd + row, sum + off, w, C, eps, lane);
}

/* Whether the rows of a norm of x with weight w into out go as float4s
 * (norm_vec): C a multiple of 4 keeps every row as aligned as the first. */
template <typename T> static bool norm_by4(int C, const float *x, const float *w, const T *out)
{
    return C % 4 == 0 && qkd__aligned16(x) && qkd__aligned16(w) && qkd__aligned4(out);
}

/* rmsnorm_forward into fp32 or bf16 bits (T). */
template <typename T>
static void rmsnorm_forward(qkd__backend *b, T *out, float *rstd, const float *inp,
                            const float *w, int N, int C, float eps, const char *what)
{
    if (N <= 0 || C <= 0)
        return;
    cudaStream_t st = qkd__cuda_of(b)->stream;
    if (norm_by4(C, inp, w, out))
        rmsnorm_forward_kernel<4><<<norm_grid(N), QKD__CUDA_THREADS, 0, st>>>(out, rstd, inp, w, N,
                                                                             C, eps);
    else
        rmsnorm_forward_kernel<1><<<norm_grid(N), QKD__CUDA_THREADS, 0, st>>>(out, rstd, inp, w, N,
                                                                             C, eps);
    qkd__cuda_launched(b, what);
}

/* Columns a lane loads at once in the dinp pass, all loads issued before
 * the first use: one at a time, the pass was bound by a memory latency
 * per 32 columns (ncu: warps stalled on L1TEX 94% of the time, 0.15 ms a
 * call on SmolLM's rows against 0.03 ms for the forward). */
#define NORM_U 8

/* Rows a warp of the backward owns, and so the rows of a block: the chunk
 * of rows whose dw sums the block writes. Chunk sums first, then the
 * chunks in order: the sum is deterministic and its parallelism grows
 * with N. Two rows, not four: TinyLlama's 4096 rows were 128 blocks, too
 * few for 132 SMs (3.70 ms a step against 4.50); one row gained on
 * SmolLM's rows but lost on TinyLlama's (docs/benchmarks.md). */
#define DW_WARP_ROWS 2
#define DW_ROWS (NORM_ROWS * DW_WARP_ROWS)

/* k = r^3 / C * sum_i g_i w_i x_i of row `row` (every lane gets it; 0 past
 * N, where the whole warp agrees). */
__device__ double norm_backward_k(const float *__restrict__ dout, const float *__restrict__ inp,
                                  const float *__restrict__ w, const float *__restrict__ rstd,
                                  int row, int N, int C, int lane)
{
    if (row >= N)
        return 0.0;
    const float *x = inp + (size_t)row * C, *g = dout + (size_t)row * C;
    double gwx = 0.0;
    for (int c0 = lane; c0 < C; c0 += 32 * NORM_U) {
        float gv[NORM_U], wv[NORM_U], xv[NORM_U];
#pragma unroll
        for (int u = 0; u < NORM_U; u++) {
            const int c = c0 + 32 * u;
            gv[u] = c < C ? g[c] : 0.0f;
            wv[u] = c < C ? w[c] : 0.0f;
            xv[u] = c < C ? x[c] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < NORM_U; u++) /* columns in order; the zeros add nothing */
            gwx += (double)gv[u] * wv[u] * xv[u];
    }
    const double r = rstd[row];
    return r * r * r / C * warp_sum(gwx);
}

/* RMSNorm's backward over a block's DW_ROWS rows, reading dout and inp
 * for both gradients: dx_c += r w_c g_c - x_c k (and into bits, unless
 * NULL, the new dx_c rounded to bf16), and part[block][c] = sum over the
 * rows of g_c x_c r. Each warp takes k of its rows first; then, a chunk of
 * 32 NORM_U columns at a time (a lane's NORM_U loads in flight together),
 * it updates dx on its rows and sums their terms per column, and the block
 * adds its warps' sums in order. */
__global__ void __launch_bounds__(QKD__CUDA_THREADS)
    rmsnorm_backward_kernel(float *__restrict__ dinp, uint16_t *__restrict__ bits,
                            double *__restrict__ part, const float *__restrict__ dout,
                            const float *__restrict__ inp, const float *__restrict__ w,
                            const float *__restrict__ rstd, int N, int C)
{
    static_assert(32 * NORM_U == QKD__CUDA_THREADS, "a block's threads span a column chunk");
    __shared__ double sums[NORM_ROWS][32 * NORM_U];
    const int wi = threadIdx.x / 32, lane = threadIdx.x & 31;
    const int row0 = blockIdx.x * DW_ROWS + wi * DW_WARP_ROWS;
    double k[DW_WARP_ROWS];
#pragma unroll
    for (int i = 0; i < DW_WARP_ROWS; i++)
        k[i] = norm_backward_k(dout, inp, w, rstd, row0 + i, N, C, lane);
    for (int c0 = 0; c0 < C; c0 += 32 * NORM_U) {
        double acc[NORM_U] = {};
#pragma unroll
        for (int i = 0; i < DW_WARP_ROWS; i++) {
            const int row = row0 + i;
            if (row >= N)
                break;
            const size_t off = (size_t)row * C;
            const double r = rstd[row];
            float dv[NORM_U], gv[NORM_U], wv[NORM_U], xv[NORM_U];
#pragma unroll
            for (int u = 0; u < NORM_U; u++) {
                const int c = c0 + lane + 32 * u;
                if (c < C) {
                    dv[u] = dinp[off + c];
                    gv[u] = dout[off + c];
                    wv[u] = w[c];
                    xv[u] = inp[off + c];
                }
            }
#pragma unroll
            for (int u = 0; u < NORM_U; u++) {
                const int c = c0 + lane + 32 * u;
                if (c < C) {
                    const float v = (float)(dv[u] + r * wv[u] * gv[u] - xv[u] * k[i]);
                    dinp[off + c] = v;
                    if (bits)
                        qkd__store(bits + off, (size_t)c, v);
                    acc[u] += (double)gv[u] * xv[u] * r;
                }
            }
        }
#pragma unroll
        for (int u = 0; u < NORM_U; u++)
            sums[wi][lane + 32 * u] = acc[u];
        __syncthreads();
        const int c = c0 + threadIdx.x; /* the column of sums[.][threadIdx.x] */
        if (c < C) {
            double t = 0.0;
            for (int j = 0; j < NORM_ROWS; j++)
                t += sums[j][threadIdx.x];
            part[(size_t)blockIdx.x * C + c] = t;
        }
        __syncthreads(); /* sums is refilled for the next chunk */
    }
}

/* Threads that sum one column's chunks, each every DW_SPLIT-th chunk in
 * order, their sums then added in order; a block covers DW_COLS columns.
 * 32, not 8: SmolLM's 576 columns were 18 blocks (0.75 ms a step against
 * 0.40). */
#define DW_SPLIT 32
#define DW_COLS (QKD__CUDA_THREADS / DW_SPLIT)

/* dw_c += the sum over chunks of part[chunk][c]. */
__global__ void rmsnorm_dw_sum_kernel(float *dw, const double *part, int chunks, int C)
{
    __shared__ double s[DW_SPLIT][DW_COLS];
    const int col = threadIdx.x % DW_COLS, j = threadIdx.x / DW_COLS;
    const int c = blockIdx.x * DW_COLS + col;
    double acc = 0.0;
    if (c < C)
        for (int k = j; k < chunks; k += DW_SPLIT)
            acc += part[(size_t)k * C + c];
    s[j][col] = acc;
    __syncthreads();
    if (j == 0 && c < C) {
        double t = 0.0;
        for (int i = 0; i < DW_SPLIT; i++)
            t += s[i][col];
        dw[c] = (float)(dw[c] + t);
    }
}

extern "C" void qkd__cuda_rmsnorm_forward(qkd__backend *b, float *out, float *rstd,
                                          const float *inp, const float *w, int N, int C,
                                          float eps)
{
    rmsnorm_forward(b, out, rstd, inp, w, N, C, eps, "rmsnorm_forward");
}

extern "C" void qkd__cuda_rmsnorm_forward_bf16_bits(qkd__backend *b, uint16_t *out, float *rstd,
                                                    const float *inp, const float *w, int N,
                                                    int C, float eps)
{
    rmsnorm_forward(b, out, rstd, inp, w, N, C, eps, "rmsnorm_forward_bf16_bits");
}

extern "C" void qkd__cuda_add_rmsnorm_forward_bf16_bits(qkd__backend *b, float *sum,
                                                        uint16_t *out, float *rstd,
                                                        const float *x, const uint16_t *y,
                                                        const float *w, int N, int C, float eps)
{
    if (N <= 0 || C <= 0)
        return;
    cudaStream_t st = qkd__cuda_of(b)->stream;
    if (norm_by4(C, x, w, out) && qkd__aligned4(y) && qkd__aligned16(sum))
        add_rmsnorm_forward_kernel<4><<<norm_grid(N), QKD__CUDA_THREADS, 0, st>>>(
            sum, out, rstd, x, y, w, N, C, eps);
    else
        add_rmsnorm_forward_kernel<1><<<norm_grid(N), QKD__CUDA_THREADS, 0, st>>>(
            sum, out, rstd, x, y, w, N, C, eps);
    qkd__cuda_launched(b, "add_rmsnorm_forward_bf16_bits");
}

extern "C" void qkd__cuda_rmsnorm_backward_bf16_bits(qkd__backend *b, float *dinp,
                                                     uint16_t *dinp_bits, float *dw,
                                                     const float *dout, const float *inp,
                                                     const float *w, const float *rstd, int N,
                                                     int C)
{
    if (N <= 0 || C <= 0)
        return;
    const int chunks = (N + DW_ROWS - 1) / DW_ROWS;
    double *part = (double *)qkd__cuda_workspace(b, 2 * (size_t)chunks * C);
    if (!part)
        return;
    cudaStream_t st = qkd__cuda_of(b)->stream;
    rmsnorm_backward_kernel<<<(unsigned)chunks, QKD__CUDA_THREADS, 0, st>>>(
        dinp, dinp_bits, part, dout, inp, w, rstd, N, C);
    rmsnorm_dw_sum_kernel<<<(unsigned)((C + DW_COLS - 1) / DW_COLS), QKD__CUDA_THREADS, 0, st>>>(
        dw, part, chunks, C);
    qkd__cuda_launched(b, "rmsnorm_backward");
}

extern "C" void qkd__cuda_rmsnorm_backward(qkd__backend *b, float *dinp, float *dw,
                                           const float *dout, const float *inp, const float *w,
                                           const float *rstd, int N, int C)
{
    qkd__cuda_rmsnorm_backward_bf16_bits(b, dinp, NULL, dw, dout, inp, w, rstd, N, C);
}

/* ---- softmax family ------------------------------------------------------------------ */

enum row_op { SOFTMAX, LOG_SOFTMAX };

__global__ void softmax_forward_kernel(float *out, const float *logits, int V, double it,
                                       int op)
{
    const float *x = logits + (size_t)blockIdx.x * V;
    float *y = out + (size_t)blockIdx.x * V;
    double lse = row_lse(x, V, it);
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        double lp = x[v] * it - lse;
        y[v] = (float)(op == SOFTMAX ? exp(lp) : lp);
    }
}

/* softmax: dx += it * p * (dp - sum(dp * p));
 * log-softmax: dx += it * (dlp - exp(lp) * sum(dlp)). */
__global__ void softmax_backward_kernel(float *dlogits, const float *dy, const float *y, int V,
                                        double it, int op)
{
    size_t off = (size_t)blockIdx.x * V;
    const float *p = y + off, *dp = dy + off;
    float *dx = dlogits + off;
    double s = 0.0;
    for (int v = threadIdx.x; v < V; v += blockDim.x)
        s += op == SOFTMAX ? (double)dp[v] * p[v] : (double)dp[v];
    s = qkd__block_sum(s);
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        double d = op == SOFTMAX ? it * p[v] * (dp[v] - s) : it * (dp[v] - exp((double)p[v]) * s);
        dx[v] = (float)(dx[v] + d);
    }
}

static void softmax_forward(qkd__backend *b, float *out, const float *logits, int N, int V,
                            float inv_temp, int op)
{
    if (N <= 0 || V <= 0)
        return;
    softmax_forward_kernel<<<rows_grid(N), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(
        out, logits, V, inv_temp, op);
    qkd__cuda_launched(b, op == SOFTMAX ? "softmax_forward" : "log_softmax_forward");
}

static void softmax_backward(qkd__backend *b, float *dlogits, const float *dy, const float *y,
                             int N, int V, float inv_temp, int op)
{
    if (N <= 0 || V <= 0)
        return;
    softmax_backward_kernel<<<rows_grid(N), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(
        dlogits, dy, y, V, inv_temp, op);
    qkd__cuda_launched(b, op == SOFTMAX ? "softmax_backward" : "log_softmax_backward");
}

extern "C" void qkd__cuda_softmax_forward(qkd__backend *b, float *probs, const float *logits,
                                          int N, int V, float inv_temp)
{
    softmax_forward(b, probs, logits, N, V, inv_temp, SOFTMAX);
}

extern "C" void qkd__cuda_softmax_backward(qkd__backend *b, float *dlogits, const float *dprobs,
                                           const float *probs, int N, int V, float inv_temp)
{
    softmax_backward(b, dlogits, dprobs, probs, N, V, inv_temp, SOFTMAX);
}

extern "C" void qkd__cuda_log_softmax_forward(qkd__backend *b, float *logp, const float *logits,
                                              int N, int V, float inv_temp)
{
    softmax_forward(b, logp, logits, N, V, inv_temp, LOG_SOFTMAX);
}

extern "C" void qkd__cuda_log_softmax_backward(qkd__backend *b, float *dlogits,
                                               const float *dlogp, const float *logp, int N,
                                               int V, float inv_temp)
{
    softmax_backward(b, dlogits, dlogp, logp, N, V, inv_temp, LOG_SOFTMAX);
}

/* ---- cross-entropy ----------------------------------------------------------------------- */

__global__ void cross_entropy_forward_kernel(float *losses, const float *logits,
                                             const int32_t *targets, int V)
{
    const float *x = logits + (size_t)blockIdx.x * V;
    int target = targets[blockIdx.x];
    if (target < 0) { /* the whole block agrees */
        if (threadIdx.x == 0)
            losses[blockIdx.x] = 0.0f;
        return;
    }
    double lse = row_lse(x, V, 1.0);
    if (threadIdx.x == 0)
        losses[blockIdx.x] = (float)(lse - x[target]);
}

__global__ void cross_entropy_backward_kernel(float *dlogits, const float *logits,
                                              const int32_t *targets, double scale, int V)
{
    int target = targets[blockIdx.x];
    if (target < 0)
        return;
    const float *x = logits + (size_t)blockIdx.x * V;
    float *dx = dlogits + (size_t)blockIdx.x * V;
    double lse = row_lse(x, V, 1.0);
    for (int v = threadIdx.x; v < V; v += blockDim.x)
        dx[v] = (float)(dx[v] + scale * (exp(x[v] - lse) - (v == target)));
}

extern "C" void qkd__cuda_cross_entropy_forward(qkd__backend *b, float *losses,
                                                const float *logits, const int32_t *targets,
                                                int N, int V)
{
    if (N <= 0 || V <= 0)
        return;
    cross_entropy_forward_kernel<<<rows_grid(N), QKD__CUDA_THREADS, 0,
                                   qkd__cuda_of(b)->stream>>>(losses, logits, targets, V);
    qkd__cuda_launched(b, "cross_entropy_forward");
}

extern "C" void qkd__cuda_cross_entropy_backward(qkd__backend *b, float *dlogits,
                                                 const float *logits, const int32_t *targets,
                                                 float scale, int N, int V)
{
    if (N <= 0 || V <= 0)
        return;
    cross_entropy_backward_kernel<<<rows_grid(N), QKD__CUDA_THREADS, 0,
                                    qkd__cuda_of(b)->stream>>>(dlogits, logits, targets, scale,
                                                               V);
    qkd__cuda_launched(b, "cross_entropy_backward");
}

/* ---- kd_loss (the math of each kind is in include/qkd/loss.h) ------------------------------
 * A block per row, in float: the objective reads two [N][V] logit tensors
 * of a whole batch (16k x 49k for SmolLM), so it is bound by memory and
 * by exp, and double would cost several times more. Numerical care: each
 * thread folds its logits into an online log-sum-exp (running max m, sum
 * z of exp(x - m)), the block combines them at the block's max, and the
 * KL terms come out of the same sweep as expectations under the running
 * weights: E_p[x_t - x_s] - (lse_t - lse_s) is FKL, so FKL, RKL, CAKLD
 * and TSLD read each logit twice in all (this sweep and the gradient's);
 * JSD needs log m_v, so it sweeps once more for its value. Against the
 * reference (double) a value is off by about 1e-6 of the row's
 * log-normalisers (times tau^2), a gradient by float rounding. Rows of a
 * multiple of 4 logits, 16-byte aligned (every vocabulary of the issue's
 * shapes), take float4s: four exponentials of one running max in
 * parallel rather than a chain of four, and vector loads and stores. */

struct kd_args {
    float *row_loss, *ds;
    uint16_t *ds_bits; /* instead of ds: the gradient as bf16 bits */
    const float *s, *t, *row_w;
    const int32_t *targets;
    const float *beta_dev; /* NULL: beta */
    float scale, tau, beta;
    int V, kind, accumulate;
};

/* One thread's online log-sum-exp of x with a running sum a of
 * exp(x - m) * w; bad counts non-finite inputs. */
struct lse_acc {
    float m, z, a;
};

__device__ inline lse_acc lse_init()
{
    return {-INFINITY, 0.0f, 0.0f};
}

__device__ inline void lse_push(lse_acc &acc, float x, float w)
{
    if (x > acc.m) { /* rescale what was summed to the new max */
        const float c = expf(acc.m - x);
        acc.z = acc.z * c + 1.0f;
        acc.a = acc.a * c + w;
        acc.m = x;
    } else {
        const float e = expf(x - acc.m);
        acc.z += e;
        acc.a += e * w;
    }
}

/* Four values at once: one rescale to their max, then four independent
 * exponentials. */
__device__ inline void lse_push4(lse_acc &acc, float4 x, float4 w)
{
    const float m4 = fmaxf(fmaxf(x.x, x.y), fmaxf(x.z, x.w));
    if (m4 > acc.m) { /* rescale what was summed to the new max */
        const float c = expf(acc.m - m4);
        acc.z *= c;
        acc.a *= c;
        acc.m = m4;
    }
    const float e0 = expf(x.x - acc.m), e1 = expf(x.y - acc.m);
    const float e2 = expf(x.z - acc.m), e3 = expf(x.w - acc.m);
    acc.z += (e0 + e1) + (e2 + e3);
    acc.a += (e0 * w.x + e1 * w.y) + (e2 * w.z + e3 * w.w);
}

/* Whether the rows of s (and t, if given) take float4s. */
__device__ inline bool kd_vec4(const float *s, const float *t, int V)
{
    return (V & 3) == 0 && ((uintptr_t)s & 15) == 0 && (!t || ((uintptr_t)t & 15) == 0);
}

__device__ inline bool finite4(float4 x)
{
    return isfinite(x.x) && isfinite(x.y) && isfinite(x.z) && isfinite(x.w);
}

__device__ inline float4 scale4(float4 x, float k)
{
    return make_float4(x.x * k, x.y * k, x.z * k, x.w * k);
}

/* The block's totals: every thread gets m, z and a over all threads'
 * values (z and a at the common max). */
__device__ inline lse_acc lse_block(lse_acc acc)
{
    const float m = qkd__block_maxf(acc.m);
    const float c = acc.m == -INFINITY ? 0.0f : expf(acc.m - m);
    return {m, qkd__block_sumf(acc.z * c), qkd__block_sumf(acc.a * c)};
}

/* Every thread of the block gets whether any thread saw a bad value. */
__device__ inline bool block_any(bool bad)
{
    return __syncthreads_or(bad) != 0;
}

/* log(beta e^lp + (1-beta) e^lq) without underflow; exact at beta 0 and 1. */
__device__ static float log_mix(float lp, float lq, float beta)
{
    const float a = beta > 0.0f ? logf(beta) + lp : -INFINITY;
    const float b = beta < 1.0f ? log1pf(-beta) + lq : -INFINITY;
    const float hi = fmaxf(a, b), lo = fminf(a, b);
    return hi + log1pf(expf(lo - hi));
}

/* What the gradient sweep needs of a row; fkl and top1 (1 / the sum of
 * the teacher's weights at their max: its top-1 probability at tau 1) for
 * CAKLD whose beta is the teacher's confidence (kd_loss_confidence). */
struct kd_row {
    float lse_s, lse_t, rkl, kqm, fkl, top1;
};

/* CAKLD's term before tau^2: one definition, so that kd_loss_confidence's
 * rows, whose beta comes after their sweep, get kd_loss's bits. */
__device__ inline float cakld_of(float beta, float rkl, float fkl)
{
    return beta * rkl + (1.0f - beta) * fkl;
}

/* log sum exp(x * it) of a row, NAN if it holds a non-finite value. */
__device__ static float row_lse_f(const float *x, int V, float it)
{
    lse_acc acc = lse_init();
    bool bad = false;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        bad |= !isfinite(x[v]);
        lse_push(acc, x[v] * it, 0.0f);
    }
    acc = lse_block(acc);
    return block_any(bad) ? NAN : acc.m + logf(acc.z);
}

/* JSD's value before tau^2, one more sweep; fills r->kqm. */
__device__ static float jsd_value(const kd_args &j, const float *s, const float *t, kd_row *r)
{
    const float it = 1.0f / j.tau;
    float kpm = 0.0f, kqm = 0.0f;
    for (int v = threadIdx.x; v < j.V; v += blockDim.x) {
        const float lq = s[v] * it - r->lse_s, lp = t[v] * it - r->lse_t;
        const float lm = log_mix(lp, lq, j.beta);
        kpm += expf(lp) * (lp - lm);
        kqm += expf(lq) * (lq - lm);
    }
    kpm = qkd__block_sumf(kpm);
    r->kqm = kqm = qkd__block_sumf(kqm);
    return j.beta * kpm + (1.0f - j.beta) * kqm;
}

/* A softmax kind's term before tau^2 in one sweep over s and t (JSD:
 * the log-normalisers only, then jsd_value); fills r. */
__device__ static float softmax_value(const kd_args &j, const float *s, const float *t,
                                      kd_row *r)
{
    const float it = 1.0f / j.tau;
    lse_acc q = lse_init(), p = lse_init();
    bool bad = false;
    const bool tsld = j.kind == QKD_LOSS_TSLD;
    if (kd_vec4(s, t, j.V)) {
        for (int v = threadIdx.x; v < j.V / 4; v += blockDim.x) {
            const float4 s4 = reinterpret_cast<const float4 *>(s)[v];
            const float4 t4 = reinterpret_cast<const float4 *>(t)[v];
            bad |= !finite4(s4) || !finite4(t4);
            const float4 xs = scale4(s4, it), xt = scale4(t4, it);
            const float4 d = make_float4(xs.x - xt.x, xs.y - xt.y, xs.z - xt.z, xs.w - xt.w);
            lse_push4(q, xs, d);                                   /* E_q[x_s - x_t] */
            lse_push4(p, xt, tsld ? scale4(xs, -1.0f) : scale4(d, -1.0f)); /* E_p[...] */
        }
    } else {
        for (int v = threadIdx.x; v < j.V; v += blockDim.x) {
            const float xs = s[v] * it, xt = t[v] * it;
            bad |= !isfinite(s[v]) || !isfinite(t[v]);
            lse_push(q, xs, xs - xt);              /* E_q[x_s - x_t] */
            lse_push(p, xt, tsld ? -xs : xt - xs); /* E_p[...] */
        }
    }
    q = lse_block(q);
    p = lse_block(p);
    if (block_any(bad))
        return NAN;
    r->lse_s = q.m + logf(q.z);
    r->lse_t = p.m + logf(p.z);
    const float dl = r->lse_s - r->lse_t;
    r->rkl = q.a / q.z - dl;
    const float fkl = r->fkl = p.a / p.z + dl;
    r->top1 = 1.0f / p.z;
    switch (j.kind) {
    case QKD_LOSS_FKL: return fkl;
    case QKD_LOSS_RKL: return r->rkl;
    case QKD_LOSS_JSD: return jsd_value(j, s, t, r);
    case QKD_LOSS_CAKLD: return cakld_of(j.beta, r->rkl, fkl);
    default: return p.a / p.z + r->lse_s; /* TSLD: -E_p[log q] */
    }
}

/* d term / d (s/tau) at one logit for the softmax kinds. */
__device__ static float softmax_grad(const kd_args &j, const kd_row &r, float s, float t)
{
    const float it = 1.0f / j.tau;
    const float lq = s * it - r.lse_s, lp = t * it - r.lse_t;
    const float q = expf(lq), p = expf(lp);
    switch (j.kind) {
    case QKD_LOSS_RKL: return q * (lq - lp - r.rkl);
    case QKD_LOSS_JSD: return (1.0f - j.beta) * q * (lq - log_mix(lp, lq, j.beta) - r.kqm);
    case QKD_LOSS_CAKLD: return j.beta * q * (lq - lp - r.rkl) + (1.0f - j.beta) * (q - p);
    default: return q - p; /* FKL, TSLD */
    }
}

/* The row's term (tau^2 included); NAN if a logit it reads is not finite. */
__device__ static float kd_value(const kd_args &j, const float *s, const float *t, int y,
                                 kd_row *r)
{
    if (j.kind == QKD_LOSS_CE) {
        r->lse_s = row_lse_f(s, j.V, 1.0f);
        return r->lse_s - s[y];
    }
    if (j.kind == QKD_LOSS_MSE) {
        float sum = 0.0f;
        for (int v = threadIdx.x; v < j.V; v += blockDim.x) {
            const float d = s[v] - t[v];
            sum += d * d;
        }
        return qkd__block_sumf(sum) / j.V;
    }
    return j.tau * j.tau * softmax_value(j, s, t, r);
}

/* Row i's gradient element v: x added to or written over ds, or its bits. */
__device__ inline void put_grad(const kd_args &j, size_t at, float x)
{
    if (j.ds_bits)
        qkd__store(j.ds_bits, at, x);
    else
        j.ds[at] = j.accumulate ? j.ds[at] + x : x;
}

/* Four gradient elements of row i, from element 4 * v4: float4 stores. */
__device__ inline void put_grad4(const kd_args &j, size_t i, int v4, float4 x)
{
    if (j.ds_bits) {
        qkd__store4(j.ds_bits + i * j.V, (size_t)v4, x);
        return;
    }
    float4 *d = reinterpret_cast<float4 *>(j.ds + i * j.V) + v4;
    if (j.accumulate) {
        const float4 o = *d;
        x = make_float4(o.x + x.x, o.y + x.y, o.z + x.z, o.w + x.w);
    }
    *d = x;
}

/* d term / ds at logit v (s, t its logits; y the row's target). */
__device__ inline float kd_grad(const kd_args &j, const kd_row &r, float s, float t, int v,
                                int y)
{
    if (j.kind == QKD_LOSS_CE)
        return expf(s - r.lse_s) - (v == y);
    if (j.kind == QKD_LOSS_MSE)
        return 2.0f * (s - t) / j.V;
    return j.tau * softmax_grad(j, r, s, t); /* d/ds = (1/tau) d/d(s/tau), times tau^2 */
}

/* Row i's gradient, coef times kd_grad at every logit. */
__device__ static void kd_grad_row(const kd_args &j, const kd_row &r, size_t i, const float *s,
                                   const float *t, int y, float coef)
{
    const bool out4 = j.ds_bits ? ((uintptr_t)j.ds_bits & 7) == 0 : ((uintptr_t)j.ds & 15) == 0;
    if (out4 && kd_vec4(s, t, j.V)) { /* V % 4 == 0: every row is aligned as the first */
        for (int v4 = threadIdx.x; v4 < j.V / 4; v4 += blockDim.x) {
            const float4 s4 = reinterpret_cast<const float4 *>(s)[v4];
            const float4 t4 = t ? reinterpret_cast<const float4 *>(t)[v4] : make_float4(0, 0, 0, 0);
            const int v = 4 * v4;
            put_grad4(j, i, v4,
                      make_float4(coef * kd_grad(j, r, s4.x, t4.x, v, y),
                                  coef * kd_grad(j, r, s4.y, t4.y, v + 1, y),
                                  coef * kd_grad(j, r, s4.z, t4.z, v + 2, y),
                                  coef * kd_grad(j, r, s4.w, t4.w, v + 3, y)));
        }
        return;
    }
    for (int v = threadIdx.x; v < j.V; v += blockDim.x)
        put_grad(j, i * j.V + v, coef * kd_grad(j, r, s[v], t ? t[v] : 0.0f, v, y));
}

/* Every element of row i's gradient set to x (added, where ds accumulates). */
__device__ static void fill_grad_row(const kd_args &j, size_t i, float x)
{
    for (int v = threadIdx.x; v < j.V; v += blockDim.x)
        put_grad(j, i * j.V + v, x);
}

/* Row i's target (0 without targets); -1 for a row the targets leave
 * out, which gets loss 0 and a zero gradient row (written, not added). */
__device__ static int kd_target(const kd_args &j, size_t i)
{
    const int y = j.targets ? j.targets[i] : 0;
    if (y < 0) { /* the whole block agrees */
        if (threadIdx.x == 0)
            j.row_loss[i] = 0.0f;
        if ((j.ds || j.ds_bits) && !j.accumulate)
            fill_grad_row(j, i, 0.0f);
    }
    return y;
}

/* Row i's loss and gradient from its term's value and r. */
__device__ static void kd_finish(const kd_args &j, size_t i, const float *s, const float *t,
                                 int y, const kd_row &r, float value)
{
    const float w = j.row_w ? j.row_w[i] : 1.0f;
    if (threadIdx.x == 0)
        j.row_loss[i] = w * value;
    if (!j.ds && !j.ds_bits)
        return;
    if (!isfinite(value)) {
        fill_grad_row(j, i, NAN);
        return;
    }
    kd_grad_row(j, r, i, s, t, y, j.scale * w);
}

__global__ void kd_loss_kernel(kd_args j)
{
    const size_t i = blockIdx.x;
    const float *s = j.s + i * j.V, *t = j.t ? j.t + i * j.V : NULL;
    const int y = kd_target(j, i);
    if (y < 0)
        return;
    if (j.beta_dev)
        j.beta = *j.beta_dev;
    kd_row r = {};
    kd_finish(j, i, s, t, y, r, kd_value(j, s, t, y, &r));
}

extern "C" void qkd__cuda_kd_loss(qkd__backend *b, float *row_loss, float *ds,
                                  uint16_t *ds_bits, const float *s, const float *t,
                                  const int32_t *targets, const float *row_w, int N, int V,
                                  const qkd__kd_term *term)
{
    if (N <= 0 || V <= 0)
        return;
    /* CE and MSE do not use the temperature. */
    int plain = term->kind == QKD_LOSS_CE || term->kind == QKD_LOSS_MSE;
    kd_args j = {row_loss, ds, ds_bits, s, t, row_w, targets, term->beta_dev, term->scale,
                 plain ? 1.0f : term->temperature, term->beta, V, term->kind,
                 term->accumulate};
    kd_loss_kernel<<<rows_grid(N), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(j);
    qkd__cuda_launched(b, "kd_loss");
}

/* kd_loss_confidence in two sweeps with beta's mean between them: the
 * first is kd_loss's value sweep, whose teacher weights also give each
 * row's top-1 probability, so the teacher's logits are not read a third
 * time for it (row_max_prob's sweep: 3.2 GB for SmolLM's batch). The
 * first sweep leaves each row's kd_row in rows and its top-1 probability
 * in top1 (0 for a row left out, NAN for a non-finite one, as
 * row_max_prob). */
__global__ void cakld_sweep_kernel(kd_args j, kd_row *rows, float *top1)
{
    const size_t i = blockIdx.x;
    if (j.targets && j.targets[i] < 0) {
        if (threadIdx.x == 0)
            top1[i] = 0.0f;
        return;
    }
    kd_row r = {};
    const bool finite = isfinite(softmax_value(j, j.s + i * j.V, j.t + i * j.V, &r));
    if (threadIdx.x == 0) {
        r.rkl = finite ? r.rkl : NAN; /* the second sweep's value: NAN too */
        rows[i] = r;
        top1[i] = finite ? r.top1 : NAN;
    }
}

/* The second: each row's value at beta (*j.beta_dev), its loss and its
 * gradient, as kd_loss_kernel ends. */
__global__ void cakld_finish_kernel(kd_args j, const kd_row *rows)
{
    const size_t i = blockIdx.x;
    const int y = kd_target(j, i);
    if (y < 0)
        return;
    j.beta = *j.beta_dev;
    const kd_row r = rows[i];
    kd_finish(j, i, j.s + i * j.V, j.t + i * j.V, y, r,
              j.tau * j.tau * cakld_of(j.beta, r.rkl, r.fkl));
}

extern "C" void qkd__cuda_kd_loss_confidence(qkd__backend *b, float *row_loss, float *ds,
                                             uint16_t *ds_bits, const float *s, const float *t,
                                             const int32_t *targets, const float *row_w, int N,
                                             int V, const qkd__kd_term *term, float *beta,
                                             int n_rows)
{
    if (N <= 0 || V <= 0)
        return;
    kd_row *rows = (kd_row *)qkd__cuda_workspace(b, (size_t)N * sizeof(kd_row) / sizeof(float));
    if (!rows)
        return; /* recorded */
    cudaStream_t st = qkd__cuda_of(b)->stream;
    kd_args j = {row_loss, ds, ds_bits, s, t, row_w, targets, beta, term->scale, 1.0f, 0.0f, V,
                 QKD_LOSS_CAKLD, term->accumulate};
    cakld_sweep_kernel<<<rows_grid(N), QKD__CUDA_THREADS, 0, st>>>(j, rows, row_loss);
    qkd__cuda_sum(b, beta, row_loss, (size_t)N); /* the mean, as the loss takes it */
    qkd__cuda_scale(b, beta, n_rows > 0 ? 1.0f / (float)n_rows : 0.0f, 1);
    cakld_finish_kernel<<<rows_grid(N), QKD__CUDA_THREADS, 0, st>>>(j, rows);
    qkd__cuda_launched(b, "kd_loss_confidence");
}

/* ---- TSLD token weights and the top-1 probability ------------------------------------------ */

/* w = softmax of c / tau over the positions with targets >= 0, 0 elsewhere;
 * one block per sequence. */
__global__ void tsld_weights_kernel(float *w, const float *c, const int32_t *targets, int T,
                                    double inv_tau)
{
    size_t off = (size_t)blockIdx.x * T;
    const int32_t *y = targets + off;
    double mx = -INFINITY, sum = 0.0;
    for (int i = threadIdx.x; i < T; i += blockDim.x)
        if (y[i] >= 0)
            mx = fmax(mx, c[off + i] * inv_tau);
    mx = qkd__block_max(mx);
    for (int i = threadIdx.x; i < T; i += blockDim.x)
        if (y[i] >= 0)
            sum += exp(c[off + i] * inv_tau - mx);
    sum = qkd__block_sum(sum);
    for (int i = threadIdx.x; i < T; i += blockDim.x)
        w[off + i] = y[i] >= 0 ? (float)(exp(c[off + i] * inv_tau - mx) / sum) : 0.0f;
}

/* max softmax = exp(max - lse) = 1 / sum of exp(x - max), in float with an
 * online log-sum-exp (one sweep); NAN for a row holding a non-finite
 * value. */
__global__ void row_max_prob_kernel(float *out, const float *x, const int32_t *targets, int V)
{
    if (targets && targets[blockIdx.x] < 0) { /* the whole block agrees */
        if (threadIdx.x == 0)
            out[blockIdx.x] = 0.0f;
        return;
    }
    const float *row = x + (size_t)blockIdx.x * V;
    lse_acc acc = lse_init();
    bool bad = false;
    if (kd_vec4(row, NULL, V)) {
        for (int v = threadIdx.x; v < V / 4; v += blockDim.x) {
            const float4 x4 = reinterpret_cast<const float4 *>(row)[v];
            bad |= !finite4(x4);
            lse_push4(acc, x4, make_float4(0.0f, 0.0f, 0.0f, 0.0f));
        }
    } else {
        for (int v = threadIdx.x; v < V; v += blockDim.x) {
            bad |= !isfinite(row[v]);
            lse_push(acc, row[v], 0.0f);
        }
    }
    acc = lse_block(acc);
    if (block_any(bad))
        acc.z = NAN;
    if (threadIdx.x == 0)
        out[blockIdx.x] = 1.0f / acc.z;
}

extern "C" void qkd__cuda_tsld_weights(qkd__backend *b, float *w, const float *c,
                                       const int32_t *targets, int B, int T, float tau)
{
    if (B <= 0 || T <= 0)
        return;
    tsld_weights_kernel<<<rows_grid(B), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(
        w, c, targets, T, 1.0 / tau);
    qkd__cuda_launched(b, "tsld_weights");
}

extern "C" void qkd__cuda_row_max_prob(qkd__backend *b, float *out, const float *x,
                                       const int32_t *targets, int N, int V)
{
    if (N <= 0 || V <= 0)
        return;
    row_max_prob_kernel<<<rows_grid(N), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(
        out, x, targets, V);
    qkd__cuda_launched(b, "row_max_prob");
}
