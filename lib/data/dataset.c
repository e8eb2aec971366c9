/* Token datasets: creation from ids and text, windows, seeded batches. */
#include "data/dataset.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qkd/qkd.h>

uint64_t qkd__mix64(uint64_t x)
{
    x += UINT64_C(0x9e3779b97f4a7c15);
    x = (x ^ (x >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)) * UINT64_C(0x94d049bb133111eb);
    return x ^ (x >> 31);
}

int64_t qkd__permute(int64_t i, int64_t n, uint64_t key)
{
    int half = 1; /* bits per Feistel half: 2^(2 half) >= n */
    while (half < 31 && (UINT64_C(1) << (2 * half)) < (uint64_t)n)
        half++;
    const uint64_t mask = (UINT64_C(1) << half) - 1;
    uint64_t x = (uint64_t)i;
    /* The Feistel rounds permute [0, 4^half); walking the cycle until the
     * value falls below n permutes [0, n) (fewer than 4 rounds expected). */
    do {
        uint64_t l = x >> half, r = x & mask;
        for (uint64_t round = 0; round < 4; round++) {
            uint64_t t = l ^ (qkd__mix64(key ^ (round << 60) ^ r) & mask);
            l = r;
            r = t;
        }
        x = (l << half) | r;
    } while (x >= (uint64_t)n);
    return (int64_t)x;
}

qkd_status qkd__dataset_adopt(qkd_context *ctx, int32_t *ids, size_t n, int vocab_size,
                              qkd_dataset **out)
{
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= vocab_size) {
            qkd_status st = qkd_context_set_error(
                ctx, QKD_ERR_RANGE, "dataset: token %d at index %zu is outside the vocabulary of %d",
                ids[i], i, vocab_size);
            qkd_context_dealloc(ctx, ids);
            return st;
        }
    }
    qkd_dataset *ds = qkd_context_alloc(ctx, sizeof *ds);
    if (!ds) {
        qkd_context_dealloc(ctx, ids);
        return qkd_context_set_error(ctx, QKD_ERR_NO_MEMORY, "dataset: out of memory");
    }
    *ds = (qkd_dataset){.ctx = ctx, .ids = ids, .n = n, .vocab_size = vocab_size, .seed = 1};
    *out = ds;
    return QKD_OK;
}

qkd_status qkd_dataset_from_tokens(qkd_context *ctx, const int32_t *ids, size_t n,
                                   int vocab_size, qkd_dataset **out)
{
    if (out)
        *out = NULL;
    if (!ctx || !out || (!ids && n > 0))
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG, "dataset: NULL argument");
    if (vocab_size < 1)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG,
                                     "dataset: vocab_size %d must be >= 1", vocab_size);
    int32_t *copy = n > SIZE_MAX / sizeof *copy ? NULL
                                                : qkd_context_alloc(ctx, n * sizeof *copy);
    if (!copy)
        return qkd_context_set_error(ctx, QKD_ERR_NO_MEMORY,
                                     "dataset: out of memory for %zu tokens", n);
    if (n)
        memcpy(copy, ids, n * sizeof *copy);
    return qkd__dataset_adopt(ctx, copy, n, vocab_size, out);
}

/* The file's bytes (owned: qkd_context_dealloc) and length. */
static qkd_status read_all(qkd_context *ctx, const char *path, char **buf, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return qkd_context_set_error(ctx, QKD_ERR_IO, "%s: cannot open: %s", path,
                                     strerror(errno));
    qkd_status st = QKD_OK;
    long n = -1;
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0)
        st = qkd_context_set_error(ctx, QKD_ERR_IO, "%s: cannot seek: %s", path,
                                   strerror(errno));
    *buf = st == QKD_OK ? qkd_context_alloc(ctx, (size_t)n + 1) : NULL;
    if (st == QKD_OK && !*buf)
        st = qkd_context_set_error(ctx, QKD_ERR_NO_MEMORY, "%s: out of memory for %ld bytes",
                                   path, n);
    if (st == QKD_OK && fread(*buf, 1, (size_t)n, f) != (size_t)n)
        st = qkd_context_set_error(ctx, QKD_ERR_IO, "%s: read error", path);
    fclose(f);
    if (st != QKD_OK) {
        qkd_context_dealloc(ctx, *buf);
        *buf = NULL;
        return st;
    }
    *len = (size_t)n;
    return QKD_OK;
}

/* Encode text with BOS into an owned array, growing it if the first
 * guess (one id per byte, plus BOS and the leading space) is short. */
static qkd_status encode_all(qkd_context *ctx, const qkd_tokenizer *tok, const char *path,
                             const char *text, size_t len, int32_t **ids, size_t *n)
{
    size_t cap = len + 2;
    for (int attempt = 0; attempt < 2; attempt++) {
        *ids = qkd_context_alloc(ctx, cap * sizeof **ids);
        if (!*ids)
            return qkd_context_set_error(ctx, QKD_ERR_NO_MEMORY,
                                         "%s: out of memory for %zu tokens", path, cap);
        qkd_status st = qkd_tokenizer_encode(tok, text, len, QKD_ENCODE_BOS, *ids, cap, n);
        if (st == QKD_OK)
            return QKD_OK;
        qkd_context_dealloc(ctx, *ids);
        *ids = NULL;
        if (st != QKD_ERR_RANGE)
            return qkd_context_set_error(ctx, st, "%s: cannot encode the text (%s)", path,
                                         qkd_status_str(st));
        cap = *n;
    }
    return qkd_context_set_error(ctx, QKD_ERR_RANGE, "%s: encoding did not fit", path);
}

qkd_status qkd_dataset_from_text(qkd_context *ctx, const qkd_tokenizer *tok, const char *path,
                                 qkd_dataset **out)
{
    if (out)
        *out = NULL;
    if (!ctx || !tok || !path || !out)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG, "dataset: NULL argument");
    char *text = NULL;
    size_t len = 0;
    qkd_status st = read_all(ctx, path, &text, &len);
    if (st != QKD_OK)
        return st;
    int32_t *ids = NULL;
    size_t n = 0;
    st = encode_all(ctx, tok, path, text, len, &ids, &n);
    qkd_context_dealloc(ctx, text);
    if (st != QKD_OK)
        return st;
    return qkd__dataset_adopt(ctx, ids, n, qkd_tokenizer_vocab_size(tok), out);
}

void qkd_dataset_free(qkd_dataset *ds)
{
    if (!ds)
        return;
    qkd_context_dealloc(ds->ctx, ds->ids);
    qkd_context_dealloc(ds->ctx, ds);
}

size_t qkd_dataset_n_tokens(const qkd_dataset *ds)
{
    return ds ? ds->n : 0;
}

const int32_t *qkd_dataset_tokens(const qkd_dataset *ds)
{
    return ds ? ds->ids : NULL;
}

int qkd_dataset_vocab_size(const qkd_dataset *ds)
{
    return ds ? ds->vocab_size : 0;
}

qkd_status qkd_dataset_set_split(qkd_dataset *ds, uint64_t seed, int64_t n_eval)
{
    if (!ds)
        return QKD_ERR_INVALID_ARG;
    if (n_eval < 0)
        return qkd_context_set_error(ds->ctx, QKD_ERR_INVALID_ARG,
                                     "dataset: n_eval %lld must be >= 0", (long long)n_eval);
    ds->seed = seed;
    ds->n_eval = n_eval;
    return QKD_OK;
}

qkd_status qkd_dataset_get_split(const qkd_dataset *ds, uint64_t *seed, int64_t *n_eval)
{
    if (!ds)
        return QKD_ERR_INVALID_ARG;
    if (seed)
        *seed = ds->seed;
    if (n_eval)
        *n_eval = ds->n_eval;
    return QKD_OK;
}

/* ---- windows ---------------------------------------------------------------- */

static int64_t total_windows(const qkd_dataset *ds, int T)
{
    return T < 1 ? 0 : (int64_t)(ds->n / ((size_t)T + 1));
}

static int64_t eval_windows(const qkd_dataset *ds, int T)
{
    int64_t all = total_windows(ds, T);
    return ds->n_eval < all ? ds->n_eval : all;
}

int64_t qkd_dataset_n_windows(const qkd_dataset *ds, int T, qkd_split split)
{
    if (!ds)
        return 0;
    int64_t eval = eval_windows(ds, T);
    return split == QKD_SPLIT_EVAL ? eval : total_windows(ds, T) - eval;
}

/* Copy window w (absolute index) into tokens and targets. */
static void copy_window(const qkd_dataset *ds, int64_t w, int T, int32_t *tokens,
                        int32_t *targets)
{
    const int32_t *src = ds->ids + (size_t)w * ((size_t)T + 1);
    memcpy(tokens, src, (size_t)T * sizeof *tokens);
    if (targets)
        memcpy(targets, src + 1, (size_t)T * sizeof *targets);
}

qkd_status qkd_dataset_window(const qkd_dataset *ds, qkd_split split, int64_t index, int T,
                              int32_t *tokens, int32_t *targets)
{
    if (!ds)
        return QKD_ERR_INVALID_ARG;
    if (!tokens || T < 1)
        return qkd_context_set_error(ds->ctx, QKD_ERR_INVALID_ARG,
                                     "dataset: window needs tokens and T >= 1 (T = %d)", T);
    int64_t n = qkd_dataset_n_windows(ds, T, split);
    if (index < 0 || index >= n)
        return qkd_context_set_error(ds->ctx, QKD_ERR_RANGE,
                                     "dataset: window %lld is outside the %s split's %lld",
                                     (long long)index, split == QKD_SPLIT_EVAL ? "eval" : "train",
                                     (long long)n);
    int64_t first = split == QKD_SPLIT_EVAL ? total_windows(ds, T) - n : 0;
    copy_window(ds, first + index, T, tokens, targets);
    return QKD_OK;
}

qkd_status qkd_dataset_batch(const qkd_dataset *ds, int64_t step, int B, int T, int32_t *tokens,
                             int32_t *targets)
{
    if (!ds)
        return QKD_ERR_INVALID_ARG;
    if (!tokens || step < 0 || B < 1 || T < 1)
        return qkd_context_set_error(ds->ctx, QKD_ERR_INVALID_ARG,
                                     "dataset: batch needs tokens, step >= 0, B, T >= 1 "
                                     "(step %lld, B %d, T %d)", (long long)step, B, T);
    int64_t n_train = qkd_dataset_n_windows(ds, T, QKD_SPLIT_TRAIN);
    if (n_train < 1)
        return qkd_context_set_error(ds->ctx, QKD_ERR_STATE,
                                     "dataset: no training window of %d tokens: %zu tokens, "
                                     "%lld held out", T + 1, ds->n, (long long)eval_windows(ds, T));
    if (step > INT64_MAX / B - 1)
        return qkd_context_set_error(ds->ctx, QKD_ERR_RANGE, "dataset: step %lld is too large",
                                     (long long)step);
    for (int b = 0; b < B; b++) {
        int64_t k = step * B + b;
        uint64_t key = qkd__mix64(ds->seed ^ qkd__mix64((uint64_t)(k / n_train)));
        int64_t w = qkd__permute(k % n_train, n_train, key);
        copy_window(ds, w, T, tokens + (size_t)b * T, targets ? targets + (size_t)b * T : NULL);
    }
    return QKD_OK;
}
