/* The LLaMA forward pass (llama2.c semantics) over B sequences of T
 * tokens, keeping every activation the backward needs in one arena. */
#include <limits.h>

#include "model/model_impl.h"

/* ---- shared with decoding -------------------------------------------- */

/* x quantized per token into xq when activations are quantized. */
static void quantize_acts(const qkd_model *m, float *xq, const float *x, int N, int C)
{
    qkd__backend *be = qkd__model_backend(m);
    int bits = qkd__model_act_bits(m);
    if (bits)
        be->quant_rows(be, xq, x, N, C, bits);
}

/* RMSNorm of x with the norm weight (kind, layer) into out, or into out16
 * as bf16 bits when the layer keeps its linear inputs in bf16. */
static void norm_forward(const qkd_model *m, float *out, uint16_t *out16, float *rstd,
                         const float *x, qkd_tensor_kind kind, int layer, int N)
{
    qkd__backend *be = qkd__model_backend(m);
    const float *w = qkd__model_tensor_ptr(m, m->params, kind, layer);
    if (out16)
        be->rmsnorm_forward_bf16_bits(be, out16, rstd, x, w, N, m->cfg.dim, m->cfg.norm_eps);
    else
        be->rmsnorm_forward(be, out, rstd, x, w, N, m->cfg.dim, m->cfg.norm_eps);
}

/* x_sum = x + y, then its RMSNorm as norm_forward: one pass where y is
 * bf16 bits (the bits family's, which then writes out16). */
static void add_norm_forward(const qkd_model *m, float *x_sum, const float *x, qkd__bf16_in y,
                             float *out, uint16_t *out16, float *rstd, qkd_tensor_kind kind,
                             int layer, int N)
{
    qkd__backend *be = qkd__model_backend(m);
    const int C = m->cfg.dim;
    if (y.bits) {
        be->add_rmsnorm_forward_bf16_bits(be, x_sum, out16, rstd, x, y.bits,
                                          qkd__model_tensor_ptr(m, m->params, kind, layer), N,
                                          C, m->cfg.norm_eps);
        return;
    }
    be->add(be, x_sum, x, y.f32, (size_t)N * C);
    norm_forward(m, out, out16, rstd, x_sum, kind, layer, N);
}

/* A projection's output for the residual add: written as bf16 bits where
 * the layer keeps proj_bits (for the fused add and norm), else fp32 in
 * proj, rounded as a bf16 model stores it. */
static qkd__bf16_in project(const qkd_model *m, qkd_tensor_kind kind, int layer,
                            const qkd__layer_acts *a, qkd__bf16_in in, int N, int C, int OC)
{
    if (a->proj_bits) {
        qkd__model_linear_forward_to_bits(m, kind, layer, a->proj_bits, in, N, C, OC);
        return (qkd__bf16_in){.bits = a->proj_bits};
    }
    qkd__model_linear_forward(m, kind, layer, a->proj, in, N, C, OC);
    qkd__model_round_stored(m, a->proj, (size_t)N * OC);
    return qkd__bf16_f32(a->proj);
}

/* att, or att_bits instead (a bf16-bits model, whose attention is bf16),
 * from this step's q, k and the cache: the bf16 attention rotates q and k
 * itself, else they are rotated in place first (the cache then holds
 * rotated keys). */
static void attention_forward(const qkd_model *m, const qkd__layer_acts *a, qkd__step s)
{
    qkd__backend *be = qkd__model_backend(m);
    const qkd_model_config *c = &m->cfg;
    const int H = c->n_heads, KV = c->n_kv_heads, hd = c->dim / H;
    if (qkd__model_attention_bf16(m)) {
        be->attention_forward_bf16(be, a->att, a->att_bits, a->scratch, a->q, a->kcache,
                                   a->vcache, s.B, s.T, s.pos0, s.kv_len, H, KV, hd,
                                   c->rope_theta);
    } else {
        be->rope_forward(be, a->q, s.B, s.T, H, hd, s.pos0, c->rope_theta);
        be->rope_forward(be, a->k, s.B, s.T, KV, hd, s.pos0, c->rope_theta);
        be->attention_forward(be, a->att, a->scratch, a->q, a->kcache, a->vcache, s.B, s.T,
                              s.pos0, s.kv_len, H, KV, hd);
    }
    if (a->att)
        qkd__model_round_stored(m, a->att, (size_t)s.B * s.T * c->dim);
}

void qkd__model_layer_forward(const qkd_model *m, int l, const qkd__layer_acts *a,
                              const qkd__norm_out *next, qkd__step s)
{
    qkd__backend *be = qkd__model_backend(m);
    const qkd_model_config *c = &m->cfg;
    const int N = s.B * s.T, C = c->dim, H = c->hidden_dim;
    const int hd = C / c->n_heads, kvd = hd * c->n_kv_heads;
    const int kv_bits = qkd__model_kv_bits(m);
#define LINEAR(kind, out, in, C, OC) \
    qkd__model_linear_forward(m, QKD_TENSOR_##kind, l, out, in, N, C, OC)
#define IN(kind, x) qkd__model_linear_input(m, QKD_TENSOR_##kind, l, a->x, a->x##q, a->x##_bits)
    if (l == 0) /* later layers' come with the add that ends the layer before */
        norm_forward(m, a->h, a->h_bits, a->rstd1, a->x_in, QKD_TENSOR_ATTN_NORM, l, N);
    quantize_acts(m, a->hq, a->h, N, C);
    LINEAR(ATTN_Q, a->q, IN(ATTN_Q, h), C, C);
    LINEAR(ATTN_K, a->k, IN(ATTN_K, h), C, kvd);
    LINEAR(ATTN_V, a->v, IN(ATTN_V, h), C, kvd);
    if (kv_bits) { /* the cached keys and values, per token, before RoPE */
        be->quant_rows(be, a->k, a->k, N, kvd, kv_bits);
        be->quant_rows(be, a->v, a->v, N, kvd, kv_bits);
    }
    attention_forward(m, a, s);
    quantize_acts(m, a->attq, a->att, N, C);
    const qkd__bf16_in att_out = project(
        m, QKD_TENSOR_ATTN_OUTPUT, l, a,
        qkd__model_linear_input(m, QKD_TENSOR_ATTN_OUTPUT, l, a->att, a->attq, a->att_bits),
        N, C, C);
    add_norm_forward(m, a->x_mid, a->x_in, att_out, a->h2, a->h2_bits, a->rstd2,
                     QKD_TENSOR_FFN_NORM, l, N);
    quantize_acts(m, a->h2q, a->h2, N, C);
    if (a->gate_bits) { /* gate and up written in bf16 by their products */
        qkd__model_linear_forward_to_bits(m, QKD_TENSOR_FFN_GATE, l, a->gate_bits,
                                          IN(FFN_GATE, h2), N, C, H);
        qkd__model_linear_forward_to_bits(m, QKD_TENSOR_FFN_UP, l, a->up_bits, IN(FFN_UP, h2),
                                          N, C, H);
        be->swiglu_forward_bf16_bits(be, a->sw_bits, a->gate_bits, a->up_bits, (size_t)N * H);
    } else {
        LINEAR(FFN_GATE, a->gate, IN(FFN_GATE, h2), C, H);
        LINEAR(FFN_UP, a->up, IN(FFN_UP, h2), C, H);
        qkd__model_round_stored(m, a->gate, (size_t)N * H);
        qkd__model_round_stored(m, a->up, (size_t)N * H);
        be->swiglu_forward(be, a->sw, a->gate, a->up, (size_t)N * H);
    }
    quantize_acts(m, a->swq, a->sw, N, H);
    const qkd__bf16_in ffn_out =
        project(m, QKD_TENSOR_FFN_DOWN, l, a, IN(FFN_DOWN, sw), N, H, C);
    add_norm_forward(m, a->x_out, a->x_mid, ffn_out, next->out, next->out16, next->rstd,
                     next->kind, next->layer, N);
#undef LINEAR
#undef IN
}

qkd__norm_out qkd__model_norm_after(const qkd_model *m, int l, const qkd__layer_acts *after,
                                    float *xf, uint16_t *xf_bits, float *rstdf)
{
    if (l + 1 < m->cfg.n_layers)
        return (qkd__norm_out){after->h, after->h_bits, after->rstd1, QKD_TENSOR_ATTN_NORM,
                               l + 1};
    return (qkd__norm_out){xf, xf_bits, rstdf, QKD_TENSOR_OUTPUT_NORM, -1};
}

void qkd__model_head_forward(const qkd_model *m, float *logits, float *xf,
                             const uint16_t *xf_bits, float *xfq, int N)
{
    const qkd_model_config *c = &m->cfg;
    quantize_acts(m, xfq, xf, N, c->dim);
    qkd__model_linear_forward(m, QKD_TENSOR_OUTPUT, -1, logits,
                              qkd__model_linear_input(m, QKD_TENSOR_OUTPUT, -1, xf, xfq, xf_bits),
                              N, c->dim, c->vocab_size);
}

/* n bf16 values in the arena (whole floats of two). */
static uint16_t *take16(qkd__arena *a, size_t rows, size_t cols)
{
    return (uint16_t *)qkd__arena_take(a, rows, (cols + 1) / 2);
}

void qkd__model_plan_layer(qkd__arena *a, qkd__layer_acts *la, const qkd_model_config *c,
                           size_t N, size_t scratch_floats, int own_qkv, int act_quant,
                           int bf16_bits)
{
    const size_t C = (size_t)c->dim, H = (size_t)c->hidden_dim;
    const size_t kvd = C / (size_t)c->n_heads * (size_t)c->n_kv_heads;
    const int bits = bf16_bits && !act_quant;
    la->h = bits ? NULL : qkd__arena_take(a, N, C);
    la->h_bits = bits ? take16(a, N, C) : NULL;
    la->rstd1 = qkd__arena_take(a, N, 1);
    if (own_qkv) {
        la->q = qkd__arena_take(a, N, C);
        la->kcache = la->k = qkd__arena_take(a, N, kvd);
        la->vcache = la->v = qkd__arena_take(a, N, kvd);
    }
    la->scratch = qkd__arena_take(a, scratch_floats, 1);
    la->att = bits ? NULL : qkd__arena_take(a, N, C);
    la->att_bits = bits ? take16(a, N, C) : NULL;
    la->x_mid = qkd__arena_take(a, N, C);
    la->h2 = bits ? NULL : qkd__arena_take(a, N, C);
    la->h2_bits = bits ? take16(a, N, C) : NULL;
    la->rstd2 = qkd__arena_take(a, N, 1);
    la->gate = bits ? NULL : qkd__arena_take(a, N, H);
    la->up = bits ? NULL : qkd__arena_take(a, N, H);
    la->gate_bits = bits ? take16(a, N, H) : NULL;
    la->up_bits = bits ? take16(a, N, H) : NULL;
    la->sw = bits ? NULL : qkd__arena_take(a, N, H);
    la->sw_bits = NULL; /* bits: the caller's */
    la->hq = act_quant ? qkd__arena_take(a, N, C) : la->h;
    la->attq = act_quant ? qkd__arena_take(a, N, C) : la->att;
    la->h2q = act_quant ? qkd__arena_take(a, N, C) : la->h2;
    la->swq = act_quant ? qkd__arena_take(a, N, H) : la->sw;
}

/* ---- training activations -------------------------------------------- */

typedef struct train_plan {
    qkd_model *m;
    int B, T;
} train_plan;

/* A layer that writes its q, k and v into those of layer `from`. */
static void share_qkv(qkd__layer_acts *la, const qkd__layer_acts *from)
{
    la->q = from->q;
    la->kcache = la->k = from->k;
    la->vcache = la->v = from->v;
}

static void plan_train(void *arg, qkd__arena *a)
{
    const train_plan *p = arg;
    const qkd_model_config *c = &p->m->cfg;
    qkd__backend *be = qkd__model_backend(p->m);
    qkd__train_acts *t = &p->m->acts;
    const size_t N = (size_t)p->B * (size_t)p->T, C = (size_t)c->dim;
    const size_t H = (size_t)c->hidden_dim, V = (size_t)c->vocab_size;
    const size_t kvd = C / (size_t)c->n_heads * (size_t)c->n_kv_heads;
    const size_t scratch =
        be->attention_scratch_floats(be, p->B, p->T, p->T, c->n_heads, c->n_kv_heads,
                                     c->dim / c->n_heads);
    const int act_quant = p->m->student.act_bits > 0;

    t->tokens = (int32_t *)qkd__arena_take(a, N, 1);
    t->targets = (int32_t *)qkd__arena_take(a, N, 1);
    t->losses = qkd__arena_take(a, N, 1);
    t->loss_sum = qkd__arena_take(a, 1, 1);
    uint16_t *proj_bits = qkd__model_bf16_bits(p->m) && !act_quant ? take16(a, N, C) : NULL;
    float *proj = proj_bits ? NULL : qkd__arena_take(a, N, C); /* one of the two */
    float *x = qkd__arena_take(a, N, C);
    /* A frozen model's layers share layer 0's buffers, the residual
     * stream going back and forth between two. */
    float *x_other = p->m->frozen ? qkd__arena_take(a, N, C) : NULL;
    /* A student's layers write their q, k and v into layer 0's where the
     * bf16 attention's backward reads its own copies of them (backend.h):
     * then only the forward reads them. */
    const int one_qkv = qkd__model_attention_bf16(p->m) && be->attention_bf16_from_scratch;
    const int ffn_bits = qkd__model_bf16_bits(p->m) && !act_quant; /* as gate_bits */
    uint16_t *sw_bits = ffn_bits ? take16(a, N, H) : NULL;
    for (int l = 0; l < c->n_layers; l++) {
        qkd__layer_acts *la = &t->layers[l];
        if (p->m->frozen && l > 0) {
            *la = t->layers[0];
        } else {
            qkd__model_plan_layer(a, la, c, N, scratch, l == 0 || !one_qkv, act_quant,
                                  qkd__model_bf16_bits(p->m));
            if (l > 0 && one_qkv)
                share_qkv(la, &t->layers[0]);
        }
        la->sw_bits = sw_bits;
        la->x_in = x;
        la->proj = proj;
        la->proj_bits = proj_bits;
        la->x_out = x = p->m->frozen ? (l % 2 ? t->layers[0].x_in : x_other)
                                     : qkd__arena_take(a, N, C);
    }
    t->xf = proj_bits ? NULL : qkd__arena_take(a, N, C);
    t->xf_bits = proj_bits ? take16(a, N, C) : NULL; /* the layers' h_bits condition */
    t->rstdf = qkd__arena_take(a, N, 1);
    t->xfq = act_quant ? qkd__arena_take(a, N, C) : t->xf;
    t->logits = p->m->logits_rows ? NULL : qkd__arena_take(a, N, V);
    if (p->m->frozen) { /* no gradients: those buffers stay NULL */
        t->dlogits = t->dres = t->dnorm = t->datt = t->dq = t->dk = t->dv = NULL;
        t->dlogits_bits = NULL;
        t->dsw = t->dgate = t->dup = NULL;
        t->dsw_bits = t->dgu_bits = t->dres_bits = t->dqkv_bits = NULL;
        return;
    }
    const int bits = qkd__model_bf16_bits(p->m);
    t->dlogits = bits ? NULL : qkd__arena_take(a, N, V);
    t->dlogits_bits = bits ? take16(a, N, V) : NULL;
    t->dres = qkd__arena_take(a, N, C);
    t->dnorm = qkd__arena_take(a, N, C);
    t->datt = qkd__arena_take(a, N, C);
    t->dq = bits ? NULL : qkd__arena_take(a, N, C);
    t->dk = bits ? NULL : qkd__arena_take(a, N, kvd);
    t->dv = bits ? NULL : qkd__arena_take(a, N, kvd);
    t->dqkv_bits = bits ? take16(a, N, C + 2 * kvd) : NULL;
    t->dsw = ffn_bits ? NULL : qkd__arena_take(a, N, H);
    t->dgate = ffn_bits ? NULL : qkd__arena_take(a, N, H);
    t->dup = ffn_bits ? NULL : qkd__arena_take(a, N, H);
    t->dsw_bits = ffn_bits ? take16(a, N, H) : NULL;
    t->dgu_bits = ffn_bits ? take16(a, N, 2 * H) : NULL;
    t->dres_bits = bits && be->rmsnorm_backward_bf16_bits ? take16(a, N, C) : NULL;
}

void qkd__model_free_acts(qkd_model *m)
{
    qkd__backend *be = qkd__model_backend(m);
    be->free(be, m->acts.mem);
    be->free(be, m->logits_mem);
    be->free(be, m->dlogits_mem);
    m->logits_mem = NULL;
    m->dlogits_mem = NULL;
    m->logits_ready = 0;
    m->acts.mem = NULL;
    m->acts.B = m->acts.T = 0;
    m->has_forward = m->has_dlogits = 0;
}

/* Activations for (B, T): kept from the previous call when the shape is
 * the same, so a training step of a known shape allocates nothing. */
static qkd_status ensure_acts(qkd_model *m, int B, int T)
{
    if (m->acts.mem && m->acts.B == B && m->acts.T == T)
        return QKD_OK;
    qkd__model_free_acts(m);
    train_plan p = {m, B, T};
    qkd_status st = qkd__arena_alloc(m->ctx, "model forward: activations", plan_train, &p,
                                     &m->acts.mem);
    if (st != QKD_OK)
        return st;
    m->acts.B = B;
    m->acts.T = T;
    return QKD_OK;
}

/* ---- forward ----------------------------------------------------------- */

static qkd_status check_tokens(const qkd_model *m, const int32_t *tokens, int B, int T)
{
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            int32_t id = tokens[(size_t)b * T + t];
            if (id < 0 || id >= m->cfg.vocab_size)
                return qkd__error(m->ctx, QKD_ERR_RANGE,
                                  "model forward: token %d at batch %d position %d is outside "
                                  "the vocabulary [0, %d)",
                                  (int)id, b, t, m->cfg.vocab_size);
        }
    }
    return QKD_OK;
}

static qkd_status check_forward_args(const qkd_model *m, const int32_t *tokens, int B, int T)
{
    if (!tokens)
        return qkd__error(m->ctx, QKD_ERR_INVALID_ARG, "model forward: tokens is NULL");
    if (B < 1 || T < 1)
        return qkd__error(m->ctx, QKD_ERR_INVALID_ARG,
                          "model forward: B = %d and T = %d must be >= 1", B, T);
    if (T > m->cfg.max_seq_len)
        return qkd__error(m->ctx, QKD_ERR_INVALID_ARG,
                          "model forward: T = %d exceeds max_seq_len %d", T, m->cfg.max_seq_len);
    if ((int64_t)B * T > INT_MAX)
        return qkd__error(m->ctx, QKD_ERR_INVALID_ARG,
                          "model forward: B * T = %lld rows exceed INT_MAX",
                          (long long)B * T);
    return check_tokens(m, tokens, B, T);
}

qkd_status qkd_model_forward(qkd_model *m, const int32_t *tokens, int B, int T)
{
    if (!m)
        return QKD_ERR_INVALID_ARG;
    qkd_status st = check_forward_args(m, tokens, B, T);
    if (st == QKD_OK)
        st = ensure_acts(m, B, T);
    if (st != QKD_OK)
        return st;
    m->has_forward = m->has_dlogits = 0;
    qkd__backend *be = qkd__model_backend(m);
    qkd__train_acts *a = &m->acts;
    const int N = B * T;
    st = be->upload(be, a->tokens, tokens, (size_t)N * sizeof *tokens);
    if (st == QKD_OK)
        st = qkd__model_round_weights(m);
    if (st != QKD_OK)
        return st;
    qkd__model_quantize_weights(m, 1, 1);
    be->embedding_forward(be, a->layers[0].x_in, a->tokens,
                          qkd__model_weight(m, QKD_TENSOR_TOKEN_EMBD, -1), N, m->cfg.dim);
    const qkd__step step = {.B = B, .T = T, .pos0 = 0, .kv_len = T};
    const int L = m->cfg.n_layers;
    for (int l = 0; l < L; l++) {
        const qkd__norm_out next =
            qkd__model_norm_after(m, l, a->layers + l + 1, a->xf, a->xf_bits, a->rstdf);
        qkd__model_layer_forward(m, l, &a->layers[l], &next, step);
    }
    if (!m->logits_rows)
        qkd__model_logits_rows(m, a->logits, 0, N);
    m->logits_ready = !m->logits_rows;
    m->has_forward = 1;
    return QKD_OK;
}

qkd_status qkd_model_logits(const qkd_model *m, float *dst, size_t n)
{
    if (!m)
        return QKD_ERR_INVALID_ARG;
    if (!dst)
        return qkd__error(m->ctx, QKD_ERR_INVALID_ARG, "model logits: dst is NULL");
    if (!m->has_forward)
        return qkd__error(m->ctx, QKD_ERR_STATE, "model logits: no forward pass yet");
    size_t want = (size_t)m->acts.B * (size_t)m->acts.T * (size_t)m->cfg.vocab_size;
    if (n != want)
        return qkd__error(m->ctx, QKD_ERR_SHAPE,
                          "model logits: the last forward has %zu logits, not %zu", want, n);
    /* computing logits the forward left to their reader changes no
     * result the model exposes: the model stays const to its callers */
    const float *logits;
    qkd_status st = qkd__model_logits_all((qkd_model *)m, &logits);
    return st == QKD_OK ? qkd__model_download(m, dst, logits, n) : st;
}

/* ---- for the loss layer ------------------------------------------------ */

void qkd__model_logits_rows(qkd_model *m, float *out, int row0, int n)
{
    const qkd__train_acts *a = &m->acts;
    const size_t at = (size_t)row0 * (size_t)m->cfg.dim;
    qkd__model_head_forward(m, out, a->xf ? a->xf + at : NULL,
                            a->xf_bits ? a->xf_bits + at : NULL, a->xfq ? a->xfq + at : NULL,
                            n);
}

qkd_status qkd__model_logits_all(qkd_model *m, const float **out)
{
    *out = NULL;
    if (!m->has_forward)
        return qkd__error(m->ctx, QKD_ERR_STATE, "model logits: no forward pass yet");
    qkd__train_acts *a = &m->acts;
    if (!m->logits_ready) {
        const int N = a->B * a->T;
        qkd__backend *be = qkd__model_backend(m);
        if (!m->logits_mem) {
            qkd_status st = be->alloc(be, (size_t)N * (size_t)m->cfg.vocab_size * sizeof(float),
                                      (void **)&m->logits_mem);
            if (st != QKD_OK)
                return st;
        }
        a->logits = m->logits_mem;
        qkd__model_logits_rows(m, a->logits, 0, N);
        m->logits_ready = 1;
    }
    *out = a->logits;
    return QKD_OK;
}

int qkd__model_logits_chunk(const qkd_model *m)
{
    return m->logits_ready ? 0 : m->logits_rows;
}

void qkd__model_last_shape(const qkd_model *m, int *B, int *T)
{
    *B = m->has_forward ? m->acts.B : 0;
    *T = m->has_forward ? m->acts.T : 0;
}

qkd_status qkd__model_dlogits_f32(qkd_model *m, float **out)
{
    *out = NULL;
    if (!m->has_forward || m->frozen)
        return qkd__error(m->ctx, QKD_ERR_STATE, "model: no forward of a trained model");
    qkd__train_acts *a = &m->acts;
    if (!a->dlogits) {
        qkd__backend *be = qkd__model_backend(m);
        const size_t n = (size_t)a->B * (size_t)a->T * (size_t)m->cfg.vocab_size;
        qkd_status st = be->alloc(be, n * sizeof(float), (void **)&m->dlogits_mem);
        if (st != QKD_OK)
            return st;
        a->dlogits = m->dlogits_mem;
    }
    *out = a->dlogits;
    return QKD_OK;
}

uint16_t *qkd__model_dlogits_bits_dev(qkd_model *m)
{
    return m->has_forward ? m->acts.dlogits_bits : NULL;
}

void qkd__model_mark_dlogits(qkd_model *m, int bits)
{
    m->has_dlogits = !m->has_forward || bits < 0 ? QKD__DLOGITS_NONE
                     : bits                      ? QKD__DLOGITS_BITS
                                                 : QKD__DLOGITS_F32;
}
