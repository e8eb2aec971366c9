/* Flash-style causal grouped-query attention on the tensor cores, in the
 * bf16 precision of the attention_*_bf16 slots (backend.h): q, k, v, dout,
 * the probabilities and the score gradients are rounded to bf16 (nearest
 * even) as they enter a product; products accumulate in fp32 (mma.sync
 * m16n8k16), softmax and its running max and sum stay fp32.
 *
 * The scheme is attention.cu's (FlashAttention-2): the forward walks the
 * key tiles of a query tile with an online softmax and saves each row's
 * logsumexp; the backward recomputes the probabilities per tile from it,
 * in two kernels without atomics (dk and dv per key tile, then dq per
 * query tile). A block is 4 warps. Each warp owns 16 rows (keys in dk/dv,
 * queries in dq) or, in the forward for head sizes up to 64, 32 query
 * rows, so that every key and value fragment it loads feeds two products.
 * Scores stay in registers: an m16n8k16 accumulator holds rows g and
 * g + 8 (g = lane / 4) at columns 2 t and 2 t + 1 (t = lane % 4) of each
 * 8-column block, which is the layout of the A operand of the next
 * product, so probabilities and score gradients go to the tensor cores
 * without shared memory, and the online softmax rescales each thread's two
 * rows of the output in place. The forward first rounds q, k and v once
 * into bf16 copies whose rows are padded with zeros to the kernel's head
 * size (q and k rotated by RoPE on the way when asked), kept in the
 * caller's scratch for the backward, which rounds only dout (taking each
 * row's dot of dout and out, D, in the same pass); tiles then stream into
 * shared memory with cp.async (the Hopper kernels: by tensor map), the
 * next tile's copy in flight while the current one is computed (two
 * buffers). Outputs are stored in
 * fp32 or bf16 (fb_store), the gradients of q and k rotated back first.
 * Tiles are row-major [row][d]; fragments come from them by ldmatrix (four
 * 8x8 matrices a load), .trans for a product that reads a tile along its
 * rows (v in the forward, k in dq, q and dout in dk/dv). On Hopper (an
 * sm_90a build on a compute capability 9.0 device) head size 64 runs on
 * the warpgroup products instead, forward and backward (the fw_ kernels,
 * below).
 *
 * Exponentials are exp2 of the scores times scale * log2(e) minus the
 * row's max (or logsumexp) in the same unit, one fused multiply-add and
 * the hardware's ex2 (relative error about 2^-22, far inside the bf16
 * rounding the probabilities then get). Only tiles that straddle the
 * causal diagonal apply the mask. Blocks are launched longest first (the
 * tile index is the grid's slowest dimension).
 *
 * One difference from the reference in rounding: the forward rounds the
 * probabilities relative to the running max (exp(s - m), divided by the
 * row sum at the end) where the reference rounds the normalised ones;
 * both are within 2^-9 of the exact value, so outputs differ by at most
 * 2^-8 of sum_key p |v|. */
#include <cuda.h>
#include <cuda_bf16.h>

#include "backend/cuda/common.cuh"

typedef __nv_bfloat16 bf16;

#define FB_WARPS 4
#define FB_THREADS (32 * FB_WARPS)
#define FB_ROWS 64 /* rows of a key tile, and of the backward's query tiles */
#define FB_NB (FB_ROWS / 8) /* 8-column blocks of a score tile */
#define FB_MAX_HD 128
#define FB_LOG2E 1.4426950408889634f
#define FB_LN2 0.6931471805599453f

/* Everything one attention call touches; unused members are NULL. The
 * bf16 copies have rows of HD (the kernel's padded head size): row
 * strides H * HD (q, dout) and n_kv * HD (k, v). */
struct fb_args {
    float *out, *lse, *dq, *dk, *dv;
    bf16 *out_bits; /* the forward's out in bf16 too; NULL: none */
    bf16 *dq16, *dk16, *dv16; /* the backward's gradients in bf16 instead; NULL: fp32 */
    size_t ld16; /* their row stride: a token's dq, dk and dv side by side */
    const bf16 *q, *k, *v, *dout;
    const float *D;
    const double2 *rope; /* the backward's: dq and dk rotated back as stored; NULL: none */
    float *dkv_part; /* the Hopper dk/dv's partial sums, kv_split > 1: dk's [split][rows], dv's */
    int Tq, pos0, kv_len, H, n_kv, hd, rep;
    int kv_split; /* blocks a kv head's query heads are split over in the Hopper dk/dv */
    float scale, scale2; /* 1 / sqrt(hd); scale * log2(e): scores into exp2's unit */
    CUtensorMap mq, mk, mv, mo; /* the Hopper kernels' tensor maps of q, k, v and dout (fw_map) */
};

/* Row stride (bf16 elements) of the [rows][HD] tiles for a padded head
 * size HD: the 8-element pad puts the 8 rows an ldmatrix matrix spans in
 * 8 different bank quads, and keeps rows 16-byte aligned. */
template <int HD> struct fb_geo {
    static constexpr int LD = HD + 8;
    static constexpr int TILE = FB_ROWS * LD;
};

/* 16-row groups a forward warp owns: two while the registers allow. */
template <int HD> struct fb_fwd {
    static constexpr int MI = HD <= 64 ? 2 : 1;
    static constexpr int ROWS = FB_WARPS * 16 * MI; /* query rows of a block */
};

/* ---- tiles ------------------------------------------------------------------------------ */

/* Where rows of a copy sit for RoPE: row r ([b][t][head]) at position
 * pos0 + (r / heads) % T; tab NULL: no rotation. */
struct fb_rope {
    const double2 *tab;
    int T, heads, pos0;
};

/* (x0, x1), the pair j of a row at position pos, rotated as rope_kernel
 * rotates it (sign -1: back). */
__device__ inline void fb_rotate(float &x0, float &x1, const double2 *tab, int hd, int pos,
                                 int j, double sign)
{
    const double2 cs = tab[(size_t)pos * (hd / 2) + j];
    const double sn = sign * cs.y, a = x0, b = x1;
    x0 = (float)(a * cs.x - b * sn);
    x1 = (float)(a * sn + b * cs.x);
}

/* The position of row r of a copy, in 32-bit arithmetic where r fits:
 * a 64-bit division costs several times more, once per row segment. */
__device__ inline int fb_pos(size_t r, const fb_rope &rope)
{
    if (r <= UINT32_MAX)
        return rope.pos0 + (int)((uint32_t)r / (uint32_t)rope.heads % (uint32_t)rope.T);
    return rope.pos0 + (int)(r / rope.heads % rope.T);
}

/* The backward's row dots, D[b][h][t] = sum_d dout[r][d] out[r][d] for
 * row r = [b][t][h] of dout, taken by the pass that rounds dout: a kernel
 * of their own read dout a second time. out in fp32, or (out16) as bf16
 * bits; D NULL: none. */
struct fb_dots {
    const float *out;
    const bf16 *out16;
    float *D;
    int T, H;
};

/* v = x[d0..d0+7], zeros at and past hd: two 16-byte loads where the
 * eight lie in the row and are aligned. */
__device__ inline void fb_load8(float (&v)[8], const float *x, int d0, int hd)
{
    const float *at = x + d0;
    if (d0 + 8 <= hd && ((uintptr_t)at & 15) == 0) {
        const float4 a = ((const float4 *)at)[0], b = ((const float4 *)at)[1];
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
        v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
        return;
    }
#pragma unroll
    for (int k = 0; k < 8; k++)
        v[k] = d0 + k < hd ? at[k] : 0.0f;
}

/* fb_load8 of bf16 values: one 16-byte load where aligned. */
__device__ inline void fb_load8(float (&v)[8], const bf16 *x, int d0, int hd)
{
    const bf16 *at = x + d0;
    if (d0 + 8 <= hd && ((uintptr_t)at & 15) == 0) {
        const uint4 u = *(const uint4 *)at;
        const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            v[2 * k] = __uint_as_float(w[k] << 16);
            v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
        }
        return;
    }
#pragma unroll
    for (int k = 0; k < 8; k++)
        v[k] = d0 + k < hd ? __bfloat162float(at[k]) : 0.0f;
}

/* Row r's dot (dots) from its G = HD / 8 threads, each holding dout's
 * d0..d0+7 in v: neighbours in one warp, aligned to G, and all live or
 * none (rows * G items, G a power of two dividing the block), so they
 * add their parts by shuffles among themselves. */
template <int HD>
__device__ void fb_row_dot(const fb_dots &dots, const float (&v)[8], size_t r, int d0, int hd)
{
    constexpr int G = HD / 8;
    const int lane = threadIdx.x & 31;
    const unsigned group = G == 32 ? 0xffffffffu : ((1u << G) - 1) << (lane & ~(G - 1));
    float o[8], dot = 0.0f;
    if (dots.out16)
        fb_load8(o, dots.out16 + r * hd, d0, hd);
    else
        fb_load8(o, dots.out + r * hd, d0, hd);
#pragma unroll
    for (int k = 0; k < 8; k++)
        dot = fmaf(v[k], o[k], dot);
    dot = qkd__lanes_reduce(dot, qkd__sum_op<float>(), G, group);
    if (d0 == 0) {
        const size_t t = r / dots.H % dots.T, h = r % dots.H, bi = r / ((size_t)dots.H * dots.T);
        dots.D[(bi * dots.H + h) * dots.T + t] = dot;
    }
}

/* One bf16 copy: dst[r][d] = bf16(src[r][d]) for d < hd, 0 for hd <= d
 * < HD, rows of hd floats into rows of HD bf16 values, RoPE applied first
 * where rope says, the row dots taken on the way where dots says. */
struct fb_copy {
    bf16 *dst;
    const float *src;
    size_t rows;
    fb_rope rope;
    fb_dots dots;
};

/* Item i of copy c: 8 values of a row (one 16-byte store; HD is a
 * multiple of 8). */
template <int HD> __device__ void fb_convert_item(const fb_copy &c, size_t i, int hd)
{
    const size_t r = i / (HD / 8);
    const int d0 = (int)(i % (HD / 8)) * 8;
    float v[8];
    fb_load8(v, c.src + r * hd, d0, hd);
    if (c.dots.D)
        fb_row_dot<HD>(c.dots, v, r, d0, hd);
    if (c.rope.tab) {
        const int pos = fb_pos(r, c.rope);
#pragma unroll
        for (int k = 0; k < 4; k++)
            if (d0 + 2 * k + 1 < hd)
                fb_rotate(v[2 * k], v[2 * k + 1], c.rope.tab, hd, pos, d0 / 2 + k, 1.0);
    }
    uint32_t out[4];
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const __nv_bfloat162 b2 = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
        out[k] = *(const uint32_t *)&b2;
    }
    *(uint4 *)(c.dst + r * HD + d0) = make_uint4(out[0], out[1], out[2], out[3]);
}

/* Up to three copies in one launch (the forward's q, k and v: two fewer
 * launches and tails), their items one after the other. Copy a's items
 * start at 0, so a row's HD / 8 items lie in neighbouring lanes of one
 * warp, as fb_row_dot needs: only a takes row dots. */
template <int HD> __global__ void fb_convert_kernel(fb_copy a, fb_copy b, fb_copy c, int hd)
{
    const size_t na = a.rows * (HD / 8), nab = na + b.rows * (HD / 8);
    QKD__CUDA_FOR(i, nab + c.rows * (HD / 8))
    {
        if (i < na)
            fb_convert_item<HD>(a, i, hd);
        else if (i < nab)
            fb_convert_item<HD>(b, i - na, hd);
        else
            fb_convert_item<HD>(c, i - nab, hd);
    }
}

/* Copy 16 bytes to shared memory asynchronously; zeros when not valid
 * (src is then not read). */
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

/* Start copying rows 0..ROWS-1 of a bf16 copy (row stride `stride`) into
 * a tile; rows past n_rows become zeros (0 * NaN would be NaN). */
template <int HD, int ROWS = FB_ROWS>
__device__ void fb_issue(bf16 *dst, const bf16 *src, size_t stride, int n_rows)
{
    for (int i = threadIdx.x; i < ROWS * HD / 8; i += FB_THREADS) {
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

/* 2^x, flushing results below 2^-126 to zero. */
__device__ inline float fb_exp2(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/* Four 8x8 bf16 matrices from shared memory, lane l addressing a row of
 * matrix l / 8; .trans hands each thread a column pair instead. */
template <bool TRANS> __device__ inline void fb_ldm4(uint32_t (&r)[4], const bf16 *row)
{
    const uint32_t at = (uint32_t)__cvta_generic_to_shared(row);
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(at));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(at));
}

/* c += a . b, a 16x16 (row), b 16x8 (col), bf16 in, fp32 accumulators. */
__device__ inline void fb_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* The A fragment of rows 0..15, columns 0..15 of x (row stride ld):
 * matrices (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15). */
__device__ inline void fb_frag_a(uint32_t (&a)[4], const bf16 *x, int ld)
{
    const int l = threadIdx.x & 31;
    fb_ldm4<false>(a, x + (l & 15) * ld + (l >> 4) * 8);
}

/* s[mi][16][64] = x[16 MI][HD] . y[64][HD]^T: a warp's 16 MI rows of one
 * row-major tile against all 64 rows of another. The B fragments of
 * 8-column blocks nb and nb + 1 are one ldmatrix: y's rows nb * 8 + 0..7
 * at columns kk and kk + 8, then the same for nb + 1. */
template <int HD, int MI>
__device__ void fb_scores(float (&s)[MI][FB_NB][4], const bf16 *x, const bf16 *y)
{
    typedef fb_geo<HD> G;
    const int l = threadIdx.x & 31;
    const bf16 *yl = y + ((l & 7) + (l >> 4) * 8) * G::LD + ((l >> 3) & 1) * 8;
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int nb = 0; nb < FB_NB; nb++)
            s[mi][nb][0] = s[mi][nb][1] = s[mi][nb][2] = s[mi][nb][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < HD; kk += 16) {
        uint32_t a[MI][4];
#pragma unroll
        for (int mi = 0; mi < MI; mi++)
            fb_frag_a(a[mi], x + 16 * mi * G::LD + kk, G::LD);
#pragma unroll
        for (int nb = 0; nb < FB_NB; nb += 2) {
            uint32_t b[4];
            fb_ldm4<false>(b, yl + nb * 8 * G::LD + kk);
#pragma unroll
            for (int mi = 0; mi < MI; mi++) {
                fb_mma(s[mi][nb], a[mi], b[0], b[1]);
                fb_mma(s[mi][nb + 1], a[mi], b[2], b[3]);
            }
        }
    }
}

/* The A fragment of key columns 16 kc .. 16 kc + 15 of probabilities p
 * (score layout: NB 8-column blocks), rounded to bf16. */
template <int NB>
__device__ inline void fb_frag_p(uint32_t (&a)[4], const float (&p)[NB][4], int kc)
{
    a[0] = fb_pack(p[2 * kc][0], p[2 * kc][1]);
    a[1] = fb_pack(p[2 * kc][2], p[2 * kc][3]);
    a[2] = fb_pack(p[2 * kc + 1][0], p[2 * kc + 1][1]);
    a[3] = fb_pack(p[2 * kc + 1][2], p[2 * kc + 1][3]);
}

/* acc[mi][16][HD] += p[mi][16][64] . m[64][HD], p in registers (score
 * layout, rounded here), m a row-major tile: ldmatrix .trans of m's rows
 * 16 kc + 0..15 at columns nb * 8 and nb * 8 + 8 gives the B fragments of
 * blocks nb and nb + 1. */
template <int HD, int MI>
__device__ void fb_accum(float (&acc)[MI][HD / 8][4], const float (&p)[MI][FB_NB][4],
                         const bf16 *m)
{
    typedef fb_geo<HD> G;
    const int l = threadIdx.x & 31;
    const bf16 *ml = m + (l & 15) * G::LD + (l >> 4) * 8;
#pragma unroll
    for (int kc = 0; kc < FB_NB / 2; kc++) {
        uint32_t a[MI][4];
#pragma unroll
        for (int mi = 0; mi < MI; mi++)
            fb_frag_p(a[mi], p[mi], kc);
#pragma unroll
        for (int nb = 0; nb < HD / 8; nb += 2) {
            uint32_t b[4];
            fb_ldm4<true>(b, ml + 16 * kc * G::LD + nb * 8);
#pragma unroll
            for (int mi = 0; mi < MI; mi++) {
                fb_mma(acc[mi][nb], a[mi], b[0], b[1]);
                fb_mma(acc[mi][nb + 1], a[mi], b[2], b[3]);
            }
        }
    }
}

/* Wait for tile `it` of n_tiles after starting tile it + 1's copies, if
 * any, as a group with issue(it + 1): how the kernels stream their tiles,
 * double-buffered (tile j in buffer j & 1). */
template <typename Issue> __device__ inline void fb_next_tile(const Issue &issue, int it, int n_tiles)
{
    if (it + 1 < n_tiles) {
        issue(it + 1);
        fb_wait<1>();
    } else {
        fb_wait<0>();
    }
}

/* fb_next_tile for the forward and dq passes: K and V tiles of FB_ROWS
 * keys. */
template <int HD>
__device__ void fb_next_kv_tile(bf16 *Ks, bf16 *Vs, const fb_args &p, size_t kv_row, size_t kld,
                                int kend, int it, int n_tiles)
{
    typedef fb_geo<HD> G;
    fb_next_tile(
        [&](int j) {
            const int next = j * FB_ROWS, buf = j & 1;
            const size_t at = (kv_row + (size_t)next * p.n_kv) * HD;
            fb_issue<HD>(Ks + buf * G::TILE, p.k + at, kld, kend - next);
            fb_issue<HD>(Vs + buf * G::TILE, p.v + at, kld, kend - next);
            fb_commit();
        },
        it, n_tiles);
}

template <int HD, int MI> __device__ void fb_zero(float (&acc)[MI][HD / 8][4])
{
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int nb = 0; nb < HD / 8; nb++)
            acc[mi][nb][0] = acc[mi][nb][1] = acc[mi][nb][2] = acc[mi][nb][3] = 0.0f;
}

/* x[0] (and x[1] where two) = v as the output's type: fp32, or bf16
 * (a column pair in one store where aligned). */
__device__ inline void fb_put(float *x, const float (&v)[2], int two)
{
    x[0] = v[0];
    if (two)
        x[1] = v[1];
}

__device__ inline void fb_put(bf16 *x, const float (&v)[2], int two)
{
    if (two && ((size_t)x & 3) == 0) {
        *(__nv_bfloat162 *)x = __floats2bfloat162_rn(v[0], v[1]);
        return;
    }
    x[0] = __float2bfloat16_rn(v[0]);
    if (two)
        x[1] = __float2bfloat16_rn(v[1]);
}

/* dst[r][d] = scale * acc (a warp's 16 rows in score layout) for rows
 * r < n_rows and d < hd, in fp32 or bf16 (T). With a RoPE table, each
 * thread's column pair (2 t, 2 t + 1) of row r is first rotated back from
 * position pos + r: the gradient of the un-rotated rows. */
template <int HD, typename T>
__device__ void fb_store(T *dst, size_t stride, const float (&acc)[HD / 8][4], int n_rows, int hd,
                         float scale, const double2 *rope = NULL, int pos = 0)
{
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
#pragma unroll
    for (int nb = 0; nb < HD / 8; nb++)
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int r = g + 8 * half, d = nb * 8 + 2 * t;
            if (r >= n_rows || d >= hd)
                continue;
            float v[2] = {scale * acc[nb][2 * half], scale * acc[nb][2 * half + 1]};
            if (rope && d + 1 < hd)
                fb_rotate(v[0], v[1], rope, hd, pos + r, d / 2, -1.0);
            fb_put(dst + (size_t)r * stride + d, v, d + 1 < hd);
        }
}

/* A backward gradient's rows from row `row` on (rows of hd, `heads` a
 * token): into its fp32 rows, or into its bf16 rows when given (ld16 a
 * token, head h from column h hd on). */
template <int HD>
__device__ void fb_store_grad(float *dst, bf16 *dst16, size_t row, int heads, const fb_args &p,
                              const float (&acc)[HD / 8][4], int n_rows, float scale,
                              const double2 *rope = NULL, int pos = 0)
{
    if (dst16)
        fb_store<HD>(dst16 + row / heads * p.ld16 + row % heads * p.hd, p.ld16, acc, n_rows,
                     p.hd, scale, rope, pos);
    else
        fb_store<HD>(dst + row * p.hd, (size_t)heads * p.hd, acc, n_rows, p.hd, scale, rope,
                     pos);
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

/* -inf at the scores of keys after the row's last: the thread's rows are
 * g and g + 8 of a 16-row group whose row g sees keys up to last0, its
 * columns are keys k0 + nb * 8 + 2 t (+ 1) of NB 8-column blocks. */
template <int NB> __device__ inline void fb_mask(float (&s)[NB][4], int k0, int last0)
{
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int nb = 0; nb < NB; nb++)
#pragma unroll
        for (int i = 0; i < 4; i++)
            if (k0 + nb * 8 + 2 * t + (i & 1) > last0 + 8 * (i >> 1))
                s[nb][i] = -INFINITY;
}

/* One key tile of a 16-row group in the online softmax: s (raw scores of
 * NB 8-column blocks, masked) into probabilities relative to the new
 * running max m (in exp2's unit), the row sums l rescaled to it; corr:
 * the factor that rescales the rows' output. */
template <int NB>
__device__ void fb_softmax(float (&s)[NB][4], float (&m)[2], float (&l)[2], float (&corr)[2],
                           float scale2)
{
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nb = 0; nb < NB; nb++)
#pragma unroll
        for (int i = 0; i < 4; i++)
            mx[i >> 1] = fmaxf(mx[i >> 1], s[nb][i]);
#pragma unroll
    for (int j = 0; j < 2; j++) {
        /* finite: key 0 is in every row's first tile; scale2 > 0 keeps the max */
        const float m_new = fmaxf(m[j], fb_quad_max(mx[j]) * scale2);
        corr[j] = fb_exp2(m[j] - m_new);
        m[j] = m_new;
        l[j] *= corr[j];
    }
#pragma unroll
    for (int nb = 0; nb < NB; nb++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            s[nb][i] = fb_exp2(__fmaf_rn(s[nb][i], scale2, -m[i >> 1]));
            l[i >> 1] += s[nb][i];
        }
}

/* The rows' output rescaled to their new running max. */
template <int HD> __device__ void fb_rescale(float (&o)[HD / 8][4], const float (&corr)[2])
{
#pragma unroll
    for (int nb = 0; nb < HD / 8; nb++)
#pragma unroll
        for (int i = 0; i < 4; i++)
            o[nb][i] *= corr[i >> 1];
}

/* ---- kernels ----------------------------------------------------------------------------- */

/* The forward's end for the 16-row group at row r0 of the query tile at
 * t0 (nq rows; q_row: its first row of q): each row's sum over its quad,
 * its logsumexp saved, its output normalised and stored. */
template <int HD>
__device__ void fb_forward_rows(const fb_args &p, float (&m)[2], float (&l)[2],
                                float (&o)[HD / 8][4], int bi, int h, int t0, int r0, int nq,
                                size_t q_row)
{
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const size_t qf = (size_t)p.H * p.hd, at = (q_row + (size_t)r0 * p.H) * p.hd;
    float inv[2];
#pragma unroll
    for (int j = 0; j < 2; j++) {
        l[j] = fb_quad_sum(l[j]);
        inv[j] = 1.0f / l[j];
        const int row = r0 + g + 8 * j;
        if (row < nq && t == 0)
            p.lse[((size_t)bi * p.H + h) * p.Tq + t0 + row] = m[j] * FB_LN2 + logf(l[j]);
    }
#pragma unroll
    for (int nb = 0; nb < HD / 8; nb++)
#pragma unroll
        for (int i = 0; i < 4; i++)
            o[nb][i] *= inv[i >> 1];
    if (p.out)
        fb_store<HD>(p.out + at, qf, o, nq - r0, p.hd, 1.0f);
    if (p.out_bits)
        fb_store<HD>(p.out_bits + at, qf, o, nq - r0, p.hd, 1.0f);
}

/* One block per (head, batch row, query tile), longest tiles first. Up to
 * head size 64, three blocks an SM: 168 registers (nvcc 13 spills 4 bytes
 * for sm_80), where the unbounded 228 allowed two (docs/benchmarks.md has
 * the comparison). */
template <int HD>
__global__ void __launch_bounds__(FB_THREADS, HD <= 64 ? 3 : 1) fb_forward_kernel(fb_args p)
{
    typedef fb_geo<HD> G;
    constexpr int MI = fb_fwd<HD>::MI, BM = fb_fwd<HD>::ROWS;
    extern __shared__ __align__(16) unsigned char fb_sm[];
    bf16 *Qs = (bf16 *)fb_sm, *Ks = Qs + BM * G::LD, *Vs = Ks + 2 * G::TILE; /* K, V: 2 buffers */
    const int w = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2;
    const int t0 = (gridDim.z - 1 - blockIdx.z) * BM, h = blockIdx.x, bi = blockIdx.y;
    const int kvh = h / p.rep;
    const size_t qld = (size_t)p.H * HD, kld = (size_t)p.n_kv * HD;
    const size_t q_row = ((size_t)bi * p.Tq + t0) * p.H + h; /* in rows of hd */
    const size_t kv_row = (size_t)bi * p.kv_len * p.n_kv + kvh;
    const int nq = min(BM, p.Tq - t0);
    const int kend = p.pos0 + t0 + nq; /* keys 0..kend-1 are seen by some row */
    const int n_tiles = (kend + FB_ROWS - 1) / FB_ROWS;
    fb_issue<HD, BM>(Qs, p.q + q_row * HD, qld, nq);
    fb_issue<HD>(Ks, p.k + kv_row * HD, kld, kend);
    fb_issue<HD>(Vs, p.v + kv_row * HD, kld, kend);
    fb_commit();
    /* the last key of the warp's first row; rows past nq are zeros, unused */
    const int first = p.pos0 + t0 + 16 * MI * w;
    float m[MI][2], l[MI][2], o[MI][HD / 8][4];
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
        m[mi][0] = m[mi][1] = -INFINITY, l[mi][0] = l[mi][1] = 0.0f;
    fb_zero<HD, MI>(o);
    for (int it = 0; it < n_tiles; it++) {
        const int k0 = it * FB_ROWS, buf = it & 1;
        fb_next_kv_tile<HD>(Ks, Vs, p, kv_row, kld, kend, it, n_tiles);
        __syncthreads();
        if (k0 <= first + 16 * MI - 1) { /* some row of this warp sees these keys */
            float s[MI][FB_NB][4];
            fb_scores<HD, MI>(s, Qs + 16 * MI * w * G::LD, Ks + buf * G::TILE);
#pragma unroll
            for (int mi = 0; mi < MI; mi++) {
                if (k0 + FB_ROWS - 1 > first + 16 * mi) /* the tile crosses the diagonal */
                    fb_mask(s[mi], k0, first + 16 * mi + g);
                float corr[2];
                fb_softmax(s[mi], m[mi], l[mi], corr, p.scale2);
                fb_rescale<HD>(o[mi], corr);
            }
            fb_accum<HD, MI>(o, s, Vs + buf * G::TILE);
        }
        __syncthreads(); /* every warp is done with buf before it is refilled */
    }
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
        fb_forward_rows<HD>(p, m[mi], l[mi], o[mi], bi, h, t0, 16 * (MI * w + mi), nq, q_row);
}

/* The query tile that iteration `it` of a dk/dv block (keys from k0,
 * query heads from h0) reads: query head h0 + it / n_qt, query tile
 * it % n_qt of those at or after k0 (earlier queries see none of its
 * keys). */
struct fb_qtile {
    int h, q0, n;  /* its query head, its first query and its number of rows */
    size_t row;    /* its first row of q and dout */
    size_t row_at; /* its first row of lse and D */
};

__device__ inline fb_qtile fb_dkdv_qtile(const fb_args &p, int h0, int bi, int k0, int n_qt,
                                         int it)
{
    const int h = h0 + it / n_qt;
    fb_qtile q;
    q.h = h;
    q.q0 = k0 + it % n_qt * FB_ROWS;
    q.n = min(FB_ROWS, p.Tq - q.q0);
    q.row = ((size_t)bi * p.Tq + q.q0) * p.H + h;
    q.row_at = ((size_t)bi * p.H + h) * p.Tq + q.q0;
    return q;
}

/* Start copying a query tile's lse and D (FB_ROWS each, zeros past its
 * rows) into r: the block's first half of threads the one, the rest the
 * other. */
__device__ inline void fb_issue_lse_d(float *r, const fb_args &p, const fb_qtile &q)
{
    if (threadIdx.x < FB_ROWS)
        fb_issue_rows(r, p.lse + q.row_at, q.n, threadIdx.x);
    else
        fb_issue_rows(r + FB_ROWS, p.D + q.row_at, q.n, threadIdx.x - FB_ROWS);
}

/* A dk/dv tile's scores s and dp = V dO^T, [key][query] in the score
 * layout (the thread's keys kr and kr + 8 of the tile, its queries at
 * columns nb * 8 + 2 t (+ 1)), into P^T and dS^T. Query columns past T
 * are zeros with lse = D = 0: p = 1, dp = 0, no contribution; only the
 * diagonal tile (diag: its first query is its first key) needs the mask. */
__device__ inline void fb_dkdv_grads(float (&s)[FB_NB][4], float (&dp)[FB_NB][4],
                                     const float *lse_s, const float *D_s, float scale2,
                                     bool diag, int kr)
{
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int nb = 0; nb < FB_NB; nb++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int qc = nb * 8 + 2 * t + (i & 1);
            float pr = fb_exp2(__fmaf_rn(s[nb][i], scale2, -lse_s[qc] * FB_LOG2E));
            if (diag && qc < kr + 8 * (i >> 1))
                pr = 0.0f;
            s[nb][i] = pr;
            dp[nb][i] = pr * (dp[nb][i] - D_s[qc]);
        }
}

/* A dk/dv block's end: the 16 key rows of warp w stored, dk rotated back. */
template <int HD>
__device__ void fb_dkdv_store(const fb_args &p, const float (&dk)[HD / 8][4],
                              const float (&dv)[HD / 8][4], size_t kv_row, int nk, int k0, int w)
{
    const size_t row = kv_row + (size_t)16 * w * p.n_kv;
    fb_store_grad<HD>(p.dk, p.dk16, row, p.n_kv, p, dk, nk - 16 * w, p.scale, p.rope, k0 + 16 * w);
    fb_store_grad<HD>(p.dv, p.dv16, row, p.n_kv, p, dv, nk - 16 * w, 1.0f);
}

/* One block per (kv head, batch row, key tile), longest first: dk and dv
 * of its keys, summed over the rep query heads and the query tiles at or
 * after it. Two blocks an SM up to head size 64: three spilled (168
 * registers), which cost TinyLlama's long rep loops 11%. */
template <int HD>
__global__ void __launch_bounds__(FB_THREADS, HD <= 64 ? 2 : 1) fb_dkdv_kernel(fb_args p)
{
    typedef fb_geo<HD> G;
    extern __shared__ __align__(16) unsigned char fb_sm[];
    /* K, V; then Q, dO, and the rows' lse and D, two buffers each */
    bf16 *Ks = (bf16 *)fb_sm, *Vs = Ks + G::TILE, *Qs = Vs + G::TILE, *Os = Qs + 2 * G::TILE;
    float *rows = (float *)(Os + 2 * G::TILE); /* [2][lse 64, D 64] */
    const int w = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2;
    const int T = p.Tq, k0 = blockIdx.z * FB_ROWS, kvh = blockIdx.x, bi = blockIdx.y;
    const size_t qld = (size_t)p.H * HD, kld = (size_t)p.n_kv * HD;
    const int nk = min(FB_ROWS, T - k0);
    const size_t kv_row = ((size_t)bi * T + k0) * p.n_kv + kvh;
    const int n_qt = (T - k0 + FB_ROWS - 1) / FB_ROWS, n_it = p.rep * n_qt;
    fb_issue<HD>(Ks, p.k + kv_row * HD, kld, nk);
    fb_issue<HD>(Vs, p.v + kv_row * HD, kld, nk);
    auto issue = [&](int it) { /* into buffer it & 1 */
        const int buf = it & 1;
        const fb_qtile q = fb_dkdv_qtile(p, kvh * p.rep, bi, k0, n_qt, it);
        fb_issue<HD>(Qs + buf * G::TILE, p.q + q.row * HD, qld, q.n);
        fb_issue<HD>(Os + buf * G::TILE, p.dout + q.row * HD, qld, q.n);
        fb_issue_lse_d(rows + buf * 2 * FB_ROWS, p, q);
        fb_commit();
    };
    issue(0);
    float dk[1][HD / 8][4], dv[1][HD / 8][4];
    fb_zero<HD, 1>(dk);
    fb_zero<HD, 1>(dv);
    for (int it = 0; it < n_it; it++) {
        const int buf = it & 1, q0 = k0 + it % n_qt * FB_ROWS;
        fb_next_tile(issue, it, n_it);
        __syncthreads();
        const bf16 *Qb = Qs + buf * G::TILE, *Ob = Os + buf * G::TILE;
        const float *lse_s = rows + buf * 2 * FB_ROWS;
        float s[1][FB_NB][4], dp[1][FB_NB][4]; /* [key][query] */
        fb_scores<HD, 1>(s, Ks + 16 * w * G::LD, Qb);
        fb_scores<HD, 1>(dp, Vs + 16 * w * G::LD, Ob);
        fb_dkdv_grads(s[0], dp[0], lse_s, lse_s + FB_ROWS, p.scale2, q0 == k0, 16 * w + g);
        fb_accum<HD, 1>(dv, s, Ob);  /* dv += P^T dO */
        fb_accum<HD, 1>(dk, dp, Qb); /* dk += dS^T Q */
        __syncthreads(); /* every warp is done with buf before it is refilled */
    }
    fb_dkdv_store<HD>(p, dk[0], dv[0], kv_row, nk, k0, w);
}

/* A dq tile's scores s (masked) and dp = dO V^T into dS, in the score
 * layout; lse2 (in exp2's unit) and D: the thread's two rows'. */
__device__ inline void fb_dq_grads(const float (&s)[FB_NB][4], float (&dp)[FB_NB][4],
                                   const float (&lse2)[2], const float (&D)[2], float scale2)
{
#pragma unroll
    for (int nb = 0; nb < FB_NB; nb++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float pr = fb_exp2(__fmaf_rn(s[nb][i], scale2, -lse2[i >> 1]));
            dp[nb][i] = pr * (dp[nb][i] - D[i >> 1]);
        }
}

/* The lse (in exp2's unit) and D of the thread's rows row0 and row0 + 8
 * of a dq block's nq: zeros past them, so dS = 0 there (their q and dout
 * rows are zeros). */
__device__ inline void fb_dq_rows(const fb_args &p, size_t row_at, int nq, int row0,
                                  float (&lse2)[2], float (&D)[2])
{
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const int r = row0 + 8 * j;
        lse2[j] = r < nq ? p.lse[row_at + r] * FB_LOG2E : 0.0f;
        D[j] = r < nq ? p.D[row_at + r] : 0.0f;
    }
}

/* A dq block's end: the 16 query rows of warp w stored, rotated back. */
template <int HD>
__device__ void fb_dq_store(const fb_args &p, const float (&dq)[HD / 8][4], size_t q_row, int nq,
                            int q0, int w)
{
    fb_store_grad<HD>(p.dq, p.dq16, q_row + (size_t)16 * w * p.H, p.H, p, dq, nq - 16 * w,
                      p.scale, p.rope, q0 + 16 * w);
}

/* One block per (head, batch row, query tile), longest first: dq of its
 * rows. */
template <int HD> __global__ void __launch_bounds__(FB_THREADS) fb_dq_kernel(fb_args p)
{
    typedef fb_geo<HD> G;
    extern __shared__ __align__(16) unsigned char fb_sm[];
    /* Q, dO; K and V two buffers each */
    bf16 *Qs = (bf16 *)fb_sm, *Os = Qs + G::TILE, *Ks = Os + G::TILE, *Vs = Ks + 2 * G::TILE;
    const int w = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2;
    const int T = p.Tq, q0 = (gridDim.z - 1 - blockIdx.z) * FB_ROWS, h = blockIdx.x;
    const int bi = blockIdx.y, kvh = h / p.rep;
    const size_t qld = (size_t)p.H * HD, kld = (size_t)p.n_kv * HD;
    const int nq = min(FB_ROWS, T - q0);
    const size_t q_row = ((size_t)bi * T + q0) * p.H + h;
    const size_t kv_row = (size_t)bi * T * p.n_kv + kvh;
    const int kend = q0 + nq, n_tiles = (kend + FB_ROWS - 1) / FB_ROWS;
    fb_issue<HD>(Qs, p.q + q_row * HD, qld, nq);
    fb_issue<HD>(Os, p.dout + q_row * HD, qld, nq);
    fb_issue<HD>(Ks, p.k + kv_row * HD, kld, kend);
    fb_issue<HD>(Vs, p.v + kv_row * HD, kld, kend);
    fb_commit();
    const int row0 = 16 * w + g; /* the thread's rows: row0 and row0 + 8 */
    float lse2[2], D[2], dq[1][HD / 8][4];
    fb_dq_rows(p, ((size_t)bi * p.H + h) * T + q0, nq, row0, lse2, D);
    fb_zero<HD, 1>(dq);
    for (int it = 0; it < n_tiles; it++) {
        const int k0 = it * FB_ROWS, buf = it & 1;
        fb_next_kv_tile<HD>(Ks, Vs, p, kv_row, kld, kend, it, n_tiles);
        __syncthreads();
        if (k0 <= q0 + 16 * w + 15) { /* some row of this warp sees these keys */
            const bf16 *Kb = Ks + buf * G::TILE;
            float s[1][FB_NB][4], dp[1][FB_NB][4];
            fb_scores<HD, 1>(s, Qs + 16 * w * G::LD, Kb);
            fb_scores<HD, 1>(dp, Os + 16 * w * G::LD, Vs + buf * G::TILE);
            if (k0 + FB_ROWS - 1 > q0 + 16 * w) /* the tile crosses the diagonal */
                fb_mask(s[0], k0, q0 + row0);
            fb_dq_grads(s[0], dp[0], lse2, D, p.scale2);
            fb_accum<HD, 1>(dq, dp, Kb); /* dq += dS K */
        }
        __syncthreads(); /* every warp is done with buf before it is refilled */
    }
    fb_dq_store<HD>(p, dq[0], q_row, nq, q0, w);
}

/* ---- Hopper's warpgroup products (wgmma): the forward, then the backward ---------------- *
 * For head size 64 on sm_90a the forward runs as a warpgroup (the block's 4
 * warps) issuing wgmma: S = Q K^T with both operands read from shared
 * memory by descriptor, O += P V with P from registers. One instruction
 * does a 64 x 128 x 16 product where mma.sync needs 64 ldmatrix-fed
 * m16n8k16, so the warps issue far fewer instructions for the same work.
 * The numerics are fb_forward_kernel's: bf16 operands, fp32 accumulation
 * and softmax, probabilities rounded relative to the running max (here
 * over 128-key tiles). Tiles sit in shared memory in wgmma's 128-byte
 * swizzle (rows of 64 bf16, chunk c of row r at chunk c ^ r % 8, from
 * 1024-byte aligned bases). V's tile is K's layout, [key][d]; P V reads
 * it transposed (its reduction dimension, the keys, is the rows). That
 * swizzle is also the tensor memory accelerator's (TMA), so one thread
 * starts a whole tile's copy by tensor map (fw_map, made on the host for
 * each call's copies), which completes on an mbarrier the block's
 * threads wait on: the copies cost the warps no instructions, where
 * cp.async cost each thread 16 a tile (the forward kernel's instructions
 * fell by a third). */

#define FW_HD 64  /* the head size (padded) the Hopper kernels take */
#define FW_BM 64  /* query rows of a block: the warpgroup product's M */
#define FW_BN 128 /* keys of a tile */
#define FW_ROW 128 /* bytes of a tile row: 64 bf16 */
#define FW_BARS 5 /* the forward's mbarriers: K's two, V's two, Q's */
/* Q, two K and two V, aligned; the barriers */
#define FW_SMEM (1024 + (FW_BM + 4 * FW_BN) * FW_ROW + 8 * FW_BARS)
#define FW_TILE (FB_ROWS * FW_ROW) /* a backward tile: 64 rows */
static_assert(FW_BM == FB_ROWS, "fw_launch tiles every kernel's rows by 64");
#define FW_BWD_BARS 3 /* the backward's mbarriers: the fixed tiles', the two buffers' */
/* the larger of the two backward kernels': dk/dv's, with its lse and D rows */
#define FW_BWD_SMEM (1024 + 6 * FW_TILE + 4 * FB_ROWS * (int)sizeof(float) + 8 * FW_BWD_BARS)

/* The descriptor of a swizzled operand at shared address `at`: 8-row
 * groups 1024 bytes apart (the leading offset is unused in this mode). */
__device__ inline uint64_t fw_desc(uint32_t at)
{
    return (uint64_t)((at & 0x3ffff) >> 4) | (uint64_t)1 << 16 | (uint64_t)(1024 >> 4) << 32 |
           (uint64_t)1 << 62;
}

/* The shared address of the block's tiles: its dynamic shared memory's
 * first 1024-byte boundary, where the swizzle pattern starts. */
__device__ inline uint32_t fw_tiles()
{
    extern __shared__ __align__(16) unsigned char fb_sm[];
    return ((uint32_t)__cvta_generic_to_shared(fb_sm) + 1023) & ~1023u;
}

/* Order earlier generic-proxy writes to shared memory (the forward's
 * zeros) before the wgmma reads of the async proxy. */
__device__ inline void fw_fence_proxy()
{
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ inline void fw_fence()
{
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

/* Pin the accumulators at this point of the program, so the compiler
 * neither reads them before the wait nor writes them after the issue. */
template <int N> __device__ inline void fw_pin(float (&d)[N][4])
{
#pragma unroll
    for (int j = 0; j < N; j++)
#pragma unroll
        for (int i = 0; i < 4; i++)
            asm volatile("" : "+f"(d[j][i])::"memory");
}

#define FW_D4(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])

/* The products, named as PTX names their operands' sources: ss, both
 * from shared memory; rs, A from registers. Accumulator sizes pick the
 * shape. */

/* d (= or +=, acc) a[64][16] . b[128][16]^T, both from shared memory. */
__device__ inline void fw_mma_ss(float (&d)[16][4], uint64_t a, uint64_t b, int acc)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, "
                 "%31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "
                 "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, "
                 "%61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : FW_D4(0), FW_D4(1), FW_D4(2), FW_D4(3), FW_D4(4), FW_D4(5), FW_D4(6),
                   FW_D4(7), FW_D4(8), FW_D4(9), FW_D4(10), FW_D4(11), FW_D4(12), FW_D4(13),
                   FW_D4(14), FW_D4(15)
                 : "l"(a), "l"(b), "r"(acc));
}

/* d (= or +=, acc) a[64][16] . b[64][16]^T, both from shared memory. */
__device__ inline void fw_mma_ss(float (&d)[8][4], uint64_t a, uint64_t b, int acc)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, "
                 "%31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : FW_D4(0), FW_D4(1), FW_D4(2), FW_D4(3), FW_D4(4), FW_D4(5), FW_D4(6),
                   FW_D4(7)
                 : "l"(a), "l"(b), "r"(acc));
}

/* d += a[64][16] (registers, m16n8k16's A layout per warp) . b[16][64]
 * (shared memory, rows of 64: read transposed). */
__device__ inline void fw_mma_rs(float (&d)[8][4], const uint32_t (&a)[4], uint64_t b)
{
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, "
                 "%31}, {%32, %33, %34, %35}, %36, 1, 1, 1, 1;\n"
                 : FW_D4(0), FW_D4(1), FW_D4(2), FW_D4(3), FW_D4(4), FW_D4(5), FW_D4(6),
                   FW_D4(7)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

#undef FW_D4

/* Close the products issued since the last commit into a group. */
__device__ inline void fw_commit()
{
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

/* Wait until at most n groups of products are in flight. */
template <int n> __device__ inline void fw_wait()
{
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(n) : "memory");
}

/* Issue d = a . b^T over head size 64 as a group (not waited for): the
 * 64 rows of the swizzled tile at a against the 8 NB rows of the one at
 * b. */
template <int NB> __device__ inline void fw_issue_ss(float (&d)[NB][4], uint32_t a, uint32_t b)
{
    fw_pin(d);
    fw_fence();
#pragma unroll
    for (int kk = 0; kk < 4; kk++) /* 16 columns of d: 32 bytes of a row */
        fw_mma_ss(d, fw_desc(a + 32 * kk), fw_desc(b + 32 * kk), kk > 0);
    fw_commit();
}

/* Issue d += P . m as a group (not waited for): P's 16 KC columns in
 * registers (KC fragments a), m's rows 0..16 KC - 1 read transposed from
 * the swizzled tile at m, each 16 rows two 8-row groups on. */
template <int KC>
__device__ inline void fw_issue_rs(float (&d)[8][4], const uint32_t (&a)[KC][4], uint32_t m)
{
    fw_pin(d);
    fw_fence();
#pragma unroll
    for (int kc = 0; kc < KC; kc++)
        fw_mma_rs(d, a[kc], fw_desc(m + kc * 16 * FW_ROW));
    fw_commit();
}

/* P's fragments for a product from probabilities p in the score layout. */
template <int NB> __device__ inline void fw_frags(uint32_t (&a)[NB / 2][4], const float (&p)[NB][4])
{
#pragma unroll
    for (int kc = 0; kc < NB / 2; kc++)
        fb_frag_p(a[kc], p, kc);
}

/* ---- tiles by tensor map (TMA) ---------------------------------------------------------- */

/* Make n mbarriers from shared address `bars` on, each for one arrival
 * (the expect_tx of the thread that starts its copies), visible to the
 * copies before they are started. */
__device__ inline void fw_bars_init(uint32_t bars, int n)
{
    for (int i = 0; i < n; i++)
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(bars + 8 * i) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

/* Arrive at `bar`, which then completes once `bytes` more have landed. */
__device__ inline void fw_bar_expect(uint32_t bar, uint32_t bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar),
                 "r"(bytes)
                 : "memory");
}

/* Wait for the completion of `bar`'s phase of the given parity. */
__device__ inline void fw_bar_wait(uint32_t bar, uint32_t parity)
{
    asm volatile("{\n.reg .pred done;\nwait:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra wait;\n}\n" ::"r"(bar),
                 "r"(parity)
                 : "memory");
}

/* Copy the box of `map` at (column 0, head, row, batch row) into the
 * shared address `at`, completing on `bar`. Rows past the copy's end
 * arrive as zeros. */
__device__ inline void fw_tma_load(uint32_t at, const CUtensorMap &map, uint32_t bar, int head,
                                   int row, int bi)
{
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes "
                 "[%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(at),
                 "l"((uint64_t)&map), "r"(bar), "r"(0), "r"(head), "r"(row), "r"(bi)
                 : "memory");
}

/* What every tile of a block of fw_forward_kernel reads: its tiles'
 * shared addresses and barriers, its kv head and causal bounds. K tile j
 * lands in buffer j & 1 and completes the (j >> 1)-th phase of that
 * buffer's barrier, and so does V tile j. */
struct fw_block {
    uint32_t Qs, Ks, Vs; /* Q; K and V two buffers each */
    uint32_t bars;       /* barriers: K's two, V's two, Q's */
    const CUtensorMap *mk, *mv;
    int kvh, bi;
    int kend, n_tiles;
    int first; /* the last key of the warp's first row */

    __device__ uint32_t K(int j) const { return Ks + (j & 1) * FW_BN * FW_ROW; }
    __device__ uint32_t V(int j) const { return Vs + (j & 1) * FW_BN * FW_ROW; }
    __device__ uint32_t kbar(int j) const { return bars + 8 * (j & 1); }
    __device__ uint32_t vbar(int j) const { return bars + 16 + 8 * (j & 1); }
    __device__ uint32_t qbar() const { return bars + 32; }
    __device__ void wait_k(int j) const { fw_bar_wait(kbar(j), (j >> 1) & 1); }
    __device__ void wait_v(int j) const { fw_bar_wait(vbar(j), (j >> 1) & 1); }
};

/* Thread 0 starts the copies of K tile `kt` and V tile `vt`, each
 * skipped past the last tile: the pipeline keeps K a tile ahead of V. */
__device__ void fw_issue_tiles(const fw_block &c, int kt, int vt)
{
    if (threadIdx.x != 0)
        return;
    if (kt < c.n_tiles) {
        fw_bar_expect(c.kbar(kt), FW_BN * FW_ROW);
        fw_tma_load(c.K(kt), *c.mk, c.kbar(kt), c.kvh, kt * FW_BN, c.bi);
    }
    if (vt < c.n_tiles) {
        fw_bar_expect(c.vbar(vt), FW_BN * FW_ROW);
        fw_tma_load(c.V(vt), *c.mv, c.vbar(vt), c.kvh, vt * FW_BN, c.bi);
    }
}

/* Zeros in the rows of the last V tile at and past the block's last key.
 * No query of the block sees them (their probabilities are 0), but 0 *
 * NaN would be NaN, and a cache's keys past its queries may be stale.
 * Rows past the copy's end arrive as zeros already. */
__device__ void fw_zero_tail(const fw_block &c)
{
    const int j = c.n_tiles - 1, from = c.kend - j * FW_BN;
    for (int i = from * 8 + threadIdx.x; i < FW_BN * 8; i += FB_THREADS)
        asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};\n" ::"r"(c.V(j) + i * 16), "r"(0)
                     : "memory");
}

/* Key tile j's scores s (complete) into its probabilities, as the A
 * fragments of P V in a; corr: the factor for the output. */
__device__ void fw_softmax(const fw_block &c, int j, float (&s)[FW_BN / 8][4], uint32_t (&a)[8][4],
                           float (&m)[2], float (&l)[2], float (&corr)[2], float scale2)
{
    const int k0 = j * FW_BN, g = (threadIdx.x & 31) >> 2;
    fw_pin(s);
    if (k0 + FW_BN - 1 > c.first) /* the tile crosses the diagonal of some row */
        fb_mask(s, k0, c.first + g);
    fb_softmax(s, m, l, corr, scale2);
    fw_wait<0>(); /* the previous tile's P V is done with a */
    fw_frags(a, s);
}

/* One block (a warpgroup) per (head, batch row, 64-query tile), longest
 * first, streaming 128-key tiles of K and V, double-buffered, K a tile
 * ahead of V. As FlashAttention-3 does, tile j + 1's scores are issued
 * before tile j's P V, and tile j + 1's softmax runs while the tensor
 * cores do that P V. The tiles come by tensor map (p.mq, p.mk, p.mv: a
 * grid constant, so that their addresses are the kernel parameter's),
 * one thread issuing each. */
__global__ void __launch_bounds__(FB_THREADS, 3)
    fw_forward_kernel(const __grid_constant__ fb_args p)
{
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int HD = FW_HD;
    const int w = threadIdx.x >> 5;
    const int t0 = (gridDim.z - 1 - blockIdx.z) * FW_BM, h = blockIdx.x, bi = blockIdx.y;
    const int nq = min(FW_BM, p.Tq - t0);
    const size_t q_row = ((size_t)bi * p.Tq + t0) * p.H + h;
    fw_block c;
    c.Qs = fw_tiles();
    c.Ks = c.Qs + FW_BM * FW_ROW;
    c.Vs = c.Ks + 2 * FW_BN * FW_ROW;
    c.bars = c.Vs + 2 * FW_BN * FW_ROW;
    c.mk = &p.mk;
    c.mv = &p.mv;
    c.kvh = h / p.rep;
    c.bi = bi;
    c.kend = p.pos0 + t0 + nq;
    c.n_tiles = (c.kend + FW_BN - 1) / FW_BN;
    c.first = p.pos0 + t0 + 16 * w;
    if (threadIdx.x == 0) {
        fw_bars_init(c.bars, FW_BARS);
        fw_bar_expect(c.qbar(), FW_BM * FW_ROW);
        fw_tma_load(c.Qs, p.mq, c.qbar(), h, t0, bi);
        fw_issue_tiles(c, 0, 0);
        fw_issue_tiles(c, 1, c.n_tiles); /* K tile 1 alone */
    }
    __syncthreads(); /* the barriers are made */
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, corr[2];
    float s[FW_BN / 8][4], o[1][HD / 8][4];
    uint32_t a[FW_BN / 16][4];
    fb_zero<HD, 1>(o);
    fw_bar_wait(c.qbar(), 0);
    c.wait_k(0);
    fw_issue_ss(s, c.Qs, c.K(0));
    fw_wait<0>();
    fw_softmax(c, 0, s, a, m, l, corr, p.scale2);
    /* the last tile apart: a product issued under a branch would make
     * ptxas serialize them all */
    for (int j = 0; j + 1 < c.n_tiles; j++) {
        fw_issue_tiles(c, j + 2, j + 1);
        c.wait_k(j + 1);
        c.wait_v(j);
        fb_rescale<HD>(o[0], corr); /* before any product is in flight */
        fw_issue_ss(s, c.Qs, c.K(j + 1));
        fw_issue_rs(o[0], a, c.V(j));
        fw_wait<1>(); /* the scores of tile j + 1 */
        fw_softmax(c, j + 1, s, a, m, l, corr, p.scale2);
        fw_pin(o[0]);
        __syncthreads(); /* every warp is done with the buffers before they are refilled */
    }
    c.wait_v(c.n_tiles - 1);
    fw_zero_tail(c);
    fw_fence_proxy(); /* the zeros, before the product reads them */
    __syncthreads();
    fb_rescale<HD>(o[0], corr);
    fw_issue_rs(o[0], a, c.V(c.n_tiles - 1));
    fw_wait<0>();
    fw_pin(o[0]);
    fb_forward_rows<HD>(p, m, l, o[0], bi, h, t0, 16 * w, nq, q_row);
#else
    (void)p; /* not launched: fw_usable() is false without sm_90a */
#endif
}

/* The backward on the warpgroup products: the mma.sync kernels' scheme
 * and numerics (dk and dv per key tile, then dq per query tile; bf16
 * operands, fp32 accumulation) with 64-row tiles on both sides, so that
 * every product is a 64 x 64 one: S and dP (ss) and, from their
 * fragments in registers, the gradients (rs). The block's tiles sit from
 * its first 1024-byte boundary, in the order its comment gives. */

/* dk and dv of a block's 64 keys: as fb_dkdv_kernel, S^T = K Q^T and
 * dP^T = V dO^T, then dv += P^T dO and dk += dS^T Q. Where the kv head's
 * query heads are split over kv_split blocks (blockIdx.x: kv head times
 * kv_split plus the split), each block sums its share of them into its
 * slice of the partial sums instead, which fw_dkdv_sum_kernel adds up.
 * Three blocks an SM: 168 registers, no spill (182 unbounded). */
__global__ void __launch_bounds__(FB_THREADS, 3)
    fw_dkdv_kernel(const __grid_constant__ fb_args p)
{
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int HD = FW_HD;
    /* K, V; then Q and dO two buffers each; then the rows' lse and D;
     * then the barriers: K and V's, then the two buffers' */
    const uint32_t Ks = fw_tiles(), Vs = Ks + FW_TILE, Qs = Vs + FW_TILE, Os = Qs + 2 * FW_TILE;
    const uint32_t Rs = Os + 2 * FW_TILE, bars = Rs + 4 * FB_ROWS * sizeof(float);
    float *rows = (float *)__cvta_shared_to_generic(Rs); /* [2][lse 64, D 64] */
    const int w = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2;
    const int T = p.Tq, k0 = blockIdx.z * FB_ROWS, bi = blockIdx.y;
    const int kvh = blockIdx.x / p.kv_split, split = blockIdx.x % p.kv_split;
    const int heads = p.rep / p.kv_split, h0 = kvh * p.rep + split * heads;
    const int nk = min(FB_ROWS, T - k0);
    const size_t kv_row = ((size_t)bi * T + k0) * p.n_kv + kvh;
    const int n_qt = (T - k0 + FB_ROWS - 1) / FB_ROWS, n_it = heads * n_qt;
    /* into buffer it & 1: Q and dO by tensor map, lse and D by cp.async */
    auto issue = [&](int it) {
        const int buf = it & 1;
        const fb_qtile q = fb_dkdv_qtile(p, h0, bi, k0, n_qt, it);
        if (threadIdx.x == 0) {
            const uint32_t bar = bars + 8 + 8 * buf;
            fw_bar_expect(bar, 2 * FW_TILE);
            fw_tma_load(Qs + buf * FW_TILE, p.mq, bar, q.h, q.q0, bi);
            fw_tma_load(Os + buf * FW_TILE, p.mo, bar, q.h, q.q0, bi);
        }
        fb_issue_lse_d(rows + buf * 2 * FB_ROWS, p, q);
        fb_commit();
    };
    if (threadIdx.x == 0) {
        fw_bars_init(bars, FW_BWD_BARS);
        fw_bar_expect(bars, 2 * FW_TILE);
        fw_tma_load(Ks, p.mk, bars, kvh, k0, bi);
        fw_tma_load(Vs, p.mv, bars, kvh, k0, bi);
    }
    __syncthreads(); /* the barriers are made */
    issue(0);
    float dk[1][HD / 8][4], dv[1][HD / 8][4];
    fb_zero<HD, 1>(dk);
    fb_zero<HD, 1>(dv);
    fw_bar_wait(bars, 0);
    for (int it = 0; it < n_it; it++) {
        const int buf = it & 1, q0 = k0 + it % n_qt * FB_ROWS;
        fb_next_tile(issue, it, n_it);
        fw_bar_wait(bars + 8 + 8 * buf, (it >> 1) & 1);
        __syncthreads(); /* lse and D: every thread's copies */
        const uint32_t Qb = Qs + buf * FW_TILE, Ob = Os + buf * FW_TILE;
        const float *lse_s = rows + buf * 2 * FB_ROWS;
        float s[FB_NB][4], dp[FB_NB][4]; /* [key][query] */
        uint32_t ap[FB_NB / 2][4], as[FB_NB / 2][4];
        fw_issue_ss(s, Ks, Qb);
        fw_issue_ss(dp, Vs, Ob);
        fw_wait<0>();
        fw_pin(s);
        fw_pin(dp);
        fb_dkdv_grads(s, dp, lse_s, lse_s + FB_ROWS, p.scale2, q0 == k0, 16 * w + g);
        fw_frags(ap, s);
        fw_frags(as, dp);
        fw_issue_rs(dv[0], ap, Ob); /* dv += P^T dO */
        fw_issue_rs(dk[0], as, Qb); /* dk += dS^T Q */
        fw_wait<0>();
        fw_pin(dv[0]);
        fw_pin(dk[0]);
        __syncthreads(); /* every warp is done with buf before it is refilled */
    }
    if (p.kv_split == 1) {
        fb_dkdv_store<HD>(p, dk[0], dv[0], kv_row, nk, k0, w);
    } else { /* raw sums, rows of 64: [split][dk rows], then [split][dv rows] */
        const size_t slice = (size_t)gridDim.y * T * p.n_kv * HD;
        const size_t at = split * slice + (kv_row + (size_t)16 * w * p.n_kv) * HD;
        float *dk_part = p.dkv_part + at, *dv_part = dk_part + p.kv_split * slice;
        fb_store<HD>(dk_part, (size_t)p.n_kv * HD, dk[0], nk - 16 * w, HD, 1.0f);
        fb_store<HD>(dv_part, (size_t)p.n_kv * HD, dv[0], nk - 16 * w, HD, 1.0f);
    }
#else
    (void)p; /* not launched: fw_usable() is false without sm_90a */
#endif
}

/* dq of a block's 64 queries: as fb_dq_kernel, S = Q K^T and
 * dP = dO V^T, then dq += dS K. */
__global__ void __launch_bounds__(FB_THREADS, 2)
    fw_dq_kernel(const __grid_constant__ fb_args p)
{
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int HD = FW_HD;
    /* Q, dO; K and V two buffers each; the barriers: Q and dO's, then the
     * two buffers' */
    const uint32_t Qs = fw_tiles(), Os = Qs + FW_TILE, Ks = Os + FW_TILE, Vs = Ks + 2 * FW_TILE;
    const uint32_t bars = Vs + 2 * FW_TILE;
    const int w = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2;
    const int T = p.Tq, q0 = (gridDim.z - 1 - blockIdx.z) * FB_ROWS, h = blockIdx.x;
    const int bi = blockIdx.y, kvh = h / p.rep;
    const int nq = min(FB_ROWS, T - q0);
    const size_t q_row = ((size_t)bi * T + q0) * p.H + h;
    const int n_tiles = (q0 + nq + FB_ROWS - 1) / FB_ROWS;
    auto issue = [&](int j) { /* thread 0: key tile j into buffer j & 1 */
        const uint32_t bar = bars + 8 + 8 * (j & 1);
        fw_bar_expect(bar, 2 * FW_TILE);
        fw_tma_load(Ks + (j & 1) * FW_TILE, p.mk, bar, kvh, j * FB_ROWS, bi);
        fw_tma_load(Vs + (j & 1) * FW_TILE, p.mv, bar, kvh, j * FB_ROWS, bi);
    };
    if (threadIdx.x == 0) {
        fw_bars_init(bars, FW_BWD_BARS);
        fw_bar_expect(bars, 2 * FW_TILE);
        fw_tma_load(Qs, p.mq, bars, h, q0, bi);
        fw_tma_load(Os, p.mo, bars, h, q0, bi);
        issue(0);
    }
    __syncthreads(); /* the barriers are made */
    const int row0 = 16 * w + g; /* the thread's rows: row0 and row0 + 8 */
    float lse2[2], D[2], dq[1][HD / 8][4];
    fb_dq_rows(p, ((size_t)bi * p.H + h) * T + q0, nq, row0, lse2, D);
    fb_zero<HD, 1>(dq);
    fw_bar_wait(bars, 0);
    for (int it = 0; it < n_tiles; it++) {
        const int k0 = it * FB_ROWS;
        if (threadIdx.x == 0 && it + 1 < n_tiles)
            issue(it + 1);
        fw_bar_wait(bars + 8 + 8 * (it & 1), (it >> 1) & 1);
        const uint32_t Kb = Ks + (it & 1) * FW_TILE, Vb = Vs + (it & 1) * FW_TILE;
        float s[FB_NB][4], dp[FB_NB][4];
        uint32_t a[FB_NB / 2][4];
        fw_issue_ss(s, Qs, Kb);
        fw_issue_ss(dp, Os, Vb);
        fw_wait<0>();
        fw_pin(s);
        fw_pin(dp);
        if (k0 + FB_ROWS - 1 > q0 + 16 * w) /* the tile crosses the diagonal */
            fb_mask(s, k0, q0 + row0);
        fb_dq_grads(s, dp, lse2, D, p.scale2);
        fw_frags(a, dp);
        fw_issue_rs(dq[0], a, Kb); /* dq += dS K */
        fw_wait<0>();
        fw_pin(dq[0]);
        __syncthreads(); /* every warp is done with the buffers before they are refilled */
    }
    fb_dq_store<HD>(p, dq[0], q_row, nq, q0, w);
#else
    (void)p; /* not launched: fw_usable() is false without sm_90a */
#endif
}

/* dk and dv of `rows` kv rows from the split dk/dv blocks' partial sums,
 * added in split order, then scaled, rotated back and stored as
 * fb_dkdv_store does. A thread takes a column pair of a row. */
__global__ void fw_dkdv_sum_kernel(fb_args p, size_t rows)
{
    const int pairs = (p.hd + 1) / 2;
    const size_t slice = rows * FW_HD;
    QKD__CUDA_FOR(i, rows * pairs)
    {
        const size_t r = i / pairs;
        const int d = (int)(i % pairs) * 2, two = d + 1 < p.hd;
        float k[2] = {0.0f, 0.0f}, v[2] = {0.0f, 0.0f};
        for (int s = 0; s < p.kv_split; s++) {
            const float *dk_part = p.dkv_part + s * slice + r * FW_HD + d;
            const float *dv_part = dk_part + p.kv_split * slice;
            k[0] += dk_part[0], k[1] += dk_part[1];
            v[0] += dv_part[0], v[1] += dv_part[1];
        }
        k[0] *= p.scale, k[1] *= p.scale;
        if (p.rope && two)
            fb_rotate(k[0], k[1], p.rope, p.hd, (int)(r / p.n_kv % p.Tq), d / 2, -1.0);
        const size_t at = r * p.hd + d;
        if (p.dk16) {
            const size_t at16 = r / p.n_kv * p.ld16 + r % p.n_kv * p.hd + d;
            fb_put(p.dk16 + at16, k, two);
            fb_put(p.dv16 + at16, v, two);
        } else {
            fb_put(p.dk + at, k, two);
            fb_put(p.dv + at, v, two);
        }
    }
}

/* ---- launch ------------------------------------------------------------------------------ */

enum fb_pass { FB_FORWARD, FB_DKDV, FB_DQ };

template <int HD> static void fb_launch(qkd__backend *b, fb_pass pass, const fb_args &p, int B)
{
    typedef fb_geo<HD> G;
    void (*kern)(fb_args);
    size_t bytes = 6 * (size_t)G::TILE * sizeof(bf16);
    int rows = FB_ROWS, heads = p.H;
    switch (pass) {
    case FB_FORWARD:
        kern = fb_forward_kernel<HD>;
        rows = fb_fwd<HD>::ROWS;
        bytes = (size_t)(rows + 4 * FB_ROWS) * G::LD * sizeof(bf16);
        break;
    case FB_DKDV:
        kern = fb_dkdv_kernel<HD>;
        bytes += 4 * FB_ROWS * sizeof(float); /* lse and D, two buffers */
        heads = p.n_kv;
        break;
    default:
        kern = fb_dq_kernel<HD>;
        break;
    }
    const dim3 grid((unsigned)heads, (unsigned)B, (unsigned)((p.Tq + rows - 1) / rows));
    if (qkd__cuda_check(b, cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                (int)bytes),
                        "attention_bf16 shared memory") != QKD_OK)
        return;
    kern<<<grid, FB_THREADS, bytes, qkd__cuda_of(b)->stream>>>(p);
    qkd__cuda_launched(b, "attention_bf16");
}

/* The bf16 copies x, y and z (rows 0: none) of head size hd, in one
 * launch. */
template <int HD>
static void fb_convert(qkd__backend *b, int hd, const fb_copy &x, const fb_copy &y = fb_copy{},
                       const fb_copy &z = fb_copy{})
{
    const size_t items = (x.rows + y.rows + z.rows) * (HD / 8);
    fb_convert_kernel<HD><<<qkd__cuda_blocks(items), QKD__CUDA_THREADS, 0,
                            qkd__cuda_of(b)->stream>>>(x, y, z, hd);
    qkd__cuda_launched(b, "attention_bf16 copies");
}

/* The padded head size of the kernels for hd. */
static int fb_hd(int hd)
{
    return hd <= 16 ? 16 : hd <= 32 ? 32 : hd <= 64 ? 64 : 128;
}

/* The scratch: each query row's logsumexp, rounded up to 16 bytes, then
 * the forward's bf16 copies of q, k and v (rows of the padded head size,
 * one after the other), which the backward reads again instead of
 * rounding q, k and v a second time. */
static size_t fb_lse_floats(int B, int Tq, int H)
{
    return ((size_t)B * Tq * H + 3) & ~(size_t)3;
}

/* Floats of n_rows bf16 rows of the padded head size. */
static size_t fb_rows_floats(size_t n_rows, int hd)
{
    return n_rows * (size_t)fb_hd(hd) / 2;
}

extern "C" size_t qkd__cuda_attention_scratch_floats(int B, int Tq, int kv_len, int n_heads,
                                                     int n_kv, int hd)
{
    const size_t lse = fb_lse_floats(B, Tq, n_heads);
    if (hd > FB_MAX_HD) /* no bf16 attention: the logsumexps alone */
        return lse;
    return lse + fb_rows_floats((size_t)B * Tq * n_heads + 2 * (size_t)B * kv_len * n_kv, hd);
}

/* The bf16 copies of q, k and v in a scratch; rows of HD values. */
struct fb_copies {
    bf16 *q, *k, *v;
};

template <int HD> static fb_copies fb_copies_in(float *scratch, const fb_args &p, int B)
{
    const size_t nq = (size_t)B * p.Tq * p.H, nkv = (size_t)B * p.kv_len * p.n_kv;
    fb_copies c;
    c.q = (bf16 *)(scratch + fb_lse_floats(B, p.Tq, p.H));
    c.k = c.q + nq * HD;
    c.v = c.k + nkv * HD;
    return c;
}

/* Whether the Hopper kernels run for the padded head size HD: theirs,
 * built for sm_90a (meson's nvcc_arch sm_90), on a device of compute
 * capability 9.0, with the driver's tensor-map encoder at hand. */
static bool fw_usable(qkd__backend *b, int HD)
{
#ifdef QKD_CUDA_SM90A
    return HD == FW_HD && qkd__cuda_of(b)->sm == 90 && qkd__cuda_of(b)->map_encode;
#else
    (void)b, (void)HD;
    return false;
#endif
}

/* Blocks a kv head's query heads are split over in the Hopper dk/dv. A
 * block's work is its query heads times the query tiles at or after its
 * keys, so the blocks of the first key tiles are the longest: with few
 * kv heads and batch rows but many query heads to a kv head (TinyLlama:
 * 4 and 4, 8 query heads), they outlast the rest of the grid. Each block
 * takes as many query heads as divide rep while its longest block stays
 * within the average work of a block slot (three an SM); the partial sums
 * then cost a pass over them. */
static int fw_kv_split(qkd__backend *b, const fb_args &p, int B)
{
    const double tiles = (double)((p.Tq + FB_ROWS - 1) / FB_ROWS);
    const double slots = 3.0 * qkd__cuda_of(b)->n_sm;
    const double most = (double)p.rep * p.n_kv * B * (tiles + 1) / (2.0 * slots);
    int heads = 1;
    for (int d = 2; d <= p.rep; d++)
        if (p.rep % d == 0 && d <= most)
            heads = d;
    return p.rep / heads;
}

/* A Hopper kernel of head size 64 on p's bf16 copies: one block per
 * (head, of `heads`, batch row, 64-row tile). */
static void fw_launch(qkd__backend *b, void (*kern)(fb_args), const fb_args &p, int heads, int B,
                      int smem)
{
    if (qkd__cuda_check(b, cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                smem),
                        "attention_bf16 shared memory") != QKD_OK)
        return;
    const dim3 grid((unsigned)heads, (unsigned)B, (unsigned)((p.Tq + FB_ROWS - 1) / FB_ROWS));
    kern<<<grid, FB_THREADS, smem, qkd__cuda_of(b)->stream>>>(p);
    qkd__cuda_launched(b, "attention_bf16");
}

/* The tensor map of a bf16 copy [B][rows][heads][FW_HD] as the Hopper
 * kernels read it: boxes of box_rows rows of one head, in the tiles'
 * 128-byte swizzle, zeros past the copy's rows. */
static bool fw_map(qkd__backend *b, CUtensorMap *map, const bf16 *copy, int heads, int rows,
                   int B, int box_rows)
{
    const cuuint64_t row = FW_HD * sizeof(bf16);
    const cuuint64_t dims[4] = {FW_HD, (cuuint64_t)heads, (cuuint64_t)rows, (cuuint64_t)B};
    const cuuint64_t strides[3] = {row, row * heads, row * heads * rows};
    const cuuint32_t box[4] = {FW_HD, 1, (cuuint32_t)box_rows, 1}, step[4] = {1, 1, 1, 1};
    return qkd__cuda_of(b)->map_encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, (void *)copy,
                                       dims, strides, box, step, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                       CU_TENSOR_MAP_SWIZZLE_128B,
                                       CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                       CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

/* The tensor maps of p's copies, for the forward (key tiles of FW_BN
 * rows) or the backward (all tiles of FB_ROWS, dout's too); false: one
 * could not be made (the copies are 16-byte aligned, as the maps need, so
 * this is not expected), and the mma.sync kernels run instead. */
static bool fw_maps(qkd__backend *b, fb_args &p, int B, bool backward)
{
    const int key_rows = backward ? FB_ROWS : FW_BN;
    return fw_map(b, &p.mq, p.q, p.H, p.Tq, B, FB_ROWS) &&
           fw_map(b, &p.mk, p.k, p.n_kv, p.kv_len, B, key_rows) &&
           fw_map(b, &p.mv, p.v, p.n_kv, p.kv_len, B, key_rows) &&
           (!backward || fw_map(b, &p.mo, p.dout, p.H, p.Tq, B, FB_ROWS));
}

/* The forward: q, k, v rounded into the scratch's copies (q and k rotated
 * first when a RoPE table is given), then the kernel. */
template <int HD>
static void fb_forward_hd(qkd__backend *b, fb_args &p, int B, float *scratch,
                          const double2 *rope, const float *q, const float *k, const float *v)
{
    const size_t nq = (size_t)B * p.Tq * p.H, nkv = (size_t)B * p.kv_len * p.n_kv;
    const fb_copies c = fb_copies_in<HD>(scratch, p, B);
    fb_convert<HD>(b, p.hd, fb_copy{c.q, q, nq, fb_rope{rope, p.Tq, p.H, p.pos0}},
                   fb_copy{c.k, k, nkv, fb_rope{rope, p.kv_len, p.n_kv, 0}},
                   fb_copy{c.v, v, nkv});
    p.q = c.q;
    p.k = c.k;
    p.v = c.v;
    if (fw_usable(b, HD) && fw_maps(b, p, B, false))
        fw_launch(b, fw_forward_kernel, p, p.H, B, FW_SMEM);
    else
        fb_launch<HD>(b, FB_FORWARD, p, B);
}

/* The backward: the forward's copies from the scratch, dout rounded into
 * ob with the row dots of dout and out into D, then both kernels (and,
 * when the Hopper dk/dv is split, the sum of its partial sums). */
template <int HD>
static void fb_backward_hd(qkd__backend *b, fb_args &p, int B, float *scratch, bf16 *ob,
                           float *D, const float *dout, qkd__bf16_in out)
{
    const fb_copies c = fb_copies_in<HD>(scratch, p, B);
    fb_convert<HD>(b, p.hd,
                   fb_copy{ob, dout, (size_t)B * p.Tq * p.H, fb_rope{},
                           fb_dots{out.f32, (const bf16 *)out.bits, D, p.Tq, p.H}});
    p.q = c.q;
    p.k = c.k;
    p.v = c.v;
    p.dout = ob;
    if (fw_usable(b, HD) && fw_maps(b, p, B, true)) {
        fw_launch(b, fw_dkdv_kernel, p, p.n_kv * p.kv_split, B, FW_BWD_SMEM);
        if (p.kv_split > 1) {
            const size_t rows = (size_t)B * p.Tq * p.n_kv, n = rows * ((p.hd + 1) / 2);
            fw_dkdv_sum_kernel<<<qkd__cuda_blocks(n), QKD__CUDA_THREADS, 0,
                                 qkd__cuda_of(b)->stream>>>(p, rows);
            qkd__cuda_launched(b, "attention_bf16 dk/dv sums");
        }
        fw_launch(b, fw_dq_kernel, p, p.H, B, FW_BWD_SMEM);
    } else {
        fb_launch<HD>(b, FB_DKDV, p, B);
        fb_launch<HD>(b, FB_DQ, p, B);
    }
}

/* RoPE's table for p when rope_theta > 0 (a head size of 1 has no pair to
 * rotate, and no table); *ok false (recorded) when it could not be had. */
static const double2 *fb_rope_table(qkd__backend *b, const fb_args &p, float rope_theta,
                                    bool *ok)
{
    *ok = true;
    if (!(rope_theta > 0.0f) || p.hd < 2)
        return NULL;
    const int len = p.pos0 + p.Tq > p.kv_len ? p.pos0 + p.Tq : p.kv_len;
    const double2 *tab = qkd__cuda_rope_table(b, len, p.hd, rope_theta);
    *ok = tab != NULL;
    return tab;
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
    p.kv_split = 1;
    p.scale = (float)(1.0 / sqrt((double)hd));
    p.scale2 = p.scale * FB_LOG2E;
    return p;
}

extern "C" void qkd__cuda_attention_forward_bf16(qkd__backend *b, float *out,
                                                 uint16_t *out_bits, float *scratch,
                                                 const float *q, const float *k, const float *v,
                                                 int B, int Tq, int pos0, int kv_len,
                                                 int n_heads, int n_kv, int hd,
                                                 float rope_theta)
{
    if (B <= 0 || Tq <= 0 || hd <= 0 || !qkd__cuda_attention_head_ok(b, hd, FB_MAX_HD))
        return;
    fb_args p = fb_make(Tq, pos0, kv_len, n_heads, n_kv, hd);
    bool ok;
    const double2 *rope = fb_rope_table(b, p, rope_theta, &ok);
    if (!ok)
        return;
    p.out = out;
    p.out_bits = (bf16 *)out_bits;
    p.lse = scratch;
    switch (fb_hd(hd)) {
    case 16: fb_forward_hd<16>(b, p, B, scratch, rope, q, k, v); break;
    case 32: fb_forward_hd<32>(b, p, B, scratch, rope, q, k, v); break;
    case 64: fb_forward_hd<64>(b, p, B, scratch, rope, q, k, v); break;
    default: fb_forward_hd<128>(b, p, B, scratch, rope, q, k, v); break;
    }
}

/* q, k and v are the forward's, read from its copies in the scratch. */
extern "C" void qkd__cuda_attention_backward_bf16(qkd__backend *b, float *dq, float *dk,
                                                  float *dv, const float *dout,
                                                  float *scratch, const float *q,
                                                  const float *k, const float *v,
                                                  qkd__bf16_in out, int B, int T, int n_heads,
                                                  int n_kv, int hd, float rope_theta,
                                                  uint16_t *dqkv_bits)
{
    (void)q, (void)k, (void)v;
    if (B <= 0 || T <= 0 || hd <= 0 || !qkd__cuda_attention_head_ok(b, hd, FB_MAX_HD))
        return;
    fb_args p = fb_make(T, 0, T, n_heads, n_kv, hd);
    bool ok;
    p.rope = fb_rope_table(b, p, rope_theta, &ok);
    if (!ok)
        return;
    /* D, then dout's bf16 copy (16-byte aligned: D rounded up to 4), then
     * the split dk/dv's partial sums */
    if (fw_usable(b, fb_hd(hd)))
        p.kv_split = fw_kv_split(b, p, B);
    const size_t d_floats = fb_lse_floats(B, T, n_heads);
    const size_t ob_floats = fb_rows_floats((size_t)B * T * n_heads, hd);
    const size_t part_floats = p.kv_split > 1 ? 2 * p.kv_split * (size_t)B * T * n_kv * FW_HD : 0;
    float *ws = qkd__cuda_workspace(b, d_floats + ob_floats + part_floats);
    if (!ws)
        return;
    if (part_floats)
        p.dkv_part = ws + d_floats + ob_floats;
    p.dq = dq;
    p.dk = dk;
    p.dv = dv;
    if (dqkv_bits) { /* as rows: linears_backward_bf16_bits's layout */
        p.ld16 = (size_t)(n_heads + 2 * n_kv) * hd;
        p.dq16 = (bf16 *)dqkv_bits;
        p.dk16 = p.dq16 + (size_t)n_heads * hd;
        p.dv16 = p.dk16 + (size_t)n_kv * hd;
    }
    p.lse = scratch;
    p.D = ws;
    bf16 *ob = (bf16 *)(ws + d_floats);
    switch (fb_hd(hd)) {
    case 16: fb_backward_hd<16>(b, p, B, scratch, ob, ws, dout, out); break;
    case 32: fb_backward_hd<32>(b, p, B, scratch, ob, ws, dout, out); break;
    case 64: fb_backward_hd<64>(b, p, B, scratch, ob, ws, dout, out); break;
    default: fb_backward_hd<128>(b, p, B, scratch, ob, ws, dout, out); break;
    }
}
