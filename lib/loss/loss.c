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
    float *rows_dev; /* [ROW_ARRAYS][cap], see rows_of */
    float *sums_dev; /* [SUM_SLOTS] */
    /* the logits of a block of rows, for models that compute them when
     * read (qkd_model_set_logits_rows): grown on demand */
    float *block_dev;
    size_t block_floats;
};

/* rows_dev's arrays of cap floats: each term's row losses, then each
 * TSLD term's token weights, the teacher's costs (TSLD) and top-1
 * probabilities (beta_from_teacher), then two logit sums a block (the
 * finiteness check of blocks). */
enum { ROW_LOSS = 0, ROW_WEIGHT = MAX_TERMS, ROW_COST = 2 * MAX_TERMS, ROW_TOP1, ROW_SUMS,
       ROW_ARRAYS = ROW_SUMS + 2 };

static float *rows_of(const qkd_loss *loss, int array)
{
    return loss->rows_dev + (size_t)array * (size_t)loss->cap;
}

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
    be->free(be, loss->block_dev);
    loss->targets_dev = NULL;
    loss->rows_dev = NULL;
    loss->block_dev = NULL;
    loss->cap = 0;
    loss->block_floats = 0;
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
    if (st == QKD_OK && !qkd__model_trainable(bt->student))
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
        st = be->alloc(be, ROW_ARRAYS * (size_t)N * sizeof(float), (void **)&loss->rows_dev);
    if (st != QKD_OK) {
        free_scratch(loss);
        return st;
    }
    loss->cap = N;
    return QKD_OK;
}

/* How one compute reaches the logits: whole (the forwards stored them),
 * or in blocks of R rows, a model's block computed into its own buffer. */
struct logit_blocks {
    int R, n_blocks;
    const float *s, *t;  /* logits stored whole; NULL: computed by block */
    float *s_buf, *t_buf;
};

/* How many rows the block from row0 has. */
static int block_rows(const struct loss_batch *bt, const struct logit_blocks *lb, int row0)
{
    return bt->N - row0 < lb->R ? bt->N - row0 : lb->R;
}

/* Rows [row0, row0 + n) of a model's logits. */
static const float *block_of(qkd_model *m, const float *whole, float *buf, int row0, int n,
                             int V)
{
    if (whole)
        return whole + (size_t)row0 * V;
    qkd__model_logits_rows(m, buf, row0, n);
    return buf;
}

/* lb for the batch: the smallest block a model asks for, or the whole
 * batch; the block buffers grown on demand. */
static qkd_status plan_blocks(qkd_loss *loss, const struct loss_batch *bt,
                              struct logit_blocks *lb)
{
    *lb = (struct logit_blocks){.R = bt->N};
    const int rs = qkd__model_logits_chunk(bt->student);
    const int rt = bt->teacher ? qkd__model_logits_chunk(bt->teacher) : 0;
    qkd_status st = QKD_OK;
    if (!rs)
        st = qkd__model_logits_all(bt->student, &lb->s);
    if (st == QKD_OK && bt->teacher && !rt)
        st = qkd__model_logits_all(bt->teacher, &lb->t);
    if (st != QKD_OK)
        return st;
    if (rs && rs < lb->R)
        lb->R = rs;
    if (rt && rt < lb->R)
        lb->R = rt;
    lb->n_blocks = (bt->N + lb->R - 1) / lb->R;
    const size_t block = (size_t)lb->R * (size_t)bt->V;
    const size_t want = block * ((rs != 0) + (rt != 0));
    if (want > loss->block_floats) {
        qkd__backend *be = backend(loss);
        be->free(be, loss->block_dev);
        loss->block_dev = NULL;
        loss->block_floats = 0;
        st = be->alloc(be, want * sizeof(float), (void **)&loss->block_dev);
        if (st != QKD_OK)
            return st;
        loss->block_floats = want;
    }
    lb->s_buf = rs ? loss->block_dev : NULL;
    lb->t_buf = rt ? loss->block_dev + (rs ? block : 0) : NULL;
    return QKD_OK;
}

/* NON_FINITE unless both logit sums at sums_dev[FINITE_SLOT] are finite:
 * the sum of the logits is NaN or Inf exactly when one is (a float sum of
 * finite logits only overflows beyond 1e38, far outside any useful
 * softmax range). */
static qkd_status check_sums(qkd_loss *loss)
{
    qkd__backend *be = backend(loss);
    float sums[2];
    qkd_status st = be->download(be, sums, loss->sums_dev + FINITE_SLOT, sizeof sums);
    if (st != QKD_OK)
        return st;
    if (!isfinite(sums[0]) || !isfinite(sums[1]))
        return qkd__error(loss->ctx, QKD_ERR_NON_FINITE,
                          "loss compute: the %s's logits hold a NaN or Inf",
                          isfinite(sums[0]) ? "teacher" : "student");
    return QKD_OK;
}

/* The sums of n logits of the student (s) and the teacher (t, or none)
 * into out[0] and out[stride]. */
static void logit_sums(qkd__backend *be, float *out, size_t stride, const float *s,
                       const float *t, size_t n)
{
    be->sum(be, out, s, n);
    if (t)
        be->sum(be, out + stride, t, n);
    else
        be->fill(be, out + stride, 0.0f, 1);
}

/* What term k's row sum is divided by: TSLD averages over sequences,
 * every other term over counted positions. */
static int term_denom(const qkd_loss_term *term, const struct loss_batch *bt)
{
    return term->kind == QKD_LOSS_TSLD ? bt->n_seqs : bt->n_rows;
}

/* Whether term k's CAKLD confidence comes from the backend's fused slot,
 * which reads the teacher's logits of the whole batch at once. */
static int fused_confidence(const qkd_loss *loss, int k, const struct logit_blocks *lb)
{
    const qkd_loss_term *term = &loss->terms[k];
    return term->beta_from_teacher && term->temperature == 1.0f &&
           backend(loss)->kd_loss_confidence && lb->n_blocks == 1;
}

/* *mean = the mean of x[0..N) over n_rows counted rows (0 if none), on
 * the device: the teacher's confidence from row_max_prob's rows. */
static void mean_of(qkd__backend *be, float *mean, const float *x, int N, int n_rows)
{
    be->sum(be, mean, x, (size_t)N);
    be->scale(be, mean, n_rows > 0 ? 1.0f / (float)n_rows : 0.0f, 1);
}

/* The figures of the whole batch that terms need before their gradients:
 * TSLD's token weights (from the teacher's own cross-entropy, detached)
 * and the teacher's mean top-1 probability (beta_from_teacher), from the
 * teacher's logits block by block. */
static void batch_figures(qkd_loss *loss, const struct loss_batch *bt,
                          const struct logit_blocks *lb)
{
    int tsld = 0, conf = 0;
    for (int k = 0; k < loss->n_terms; k++) {
        tsld |= loss->terms[k].kind == QKD_LOSS_TSLD;
        conf |= loss->terms[k].beta_from_teacher && !fused_confidence(loss, k, lb);
    }
    if (!tsld && !conf)
        return;
    qkd__backend *be = backend(loss);
    const int32_t *y = bt->targets ? loss->targets_dev : NULL;
    float *cost = rows_of(loss, ROW_COST), *top1 = rows_of(loss, ROW_TOP1);
    const qkd__kd_term ce = {.kind = QKD_LOSS_CE, .temperature = 1.0f};
    for (int r0 = 0; r0 < bt->N; r0 += lb->R) {
        const int n = block_rows(bt, lb, r0);
        const float *t = block_of(bt->teacher, lb->t, lb->t_buf, r0, n, bt->V);
        if (tsld)
            be->kd_loss(be, cost + r0, NULL, NULL, t, NULL, y ? y + r0 : NULL, NULL, n, bt->V,
                        &ce);
        if (conf)
            be->row_max_prob(be, top1 + r0, t, y ? y + r0 : NULL, n, bt->V);
    }
    for (int k = 0; k < loss->n_terms; k++)
        if (loss->terms[k].kind == QKD_LOSS_TSLD)
            be->tsld_weights(be, rows_of(loss, ROW_WEIGHT + k), cost, y, bt->B, bt->T,
                             loss->terms[k].tsld_tau);
    if (conf)
        mean_of(be, loss->sums_dev + BETA_SLOT, top1, bt->N, bt->n_rows);
}

/* Term k on rows [row0, row0 + n) (s and t their logits): its row losses,
 * and its gradient into ds (written by the first term, added by the
 * others; or written as bf16 bits into ds_bits by a single term). */
static void run_term(qkd_loss *loss, int k, const struct loss_batch *bt,
                     const struct logit_blocks *lb, int row0, int n, float *ds,
                     uint16_t *ds_bits, const float *s, const float *t)
{
    qkd__backend *be = backend(loss);
    const qkd_loss_term *term = &loss->terms[k];
    const int32_t *y = bt->targets ? loss->targets_dev + row0 : NULL;
    float *rows = rows_of(loss, ROW_LOSS + k) + row0;
    const int denom = term_denom(term, bt);
    qkd__kd_term kt = {.kind = (int)term->kind, .temperature = term->temperature,
                       .beta = term->beta,
                       .scale = denom > 0 ? (float)((double)term->weight / denom) : 0.0f,
                       .accumulate = k > 0};
    const float *row_w =
        term->kind == QKD_LOSS_TSLD ? rows_of(loss, ROW_WEIGHT + k) + row0 : NULL;
    const size_t at = (size_t)row0 * (size_t)bt->V;
    ds = ds_bits ? NULL : ds + at;
    ds_bits = ds_bits ? ds_bits + at : NULL;
    float *beta = loss->sums_dev + BETA_SLOT;
    if (fused_confidence(loss, k, lb)) {
        /* the backend takes the confidence in the objective's own sweep */
        be->kd_loss_confidence(be, rows, ds, ds_bits, s, t, y, row_w, n, bt->V, &kt, beta,
                               bt->n_rows);
        return;
    }
    if (term->beta_from_teacher)
        kt.beta_dev = beta; /* batch_figures' */
    be->kd_loss(be, rows, ds, ds_bits, s, t, y, row_w, n, bt->V, &kt);
}

/* Every term on every block of rows. With value, the logits' finiteness
 * is checked: before anything is written where the forwards stored the
 * logits whole; block by block, as they are computed, otherwise. */
static qkd_status run_blocks(qkd_loss *loss, const struct loss_batch *bt,
                             const struct logit_blocks *lb, float *value)
{
    qkd__backend *be = backend(loss);
    const int whole = lb->s && (!bt->teacher || lb->t);
    float *block_sums = rows_of(loss, ROW_SUMS);
    qkd_status st = QKD_OK;
    if (value && whole) {
        logit_sums(be, loss->sums_dev + FINITE_SLOT, 1, lb->s, lb->t,
                   (size_t)bt->N * (size_t)bt->V);
        st = check_sums(loss);
    }
    /* bits where the student's backward reads them and no term adds to them */
    uint16_t *ds_bits = loss->n_terms == 1 ? qkd__model_dlogits_bits_dev(bt->student) : NULL;
    float *ds = NULL;
    if (st == QKD_OK && !ds_bits)
        st = qkd__model_dlogits_f32(bt->student, &ds);
    if (st != QKD_OK)
        return st;
    batch_figures(loss, bt, lb);
    for (int r0 = 0, b = 0; r0 < bt->N; r0 += lb->R, b++) {
        const int n = block_rows(bt, lb, r0);
        const float *s = block_of(bt->student, lb->s, lb->s_buf, r0, n, bt->V);
        const float *t =
            bt->teacher ? block_of(bt->teacher, lb->t, lb->t_buf, r0, n, bt->V) : NULL;
        if (value && !whole)
            logit_sums(be, block_sums + b, (size_t)loss->cap, s, t, (size_t)n * bt->V);
        for (int k = 0; k < loss->n_terms; k++)
            run_term(loss, k, bt, lb, r0, n, ds, ds_bits, s, t);
    }
    for (int k = 0; k < loss->n_terms; k++) {
        be->sum(be, loss->sums_dev + k, rows_of(loss, ROW_LOSS + k), (size_t)bt->N);
        loss->denoms[k] = term_denom(&loss->terms[k], bt);
    }
    if (value && !whole) {
        be->sum(be, loss->sums_dev + FINITE_SLOT, block_sums, (size_t)lb->n_blocks);
        be->sum(be, loss->sums_dev + FINITE_SLOT + 1, block_sums + loss->cap,
                (size_t)lb->n_blocks);
        st = check_sums(loss);
        if (st != QKD_OK) { /* rows are written: no gradient, no value stored */
            qkd__model_mark_dlogits(bt->student, -1);
            loss->computed = 0;
            return st;
        }
    }
    qkd__model_mark_dlogits(bt->student, ds_bits != NULL);
    return QKD_OK;
}

/* Evaluate every term, storing the gradient; *value: the weighted sum, or
 * with value NULL the sums stay on the device (deferred: no finiteness
 * check, no download). */
static qkd_status run_terms(qkd_loss *loss, const struct loss_batch *bt, float *value)
{
    struct logit_blocks lb;
    qkd_status st = plan_blocks(loss, bt, &lb);
    if (st == QKD_OK)
        st = run_blocks(loss, bt, &lb, value);
    if (st != QKD_OK)
        return st;
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
    const float *logits;
    st = qkd__model_logits_all(teacher, &logits);
    if (st != QKD_OK)
        return st;
    /* one device buffer: the mean, N rows' top-1 probabilities, the targets */
    const size_t y_bytes = targets ? (size_t)N * sizeof *targets : 0;
    float *dev = NULL;
    st = be->alloc(be, (1 + (size_t)N) * sizeof(float) + y_bytes, (void **)&dev);
    int32_t *y = targets ? (int32_t *)(dev + 1 + N) : NULL;
    if (st == QKD_OK && y)
        st = be->upload(be, y, targets, y_bytes);
    float mean = 0.0f;
    if (st == QKD_OK) {
        be->row_max_prob(be, dev + 1, logits, y, N, V);
        mean_of(be, dev, dev + 1, N, counted_rows(targets, N));
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
