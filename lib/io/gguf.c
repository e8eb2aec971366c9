/* GGUF reader (versions 2 and 3, little-endian). The file is read into
 * memory whole; open walks every byte of the header, the metadata and the
 * tensor infos with bounds checks, so the getters and readers below only
 * touch ranges that were validated there. */
#include <stdlib.h>
#include <string.h>

#include "io/io.h"

/* Files are read whole for now; refuse anything beyond 64 GiB. */
#define MAX_FILE_BYTES (SIZE_MAX > (1ull << 36) ? (size_t)(1ull << 36) : SIZE_MAX / 2)
#define MAX_KEY_LEN 65535       /* the spec's limit on key length */
#define MAX_DIMS 4
#define DEFAULT_ALIGNMENT 32

typedef struct kv {
    const uint8_t *key;
    uint64_t key_len;
    uint32_t type;
    const uint8_t *val;   /* scalar value, string length field, or first array element */
    uint32_t elem_type;   /* arrays only */
    uint64_t n;           /* arrays only: element count */
    uint64_t *str_pos;    /* string arrays: file offset of each element */
} kv;

struct qkd__gguf {
    qkd_context *ctx;
    char *path;
    uint8_t *data;
    size_t size;
    uint32_t alignment;
    uint64_t n_kv;
    kv *kvs;              /* sorted by key */
    uint64_t n_tensors;
    qkd__gguf_tensor *tensors; /* sorted by name */
    size_t data_offset;
};

/* A cursor over the file, reporting truncation with the offset. */
typedef struct rd {
    qkd__gguf *g;
    size_t pos;
} rd;

static const char *const value_type_names[] = {
    "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool",
    "string", "array", "u64", "i64", "f64"
};
#define N_VALUE_TYPES (sizeof value_type_names / sizeof value_type_names[0])

/* Byte size of a fixed-size value type; 0 for string, array and unknown. */
static size_t scalar_size(uint32_t type)
{
    static const uint8_t sizes[N_VALUE_TYPES] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    return type < N_VALUE_TYPES ? sizes[type] : 0;
}

static const char *value_type_name(uint32_t type)
{
    return type < N_VALUE_TYPES ? value_type_names[type] : "unknown";
}

static const char *ggml_type_name(uint32_t type)
{
    static const char *const names[] = {
        "F32", "F16", "Q4_0", "Q4_1", "type 4", "type 5", "Q5_0", "Q5_1", "Q8_0",
        "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS",
        "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16",
        "I32", "I64", "F64", "IQ1_M", "BF16", "type 31", "type 32", "type 33",
        "TQ1_0", "TQ2_0"
    };
    return type < sizeof names / sizeof names[0] ? names[type] : "unknown";
}

/* ---- cursor ------------------------------------------------------------ */

static size_t remaining(const rd *r)
{
    return r->g->size - r->pos;
}

static qkd_status need(rd *r, uint64_t n, const char *what)
{
    if (n > remaining(r))
        return qkd__error(r->g->ctx, QKD_ERR_FORMAT, "%s: truncated: %s at byte %zu "
                          "needs %llu bytes, %zu remain of %zu", r->g->path, what,
                          r->pos, (unsigned long long)n, remaining(r), r->g->size);
    return QKD_OK;
}

static qkd_status rd_u32(rd *r, uint32_t *v, const char *what)
{
    qkd_status s = need(r, 4, what);
    if (s == QKD_OK) {
        memcpy(v, r->g->data + r->pos, 4);
        r->pos += 4;
    }
    return s;
}

static qkd_status rd_u64(rd *r, uint64_t *v, const char *what)
{
    qkd_status s = need(r, 8, what);
    if (s == QKD_OK) {
        memcpy(v, r->g->data + r->pos, 8);
        r->pos += 8;
    }
    return s;
}

/* A GGUF string: u64 length, then that many bytes (not NUL-terminated). */
static qkd_status rd_str(rd *r, const uint8_t **s, uint64_t *len, const char *what)
{
    qkd_status st = rd_u64(r, len, what);
    if (st == QKD_OK)
        st = need(r, *len, what);
    if (st == QKD_OK) {
        *s = r->g->data + r->pos;
        r->pos += (size_t)*len;
    }
    return st;
}

/* Refuse a count of items of at least min_bytes each that cannot fit in
 * what is left of the file, before anything is allocated for them. */
static qkd_status check_count(rd *r, uint64_t count, size_t min_bytes, const char *what)
{
    if (count > remaining(r) / min_bytes)
        return qkd__error(r->g->ctx, QKD_ERR_FORMAT, "%s: %s %llu at byte %zu cannot fit "
                          "in the remaining %zu bytes", r->g->path, what,
                          (unsigned long long)count, r->pos, remaining(r));
    return QKD_OK;
}

/* ---- metadata ---------------------------------------------------------- */

static qkd_status parse_string_array(rd *r, kv *e)
{
    qkd_status s = check_count(r, e->n, 8, "string array length");
    if (s != QKD_OK)
        return s;
    e->str_pos = qkd__calloc(r->g->ctx, e->n ? (size_t)e->n : 1, sizeof *e->str_pos);
    if (!e->str_pos)
        return qkd__error(r->g->ctx, QKD_ERR_NO_MEMORY, "%s: no memory for a %llu-string "
                          "array", r->g->path, (unsigned long long)e->n);
    for (uint64_t i = 0; i < e->n && s == QKD_OK; i++) {
        const uint8_t *str;
        uint64_t len;
        e->str_pos[i] = r->pos;
        s = rd_str(r, &str, &len, "string array element");
    }
    return s;
}

static qkd_status parse_array(rd *r, kv *e)
{
    qkd_status s = rd_u32(r, &e->elem_type, "array element type");
    if (s == QKD_OK)
        s = rd_u64(r, &e->n, "array length");
    if (s != QKD_OK)
        return s;
    e->val = r->g->data + r->pos;
    if (e->elem_type == QKD__GGUF_ARRAY)
        return qkd__error(r->g->ctx, QKD_ERR_UNSUPPORTED, "%s: key %.*s at byte %zu is a "
                          "nested array", r->g->path, (int)e->key_len, e->key, r->pos);
    if (e->elem_type == QKD__GGUF_STRING)
        return parse_string_array(r, e);
    size_t esize = scalar_size(e->elem_type);
    if (esize == 0)
        return qkd__error(r->g->ctx, QKD_ERR_FORMAT, "%s: key %.*s: unknown array element "
                          "type %u", r->g->path, (int)e->key_len, e->key, e->elem_type);
    s = check_count(r, e->n, esize, "array length");
    if (s == QKD_OK)
        r->pos += (size_t)e->n * esize;
    return s;
}

static qkd_status parse_kv(rd *r, kv *e)
{
    qkd_status s = rd_str(r, &e->key, &e->key_len, "metadata key");
    if (s == QKD_OK && (e->key_len == 0 || e->key_len > MAX_KEY_LEN))
        s = qkd__error(r->g->ctx, QKD_ERR_FORMAT, "%s: metadata key of length %llu "
                       "before byte %zu", r->g->path, (unsigned long long)e->key_len, r->pos);
    if (s == QKD_OK)
        s = rd_u32(r, &e->type, "metadata value type");
    if (s != QKD_OK)
        return s;
    if (e->type == QKD__GGUF_ARRAY)
        return parse_array(r, e);
    e->val = r->g->data + r->pos;
    if (e->type == QKD__GGUF_STRING) {
        const uint8_t *str;
        uint64_t len;
        return rd_str(r, &str, &len, "string value");
    }
    size_t size = scalar_size(e->type);
    if (size == 0)
        return qkd__error(r->g->ctx, QKD_ERR_FORMAT, "%s: key %.*s has unknown value "
                          "type %u", r->g->path, (int)e->key_len, e->key, e->type);
    s = need(r, size, "metadata value");
    if (s == QKD_OK)
        r->pos += size;
    return s;
}

static int kv_cmp(const void *a, const void *b)
{
    const kv *x = a, *y = b;
    uint64_t n = x->key_len < y->key_len ? x->key_len : y->key_len;
    int c = memcmp(x->key, y->key, (size_t)n);
    if (c != 0)
        return c;
    return (x->key_len > y->key_len) - (x->key_len < y->key_len);
}

static const kv *find_kv(const qkd__gguf *g, const char *key)
{
    kv probe = {.key = (const uint8_t *)key, .key_len = strlen(key)};
    return g->n_kv ? bsearch(&probe, g->kvs, (size_t)g->n_kv, sizeof *g->kvs, kv_cmp) : NULL;
}

static qkd_status parse_metadata(rd *r)
{
    qkd__gguf *g = r->g;
    qkd_status s = check_count(r, g->n_kv, 13, "metadata count"); /* key, type, 1 byte */
    if (s != QKD_OK)
        return s;
    g->kvs = qkd__calloc(g->ctx, g->n_kv ? (size_t)g->n_kv : 1, sizeof *g->kvs);
    if (!g->kvs)
        return qkd__error(g->ctx, QKD_ERR_NO_MEMORY, "%s: no memory for %llu metadata keys",
                          g->path, (unsigned long long)g->n_kv);
    for (uint64_t i = 0; i < g->n_kv && s == QKD_OK; i++)
        s = parse_kv(r, &g->kvs[i]);
    if (s != QKD_OK)
        return s;
    qsort(g->kvs, (size_t)g->n_kv, sizeof *g->kvs, kv_cmp);
    for (uint64_t i = 1; i < g->n_kv; i++)
        if (kv_cmp(&g->kvs[i - 1], &g->kvs[i]) == 0)
            return qkd__error(g->ctx, QKD_ERR_FORMAT, "%s: duplicate metadata key %.*s",
                              g->path, (int)g->kvs[i].key_len, g->kvs[i].key);
    return QKD_OK;
}

/* ---- tensor infos ------------------------------------------------------ */

static qkd_status parse_dims(rd *r, qkd__gguf_tensor *t)
{
    qkd__gguf *g = r->g;
    qkd_status s = rd_u32(r, &t->n_dims, "tensor dimension count");
    if (s == QKD_OK && (t->n_dims < 1 || t->n_dims > MAX_DIMS))
        s = qkd__error(g->ctx, QKD_ERR_FORMAT, "%s: tensor %s has %u dimensions (1 to %d "
                       "allowed) at byte %zu", g->path, t->name, t->n_dims, MAX_DIMS, r->pos);
    t->n_elements = 1;
    for (uint32_t d = 0; d < MAX_DIMS && s == QKD_OK; d++) {
        t->ne[d] = 1;
        if (d < t->n_dims)
            s = rd_u64(r, &t->ne[d], "tensor dimension");
        if (s == QKD_OK && (t->ne[d] == 0 || t->ne[d] > (uint64_t)INT64_MAX / t->n_elements))
            s = qkd__error(g->ctx, QKD_ERR_FORMAT, "%s: tensor %s: dimension %u is %llu "
                           "(zero, or the element count overflows)", g->path, t->name, d,
                           (unsigned long long)t->ne[d]);
        if (s == QKD_OK)
            t->n_elements *= t->ne[d];
    }
    return s;
}

static qkd_status parse_tensor_info(rd *r, qkd__gguf_tensor *t)
{
    qkd__gguf *g = r->g;
    const uint8_t *name;
    uint64_t len;
    qkd_status s = rd_str(r, &name, &len, "tensor name");
    if (s != QKD_OK)
        return s;
    if (memchr(name, 0, (size_t)len))
        return qkd__error(g->ctx, QKD_ERR_FORMAT, "%s: tensor name with a NUL byte before "
                          "byte %zu", g->path, r->pos);
    char *copy = qkd__alloc(g->ctx, (size_t)len + 1);
    if (!copy)
        return qkd__error(g->ctx, QKD_ERR_NO_MEMORY, "%s: no memory for a tensor name",
                          g->path);
    memcpy(copy, name, (size_t)len);
    copy[len] = '\0';
    t->name = copy;
    s = parse_dims(r, t);
    if (s == QKD_OK)
        s = rd_u32(r, &t->type, "tensor type");
    if (s == QKD_OK)
        s = rd_u64(r, &t->offset, "tensor offset");
    if (s == QKD_OK && t->offset % g->alignment != 0)
        s = qkd__error(g->ctx, QKD_ERR_FORMAT, "%s: tensor %s: offset %llu is not a multiple "
                       "of the alignment %u", g->path, t->name,
                       (unsigned long long)t->offset, g->alignment);
    return s;
}

/* A block type's rows are whole blocks: ne[0] must be a multiple of the
 * block size. */
static qkd_status check_blocks(const qkd__gguf *g, const qkd__gguf_tensor *t,
                               const qkd__ggml_format *f)
{
    if (t->ne[0] % (uint64_t)f->block != 0)
        return qkd__error(g->ctx, QKD_ERR_FORMAT, "%s: tensor %s: ne[0] = %llu is not a "
                          "multiple of the %d-value blocks of type %s", g->path, t->name,
                          (unsigned long long)t->ne[0], f->block, f->name);
    return QKD_OK;
}

/* The tensor's bytes must lie inside the data section. Types we cannot
 * read are only checked to start inside it; reading them is refused. */
static qkd_status check_tensor_range(const qkd__gguf *g, const qkd__gguf_tensor *t)
{
    uint64_t avail = g->size - g->data_offset;
    const qkd__ggml_format *f = qkd__ggml_format_of(t->type);
    qkd_status s = f ? check_blocks(g, t, f) : QKD_OK;
    if (s != QKD_OK)
        return s;
    uint64_t n_blocks = f ? t->n_elements / (uint64_t)f->block : 0;
    if (t->offset > avail || (f && n_blocks > (avail - t->offset) / f->bytes))
        return qkd__error(g->ctx, QKD_ERR_FORMAT, "%s: tensor %s: data at offset %llu "
                          "(%llu elements of type %s) runs past the end of the file "
                          "(data section of %llu bytes at byte %zu)", g->path, t->name,
                          (unsigned long long)t->offset, (unsigned long long)t->n_elements,
                          ggml_type_name(t->type), (unsigned long long)avail,
                          g->data_offset);
    return QKD_OK;
}

static int tensor_cmp(const void *a, const void *b)
{
    return strcmp(((const qkd__gguf_tensor *)a)->name, ((const qkd__gguf_tensor *)b)->name);
}

static qkd_status parse_tensors(rd *r)
{
    qkd__gguf *g = r->g;
    /* name length, n_dims, one dimension, type, offset */
    qkd_status s = check_count(r, g->n_tensors, 32, "tensor count");
    if (s != QKD_OK)
        return s;
    g->tensors = qkd__calloc(g->ctx, g->n_tensors ? (size_t)g->n_tensors : 1,
                             sizeof *g->tensors);
    if (!g->tensors)
        return qkd__error(g->ctx, QKD_ERR_NO_MEMORY, "%s: no memory for %llu tensor infos",
                          g->path, (unsigned long long)g->n_tensors);
    for (uint64_t i = 0; i < g->n_tensors && s == QKD_OK; i++)
        s = parse_tensor_info(r, &g->tensors[i]);
    if (s != QKD_OK)
        return s;
    uint64_t start = (r->pos + (uint64_t)g->alignment - 1) / g->alignment * g->alignment;
    if (g->n_tensors && start > g->size)
        return qkd__error(g->ctx, QKD_ERR_FORMAT, "%s: truncated: the data section would "
                          "start at byte %llu, the file has %zu", g->path,
                          (unsigned long long)start, g->size);
    g->data_offset = start > g->size ? g->size : (size_t)start;
    for (uint64_t i = 0; i < g->n_tensors && s == QKD_OK; i++)
        s = check_tensor_range(g, &g->tensors[i]);
    if (s != QKD_OK)
        return s;
    qsort(g->tensors, (size_t)g->n_tensors, sizeof *g->tensors, tensor_cmp);
    for (uint64_t i = 1; i < g->n_tensors; i++)
        if (tensor_cmp(&g->tensors[i - 1], &g->tensors[i]) == 0)
            return qkd__error(g->ctx, QKD_ERR_FORMAT, "%s: duplicate tensor name %s",
                              g->path, g->tensors[i].name);
    return QKD_OK;
}

/* ---- open / close ------------------------------------------------------ */

static qkd_status parse_header(rd *r)
{
    qkd__gguf *g = r->g;
    qkd_status s = need(r, 4, "magic");
    if (s != QKD_OK)
        return s;
    if (memcmp(g->data, "GGUF", 4) != 0)
        return qkd__error(g->ctx, QKD_ERR_FORMAT, "%s: not a GGUF file (magic %02x %02x "
                          "%02x %02x)", g->path, g->data[0], g->data[1], g->data[2],
                          g->data[3]);
    r->pos = 4;
    uint32_t version;
    s = rd_u32(r, &version, "version");
    if (s == QKD_OK && version != 2 && version != 3)
        s = qkd__error(g->ctx, QKD_ERR_UNSUPPORTED, "%s: GGUF version %u (2 and 3 are "
                       "read)", g->path, version);
    if (s == QKD_OK)
        s = rd_u64(r, &g->n_tensors, "tensor count");
    if (s == QKD_OK)
        s = rd_u64(r, &g->n_kv, "metadata count");
    return s;
}

static qkd_status read_alignment(qkd__gguf *g)
{
    g->alignment = DEFAULT_ALIGNMENT;
    qkd_status s = qkd__gguf_get_u32(g, "general.alignment", &g->alignment);
    if (s == QKD_ERR_NOT_FOUND)
        return QKD_OK;
    if (s == QKD_OK && (g->alignment == 0 || (g->alignment & (g->alignment - 1)) != 0))
        s = qkd__error(g->ctx, QKD_ERR_FORMAT, "%s: general.alignment %u is not a power "
                       "of two", g->path, g->alignment);
    return s;
}

qkd_status qkd__gguf_open(qkd_context *ctx, const char *path, qkd__gguf **out)
{
    *out = NULL;
    qkd__gguf *g = qkd__calloc(ctx, 1, sizeof *g);
    if (!g || !(g->path = qkd__strdup(ctx, path))) {
        qkd__free(ctx, g);
        return qkd__error(ctx, QKD_ERR_NO_MEMORY, "%s: no memory to open", path);
    }
    g->ctx = ctx;
    rd r = {.g = g, .pos = 0};
    qkd_status s = qkd__read_file(ctx, path, MAX_FILE_BYTES, &g->data, &g->size);
    if (s == QKD_OK)
        s = parse_header(&r);
    if (s == QKD_OK)
        s = parse_metadata(&r);
    if (s == QKD_OK)
        s = read_alignment(g);
    if (s == QKD_OK)
        s = parse_tensors(&r);
    if (s != QKD_OK) {
        qkd__gguf_close(g);
        return s;
    }
    *out = g;
    return QKD_OK;
}

void qkd__gguf_close(qkd__gguf *g)
{
    if (!g)
        return;
    qkd_context *ctx = g->ctx;
    for (uint64_t i = 0; g->kvs && i < g->n_kv; i++)
        qkd__free(ctx, g->kvs[i].str_pos);
    for (uint64_t i = 0; g->tensors && i < g->n_tensors; i++)
        qkd__free(ctx, (void *)g->tensors[i].name);
    qkd__free(ctx, g->kvs);
    qkd__free(ctx, g->tensors);
    qkd__free(ctx, g->data);
    qkd__free(ctx, g->path);
    qkd__free(ctx, g);
}

/* ---- metadata getters -------------------------------------------------- */

/* The key's entry if it exists with the wanted type (FORMAT recorded
 * otherwise); NOT_FOUND, unrecorded, when absent. */
static qkd_status typed_kv(const qkd__gguf *g, const char *key, uint32_t type,
                           const kv **out)
{
    *out = find_kv(g, key);
    if (!*out)
        return QKD_ERR_NOT_FOUND;
    if ((*out)->type != type)
        return qkd__error(g->ctx, QKD_ERR_FORMAT, "%s: key %s has type %s, expected %s",
                          g->path, key, value_type_name((*out)->type), value_type_name(type));
    return QKD_OK;
}

static bool is_int_type(uint32_t type)
{
    return scalar_size(type) != 0 && type != QKD__GGUF_F32 && type != QKD__GGUF_BOOL &&
           type != QKD__GGUF_F64;
}

/* An integer value of any width as int64; false if type is not an
 * integer type or a u64 exceeds INT64_MAX. */
static bool int_value(uint32_t type, const uint8_t *p, int64_t *v)
{
    union { uint8_t u8; int8_t i8; uint16_t u16; int16_t i16; uint32_t u32; int32_t i32;
            uint64_t u64; int64_t i64; } x;
    if (!is_int_type(type))
        return false;
    memcpy(&x, p, scalar_size(type));
    switch (type) {
    case QKD__GGUF_U8: *v = x.u8; return true;
    case QKD__GGUF_I8: *v = x.i8; return true;
    case QKD__GGUF_U16: *v = x.u16; return true;
    case QKD__GGUF_I16: *v = x.i16; return true;
    case QKD__GGUF_U32: *v = x.u32; return true;
    case QKD__GGUF_I32: *v = x.i32; return true;
    case QKD__GGUF_U64: *v = (int64_t)x.u64; return x.u64 <= (uint64_t)INT64_MAX;
    default: *v = x.i64; return true;
    }
}

qkd_status qkd__gguf_get_u32(const qkd__gguf *g, const char *key, uint32_t *out)
{
    const kv *e = find_kv(g, key);
    if (!e)
        return QKD_ERR_NOT_FOUND;
    int64_t v;
    if (!int_value(e->type, e->val, &v) || v < 0 || v > UINT32_MAX)
        return qkd__error(g->ctx, QKD_ERR_FORMAT, "%s: key %s (type %s) is not an integer "
                          "in the u32 range", g->path, key, value_type_name(e->type));
    *out = (uint32_t)v;
    return QKD_OK;
}

qkd_status qkd__gguf_get_f32(const qkd__gguf *g, const char *key, float *out)
{
    const kv *e = find_kv(g, key);
    if (!e)
        return QKD_ERR_NOT_FOUND;
    if (e->type == QKD__GGUF_F32) {
        memcpy(out, e->val, 4);
        return QKD_OK;
    }
    if (e->type == QKD__GGUF_F64) {
        double d;
        memcpy(&d, e->val, 8);
        *out = (float)d;
        return QKD_OK;
    }
    return qkd__error(g->ctx, QKD_ERR_FORMAT, "%s: key %s has type %s, expected f32 or f64",
                      g->path, key, value_type_name(e->type));
}

qkd_status qkd__gguf_get_str(const qkd__gguf *g, const char *key,
                             const char **s, uint64_t *len)
{
    const kv *e;
    qkd_status st = typed_kv(g, key, QKD__GGUF_STRING, &e);
    if (st != QKD_OK)
        return st;
    memcpy(len, e->val, 8);
    *s = (const char *)e->val + 8;
    return QKD_OK;
}

qkd_status qkd__gguf_get_arr(const qkd__gguf *g, const char *key,
                             qkd__gguf_type *elem_type, uint64_t *n)
{
    const kv *e;
    qkd_status s = typed_kv(g, key, QKD__GGUF_ARRAY, &e);
    if (s != QKD_OK)
        return s;
    *elem_type = (qkd__gguf_type)e->elem_type;
    *n = e->n;
    return QKD_OK;
}

/* An array key whose elements have type elem (FORMAT otherwise; elem I32
 * stands for any integer type) and, when n is not NULL, exactly *n
 * elements (SHAPE otherwise). */
static qkd_status array_kv(const qkd__gguf *g, const char *key, uint32_t elem,
                           const uint64_t *n, const kv **out)
{
    qkd_status s = typed_kv(g, key, QKD__GGUF_ARRAY, out);
    if (s != QKD_OK)
        return s;
    const kv *e = *out;
    bool ok = elem == QKD__GGUF_I32 ? is_int_type(e->elem_type) : e->elem_type == elem;
    if (!ok)
        return qkd__error(g->ctx, QKD_ERR_FORMAT, "%s: key %s is an array of %s, expected %s",
                          g->path, key, value_type_name(e->elem_type),
                          elem == QKD__GGUF_I32 ? "integers" : value_type_name(elem));
    if (n && *n != e->n)
        return qkd__error(g->ctx, QKD_ERR_SHAPE, "%s: key %s has %llu elements, %llu asked "
                          "for", g->path, key, (unsigned long long)e->n,
                          (unsigned long long)*n);
    return QKD_OK;
}

qkd_status qkd__gguf_arr_str(const qkd__gguf *g, const char *key, uint64_t i,
                             const char **s, uint64_t *len)
{
    const kv *e;
    qkd_status st = array_kv(g, key, QKD__GGUF_STRING, NULL, &e);
    if (st != QKD_OK)
        return st;
    if (i >= e->n)
        return qkd__error(g->ctx, QKD_ERR_RANGE, "%s: key %s: element %llu of %llu",
                          g->path, key, (unsigned long long)i, (unsigned long long)e->n);
    memcpy(len, g->data + e->str_pos[i], 8);
    *s = (const char *)g->data + e->str_pos[i] + 8;
    return QKD_OK;
}

qkd_status qkd__gguf_arr_f32(const qkd__gguf *g, const char *key, float *dst, uint64_t n)
{
    const kv *e;
    qkd_status s = array_kv(g, key, QKD__GGUF_F32, &n, &e);
    if (s == QKD_OK && n)
        memcpy(dst, e->val, (size_t)n * sizeof *dst);
    return s;
}

qkd_status qkd__gguf_arr_i32(const qkd__gguf *g, const char *key, int32_t *dst, uint64_t n)
{
    const kv *e;
    qkd_status s = array_kv(g, key, QKD__GGUF_I32, &n, &e);
    if (s != QKD_OK)
        return s;
    size_t esize = scalar_size(e->elem_type);
    for (uint64_t i = 0; i < n; i++) {
        int64_t v;
        if (!int_value(e->elem_type, e->val + i * esize, &v) || v < INT32_MIN || v > INT32_MAX)
            return qkd__error(g->ctx, QKD_ERR_FORMAT, "%s: key %s: element %llu is out of "
                              "the int32 range", g->path, key, (unsigned long long)i);
        dst[i] = (int32_t)v;
    }
    return QKD_OK;
}

/* ---- tensors ----------------------------------------------------------- */

int64_t qkd__gguf_n_tensors(const qkd__gguf *g)
{
    return (int64_t)g->n_tensors;
}

uint64_t qkd__gguf_data_elements(const qkd__gguf *g)
{
    uint64_t n = 0;
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (qkd__ggml_format_of(g->tensors[i].type))
            n += g->tensors[i].n_elements;
    return n;
}

qkd_status qkd__gguf_find_tensor(const qkd__gguf *g, const char *name,
                                 const qkd__gguf_tensor **out)
{
    qkd__gguf_tensor probe = {.name = name};
    *out = g->n_tensors ? bsearch(&probe, g->tensors, (size_t)g->n_tensors,
                                  sizeof *g->tensors, tensor_cmp) : NULL;
    return *out ? QKD_OK : QKD_ERR_NOT_FOUND;
}

qkd_status qkd__gguf_read_f32(qkd__gguf *g, const qkd__gguf_tensor *t,
                              float *dst, uint64_t n)
{
    if (n != t->n_elements)
        return qkd__error(g->ctx, QKD_ERR_SHAPE, "%s: tensor %s has %llu elements, %llu "
                          "asked for", g->path, t->name, (unsigned long long)t->n_elements,
                          (unsigned long long)n);
    const qkd__ggml_format *f = qkd__ggml_format_of(t->type);
    if (!f)
        return qkd__error(g->ctx, QKD_ERR_UNSUPPORTED, "%s: tensor %s has type %s (%u); "
                          "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K and "
                          "TQ2_0 are read", g->path, t->name, ggml_type_name(t->type),
                          t->type);
    /* check_tensor_range validated these bytes (whole blocks) at open. */
    qkd__ggml_dequantize_row(f, g->data + g->data_offset + t->offset, dst, (int64_t)n);
    return QKD_OK;
}
