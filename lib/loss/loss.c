/* The qkd_loss handle: a weighted sum of objective terms evaluated on the
 * last forwards of a student and a teacher, through the backend's kd_loss,
 * tsld_weights and row_max_prob kernels (or kd_loss_confidence, where a
 * backend has it). Everything of a step stays on the device: targets are
 * uploaded once, each term's row losses (and a teacher-confidence beta)
 * are summed there, and the sums come back in one download, at the
 * compute or, deferred, when the value is asked for. */
#include <math.h>
#include <string.h>

#include "backend/backend.h"
#include "model/model.h"
#include "qkd/loss.h"

#define MAX_TERMS 8
/* sums_dev: one slot per term, the two logit sums of the finiteness check,
 * then the teacher's confidence (beta_from_teacher). */
#define FINITE_SLOT MAX_TERMS
#define BETA_SLOT (MAX_TERMS + 2)
#define SUM_SLOTS (MAX_TERMS + 3)

struct qkd_loss {
    qkd_context *ctx;
    int n_terms;
    qkd_loss_term terms[MAX_TERMS];
    /* The last compute's terms: their row sums stay in sums_dev, each to be
     * divided by its denominator when a value is asked for. */
    int computed;
    int denoms[MAX_TERMS];
    /* Device scratch for `cap` rows, grown only when a larger batch comes. */
    int cap;
    int32_t *targets_dev;
    float *rows_dev; /* [3][cap]: row losses, TSLD's teacher costs, TSLD's weights */
    float *sums_dev; /* [SUM_SLOTS] */
};

/* What one compute works on, validated. */
struct loss_batch {
    qkd_model *student, *teacher;
    const int32_t *targets;
    int B, T, N, V;
    int n_rows; /* counted positions */
    int n_seqs; /* sequences with a counted position (TSLD's average) */
};

static qkd__backend *backend(const qkd_loss *loss)
{
    return loss->ctx->backend;
}

void qkd_loss_term_init(qkd_loss_term *term, qkd_loss_kind kind)
{
    if (!term)
        return;
    memset(term, 0, sizeof *term);
    term->size = sizeof *term;
    term->kind = kind;
    term->weight = 1.0f;
    term->temperature = 1.0f;
    term->beta = 0.5f;
    term->tsld_tau = 10.0f;
}

qkd_status qkd_loss_create(qkd_context *ctx, qkd_loss **out)
{
    if (!ctx)
        return QKD_ERR_INVALID_ARG;
    if (!out)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "loss create: out is NULL");
    *out = NULL;
    qkd_loss *loss = qkd__calloc(ctx, 1, sizeof *loss);
    if (!loss)
        return qkd__error(ctx, QKD_ERR_NO_MEMORY, "loss create: out of memory");
    loss->ctx = ctx;
    qkd__backend *be = backend(loss);
    qkd_status st = be->alloc(be, SUM_SLOTS * sizeof(float), (void **)&loss->sums_dev);
    if (st != QKD_OK) {
        qkd__free(ctx, loss);
        return st;
    }
    *out = loss;
    return QKD_OK;
}

static void free_scratch(qkd_loss *loss)
{
    qkd__backend *be = backend(loss);
    be->free(be, loss->targets_dev);
    be->free(be, loss->rows_dev);
    loss->targets_dev = NULL;
    loss->rows_dev = NULL;
    loss->cap = 0;
}

void qkd_loss_free(qkd_loss *loss)
{
    if (!loss)
        return;
    free_scratch(loss);
    backend(loss)->free(backend(loss), loss->sums_dev);
    qkd__free(loss->ctx, loss);
}

static qkd_status check_beta(qkd_loss *loss, float beta, const char *where)
{
    if (!(beta >= 0.0f && beta <= 1.0f))
        return qkd__error(loss->ctx, QKD_ERR_INVALID_ARG, "%s: beta %g is outside [0, 1]",
                          where, (double)beta);
    return QKD_OK;
}

static qkd_status check_term(qkd_loss *loss, const qkd_loss_term *t)
{
    const char *where = "loss add";
    if (t->size < sizeof *t)
        return qkd__error(loss->ctx, QKD_ERR_INVALID_ARG,
                          "%s: the term's size field is not set (use qkd_loss_term_init)",
                          where);
    if ((int)t->kind < QKD_LOSS_CE || (int)t->kind > QKD_LOSS_MSE)
        return qkd__error(loss->ctx, QKD_ERR_INVALID_ARG, "%s: unknown kind %d", where,
                          (int)t->kind);
    if (!isfinite(t->weight))
        return qkd__error(loss->ctx, QKD_ERR_INVALID_ARG, "%s: weight is not finite", where);
    if (!(t->temperature > 0.0f && isfinite(t->temperature)))
        return qkd__error(loss->ctx, QKD_ERR_INVALID_ARG,
                          "%s: temperature %g must be finite and > 0", where,
                          (double)t->temperature);
    if (!(t->tsld_tau > 0.0f && isfinite(t->tsld_tau)))
        return qkd__error(loss->ctx, QKD_ERR_INVALID_ARG,
                          "%s: tsld_tau %g must be finite and > 0", where,
                          (double)t->tsld_tau);
    if (t->beta_from_teacher != 0 && t->beta_from_teacher != 1)
        return qkd__error(loss->ctx, QKD_ERR_INVALID_ARG, "%s: beta_from_teacher %d is not 0 or 1",
                          where, t->beta_from_teacher);
    if (t->beta_from_teacher && t->kind != QKD_LOSS_CAKLD)
        return qkd__error(loss->ctx, QKD_ERR_INVALID_ARG,
                          "%s: beta_from_teacher applies to CAKLD only", where);
    return check_beta(loss, t->beta, where);
}

qkd_status qkd_loss_add(qkd_loss *loss, const qkd_loss_term *term)
{
    if (!loss)
        return QKD_ERR_INVALID_ARG;
    if (!term)
        return qkd__error(loss->ctx, QKD_ERR_INVALID_ARG, "loss add: term is NULL");
    qkd_status st = check_term(loss, term);
    if (st != QKD_OK)
        return st;
    if (loss->n_terms == MAX_TERMS)
        return qkd__error(loss->ctx, QKD_ERR_RANGE, "loss add: a loss holds at most %d terms",
                          MAX_TERMS);
    loss->terms[loss->n_terms] = *term;
    loss->terms[loss->n_terms].size = sizeof *term;
    loss->n_terms++;
    loss->computed = 0;
    return QKD_OK;
}

static qkd_status check_index(const qkd_loss *loss, int term, const char *where)
{
    if (term < 0 || term >= loss->n_terms)
        return qkd__error(loss->ctx, QKD_ERR_RANGE, "%s: term %d is not in [0, %d)", where,
                          term, loss->n_terms);
    return QKD_OK;
}

qkd_status qkd_loss_set_beta(qkd_loss *loss, int term, float beta)
{
    if (!loss)
        return QKD_ERR_INVALID_ARG;
    qkd_status st = check_index(loss, term, "loss set_beta");
    if (st == QKD_OK)
        st = check_beta(loss, beta, "loss set_beta");
    if (st == QKD_OK)
        loss->terms[term].beta = beta;
    return st;
}

/* The unweighted values of the last compute (one download, waiting for it). */
static qkd_status read_values(const qkd_loss *loss, float *values, const char *where)
{
    if (!loss->computed)
        return qkd__error(loss->ctx, QKD_ERR_STATE, "%s: no compute yet", where);
    qkd__backend *be = backend(loss);
    float sums[MAX_TERMS];
    qkd_status st = be->download(be, sums, loss->sums_dev, (size_t)loss->n_terms * sizeof *sums);
    for (int k = 0; st == QKD_OK && k < loss->n_terms; k++)
        values[k] = loss->denoms[k] > 0 ? (float)((double)sums[k] / loss->denoms[k]) : 0.0f;
    return st;
}

/* The weighted sum of values. */
static double weighted_sum(const qkd_loss *loss, const float *values)
{
    double total = 0.0;
    for (int k = 0; k < loss->n_terms; k++)
        total += (double)loss->terms[k].weight * values[k];
    return total;
}

qkd_status qkd_loss_value(const qkd_loss *loss, float *value)
{
    if (!loss)
        return QKD_ERR_INVALID_ARG;
    if (!value)
        return qkd__error(loss->ctx, QKD_ERR_INVALID_ARG, "loss value: value is NULL");
    *value = 0.0f;
    float values[MAX_TERMS];
    qkd_status st = read_values(loss, values, "loss value");
    if (st != QKD_OK)
        return st;
    const double total = weighted_sum(loss, values);
    if (!isfinite(total))
        return qkd__error(loss->ctx, QKD_ERR_NON_FINITE,
                          "loss value: the last compute's value is not finite (a logit it read "
                          "was NaN or Inf; its gradient holds NaN)");
    *value = (float)total;
    return QKD_OK;
}

qkd_status qkd_loss_term_value(const qkd_loss *loss, int term, float *value)
{
    if (!loss)
        return QKD_ERR_INVALID_ARG;
    if (!value)
        return qkd__error(loss->ctx, QKD_ERR_INVALID_ARG, "loss term_value: value is NULL");
    qkd_status st = check_index(loss, term, "loss term_value");
    float values[MAX_TERMS];
    if (st == QKD_OK)
        st = read_values(loss, values, "loss term_value");
    if (st == QKD_OK)
        *value = values[term];
    return st;
}

/* ---- validation ------------------------------------------------------------ */

static int uses_kind(const qkd_loss *loss, int (*pred)(qkd_loss_kind))
{
    for (int k = 0; k < loss->n_terms; k++)
        if (pred(loss->terms[k].kind))
            return 1;
    return 0;
}

static int needs_teacher(qkd_loss_kind kind)
{
    return kind != QKD_LOSS_CE;
}

static int needs_targets(qkd_loss_kind kind)
{
    return kind == QKD_LOSS_CE || kind == QKD_LOSS_TSLD;
}

/* The shape of a model's last forward; STATE if it has none. */
static qkd_status forward_shape(qkd_context *ctx, qkd_model *m, const char *where,
                                const char *who, int *B, int *T, int *V)
{
    *V = 0;
    qkd__model_last_shape(m, B, T);
    if (*B == 0)
        return qkd__error(ctx, QKD_ERR_STATE, "%s: the %s has no forward pass yet", where, who);
    qkd_model_config cfg;
    qkd_model_config_init(&cfg);
    qkd_status st = qkd_model_get_config(m, &cfg);
    *V = cfg.vocab_size;
    return st;
}

static qkd_status check_models(qkd_loss *loss, struct loss_batch *bt)
{
    qkd_context *ctx = loss->ctx;
    if (qkd__model_context(bt->student) != ctx ||
        (bt->teacher && qkd__model_context(bt->teacher) != ctx))
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "loss compute: student and teacher must live on the loss's context");
    qkd_status st = forward_shape(ctx, bt->student, "loss compute", "student", &bt->B, &bt->T, &bt->V);
    if (st == QKD_OK && !qkd__model_dlogits_dev(bt->student))
        return qkd__error(ctx, QKD_ERR_STATE,
                          "loss compute: the student is not trainable (qkd_model_set_trainable)");
    if (st != QKD_OK || !bt->teacher)
        return st;
    int B, T, V;
    st = forward_shape(ctx, bt->teacher, "loss compute", "teacher", &B, &T, &V);
    if (st != QKD_OK)
        return st;
    if (B != bt->B || T != bt->T)
        return qkd__error(ctx, QKD_ERR_SHAPE,
                          "loss compute: student forward is B=%d T=%d but teacher's is "
                          "B=%d T=%d",
                          bt->B, bt->T, B, T);
    if (V != bt->V)
        return qkd__error(ctx, QKD_ERR_SHAPE,
                          "loss compute: student vocabulary %d differs from teacher's %d",
                          bt->V, V);
    return QKD_OK;
}

/* Count counted rows and sequences; RANGE for a target past the vocabulary. */
static qkd_status count_targets(qkd_context *ctx, struct loss_batch *bt)
{
    bt->n_rows = bt->targets ? 0 : bt->N;
    bt->n_seqs = bt->targets ? 0 : bt->B;
    if (!bt->targets)
        return QKD_OK;
    for (int b = 0; b < bt->B; b++) {
        int counted = 0;
        for (int i = b * bt->T; i < (b + 1) * bt->T; i++) {
            if (bt->targets[i] >= bt->V)
                return qkd__error(ctx, QKD_ERR_RANGE,
                                  "loss: target %d at row %d is outside the vocabulary "
                                  "[0, %d)",
                                  (int)bt->targets[i], i, bt->V);
            counted += bt->targets[i] >= 0;
        }
        bt->n_rows += counted;
        bt->n_seqs += counted > 0;
    }
    return QKD_OK;
}

static qkd_status check_compute(qkd_loss *loss, struct loss_batch *bt)
{
    qkd_context *ctx = loss->ctx;
    if (loss->n_terms == 0)
        return qkd__error(ctx, QKD_ERR_STATE, "loss compute: the loss has no term");
    if (!bt->teacher && uses_kind(loss, needs_teacher))
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "loss compute: teacher is NULL but a term other than CE needs it");
    if (!bt->targets && uses_kind(loss, needs_targets))
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "loss compute: targets are NULL but a CE or TSLD term needs them");
    if (!uses_kind(loss, needs_teacher))
        bt->teacher = NULL;
    qkd_status st = check_models(loss, bt);
    if (st != QKD_OK)
        return st;
    bt->N = bt->B * bt->T;
    return count_targets(ctx, bt);
}

/* ---- device work ---------------------------------------------------------------- */

static qkd_status ensure_scratch(qkd_loss *loss, int N)
{
    if (N <= loss->cap)
        return QKD_OK;
    free_scratch(loss);
    qkd__backend *be = backend(loss);
    qkd_status st = be->alloc(be, (size_t)N * sizeof(int32_t), (void **)&loss->targets_dev);
    if (st == QKD_OK)
        st = be->alloc(be, 3 * (size_t)N * sizeof(float), (void **)&loss->rows_dev);
    if (st != QKD_OK) {
        free_scratch(loss);
        return st;
    }
    loss->cap = N;
    return QKD_OK;
}

/* NON_FINITE unless every logit the terms read is finite: the sum of the
 * logits is NaN or Inf exactly when one is (a float sum of finite logits
 * only overflows beyond 1e38, far outside any useful softmax range). */
static qkd_status check_finite(qkd_loss *loss, const struct loss_batch *bt, const float *s,
                               const float *t)
{
    qkd__backend *be = backend(loss);
    float *slots = loss->sums_dev + FINITE_SLOT;
    size_t n = (size_t)bt->N * (size_t)bt->V;
    be->sum(be, slots, s, n);
    if (t)
        be->sum(be, slots + 1, t, n);
    else
        be->fill(be, slots + 1, 0.0f, 1);
    float sums[2];
    qkd_status st = be->download(be, sums, slots, sizeof sums);
    if (st != QKD_OK)
        return st;
    if (!isfinite(sums[0]) || !isfinite(sums[1]))
        return qkd__error(loss->ctx, QKD_ERR_NON_FINITE,
                          "loss compute: the %s's logits hold a NaN or Inf",
                          isfinite(sums[0]) ? "teacher" : "student");
    return QKD_OK;
}

/* What term k's row sum is divided by: TSLD averages over sequences,
 * every other term over counted positions. */
static int term_denom(const qkd_loss_term *term, const struct loss_batch *bt)
{
    return term->kind == QKD_LOSS_TSLD ? bt->n_seqs : bt->n_rows;
}

/* The mean top-1 probability of the teacher's logits t over the counted
 * rows, into *conf on the device; rows: N floats of scratch. */
static void confidence_dev(qkd__backend *be, float *conf, float *rows, const float *t,
                           const int32_t *targets, int N, int V, int n_rows)
{
    be->row_max_prob(be, rows, t, targets, N, V);
    be->sum(be, conf, rows, (size_t)N);
    be->scale(be, conf, n_rows > 0 ? 1.0f / (float)n_rows : 0.0f, 1);
}

/* Term k's gradient into ds (written by the first term, added by the
 * others; or written as bf16 bits into ds_bits by a single term) and its
 * row-loss sum into sums_dev[k]. */
static void run_term(qkd_loss *loss, int k, const struct loss_batch *bt, float *ds,
                     uint16_t *ds_bits, const float *s, const float *t)
{
    qkd__backend *be = backend(loss);
    const qkd_loss_term *term = &loss->terms[k];
    const int32_t *y = bt->targets ? loss->targets_dev : NULL;
    float *rows = loss->rows_dev, *cost = rows + loss->cap, *w = cost + loss->cap;
    int denom = term_denom(term, bt);
    qkd__kd_term kt = {.kind = (int)term->kind, .temperature = term->temperature,
                       .beta = term->beta,
                       .scale = denom > 0 ? (float)((double)term->weight / denom) : 0.0f,
                       .accumulate = k > 0};
    const float *row_w = NULL;
    if (term->kind == QKD_LOSS_TSLD) {
        /* c_i: the teacher's own cross-entropy, detached */
        qkd__kd_term ce = {.kind = QKD_LOSS_CE, .temperature = 1.0f};
        be->kd_loss(be, cost, NULL, NULL, t, NULL, y, NULL, bt->N, bt->V, &ce);
        be->tsld_weights(be, w, cost, y, bt->B, bt->T, term->tsld_tau);
        row_w = w;
    }
    float *beta = loss->sums_dev + BETA_SLOT;
    if (term->beta_from_teacher && term->temperature == 1.0f && be->kd_loss_confidence) {
        /* the backend takes the confidence in the objective's own sweep */
        be->kd_loss_confidence(be, rows, ds_bits ? NULL : ds, ds_bits, s, t, y, row_w, bt->N,
                               bt->V, &kt, beta, bt->n_rows);
    } else {
        if (term->beta_from_teacher) {
            kt.beta_dev = beta;
            confidence_dev(be, beta, cost, t, y, bt->N, bt->V, bt->n_rows);
        }
        be->kd_loss(be, rows, ds_bits ? NULL : ds, ds_bits, s, t, y, row_w, bt->N, bt->V, &kt);
    }
    be->sum(be, loss->sums_dev + k, rows, (size_t)bt->N);
}

/* Evaluate every term, storing the gradient; *value: the weighted sum, or
 * with value NULL the sums stay on the device (deferred: no finiteness
 * check before, no download after). */
static qkd_status run_terms(qkd_loss *loss, const struct loss_batch *bt, float *value)
{
    int n_rows;
    const float *s = qkd__model_logits_dev(bt->student, &n_rows);
    const float *t = bt->teacher ? qkd__model_logits_dev(bt->teacher, &n_rows) : NULL;
    qkd_status st = value ? check_finite(loss, bt, s, t) : QKD_OK;
    if (st != QKD_OK)
        return st;
    float *ds = qkd__model_dlogits_dev(bt->student);
    /* bits where the student's backward reads them and no term adds to them */
    uint16_t *ds_bits = loss->n_terms == 1 ? qkd__model_dlogits_bits_dev(bt->student) : NULL;
    for (int k = 0; k < loss->n_terms; k++) {
        run_term(loss, k, bt, ds, ds_bits, s, t);
        loss->denoms[k] = term_denom(&loss->terms[k], bt);
    }
    qkd__model_mark_dlogits(bt->student, ds_bits != NULL);
    loss->computed = 1;
    if (!value)
        return QKD_OK;
    float values[MAX_TERMS];
    st = read_values(loss, values, "loss compute");
    if (st == QKD_OK)
        *value = (float)weighted_sum(loss, values);
    return st;
}

qkd_status qkd_loss_compute(qkd_loss *loss, qkd_model *student, qkd_model *teacher,
                            const int32_t *targets, float *value)
{
    if (!loss)
        return QKD_ERR_INVALID_ARG;
    if (!student)
        return qkd__error(loss->ctx, QKD_ERR_INVALID_ARG, "loss compute: student is NULL");
    if (value)
        *value = 0.0f;
    struct loss_batch bt = {.student = student, .teacher = teacher, .targets = targets};
    qkd_status st = check_compute(loss, &bt);
    if (st == QKD_OK)
        st = ensure_scratch(loss, bt.N);
    if (st == QKD_OK && targets)
        st = backend(loss)->upload(backend(loss), loss->targets_dev, targets,
                                   (size_t)bt.N * sizeof *targets);
    if (st == QKD_OK)
        st = run_terms(loss, &bt, value);
    return st;
}

/* ---- CAKLD's confidence ----------------------------------------------------------- */

/* Rows of targets that count (all N without targets). */
static int counted_rows(const int32_t *targets, int N)
{
    int n = 0;
    for (int i = 0; i < N; i++)
        n += !targets || targets[i] >= 0;
    return n;
}

qkd_status qkd_loss_teacher_confidence(qkd_model *teacher, const int32_t *targets,
                                       float *confidence)
{
    if (!teacher)
        return QKD_ERR_INVALID_ARG;
    qkd_context *ctx = qkd__model_context(teacher);
    if (!confidence)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "loss teacher_confidence: NULL argument");
    *confidence = 0.0f;
    int B, T, V;
    qkd_status st = forward_shape(ctx, teacher, "loss teacher_confidence", "teacher", &B, &T, &V);
    if (st != QKD_OK)
        return st;
    const int N = B * T;
    qkd__backend *be = ctx->backend;
    int n_rows;
    const float *logits = qkd__model_logits_dev(teacher, &n_rows);
    /* one device buffer: the mean, N rows' top-1 probabilities, the targets */
    const size_t y_bytes = targets ? (size_t)N * sizeof *targets : 0;
    float *dev = NULL;
    st = be->alloc(be, (1 + (size_t)N) * sizeof(float) + y_bytes, (void **)&dev);
    int32_t *y = targets ? (int32_t *)(dev + 1 + N) : NULL;
    if (st == QKD_OK && y)
        st = be->upload(be, y, targets, y_bytes);
    float mean = 0.0f;
    if (st == QKD_OK) {
        confidence_dev(be, dev, dev + 1, logits, y, N, V, counted_rows(targets, N));
        st = be->download(be, &mean, dev, sizeof mean);
    }
    if (st == QKD_OK && !isfinite(mean))
        st = qkd__error(ctx, QKD_ERR_NON_FINITE,
                        "loss teacher_confidence: the teacher's logits hold a NaN or Inf");
    if (st == QKD_OK)
        *confidence = mean;
    be->free(be, dev);
    return st;
}
