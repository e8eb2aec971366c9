/* The body of a distillation run, shared by its loop and its checkpoints. */
#ifndef QKD_LIB_DISTILL_IMPL_H
#define QKD_LIB_DISTILL_IMPL_H

#include <qkd/distill.h>

struct qkd_distill {
    qkd_context *ctx;
    qkd_model *teacher; /* may be NULL (CE only) */
    qkd_model *student;
    qkd_loss *loss;
    qkd_optimizer *opt;
    const qkd_dataset *data;
    qkd_distill_params p;
    uint64_t data_hash; /* FNV-1a of the ids, for resume checks */
    int64_t step;       /* steps done */
    int64_t n_skipped;  /* skipped steps (non-finite loss or gradients) */
    int64_t bad_streak; /* consecutive skipped steps up to the last one */
    float *history;     /* loss of every step done (through ctx's hooks) */
    int64_t history_cap;
    int32_t *tokens, *targets; /* one batch */
};

/* Make room for n losses in the history. NO_MEMORY on failure. */
qkd_status qkd__distill_reserve(qkd_distill *d, int64_t n);

#endif
