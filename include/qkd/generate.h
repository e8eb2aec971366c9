/* libqkd text generation: a sampler (greedy, temperature, top-p, seeded)
 * and a generation loop over qkd_model_decode. The sampler draws random
 * numbers with llama2.c's xorshift generator and follows its top-p rule,
 * so a seeded run reproduces llama2.c's output for the same model. */
#ifndef QKD_GENERATE_H
#define QKD_GENERATE_H

#include "core.h"
#include "model.h"
#include "tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct qkd_sampler qkd_sampler;

typedef struct qkd_sampler_params {
    size_t size;        /* sizeof(qkd_sampler_params), set by _init */
    float temperature;  /* 0: greedy argmax */
    float top_p;        /* in (0, 1): nucleus sampling; >= 1: plain */
    uint64_t seed;      /* 0 is replaced by 1 (xorshift needs a non-zero state) */
} qkd_sampler_params;

/* Defaults: temperature 1.0, top_p 0.9, seed 1. @since 0.1 */
QKD_API void qkd_sampler_params_init(qkd_sampler_params *p);

/* *out: owned, free with qkd_sampler_free. vocab_size: logits per call.
 * Errors: INVALID_ARG (temperature < 0, top_p <= 0, not finite),
 * NO_MEMORY. @since 0.1 */
QKD_API qkd_status qkd_sampler_create(qkd_context *ctx,
                                      const qkd_sampler_params *p,
                                      int vocab_size, qkd_sampler **out);
/* Accepts NULL. @since 0.1 */
QKD_API void qkd_sampler_free(qkd_sampler *s);

/* Pick the next token from logits[vocab_size]. The logits are used as
 * scratch (overwritten). Errors: INVALID_ARG, NON_FINITE (a NaN or
 * infinite logit). @since 0.1 */
QKD_API qkd_status qkd_sampler_sample(qkd_sampler *s, float *logits,
                                      int32_t *token);

/* Called with each generated token's text (borrowed for the call).
 * Return non-zero to stop generation. */
typedef int (*qkd_token_fn)(void *user, int32_t token, const char *text,
                            size_t len);

typedef struct qkd_generate_params {
    size_t size;            /* sizeof(qkd_generate_params), set by _init */
    qkd_sampler_params sampler;
    int steps;              /* positions to run, prompt included (as
                               llama2.c's -n); 0 or > max_seq_len means
                               max_seq_len */
} qkd_generate_params;

/* Defaults: sampler defaults, steps 256. @since 0.1 */
QKD_API void qkd_generate_params_init(qkd_generate_params *p);

/* Encode prompt (NULL or "" means BOS alone) with BOS, then feed the
 * prompt and sample until `steps` positions or a BOS/EOS token, calling
 * on_token for every token after the prompt's first (prompt tokens
 * included, as llama2.c prints them). *n_generated (may be NULL): tokens
 * reported. Errors: INVALID_ARG, SHAPE (tokenizer and model vocabulary
 * sizes differ), CANCELLED (on_token returned non-zero: not an error for
 * the caller's text, which is complete up to there), plus those of
 * qkd_model_decode. @since 0.1 */
QKD_API qkd_status qkd_generate(qkd_model *model, const qkd_tokenizer *tok,
                                const char *prompt,
                                const qkd_generate_params *p,
                                qkd_token_fn on_token, void *user,
                                int *n_generated);

#ifdef __cplusplus
}
#endif
#endif
