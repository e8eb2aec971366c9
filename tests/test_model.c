/* The LLaMA model: tensor table, forward against a naive double-precision
 * forward written here, finite-difference gradients, decode against
 * forward, determinism, accumulation, allocation-free steps and errors. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

#include "backend/backend.h"
#include "model/model_impl.h"
#include "tokenizer/tokenizer.h"

/* ---- fixtures -------------------------------------------------------------- */

enum { TB = 2, TT = 8, TV = 19 };

static qkd_model_config tiny_config(int tied)
{
    qkd_model_config c;
    qkd_model_config_init(&c);
    c.dim = 16;
    c.hidden_dim = 24;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.vocab_size = TV;
    c.max_seq_len = TT;
    c.tied_embeddings = tied;
    return c;
}

static uint64_t lcg_next(uint64_t *s)
{
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return *s >> 33;
}

static void random_ids(int32_t *ids, int n, int vocab, uint64_t seed)
{
    for (int i = 0; i < n; i++)
        ids[i] = (int32_t)(lcg_next(&seed) % (uint64_t)vocab);
}

static int64_t tensor_len(const qkd_model *m, int index)
{
    qkd_tensor_info info = {.size = sizeof info};
    ck_assert_int_eq(qkd_model_tensor_info(m, index, &info), QKD_OK);
    return info.n_elements;
}

static float *tensor_copy(const qkd_model *m, int index, int grad)
{
    size_t n = (size_t)tensor_len(m, index);
    float *x = malloc(n * sizeof *x);
    ck_assert_ptr_nonnull(x);
    if (grad)
        ck_assert_int_eq(qkd_model_grad_get(m, index, x, n), QKD_OK);
    else
        ck_assert_int_eq(qkd_model_tensor_get(m, index, x, n), QKD_OK);
    return x;
}

/* Random weights, and norm weights away from 1 so their gradients and
 * their use in the forward are exercised too. */
static qkd_model *tiny_model(qkd_context *ctx, int tied, uint64_t seed)
{
    qkd_model_config c = tiny_config(tied);
    qkd_model *m = NULL;
    ck_assert_int_eq(qkd_model_create(ctx, &c, &m), QKD_OK);
    ck_assert_int_eq(qkd_model_init_random(m, seed, 0.4f), QKD_OK);
    for (int i = 0; i < qkd_model_n_tensors(m); i++) {
        qkd_tensor_info info = {.size = sizeof info};
        ck_assert_int_eq(qkd_model_tensor_info(m, i, &info), QKD_OK);
        if (info.n_dims != 1)
            continue;
        float w[64];
        ck_assert_int_le(info.n_elements, 64);
        for (int j = 0; j < info.n_elements; j++)
            w[j] = 0.5f + (float)(lcg_next(&seed) % 1000) / 1000.0f;
        ck_assert_int_eq(qkd_model_tensor_set(m, i, w, (size_t)info.n_elements), QKD_OK);
    }
    return m;
}

static float *all_logits(qkd_model *m, size_t n)
{
    float *x = malloc(n * sizeof *x);
    ck_assert_ptr_nonnull(x);
    ck_assert_int_eq(qkd_model_logits(m, x, n), QKD_OK);
    return x;
}

/* Every tensor's values, by index (free with free_tensors). */
static float **all_tensors(const qkd_model *m)
{
    float **w = calloc((size_t)qkd_model_n_tensors(m), sizeof *w);
    ck_assert_ptr_nonnull(w);
    for (int i = 0; i < qkd_model_n_tensors(m); i++)
        w[i] = tensor_copy(m, i, 0);
    return w;
}

static void free_tensors(const qkd_model *m, float **w)
{
    for (int i = 0; i < qkd_model_n_tensors(m); i++)
        free(w[i]);
    free(w);
}

/* ---- an independent forward: double precision, written from the math ------ */

typedef struct naive {
    qkd_model_config c;
    float **w; /* host copies of every tensor, by index (all_tensors) */
    const qkd_model *m;
} naive;

static const float *naive_w(const naive *n, qkd_tensor_kind kind, int layer)
{
    int i = qkd__model_tensor_index(n->m, kind, layer);
    if (i < 0) /* tied head */
        i = qkd__model_tensor_index(n->m, QKD_TENSOR_TOKEN_EMBD, -1);
    return n->w[i];
}

static void naive_rmsnorm(double *out, const double *x, const float *w, int C, double eps)
{
    double ss = 0;
    for (int i = 0; i < C; i++)
        ss += x[i] * x[i];
    double r = 1.0 / sqrt(ss / C + eps);
    for (int i = 0; i < C; i++)
        out[i] = x[i] * r * w[i];
}

/* out[OC] = W[OC][C] x */
static void naive_matvec(double *out, const float *w, const double *x, int C, int OC)
{
    for (int o = 0; o < OC; o++) {
        double s = 0;
        for (int i = 0; i < C; i++)
            s += (double)w[(size_t)o * C + i] * x[i];
        out[o] = s;
    }
}

static void naive_rope(double *x, int n_heads, int hd, int pos, double theta)
{
    for (int h = 0; h < n_heads; h++) {
        for (int i = 0; i < hd; i += 2) {
            double a = pos * pow(theta, -(double)i / hd);
            double *p = x + h * hd + i, x0 = p[0], x1 = p[1];
            p[0] = x0 * cos(a) - x1 * sin(a);
            p[1] = x0 * sin(a) + x1 * cos(a);
        }
    }
}

/* Causal GQA attention of row t over keys/values 0..t ([T][kvd] each). */
static void naive_attention(double *out, const double *q, const double *k, const double *v,
                            int t, const qkd_model_config *c)
{
    const int hd = c->dim / c->n_heads, kvd = hd * c->n_kv_heads;
    double p[TT];
    for (int h = 0; h < c->n_heads; h++) {
        int g = h / (c->n_heads / c->n_kv_heads);
        double mx = -INFINITY, z = 0;
        for (int s = 0; s <= t; s++) {
            double d = 0;
            for (int i = 0; i < hd; i++)
                d += q[h * hd + i] * k[s * kvd + g * hd + i];
            p[s] = d / sqrt((double)hd);
            mx = fmax(mx, p[s]);
        }
        for (int s = 0; s <= t; s++)
            z += (p[s] = exp(p[s] - mx));
        for (int i = 0; i < hd; i++) {
            double o = 0;
            for (int s = 0; s <= t; s++)
                o += p[s] / z * v[s * kvd + g * hd + i];
            out[h * hd + i] = o;
        }
    }
}

static void naive_layer(const naive *n, int l, double (*x)[16], int T)
{
    const qkd_model_config *c = &n->c;
    const int C = c->dim, H = c->hidden_dim, hd = C / c->n_heads, kvd = hd * c->n_kv_heads;
    double h[16], q[TT][16], k[TT][16], v[TT][16], att[16], o[16], g[32], u[32];
    for (int t = 0; t < T; t++) {
        naive_rmsnorm(h, x[t], naive_w(n, QKD_TENSOR_ATTN_NORM, l), C, c->norm_eps);
        naive_matvec(q[t], naive_w(n, QKD_TENSOR_ATTN_Q, l), h, C, C);
        naive_matvec(k[t], naive_w(n, QKD_TENSOR_ATTN_K, l), h, C, kvd);
        naive_matvec(v[t], naive_w(n, QKD_TENSOR_ATTN_V, l), h, C, kvd);
        naive_rope(q[t], c->n_heads, hd, t, c->rope_theta);
        naive_rope(k[t], c->n_kv_heads, hd, t, c->rope_theta);
    }
    for (int t = 0; t < T; t++) {
        /* k and v rows are kvd apart: repack them contiguously */
        double kk[TT * 16], vv[TT * 16];
        for (int s = 0; s <= t; s++)
            for (int i = 0; i < kvd; i++)
                kk[s * kvd + i] = k[s][i], vv[s * kvd + i] = v[s][i];
        naive_attention(att, q[t], kk, vv, t, c);
        naive_matvec(o, naive_w(n, QKD_TENSOR_ATTN_OUTPUT, l), att, C, C);
        for (int i = 0; i < C; i++)
            x[t][i] += o[i];
        naive_rmsnorm(h, x[t], naive_w(n, QKD_TENSOR_FFN_NORM, l), C, c->norm_eps);
        naive_matvec(g, naive_w(n, QKD_TENSOR_FFN_GATE, l), h, C, H);
        naive_matvec(u, naive_w(n, QKD_TENSOR_FFN_UP, l), h, C, H);
        for (int i = 0; i < H; i++)
            g[i] = g[i] / (1.0 + exp(-g[i])) * u[i];
        naive_matvec(o, naive_w(n, QKD_TENSOR_FFN_DOWN, l), g, H, C);
        for (int i = 0; i < C; i++)
            x[t][i] += o[i];
    }
}

/* logits[T][V] of one sequence. */
static void naive_forward(const naive *n, const int32_t *tokens, int T, double *logits)
{
    const qkd_model_config *c = &n->c;
    double x[TT][16], h[16];
    const float *embd = naive_w(n, QKD_TENSOR_TOKEN_EMBD, -1);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < c->dim; i++)
            x[t][i] = embd[(size_t)tokens[t] * c->dim + i];
    for (int l = 0; l < c->n_layers; l++)
        naive_layer(n, l, x, T);
    for (int t = 0; t < T; t++) {
        naive_rmsnorm(h, x[t], naive_w(n, QKD_TENSOR_OUTPUT_NORM, -1), c->dim, c->norm_eps);
        naive_matvec(logits + (size_t)t * c->vocab_size, naive_w(n, QKD_TENSOR_OUTPUT, -1), h,
                     c->dim, c->vocab_size);
    }
}

/* -log softmax(logits)[target] over one row of TV logits. */
static double naive_nll(const double *logits, int target)
{
    double mx = -INFINITY, z = 0;
    for (int v = 0; v < TV; v++)
        mx = fmax(mx, logits[v]);
    for (int v = 0; v < TV; v++)
        z += exp(logits[v] - mx);
    return mx + log(z) - logits[target];
}

static void naive_init(naive *n, const qkd_model *m)
{
    n->m = m;
    n->c.size = sizeof n->c;
    ck_assert_int_eq(qkd_model_get_config(m, &n->c), QKD_OK);
    ck_assert_int_le(n->c.dim, 16);
    ck_assert_int_le(n->c.hidden_dim, 32);
    n->w = all_tensors(m);
}

static void naive_free(naive *n)
{
    free_tensors(n->m, n->w);
}

/* ---- tensor table ---------------------------------------------------------- */

START_TEST(test_config_and_table)
{
    qkd_model_config d;
    qkd_model_config_init(&d);
    ck_assert_int_eq(d.dim, 64);
    ck_assert_int_eq(d.n_kv_heads, 4);
    ck_assert_int_eq(d.tied_embeddings, 1);

    int tied = _i;
    qkd_context *ctx = test_context(1);
    qkd_model_config c = tiny_config(tied);
    qkd_model *m = NULL;
    ck_assert_int_eq(qkd_model_create(ctx, &c, &m), QKD_OK);
    ck_assert_int_eq(qkd_model_n_tensors(m), 2 + 9 * 2 + !tied);

    /* the documented order, names, shapes and element counts */
    static const char *const order[] = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                        "ffn_norm", "ffn_gate", "ffn_down", "ffn_up"};
    const int64_t rows[] = {16, 16, 8, 8, 16, 16, 24, 16, 24};
    const int64_t cols[] = {1, 16, 16, 16, 16, 1, 16, 24, 16};
    int64_t total = 0;
    for (int i = 0; i < qkd_model_n_tensors(m); i++) {
        qkd_tensor_info info = {.size = sizeof info};
        ck_assert_int_eq(qkd_model_tensor_info(m, i, &info), QKD_OK);
        char want[64];
        if (i == 0) {
            ck_assert_str_eq(info.name, "token_embd.weight");
            ck_assert(info.shape[0] == TV && info.shape[1] == 16);
        } else if (i <= 18) {
            int l = (i - 1) / 9, k = (i - 1) % 9;
            snprintf(want, sizeof want, "blk.%d.%s.weight", l, order[k]);
            ck_assert_str_eq(info.name, want);
            ck_assert_int_eq(info.layer, l);
            ck_assert_int_eq(info.kind, QKD_TENSOR_ATTN_NORM + k);
            ck_assert(info.shape[0] == rows[k] && info.shape[1] == cols[k]);
            ck_assert_int_eq(info.n_dims, cols[k] == 1 ? 1 : 2);
        } else if (i == 19) {
            ck_assert_str_eq(info.name, "output_norm.weight");
        } else {
            ck_assert_str_eq(info.name, "output.weight");
            ck_assert(info.shape[0] == TV && info.shape[1] == 16);
        }
        ck_assert_int_eq(info.n_elements, info.shape[0] * info.shape[1]);
        int found = -1;
        ck_assert_int_eq(qkd_model_tensor_find(m, info.name, &found), QKD_OK);
        ck_assert_int_eq(found, i);
        ck_assert_int_eq(qkd__model_tensor_index(m, info.kind, info.layer), i);
        total += info.n_elements;
    }
    ck_assert_int_eq(qkd_model_n_params(m), total);
    ck_assert_int_eq(qkd__model_tensor_index(m, QKD_TENSOR_OUTPUT, -1), tied ? -1 : 20);
    ck_assert_int_eq(qkd__model_tensor_index(m, QKD_TENSOR_ATTN_Q, 2), -1);

    qkd_model_config got = {.size = sizeof got};
    ck_assert_int_eq(qkd_model_get_config(m, &got), QKD_OK);
    ck_assert_int_eq(got.hidden_dim, 24);
    ck_assert_int_eq(got.tied_embeddings, tied);
    ck_assert_ptr_eq(qkd__model_context(m), ctx);
    ck_assert_ptr_null(qkd_model_tokenizer(m));
    qkd_model_free(m);
    qkd_model_free(NULL);
    qkd_context_free(ctx);
}
END_TEST

START_TEST(test_tensor_roundtrip_and_init)
{
    qkd_context *ctx = test_context(1);
    qkd_model_config c = tiny_config(0);
    qkd_model *m = NULL;
    ck_assert_int_eq(qkd_model_create(ctx, &c, &m), QKD_OK);
    /* created zero */
    float *w = tensor_copy(m, 2, 0);
    for (int i = 0; i < 256; i++)
        ck_assert(w[i] == 0.0f);
    for (int i = 0; i < 256; i++)
        w[i] = (float)i - 100.5f;
    ck_assert_int_eq(qkd_model_tensor_set(m, 2, w, 256), QKD_OK);
    float *back = tensor_copy(m, 2, 0);
    ck_assert_mem_eq(back, w, 256 * sizeof *w);
    free(back);
    free(w);

    /* init_random: seeded, norms 1, roughly N(0, std^2) */
    ck_assert_int_eq(qkd_model_init_random(m, 42, 0.5f), QKD_OK);
    float *a = tensor_copy(m, 0, 0);
    ck_assert_int_eq(qkd_model_init_random(m, 42, 0.5f), QKD_OK);
    float *b = tensor_copy(m, 0, 0);
    ck_assert_mem_eq(a, b, TV * 16 * sizeof *a);
    ck_assert_int_eq(qkd_model_init_random(m, 43, 0.5f), QKD_OK);
    float *d = tensor_copy(m, 0, 0);
    ck_assert(memcmp(a, d, TV * 16 * sizeof *a) != 0);
    double s = 0, ss = 0;
    for (int i = 0; i < TV * 16; i++)
        s += a[i], ss += (double)a[i] * a[i];
    double mean = s / (TV * 16), sd = sqrt(ss / (TV * 16) - mean * mean);
    ck_assert_msg(fabs(mean) < 0.1 && fabs(sd - 0.5) < 0.08, "mean %g sd %g", mean, sd);
    float *norm = tensor_copy(m, 1, 0);
    for (int i = 0; i < 16; i++)
        ck_assert(norm[i] == 1.0f);
    free(norm);
    free(a);
    free(b);
    free(d);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* init_random's definition, drawn in sequence: splitmix64 uniforms in
 * (0, 1], Box-Muller pairs (the cosine, then the sine kept for the next
 * draw, across tensors), every weight matrix in index order. */
typedef struct seq_normal {
    uint64_t state;
    int has_spare;
    double spare;
} seq_normal;

static double seq_uniform(seq_normal *r)
{
    uint64_t z = (r->state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (double)(((z ^ (z >> 31)) >> 11) + 1) * 0x1.0p-53;
}

static double seq_draw(seq_normal *r)
{
    if (r->has_spare) {
        r->has_spare = 0;
        return r->spare;
    }
    const double radius = sqrt(-2.0 * log(seq_uniform(r)));
    const double angle = 6.283185307179586476925 * seq_uniform(r);
    r->spare = radius * sin(angle);
    r->has_spare = 1;
    return radius * cos(angle);
}

/* Matrices of odd rows, larger than init_random's chunks of work, and
 * the embedding and head larger than its staging buffer (2^20 floats):
 * each weight is its definition's, bit for bit, for 1 and 3 threads. */
START_TEST(test_init_random_is_its_sequence)
{
    qkd_model_config c;
    qkd_model_config_init(&c);
    c.dim = 66;
    c.hidden_dim = 129;
    c.n_layers = 2;
    c.n_heads = 3;
    c.n_kv_heads = 1;
    c.vocab_size = 16411;
    c.max_seq_len = 8;
    const float std = 0.3f;
    for (int threads = 1; threads <= 3; threads += 2) {
        qkd_context *ctx = test_context(threads);
        qkd_model *m = NULL;
        ck_assert_int_eq(qkd_model_create(ctx, &c, &m), QKD_OK);
        ck_assert_int_eq(qkd_model_init_random(m, 77, std), QKD_OK);
        seq_normal r = {.state = 77};
        for (int i = 0; i < qkd_model_n_tensors(m); i++) {
            qkd_tensor_info info = {.size = sizeof info};
            ck_assert_int_eq(qkd_model_tensor_info(m, i, &info), QKD_OK);
            float *w = tensor_copy(m, i, 0);
            int64_t bad = -1; /* the first weight that differs */
            float want_bad = 0.0f;
            for (int64_t k = 0; k < info.n_elements; k++) {
                const float want = info.n_dims == 1 ? 1.0f : (float)(std * seq_draw(&r));
                if (bad < 0 && memcmp(&w[k], &want, sizeof want) != 0)
                    bad = k, want_bad = want;
            }
            ck_assert_msg(bad < 0, "tensor %d [%lld]: %.9g, drawn %.9g (%d threads)", i,
                          (long long)bad, bad < 0 ? 0.0 : (double)w[bad], (double)want_bad,
                          threads);
            free(w);
        }
        qkd_model_free(m);
        qkd_context_free(ctx);
    }
}
END_TEST

/* ---- forward ----------------------------------------------------------------- */

START_TEST(test_forward_matches_naive)
{
    int tied = _i;
    qkd_context *ctx = test_context(2);
    qkd_model *m = tiny_model(ctx, tied, 7);
    int32_t tokens[TB * TT];
    random_ids(tokens, TB * TT, TV, 11);
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    float *logits = all_logits(m, TB * TT * TV);

    int32_t targets[TB * TT];
    random_ids(targets, TB * TT, TV, 12);
    targets[5] = -1; /* padding */
    float loss;
    ck_assert_int_eq(qkd_model_cross_entropy(m, targets, 0, &loss), QKD_OK);

    naive n;
    naive_init(&n, m);
    double want[TT * TV], worst = 0, ce = 0;
    for (int b = 0; b < TB; b++) {
        naive_forward(&n, tokens + b * TT, TT, want);
        for (int i = 0; i < TT * TV; i++)
            worst = fmax(worst, fabs(want[i] - logits[b * TT * TV + i]));
        for (int t = 0; t < TT; t++)
            if (targets[b * TT + t] >= 0)
                ce += naive_nll(want + t * TV, targets[b * TT + t]);
    }
    ck_assert_msg(worst < 1e-4, "forward differs from the naive forward by %g", worst);
    ce /= TB * TT - 1;
    ck_assert_msg(fabs(ce - loss) < 1e-5, "cross-entropy %g, naive %g", (double)loss, ce);
    naive_free(&n);
    free(logits);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* BF16 matmuls round their inputs: logits and gradients move a little
 * (more than float rounding, far less than the values), FP32 restores
 * the exact results, and an unknown precision is refused. */
static void forward_backward(qkd_model *m, const int32_t *tokens, const int32_t *targets,
                             float **logits, float **grad)
{
    float loss;
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    *logits = all_logits(m, TB * TT * TV);
    ck_assert_int_eq(qkd_model_zero_grad(m), QKD_OK);
    ck_assert_int_eq(qkd_model_cross_entropy(m, targets, 1, &loss), QKD_OK);
    ck_assert_int_eq(qkd_model_backward(m, NULL), QKD_OK);
    *grad = tensor_copy(m, 1, 1);
}

static double max_rel_diff(const float *a, const float *b, int64_t n)
{
    double worst = 0, scale = 0;
    for (int64_t i = 0; i < n; i++) {
        worst = fmax(worst, fabs((double)a[i] - b[i]));
        scale = fmax(scale, fabs((double)a[i]));
    }
    return worst / scale;
}

START_TEST(test_bf16_matmul_precision)
{
    qkd_context *ctx = test_context(2);
    qkd_model *m = tiny_model(ctx, 0, 9);
    int32_t tokens[TB * TT], targets[TB * TT];
    random_ids(tokens, TB * TT, TV, 3);
    random_ids(targets, TB * TT, TV, 4);
    float *l32, *g32, *l16, *g16, *again, *g_again;
    forward_backward(m, tokens, targets, &l32, &g32);
    ck_assert_int_eq(qkd_model_set_matmul_precision(m, QKD_MATMUL_BF16), QKD_OK);
    forward_backward(m, tokens, targets, &l16, &g16);
    const int64_t n = TB * TT * TV, ng = tensor_len(m, 1);
    double dl = max_rel_diff(l32, l16, n), dg = max_rel_diff(g32, g16, ng);
    ck_assert_msg(dl > 1e-5 && dl < 3e-2, "bf16 logits differ by %g (relative)", dl);
    ck_assert_msg(dg > 1e-5 && dg < 5e-2, "bf16 gradients differ by %g (relative)", dg);
    ck_assert_int_eq(qkd_model_set_matmul_precision(m, QKD_MATMUL_FP32), QKD_OK);
    forward_backward(m, tokens, targets, &again, &g_again);
    ck_assert_mem_eq(again, l32, (size_t)n * sizeof *l32);
    ck_assert_mem_eq(g_again, g32, (size_t)ng * sizeof *g32);
    ck_assert_int_eq(qkd_model_set_matmul_precision(m, (qkd_matmul_precision)7),
                     QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_model_set_matmul_precision(NULL, QKD_MATMUL_BF16), QKD_ERR_INVALID_ARG);
    free(l32), free(g32), free(l16), free(g16), free(again), free(g_again);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* A frozen model with bf16 products rounds its weights to bf16 once, at
 * its first forward, and its products read them: the same logits, bit for
 * bit, as trained. A weight set rounds them again; the model keeps no
 * gradients, so grad_get and an optimizer step on it fail. Tied: the head
 * reads token_embd's bits. */
START_TEST(test_frozen_bf16_model_rounds_weights_once)
{
    qkd_context *ctx = test_context(2);
    qkd_model *m = tiny_model(ctx, 1, 13);
    ck_assert_int_eq(qkd_model_set_matmul_precision(m, QKD_MATMUL_BF16), QKD_OK);
    qkd_optim_params op;
    qkd_optim_params_init(&op);
    qkd_optimizer *opt = NULL;
    ck_assert_int_eq(qkd_optimizer_create(m, &op, &opt), QKD_OK);
    int32_t tokens[TB * TT];
    random_ids(tokens, TB * TT, TV, 14);
    const size_t n = TB * TT * TV;
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    float *trained = all_logits(m, n);

    ck_assert_int_eq(qkd_model_set_trainable(m, 0), QKD_OK);
    ck_assert_ptr_null(qkd__model_weight_bits(m, 0));
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    ck_assert_ptr_nonnull(qkd__model_weight_bits(m, 0));
    float *frozen = all_logits(m, n);
    ck_assert_mem_eq(frozen, trained, n * sizeof *frozen);
    /* the products read the copy: zeroed (host memory on this backend),
     * every product is zero and so are the logits */
    memset(m->weight_bits, 0, m->weight_floats * sizeof *m->weight_bits);
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    float *zeroed = all_logits(m, n);
    for (size_t i = 0; i < n; i++)
        ck_assert_float_eq(zeroed[i], 0.0f);

    /* a weight set, even to its own values, rounds them again */
    int iq;
    ck_assert_int_eq(qkd_model_tensor_find(m, "blk.0.attn_q.weight", &iq), QKD_OK);
    float *wq = tensor_copy(m, iq, 0);
    ck_assert_int_eq(qkd_model_tensor_set(m, iq, wq, (size_t)tensor_len(m, iq)), QKD_OK);
    ck_assert_ptr_null(qkd__model_weight_bits(m, iq));
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    float *again = all_logits(m, n);
    ck_assert_mem_eq(again, trained, n * sizeof *again);
    wq[0] += 0.5f;
    ck_assert_int_eq(qkd_model_tensor_set(m, iq, wq, (size_t)tensor_len(m, iq)), QKD_OK);
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    float *changed = all_logits(m, n);
    ck_assert(memcmp(changed, trained, n * sizeof *changed) != 0);

    /* no gradients while frozen */
    float g[1];
    test_expect_error(ctx, qkd_model_grad_get(m, iq, g, 0), QKD_ERR_SHAPE, "elements");
    float *gq = malloc((size_t)tensor_len(m, iq) * sizeof *gq);
    ck_assert_ptr_nonnull(gq);
    test_expect_error(ctx, qkd_model_grad_get(m, iq, gq, (size_t)tensor_len(m, iq)), QKD_ERR_STATE,
                 "not trainable");
    ck_assert_int_eq(qkd_model_zero_grad(m), QKD_OK);
    test_expect_error(ctx, qkd_optimizer_step(opt, NULL), QKD_ERR_STATE, "not trainable");
    test_expect_error(ctx, qkd_optimizer_step_deferred(opt), QKD_ERR_STATE, "not trainable");

    /* trained again: the same logits as the frozen model's, the bf16 copy
     * dropped, zeroed gradients, and the optimizer steps */
    ck_assert_int_eq(qkd_model_set_trainable(m, 1), QKD_OK);
    ck_assert_ptr_null(m->weight_bits);
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    float *retrained = all_logits(m, n);
    ck_assert_mem_eq(retrained, changed, n * sizeof *retrained);
    ck_assert_int_eq(qkd_model_grad_get(m, iq, gq, (size_t)tensor_len(m, iq)), QKD_OK);
    for (int64_t i = 0; i < tensor_len(m, iq); i++)
        ck_assert_float_eq(gq[i], 0.0f);
    ck_assert_int_eq(qkd_optimizer_step(opt, NULL), QKD_OK);
    free(trained), free(frozen), free(zeroed), free(again), free(changed), free(retrained);
    free(wq), free(gq);
    qkd_optimizer_free(opt);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* Whether each tensor of m reads as w, through tensor_get and as deployed
 * (the export's reader). */
static void assert_tensors(qkd_model *m, float **w)
{
    for (int i = 0; i < qkd_model_n_tensors(m); i++) {
        const size_t bytes = (size_t)tensor_len(m, i) * sizeof(float);
        float *got = tensor_copy(m, i, 0), *deployed = malloc(bytes);
        ck_assert_ptr_nonnull(deployed);
        ck_assert_int_eq(qkd__model_deployed_get(m, i, deployed), QKD_OK);
        ck_assert_mem_eq(got, w[i], bytes);
        ck_assert_mem_eq(deployed, w[i], bytes);
        free(got), free(deployed);
    }
}

/* The logits of a forward on tokens equal want, bit for bit. */
static void assert_forward(qkd_model *m, const int32_t *tokens, const float *want, size_t n)
{
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    float *got = all_logits(m, n);
    ck_assert_mem_eq(got, want, n * sizeof *got);
    free(got);
}

/* A frozen bf16 model whose products read only its bf16 copy keeps its
 * linears' fp32 matrices on the host, its device weights shrunk to the
 * embedding and the norms, which lead the buffer: the same logits, bit for
 * bit, and every reader sees the same values. Whatever writes the weights
 * or reads them on the device brings the matrices back first: a weight
 * set, random weights, a quantizer, another precision, training again. */
START_TEST(test_frozen_bf16_model_keeps_matrices_on_host)
{
    qkd_context *ctx = test_context(2);
    qkd_model *m = tiny_model(ctx, 0, 23); /* untied: the head is a matrix too */
    for (int i = 0; i < qkd_model_n_tensors(m); i++) {
        const qkd__tensor_entry *e = &m->tensors[i];
        const int resident = e->n_dims == 1 || e->kind == QKD_TENSOR_TOKEN_EMBD;
        ck_assert_int_eq(e->offset < m->resident_floats, resident);
    }
    ck_assert_int_eq(qkd_model_set_matmul_precision(m, QKD_MATMUL_BF16), QKD_OK);
    int32_t tokens[TB * TT];
    random_ids(tokens, TB * TT, TV, 24);
    const size_t n = TB * TT * TV;
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    float *want = all_logits(m, n);
    float **w = all_tensors(m);

    ck_assert_int_eq(qkd_model_set_trainable(m, 0), QKD_OK);
    ck_assert_ptr_null(m->matrices_host);
    assert_forward(m, tokens, want, n);
    ck_assert_ptr_nonnull(m->matrices_host);
    assert_tensors(m, w);

    int iq;
    ck_assert_int_eq(qkd_model_tensor_find(m, "blk.1.attn_q.weight", &iq), QKD_OK);
    const size_t nq = (size_t)tensor_len(m, iq);
    w[iq][0] += 0.5f;
    ck_assert_int_eq(qkd_model_tensor_set(m, iq, w[iq], nq), QKD_OK);
    ck_assert_ptr_null(m->matrices_host);
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    ck_assert_ptr_nonnull(m->matrices_host);
    float *changed = all_logits(m, n);
    ck_assert(memcmp(changed, want, n * sizeof *changed) != 0);
    assert_tensors(m, w);
    w[iq][0] -= 0.5f;
    ck_assert_int_eq(qkd_model_tensor_set(m, iq, w[iq], nq), QKD_OK);
    assert_forward(m, tokens, want, n);

    ck_assert_int_eq(qkd_model_set_matmul_precision(m, QKD_MATMUL_FP32), QKD_OK);
    ck_assert_ptr_null(m->matrices_host);
    assert_tensors(m, w);
    ck_assert_int_eq(qkd_model_set_matmul_precision(m, QKD_MATMUL_BF16), QKD_OK);
    assert_forward(m, tokens, want, n);
    ck_assert_ptr_nonnull(m->matrices_host);

    /* a student's Q(w) is computed from the fp32 weights on the device */
    qkd_quant_params qp;
    qkd_quant_params_init(&qp);
    qkd_quantizer *q = NULL;
    ck_assert_int_eq(qkd_quantizer_create(ctx, &qp, &q), QKD_OK);
    ck_assert_int_eq(qkd_model_set_quantizer(m, q, QKD_QUANT_TARGET_LINEAR), QKD_OK);
    ck_assert_ptr_null(m->matrices_host);
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    ck_assert_ptr_null(m->matrices_host);
    ck_assert_int_eq(qkd_model_set_quantizer(m, NULL, 0), QKD_OK);
    assert_forward(m, tokens, want, n);
    ck_assert_ptr_nonnull(m->matrices_host);

    /* random weights: those of a model never frozen */
    qkd_model *twin = tiny_model(ctx, 0, 25);
    ck_assert_int_eq(qkd_model_init_random(twin, 26, 0.3f), QKD_OK);
    ck_assert_int_eq(qkd_model_init_random(m, 26, 0.3f), QKD_OK);
    ck_assert_ptr_null(m->matrices_host);
    float **w_twin = all_tensors(twin);
    assert_tensors(m, w_twin);
    for (int i = 0; i < qkd_model_n_tensors(m); i++)
        ck_assert_int_eq(qkd_model_tensor_set(m, i, w[i], (size_t)tensor_len(m, i)), QKD_OK);

    /* trained again: the matrices back, the same logits, and a backward */
    assert_forward(m, tokens, want, n);
    ck_assert_ptr_nonnull(m->matrices_host);
    ck_assert_int_eq(qkd_model_set_trainable(m, 1), QKD_OK);
    ck_assert_ptr_null(m->matrices_host);
    assert_tensors(m, w);
    assert_forward(m, tokens, want, n);
    float loss;
    ck_assert_int_eq(qkd_model_cross_entropy(m, tokens, 1, &loss), QKD_OK);
    ck_assert_int_eq(qkd_model_backward(m, NULL), QKD_OK);
    free(want), free(changed);
    free_tensors(m, w), free_tensors(twin, w_twin);
    qkd_quantizer_free(q);
    qkd_model_free(twin);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* Allocation failures around a frozen model: a first frozen bf16 forward
 * returns NO_MEMORY for each allocation it cannot make (activations, bf16
 * weights) but the matrices' move to the host, after which they stay on
 * the device (tried again only once the weights change), and gives the
 * trained logits; training it again without
 * memory for its matrices or its gradients returns NO_MEMORY and leaves it
 * frozen, its matrices on the host. */
START_TEST(test_frozen_model_fails_cleanly)
{
    test_alloc a;
    qkd_context *ctx = test_counting_context(&a, 2);
    qkd_model *m = tiny_model(ctx, 1, 19);
    ck_assert_int_eq(qkd_model_set_matmul_precision(m, QKD_MATMUL_BF16), QKD_OK);
    int32_t tokens[TB * TT], targets[TB * TT];
    random_ids(tokens, TB * TT, TV, 20);
    random_ids(targets, TB * TT, TV, 21);
    const size_t n = TB * TT * TV;
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    float *want = all_logits(m, n);
    ck_assert_int_eq(qkd_model_set_trainable(m, 0), QKD_OK);
    int failures = 0, stayed = 0;
    int iq;
    ck_assert_int_eq(qkd_model_tensor_find(m, "blk.0.attn_q.weight", &iq), QKD_OK);
    float *wq = tensor_copy(m, iq, 0);
    for (long k = 0;; k++) {
        test_alloc_fail_in(&a, k, 0);
        const qkd_status st = qkd_model_forward(m, tokens, TB, TT);
        if (!a.failed) {
            ck_assert_int_eq(st, QKD_OK);
            break;
        }
        if (st == QKD_OK) { /* the move was refused: the matrices stay */
            ck_assert_ptr_null(m->matrices_host);
            float *got = all_logits(m, n);
            ck_assert_mem_eq(got, want, n * sizeof *got);
            free(got);
            /* and the next forward does not try again: no allocation */
            const long tried = a.n;
            ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
            ck_assert_int_eq(a.n, tried);
            ck_assert_ptr_null(m->matrices_host);
            /* the next forward rounds the weights and moves them again */
            ck_assert_int_eq(qkd_model_tensor_set(m, iq, wq, (size_t)tensor_len(m, iq)), QKD_OK);
            stayed++;
            continue;
        }
        test_expect_error(ctx, st, QKD_ERR_NO_MEMORY, "out of memory");
        ck_assert_ptr_null(qkd__model_weight_bits(m, 0));
        failures++;
    }
    ck_assert_int_ge(failures, 2); /* the activations and the bf16 weights */
    ck_assert_int_ge(stayed, 1);
    ck_assert_ptr_nonnull(m->matrices_host);
    float *got = all_logits(m, n);
    ck_assert_mem_eq(got, want, n * sizeof *got);

    for (long k = 0; k < 2; k++) { /* the matrices' buffer, the gradients */
        test_alloc_fail_in(&a, k, 0);
        test_expect_error(ctx, qkd_model_set_trainable(m, 1), QKD_ERR_NO_MEMORY,
                          "out of memory");
        ck_assert_ptr_nonnull(m->matrices_host);
    }
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    free(got);
    got = all_logits(m, n);
    ck_assert_mem_eq(got, want, n * sizeof *got);
    test_alloc_fail_in(&a, -1, 0);
    test_expect_error(ctx, qkd_model_backward(m, NULL), QKD_ERR_STATE, "not trainable");
    ck_assert_int_eq(qkd_model_set_trainable(m, 1), QKD_OK);
    float loss;
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    ck_assert_int_eq(qkd_model_cross_entropy(m, targets, 1, &loss), QKD_OK);
    ck_assert_int_eq(qkd_model_backward(m, NULL), QKD_OK);
    free(want), free(got), free(wq);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* A model that is not trained gives the same logits, bit for bit, from
 * about a third of the activation memory here (three layers sharing one
 * set of buffers), and refuses a backward until it is trainable again. */
START_TEST(test_frozen_model_shares_activations)
{
    test_alloc counter;
    qkd_context *ctx = test_counting_context(&counter, 2);
    qkd_model_config c = tiny_config(0);
    c.n_layers = 3; /* odd: the residual stream ends in either buffer */
    qkd_model *m = NULL;
    ck_assert_int_eq(qkd_model_create(ctx, &c, &m), QKD_OK);
    ck_assert_int_eq(qkd_model_init_random(m, 5, 0.4f), QKD_OK);
    int32_t tokens[TB * TT], targets[TB * TT];
    random_ids(tokens, TB * TT, TV, 6);
    random_ids(targets, TB * TT, TV, 7);
    const size_t n = TB * TT * TV;
    float *trained, *g, *frozen, *again, *g_again;
    counter.largest = 0;
    forward_backward(m, tokens, targets, &trained, &g);
    size_t trained_bytes = counter.largest;
    ck_assert_int_eq(qkd_model_set_trainable(m, 0), QKD_OK);
    counter.largest = 0;
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    size_t frozen_bytes = counter.largest;
    frozen = all_logits(m, n);
    ck_assert_mem_eq(frozen, trained, n * sizeof *frozen);
    ck_assert_msg(frozen_bytes < trained_bytes, "frozen activations %zu bytes, trained %zu",
                  frozen_bytes, trained_bytes);
    ck_assert_int_eq(qkd_model_backward(m, NULL), QKD_ERR_STATE);
    /* no gradient buffers: a loss may be evaluated, not differentiated */
    float ce_grad, ce;
    ck_assert_int_eq(qkd_model_cross_entropy(m, targets, 1, &ce_grad), QKD_ERR_STATE);
    ck_assert_int_eq(qkd_model_cross_entropy(m, targets, 0, &ce), QKD_OK);
    ck_assert(isfinite(ce) && ce > 0.0f);
    qkd_loss *loss = NULL;
    qkd_loss_term term;
    qkd_loss_term_init(&term, QKD_LOSS_CE);
    ck_assert_int_eq(qkd_loss_create(ctx, &loss), QKD_OK);
    ck_assert_int_eq(qkd_loss_add(loss, &term), QKD_OK);
    float value;
    ck_assert_int_eq(qkd_loss_compute(loss, m, NULL, targets, &value), QKD_ERR_STATE);
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(ctx), "not trainable"));
    qkd_loss_free(loss);
    ck_assert_int_eq(qkd_model_set_trainable(m, 1), QKD_OK);
    forward_backward(m, tokens, targets, &again, &g_again);
    ck_assert_mem_eq(again, trained, n * sizeof *again);
    ck_assert_mem_eq(g_again, g, (size_t)tensor_len(m, 1) * sizeof *g);
    ck_assert_int_eq(qkd_model_set_trainable(NULL, 0), QKD_ERR_INVALID_ARG);
    free(trained), free(g), free(frozen), free(again), free(g_again);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* The batched training forward on the real stories260K weights gives
 * llama2.c's logits for positions 0..15 of its greedy run (published
 * reference, to 1e-4), in both rows of a batch of two. */
START_TEST(test_forward_matches_llama2c)
{
    enum { N_POS = 16, VOCAB = 512 };
    const char *model_path = test_shared("models/stories260K/stories260K.bin");
    if (!model_path)
        return;
    qkd_context *ctx = test_context(2);
    qkd_model *m = NULL;
    ck_assert_int_eq(qkd_model_load(ctx, model_path, &m), QKD_OK);
    size_t len;
    char *ids = test_read_file(
        test_shared("models/stories260K/reference/gen_greedy_n256.input_token_ids.txt"), &len);
    float *ref = test_read_file(
        test_shared("models/stories260K/reference/gen_greedy_n256.logits_f32le.bin"), &len);
    ck_assert_uint_eq(len, sizeof(float) * N_POS * VOCAB);
    int32_t tokens[2 * N_POS];
    char *cur = ids;
    for (int t = 0; t < N_POS; t++) {
        char *next;
        tokens[t] = tokens[N_POS + t] = (int32_t)strtol(cur, &next, 10);
        ck_assert_ptr_ne(next, cur);
        cur = next;
    }
    ck_assert_int_eq(qkd_model_forward(m, tokens, 2, N_POS), QKD_OK);
    float *logits = all_logits(m, 2 * N_POS * VOCAB);
    for (int i = 0; i < 2 * N_POS * VOCAB; i++)
        ck_assert_msg(fabsf(logits[i] - ref[i % (N_POS * VOCAB)]) <= 1e-4f,
                      "row %d logit %d: %g vs llama2.c %g", i / VOCAB, i % VOCAB,
                      (double)logits[i], (double)ref[i % (N_POS * VOCAB)]);
    free(logits);
    free(ref);
    free(ids);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* ---- gradients --------------------------------------------------------------- */

static float ce_loss(qkd_model *m, const int32_t *tokens, const int32_t *targets)
{
    float loss;
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    ck_assert_int_eq(qkd_model_cross_entropy(m, targets, 0, &loss), QKD_OK);
    return loss;
}

/* The loss with element e of tensor ti moved by delta (w: its values). */
static double shifted_loss(qkd_model *m, int ti, float *w, int64_t n, int64_t e, float delta,
                           const int32_t *tokens, const int32_t *targets)
{
    float orig = w[e];
    w[e] = orig + delta;
    ck_assert_int_eq(qkd_model_tensor_set(m, ti, w, (size_t)n), QKD_OK);
    double loss = ce_loss(m, tokens, targets);
    w[e] = orig;
    ck_assert_int_eq(qkd_model_tensor_set(m, ti, w, (size_t)n), QKD_OK);
    return loss;
}

/* Central difference with Richardson extrapolation: (4 D(h) - D(2h)) / 3
 * cancels the h^2 error term, leaving O(h^4) plus float rounding. */
static double richardson(qkd_model *m, int ti, float *w, int64_t n, int64_t e, float h,
                         const int32_t *tokens, const int32_t *targets)
{
    double d[2];
    for (int k = 0; k < 2; k++) {
        float step = h * (float)(k + 1);
        d[k] = (shifted_loss(m, ti, w, n, e, step, tokens, targets) -
                shifted_loss(m, ti, w, n, e, -step, tokens, targets)) / (2.0 * step);
    }
    return (4.0 * d[0] - d[1]) / 3.0;
}

/* Finite differences of the mean CE loss for a few elements of every
 * tensor: |fd - grad| <= 3e-3 * max(|grad|, 0.05). With h = 1e-2 and
 * Richardson extrapolation the truncation error is negligible; what is
 * left is float32 rounding of the loss (seen up to ~1.1e-3 here). */
START_TEST(test_gradient_finite_difference)
{
    int tied = _i;
    qkd_context *ctx = test_context(1);
    qkd_model *m = tiny_model(ctx, tied, 3);
    int32_t tokens[TB * TT], targets[TB * TT];
    random_ids(tokens, TB * TT, TV, 5);
    random_ids(targets, TB * TT, TV, 6);
    targets[3] = -1; /* padding is ignored */

    float loss;
    ck_assert_int_eq(qkd_model_zero_grad(m), QKD_OK);
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    ck_assert_int_eq(qkd_model_cross_entropy(m, targets, 1, &loss), QKD_OK);
    ck_assert(loss > 1.0f && loss < 10.0f);
    ck_assert_int_eq(qkd_model_backward(m, NULL), QKD_OK);

    const float h = 1e-2f;
    uint64_t pick = 99;
    for (int ti = 0; ti < qkd_model_n_tensors(m); ti++) {
        int64_t n = tensor_len(m, ti);
        float *w = tensor_copy(m, ti, 0), *g = tensor_copy(m, ti, 1);
        double gmax = 0;
        for (int s = 0; s < 5; s++) {
            /* token_embd rows of unused tokens would have zero gradient */
            int64_t e = ti == 0 ? (int64_t)tokens[s] * 16 + (int64_t)(lcg_next(&pick) % 16)
                                : (int64_t)(lcg_next(&pick) % (uint64_t)n);
            double fd = richardson(m, ti, w, n, e, h, tokens, targets);
            double tol = 3e-3 * fmax(fabs(g[e]), 0.05);
            ck_assert_msg(fabs(fd - g[e]) <= tol, "tensor %d element %lld: fd %g grad %g", ti,
                          (long long)e, fd, (double)g[e]);
            gmax = fmax(gmax, fabs(g[e]));
        }
        ck_assert_msg(gmax > 1e-4, "tensor %d: sampled gradients are all ~0", ti);
        free(w);
        free(g);
    }
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* Two backwards from the same logits gradient give twice one; after a
 * zero_grad, a backward gives one again, bit for bit (bf16: the products
 * write the weight gradients over the old ones, the rest is zeroed). */
static void gradient_accumulates(int tied, qkd_matmul_precision prec)
{
    qkd_context *ctx = test_context(1);
    qkd_model *m = tiny_model(ctx, tied, 8);
    ck_assert_int_eq(qkd_model_set_matmul_precision(m, prec), QKD_OK);
    int32_t tokens[TB * TT], targets[TB * TT];
    random_ids(tokens, TB * TT, TV, 1);
    random_ids(targets, TB * TT, TV, 2);
    float loss;
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    ck_assert_int_eq(qkd_model_cross_entropy(m, targets, 1, &loss), QKD_OK);
    ck_assert_int_eq(qkd_model_backward(m, NULL), QKD_OK);
    float *once[32];
    for (int i = 0; i < qkd_model_n_tensors(m); i++)
        once[i] = tensor_copy(m, i, 1);
    ck_assert_int_eq(qkd_model_backward(m, NULL), QKD_OK);
    for (int i = 0; i < qkd_model_n_tensors(m); i++) {
        float *twice = tensor_copy(m, i, 1);
        for (int64_t e = 0; e < tensor_len(m, i); e++)
            ck_assert_msg(fabsf(twice[e] - 2.0f * once[i][e]) <= 1e-6f * (1.0f + fabsf(twice[e])),
                          "tensor %d element %lld: %g vs 2 * %g", i, (long long)e,
                          (double)twice[e], (double)once[i][e]);
        free(twice);
    }
    /* zero_grad clears them */
    ck_assert_int_eq(qkd_model_zero_grad(m), QKD_OK);
    float *z = tensor_copy(m, 0, 1);
    for (int64_t e = 0; e < tensor_len(m, 0); e++)
        ck_assert(z[e] == 0.0f);
    free(z);
    ck_assert_int_eq(qkd_model_backward(m, NULL), QKD_OK);
    for (int i = 0; i < qkd_model_n_tensors(m); i++) {
        float *again = tensor_copy(m, i, 1);
        ck_assert_msg(memcmp(again, once[i], (size_t)tensor_len(m, i) * sizeof *again) == 0,
                      "tensor %d: the backward after zero_grad differs", i);
        free(again);
        free(once[i]);
    }
    qkd_model_free(m);
    qkd_context_free(ctx);
}

START_TEST(test_gradient_accumulates)
{
    gradient_accumulates(_i, QKD_MATMUL_FP32);
    gradient_accumulates(_i, QKD_MATMUL_BF16);
}
END_TEST

/* A gradient written on the device by a loss (internal contract) and the
 * same gradient passed from the host give the same parameter gradients. */
START_TEST(test_backward_device_dlogits)
{
    qkd_context *ctx = test_context(1);
    qkd_model *m = tiny_model(ctx, 0, 4);
    int32_t tokens[TB * TT];
    random_ids(tokens, TB * TT, TV, 9);
    const float *logits = NULL;
    ck_assert_int_eq(qkd__model_logits_all(m, &logits), QKD_ERR_STATE);
    ck_assert_ptr_null(logits);
    float *dl_dev = NULL;
    ck_assert_int_eq(qkd__model_dlogits_f32(m, &dl_dev), QKD_ERR_STATE);
    ck_assert_ptr_null(dl_dev);
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    ck_assert_int_eq(qkd__model_logits_all(m, &logits), QKD_OK);
    ck_assert_ptr_nonnull(logits);

    float dl[TB * TT * TV];
    uint64_t s = 12;
    for (int i = 0; i < TB * TT * TV; i++)
        dl[i] = (float)((int)(lcg_next(&s) % 2001) - 1000) / 1000.0f;
    ck_assert_int_eq(qkd_model_backward(m, dl), QKD_OK);
    float *host = tensor_copy(m, 2, 1);

    ck_assert_int_eq(qkd_model_zero_grad(m), QKD_OK);
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    ck_assert_int_eq(qkd_model_backward(m, NULL), QKD_ERR_STATE); /* forward dropped it */
    qkd__backend *be = ctx->backend;
    ck_assert_int_eq(qkd__model_dlogits_f32(m, &dl_dev), QKD_OK);
    ck_assert_int_eq(be->upload(be, dl_dev, dl, sizeof dl), QKD_OK);
    qkd__model_mark_dlogits(m, 0);
    ck_assert_int_eq(qkd_model_backward(m, NULL), QKD_OK);
    float *dev = tensor_copy(m, 2, 1);
    ck_assert_mem_eq(host, dev, (size_t)tensor_len(m, 2) * sizeof *dev);
    free(host);
    free(dev);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* ---- decode -------------------------------------------------------------------- */

/* Loop index: bit 0 tied embeddings, bit 1 bf16 matmuls (whose attention
 * applies RoPE itself, so the cache holds keys before RoPE). */
START_TEST(test_decode_matches_forward)
{
    int tied = _i & 1, bf16 = _i >> 1;
    qkd_context *ctx = test_context(2);
    qkd_model *m = tiny_model(ctx, tied, 21);
    if (bf16)
        ck_assert_int_eq(qkd_model_set_matmul_precision(m, QKD_MATMUL_BF16), QKD_OK);
    int32_t tokens[TT];
    random_ids(tokens, TT, TV, 31);
    ck_assert_int_eq(qkd_model_forward(m, tokens, 1, TT), QKD_OK);
    float *full = all_logits(m, TT * TV);
    for (int round = 0; round < 2; round++) { /* pos 0 restarts the sequence */
        for (int pos = 0; pos < TT; pos++) {
            float row[TV];
            ck_assert_int_eq(qkd_model_decode(m, tokens[pos], pos, row), QKD_OK);
            for (int v = 0; v < TV; v++)
                ck_assert_msg(fabsf(row[v] - full[pos * TV + v]) <= 1e-5f,
                              "pos %d logit %d: decode %g forward %g", pos, v, (double)row[v],
                              (double)full[pos * TV + v]);
        }
    }
    /* positions must come in order */
    ck_assert_int_eq(qkd_model_decode(m, tokens[0], 0, NULL), QKD_OK);
    ck_assert_int_eq(qkd_model_decode(m, tokens[1], 2, NULL), QKD_ERR_STATE);
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(ctx), "position 2"));
    ck_assert_int_eq(qkd_model_decode(m, tokens[1], 1, NULL), QKD_OK);
    ck_assert_int_eq(qkd_model_decode(m, tokens[1], TT, NULL), QKD_ERR_RANGE);
    ck_assert_int_eq(qkd_model_decode(m, TV, 2, NULL), QKD_ERR_RANGE);

    /* a new precision ends the sequence: its cache may hold other keys */
    ck_assert_int_eq(qkd_model_set_matmul_precision(m, bf16 ? QKD_MATMUL_FP32 : QKD_MATMUL_BF16),
                     QKD_OK);
    ck_assert_int_eq(qkd_model_decode(m, tokens[2], 2, NULL), QKD_ERR_STATE);
    ck_assert_int_eq(qkd_model_set_matmul_precision(m, bf16 ? QKD_MATMUL_BF16 : QKD_MATMUL_FP32),
                     QKD_OK);
    ck_assert_int_eq(qkd_model_decode(m, tokens[0], 0, NULL), QKD_OK);

    /* a longer window re-sizes the cache; the sequence starts over */
    ck_assert_int_eq(qkd_model_set_max_seq_len(m, 2 * TT), QKD_OK);
    ck_assert_int_eq(qkd_model_decode(m, tokens[2], 2, NULL), QKD_ERR_STATE);
    for (int pos = 0; pos < 2 * TT; pos++)
        ck_assert_int_eq(qkd_model_decode(m, tokens[pos % TT], pos, NULL), QKD_OK);
    free(full);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* ---- determinism ------------------------------------------------------------- */

/* Logits and all gradients of one step on a model big enough for the
 * reference backend to split its kernels across threads. */
static float *step_results(int n_threads, size_t *len)
{
    qkd_context *ctx = test_context(n_threads);
    qkd_model_config c;
    qkd_model_config_init(&c);
    c.dim = 64;
    c.hidden_dim = 96;
    c.n_layers = 2;
    c.vocab_size = 128;
    c.max_seq_len = 32;
    c.tied_embeddings = 0;
    qkd_model *m = NULL;
    ck_assert_int_eq(qkd_model_create(ctx, &c, &m), QKD_OK);
    ck_assert_int_eq(qkd_model_init_random(m, 5, 0.1f), QKD_OK);
    enum { B = 2, T = 32 };
    int32_t tokens[B * T], targets[B * T];
    random_ids(tokens, B * T, 128, 1);
    random_ids(targets, B * T, 128, 2);
    float loss;
    ck_assert_int_eq(qkd_model_forward(m, tokens, B, T), QKD_OK);
    ck_assert_int_eq(qkd_model_cross_entropy(m, targets, 1, &loss), QKD_OK);
    ck_assert_int_eq(qkd_model_backward(m, NULL), QKD_OK);
    size_t n_logits = (size_t)B * T * 128, total = n_logits + (size_t)qkd_model_n_params(m) + 1;
    float *out = malloc(total * sizeof *out);
    ck_assert_ptr_nonnull(out);
    ck_assert_int_eq(qkd_model_logits(m, out, n_logits), QKD_OK);
    size_t at = n_logits;
    for (int i = 0; i < qkd_model_n_tensors(m); i++) {
        size_t n = (size_t)tensor_len(m, i);
        ck_assert_int_eq(qkd_model_grad_get(m, i, out + at, n), QKD_OK);
        at += n;
    }
    out[at++] = loss;
    *len = at;
    qkd_model_free(m);
    qkd_context_free(ctx);
    return out;
}

START_TEST(test_thread_count_is_bit_exact)
{
    size_t n1, n2;
    float *one = step_results(1, &n1), *two = step_results(2, &n2);
    ck_assert_uint_eq(n1, n2);
    ck_assert_mem_eq(one, two, n1 * sizeof *one);
    free(one);
    free(two);
}
END_TEST

/* ---- allocation ---------------------------------------------------------------- */

typedef struct counting {
    long allocs;
    size_t limit; /* refuse anything larger (simulated out of memory) */
} counting;

static void *count_alloc(void *user, size_t size)
{
    counting *c = user;
    if (size > c->limit)
        return NULL;
    c->allocs++;
    return malloc(size);
}

static void count_free(void *user, void *ptr)
{
    (void)user;
    free(ptr);
}

static qkd_context *counting_context(counting *cnt)
{
    qkd_context_params p;
    qkd_context_params_init(&p);
    p.n_threads = 2;
    p.backend = QKD_BACKEND_REF;
    p.alloc = count_alloc;
    p.free = count_free;
    p.alloc_user = cnt;
    qkd_context *ctx = NULL;
    ck_assert_int_eq(qkd_context_create(&p, &ctx), QKD_OK);
    return ctx;
}

static void train_step(qkd_model *m, const int32_t *tokens, const int32_t *targets, int B)
{
    float loss;
    ck_assert_int_eq(qkd_model_forward(m, tokens, B, TT), QKD_OK);
    ck_assert_int_eq(qkd_model_cross_entropy(m, targets, 1, &loss), QKD_OK);
    ck_assert_int_eq(qkd_model_backward(m, NULL), QKD_OK);
}

START_TEST(test_no_allocation_in_a_known_step)
{
    counting cnt = {0, (size_t)1 << 30};
    qkd_context *ctx = counting_context(&cnt);
    qkd_model *m = tiny_model(ctx, 0, 1);
    int32_t tokens[TB * TT], targets[TB * TT];
    random_ids(tokens, TB * TT, TV, 3);
    random_ids(targets, TB * TT, TV, 4);

    train_step(m, tokens, targets, TB);
    long before = cnt.allocs;
    train_step(m, tokens, targets, TB);
    train_step(m, tokens, targets, TB);
    ck_assert_int_eq(cnt.allocs, before);

    /* a new shape allocates, and is then free of allocation in turn */
    train_step(m, tokens, targets, 1);
    ck_assert_int_gt(cnt.allocs, before);
    before = cnt.allocs;
    train_step(m, tokens, targets, 1);
    ck_assert_int_eq(cnt.allocs, before);

    float row[TV];
    ck_assert_int_eq(qkd_model_decode(m, 1, 0, row), QKD_OK);
    before = cnt.allocs;
    for (int pos = 1; pos < TT; pos++)
        ck_assert_int_eq(qkd_model_decode(m, 2, pos, row), QKD_OK);
    ck_assert_int_eq(qkd_model_decode(m, 1, 0, row), QKD_OK);
    ck_assert_int_eq(cnt.allocs, before);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* ---- tokenizer ownership --------------------------------------------------------- */

START_TEST(test_attached_tokenizer)
{
    qkd_context *ctx = test_context(1);
    qkd_model_config c = tiny_config(1);
    qkd_model *m = NULL;
    ck_assert_int_eq(qkd_model_create(ctx, &c, &m), QKD_OK);
    const char *pieces[] = {"<unk>", "<s>", "</s>", "a", "b"};
    size_t lens[] = {5, 3, 4, 1, 1};
    float scores[] = {0, 0, 0, -1, -2};
    for (int round = 0; round < 2; round++) { /* the second replaces the first */
        qkd_tokenizer *tok = NULL;
        ck_assert_int_eq(qkd__tokenizer_create(ctx, 5, pieces, lens, scores, NULL, 1, 2, 0, &tok),
                         QKD_OK);
        qkd__model_attach_tokenizer(m, tok);
        ck_assert_ptr_eq(qkd_model_tokenizer(m), tok);
    }
    ck_assert_int_eq(qkd_tokenizer_vocab_size(qkd_model_tokenizer(m)), 5);
    qkd_model_free(m); /* frees the tokenizer: leak checkers see it */
    qkd_context_free(ctx);
}
END_TEST

/* ---- errors ------------------------------------------------------------------------ */

static void expect_bad_config(qkd_context *ctx, qkd_model_config c, const char *needle)
{
    static char sentinel;
    qkd_model *m = (qkd_model *)&sentinel; /* create must reset it to NULL */
    test_expect_error(ctx, qkd_model_create(ctx, &c, &m), QKD_ERR_INVALID_ARG, needle);
    ck_assert_ptr_null(m);
}

START_TEST(test_bad_configs)
{
    qkd_context *ctx = test_context(1);
    qkd_model_config c = tiny_config(1);
    c.dim = 18;
    expect_bad_config(ctx, c, "not a multiple of n_heads");
    c = tiny_config(1);
    c.dim = 12;
    expect_bad_config(ctx, c, "head_dim 3");
    c = tiny_config(1);
    c.n_kv_heads = 3;
    expect_bad_config(ctx, c, "n_kv_heads 3");
    c = tiny_config(1);
    c.vocab_size = 0;
    expect_bad_config(ctx, c, "vocab_size");
    c = tiny_config(1);
    c.n_layers = -2;
    expect_bad_config(ctx, c, "n_layers");
    c = tiny_config(1);
    c.dim = 1 << 21;
    expect_bad_config(ctx, c, "dim = 2097152");
    c = tiny_config(1);
    c.n_kv_heads = 8;
    expect_bad_config(ctx, c, "n_kv_heads = 8");
    c = tiny_config(1);
    c.max_seq_len = 0;
    expect_bad_config(ctx, c, "max_seq_len");
    c = tiny_config(1);
    c.rope_theta = 0.0f;
    expect_bad_config(ctx, c, "rope_theta");
    c = tiny_config(1);
    c.norm_eps = NAN;
    expect_bad_config(ctx, c, "norm_eps");
    c = tiny_config(1);
    c.tied_embeddings = 2;
    expect_bad_config(ctx, c, "tied_embeddings");
    c = tiny_config(1);
    c.size = 8;
    expect_bad_config(ctx, c, "size field");
    qkd_model *m = NULL;
    test_expect_error(ctx, qkd_model_create(ctx, NULL, &m), QKD_ERR_INVALID_ARG, "NULL");
    ck_assert_int_eq(qkd_model_create(NULL, &c, &m), QKD_ERR_INVALID_ARG);
    qkd_context_free(ctx);
}
END_TEST

/* A valid shape too big for memory: NO_MEMORY, nothing leaked. */
START_TEST(test_huge_model_is_no_memory)
{
    counting cnt = {0, (size_t)1 << 30};
    qkd_context *ctx = counting_context(&cnt);
    qkd_model_config c;
    qkd_model_config_init(&c);
    c.dim = 1 << 20;
    c.hidden_dim = 1 << 20;
    c.n_layers = 4096;
    c.n_heads = 1 << 16;
    c.n_kv_heads = 1 << 16;
    c.vocab_size = 1 << 24;
    qkd_model *m = NULL;
    test_expect_error(ctx, qkd_model_create(ctx, &c, &m), QKD_ERR_NO_MEMORY, "memory");
    ck_assert_ptr_null(m);
    qkd_context_free(ctx);
}
END_TEST

START_TEST(test_call_errors)
{
    qkd_context *ctx = test_context(1);
    qkd_model *m = tiny_model(ctx, 0, 2);
    int32_t tokens[TB * TT], targets[TB * TT];
    random_ids(tokens, TB * TT, TV, 3);
    random_ids(targets, TB * TT, TV, 4);
    float loss, buf[TB * TT * TV];

    /* wrong state: nothing to differentiate yet */
    test_expect_error(ctx, qkd_model_backward(m, NULL), QKD_ERR_STATE, "no forward");
    test_expect_error(ctx, qkd_model_logits(m, buf, TB * TT * TV), QKD_ERR_STATE, "no forward");
    test_expect_error(ctx, qkd_model_cross_entropy(m, targets, 1, &loss), QKD_ERR_STATE,
                 "no forward");

    /* bad forward arguments */
    test_expect_error(ctx, qkd_model_forward(m, tokens, TB, TT + 1), QKD_ERR_INVALID_ARG,
                 "max_seq_len");
    test_expect_error(ctx, qkd_model_forward(m, tokens, 0, TT), QKD_ERR_INVALID_ARG, "B = 0");
    test_expect_error(ctx, qkd_model_forward(m, NULL, TB, TT), QKD_ERR_INVALID_ARG, "NULL");
    tokens[TT + 3] = TV;
    test_expect_error(ctx, qkd_model_forward(m, tokens, TB, TT), QKD_ERR_RANGE,
                 "batch 1 position 3");
    tokens[TT + 3] = -1;
    test_expect_error(ctx, qkd_model_forward(m, tokens, TB, TT), QKD_ERR_RANGE, "token -1");
    tokens[TT + 3] = 0;

    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    test_expect_error(ctx, qkd_model_backward(m, NULL), QKD_ERR_STATE, "no logits gradient");
    test_expect_error(ctx, qkd_model_logits(m, buf, 5), QKD_ERR_SHAPE, "logits");
    targets[7] = TV;
    test_expect_error(ctx, qkd_model_cross_entropy(m, targets, 1, &loss), QKD_ERR_RANGE, "row 7");
    for (int i = 0; i < TB * TT; i++)
        targets[i] = -1;
    ck_assert_int_eq(qkd_model_cross_entropy(m, targets, 1, &loss), QKD_OK);
    ck_assert(loss == 0.0f); /* all padding */

    /* tensors */
    test_expect_error(ctx, qkd_model_tensor_get(m, 0, buf, 5), QKD_ERR_SHAPE, "token_embd");
    test_expect_error(ctx, qkd_model_tensor_set(m, 1, buf, 17), QKD_ERR_SHAPE, "blk.0.attn_norm");
    test_expect_error(ctx, qkd_model_grad_get(m, 2, buf, 1), QKD_ERR_SHAPE, "attn_q");
    test_expect_error(ctx, qkd_model_tensor_get(m, 99, buf, 1), QKD_ERR_RANGE, "index 99");
    test_expect_error(ctx, qkd_model_grad_get(m, -1, buf, 1), QKD_ERR_RANGE, "index -1");
    qkd_tensor_info info = {.size = 3};
    test_expect_error(ctx, qkd_model_tensor_info(m, 0, &info), QKD_ERR_INVALID_ARG, "size");
    int idx;
    test_expect_error(ctx, qkd_model_tensor_find(m, "blk.9.attn_q.weight", &idx), QKD_ERR_NOT_FOUND,
                 "blk.9.attn_q.weight");
    test_expect_error(ctx, qkd_model_init_random(m, 1, -1.0f), QKD_ERR_INVALID_ARG, "std");
    test_expect_error(ctx, qkd_model_init_random(m, 1, INFINITY), QKD_ERR_INVALID_ARG, "std");
    test_expect_error(ctx, qkd_model_set_max_seq_len(m, 0), QKD_ERR_INVALID_ARG, "set_max_seq_len");
    test_expect_error(ctx, qkd_model_decode(m, 0, -1, NULL), QKD_ERR_RANGE, "position -1");

    /* NULL handles never crash */
    ck_assert_int_eq(qkd_model_forward(NULL, tokens, 1, 1), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_model_backward(NULL, NULL), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_model_decode(NULL, 0, 0, NULL), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_model_n_params(NULL), 0);
    ck_assert_int_eq(qkd_model_n_tensors(NULL), 0);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

Suite *suite_model(void)
{
    Suite *s = suite_create("model");
    TCase *tc = tcase_create("table");
    tcase_add_loop_test(tc, test_config_and_table, 0, 2);
    tcase_add_test(tc, test_tensor_roundtrip_and_init);
    tcase_add_test(tc, test_init_random_is_its_sequence);
    tcase_add_test(tc, test_attached_tokenizer);
    suite_add_tcase(s, tc);

    tc = tcase_create("passes");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_forward_matches_naive, 0, 2);
    tcase_add_test(tc, test_forward_matches_llama2c);
    tcase_add_test(tc, test_bf16_matmul_precision);
    tcase_add_test(tc, test_frozen_model_shares_activations);
    tcase_add_test(tc, test_frozen_bf16_model_rounds_weights_once);
    tcase_add_test(tc, test_frozen_model_fails_cleanly);
    tcase_add_test(tc, test_frozen_bf16_model_keeps_matrices_on_host);
    tcase_add_loop_test(tc, test_gradient_finite_difference, 0, 2);
    tcase_add_loop_test(tc, test_gradient_accumulates, 0, 2);
    tcase_add_test(tc, test_backward_device_dlogits);
    tcase_add_loop_test(tc, test_decode_matches_forward, 0, 4);
    tcase_add_test(tc, test_thread_count_is_bit_exact);
    tcase_add_test(tc, test_no_allocation_in_a_known_step);
    suite_add_tcase(s, tc);

    tc = tcase_create("errors");
    tcase_add_test(tc, test_bad_configs);
    tcase_add_test(tc, test_huge_model_is_no_memory);
    tcase_add_test(tc, test_call_errors);
    suite_add_tcase(s, tc);
    return s;
}
