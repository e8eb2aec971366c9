/* libqkd data: token datasets for distillation, and the deterministic
 * batches a training run (and a resumed one) reads from them.
 *
 * A qkd_dataset is one flat sequence of token ids. It comes from
 *   - a UTF-8 text file, encoded as ONE text with a single BOS at the start
 *     of the file. Nothing in the text is special: blank lines, "<|endoftext|>"
 *     and the like are encoded as ordinary text;
 *   - a pre-tokenised token file (docs/formats.md, "Token file"), the format
 *     qkd_dataset_save writes;
 *   - data-free generation as in LLM-QAT: the teacher writes its own
 *     sequences (qkd_dataset_generate), which can be saved and reloaded as
 *     a cache;
 *   - ids in memory (qkd_dataset_from_tokens).
 *
 * Windows: for a sequence length T the ids are cut into non-overlapping
 * windows of T + 1 tokens (window i starts at i (T + 1); a shorter tail is
 * not used). A window gives T inputs and their T next-token targets. The
 * last n_eval windows are the held-out (EVAL) split, the others the TRAIN
 * split (qkd_dataset_set_split). Data-free sequences of T + 1 tokens are
 * exactly one window each.
 *
 * Batches: training sample k = step * B + b (b < B) reads the TRAIN window
 * perm_e(k mod n_train) with e = k / n_train the epoch and perm_e a seeded
 * pseudo-random permutation of the TRAIN windows (a new one per epoch). A
 * batch is a pure function of (ids, seed, n_eval, step, B, T): a resumed run
 * sees exactly the batches the uninterrupted one would.
 *
 * Threading: a dataset is read-only after creation apart from
 * qkd_dataset_set_split; concurrent reads of one dataset are safe.
 * The data layer is built on the public API only; its buffers come from
 * the context's allocator hooks (qkd_context_alloc), the dataset's own
 * included, so a dataset is freed before its context. */
#ifndef QKD_DATA_H
#define QKD_DATA_H

#include "core.h"
#include "model.h"
#include "tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct qkd_dataset qkd_dataset;

typedef enum qkd_split {
    QKD_SPLIT_TRAIN = 0,
    QKD_SPLIT_EVAL = 1
} qkd_split;

/* Called during long jobs with the work done so far out of total. Return
 * non-zero to cancel (the job then returns QKD_ERR_CANCELLED). */
typedef int (*qkd_progress_fn)(void *user, int64_t done, int64_t total);

/* A dataset holding a copy of ids[n]. vocab_size (> 0) bounds the ids
 * (every id must be in [0, vocab_size)) and is saved with them.
 * ctx is borrowed until the dataset is freed; errors are reported there.
 * *out: owned, free with qkd_dataset_free. Errors: INVALID_ARG (NULL,
 * vocab_size < 1), RANGE (an id outside the vocabulary: the message gives
 * its index), NO_MEMORY. @since 0.1 */
QKD_API qkd_status qkd_dataset_from_tokens(qkd_context *ctx, const int32_t *ids, size_t n,
                                           int vocab_size, qkd_dataset **out);

/* The whole UTF-8 file at path encoded with tok, BOS first (exactly
 * qkd_tokenizer_encode(tok, text, len, QKD_ENCODE_BOS, ...)). tok is only
 * used during the call. *out: owned. Errors: INVALID_ARG, IO (cannot open
 * or read), NO_MEMORY. @since 0.1 */
QKD_API qkd_status qkd_dataset_from_text(qkd_context *ctx, const qkd_tokenizer *tok,
                                         const char *path, qkd_dataset **out);

/* Read a token file (docs/formats.md). *out: owned. Errors: INVALID_ARG,
 * IO, FORMAT (bad magic, truncated or oversized, an id outside the stored
 * vocabulary: the message says where), UNSUPPORTED (a newer version),
 * NO_MEMORY. @since 0.1 */
QKD_API qkd_status qkd_dataset_load(qkd_context *ctx, const char *path, qkd_dataset **out);

/* Write the dataset as a token file: written to "<path>.tmp", flushed to
 * disk and renamed over path, so path is never left half-written.
 * Errors: INVALID_ARG, IO. @since 0.1 */
QKD_API qkd_status qkd_dataset_save(const qkd_dataset *ds, const char *path);

/* Accepts NULL. @since 0.1 */
QKD_API void qkd_dataset_free(qkd_dataset *ds);

/* Number of ids, and the ids themselves (borrowed until the dataset is
 * freed). @since 0.1 */
QKD_API size_t qkd_dataset_n_tokens(const qkd_dataset *ds);
QKD_API const int32_t *qkd_dataset_tokens(const qkd_dataset *ds);
/* The vocabulary size the ids are bounded by. @since 0.1 */
QKD_API int qkd_dataset_vocab_size(const qkd_dataset *ds);

/* ---- data-free generation (LLM-QAT) --------------------------------------
 * Sequence i is: BOS; a first token from a seeded walk over the vocabulary
 * (a pseudo-random permutation of the ids that can start a text: every id
 * except BOS, EOS, pieces written "<...>" (unknown, control) and byte
 * tokens "<0xNN>", but keeping the byte tokens of printable ASCII
 * characters that have no piece of their own; a new permutation once all
 * are used); greedy argmax continuations up to
 * n_greedy tokens after BOS (n_greedy drawn per sequence, seeded, in
 * [greedy_min, greedy_max]); then tokens sampled at `temperature` from the
 * top_k most probable (ties at the k-th logit included) with the library's
 * qkd_sampler at top_p 1, until seq_len tokens. BOS or EOS produced on the
 * way are kept and generation goes on, so every sequence has exactly
 * seq_len tokens (a new story starts after them, as in training data). */
typedef struct qkd_datafree_params {
    size_t size;            /* sizeof(qkd_datafree_params), set by _init */
    int64_t n_sequences;    /* > 0 */
    int seq_len;            /* tokens per sequence, BOS included: T + 1 for
                               windows of T; >= 2 */
    int greedy_min;         /* tokens after BOS chosen greedily (the walk's */
    int greedy_max;         /* first token included): 1 <= min <= max */
    int top_k;              /* > 0; 0 or >= vocab: the whole vocabulary */
    float temperature;      /* > 0 */
    uint64_t seed;          /* walk, greedy lengths and sampler */
    qkd_progress_fn progress; /* per finished sequence, or NULL */
    void *progress_user;
} qkd_datafree_params;

/* Defaults (LLM-QAT's): 64 sequences of 257 tokens, greedy 3..5, top-k 50,
 * temperature 1, seed 1, no progress callback. @since 0.1 */
QKD_API void qkd_datafree_params_init(qkd_datafree_params *p);

/* Let teacher write p->n_sequences sequences (qkd_model_decode, so the
 * teacher's key/value cache is reset). tok names BOS, EOS and the control
 * pieces; its vocabulary must be the model's. ctx is the teacher's context.
 * Deterministic for a seed on a given backend, whatever the thread count
 * (another backend's logits may differ in the last bits, and so may a
 * sampled token).
 * *out: owned (vocab_size = the model's). Errors: INVALID_ARG (bad params),
 * SHAPE (tokenizer and model vocabularies differ), RANGE (seq_len - 1 >
 * the model's max_seq_len: widen it with qkd_model_set_max_seq_len), STATE
 * (no id can start a sequence), CANCELLED, NO_MEMORY, and those of
 * qkd_model_decode and the sampler. @since 0.1 */
QKD_API qkd_status qkd_dataset_generate(qkd_context *ctx, qkd_model *teacher,
                                        const qkd_tokenizer *tok,
                                        const qkd_datafree_params *p, qkd_dataset **out);

/* ---- windows and batches ------------------------------------------------- */

/* Seed of the training order and number of held-out windows (the last
 * n_eval windows, for any T; all of them when n_eval >= their count).
 * Defaults: seed 1, n_eval 0. Errors: INVALID_ARG (n_eval < 0).
 * @since 0.1 */
QKD_API qkd_status qkd_dataset_set_split(qkd_dataset *ds, uint64_t seed, int64_t n_eval);

/* The seed and n_eval set by qkd_dataset_set_split (either pointer may be
 * NULL). Errors: INVALID_ARG. @since 0.1 */
QKD_API qkd_status qkd_dataset_get_split(const qkd_dataset *ds, uint64_t *seed,
                                         int64_t *n_eval);

/* Windows of T + 1 tokens in a split (0 when T < 1). @since 0.1 */
QKD_API int64_t qkd_dataset_n_windows(const qkd_dataset *ds, int T, qkd_split split);

/* Window `index` of a split: tokens[T] its first T ids, targets[T] (may be
 * NULL) the T ids after each. Errors: INVALID_ARG (NULL, T < 1), RANGE
 * (index outside the split). @since 0.1 */
QKD_API qkd_status qkd_dataset_window(const qkd_dataset *ds, qkd_split split, int64_t index,
                                      int T, int32_t *tokens, int32_t *targets);

/* The training batch of `step` (0-based): B windows in the seeded order
 * described above, tokens[B*T] and targets[B*T] (targets may be NULL),
 * row-major. Errors: INVALID_ARG (NULL, step < 0, B or T < 1), STATE (no
 * TRAIN window for this T: the message gives the counts). @since 0.1 */
QKD_API qkd_status qkd_dataset_batch(const qkd_dataset *ds, int64_t step, int B, int T,
                                     int32_t *tokens, int32_t *targets);

#ifdef __cplusplus
}
#endif
#endif
