/* The optimizer's state as bytes (layout in include/qkd/optim.h): a
 * header, each tensor's element count, then each tensor's moments. */
#include <string.h>

#include "optim/optim_impl.h"

#define STATE_MAGIC "QKDO"
#define STATE_VERSION 1u
#define HEADER_BYTES 24

static void put_u32(unsigned char *q, uint32_t v)
{
    memcpy(q, &v, sizeof v);
}

static void put_i64(unsigned char *q, int64_t v)
{
    memcpy(q, &v, sizeof v);
}

static uint32_t get_u32(const unsigned char *q)
{
    uint32_t v;
    memcpy(&v, q, sizeof v);
    return v;
}

static int64_t get_i64(const unsigned char *q)
{
    int64_t v;
    memcpy(&v, q, sizeof v);
    return v;
}

static const char *kind_name(uint32_t kind)
{
    return kind == QKD_OPTIM_ADAMW ? "AdamW" : kind == QKD_OPTIM_SGD ? "SGD" : "unknown";
}

/* Bytes before the moments. */
static size_t table_end(int n_tensors)
{
    return HEADER_BYTES + (size_t)n_tensors * sizeof(int64_t);
}

size_t qkd_optimizer_state_bytes(const qkd_optimizer *opt)
{
    if (!opt)
        return 0;
    size_t bytes = table_end(opt->n_tensors);
    for (int i = 0; i < opt->n_tensors; i++)
        bytes += (size_t)opt->n_moments * (size_t)opt->tensors[i].n * sizeof(float);
    return bytes;
}

qkd_status qkd_optimizer_state_get(const qkd_optimizer *opt, void *dst, size_t n)
{
    if (!opt)
        return QKD_ERR_INVALID_ARG;
    size_t need = qkd_optimizer_state_bytes(opt);
    if (!dst || n < need)
        return qkd__error(opt->ctx, QKD_ERR_INVALID_ARG,
                          "optimizer state_get: dst is NULL or its %zu bytes are fewer than "
                          "the %zu needed",
                          n, need);
    unsigned char *q = dst;
    memcpy(q, STATE_MAGIC, 4);
    put_u32(q + 4, STATE_VERSION);
    put_u32(q + 8, (uint32_t)opt->p.kind);
    put_u32(q + 12, (uint32_t)opt->n_tensors);
    int64_t step;
    qkd_status st = qkd__optim_applied(opt, &step);
    if (st != QKD_OK)
        return st;
    put_i64(q + 16, step);
    q += HEADER_BYTES;
    for (int i = 0; i < opt->n_tensors; i++, q += sizeof(int64_t))
        put_i64(q, opt->tensors[i].n);
    qkd__backend *be = opt->be;
    st = be->sync(be);
    for (int i = 0; i < opt->n_tensors && st == QKD_OK; i++) {
        const qkd__optim_tensor *t = &opt->tensors[i];
        size_t bytes = (size_t)t->n * sizeof(float);
        for (int k = 0; k < opt->n_moments && st == QKD_OK; k++, q += bytes)
            st = be->download(be, q, t->moments + (size_t)k * qkd__optim_stride(t), bytes);
    }
    return st;
}

/* Check that src (n bytes) is a state this optimizer can take; *step gets
 * its step counter. */
static qkd_status check_state(const qkd_optimizer *opt, const unsigned char *src, size_t n,
                              int64_t *step)
{
    qkd_context *ctx = opt->ctx;
    if (n < HEADER_BYTES || memcmp(src, STATE_MAGIC, 4) != 0)
        return qkd__error(ctx, QKD_ERR_FORMAT,
                          "optimizer state_set: %zu bytes that do not start with an optimizer "
                          "state header",
                          n);
    if (get_u32(src + 4) != STATE_VERSION)
        return qkd__error(ctx, QKD_ERR_FORMAT, "optimizer state_set: version %u, expected %u",
                          get_u32(src + 4), STATE_VERSION);
    uint32_t kind = get_u32(src + 8);
    if (kind != (uint32_t)opt->p.kind)
        return qkd__error(ctx, QKD_ERR_SHAPE,
                          "optimizer state_set: the state is %s's, this optimizer is %s",
                          kind_name(kind), kind_name((uint32_t)opt->p.kind));
    uint32_t n_tensors = get_u32(src + 12);
    if (n_tensors != (uint32_t)opt->n_tensors)
        return qkd__error(ctx, QKD_ERR_SHAPE,
                          "optimizer state_set: the state has %u tensors, the model %d",
                          n_tensors, opt->n_tensors);
    *step = get_i64(src + 16);
    if (*step < 0)
        return qkd__error(ctx, QKD_ERR_FORMAT, "optimizer state_set: negative step %lld",
                          (long long)*step);
    if (n < table_end(opt->n_tensors))
        return qkd__error(ctx, QKD_ERR_FORMAT,
                          "optimizer state_set: truncated in its tensor table (%zu bytes)", n);
    for (int i = 0; i < opt->n_tensors; i++) {
        int64_t elems = get_i64(src + HEADER_BYTES + (size_t)i * sizeof(int64_t));
        if (elems != opt->tensors[i].n)
            return qkd__error(ctx, QKD_ERR_SHAPE,
                              "optimizer state_set: tensor %d has %lld elements in the state, "
                              "%lld in the model",
                              i, (long long)elems, (long long)opt->tensors[i].n);
    }
    size_t need = qkd_optimizer_state_bytes(opt);
    if (n != need)
        return qkd__error(ctx, QKD_ERR_FORMAT,
                          "optimizer state_set: %zu bytes, the header implies %zu", n, need);
    return QKD_OK;
}

qkd_status qkd_optimizer_state_set(qkd_optimizer *opt, const void *src, size_t n)
{
    if (!opt)
        return QKD_ERR_INVALID_ARG;
    if (!src)
        return qkd__error(opt->ctx, QKD_ERR_INVALID_ARG, "optimizer state_set: src is NULL");
    int64_t step = 0;
    qkd_status st = check_state(opt, src, n, &step);
    if (st != QKD_OK)
        return st;
    const unsigned char *q = (const unsigned char *)src + table_end(opt->n_tensors);
    qkd__backend *be = opt->be;
    for (int i = 0; i < opt->n_tensors && st == QKD_OK; i++) {
        const qkd__optim_tensor *t = &opt->tensors[i];
        size_t bytes = (size_t)t->n * sizeof(float);
        for (int k = 0; k < opt->n_moments && st == QKD_OK; k++, q += bytes)
            st = be->upload(be, t->moments + (size_t)k * qkd__optim_stride(t), q, bytes);
    }
    if (st == QKD_OK) {
        opt->step = step;
        opt->pending = 0;  /* the queued steps ran before these uploads */
        opt->st_stale = 1; /* the device's count is step's from the next deferred step */
    }
    return st;
}
