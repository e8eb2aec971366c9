/* LLaMA models in GGUF: the config from the llama.* keys, every tensor
 * checked against it, and the tokenizer from tokenizer.ggml.* if any. */
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "io/io.h"
#include "model/model.h"

/* A positive int from an integer key; def when the key is absent and
 * def > 0, FORMAT when it is absent and required (def <= 0). */
static qkd_status get_int(qkd_context *ctx, const qkd__gguf *g, const char *path,
                          const char *key, int def, int *out)
{
    uint32_t v;
    qkd_status s = qkd__gguf_get_u32(g, key, &v);
    if (s == QKD_ERR_NOT_FOUND && def > 0) {
        *out = def;
        return QKD_OK;
    }
    if (s == QKD_ERR_NOT_FOUND)
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: missing key %s", path, key);
    if (s == QKD_OK && (v == 0 || v > INT_MAX))
        s = qkd__error(ctx, QKD_ERR_FORMAT, "%s: key %s is %u", path, key, v);
    if (s == QKD_OK)
        *out = (int)v;
    return s;
}

static qkd_status get_float(const qkd__gguf *g, const char *key, float def, float *out)
{
    qkd_status s = qkd__gguf_get_f32(g, key, out);
    if (s == QKD_ERR_NOT_FOUND) {
        *out = def;
        return QKD_OK;
    }
    return s;
}

static qkd_status check_architecture(qkd_context *ctx, const qkd__gguf *g, const char *path)
{
    const char *arch;
    uint64_t len;
    qkd_status s = qkd__gguf_get_str(g, "general.architecture", &arch, &len);
    if (s == QKD_ERR_NOT_FOUND)
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: missing key general.architecture", path);
    if (s == QKD_OK && (len != 5 || memcmp(arch, "llama", 5) != 0))
        s = qkd__error(ctx, QKD_ERR_UNSUPPORTED, "%s: architecture '%.*s' (only llama is "
                       "read)", path, len > 64 ? 64 : (int)len, arch);
    return s;
}

/* Vocabulary size from token_embd.weight ([vocab][dim], ne = {dim, vocab}). */
static qkd_status vocab_size(qkd_context *ctx, const qkd__gguf *g, const char *path, int *out)
{
    const qkd__gguf_tensor *t;
    if (qkd__gguf_find_tensor(g, "token_embd.weight", &t) != QKD_OK)
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: missing tensor token_embd.weight", path);
    if (t->n_dims != 2 || t->ne[1] > INT_MAX)
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: tensor token_embd.weight has %u "
                          "dimensions and %llu rows", path, t->n_dims,
                          (unsigned long long)t->ne[1]);
    *out = (int)t->ne[1];
    return QKD_OK;
}

static qkd_status read_config(qkd_context *ctx, const qkd__gguf *g, const char *path,
                              qkd_model_config *cfg)
{
    const qkd__gguf_tensor *output;
    qkd_model_config_init(cfg);
    qkd_status s = check_architecture(ctx, g, path);
    if (s == QKD_OK)
        s = get_int(ctx, g, path, "llama.embedding_length", 0, &cfg->dim);
    if (s == QKD_OK)
        s = get_int(ctx, g, path, "llama.feed_forward_length", 0, &cfg->hidden_dim);
    if (s == QKD_OK)
        s = get_int(ctx, g, path, "llama.block_count", 0, &cfg->n_layers);
    if (s == QKD_OK)
        s = get_int(ctx, g, path, "llama.attention.head_count", 0, &cfg->n_heads);
    if (s == QKD_OK)
        s = get_int(ctx, g, path, "llama.attention.head_count_kv", cfg->n_heads,
                    &cfg->n_kv_heads);
    if (s == QKD_OK)
        s = get_int(ctx, g, path, "llama.context_length", 0, &cfg->max_seq_len);
    if (s == QKD_OK)
        s = get_float(g, "llama.rope.freq_base", 10000.0f, &cfg->rope_theta);
    if (s == QKD_OK)
        s = get_float(g, "llama.attention.layer_norm_rms_epsilon", 1e-5f, &cfg->norm_eps);
    if (s == QKD_OK)
        s = vocab_size(ctx, g, path, &cfg->vocab_size);
    if (s != QKD_OK)
        return s;
    cfg->tied_embeddings = qkd__gguf_find_tensor(g, "output.weight", &output) != QKD_OK;
    if (qkd__model_config_check(ctx, cfg) != QKD_OK) {
        char why[QKD__ERROR_LEN];
        snprintf(why, sizeof why, "%s", ctx->last_error);
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: the llama.* keys describe no valid "
                          "model: %s", path, why);
    }
    return qkd__check_backed(ctx, path, cfg, qkd__gguf_data_elements(g));
}

/* GGUF lists dimensions fastest first: a [rows][cols] weight has
 * ne = {cols, rows}. Trailing dimensions of 1 are allowed. */
static bool shape_matches(const qkd__gguf_tensor *t, const qkd_tensor_info *info)
{
    for (int d = 0; d < 4; d++) {
        int64_t want = d < info->n_dims ? info->shape[info->n_dims - 1 - d] : 1;
        if (t->ne[d] != (uint64_t)want)
            return false;
    }
    return true;
}

static qkd_status fill_tensor(qkd_model *m, qkd__gguf *g, const char *path, int index)
{
    qkd_context *ctx = qkd__model_context(m);
    qkd_tensor_info info = {.size = sizeof info};
    const qkd__gguf_tensor *t;
    qkd_status s = qkd_model_tensor_info(m, index, &info);
    if (s != QKD_OK)
        return s;
    if (qkd__gguf_find_tensor(g, info.name, &t) != QKD_OK)
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: missing tensor %s", path, info.name);
    if (!shape_matches(t, &info))
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: tensor %s has ne = {%llu, %llu, %llu, "
                          "%llu}; the config needs %d dims {%lld, %lld} (fastest first)",
                          path, info.name, (unsigned long long)t->ne[0],
                          (unsigned long long)t->ne[1], (unsigned long long)t->ne[2],
                          (unsigned long long)t->ne[3], info.n_dims,
                          (long long)info.shape[info.n_dims - 1],
                          (long long)(info.n_dims > 1 ? info.shape[0] : 1));
    float *buf = qkd__alloc(ctx, (size_t)info.n_elements * sizeof *buf);
    if (!buf)
        return qkd__error(ctx, QKD_ERR_NO_MEMORY, "%s: no memory for tensor %s", path,
                          info.name);
    s = qkd__gguf_read_f32(g, t, buf, (uint64_t)info.n_elements);
    if (s == QKD_OK)
        s = qkd_model_tensor_set(m, index, buf, (size_t)info.n_elements);
    qkd__free(ctx, buf);
    return s;
}

/* NOT_FOUND from the tokenizer reader means the file carries none. */
static qkd_status attach_tokenizer(qkd_context *ctx, qkd_model *m, const qkd__gguf *g)
{
    qkd_tokenizer *tok = NULL;
    qkd_status s = qkd__tokenizer_from_gguf(ctx, g, &tok);
    if (s == QKD_OK)
        qkd__model_attach_tokenizer(m, tok);
    return s == QKD_ERR_NOT_FOUND ? QKD_OK : s;
}

qkd_status qkd__load_gguf(qkd_context *ctx, const char *path, qkd_model **out)
{
    *out = NULL;
    qkd__gguf *g;
    qkd_status s = qkd__gguf_open(ctx, path, &g);
    if (s != QKD_OK)
        return s;
    qkd_model_config cfg;
    qkd_model *m = NULL;
    s = read_config(ctx, g, path, &cfg);
    if (s == QKD_OK)
        s = qkd_model_create(ctx, &cfg, &m);
    for (int i = 0; s == QKD_OK && i < qkd_model_n_tensors(m); i++)
        s = fill_tensor(m, g, path, i);
    if (s == QKD_OK)
        s = attach_tokenizer(ctx, m, g);
    qkd__gguf_close(g);
    if (s != QKD_OK) {
        qkd_model_free(m);
        return s;
    }
    *out = m;
    return QKD_OK;
}
