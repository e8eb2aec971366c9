/* libqkd core: export macro, status codes, versions, and the context.
 *
 * Threading contract (whole library): there is no mutable global state.
 * One handle is used by one thread at a time; distinct handles (and the
 * handles created from distinct contexts) are independent. A context and
 * every handle created from it must be used by one thread at a time.
 *
 * Ownership words used in every header:
 *   owned    - the caller frees it with the named function;
 *   borrowed - valid until the named handle is freed or changed;
 *   copied   - the library keeps its own copy; the caller's may go.
 */
#ifndef QKD_CORE_H
#define QKD_CORE_H

#include <stddef.h>
#include <stdint.h>

#include "version.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#  define QKD_API __declspec(dllexport)
#elif defined(__GNUC__)
#  define QKD_API __attribute__((visibility("default")))
#else
#  define QKD_API
#endif

/* ---- status codes ------------------------------------------------------
 * One table, values frozen forever: new codes are appended with new
 * numbers, none is renumbered or removed. OK is 0, errors are negative. */
#define QKD_STATUS_MAP(X)                                                     \
    X(OK,                0,   "success")                                      \
    X(ERR_INVALID_ARG,  -1,   "invalid argument")                             \
    X(ERR_NO_MEMORY,    -2,   "out of memory")                                \
    X(ERR_IO,           -3,   "input/output error")                           \
    X(ERR_FORMAT,       -4,   "malformed or truncated file")                  \
    X(ERR_UNSUPPORTED,  -5,   "unsupported feature or file variant")          \
    X(ERR_SHAPE,        -6,   "shape or size mismatch")                       \
    X(ERR_BACKEND,      -7,   "compute backend failure")                      \
    X(ERR_STATE,        -8,   "call not valid in the handle's current state") \
    X(ERR_NOT_FOUND,    -9,   "not found")                                    \
    X(ERR_NON_FINITE,   -10,  "non-finite number")                            \
    X(ERR_CANCELLED,    -11,  "cancelled by the caller")                      \
    X(ERR_VERSION,      -12,  "version mismatch")                             \
    X(ERR_RANGE,        -13,  "value out of range")

typedef enum qkd_status {
#define QKD__STATUS_ENUM(name, value, text) QKD_##name = value,
    QKD_STATUS_MAP(QKD__STATUS_ENUM)
#undef QKD__STATUS_ENUM
} qkd_status;

/* "QKD_ERR_IO" for QKD_ERR_IO; "QKD_UNKNOWN_STATUS" for a value not in the
 * table. Static string, never NULL. @since 0.1 */
QKD_API const char *qkd_status_name(qkd_status status);
/* A short English description ("input/output error"). Static, never NULL.
 * @since 0.1 */
QKD_API const char *qkd_status_str(qkd_status status);

/* ---- versions ---------------------------------------------------------- */

/* QKD_VERSION_NUMBER of the library actually loaded. @since 0.1 */
QKD_API unsigned qkd_version(void);
/* "0.1.0" of the library actually loaded. Static. @since 0.1 */
QKD_API const char *qkd_version_string(void);

/* ---- context ------------------------------------------------------------
 * A context holds what every other handle shares: the allocator, the log,
 * the thread pool and the compute backend. Create one per thread that
 * trains or infers independently. */
typedef struct qkd_context qkd_context;

/* Allocator hooks. alloc returns NULL on failure (the library then reports
 * QKD_ERR_NO_MEMORY); free accepts NULL. The library aligns what it needs
 * itself, so plain malloc semantics are enough. Tests use these hooks to
 * fail the Nth allocation. */
typedef void *(*qkd_alloc_fn)(void *user, size_t size);
typedef void (*qkd_free_fn)(void *user, void *ptr);

typedef enum qkd_log_level {
    QKD_LOG_ERROR = 0,
    QKD_LOG_WARN = 1,
    QKD_LOG_INFO = 2,
    QKD_LOG_DEBUG = 3
} qkd_log_level;

/* Called on the thread that made the library call; msg has no newline and
 * is borrowed for the duration of the call. */
typedef void (*qkd_log_fn)(void *user, qkd_log_level level, const char *msg);

typedef enum qkd_backend_kind {
    QKD_BACKEND_AUTO = 0, /* SIMD where built in, else REF; never CUDA */
    QKD_BACKEND_REF = 1,  /* scalar C reference: the oracle */
    QKD_BACKEND_SIMD = 2,
    QKD_BACKEND_CUDA = 3
} qkd_backend_kind;

typedef struct qkd_context_params {
    size_t size;            /* sizeof(qkd_context_params), set by _init */
    qkd_alloc_fn alloc;     /* NULL: libc malloc */
    qkd_free_fn free;       /* NULL: libc free; set both or neither */
    void *alloc_user;
    qkd_log_fn log;         /* NULL: no log output */
    void *log_user;
    qkd_log_level log_level; /* messages above this level are dropped */
    int n_threads;          /* 0: one per online CPU core */
    qkd_backend_kind backend;
} qkd_context_params;

/* Fill defaults: libc allocator, no log, level WARN, all cores, AUTO.
 * @since 0.1 */
QKD_API void qkd_context_params_init(qkd_context_params *params);

/* Create a context. params may be NULL for defaults.
 * *out: owned, free with qkd_context_free; NULL on error.
 * Errors: INVALID_ARG (NULL out, bad size field, one allocator hook
 * without the other, n_threads < 0), NO_MEMORY, UNSUPPORTED (the backend
 * asked for is not built in or has no device). @since 0.1 */
QKD_API qkd_status qkd_context_create(const qkd_context_params *params,
                                      qkd_context **out);

/* Free a context. Every handle created from it must be freed first.
 * Accepts NULL. @since 0.1 */
QKD_API void qkd_context_free(qkd_context *ctx);

/* The message of the last error reported on this context ("" if none):
 * what failed and why, e.g. "stories.bin: truncated at byte 4096 of
 * 1056540". Borrowed until the next call on the context or its handles.
 * @since 0.1 */
QKD_API const char *qkd_context_last_error(const qkd_context *ctx);

/* Record status and a message (printf format) as the context's last error
 * and log it at ERROR level, exactly as the library does for its own
 * failures: layers built on the public API (the data and distillation
 * layers, a host's wrappers) report through the same channel. ctx may be
 * NULL (nothing is recorded). Returns status, so that callers can write
 * `return qkd_context_set_error(ctx, QKD_ERR_FORMAT, ...)`. @since 0.1 */
QKD_API qkd_status qkd_context_set_error(qkd_context *ctx, qkd_status status,
                                         const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Host memory through the context's allocator hooks, for layers built on
 * the public API (the data and distillation layers, a host's wrappers), so
 * that every allocation made on behalf of a context is seen by its hooks.
 * qkd_context_alloc returns at least size bytes, 64-byte aligned (size 0
 * gives a valid pointer), or NULL when the hook fails, size is too large
 * or ctx is NULL; it records no error (the caller reports NO_MEMORY).
 * The memory is owned: give it back with qkd_context_dealloc on the same
 * context, before the context is freed. qkd_context_dealloc accepts NULL.
 * Thread rules: those of the context. @since 0.1 */
QKD_API void *qkd_context_alloc(qkd_context *ctx, size_t size);
QKD_API void qkd_context_dealloc(qkd_context *ctx, void *ptr);

/* Number of worker threads the context computes with (>= 1). @since 0.1 */
QKD_API int qkd_context_n_threads(const qkd_context *ctx);

/* Name of the compute backend in use: "ref", "simd", "cuda". Static.
 * @since 0.1 */
QKD_API const char *qkd_context_backend_name(const qkd_context *ctx);

#ifdef __cplusplus
}
#endif
#endif
