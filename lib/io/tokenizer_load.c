/* Tokenizer files: llama2.c's tokenizer.bin and the tokenizer.ggml.* keys of
 * a GGUF file, read into a vocabulary and handed to qkd__tokenizer_create. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "io/io.h"
#include "tokenizer/tokenizer.h"

/* Far above any real tokenizer.bin (Llama 2's is 0.4 MB). */
#define MAX_TOKENIZER_BYTES ((size_t)1 << 30)

/* llama2.c's fixed special ids. */
enum { LLAMA2C_UNK = 0, LLAMA2C_BOS = 1, LLAMA2C_EOS = 2 };

/* A vocabulary whose pieces are borrowed from the file's bytes. */
typedef struct vocab {
    size_t n;
    const char **pieces;
    size_t *lens;
    float *scores;
} vocab;

static qkd_status vocab_alloc(qkd_context *ctx, size_t cap, vocab *v)
{
    v->n = 0;
    v->pieces = qkd__calloc(ctx, cap, sizeof *v->pieces);
    v->lens = qkd__calloc(ctx, cap, sizeof *v->lens);
    v->scores = qkd__calloc(ctx, cap, sizeof *v->scores);
    if (v->pieces && v->lens && v->scores)
        return QKD_OK;
    return qkd__error(ctx, QKD_ERR_NO_MEMORY, "tokenizer: out of memory for %zu tokens", cap);
}

static void vocab_free(qkd_context *ctx, vocab *v)
{
    qkd__free(ctx, v->pieces);
    qkd__free(ctx, v->lens);
    qkd__free(ctx, v->scores);
}

/* Put "name: " before the last error unless it already starts with it, so
 * every message of a load names the file. */
static qkd_status with_name(qkd_context *ctx, const char *name, qkd_status st)
{
    size_t n = strlen(name);
    if (st == QKD_OK || (strncmp(ctx->last_error, name, n) == 0 && ctx->last_error[n] == ':'))
        return st;
    char msg[QKD__ERROR_LEN];
    memcpy(msg, ctx->last_error, sizeof msg);
    return qkd__error(ctx, st, "%s: %s", name, msg);
}

/* ---- llama2.c tokenizer.bin ----------------------------------------------
 * int32 max_token_length, then until EOF per token: float32 score, int32
 * length, that many bytes. */

static int32_t read_i32(const uint8_t *p)
{
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static qkd_status parse_llama2c(qkd_context *ctx, const char *path, const uint8_t *data,
                                size_t len, vocab *v)
{
    if (len < 4)
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: truncated header (%zu bytes)", path, len);
    int32_t max_len = read_i32(data);
    if (max_len < 1)
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: max_token_length %d is not positive",
                          path, (int)max_len);
    qkd_status st = vocab_alloc(ctx, len / 8 + 1, v); /* records take >= 8 bytes */
    for (size_t pos = 4; pos < len && st == QKD_OK; v->n++) {
        if (len - pos < 8)
            return qkd__error(ctx, QKD_ERR_FORMAT, "%s: token %zu truncated at byte %zu "
                              "of %zu", path, v->n, pos, len);
        int32_t n = read_i32(data + pos + 4);
        if (n < 0 || n > max_len)
            return qkd__error(ctx, QKD_ERR_FORMAT, "%s: token %zu at byte %zu has length "
                              "%d, outside 0..max_token_length (%d)", path, v->n, pos,
                              (int)n, (int)max_len);
        if ((size_t)n > len - pos - 8)
            return qkd__error(ctx, QKD_ERR_FORMAT, "%s: token %zu at byte %zu needs %d "
                              "bytes, the file ends after %zu", path, v->n, pos, (int)n,
                              len - pos - 8);
        memcpy(&v->scores[v->n], data + pos, sizeof(float));
        v->pieces[v->n] = (const char *)data + pos + 8;
        v->lens[v->n] = (size_t)n;
        pos += 8 + (size_t)n;
    }
    return st;
}

qkd_status qkd__tokenizer_load_llama2c(qkd_context *ctx, const char *path,
                                       qkd_tokenizer **out)
{
    *out = NULL;
    uint8_t *data;
    size_t len;
    qkd_status st = qkd__read_file(ctx, path, MAX_TOKENIZER_BYTES, &data, &len);
    if (st != QKD_OK)
        return st;
    vocab v = {0};
    st = parse_llama2c(ctx, path, data, len, &v);
    if (st == QKD_OK && v.n == 0)
        st = qkd__error(ctx, QKD_ERR_FORMAT, "%s: no tokens after the header", path);
    if (st == QKD_OK)
        st = with_name(ctx, path, qkd__tokenizer_create(ctx, (int)v.n, v.pieces, v.lens,
                                                        v.scores, NULL, LLAMA2C_BOS,
                                                        LLAMA2C_EOS, LLAMA2C_UNK, out));
    vocab_free(ctx, &v);
    qkd__free(ctx, data);
    return st;
}

/* ---- GGUF tokenizer.ggml.* -------------------------------------------------- */

static qkd_status check_gguf_model(qkd_context *ctx, const qkd__gguf *g)
{
    const char *model;
    uint64_t len;
    qkd_status st = qkd__gguf_get_str(g, "tokenizer.ggml.model", &model, &len);
    if (st == QKD_ERR_NOT_FOUND)
        return qkd__error(ctx, QKD_ERR_FORMAT, "tokenizer.ggml.tokens without "
                          "tokenizer.ggml.model");
    if (st == QKD_OK && (len != 5 || memcmp(model, "llama", 5) != 0))
        st = qkd__error(ctx, QKD_ERR_UNSUPPORTED, "tokenizer model \"%.*s\" is not supported "
                        "(only \"llama\", sentencepiece BPE)", len > 64 ? 64 : (int)len, model);
    return st;
}

/* FORMAT unless the array `key` has n elements; NOT_FOUND (not recorded)
 * if the file lacks it. */
static qkd_status check_count(qkd_context *ctx, const qkd__gguf *g, const char *key,
                              uint64_t n)
{
    qkd__gguf_type type;
    uint64_t count;
    qkd_status st = qkd__gguf_get_arr(g, key, &type, &count);
    if (st == QKD_OK && count != n)
        st = qkd__error(ctx, QKD_ERR_FORMAT, "%s has %llu entries for %llu tokens", key,
                        (unsigned long long)count, (unsigned long long)n);
    return st;
}

/* A special token id: default when the key is absent. */
static qkd_status gguf_token_id(qkd_context *ctx, const qkd__gguf *g, const char *key,
                                int32_t def, int32_t *out)
{
    uint32_t v;
    qkd_status st = qkd__gguf_get_u32(g, key, &v);
    *out = def;
    if (st == QKD_ERR_NOT_FOUND)
        return QKD_OK;
    if (st == QKD_OK && v > INT32_MAX)
        st = qkd__error(ctx, QKD_ERR_FORMAT, "%s = %u is out of range", key, v);
    if (st == QKD_OK)
        *out = (int32_t)v;
    return st;
}

static qkd_status read_gguf_pieces(const qkd__gguf *g, vocab *v)
{
    qkd_status st = QKD_OK;
    for (size_t i = 0; i < v->n && st == QKD_OK; i++) {
        uint64_t len;
        st = qkd__gguf_arr_str(g, "tokenizer.ggml.tokens", i, &v->pieces[i], &len);
        v->lens[i] = (size_t)len;
    }
    return st;
}

/* Token types are optional (NULL: derived from the pieces). */
static qkd_status read_gguf_types(qkd_context *ctx, const qkd__gguf *g, size_t n,
                                  int32_t **types)
{
    *types = NULL;
    const char *key = "tokenizer.ggml.token_type";
    qkd_status st = check_count(ctx, g, key, n);
    if (st == QKD_ERR_NOT_FOUND)
        return QKD_OK;
    if (st == QKD_OK && !(*types = qkd__calloc(ctx, n, sizeof **types)))
        st = qkd__error(ctx, QKD_ERR_NO_MEMORY, "tokenizer: out of memory for %zu types", n);
    if (st == QKD_OK)
        st = qkd__gguf_arr_i32(g, key, *types, n);
    return st;
}

static qkd_status read_gguf_vocab(qkd_context *ctx, const qkd__gguf *g, vocab *v,
                                  int32_t **types)
{
    qkd_status st = check_count(ctx, g, "tokenizer.ggml.scores", v->n);
    if (st == QKD_ERR_NOT_FOUND)
        st = qkd__error(ctx, QKD_ERR_FORMAT, "tokenizer.ggml.tokens without "
                        "tokenizer.ggml.scores");
    if (st == QKD_OK)
        st = qkd__gguf_arr_f32(g, "tokenizer.ggml.scores", v->scores, v->n);
    if (st == QKD_OK)
        st = read_gguf_pieces(g, v);
    if (st == QKD_OK)
        st = read_gguf_types(ctx, g, v->n, types);
    return st;
}

qkd_status qkd__tokenizer_from_gguf(qkd_context *ctx, const qkd__gguf *g,
                                    qkd_tokenizer **out)
{
    *out = NULL;
    qkd__gguf_type type;
    uint64_t n;
    qkd_status st = qkd__gguf_get_arr(g, "tokenizer.ggml.tokens", &type, &n);
    if (st != QKD_OK)
        return st; /* NOT_FOUND: the file has no tokenizer, not an error */
    st = check_gguf_model(ctx, g);
    if (st == QKD_OK && (n < 1 || n > INT32_MAX))
        st = qkd__error(ctx, QKD_ERR_FORMAT, "tokenizer.ggml.tokens has %llu entries",
                        (unsigned long long)n);
    if (st != QKD_OK)
        return st;
    vocab v = {0};
    int32_t *types = NULL, bos, eos, unk;
    st = vocab_alloc(ctx, (size_t)n, &v);
    v.n = (size_t)n;
    if (st == QKD_OK)
        st = read_gguf_vocab(ctx, g, &v, &types);
    if (st == QKD_OK)
        st = gguf_token_id(ctx, g, "tokenizer.ggml.bos_token_id", LLAMA2C_BOS, &bos);
    if (st == QKD_OK)
        st = gguf_token_id(ctx, g, "tokenizer.ggml.eos_token_id", LLAMA2C_EOS, &eos);
    if (st == QKD_OK)
        st = gguf_token_id(ctx, g, "tokenizer.ggml.unknown_token_id", LLAMA2C_UNK, &unk);
    if (st == QKD_OK)
        st = qkd__tokenizer_create(ctx, (int)n, v.pieces, v.lens, v.scores, types, bos,
                                   eos, unk, out);
    qkd__free(ctx, types);
    vocab_free(ctx, &v);
    return st;
}

/* ---- dispatch ----------------------------------------------------------- */

static qkd_status load_gguf(qkd_context *ctx, const char *path, qkd_tokenizer **out)
{
    qkd__gguf *g;
    qkd_status st = qkd__gguf_open(ctx, path, &g);
    if (st != QKD_OK)
        return st;
    st = qkd__tokenizer_from_gguf(ctx, g, out);
    if (st == QKD_ERR_NOT_FOUND)
        st = qkd__error(ctx, QKD_ERR_FORMAT, "%s: the GGUF file carries no tokenizer "
                        "(no tokenizer.ggml.tokens)", path);
    qkd__gguf_close(g);
    return with_name(ctx, path, st);
}

/* Whether the file starts with the GGUF magic. */
static qkd_status is_gguf_file(qkd_context *ctx, const char *path, bool *is_gguf)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return qkd__error(ctx, QKD_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    char magic[4];
    *is_gguf = fread(magic, 1, sizeof magic, f) == sizeof magic &&
               memcmp(magic, "GGUF", sizeof magic) == 0;
    fclose(f);
    return QKD_OK;
}

qkd_status qkd_tokenizer_load(qkd_context *ctx, const char *path, qkd_tokenizer **out)
{
    if (!ctx)
        return QKD_ERR_INVALID_ARG;
    if (!path || !out)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "qkd_tokenizer_load: NULL %s",
                          path ? "out" : "path");
    *out = NULL;
    bool gguf = false;
    qkd_status st = is_gguf_file(ctx, path, &gguf);
    if (st != QKD_OK)
        return st;
    return gguf ? load_gguf(ctx, path, out) : qkd__tokenizer_load_llama2c(ctx, path, out);
}
