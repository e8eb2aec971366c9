/* The host distillation loop over public handles. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <qkd/qkd.h>

#include "data/fileio.h"
#include "distill/distill_impl.h"

void qkd_distill_params_init(qkd_distill_params *p)
{
    if (!p)
        return;
    *p = (qkd_distill_params){.size = sizeof *p, .batch = 8, .seq = 64, .total_steps = 100};
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
    qkd_distill *d = calloc(1, sizeof *d);
    size_t n = (size_t)p->batch * (size_t)p->seq;
    if (d) {
        d->tokens = malloc(n * sizeof *d->tokens);
        d->targets = malloc(n * sizeof *d->targets);
    }
    if (!d || !d->tokens || !d->targets) {
        qkd_distill_free(d);
        return qkd_context_set_error(ctx, QKD_ERR_NO_MEMORY, "distill: out of memory");
    }
    d->ctx = ctx;
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
    free(d->history);
    free(d->tokens);
    free(d->targets);
    free(d);
}

qkd_status qkd__distill_reserve(qkd_distill *d, int64_t n)
{
    if (n <= d->history_cap)
        return QKD_OK;
    int64_t cap = d->history_cap > 0 ? d->history_cap : 64;
    while (cap < n)
        cap *= 2;
    float *h = realloc(d->history, (size_t)cap * sizeof *h);
    if (!h)
        return qkd_context_set_error(d->ctx, QKD_ERR_NO_MEMORY,
                                     "distill: out of memory for a history of %lld steps",
                                     (long long)cap);
    d->history = h;
    d->history_cap = cap;
    return QKD_OK;
}

/* Forward both models on the step's batch and compute the loss (its
 * gradient lands on the student). */
static qkd_status forward_loss(qkd_distill *d, float *value)
{
    const int B = d->p.batch, T = d->p.seq;
    qkd_status st = qkd_dataset_batch(d->data, d->step, B, T, d->tokens, d->targets);
    if (st == QKD_OK && d->teacher)
        st = qkd_model_forward(d->teacher, d->tokens, B, T);
    if (st == QKD_OK)
        st = qkd_model_forward(d->student, d->tokens, B, T);
    if (st == QKD_OK)
        st = qkd_loss_compute(d->loss, d->student, d->teacher, d->targets, value);
    return st;
}

static qkd_status one_step(qkd_distill *d, qkd_distill_stats *stats)
{
    double t0 = now_seconds();
    float value = 0.0f;
    qkd_step_info info = {.size = sizeof info};
    qkd_status st = qkd__distill_reserve(d, d->step + 1);
    if (st == QKD_OK)
        st = forward_loss(d, &value);
    if (st == QKD_OK)
        st = qkd_model_zero_grad(d->student);
    if (st == QKD_OK)
        st = qkd_model_backward(d->student, NULL);
    if (st == QKD_OK)
        st = qkd_optimizer_step(d->opt, &info);
    /* A skipped step (non-finite gradients) is part of the run, not an
     * error: the weights did not move and the next batch comes next. */
    if (st == QKD_ERR_NON_FINITE && info.skipped)
        st = QKD_OK;
    if (st != QKD_OK)
        return st;
    d->history[d->step++] = value;
    double dt = now_seconds() - t0;
    *stats = (qkd_distill_stats){
        .size = sizeof *stats,
        .step = d->step,
        .total_steps = d->p.total_steps,
        .loss = value,
        .lr = info.lr,
        .grad_norm = info.grad_norm,
        .clipped = info.clipped,
        .skipped = info.skipped,
        .step_seconds = dt,
        .tokens_per_s = dt > 0.0 ? (double)d->p.batch * d->p.seq / dt : 0.0,
    };
    return QKD_OK;
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
