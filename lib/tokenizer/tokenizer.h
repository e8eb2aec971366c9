/* Internal tokenizer construction: the loaders (lib/io) read a vocabulary
 * from their format and build the tokenizer from it. */
#ifndef QKD_LIB_TOKENIZER_H
#define QKD_LIB_TOKENIZER_H

#include "qkd/tokenizer.h"
#include "core/core.h"

/* Token types, numbered as GGUF's tokenizer.ggml.token_type. */
typedef enum qkd__token_type {
    QKD__TOKEN_NORMAL = 1,
    QKD__TOKEN_UNKNOWN = 2,
    QKD__TOKEN_CONTROL = 3,
    QKD__TOKEN_USER_DEFINED = 4,
    QKD__TOKEN_UNUSED = 5,
    QKD__TOKEN_BYTE = 6
} qkd__token_type;

/* Build a tokenizer from n pieces (bytes pieces[i][0..lens[i]), copied;
 * either the U+2581 marker or a plain space may stand for a space),
 * scores[n], and types[n] (NULL: derive BYTE for "<0xNN>" pieces, CONTROL
 * for bos/eos/unknown, NORMAL otherwise). FORMAT on a malformed
 * vocabulary (n < 1, a bos/eos id out of range), recorded on ctx. */
qkd_status qkd__tokenizer_create(qkd_context *ctx, int n, const char *const *pieces,
                                 const size_t *lens, const float *scores,
                                 const int32_t *types, int32_t bos, int32_t eos,
                                 int32_t unk, qkd_tokenizer **out);

/* What the writers (safetensors/GGUF export) need of token id, which must
 * be in range: its piece as matched (spaces as U+2581, the form GGUF and
 * sentencepiece store), its score and its type. */
typedef struct qkd__token_info {
    const char *piece; /* borrowed until the tokenizer is freed */
    size_t len;
    float score;
    qkd__token_type type;
} qkd__token_info;

void qkd__tokenizer_token(const qkd_tokenizer *tok, int32_t id, qkd__token_info *info);
/* Id of the unknown token. */
int32_t qkd__tokenizer_unk(const qkd_tokenizer *tok);

#endif
