/* Helpers shared by the CUDA kernels: launch shapes, launch checks and
 * deterministic block reductions (a fixed shuffle tree, so a result never
 * changes from run to run). */
#ifndef QKD_LIB_BACKEND_CUDA_COMMON_CUH
#define QKD_LIB_BACKEND_CUDA_COMMON_CUH

#include <math.h>

#include "backend/cuda/cuda.h"

/* Threads per block of every kernel here (a multiple of 32). */
#define QKD__CUDA_THREADS 256

/* Blocks for a grid-stride loop over n items (n > 0). */
static inline unsigned qkd__cuda_blocks(size_t n)
{
    size_t blocks = (n + QKD__CUDA_THREADS - 1) / QKD__CUDA_THREADS;
    return (unsigned)(blocks < QKD__CUDA_MAX_BLOCKS ? blocks : QKD__CUDA_MAX_BLOCKS);
}

/* Count the write of the kernel `what` (just enqueued) and record its
 * launch if it failed. */
static inline void qkd__cuda_launched(qkd__backend *b, const char *what)
{
    qkd__cuda_of(b)->writes++;
    qkd__cuda_check(b, cudaGetLastError(), what);
}

#define QKD__CUDA_FOR(i, n)                                                           \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);            \
         i += (size_t)gridDim.x * blockDim.x)

/* f rounded to bf16 (nearest even on the bits, as qkd__f32_to_bf16 does:
 * subnormals kept, a NaN stays a quiet NaN), as raw bits in the low half,
 * so the tensor cores read exactly what the reference's bf16 products
 * round to. */
__device__ inline uint32_t qkd__bf16_bits(float f)
{
    uint32_t x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (x >> 16) | 0x40;
    return (x + 0x7fffu + ((x >> 16) & 1)) >> 16;
}

/* Whether p may be read or written as float4s. */
__host__ __device__ inline bool qkd__aligned16(const void *p)
{
    return (uintptr_t)p % 16 == 0;
}

/* Whether p may take a group of four values in one store (qkd__store4):
 * 16 bytes for floats, 8 for bf16 bits. */
__host__ __device__ inline bool qkd__aligned4(const float *p)
{
    return qkd__aligned16(p);
}

__host__ __device__ inline bool qkd__aligned4(const uint16_t *p)
{
    return (uintptr_t)p % 8 == 0;
}

/* Four values as bf16 bits, in memory order (one 8-byte store). */
__device__ inline uint2 qkd__bf16_bits4(float4 v)
{
    return make_uint2(qkd__bf16_bits(v.x) | qkd__bf16_bits(v.y) << 16,
                      qkd__bf16_bits(v.z) | qkd__bf16_bits(v.w) << 16);
}

/* Store v at p[i] as a kernel's output type: fp32, or bf16 bits (the
 * bf16-bits slots); the 4 forms store v as element group i. */
__device__ inline void qkd__store(float *p, size_t i, float v)
{
    p[i] = v;
}

__device__ inline void qkd__store(uint16_t *p, size_t i, float v)
{
    p[i] = (uint16_t)qkd__bf16_bits(v);
}

__device__ inline void qkd__store4(float *p, size_t i, float4 v)
{
    reinterpret_cast<float4 *>(p)[i] = v;
}

__device__ inline void qkd__store4(uint16_t *p, size_t i, float4 v)
{
    reinterpret_cast<uint2 *>(p)[i] = qkd__bf16_bits4(v);
}

/* The value of bf16 bits h (exact). */
__device__ inline float qkd__bf16_value(uint32_t h)
{
    return __uint_as_float(h << 16);
}

/* Load p[i], or element group i (8 bytes), of bf16 bits as floats. */
__device__ inline float qkd__load(const uint16_t *p, size_t i)
{
    return qkd__bf16_value(p[i]);
}

__device__ inline float4 qkd__load4(const uint16_t *p, size_t i)
{
    const uint2 v = reinterpret_cast<const uint2 *>(p)[i];
    return make_float4(qkd__bf16_value(v.x & 0xffffu), qkd__bf16_value(v.x >> 16),
                       qkd__bf16_value(v.y & 0xffffu), qkd__bf16_value(v.y >> 16));
}

template <typename T> struct qkd__sum_op {
    __device__ T operator()(T a, T b) const { return a + b; }
};
template <typename T> struct qkd__max_op {
    __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};

/* op over the aligned group of `width` lanes (a power of two up to 32)
 * holding each v, every lane of the group getting it; mask names the
 * lanes taking part (at least the group's). */
template <typename T, typename Op>
__device__ T qkd__lanes_reduce(T v, Op op, int width, unsigned mask = 0xffffffffu)
{
    for (int o = width / 2; o > 0; o >>= 1)
        v = op(v, __shfl_xor_sync(mask, v, o));
    return v;
}

template <typename T, typename Op> __device__ T qkd__warp_reduce(T v, Op op)
{
    return qkd__lanes_reduce(v, op, 32);
}

/* Every thread of the block gets op over all threads' v. All threads must
 * call it (no thread may have returned). */
template <typename T, typename Op> __device__ T qkd__block_reduce(T v, Op op, T identity)
{
    __shared__ T part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = qkd__warp_reduce(v, op);
    __syncthreads(); /* a previous reduction's readers are done with part */
    if (lane == 0)
        part[warp] = v;
    __syncthreads();
    v = lane < (int)((blockDim.x + 31) >> 5) ? part[lane] : identity;
    return qkd__warp_reduce(v, op); /* each warp reduces the partials alike */
}

__device__ inline double qkd__block_sum(double v)
{
    return qkd__block_reduce(v, qkd__sum_op<double>(), 0.0);
}

__device__ inline float qkd__block_sumf(float v)
{
    return qkd__block_reduce(v, qkd__sum_op<float>(), 0.0f);
}

__device__ inline double qkd__block_max(double v)
{
    return qkd__block_reduce(v, qkd__max_op<double>(), (double)-INFINITY);
}

__device__ inline float qkd__block_maxf(float v)
{
    return qkd__block_reduce(v, qkd__max_op<float>(), -INFINITY);
}

#endif
