/* libqkd optimizers: AdamW and SGD with momentum over a model's tensors,
 * with learning-rate schedules, global gradient-norm clipping, per-tensor
 * groups (learning-rate scale, frozen) and the presets the papers use.
 *
 * Schedule. Step t (1-based; t < 1 counts as 1) has learning rate
 * lr_t = lr * f(t), computed in double and rounded to float, with
 * W = warmup_steps, T = total_steps, r = min_lr_ratio:
 *   t <= W:             f = t / W                       (linear warmup)
 *   t > W, CONSTANT:    f = 1
 *   t > W, LINEAR:      f = 1 - (1 - r) p
 *   t > W, COSINE:      f = r + (1 - r) (1 + cos(pi p)) / 2
 * where p = min(1, (t - W) / (T - W)) (p = 1 when T == W): the decay
 * reaches r exactly at step T and stays there.
 *
 * Update of a trainable tensor with gradient g and group scale s
 * (lr_i = lr_t * s; t = the number of this step, skipped ones excluded):
 * AdamW: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
 *        w -= lr_i (m / (1-b1^t) / (sqrt(v / (1-b2^t)) + eps) + wd w),
 *        in float, as PyTorch's fp32 AdamW, with the reciprocals of the
 *        bias corrections computed in double and rounded to float; every
 *        backend gives the same bits.
 * SGD:   u = momentum u + g; w -= lr_i (u + wd w).
 * Moments start at zero. Weight decay is decoupled and applies to every
 * trainable tensor (freeze a tensor, or give it its own group, to spare it).
 *
 * Clipping. Before the update the global L2 norm of the gradients of all
 * trainable (non-frozen) tensors is computed; if max_grad_norm > 0 and the
 * norm exceeds it, the update uses g * (max_grad_norm / norm) for every
 * tensor (on a scratch copy: the model's gradients are not changed). A NaN
 * or Inf norm (a squared sum that overflows float included) skips the
 * step: no weight, moment or step counter changes, and it is reported in
 * qkd_step_info. A frozen tensor's gradient is never read.
 *
 * Threading: an optimizer is used with its model, by one thread at a time.
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
    float momentum;       /* SGD, in [0, 1) */
    float weight_decay;   /* decoupled */
    qkd_schedule schedule;
    int64_t warmup_steps;
    int64_t total_steps;  /* for LINEAR / COSINE; >= 1 and >= warmup_steps */
    float min_lr_ratio;   /* final lr / lr, in [0, 1] */
    float max_grad_norm;  /* >= 0; 0: no clipping (the norm is still computed) */
} qkd_optim_params;

/* Defaults: AdamW, lr 1e-4, betas 0.9 / 0.999, eps 1e-8, momentum 0.9,
 * weight decay 0, constant schedule, no warmup, total 0, min ratio 0,
 * max_grad_norm 1. @since 0.1 */
QKD_API void qkd_optim_params_init(qkd_optim_params *p);

/* An optimizer over every tensor of model (state allocated now, on the
 * model's backend; a step allocates nothing). Every tensor starts in a
 * group with lr_scale 1, not frozen. p: copied; NULL for the defaults.
 * model is borrowed until the optimizer is freed. A tied model's output
 * head has no tensor of its own: it is token_embd. The tensors are those
 * of the model's table now: bind a quantizer with learn_scales first, so
 * that its scales are trained (binding or unbinding one later makes
 * qkd_optimizer_step fail with STATE).
 * *out: owned, free with qkd_optimizer_free; NULL on error. Errors are
 * recorded on the model's context (a NULL model only returns INVALID_ARG):
 * INVALID_ARG (NULL out, bad size field, unknown kind or schedule, lr <= 0
 * or not finite, AdamW betas outside [0, 1) or eps <= 0, SGD momentum
 * outside [0, 1), negative or non-finite decay or max_grad_norm, negative
 * steps, min_lr_ratio outside [0, 1], total < 1 or total < warmup for a
 * decaying schedule), NO_MEMORY. @since 0.1 */
QKD_API qkd_status qkd_optimizer_create(qkd_model *model, const qkd_optim_params *p,
                                        qkd_optimizer **out);
/* Accepts NULL. @since 0.1 */
QKD_API void qkd_optimizer_free(qkd_optimizer *opt);

/* Parameter group of tensor `index` (numbered as in qkd/model.h): its
 * learning rate is lr_t * lr_scale; a frozen tensor (frozen != 0) is never
 * changed and its gradient is left out of the clipping norm; its moments
 * are kept, so unfreezing resumes from them. Errors: INVALID_ARG (NULL
 * opt, lr_scale < 0 or not finite), RANGE (index). @since 0.1 */
QKD_API qkd_status qkd_optimizer_set_group(qkd_optimizer *opt, int index,
                                           float lr_scale, int frozen);

/* Presets, OR-able. OV_FREEZE freezes attn_v and attn_output of every
 * layer (ov-freeze); FREEZE_EMBED_NORM freezes token_embd, output (when
 * untied) and every norm weight (attn_norm, ffn_norm, output_norm);
 * SCALES_ONLY freezes every tensor but the learned quantizer scales
 * (QKD_TENSOR_QUANT_SCALE; ASYM zero points are frozen too), as
 * EfficientQAT's end-to-end stage trains step sizes only. A preset only
 * freezes: other tensors keep their group. */
enum {
    QKD_PRESET_OV_FREEZE = 1u << 0,
    QKD_PRESET_FREEZE_EMBED_NORM = 1u << 1,
    QKD_PRESET_SCALES_ONLY = 1u << 2 /* @since 0.1 */
};
/* Errors: INVALID_ARG (NULL opt, unknown bit), STATE (SCALES_ONLY on a
 * model with no learned scales: bind a quantizer with learn_scales before
 * creating the optimizer); on error nothing is changed. @since 0.1 */
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
 * they are: zero them before the next accumulation). info may be NULL;
 * it is filled on success and on a skipped step. Errors: INVALID_ARG (NULL
 * opt, info->size too small), STATE (the model is not trainable, see
 * qkd_model_set_trainable, or its tensor table changed since the
 * optimizer was created: a quantizer with learn_scales was bound or
 * unbound), BACKEND. A skipped step returns QKD_ERR_NON_FINITE
 * with info->skipped = 1. @since 0.1 */
QKD_API qkd_status qkd_optimizer_step(qkd_optimizer *opt, qkd_step_info *info);

/* qkd_optimizer_step without a host round trip: the step is queued and
 * the call returns without waiting for the device, which computes the
 * gradient norm, clips, and skips a step whose norm is not finite
 * (nothing changed, the step not counted), as qkd_optimizer_step decides
 * on the host. The learning-rate schedule advances with each call: a
 * skipped step's advance is taken back once the host learns of it
 * (qkd_optimizer_last_step, or a synchronous step). AdamW on a backend
 * that can decide on the device (CUDA, the reference); elsewhere (SGD,
 * SIMD) it is qkd_optimizer_step, returning its status. On a student with
 * bf16 matmuls and hard-rounded SYM or ASYM groups, the update also writes
 * the fake-quantized bf16 weights the next forward reads, in the same pass
 * over the weights, so that forward does not quantize them again (the same
 * values, bit for bit; a weight written in between is quantized again).
 * Errors: INVALID_ARG, STATE (as qkd_optimizer_step), BACKEND. @since 0.1 */
QKD_API qkd_status qkd_optimizer_step_deferred(qkd_optimizer *opt);

/* The report of the last step (deferred or not), waiting for the device:
 * info as qkd_optimizer_step fills it. Returns QKD_ERR_NON_FINITE with
 * info->skipped = 1 when that step was skipped. Errors: INVALID_ARG (NULL
 * opt, info->size too small), STATE (no step yet), BACKEND. @since 0.1 */
QKD_API qkd_status qkd_optimizer_last_step(qkd_optimizer *opt, qkd_step_info *info);

/* The optimizer's whole state (step counter and every moment buffer) as
 * bytes, for checkpoints: state_bytes gives the size (0 for NULL),
 * state_get copies it out (n >= state_bytes, else INVALID_ARG),
 * state_set restores it. Groups and params are not part of the state: the
 * host sets them again. Restoring then stepping reproduces an
 * uninterrupted run bit for bit.
 *
 * Layout, numbers in the host's byte order (version 1):
 *   offset  0  char[4]   magic "QKDO"
 *   offset  4  uint32    version (1)
 *   offset  8  uint32    kind (qkd_optim_kind)
 *   offset 12  uint32    n_tensors
 *   offset 16  int64     step (steps applied)
 *   offset 24  int64     n_elements of each tensor [n_tensors]
 *   then, per tensor in order, float32 moments: AdamW m[n] then v[n];
 *   SGD u[n].
 * state_set errors: INVALID_ARG (NULL), FORMAT (bad magic or version,
 * negative step, n not the size the header implies), SHAPE (another kind,
 * tensor count or tensor size), BACKEND. On a FORMAT or SHAPE error
 * nothing changes. @since 0.1 */
QKD_API size_t qkd_optimizer_state_bytes(const qkd_optimizer *opt);
QKD_API qkd_status qkd_optimizer_state_get(const qkd_optimizer *opt, void *dst, size_t n);
QKD_API qkd_status qkd_optimizer_state_set(qkd_optimizer *opt, const void *src, size_t n);

/* Learning rate lr_t of step t (1-based) under the schedule, before any
 * group's lr_scale; 0 for NULL. @since 0.1 */
QKD_API float qkd_optimizer_lr_at(const qkd_optimizer *opt, int64_t t);

#ifdef __cplusplus
}
#endif
#endif
