/* The exact reverse of forward.c. Backend backward kernels ADD: the first
 * product into an activation gradient writes it (linear_backward's
 * accumulate 0), and other activation-gradient buffers are zeroed right
 * before the pass fills them (none of dq, dk, dv for the bf16 attention,
 * which writes them); parameter gradients are added to (micro-batches
 * accumulate), except after a zero_grad, when the products write those
 * they can (begin_grads).
 * acts.dres carries the gradient of the residual stream down the layers.
 * In a student, the gradients of quantized weights gather in dL/dQ(w) and
 * go through the quantizer's estimator at the end, unless that is the
 * identity (student.c); quantized
 * activations and keys/values pass their gradient straight through (STE). */
#include "model/model_impl.h"

static void zero(qkd__backend *be, float *x, size_t n)
{
    be->fill(be, x, 0.0f, n);
}

/* out = x W^T of the linear (kind, layer): add the input gradient to dx
 * (accumulate 1) or write it there (0), and add the weight gradient to
 * where that weight's gradient goes. */
static void linear_backward(const qkd_model *m, qkd_tensor_kind kind, int layer, float *dx,
                            int accumulate, qkd__bf16_in dout, qkd__bf16_in x, int N, int C,
                            int OC)
{
    qkd__model_linear_backward_input(m, kind, layer, dx, dout, N, C, OC, accumulate);
    /* written over a deferred zero_grad (begin_grads) */
    qkd__model_linear_backward_weight(m, kind, layer, dout, x, N, C, OC, !m->grads_cleared);
}

/* Whether a linear product gives tensor e's gradient (a tied head's is
 * token_embd's, which the embedding's backward then adds to). */
static int product_grad(const qkd_model *m, const qkd__tensor_entry *e)
{
    switch (e->kind) {
    case QKD_TENSOR_TOKEN_EMBD: return m->cfg.tied_embeddings;
    case QKD_TENSOR_ATTN_NORM:
    case QKD_TENSOR_FFN_NORM:
    case QKD_TENSOR_OUTPUT_NORM: return 0;
    default: return 1;
    }
}

/* Apply a deferred zero_grad. Where each weight gradient is one bf16-bits
 * product's, straight into the model's gradient (no quantizer estimator,
 * no learned scales), the products write those (linear_backward) and only
 * the other tensors are zeroed: no zeroed buffer is written and read back
 * for the largest ones. Otherwise the whole buffer is zeroed. */
static void begin_grads(qkd_model *m)
{
    if (!m->grads_cleared)
        return;
    if (!qkd__model_bf16_bits(m) || !qkd__model_grads_direct(m) ||
        m->n_tensors != m->n_weights) {
        qkd__model_settle_grads(m);
        return;
    }
    for (int i = 0; i < m->n_tensors; i++) {
        const qkd__tensor_entry *e = &m->tensors[i];
        if (!product_grad(m, e))
            zero(qkd__model_backend(m), m->grads + e->offset, (size_t)(e->rows * e->cols));
    }
}

/* dres += the input gradient of the RMSNorm (kind, layer) of x from dnorm,
 * with dres's bits where the model keeps them (norm weights are never
 * quantized: their own gradients). */
static void norm_backward(qkd_model *m, qkd_tensor_kind kind, int layer, const float *x,
                          const float *rstd, int N)
{
    qkd__backend *be = qkd__model_backend(m);
    qkd__train_acts *g = &m->acts;
    float *dw = qkd__model_tensor_ptr(m, m->grads, kind, layer);
    const float *w = qkd__model_tensor_ptr(m, m->params, kind, layer);
    if (g->dres_bits)
        be->rmsnorm_backward_bf16_bits(be, g->dres, g->dres_bits, dw, g->dnorm, x, w, rstd, N,
                                       m->cfg.dim);
    else
        be->rmsnorm_backward(be, g->dres, dw, g->dnorm, x, w, rstd, N, m->cfg.dim);
}

/* dres as the products read it. */
static qkd__bf16_in dres_in(const qkd__train_acts *g)
{
    return g->dres_bits ? (qkd__bf16_in){.bits = g->dres_bits} : qkd__bf16_f32(g->dres);
}

/* Layer l's linears and the input a linear read (see the student hooks
 * in model_impl.h). */
#define LINEAR(kind) QKD_TENSOR_##kind, l
#define IN(kind, x) qkd__model_linear_input(m, QKD_TENSOR_##kind, l, a->x, a->x##q, a->x##_bits)

/* On entry acts.dres is d x_out; on return it is d x_mid. */
static void ffn_backward(qkd_model *m, int l, const qkd__layer_acts *a, int N)
{
    qkd__backend *be = qkd__model_backend(m);
    qkd__train_acts *g = &m->acts;
    const int C = m->cfg.dim, H = m->cfg.hidden_dim;
    /* x_out = x_mid + sw Wd^T: dres passes to x_mid unchanged */
    if (g->dsw_bits) { /* dsw, dgate and dup written in bf16 */
        qkd__model_linear_backward_input_to_bits(m, LINEAR(FFN_DOWN), g->dsw_bits, dres_in(g), N,
                                                 H, C);
        /* dgate and dup as the gate and up products read them: in rows or
         * blocks; sw, which the layers share, this layer's again */
        const int rows = be->linears_backward_bf16_bits != NULL;
        const size_t h = (size_t)H, ld = rows ? 2 * h : h;
        uint16_t *dup = g->dgu_bits + (rows ? h : (size_t)N * h);
        be->swiglu_backward_bf16_bits(be, g->dgu_bits, dup, ld, a->sw_bits, g->dsw_bits,
                                      a->gate_bits, a->up_bits, (size_t)N, h);
        qkd__model_linear_backward_weight(m, LINEAR(FFN_DOWN), dres_in(g), IN(FFN_DOWN, sw), N,
                                          H, C, !m->grads_cleared);
        static const qkd_tensor_kind gu[2] = {QKD_TENSOR_FFN_GATE, QKD_TENSOR_FFN_UP};
        const int OC[2] = {H, H};
        const qkd__bf16_in x[2] = {IN(FFN_GATE, h2), IN(FFN_UP, h2)};
        qkd__model_linears_backward_bits(m, l, gu, OC, x, 2, g->dnorm, g->dgu_bits, N, C,
                                         !m->grads_cleared);
    } else {
        linear_backward(m, LINEAR(FFN_DOWN), g->dsw, 0, dres_in(g), IN(FFN_DOWN, sw), N, H, C);
        qkd__model_round_stored(m, g->dsw, (size_t)N * H);
        zero(be, g->dgate, (size_t)N * H);
        zero(be, g->dup, (size_t)N * H);
        be->swiglu_backward(be, g->dgate, g->dup, g->dsw, a->gate, a->up, (size_t)N * H);
        linear_backward(m, LINEAR(FFN_GATE), g->dnorm, 0, qkd__bf16_f32(g->dgate),
                        IN(FFN_GATE, h2), N, C, H);
        linear_backward(m, LINEAR(FFN_UP), g->dnorm, 1, qkd__bf16_f32(g->dup), IN(FFN_UP, h2), N,
                        C, H);
    }
    norm_backward(m, QKD_TENSOR_FFN_NORM, l, a->x_mid, a->rstd2, N);
}

/* dq, dk and dv of the un-rotated q and k from datt, written: the bf16
 * attention writes them (as dqkv_bits where planned) and rotates dq and dk
 * back itself; the fp32 one adds to zeroed buffers and rope_backward
 * rotates them back. */
static void attention_grads(qkd_model *m, const qkd__layer_acts *a, int B, int T)
{
    qkd__backend *be = qkd__model_backend(m);
    qkd__train_acts *g = &m->acts;
    const qkd_model_config *c = &m->cfg;
    const int N = B * T, H = c->n_heads, KV = c->n_kv_heads, hd = c->dim / H;
    if (qkd__model_attention_bf16(m)) {
        const qkd__bf16_in out = {a->att, a->att_bits}; /* one of the two is planned */
        be->attention_backward_bf16(be, g->dq, g->dk, g->dv, g->datt, a->scratch, a->q, a->k,
                                    a->v, out, B, T, H, KV, hd, c->rope_theta, g->dqkv_bits);
        return;
    }
    zero(be, g->dq, (size_t)N * H * hd);
    zero(be, g->dk, (size_t)N * KV * hd);
    zero(be, g->dv, (size_t)N * KV * hd);
    be->attention_backward(be, g->dq, g->dk, g->dv, g->datt, a->scratch, a->q, a->k, a->v,
                           a->att, B, T, H, KV, hd);
    be->rope_backward(be, g->dq, B, T, H, hd, 0, c->rope_theta);
    be->rope_backward(be, g->dk, B, T, KV, hd, 0, c->rope_theta);
}

/* On entry acts.dres is d x_mid; on return it is d x_in. */
static void attention_backward(qkd_model *m, int l, const qkd__layer_acts *a, int B, int T)
{
    qkd__train_acts *g = &m->acts;
    const qkd_model_config *c = &m->cfg;
    const int N = B * T, C = c->dim, hd = C / c->n_heads, kvd = hd * c->n_kv_heads;
    /* x_mid = x_in + att Wo^T */
    linear_backward(m, LINEAR(ATTN_OUTPUT), g->datt, 0, dres_in(g),
                    qkd__model_linear_input(m, QKD_TENSOR_ATTN_OUTPUT, l, a->att, a->attq,
                                            a->att_bits),
                    N, C, C);
    attention_grads(m, a, B, T);
    if (g->dqkv_bits) { /* the q, k and v products as a group */
        static const qkd_tensor_kind qkv[3] = {QKD_TENSOR_ATTN_Q, QKD_TENSOR_ATTN_K,
                                               QKD_TENSOR_ATTN_V};
        const int OC[3] = {C, kvd, kvd};
        const qkd__bf16_in x[3] = {IN(ATTN_Q, h), IN(ATTN_K, h), IN(ATTN_V, h)};
        qkd__model_linears_backward_bits(m, l, qkv, OC, x, 3, g->dnorm, g->dqkv_bits, N, C,
                                         !m->grads_cleared);
    } else {
        linear_backward(m, LINEAR(ATTN_Q), g->dnorm, 0, qkd__bf16_f32(g->dq), IN(ATTN_Q, h), N,
                        C, C);
        linear_backward(m, LINEAR(ATTN_K), g->dnorm, 1, qkd__bf16_f32(g->dk), IN(ATTN_K, h), N,
                        C, kvd);
        linear_backward(m, LINEAR(ATTN_V), g->dnorm, 1, qkd__bf16_f32(g->dv), IN(ATTN_V, h), N,
                        C, kvd);
    }
    norm_backward(m, QKD_TENSOR_ATTN_NORM, l, a->x_in, a->rstd1, N);
}

#undef LINEAR
#undef IN

/* logits = rmsnorm(x_L) Wout^T; leaves d x_L in acts.dres. */
static void head_backward(qkd_model *m, int N)
{
    qkd__backend *be = qkd__model_backend(m);
    qkd__train_acts *g = &m->acts;
    const int C = m->cfg.dim, V = m->cfg.vocab_size;
    const qkd__bf16_in dlogits = m->has_dlogits == QKD__DLOGITS_BITS
                                     ? (qkd__bf16_in){.bits = g->dlogits_bits}
                                     : qkd__bf16_f32(g->dlogits);
    const qkd__bf16_in xf =
        qkd__model_linear_input(m, QKD_TENSOR_OUTPUT, -1, g->xf, g->xfq, g->xf_bits);
    linear_backward(m, QKD_TENSOR_OUTPUT, -1, g->dnorm, 0, dlogits, xf, N, C, V);
    zero(be, g->dres, (size_t)N * C);
    norm_backward(m, QKD_TENSOR_OUTPUT_NORM, -1, g->layers[m->cfg.n_layers - 1].x_out, g->rstdf,
                  N);
}

qkd_status qkd_model_backward(qkd_model *m, const float *dlogits)
{
    if (!m)
        return QKD_ERR_INVALID_ARG;
    if (m->frozen)
        return qkd__error(m->ctx, QKD_ERR_STATE,
                          "model backward: the model is not trainable (qkd_model_set_trainable)");
    if (!m->has_forward)
        return qkd__error(m->ctx, QKD_ERR_STATE, "model backward: no forward pass yet");
    qkd__backend *be = qkd__model_backend(m);
    qkd__train_acts *a = &m->acts;
    const int B = a->B, T = a->T, N = B * T;
    if (dlogits) {
        float *dev;
        qkd_status st = qkd__model_dlogits_f32(m, &dev);
        if (st == QKD_OK)
            st = be->upload(be, dev, dlogits,
                            (size_t)N * (size_t)m->cfg.vocab_size * sizeof(float));
        if (st != QKD_OK)
            return st;
        m->has_dlogits = QKD__DLOGITS_F32;
    } else if (!m->has_dlogits) {
        return qkd__error(m->ctx, QKD_ERR_STATE,
                          "model backward: no logits gradient (run a loss with compute_grad, "
                          "or pass dlogits)");
    }
    qkd_status st = qkd__model_student_backward_begin(m);
    if (st != QKD_OK)
        return st;
    begin_grads(m);
    head_backward(m, N);
    for (int l = m->cfg.n_layers - 1; l >= 0; l--) {
        ffn_backward(m, l, &a->layers[l], N);
        attention_backward(m, l, &a->layers[l], B, T);
    }
    be->embedding_backward(be, qkd__model_weight_grad(m, QKD_TENSOR_TOKEN_EMBD, -1), a->dres,
                           a->tokens, N, m->cfg.dim, m->cfg.vocab_size);
    qkd__model_student_backward_end(m);
    m->grads_cleared = 0; /* the products wrote what was not zeroed */
    return QKD_OK;
}
