/* The model handle: config, creation, the parameter tensor table and the
 * host access to weights and gradients. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "model/model_impl.h"

/* Limits that keep every size well inside size_t and int arithmetic while
 * leaving room for any LLaMA-family shape in use. */
#define MAX_WIDTH (1 << 20)   /* dim, hidden_dim */
#define MAX_VOCAB (1 << 24)
#define MAX_LAYERS 4096
#define MAX_SEQ_LEN (1 << 20)

static const char *const kind_names[] = {
    [QKD_TENSOR_TOKEN_EMBD] = "token_embd",   [QKD_TENSOR_ATTN_NORM] = "attn_norm",
    [QKD_TENSOR_ATTN_Q] = "attn_q",           [QKD_TENSOR_ATTN_K] = "attn_k",
    [QKD_TENSOR_ATTN_V] = "attn_v",           [QKD_TENSOR_ATTN_OUTPUT] = "attn_output",
    [QKD_TENSOR_FFN_NORM] = "ffn_norm",       [QKD_TENSOR_FFN_GATE] = "ffn_gate",
    [QKD_TENSOR_FFN_DOWN] = "ffn_down",       [QKD_TENSOR_FFN_UP] = "ffn_up",
    [QKD_TENSOR_OUTPUT_NORM] = "output_norm", [QKD_TENSOR_OUTPUT] = "output",
};

void qkd_model_config_init(qkd_model_config *cfg)
{
    if (!cfg)
        return;
    *cfg = (qkd_model_config){
        .size = sizeof *cfg,
        .dim = 64,
        .hidden_dim = 172,
        .n_layers = 5,
        .n_heads = 8,
        .n_kv_heads = 4,
        .vocab_size = 512,
        .max_seq_len = 512,
        .rope_theta = 10000.0f,
        .norm_eps = 1e-5f,
        .tied_embeddings = 1,
    };
}

/* ---- config check ------------------------------------------------------ */

static qkd_status check_int(qkd_context *ctx, const char *field, int value, int max)
{
    if (value < 1 || value > max)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "model config: %s = %d is outside [1, %d]", field, value, max);
    return QKD_OK;
}

static qkd_status check_sizes(qkd_context *ctx, const qkd_model_config *c)
{
    qkd_status st;
    if ((st = check_int(ctx, "dim", c->dim, MAX_WIDTH)) ||
        (st = check_int(ctx, "hidden_dim", c->hidden_dim, MAX_WIDTH)) ||
        (st = check_int(ctx, "n_layers", c->n_layers, MAX_LAYERS)) ||
        (st = check_int(ctx, "n_heads", c->n_heads, c->dim)) ||
        (st = check_int(ctx, "n_kv_heads", c->n_kv_heads, c->n_heads)) ||
        (st = check_int(ctx, "vocab_size", c->vocab_size, MAX_VOCAB)) ||
        (st = check_int(ctx, "max_seq_len", c->max_seq_len, MAX_SEQ_LEN)))
        return st;
    return QKD_OK;
}

static qkd_status check_shape(qkd_context *ctx, const qkd_model_config *c)
{
    if (c->dim % c->n_heads != 0)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "model config: dim %d is not a multiple of n_heads %d",
                          c->dim, c->n_heads);
    if ((c->dim / c->n_heads) % 2 != 0)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "model config: head_dim %d (dim / n_heads) must be even for RoPE",
                          c->dim / c->n_heads);
    if (c->n_heads % c->n_kv_heads != 0)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "model config: n_heads %d is not a multiple of n_kv_heads %d",
                          c->n_heads, c->n_kv_heads);
    return QKD_OK;
}

static qkd_status check_scalars(qkd_context *ctx, const qkd_model_config *c)
{
    if (!isfinite(c->rope_theta) || c->rope_theta <= 0.0f)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "model config: rope_theta %g must be positive and finite",
                          (double)c->rope_theta);
    if (!isfinite(c->norm_eps) || c->norm_eps <= 0.0f)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "model config: norm_eps %g must be positive and finite",
                          (double)c->norm_eps);
    if (c->tied_embeddings != 0 && c->tied_embeddings != 1)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "model config: tied_embeddings %d must be 0 or 1", c->tied_embeddings);
    return QKD_OK;
}

/* ---- tensor table ------------------------------------------------------ */

static int tensor_count(const qkd_model_config *c)
{
    return 2 + QKD__LAYER_TENSORS * c->n_layers + (c->tied_embeddings ? 0 : 1);
}

static int is_norm(qkd_tensor_kind kind)
{
    return kind == QKD_TENSOR_ATTN_NORM || kind == QKD_TENSOR_FFN_NORM ||
           kind == QKD_TENSOR_OUTPUT_NORM;
}

/* The tensors every forward reads in fp32: the embedding (looked up, not
 * multiplied) and the norms. They lead the weight buffer; the linears'
 * matrices follow, which a frozen model may keep on the host
 * (offload_matrices). */
static int is_resident(qkd_tensor_kind kind)
{
    return kind == QKD_TENSOR_TOKEN_EMBD || is_norm(kind);
}

/* Append one entry (t may be NULL to count only), reserving its slice in
 * a[0] if it is resident, else in a[1], whose offsets plan_tensors then
 * moves past a[0]. */
static void add_tensor(qkd__tensor_entry *t, int *n, qkd__arena a[2], qkd_tensor_kind kind,
                       int layer, int64_t rows, int64_t cols)
{
    qkd__arena *part = &a[!is_resident(kind)];
    size_t offset = part->used;
    qkd__arena_take(part, (size_t)rows, (size_t)cols);
    if (t) {
        qkd__tensor_entry *e = &t[*n];
        if (layer >= 0)
            snprintf(e->name, sizeof e->name, "blk.%d.%s.weight", layer, kind_names[kind]);
        else
            snprintf(e->name, sizeof e->name, "%s.weight", kind_names[kind]);
        e->kind = kind;
        e->layer = layer;
        e->n_dims = is_norm(kind) ? 1 : 2;
        e->rows = rows;
        e->cols = cols;
        e->offset = offset;
    }
    (*n)++;
}

/* Lay out the table in the documented order, the resident tensors first
 * in the buffer; t may be NULL to measure only. Returns the floats the
 * weight buffer needs and puts the resident ones' into *resident;
 * *overflow is set if that does not fit size_t. */
static size_t plan_tensors(const qkd_model_config *c, qkd__tensor_entry *t, size_t *resident,
                           int *overflow)
{
    const int64_t C = c->dim, H = c->hidden_dim, V = c->vocab_size;
    const int64_t kvd = C / c->n_heads * c->n_kv_heads;
    qkd__arena a[2] = {{0}, {0}};
    int n = 0;
    add_tensor(t, &n, a, QKD_TENSOR_TOKEN_EMBD, -1, V, C);
    for (int l = 0; l < c->n_layers; l++) {
        add_tensor(t, &n, a, QKD_TENSOR_ATTN_NORM, l, C, 1);
        add_tensor(t, &n, a, QKD_TENSOR_ATTN_Q, l, C, C);
        add_tensor(t, &n, a, QKD_TENSOR_ATTN_K, l, kvd, C);
        add_tensor(t, &n, a, QKD_TENSOR_ATTN_V, l, kvd, C);
        add_tensor(t, &n, a, QKD_TENSOR_ATTN_OUTPUT, l, C, C);
        add_tensor(t, &n, a, QKD_TENSOR_FFN_NORM, l, C, 1);
        add_tensor(t, &n, a, QKD_TENSOR_FFN_GATE, l, H, C);
        add_tensor(t, &n, a, QKD_TENSOR_FFN_DOWN, l, C, H);
        add_tensor(t, &n, a, QKD_TENSOR_FFN_UP, l, H, C);
    }
    add_tensor(t, &n, a, QKD_TENSOR_OUTPUT_NORM, -1, C, 1);
    if (!c->tied_embeddings)
        add_tensor(t, &n, a, QKD_TENSOR_OUTPUT, -1, V, C);
    for (int i = 0; t && i < n; i++) {
        if (!is_resident(t[i].kind))
            t[i].offset += a[0].used;
    }
    *resident = a[0].used;
    *overflow = a[0].overflow || a[1].overflow || a[1].used > SIZE_MAX / sizeof(float) ||
                a[0].used > SIZE_MAX / sizeof(float) - a[1].used;
    return a[0].used + a[1].used;
}

qkd_status qkd__model_config_check(qkd_context *ctx, const qkd_model_config *cfg)
{
    if (!cfg)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "model config: NULL");
    if (cfg->size < sizeof *cfg)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "model config: size field %zu, expected %zu (call qkd_model_config_init)",
                          cfg->size, sizeof *cfg);
    qkd_status st;
    if ((st = check_sizes(ctx, cfg)) || (st = check_shape(ctx, cfg)) ||
        (st = check_scalars(ctx, cfg)))
        return st;
    int overflow;
    size_t resident;
    plan_tensors(cfg, NULL, &resident, &overflow);
    if (overflow)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "model config: the parameter count overflows size_t");
    return QKD_OK;
}

/* ---- building -------------------------------------------------------- */

/* A zeroed buffer of n_floats into *buf. */
static qkd_status alloc_zeros(qkd_model *m, float **buf)
{
    qkd__backend *be = qkd__model_backend(m);
    qkd_status st = be->alloc(be, m->n_floats * sizeof(float), (void **)buf);
    if (st == QKD_OK)
        be->fill(be, *buf, 0.0f, m->n_floats);
    return st;
}

static qkd_status alloc_params(qkd_model *m)
{
    qkd_status st = alloc_zeros(m, &m->params);
    return st == QKD_OK ? alloc_zeros(m, &m->grads) : st;
}

static void free_weight_bits(qkd_model *m)
{
    qkd__backend *be = qkd__model_backend(m);
    be->free(be, m->weight_bits);
    m->weight_bits = NULL;
    m->weight_bits_current = 0;
}

/* Whether a frozen bf16-bits model's products read its linears only as
 * weight_bits: no quantizer (whose Q(w) they would read instead) and no
 * learned tensors. */
static int reads_bits_only(const qkd_model *m)
{
    return !m->student.t && m->n_tensors == m->n_weights;
}

/* Move the linears' fp32 matrices to the host, keeping the resident part
 * on the device: a frozen teacher's largest buffer is then its bf16 copy.
 * Short of host or device memory for the move, the matrices stay (and
 * matrices_stay says so); so they do where they would take more than half
 * of the host's available memory (a 7B teacher's are 28 GB), which
 * overcommit would not refuse. */
static qkd_status offload_matrices(qkd_model *m)
{
    qkd__backend *be = qkd__model_backend(m);
    const size_t n = m->weight_floats - m->resident_floats;
    m->matrices_stay = 1;
    if (n > qkd__host_memory_available() / 2 / sizeof(float))
        return QKD_OK;
    float *host = n ? qkd__alloc(m->ctx, n * sizeof *host) : NULL;
    if (!host)
        return QKD_OK;
    float *resident = NULL;
    qkd_status st = be->alloc(be, m->resident_floats * sizeof *resident, (void **)&resident);
    if (st == QKD_OK)
        st = qkd__model_download(m, host, m->params + m->resident_floats, n);
    if (st != QKD_OK) {
        qkd__free(m->ctx, host);
        be->free(be, resident);
        return st == QKD_ERR_NO_MEMORY ? QKD_OK : st;
    }
    be->copy(be, resident, m->params, m->resident_floats);
    be->free(be, m->params);
    m->params = resident;
    m->matrices_host = host;
    m->matrices_stay = 0;
    return QKD_OK;
}

qkd_status qkd__model_fetch_matrices(qkd_model *m)
{
    if (!m->matrices_host)
        return QKD_OK;
    qkd__backend *be = qkd__model_backend(m);
    float *params = NULL;
    qkd_status st = be->alloc(be, m->n_floats * sizeof *params, (void **)&params);
    if (st == QKD_OK)
        st = be->upload(be, params + m->resident_floats, m->matrices_host,
                        (m->weight_floats - m->resident_floats) * sizeof *params);
    if (st != QKD_OK) {
        be->free(be, params);
        return st;
    }
    be->copy(be, params, m->params, m->resident_floats);
    be->free(be, m->params);
    m->params = params;
    qkd__free(m->ctx, m->matrices_host);
    m->matrices_host = NULL;
    return QKD_OK;
}

qkd_status qkd__model_tensor_read(const qkd_model *m, int index, float *dst)
{
    const qkd__tensor_entry *e = &m->tensors[index];
    const size_t n = (size_t)(e->rows * e->cols);
    if (m->matrices_host && e->offset >= m->resident_floats) {
        memcpy(dst, m->matrices_host + (e->offset - m->resident_floats), n * sizeof *dst);
        return QKD_OK;
    }
    return qkd__model_download(m, dst, m->params + e->offset, n);
}

/* Where weight_bits start in the weights: the products read the linears'
 * and a tied head's, never the norms' or an untied embedding's, which
 * lead the weights (resident_floats). */
static size_t bits_from(const qkd_model *m)
{
    return m->cfg.tied_embeddings ? 0 : m->resident_floats;
}

qkd_status qkd__model_round_weights(qkd_model *m)
{
    qkd__backend *be = qkd__model_backend(m);
    if (!m->frozen || !qkd__model_bf16_bits(m) || !be->to_bf16_bits)
        return QKD_OK;
    if (!m->weight_bits_current) {
        const size_t from = bits_from(m), n = m->weight_floats - from;
        if (!m->weight_bits) {
            qkd_status st = be->alloc(be, n * sizeof *m->weight_bits, (void **)&m->weight_bits);
            if (st != QKD_OK)
                return st;
        }
        be->to_bf16_bits(be, m->weight_bits, m->params + from, n);
        m->weight_bits_current = 1;
        m->matrices_stay = 0; /* new weights: the move may be tried again */
    }
    return reads_bits_only(m) && !m->matrices_host && !m->matrices_stay ? offload_matrices(m)
                                                                         : QKD_OK;
}

const uint16_t *qkd__model_weight_bits(const qkd_model *m, int index)
{
    const size_t offset = m->tensors[index].offset, from = bits_from(m);
    return m->weight_bits_current && offset >= from ? m->weight_bits + (offset - from) : NULL;
}

static void count_params(qkd_model *m)
{
    m->n_params = 0;
    for (int i = 0; i < m->n_tensors; i++)
        m->n_params += m->tensors[i].rows * m->tensors[i].cols;
}

static qkd_status build_table(qkd_model *m)
{
    qkd_context *ctx = m->ctx;
    m->n_tensors = tensor_count(&m->cfg);
    m->tensors = qkd__calloc(ctx, (size_t)m->n_tensors, sizeof *m->tensors);
    m->acts.layers = qkd__calloc(ctx, (size_t)m->cfg.n_layers, sizeof *m->acts.layers);
    if (!m->tensors || !m->acts.layers)
        return qkd__error(ctx, QKD_ERR_NO_MEMORY, "model create: out of memory");
    int overflow; /* ruled out by qkd__model_config_check */
    m->n_floats = m->weight_floats =
        plan_tensors(&m->cfg, m->tensors, &m->resident_floats, &overflow);
    m->n_weights = m->n_tensors;
    count_params(m);
    return QKD_OK;
}

/* ---- a quantizer's learned tensors ------------------------------------ */

/* extra placed after the weights into a new table t; the floats it needs. */
static size_t place_extra(const qkd_model *m, qkd__tensor_entry *t,
                          const qkd__tensor_entry *extra, int n_extra, int *overflow)
{
    qkd__arena a = {.used = m->weight_floats};
    memcpy(t, m->tensors, (size_t)m->n_weights * sizeof *t);
    for (int i = 0; i < n_extra; i++) {
        t[m->n_weights + i] = extra[i];
        t[m->n_weights + i].offset = a.used;
        qkd__arena_take(&a, (size_t)extra[i].rows, (size_t)extra[i].cols);
    }
    *overflow = a.overflow || a.used > SIZE_MAX / sizeof(float);
    return a.used;
}

/* New weight and gradient buffers of n floats, the weights' part copied;
 * a frozen model gets no gradient buffer (*grads NULL). */
static qkd_status grow_buffers(qkd_model *m, size_t n, float **params, float **grads)
{
    qkd__backend *be = qkd__model_backend(m);
    *params = *grads = NULL;
    qkd_status st = be->alloc(be, n * sizeof(float), (void **)params);
    if (st == QKD_OK && m->grads)
        st = be->alloc(be, n * sizeof(float), (void **)grads);
    if (st != QKD_OK) {
        be->free(be, *params);
        return st;
    }
    be->copy(be, *params, m->params, m->weight_floats);
    be->fill(be, *params + m->weight_floats, 0.0f, n - m->weight_floats);
    if (*grads) {
        be->copy(be, *grads, m->grads, m->weight_floats);
        be->fill(be, *grads + m->weight_floats, 0.0f, n - m->weight_floats);
    }
    return QKD_OK;
}

qkd_status qkd__model_set_learned_tensors(qkd_model *m, const qkd__tensor_entry *extra,
                                          int n_extra)
{
    if (n_extra == 0 && m->n_tensors == m->n_weights)
        return QKD_OK;
    m->table_gen++;
    if (n_extra == 0) { /* the larger table and buffers stay allocated */
        m->n_tensors = m->n_weights;
        m->n_floats = m->weight_floats;
        count_params(m);
        return QKD_OK;
    }
    qkd__tensor_entry *t = qkd__calloc(m->ctx, (size_t)(m->n_weights + n_extra), sizeof *t);
    if (!t)
        return qkd__error(m->ctx, QKD_ERR_NO_MEMORY, "set_quantizer: out of memory");
    int overflow;
    size_t n = place_extra(m, t, extra, n_extra, &overflow);
    float *params = NULL, *grads = NULL;
    qkd_status st = overflow ? qkd__error(m->ctx, QKD_ERR_NO_MEMORY,
                                          "set_quantizer: the learned scales overflow size_t")
                             : grow_buffers(m, n, &params, &grads);
    if (st != QKD_OK) {
        qkd__free(m->ctx, t);
        return st;
    }
    qkd__backend *be = qkd__model_backend(m);
    be->free(be, m->params);
    be->free(be, m->grads);
    qkd__free(m->ctx, m->tensors);
    m->params = params;
    m->grads = grads;
    m->tensors = t;
    m->n_tensors = m->n_weights + n_extra;
    m->n_floats = n;
    count_params(m);
    return QKD_OK;
}

unsigned qkd__model_table_gen(const qkd_model *m)
{
    return m->table_gen;
}

/* ---- create / free ----------------------------------------------------- */

qkd_status qkd_model_create(qkd_context *ctx, const qkd_model_config *cfg, qkd_model **out)
{
    if (!ctx)
        return QKD_ERR_INVALID_ARG;
    if (!out)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "model create: out is NULL");
    *out = NULL;
    qkd_status st = qkd__model_config_check(ctx, cfg);
    if (st != QKD_OK)
        return st;
    qkd_model *m = qkd__calloc(ctx, 1, sizeof *m);
    if (!m)
        return qkd__error(ctx, QKD_ERR_NO_MEMORY, "model create: out of memory");
    m->ctx = ctx;
    m->cfg = *cfg;
    m->cfg.size = sizeof m->cfg;
    st = build_table(m);
    if (st == QKD_OK)
        st = alloc_params(m);
    if (st != QKD_OK) {
        qkd_model_free(m);
        return st;
    }
    *out = m;
    return QKD_OK;
}

void qkd_model_free(qkd_model *m)
{
    if (!m)
        return;
    qkd__backend *be = qkd__model_backend(m);
    qkd__model_free_acts(m);
    qkd__model_free_decode(m);
    qkd__model_free_student(m);
    be->free(be, m->params);
    be->free(be, m->grads);
    free_weight_bits(m);
    qkd__free(m->ctx, m->matrices_host);
    qkd_tokenizer_free(m->tokenizer);
    qkd__free(m->ctx, m->acts.layers);
    qkd__free(m->ctx, m->tensors);
    qkd__free(m->ctx, m);
}

qkd_status qkd_model_get_config(const qkd_model *m, qkd_model_config *cfg)
{
    if (!m)
        return QKD_ERR_INVALID_ARG;
    if (!cfg || cfg->size < sizeof *cfg)
        return qkd__error(m->ctx, QKD_ERR_INVALID_ARG,
                          "model get_config: cfg is NULL or its size field is not set");
    *cfg = m->cfg;
    return QKD_OK;
}

qkd_status qkd_model_set_max_seq_len(qkd_model *m, int n)
{
    if (!m)
        return QKD_ERR_INVALID_ARG;
    if (n < 1 || n > MAX_SEQ_LEN)
        return qkd__error(m->ctx, QKD_ERR_INVALID_ARG,
                          "model set_max_seq_len: %d is outside [1, %d]", n, MAX_SEQ_LEN);
    if (n != m->cfg.max_seq_len) {
        m->cfg.max_seq_len = n;
        qkd__model_free_decode(m); /* re-sized on the next decode */
    }
    return QKD_OK;
}

qkd_status qkd_model_set_logits_rows(qkd_model *m, int rows)
{
    if (!m)
        return QKD_ERR_INVALID_ARG;
    if (rows < 0)
        return qkd__error(m->ctx, QKD_ERR_INVALID_ARG, "model set_logits_rows: %d is negative",
                          rows);
    if (rows != m->logits_rows) {
        m->logits_rows = rows;
        qkd__model_free_acts(m); /* planned again, with or without the logits */
    }
    return QKD_OK;
}

/* Frozen, the model drops its gradients; trained again, it gets zeroed
 * ones and drops its bf16 weights, which an update would make stale. */
qkd_status qkd_model_set_trainable(qkd_model *m, int trainable)
{
    if (!m)
        return QKD_ERR_INVALID_ARG;
    if (m->frozen == !trainable)
        return QKD_OK;
    qkd__backend *be = qkd__model_backend(m);
    if (trainable) {
        qkd_status st = alloc_zeros(m, &m->grads);
        if (st == QKD_OK && (st = qkd__model_fetch_matrices(m)) != QKD_OK) {
            be->free(be, m->grads);
            m->grads = NULL;
        }
        if (st != QKD_OK)
            return st;
        free_weight_bits(m);
    } else {
        be->free(be, m->grads);
        m->grads = NULL;
    }
    m->grads_cleared = 0;
    m->frozen = !trainable;
    qkd__model_free_acts(m); /* planned again, with or without per-layer buffers */
    return QKD_OK;
}

qkd_status qkd_model_set_matmul_precision(qkd_model *m, qkd_matmul_precision p)
{
    if (!m)
        return QKD_ERR_INVALID_ARG;
    if (p != QKD_MATMUL_FP32 && p != QKD_MATMUL_BF16)
        return qkd__error(m->ctx, QKD_ERR_INVALID_ARG,
                          "model set_matmul_precision: unknown precision %d", (int)p);
    const qkd__backend *be = qkd__model_backend(m);
    if (p == QKD_MATMUL_BF16 && (!be->matmul_forward_bf16 || !be->matmul_backward_input_bf16 ||
                                 !be->matmul_backward_weight_bf16 || !be->round_to_bf16))
        return qkd__error(m->ctx, QKD_ERR_UNSUPPORTED,
                          "model set_matmul_precision: the %s backend has no bf16 matmuls",
                          be->name);
    const int was = m->matmul_bf16;
    if (was == (p == QKD_MATMUL_BF16))
        return QKD_OK;
    qkd_status st = qkd__model_fetch_matrices(m); /* its weight_bits go */
    if (st != QKD_OK)
        return st;
    m->matmul_bf16 = !was;
    st = qkd__model_student_refit(m); /* its Q(w) may be bf16-sized */
    if (st != QKD_OK) {
        m->matmul_bf16 = was;
        return st;
    }
    qkd__model_free_acts(m); /* planned again: their linear inputs may be bf16 */
    free_weight_bits(m);       /* rounded again by a bf16 forward */
    qkd__model_free_decode(m); /* its keys are rotated or not (qkd__model_attention_bf16) */
    return QKD_OK;
}

int64_t qkd_model_n_params(const qkd_model *m)
{
    return m ? m->n_params : 0;
}

qkd_context *qkd__model_context(const qkd_model *m)
{
    return m->ctx;
}

/* ---- tensors ----------------------------------------------------------- */

int qkd_model_n_tensors(const qkd_model *m)
{
    return m ? m->n_tensors : 0;
}

int qkd__model_n_weights(const qkd_model *m)
{
    return m->n_weights;
}

int qkd__model_tensor_index(const qkd_model *m, qkd_tensor_kind kind, int layer)
{
    const int L = m->cfg.n_layers;
    switch (kind) {
    case QKD_TENSOR_TOKEN_EMBD:
        return layer == -1 ? 0 : -1;
    case QKD_TENSOR_OUTPUT_NORM:
        return layer == -1 ? 1 + QKD__LAYER_TENSORS * L : -1;
    case QKD_TENSOR_OUTPUT:
        return layer == -1 && !m->cfg.tied_embeddings ? 2 + QKD__LAYER_TENSORS * L : -1;
    default:
        if (kind < QKD_TENSOR_ATTN_NORM || kind > QKD_TENSOR_FFN_UP || layer < 0 || layer >= L)
            return -1;
        return 1 + QKD__LAYER_TENSORS * layer + (kind - QKD_TENSOR_ATTN_NORM);
    }
}

float *qkd__model_tensor_ptr(const qkd_model *m, float *base, qkd_tensor_kind kind, int layer)
{
    if (kind == QKD_TENSOR_OUTPUT && m->cfg.tied_embeddings)
        kind = QKD_TENSOR_TOKEN_EMBD;
    return base + m->tensors[qkd__model_tensor_index(m, kind, layer)].offset;
}

float *qkd__model_param_dev(qkd_model *m, int index)
{
    /* every writer of the weights asks here, after fetching the matrices
     * (qkd__model_fetch_matrices): a frozen model's bf16 copy is rounded
     * again by its next forward, a student's Q(w) too */
    m->weight_bits_current = 0;
    if (m->student.t && index < m->n_weights)
        m->student.t[index].updated = 0;
    return m->params + m->tensors[index].offset;
}

int qkd__model_trainable(const qkd_model *m)
{
    return !m->frozen;
}

float *qkd__model_grad_dev(qkd_model *m, int index)
{
    qkd__model_settle_grads(m); /* the caller reads them */
    return m->grads + m->tensors[index].offset;
}

static qkd_status check_index(const qkd_model *m, const char *fn, int index)
{
    if (index < 0 || index >= m->n_tensors)
        return qkd__error(m->ctx, QKD_ERR_RANGE, "model %s: tensor index %d outside [0, %d)",
                          fn, index, m->n_tensors);
    return QKD_OK;
}

qkd_status qkd_model_tensor_info(const qkd_model *m, int index, qkd_tensor_info *info)
{
    if (!m)
        return QKD_ERR_INVALID_ARG;
    if (!info || info->size < sizeof *info)
        return qkd__error(m->ctx, QKD_ERR_INVALID_ARG,
                          "model tensor_info: info is NULL or its size field is not set");
    qkd_status st = check_index(m, "tensor_info", index);
    if (st != QKD_OK)
        return st;
    const qkd__tensor_entry *e = &m->tensors[index];
    *info = (qkd_tensor_info){
        .size = sizeof *info,
        .name = e->name,
        .kind = e->kind,
        .layer = e->layer,
        .n_dims = e->n_dims,
        .shape = {e->rows, e->cols},
        .n_elements = e->rows * e->cols,
    };
    return QKD_OK;
}

qkd_status qkd_model_tensor_find(const qkd_model *m, const char *name, int *index)
{
    if (!m)
        return QKD_ERR_INVALID_ARG;
    if (!name || !index)
        return qkd__error(m->ctx, QKD_ERR_INVALID_ARG, "model tensor_find: NULL argument");
    for (int i = 0; i < m->n_tensors; i++) {
        if (strcmp(m->tensors[i].name, name) == 0) {
            *index = i;
            return QKD_OK;
        }
    }
    return qkd__error(m->ctx, QKD_ERR_NOT_FOUND, "model tensor_find: no tensor named '%s'", name);
}

/* Validate a host transfer of n floats for tensor `index`. */
static qkd_status check_transfer(const qkd_model *m, const char *fn, int index,
                                 const void *host, size_t n)
{
    if (!host)
        return qkd__error(m->ctx, QKD_ERR_INVALID_ARG, "model %s: buffer is NULL", fn);
    qkd_status st = check_index(m, fn, index);
    if (st != QKD_OK)
        return st;
    const qkd__tensor_entry *e = &m->tensors[index];
    if ((int64_t)n != e->rows * e->cols)
        return qkd__error(m->ctx, QKD_ERR_SHAPE, "model %s: %s has %lld elements, not %zu", fn,
                          e->name, (long long)(e->rows * e->cols), n);
    return QKD_OK;
}

qkd_status qkd_model_tensor_get(const qkd_model *m, int index, float *dst, size_t n)
{
    if (!m)
        return QKD_ERR_INVALID_ARG;
    qkd_status st = check_transfer(m, "tensor_get", index, dst, n);
    return st == QKD_OK ? qkd__model_tensor_read(m, index, dst) : st;
}

qkd_status qkd_model_grad_get(const qkd_model *m, int index, float *dst, size_t n)
{
    if (!m)
        return QKD_ERR_INVALID_ARG;
    qkd_status st = check_transfer(m, "grad_get", index, dst, n);
    if (st == QKD_OK && !m->grads)
        st = qkd__error(m->ctx, QKD_ERR_STATE,
                        "model grad_get: the model is not trainable (qkd_model_set_trainable) "
                        "and keeps no gradients");
    if (st != QKD_OK)
        return st;
    if (m->grads_cleared) { /* zero, not yet written */
        memset(dst, 0, n * sizeof *dst);
        return QKD_OK;
    }
    return qkd__model_download(m, dst, m->grads + m->tensors[index].offset, n);
}

qkd_status qkd_model_tensor_set(qkd_model *m, int index, const float *src, size_t n)
{
    if (!m)
        return QKD_ERR_INVALID_ARG;
    qkd_status st = check_transfer(m, "tensor_set", index, src, n);
    if (st == QKD_OK)
        st = qkd__model_fetch_matrices(m);
    if (st != QKD_OK)
        return st;
    qkd__backend *be = qkd__model_backend(m);
    return be->upload(be, qkd__model_param_dev(m, index), src, n * sizeof(float));
}

/* Deferred: the next backward writes most gradients instead of adding
 * them to zeros (backward.c), and code that reads them zeroes them first. */
qkd_status qkd_model_zero_grad(qkd_model *m)
{
    if (!m)
        return QKD_ERR_INVALID_ARG;
    m->grads_cleared = m->grads != NULL; /* a frozen model has none */
    return QKD_OK;
}

void qkd__model_settle_grads(qkd_model *m)
{
    if (!m->grads_cleared)
        return;
    qkd__backend *be = qkd__model_backend(m);
    be->fill(be, m->grads, 0.0f, m->n_floats);
    m->grads_cleared = 0;
}

qkd_status qkd__model_download(const qkd_model *m, float *dst, const float *src, size_t n)
{
    qkd__backend *be = qkd__model_backend(m);
    qkd_status st = be->sync(be);
    if (st == QKD_OK)
        st = be->download(be, dst, src, n * sizeof(float));
    return st;
}

/* ---- tokenizer --------------------------------------------------------- */

void qkd__model_attach_tokenizer(qkd_model *m, qkd_tokenizer *tok)
{
    qkd_tokenizer_free(m->tokenizer);
    m->tokenizer = tok;
}

const qkd_tokenizer *qkd_model_tokenizer(const qkd_model *m)
{
    return m ? m->tokenizer : NULL;
}
