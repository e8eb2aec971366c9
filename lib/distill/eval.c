/* Evaluation on held-out windows: cross-entropy and KL to the teacher. */
#include <qkd/qkd.h>

/* Batches of held-out windows. Every batch has the same shape (the last
 * one is padded with copies of its first window, whose targets are -1 and
 * so not counted), so a model's activations are allocated once. */
typedef struct eval_batches {
    qkd_context *ctx;
    const qkd_dataset *data;
    int B, T;
    int64_t n_windows, next;
    int32_t *tokens, *targets;
    int64_t counted; /* positions with a target in the current batch */
} eval_batches;

static qkd_status batches_open(eval_batches *e, qkd_context *ctx, const qkd_dataset *data,
                               int B, int T)
{
    *e = (eval_batches){.ctx = ctx, .data = data, .T = T};
    if (!ctx || !data || B < 1 || T < 1)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG,
                                     "eval: NULL argument, or B %d / T %d below 1", B, T);
    e->n_windows = qkd_dataset_n_windows(data, T, QKD_SPLIT_EVAL);
    if (e->n_windows < 1)
        return qkd_context_set_error(ctx, QKD_ERR_STATE,
                                     "eval: the data has no held-out window of %d tokens", T + 1);
    e->B = e->n_windows < B ? (int)e->n_windows : B;
    size_t n = (size_t)e->B * (size_t)T;
    e->tokens = qkd_context_alloc(ctx, n * sizeof *e->tokens);
    e->targets = qkd_context_alloc(ctx, n * sizeof *e->targets);
    if (!e->tokens || !e->targets)
        return qkd_context_set_error(ctx, QKD_ERR_NO_MEMORY, "eval: out of memory");
    return QKD_OK;
}

static void batches_close(eval_batches *e)
{
    qkd_context_dealloc(e->ctx, e->tokens);
    qkd_context_dealloc(e->ctx, e->targets);
}

/* Fill the next batch; *done when the windows are used up. */
static qkd_status batches_next(eval_batches *e, int *done)
{
    *done = e->next >= e->n_windows;
    if (*done)
        return QKD_OK;
    const int T = e->T;
    e->counted = 0;
    for (int b = 0; b < e->B; b++) {
        int32_t *tok = e->tokens + (size_t)b * T, *tgt = e->targets + (size_t)b * T;
        if (e->next >= e->n_windows) {
            for (int t = 0; t < T; t++) {
                tok[t] = e->tokens[t];
                tgt[t] = -1;
            }
            continue;
        }
        qkd_status st = qkd_dataset_window(e->data, QKD_SPLIT_EVAL, e->next++, T, tok, tgt);
        if (st != QKD_OK)
            return st;
        e->counted += T;
    }
    return QKD_OK;
}

/* Scores one batch: the mean of some per-position value over the batch's
 * counted positions. */
typedef qkd_status (*score_fn)(void *arg, const eval_batches *e, float *value);

/* The token-weighted mean of score over every held-out batch. */
static qkd_status mean_score(eval_batches *e, score_fn score, void *arg, double *mean,
                             int64_t *n_tokens)
{
    double sum = 0.0;
    int64_t count = 0;
    for (;;) {
        int done;
        float value = 0.0f;
        qkd_status st = batches_next(e, &done);
        if (st == QKD_OK && !done)
            st = score(arg, e, &value);
        if (st != QKD_OK)
            return st;
        if (done)
            break;
        sum += (double)value * (double)e->counted;
        count += e->counted;
    }
    *mean = sum / (double)count;
    if (n_tokens)
        *n_tokens = count;
    return QKD_OK;
}

static qkd_status score_ce(void *arg, const eval_batches *e, float *value)
{
    qkd_model *model = arg;
    qkd_status st = qkd_model_forward(model, e->tokens, e->B, e->T);
    return st == QKD_OK ? qkd_model_cross_entropy(model, e->targets, 0, value) : st;
}

qkd_status qkd_distill_eval_ce(qkd_context *ctx, qkd_model *model, const qkd_dataset *data,
                               int B, int T, double *mean_ce, int64_t *n_tokens)
{
    if (!model || !mean_ce)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG, "eval: NULL model or result");
    eval_batches e;
    qkd_status st = batches_open(&e, ctx, data, B, T);
    if (st == QKD_OK)
        st = mean_score(&e, score_ce, model, mean_ce, n_tokens);
    batches_close(&e);
    return st;
}

typedef struct kl_arg {
    qkd_model *student, *teacher;
    qkd_loss *loss; /* one forward-KL term at temperature 1 */
} kl_arg;

static qkd_status score_kl(void *arg, const eval_batches *e, float *value)
{
    kl_arg *a = arg;
    qkd_status st = qkd_model_forward(a->teacher, e->tokens, e->B, e->T);
    if (st == QKD_OK)
        st = qkd_model_forward(a->student, e->tokens, e->B, e->T);
    return st == QKD_OK ? qkd_loss_compute(a->loss, a->student, a->teacher, e->targets, value)
                        : st;
}

qkd_status qkd_distill_eval_kl(qkd_context *ctx, qkd_model *student, qkd_model *teacher,
                               const qkd_dataset *data, int B, int T, double *kl)
{
    if (!student || !teacher || !kl)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG, "eval: NULL model or result");
    kl_arg a = {.student = student, .teacher = teacher};
    qkd_loss_term term;
    qkd_loss_term_init(&term, QKD_LOSS_FKL);
    eval_batches e;
    qkd_status st = batches_open(&e, ctx, data, B, T);
    if (st == QKD_OK)
        st = qkd_loss_create(ctx, &a.loss);
    if (st == QKD_OK)
        st = qkd_loss_add(a.loss, &term);
    if (st == QKD_OK)
        st = mean_score(&e, score_kl, &a, kl, NULL);
    qkd_loss_free(a.loss);
    batches_close(&e);
    return st;
}
