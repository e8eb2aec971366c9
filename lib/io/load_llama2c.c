/* llama2.c legacy checkpoints: a header of 7 int32, then every weight as
 * little-endian fp32, each kind stored for all layers in a row. The file
 * must have exactly the size the header implies; weights are streamed
 * into the model one tensor at a time. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "io/io.h"
#include "model/model.h"

enum { DIM, HIDDEN, N_LAYERS, N_HEADS, N_KV_HEADS, VOCAB, SEQ_LEN, N_FIELDS };

static const char *const field_names[N_FIELDS] = {
    "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"
};

/* The weights in file order; per_layer kinds are stored [n_layers][...].
 * The RoPE tables (freq_cis_real/imag) follow, then the classifier when
 * it is not tied to the embedding. */
static const struct { qkd_tensor_kind kind; bool per_layer; } file_order[] = {
    {QKD_TENSOR_TOKEN_EMBD, false},
    {QKD_TENSOR_ATTN_NORM, true}, {QKD_TENSOR_ATTN_Q, true}, {QKD_TENSOR_ATTN_K, true},
    {QKD_TENSOR_ATTN_V, true}, {QKD_TENSOR_ATTN_OUTPUT, true}, {QKD_TENSOR_FFN_NORM, true},
    {QKD_TENSOR_FFN_GATE, true}, {QKD_TENSOR_FFN_DOWN, true}, {QKD_TENSOR_FFN_UP, true},
    {QKD_TENSOR_OUTPUT_NORM, false},
};

/* acc += a * b, false on overflow. */
static bool mul_add(uint64_t *acc, uint64_t a, uint64_t b)
{
    if (b && a > UINT64_MAX / b)
        return false;
    if (a * b > UINT64_MAX - *acc)
        return false;
    *acc += a * b;
    return true;
}

/* Number of floats the header implies, false on overflow. */
static bool expected_floats(const int32_t *h, uint64_t *total)
{
    uint64_t dim = (uint64_t)h[DIM], hidden = (uint64_t)h[HIDDEN];
    uint64_t kv_dim = dim / (uint64_t)h[N_HEADS] * (uint64_t)h[N_KV_HEADS];
    uint64_t vocab = (uint64_t)(h[VOCAB] < 0 ? -(int64_t)h[VOCAB] : h[VOCAB]);
    uint64_t half_head = dim / (uint64_t)h[N_HEADS] / 2;
    uint64_t layer = 0;
    *total = 0;
    return mul_add(&layer, 2, dim)                        /* rms_att, rms_ffn */
        && mul_add(&layer, 2 * dim, dim)                  /* wq, wo */
        && mul_add(&layer, 2 * kv_dim, dim)               /* wk, wv */
        && mul_add(&layer, 3 * hidden, dim)               /* w1, w2, w3 */
        && mul_add(total, (uint64_t)h[N_LAYERS], layer)
        && mul_add(total, vocab, dim * (h[VOCAB] < 0 ? 2 : 1)) /* embedding, wcls */
        && mul_add(total, 1, dim)                         /* rms_final */
        && mul_add(total, 2 * (uint64_t)h[SEQ_LEN], half_head); /* freq_cis */
}

static qkd_status check_header(qkd_context *ctx, const char *path, const int32_t *h,
                               uint64_t file_size, qkd_model_config *cfg)
{
    for (int i = 0; i < N_FIELDS; i++)
        if (h[i] <= 0 && !(i == VOCAB && h[i] < 0 && h[i] != INT32_MIN))
            return qkd__error(ctx, QKD_ERR_FORMAT, "%s: header field %s is %d", path,
                              field_names[i], (int)h[i]);
    qkd_model_config_init(cfg);
    cfg->dim = h[DIM];
    cfg->hidden_dim = h[HIDDEN];
    cfg->n_layers = h[N_LAYERS];
    cfg->n_heads = h[N_HEADS];
    cfg->n_kv_heads = h[N_KV_HEADS];
    cfg->vocab_size = h[VOCAB] < 0 ? -h[VOCAB] : h[VOCAB];
    cfg->max_seq_len = h[SEQ_LEN];
    cfg->tied_embeddings = h[VOCAB] > 0;
    if (qkd__model_config_check(ctx, cfg) != QKD_OK) {
        char why[QKD__ERROR_LEN];
        snprintf(why, sizeof why, "%s", ctx->last_error);
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: the header describes no valid model: %s",
                          path, why);
    }
    uint64_t n;
    if (!expected_floats(h, &n) || n > (UINT64_MAX - 28) / 4)
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: the header's sizes overflow", path);
    if (28 + 4 * n != file_size)
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: the header implies %llu bytes, the file "
                          "has %llu", path, (unsigned long long)(28 + 4 * n),
                          (unsigned long long)file_size);
    return QKD_OK;
}

static qkd_status read_floats(qkd_context *ctx, const char *path, FILE *f, float *dst,
                              size_t n)
{
    long long pos = (long long)ftello(f);
    if (fread(dst, sizeof *dst, n, f) != n)
        return qkd__error(ctx, QKD_ERR_IO, "%s: short read of %zu floats at byte %lld",
                          path, n, pos);
    return QKD_OK;
}

static int64_t largest_tensor(const qkd_model *m)
{
    int64_t most = 0;
    for (int i = 0; i < qkd_model_n_tensors(m); i++) {
        qkd_tensor_info info = {.size = sizeof info};
        if (qkd_model_tensor_info(m, i, &info) == QKD_OK && info.n_elements > most)
            most = info.n_elements;
    }
    return most;
}

static qkd_status read_tensor(qkd_model *m, const char *path, FILE *f, float *buf, int index)
{
    qkd_context *ctx = qkd__model_context(m);
    qkd_tensor_info info = {.size = sizeof info};
    qkd_status s = qkd_model_tensor_info(m, index, &info);
    if (s == QKD_OK)
        s = read_floats(ctx, path, f, buf, (size_t)info.n_elements);
    if (s == QKD_OK)
        s = qkd_model_tensor_set(m, index, buf, (size_t)info.n_elements);
    return s;
}

static qkd_status read_weights(qkd_model *m, const char *path, FILE *f,
                               const qkd_model_config *cfg)
{
    qkd_context *ctx = qkd__model_context(m);
    float *buf = qkd__calloc(ctx, (size_t)largest_tensor(m), sizeof *buf);
    if (!buf)
        return qkd__error(ctx, QKD_ERR_NO_MEMORY, "%s: no memory for a tensor buffer", path);
    qkd_status s = QKD_OK;
    for (size_t k = 0; k < sizeof file_order / sizeof file_order[0]; k++) {
        bool per_layer = file_order[k].per_layer;
        for (int l = 0; l < (per_layer ? cfg->n_layers : 1) && s == QKD_OK; l++)
            s = read_tensor(m, path, f, buf,
                            qkd__model_tensor_index(m, file_order[k].kind, per_layer ? l : -1));
    }
    if (s == QKD_OK && !cfg->tied_embeddings) {
        off_t rope_bytes = (off_t)cfg->max_seq_len * (cfg->dim / cfg->n_heads / 2) * 2 * 4;
        if (fseeko(f, rope_bytes, SEEK_CUR) != 0)
            s = qkd__error(ctx, QKD_ERR_IO, "%s: cannot skip the RoPE tables: %s", path,
                           strerror(errno));
        if (s == QKD_OK)
            s = read_tensor(m, path, f, buf, qkd__model_tensor_index(m, QKD_TENSOR_OUTPUT, -1));
    }
    qkd__free(ctx, buf);
    return s;
}

qkd_status qkd__load_llama2c(qkd_context *ctx, const char *path, qkd_model **out)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return qkd__error(ctx, QKD_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    int32_t h[N_FIELDS];
    qkd_model_config cfg;
    qkd_status s = QKD_OK;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode))
        s = qkd__error(ctx, QKD_ERR_IO, "%s: not a readable regular file", path);
    else if (st.st_size < (off_t)sizeof h)
        s = qkd__error(ctx, QKD_ERR_FORMAT, "%s: %lld bytes, too short for the %zu-byte "
                       "llama2.c header", path, (long long)st.st_size, sizeof h);
    else if (fread(h, sizeof h, 1, f) != 1)
        s = qkd__error(ctx, QKD_ERR_IO, "%s: cannot read the header", path);
    else
        s = check_header(ctx, path, h, (uint64_t)st.st_size, &cfg);
    qkd_model *m = NULL;
    if (s == QKD_OK)
        s = qkd_model_create(ctx, &cfg, &m);
    if (s == QKD_OK)
        s = read_weights(m, path, f, &cfg);
    fclose(f);
    if (s != QKD_OK) {
        qkd_model_free(m);
        return s;
    }
    *out = m;
    return QKD_OK;
}
