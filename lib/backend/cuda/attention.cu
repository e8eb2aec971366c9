/* CUDA kernels of the attention family: RoPE, and flash-style causal
 * grouped-query attention.
 *
 * Layouts (backend.h): q, out [B][Tq][H][hd]; k, v [B][kv_len][n_kv][hd];
 * query head h = g * rep + r uses kv head g (rep = H / n_kv). */
#include "backend/cuda/common.cuh"

/* ---- RoPE --------------------------------------------------------------------------- */

/* RoPE from a table of (cos, sin) per position and pair, computed once in
 * double as the reference computes its angles (pos * theta^(-2j/hd)), so
 * the rotations read two doubles instead of calling pow, cos and sin per
 * pair, and round as the reference's do. The table is rebuilt when the
 * head size or theta changes, and grows by doubling as decoding moves the
 * positions on. */

__global__ void rope_table_kernel(double2 *tab, size_t n, int half, int hd, double theta)
{
    QKD__CUDA_FOR(i, n)
    {
        double pos = (double)(i / half), p = 2.0 * (double)(i % half);
        double angle = pos * pow(theta, -p / hd);
        tab[i] = make_double2(cos(angle), sin(angle));
    }
}

/* One thread per rotated pair of a head row; sign -1 rotates back. */
__global__ void rope_kernel(float *x, const double2 *tab, size_t n_pairs, int T, int n_heads,
                            int hd, int pos0, double sign)
{
    int half = hd / 2;
    QKD__CUDA_FOR(i, n_pairs)
    {
        size_t row = i / half;
        int j = (int)(i % half), pos = pos0 + (int)((row / n_heads) % T);
        double2 cs = tab[(size_t)pos * half + j];
        double sn = sign * cs.y;
        float *r = x + row * hd + 2 * j;
        double x0 = r[0], x1 = r[1];
        r[0] = (float)(x0 * cs.x - x1 * sn);
        r[1] = (float)(x0 * sn + x1 * cs.x);
    }
}

extern "C" const double2 *qkd__cuda_rope_table(qkd__backend *b, int len, int hd, float theta)
{
    qkd__cuda *c = qkd__cuda_of(b);
    const bool same = c->rope_hd == hd && c->rope_theta == theta;
    if (same && c->rope_len >= len)
        return (const double2 *)c->rope;
    if (same && len < 2 * c->rope_len)
        len = 2 * c->rope_len;
    size_t half = (size_t)(hd / 2), n = (size_t)len * half;
    c->rope_len = 0;
    if (!qkd__cuda_grow(b, (void **)&c->rope, &c->rope_bytes, n * sizeof(double2)))
        return NULL;
    rope_table_kernel<<<qkd__cuda_blocks(n), QKD__CUDA_THREADS, 0, c->stream>>>(
        (double2 *)c->rope, n, (int)half, hd, theta);
    qkd__cuda_launched(b, "rope table");
    c->rope_len = len;
    c->rope_hd = hd;
    c->rope_theta = theta;
    return (const double2 *)c->rope;
}

static void rope(qkd__backend *b, float *x, int B, int T, int n_heads, int hd, int pos0,
                 float theta, double sign)
{
    size_t n_pairs = (size_t)B * T * n_heads * (hd / 2);
    if (!n_pairs)
        return;
    const double2 *tab = qkd__cuda_rope_table(b, pos0 + T, hd, theta);
    if (!tab)
        return;
    rope_kernel<<<qkd__cuda_blocks(n_pairs), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(
        x, tab, n_pairs, T, n_heads, hd, pos0, sign);
    qkd__cuda_launched(b, "rope");
}

extern "C" void qkd__cuda_rope_forward(qkd__backend *b, float *x, int B, int T, int n_heads,
                                       int head_dim, int pos0, float theta)
{
    rope(b, x, B, T, n_heads, head_dim, pos0, theta, 1.0);
}

/* The rotation is orthogonal: its transpose is the opposite rotation. */
extern "C" void qkd__cuda_rope_backward(qkd__backend *b, float *dx, int B, int T, int n_heads,
                                        int head_dim, int pos0, float theta)
{
    rope(b, dx, B, T, n_heads, head_dim, pos0, theta, -1.0);
}

/* ---- flash attention ---------------------------------------------------------------------
 * Causal grouped-query attention that never stores the T x T scores
 * (FlashAttention-2's scheme, in fp32 on the CUDA cores): the forward
 * walks the key tiles of a query tile with an online softmax and saves
 * only each row's logsumexp in `scratch` ([B][H][Tq]); the backward
 * recomputes the probabilities tile by tile from it. The backward runs
 * two kernels rather than one with atomic dq updates, so its sums have a
 * fixed order: dk and dv per key tile (looping over the query tiles and
 * the rep heads that share the kv head), then dq per query tile.
 *
 * A block is 256 threads as 16 x 16 (ty, tx); a tile has ROWS = 16 R
 * rows, thread (ty, tx) owning rows ty + 16 i and columns tx + 16 j of a
 * ROWS x ROWS score tile and head-dim columns tx + 16 c of a row. Tiles
 * sit in shared memory with row stride HD + 4: 16-byte loads of 8
 * different rows then hit 8 different bank groups. Head sizes are padded with zeros up to
 * the kernel's HD (16, 32, 64, 128 or 256). -fmad=false applies to this
 * file too, so the products use fmaf explicitly. */

#define FA_THREADS 256
#define FA_MAX_HD 256

/* Everything one attention call touches; unused members are NULL. */
struct fa_args {
    float *out, *lse, *dq, *dk, *dv;
    const float *q, *k, *v, *dout, *D;
    int B, Tq, pos0, kv_len, H, n_kv, hd, rep;
    float scale;
};

template <int HD, int R> struct fa_tile {
    static constexpr int ROWS = 16 * R;   /* rows (queries or keys) of a tile */
    static constexpr int LD = HD + 4;     /* shared row stride of a head-dim tile */
    static constexpr int PLD = ROWS + 4;  /* shared row stride of a score tile */
    static constexpr int CPT = HD / 16;   /* head-dim columns per thread */
    static constexpr int TILE = ROWS * LD;
};

/* dst[r][d] = src[r * stride + d] for r < n_rows, d < hd; zero elsewhere. */
template <int HD, int R>
__device__ void fa_load(float *dst, const float *src, size_t stride, int n_rows, int hd)
{
    typedef fa_tile<HD, R> T;
    for (int i = threadIdx.x; i < T::ROWS * HD; i += FA_THREADS) {
        int r = i / HD, d = i % HD;
        dst[r * T::LD + d] = r < n_rows && d < hd ? src[(size_t)r * stride + d] : 0.0f;
    }
}

/* s[i][j] = a[ty + 16 i] . b[tx + 16 j] over the padded head size, four
 * head columns per shared load. */
template <int HD, int R>
__device__ void fa_dots(float (&s)[R][R], const float *a, const float *b, int ty, int tx)
{
    typedef fa_tile<HD, R> T;
#pragma unroll
    for (int i = 0; i < R; i++)
#pragma unroll
        for (int j = 0; j < R; j++)
            s[i][j] = 0.0f;
#pragma unroll 4
    for (int d = 0; d < HD; d += 4) {
        float4 x[R], y[R];
#pragma unroll
        for (int i = 0; i < R; i++) {
            x[i] = *(const float4 *)&a[(ty + 16 * i) * T::LD + d];
            y[i] = *(const float4 *)&b[(tx + 16 * i) * T::LD + d];
        }
#pragma unroll
        for (int i = 0; i < R; i++)
#pragma unroll
            for (int j = 0; j < R; j++) {
                s[i][j] = fmaf(x[i].x, y[j].x, s[i][j]);
                s[i][j] = fmaf(x[i].y, y[j].y, s[i][j]);
                s[i][j] = fmaf(x[i].z, y[j].z, s[i][j]);
                s[i][j] = fmaf(x[i].w, y[j].w, s[i][j]);
            }
    }
}

/* acc[i][c] += sum_j p[ty + 16 i][j] . m[j][tx + 16 c]: a score tile
 * (row stride PLD) times a head-dim tile, four score columns per load. */
template <int HD, int R>
__device__ void fa_accum(float (&acc)[R][HD / 16], const float *p, const float *m, int ty,
                         int tx)
{
    typedef fa_tile<HD, R> T;
#pragma unroll 2
    for (int j = 0; j < T::ROWS; j += 4) {
        float4 x[R];
#pragma unroll
        for (int i = 0; i < R; i++)
            x[i] = *(const float4 *)&p[(ty + 16 * i) * T::PLD + j];
#pragma unroll
        for (int jj = 0; jj < 4; jj++) {
            float y[T::CPT];
#pragma unroll
            for (int c = 0; c < T::CPT; c++)
                y[c] = m[(j + jj) * T::LD + tx + 16 * c];
#pragma unroll
            for (int i = 0; i < R; i++) {
                const float xv = jj == 0 ? x[i].x : jj == 1 ? x[i].y : jj == 2 ? x[i].z : x[i].w;
#pragma unroll
                for (int c = 0; c < T::CPT; c++)
                    acc[i][c] = fmaf(xv, y[c], acc[i][c]);
            }
        }
    }
}

/* op over the 16 threads of a tile row (tx = lane & 15). */
__device__ inline float fa_row_max(float v)
{
    for (int o = 8; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ inline float fa_row_sum(float v)
{
    for (int o = 8; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* dst[row r][d] (+)= scale * acc for the valid rows and head columns. */
template <int HD, int R>
__device__ void fa_store(float *dst, size_t stride, const float (&acc)[R][HD / 16], int n_rows,
                         int hd, float scale, bool add, int ty, int tx)
{
#pragma unroll
    for (int i = 0; i < R; i++) {
        int r = ty + 16 * i;
        if (r >= n_rows)
            continue;
#pragma unroll
        for (int c = 0; c < HD / 16; c++) {
            int d = tx + 16 * c;
            if (d < hd) {
                float *x = dst + (size_t)r * stride + d;
                *x = add ? *x + scale * acc[i][c] : scale * acc[i][c];
            }
        }
    }
}

/* One block per (query tile, head, batch row). */
template <int HD, int R>
__global__ void __launch_bounds__(FA_THREADS, 2) fa_forward_kernel(fa_args p)
{
    typedef fa_tile<HD, R> T;
    extern __shared__ float sm[];
    float *Qs = sm, *Ks = Qs + T::TILE, *Vs = Ks + T::TILE, *Ps = Vs + T::TILE;
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    /* the longest rows (the last tiles) first */
    const int t0 = (gridDim.x - 1 - blockIdx.x) * T::ROWS, h = blockIdx.y, bi = blockIdx.z;
    const int g = h / p.rep;
    const size_t qld = (size_t)p.H * p.hd, kld = (size_t)p.n_kv * p.hd;
    const int nq = min(T::ROWS, p.Tq - t0);
    const size_t q_at = ((size_t)bi * p.Tq + t0) * qld + (size_t)h * p.hd;
    fa_load<HD, R>(Qs, p.q + q_at, qld, nq, p.hd);
    float m[R], l[R], o[R][T::CPT];
#pragma unroll
    for (int i = 0; i < R; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int c = 0; c < T::CPT; c++)
            o[i][c] = 0.0f;
    }
    const int kend = p.pos0 + t0 + nq; /* keys 0..kend-1 are seen by some row */
    for (int k0 = 0; k0 < kend; k0 += T::ROWS) {
        const size_t kv_at = ((size_t)bi * p.kv_len + k0) * kld + (size_t)g * p.hd;
        __syncthreads(); /* the previous tile's readers are done */
        fa_load<HD, R>(Ks, p.k + kv_at, kld, kend - k0, p.hd);
        fa_load<HD, R>(Vs, p.v + kv_at, kld, kend - k0, p.hd);
        __syncthreads();
        float s[R][R];
        fa_dots<HD, R>(s, Qs, Ks, ty, tx);
#pragma unroll
        for (int i = 0; i < R; i++) {
            const int last = p.pos0 + t0 + ty + 16 * i; /* the row's last key */
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < R; j++) {
                int key = k0 + tx + 16 * j;
                s[i][j] = key <= last && key < kend ? s[i][j] * p.scale : -INFINITY;
                mx = fmaxf(mx, s[i][j]);
            }
            /* finite: key 0 is in every row's first tile */
            const float m_new = fmaxf(m[i], fa_row_max(mx));
            const float corr = expf(m[i] - m_new);
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < R; j++) {
                float e = expf(s[i][j] - m_new);
                sum += e;
                Ps[(ty + 16 * i) * T::PLD + tx + 16 * j] = e;
            }
            l[i] = l[i] * corr + fa_row_sum(sum);
            m[i] = m_new;
#pragma unroll
            for (int c = 0; c < T::CPT; c++)
                o[i][c] *= corr;
        }
        __syncthreads();
        fa_accum<HD, R>(o, Ps, Vs, ty, tx);
    }
#pragma unroll
    for (int i = 0; i < R; i++) {
        const int r = ty + 16 * i;
        if (r < nq && tx == 0)
            p.lse[((size_t)bi * p.H + h) * p.Tq + t0 + r] = m[i] + logf(l[i]);
        const float inv = 1.0f / l[i];
#pragma unroll
        for (int c = 0; c < T::CPT; c++)
            o[i][c] *= inv;
    }
    fa_store<HD, R>(p.out + q_at, qld, o, nq, p.hd, 1.0f, false, ty, tx);
}

/* D[b][h][t] = dout_t . out_t (the softmax backward's row term): one warp
 * per row of q's layout. */
__global__ void fa_rowdot_kernel(float *D, const float *dout, const float *out, size_t rows,
                                 int T, int H, int hd)
{
    const size_t row = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x & 31;
    if (row >= rows)
        return;
    float s = 0.0f;
    for (int d = lane; d < hd; d += 32)
        s = fmaf(dout[row * hd + d], out[row * hd + d], s);
    s = qkd__warp_reduce(s, qkd__sum_op<float>());
    const size_t t = (row / H) % T, h = row % H, bi = row / ((size_t)H * T);
    if (lane == 0)
        D[(bi * H + h) * T + t] = s;
}

/* One block per (key tile, kv head, batch row): dk and dv of its keys,
 * summed over the rep query heads and the query tiles at or after it. */
template <int HD, int R>
__global__ void __launch_bounds__(FA_THREADS, 2) fa_dkdv_kernel(fa_args p)
{
    typedef fa_tile<HD, R> T;
    extern __shared__ float sm[];
    float *Ks = sm, *Vs = Ks + T::TILE, *Qs = Vs + T::TILE, *Os = Qs + T::TILE;
    float *Ps = Os + T::TILE, *Ss = Ps + T::ROWS * T::PLD;
    float *lse_s = Ss + T::ROWS * T::PLD, *D_s = lse_s + T::ROWS;
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int T_ = p.Tq, k0 = blockIdx.x * T::ROWS, g = blockIdx.y, bi = blockIdx.z;
    const size_t qld = (size_t)p.H * p.hd, kld = (size_t)p.n_kv * p.hd;
    const int nk = min(T::ROWS, T_ - k0);
    const size_t kv_at = ((size_t)bi * T_ + k0) * kld + (size_t)g * p.hd;
    fa_load<HD, R>(Ks, p.k + kv_at, kld, nk, p.hd);
    fa_load<HD, R>(Vs, p.v + kv_at, kld, nk, p.hd);
    float dk[R][T::CPT], dv[R][T::CPT];
#pragma unroll
    for (int i = 0; i < R; i++)
#pragma unroll
        for (int c = 0; c < T::CPT; c++)
            dk[i][c] = dv[i][c] = 0.0f;
    for (int r = 0; r < p.rep; r++) {
        const int h = g * p.rep + r;
        for (int q0 = k0; q0 < T_; q0 += T::ROWS) { /* earlier queries see none of these keys */
            const int nq = min(T::ROWS, T_ - q0);
            const size_t q_at = ((size_t)bi * T_ + q0) * qld + (size_t)h * p.hd;
            const size_t row_at = ((size_t)bi * p.H + h) * T_ + q0;
            __syncthreads();
            fa_load<HD, R>(Qs, p.q + q_at, qld, nq, p.hd);
            fa_load<HD, R>(Os, p.dout + q_at, qld, nq, p.hd);
            for (int i = threadIdx.x; i < T::ROWS; i += FA_THREADS) {
                lse_s[i] = i < nq ? p.lse[row_at + i] : 0.0f;
                D_s[i] = i < nq ? p.D[row_at + i] : 0.0f;
            }
            __syncthreads();
            float s[R][R], dp[R][R];
            fa_dots<HD, R>(s, Ks, Qs, ty, tx); /* [key][query] */
            fa_dots<HD, R>(dp, Vs, Os, ty, tx);
#pragma unroll
            for (int i = 0; i < R; i++)
#pragma unroll
                for (int j = 0; j < R; j++) {
                    const int key = k0 + ty + 16 * i, qi = tx + 16 * j;
                    const bool on = qi < nq && q0 + qi >= key;
                    const float pr = on ? expf(s[i][j] * p.scale - lse_s[qi]) : 0.0f;
                    Ps[(ty + 16 * i) * T::PLD + qi] = pr;
                    Ss[(ty + 16 * i) * T::PLD + qi] = pr * (dp[i][j] - D_s[qi]);
                }
            __syncthreads();
            fa_accum<HD, R>(dv, Ps, Os, ty, tx);
            fa_accum<HD, R>(dk, Ss, Qs, ty, tx);
        }
    }
    fa_store<HD, R>(p.dk + kv_at, kld, dk, nk, p.hd, p.scale, true, ty, tx);
    fa_store<HD, R>(p.dv + kv_at, kld, dv, nk, p.hd, 1.0f, true, ty, tx);
}

/* One block per (query tile, head, batch row): dq of its rows. */
template <int HD, int R>
__global__ void __launch_bounds__(FA_THREADS, 2) fa_dq_kernel(fa_args p)
{
    typedef fa_tile<HD, R> T;
    extern __shared__ float sm[];
    float *Qs = sm, *Os = Qs + T::TILE, *Ks = Os + T::TILE, *Vs = Ks + T::TILE;
    float *Ss = Vs + T::TILE;
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int T_ = p.Tq, q0 = (gridDim.x - 1 - blockIdx.x) * T::ROWS, h = blockIdx.y;
    const int bi = blockIdx.z;
    const int g = h / p.rep;
    const size_t qld = (size_t)p.H * p.hd, kld = (size_t)p.n_kv * p.hd;
    const int nq = min(T::ROWS, T_ - q0);
    const size_t q_at = ((size_t)bi * T_ + q0) * qld + (size_t)h * p.hd;
    const size_t row_at = ((size_t)bi * p.H + h) * T_ + q0;
    fa_load<HD, R>(Qs, p.q + q_at, qld, nq, p.hd);
    fa_load<HD, R>(Os, p.dout + q_at, qld, nq, p.hd);
    float lse[R], D[R], dq[R][T::CPT];
#pragma unroll
    for (int i = 0; i < R; i++) {
        const int r = ty + 16 * i;
        lse[i] = r < nq ? p.lse[row_at + r] : 0.0f;
        D[i] = r < nq ? p.D[row_at + r] : 0.0f;
#pragma unroll
        for (int c = 0; c < T::CPT; c++)
            dq[i][c] = 0.0f;
    }
    const int kend = q0 + nq;
    for (int k0 = 0; k0 < kend; k0 += T::ROWS) {
        const size_t kv_at = ((size_t)bi * T_ + k0) * kld + (size_t)g * p.hd;
        __syncthreads();
        fa_load<HD, R>(Ks, p.k + kv_at, kld, kend - k0, p.hd);
        fa_load<HD, R>(Vs, p.v + kv_at, kld, kend - k0, p.hd);
        __syncthreads();
        float s[R][R], dp[R][R];
        fa_dots<HD, R>(s, Qs, Ks, ty, tx);
        fa_dots<HD, R>(dp, Os, Vs, ty, tx);
#pragma unroll
        for (int i = 0; i < R; i++)
#pragma unroll
            for (int j = 0; j < R; j++) {
                const int qi = ty + 16 * i, key = k0 + tx + 16 * j;
                const bool on = qi < nq && key <= q0 + qi;
                const float pr = on ? expf(s[i][j] * p.scale - lse[i]) : 0.0f;
                Ss[qi * T::PLD + tx + 16 * j] = pr * (dp[i][j] - D[i]);
            }
        __syncthreads();
        fa_accum<HD, R>(dq, Ss, Ks, ty, tx);
    }
    fa_store<HD, R>(p.dq + q_at, qld, dq, nq, p.hd, p.scale, true, ty, tx);
}

enum fa_pass { FA_FORWARD, FA_DKDV, FA_DQ };

template <int HD, int R> static void fa_launch(qkd__backend *b, fa_pass pass, const fa_args &p)
{
    typedef fa_tile<HD, R> T;
    void (*kern)(fa_args);
    size_t floats;
    dim3 grid((unsigned)((p.Tq + T::ROWS - 1) / T::ROWS), (unsigned)p.H, (unsigned)p.B);
    switch (pass) {
    case FA_FORWARD:
        kern = fa_forward_kernel<HD, R>;
        floats = 3 * (size_t)T::TILE + (size_t)T::ROWS * T::PLD;
        break;
    case FA_DKDV:
        kern = fa_dkdv_kernel<HD, R>;
        floats = 4 * (size_t)T::TILE + 2 * (size_t)T::ROWS * T::PLD + 2 * T::ROWS;
        grid.y = (unsigned)p.n_kv;
        break;
    default:
        kern = fa_dq_kernel<HD, R>;
        floats = 4 * (size_t)T::TILE + (size_t)T::ROWS * T::PLD;
        break;
    }
    const int bytes = (int)(floats * sizeof(float));
    if (qkd__cuda_check(b, cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                bytes),
                        "attention shared memory") != QKD_OK)
        return;
    kern<<<grid, FA_THREADS, bytes, qkd__cuda_of(b)->stream>>>(p);
    qkd__cuda_launched(b, "attention");
}

/* The kernel for the smallest padded head size that holds p.hd. */
static void fa_run(qkd__backend *b, fa_pass pass, const fa_args &p)
{
    if (p.hd <= 16)
        fa_launch<16, 4>(b, pass, p);
    else if (p.hd <= 32)
        fa_launch<32, 4>(b, pass, p);
    else if (p.hd <= 64)
        fa_launch<64, 4>(b, pass, p);
    else if (p.hd <= 128)
        fa_launch<128, 2>(b, pass, p);
    else
        fa_launch<256, 2>(b, pass, p);
}

/* A head size past `max` is recorded as UNSUPPORTED (kernels return
 * nothing). */
extern "C" bool qkd__cuda_attention_head_ok(qkd__backend *b, int hd, int max)
{
    qkd__cuda *c = qkd__cuda_of(b);
    if (hd <= max)
        return true;
    if (c->status == QKD_OK)
        c->status = qkd__error(b->ctx, QKD_ERR_UNSUPPORTED,
                               "cuda backend: attention head size %d > %d", hd, max);
    return false;
}

/* D[b][h][t] = dout . out of each query row (fp32). */
static void fa_rowdots(qkd__backend *b, float *D, const float *dout, const float *out, int B,
                       int T, int H, int hd)
{
    const size_t rows = (size_t)B * T * H;
    fa_rowdot_kernel<<<(unsigned)((rows * 32 + FA_THREADS - 1) / FA_THREADS), FA_THREADS, 0,
                       qkd__cuda_of(b)->stream>>>(D, dout, out, rows, T, H, hd);
    qkd__cuda_launched(b, "attention row dots");
}

static fa_args fa_make(const float *q, const float *k, const float *v, int B, int Tq, int pos0,
                       int kv_len, int H, int n_kv, int hd)
{
    fa_args p = {};
    p.q = q;
    p.k = k;
    p.v = v;
    p.B = B;
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

extern "C" void qkd__cuda_attention_forward(qkd__backend *b, float *out, float *scratch,
                                            const float *q, const float *k, const float *v,
                                            int B, int Tq, int pos0, int kv_len, int n_heads,
                                            int n_kv, int hd)
{
    if (B <= 0 || Tq <= 0 || hd <= 0 || !qkd__cuda_attention_head_ok(b, hd, FA_MAX_HD))
        return;
    fa_args p = fa_make(q, k, v, B, Tq, pos0, kv_len, n_heads, n_kv, hd);
    p.out = out;
    p.lse = scratch;
    fa_run(b, FA_FORWARD, p);
}

extern "C" void qkd__cuda_attention_backward(qkd__backend *b, float *dq, float *dk, float *dv,
                                             const float *dout, float *scratch,
                                             const float *q, const float *k, const float *v,
                                             const float *out, int B, int T, int n_heads,
                                             int n_kv, int hd)
{
    if (B <= 0 || T <= 0 || hd <= 0 || !qkd__cuda_attention_head_ok(b, hd, FA_MAX_HD))
        return;
    float *D = qkd__cuda_workspace(b, (size_t)B * T * n_heads);
    if (!D)
        return;
    fa_rowdots(b, D, dout, out, B, T, n_heads, hd);
    fa_args p = fa_make(q, k, v, B, T, 0, T, n_heads, n_kv, hd);
    p.dq = dq;
    p.dk = dk;
    p.dv = dv;
    p.lse = (float *)scratch; /* read only by the backward kernels */
    p.dout = dout;
    p.D = D;
    fa_run(b, FA_DKDV, p);
    fa_run(b, FA_DQ, p);
}
