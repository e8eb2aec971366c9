/* libqkd objectives: the distillation losses between a teacher's and a
 * student's logits, and cross-entropy on the ground truth.
 *
 * A qkd_loss is a weighted sum of terms. qkd_loss_compute reads the last
 * forward's logits of the student and the teacher (same B, T, vocabulary),
 * returns the loss value and stores its gradient with respect to the
 * student's logits on the student, ready for qkd_model_backward(student,
 * NULL). The vocabulary is processed in chunks with a running softmax, so
 * no full [B*T][vocab] probability tensor is ever allocated. A model set
 * with qkd_model_set_logits_rows has its logits computed here, a block of
 * rows at a time, each block's terms and gradient rows right after it:
 * then no model's full [B*T][vocab] logits are stored either.
 *
 * Per position i, with temperature tau, p = softmax(t_i / tau) (teacher),
 * q = softmax(s_i / tau) (student), KL(a||c) = sum a (log a - log c):
 *   CE     -log softmax(s_i)[y_i]                      (tau not used)
 *   FKL    tau^2 KL(p||q)                              (forward KL)
 *   RKL    tau^2 KL(q||p)                              (reverse KL)
 *   JSD    tau^2 (beta KL(p||m) + (1-beta) KL(q||m)),  m = beta p + (1-beta) q
 *   CAKLD  tau^2 (beta KL(q||p) + (1-beta) KL(p||q))   (BitDistiller; beta is
 *          the teacher's mean top-1 probability: qkd_loss_teacher_confidence,
 *          or, with beta_from_teacher, that of each batch, on the device)
 *   TSLD   w_i tau^2 (-sum p log q), w = softmax over the positions of each
 *          sequence of c_i / tsld_tau, c_i = -log softmax(t_i)[y_i] (the
 *          teacher's own cross-entropy; detached): hard tokens weigh more
 *   MSE    mean over the vocabulary of (s_i - t_i)^2
 * Every term is averaged over the counted positions (targets >= 0, or all
 * positions when targets is NULL); TSLD's weights sum to one per sequence
 * and it is averaged over sequences, which is the same scale. tau^2 keeps
 * gradient magnitudes comparable across temperatures (Hinton et al.).
 */
#ifndef QKD_LOSS_H
#define QKD_LOSS_H

#include "core.h"
#include "model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct qkd_loss qkd_loss;

typedef enum qkd_loss_kind {
    QKD_LOSS_CE = 0,
    QKD_LOSS_FKL = 1,
    QKD_LOSS_RKL = 2,
    QKD_LOSS_JSD = 3,
    QKD_LOSS_CAKLD = 4,
    QKD_LOSS_TSLD = 5,
    QKD_LOSS_MSE = 6
} qkd_loss_kind;

typedef struct qkd_loss_term {
    size_t size;        /* sizeof(qkd_loss_term), set by _init */
    qkd_loss_kind kind;
    float weight;       /* factor of this term in the sum */
    float temperature;  /* tau > 0 */
    float beta;         /* JSD / CAKLD mixing weight in [0, 1] */
    float tsld_tau;     /* TSLD token-weight temperature > 0 */
    int beta_from_teacher; /* CAKLD only, 0 or 1: at every compute, beta is the
                              teacher's mean top-1 probability over the batch's
                              counted positions (qkd_loss_teacher_confidence of
                              that batch), computed on the device; beta and
                              qkd_loss_set_beta are then not used */
} qkd_loss_term;

/* Defaults for kind: weight 1, temperature 1, beta 0.5, tsld_tau 10,
 * beta_from_teacher 0. @since 0.1 */
QKD_API void qkd_loss_term_init(qkd_loss_term *term, qkd_loss_kind kind);

/* An empty loss. *out: owned, free with qkd_loss_free. @since 0.1 */
QKD_API qkd_status qkd_loss_create(qkd_context *ctx, qkd_loss **out);
/* Accepts NULL. @since 0.1 */
QKD_API void qkd_loss_free(qkd_loss *loss);

/* Append a term (copied). Errors: INVALID_ARG (unknown kind, weight not
 * finite, temperature or tsld_tau <= 0, beta outside [0, 1],
 * beta_from_teacher not 0 or 1, or set on a kind other than CAKLD), RANGE
 * (more than 8 terms). @since 0.1 */
QKD_API qkd_status qkd_loss_add(qkd_loss *loss, const qkd_loss_term *term);

/* Change term i's beta (CAKLD's confidence, JSD's mixture).
 * Errors: INVALID_ARG (beta outside [0, 1]), RANGE (no term i). @since 0.1 */
QKD_API qkd_status qkd_loss_set_beta(qkd_loss *loss, int term, float beta);

/* Evaluate on the last forwards of student and teacher. targets[B*T] are
 * the next-token ids (negative: position ignored); required by CE and
 * TSLD, optional (NULL) otherwise. teacher may be NULL if every term is CE.
 * *value: the weighted sum. The gradient is stored on the student (it
 * replaces the logits gradient held there). student and teacher must live
 * on the loss's context. Scratch memory is allocated on the first compute
 * of a batch larger than any before, never in a step of a shape seen.
 *
 * value NULL defers: the call queues the work and returns without waiting
 * for the device (no host round trip in a GPU step); qkd_loss_value and
 * qkd_loss_term_value wait for it later, on the thread that uses the loss
 * (one at a time, as every handle: core.h). A deferred compute makes no
 * finiteness check first: a counted position whose logits (those a term
 * reads) hold a NaN or Inf gets a NaN gradient row, so a following
 * qkd_optimizer_step reports NON_FINITE and changes nothing, and
 * qkd_loss_value reports NON_FINITE.
 *
 * Errors: INVALID_ARG (NULL student, a needed teacher or targets missing,
 * a model on another context), STATE (a model has no forward, or the loss
 * has no term), SHAPE (B, T or vocabulary differ), RANGE (a target >= the
 * vocabulary), NON_FINITE (value given, and a NaN or Inf logit: nothing is
 * stored; with logits computed by block, which are checked as they come,
 * the gradient stored before is dropped, so a backward needs a new
 * compute, and the loss has no value), NO_MEMORY. @since 0.1 */
QKD_API qkd_status qkd_loss_compute(qkd_loss *loss, qkd_model *student,
                                    qkd_model *teacher, const int32_t *targets,
                                    float *value);

/* The weighted sum at the last compute, waiting for a deferred one.
 * Errors: INVALID_ARG, STATE (no compute since the last qkd_loss_add),
 * NON_FINITE (the value is NaN or Inf: a logit it read was; *value 0).
 * @since 0.1 */
QKD_API qkd_status qkd_loss_value(const qkd_loss *loss, float *value);

/* Value of term i at the last compute (unweighted), waiting for a
 * deferred one. Errors: INVALID_ARG, RANGE (no term i), STATE (no compute
 * since the last qkd_loss_add). @since 0.1 */
QKD_API qkd_status qkd_loss_term_value(const qkd_loss *loss, int term, float *value);

/* Mean over positions (targets >= 0, or all if NULL) of the teacher's top-1
 * probability at its last forward: CAKLD's beta for one batch. Average it
 * over a few calibration batches and pass it to qkd_loss_set_beta.
 * Errors: INVALID_ARG, STATE (no forward), NON_FINITE, NO_MEMORY.
 * @since 0.1 */
QKD_API qkd_status qkd_loss_teacher_confidence(qkd_model *teacher,
                                               const int32_t *targets,
                                               float *confidence);

#ifdef __cplusplus
}
#endif
#endif
