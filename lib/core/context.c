/* The context: allocator hooks, log, last error, thread pool, backend. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "backend/backend.h"
#include "core/core.h"

void qkd_context_params_init(qkd_context_params *p)
{
    if (!p)
        return;
    memset(p, 0, sizeof *p);
    p->size = sizeof *p;
    p->log_level = QKD_LOG_WARN;
    p->backend = QKD_BACKEND_AUTO;
}

static int default_threads(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > 256 ? 256 : (int)n;
}

qkd_status qkd_context_create(const qkd_context_params *params, qkd_context **out)
{
    if (!out)
        return QKD_ERR_INVALID_ARG;
    *out = NULL;
    qkd_context_params defaults;
    qkd_context_params_init(&defaults);
    const qkd_context_params *p = params ? params : &defaults;
    if (p->size < sizeof(qkd_context_params) || (!p->alloc != !p->free) ||
        p->n_threads < 0 || p->backend < QKD_BACKEND_AUTO || p->backend > QKD_BACKEND_CUDA)
        return QKD_ERR_INVALID_ARG;

    /* The context itself comes from the caller's allocator too. */
    qkd_context boot = {.alloc = p->alloc, .free = p->free, .alloc_user = p->alloc_user};
    qkd_context *ctx = qkd__calloc(&boot, 1, sizeof *ctx);
    if (!ctx)
        return QKD_ERR_NO_MEMORY;
    ctx->alloc = p->alloc;
    ctx->free = p->free;
    ctx->alloc_user = p->alloc_user;
    ctx->log = p->log;
    ctx->log_user = p->log_user;
    ctx->log_level = p->log_level;
    ctx->n_threads = p->n_threads ? p->n_threads : default_threads();

    qkd_status st = qkd__pool_create(ctx, ctx->n_threads, &ctx->pool);
    if (st == QKD_OK)
        st = qkd__backend_create(ctx, p->backend, &ctx->backend);
    if (st != QKD_OK) {
        qkd_context_free(ctx);
        return st;
    }
    *out = ctx;
    return QKD_OK;
}

void qkd_context_free(qkd_context *ctx)
{
    if (!ctx)
        return;
    qkd__backend_free(ctx->backend);
    qkd__pool_free(ctx, ctx->pool);
    qkd__free(ctx, ctx);
}

const char *qkd_context_last_error(const qkd_context *ctx)
{
    return ctx ? ctx->last_error : "no context";
}

qkd_status qkd_context_set_error(qkd_context *ctx, qkd_status status, const char *fmt, ...)
{
    if (!ctx || !fmt)
        return status;
    char msg[QKD__ERROR_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return qkd__error(ctx, status, "%s", msg);
}

int qkd_context_n_threads(const qkd_context *ctx)
{
    return ctx ? ctx->n_threads : 0;
}

const char *qkd_context_backend_name(const qkd_context *ctx)
{
    return ctx && ctx->backend ? ctx->backend->name : "none";
}

static void vlog(qkd_context *ctx, qkd_log_level level, const char *fmt, va_list ap)
{
    if (!ctx->log || level > ctx->log_level)
        return;
    char msg[QKD__ERROR_LEN];
    vsnprintf(msg, sizeof msg, fmt, ap);
    ctx->log(ctx->log_user, level, msg);
}

qkd_status qkd__error(qkd_context *ctx, qkd_status status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->last_error, sizeof ctx->last_error, fmt, ap);
    va_end(ap);
    if (ctx->log && ctx->log_level >= QKD_LOG_ERROR)
        ctx->log(ctx->log_user, QKD_LOG_ERROR, ctx->last_error);
    return status;
}

void qkd__log(qkd_context *ctx, qkd_log_level level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog(ctx, level, fmt, ap);
    va_end(ap);
}
