/* Internals of the zero-shot evaluation layer (lib/eval only): the item
 * store the readers fill. Public API only. */
#ifndef QKD_LIB_EVAL_IMPL_H
#define QKD_LIB_EVAL_IMPL_H

#include <stdbool.h>

#include <qkd/eval.h>

/* One item: n choices, each a (context, continuation, answer) triple of
 * strings in one allocation (`block`); equal contexts share a string. */
typedef struct qkd__eval_entry {
    int n_choices, gold;
    size_t line;
    const char **contexts, **continuations, **choices;
    void *block;
} qkd__eval_entry;

struct qkd_eval_set {
    qkd_context *ctx;
    qkd_eval_task task;
    const char *name;     /* for messages: the caller's, borrowed while parsing */
    qkd__eval_entry *items;
    size_t n, cap;
};

/* What a reader hands over for one item: answers[i] is the answer text,
 * prompted as " " + answers[i] after contexts[i]; contexts[i] == contexts[j]
 * (the same pointer) is stored once. */
typedef struct qkd__eval_draft {
    int n_choices, gold;
    size_t line;
    const char *const *contexts;
    const char *const *answers;
} qkd__eval_draft;

/* Check the draft (at least one choice, two for multiple choice; gold in
 * range; no empty answer) and append a copy. FORMAT naming the line,
 * NO_MEMORY. */
qkd_status qkd__eval_set_add(qkd_eval_set *set, const qkd__eval_draft *d);

/* The readers: fill set (created empty with its task) from text[len]. */
qkd_status qkd__eval_read_jsonl(qkd_eval_set *set, const char *text, size_t len,
                                const char *labels, size_t labels_len);
qkd_status qkd__eval_read_hellaswag(qkd_eval_set *set, const char *text, size_t len);

#endif
