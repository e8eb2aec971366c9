/* Internal sampler pieces, exposed so the tests can check each rule alone.
 * They follow llama2.c's run.c step for step (same float operations in the
 * same order), which is what makes seeded runs reproduce its outputs. */
#ifndef QKD_LIB_GENERATE_SAMPLER_H
#define QKD_LIB_GENERATE_SAMPLER_H

#include <stdint.h>

typedef struct qkd__prob_index {
    float prob;
    int32_t index;
} qkd__prob_index;

/* xorshift64* step: advances *state, returns the high 32 bits. */
uint32_t qkd__rng_u32(uint64_t *state);
/* A float in [0, 1) from the top 24 bits of qkd__rng_u32. */
float qkd__rng_f32(uint64_t *state);

/* Index of the first largest value. */
int32_t qkd__sample_argmax(const float *x, int n);
/* In-place softmax (max-subtracted, float accumulation). */
void qkd__softmax(float *x, int n);
/* Walk the CDF of probs until coin < cdf; n-1 if rounding never gets there. */
int32_t qkd__sample_mult(const float *probs, int n, float coin);
/* Nucleus sampling: from the most probable tokens whose cumulative
 * probability first exceeds top_p (0 < top_p < 1). buf holds n entries. */
int32_t qkd__sample_topp(const float *probs, int n, float top_p, float coin,
                         qkd__prob_index *buf);

#endif
