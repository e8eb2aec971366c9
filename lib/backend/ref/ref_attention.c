/* Reference kernels of the attention family: RoPE and causal grouped-query
 * attention. */
#include <math.h>
#include <string.h>

#include "backend/ref/ref.h"
#include "core/half.h"

/* ---- RoPE --------------------------------------------------------------------- */

struct rope_job {
    float *x;
    int T, n_heads, hd, pos0;
    double theta;
    double sign; /* +1 forward, -1 backward: the inverse rotation */
};

/* One item is one head row of hd values. */
static void rope_range(const void *arg, int64_t begin, int64_t end)
{
    const struct rope_job *j = arg;
    for (int64_t i = begin; i < end; i++) {
        float *row = j->x + (size_t)i * j->hd;
        double pos = j->pos0 + (double)((i / j->n_heads) % j->T);
        for (int p = 0; p + 1 < j->hd; p += 2) {
            double angle = j->sign * pos * pow(j->theta, -(double)p / j->hd);
            double c = cos(angle), s = sin(angle);
            double x0 = row[p], x1 = row[p + 1];
            row[p] = (float)(x0 * c - x1 * s);
            row[p + 1] = (float)(x0 * s + x1 * c);
        }
    }
}

static void rope(qkd__backend *b, float *x, int B, int T, int n_heads, int hd, int pos0,
                 float theta, double sign)
{
    struct rope_job job = {.x = x, .T = T, .n_heads = n_heads, .hd = hd, .pos0 = pos0,
                           .theta = theta, .sign = sign};
    qkd__ref_parallel(b, (int64_t)B * T * n_heads, 40 * (int64_t)hd, rope_range, &job);
}

void qkd__ref_rope_forward(qkd__backend *b, float *x, int B, int T, int n_heads, int head_dim,
                           int pos0, float theta)
{
    rope(b, x, B, T, n_heads, head_dim, pos0, theta, 1.0);
}

/* The rotation is orthogonal: its transpose, the gradient map, is the
 * rotation by the opposite angle. */
void qkd__ref_rope_backward(qkd__backend *b, float *dx, int B, int T, int n_heads,
                            int head_dim, int pos0, float theta)
{
    rope(b, dx, B, T, n_heads, head_dim, pos0, theta, -1.0);
}

/* ---- attention ------------------------------------------------------------------
 * Layouts: q, out, dout, dq [B][Tq][n_heads][hd]; k, v, dk, dv
 * [B][kv_len][n_kv][hd]; probabilities [B][n_heads][Tq][kv_len], zero past
 * the causal limit. The bf16 slots are the same code with each input of a
 * product rounded to bf16 as it is read (rd, dot_rd): q, k, v, dout, the
 * probabilities and the score gradients. The row term dout . out reads
 * dout unrounded. The bodies take `bf16` as an argument that their range
 * functions pass as a constant, and are always inlined, so the fp32
 * reference (the yardstick of the SIMD benchmarks) tests no flag in its
 * inner loops. */

#define BODY static inline __attribute__((always_inline))

struct attn_job {
    float *out, *probs, *dq, *dk, *dv;
    const float *q, *k, *v, *dout, *o, *P;
    int Tq, pos0, kv_len, n_heads, n_kv, hd;
    int bf16; /* round the inputs of every product to bf16 */
    double scale;
};

/* x as an input of a product. */
BODY double rd(int bf16, float x)
{
    return bf16 ? qkd__bf16_round(x) : x;
}

/* x . y over n, both read as product inputs. */
BODY double dot_rd(int bf16, const float *x, const float *y, int n)
{
    if (!bf16)
        return qkd__ref_dot(x, y, n);
    double s = 0.0;
    for (int i = 0; i < n; i++)
        s += rd(1, x[i]) * rd(1, y[i]);
    return s;
}

static size_t q_off(const struct attn_job *j, int64_t b, int t, int h)
{
    return (((size_t)b * j->Tq + t) * j->n_heads + h) * j->hd;
}

static size_t kv_off(const struct attn_job *j, int64_t b, int pos, int g)
{
    return (((size_t)b * j->kv_len + pos) * j->n_kv + g) * j->hd;
}

static size_t p_off(const struct attn_job *j, int64_t b, int h, int t)
{
    return (((size_t)b * j->n_heads + h) * j->Tq + t) * j->kv_len;
}

static int kv_head(const struct attn_job *j, int h)
{
    return h / (j->n_heads / j->n_kv);
}

/* Item i enumerates (b, mid, inner) with inner fastest; returns b. */
static int64_t split_item(int64_t i, int n_inner, int n_mid, int *inner, int *mid)
{
    *inner = (int)(i % n_inner);
    *mid = (int)(i / n_inner % n_mid);
    return i / ((int64_t)n_inner * n_mid);
}

/* Width of the column block that starts at c0 in a row of hd. */
static int block_cols(int hd, int c0)
{
    return hd - c0 < QKD__REF_COLS ? hd - c0 : QKD__REF_COLS;
}

BODY double score(const struct attn_job *j, const float *qrow, int64_t b, int key, int g,
                  int bf16)
{
    return dot_rd(bf16, qrow, j->k + kv_off(j, b, key, g), j->hd) * j->scale;
}

/* The probabilities, then the bf16 slots' room (bf16_work): rotated
 * copies of q and k, and fp32 gradients for a backward that writes bits. */
size_t qkd__ref_attention_scratch_floats(qkd__backend *b, int B, int Tq, int kv_len,
                                         int n_heads, int n_kv, int hd)
{
    (void)b;
    const size_t nq = (size_t)B * Tq * n_heads * hd, nk = (size_t)B * kv_len * n_kv * hd;
    return (size_t)B * n_heads * Tq * kv_len + 3 * nq + 3 * nk;
}

/* The bf16 slots' working copies in scratch past the probabilities: q and
 * k rotated (query row t to pos0 + t, key row j to j), dq, dk, dv, and
 * the output's values where it is given (or written) as bits only. */
struct bf16_work {
    float *q, *k, *dq, *dk, *dv, *o;
    size_t nq, nk; /* floats of q (dq, o) and of k (dk, dv) */
};

static struct bf16_work bf16_work(float *scratch, int B, int Tq, int kv_len, int n_heads,
                                  int n_kv, int hd)
{
    struct bf16_work w;
    w.nq = (size_t)B * Tq * n_heads * hd;
    w.nk = (size_t)B * kv_len * n_kv * hd;
    w.q = scratch + (size_t)B * n_heads * Tq * kv_len;
    w.k = w.q + w.nq;
    w.dq = w.k + w.nk;
    w.dk = w.dq + w.nq;
    w.dv = w.dk + w.nk;
    w.o = w.dv + w.nk;
    return w;
}

/* Rotated copies of q and k into w. */
static void rope_copies(qkd__backend *b, const struct bf16_work *w, const float *q,
                        const float *k, int B, int Tq, int pos0, int kv_len, int n_heads,
                        int n_kv, int hd, float theta)
{
    memcpy(w->q, q, w->nq * sizeof *q);
    memcpy(w->k, k, w->nk * sizeof *k);
    rope(b, w->q, B, Tq, n_heads, hd, pos0, theta, 1.0);
    rope(b, w->k, B, kv_len, n_kv, hd, 0, theta, 1.0);
}

/* Softmax over the causal scores of one query row, in double; the scores
 * are recomputed rather than stored so no precision is lost. */
BODY void attention_probs(const struct attn_job *j, int64_t b, int t, int h, float *p,
                         int bf16)
{
    const float *qrow = j->q + q_off(j, b, t, h);
    int g = kv_head(j, h), n_keys = j->pos0 + t + 1;
    double mx = -INFINITY, sum = 0.0;
    for (int key = 0; key < n_keys; key++)
        mx = fmax(mx, score(j, qrow, b, key, g, bf16));
    for (int key = 0; key < n_keys; key++)
        sum += exp(score(j, qrow, b, key, g, bf16) - mx);
    for (int key = 0; key < n_keys; key++)
        p[key] = (float)(exp(score(j, qrow, b, key, g, bf16) - mx) / sum);
    for (int key = n_keys; key < j->kv_len; key++)
        p[key] = 0.0f;
}

/* One item is one query row (b, t, h). */
BODY void forward_rows(const struct attn_job *j, int64_t begin, int64_t end, int bf16)
{
    double acc[QKD__REF_COLS];
    for (int64_t i = begin; i < end; i++) {
        int h, t;
        int64_t b = split_item(i, j->n_heads, j->Tq, &h, &t);
        int g = kv_head(j, h), n_keys = j->pos0 + t + 1;
        float *p = j->probs + p_off(j, b, h, t);
        float *o = j->out + q_off(j, b, t, h);
        attention_probs(j, b, t, h, p, bf16);
        for (int c0 = 0; c0 < j->hd; c0 += QKD__REF_COLS) {
            int nc = block_cols(j->hd, c0);
            for (int c = 0; c < nc; c++)
                acc[c] = 0.0;
            for (int key = 0; key < n_keys; key++) {
                const float *vr = j->v + kv_off(j, b, key, g) + c0;
                for (int c = 0; c < nc; c++)
                    acc[c] += rd(bf16, p[key]) * rd(bf16, vr[c]);
            }
            for (int c = 0; c < nc; c++)
                o[c0 + c] = (float)acc[c];
        }
    }
}

static void attention_forward_range(const void *arg, int64_t begin, int64_t end)
{
    const struct attn_job *j = arg;
    if (j->bf16)
        forward_rows(j, begin, end, 1);
    else
        forward_rows(j, begin, end, 0);
}

static void attention_forward(qkd__backend *b, float *out, float *scratch, const float *q,
                              const float *k, const float *v, int B, int Tq, int pos0,
                              int kv_len, int n_heads, int n_kv, int hd, int bf16)
{
    struct attn_job job = {.out = out, .probs = scratch, .q = q, .k = k, .v = v, .Tq = Tq,
                           .pos0 = pos0, .kv_len = kv_len, .n_heads = n_heads, .n_kv = n_kv,
                           .hd = hd, .bf16 = bf16, .scale = 1.0 / sqrt((double)hd)};
    int64_t rows = (int64_t)B * Tq * n_heads;
    qkd__ref_parallel(b, rows, 4 * (int64_t)(pos0 + (Tq + 1) / 2) * hd,
                      attention_forward_range, &job);
}

void qkd__ref_attention_forward(qkd__backend *b, float *out, float *scratch, const float *q,
                                const float *k, const float *v, int B, int Tq, int pos0,
                                int kv_len, int n_heads, int n_kv, int hd)
{
    attention_forward(b, out, scratch, q, k, v, B, Tq, pos0, kv_len, n_heads, n_kv, hd, 0);
}

/* n floats as bf16 bits. */
static void to_bits(uint16_t *dst, const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = qkd__f32_to_bf16(x[i]);
}

void qkd__ref_attention_forward_bf16(qkd__backend *b, float *out, uint16_t *out_bits,
                                     float *scratch,
                                     const float *q, const float *k, const float *v, int B,
                                     int Tq, int pos0, int kv_len, int n_heads, int n_kv,
                                     int hd, float rope_theta)
{
    const struct bf16_work w = bf16_work(scratch, B, Tq, kv_len, n_heads, n_kv, hd);
    if (rope_theta > 0.0f) {
        rope_copies(b, &w, q, k, B, Tq, pos0, kv_len, n_heads, n_kv, hd, rope_theta);
        q = w.q;
        k = w.k;
    }
    if (!out) /* the bits alone */
        out = w.o;
    attention_forward(b, out, scratch, q, k, v, B, Tq, pos0, kv_len, n_heads, n_kv, hd, 1);
    if (out_bits)
        to_bits(out_bits, out, w.nq);
}

/* Gradient of the score s = scale * q.k of key `key` for query row
 * (b, t, h): ds = p (dout . v_key - dout . out), since
 * sum_i p_i (dout . v_i) is dout . out (a row term, never rounded). */
BODY double dscore(const struct attn_job *j, int64_t b, int t, int h, int key, int bf16)
{
    const float *g = j->dout + q_off(j, b, t, h);
    double dp = dot_rd(bf16, g, j->v + kv_off(j, b, key, kv_head(j, h)), j->hd);
    double d = qkd__ref_dot(g, j->o + q_off(j, b, t, h), j->hd);
    return j->P[p_off(j, b, h, t) + key] * (dp - d);
}

/* dq of one query row (b, t, h): scale * sum_key ds_key k_key. */
BODY void dq_rows(const struct attn_job *j, int64_t begin, int64_t end, int bf16)
{
    double acc[QKD__REF_COLS];
    for (int64_t i = begin; i < end; i++) {
        int h, t;
        int64_t b = split_item(i, j->n_heads, j->Tq, &h, &t);
        int g = kv_head(j, h);
        float *dq = j->dq + q_off(j, b, t, h);
        for (int c0 = 0; c0 < j->hd; c0 += QKD__REF_COLS) {
            int nc = block_cols(j->hd, c0);
            for (int c = 0; c < nc; c++)
                acc[c] = 0.0;
            for (int key = 0; key <= t; key++) {
                double ds = dscore(j, b, t, h, key, bf16);
                const float *kr = j->k + kv_off(j, b, key, g) + c0;
                if (bf16)
                    ds = rd(1, (float)ds);
                for (int c = 0; c < nc; c++)
                    acc[c] += ds * rd(bf16, kr[c]);
            }
            for (int c = 0; c < nc; c++)
                dq[c0 + c] = (float)(dq[c0 + c] + j->scale * acc[c]);
        }
    }
}

/* dk and dv of one key row (b, key, g), summed over the query heads of
 * group g and the query rows t >= key that see it: this task alone writes
 * them, so heads sharing a kv head never race. */
BODY void dkdv_rows(const struct attn_job *j, int64_t begin, int64_t end, int bf16)
{
    int rep = j->n_heads / j->n_kv;
    double acck[QKD__REF_COLS], accv[QKD__REF_COLS];
    for (int64_t i = begin; i < end; i++) {
        int g, key;
        int64_t b = split_item(i, j->n_kv, j->Tq, &g, &key);
        float *dk = j->dk + kv_off(j, b, key, g);
        float *dv = j->dv + kv_off(j, b, key, g);
        for (int c0 = 0; c0 < j->hd; c0 += QKD__REF_COLS) {
            int nc = block_cols(j->hd, c0);
            for (int c = 0; c < nc; c++)
                acck[c] = accv[c] = 0.0;
            for (int h = g * rep; h < (g + 1) * rep; h++) {
                for (int t = key; t < j->Tq; t++) {
                    double p = rd(bf16, j->P[p_off(j, b, h, t) + key]);
                    double ds = dscore(j, b, t, h, key, bf16);
                    const float *qr = j->q + q_off(j, b, t, h) + c0;
                    const float *gr = j->dout + q_off(j, b, t, h) + c0;
                    if (bf16)
                        ds = rd(1, (float)ds);
                    for (int c = 0; c < nc; c++) {
                        acck[c] += ds * rd(bf16, qr[c]);
                        accv[c] += p * rd(bf16, gr[c]);
                    }
                }
            }
            for (int c = 0; c < nc; c++) {
                dk[c0 + c] = (float)(dk[c0 + c] + j->scale * acck[c]);
                dv[c0 + c] = (float)(dv[c0 + c] + accv[c]);
            }
        }
    }
}

static void attention_dq_range(const void *arg, int64_t begin, int64_t end)
{
    const struct attn_job *j = arg;
    if (j->bf16)
        dq_rows(j, begin, end, 1);
    else
        dq_rows(j, begin, end, 0);
}

static void attention_dkdv_range(const void *arg, int64_t begin, int64_t end)
{
    const struct attn_job *j = arg;
    if (j->bf16)
        dkdv_rows(j, begin, end, 1);
    else
        dkdv_rows(j, begin, end, 0);
}

static void attention_backward(qkd__backend *b, float *dq, float *dk, float *dv,
                               const float *dout, float *scratch, const float *q,
                               const float *k, const float *v, const float *out, int B, int T,
                               int n_heads, int n_kv, int hd, int bf16)
{
    struct attn_job job = {.dq = dq, .dk = dk, .dv = dv, .q = q, .k = k, .v = v,
                           .dout = dout, .o = out, .P = scratch, .Tq = T,
                           .pos0 = 0, .kv_len = T, .n_heads = n_heads, .n_kv = n_kv, .hd = hd,
                           .bf16 = bf16, .scale = 1.0 / sqrt((double)hd)};
    int64_t per_row = 6 * (int64_t)(T + 1) / 2 * hd;
    qkd__ref_parallel(b, (int64_t)B * T * n_heads, per_row, attention_dq_range, &job);
    qkd__ref_parallel(b, (int64_t)B * T * n_kv, per_row * (n_heads / n_kv),
                      attention_dkdv_range, &job);
}

void qkd__ref_attention_backward(qkd__backend *b, float *dq, float *dk, float *dv,
                                 const float *dout, float *scratch, const float *q,
                                 const float *k, const float *v, const float *out, int B,
                                 int T, int n_heads, int n_kv, int hd)
{
    attention_backward(b, dq, dk, dv, dout, scratch, q, k, v, out, B, T, n_heads, n_kv, hd, 0);
}

/* The fp32 pair's accumulating kernels into zeroed gradients (written,
 * not added; for dqkv_bits, into the scratch's and then rounded); with
 * RoPE, those of the forward's rotated copies (left in the scratch),
 * rotated back (the rotation's transpose) in place. */
void qkd__ref_attention_backward_bf16(qkd__backend *b, float *dq, float *dk, float *dv,
                                      const float *dout, float *scratch, const float *q,
                                      const float *k, const float *v, qkd__bf16_in out, int B,
                                      int T, int n_heads, int n_kv, int hd, float rope_theta,
                                      uint16_t *dqkv_bits)
{
    const struct bf16_work w = bf16_work(scratch, B, T, T, n_heads, n_kv, hd);
    if (out.bits) /* the output's values, for the row term */
        for (size_t i = 0; i < w.nq; i++)
            w.o[i] = qkd__bf16_to_f32(out.bits[i]);
    const float *o = out.bits ? w.o : out.f32;
    if (dqkv_bits) {
        dq = w.dq;
        dk = w.dk;
        dv = w.dv;
    }
    memset(dq, 0, w.nq * sizeof *dq);
    memset(dk, 0, w.nk * sizeof *dk);
    memset(dv, 0, w.nk * sizeof *dv);
    if (rope_theta > 0.0f) {
        q = w.q;
        k = w.k;
    }
    attention_backward(b, dq, dk, dv, dout, scratch, q, k, v, o, B, T, n_heads, n_kv, hd, 1);
    if (rope_theta > 0.0f) {
        rope(b, dq, B, T, n_heads, hd, 0, rope_theta, -1.0);
        rope(b, dk, B, T, n_kv, hd, 0, rope_theta, -1.0);
    }
    if (dqkv_bits) {
        to_bits(dqkv_bits, dq, w.nq);
        to_bits(dqkv_bits + w.nq, dk, w.nk);
        to_bits(dqkv_bits + w.nq + w.nk, dv, w.nk);
    }
}
