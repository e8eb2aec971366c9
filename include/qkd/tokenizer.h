/* libqkd tokenizer: sentencepiece-style byte-pair merges by score with
 * byte fallback, as LLaMA uses. Reads llama2.c's tokenizer.bin and the
 * vocabulary carried in GGUF metadata (tokenizer.ggml.*). */
#ifndef QKD_TOKENIZER_H
#define QKD_TOKENIZER_H

#include "core.h"
#include "model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct qkd_tokenizer qkd_tokenizer;

/* Load a tokenizer: a llama2.c tokenizer.bin, or a GGUF file's
 * tokenizer.ggml.* vocabulary (model GGUFs and vocab-only GGUFs alike).
 * *out: owned, free with qkd_tokenizer_free.
 * Errors: IO, FORMAT (malformed/truncated), UNSUPPORTED (a GGUF tokenizer
 * model other than "llama"), NO_MEMORY. @since 0.1 */
QKD_API qkd_status qkd_tokenizer_load(qkd_context *ctx, const char *path,
                                      qkd_tokenizer **out);

/* Vocabulary size of the byte-level tokenizer. */
#define QKD_BYTE_VOCAB_SIZE 260

/* A byte-level tokenizer that needs no file: id 0 <unk>, 1 BOS, 2 EOS,
 * 3..258 the bytes 0x00..0xFF (as <0xNN> pieces, llama2.c's byte-fallback
 * ids), 259 the space. Any UTF-8 text encodes and decodes losslessly; for
 * small models trained on raw text, such as libqkd's embedded default.
 * *out: owned, free with qkd_tokenizer_free. Errors: INVALID_ARG,
 * NO_MEMORY. @since 0.1 */
QKD_API qkd_status qkd_tokenizer_create_bytes(qkd_context *ctx, qkd_tokenizer **out);

/* The tokenizer that came inside the model's file (GGUF), or NULL.
 * Borrowed until the model is freed. @since 0.1 */
QKD_API const qkd_tokenizer *qkd_model_tokenizer(const qkd_model *model);

/* Accepts NULL. @since 0.1 */
QKD_API void qkd_tokenizer_free(qkd_tokenizer *tok);

QKD_API int qkd_tokenizer_vocab_size(const qkd_tokenizer *tok); /* @since 0.1 */
QKD_API int32_t qkd_tokenizer_bos(const qkd_tokenizer *tok);     /* @since 0.1 */
QKD_API int32_t qkd_tokenizer_eos(const qkd_tokenizer *tok);     /* @since 0.1 */

/* The piece of token id as stored ("\xe2\x96\x81the" style pieces are
 * returned with the U+2581 marker already turned into a space), or NULL
 * if id is out of range. Borrowed until the tokenizer is freed.
 * @since 0.1 */
QKD_API const char *qkd_tokenizer_piece(const qkd_tokenizer *tok, int32_t id);

enum {
    QKD_ENCODE_BOS = 1,  /* prepend the BOS id */
    QKD_ENCODE_EOS = 2   /* append the EOS id */
};

/* Encode len bytes of UTF-8 text (a leading space is added, as
 * sentencepiece does). Writes at most cap ids to out and the number the
 * whole text needs to *n_out; if that exceeds cap, returns RANGE and out
 * holds the first cap ids (call again with a larger buffer). len + 2 ids
 * always suffice for a vocabulary with the U+2581 piece (every LLaMA one).
 * Errors: INVALID_ARG (NULL arguments, text over 700 MB), RANGE,
 * NO_MEMORY. @since 0.1 */
QKD_API qkd_status qkd_tokenizer_encode(const qkd_tokenizer *tok,
                                        const char *text, size_t len,
                                        unsigned flags, int32_t *out,
                                        size_t cap, size_t *n_out);

/* The text of `token` following `prev` (pass -1 when there is none):
 * byte tokens <0xNN> become their byte, and the space that sentencepiece
 * puts at the start of a sequence is dropped after BOS. The result is
 * borrowed until the next call on the tokenizer; NULL if token is out
 * of range. Control tokens (BOS, EOS) decode to "". @since 0.1 */
QKD_API const char *qkd_tokenizer_decode(const qkd_tokenizer *tok,
                                         int32_t prev, int32_t token,
                                         size_t *len);

#ifdef __cplusplus
}
#endif
#endif
