/* Optimizers: parameter checks, state allocation on the model's backend,
 * groups and presets, the schedule, and the step (global norm, clipping,
 * one backend update per trainable tensor, or one for all of them). */
#include <limits.h>
#include <math.h>

#include "model/model.h"
#include "optim/optim_impl.h"

#define PI 3.14159265358979323846
/* Floats per 64-byte line: moment slices start on a line. */
#define LINE_FLOATS 16

void qkd_optim_params_init(qkd_optim_params *p)
{
    if (!p)
        return;
    *p = (qkd_optim_params){
        .size = sizeof *p,
        .kind = QKD_OPTIM_ADAMW,
        .lr = 1e-4f,
        .beta1 = 0.9f,
        .beta2 = 0.999f,
        .eps = 1e-8f,
        .momentum = 0.9f,
        .weight_decay = 0.0f,
        .schedule = QKD_SCHEDULE_CONSTANT,
        .warmup_steps = 0,
        .total_steps = 0,
        .min_lr_ratio = 0.0f,
        .max_grad_norm = 1.0f,
    };
}

/* ---- parameter checks ---------------------------------------------------- */

static qkd_status bad_value(qkd_context *ctx, const char *name, double v, const char *want)
{
    return qkd__error(ctx, QKD_ERR_INVALID_ARG, "optimizer create: %s = %g, expected %s", name,
                      v, want);
}

/* x in [0, 1); false for NaN. */
static int in_unit(float x)
{
    return x >= 0.0f && x < 1.0f;
}

static int finite_nonneg(float x)
{
    return x >= 0.0f && isfinite(x);
}

static qkd_status check_kind(qkd_context *ctx, const qkd_optim_params *p)
{
    if (p->kind == QKD_OPTIM_SGD)
        return in_unit(p->momentum) ? QKD_OK
                                    : bad_value(ctx, "momentum", p->momentum, "in [0, 1)");
    if (p->kind != QKD_OPTIM_ADAMW)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "optimizer create: unknown kind %d",
                          (int)p->kind);
    if (!in_unit(p->beta1))
        return bad_value(ctx, "beta1", p->beta1, "in [0, 1)");
    if (!in_unit(p->beta2))
        return bad_value(ctx, "beta2", p->beta2, "in [0, 1)");
    if (!(p->eps > 0.0f) || !isfinite(p->eps))
        return bad_value(ctx, "eps", p->eps, "> 0 and finite");
    return QKD_OK;
}

static qkd_status check_schedule(qkd_context *ctx, const qkd_optim_params *p)
{
    if ((unsigned)p->schedule > QKD_SCHEDULE_COSINE)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "optimizer create: unknown schedule %d",
                          (int)p->schedule);
    if (p->warmup_steps < 0 || p->total_steps < 0)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "optimizer create: warmup_steps %lld and total_steps %lld must be >= 0",
                          (long long)p->warmup_steps, (long long)p->total_steps);
    if (p->schedule != QKD_SCHEDULE_CONSTANT &&
        (p->total_steps < 1 || p->total_steps < p->warmup_steps))
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "optimizer create: a decaying schedule needs total_steps >= 1 and >= "
                          "warmup_steps (got total %lld, warmup %lld)",
                          (long long)p->total_steps, (long long)p->warmup_steps);
    if (!(p->min_lr_ratio >= 0.0f && p->min_lr_ratio <= 1.0f))
        return bad_value(ctx, "min_lr_ratio", p->min_lr_ratio, "in [0, 1]");
    return QKD_OK;
}

static qkd_status check_params(qkd_context *ctx, const qkd_optim_params *p)
{
    if (p->size < sizeof *p)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "optimizer create: params size field %zu, expected %zu (call "
                          "qkd_optim_params_init)",
                          p->size, sizeof *p);
    if (!(p->lr > 0.0f) || !isfinite(p->lr))
        return bad_value(ctx, "lr", p->lr, "> 0 and finite");
    if (!finite_nonneg(p->weight_decay))
        return bad_value(ctx, "weight_decay", p->weight_decay, ">= 0 and finite");
    if (!finite_nonneg(p->max_grad_norm))
        return bad_value(ctx, "max_grad_norm", p->max_grad_norm, ">= 0 and finite");
    qkd_status st = check_kind(ctx, p);
    return st != QKD_OK ? st : check_schedule(ctx, p);
}

/* ---- create / free ---------------------------------------------------------- */

size_t qkd__optim_stride(const qkd__optim_tensor *t)
{
    return ((size_t)t->n + LINE_FLOATS - 1) / LINE_FLOATS * LINE_FLOATS;
}

static qkd_status build_tensors(qkd_optimizer *opt)
{
    int n = qkd_model_n_tensors(opt->model);
    opt->tensors = qkd__calloc(opt->ctx, (size_t)n, sizeof *opt->tensors);
    opt->norms_host = qkd__calloc(opt->ctx, (size_t)n, sizeof *opt->norms_host);
    opt->spans = qkd__calloc(opt->ctx, (size_t)n, sizeof *opt->spans);
    if (!opt->tensors || !opt->norms_host || !opt->spans)
        return qkd__error(opt->ctx, QKD_ERR_NO_MEMORY, "optimizer create: out of memory");
    opt->n_tensors = n;
    for (int i = 0; i < n; i++) {
        qkd_tensor_info info = {.size = sizeof info};
        qkd_status st = qkd_model_tensor_info(opt->model, i, &info);
        if (st != QKD_OK)
            return st;
        opt->tensors[i] = (qkd__optim_tensor){
            .kind = info.kind, .n = info.n_elements, .lr_scale = 1.0f};
    }
    return QKD_OK;
}

/* One device buffer: each tensor's moments (zeroed), the per-tensor squared
 * norms (zeroed), then, where a clipped gradient is scaled span by span
 * (update_span: SGD, or AdamW on a backend without adamw_update_multi), a
 * scratch as large as the largest tensor. */
static qkd_status alloc_state(qkd_optimizer *opt)
{
    const size_t max_floats = SIZE_MAX / sizeof(float);
    const int by_span = opt->p.kind == QKD_OPTIM_SGD || !opt->be->adamw_update_multi;
    size_t moments = 0, largest = 0;
    for (int i = 0; i < opt->n_tensors; i++) {
        size_t stride = qkd__optim_stride(&opt->tensors[i]);
        if (stride > (max_floats - moments) / (size_t)opt->n_moments)
            return qkd__error(opt->ctx, QKD_ERR_NO_MEMORY,
                              "optimizer create: the state size overflows size_t");
        moments += stride * (size_t)opt->n_moments;
        if (by_span && (size_t)opt->tensors[i].n > largest)
            largest = (size_t)opt->tensors[i].n;
    }
    size_t norms = ((size_t)opt->n_tensors + LINE_FLOATS - 1) / LINE_FLOATS * LINE_FLOATS;
    if (norms + largest > max_floats - moments)
        return qkd__error(opt->ctx, QKD_ERR_NO_MEMORY,
                          "optimizer create: the state size overflows size_t");
    qkd__backend *be = opt->be;
    qkd_status st = be->alloc(be, (moments + norms + largest) * sizeof(float), &opt->mem);
    if (st != QKD_OK)
        return st;
    float *base = opt->mem;
    for (int i = 0; i < opt->n_tensors; i++) {
        opt->tensors[i].moments = base;
        base += qkd__optim_stride(&opt->tensors[i]) * (size_t)opt->n_moments;
    }
    opt->norms = base;
    opt->scratch = by_span ? base + norms : NULL;
    be->fill(be, opt->mem, 0.0f, moments + norms);
    if (!be->step_decide)
        return QKD_OK;
    const size_t st_floats = sizeof *opt->st / sizeof(float);
    st = be->alloc(be, sizeof *opt->st, (void **)&opt->st);
    if (st == QKD_OK)
        be->fill(be, (float *)opt->st, 0.0f, st_floats); /* t 0, nothing decided */
    return st;
}

qkd_status qkd_optimizer_create(qkd_model *model, const qkd_optim_params *p,
                                qkd_optimizer **out)
{
    if (!model)
        return QKD_ERR_INVALID_ARG;
    qkd_context *ctx = qkd__model_context(model);
    if (!out)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "optimizer create: out is NULL");
    *out = NULL;
    qkd_optim_params defaults;
    if (!p) {
        qkd_optim_params_init(&defaults);
        p = &defaults;
    }
    qkd_status st = check_params(ctx, p);
    if (st != QKD_OK)
        return st;
    qkd_optimizer *opt = qkd__calloc(ctx, 1, sizeof *opt);
    if (!opt)
        return qkd__error(ctx, QKD_ERR_NO_MEMORY, "optimizer create: out of memory");
    opt->model = model;
    opt->ctx = ctx;
    opt->be = ctx->backend;
    opt->p = *p;
    opt->p.size = sizeof opt->p;
    opt->n_moments = p->kind == QKD_OPTIM_ADAMW ? 2 : 1;
    opt->table_gen = qkd__model_table_gen(model);
    st = build_tensors(opt);
    if (st == QKD_OK)
        st = alloc_state(opt);
    if (st != QKD_OK) {
        qkd_optimizer_free(opt);
        return st;
    }
    *out = opt;
    return QKD_OK;
}

void qkd_optimizer_free(qkd_optimizer *opt)
{
    if (!opt)
        return;
    opt->be->free(opt->be, opt->mem);
    opt->be->free(opt->be, opt->st);
    qkd__free(opt->ctx, opt->norms_host);
    qkd__free(opt->ctx, opt->spans);
    qkd__free(opt->ctx, opt->tensors);
    qkd__free(opt->ctx, opt);
}

/* ---- groups and presets -------------------------------------------------------- */

qkd_status qkd_optimizer_set_group(qkd_optimizer *opt, int index, float lr_scale, int frozen)
{
    if (!opt)
        return QKD_ERR_INVALID_ARG;
    if (index < 0 || index >= opt->n_tensors)
        return qkd__error(opt->ctx, QKD_ERR_RANGE,
                          "optimizer set_group: tensor index %d outside [0, %d)", index,
                          opt->n_tensors);
    if (!finite_nonneg(lr_scale))
        return qkd__error(opt->ctx, QKD_ERR_INVALID_ARG,
                          "optimizer set_group: lr_scale %g, expected >= 0 and finite",
                          (double)lr_scale);
    opt->tensors[index].lr_scale = lr_scale;
    opt->tensors[index].frozen = frozen != 0;
    return QKD_OK;
}

static unsigned presets_of(qkd_tensor_kind kind)
{
    switch (kind) {
    case QKD_TENSOR_QUANT_SCALE:
        return 0;
    case QKD_TENSOR_QUANT_ZERO:
        return QKD_PRESET_SCALES_ONLY;
    case QKD_TENSOR_ATTN_V:
    case QKD_TENSOR_ATTN_OUTPUT:
        return QKD_PRESET_OV_FREEZE | QKD_PRESET_SCALES_ONLY;
    case QKD_TENSOR_TOKEN_EMBD:
    case QKD_TENSOR_OUTPUT:
    case QKD_TENSOR_ATTN_NORM:
    case QKD_TENSOR_FFN_NORM:
    case QKD_TENSOR_OUTPUT_NORM:
        return QKD_PRESET_FREEZE_EMBED_NORM | QKD_PRESET_SCALES_ONLY;
    default: /* the other weights */
        return QKD_PRESET_SCALES_ONLY;
    }
}

static int has_scales(const qkd_optimizer *opt)
{
    for (int i = 0; i < opt->n_tensors; i++) {
        if (opt->tensors[i].kind == QKD_TENSOR_QUANT_SCALE)
            return 1;
    }
    return 0;
}

qkd_status qkd_optimizer_apply_preset(qkd_optimizer *opt, unsigned presets)
{
    if (!opt)
        return QKD_ERR_INVALID_ARG;
    const unsigned known =
        QKD_PRESET_OV_FREEZE | QKD_PRESET_FREEZE_EMBED_NORM | QKD_PRESET_SCALES_ONLY;
    if (presets & ~known)
        return qkd__error(opt->ctx, QKD_ERR_INVALID_ARG,
                          "optimizer apply_preset: unknown preset bits 0x%x", presets & ~known);
    if ((presets & QKD_PRESET_SCALES_ONLY) && !has_scales(opt))
        return qkd__error(opt->ctx, QKD_ERR_STATE,
                          "optimizer apply_preset: scales-only, but the model had no learned "
                          "scales when the optimizer was created (bind a quantizer with "
                          "learn_scales first)");
    for (int i = 0; i < opt->n_tensors; i++) {
        if (presets_of(opt->tensors[i].kind) & presets)
            opt->tensors[i].frozen = 1;
    }
    return QKD_OK;
}

/* ---- schedule ------------------------------------------------------------------ */

/* f(t) of the header. */
static double schedule_factor(const qkd_optim_params *p, int64_t t)
{
    const int64_t W = p->warmup_steps, T = p->total_steps;
    if (t < 1)
        t = 1;
    if (t <= W)
        return (double)t / (double)W;
    if (p->schedule == QKD_SCHEDULE_CONSTANT)
        return 1.0;
    double prog = T > W ? (double)(t - W) / (double)(T - W) : 1.0;
    if (prog > 1.0)
        prog = 1.0;
    const double r = p->min_lr_ratio;
    if (p->schedule == QKD_SCHEDULE_LINEAR)
        return 1.0 - (1.0 - r) * prog;
    return r + (1.0 - r) * 0.5 * (1.0 + cos(PI * prog));
}

float qkd_optimizer_lr_at(const qkd_optimizer *opt, int64_t t)
{
    if (!opt)
        return 0.0f;
    return (float)((double)opt->p.lr * schedule_factor(&opt->p, t));
}

/* ---- step ------------------------------------------------------------------------ */

/* opt->spans: the trainable tensors in order, at learning rate lr_t;
 * returns how many. With fq (a deferred AdamW step), the spans whose
 * update may also write a student's Q(w) get it, by the setting fq then
 * holds (fq->group 0: none did). */
static int fill_spans(qkd_optimizer *opt, float lr_t, qkd__quant_spec *fq)
{
    int k = 0;
    for (int i = 0; i < opt->n_tensors; i++) {
        const qkd__optim_tensor *t = &opt->tensors[i];
        if (t->frozen)
            continue;
        qkd__update_span *s = &opt->spans[k++];
        *s = (qkd__update_span){
            .p = qkd__model_param_dev(opt->model, i),
            .g = qkd__model_grad_dev(opt->model, i),
            .m = t->moments,
            .v = opt->n_moments > 1 ? t->moments + qkd__optim_stride(t) : NULL,
            .n = (size_t)t->n,
            .lr = (float)((double)lr_t * t->lr_scale),
        };
        if (fq)
            qkd__model_update_quantizes(opt->model, i, s, fq);
    }
    return k;
}

/* The squared norms of the n trainable gradients in opt->spans into
 * opt->norms on the device: one multi-tensor call where the backend has
 * it, else one sum_squares each. */
static void squared_norms(qkd_optimizer *opt, int n)
{
    qkd__backend *be = opt->be;
    if (be->sum_squares_multi) {
        be->sum_squares_multi(be, opt->norms, opt->spans, n);
        return;
    }
    for (int k = 0; k < n; k++)
        be->sum_squares(be, opt->norms + k, opt->spans[k].g, opt->spans[k].n);
}

/* The squared global L2 norm of the n trainable gradients: their squared
 * norms, one download, summed in double in tensor order. */
static qkd_status grad_sum_squares(qkd_optimizer *opt, int n, double *sum_out)
{
    qkd__backend *be = opt->be;
    double sum = 0.0;
    if (n) {
        squared_norms(opt, n);
        qkd_status st = be->sync(be);
        if (st == QKD_OK)
            st = be->download(be, opt->norms_host, opt->norms, (size_t)n * sizeof(float));
        if (st != QKD_OK)
            return st;
        for (int k = 0; k < n; k++)
            sum += opt->norms_host[k];
    }
    *sum_out = sum;
    return QKD_OK;
}

/* Update one span; a clipped gradient is scaled on the scratch copy, never
 * in the model. */
static void update_span(qkd_optimizer *opt, const qkd__update_span *s, int clipped, float clip,
                        int bias_t)
{
    const qkd_optim_params *p = &opt->p;
    qkd__backend *be = opt->be;
    const float *g = s->g;
    if (clipped) {
        be->copy(be, opt->scratch, g, s->n);
        be->scale(be, opt->scratch, clip, s->n);
        g = opt->scratch;
    }
    if (p->kind == QKD_OPTIM_SGD)
        be->sgd_update(be, s->p, g, s->m, s->n, s->lr, p->momentum, p->weight_decay);
    else
        be->adamw_update(be, s->p, g, s->m, s->v, s->n, s->lr, p->beta1, p->beta2, p->eps,
                         p->weight_decay, bias_t);
}

/* Update the n spans: AdamW in one multi-tensor call where the backend
 * has it, else span by span. */
static void update_all(qkd_optimizer *opt, int n, int clipped, float clip)
{
    const qkd_optim_params *p = &opt->p;
    qkd__backend *be = opt->be;
    /* beta^t underflows to 0 long before t leaves int's range */
    int bias_t = opt->step + 1 > INT_MAX ? INT_MAX : (int)(opt->step + 1);
    if (p->kind == QKD_OPTIM_ADAMW && be->adamw_update_multi) {
        be->adamw_update_multi(be, opt->spans, n, clipped ? clip : 1.0f, p->beta1, p->beta2,
                               p->eps, p->weight_decay, bias_t);
        return;
    }
    for (int k = 0; k < n; k++)
        update_span(opt, &opt->spans[k], clipped, clip, bias_t);
}

/* The model can be updated: it keeps gradients, and the tensors the
 * optimizer was made for. */
static qkd_status check_model(const qkd_optimizer *opt, const char *where)
{
    if (!qkd__model_trainable(opt->model))
        return qkd__error(opt->ctx, QKD_ERR_STATE,
                          "%s: the model is not trainable (qkd_model_set_trainable) and keeps "
                          "no gradients",
                          where);
    if (qkd__model_table_gen(opt->model) != opt->table_gen)
        return qkd__error(opt->ctx, QKD_ERR_STATE,
                          "%s: the model's tensors changed since the optimizer was created (a "
                          "quantizer with learn_scales was bound or unbound); create the "
                          "optimizer again",
                          where);
    return QKD_OK;
}

static qkd_status check_info(const qkd_optimizer *opt, const qkd_step_info *info,
                             const char *where)
{
    if (info && info->size < sizeof *info)
        return qkd__error(opt->ctx, QKD_ERR_INVALID_ARG, "%s: info size field %zu, expected %zu",
                          where, info->size, sizeof *info);
    return QKD_OK;
}

/* The last decided step: the device's state where deferred steps are
 * queued (one download), else the host's record of it. */
static qkd_status last_state(const qkd_optimizer *opt, qkd__step_state *st)
{
    if (opt->pending)
        return opt->be->download(opt->be, st, opt->st, sizeof *st);
    *st = (qkd__step_state){.t = opt->step};
    return QKD_OK;
}

/* Bring the host up to date with the deferred steps queued. */
static qkd_status settle(qkd_optimizer *opt)
{
    if (!opt->pending)
        return QKD_OK;
    qkd__step_state st;
    qkd_status s = last_state(opt, &st);
    if (s != QKD_OK)
        return s;
    opt->step = st.t;
    opt->pending = 0;
    opt->last.step = st.t;
    opt->last.grad_norm = (float)st.norm;
    opt->last.clipped = st.clipped;
    opt->last.skipped = st.skipped;
    return QKD_OK;
}

qkd_status qkd__optim_applied(const qkd_optimizer *opt, int64_t *step)
{
    qkd__step_state st;
    qkd_status s = last_state(opt, &st);
    *step = s == QKD_OK ? st.t : opt->step;
    return s;
}

/* The step's report, NON_FINITE when it was skipped. */
static qkd_status report(qkd_optimizer *opt, qkd_step_info *info, const char *where)
{
    if (info) {
        const size_t size = info->size;
        *info = opt->last;
        info->size = size;
    }
    if (opt->last.skipped)
        return qkd__error(opt->ctx, QKD_ERR_NON_FINITE,
                          "%s %lld: gradient norm is %g; step skipped, nothing changed", where,
                          (long long)(opt->last.step + 1), (double)opt->last.grad_norm);
    return QKD_OK;
}

qkd_status qkd_optimizer_step(qkd_optimizer *opt, qkd_step_info *info)
{
    if (!opt)
        return QKD_ERR_INVALID_ARG;
    const char *where = "optimizer step";
    qkd_status st = check_info(opt, info, where);
    if (st == QKD_OK)
        st = check_model(opt, where);
    if (st == QKD_OK)
        st = settle(opt);
    if (st != QKD_OK)
        return st;
    const float lr_t = qkd_optimizer_lr_at(opt, opt->step + 1);
    const int n = fill_spans(opt, lr_t, NULL);
    double sum;
    st = grad_sum_squares(opt, n, &sum);
    if (st != QKD_OK)
        return st;
    /* the decision a deferred step makes on the device, made here */
    qkd__step_state d = {.t = opt->step};
    qkd__step_decide(&d, sum, opt->p.max_grad_norm, opt->p.beta1, opt->p.beta2);
    if (!d.skipped) {
        update_all(opt, n, d.clipped, d.gscale);
        opt->step = d.t;
        opt->st_stale = 1;
    }
    opt->last = (qkd_step_info){.size = sizeof opt->last, .step = opt->step, .lr = lr_t,
                                .grad_norm = (float)d.norm, .clipped = d.clipped,
                                .skipped = d.skipped};
    return report(opt, info, "optimizer step");
}

qkd_status qkd_optimizer_step_deferred(qkd_optimizer *opt)
{
    if (!opt)
        return QKD_ERR_INVALID_ARG;
    qkd__backend *be = opt->be;
    if (opt->p.kind != QKD_OPTIM_ADAMW || !opt->st || !be->adamw_update_multi_dev)
        return qkd_optimizer_step(opt, NULL); /* nothing to decide on the device */
    qkd_status st = check_model(opt, "optimizer step_deferred");
    if (st == QKD_OK && opt->st_stale)
        st = be->upload(be, &opt->st->t, &opt->step, sizeof opt->step);
    if (st != QKD_OK)
        return st;
    opt->st_stale = 0;
    /* the schedule counts the steps queued; the device, those applied */
    const float lr_t = qkd_optimizer_lr_at(opt, opt->step + opt->pending + 1);
    qkd__quant_spec fq = {.group = 0};
    const int n = fill_spans(opt, lr_t, &fq);
    squared_norms(opt, n);
    const qkd_optim_params *p = &opt->p;
    be->step_decide(be, opt->st, opt->norms, n, p->max_grad_norm, p->beta1, p->beta2);
    be->adamw_update_multi_dev(be, opt->spans, n, opt->st, p->beta1, p->beta2, p->eps,
                               p->weight_decay, fq.group ? &fq : NULL);
    opt->pending++;
    opt->last.size = sizeof opt->last; /* a step is known; settle() fills the rest */
    opt->last.lr = lr_t;
    return QKD_OK;
}

qkd_status qkd_optimizer_last_step(qkd_optimizer *opt, qkd_step_info *info)
{
    if (!opt)
        return QKD_ERR_INVALID_ARG;
    const char *where = "optimizer last_step";
    qkd_status st = check_info(opt, info, where);
    if (st == QKD_OK && !opt->last.size)
        st = qkd__error(opt->ctx, QKD_ERR_STATE, "%s: no step yet", where);
    if (st == QKD_OK)
        st = settle(opt);
    return st == QKD_OK ? report(opt, info, where) : st;
}
