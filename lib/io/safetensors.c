/* safetensors reader: checked header at open, tensor data on demand. */
#include "io/safetensors.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "core/half.h"

/* The format's own cap on the JSON header (the reference implementation
 * refuses larger ones); it also bounds what a corrupt length can make us
 * allocate. */
#define MAX_HEADER_BYTES (100u << 20)
#define READ_CHUNK_BYTES (1u << 16)

struct qkd__safetensors {
    qkd_context *ctx;
    char *path;
    FILE *file;
    uint64_t data_start; /* 8 + header length */
    uint64_t data_len;
    json_t *header;      /* owns the name and dtype strings of tensors[] */
    qkd__st_tensor *tensors;
    size_t n_tensors;
};

/* Element sizes of the dtypes the format defines. Files may hold tensors
 * of any of them; only F32, F16 and BF16 can be read as float. */
static const struct {
    const char *name;
    unsigned size;
} dtypes[] = {
    {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"F8_E4M3", 1},
    {"F8_E5M2", 1}, {"I64", 8}, {"I32", 4}, {"I16", 2}, {"I8", 1},
    {"U64", 8}, {"U32", 4}, {"U16", 2}, {"U8", 1}, {"BOOL", 1},
};

static unsigned dtype_size(const char *name)
{
    for (size_t i = 0; i < sizeof dtypes / sizeof dtypes[0]; i++)
        if (strcmp(dtypes[i].name, name) == 0)
            return dtypes[i].size;
    return 0;
}

static qkd_status open_file(qkd__safetensors *st, uint64_t *file_size)
{
    qkd_context *ctx = st->ctx;
    st->file = fopen(st->path, "rb");
    if (!st->file)
        return qkd__error(ctx, QKD_ERR_IO, "%s: cannot open: %s", st->path, strerror(errno));
    off_t end;
    if (fseeko(st->file, 0, SEEK_END) != 0 || (end = ftello(st->file)) < 0 ||
        fseeko(st->file, 0, SEEK_SET) != 0)
        return qkd__error(ctx, QKD_ERR_IO, "%s: cannot seek: %s", st->path, strerror(errno));
    *file_size = (uint64_t)end;
    return QKD_OK;
}

/* Read the length prefix and the JSON header into st->header. */
static qkd_status read_header(qkd__safetensors *st)
{
    qkd_context *ctx = st->ctx;
    uint64_t size = 0;
    qkd_status s = open_file(st, &size);
    if (s != QKD_OK)
        return s;
    uint8_t len_bytes[8];
    if (size < 8 || fread(len_bytes, 1, 8, st->file) != 8)
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: truncated: %llu bytes, too short "
                          "for the 8-byte header length", st->path, (unsigned long long)size);
    uint64_t len = 0;
    for (int i = 7; i >= 0; i--)
        len = len << 8 | len_bytes[i];
    if (len > size - 8)
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: header length %llu runs past the end "
                          "of the %llu-byte file", st->path, (unsigned long long)len,
                          (unsigned long long)size);
    if (len > MAX_HEADER_BYTES)
        return qkd__error(ctx, QKD_ERR_FORMAT, "%s: header length %llu exceeds the "
                          "format's limit of %u bytes", st->path,
                          (unsigned long long)len, MAX_HEADER_BYTES);
    st->data_start = 8 + len;
    st->data_len = size - 8 - len;

    char *text = qkd__alloc(ctx, len ? len : 1);
    if (!text)
        return qkd__error(ctx, QKD_ERR_NO_MEMORY, "%s: no memory for the %llu-byte header",
                          st->path, (unsigned long long)len);
    s = QKD_OK;
    if (fread(text, 1, len, st->file) != len) {
        s = qkd__error(ctx, QKD_ERR_IO, "%s: cannot read the header", st->path);
    } else {
        json_error_t jerr;
        st->header = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
        if (!st->header)
            s = qkd__error(ctx, QKD_ERR_FORMAT, "%s: header is not valid JSON: %s "
                           "(header byte %d)", st->path, jerr.text, jerr.position);
        else if (!json_is_object(st->header))
            s = qkd__error(ctx, QKD_ERR_FORMAT, "%s: header is not a JSON object", st->path);
    }
    qkd__free(ctx, text);
    return s;
}

/* A JSON integer in [0, 2^63) into *out. */
static bool json_u64(const json_t *v, uint64_t *out)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return false;
    *out = (uint64_t)json_integer_value(v);
    return true;
}

static qkd_status parse_shape(qkd__safetensors *st, qkd__st_tensor *t, const json_t *shape)
{
    if (!json_is_array(shape) || json_array_size(shape) > QKD__ST_MAX_DIMS)
        return qkd__error(st->ctx, QKD_ERR_FORMAT, "%s: tensor '%s': shape is not an "
                          "array of at most %d sizes", st->path, t->name, QKD__ST_MAX_DIMS);
    t->n_dims = (int)json_array_size(shape);
    t->n_elements = 1;
    for (int d = 0; d < t->n_dims; d++) {
        uint64_t n;
        if (!json_u64(json_array_get(shape, (size_t)d), &n))
            return qkd__error(st->ctx, QKD_ERR_FORMAT, "%s: tensor '%s': shape[%d] is not "
                              "a non-negative integer", st->path, t->name, d);
        if (n != 0 && t->n_elements > UINT64_MAX / n)
            return qkd__error(st->ctx, QKD_ERR_FORMAT, "%s: tensor '%s': shape overflows "
                              "64 bits", st->path, t->name);
        t->shape[d] = n;
        t->n_elements *= n;
    }
    return QKD_OK;
}

/* data_offsets must lie inside the data section and span exactly the
 * bytes the shape and dtype call for. */
static qkd_status parse_offsets(qkd__safetensors *st, qkd__st_tensor *t,
                                const json_t *offs, unsigned elem_size)
{
    if (!json_is_array(offs) || json_array_size(offs) != 2 ||
        !json_u64(json_array_get(offs, 0), &t->begin) ||
        !json_u64(json_array_get(offs, 1), &t->end))
        return qkd__error(st->ctx, QKD_ERR_FORMAT, "%s: tensor '%s': data_offsets is not "
                          "two non-negative integers", st->path, t->name);
    if (t->begin > t->end || t->end > st->data_len)
        return qkd__error(st->ctx, QKD_ERR_FORMAT, "%s: tensor '%s': data_offsets [%llu, "
                          "%llu] out of the %llu-byte data section", st->path, t->name,
                          (unsigned long long)t->begin, (unsigned long long)t->end,
                          (unsigned long long)st->data_len);
    if (t->n_elements > UINT64_MAX / elem_size ||
        t->end - t->begin != t->n_elements * elem_size)
        return qkd__error(st->ctx, QKD_ERR_FORMAT, "%s: tensor '%s': data_offsets span %llu "
                          "bytes but %llu %s elements need %llu", st->path, t->name,
                          (unsigned long long)(t->end - t->begin),
                          (unsigned long long)t->n_elements, t->dtype,
                          (unsigned long long)t->n_elements * elem_size);
    return QKD_OK;
}

static qkd_status parse_entry(qkd__safetensors *st, qkd__st_tensor *t, const json_t *v)
{
    if (!json_is_object(v))
        return qkd__error(st->ctx, QKD_ERR_FORMAT, "%s: tensor '%s': entry is not a JSON "
                          "object", st->path, t->name);
    t->dtype = json_string_value(json_object_get(v, "dtype"));
    if (!t->dtype)
        return qkd__error(st->ctx, QKD_ERR_FORMAT, "%s: tensor '%s': dtype missing or not "
                          "a string", st->path, t->name);
    unsigned elem_size = dtype_size(t->dtype);
    if (!elem_size)
        return qkd__error(st->ctx, QKD_ERR_UNSUPPORTED, "%s: tensor '%s': unknown dtype "
                          "'%s'", st->path, t->name, t->dtype);
    qkd_status s = parse_shape(st, t, json_object_get(v, "shape"));
    if (s != QKD_OK)
        return s;
    return parse_offsets(st, t, json_object_get(v, "data_offsets"), elem_size);
}

static qkd_status parse_tensors(qkd__safetensors *st)
{
    size_t cap = json_object_size(st->header);
    st->tensors = qkd__calloc(st->ctx, cap ? cap : 1, sizeof *st->tensors);
    if (!st->tensors)
        return qkd__error(st->ctx, QKD_ERR_NO_MEMORY, "%s: no memory for %zu tensor entries",
                          st->path, cap);
    const char *key;
    json_t *value;
    json_object_foreach(st->header, key, value) {
        if (strcmp(key, "__metadata__") == 0)
            continue;
        qkd__st_tensor *t = &st->tensors[st->n_tensors];
        t->name = key;
        qkd_status s = parse_entry(st, t, value);
        if (s != QKD_OK)
            return s;
        st->n_tensors++;
    }
    return QKD_OK;
}

qkd_status qkd__st_open(qkd_context *ctx, const char *path, qkd__safetensors **out)
{
    *out = NULL;
    qkd__safetensors *st = qkd__calloc(ctx, 1, sizeof *st);
    if (!st)
        return qkd__error(ctx, QKD_ERR_NO_MEMORY, "%s: no memory", path);
    st->ctx = ctx;
    st->path = qkd__strdup(ctx, path);
    qkd_status s = st->path ? read_header(st)
                            : qkd__error(ctx, QKD_ERR_NO_MEMORY, "%s: no memory", path);
    if (s == QKD_OK)
        s = parse_tensors(st);
    if (s != QKD_OK) {
        qkd__st_close(st);
        return s;
    }
    *out = st;
    return QKD_OK;
}

void qkd__st_close(qkd__safetensors *st)
{
    if (!st)
        return;
    if (st->file)
        fclose(st->file);
    json_decref(st->header);
    qkd__free(st->ctx, st->tensors);
    qkd__free(st->ctx, st->path);
    qkd__free(st->ctx, st);
}

const qkd__st_tensor *qkd__st_find(const qkd__safetensors *st, const char *name)
{
    for (size_t i = 0; i < st->n_tensors; i++)
        if (strcmp(st->tensors[i].name, name) == 0)
            return &st->tensors[i];
    return NULL;
}

uint64_t qkd__st_elements(const qkd__safetensors *st)
{
    uint64_t n = 0;
    for (size_t i = 0; i < st->n_tensors; i++)
        n += st->tensors[i].n_elements;
    return n;
}

/* ---- conversion to float (little-endian bytes) ---- */

static float f32_from(const uint8_t *p)
{
    uint32_t u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                 (uint32_t)p[3] << 24;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static float bf16_from(const uint8_t *p)
{
    return qkd__bf16_to_f32((uint16_t)(p[0] | p[1] << 8));
}

static float f16_from(const uint8_t *p)
{
    return qkd__f16_to_f32((uint16_t)(p[0] | p[1] << 8));
}

typedef float (*convert_fn)(const uint8_t *p);

qkd_status qkd__st_read_f32(qkd__safetensors *st, const qkd__st_tensor *t,
                            float *dst, uint64_t n)
{
    qkd_context *ctx = st->ctx;
    if (n != t->n_elements)
        return qkd__error(ctx, QKD_ERR_SHAPE, "%s: tensor '%s' has %llu elements, not %llu",
                          st->path, t->name, (unsigned long long)t->n_elements,
                          (unsigned long long)n);
    convert_fn convert = strcmp(t->dtype, "F32") == 0    ? f32_from
                         : strcmp(t->dtype, "F16") == 0  ? f16_from
                         : strcmp(t->dtype, "BF16") == 0 ? bf16_from
                                                         : NULL;
    if (!convert)
        return qkd__error(ctx, QKD_ERR_UNSUPPORTED, "%s: tensor '%s' has dtype %s; only F32, "
                          "F16 and BF16 are read", st->path, t->name, t->dtype);
    size_t elem = dtype_size(t->dtype);
    uint8_t *chunk = qkd__alloc(ctx, READ_CHUNK_BYTES);
    if (!chunk)
        return qkd__error(ctx, QKD_ERR_NO_MEMORY, "%s: no memory for a read buffer", st->path);
    qkd_status s = QKD_OK;
    if (fseeko(st->file, (off_t)(st->data_start + t->begin), SEEK_SET) != 0)
        s = qkd__error(ctx, QKD_ERR_IO, "%s: cannot seek to tensor '%s': %s", st->path,
                       t->name, strerror(errno));
    for (uint64_t done = 0; s == QKD_OK && done < n;) {
        size_t count = (size_t)(n - done < READ_CHUNK_BYTES / elem ? n - done
                                                                   : READ_CHUNK_BYTES / elem);
        if (fread(chunk, elem, count, st->file) != count) {
            s = qkd__error(ctx, QKD_ERR_IO, "%s: tensor '%s': read failed at element %llu "
                           "(file changed?)", st->path, t->name, (unsigned long long)done);
            break;
        }
        for (size_t i = 0; i < count; i++)
            dst[done + i] = convert(chunk + i * elem);
        done += count;
    }
    qkd__free(ctx, chunk);
    return s;
}
