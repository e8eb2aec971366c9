/* Flash-style causal grouped-query attention on the tensor cores, in the
 * bf16 precision of the attention_*_bf16 slots (backend.h): q, k, v, dout,
 * the probabilities and the score gradients are rounded to bf16 (nearest
 * even) as they enter a product; products accumulate in fp32 (mma.sync
 * m16n8k16), softmax and its running max and sum stay fp32.
 *
 * The scheme is attention.cu's (FlashAttention-2): the forward walks the
 * key tiles of a 64-query tile with an online softmax and saves each row's
 * logsumexp; the backward recomputes the probabilities per tile from it,
 * in two kernels without atomics (dk and dv per key tile, then dq per
 * query tile). A block is 4 warps, each owning 16 rows of the block's 64
 * (queries in the forward and dq, keys in dk/dv). Scores stay in
 * registers: an m16n8k16 accumulator holds rows g and g + 8 (g = lane / 4)
 * at columns 2 t and 2 t + 1 (t = lane % 4) of each 8-column block, which
 * is the layout of the A operand of the next product, so probabilities
 * and score gradients go to the tensor cores without shared memory, and
 * the online softmax rescales each thread's two rows of the output in
 * place. q, k, v (and dout) are first rounded once into bf16 copies
 * whose rows are padded with zeros to the kernel's head size; tiles then
 * stream into shared memory with cp.async, the next tile's copy in
 * flight while the current one is computed (two buffers). Tiles are
 * row-major [row][d]; a product that reads one along its rows (v in the
 * forward, k in dq, q and dout in dk/dv) takes its fragments with
 * ldmatrix .trans.
 *
 * One difference from the reference in rounding: the forward rounds the
 * probabilities relative to the running max (exp(s - m), divided by the
 * row sum at the end) where the reference rounds the normalised ones;
 * both are within 2^-9 of the exact value, so outputs differ by at most
 * 2^-8 of sum_key p |v|. */
#include <cuda_bf16.h>

#include "backend/cuda/common.cuh"

typedef __nv_bfloat16 bf16;

#define FB_WARPS 4
#define FB_THREADS (32 * FB_WARPS)
#define FB_ROWS 64 /* rows of a query or key tile */
#define FB_NB (FB_ROWS / 8) /* 8-column blocks of a score tile */
#define FB_MAX_HD 128

/* Everything one attention call touches; unused members are NULL. The
 * bf16 copies have rows of HD (the kernel's padded head size): row
 * strides H * HD (q, dout) and n_kv * HD (k, v). */
struct fb_args {
    float *out, *lse, *dq, *dk, *dv;
    const bf16 *q, *k, *v, *dout;
    const float *D;
    int Tq, pos0, kv_len, H, n_kv, hd, rep;
    float scale;
};

/* Row stride (bf16 elements) of the [64][HD] tiles for a padded head
 * size HD: the 8-element pad puts the 8 rows a fragment load touches in
 * 8 different bank quads, and keeps rows 16-byte aligned for ldmatrix. */
template <int HD> struct fb_geo {
    static constexpr int LD = HD + 8;
    static constexpr int TILE = FB_ROWS * LD;
};

/* ---- tiles ------------------------------------------------------------------------------ */

/* dst[r][d] = bf16(src[r][d]) for d < hd, 0 for hd <= d < HD: rows of hd
 * floats into rows of HD bf16 values. */
template <int HD>
__global__ void fb_convert_kernel(bf16 *dst, const float *src, size_t rows, int hd)
{
    QKD__CUDA_FOR(i, rows * (HD / 2))
    {
        const size_t r = i / (HD / 2);
        const int d = (int)(i % (HD / 2)) * 2;
        const float *x = src + r * hd;
        *(__nv_bfloat162 *)(dst + r * HD + d) =
            __floats2bfloat162_rn(d < hd ? x[d] : 0.0f, d + 1 < hd ? x[d + 1] : 0.0f);
    }
}

/* Copy `bytes` (4 or 16) to shared memory asynchronously; zeros when not
 * valid (src is then not read). */
__device__ inline void fb_cp16(void *dst, const void *src, bool valid)
{
    const uint32_t at = (uint32_t)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(at), "l"(src),
                 "r"(valid ? 16 : 0));
}

__device__ inline void fb_cp4(void *dst, const void *src, bool valid)
{
    const uint32_t at = (uint32_t)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(at), "l"(src),
                 "r"(valid ? 4 : 0));
}

__device__ inline void fb_commit()
{
    asm volatile("cp.async.commit_group;\n");
}

/* Wait until at most n copy groups are in flight. */
template <int n> __device__ inline void fb_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(n));
}

/* Start copying rows 0..63 of a bf16 copy (row stride `stride`) into a
 * tile; rows past n_rows become zeros (0 * NaN would be NaN). */
template <int HD>
__device__ void fb_issue(bf16 *dst, const bf16 *src, size_t stride, int n_rows)
{
    for (int i = threadIdx.x; i < FB_ROWS * HD / 8; i += FB_THREADS) {
        const int r = i / (HD / 8), c = i % (HD / 8) * 8;
        const bool valid = r < n_rows;
        fb_cp16(dst + r * fb_geo<HD>::LD + c, valid ? src + r * stride + c : src, valid);
    }
}

/* Start copying n of 64 floats (the rest zeros) into dst. */
__device__ inline void fb_issue_rows(float *dst, const float *src, int n, int i)
{
    fb_cp4(dst + i, i < n ? src + i : src, i < n);
}

/* ---- m16n8k16 fragments ------------------------------------------------------------------ */

__device__ inline uint32_t fb_pack(float lo, float hi)
{
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *(uint32_t *)&v;
}

__device__ inline uint32_t fb_ld32(const bf16 *p)
{
    return *(const uint32_t *)p;
}

/* c += a . b, a 16x16 (row), b 16x8 (col), bf16 in, fp32 accumulators. */
__device__ inline void fb_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* The A fragment of rows 0..15, columns 0..15 of x (row stride ld). */
__device__ inline void fb_frag_a(uint32_t (&a)[4], const bf16 *x, int ld)
{
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    a[0] = fb_ld32(x + g * ld + 2 * t);
    a[1] = fb_ld32(x + (g + 8) * ld + 2 * t);
    a[2] = fb_ld32(x + g * ld + 2 * t + 8);
    a[3] = fb_ld32(x + (g + 8) * ld + 2 * t + 8);
}

/* c += a . y^T over 16 columns, y stored as [8 rows n][16 k] (stride ld). */
__device__ inline void fb_mma_nt(float (&c)[4], const uint32_t (&a)[4], const bf16 *y, int ld)
{
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    fb_mma(c, a, fb_ld32(y + g * ld + 2 * t), fb_ld32(y + g * ld + 2 * t + 8));
}

/* c += a . m over 16 rows of m, m stored row-major as [16 k][8 n]
 * (stride ld): ldmatrix .trans hands each thread the two k-adjacent
 * elements of its column that the B fragment holds. */
__device__ inline void fb_mma_nn(float (&c)[4], const uint32_t (&a)[4], const bf16 *m, int ld)
{
    const bf16 *row = m + (threadIdx.x & 15) * ld; /* lanes 0-15 address rows 0-15 */
    const uint32_t at = (uint32_t)__cvta_generic_to_shared(row);
    uint32_t b0, b1;
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(b0), "=r"(b1)
                 : "r"(at));
    fb_mma(c, a, b0, b1);
}

/* s[16][64] = x[16][HD] . y[64][HD]^T: a warp's 16 rows of one row-major
 * tile against all 64 rows of another. */
template <int HD> __device__ void fb_scores(float (&s)[FB_NB][4], const bf16 *x, const bf16 *y)
{
    typedef fb_geo<HD> G;
#pragma unroll
    for (int nb = 0; nb < FB_NB; nb++)
        s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < HD; kk += 16) {
        uint32_t a[4];
        fb_frag_a(a, x + kk, G::LD);
#pragma unroll
        for (int nb = 0; nb < FB_NB; nb++)
            fb_mma_nt(s[nb], a, y + nb * 8 * G::LD + kk, G::LD);
    }
}

/* acc[16][HD] += p[16][64] . m[64][HD], p in registers (score layout,
 * rounded here), m a row-major tile. */
template <int HD>
__device__ void fb_accum(float (&acc)[HD / 8][4], const float (&p)[FB_NB][4], const bf16 *m)
{
    typedef fb_geo<HD> G;
#pragma unroll
    for (int kc = 0; kc < FB_NB / 2; kc++) {
        const uint32_t a[4] = {fb_pack(p[2 * kc][0], p[2 * kc][1]),
                               fb_pack(p[2 * kc][2], p[2 * kc][3]),
                               fb_pack(p[2 * kc + 1][0], p[2 * kc + 1][1]),
                               fb_pack(p[2 * kc + 1][2], p[2 * kc + 1][3])};
#pragma unroll
        for (int nb = 0; nb < HD / 8; nb++)
            fb_mma_nn(acc[nb], a, m + 16 * kc * G::LD + nb * 8, G::LD);
    }
}

/* Wait for key/value tile `it` (in buffer it & 1) after issuing tile
 * it + 1, if any, into the other buffer: the forward and dq passes stream
 * K and V tiles of FB_ROWS keys this way, double-buffered. */
template <int HD>
__device__ void fb_next_kv_tile(bf16 *Ks, bf16 *Vs, const fb_args &p, size_t kv_row, size_t kld,
                                int kend, int it, int n_tiles)
{
    typedef fb_geo<HD> G;
    if (it + 1 < n_tiles) {
        const int next = (it + 1) * FB_ROWS, buf = (it + 1) & 1;
        const size_t at = (kv_row + (size_t)next * p.n_kv) * HD;
        fb_issue<HD>(Ks + buf * G::TILE, p.k + at, kld, kend - next);
        fb_issue<HD>(Vs + buf * G::TILE, p.v + at, kld, kend - next);
        fb_commit();
        fb_wait<1>();
    } else {
        fb_wait<0>();
    }
}

template <int HD> __device__ void fb_zero(float (&acc)[HD / 8][4])
{
#pragma unroll
    for (int nb = 0; nb < HD / 8; nb++)
        acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.0f;
}

/* dst[r][d] (+)= scale * acc (a warp's 16 rows in score layout) for rows
 * r < n_rows and d < hd. */
template <int HD>
__device__ void fb_store(float *dst, size_t stride, const float (&acc)[HD / 8][4], int n_rows,
                         int hd, float scale, bool add)
{
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
#pragma unroll
    for (int nb = 0; nb < HD / 8; nb++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int r = g + 8 * (i >> 1), d = nb * 8 + 2 * t + (i & 1);
            if (r < n_rows && d < hd) {
                float *x = dst + (size_t)r * stride + d;
                *x = add ? *x + scale * acc[nb][i] : scale * acc[nb][i];
            }
        }
}

/* op over the 4 threads of a quad (the threads holding one row). */
__device__ inline float fb_quad_max(float v)
{
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ inline float fb_quad_sum(float v)
{
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

/* ---- kernels ----------------------------------------------------------------------------- */

/* One block per (query tile, head, batch row). */
template <int HD> __global__ void __launch_bounds__(FB_THREADS) fb_forward_kernel(fb_args p)
{
    typedef fb_geo<HD> G;
    extern __shared__ __align__(16) unsigned char fb_sm[];
    bf16 *Qs = (bf16 *)fb_sm, *Ks = Qs + G::TILE, *Vs = Ks + 2 * G::TILE; /* K, V: 2 buffers */
    const int w = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const int t0 = (gridDim.x - 1 - blockIdx.x) * FB_ROWS, h = blockIdx.y, bi = blockIdx.z;
    const int kvh = h / p.rep;
    const size_t qld = (size_t)p.H * HD, kld = (size_t)p.n_kv * HD;
    const size_t q_row = ((size_t)bi * p.Tq + t0) * p.H + h; /* in rows of hd */
    const size_t kv_row = (size_t)bi * p.kv_len * p.n_kv + kvh;
    const int nq = min(FB_ROWS, p.Tq - t0);
    const int kend = p.pos0 + t0 + nq; /* keys 0..kend-1 are seen by some row */
    const int n_tiles = (kend + FB_ROWS - 1) / FB_ROWS;
    fb_issue<HD>(Qs, p.q + q_row * HD, qld, nq);
    fb_issue<HD>(Ks, p.k + kv_row * HD, kld, kend);
    fb_issue<HD>(Vs, p.v + kv_row * HD, kld, kend);
    fb_commit();
    /* the thread's rows g and g + 8 of the warp's 16: their last keys */
    const int last0 = p.pos0 + t0 + 16 * w + g, last1 = last0 + 8;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, o[HD / 8][4];
    fb_zero<HD>(o);
    for (int it = 0; it < n_tiles; it++) {
        const int k0 = it * FB_ROWS, buf = it & 1;
        fb_next_kv_tile<HD>(Ks, Vs, p, kv_row, kld, kend, it, n_tiles);
        __syncthreads();
        if (k0 <= p.pos0 + t0 + 16 * w + 15) { /* some row of this warp sees these keys */
            float s[FB_NB][4];
            fb_scores<HD>(s, Qs + 16 * w * G::LD, Ks + buf * G::TILE);
            float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int nb = 0; nb < FB_NB; nb++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int key = k0 + nb * 8 + 2 * t + (i & 1);
                    const bool on = key <= (i < 2 ? last0 : last1) && key < kend;
                    s[nb][i] = on ? s[nb][i] * p.scale : -INFINITY;
                    mx[i >> 1] = fmaxf(mx[i >> 1], s[nb][i]);
                }
            float corr[2];
#pragma unroll
            for (int j = 0; j < 2; j++) {
                /* finite: key 0 is in every row's first tile */
                const float m_new = fmaxf(m[j], fb_quad_max(mx[j]));
                corr[j] = expf(m[j] - m_new);
                m[j] = m_new;
                l[j] *= corr[j];
            }
#pragma unroll
            for (int nb = 0; nb < FB_NB; nb++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    s[nb][i] = expf(s[nb][i] - m[i >> 1]);
                    l[i >> 1] += s[nb][i];
                }
#pragma unroll
            for (int nb = 0; nb < HD / 8; nb++)
#pragma unroll
                for (int i = 0; i < 4; i++)
                    o[nb][i] *= corr[i >> 1];
            fb_accum<HD>(o, s, Vs + buf * G::TILE);
        }
        __syncthreads(); /* every warp is done with buf before it is refilled */
    }
    float inv[2];
#pragma unroll
    for (int j = 0; j < 2; j++) {
        l[j] = fb_quad_sum(l[j]);
        inv[j] = 1.0f / l[j];
        const int row = 16 * w + g + 8 * j;
        if (row < nq && t == 0)
            p.lse[((size_t)bi * p.H + h) * p.Tq + t0 + row] = m[j] + logf(l[j]);
    }
#pragma unroll
    for (int nb = 0; nb < HD / 8; nb++)
#pragma unroll
        for (int i = 0; i < 4; i++)
            o[nb][i] *= inv[i >> 1];
    const size_t qf = (size_t)p.H * p.hd;
    fb_store<HD>(p.out + (q_row + (size_t)16 * w * p.H) * p.hd, qf, o, nq - 16 * w, p.hd, 1.0f,
                 false);
}

/* One block per (key tile, kv head, batch row): dk and dv of its keys,
 * summed over the rep query heads and the query tiles at or after it. */
template <int HD> __global__ void __launch_bounds__(FB_THREADS) fb_dkdv_kernel(fb_args p)
{
    typedef fb_geo<HD> G;
    extern __shared__ __align__(16) unsigned char fb_sm[];
    /* K, V; then Q, dO, and the rows' lse and D, two buffers each */
    bf16 *Ks = (bf16 *)fb_sm, *Vs = Ks + G::TILE, *Qs = Vs + G::TILE, *Os = Qs + 2 * G::TILE;
    float *rows = (float *)(Os + 2 * G::TILE); /* [2][lse 64, D 64] */
    const int w = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const int T = p.Tq, k0 = blockIdx.x * FB_ROWS, kvh = blockIdx.y, bi = blockIdx.z;
    const size_t qld = (size_t)p.H * HD, kld = (size_t)p.n_kv * HD;
    const int nk = min(FB_ROWS, T - k0);
    const size_t kv_row = ((size_t)bi * T + k0) * p.n_kv + kvh;
    const int n_qt = (T - k0 + FB_ROWS - 1) / FB_ROWS; /* earlier queries see none of these keys */
    const int n_it = p.rep * n_qt;
    fb_issue<HD>(Ks, p.k + kv_row * HD, kld, nk);
    fb_issue<HD>(Vs, p.v + kv_row * HD, kld, nk);
    /* iteration it: query head g * rep + it / n_qt, query tile it % n_qt */
    auto issue = [&](int it, int buf) {
        const int h = kvh * p.rep + it / n_qt, q0 = k0 + it % n_qt * FB_ROWS;
        const int nq = min(FB_ROWS, T - q0);
        const size_t q_row = ((size_t)bi * T + q0) * p.H + h;
        const size_t row_at = ((size_t)bi * p.H + h) * T + q0;
        fb_issue<HD>(Qs + buf * G::TILE, p.q + q_row * HD, qld, nq);
        fb_issue<HD>(Os + buf * G::TILE, p.dout + q_row * HD, qld, nq);
        float *r = rows + buf * 2 * FB_ROWS;
        if (threadIdx.x < FB_ROWS)
            fb_issue_rows(r, p.lse + row_at, nq, threadIdx.x);
        else
            fb_issue_rows(r + FB_ROWS, p.D + row_at, nq, threadIdx.x - FB_ROWS);
        fb_commit();
    };
    issue(0, 0);
    float dk[HD / 8][4], dv[HD / 8][4];
    fb_zero<HD>(dk);
    fb_zero<HD>(dv);
    const int key0 = k0 + 16 * w + g; /* the thread's keys: key0 and key0 + 8 */
    for (int it = 0; it < n_it; it++) {
        const int buf = it & 1, q0 = k0 + it % n_qt * FB_ROWS;
        const int nq = min(FB_ROWS, T - q0);
        if (it + 1 < n_it) {
            issue(it + 1, buf ^ 1);
            fb_wait<1>();
        } else {
            fb_wait<0>();
        }
        __syncthreads();
        const bf16 *Qb = Qs + buf * G::TILE, *Ob = Os + buf * G::TILE;
        const float *lse_s = rows + buf * 2 * FB_ROWS, *D_s = lse_s + FB_ROWS;
        float s[FB_NB][4], dp[FB_NB][4]; /* [key][query] */
        fb_scores<HD>(s, Ks + 16 * w * G::LD, Qb);
        fb_scores<HD>(dp, Vs + 16 * w * G::LD, Ob);
#pragma unroll
        for (int nb = 0; nb < FB_NB; nb++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int qc = nb * 8 + 2 * t + (i & 1);
                const bool on = qc < nq && q0 + qc >= key0 + 8 * (i >> 1);
                const float pr = on ? expf(s[nb][i] * p.scale - lse_s[qc]) : 0.0f;
                s[nb][i] = pr;
                dp[nb][i] = pr * (dp[nb][i] - D_s[qc]);
            }
        fb_accum<HD>(dv, s, Ob);  /* dv += P^T dO */
        fb_accum<HD>(dk, dp, Qb); /* dk += dS^T Q */
        __syncthreads(); /* every warp is done with buf before it is refilled */
    }
    const size_t kf = (size_t)p.n_kv * p.hd, at = (kv_row + (size_t)16 * w * p.n_kv) * p.hd;
    fb_store<HD>(p.dk + at, kf, dk, nk - 16 * w, p.hd, p.scale, true);
    fb_store<HD>(p.dv + at, kf, dv, nk - 16 * w, p.hd, 1.0f, true);
}

/* One block per (query tile, head, batch row): dq of its rows. */
template <int HD> __global__ void __launch_bounds__(FB_THREADS) fb_dq_kernel(fb_args p)
{
    typedef fb_geo<HD> G;
    extern __shared__ __align__(16) unsigned char fb_sm[];
    /* Q, dO; K and V two buffers each */
    bf16 *Qs = (bf16 *)fb_sm, *Os = Qs + G::TILE, *Ks = Os + G::TILE, *Vs = Ks + 2 * G::TILE;
    const int w = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const int T = p.Tq, q0 = (gridDim.x - 1 - blockIdx.x) * FB_ROWS, h = blockIdx.y;
    const int bi = blockIdx.z, kvh = h / p.rep;
    const size_t qld = (size_t)p.H * HD, kld = (size_t)p.n_kv * HD;
    const int nq = min(FB_ROWS, T - q0);
    const size_t q_row = ((size_t)bi * T + q0) * p.H + h;
    const size_t kv_row = (size_t)bi * T * p.n_kv + kvh;
    const size_t row_at = ((size_t)bi * p.H + h) * T + q0;
    const int kend = q0 + nq, n_tiles = (kend + FB_ROWS - 1) / FB_ROWS;
    fb_issue<HD>(Qs, p.q + q_row * HD, qld, nq);
    fb_issue<HD>(Os, p.dout + q_row * HD, qld, nq);
    fb_issue<HD>(Ks, p.k + kv_row * HD, kld, kend);
    fb_issue<HD>(Vs, p.v + kv_row * HD, kld, kend);
    fb_commit();
    const int row0 = 16 * w + g; /* the thread's rows: row0 and row0 + 8 */
    float lse[2], D[2], dq[HD / 8][4];
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const int r = row0 + 8 * j;
        lse[j] = r < nq ? p.lse[row_at + r] : 0.0f;
        D[j] = r < nq ? p.D[row_at + r] : 0.0f;
    }
    fb_zero<HD>(dq);
    for (int it = 0; it < n_tiles; it++) {
        const int k0 = it * FB_ROWS, buf = it & 1;
        fb_next_kv_tile<HD>(Ks, Vs, p, kv_row, kld, kend, it, n_tiles);
        __syncthreads();
        if (k0 <= q0 + 16 * w + 15) { /* some row of this warp sees these keys */
            const bf16 *Kb = Ks + buf * G::TILE;
            float s[FB_NB][4], dp[FB_NB][4];
            fb_scores<HD>(s, Qs + 16 * w * G::LD, Kb);
            fb_scores<HD>(dp, Os + 16 * w * G::LD, Vs + buf * G::TILE);
#pragma unroll
            for (int nb = 0; nb < FB_NB; nb++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int r = row0 + 8 * (i >> 1), key = k0 + nb * 8 + 2 * t + (i & 1);
                    const bool on = r < nq && key <= q0 + r;
                    const float pr = on ? expf(s[nb][i] * p.scale - lse[i >> 1]) : 0.0f;
                    dp[nb][i] = pr * (dp[nb][i] - D[i >> 1]);
                }
            fb_accum<HD>(dq, dp, Kb); /* dq += dS K */
        }
        __syncthreads(); /* every warp is done with buf before it is refilled */
    }
    const size_t qf = (size_t)p.H * p.hd;
    fb_store<HD>(p.dq + (q_row + (size_t)16 * w * p.H) * p.hd, qf, dq, nq - 16 * w, p.hd,
                 p.scale, true);
}

/* ---- launch ------------------------------------------------------------------------------ */

enum fb_pass { FB_FORWARD, FB_DKDV, FB_DQ, FB_BACKWARD };

template <int HD> static void fb_launch(qkd__backend *b, fb_pass pass, const fb_args &p, int B)
{
    typedef fb_geo<HD> G;
    void (*kern)(fb_args);
    size_t bytes = 6 * (size_t)G::TILE * sizeof(bf16);
    dim3 grid((unsigned)((p.Tq + FB_ROWS - 1) / FB_ROWS), (unsigned)p.H, (unsigned)B);
    switch (pass) {
    case FB_FORWARD:
        kern = fb_forward_kernel<HD>;
        bytes = 5 * (size_t)G::TILE * sizeof(bf16);
        break;
    case FB_DKDV:
        kern = fb_dkdv_kernel<HD>;
        bytes += 4 * FB_ROWS * sizeof(float); /* lse and D, two buffers */
        grid.y = (unsigned)p.n_kv;
        break;
    default:
        kern = fb_dq_kernel<HD>;
        break;
    }
    if (qkd__cuda_check(b, cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                (int)bytes),
                        "attention_bf16 shared memory") != QKD_OK)
        return;
    kern<<<grid, FB_THREADS, bytes, qkd__cuda_of(b)->stream>>>(p);
    qkd__cuda_launched(b, "attention_bf16");
}

/* x [rows][hd] into its bf16 copy [rows][HD]. */
template <int HD> static void fb_convert(qkd__backend *b, bf16 *dst, const float *x, size_t rows,
                                         int hd)
{
    fb_convert_kernel<HD><<<qkd__cuda_blocks(rows * (HD / 2)), QKD__CUDA_THREADS, 0,
                            qkd__cuda_of(b)->stream>>>(dst, x, rows, hd);
    qkd__cuda_launched(b, "attention_bf16 copies");
}

/* Round q, k, v (and dout when given) into bf16 copies in ws (laid out
 * one after the other, each a multiple of 16 bytes), then run the pass. */
template <int HD>
static void fb_pass_hd(qkd__backend *b, fb_pass pass, fb_args &p, int B, bf16 *ws,
                       const float *q, const float *k, const float *v, const float *dout)
{
    const size_t nq = (size_t)B * p.Tq * p.H, nkv = (size_t)B * p.kv_len * p.n_kv;
    bf16 *qb = ws, *kb = qb + nq * HD, *vb = kb + nkv * HD, *ob = vb + nkv * HD;
    fb_convert<HD>(b, qb, q, nq, p.hd);
    fb_convert<HD>(b, kb, k, nkv, p.hd);
    fb_convert<HD>(b, vb, v, nkv, p.hd);
    if (dout)
        fb_convert<HD>(b, ob, dout, nq, p.hd);
    p.q = qb;
    p.k = kb;
    p.v = vb;
    p.dout = dout ? ob : NULL;
    if (pass == FB_FORWARD) {
        fb_launch<HD>(b, FB_FORWARD, p, B);
    } else {
        fb_launch<HD>(b, FB_DKDV, p, B);
        fb_launch<HD>(b, FB_DQ, p, B);
    }
}

/* The padded head size of the kernels for hd. */
static int fb_hd(int hd)
{
    return hd <= 16 ? 16 : hd <= 32 ? 32 : hd <= 64 ? 64 : 128;
}

/* The pass (forward, or both backward kernels) for the smallest padded
 * head size that holds p.hd, its bf16 copies written to ws. */
static void fb_run(qkd__backend *b, fb_pass pass, fb_args &p, int B, float *ws, const float *q,
                   const float *k, const float *v, const float *dout)
{
    bf16 *copies = (bf16 *)ws;
    switch (fb_hd(p.hd)) {
    case 16: fb_pass_hd<16>(b, pass, p, B, copies, q, k, v, dout); break;
    case 32: fb_pass_hd<32>(b, pass, p, B, copies, q, k, v, dout); break;
    case 64: fb_pass_hd<64>(b, pass, p, B, copies, q, k, v, dout); break;
    default: fb_pass_hd<128>(b, pass, p, B, copies, q, k, v, dout); break;
    }
}

/* Floats of workspace the bf16 copies take. */
static size_t fb_copy_floats(int B, int Tq, int kv_len, int H, int n_kv, int hd, int with_dout)
{
    const size_t HD = (size_t)fb_hd(hd);
    const size_t nq = (size_t)B * Tq * H, nkv = (size_t)B * kv_len * n_kv;
    return ((1 + (size_t)with_dout) * nq + 2 * nkv) * HD / 2;
}

static fb_args fb_make(int Tq, int pos0, int kv_len, int H, int n_kv, int hd)
{
    fb_args p = {};
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
    float *ws = qkd__cuda_workspace(b, fb_copy_floats(B, Tq, kv_len, n_heads, n_kv, hd, 0));
    if (!ws)
        return;
    fb_args p = fb_make(Tq, pos0, kv_len, n_heads, n_kv, hd);
    p.out = out;
    p.lse = scratch;
    fb_run(b, FB_FORWARD, p, B, ws, q, k, v, NULL);
}

extern "C" void qkd__cuda_attention_backward_bf16(qkd__backend *b, float *dq, float *dk,
                                                  float *dv, const float *dout,
                                                  float *scratch, const float *q,
                                                  const float *k, const float *v,
                                                  const float *out, int B, int T, int n_heads,
                                                  int n_kv, int hd)
{
    if (B <= 0 || T <= 0 || hd <= 0 || !qkd__cuda_attention_head_ok(b, hd, FB_MAX_HD))
        return;
    /* D first, then the bf16 copies (16-byte aligned: D rounded up to 4) */
    const size_t rows = (size_t)B * T * n_heads, d_floats = (rows + 3) & ~(size_t)3;
    float *ws =
        qkd__cuda_workspace(b, d_floats + fb_copy_floats(B, T, T, n_heads, n_kv, hd, 1));
    if (!ws)
        return;
    qkd__cuda_attention_rowdots(b, ws, dout, out, B, T, n_heads, hd);
    fb_args p = fb_make(T, 0, T, n_heads, n_kv, hd);
    p.dq = dq;
    p.dk = dk;
    p.dv = dv;
    p.lse = (float *)scratch; /* read only by the backward kernels */
    p.D = ws;
    fb_run(b, FB_BACKWARD, p, B, ws + d_floats, q, k, v, dout);
}
