/* libqkd distillation layer: the host training loop, checkpoints and
 * evaluation, as a convenience built only on the public API (a program can
 * write the same loop itself: examples/distill.c does).
 *
 * One step of qkd_distill_run, for step s (0-based) of batch B x T:
 *   qkd_dataset_batch(data, s, B, T, tokens, targets)
 *   qkd_model_forward(teacher, tokens)       (skipped when teacher is NULL)
 *   qkd_model_forward(student, tokens)
 *   qkd_loss_compute(loss, student, teacher, targets, &value)
 *   qkd_model_zero_grad(student); qkd_model_backward(student, NULL)
 *   qkd_optimizer_step(opt, &info)
 * then the callback. A step is skipped (bad) when the loss is NaN or Inf
 * (qkd_loss_compute reports NON_FINITE logits, e.g. from a teacher with a
 * NaN weight, or the value itself is not finite) or when the optimizer
 * finds a non-finite gradient norm: then no gradient is applied (weights
 * and optimizer state do not move), the step still counts and consumes
 * its batch, its stats say skipped = 1, and after max_bad_steps bad steps
 * in a row the run stops with QKD_ERR_NON_FINITE.
 *
 * Nothing in a step is random: the batch is a function of s and the
 * optimizer's state is saved whole, so a run resumed from a checkpoint
 * reaches bit-identical weights to an uninterrupted one on the same
 * backend.
 *
 * The quantizer is the host's business: bind it to the student
 * (qkd_model_set_quantizer) and calibrate it before the run.
 *
 * Threading: a qkd_distill and every handle it borrows are used by one
 * thread at a time. Buffers of this layer are allocated through the
 * context's allocator hooks (qkd_context_alloc). */
#ifndef QKD_DISTILL_H
#define QKD_DISTILL_H

#include "core.h"
#include "model.h"
#include "quant.h"
#include "loss.h"
#include "optim.h"
#include "data.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct qkd_distill qkd_distill;

/* What one finished step reports. */
typedef struct qkd_distill_stats {
    size_t size;          /* sizeof(qkd_distill_stats) */
    int64_t step;         /* steps done, this one included (1-based) */
    int64_t total_steps;
    float loss;           /* the loss value of this step's batch */
    float lr;             /* learning rate used (0 for a skipped step) */
    float grad_norm;      /* global gradient norm before clipping (NaN when
                             the loss was not finite: no backward ran) */
    int clipped;          /* gradients were scaled down */
    int skipped;          /* non-finite loss or gradients: nothing applied */
    double step_seconds;  /* wall time of the step */
    double tokens_per_s;  /* B * T / step_seconds */
    int64_t n_skipped;    /* skipped steps so far, this one included, counted
                             since qkd_distill_create (a checkpoint does not
                             keep the count) */
    int64_t bad_streak;   /* skipped steps in a row ending here (0: good) */
} qkd_distill_stats;

/* Called after every step with stats (borrowed for the call). Return
 * non-zero to stop: qkd_distill_run then returns QKD_ERR_CANCELLED with
 * the step complete, so a checkpoint saved now resumes cleanly. */
typedef int (*qkd_distill_fn)(void *user, const qkd_distill_stats *stats);

typedef struct qkd_distill_params {
    size_t size;          /* sizeof(qkd_distill_params), set by _init */
    int batch;            /* B sequences per step, >= 1 */
    int seq;              /* T predicted tokens per sequence, >= 1 */
    int64_t total_steps;  /* the run's length, >= 1 */
    qkd_distill_fn on_step; /* or NULL */
    void *user;
    int max_bad_steps;    /* stop after this many skipped steps in a row,
                             >= 0; 0: never stop for them */
} qkd_distill_params;

/* Defaults: batch 8, seq 64, 100 steps, no callback, max_bad_steps 8.
 * @since 0.1 */
QKD_API void qkd_distill_params_init(qkd_distill_params *p);

/* A run over borrowed handles (all valid until the run is freed; teacher
 * may be NULL when every loss term is CE; qkd_model_set_trainable(teacher,
 * 0) saves its per-layer activations). ctx is the context the handles
 * were created on; errors are reported there. The step counter starts at
 * 0. *out: owned, free with qkd_distill_free. Errors: INVALID_ARG (NULL
 * handle, bad params), SHAPE (teacher and student vocabularies differ, or
 * the data's ids do not fit the student's vocabulary), RANGE (seq longer
 * than a model's max_seq_len), STATE (no TRAIN window of seq + 1 tokens),
 * NO_MEMORY. @since 0.1 */
QKD_API qkd_status qkd_distill_create(qkd_context *ctx, qkd_model *teacher,
                                      qkd_model *student, qkd_loss *loss,
                                      qkd_optimizer *opt, const qkd_dataset *data,
                                      const qkd_distill_params *p, qkd_distill **out);

/* Accepts NULL. @since 0.1 */
QKD_API void qkd_distill_free(qkd_distill *d);

/* Run up to n_steps more steps (n_steps <= 0: until total_steps).
 * Returns OK when they are done (or total_steps was already reached),
 * CANCELLED when the callback stopped the run, NON_FINITE when the last
 * max_bad_steps steps were all skipped (the step counter includes them;
 * the weights are those of the last good step, the message gives the
 * steps; fix the cause and run again, or resume a checkpoint), or the
 * first error of a step's calls (the step counter then stays at the last
 * complete step). A skipped step on its own is counted, reported with
 * skipped = 1, and is not an error. @since 0.1 */
QKD_API qkd_status qkd_distill_run(qkd_distill *d, int64_t n_steps);

/* Steps done so far. @since 0.1 */
QKD_API int64_t qkd_distill_step(const qkd_distill *d);

/* The loss of every step done so far, oldest first: *losses (may be NULL)
 * is borrowed until the next run, resume or free. Returns the count.
 * @since 0.1 */
QKD_API int64_t qkd_distill_history(const qkd_distill *d, const float **losses);

/* ---- checkpoints (docs/formats.md, "Distillation checkpoint") -------------
 * A checkpoint holds the student's every tensor, the optimizer's state, the
 * step (the data position: batches are a function of the step), the
 * batch shape, a fingerprint of the data and its split, and the loss
 * history. It is written to "<path>.tmp", flushed to disk (fsync) and
 * renamed over path, so an interrupted save never leaves a broken file. */

/* A student weight that is NaN or Inf is never saved: NON_FINITE (the
 * message names the tensor and index) and the file at path is left as it
 * was, so the last good checkpoint survives a run that blew up.
 * Errors: INVALID_ARG, IO, NON_FINITE, NO_MEMORY. @since 0.1 */
QKD_API qkd_status qkd_distill_save(const qkd_distill *d, const char *path);

/* Restore a checkpoint into a run created with the same shapes (models,
 * optimizer, data, batch, seq): the student's weights, the optimizer's
 * state, the step and the history; the count of bad steps in a row starts
 * again from 0. Nothing changes unless the whole file
 * is valid. Errors: INVALID_ARG, IO, FORMAT (bad magic, truncated,
 * checksum mismatch: the message says where), UNSUPPORTED (newer
 * version), SHAPE (tensors or optimizer state differ from the run's),
 * STATE (different data, split, batch or seq), NO_MEMORY. @since 0.1 */
QKD_API qkd_status qkd_distill_resume(qkd_distill *d, const char *path);

/* ---- evaluation on held-out windows ---------------------------------------
 * Both read the EVAL windows of data in batches of B windows of T (the last
 * batch may be smaller) and weigh every predicted token equally. They
 * overwrite the models' last forward (and the student's stored logits
 * gradient). */

/* Mean cross-entropy (nats/token) of model on the EVAL windows; the
 * perplexity is exp(*mean_ce). *n_tokens (may be NULL): tokens scored.
 * Errors: INVALID_ARG, STATE (no EVAL window of T + 1 tokens), and those
 * of qkd_model_forward. @since 0.1 */
QKD_API qkd_status qkd_distill_eval_ce(qkd_context *ctx, qkd_model *model,
                                       const qkd_dataset *data, int B, int T,
                                       double *mean_ce, int64_t *n_tokens);

/* Mean per token of KL(teacher || student) at temperature 1 on the EVAL
 * windows (the value of a qkd_loss FKL term). Errors: as
 * qkd_distill_eval_ce, SHAPE (vocabularies differ), NON_FINITE.
 * @since 0.1 */
QKD_API qkd_status qkd_distill_eval_kl(qkd_context *ctx, qkd_model *student,
                                       qkd_model *teacher, const qkd_dataset *data,
                                       int B, int T, double *kl);

#ifdef __cplusplus
}
#endif
#endif
