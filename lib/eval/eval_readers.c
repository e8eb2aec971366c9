/* Readers of the zero-shot task files: JSON lines (official PIQA with its
 * labels file, MosaicML llm-foundry's sets) and llama.cpp's HellaSwag
 * text. Each builds drafts and hands them to qkd__eval_set_add. */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "eval/eval_impl.h"

#define MAX_CHOICES 64
#define HELLASWAG_LINES 6  /* context, gold, 4 endings */
#define HELLASWAG_ENDINGS 4

/* ---- lines ---- */

typedef struct line_iter {
    const char *p, *end;
    size_t line;          /* number of the line last returned, 1-based */
} line_iter;

/* The next line without its "\n" or "\r\n"; false at the end. */
static bool next_line(line_iter *it, const char **s, size_t *n)
{
    if (!it->p || it->p >= it->end)
        return false;
    const char *nl = memchr(it->p, '\n', (size_t)(it->end - it->p));
    const char *stop = nl ? nl : it->end;
    *s = it->p;
    *n = (size_t)(stop - it->p);
    if (*n > 0 && (*s)[*n - 1] == '\r')
        (*n)--;
    it->p = nl ? nl + 1 : it->end;
    it->line++;
    return true;
}

static bool is_blank(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!strchr(" \t\r\n", s[i]))
            return false;
    return true;
}

static char *dup_line(const char *s, size_t n)
{
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = '\0';
    }
    return d;
}

/* A whole-line decimal integer (white space around it allowed). */
static bool parse_index(const char *s, size_t n, int *out)
{
    while (n > 0 && strchr(" \t", *s)) {
        s++;
        n--;
    }
    while (n > 0 && strchr(" \t", s[n - 1]))
        n--;
    if (n == 0 || n > 9)
        return false;
    int v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = 10 * v + (s[i] - '0');
    }
    *out = v;
    return true;
}

/* ---- JSON fields ---- */

typedef struct json_item {
    qkd_eval_set *set;
    const json_t *obj;
    size_t line;
} json_item;

static qkd_status field_error(const json_item *it, const char *key, const char *want)
{
    const json_t *v = json_object_get(it->obj, key);
    return qkd_context_set_error(it->set->ctx, QKD_ERR_FORMAT, "%s:%zu: %s field '%s'%s%s",
                                 it->set->name, it->line, v ? "bad" : "missing", key,
                                 v ? ": expected " : "", v ? want : "");
}

static qkd_status get_string(const json_item *it, const char *key, const char **out)
{
    *out = json_string_value(json_object_get(it->obj, key));
    return *out ? QKD_OK : field_error(it, key, "a string");
}

static qkd_status get_index(const json_item *it, const char *key, int *out)
{
    const json_t *v = json_object_get(it->obj, key);
    if (!json_is_integer(v) || json_integer_value(v) < -1000000 ||
        json_integer_value(v) > 1000000)
        return field_error(it, key, "an integer");
    *out = (int)json_integer_value(v);
    return QKD_OK;
}

/* A non-empty array of at most MAX_CHOICES strings into out[]. */
static qkd_status get_strings(const json_item *it, const char *key, const char **out, int *n)
{
    const json_t *arr = json_object_get(it->obj, key);
    size_t count = json_array_size(arr);
    if (!json_is_array(arr) || count == 0 || count > MAX_CHOICES)
        return field_error(it, key, "an array of 1 to 64 strings");
    for (size_t i = 0; i < count; i++) {
        out[i] = json_string_value(json_array_get(arr, i));
        if (!out[i])
            return field_error(it, key, "an array of strings");
    }
    *n = (int)count;
    return QKD_OK;
}

/* Build "a" "b" "c" (owned, free()). */
static char *concat3(const char *a, const char *b, const char *c)
{
    size_t la = strlen(a), lb = strlen(b), lc = strlen(c);
    char *s = malloc(la + lb + lc + 1);
    if (s) {
        memcpy(s, a, la);
        memcpy(s + la, b, lb);
        memcpy(s + la + lb, c, lc + 1);
    }
    return s;
}

/* Add n choices sharing context prefix + middle + suffix. */
static qkd_status add_shared(const json_item *it, const char *prefix, const char *middle,
                             const char *suffix, const char *const *answers, int n, int gold)
{
    char *context = concat3(prefix, middle, suffix);
    if (!context)
        return qkd_context_set_error(it->set->ctx, QKD_ERR_NO_MEMORY, "%s:%zu: out of memory",
                                     it->set->name, it->line);
    const char *contexts[MAX_CHOICES];
    for (int i = 0; i < n; i++)
        contexts[i] = context;
    qkd__eval_draft d = {n, gold, it->line, contexts, answers};
    qkd_status st = qkd__eval_set_add(it->set, &d);
    free(context);
    return st;
}

/* ---- the item shapes ---- */

/* llm-foundry's {"query", "choices", "gold"}: query + suffix. */
static qkd_status read_query_choices(const json_item *it, const char *suffix)
{
    const char *query, *choices[MAX_CHOICES];
    int n = 0, gold = 0;
    qkd_status st = get_string(it, "query", &query);
    if (st == QKD_OK)
        st = get_strings(it, "choices", choices, &n);
    if (st == QKD_OK)
        st = get_index(it, "gold", &gold);
    return st == QKD_OK ? add_shared(it, "", query, suffix, choices, n, gold) : st;
}

/* llm-foundry's {"context_options", "continuation", "gold"}: the one
 * continuation after each filled-in option (lm-eval's partial scoring). */
static qkd_status read_context_options(const json_item *it)
{
    const char *contexts[MAX_CHOICES], *answers[MAX_CHOICES], *cont;
    int n = 0, gold = 0;
    qkd_status st = get_strings(it, "context_options", contexts, &n);
    if (st == QKD_OK)
        st = get_string(it, "continuation", &cont);
    if (st == QKD_OK)
        st = get_index(it, "gold", &gold);
    if (st != QKD_OK)
        return st;
    for (int i = 0; i < n; i++)
        answers[i] = cont;
    qkd__eval_draft d = {n, gold, it->line, contexts, answers};
    return qkd__eval_set_add(it->set, &d);
}

/* llm-foundry's LAMBADA {"context", "continuation"}: one choice. */
static qkd_status read_lambada(const json_item *it)
{
    const char *context, *cont;
    qkd_status st = get_string(it, "context", &context);
    if (st == QKD_OK)
        st = get_string(it, "continuation", &cont);
    if (st != QKD_OK)
        return st;
    qkd__eval_draft d = {1, 0, it->line, &context, &cont};
    return qkd__eval_set_add(it->set, &d);
}

/* The labels of the official PIQA files, one 0 or 1 per line. */
typedef struct label_iter {
    line_iter lines;
    bool given;
} label_iter;

static qkd_status next_label(const json_item *it, label_iter *labels, int *gold)
{
    const char *s;
    size_t n;
    if (!labels->given)
        return qkd_context_set_error(it->set->ctx, QKD_ERR_FORMAT, "%s:%zu: an official PIQA "
                                     "item (goal, sol1, sol2) needs the labels file",
                                     it->set->name, it->line);
    if (!next_line(&labels->lines, &s, &n))
        return qkd_context_set_error(it->set->ctx, QKD_ERR_FORMAT, "%s:%zu: no label left "
                                     "for this item (the labels have %zu lines)", it->set->name,
                                     it->line, labels->lines.line);
    if (!parse_index(s, n, gold))
        return qkd_context_set_error(it->set->ctx, QKD_ERR_FORMAT, "%s labels:%zu: '%.*s' is "
                                     "not a label", it->set->name, labels->lines.line,
                                     (int)(n < 40 ? n : 40), s);
    return QKD_OK;
}

/* The official PIQA {"goal", "sol1", "sol2"}, as lm-eval prompts it. */
static qkd_status read_piqa_official(const json_item *it, label_iter *labels)
{
    const char *goal, *sols[2];
    int gold = 0;
    qkd_status st = get_string(it, "goal", &goal);
    if (st == QKD_OK)
        st = get_string(it, "sol1", &sols[0]);
    if (st == QKD_OK)
        st = get_string(it, "sol2", &sols[1]);
    if (st == QKD_OK)
        st = next_label(it, labels, &gold);
    return st == QKD_OK ? add_shared(it, "Question: ", goal, "\nAnswer:", sols, 2, gold) : st;
}

static qkd_status read_json_item(const json_item *it, label_iter *labels)
{
    switch (it->set->task) {
    case QKD_EVAL_PIQA:
        /* llm-foundry's query is "Question: <goal>\n" */
        return json_object_get(it->obj, "goal") ? read_piqa_official(it, labels)
                                                : read_query_choices(it, "Answer:");
    case QKD_EVAL_ARC_EASY:
    case QKD_EVAL_ARC_CHALLENGE:
    case QKD_EVAL_BOOLQ:
        return read_query_choices(it, "\nAnswer:");
    case QKD_EVAL_WINOGRANDE:
        return read_context_options(it);
    case QKD_EVAL_LAMBADA:
        return read_lambada(it);
    default:
        return read_query_choices(it, "");
    }
}

qkd_status qkd__eval_read_jsonl(qkd_eval_set *set, const char *text, size_t len,
                                const char *labels, size_t labels_len)
{
    line_iter lines = {text, text + len, 0};
    /* labels is NULL but for official PIQA: NULL + 0 is undefined in C */
    label_iter lab = {{labels, labels ? labels + labels_len : NULL, 0}, labels != NULL};
    const char *s;
    size_t n;
    qkd_status st = QKD_OK;
    while (st == QKD_OK && next_line(&lines, &s, &n)) {
        if (is_blank(s, n))
            continue;
        json_error_t err;
        json_t *obj = json_loadb(s, n, 0, &err);
        if (!json_is_object(obj))
            st = qkd_context_set_error(set->ctx, QKD_ERR_FORMAT, "%s:%zu: %s%s", set->name,
                                       lines.line, obj ? "not a JSON object" : "invalid JSON: ",
                                       obj ? "" : err.text);
        else
            st = read_json_item(&(json_item){set, obj, lines.line}, &lab);
        json_decref(obj);
    }
    while (st == QKD_OK && lab.given && next_line(&lab.lines, &s, &n))
        if (!is_blank(s, n))
            st = qkd_context_set_error(set->ctx, QKD_ERR_FORMAT, "%s labels:%zu: more labels "
                                       "than items (%zu)", set->name, lab.lines.line, set->n);
    return st;
}

/* ---- HellaSwag, llama.cpp's text format ---- */

/* Add the item whose 6 lines are lines[] (copies), starting at `line`. */
static qkd_status add_hellaswag(qkd_eval_set *set, char *const *lines, size_t line)
{
    int gold;
    if (!parse_index(lines[1], strlen(lines[1]), &gold))
        return qkd_context_set_error(set->ctx, QKD_ERR_FORMAT, "%s:%zu: gold index '%.40s' "
                                     "is not a number", set->name, line + 1, lines[1]);
    const char *contexts[HELLASWAG_ENDINGS], *answers[HELLASWAG_ENDINGS];
    for (int i = 0; i < HELLASWAG_ENDINGS; i++) {
        contexts[i] = lines[0];
        answers[i] = lines[2 + i];
    }
    qkd__eval_draft d = {HELLASWAG_ENDINGS, gold, line, contexts, answers};
    return qkd__eval_set_add(set, &d);
}

qkd_status qkd__eval_read_hellaswag(qkd_eval_set *set, const char *text, size_t len)
{
    line_iter it = {text, text + len, 0};
    char *lines[HELLASWAG_LINES] = {0};
    int have = 0, blank_tail = 0;
    size_t start = 0;
    const char *s;
    size_t n;
    qkd_status st = QKD_OK;
    while (st == QKD_OK && next_line(&it, &s, &n)) {
        if (have == 0) {
            start = it.line;
            blank_tail = is_blank(s, n);
        } else {
            blank_tail = blank_tail && is_blank(s, n);
        }
        lines[have] = dup_line(s, n);
        if (!lines[have])
            st = qkd_context_set_error(set->ctx, QKD_ERR_NO_MEMORY, "%s:%zu: out of memory",
                                       set->name, it.line);
        else if (++have == HELLASWAG_LINES)
            st = add_hellaswag(set, lines, start);
        if (have == HELLASWAG_LINES || st != QKD_OK) {
            for (int i = 0; i < have; i++)
                free(lines[i]);
            have = 0;
        }
    }
    for (int i = 0; i < have; i++)
        free(lines[i]);
    if (st == QKD_OK && have > 0 && !blank_tail)
        st = qkd_context_set_error(set->ctx, QKD_ERR_FORMAT, "%s:%zu: the item starting here "
                                   "has %d of its %d lines", set->name, start, have,
                                   HELLASWAG_LINES);
    return st;
}
