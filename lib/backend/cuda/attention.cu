/* CUDA kernels of the attention family: RoPE, and causal grouped-query
 * attention as cuBLAS products around row kernels (the straightforward
 * form: the scores and probabilities are materialised, as the reference
 * stores them; a flash-style kernel is the next step).
 *
 * Layouts (backend.h): q, out [B][Tq][H][hd]; k, v [B][kv_len][n_kv][hd];
 * probabilities [B][H][Tq][kv_len], zero past the causal limit. For one
 * batch row b, query head h = g * rep + r uses kv head g; a strided batched
 * SGEMM over g with r fixed covers rep heads apart, so each product is
 * B * rep batched calls. cuBLAS is column-major: a row-major [R][C]
 * matrix with row stride ld is its column-major transpose with leading
 * dimension ld. */
#include "backend/cuda/common.cuh"

/* ---- RoPE --------------------------------------------------------------------------- */

/* One thread per rotated pair of a head row; sign -1 rotates back. */
__global__ void rope_kernel(float *x, size_t n_pairs, int T, int n_heads, int hd, int pos0,
                            double theta, double sign)
{
    int half = hd / 2;
    QKD__CUDA_FOR(i, n_pairs)
    {
        size_t row = i / half;
        int p = 2 * (int)(i % half);
        double pos = pos0 + (double)((row / n_heads) % T);
        double angle = sign * pos * pow(theta, -(double)p / hd);
        double c = cos(angle), s = sin(angle);
        float *r = x + row * hd;
        double x0 = r[p], x1 = r[p + 1];
        r[p] = (float)(x0 * c - x1 * s);
        r[p + 1] = (float)(x0 * s + x1 * c);
    }
}

static void rope(qkd__backend *b, float *x, int B, int T, int n_heads, int hd, int pos0,
                 float theta, double sign)
{
    size_t n_pairs = (size_t)B * T * n_heads * (hd / 2);
    if (!n_pairs)
        return;
    rope_kernel<<<qkd__cuda_blocks(n_pairs), QKD__CUDA_THREADS, 0, qkd__cuda_of(b)->stream>>>(
        x, n_pairs, T, n_heads, hd, pos0, theta, sign);
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

/* ---- batched products ------------------------------------------------------------------- */

/* One strided batched SGEMM (column-major, see above) over the n_kv heads
 * of one (b, r): C_g = alpha op(A_g) op(B_g) + beta C_g. */
struct gemm {
    cublasOperation_t ta, tb;
    int m, n, k;
    float alpha, beta;
    const float *A;
    int lda;
    long long sa;
    const float *B;
    int ldb;
    long long sb;
    float *C;
    int ldc;
    long long sc;
};

static void run_gemm(qkd__backend *b, const gemm &g, int count, const char *what)
{
    qkd__cuda_check_blas(b,
                         cublasSgemmStridedBatched(qkd__cuda_of(b)->blas, g.ta, g.tb, g.m, g.n,
                                                   g.k, &g.alpha, g.A, g.lda, g.sa, g.B, g.ldb,
                                                   g.sb, &g.beta, g.C, g.ldc, g.sc, count),
                         what);
}

/* Pointers and strides of one attention call, per (b, r). */
struct attn {
    int B, Tq, pos0, kv_len, H, n_kv, hd, rep;
    size_t ldq, ldk; /* row strides of q-like and k-like tensors */

    size_t q_at(int b, int r) const { return (size_t)b * Tq * ldq + (size_t)r * hd; }
    size_t kv_at(int b) const { return (size_t)b * kv_len * ldk; }
    /* probabilities (or the backward's per-b workspace, b = 0) */
    size_t p_at(int b, int r) const { return ((size_t)b * H + r) * Tq * kv_len; }
    long long q_stride() const { return (long long)rep * hd; }
    long long p_stride() const { return (long long)rep * Tq * kv_len; }
};

static attn make_attn(int B, int Tq, int pos0, int kv_len, int H, int n_kv, int hd)
{
    attn a = {B, Tq, pos0, kv_len, H, n_kv, hd, H / n_kv, (size_t)H * hd, (size_t)n_kv * hd};
    return a;
}

/* S[t][key] = alpha * x_t . y_key for one (b, r): x q-like, y k-like;
 * keys past pos0 + Tq, which no query row sees, are left alone. */
static gemm scores(const attn &a, const float *x, const float *y, float *S, float alpha)
{
    gemm g = {CUBLAS_OP_T, CUBLAS_OP_N, a.pos0 + a.Tq, a.Tq, a.hd, alpha, 0.0f,
              y, (int)a.ldk, a.hd, x, (int)a.ldq, a.q_stride(), S, a.kv_len, a.p_stride()};
    return g;
}

/* ---- forward --------------------------------------------------------------------------- */

/* Row (b, h, t) of the scaled scores becomes the softmax over keys
 * 0..pos0+t, zero past them; float is plenty for a probability. */
__global__ void causal_softmax_kernel(float *P, int Tq, int pos0, int kv_len)
{
    float *row = P + (size_t)blockIdx.x * kv_len;
    int n_keys = pos0 + (int)(blockIdx.x % Tq) + 1;
    float mx = -INFINITY, sum = 0.0f;
    for (int key = threadIdx.x; key < n_keys; key += blockDim.x)
        mx = fmaxf(mx, row[key]);
    mx = qkd__block_maxf(mx);
    for (int key = threadIdx.x; key < n_keys; key += blockDim.x)
        sum += expf(row[key] - mx);
    float inv = 1.0f / qkd__block_sumf(sum);
    for (int key = threadIdx.x; key < kv_len; key += blockDim.x)
        row[key] = key < n_keys ? expf(row[key] - mx) * inv : 0.0f;
}

extern "C" void qkd__cuda_attention_forward(qkd__backend *b, float *out, float *scratch,
                                            const float *q, const float *k, const float *v,
                                            int B, int Tq, int pos0, int kv_len, int n_heads,
                                            int n_kv, int hd)
{
    if (B <= 0 || Tq <= 0 || hd <= 0)
        return;
    attn a = make_attn(B, Tq, pos0, kv_len, n_heads, n_kv, hd);
    float scale = (float)(1.0 / sqrt((double)hd));
    for (int bi = 0; bi < B; bi++)
        for (int r = 0; r < a.rep; r++)
            run_gemm(b, scores(a, q + a.q_at(bi, r), k + a.kv_at(bi), scratch + a.p_at(bi, r), scale),
                     n_kv, "attention scores");
    causal_softmax_kernel<<<(unsigned)((size_t)B * n_heads * Tq), QKD__CUDA_THREADS, 0,
                            qkd__cuda_of(b)->stream>>>(scratch, Tq, pos0, kv_len);
    qkd__cuda_launched(b, "attention softmax");
    /* out_t = sum_key P[t][key] v_key over the keys some row sees (a zero
     * probability times an unused cache row could still be NaN) */
    for (int bi = 0; bi < B; bi++)
        for (int r = 0; r < a.rep; r++) {
            gemm g = {CUBLAS_OP_N, CUBLAS_OP_N, hd, Tq, pos0 + Tq, 1.0f, 0.0f,
                      v + a.kv_at(bi), (int)a.ldk, hd,
                      scratch + a.p_at(bi, r), kv_len, a.p_stride(),
                      out + a.q_at(bi, r), (int)a.ldq, a.q_stride()};
            run_gemm(b, g, n_kv, "attention output");
        }
}

/* ---- backward ----------------------------------------------------------------------------
 * Per batch row b, in a workspace W [H][T][T]: W = dP (dP[t][key] =
 * dout_t . v_key), then in place dS = P (dP - dout_t . out_t), then
 * dq += scale dS k, dk += scale dS^T q, dv += P^T dout (summed over the
 * rep heads of a kv head by successive calls with beta 1). */

__global__ void dscores_kernel(float *W, const float *P, const float *dout, const float *out,
                               int T, int H, int hd)
{
    int h = blockIdx.x / T, t = blockIdx.x % T;
    size_t qo = ((size_t)t * H + h) * hd;
    double d = 0.0;
    for (int c = threadIdx.x; c < hd; c += blockDim.x)
        d += (double)dout[qo + c] * out[qo + c];
    float D = (float)qkd__block_sum(d);
    float *w = W + (size_t)blockIdx.x * T;
    const float *p = P + (size_t)blockIdx.x * T;
    for (int key = threadIdx.x; key < T; key += blockDim.x)
        w[key] = key <= t ? p[key] * (w[key] - D) : 0.0f;
}

extern "C" void qkd__cuda_attention_backward(qkd__backend *b, float *dq, float *dk, float *dv,
                                             const float *dout, const float *scratch,
                                             const float *q, const float *k, const float *v,
                                             const float *out, int B, int T, int n_heads,
                                             int n_kv, int hd)
{
    if (B <= 0 || T <= 0 || hd <= 0)
        return;
    attn a = make_attn(B, T, 0, T, n_heads, n_kv, hd);
    float *W = qkd__cuda_workspace(b, (size_t)n_heads * T * T);
    if (!W)
        return;
    float scale = (float)(1.0 / sqrt((double)hd));
    for (int bi = 0; bi < B; bi++) {
        const float *P = scratch + a.p_at(bi, 0);
        for (int r = 0; r < a.rep; r++)
            run_gemm(b, scores(a, dout + a.q_at(bi, r), v + a.kv_at(bi), W + a.p_at(0, r), 1.0f),
                     n_kv, "attention dP");
        dscores_kernel<<<(unsigned)((size_t)n_heads * T), QKD__CUDA_THREADS, 0,
                         qkd__cuda_of(b)->stream>>>(W, P, dout + a.q_at(bi, 0),
                                                    out + a.q_at(bi, 0), T, n_heads, hd);
        qkd__cuda_launched(b, "attention dS");
        for (int r = 0; r < a.rep; r++) {
            const float *Wr = W + a.p_at(0, r), *Pr = P + a.p_at(0, r);
            gemm gq = {CUBLAS_OP_N, CUBLAS_OP_N, hd, T, T, scale, 1.0f,
                       k + a.kv_at(bi), (int)a.ldk, hd, Wr, T, a.p_stride(),
                       dq + a.q_at(bi, r), (int)a.ldq, a.q_stride()};
            gemm gk = {CUBLAS_OP_N, CUBLAS_OP_T, hd, T, T, scale, 1.0f,
                       q + a.q_at(bi, r), (int)a.ldq, a.q_stride(), Wr, T, a.p_stride(),
                       dk + a.kv_at(bi), (int)a.ldk, hd};
            gemm gv = {CUBLAS_OP_N, CUBLAS_OP_T, hd, T, T, 1.0f, 1.0f,
                       dout + a.q_at(bi, r), (int)a.ldq, a.q_stride(), Pr, T, a.p_stride(),
                       dv + a.kv_at(bi), (int)a.ldk, hd};
            run_gemm(b, gq, n_kv, "attention dq");
            run_gemm(b, gk, n_kv, "attention dk");
            run_gemm(b, gv, n_kv, "attention dv");
        }
    }
}
