/* Mean cross-entropy of the last forward's logits, and its logits
 * gradient for the backward pass. */
#include "model/model_impl.h"

/* Count the targets that take part (>= 0); RANGE for one past the vocabulary. */
static qkd_status count_targets(const qkd_model *m, const int32_t *targets, int N, int *n_valid)
{
    *n_valid = 0;
    for (int i = 0; i < N; i++) {
        if (targets[i] >= m->cfg.vocab_size)
            return qkd__error(m->ctx, QKD_ERR_RANGE,
                              "model cross_entropy: target %d at row %d is outside the "
                              "vocabulary [0, %d)",
                              (int)targets[i], i, m->cfg.vocab_size);
        *n_valid += targets[i] >= 0;
    }
    return QKD_OK;
}

qkd_status qkd_model_cross_entropy(qkd_model *m, const int32_t *targets, int compute_grad,
                                   float *loss)
{
    if (!m)
        return QKD_ERR_INVALID_ARG;
    if (!targets || !loss)
        return qkd__error(m->ctx, QKD_ERR_INVALID_ARG, "model cross_entropy: NULL argument");
    *loss = 0.0f;
    if (!m->has_forward)
        return qkd__error(m->ctx, QKD_ERR_STATE, "model cross_entropy: no forward pass yet");
    if (compute_grad && m->frozen)
        return qkd__error(m->ctx, QKD_ERR_STATE,
                          "model cross_entropy: no gradient for a model that is not trainable "
                          "(qkd_model_set_trainable)");
    qkd__backend *be = qkd__model_backend(m);
    qkd__train_acts *a = &m->acts;
    const int N = a->B * a->T, V = m->cfg.vocab_size;
    int n_valid;
    const float *logits;
    qkd_status st = count_targets(m, targets, N, &n_valid);
    if (st == QKD_OK)
        st = qkd__model_logits_all(m, &logits);
    if (st == QKD_OK)
        st = be->upload(be, a->targets, targets, (size_t)N * sizeof *targets);
    if (st != QKD_OK)
        return st;

    be->cross_entropy_forward(be, a->losses, logits, a->targets, N, V);
    be->sum(be, a->loss_sum, a->losses, (size_t)N);
    if (compute_grad) {
        float *dlogits;
        st = qkd__model_dlogits_f32(m, &dlogits);
        if (st != QKD_OK)
            return st;
        be->fill(be, dlogits, 0.0f, (size_t)N * V);
        if (n_valid > 0)
            be->cross_entropy_backward(be, dlogits, logits, a->targets,
                                       1.0f / (float)n_valid, N, V);
        m->has_dlogits = QKD__DLOGITS_F32;
    }
    float sum;
    st = qkd__model_download(m, &sum, a->loss_sum, 1);
    if (st != QKD_OK)
        return st;
    *loss = n_valid > 0 ? (float)((double)sum / n_valid) : 0.0f;
    return QKD_OK;
}
