/* CUDA kernels of the elementwise family: fill, add, axpy, scale, the
 * bf16 conversion, the two-pass sums, SwiGLU, the optimizer updates and the embedding. Each
 * but SwiGLU (float, see there) computes in the reference's precision
 * (double where it uses double), so most results are bit-identical to it. */
#include "backend/cuda/common.cuh"

/* ---- fill, add, axpy, scale ------------------------------------------------ */

__global__ void fill_kernel(float *x, float value, size_t n)
{
    QKD__CUDA_FOR(i, n)
    x[i] = value;
}

__global__ void add_kernel(float *out, const float *x, const float *y, size_t n)
{
    QKD__CUDA_FOR(i, n)
    out[i] = x[i] + y[i];
}

/* In double and rounded once to float, as the reference does. */
__global__ void axpy_kernel(float *y, float alpha, const float *x, size_t n)
{
    QKD__CUDA_FOR(i, n)
    y[i] = (float)(y[i] + (double)alpha * x[i]);
}

__global__ void scale_kernel(float *x, float alpha, size_t n)
{
    QKD__CUDA_FOR(i, n)
    x[i] *= alpha;
}

extern "C" void qkd__cuda_fill(qkd__backend *b, float *x, float value, size_t n)
{
    if (!n)
        return;
    fill_kernel<<<qkd__cuda_blocks(n), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(x, value,
                                                                                       n);
    qkd__cuda_launched(b, "fill");
}

extern "C" void qkd__cuda_add(qkd__backend *b, float *out, const float *x, const float *y,
                              size_t n)
{
    if (!n)
        return;
    add_kernel<<<qkd__cuda_blocks(n), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(out, x, y,
                                                                                      n);
    qkd__cuda_launched(b, "add");
}

extern "C" void qkd__cuda_axpy(qkd__backend *b, float *y, float alpha, const float *x, size_t n)
{
    if (!n)
        return;
    axpy_kernel<<<qkd__cuda_blocks(n), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(y, alpha,
                                                                                       x, n);
    qkd__cuda_launched(b, "axpy");
}

extern "C" void qkd__cuda_scale(qkd__backend *b, float *x, float alpha, size_t n)
{
    if (!n)
        return;
    scale_kernel<<<qkd__cuda_blocks(n), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(x, alpha,
                                                                                        n);
    qkd__cuda_launched(b, "scale");
}

/* ---- bf16 copies for the tensor-core matmuls ------------------------------------
 * Round to nearest even on the bits, as qkd__f32_to_bf16 does (subnormals
 * kept, a NaN stays a quiet NaN), so the GEMM reads exactly the operands
 * the reference's bf16 products round to. */

__device__ inline uint32_t bf16_bits(float f)
{
    uint32_t x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (x >> 16) | 0x40;
    return (x + 0x7fffu + ((x >> 16) & 1)) >> 16;
}

__global__ void to_bf16_kernel(uint16_t *dst, const float *src, size_t n)
{
    QKD__CUDA_FOR(i, n)
    dst[i] = (uint16_t)bf16_bits(src[i]);
}

/* Four values per thread: 16-byte loads, 8-byte stores (memory bound). */
__global__ void to_bf16x4_kernel(uint2 *dst, const float4 *src, size_t n4)
{
    QKD__CUDA_FOR(i, n4)
    {
        float4 v = src[i];
        dst[i] = make_uint2(bf16_bits(v.x) | bf16_bits(v.y) << 16,
                            bf16_bits(v.z) | bf16_bits(v.w) << 16);
    }
}

extern "C" void qkd__cuda_to_bf16(qkd__backend *b, uint16_t *dst, const float *src, size_t n)
{
    cudaStream_t stream = qkd__cuda_of(b)->stream;
    size_t n4 = ((uintptr_t)src % 16 == 0 && (uintptr_t)dst % 8 == 0) ? n / 4 : 0;
    if (n4) {
        to_bf16x4_kernel<<<qkd__cuda_blocks(n4), QKD__CUDA_THREADS, 0, stream>>>(
            (uint2 *)dst, (const float4 *)src, n4);
        qkd__cuda_launched(b, "to_bf16");
    }
    if (n > 4 * n4) {
        to_bf16_kernel<<<qkd__cuda_blocks(n - 4 * n4), QKD__CUDA_THREADS, 0, stream>>>(
            dst + 4 * n4, src + 4 * n4, n - 4 * n4);
        qkd__cuda_launched(b, "to_bf16");
    }
}

/* ---- sums ---------------------------------------------------------------------
 * Pass one: a fixed grid of QKD__CUDA_SUM_BLOCKS blocks, each summing its
 * grid-stride share in double into partials[block]; pass two: one block
 * sums the partials. The order is fixed by n alone: deterministic. */

__global__ void partial_sums_kernel(double *partials, const float *x, size_t n, int squares)
{
    double s = 0.0;
    QKD__CUDA_FOR(i, n)
    s += squares ? (double)x[i] * x[i] : (double)x[i];
    s = qkd__block_sum(s);
    if (threadIdx.x == 0)
        partials[blockIdx.x] = s;
}

__global__ void final_sum_kernel(float *out, const double *partials, int n)
{
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        s += partials[i];
    s = qkd__block_sum(s);
    if (threadIdx.x == 0)
        *out = (float)s;
}

static void sum(qkd__backend *b, float *out, const float *x, size_t n, int squares)
{
    qkd__cuda *c = qkd__cuda_of(b);
    if (n)
        partial_sums_kernel<<<QKD__CUDA_SUM_BLOCKS, QKD__CUDA_THREADS, 0, c->stream>>>(
            c->partials, x, n, squares);
    else
        qkd__cuda_check(b, cudaMemsetAsync(c->partials, 0, QKD__CUDA_SUM_BLOCKS * sizeof(double),
                                           c->stream),
                        "sum");
    final_sum_kernel<<<1, 1024, 0, c->stream>>>(out, c->partials, QKD__CUDA_SUM_BLOCKS);
    qkd__cuda_launched(b, squares ? "sum_squares" : "sum");
}

extern "C" void qkd__cuda_sum(qkd__backend *b, float *out, const float *x, size_t n)
{
    sum(b, out, x, n, 0);
}

extern "C" void qkd__cuda_sum_squares(qkd__backend *b, float *out, const float *x, size_t n)
{
    sum(b, out, x, n, 1);
}

/* ---- SwiGLU ------------------------------------------------------------------------
 * In float: these stream three to five activation tensors of a layer's
 * hidden width, and double's exp and division made them several times
 * slower than their memory traffic; float is within a few ulps of the
 * reference's double. */

__device__ static float sigmoidf(float x)
{
    return 1.0f / (1.0f + expf(-x));
}

__global__ void swiglu_forward_kernel(float *out, const float *gate, const float *up, size_t n)
{
    QKD__CUDA_FOR(i, n)
    {
        const float x = gate[i];
        out[i] = x * sigmoidf(x) * up[i];
    }
}

/* silu'(x) = s (1 + x (1 - s)) with s = sigmoid(x). */
__global__ void swiglu_backward_kernel(float *dgate, float *dup, const float *dout,
                                       const float *gate, const float *up, size_t n)
{
    QKD__CUDA_FOR(i, n)
    {
        const float x = gate[i], s = sigmoidf(x), g = dout[i];
        dgate[i] += g * up[i] * s * (1.0f + x * (1.0f - s));
        dup[i] += g * x * s;
    }
}

extern "C" void qkd__cuda_swiglu_forward(qkd__backend *b, float *out, const float *gate,
                                         const float *up, size_t n)
{
    if (!n)
        return;
    swiglu_forward_kernel<<<qkd__cuda_blocks(n), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(
        out, gate, up, n);
    qkd__cuda_launched(b, "swiglu_forward");
}

extern "C" void qkd__cuda_swiglu_backward(qkd__backend *b, float *dgate, float *dup,
                                          const float *dout, const float *gate, const float *up,
                                          size_t n)
{
    if (!n)
        return;
    swiglu_backward_kernel<<<qkd__cuda_blocks(n), QKD__CUDA_THREADS, 0,
                             qkd__cuda_of(b)->stream>>>(dgate, dup, dout, gate, up, n);
    qkd__cuda_launched(b, "swiglu_backward");
}

/* ---- optimizer updates (backend.h gives the formulas) ------------------------------ */

/* bc1 and bc2 come from the host, computed as the reference computes them. */
__global__ void adamw_kernel(float *p, const float *g, float *m, float *v, size_t n, float lr,
                             float b1, float b2, float eps, float wd, double bc1, double bc2)
{
    QKD__CUDA_FOR(i, n)
    {
        double mi = (double)b1 * m[i] + (1.0 - b1) * g[i];
        double vi = (double)b2 * v[i] + (1.0 - b2) * (double)g[i] * g[i];
        double step = mi / bc1 / (sqrt(vi / bc2) + eps) + (double)wd * p[i];
        m[i] = (float)mi;
        v[i] = (float)vi;
        p[i] = (float)(p[i] - (double)lr * step);
    }
}

__global__ void sgd_kernel(float *p, const float *g, float *u, size_t n, float lr,
                           float momentum, float wd)
{
    QKD__CUDA_FOR(i, n)
    {
        double ui = (double)momentum * u[i] + g[i];
        u[i] = (float)ui;
        p[i] = (float)(p[i] - (double)lr * (ui + (double)wd * p[i]));
    }
}

extern "C" void qkd__cuda_adamw_update(qkd__backend *b, float *p, const float *g, float *m,
                                       float *v, size_t n, float lr, float b1, float b2,
                                       float eps, float wd, int t)
{
    if (!n)
        return;
    double bc1 = 1.0 - pow(b1, t), bc2 = 1.0 - pow(b2, t);
    adamw_kernel<<<qkd__cuda_blocks(n), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(
        p, g, m, v, n, lr, b1, b2, eps, wd, bc1, bc2);
    qkd__cuda_launched(b, "adamw_update");
}

extern "C" void qkd__cuda_sgd_update(qkd__backend *b, float *p, const float *g, float *u,
                                     size_t n, float lr, float momentum, float wd)
{
    if (!n)
        return;
    sgd_kernel<<<qkd__cuda_blocks(n), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(
        p, g, u, n, lr, momentum, wd);
    qkd__cuda_launched(b, "sgd_update");
}

/* ---- embedding -------------------------------------------------------------------- */

__global__ void embedding_forward_kernel(float *out, const int32_t *ids, const float *table,
                                         int N, int C)
{
    QKD__CUDA_FOR(i, (size_t)N * C)
    out[i] = table[(size_t)ids[i / C] * C + i % C];
}

/* One thread per column adds the rows in ascending order, as the
 * reference does: rows that repeat an id never race, and the float sums
 * round alike. */
__global__ void embedding_backward_kernel(float *dtable, const float *dout, const int32_t *ids,
                                          int N, int C)
{
    QKD__CUDA_FOR(c, (size_t)C)
    for (int i = 0; i < N; i++)
        dtable[(size_t)ids[i] * C + c] += dout[(size_t)i * C + c];
}

extern "C" void qkd__cuda_embedding_forward(qkd__backend *b, float *out, const int32_t *ids,
                                            const float *table, int N, int C)
{
    if (N <= 0 || C <= 0)
        return;
    embedding_forward_kernel<<<qkd__cuda_blocks((size_t)N * C), QKD__CUDA_THREADS, 0,
                               qkd__cuda_of(b)->stream>>>(out, ids, table, N, C);
    qkd__cuda_launched(b, "embedding_forward");
}

extern "C" void qkd__cuda_embedding_backward(qkd__backend *b, float *dtable, const float *dout,
                                             const int32_t *ids, int N, int C, int V)
{
    (void)V; /* ids are checked by the caller */
    if (N <= 0 || C <= 0)
        return;
    /* blocks of 32 columns spread a narrow table over more multiprocessors */
    embedding_backward_kernel<<<(unsigned)((C + 31) / 32), 32, 0, qkd__cuda_of(b)->stream>>>(
        dtable, dout, ids, N, C);
    qkd__cuda_launched(b, "embedding_backward");
}
