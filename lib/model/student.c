/* A student: a model bound to a quantizer. Its forward reads Q(w) from a
 * device copy of every targeted tensor, refreshed from the latent weights
 * at the start of each forward, or, where the backend fuses fake
 * quantization into its products (hard rounding), only the groups' scales
 * and zero points are refreshed and the linear layers' products quantize
 * the latent weights as they pack them; its backward collects dL/dQ(w) in a
 * separate buffer and maps it to dL/dw through the quantizer's estimator,
 * adding it to the model's gradient, or, when that estimator is the
 * identity (the plain STE without a clip), adds to dL/dw directly. A bf16
 * model on a backend with the bf16-bits family writes Q(w) in bf16 only.
 * With learned scales the quantizer's scales and zero points are tensors
 * of the model's table, after its weights: the forward reads them and the
 * backward adds their gradients. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "model/model_impl.h"

#define CHUNK_FLOATS 65536 /* host staging buffer of the finiteness check */

#define NORM_TARGETS                                                                \
    (QKD_QUANT_TARGET(QKD_TENSOR_ATTN_NORM) | QKD_QUANT_TARGET(QKD_TENSOR_FFN_NORM) | \
     QKD_QUANT_TARGET(QKD_TENSOR_OUTPUT_NORM))
#define ALL_TARGETS ((QKD_QUANT_TARGET(QKD_TENSOR_OUTPUT) << 1) - 1u)

/* A tied model's token_embd is also its output head: naming either
 * quantizes the one tensor, as a deployed file stores it once. */
static int is_targeted(const qkd_model *m, const qkd__tensor_entry *e, unsigned targets)
{
    if (targets & QKD_QUANT_TARGET(e->kind))
        return 1;
    return e->kind == QKD_TENSOR_TOKEN_EMBD && m->cfg.tied_embeddings &&
           (targets & QKD_QUANT_TARGET(QKD_TENSOR_OUTPUT));
}

static int is_live(const qkd_model *m)
{
    return m->student.q && !m->student.off;
}

static int weight_index(const qkd_model *m, qkd_tensor_kind kind, int layer)
{
    if (kind == QKD_TENSOR_OUTPUT && m->cfg.tied_embeddings)
        kind = QKD_TENSOR_TOKEN_EMBD;
    return qkd__model_tensor_index(m, kind, layer);
}

/* The tensor's quantization state while the student is live, else NULL. */
static const qkd__qtensor *live_qtensor(const qkd_model *m, qkd_tensor_kind kind, int layer)
{
    if (!is_live(m))
        return NULL;
    const qkd__qtensor *t = &m->student.t[weight_index(m, kind, layer)];
    return t->wq ? t : NULL;
}

/* ---- what the passes read ------------------------------------------------ */

const float *qkd__model_weight(const qkd_model *m, qkd_tensor_kind kind, int layer)
{
    const qkd__qtensor *t = live_qtensor(m, kind, layer);
    return t ? t->wq : qkd__model_tensor_ptr(m, m->params, kind, layer);
}

float *qkd__model_weight_grad(const qkd_model *m, qkd_tensor_kind kind, int layer)
{
    const qkd__qtensor *t = live_qtensor(m, kind, layer);
    return t && !m->student.grad_direct ? t->dwq
                                        : qkd__model_tensor_ptr(m, m->grads, kind, layer);
}

/* The fused view of tensor t of (kind, layer); spec receives its setting. */
static qkd__qweight fused_weight(const qkd_model *m, const qkd__qtensor *t,
                                 qkd_tensor_kind kind, int layer, qkd__quant_spec *spec)
{
    const qkd__tensor_entry *e = &m->tensors[weight_index(m, kind, layer)];
    int64_t rows = e->rows, cols = e->cols;
    *spec = qkd__quantizer_spec(m->student.q, &rows, &cols, 0);
    return (qkd__qweight){.w = m->params + e->offset, .scales = t->scales, .zeros = t->zeros,
                          .spec = spec, .scratch = t->wq};
}

/* The weight operand of a bf16-bits product: Q(w) in bf16 for a tensor of
 * that form, a frozen model's bf16 weight where it keeps them, else the
 * fp32 weight the forward reads. */
static qkd__bf16_in weight_in(const qkd_model *m, qkd_tensor_kind kind, int layer)
{
    const qkd__qtensor *t = live_qtensor(m, kind, layer);
    if (t && t->form == QKD__WQ_BF16)
        return (qkd__bf16_in){.bits = (const uint16_t *)t->wq};
    const uint16_t *bits = t ? NULL : qkd__model_weight_bits(m, weight_index(m, kind, layer));
    return bits ? (qkd__bf16_in){.bits = bits}
                : qkd__bf16_f32(qkd__model_weight(m, kind, layer));
}

/* The fp32-operand products of one pass over a linear weight, in each of
 * the forms it can take: forward (out = x W^T) and backward-input (out +=
 * x W) share the shapes of these slots. */
typedef struct linear_slots {
    void (*fused)(qkd__backend *, float *, const float *, const qkd__qweight *, int, int, int);
    void (*bf16)(qkd__backend *, float *, const float *, const float *, int, int, int);
    void (*fp32)(qkd__backend *, float *, const float *, const float *, int, int, int);
} linear_slots;

/* out and x of the linear (kind, layer), not of the bf16-bits family,
 * through the product of its form: the fused student products, or the
 * plain ones in the model's precision. */
static void linear_product(const qkd_model *m, const linear_slots *sl, qkd_tensor_kind kind,
                           int layer, float *out, qkd__bf16_in x, int N, int C, int OC)
{
    qkd__backend *be = qkd__model_backend(m);
    const qkd__qtensor *t = live_qtensor(m, kind, layer);
    if (t && t->form == QKD__WQ_FUSED) {
        qkd__quant_spec spec;
        qkd__qweight fw = fused_weight(m, t, kind, layer, &spec);
        sl->fused(be, out, x.f32, &fw, N, C, OC);
    } else {
        (m->matmul_bf16 ? sl->bf16 : sl->fp32)(be, out, x.f32, qkd__model_weight(m, kind, layer),
                                               N, C, OC);
    }
}

void qkd__model_linear_forward(const qkd_model *m, qkd_tensor_kind kind, int layer, float *out,
                               qkd__bf16_in inp, int N, int C, int OC)
{
    qkd__backend *be = qkd__model_backend(m);
    if (qkd__model_bf16_bits(m)) {
        be->matmul_forward_bf16_bits(be, out, inp, weight_in(m, kind, layer), N, C, OC);
        return;
    }
    const linear_slots sl = {be->matmul_forward_fq, be->matmul_forward_bf16, be->matmul_forward};
    linear_product(m, &sl, kind, layer, out, inp, N, C, OC);
}

void qkd__model_linear_backward_input(const qkd_model *m, qkd_tensor_kind kind, int layer,
                                      float *dinp, qkd__bf16_in dout, int N, int C, int OC,
                                      int accumulate)
{
    qkd__backend *be = qkd__model_backend(m);
    if (qkd__model_bf16_bits(m)) {
        be->matmul_backward_input_bf16_bits(be, dinp, dout, weight_in(m, kind, layer), N, C, OC,
                                            accumulate);
        return;
    }
    if (!accumulate) /* the other products add */
        be->fill(be, dinp, 0.0f, (size_t)N * C);
    const linear_slots sl = {be->matmul_backward_input_fq, be->matmul_backward_input_bf16,
                             be->matmul_backward_input};
    linear_product(m, &sl, kind, layer, dinp, dout, N, C, OC);
}

void qkd__model_linear_backward_weight(const qkd_model *m, qkd_tensor_kind kind, int layer,
                                       qkd__bf16_in dout, qkd__bf16_in inp, int N, int C, int OC,
                                       int accumulate)
{
    qkd__backend *be = qkd__model_backend(m);
    float *dw = qkd__model_weight_grad(m, kind, layer);
    if (qkd__model_bf16_bits(m))
        be->matmul_backward_weight_bf16_bits(be, dw, dout, inp, N, C, OC, accumulate);
    else
        (m->matmul_bf16 ? be->matmul_backward_weight_bf16 : be->matmul_backward_weight)(
            be, dw, dout.f32, inp.f32, N, C, OC);
}

void qkd__model_linear_forward_to_bits(const qkd_model *m, qkd_tensor_kind kind, int layer,
                                       uint16_t *out, qkd__bf16_in inp, int N, int C, int OC)
{
    qkd__backend *be = qkd__model_backend(m);
    be->matmul_forward_to_bf16_bits(be, out, inp, weight_in(m, kind, layer), N, C, OC);
}

void qkd__model_linear_backward_input_to_bits(const qkd_model *m, qkd_tensor_kind kind,
                                              int layer, uint16_t *dinp, qkd__bf16_in dout,
                                              int N, int C, int OC)
{
    qkd__backend *be = qkd__model_backend(m);
    be->matmul_backward_input_to_bf16_bits(be, dinp, dout, weight_in(m, kind, layer), N, C, OC);
}

void qkd__model_linears_backward_bits(const qkd_model *m, int layer,
                                      const qkd_tensor_kind *kinds, const int *OC,
                                      const qkd__bf16_in *x, int n, float *dinp,
                                      const uint16_t *dout, int N, int C, int accumulate)
{
    qkd__backend *be = qkd__model_backend(m);
    if (be->linears_backward_bf16_bits) { /* dout in rows */
        qkd__bf16_linear lin[QKD__GROUP_MAX];
        for (int i = 0; i < n; i++)
            lin[i] = (qkd__bf16_linear){.w = weight_in(m, kinds[i], layer), .x = x[i],
                                        .dw = qkd__model_weight_grad(m, kinds[i], layer),
                                        .OC = OC[i]};
        be->linears_backward_bf16_bits(be, dinp, 0, dout, lin, n, N, C, accumulate);
        return;
    }
    for (int i = 0; i < n; dout += (size_t)N * OC[i++]) { /* dout in blocks */
        const qkd__bf16_in d = {.bits = dout};
        qkd__model_linear_backward_input(m, kinds[i], layer, dinp, d, N, C, OC[i], i > 0);
        qkd__model_linear_backward_weight(m, kinds[i], layer, d, x[i], N, C, OC[i], accumulate);
    }
}

int qkd__model_grads_direct(const qkd_model *m)
{
    return !is_live(m) || m->student.grad_direct;
}

int qkd__model_act_bits(const qkd_model *m)
{
    return is_live(m) ? m->student.act_bits : 0;
}

int qkd__model_kv_bits(const qkd_model *m)
{
    return is_live(m) ? m->student.kv_bits : 0;
}

qkd__bf16_in qkd__model_linear_input(const qkd_model *m, qkd_tensor_kind kind, int layer,
                                     const float *x, const float *xq, const uint16_t *x16)
{
    if (x16)
        return (qkd__bf16_in){.bits = x16};
    const int quantized = qkd__model_act_bits(m) && live_qtensor(m, kind, layer);
    return qkd__bf16_f32(quantized ? xq : x);
}

qkd_quantizer *qkd__model_tensor_quantizer(const qkd_model *m, int index)
{
    return m->student.q && index < m->n_weights && m->student.t[index].wq ? m->student.q
                                                                          : NULL;
}

/* A learned tensor of the table (index -1: none) in base (params or grads). */
static float *learned(const qkd_model *m, float *base, int index)
{
    return index < 0 ? NULL : base + m->tensors[index].offset;
}

/* Q(w) of targeted tensor i into wq (its own, or one of its size). */
static void quantize_tensor(const qkd_model *m, int i, float *wq, int smooth)
{
    const qkd__student *s = &m->student;
    const qkd__qtensor *t = &s->t[i];
    const qkd__tensor_entry *e = &m->tensors[i];
    const float *w = m->params + e->offset;
    if (t->scale_index < 0)
        qkd__quantizer_forward(s->q, wq, t->scales, t->zeros, w, e->rows, e->cols, smooth);
    else
        qkd__quantizer_lsq_forward(s->q, wq, w, learned(m, m->params, t->scale_index),
                                   learned(m, m->params, t->zero_index), e->rows, e->cols,
                                   smooth);
}

qkd_status qkd__model_deployed_get(qkd_model *m, int index, float *dst)
{
    const qkd__tensor_entry *e = &m->tensors[index];
    const qkd__qtensor *t = &m->student.t[index];
    const size_t n = (size_t)(e->rows * e->cols);
    if (!qkd__model_tensor_quantizer(m, index))
        return qkd__model_tensor_read(m, index, dst);
    m->student.wq_state = -1; /* wq or the groups are now hard: refresh them all */
    if (!t->bf16_only) {
        quantize_tensor(m, index, t->wq, 0);
        return qkd__model_download(m, dst, t->wq, n);
    }
    qkd__backend *be = qkd__model_backend(m);
    float *wq = NULL; /* the fp32 Q(w) that wq has no room for */
    qkd_status st = be->alloc(be, n * sizeof *wq, (void **)&wq);
    if (st != QKD_OK)
        return st;
    quantize_tensor(m, index, wq, 0);
    st = qkd__model_download(m, dst, wq, n);
    be->free(be, wq);
    return st;
}

/* ---- the passes' hooks ----------------------------------------------------- */

/* student.wq_state: what the last refresh wrote (0: fp32 hard rounding,
 * for decoding) */
#define WQ_SMOOTH 1 /* round_T and SoftClamp (the CONTINUOUS estimator) */
#define WQ_FUSED 2  /* the backend's fused products, fp32 */
#define WQ_BF16 4   /* Q(w) in bf16 for the bf16-bits products */

static int backend_fuses(const qkd_model *m)
{
    const qkd__backend *be = qkd__model_backend(m);
    return be->fakequant_groups && be->matmul_forward_fq && be->matmul_backward_input_fq &&
           !m->matmul_bf16;
}

/* Whether weight e, quantized by spec with learned scales or not, can be
 * read FUSED or BF16: a linear weight (not the embedding table, nor a tied
 * head), computed scales, a scheme those slots take. */
static int groupable(const qkd__tensor_entry *e, const qkd__quant_spec *spec, int learned)
{
    return e->kind != QKD_TENSOR_TOKEN_EMBD && !learned &&
           (spec->scheme == QKD_QUANT_SYM || spec->scheme == QKD_QUANT_ASYM ||
            spec->scheme == QKD_QUANT_TERNARY);
}

/* How the forward of `state` reads tensor i: FUSED or BF16 only where
 * groupable; FUSED also needs groups along the rows. */
static qkd__wq_form form_of(const qkd_model *m, int i, int state)
{
    const qkd__tensor_entry *e = &m->tensors[i];
    int64_t rows = e->rows, cols = e->cols;
    const qkd__quant_spec spec = qkd__quantizer_spec(m->student.q, &rows, &cols, 0);
    if (!groupable(e, &spec, m->student.t[i].scale_index >= 0))
        return QKD__WQ_FLOAT;
    if (state & WQ_BF16)
        return QKD__WQ_BF16;
    return (state & WQ_FUSED) && rows == e->rows ? QKD__WQ_FUSED : QKD__WQ_FLOAT;
}

/* The groups of a fused tensor i: its products quantize while packing. */
static void quantize_groups(const qkd_model *m, int i)
{
    const qkd__qtensor *t = &m->student.t[i];
    const qkd__tensor_entry *e = &m->tensors[i];
    qkd__backend *be = qkd__model_backend(m);
    int64_t rows = e->rows, cols = e->cols;
    const qkd__quant_spec spec = qkd__quantizer_spec(m->student.q, &rows, &cols, 0);
    be->fakequant_groups(be, t->scales, t->zeros, m->params + e->offset, rows, cols, &spec);
}

void qkd__model_quantize_weights(qkd_model *m, int training, int force)
{
    qkd__student *s = &m->student;
    if (!is_live(m))
        return;
    const int smooth = training && qkd__quantizer_smooth(s->q);
    int state = smooth ? WQ_SMOOTH : 0;
    if (qkd__model_bf16_bits(m)) /* decoding too: its products would round Q(w) so */
        state |= WQ_BF16;
    else if (training && !smooth && backend_fuses(m))
        state |= WQ_FUSED;
    if (!force && s->wq_state == state)
        return;
    for (int i = 0; i < m->n_weights; i++) {
        qkd__qtensor *t = &s->t[i];
        const qkd__tensor_entry *e = &m->tensors[i];
        if (!t->wq || (t->updated && s->wq_state == state))
            continue;
        t->updated = 0;
        t->form = form_of(m, i, state);
        if (t->form == QKD__WQ_FUSED)
            quantize_groups(m, i);
        else if (t->form == QKD__WQ_BF16)
            qkd__quantizer_forward_bf16(s->q, (uint16_t *)t->wq, t->scales, t->zeros,
                                        m->params + e->offset, e->rows, e->cols, smooth);
        else
            quantize_tensor(m, i, t->wq, smooth);
    }
    s->wq_state = state;
}

int qkd__model_update_quantizes(qkd_model *m, int index, qkd__update_span *span,
                                qkd__quant_spec *spec)
{
    qkd__student *s = &m->student;
    if (!is_live(m) || index >= m->n_weights || s->wq_state != WQ_BF16)
        return 0;
    qkd__qtensor *t = &s->t[index];
    const qkd__tensor_entry *e = &m->tensors[index];
    int64_t rows = e->rows, cols = e->cols;
    const qkd__quant_spec sp = qkd__quantizer_spec(s->q, &rows, &cols, 0);
    if (!t->wq || t->form != QKD__WQ_BF16 || rows != e->rows || cols % sp.group ||
        (sp.scheme != QKD_QUANT_SYM && sp.scheme != QKD_QUANT_ASYM))
        return 0;
    if (spec->group && (spec->group != sp.group || spec->scheme != sp.scheme ||
                        spec->bits != sp.bits || spec->clip_ratio != sp.clip_ratio))
        return 0; /* one update quantizes by one setting */
    span->wq = (uint16_t *)t->wq;
    span->scales = t->scales;
    span->zeros = t->zeros;
    *spec = sp;
    t->updated = 1;
    return 1;
}

void qkd__model_init_scales(qkd_model *m)
{
    qkd__student *s = &m->student;
    qkd__backend *be = qkd__model_backend(m);
    for (int i = 0; s->q && i < m->n_weights; i++) {
        const qkd__qtensor *t = &s->t[i];
        const qkd__tensor_entry *e = &m->tensors[i];
        if (t->scale_index < 0)
            continue;
        const size_t ng = (size_t)qkd_quantizer_n_groups(s->q, e->rows, e->cols);
        qkd__quantizer_forward(s->q, t->wq, t->scales, t->zeros, m->params + e->offset,
                               e->rows, e->cols, 0);
        be->copy(be, learned(m, m->params, t->scale_index), t->scales, ng);
        if (t->zero_index >= 0)
            be->copy(be, learned(m, m->params, t->zero_index), t->zeros, ng);
    }
    s->wq_state = -1;
}

/* Every targeted tensor's dwq, in one buffer of the student's. */
static void plan_dwq(void *arg, qkd__arena *a)
{
    const qkd_model *m = arg;
    for (int i = 0; i < m->n_weights; i++) {
        const qkd__tensor_entry *e = &m->tensors[i];
        if (m->student.t[i].wq)
            m->student.t[i].dwq = qkd__arena_take(a, (size_t)e->rows, (size_t)e->cols);
    }
}

qkd_status qkd__model_student_backward_begin(qkd_model *m)
{
    qkd__backend *be = qkd__model_backend(m);
    qkd__student *s = &m->student;
    if (!is_live(m))
        return QKD_OK;
    qkd__model_quantize_weights(m, 1, 0); /* in case a decode left hard values */
    s->grad_direct = qkd__quantizer_grad_is_identity(s->q);
    if (s->grad_direct)
        return QKD_OK;
    if (!s->dwq_mem) {
        qkd_status st = qkd__arena_alloc(m->ctx, "model backward: quantized weights' gradient",
                                         plan_dwq, m, &s->dwq_mem);
        if (st != QKD_OK)
            return st;
    }
    for (int i = 0; i < m->n_weights; i++) {
        const qkd__tensor_entry *e = &m->tensors[i];
        if (s->t[i].dwq)
            be->fill(be, s->t[i].dwq, 0.0f, (size_t)(e->rows * e->cols));
    }
    return QKD_OK;
}

void qkd__model_student_backward_end(qkd_model *m)
{
    const qkd__student *s = &m->student;
    if (!is_live(m) || s->grad_direct)
        return;
    for (int i = 0; i < m->n_weights; i++) {
        const qkd__qtensor *t = &s->t[i];
        const qkd__tensor_entry *e = &m->tensors[i];
        float *dw = m->grads + e->offset;
        const float *w = m->params + e->offset;
        if (!t->wq)
            continue;
        if (t->scale_index < 0)
            qkd__quantizer_backward(s->q, dw, t->dwq, w, t->scales, t->zeros, e->rows,
                                    e->cols);
        else
            qkd__quantizer_lsq_backward(s->q, dw, learned(m, m->grads, t->scale_index),
                                        learned(m, m->grads, t->zero_index), t->dwq, w,
                                        learned(m, m->params, t->scale_index),
                                        learned(m, m->params, t->zero_index), e->rows,
                                        e->cols);
    }
}

/* ---- binding ------------------------------------------------------------------- */

static qkd_status check_targets(const qkd_model *m, const qkd_quantizer *q, unsigned targets)
{
    if (qkd__quantizer_context(q) != m->ctx)
        return qkd__error(m->ctx, QKD_ERR_INVALID_ARG,
                          "set_quantizer: the quantizer and the model belong to different "
                          "contexts");
    if (targets == 0)
        return qkd__error(m->ctx, QKD_ERR_INVALID_ARG, "set_quantizer: targets is empty");
    if (targets & ~ALL_TARGETS)
        return qkd__error(m->ctx, QKD_ERR_INVALID_ARG,
                          "set_quantizer: targets 0x%x names no tensor kind", targets);
    if (targets & NORM_TARGETS)
        return qkd__error(m->ctx, QKD_ERR_INVALID_ARG,
                          "set_quantizer: targets 0x%x names norm weights, which stay in float",
                          targets);
    return QKD_OK;
}

/* NON_FINITE if a targeted tensor holds NaN or Inf, naming where. */
static qkd_status check_finite(const qkd_model *m, const qkd__tensor_entry *e, float *chunk)
{
    const size_t n = (size_t)(e->rows * e->cols);
    for (size_t done = 0; done < n; done += CHUNK_FLOATS) {
        size_t len = n - done < CHUNK_FLOATS ? n - done : CHUNK_FLOATS;
        qkd_status st = qkd__model_download(m, chunk, m->params + e->offset + done, len);
        if (st != QKD_OK)
            return st;
        for (size_t i = 0; i < len; i++) {
            if (!isfinite(chunk[i]))
                return qkd__error(m->ctx, QKD_ERR_NON_FINITE,
                                  "set_quantizer: %s[%zu] is not finite", e->name, done + i);
        }
    }
    return QKD_OK;
}

static qkd_status check_weights(const qkd_model *m, unsigned targets)
{
    float *chunk = qkd__alloc(m->ctx, CHUNK_FLOATS * sizeof(float));
    if (!chunk)
        return qkd__error(m->ctx, QKD_ERR_NO_MEMORY, "set_quantizer: out of memory");
    qkd_status st = QKD_OK;
    for (int i = 0; i < m->n_weights && st == QKD_OK; i++) {
        if (is_targeted(m, &m->tensors[i], targets))
            st = check_finite(m, &m->tensors[i], chunk);
    }
    qkd__free(m->ctx, chunk);
    return st;
}

typedef struct student_plan {
    const qkd_model *m;
    const qkd_quantizer *q;
    unsigned targets;
    qkd__qtensor *t;
} student_plan;

/* Each targeted tensor's wq, scales and zeros; a wq with room for bf16
 * values only where the model's products always read Q(w) in bf16. The
 * wq come first, in the tensors' order but the down projections last, so
 * that a layer's q, k and v lie one after the other, and so do its gate
 * and up: the input gradient products of each group can then run as one
 * (linears_backward_bf16_bits). */
static void plan_student(void *arg, qkd__arena *a)
{
    const student_plan *p = arg;
    for (int downs = 0; downs < 2; downs++) /* the down projections' wq in the second pass */
        for (int i = 0; i < p->m->n_weights; i++) {
            const qkd__tensor_entry *e = &p->m->tensors[i];
            if (!is_targeted(p->m, e, p->targets) || (e->kind == QKD_TENSOR_FFN_DOWN) != downs)
                continue;
            int64_t rows = e->rows, cols = e->cols;
            const qkd__quant_spec spec = qkd__quantizer_spec(p->q, &rows, &cols, 0);
            const size_t n = (size_t)e->rows * (size_t)e->cols;
            p->t[i].bf16_only = qkd__model_bf16_bits(p->m) &&
                                groupable(e, &spec, qkd__quantizer_learned(p->q) > 0);
            p->t[i].wq = qkd__arena_take(a, p->t[i].bf16_only ? (n + 1) / 2 : n, 1);
        }
    for (int i = 0; i < p->m->n_weights; i++) {
        const qkd__tensor_entry *e = &p->m->tensors[i];
        if (!is_targeted(p->m, e, p->targets))
            continue;
        const size_t ng = (size_t)qkd_quantizer_n_groups(p->q, e->rows, e->cols);
        p->t[i].scales = qkd__arena_take(a, ng, 1);
        p->t[i].zeros = qkd__arena_take(a, ng, 1);
    }
}

qkd_status qkd__model_student_refit(qkd_model *m)
{
    qkd__student *s = &m->student;
    if (!s->q)
        return QKD_OK;
    qkd__qtensor *t = qkd__calloc(m->ctx, (size_t)m->n_weights, sizeof *t);
    if (!t)
        return qkd__error(m->ctx, QKD_ERR_NO_MEMORY, "set_matmul_precision: out of memory");
    student_plan plan = {m, s->q, s->targets, t};
    void *mem = NULL;
    qkd_status st = qkd__arena_alloc(m->ctx, "set_matmul_precision: quantized weights",
                                     plan_student, &plan, &mem);
    if (st != QKD_OK) {
        qkd__free(m->ctx, t);
        return st;
    }
    qkd__backend *be = qkd__model_backend(m);
    for (int i = 0; i < m->n_weights; i++) {
        const qkd__tensor_entry *e = &m->tensors[i];
        if (!s->t[i].wq)
            continue;
        const size_t ng = (size_t)qkd_quantizer_n_groups(s->q, e->rows, e->cols);
        be->copy(be, t[i].scales, s->t[i].scales, ng); /* learned ones' initial values */
        be->copy(be, t[i].zeros, s->t[i].zeros, ng);
        s->t[i].wq = t[i].wq;
        s->t[i].scales = t[i].scales;
        s->t[i].zeros = t[i].zeros;
        s->t[i].bf16_only = t[i].bf16_only;
    }
    qkd__free(m->ctx, t);
    be->free(be, s->mem);
    s->mem = mem;
    s->wq_state = -1;
    return QKD_OK;
}

void qkd__model_free_student(qkd_model *m)
{
    qkd__backend *be = qkd__model_backend(m);
    be->free(be, m->student.mem);
    be->free(be, m->student.dwq_mem);
    qkd__free(m->ctx, m->student.t);
    m->student = (qkd__student){0};
}

/* The entry of a learned tensor of weight e: "<name>.scale" or ".zero". */
static qkd__tensor_entry learned_entry(const qkd_quantizer *q, const qkd__tensor_entry *e,
                                       qkd_tensor_kind kind)
{
    static const char weight_suffix[] = ".weight";
    qkd__tensor_entry x = {.kind = kind, .layer = e->layer, .n_dims = 2};
    int stem = (int)(strlen(e->name) - (sizeof weight_suffix - 1));
    snprintf(x.name, sizeof x.name, "%.*s.%s", stem, e->name,
             kind == QKD_TENSOR_QUANT_SCALE ? "scale" : "zero");
    qkd__quantizer_scale_shape(q, e->rows, e->cols, &x.rows, &x.cols);
    return x;
}

/* Put the learned tensors of q (none unless learn_scales) into the table:
 * per targeted weight (t[i].wq set), its scales and (ASYM) zero points,
 * their indices recorded in t. */
static qkd_status add_learned_tensors(qkd_model *m, const qkd_quantizer *q, qkd__qtensor *t)
{
    const int per_weight = qkd__quantizer_learned(q); /* 0, 1 or 2 tensors */
    qkd__tensor_entry *extra = NULL;
    if (per_weight) {
        extra = qkd__calloc(m->ctx, (size_t)(per_weight * m->n_weights), sizeof *extra);
        if (!extra)
            return qkd__error(m->ctx, QKD_ERR_NO_MEMORY, "set_quantizer: out of memory");
    }
    int n = 0;
    for (int i = 0; i < m->n_weights; i++) {
        t[i].scale_index = t[i].zero_index = -1;
        if (!per_weight || !t[i].wq)
            continue;
        t[i].scale_index = m->n_weights + n;
        extra[n++] = learned_entry(q, &m->tensors[i], QKD_TENSOR_QUANT_SCALE);
        if (per_weight == 2) {
            t[i].zero_index = m->n_weights + n;
            extra[n++] = learned_entry(q, &m->tensors[i], QKD_TENSOR_QUANT_ZERO);
        }
    }
    qkd_status st = qkd__model_set_learned_tensors(m, extra, n);
    qkd__free(m->ctx, extra);
    return st;
}

static qkd_status bind(qkd_model *m, qkd_quantizer *q, unsigned targets)
{
    const qkd_quant_params *p = qkd__quantizer_params(q);
    qkd__student s = {.q = q, .targets = targets, .act_bits = p->act_bits,
                      .kv_bits = p->kv_bits, .wq_state = -1};
    s.t = qkd__calloc(m->ctx, (size_t)m->n_weights, sizeof *s.t);
    if (!s.t)
        return qkd__error(m->ctx, QKD_ERR_NO_MEMORY, "set_quantizer: out of memory");
    student_plan plan = {m, q, targets, s.t};
    qkd_status st = qkd__arena_alloc(m->ctx, "set_quantizer: quantized weights", plan_student,
                                     &plan, &s.mem);
    if (st == QKD_OK)
        st = add_learned_tensors(m, q, s.t);
    if (st != QKD_OK) {
        qkd__backend *be = qkd__model_backend(m);
        be->free(be, s.mem);
        qkd__free(m->ctx, s.t);
        return st;
    }
    qkd__model_free_student(m);
    m->student = s;
    qkd__model_init_scales(m);
    return QKD_OK;
}

qkd_status qkd_model_set_quantizer(qkd_model *m, qkd_quantizer *q, unsigned targets)
{
    if (!m)
        return QKD_ERR_INVALID_ARG;
    qkd_status st = QKD_OK;
    if (q && ((st = check_targets(m, q, targets)) || (st = qkd__model_fetch_matrices(m)) ||
              (st = check_weights(m, targets)) || (st = bind(m, q, targets))))
        return st;
    if (!q) {
        qkd__model_free_student(m);
        (void)qkd__model_set_learned_tensors(m, NULL, 0); /* truncating cannot fail */
    }
    /* activations and the cache are planned again, with or without the
     * buffers of quantized activations */
    qkd__model_free_acts(m);
    qkd__model_free_decode(m);
    return QKD_OK;
}
