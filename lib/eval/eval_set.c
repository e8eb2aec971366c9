/* The item store of a zero-shot task: parsing entry points, files, items. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eval/eval_impl.h"

#define MAX_FILE_BYTES ((size_t)1 << 31)

static const char *const task_names[] = {
    [QKD_EVAL_PIQA] = "piqa",
    [QKD_EVAL_HELLASWAG] = "hellaswag",
    [QKD_EVAL_ARC_EASY] = "arc_easy",
    [QKD_EVAL_ARC_CHALLENGE] = "arc_challenge",
    [QKD_EVAL_BOOLQ] = "boolq",
    [QKD_EVAL_WINOGRANDE] = "winogrande",
    [QKD_EVAL_LAMBADA] = "lambada",
    [QKD_EVAL_MC] = "mc",
};
enum { N_TASKS = sizeof task_names / sizeof task_names[0] };

const char *qkd_eval_task_name(qkd_eval_task task)
{
    return (unsigned)task < N_TASKS ? task_names[task] : NULL;
}

qkd_status qkd_eval_task_from_name(const char *name, qkd_eval_task *task)
{
    if (!name || !task)
        return QKD_ERR_INVALID_ARG;
    for (int i = 0; i < N_TASKS; i++) {
        if (strcmp(name, task_names[i]) == 0) {
            *task = (qkd_eval_task)i;
            return QKD_OK;
        }
    }
    return QKD_ERR_NOT_FOUND;
}

/* ---- items ---- */

static size_t str_size(const char *s)
{
    return strlen(s) + 1;
}

/* Copy s to *p (advancing it); returns the copy. */
static char *put(char **p, const char *prefix, const char *s)
{
    char *start = *p;
    size_t a = strlen(prefix), b = strlen(s);
    memcpy(start, prefix, a);
    memcpy(start + a, s, b + 1);
    *p += a + b + 1;
    return start;
}

static qkd_status check_draft(const qkd_eval_set *set, const qkd__eval_draft *d)
{
    int min_choices = set->task == QKD_EVAL_LAMBADA ? 1 : 2;
    if (d->n_choices < min_choices)
        return qkd_context_set_error(set->ctx, QKD_ERR_FORMAT, "%s:%zu: %d choice(s), "
                                     "%s needs at least %d", set->name, d->line, d->n_choices,
                                     task_names[set->task], min_choices);
    if (d->gold < 0 || d->gold >= d->n_choices)
        return qkd_context_set_error(set->ctx, QKD_ERR_FORMAT, "%s:%zu: gold index %d is "
                                     "outside 0..%d", set->name, d->line, d->gold,
                                     d->n_choices - 1);
    for (int i = 0; i < d->n_choices; i++)
        if (!d->answers[i][0])
            return qkd_context_set_error(set->ctx, QKD_ERR_FORMAT, "%s:%zu: choice %d is "
                                         "empty", set->name, d->line, i);
    return QKD_OK;
}

static bool grow(qkd_eval_set *set)
{
    if (set->n < set->cap)
        return true;
    size_t cap = set->cap ? 2 * set->cap : 256;
    qkd__eval_entry *items = realloc(set->items, cap * sizeof *items);
    if (!items)
        return false;
    set->items = items;
    set->cap = cap;
    return true;
}

qkd_status qkd__eval_set_add(qkd_eval_set *set, const qkd__eval_draft *d)
{
    qkd_status st = check_draft(set, d);
    if (st != QKD_OK)
        return st;
    const size_t n = (size_t)d->n_choices;
    size_t bytes = 3 * n * sizeof(char *);
    for (size_t i = 0; i < n; i++) {
        bool shared = i > 0 && d->contexts[i] == d->contexts[i - 1];
        bytes += (shared ? 0 : str_size(d->contexts[i])) + 2 * str_size(d->answers[i]) + 1;
    }
    void *block = malloc(bytes);
    if (!block || !grow(set)) {
        free(block);
        return qkd_context_set_error(set->ctx, QKD_ERR_NO_MEMORY, "%s:%zu: out of memory",
                                     set->name, d->line);
    }
    qkd__eval_entry *e = &set->items[set->n++];
    *e = (qkd__eval_entry){.n_choices = d->n_choices, .gold = d->gold, .line = d->line,
                           .block = block};
    e->contexts = block;
    e->continuations = e->contexts + n;
    e->choices = e->continuations + n;
    char *p = (char *)(e->choices + n);
    for (size_t i = 0; i < n; i++) {
        bool shared = i > 0 && d->contexts[i] == d->contexts[i - 1];
        e->contexts[i] = shared ? e->contexts[i - 1] : put(&p, "", d->contexts[i]);
        e->continuations[i] = put(&p, " ", d->answers[i]);
        e->choices[i] = put(&p, "", d->answers[i]);
    }
    return QKD_OK;
}

/* ---- sets ---- */

void qkd_eval_set_free(qkd_eval_set *set)
{
    if (!set)
        return;
    for (size_t i = 0; i < set->n; i++)
        free(set->items[i].block);
    free(set->items);
    free(set);
}

size_t qkd_eval_set_size(const qkd_eval_set *set)
{
    return set ? set->n : 0;
}

qkd_status qkd_eval_set_item(const qkd_eval_set *set, size_t index, qkd_eval_item *item)
{
    if (!set)
        return QKD_ERR_INVALID_ARG;
    if (!item || item->size < sizeof *item)
        return qkd_context_set_error(set->ctx, QKD_ERR_INVALID_ARG, "eval set_item: item is "
                                     "NULL or its size field is not set");
    if (index >= set->n)
        return qkd_context_set_error(set->ctx, QKD_ERR_RANGE, "eval set_item: index %zu of "
                                     "%zu items", index, set->n);
    const qkd__eval_entry *e = &set->items[index];
    *item = (qkd_eval_item){
        .size = sizeof *item,
        .n_choices = e->n_choices,
        .gold = e->gold,
        .line = e->line,
        .contexts = e->contexts,
        .continuations = e->continuations,
        .choices = e->choices,
    };
    return QKD_OK;
}

qkd_status qkd_eval_set_parse(qkd_context *ctx, qkd_eval_task task, const char *name,
                              const char *text, size_t len, const char *labels,
                              size_t labels_len, qkd_eval_set **out)
{
    if (!out)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG, "eval set_parse: NULL out");
    *out = NULL;
    if (!name || (!text && len > 0) || (!labels && labels_len > 0))
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG,
                                     "eval set_parse: NULL name, text or labels");
    if ((unsigned)task >= N_TASKS)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG, "eval set_parse: unknown task "
                                     "%d", (int)task);
    qkd_eval_set *set = calloc(1, sizeof *set);
    if (!set)
        return qkd_context_set_error(ctx, QKD_ERR_NO_MEMORY, "%s: out of memory", name);
    *set = (qkd_eval_set){.ctx = ctx, .task = task, .name = name};
    qkd_status st = task == QKD_EVAL_HELLASWAG
                        ? qkd__eval_read_hellaswag(set, text, len)
                        : qkd__eval_read_jsonl(set, text, len, labels, labels_len);
    if (st == QKD_OK && set->n == 0)
        st = qkd_context_set_error(ctx, QKD_ERR_FORMAT, "%s: no items", name);
    set->name = NULL;
    if (st != QKD_OK) {
        qkd_eval_set_free(set);
        return st;
    }
    *out = set;
    return QKD_OK;
}

/* ---- files ---- */

/* The whole file (owned, free()), or IO/NO_MEMORY recorded. */
static qkd_status read_all(qkd_context *ctx, const char *path, char **data, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return qkd_context_set_error(ctx, QKD_ERR_IO, "%s: cannot open: %s", path,
                                     strerror(errno));
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap || cap >= MAX_FILE_BYTES)
            break;
        char *grown = realloc(buf, 2 * cap);
        if (!grown) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = grown;
        cap *= 2;
    }
    bool failed = ferror(f) || (buf && n == cap);
    fclose(f);
    if (!buf)
        return qkd_context_set_error(ctx, QKD_ERR_NO_MEMORY, "%s: out of memory", path);
    if (failed) {
        free(buf);
        return qkd_context_set_error(ctx, QKD_ERR_IO, "%s: read error, or larger than %zu "
                                     "bytes", path, MAX_FILE_BYTES);
    }
    *data = buf;
    *len = n;
    return QKD_OK;
}

/* "X-labels.lst" beside "X.jsonl" (owned), NULL on no memory. */
static char *labels_path(const char *path)
{
    size_t n = strlen(path);
    if (n > 6 && strcmp(path + n - 6, ".jsonl") == 0)
        n -= 6;
    char *p = malloc(n + sizeof "-labels.lst");
    if (p) {
        memcpy(p, path, n);
        memcpy(p + n, "-labels.lst", sizeof "-labels.lst");
    }
    return p;
}

/* The official PIQA format: its first object has "goal". */
static bool is_piqa_official(const char *text, size_t len)
{
    const char *nl = memchr(text, '\n', len);
    size_t first = nl ? (size_t)(nl - text) : len;
    const char *key = "\"goal\"";
    for (size_t i = 0; i + strlen(key) <= first; i++)
        if (memcmp(text + i, key, strlen(key)) == 0)
            return true;
    return false;
}

qkd_status qkd_eval_set_load(qkd_context *ctx, qkd_eval_task task, const char *path,
                             qkd_eval_set **out)
{
    if (!path || !out)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG, "eval set_load: NULL argument");
    *out = NULL;
    char *text = NULL, *labels = NULL, *lpath = NULL;
    size_t len = 0, labels_len = 0;
    qkd_status st = read_all(ctx, path, &text, &len);
    if (st == QKD_OK && task == QKD_EVAL_PIQA && is_piqa_official(text, len)) {
        lpath = labels_path(path);
        st = lpath ? read_all(ctx, lpath, &labels, &labels_len)
                   : qkd_context_set_error(ctx, QKD_ERR_NO_MEMORY, "%s: out of memory", path);
    }
    if (st == QKD_OK)
        st = qkd_eval_set_parse(ctx, task, path, text, len, labels, labels_len, out);
    free(lpath);
    free(labels);
    free(text);
    return st;
}
