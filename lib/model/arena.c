/* A bump allocator laying out many activation buffers in one device
 * allocation: the same plan runs once to measure and once to place, so a
 * layout is written exactly once. */
#include "model/model_impl.h"

#define ARENA_ALIGN_FLOATS 16 /* 64 bytes */

float *qkd__arena_take(qkd__arena *a, size_t rows, size_t cols)
{
    size_t n, end;
    if (__builtin_mul_overflow(rows, cols, &n) ||
        __builtin_add_overflow(n, (size_t)ARENA_ALIGN_FLOATS - 1, &n)) {
        a->overflow = 1;
        return NULL;
    }
    n -= n % ARENA_ALIGN_FLOATS;
    float *p = a->base ? a->base + a->used : NULL;
    if (__builtin_add_overflow(a->used, n, &end))
        a->overflow = 1;
    else
        a->used = end;
    return p;
}

qkd_status qkd__arena_alloc(qkd_context *ctx, const char *what,
                            void (*plan)(void *arg, qkd__arena *a), void *arg,
                            void **mem)
{
    *mem = NULL;
    qkd__arena measure = {0};
    plan(arg, &measure);
    if (measure.overflow || measure.used > SIZE_MAX / sizeof(float))
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "%s: buffer size overflows size_t", what);
    qkd__backend *be = ctx->backend;
    qkd_status st = be->alloc(be, measure.used * sizeof(float), mem);
    if (st != QKD_OK)
        return st;
    qkd__arena place = {.base = *mem};
    plan(arg, &place);
    return QKD_OK;
}
