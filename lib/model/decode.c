/* One-token decoding through a key/value cache: the same layer code as
 * the training forward, on one row at position pos whose keys and values
 * are written into the cache row pos and attended together with rows
 * 0..pos-1 written by earlier calls. */
#include "model/model_impl.h"

typedef struct decode_plan {
    qkd_model *m;
    int seq_len;
} decode_plan;

static void plan_decode(void *arg, qkd__arena *a)
{
    const decode_plan *p = arg;
    const qkd_model_config *c = &p->m->cfg;
    qkd__backend *be = qkd__model_backend(p->m);
    qkd__decode *d = &p->m->dec;
    const size_t C = (size_t)c->dim, V = (size_t)c->vocab_size;
    const size_t kvd = C / (size_t)c->n_heads * (size_t)c->n_kv_heads;
    const size_t cache_rows = (size_t)c->n_layers * (size_t)p->seq_len;
    const int act_quant = p->m->student.act_bits > 0;

    d->token = (int32_t *)qkd__arena_take(a, 1, 1);
    d->kcache = qkd__arena_take(a, cache_rows, kvd);
    d->vcache = qkd__arena_take(a, cache_rows, kvd);
    /* The residual row is updated in place: x_out is x_in. */
    d->row.x_in = d->row.x_out = qkd__arena_take(a, 1, C);
    d->row.proj = qkd__arena_take(a, 1, C);
    d->row.proj_bits = NULL; /* decoding's rows are fp32 (bf16_bits 0 below) */
    d->row.q = qkd__arena_take(a, 1, C); /* k and v: the cache's row of the position */
    qkd__model_plan_layer(a, &d->row, c, 1,
                          be->attention_scratch_floats(be, 1, 1, p->seq_len, c->n_heads,
                                                       c->n_kv_heads, c->dim / c->n_heads),
                          0, act_quant, 0);
    d->xf = qkd__arena_take(a, 1, C);
    d->rstdf = qkd__arena_take(a, 1, 1);
    d->xfq = act_quant ? qkd__arena_take(a, 1, C) : d->xf;
    d->logits = qkd__arena_take(a, 1, V);
}

void qkd__model_free_decode(qkd_model *m)
{
    qkd__backend *be = qkd__model_backend(m);
    be->free(be, m->dec.mem);
    m->dec.mem = NULL;
    m->dec.seq_len = 0;
    m->dec.next_pos = 0;
}

static qkd_status ensure_cache(qkd_model *m)
{
    if (m->dec.mem && m->dec.seq_len == m->cfg.max_seq_len)
        return QKD_OK;
    qkd__model_free_decode(m);
    decode_plan p = {m, m->cfg.max_seq_len};
    qkd_status st = qkd__arena_alloc(m->ctx, "model decode: key/value cache", plan_decode, &p,
                                     &m->dec.mem);
    if (st == QKD_OK)
        m->dec.seq_len = p.seq_len;
    return st;
}

static qkd_status check_decode_args(const qkd_model *m, int32_t token, int pos)
{
    if (token < 0 || token >= m->cfg.vocab_size)
        return qkd__error(m->ctx, QKD_ERR_RANGE,
                          "model decode: token %d at position %d is outside the vocabulary "
                          "[0, %d)",
                          (int)token, pos, m->cfg.vocab_size);
    if (pos < 0 || pos >= m->cfg.max_seq_len)
        return qkd__error(m->ctx, QKD_ERR_RANGE,
                          "model decode: position %d is outside [0, max_seq_len %d)", pos,
                          m->cfg.max_seq_len);
    if (pos != 0 && pos != m->dec.next_pos)
        return qkd__error(m->ctx, QKD_ERR_STATE,
                          "model decode: position %d given where %d comes next (positions "
                          "come in order; 0 starts a new sequence)",
                          pos, m->dec.next_pos);
    return QKD_OK;
}

qkd_status qkd_model_decode(qkd_model *m, int32_t token, int pos, float *logits)
{
    if (!m)
        return QKD_ERR_INVALID_ARG;
    qkd_status st = check_decode_args(m, token, pos);
    if (st == QKD_OK)
        st = ensure_cache(m);
    if (st != QKD_OK)
        return st;
    qkd__backend *be = qkd__model_backend(m);
    qkd__decode *d = &m->dec;
    const qkd_model_config *c = &m->cfg;
    const size_t kvd = (size_t)(c->dim / c->n_heads * c->n_kv_heads);
    const size_t layer_floats = (size_t)d->seq_len * kvd;

    d->next_pos = 0; /* until this position is complete */
    st = be->upload(be, d->token, &token, sizeof token);
    if (st == QKD_OK)
        st = qkd__model_round_weights(m);
    if (st != QKD_OK)
        return st;
    /* a student decodes with hard rounding, refreshed when a sequence starts */
    qkd__model_quantize_weights(m, 0, pos == 0);
    be->embedding_forward(be, d->row.x_in, d->token,
                          qkd__model_weight(m, QKD_TENSOR_TOKEN_EMBD, -1), 1, c->dim);
    const qkd__step step = {.B = 1, .T = 1, .pos0 = pos, .kv_len = pos + 1};
    for (int l = 0; l < c->n_layers; l++) {
        qkd__layer_acts row = d->row;
        row.kcache = d->kcache + (size_t)l * layer_floats;
        row.vcache = d->vcache + (size_t)l * layer_floats;
        row.k = d->kcache + (size_t)l * layer_floats + (size_t)pos * kvd;
        row.v = d->vcache + (size_t)l * layer_floats + (size_t)pos * kvd;
        /* the next layer's norm goes to the same shared row */
        const qkd__norm_out next = qkd__model_norm_after(m, l, &row, d->xf, NULL, d->rstdf);
        qkd__model_layer_forward(m, l, &row, &next, step);
    }
    qkd__model_head_forward(m, d->logits, d->xf, NULL, d->xfq, 1);
    d->next_pos = pos + 1;
    return logits ? qkd__model_download(m, logits, d->logits, (size_t)c->vocab_size) : QKD_OK;
}
