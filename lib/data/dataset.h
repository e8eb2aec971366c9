/* The dataset's body and what the data layer's files share. */
#ifndef QKD_LIB_DATA_DATASET_H
#define QKD_LIB_DATA_DATASET_H

#include <qkd/data.h>

struct qkd_dataset {
    qkd_context *ctx; /* borrowed: errors are reported there */
    int32_t *ids;     /* owned, through ctx's hooks */
    size_t n;
    int vocab_size;
    uint64_t seed;    /* training order */
    int64_t n_eval;   /* held-out windows at the end */
};

/* A dataset taking ownership of ids (allocated with qkd_context_alloc on
 * ctx; freed on failure too), after
 * checking every id against vocab_size. */
qkd_status qkd__dataset_adopt(qkd_context *ctx, int32_t *ids, size_t n, int vocab_size,
                              qkd_dataset **out);

/* A pseudo-random permutation of [0, n) indexed by i (a Feistel network
 * on the next power of four, cycle-walked into range): O(1) per index,
 * no memory, a different permutation for every key. */
int64_t qkd__permute(int64_t i, int64_t n, uint64_t key);

/* SplitMix64's output function: a well-mixed 64-bit hash of x. */
uint64_t qkd__mix64(uint64_t x);

#endif
