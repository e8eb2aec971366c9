/* Allocation through the context's hooks, 64-byte aligned whatever the
 * hook returns: the hook's pointer is stored just below the aligned one;
 * and how much host memory the system says it can give. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"

#define QKD__ALIGN 64

void *qkd__alloc(qkd_context *ctx, size_t size)
{
    if (size > SIZE_MAX - QKD__ALIGN - sizeof(void *))
        return NULL;
    size_t total = size + QKD__ALIGN + sizeof(void *);
    void *raw = ctx->alloc ? ctx->alloc(ctx->alloc_user, total) : malloc(total);
    if (!raw)
        return NULL;
    uintptr_t start = (uintptr_t)raw + sizeof(void *);
    uintptr_t aligned = (start + QKD__ALIGN - 1) & ~(uintptr_t)(QKD__ALIGN - 1);
    ((void **)aligned)[-1] = raw;
    return (void *)aligned;
}

void *qkd__calloc(qkd_context *ctx, size_t n, size_t size)
{
    if (size && n > SIZE_MAX / size)
        return NULL;
    void *p = qkd__alloc(ctx, n * size);
    if (p)
        memset(p, 0, n * size);
    return p;
}

void qkd__free(qkd_context *ctx, void *ptr)
{
    if (!ptr)
        return;
    void *raw = ((void **)ptr)[-1];
    if (ctx->free)
        ctx->free(ctx->alloc_user, raw);
    else
        free(raw);
}

char *qkd__strdup(qkd_context *ctx, const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = qkd__alloc(ctx, n);
    if (d)
        memcpy(d, s, n);
    return d;
}

void *qkd_context_alloc(qkd_context *ctx, size_t size)
{
    return ctx ? qkd__alloc(ctx, size) : NULL;
}

void qkd_context_dealloc(qkd_context *ctx, void *ptr)
{
    if (ctx)
        qkd__free(ctx, ptr);
}

size_t qkd__meminfo_available(const char *text)
{
    static const char key[] = "MemAvailable:";
    const char *p = text ? strstr(text, key) : NULL;
    if (!p)
        return SIZE_MAX;
    p += sizeof key - 1;
    char *end;
    errno = 0;
    unsigned long long kb = strtoull(p, &end, 10);
    if (end == p || errno)
        return SIZE_MAX;
    while (*end == ' ' || *end == '\t')
        end++;
    if (strncmp(end, "kB", 2) != 0)
        return SIZE_MAX;
    return kb > SIZE_MAX / 1024 ? SIZE_MAX : (size_t)kb * 1024;
}

size_t qkd__host_memory_available(void)
{
    char text[4096]; /* MemAvailable is the third line */
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f)
        return SIZE_MAX;
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = '\0';
    return qkd__meminfo_available(text);
}
