/* Hugging Face LlamaForCausalLM checkpoints: config.json plus one
 * model.safetensors, or shards listed by model.safetensors.index.json.
 *
 * config.json keys and the defaults used when a key is absent (those of
 * transformers' LlamaConfig): hidden_size, intermediate_size,
 * num_hidden_layers, num_attention_heads, vocab_size (required);
 * num_key_value_heads (= num_attention_heads), max_position_embeddings
 * (2048), rms_norm_eps (1e-6), rope_theta (10000; transformers 5 writes it
 * inside rope_parameters), tie_word_embeddings (false: LlamaConfig's
 * default, unlike PretrainedConfig's). RoPE scaling of any type but
 * "default", biases, an activation other than silu and a head_dim other
 * than hidden_size / num_attention_heads are refused as UNSUPPORTED. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "io/io.h"
#include "io/safetensors.h"
#include "model/model.h"

#define JSON_MAX_BYTES ((size_t)64 << 20)
#define NAME_MAX_LEN 128

typedef struct hf_shard {
    const char *file; /* as the index names it (borrowed); NULL: single file */
    qkd__safetensors *st;
} hf_shard;

typedef struct hf_source {
    qkd_context *ctx;
    char *dir;               /* folder of config.json */
    char *weights;           /* model.safetensors or the index file */
    json_t *index;           /* NULL for a single file */
    const json_t *weight_map; /* borrowed from index */
    hf_shard *shards;
    size_t n_shards;
} hf_source;

/* ---- paths ---- */

static char *join(qkd_context *ctx, const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = qkd__alloc(ctx, n);
    if (p)
        snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static char *dir_of(qkd_context *ctx, const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        return qkd__strdup(ctx, ".");
    size_t n = slash == path ? 1 : (size_t)(slash - path);
    char *d = qkd__alloc(ctx, n + 1);
    if (d) {
        memcpy(d, path, n);
        d[n] = '\0';
    }
    return d;
}

static bool is_file(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* Fill src->dir and src->weights from a folder or a file path. */
static qkd_status locate(hf_source *src, const char *path)
{
    qkd_context *ctx = src->ctx;
    struct stat sb;
    if (stat(path, &sb) != 0)
        return qkd__error(ctx, QKD_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    if (!S_ISDIR(sb.st_mode)) {
        src->dir = dir_of(ctx, path);
        src->weights = qkd__strdup(ctx, path);
        return src->dir && src->weights
                   ? QKD_OK
                   : qkd__error(ctx, QKD_ERR_NO_MEMORY, "%s: no memory", path);
    }
    src->dir = qkd__strdup(ctx, path);
    if (!src->dir)
        return qkd__error(ctx, QKD_ERR_NO_MEMORY, "%s: no memory", path);
    static const char *const candidates[] = {"model.safetensors",
                                             "model.safetensors.index.json"};
    for (size_t i = 0; i < sizeof candidates / sizeof candidates[0]; i++) {
        src->weights = join(ctx, path, candidates[i]);
        if (!src->weights)
            return qkd__error(ctx, QKD_ERR_NO_MEMORY, "%s: no memory", path);
        if (is_file(src->weights))
            return QKD_OK;
        qkd__free(ctx, src->weights);
        src->weights = NULL;
    }
    return qkd__error(ctx, QKD_ERR_IO, "%s: folder has neither model.safetensors nor "
                      "model.safetensors.index.json", path);
}

static qkd_status load_json(qkd_context *ctx, const char *path, json_t **out)
{
    uint8_t *text;
    size_t len;
    qkd_status s = qkd__read_file(ctx, path, JSON_MAX_BYTES, &text, &len);
    if (s != QKD_OK)
        return s;
    json_error_t jerr;
    json_t *root = json_loadb((const char *)text, len, JSON_REJECT_DUPLICATES, &jerr);
    qkd__free(ctx, text);
    if (!root)
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: invalid JSON at line %d, column %d: %s",
                          path, jerr.line, jerr.column, jerr.text);
    if (!json_is_object(root)) {
        json_decref(root);
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: not a JSON object", path);
    }
    *out = root;
    return QKD_OK;
}

/* ---- config.json ---- */

/* An integer key in [1, max]; dflt > 0 when the key is optional. */
static qkd_status cfg_int(qkd_context *ctx, const char *path, const json_t *root,
                          const char *key, int dflt, int max, int *out)
{
    const json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        if (dflt > 0) {
            *out = dflt;
            return QKD_OK;
        }
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: required key '%s' is missing", path, key);
    }
    if (!json_is_integer(v))
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: '%s' is not an integer", path, key);
    json_int_t n = json_integer_value(v);
    if (n < 1 || n > max)
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: %s = %lld is out of range [1, %d]",
                          path, key, (long long)n, max);
    *out = (int)n;
    return QKD_OK;
}

/* A number key in (0, max) when present, else *out is left as it is. */
static qkd_status cfg_real(qkd_context *ctx, const char *path, const json_t *obj,
                           const char *key, double max, float *out)
{
    const json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return QKD_OK;
    double x = json_number_value(v);
    if (!json_is_number(v) || !(x > 0.0 && x < max))
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: '%s' must be a number in (0, %g)",
                          path, key, max);
    *out = (float)x;
    return QKD_OK;
}

static qkd_status cfg_bool(qkd_context *ctx, const char *path, const json_t *root,
                           const char *key, int *out)
{
    const json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        *out = 0;
        return QKD_OK;
    }
    if (!json_is_boolean(v))
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: '%s' is not true or false", path, key);
    *out = json_is_true(v);
    return QKD_OK;
}

static bool is_llama(const json_t *root)
{
    size_t i;
    const json_t *v;
    json_array_foreach(json_object_get(root, "architectures"), i, v)
        if (json_is_string(v) && strcmp(json_string_value(v), "LlamaForCausalLM") == 0)
            return true;
    const char *type = json_string_value(json_object_get(root, "model_type"));
    return type && strcmp(type, "llama") == 0;
}

/* rope_scaling (transformers 4) and rope_parameters (5): only the plain
 * "default" RoPE is supported; rope_parameters may carry rope_theta. */
static qkd_status cfg_rope(qkd_context *ctx, const char *path, const json_t *root,
                           float *theta)
{
    static const double max_theta = 1e12;
    *theta = 10000.0f;
    qkd_status s = cfg_real(ctx, path, root, "rope_theta", max_theta, theta);
    static const char *const keys[] = {"rope_scaling", "rope_parameters"};
    for (size_t i = 0; s == QKD_OK && i < sizeof keys / sizeof keys[0]; i++) {
        const json_t *v = json_object_get(root, keys[i]);
        if (!v || json_is_null(v))
            continue;
        if (!json_is_object(v))
            return qkd__error(ctx, QKD_ERR_FORMAT, "%s: '%s' is not an object", path, keys[i]);
        const char *type = json_string_value(json_object_get(v, "rope_type"));
        if (!type)
            type = json_string_value(json_object_get(v, "type"));
        if (!type || strcmp(type, "default") != 0)
            return qkd__error(ctx, QKD_ERR_UNSUPPORTED, "%s: %s of type '%s' (scaled RoPE) "
                              "is not supported", path, keys[i], type ? type : "?");
        s = cfg_real(ctx, path, v, "rope_theta", max_theta, theta);
    }
    return s;
}

/* Keys whose presence means a model our LLaMA cannot represent. */
static qkd_status cfg_unsupported(qkd_context *ctx, const char *path, const json_t *root,
                                  const qkd_model_config *cfg)
{
    if (!is_llama(root))
        return qkd__error(ctx, QKD_ERR_UNSUPPORTED, "%s: not a LLaMA model (architectures "
                          "lacks LlamaForCausalLM and model_type is not \"llama\")", path);
    const char *act = json_string_value(json_object_get(root, "hidden_act"));
    if (act && strcmp(act, "silu") != 0)
        return qkd__error(ctx, QKD_ERR_UNSUPPORTED, "%s: hidden_act '%s' (only silu)", path, act);
    if (json_is_true(json_object_get(root, "attention_bias")) ||
        json_is_true(json_object_get(root, "mlp_bias")))
        return qkd__error(ctx, QKD_ERR_UNSUPPORTED, "%s: attention or MLP biases", path);
    const json_t *hd = json_object_get(root, "head_dim");
    if (hd && !json_is_null(hd) &&
        (!json_is_integer(hd) || json_integer_value(hd) * cfg->n_heads != cfg->dim))
        return qkd__error(ctx, QKD_ERR_UNSUPPORTED, "%s: head_dim differs from hidden_size / "
                          "num_attention_heads = %d / %d", path, cfg->dim, cfg->n_heads);
    return QKD_OK;
}

static qkd_status parse_config(qkd_context *ctx, const char *path, const json_t *root,
                               qkd_model_config *cfg)
{
    /* Upper bounds: far above any LLaMA, low enough that sizes stay sane. */
    const struct {
        const char *key;
        size_t offset;
        int dflt;
        int max;
    } fields[] = {
        {"hidden_size", offsetof(qkd_model_config, dim), 0, 1 << 16},
        {"intermediate_size", offsetof(qkd_model_config, hidden_dim), 0, 1 << 18},
        {"num_hidden_layers", offsetof(qkd_model_config, n_layers), 0, 1024},
        {"num_attention_heads", offsetof(qkd_model_config, n_heads), 0, 1024},
        {"vocab_size", offsetof(qkd_model_config, vocab_size), 0, 1 << 22},
        {"max_position_embeddings", offsetof(qkd_model_config, max_seq_len), 2048, 1 << 20},
    };
    qkd_status s = QKD_OK;
    for (size_t i = 0; s == QKD_OK && i < sizeof fields / sizeof fields[0]; i++)
        s = cfg_int(ctx, path, root, fields[i].key, fields[i].dflt, fields[i].max,
                    (int *)((char *)cfg + fields[i].offset));
    if (s == QKD_OK)
        s = cfg_int(ctx, path, root, "num_key_value_heads", cfg->n_heads, 1024,
                    &cfg->n_kv_heads);
    if (s == QKD_OK) {
        cfg->norm_eps = 1e-6f;
        s = cfg_real(ctx, path, root, "rms_norm_eps", 1.0, &cfg->norm_eps);
    }
    if (s == QKD_OK)
        s = cfg_rope(ctx, path, root, &cfg->rope_theta);
    if (s == QKD_OK)
        s = cfg_bool(ctx, path, root, "tie_word_embeddings", &cfg->tied_embeddings);
    if (s == QKD_OK)
        s = cfg_unsupported(ctx, path, root, cfg);
    if (s == QKD_OK && qkd__model_config_check(ctx, cfg) != QKD_OK) {
        /* the model's own check names the inconsistent field */
        char why[QKD__ERROR_LEN];
        snprintf(why, sizeof why, "%s", ctx->last_error);
        s = qkd__error(ctx, QKD_ERR_FORMAT, "%s: %s", path, why);
    }
    return s;
}

static qkd_status read_config(hf_source *src, qkd_model_config *cfg)
{
    char *path = join(src->ctx, src->dir, "config.json");
    if (!path)
        return qkd__error(src->ctx, QKD_ERR_NO_MEMORY, "%s: no memory", src->dir);
    json_t *root = NULL;
    qkd_status s = load_json(src->ctx, path, &root);
    if (s == QKD_OK) {
        qkd_model_config_init(cfg);
        s = parse_config(src->ctx, path, root, cfg);
    }
    json_decref(root);
    qkd__free(src->ctx, path);
    return s;
}

/* ---- safetensors files ---- */

static hf_shard *shard_named(const hf_source *src, const char *file)
{
    for (size_t i = 0; i < src->n_shards; i++)
        if (strcmp(src->shards[i].file, file) == 0)
            return &src->shards[i];
    return NULL;
}

static qkd_status open_shard(hf_source *src, hf_shard *sh)
{
    char *path = sh->file ? join(src->ctx, src->dir, sh->file) : NULL;
    if (sh->file && !path)
        return qkd__error(src->ctx, QKD_ERR_NO_MEMORY, "%s: no memory", src->dir);
    qkd_status s = qkd__st_open(src->ctx, path ? path : src->weights, &sh->st);
    qkd__free(src->ctx, path);
    return s;
}

/* The shard files named by the index's weight_map, each once. */
static qkd_status list_shards(hf_source *src)
{
    qkd_context *ctx = src->ctx;
    qkd_status s = load_json(ctx, src->weights, &src->index);
    if (s != QKD_OK)
        return s;
    src->weight_map = json_object_get(src->index, "weight_map");
    if (!json_is_object(src->weight_map) || json_object_size(src->weight_map) == 0)
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: no weight_map object", src->weights);
    src->shards = qkd__calloc(ctx, json_object_size(src->weight_map), sizeof *src->shards);
    if (!src->shards)
        return qkd__error(ctx, QKD_ERR_NO_MEMORY, "%s: no memory", src->weights);
    const char *name;
    const json_t *v;
    json_object_foreach((json_t *)src->weight_map, name, v) {
        const char *file = json_string_value(v);
        if (!file || !*file || strchr(file, '/'))
            return qkd__error(ctx, QKD_ERR_FORMAT, "%s: weight_map entry '%s' is not a "
                              "file name in the same folder", src->weights, name);
        if (!shard_named(src, file))
            src->shards[src->n_shards++].file = file;
    }
    return QKD_OK;
}

static qkd_status open_weights(hf_source *src)
{
    qkd_status s;
    if (ends_with(src->weights, ".json")) {
        s = list_shards(src);
    } else {
        src->shards = qkd__calloc(src->ctx, 1, sizeof *src->shards);
        s = src->shards ? QKD_OK
                        : qkd__error(src->ctx, QKD_ERR_NO_MEMORY, "%s: no memory", src->weights);
        src->n_shards = src->shards ? 1 : 0;
    }
    for (size_t i = 0; s == QKD_OK && i < src->n_shards; i++)
        s = open_shard(src, &src->shards[i]);
    return s;
}

static const qkd__st_tensor *find_tensor(const hf_source *src, const char *name,
                                         qkd__safetensors **st)
{
    const hf_shard *sh = src->shards;
    if (src->weight_map) {
        const char *file = json_string_value(json_object_get(src->weight_map, name));
        sh = file ? shard_named(src, file) : NULL;
    }
    *st = sh ? sh->st : NULL;
    return sh ? qkd__st_find(sh->st, name) : NULL;
}

static void source_free(hf_source *src)
{
    for (size_t i = 0; i < src->n_shards; i++)
        qkd__st_close(src->shards[i].st);
    qkd__free(src->ctx, src->shards);
    json_decref(src->index);
    qkd__free(src->ctx, src->weights);
    qkd__free(src->ctx, src->dir);
}

/* ---- tensors ---- */

void qkd__hf_tensor_name(const qkd_tensor_info *info, char *buf, size_t n)
{
    static const char *const names[] = {
        [QKD_TENSOR_TOKEN_EMBD] = "model.embed_tokens",
        [QKD_TENSOR_ATTN_NORM] = "input_layernorm",
        [QKD_TENSOR_ATTN_Q] = "self_attn.q_proj",
        [QKD_TENSOR_ATTN_K] = "self_attn.k_proj",
        [QKD_TENSOR_ATTN_V] = "self_attn.v_proj",
        [QKD_TENSOR_ATTN_OUTPUT] = "self_attn.o_proj",
        [QKD_TENSOR_FFN_NORM] = "post_attention_layernorm",
        [QKD_TENSOR_FFN_GATE] = "mlp.gate_proj",
        [QKD_TENSOR_FFN_DOWN] = "mlp.down_proj",
        [QKD_TENSOR_FFN_UP] = "mlp.up_proj",
        [QKD_TENSOR_OUTPUT_NORM] = "model.norm",
        [QKD_TENSOR_OUTPUT] = "lm_head",
    };
    if (info->layer >= 0)
        snprintf(buf, n, "model.layers.%d.%s.weight", info->layer, names[info->kind]);
    else
        snprintf(buf, n, "%s.weight", names[info->kind]);
}

/* Hugging Face orders each head's q/k rows for rotate_half RoPE: row j
 * and row j + hd/2 form the pair our interleaved RoPE keeps in rows 2j
 * and 2j+1. */
static void unpermute_rows(const float *hf, float *ours, int n_heads, int64_t rows,
                           int64_t cols)
{
    int64_t hd = rows / n_heads, half = hd / 2;
    for (int64_t h = 0; h < n_heads; h++)
        for (int64_t j = 0; j < half; j++)
            for (int64_t s = 0; s < 2; s++)
                memcpy(ours + (h * hd + 2 * j + s) * cols, hf + (h * hd + s * half + j) * cols,
                       (size_t)cols * sizeof *ours);
}

/* "[a, b]" */
static void shape_str(char *buf, size_t size, int n_dims, const uint64_t *dims)
{
    size_t len = (size_t)snprintf(buf, size, "[");
    for (int d = 0; d < n_dims && len < size; d++)
        len += (size_t)snprintf(buf + len, size - len, d ? ", %llu" : "%llu",
                                (unsigned long long)dims[d]);
    if (len < size)
        snprintf(buf + len, size - len, "]");
}

static qkd_status check_shape(qkd_context *ctx, const char *file, const qkd__st_tensor *t,
                              const qkd_tensor_info *info)
{
    uint64_t want[2] = {(uint64_t)info->shape[0], (uint64_t)info->shape[1]};
    bool same = t->n_dims == info->n_dims;
    for (int d = 0; same && d < info->n_dims; d++)
        same = t->shape[d] == want[d];
    if (same)
        return QKD_OK;
    char got_s[200], want_s[64];
    shape_str(got_s, sizeof got_s, t->n_dims, t->shape);
    shape_str(want_s, sizeof want_s, info->n_dims, want);
    return qkd__error(ctx, QKD_ERR_SHAPE, "%s: tensor '%s' has shape %s, expected %s",
                      file, t->name, got_s, want_s);
}

typedef struct fill_state {
    hf_source *src;
    qkd_model *model;
    int n_heads, n_kv_heads;
    float *buf;   /* one tensor as read */
    float *perm;  /* q/k rows in our order */
} fill_state;

static qkd_status fill_tensor(fill_state *fs, int index)
{
    qkd_context *ctx = fs->src->ctx;
    qkd_tensor_info info = {.size = sizeof info};
    qkd_status s = qkd_model_tensor_info(fs->model, index, &info);
    if (s != QKD_OK)
        return s;
    char name[NAME_MAX_LEN];
    qkd__hf_tensor_name(&info, name, sizeof name);
    qkd__safetensors *st;
    const qkd__st_tensor *t = find_tensor(fs->src, name, &st);
    if (!t)
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: tensor '%s' is missing",
                          fs->src->weights, name);
    s = check_shape(ctx, fs->src->weights, t, &info);
    if (s == QKD_OK)
        s = qkd__st_read_f32(st, t, fs->buf, (uint64_t)info.n_elements);
    for (int64_t i = 0; s == QKD_OK && i < info.n_elements; i++)
        if (!isfinite(fs->buf[i]))
            s = qkd__error(ctx, QKD_ERR_NON_FINITE, "%s: tensor '%s' element %lld is not "
                           "finite", fs->src->weights, name, (long long)i);
    if (s != QKD_OK)
        return s;
    const float *w = fs->buf;
    if (info.kind == QKD_TENSOR_ATTN_Q || info.kind == QKD_TENSOR_ATTN_K) {
        int heads = info.kind == QKD_TENSOR_ATTN_Q ? fs->n_heads : fs->n_kv_heads;
        unpermute_rows(fs->buf, fs->perm, heads, info.shape[0], info.shape[1]);
        w = fs->perm;
    }
    return qkd_model_tensor_set(fs->model, index, w, (size_t)info.n_elements);
}

static qkd_status fill_model(hf_source *src, qkd_model *model, const qkd_model_config *cfg)
{
    qkd_context *ctx = src->ctx;
    fill_state fs = {.src = src, .model = model, .n_heads = cfg->n_heads,
                     .n_kv_heads = cfg->n_kv_heads};
    int n = qkd_model_n_tensors(model);
    int64_t largest = 0;
    for (int i = 0; i < n; i++) {
        qkd_tensor_info info = {.size = sizeof info};
        if (qkd_model_tensor_info(model, i, &info) == QKD_OK && info.n_elements > largest)
            largest = info.n_elements;
    }
    fs.buf = qkd__calloc(ctx, (size_t)largest, sizeof(float));
    fs.perm = qkd__calloc(ctx, (size_t)cfg->dim * (size_t)cfg->dim, sizeof(float));
    qkd_status s = fs.buf && fs.perm
                       ? QKD_OK
                       : qkd__error(ctx, QKD_ERR_NO_MEMORY, "%s: no memory for %lld floats",
                                    src->weights, (long long)largest);
    for (int i = 0; s == QKD_OK && i < n; i++)
        s = fill_tensor(&fs, i);
    qkd__free(ctx, fs.perm);
    qkd__free(ctx, fs.buf);
    return s;
}

static qkd_status check_backed(hf_source *src, const qkd_model_config *cfg)
{
    uint64_t held = 0;
    for (size_t i = 0; i < src->n_shards; i++)
        held += qkd__st_elements(src->shards[i].st);
    return qkd__check_backed(src->ctx, src->weights, cfg, held);
}

qkd_status qkd__load_hf(qkd_context *ctx, const char *path, qkd_model **out)
{
    *out = NULL;
    hf_source src = {.ctx = ctx};
    qkd_model_config cfg;
    qkd_model *model = NULL;
    qkd_status s = locate(&src, path);
    if (s == QKD_OK)
        s = read_config(&src, &cfg);
    if (s == QKD_OK)
        s = open_weights(&src);
    if (s == QKD_OK)
        s = check_backed(&src, &cfg);
    if (s == QKD_OK)
        s = qkd_model_create(ctx, &cfg, &model);
    if (s == QKD_OK)
        s = fill_model(&src, model, &cfg);
    source_free(&src);
    if (s != QKD_OK) {
        qkd_model_free(model);
        return s;
    }
    *out = model;
    return QKD_OK;
}
