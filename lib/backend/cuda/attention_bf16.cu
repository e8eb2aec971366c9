/* Flash-style causal grouped-query attention on the tensor cores, in the
 * bf16 precision of the attention_*_bf16 slots (backend.h): q, k, v, dout,
 * the probabilities and the score gradients are rounded to bf16 (nearest
 * even) as they enter a product; products accumulate in fp32 (wmma
 * 16x16x16 tiles), softmax and its running max and sum stay fp32.
 *
 * The scheme is attention.cu's (FlashAttention-2): the forward walks the
 * key tiles of a 64-query tile with an online softmax and saves each row's
 * logsumexp; the backward recomputes the probabilities per tile from it,
 * in two kernels without atomics (dk and dv per key tile, then dq per
 * query tile). A block is 4 warps, each owning 16 rows of the block's 64
 * (queries in the forward and dq, keys in dk/dv). Each warp's running
 * fp32 sums (the output rows, or dk/dv/dq) live in its part of shared
 * memory, because wmma's accumulator layout does not say which row an
 * element belongs to and the online softmax rescales rows.
 *
 * One difference from the reference in rounding: the forward rounds the
 * probabilities relative to the running max (exp(s - m), divided by the
 * row sum at the end) where the reference rounds the normalised ones;
 * both are within 2^-9 of the exact value, so outputs differ by at most
 * 2^-8 of sum_key p |v|. */
#include <cuda_bf16.h>
#include <mma.h>

#include "backend/cuda/common.cuh"

using namespace nvcuda;
typedef __nv_bfloat16 bf16;

#define FB_WARPS 4
#define FB_THREADS (32 * FB_WARPS)
#define FB_ROWS 64 /* rows of a query or key tile */
#define FB_MAX_HD 128

/* Everything one attention call touches; unused members are NULL. */
struct fb_args {
    float *out, *lse, *dq, *dk, *dv;
    const float *q, *k, *v, *dout, *D;
    int Tq, pos0, kv_len, H, n_kv, hd, rep;
    float scale;
};

/* Shared-memory geometry for a padded head size HD. Row strides keep
 * every 16-row, 16-column fragment 32-byte aligned (wmma's rule). */
template <int HD> struct fb_geo {
    static constexpr int LDT = HD + 8;        /* bf16 [64][HD] tiles */
    static constexpr int LDS = FB_ROWS + 4;   /* fp32 [16][64] scores per warp */
    static constexpr int LDP = FB_ROWS + 8;   /* bf16 [16][64] probabilities per warp */
    static constexpr int LDA = HD + 4;        /* fp32 [16][HD] running sums per warp */
    static constexpr size_t TILE = (size_t)FB_ROWS * LDT * sizeof(bf16);
    static constexpr size_t SCORES = 16 * LDS * sizeof(float);
    static constexpr size_t PROBS = 16 * LDP * sizeof(bf16);
    static constexpr size_t ACC = 16 * LDA * sizeof(float);
};

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> frag_a;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> frag_bt;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> frag_b;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> frag_c;

/* dst[r][d] = bf16(src[r * stride + d]) for r < n_rows, d < hd; zero
 * elsewhere (padding must be 0, not garbage: 0 * NaN is NaN). Four
 * values per load when hd is a multiple of 4 and src 16-byte aligned
 * (then the stride, a multiple of hd, keeps every row aligned). */
template <int HD>
__device__ void fb_load(bf16 *dst, const float *src, size_t stride, int n_rows, int hd)
{
    if (hd % 4 == 0 && ((size_t)src & 15) == 0) {
        for (int i = threadIdx.x; i < FB_ROWS * HD / 4; i += FB_THREADS) {
            const int r = i / (HD / 4), d = i % (HD / 4) * 4;
            float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (r < n_rows && d < hd)
                x = *(const float4 *)(src + (size_t)r * stride + d);
            __nv_bfloat162 *y = (__nv_bfloat162 *)(dst + r * fb_geo<HD>::LDT + d);
            y[0] = __floats2bfloat162_rn(x.x, x.y);
            y[1] = __floats2bfloat162_rn(x.z, x.w);
        }
        return;
    }
    for (int i = threadIdx.x; i < FB_ROWS * HD; i += FB_THREADS) {
        const int r = i / HD, d = i % HD;
        const float x = r < n_rows && d < hd ? src[(size_t)r * stride + d] : 0.0f;
        dst[r * fb_geo<HD>::LDT + d] = __float2bfloat16_rn(x);
    }
}

/* s[16][64] = a[16][HD] . b[64][HD]^T: a warp's rows of a tile against all
 * 64 rows of another (both bf16, row stride LDT). */
template <int HD> __device__ void fb_scores(float *s, const bf16 *a, const bf16 *b)
{
    typedef fb_geo<HD> G;
#pragma unroll
    for (int j = 0; j < FB_ROWS / 16; j++) {
        frag_c c;
        wmma::fill_fragment(c, 0.0f);
#pragma unroll
        for (int d = 0; d < HD; d += 16) {
            frag_a fa;
            frag_bt fb;
            wmma::load_matrix_sync(fa, a + d, G::LDT);
            wmma::load_matrix_sync(fb, b + 16 * j * G::LDT + d, G::LDT);
            wmma::mma_sync(c, fa, fb, c);
        }
        wmma::store_matrix_sync(s + 16 * j, c, G::LDS, wmma::mem_row_major);
    }
}

/* acc[16][HD] += p[16][64] . m[64][HD] (p bf16 with stride LDP, m a bf16
 * tile, acc the warp's fp32 sums). */
template <int HD> __device__ void fb_accum(float *acc, const bf16 *p, const bf16 *m)
{
    typedef fb_geo<HD> G;
#pragma unroll
    for (int d = 0; d < HD; d += 16) {
        frag_c c;
        wmma::load_matrix_sync(c, acc + d, G::LDA, wmma::mem_row_major);
#pragma unroll
        for (int j = 0; j < FB_ROWS; j += 16) {
            frag_a fa;
            frag_b fb;
            wmma::load_matrix_sync(fa, p + j, G::LDP);
            wmma::load_matrix_sync(fb, m + j * G::LDT + d, G::LDT);
            wmma::mma_sync(c, fa, fb, c);
        }
        wmma::store_matrix_sync(acc + d, c, G::LDA, wmma::mem_row_major);
    }
}

/* Zero a warp's [16][HD] sums. */
template <int HD> __device__ void fb_zero(float *acc)
{
    const int lane = threadIdx.x & 31;
    for (int i = lane; i < 16 * fb_geo<HD>::LDA; i += 32)
        acc[i] = 0.0f;
}

/* dst[r][d] (+)= scale * acc[r][d] for the warp's rows r < n_rows, d < hd. */
template <int HD>
__device__ void fb_store(float *dst, size_t stride, const float *acc, int n_rows, int hd,
                         float scale, bool add)
{
    const int lane = threadIdx.x & 31;
    for (int i = lane; i < 16 * HD; i += 32) {
        const int r = i / HD, d = i % HD;
        if (r < n_rows && d < hd) {
            float *x = dst + (size_t)r * stride + d;
            const float y = scale * acc[r * fb_geo<HD>::LDA + d];
            *x = add ? *x + y : y;
        }
    }
}

/* Each lane holds half a row of a warp's [16][64] tile: row lane / 2,
 * columns (lane & 1) * 32 + j. */
#define FB_HALF (FB_ROWS / 2)

__device__ inline float fb_pair_max(float v)
{
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
}

__device__ inline float fb_pair_sum(float v)
{
    return v + __shfl_xor_sync(0xffffffffu, v, 1);
}

/* The shared memory of a block: bf16 tiles, then per-warp parts. */
template <int HD> struct fb_smem {
    bf16 *tile[4];
    float *scores, *scores2, *acc, *acc2;
    bf16 *probs, *probs2;
    float *rows; /* two [64] fp32 vectors (logsumexp, D) */

    __device__ fb_smem(unsigned char *base, int n_tiles, int two)
    {
        typedef fb_geo<HD> G;
        const int w = threadIdx.x >> 5;
        for (int i = 0; i < 4; i++)
            tile[i] = i < n_tiles ? (bf16 *)(base + i * G::TILE) : NULL;
        unsigned char *p = base + n_tiles * G::TILE;
        const int k = two ? 2 : 1;
        scores = (float *)(p + (size_t)w * k * G::SCORES);
        scores2 = two ? scores + 16 * G::LDS : NULL;
        p += (size_t)FB_WARPS * k * G::SCORES;
        probs = (bf16 *)(p + (size_t)w * k * G::PROBS);
        probs2 = two ? probs + 16 * G::LDP : NULL;
        p += (size_t)FB_WARPS * k * G::PROBS;
        acc = (float *)(p + (size_t)w * k * G::ACC);
        acc2 = two ? acc + 16 * G::LDA : NULL;
        p += (size_t)FB_WARPS * k * G::ACC;
        rows = (float *)p;
    }

    static size_t bytes(int n_tiles, int two)
    {
        typedef fb_geo<HD> G;
        const int k = two ? 2 : 1;
        return n_tiles * G::TILE + (size_t)FB_WARPS * k * (G::SCORES + G::PROBS + G::ACC) +
               2 * FB_ROWS * sizeof(float);
    }
};

/* One block per (query tile, head, batch row). */
template <int HD> __global__ void __launch_bounds__(FB_THREADS) fb_forward_kernel(fb_args p)
{
    typedef fb_geo<HD> G;
    extern __shared__ __align__(128) unsigned char fb_sm[];
    fb_smem<HD> sm(fb_sm, 3, 0);
    bf16 *Qs = sm.tile[0], *Ks = sm.tile[1], *Vs = sm.tile[2];
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 1, half = lane & 1;
    const int t0 = (gridDim.x - 1 - blockIdx.x) * FB_ROWS, h = blockIdx.y, bi = blockIdx.z;
    const int g = h / p.rep;
    const size_t qld = (size_t)p.H * p.hd, kld = (size_t)p.n_kv * p.hd;
    const int nq = min(FB_ROWS, p.Tq - t0);
    const size_t q_at = ((size_t)bi * p.Tq + t0) * qld + (size_t)h * p.hd;
    fb_load<HD>(Qs, p.q + q_at, qld, nq, p.hd);
    fb_zero<HD>(sm.acc);
    const int last = p.pos0 + t0 + 16 * w + r; /* the lane's row's last key */
    float m = -INFINITY, l = 0.0f;
    const int kend = p.pos0 + t0 + nq; /* keys 0..kend-1 are seen by some row */
    for (int k0 = 0; k0 < kend; k0 += FB_ROWS) {
        const size_t kv_at = ((size_t)bi * p.kv_len + k0) * kld + (size_t)g * p.hd;
        __syncthreads(); /* the previous tile's readers are done */
        fb_load<HD>(Ks, p.k + kv_at, kld, kend - k0, p.hd);
        fb_load<HD>(Vs, p.v + kv_at, kld, kend - k0, p.hd);
        __syncthreads();
        if (k0 > last - r + 15) /* no row of this warp sees these keys */
            continue;
        fb_scores<HD>(sm.scores, Qs + 16 * w * G::LDT, Ks);
        __syncwarp();
        float *srow = sm.scores + r * G::LDS + half * FB_HALF;
        float mx = -INFINITY;
        for (int j = 0; j < FB_HALF; j++) {
            const int key = k0 + half * FB_HALF + j;
            const float s = key <= last && key < kend ? srow[j] * p.scale : -INFINITY;
            srow[j] = s;
            mx = fmaxf(mx, s);
        }
        /* finite: key 0 is in every row's first tile */
        const float m_new = fmaxf(m, fb_pair_max(mx));
        const float corr = expf(m - m_new);
        bf16 *prow = sm.probs + r * G::LDP + half * FB_HALF;
        float sum = 0.0f;
        for (int j = 0; j < FB_HALF; j++) {
            const float e = expf(srow[j] - m_new);
            sum += e;
            prow[j] = __float2bfloat16_rn(e);
        }
        l = l * corr + fb_pair_sum(sum);
        m = m_new;
        float *orow = sm.acc + r * G::LDA + half * (HD / 2);
        for (int d = 0; d < HD / 2; d++)
            orow[d] *= corr;
        __syncwarp();
        fb_accum<HD>(sm.acc, sm.probs, Vs);
    }
    __syncwarp();
    const int row = 16 * w + r;
    if (row < nq && half == 0)
        p.lse[((size_t)bi * p.H + h) * p.Tq + t0 + row] = m + logf(l);
    float *orow = sm.acc + r * G::LDA + half * (HD / 2);
    const float inv = 1.0f / l;
    for (int d = 0; d < HD / 2; d++)
        orow[d] *= inv;
    __syncwarp();
    fb_store<HD>(p.out + q_at + 16 * w * qld, qld, sm.acc, nq - 16 * w, p.hd, 1.0f, false);
}

/* One block per (key tile, kv head, batch row): dk and dv of its keys,
 * summed over the rep query heads and the query tiles at or after it. */
template <int HD> __global__ void __launch_bounds__(FB_THREADS) fb_dkdv_kernel(fb_args p)
{
    typedef fb_geo<HD> G;
    extern __shared__ __align__(128) unsigned char fb_sm[];
    fb_smem<HD> sm(fb_sm, 4, 1);
    bf16 *Ks = sm.tile[0], *Vs = sm.tile[1], *Qs = sm.tile[2], *Os = sm.tile[3];
    float *lse_s = sm.rows, *D_s = sm.rows + FB_ROWS;
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 1, half = lane & 1;
    const int T = p.Tq, k0 = blockIdx.x * FB_ROWS, g = blockIdx.y, bi = blockIdx.z;
    const size_t qld = (size_t)p.H * p.hd, kld = (size_t)p.n_kv * p.hd;
    const int nk = min(FB_ROWS, T - k0);
    const size_t kv_at = ((size_t)bi * T + k0) * kld + (size_t)g * p.hd;
    fb_load<HD>(Ks, p.k + kv_at, kld, nk, p.hd);
    fb_load<HD>(Vs, p.v + kv_at, kld, nk, p.hd);
    fb_zero<HD>(sm.acc);  /* dk */
    fb_zero<HD>(sm.acc2); /* dv */
    const int key = k0 + 16 * w + r;
    for (int hr = 0; hr < p.rep; hr++) {
        const int h = g * p.rep + hr;
        for (int q0 = k0; q0 < T; q0 += FB_ROWS) { /* earlier queries see none of these keys */
            const int nq = min(FB_ROWS, T - q0);
            const size_t q_at = ((size_t)bi * T + q0) * qld + (size_t)h * p.hd;
            const size_t row_at = ((size_t)bi * p.H + h) * T + q0;
            __syncthreads();
            fb_load<HD>(Qs, p.q + q_at, qld, nq, p.hd);
            fb_load<HD>(Os, p.dout + q_at, qld, nq, p.hd);
            for (int i = threadIdx.x; i < FB_ROWS; i += FB_THREADS) {
                lse_s[i] = i < nq ? p.lse[row_at + i] : 0.0f;
                D_s[i] = i < nq ? p.D[row_at + i] : 0.0f;
            }
            __syncthreads();
            fb_scores<HD>(sm.scores, Ks + 16 * w * G::LDT, Qs);  /* [key][query] */
            fb_scores<HD>(sm.scores2, Vs + 16 * w * G::LDT, Os); /* dP^T */
            __syncwarp();
            for (int j = 0; j < FB_HALF; j++) {
                const int qc = half * FB_HALF + j, at = r * G::LDS + qc;
                const bool on = qc < nq && q0 + qc >= key;
                const float pr = on ? expf(sm.scores[at] * p.scale - lse_s[qc]) : 0.0f;
                sm.probs[r * G::LDP + qc] = __float2bfloat16_rn(pr);
                sm.probs2[r * G::LDP + qc] = __float2bfloat16_rn(pr * (sm.scores2[at] - D_s[qc]));
            }
            __syncwarp();
            fb_accum<HD>(sm.acc2, sm.probs, Os); /* dv += P^T dO */
            fb_accum<HD>(sm.acc, sm.probs2, Qs); /* dk += dS^T Q */
        }
    }
    __syncwarp();
    const size_t at = kv_at + 16 * w * kld;
    fb_store<HD>(p.dk + at, kld, sm.acc, nk - 16 * w, p.hd, p.scale, true);
    fb_store<HD>(p.dv + at, kld, sm.acc2, nk - 16 * w, p.hd, 1.0f, true);
}

/* One block per (query tile, head, batch row): dq of its rows. */
template <int HD> __global__ void __launch_bounds__(FB_THREADS) fb_dq_kernel(fb_args p)
{
    typedef fb_geo<HD> G;
    extern __shared__ __align__(128) unsigned char fb_sm[];
    fb_smem<HD> sm(fb_sm, 4, 1);
    bf16 *Qs = sm.tile[0], *Os = sm.tile[1], *Ks = sm.tile[2], *Vs = sm.tile[3];
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 1, half = lane & 1;
    const int T = p.Tq, q0 = (gridDim.x - 1 - blockIdx.x) * FB_ROWS, h = blockIdx.y;
    const int bi = blockIdx.z, g = h / p.rep;
    const size_t qld = (size_t)p.H * p.hd, kld = (size_t)p.n_kv * p.hd;
    const int nq = min(FB_ROWS, T - q0);
    const size_t q_at = ((size_t)bi * T + q0) * qld + (size_t)h * p.hd;
    const size_t row_at = ((size_t)bi * p.H + h) * T + q0;
    fb_load<HD>(Qs, p.q + q_at, qld, nq, p.hd);
    fb_load<HD>(Os, p.dout + q_at, qld, nq, p.hd);
    fb_zero<HD>(sm.acc);
    const int row = 16 * w + r;
    const float lse = row < nq ? p.lse[row_at + row] : 0.0f;
    const float D = row < nq ? p.D[row_at + row] : 0.0f;
    const int kend = q0 + nq;
    for (int k0 = 0; k0 < kend; k0 += FB_ROWS) {
        const size_t kv_at = ((size_t)bi * T + k0) * kld + (size_t)g * p.hd;
        __syncthreads();
        fb_load<HD>(Ks, p.k + kv_at, kld, kend - k0, p.hd);
        fb_load<HD>(Vs, p.v + kv_at, kld, kend - k0, p.hd);
        __syncthreads();
        if (k0 > q0 + 16 * w + 15) /* no row of this warp sees these keys */
            continue;
        fb_scores<HD>(sm.scores, Qs + 16 * w * G::LDT, Ks);
        fb_scores<HD>(sm.scores2, Os + 16 * w * G::LDT, Vs);
        __syncwarp();
        for (int j = 0; j < FB_HALF; j++) {
            const int kc = half * FB_HALF + j, at = r * G::LDS + kc;
            const bool on = row < nq && k0 + kc <= q0 + row;
            const float pr = on ? expf(sm.scores[at] * p.scale - lse) : 0.0f;
            sm.probs[r * G::LDP + kc] = __float2bfloat16_rn(pr * (sm.scores2[at] - D));
        }
        __syncwarp();
        fb_accum<HD>(sm.acc, sm.probs, Ks); /* dq += dS K */
    }
    __syncwarp();
    fb_store<HD>(p.dq + q_at + 16 * w * qld, qld, sm.acc, nq - 16 * w, p.hd, p.scale, true);
}

enum fb_pass { FB_FORWARD, FB_DKDV, FB_DQ };

template <int HD> static void fb_launch(qkd__backend *b, fb_pass pass, const fb_args &p, int B)
{
    void (*kern)(fb_args);
    size_t bytes;
    dim3 grid((unsigned)((p.Tq + FB_ROWS - 1) / FB_ROWS), (unsigned)p.H, (unsigned)B);
    switch (pass) {
    case FB_FORWARD:
        kern = fb_forward_kernel<HD>;
        bytes = fb_smem<HD>::bytes(3, 0);
        break;
    case FB_DKDV:
        kern = fb_dkdv_kernel<HD>;
        bytes = fb_smem<HD>::bytes(4, 1);
        grid.y = (unsigned)p.n_kv;
        break;
    default:
        kern = fb_dq_kernel<HD>;
        bytes = fb_smem<HD>::bytes(4, 1);
        break;
    }
    if (qkd__cuda_check(b, cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                (int)bytes),
                        "attention_bf16 shared memory") != QKD_OK)
        return;
    kern<<<grid, FB_THREADS, bytes, qkd__cuda_of(b)->stream>>>(p);
    qkd__cuda_launched(b, "attention_bf16");
}

/* The kernel for the smallest padded head size that holds p.hd. */
static void fb_run(qkd__backend *b, fb_pass pass, const fb_args &p, int B)
{
    if (p.hd <= 16)
        fb_launch<16>(b, pass, p, B);
    else if (p.hd <= 32)
        fb_launch<32>(b, pass, p, B);
    else if (p.hd <= 64)
        fb_launch<64>(b, pass, p, B);
    else
        fb_launch<128>(b, pass, p, B);
}

static fb_args fb_make(const float *q, const float *k, const float *v, int Tq, int pos0,
                       int kv_len, int H, int n_kv, int hd)
{
    fb_args p = {};
    p.q = q;
    p.k = k;
    p.v = v;
    p.Tq = Tq;
    p.pos0 = pos0;
    p.kv_len = kv_len;
    p.H = H;
    p.n_kv = n_kv;
    p.hd = hd;
    p.rep = H / n_kv;
    p.scale = (float)(1.0 / sqrt((double)hd));
    return p;
}

extern "C" void qkd__cuda_attention_forward_bf16(qkd__backend *b, float *out, float *scratch,
                                                 const float *q, const float *k, const float *v,
                                                 int B, int Tq, int pos0, int kv_len,
                                                 int n_heads, int n_kv, int hd)
{
    if (B <= 0 || Tq <= 0 || hd <= 0 || !qkd__cuda_attention_head_ok(b, hd, FB_MAX_HD))
        return;
    fb_args p = fb_make(q, k, v, Tq, pos0, kv_len, n_heads, n_kv, hd);
    p.out = out;
    p.lse = scratch;
    fb_run(b, FB_FORWARD, p, B);
}

extern "C" void qkd__cuda_attention_backward_bf16(qkd__backend *b, float *dq, float *dk,
                                                  float *dv, const float *dout,
                                                  const float *scratch, const float *q,
                                                  const float *k, const float *v,
                                                  const float *out, int B, int T, int n_heads,
                                                  int n_kv, int hd)
{
    if (B <= 0 || T <= 0 || hd <= 0 || !qkd__cuda_attention_head_ok(b, hd, FB_MAX_HD))
        return;
    const float *D = qkd__cuda_attention_rowdots(b, dout, out, B, T, n_heads, hd);
    if (!D)
        return;
    fb_args p = fb_make(q, k, v, T, 0, T, n_heads, n_kv, hd);
    p.dq = dq;
    p.dk = dk;
    p.dv = dv;
    p.lse = (float *)scratch; /* read only by the backward kernels */
    p.dout = dout;
    p.D = D;
    fb_run(b, FB_DKDV, p, B);
    fb_run(b, FB_DQ, p, B);
}
