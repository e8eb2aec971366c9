/* The host distillation loop over public handles. */
#include <math.h>
#include <string.h>
#include <time.h>

#include <qkd/qkd.h>

#include "data/fileio.h"
#include "distill/distill_impl.h"

void qkd_distill_params_init(qkd_distill_params *p)
{
    if (!p)
        return;
    *p = (qkd_distill_params){
        .size = sizeof *p, .batch = 8, .seq = 64, .total_steps = 100, .max_bad_steps = 8};
}

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* A model's config into *cfg. */
static qkd_status config_of(const qkd_model *m, qkd_model_config *cfg)
{
    qkd_model_config_init(cfg);
    return qkd_model_get_config(m, cfg);
}

static qkd_status check_model(qkd_context *ctx, const qkd_model *m, const char *role, int T,
                              qkd_model_config *cfg)
{
    qkd_status st = config_of(m, cfg);
    if (st != QKD_OK)
        return st;
    if (T > cfg->max_seq_len)
        return qkd_context_set_error(ctx, QKD_ERR_RANGE,
                                     "distill: seq %d exceeds the %s's max_seq_len %d", T, role,
                                     cfg->max_seq_len);
    return QKD_OK;
}

static qkd_status check_setup(qkd_context *ctx, const qkd_model *teacher,
                              const qkd_model *student, const qkd_dataset *data,
                              const qkd_distill_params *p)
{
    if (!p || p->size < sizeof *p)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG,
                                     "distill: params missing or size not set "
                                     "(use qkd_distill_params_init)");
    if (p->batch < 1 || p->seq < 1 || p->total_steps < 1)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG,
                                     "distill: batch %d, seq %d and total_steps %lld must be >= 1",
                                     p->batch, p->seq, (long long)p->total_steps);
    if (p->max_bad_steps < 0)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG,
                                     "distill: max_bad_steps %d must be >= 0", p->max_bad_steps);
    qkd_model_config sc, tc;
    qkd_status st = check_model(ctx, student, "student", p->seq, &sc);
    if (st == QKD_OK && teacher)
        st = check_model(ctx, teacher, "teacher", p->seq, &tc);
    if (st != QKD_OK)
        return st;
    if (teacher && tc.vocab_size != sc.vocab_size)
        return qkd_context_set_error(ctx, QKD_ERR_SHAPE,
                                     "distill: teacher vocabulary %d, student %d", tc.vocab_size,
                                     sc.vocab_size);
    if (qkd_dataset_vocab_size(data) > sc.vocab_size)
        return qkd_context_set_error(ctx, QKD_ERR_SHAPE,
                                     "distill: data ids range over %d tokens, the student has %d",
                                     qkd_dataset_vocab_size(data), sc.vocab_size);
    if (qkd_dataset_n_windows(data, p->seq, QKD_SPLIT_TRAIN) < 1)
        return qkd_context_set_error(ctx, QKD_ERR_STATE,
                                     "distill: the data has no training window of %d tokens",
                                     p->seq + 1);
    return QKD_OK;
}

qkd_status qkd_distill_create(qkd_context *ctx, qkd_model *teacher, qkd_model *student,
                              qkd_loss *loss, qkd_optimizer *opt, const qkd_dataset *data,
                              const qkd_distill_params *p, qkd_distill **out)
{
    if (out)
        *out = NULL;
    if (!ctx || !student || !loss || !opt || !data || !out)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG, "distill: NULL argument");
    qkd_status st = check_setup(ctx, teacher, student, data, p);
    if (st != QKD_OK)
        return st;
    qkd_distill *d = qkd_context_alloc(ctx, sizeof *d);
    if (!d)
        return qkd_context_set_error(ctx, QKD_ERR_NO_MEMORY, "distill: out of memory");
    memset(d, 0, sizeof *d);
    d->ctx = ctx;
    size_t n = (size_t)p->batch * (size_t)p->seq;
    d->tokens = qkd_context_alloc(ctx, n * sizeof *d->tokens);
    d->targets = qkd_context_alloc(ctx, n * sizeof *d->targets);
    if (!d->tokens || !d->targets) {
        qkd_distill_free(d);
        return qkd_context_set_error(ctx, QKD_ERR_NO_MEMORY, "distill: out of memory");
    }
    d->teacher = teacher;
    d->student = student;
    d->loss = loss;
    d->opt = opt;
    d->data = data;
    d->p = *p;
    d->data_hash = qkd__fnv1a(QKD__FNV_OFFSET, qkd_dataset_tokens(data),
                              qkd_dataset_n_tokens(data) * sizeof(int32_t));
    *out = d;
    return QKD_OK;
}

void qkd_distill_free(qkd_distill *d)
{
    if (!d)
        return;
    qkd_context_dealloc(d->ctx, d->history);
    qkd_context_dealloc(d->ctx, d->tokens);
    qkd_context_dealloc(d->ctx, d->targets);
    qkd_context_dealloc(d->ctx, d);
}

qkd_status qkd__distill_reserve(qkd_distill *d, int64_t n)
{
    if (n <= d->history_cap)
        return QKD_OK;
    int64_t cap = d->history_cap > 0 ? d->history_cap : 64;
    while (cap < n)
        cap *= 2;
    float *h = qkd_context_alloc(d->ctx, (size_t)cap * sizeof *h);
    if (!h)
        return qkd_context_set_error(d->ctx, QKD_ERR_NO_MEMORY,
                                     "distill: out of memory for a history of %lld steps",
                                     (long long)cap);
    if (d->step > 0)
        memcpy(h, d->history, (size_t)d->step * sizeof *h);
    qkd_context_dealloc(d->ctx, d->history);
    d->history = h;
    d->history_cap = cap;
    return QKD_OK;
}

/* Forward both models on the step's batch and compute the loss (its
 * gradient lands on the student). *finite is 0 when the loss is NaN or
 * Inf, or the logits it reads are (NON_FINITE from the loss): a bad step,
 * not an error. */
static qkd_status forward_loss(qkd_distill *d, float *value, int *finite)
{
    const int B = d->p.batch, T = d->p.seq;
    qkd_status st = qkd_dataset_batch(d->data, d->step, B, T, d->tokens, d->targets);
    if (st == QKD_OK && d->teacher)
        st = qkd_model_forward(d->teacher, d->tokens, B, T);
    if (st == QKD_OK)
        st = qkd_model_forward(d->student, d->tokens, B, T);
    if (st != QKD_OK)
        return st;
    st = qkd_loss_compute(d->loss, d->student, d->teacher, d->targets, value);
    if (st == QKD_ERR_NON_FINITE)
        *value = NAN;
    *finite = (st == QKD_OK || st == QKD_ERR_NON_FINITE) && isfinite(*value);
    return st == QKD_ERR_NON_FINITE ? QKD_OK : st;
}

/* Backward and update. A non-finite gradient norm makes the optimizer skip
 * the update (nothing changes): a bad step, not an error. */
static qkd_status backward_update(qkd_distill *d, qkd_step_info *info, int *finite)
{
    qkd_status st = qkd_model_zero_grad(d->student);
    if (st == QKD_OK)
        st = qkd_model_backward(d->student, NULL);
    if (st == QKD_OK)
        st = qkd_optimizer_step(d->opt, info);
    *finite = !(st == QKD_ERR_NON_FINITE && info->skipped);
    return *finite ? st : QKD_OK;
}

/* One step. A step whose loss or gradients are not finite is skipped
 * before anything is applied (the weights and the optimizer do not move),
 * and still consumes its batch: the next step reads the next batch. */
static qkd_status one_step(qkd_distill *d, qkd_distill_stats *stats)
{
    double t0 = now_seconds();
    float value = 0.0f;
    int finite = 0;
    qkd_step_info info = {.size = sizeof info, .grad_norm = NAN};
    qkd_status st = qkd__distill_reserve(d, d->step + 1);
    if (st == QKD_OK)
        st = forward_loss(d, &value, &finite);
    if (st == QKD_OK && finite)
        st = backward_update(d, &info, &finite);
    if (st != QKD_OK)
        return st;
    d->history[d->step++] = value;
    d->n_skipped += !finite;
    d->bad_streak = finite ? 0 : d->bad_streak + 1;
    double dt = now_seconds() - t0;
    *stats = (qkd_distill_stats){
        .size = sizeof *stats,
        .step = d->step,
        .total_steps = d->p.total_steps,
        .loss = value,
        .lr = finite ? info.lr : 0.0f,
        .grad_norm = info.grad_norm,
        .clipped = info.clipped,
        .skipped = !finite,
        .step_seconds = dt,
        .tokens_per_s = dt > 0.0 ? (double)d->p.batch * d->p.seq / dt : 0.0,
        .n_skipped = d->n_skipped,
        .bad_streak = d->bad_streak,
    };
    return QKD_OK;
}

/* NON_FINITE once max_bad_steps steps in a row were skipped. */
static qkd_status check_streak(qkd_distill *d)
{
    const int64_t k = d->p.max_bad_steps;
    if (k == 0 || d->bad_streak < k)
        return QKD_OK;
    return qkd_context_set_error(d->ctx, QKD_ERR_NON_FINITE,
                                 "distill: %lld steps in a row (%lld..%lld) had a non-finite "
                                 "loss or gradient (max_bad_steps %lld); the weights are still "
                                 "those of step %lld",
                                 (long long)d->bad_streak,
                                 (long long)(d->step - d->bad_streak + 1), (long long)d->step,
                                 (long long)k, (long long)(d->step - d->bad_streak));
}

qkd_status qkd_distill_run(qkd_distill *d, int64_t n_steps)
{
    if (!d)
        return QKD_ERR_INVALID_ARG;
    int64_t left = d->p.total_steps - d->step;
    int64_t todo = n_steps <= 0 || n_steps > left ? left : n_steps;
    for (int64_t i = 0; i < todo; i++) {
        qkd_distill_stats stats;
        qkd_status st = one_step(d, &stats);
        if (st != QKD_OK)
            return st;
        if (d->p.on_step && d->p.on_step(d->p.user, &stats))
            return qkd_context_set_error(d->ctx, QKD_ERR_CANCELLED,
                                         "distill: stopped by the callback after step %lld",
                                         (long long)d->step);
        if ((st = check_streak(d)) != QKD_OK)
            return st;
    }
    return QKD_OK;
}

int64_t qkd_distill_step(const qkd_distill *d)
{
    return d ? d->step : 0;
}

int64_t qkd_distill_history(const qkd_distill *d, const float **losses)
{
    if (losses)
        *losses = d ? d->history : NULL;
    return d ? d->step : 0;
}
