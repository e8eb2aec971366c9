/* Clip calibration of a student (BitDistiller's "auto clip"): one forward
 * of the float model keeps every linear's inputs; each targeted tensor's
 * clip is then searched on them and its latent weights clamped in place.
 * As in BitDistiller, every layer sees the unclipped outputs of the layer
 * below. */
#include <string.h>

#include "core/half.h"
#include "model/model_impl.h"

#define MAX_SAMPLES 512 /* input rows a search looks at */

/* The device inputs [N][cols] the tensor's linear read in the last
 * forward (fp32, or bf16 bits where the layer keeps them so); none (both
 * NULL) for an untied embedding, which is searched on its weight error.
 * The layers share their SwiGLU output in bits (model_impl.h): a down
 * product's is written again from the layer's gate and up. */
static qkd__bf16_in linear_input(const qkd_model *m, const qkd__tensor_entry *e)
{
    const qkd__train_acts *a = &m->acts;
    const qkd__layer_acts *la = e->layer >= 0 ? &a->layers[e->layer] : NULL;
    switch (e->kind) {
    case QKD_TENSOR_ATTN_Q:
    case QKD_TENSOR_ATTN_K:
    case QKD_TENSOR_ATTN_V:
        return (qkd__bf16_in){la->h, la->h_bits};
    case QKD_TENSOR_ATTN_OUTPUT:
        return (qkd__bf16_in){la->att, la->att_bits};
    case QKD_TENSOR_FFN_GATE:
    case QKD_TENSOR_FFN_UP:
        return (qkd__bf16_in){la->h2, la->h2_bits};
    case QKD_TENSOR_FFN_DOWN:
        if (la->sw_bits) {
            qkd__backend *be = qkd__model_backend(m);
            be->swiglu_forward_bf16_bits(be, la->sw_bits, la->gate_bits, la->up_bits,
                                         (size_t)a->B * a->T * m->cfg.hidden_dim);
        }
        return (qkd__bf16_in){la->sw, la->sw_bits};
    case QKD_TENSOR_OUTPUT:
        return (qkd__bf16_in){a->xf, a->xf_bits};
    default: /* token_embd: the head's input when tied */
        return m->cfg.tied_embeddings ? (qkd__bf16_in){a->xf, a->xf_bits} : (qkd__bf16_in){0};
    }
}

/* Row r of in ([N][cols]) into x, bf16 bits widened to float in place:
 * the bits land in x's first half and are widened from the last one down,
 * so no value is overwritten before it is read (float c covers bytes
 * 4c..4c+3, the bits still to read lie below byte 2c). */
static qkd_status download_row(const qkd_model *m, qkd__bf16_in in, int64_t r, int64_t cols,
                               float *x)
{
    if (in.f32)
        return qkd__model_download(m, x, in.f32 + r * cols, (size_t)cols);
    qkd__backend *be = qkd__model_backend(m);
    unsigned char *bytes = (unsigned char *)x; /* read through memcpy: no aliasing */
    qkd_status st = be->download(be, bytes, in.bits + r * cols, (size_t)cols * sizeof(uint16_t));
    for (int64_t c = cols - 1; st == QKD_OK && c >= 0; c--) {
        uint16_t h;
        memcpy(&h, bytes + (size_t)c * sizeof h, sizeof h);
        x[c] = qkd__bf16_to_f32(h);
    }
    return st;
}

/* n_x rows spread evenly over the N of the last forward: row k*N/n_x. */
static qkd_status sample_inputs(const qkd_model *m, qkd__bf16_in in, int64_t cols, int64_t n_x,
                                float *x)
{
    const int64_t N = (int64_t)m->acts.B * m->acts.T;
    for (int64_t k = 0; k < n_x; k++) {
        qkd_status st = download_row(m, in, k * N / n_x, cols, x + k * cols);
        if (st != QKD_OK)
            return st;
    }
    return QKD_OK;
}

static qkd_status calibrate_tensor(qkd_model *m, int i, int by_output, float *w, float *x,
                                   int64_t n_x)
{
    qkd__backend *be = qkd__model_backend(m);
    const qkd__tensor_entry *e = &m->tensors[i];
    const size_t n = (size_t)(e->rows * e->cols);
    const qkd__bf16_in in = by_output ? linear_input(m, e) : (qkd__bf16_in){NULL, NULL};
    const int has_in = in.f32 || in.bits;
    float *dev_w = qkd__model_param_dev(m, i);
    qkd_status st = qkd__model_download(m, w, dev_w, n);
    if (st == QKD_OK && has_in)
        st = sample_inputs(m, in, e->cols, n_x, x);
    if (st == QKD_OK)
        st = qkd__quantizer_search_clip(m->student.q, w, e->rows, e->cols, has_in ? x : NULL, n_x,
                                        e->name);
    return st == QKD_OK ? be->upload(be, dev_w, w, n * sizeof(float)) : st;
}

/* Host buffers for the largest targeted tensor and its sampled inputs. */
static qkd_status search_all(qkd_model *m, int by_output, int64_t n_x)
{
    size_t w_floats = 0, x_floats = 0;
    for (int i = 0; i < m->n_weights; i++) {
        const qkd__tensor_entry *e = &m->tensors[i];
        if (!m->student.t[i].wq)
            continue;
        if ((size_t)(e->rows * e->cols) > w_floats)
            w_floats = (size_t)(e->rows * e->cols);
        if ((size_t)(n_x * e->cols) > x_floats)
            x_floats = (size_t)(n_x * e->cols);
    }
    float *w = qkd__alloc(m->ctx, (w_floats + x_floats) * sizeof(float));
    if (!w)
        return qkd__error(m->ctx, QKD_ERR_NO_MEMORY, "calibrate: out of memory");
    qkd_status st = QKD_OK;
    for (int i = 0; i < m->n_weights && st == QKD_OK; i++) {
        if (m->student.t[i].wq)
            st = calibrate_tensor(m, i, by_output, w, w + w_floats, n_x);
    }
    qkd__free(m->ctx, w);
    return st;
}

qkd_status qkd_quantizer_calibrate(qkd_quantizer *q, qkd_model *m, const int32_t *tokens, int B,
                                   int T)
{
    if (!q)
        return QKD_ERR_INVALID_ARG;
    qkd_context *ctx = qkd__quantizer_context(q);
    const qkd_clip_mode clip = qkd__quantizer_params(q)->clip;
    if (!m)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "calibrate: model is NULL");
    if (m->student.q != q)
        return qkd__error(ctx, QKD_ERR_STATE,
                          "calibrate: the model is not bound to this quantizer (call "
                          "qkd_model_set_quantizer first)");
    if (clip != QKD_CLIP_SEARCH_WEIGHT && clip != QKD_CLIP_SEARCH_OUTPUT)
        return qkd__error(ctx, QKD_ERR_STATE,
                          "calibrate: the quantizer's clip mode %d is not a SEARCH mode",
                          (int)clip);
    const int by_output = clip == QKD_CLIP_SEARCH_OUTPUT;
    if (by_output && m->frozen)
        return qkd__error(ctx, QKD_ERR_STATE,
                          "calibrate: an output-error search reads every layer's inputs, which a "
                          "model that is not trainable does not keep (qkd_model_set_trainable)");
    int64_t n_x = 0;
    if (by_output) {
        m->student.off = 1; /* the float model's activations */
        qkd_status st = qkd_model_forward(m, tokens, B, T);
        m->student.off = 0;
        if (st != QKD_OK)
            return st;
        n_x = (int64_t)B * T < MAX_SAMPLES ? (int64_t)B * T : MAX_SAMPLES;
    }
    qkd_status st = search_all(m, by_output, n_x);
    m->has_forward = m->has_dlogits = 0; /* that forward was not the student's */
    qkd__model_init_scales(m);           /* learned ones start at the searched clip */
    m->student.wq_state = -1;             /* the latent weights changed */
    return st;
}
