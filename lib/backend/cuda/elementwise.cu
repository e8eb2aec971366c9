/* CUDA kernels of the elementwise family: fill, add, axpy, scale, the
 * bf16 conversion, the two-pass sums, SwiGLU, the optimizer updates (one
 * tensor or many per launch, the latter with the fake quantization of the
 * weights it writes) and the embedding. Each
 * but SwiGLU (float, see there) computes in the reference's precision
 * (double where it uses double), so most results are bit-identical to it. */
#include <string.h>

#include <cub/device/device_radix_sort.cuh>

#include "backend/cuda/quant.cuh"

/* ---- elementwise maps on float4 ----------------------------------------------
 * The add and SwiGLU stream whole activation tensors: where every pointer
 * is 16-byte aligned they run on float4 (16-byte loads and one element
 * group per thread, near the memory's rate), the scalar kernel taking the
 * last n % 4 elements and unaligned calls. An Op gives both forms of one
 * element's work: one(i) on element i, four(i) on elements 4i..4i+3, each
 * with the same float operations. */

template <typename Op> __global__ void map_kernel(Op op, size_t begin, size_t n)
{
    QKD__CUDA_FOR(i, n)
    op.one(begin + i);
}

template <typename Op> __global__ void map4_kernel(Op op, size_t n4)
{
    QKD__CUDA_FOR(i, n4)
    op.four(i);
}

/* op over n elements; `aligned`: every pointer op reads or writes is. */
template <typename Op>
static void map(qkd__backend *b, const Op &op, size_t n, bool aligned, const char *what)
{
    cudaStream_t st = qkd__cuda_of(b)->stream;
    const size_t n4 = aligned ? n / 4 : 0;
    if (n4)
        map4_kernel<<<qkd__cuda_blocks(n4), QKD__CUDA_THREADS, 0, st>>>(op, n4);
    if (n > 4 * n4)
        map_kernel<<<qkd__cuda_blocks(n - 4 * n4), QKD__CUDA_THREADS, 0, st>>>(op, 4 * n4,
                                                                              n - 4 * n4);
    qkd__cuda_launched(b, what);
}

static __device__ inline float4 ld4(const float *p, size_t i)
{
    return ((const float4 *)p)[i];
}

static __device__ inline void st4(float *p, size_t i, float4 v)
{
    ((float4 *)p)[i] = v;
}

struct add_op {
    float *out;
    const float *x, *y;
    __device__ void one(size_t i) const { out[i] = x[i] + y[i]; }
    __device__ void four(size_t i) const
    {
        const float4 a = ld4(x, i), c = ld4(y, i);
        st4(out, i, make_float4(a.x + c.x, a.y + c.y, a.z + c.z, a.w + c.w));
    }
};

/* ---- fill, add, axpy, scale ------------------------------------------------ */

__global__ void fill_kernel(float *x, float value, size_t n)
{
    QKD__CUDA_FOR(i, n)
    x[i] = value;
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

/* Zeroing (the caller clears every gradient buffer before a pass adds
 * into it) is a memset: the copy engine's fill is faster than a kernel. */
extern "C" void qkd__cuda_fill(qkd__backend *b, float *x, float value, size_t n)
{
    if (!n)
        return;
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if (bits == 0) { /* +0.0f, not -0.0f */
        qkd__cuda_of(b)->writes++;
        qkd__cuda_check(b, cudaMemsetAsync(x, 0, n * sizeof *x, qkd__cuda_of(b)->stream),
                        "fill");
        return;
    }
    fill_kernel<<<qkd__cuda_blocks(n), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(x, value,
                                                                                       n);
    qkd__cuda_launched(b, "fill");
}

extern "C" void qkd__cuda_add(qkd__backend *b, float *out, const float *x, const float *y,
                              size_t n)
{
    if (!n)
        return;
    map(b, add_op{out, x, y}, n,
        qkd__aligned16(out) && qkd__aligned16(x) && qkd__aligned16(y), "add");
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

/* ---- bf16 copies for the tensor-core matmuls (qkd__bf16_bits) ------------------ */

__global__ void to_bf16_kernel(uint16_t *dst, const float *src, size_t n)
{
    QKD__CUDA_FOR(i, n)
    dst[i] = (uint16_t)qkd__bf16_bits(src[i]);
}

/* Four values per thread: 16-byte loads, 8-byte stores (memory bound). */
__global__ void to_bf16x4_kernel(uint2 *dst, const float4 *src, size_t n4)
{
    QKD__CUDA_FOR(i, n4)
    {
        dst[i] = qkd__bf16_bits4(src[i]);
    }
}

extern "C" void qkd__cuda_to_bf16(qkd__backend *b, uint16_t *dst, const float *src, size_t n)
{
    cudaStream_t stream = qkd__cuda_of(b)->stream;
    size_t n4 = qkd__aligned16(src) && qkd__aligned4(dst) ? n / 4 : 0;
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

/* x rounded to bf16 in place: what a bf16 buffer would hold, as floats. */
struct round_bf16_op {
    float *x;
    __device__ static float rounded(float v) { return qkd__bf16_value(qkd__bf16_bits(v)); }
    __device__ void one(size_t i) const { x[i] = rounded(x[i]); }
    __device__ void four(size_t i) const
    {
        const float4 v = ld4(x, i);
        st4(x, i, make_float4(rounded(v.x), rounded(v.y), rounded(v.z), rounded(v.w)));
    }
};

extern "C" void qkd__cuda_round_to_bf16(qkd__backend *b, float *x, size_t n)
{
    if (n)
        map(b, round_bf16_op{x}, n, qkd__aligned16(x), "round_to_bf16");
}

/* ---- sums ---------------------------------------------------------------------
 * Pass one: a fixed grid of QKD__CUDA_SUM_BLOCKS blocks, each summing its
 * grid-stride share in double into partials[block]; pass two: one block
 * sums the partials. The order is fixed by n alone: deterministic. */

__device__ inline double sum_term(float v, int squares)
{
    return squares ? (double)v * v : (double)v;
}

/* The elements before x's first 16-byte boundary and the tail after the
 * last whole float4 go one per thread; the rest as float4 (16-byte loads
 * keep enough bytes in flight to stream at the memory's rate). */
__global__ void partial_sums_kernel(double *partials, const float *x, size_t n, size_t head,
                                    int squares)
{
    double s = 0.0;
    const size_t n4 = (n - head) / 4, tail = head + 4 * n4;
    const float4 *x4 = (const float4 *)(x + head);
    QKD__CUDA_FOR(i, n4)
    {
        const float4 v = x4[i];
        s += sum_term(v.x, squares) + sum_term(v.y, squares) + sum_term(v.z, squares) +
             sum_term(v.w, squares);
    }
    QKD__CUDA_FOR(i, head + (n - tail))
    s += sum_term(x[i < head ? i : tail + (i - head)], squares);
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
    if (n) {
        size_t head = (16 - (uintptr_t)x % 16) % 16 / sizeof *x;
        partial_sums_kernel<<<QKD__CUDA_SUM_BLOCKS, QKD__CUDA_THREADS, 0, c->stream>>>(
            c->partials, x, n, head < n ? head : n, squares);
    } else {
        qkd__cuda_check(b, cudaMemsetAsync(c->partials, 0, QKD__CUDA_SUM_BLOCKS * sizeof(double),
                                           c->stream),
                        "sum");
    }
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

__device__ inline float silu_times(float x, float u)
{
    return x * sigmoidf(x) * u;
}

/* dg += g u silu'(x), du += g silu(x), silu'(x) = s (1 + x (1 - s)) with
 * s = sigmoid(x). */
__device__ inline void swiglu_grads(float g, float x, float u, float &dg, float &du)
{
    const float s = sigmoidf(x);
    dg += g * u * s * (1.0f + x * (1.0f - s));
    du += g * x * s;
}

/* swiglu_grads on four elements. */
__device__ inline void swiglu_grads4(float4 g, float4 x, float4 u, float4 &dg, float4 &du)
{
    swiglu_grads(g.x, x.x, u.x, dg.x, du.x);
    swiglu_grads(g.y, x.y, u.y, dg.y, du.y);
    swiglu_grads(g.z, x.z, u.z, dg.z, du.z);
    swiglu_grads(g.w, x.w, u.w, dg.w, du.w);
}

struct swiglu_forward_op {
    float *out;
    const float *gate, *up;
    __device__ void one(size_t i) const { out[i] = silu_times(gate[i], up[i]); }
    __device__ void four(size_t i) const
    {
        const float4 x = ld4(gate, i), u = ld4(up, i);
        st4(out, i,
            make_float4(silu_times(x.x, u.x), silu_times(x.y, u.y), silu_times(x.z, u.z),
                        silu_times(x.w, u.w)));
    }
};

/* The forward on bf16 bits, out in bf16 bits (its four() moves 8 bytes
 * an operand). */
struct swiglu_forward_bits_op {
    uint16_t *out;
    const uint16_t *gate, *up;
    __device__ void one(size_t i) const
    {
        qkd__store(out, i, silu_times(qkd__load(gate, i), qkd__load(up, i)));
    }
    __device__ void four(size_t i) const
    {
        const float4 x = qkd__load4(gate, i), u = qkd__load4(up, i);
        qkd__store4(out, i,
                    make_float4(silu_times(x.x, u.x), silu_times(x.y, u.y),
                                silu_times(x.z, u.z), silu_times(x.w, u.w)));
    }
};

struct swiglu_backward_op {
    float *dgate, *dup;
    const float *dout, *gate, *up;
    __device__ void one(size_t i) const { swiglu_grads(dout[i], gate[i], up[i], dgate[i], dup[i]); }
    __device__ void four(size_t i) const
    {
        const float4 g = ld4(dout, i), x = ld4(gate, i), u = ld4(up, i);
        float4 dg = ld4(dgate, i), du = ld4(dup, i);
        swiglu_grads4(g, x, u, dg, du);
        st4(dgate, i, dg);
        st4(dup, i, du);
    }
};

/* The backward on bf16 bits into zeroed gradients, written as bf16 bits:
 * element i of the [rows][cols] inputs at(i) of dgate and dup (rows ld
 * apart; four() needs cols and ld in whole fours), and the forward's
 * output again at i of out where that is not NULL (silu_times, as the
 * forward: the same bits). */
struct swiglu_backward_bits_op {
    uint16_t *dgate, *dup, *out;
    const uint16_t *dout, *gate, *up;
    size_t cols, ld;
    __device__ size_t at(size_t i) const { return i / cols * ld + i % cols; }
    __device__ void one(size_t i) const
    {
        const float x = qkd__load(gate, i), u = qkd__load(up, i);
        float dg = 0.0f, du = 0.0f;
        swiglu_grads(qkd__load(dout, i), x, u, dg, du);
        qkd__store(dgate, at(i), dg);
        qkd__store(dup, at(i), du);
        if (out)
            qkd__store(out, i, silu_times(x, u));
    }
    __device__ void four(size_t i) const
    {
        const float4 g = qkd__load4(dout, i), x = qkd__load4(gate, i), u = qkd__load4(up, i);
        float4 dg = make_float4(0.0f, 0.0f, 0.0f, 0.0f), du = dg;
        swiglu_grads4(g, x, u, dg, du);
        qkd__store4(dgate, at(4 * i) / 4, dg);
        qkd__store4(dup, at(4 * i) / 4, du);
        if (out)
            qkd__store4(out, i,
                        make_float4(silu_times(x.x, u.x), silu_times(x.y, u.y),
                                    silu_times(x.z, u.z), silu_times(x.w, u.w)));
    }
};

extern "C" void qkd__cuda_swiglu_forward(qkd__backend *b, float *out, const float *gate,
                                         const float *up, size_t n)
{
    if (!n)
        return;
    map(b, swiglu_forward_op{out, gate, up}, n,
        qkd__aligned16(out) && qkd__aligned16(gate) && qkd__aligned16(up), "swiglu_forward");
}

extern "C" void qkd__cuda_swiglu_forward_bf16_bits(qkd__backend *b, uint16_t *out,
                                                   const uint16_t *gate, const uint16_t *up,
                                                   size_t n)
{
    if (!n)
        return;
    map(b, swiglu_forward_bits_op{out, gate, up}, n,
        qkd__aligned4(out) && qkd__aligned4(gate) && qkd__aligned4(up),
        "swiglu_forward_bf16_bits");
}

extern "C" void qkd__cuda_swiglu_backward_bf16_bits(qkd__backend *b, uint16_t *dgate,
                                                    uint16_t *dup, size_t ld, uint16_t *out,
                                                    const uint16_t *dout, const uint16_t *gate,
                                                    const uint16_t *up, size_t rows, size_t cols)
{
    if (!rows || !cols)
        return;
    map(b, swiglu_backward_bits_op{dgate, dup, out, dout, gate, up, cols, ld}, rows * cols,
        qkd__aligned4(dgate) && qkd__aligned4(dup) && qkd__aligned4(out) &&
            qkd__aligned4(dout) && qkd__aligned4(gate) && qkd__aligned4(up) && cols % 4 == 0 &&
            ld % 4 == 0,
        "swiglu_backward_bf16_bits");
}

extern "C" void qkd__cuda_swiglu_backward(qkd__backend *b, float *dgate, float *dup,
                                          const float *dout, const float *gate, const float *up,
                                          size_t n)
{
    if (!n)
        return;
    map(b, swiglu_backward_op{dgate, dup, dout, gate, up}, n,
        qkd__aligned16(dgate) && qkd__aligned16(dup) && qkd__aligned16(dout) &&
            qkd__aligned16(gate) && qkd__aligned16(up),
        "swiglu_backward");
}

/* ---- optimizer updates (backend.h gives the formulas) ------------------------------ */

__global__ void adamw_kernel(float *p, const float *g, float *m, float *v, size_t n, float lr,
                             qkd__adamw_k a)
{
    QKD__CUDA_FOR(i, n)
    qkd__adamw_one(&p[i], g[i], &m[i], &v[i], lr, &a); /* the reference's bits */
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
    adamw_kernel<<<qkd__cuda_blocks(n), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(
        p, g, m, v, n, lr, qkd__adamw_k_at(b1, b2, eps, wd, t));
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

/* ---- multi-tensor updates --------------------------------------------------------
 * One grid over many tensors: each span gets ceil(n / MT_CHUNK) blocks,
 * block k working on the span s with first[s] <= k < first[s + 1] (a
 * binary search over the span table, uploaded once per call). The squared
 * norms sum each block's chunk in double, then each span's blocks in
 * order: deterministic. */

/* Elements of a block's chunk: 16 per thread, a float4 at a time (loading
 * all of a thread's elements before the first update, to overlap their
 * latencies, made the update, then in double, slower: 4.1 ms against 2.4
 * ms for SmolLM's 163M parameters). 16 a thread, against 8, made
 * TinyLlama's optimizer part about 0.8 ms shorter (13.1 against 13.9 ms):
 * a quarter of the blocks, each starting and draining fewer times;
 * 32 a thread gained no more. A multiple of 4. */
#define MT_CHUNK (QKD__CUDA_THREADS * 16)

/* The span holding grid block blk: the last s with first[s] <= blk (spans
 * of no elements own no blocks and are skipped). */
__device__ inline int span_at(const unsigned *first, int n, unsigned blk)
{
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (first[mid] <= blk)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

/* Where the span table puts first[]: after the spans, 8-byte aligned. */
static size_t first_offset(int n)
{
    return (size_t)n * sizeof(qkd__update_span);
}

/* The span table on the device (spans, then first[0..n], first[n] being
 * the grid's block count in *blocks); NULL (recorded) on failure. */
static const char *span_table(qkd__backend *b, const qkd__update_span *spans, int n,
                              unsigned *blocks)
{
    qkd__cuda *c = qkd__cuda_of(b);
    size_t bytes = first_offset(n) + (size_t)(n + 1) * sizeof(unsigned);
    char *host = (char *)qkd__cuda_host_buffer(b, (bytes + 3) / 4);
    if (!host ||
        !qkd__cuda_grow(b, (void **)&c->spans, &c->spans_bytes, bytes))
        return NULL;
    memcpy(host, spans, first_offset(n));
    unsigned *first = (unsigned *)(host + first_offset(n));
    first[0] = 0;
    for (int s = 0; s < n; s++)
        first[s + 1] = first[s] + (unsigned)((spans[s].n + MT_CHUNK - 1) / MT_CHUNK);
    *blocks = first[n];
    if (b->upload(b, c->spans, host, bytes) != QKD_OK)
        return NULL;
    return (const char *)c->spans;
}

__global__ void sum_squares_blocks_kernel(double *partials, const qkd__update_span *spans,
                                          const unsigned *first, int n)
{
    const int s = span_at(first, n, blockIdx.x);
    const float *g = spans[s].g;
    const size_t base = (size_t)(blockIdx.x - first[s]) * MT_CHUNK;
    const size_t end = spans[s].n < base + MT_CHUNK ? spans[s].n : base + MT_CHUNK;
    size_t tail = base;
    double acc = 0.0;
    if (qkd__aligned16(g)) {
        tail = base + (end - base) / 4 * 4;
        for (size_t i = base + 4 * threadIdx.x; i < tail; i += 4 * blockDim.x) {
            const float4 x = *reinterpret_cast<const float4 *>(g + i);
            acc += (double)x.x * x.x + (double)x.y * x.y + (double)x.z * x.z +
                   (double)x.w * x.w;
        }
    }
    for (size_t i = tail + threadIdx.x; i < end; i += blockDim.x)
        acc += (double)g[i] * g[i];
    acc = qkd__block_sum(acc);
    if (threadIdx.x == 0)
        partials[blockIdx.x] = acc;
}

/* One block per span: its blocks' partial sums in order. */
__global__ void sum_squares_spans_kernel(float *out, const double *partials,
                                         const unsigned *first)
{
    const int s = blockIdx.x;
    double acc = 0.0;
    for (unsigned k = first[s] + threadIdx.x; k < first[s + 1]; k += blockDim.x)
        acc += partials[k];
    acc = qkd__block_sum(acc);
    if (threadIdx.x == 0)
        out[s] = (float)acc;
}

extern "C" void qkd__cuda_sum_squares_multi(qkd__backend *b, float *out,
                                            const qkd__update_span *spans, int n_spans)
{
    if (n_spans <= 0)
        return;
    unsigned blocks;
    const char *tab = span_table(b, spans, n_spans, &blocks);
    double *partials = (double *)qkd__cuda_workspace(b, 2 * (size_t)blocks + 2);
    if (!tab || !partials)
        return;
    const qkd__update_span *d_spans = (const qkd__update_span *)tab;
    const unsigned *first = (const unsigned *)(tab + first_offset(n_spans));
    cudaStream_t st = qkd__cuda_of(b)->stream;
    if (blocks)
        sum_squares_blocks_kernel<<<blocks, QKD__CUDA_THREADS, 0, st>>>(partials, d_spans, first,
                                                                        n_spans);
    sum_squares_spans_kernel<<<(unsigned)n_spans, QKD__CUDA_THREADS, 0, st>>>(out, partials,
                                                                              first);
    qkd__cuda_launched(b, "sum_squares_multi");
}

/* Whether the update quantizes span sp (wq set) in its own pass, else
 * adamw_multi does after it: groups in segment form (segment_lanes) and
 * aligned vectors. A chunk (MT_CHUNK floats) then holds whole groups, and
 * a group lies in seg neighbouring lanes of one warp. */
__host__ __device__ inline bool fq_in_pass(const qkd__update_span &sp, const qkd__quant_spec &fq)
{
    return segment_lanes(fq.group) && qkd__aligned16(sp.p) && qkd__aligned16(sp.g) &&
           qkd__aligned16(sp.m) && qkd__aligned16(sp.v) && qkd__aligned4(sp.wq);
}

/* A chunk [base, end) of a span quantized in the pass: each thread
 * updates a float4 at a time (unless the step is skipped: apply 0), then
 * quantizes it as quant.cu's segment kernel does (quant.cuh's segments,
 * one item a pass: the bits of fakequant_forward_bf16 on the updated p).
 * The loop's bound is the block's and a group's lanes are all live or
 * none, so every lane reaches every shuffle. Planning two float4s' grids
 * in one pass, as the segment kernel plans three, was slower: it needs
 * more registers (TinyLlama's step, one run each: 40,076 tokens/s at 94
 * registers, 40,269 at 80 with 76 bytes spilled, 40,810 for one a pass). */
__device__ static void adamw_fq_chunk(const qkd__update_span &sp, size_t base, size_t end,
                                      float gscale, const qkd__adamw_k &a, bool apply,
                                      const qkd__quant_spec &fq)
{
    const int seg = segment_lanes(fq.group);
    for (size_t i = base + 4 * threadIdx.x; i - 4 * threadIdx.x < end; i += 4 * blockDim.x) {
        const bool live = i < end;
        float4 p[1] = {make_float4(0.0f, 0.0f, 0.0f, 0.0f)};
        if (live)
            p[0] = *reinterpret_cast<float4 *>(sp.p + i);
        if (live && apply) {
            const float4 g = *reinterpret_cast<const float4 *>(sp.g + i);
            float4 m = *reinterpret_cast<float4 *>(sp.m + i);
            float4 v = *reinterpret_cast<float4 *>(sp.v + i);
            qkd__adamw_one(&p[0].x, g.x * gscale, &m.x, &v.x, sp.lr, &a);
            qkd__adamw_one(&p[0].y, g.y * gscale, &m.y, &v.y, sp.lr, &a);
            qkd__adamw_one(&p[0].z, g.z * gscale, &m.z, &v.z, sp.lr, &a);
            qkd__adamw_one(&p[0].w, g.w * gscale, &m.w, &v.w, sp.lr, &a);
            *reinterpret_cast<float4 *>(sp.p + i) = p[0];
            *reinterpret_cast<float4 *>(sp.m + i) = m;
            *reinterpret_cast<float4 *>(sp.v + i) = v;
        }
        const segment_grids<1> q(p, seg, fq);
        if (live)
            q.store(sp.wq, sp.scales, sp.zeros, i / 4, p[0], 0, seg, fq);
    }
}

/* st (NULL: gscale and a as given): the step decided on the device; fq:
 * the setting of spans with wq. Three blocks an SM (80 registers, a few
 * spilled): at the 94 registers the quantizing pass takes otherwise, two
 * blocks an SM made TinyLlama's optimizer part 18.8 ms instead of 15.7. */
__global__ void __launch_bounds__(QKD__CUDA_THREADS, 3)
    adamw_multi_kernel(const qkd__update_span *spans, const unsigned *first, int n,
                       const qkd__step_state *st, float gscale, qkd__adamw_k a, qkd__quant_spec fq)
{
    const bool apply = !st || !st->skipped;
    if (st) {
        gscale = st->gscale;
        a.rbc1 = st->rbc1;
        a.rbc2 = st->rbc2;
    }
    const int s = span_at(first, n, blockIdx.x);
    const qkd__update_span sp = spans[s];
    const size_t base = (size_t)(blockIdx.x - first[s]) * MT_CHUNK;
    const size_t end = sp.n < base + MT_CHUNK ? sp.n : base + MT_CHUNK;
    if (sp.wq && fq_in_pass(sp, fq)) { /* a skipped step still writes Q(p) */
        adamw_fq_chunk(sp, base, end, gscale, a, apply, fq);
        return;
    }
    if (!apply)
        return;
    size_t tail = base;
    if (qkd__aligned16(sp.p) && qkd__aligned16(sp.g) && qkd__aligned16(sp.m) &&
        qkd__aligned16(sp.v)) {
        tail = base + (end - base) / 4 * 4;
        for (size_t i = base + 4 * threadIdx.x; i < tail; i += 4 * blockDim.x) {
            float4 p = *reinterpret_cast<float4 *>(sp.p + i);
            const float4 g = *reinterpret_cast<const float4 *>(sp.g + i);
            float4 m = *reinterpret_cast<float4 *>(sp.m + i);
            float4 v = *reinterpret_cast<float4 *>(sp.v + i);
            qkd__adamw_one(&p.x, g.x * gscale, &m.x, &v.x, sp.lr, &a);
            qkd__adamw_one(&p.y, g.y * gscale, &m.y, &v.y, sp.lr, &a);
            qkd__adamw_one(&p.z, g.z * gscale, &m.z, &v.z, sp.lr, &a);
            qkd__adamw_one(&p.w, g.w * gscale, &m.w, &v.w, sp.lr, &a);
            *reinterpret_cast<float4 *>(sp.p + i) = p;
            *reinterpret_cast<float4 *>(sp.m + i) = m;
            *reinterpret_cast<float4 *>(sp.v + i) = v;
        }
    }
    for (size_t i = tail + threadIdx.x; i < end; i += blockDim.x)
        qkd__adamw_one(&sp.p[i], sp.g[i] * gscale, &sp.m[i], &sp.v[i], sp.lr, &a);
}

static void adamw_multi(qkd__backend *b, const qkd__update_span *spans, int n_spans,
                        const qkd__step_state *st, float gscale, qkd__adamw_k a,
                        const qkd__quant_spec *fq)
{
    if (n_spans <= 0)
        return;
    unsigned blocks = 0;
    const char *tab = span_table(b, spans, n_spans, &blocks); /* NULL: recorded */
    const qkd__quant_spec none = {};
    if (tab && blocks) {
        adamw_multi_kernel<<<blocks, QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(
            (const qkd__update_span *)tab, (const unsigned *)(tab + first_offset(n_spans)),
            n_spans, st, gscale, a, fq ? *fq : none);
        qkd__cuda_launched(b, "adamw_update_multi");
    }
    /* the spans the pass did not quantize (none updated if the table failed:
     * Q(w) of the weights as they are, which the next forward reads) */
    for (int s = 0; fq && s < n_spans; s++)
        if (spans[s].wq && (!tab || !fq_in_pass(spans[s], *fq)))
            qkd__cuda_fakequant_forward_bf16(b, spans[s].wq, spans[s].scales, spans[s].zeros,
                                             spans[s].p, (int64_t)spans[s].n / fq->group,
                                             fq->group, fq);
}

extern "C" void qkd__cuda_adamw_update_multi(qkd__backend *b, const qkd__update_span *spans,
                                             int n_spans, float gscale, float b1, float b2,
                                             float eps, float wd, int t)
{
    adamw_multi(b, spans, n_spans, NULL, gscale, qkd__adamw_k_at(b1, b2, eps, wd, t), NULL);
}

extern "C" void qkd__cuda_adamw_update_multi_dev(qkd__backend *b, const qkd__update_span *spans,
                                                 int n_spans, const qkd__step_state *st,
                                                 float b1, float b2, float eps, float wd,
                                                 const qkd__quant_spec *fq)
{
    adamw_multi(b, spans, n_spans, st, 1.0f, qkd__adamw_k_of(b1, b2, eps, wd, 0.0f, 0.0f),
                fq); /* st: the rest */
}

/* One thread: the norms in order, in double, as the host would sum them. */
__global__ void step_decide_kernel(qkd__step_state *st, const float *norms, int n,
                                   float max_norm, float b1, float b2)
{
    double sum = 0.0;
    for (int k = 0; k < n; k++)
        sum += norms[k];
    qkd__step_decide(st, sum, max_norm, b1, b2);
}

extern "C" void qkd__cuda_step_decide(qkd__backend *b, qkd__step_state *st, const float *norms,
                                      int n, float max_norm, float b1, float b2)
{
    step_decide_kernel<<<1, 1, 0, qkd__cuda_of(b)->stream>>>(st, norms, n, max_norm, b1, b2);
    qkd__cuda_launched(b, "step_decide");
}

/* ---- embedding -------------------------------------------------------------------- */

__global__ void embedding_forward_kernel(float *out, const int32_t *ids, const float *table,
                                         int N, int C)
{
    QKD__CUDA_FOR(i, (size_t)N * C)
    out[i] = table[(size_t)ids[i / C] * C + i % C];
}

/* The backward, grouped by token: a stable radix sort orders the positions
 * by token once per call (each token's positions stay ascending), then a
 * block per run of equal tokens adds that run's gradient rows to the
 * token's row in ascending position order, as the reference does: the
 * same float sums, no atomics, and rows that repeat a token never race. */

__global__ void iota_kernel(int32_t *x, int n)
{
    QKD__CUDA_FOR(i, (size_t)n)
    x[i] = (int32_t)i;
}

/* Block i handles the run starting at sorted index i (others return). */
__global__ void embedding_backward_kernel(float *dtable, const float *dout, const uint32_t *tok,
                                          const int32_t *pos, int N, int C)
{
    const int i = blockIdx.x;
    if (i > 0 && tok[i] == tok[i - 1])
        return;
    int end = i + 1;
    while (end < N && tok[end] == tok[i])
        end++;
    float *d = dtable + (size_t)tok[i] * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = d[c];
        for (int k = i; k < end; k++)
            acc += dout[(size_t)pos[k] * C + c];
        d[c] = acc;
    }
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

/* Bytes from the start of the embedding backward's workspace to the sort's
 * temporary storage: sorted tokens, positions and sorted positions. */
static size_t sort_offset(int N)
{
    return (3 * (size_t)N * sizeof(int32_t) + 255) & ~(size_t)255;
}

extern "C" void qkd__cuda_embedding_backward(qkd__backend *b, float *dtable, const float *dout,
                                             const int32_t *ids, int N, int C, int V)
{
    if (N <= 0 || C <= 0)
        return;
    cudaStream_t st = qkd__cuda_of(b)->stream;
    int bits = 1; /* ids lie in [0, V) (checked by the caller): sort those bits only */
    while (bits < 31 && (1 << bits) < V)
        bits++;
    const uint32_t *keys = (const uint32_t *)ids;
    size_t temp_bytes = 0;
    if (qkd__cuda_check(b,
                        cub::DeviceRadixSort::SortPairs(NULL, temp_bytes, keys, (uint32_t *)NULL,
                                                        (const int32_t *)NULL, (int32_t *)NULL,
                                                        N, 0, bits, st),
                        "embedding_backward sort") != QKD_OK)
        return;
    char *ws = (char *)qkd__cuda_workspace(b, (sort_offset(N) + temp_bytes + 3) / 4);
    if (!ws)
        return;
    uint32_t *tok = (uint32_t *)ws;
    int32_t *pos = (int32_t *)(tok + N), *sorted = pos + N;
    iota_kernel<<<qkd__cuda_blocks((size_t)N), QKD__CUDA_THREADS, 0, st>>>(pos, N);
    qkd__cuda_launched(b, "embedding_backward iota");
    qkd__cuda_check(b,
                    cub::DeviceRadixSort::SortPairs(ws + sort_offset(N), temp_bytes, keys, tok,
                                                    pos, sorted, N, 0, bits, st),
                    "embedding_backward sort");
    unsigned threads = C < QKD__CUDA_THREADS ? (unsigned)(C + 31) / 32 * 32 : QKD__CUDA_THREADS;
    embedding_backward_kernel<<<(unsigned)N, threads, 0, st>>>(dtable, dout, tok, sorted, N, C);
    qkd__cuda_launched(b, "embedding_backward");
}
