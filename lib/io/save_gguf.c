/* GGUF v3 writer: the metadata llama.cpp needs to load a LLaMA model and
 * its tokenizer, then every tensor in its storage type, each at a
 * multiple of the alignment (32). Block types are quantized with ggml's
 * reference quantizers (quant/ggml_blocks.c), the very functions a format
 * student's forward runs, so the file's dequantized weights are the
 * student's weights bit for bit. The metadata is emitted twice: once to
 * count the keys (the header comes first), once to write them. */
#include <ctype.h>
#include <math.h>
#include <string.h>

#include "data/fileio.h"
#include "io/io.h"
#include "model/model.h"
#include "quant/ggml_blocks.h"
#include "quant/quant.h"
#include "tokenizer/tokenizer.h"

#define ALIGNMENT 32
#define GGUF_VERSION 3
#define QUANTIZATION_VERSION 2 /* ggml's current block layouts */

void qkd_gguf_params_init(qkd_gguf_params *p)
{
    if (p)
        *p = (qkd_gguf_params){.size = sizeof *p, .type = QKD_GGUF_AS_TRAINED,
                               .embd_type = QKD_GGUF_AS_TRAINED};
}

/* ---- types ------------------------------------------------------------------- */

typedef struct type_entry {
    qkd_gguf_type type;
    const char *name;
    uint32_t ftype; /* llama.cpp's general.file_type when most weights have it */
} type_entry;

static const type_entry type_table[] = {
    {QKD_GGUF_AS_TRAINED, "AS_TRAINED", 0}, {QKD_GGUF_F32, "F32", 0},
    {QKD_GGUF_F16, "F16", 1},               {QKD_GGUF_Q4_0, "Q4_0", 2},
    {QKD_GGUF_Q4_1, "Q4_1", 3},             {QKD_GGUF_Q5_0, "Q5_0", 8},
    {QKD_GGUF_Q5_1, "Q5_1", 9},             {QKD_GGUF_Q8_0, "Q8_0", 7},
    {QKD_GGUF_Q4_K, "Q4_K", 14},            {QKD_GGUF_Q6_K, "Q6_K", 18},
    {QKD_GGUF_BF16, "BF16", 32},            {QKD_GGUF_TQ2_0, "TQ2_0", 37},
};
enum { N_TYPES = sizeof type_table / sizeof type_table[0] };

static const type_entry *type_entry_of(qkd_gguf_type type)
{
    for (int i = 0; i < N_TYPES; i++)
        if (type_table[i].type == type)
            return &type_table[i];
    return NULL;
}

const char *qkd_gguf_type_name(qkd_gguf_type type)
{
    const type_entry *e = type_entry_of(type);
    return e ? e->name : NULL;
}

qkd_status qkd_gguf_type_from_name(const char *name, qkd_gguf_type *out)
{
    if (!name || !out)
        return QKD_ERR_INVALID_ARG;
    for (int i = 0; i < N_TYPES; i++) {
        const char *a = type_table[i].name, *b = name;
        while (*a && toupper((unsigned char)*b) == *a)
            a++, b++;
        if (!*a && !*b) {
            *out = type_table[i].type;
            return QKD_OK;
        }
    }
    return QKD_ERR_NOT_FOUND;
}

/* ---- which type each tensor gets -------------------------------------------------- */

static int is_projection(qkd_tensor_kind kind)
{
    return kind >= QKD_TENSOR_ATTN_Q && kind <= QKD_TENSOR_FFN_UP &&
           kind != QKD_TENSOR_FFN_NORM;
}

static qkd_status check_params(qkd_context *ctx, const qkd_gguf_params *p)
{
    if (p->size < sizeof *p)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "save gguf: params size field %zu, expected %zu (call "
                          "qkd_gguf_params_init)",
                          p->size, sizeof *p);
    if (!type_entry_of(p->type) || !type_entry_of(p->embd_type))
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "save gguf: unknown tensor type %d or %d (see qkd_gguf_type)",
                          (int)p->type, (int)p->embd_type);
    return QKD_OK;
}

/* AS_TRAINED: the bound quantizer's format, else F32. */
static int trained_type(const qkd_model *m, int index, int64_t cols)
{
    const qkd_quantizer *q = qkd__model_tensor_quantizer(m, index);
    int type = q ? qkd__quant_row_type(qkd__quantizer_params(q)->scheme, cols) : -1;
    return type >= 0 ? type : QKD__GGML_F32;
}

static int tensor_type(const qkd_model *m, int index, const qkd_tensor_info *info,
                       const qkd_gguf_params *p)
{
    if (info->n_dims < 2)
        return QKD__GGML_F32;
    qkd_gguf_type asked = is_projection(info->kind) ? p->type : p->embd_type;
    if (asked == QKD_GGUF_AS_TRAINED)
        return trained_type(m, index, info->shape[1]);
    return qkd__quant_fit_type((int)asked, info->shape[1]);
}

qkd_status qkd_gguf_tensor_type(const qkd_model *model, int index, const qkd_gguf_params *p,
                                qkd_gguf_type *out)
{
    if (!model || !out)
        return QKD_ERR_INVALID_ARG;
    qkd_context *ctx = qkd__model_context(model);
    qkd_gguf_params def;
    qkd_gguf_params_init(&def);
    qkd_tensor_info info = {.size = sizeof info};
    qkd_status st = check_params(ctx, p ? p : &def);
    if (st == QKD_OK)
        st = qkd_model_tensor_info(model, index, &info);
    if (st == QKD_OK)
        *out = (qkd_gguf_type)tensor_type(model, index, &info, p ? p : &def);
    return st;
}

/* ---- the plan: every tensor's type, size and offset ---------------------------------- */

typedef struct planned {
    qkd_tensor_info info;
    const qkd__ggml_format *f;
    uint64_t offset, bytes;
} planned;

typedef struct saver {
    qkd_context *ctx;
    qkd_model *model;
    qkd_gguf_params p;
    qkd_model_config cfg;
    const qkd_tokenizer *tok;
    int n;
    planned *t;
    qkd__wfile w;
    uint64_t at;   /* bytes written */
    uint64_t n_kv; /* keys emitted by the current pass */
    int writing;   /* 0: only count the keys */
} saver;

static uint64_t align_up(uint64_t x)
{
    return (x + ALIGNMENT - 1) / ALIGNMENT * ALIGNMENT;
}

static qkd_status plan(saver *s)
{
    s->t = qkd__calloc(s->ctx, (size_t)s->n, sizeof *s->t);
    if (!s->t)
        return qkd__error(s->ctx, QKD_ERR_NO_MEMORY, "save gguf: out of memory");
    uint64_t offset = 0;
    for (int i = 0; i < s->n; i++) {
        planned *t = &s->t[i];
        t->info.size = sizeof t->info;
        qkd_status st = qkd_model_tensor_info(s->model, i, &t->info);
        if (st != QKD_OK)
            return st;
        t->f = qkd__ggml_format_of((uint32_t)tensor_type(s->model, i, &t->info, &s->p));
        t->offset = offset;
        t->bytes = qkd__ggml_row_bytes(t->f, t->info.n_elements);
        offset = align_up(offset + t->bytes);
    }
    return QKD_OK;
}

/* llama.cpp's file_type: that of the type most projection weights have. */
static uint32_t file_type(const saver *s)
{
    uint64_t count[N_TYPES] = {0};
    for (int i = 0; i < s->n; i++)
        if (is_projection(s->t[i].info.kind))
            count[type_entry_of((qkd_gguf_type)s->t[i].f->type) - type_table] +=
                (uint64_t)s->t[i].info.n_elements;
    int best = 1; /* F32 */
    for (int i = 1; i < N_TYPES; i++)
        best = count[i] > count[best] ? i : best;
    return type_table[best].ftype;
}

/* ---- metadata ---------------------------------------------------------------------- */

static void put(saver *s, const void *p, size_t n)
{
    if (!s->writing)
        return;
    qkd__wfile_bytes(&s->w, p, n);
    s->at += n;
}

static void put_u32(saver *s, uint32_t v)
{
    uint8_t b[4];
    for (int i = 0; i < 4; i++)
        b[i] = (uint8_t)(v >> (8 * i));
    put(s, b, sizeof b);
}

static void put_u64(saver *s, uint64_t v)
{
    put_u32(s, (uint32_t)v);
    put_u32(s, (uint32_t)(v >> 32));
}

static void put_str(saver *s, const char *str, size_t len)
{
    put_u64(s, len);
    put(s, str, len);
}

/* A key and its value type; counts the key. */
static void key(saver *s, const char *name, qkd__gguf_type type)
{
    s->n_kv++;
    put_str(s, name, strlen(name));
    put_u32(s, (uint32_t)type);
}

static void kv_u32(saver *s, const char *name, uint32_t v)
{
    key(s, name, QKD__GGUF_U32);
    put_u32(s, v);
}

static void kv_f32(saver *s, const char *name, float v)
{
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    key(s, name, QKD__GGUF_F32);
    put_u32(s, bits);
}

static void kv_str(saver *s, const char *name, const char *v)
{
    key(s, name, QKD__GGUF_STRING);
    put_str(s, v, strlen(v));
}

static void kv_array(saver *s, const char *name, qkd__gguf_type elem, uint64_t n)
{
    key(s, name, QKD__GGUF_ARRAY);
    put_u32(s, (uint32_t)elem);
    put_u64(s, n);
}

static void general_keys(saver *s)
{
    kv_str(s, "general.architecture", "llama");
    kv_str(s, "general.name", s->p.name ? s->p.name : "libqkd");
    kv_u32(s, "general.file_type", file_type(s));
    kv_u32(s, "general.alignment", ALIGNMENT);
    kv_u32(s, "general.quantization_version", QUANTIZATION_VERSION);
}

static void llama_keys(saver *s)
{
    const qkd_model_config *c = &s->cfg;
    kv_u32(s, "llama.context_length", (uint32_t)c->max_seq_len);
    kv_u32(s, "llama.embedding_length", (uint32_t)c->dim);
    kv_u32(s, "llama.feed_forward_length", (uint32_t)c->hidden_dim);
    kv_u32(s, "llama.block_count", (uint32_t)c->n_layers);
    kv_u32(s, "llama.attention.head_count", (uint32_t)c->n_heads);
    kv_u32(s, "llama.attention.head_count_kv", (uint32_t)c->n_kv_heads);
    kv_u32(s, "llama.rope.dimension_count", (uint32_t)(c->dim / c->n_heads));
    kv_f32(s, "llama.rope.freq_base", c->rope_theta);
    kv_f32(s, "llama.attention.layer_norm_rms_epsilon", c->norm_eps);
    kv_u32(s, "llama.vocab_size", (uint32_t)c->vocab_size);
}

static void tokenizer_keys(saver *s)
{
    const qkd_tokenizer *tok = s->tok;
    const int32_t n = qkd_tokenizer_vocab_size(tok);
    qkd__token_info t;
    kv_str(s, "tokenizer.ggml.model", "llama");
    kv_array(s, "tokenizer.ggml.tokens", QKD__GGUF_STRING, (uint64_t)n);
    for (int32_t i = 0; i < n && s->writing; i++) {
        qkd__tokenizer_token(tok, i, &t);
        put_str(s, t.piece, t.len);
    }
    kv_array(s, "tokenizer.ggml.scores", QKD__GGUF_F32, (uint64_t)n);
    for (int32_t i = 0; i < n && s->writing; i++) {
        qkd__tokenizer_token(tok, i, &t);
        put(s, &t.score, sizeof t.score);
    }
    kv_array(s, "tokenizer.ggml.token_type", QKD__GGUF_I32, (uint64_t)n);
    for (int32_t i = 0; i < n && s->writing; i++) {
        qkd__tokenizer_token(tok, i, &t);
        put_u32(s, (uint32_t)t.type);
    }
    kv_u32(s, "tokenizer.ggml.bos_token_id", (uint32_t)qkd_tokenizer_bos(tok));
    kv_u32(s, "tokenizer.ggml.eos_token_id", (uint32_t)qkd_tokenizer_eos(tok));
    kv_u32(s, "tokenizer.ggml.unknown_token_id", (uint32_t)qkd__tokenizer_unk(tok));
}

static void metadata(saver *s)
{
    s->n_kv = 0;
    general_keys(s);
    llama_keys(s);
    if (s->tok)
        tokenizer_keys(s);
}

static void tensor_infos(saver *s)
{
    for (int i = 0; i < s->n; i++) {
        const planned *t = &s->t[i];
        put_str(s, t->info.name, strlen(t->info.name));
        put_u32(s, (uint32_t)t->info.n_dims);
        for (int d = t->info.n_dims - 1; d >= 0; d--) /* ne[0]: the row length */
            put_u64(s, (uint64_t)t->info.shape[d]);
        put_u32(s, (uint32_t)t->f->type);
        put_u64(s, t->offset);
    }
}

/* Zeros up to the next multiple of the alignment: the data section and
 * every tensor start there (the plan's offsets assume it). */
static void pad(saver *s)
{
    static const uint8_t zeros[ALIGNMENT];
    put(s, zeros, (size_t)(align_up(s->at) - s->at));
}

/* Everything before the tensor data. */
static void write_header(saver *s)
{
    s->writing = 0;
    metadata(s); /* counts the keys */
    s->writing = 1;
    put(s, "GGUF", 4);
    put_u32(s, GGUF_VERSION);
    put_u64(s, (uint64_t)s->n);
    put_u64(s, s->n_kv);
    metadata(s);
    tensor_infos(s);
    pad(s);
}

/* ---- tensor data ---------------------------------------------------------------------- */

/* The values tensor i is stored from: its latent weights, or Q(w) when it
 * is written AS_TRAINED in F32 for a quantizer of another scheme. */
static qkd_status source_values(saver *s, int i, float *w, float *wq, const float **src)
{
    const planned *t = &s->t[i];
    const size_t n = (size_t)t->info.n_elements;
    *src = w;
    qkd_status st = qkd_model_tensor_get(s->model, i, w, n);
    qkd_gguf_type asked = is_projection(t->info.kind) ? s->p.type : s->p.embd_type;
    qkd_quantizer *q = qkd__model_tensor_quantizer(s->model, i);
    if (st != QKD_OK || asked != QKD_GGUF_AS_TRAINED || !q || t->info.n_dims < 2 ||
        qkd__quant_scheme_type(qkd__quantizer_params(q)->scheme) >= 0)
        return st;
    *src = wq;
    return qkd__model_deployed_get(s->model, i, wq); /* learned scales included */
}

static qkd_status check_source(saver *s, const planned *t, const float *x)
{
    if (t->f->type == QKD__GGML_F32)
        return QKD_OK;
    for (int64_t i = 0; i < t->info.n_elements; i++)
        if (!isfinite(x[i]))
            return qkd__error(s->ctx, QKD_ERR_NON_FINITE, "save gguf: %s[%lld] is %s",
                              t->info.name, (long long)i, isnan(x[i]) ? "NaN" : "infinite");
    return QKD_OK;
}

/* Values too large for the type's half floats come back infinite (tmp:
 * room for the tensor's values). */
static qkd_status check_stored(saver *s, const planned *t, const float *src,
                               const void *blocks, float *tmp)
{
    if (t->f->type == QKD__GGML_F32)
        return QKD_OK;
    qkd__ggml_dequantize_row(t->f, blocks, tmp, t->info.n_elements);
    for (int64_t i = 0; i < t->info.n_elements; i++)
        if (!isfinite(tmp[i]))
            return qkd__error(s->ctx, QKD_ERR_RANGE,
                              "save gguf: %s[%lld] = %g does not fit in %s (its half-float "
                              "values or scales overflow)",
                              t->info.name, (long long)i, (double)src[i], t->f->name);
    return QKD_OK;
}

/* Scratch for the largest tensor: latent weights, Q(w) and the blocks. */
typedef struct scratch {
    float *w, *wq;
    void *blocks;
} scratch;

static qkd_status write_tensor(saver *s, int i, scratch *b)
{
    const planned *t = &s->t[i];
    const float *src;
    qkd_status st = source_values(s, i, b->w, b->wq, &src);
    if (st == QKD_OK)
        st = check_source(s, t, src);
    if (st != QKD_OK)
        return st;
    qkd__ggml_quantize_row(t->f, src, b->blocks, t->info.n_elements);
    /* only F32 tensors are stored from wq, and check_stored skips those */
    st = check_stored(s, t, src, b->blocks, b->wq);
    if (st != QKD_OK)
        return st;
    put(s, b->blocks, (size_t)t->bytes);
    pad(s);
    return QKD_OK;
}

static qkd_status write_data(saver *s)
{
    int64_t most = 1;
    uint64_t most_bytes = 1;
    for (int i = 0; i < s->n; i++) {
        most = s->t[i].info.n_elements > most ? s->t[i].info.n_elements : most;
        most_bytes = s->t[i].bytes > most_bytes ? s->t[i].bytes : most_bytes;
    }
    scratch b = {qkd__alloc(s->ctx, (size_t)most * sizeof(float)),
                 qkd__alloc(s->ctx, (size_t)most * sizeof(float)),
                 qkd__alloc(s->ctx, (size_t)most_bytes)};
    qkd_status st = b.w && b.wq && b.blocks
                        ? QKD_OK
                        : qkd__error(s->ctx, QKD_ERR_NO_MEMORY, "save gguf: out of memory");
    for (int i = 0; i < s->n && st == QKD_OK; i++)
        st = write_tensor(s, i, &b);
    qkd__free(s->ctx, b.w);
    qkd__free(s->ctx, b.wq);
    qkd__free(s->ctx, b.blocks);
    return st;
}

/* ---- entry point ------------------------------------------------------------------------ */

static qkd_status check_tokenizer(const saver *s)
{
    if (!s->tok || qkd_tokenizer_vocab_size(s->tok) == s->cfg.vocab_size)
        return QKD_OK;
    return qkd__error(s->ctx, QKD_ERR_INVALID_ARG,
                      "save gguf: the tokenizer has %d tokens, the model's vocabulary %d",
                      qkd_tokenizer_vocab_size(s->tok), s->cfg.vocab_size);
}

static qkd_status setup(saver *s, qkd_model *model, const char *path, const qkd_gguf_params *p)
{
    s->ctx = qkd__model_context(model);
    s->model = model;
    qkd_gguf_params_init(&s->p);
    qkd_status st = p ? check_params(s->ctx, p) : QKD_OK;
    if (st != QKD_OK)
        return st;
    if (p)
        s->p = *p;
    if (!path)
        return qkd__error(s->ctx, QKD_ERR_INVALID_ARG, "save gguf: path is NULL");
    s->tok = s->p.tokenizer ? s->p.tokenizer : qkd_model_tokenizer(model);
    s->cfg.size = sizeof s->cfg;
    s->n = qkd__model_n_weights(model);
    st = qkd_model_get_config(model, &s->cfg);
    if (st == QKD_OK)
        st = check_tokenizer(s);
    return st;
}

qkd_status qkd_model_save_gguf(qkd_model *model, const char *path, const qkd_gguf_params *p)
{
    if (!model)
        return QKD_ERR_INVALID_ARG;
    saver s = {0};
    qkd_status st = setup(&s, model, path, p);
    if (st == QKD_OK)
        st = plan(&s);
    if (st == QKD_OK)
        st = qkd__wfile_open(s.ctx, &s.w, path);
    if (st == QKD_OK) {
        write_header(&s);
        st = write_data(&s);
        if (st == QKD_OK)
            st = qkd__wfile_commit(&s.w);
        else
            qkd__wfile_abort(&s.w);
    }
    qkd__free(s.ctx, s.t);
    return st;
}
