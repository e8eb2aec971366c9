/* libqkd zero-shot evaluation: multiple-choice scoring by log-likelihood,
 * as lm-evaluation-harness (lm-eval) defines it, on any loaded model.
 * Built only on the public API.
 *
 * An item has a gold index and N choices; choice i is the text
 * continuations[i] following contexts[i] (one shared context, except for
 * WinoGrande). Its score is the sum of the log-probabilities of the
 * continuation's tokens given the context, computed as lm-eval does:
 * trailing white space of the context moves to the continuation, the
 * context and context + continuation are tokenized separately and the
 * continuation's tokens are those of the whole after the context's count;
 * a sequence longer than the model's max_seq_len + 1 keeps its last
 * tokens. Metrics over the items:
 *   acc       the share of items whose highest score is the gold choice;
 *   acc_norm  the same with each score divided by the length of the
 *             choice's answer text (choices[i], without the delimiter)
 *             in Unicode code points, lm-eval's len(choice) (its byte
 *             length for ASCII text);
 *   LAMBADA   one choice per item; acc is the share of items whose every
 *             continuation token is the model's argmax (greedy), and
 *             perplexity exp(-mean score).
 * Ties go to the lowest index, as numpy's argmax.
 *
 * Prompts (the continuation is " " + the answer text in every task):
 *   piqa        "Question: <goal>\nAnswer:"; the official files
 *               (valid.jsonl with its labels) or llm-foundry's piqa.jsonl;
 *   hellaswag   llama.cpp's text format, 6 lines per item (context, gold
 *               index, 4 endings), the context as the file gives it;
 *   arc_easy, arc_challenge, boolq
 *               llm-foundry's "query" + "\nAnswer:";
 *   winogrande  llm-foundry's context_options, each followed by the
 *               shared continuation (lm-eval's partial scoring);
 *   lambada     llm-foundry's context, continuation the last word;
 *   mc          any llm-foundry query/choices/gold file (copa,
 *               openbook_qa, siqa...): the query as it is.
 */
#ifndef QKD_EVAL_H
#define QKD_EVAL_H

#include "core.h"
#include "model.h"
#include "tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum qkd_eval_task {
    QKD_EVAL_PIQA = 0,
    QKD_EVAL_HELLASWAG = 1,
    QKD_EVAL_ARC_EASY = 2,
    QKD_EVAL_ARC_CHALLENGE = 3,
    QKD_EVAL_BOOLQ = 4,
    QKD_EVAL_WINOGRANDE = 5,
    QKD_EVAL_LAMBADA = 6,
    QKD_EVAL_MC = 7
} qkd_eval_task;

/* "piqa", "hellaswag", "arc_easy", "arc_challenge", "boolq",
 * "winogrande", "lambada", "mc"; NULL for an unknown value. @since 0.1 */
QKD_API const char *qkd_eval_task_name(qkd_eval_task task);
/* The task named name (as above). Errors: INVALID_ARG (NULL), NOT_FOUND
 * (no such task; nothing recorded). @since 0.1 */
QKD_API qkd_status qkd_eval_task_from_name(const char *name, qkd_eval_task *task);

typedef struct qkd_eval_set qkd_eval_set;

/* Parse a task's items from memory: text[len] is the data file's content
 * (UTF-8; JSON lines or HellaSwag's text format), labels[labels_len] the
 * official PIQA labels (one 0 or 1 per line; NULL for every other file).
 * name appears in messages ("name:LINE: what"). Blank JSON lines are
 * skipped. *out: owned, free with qkd_eval_set_free.
 * Errors: INVALID_ARG (NULL arguments, unknown task), FORMAT (bad JSON, a
 * missing or mistyped field, a gold index out of range, an empty choice,
 * fewer than two choices, a label count differing from the items, an
 * empty file: the message gives the line), NO_MEMORY. @since 0.1 */
QKD_API qkd_status qkd_eval_set_parse(qkd_context *ctx, qkd_eval_task task, const char *name,
                                      const char *text, size_t len, const char *labels,
                                      size_t labels_len, qkd_eval_set **out);

/* Read path (plain text, not compressed) and parse it. For the official
 * PIQA format the labels come from the file beside it, "X-labels.lst" for
 * "X.jsonl". Errors: those of qkd_eval_set_parse, IO (a file cannot be
 * read). @since 0.1 */
QKD_API qkd_status qkd_eval_set_load(qkd_context *ctx, qkd_eval_task task, const char *path,
                                     qkd_eval_set **out);

/* Accepts NULL. @since 0.1 */
QKD_API void qkd_eval_set_free(qkd_eval_set *set);

/* Number of items (0 for NULL). @since 0.1 */
QKD_API size_t qkd_eval_set_size(const qkd_eval_set *set);

typedef struct qkd_eval_item {
    size_t size;          /* sizeof(qkd_eval_item), set by the caller */
    int n_choices;        /* 1 for LAMBADA */
    int gold;             /* 0 for LAMBADA */
    size_t line;          /* 1-based line of the item in the data file */
    /* [n_choices] each, borrowed until the set is freed */
    const char *const *contexts;
    const char *const *continuations; /* with their leading delimiter */
    const char *const *choices;       /* the answer texts: acc_norm's lengths */
} qkd_eval_item;

/* Describe item index. Errors: INVALID_ARG (NULL, size field), RANGE.
 * @since 0.1 */
QKD_API qkd_status qkd_eval_set_item(const qkd_eval_set *set, size_t index,
                                     qkd_eval_item *item);

/* The scoring functions record errors on ctx, the context model was
 * created on.
 *
 * The log-likelihood of continuation given context under model, in
 * double precision from the model's float logits: *logprob the sum over
 * the continuation's tokens, *n_tokens their count, *greedy 1 if each is
 * its position's argmax. add_bos: 1 puts the tokenizer's BOS before the
 * context (as llama.cpp does; LLaMA models are trained so), 0 encodes the
 * text alone, as lm-eval's Hugging Face backend does by default (an empty
 * context then gets BOS). Outputs may be NULL. Discards the model's last
 * forward. Errors: INVALID_ARG (NULL model, tokenizer or strings; a
 * continuation of no tokens), SHAPE (the tokenizer has more tokens than
 * the model), RANGE (the continuation alone exceeds max_seq_len), those of
 * qkd_model_forward, NO_MEMORY. @since 0.1 */
QKD_API qkd_status qkd_eval_loglikelihood(qkd_context *ctx, qkd_model *model,
                                          const qkd_tokenizer *tok, const char *context,
                                          const char *continuation, int add_bos,
                                          double *logprob, int *n_tokens, int *greedy);

/* Called after each item; a non-zero return cancels the run. */
typedef int (*qkd_eval_progress_fn)(void *user, size_t done, size_t total);

typedef struct qkd_eval_params {
    size_t size;          /* sizeof(qkd_eval_params), set by _init */
    size_t limit;         /* score the first `limit` items; 0: all */
    int add_bos;          /* see qkd_eval_loglikelihood */
    qkd_eval_progress_fn progress; /* may be NULL */
    void *progress_user;
} qkd_eval_params;

/* Defaults: every item, add_bos 1, no progress callback. @since 0.1 */
QKD_API void qkd_eval_params_init(qkd_eval_params *p);

/* Score every choice of item index: lls[n_choices] receives the
 * log-likelihoods (as qkd_eval_loglikelihood computes them; the choices
 * are forwarded together as one batch) and greedy[n_choices] (may be
 * NULL) their greedy flags. Errors: as qkd_eval_loglikelihood, RANGE
 * (index). @since 0.1 */
QKD_API qkd_status qkd_eval_item_score(qkd_context *ctx, qkd_model *model,
                                       const qkd_tokenizer *tok, const qkd_eval_set *set,
                                       size_t index, int add_bos, double *lls, int *greedy);

typedef struct qkd_eval_result {
    size_t size;          /* sizeof(qkd_eval_result), set by the caller */
    qkd_eval_task task;
    size_t n_items;       /* items scored */
    double acc, acc_stderr;           /* stderr: sqrt(acc (1 - acc) / (n - 1)) */
    double acc_norm, acc_norm_stderr; /* NaN for LAMBADA */
    double perplexity;                /* LAMBADA only; NaN otherwise */
} qkd_eval_result;

/* Score the set's items (p may be NULL for defaults) into *res.
 * Errors: INVALID_ARG (NULL, size fields), CANCELLED (by progress: *res
 * then holds the items scored so far), those of qkd_eval_item_score.
 * @since 0.1 */
QKD_API qkd_status qkd_eval_run(qkd_context *ctx, qkd_model *model,
                                const qkd_tokenizer *tok, const qkd_eval_set *set,
                                const qkd_eval_params *p, qkd_eval_result *res);

#ifdef __cplusplus
}
#endif
#endif
