/* Internal core: the context's body, error reporting, allocation and the
 * thread pool. Every internal non-static symbol is prefixed qkd__. */
#ifndef QKD_LIB_CORE_H
#define QKD_LIB_CORE_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "qkd/core.h"

typedef struct qkd__pool qkd__pool;
typedef struct qkd__backend qkd__backend;

#define QKD__ERROR_LEN 512

struct qkd_context {
    qkd_alloc_fn alloc;
    qkd_free_fn free;
    void *alloc_user;
    qkd_log_fn log;
    void *log_user;
    qkd_log_level log_level;
    int n_threads;
    qkd__pool *pool;
    qkd__backend *backend;
    char last_error[QKD__ERROR_LEN];
};

/* Record an error message on ctx (printf format) and log it at ERROR
 * level; returns status so callers can `return qkd__error(...)`. */
qkd_status qkd__error(qkd_context *ctx, qkd_status status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Log at `level` through the context's callback (printf format). */
void qkd__log(qkd_context *ctx, qkd_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Allocation through the context's hooks. qkd__alloc returns NULL on
 * failure without reporting; qkd__calloc zeroes and checks n*size for
 * overflow. Memory is 64-byte aligned (SIMD-friendly) whatever the hook
 * returns. qkd__free accepts NULL. */
void *qkd__alloc(qkd_context *ctx, size_t size);
void *qkd__calloc(qkd_context *ctx, size_t n, size_t size);
/* Bytes of host memory the system can give without swapping (Linux:
 * MemAvailable in /proc/meminfo), or SIZE_MAX where it does not say: an
 * allocation that succeeds under overcommit can still get the process
 * killed when its pages are touched. */
size_t qkd__host_memory_available(void);
/* The MemAvailable line of a /proc/meminfo text in bytes; SIZE_MAX
 * without a well-formed one. */
size_t qkd__meminfo_available(const char *text);
void qkd__free(qkd_context *ctx, void *ptr);
/* A copy of s (owned, qkd__free), NULL on failure. */
char *qkd__strdup(qkd_context *ctx, const char *s);

/* ---- thread pool -----------------------------------------------------
 * A persistent pool of n-1 libuv threads plus the calling thread. A run
 * calls fn(arg, i) exactly once for each i in [0, n_tasks) and returns
 * when all have finished. Tasks must write disjoint memory; which thread
 * runs a task never changes a result, so every kernel is deterministic
 * whatever the thread count. */
typedef void (*qkd__task_fn)(void *arg, int64_t task);

qkd_status qkd__pool_create(qkd_context *ctx, int n_threads, qkd__pool **out);
void qkd__pool_free(qkd_context *ctx, qkd__pool *pool);
void qkd__pool_run(qkd__pool *pool, int64_t n_tasks, qkd__task_fn fn, void *arg);
int qkd__pool_size(const qkd__pool *pool);

#endif
