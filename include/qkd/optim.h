/* libqkd optimizers: AdamW and SGD with momentum over a model's tensors,
 * with learning-rate schedules, global gradient-norm clipping, per-tensor
 * groups (learning-rate scale, frozen) and the presets the papers use.
 *
 * Step t (1-based) has learning rate lr_t = lr * f(t): linear warmup over
 * warmup_steps, then CONSTANT f = 1, LINEAR decay to min_lr_ratio at
 * total_steps, or COSINE decay to min_lr_ratio at total_steps.
 * AdamW: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
 *        w -= lr_t (m / (1-b1^t) / (sqrt(v / (1-b2^t)) + eps) + wd w).
 * SGD:   u = momentum u + g; w -= lr_t (u + wd w).
 * Before the update the global L2 norm of all trainable gradients is
 * computed; if it exceeds max_grad_norm (> 0) every gradient is scaled by
 * max_grad_norm / norm. A NaN or Inf gradient norm skips the step (no
 * weight or state changes) and is reported in qkd_step_info.
 */
#ifndef QKD_OPTIM_H
#define QKD_OPTIM_H

#include "core.h"
#include "model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct qkd_optimizer qkd_optimizer;

typedef enum qkd_optim_kind {
    QKD_OPTIM_ADAMW = 0,
    QKD_OPTIM_SGD = 1
} qkd_optim_kind;

typedef enum qkd_schedule {
    QKD_SCHEDULE_CONSTANT = 0,
    QKD_SCHEDULE_LINEAR = 1,
    QKD_SCHEDULE_COSINE = 2
} qkd_schedule;

typedef struct qkd_optim_params {
    size_t size;          /* sizeof(qkd_optim_params), set by _init */
    qkd_optim_kind kind;
    float lr;
    float beta1, beta2, eps; /* AdamW */
    float momentum;       /* SGD */
    float weight_decay;   /* decoupled */
    qkd_schedule schedule;
    int64_t warmup_steps;
    int64_t total_steps;  /* for LINEAR / COSINE; >= warmup_steps */
    float min_lr_ratio;   /* final lr / lr, in [0, 1] */
    float max_grad_norm;  /* 0: no clipping */
} qkd_optim_params;

/* Defaults: AdamW, lr 1e-4, betas 0.9 / 0.999, eps 1e-8, momentum 0.9,
 * weight decay 0, constant schedule, no warmup, total 0, min ratio 0,
 * max_grad_norm 1. @since 0.1 */
QKD_API void qkd_optim_params_init(qkd_optim_params *p);

/* An optimizer over every tensor of model (state allocated now, on the
 * model's backend). model is borrowed until the optimizer is freed.
 * *out: owned, free with qkd_optimizer_free. Errors: INVALID_ARG (lr <= 0
 * or not finite, betas outside [0, 1), eps <= 0, negative decay or
 * steps, total < warmup for a decaying schedule), NO_MEMORY. @since 0.1 */
QKD_API qkd_status qkd_optimizer_create(qkd_model *model, const qkd_optim_params *p,
                                        qkd_optimizer **out);
/* Accepts NULL. @since 0.1 */
QKD_API void qkd_optimizer_free(qkd_optimizer *opt);

/* Parameter group of tensor `index`: its learning rate is lr_t * lr_scale;
 * a frozen tensor is never changed (its gradient is also left out of the
 * clipping norm). Errors: INVALID_ARG (lr_scale < 0), RANGE. @since 0.1 */
QKD_API qkd_status qkd_optimizer_set_group(qkd_optimizer *opt, int index,
                                           float lr_scale, int frozen);

/* Presets, OR-able. OV_FREEZE freezes attn_v and attn_output (ov-freeze);
 * FREEZE_EMBED_NORM freezes token_embd, output and every norm weight. */
enum {
    QKD_PRESET_OV_FREEZE = 1u << 0,
    QKD_PRESET_FREEZE_EMBED_NORM = 1u << 1
};
/* Errors: INVALID_ARG (unknown bit). @since 0.1 */
QKD_API qkd_status qkd_optimizer_apply_preset(qkd_optimizer *opt, unsigned presets);

typedef struct qkd_step_info {
    size_t size;       /* sizeof(qkd_step_info), set by the caller */
    int64_t step;      /* steps applied so far (skipped ones excluded) */
    float lr;          /* lr_t used (or that would have been used) */
    float grad_norm;   /* global norm before clipping */
    int clipped;       /* 1 if gradients were scaled down */
    int skipped;       /* 1 if the step was skipped (non-finite norm) */
} qkd_step_info;

/* Apply one update from the model's current gradients (which are left as
 * they are: zero them before the next accumulation). info may be NULL.
 * Errors: INVALID_ARG (bad info size). A skipped step returns
 * QKD_ERR_NON_FINITE with info->skipped = 1. @since 0.1 */
QKD_API qkd_status qkd_optimizer_step(qkd_optimizer *opt, qkd_step_info *info);

/* The optimizer's whole state (step counter and every moment buffer) as
 * bytes, for checkpoints: state_bytes gives the size, state_get copies it
 * out, state_set restores it (same model shape and kind, else SHAPE).
 * Restoring then stepping reproduces an uninterrupted run bit for bit.
 * @since 0.1 */
QKD_API size_t qkd_optimizer_state_bytes(const qkd_optimizer *opt);
QKD_API qkd_status qkd_optimizer_state_get(const qkd_optimizer *opt, void *dst, size_t n);
QKD_API qkd_status qkd_optimizer_state_set(qkd_optimizer *opt, const void *src, size_t n);

/* Learning rate of step t (1-based) under the schedule. @since 0.1 */
QKD_API float qkd_optimizer_lr_at(const qkd_optimizer *opt, int64_t t);

#ifdef __cplusplus
}
#endif
#endif
