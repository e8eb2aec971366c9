/* qkd_model_load: pick the loader from what the path holds. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "io/io.h"

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* Whether the file starts with the GGUF magic; a file too short to hold
 * it is left to the llama2.c loader, which reports its size. */
static qkd_status has_gguf_magic(qkd_context *ctx, const char *path, bool *yes)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return qkd__error(ctx, QKD_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    char magic[4];
    *yes = fread(magic, 1, 4, f) == 4 && memcmp(magic, "GGUF", 4) == 0;
    fclose(f);
    return QKD_OK;
}

qkd_status qkd__check_backed(qkd_context *ctx, const char *path, const qkd_model_config *cfg,
                             uint64_t held)
{
    /* The standard tensors' weights, in double: only compared. */
    const double d = cfg->dim, heads = cfg->n_heads > 0 ? cfg->n_heads : 1;
    const double kv = d * cfg->n_kv_heads / heads;
    const double layer = 2.0 * d + 2.0 * d * d + 2.0 * kv * d + 3.0 * d * cfg->hidden_dim;
    const double need = (double)cfg->vocab_size * d * (cfg->tied_embeddings ? 1.0 : 2.0) +
                        cfg->n_layers * layer + d;
    if (need <= 4.0 * (double)held + (double)(1u << 20))
        return QKD_OK;
    return qkd__error(ctx, QKD_ERR_FORMAT, "%s: the header describes %.0f weights, the file "
                      "holds %llu", path, need, (unsigned long long)held);
}

QKD_API qkd_status qkd_model_load(qkd_context *ctx, const char *path, qkd_model **out)
{
    if (!ctx)
        return QKD_ERR_INVALID_ARG;
    if (!out || !path)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "qkd_model_load: %s is NULL",
                          out ? "path" : "out");
    *out = NULL;
    struct stat st;
    if (stat(path, &st) != 0)
        return qkd__error(ctx, QKD_ERR_IO, "%s: %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode) || ends_with(path, ".safetensors"))
        return qkd__load_hf(ctx, path, out);
    if (!S_ISREG(st.st_mode))
        return qkd__error(ctx, QKD_ERR_IO, "%s: not a regular file or a folder", path);
    bool gguf = false;
    qkd_status s = has_gguf_magic(ctx, path, &gguf);
    if (s != QKD_OK)
        return s;
    return gguf ? qkd__load_gguf(ctx, path, out) : qkd__load_llama2c(ctx, path, out);
}
