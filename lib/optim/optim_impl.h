/* The optimizer's body, shared by optim.c (create, groups, step) and
 * optim_state.c (checkpoint bytes). */
#ifndef QKD_LIB_OPTIM_IMPL_H
#define QKD_LIB_OPTIM_IMPL_H

#include "backend/backend.h"
#include "qkd/optim.h"

/* One model tensor as the optimizer sees it. */
typedef struct qkd__optim_tensor {
    qkd_tensor_kind kind;
    int64_t n;            /* elements */
    float *moments;       /* device: n_moments slices of `stride` floats */
    float lr_scale;
    int frozen;
} qkd__optim_tensor;

struct qkd_optimizer {
    qkd_model *model;     /* borrowed */
    qkd_context *ctx;     /* the model's */
    qkd__backend *be;     /* the model's */
    qkd_optim_params p;
    int64_t step;         /* steps applied */
    int n_tensors;
    unsigned table_gen;   /* the model's table generation at creation */
    int n_moments;        /* 2 for AdamW (m, v), 1 for SGD (u) */
    qkd__optim_tensor *tensors; /* host [n_tensors] */
    void *mem;            /* device: every moment, then norms, then scratch */
    float *norms;         /* device [n_tensors]: each tensor's squared norm */
    float *scratch;       /* device, the largest tensor: a clipped gradient
                             (update_span); NULL where no span is clipped alone */
    float *norms_host;    /* host [n_tensors] */
    qkd__update_span *spans; /* host [n_tensors]: the trainable ones, for the multi slots */
    /* Steps decided on the device (qkd_optimizer_step_deferred): their
     * state, how many were queued since the host last read it (step then
     * lags behind st->t), and whether st->t lags behind step (a synchronous
     * step or state_set since). */
    qkd__step_state *st;  /* device */
    int64_t pending;
    int st_stale;
    qkd_step_info last;   /* the last step, as known on the host (size 0: none yet) */
};

/* Steps applied, pending deferred ones included (the device's count). */
qkd_status qkd__optim_applied(const qkd_optimizer *opt, int64_t *step);

/* Floats between one moment slice of tensor t and the next (n rounded up
 * to a 64-byte line, so every slice stays aligned). */
size_t qkd__optim_stride(const qkd__optim_tensor *t);

#endif
