/* Core: statuses, versions, the context, allocator hooks, the thread pool,
 * and the exported-symbol list of the shared library. */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "testutil.h"

/* ---- statuses and versions ---------------------------------------------- */

START_TEST(status_table_is_consistent)
{
    static const qkd_status all[] = {
#define X(name, value, text) QKD_##name,
        QKD_STATUS_MAP(X)
#undef X
    };
    size_t n = sizeof all / sizeof all[0];
    ck_assert_int_eq(QKD_OK, 0);
    for (size_t i = 0; i < n; i++) {
        ck_assert_msg(i == 0 || all[i] < 0, "errors are negative");
        ck_assert_str_ne(qkd_status_name(all[i]), "QKD_UNKNOWN_STATUS");
        ck_assert_str_ne(qkd_status_str(all[i]), "unknown status");
        for (size_t j = 0; j < i; j++)
            ck_assert_int_ne(all[i], all[j]);
    }
    ck_assert_str_eq(qkd_status_name(QKD_ERR_FORMAT), "QKD_ERR_FORMAT");
    ck_assert_str_eq(qkd_status_name((qkd_status)-9999), "QKD_UNKNOWN_STATUS");
    ck_assert_str_eq(qkd_status_str((qkd_status)12345), "unknown status");
}
END_TEST

/* The frozen numbers: changing one breaks every binary built against us. */
START_TEST(status_values_are_frozen)
{
    ck_assert_int_eq(QKD_ERR_INVALID_ARG, -1);
    ck_assert_int_eq(QKD_ERR_NO_MEMORY, -2);
    ck_assert_int_eq(QKD_ERR_IO, -3);
    ck_assert_int_eq(QKD_ERR_FORMAT, -4);
    ck_assert_int_eq(QKD_ERR_UNSUPPORTED, -5);
    ck_assert_int_eq(QKD_ERR_SHAPE, -6);
    ck_assert_int_eq(QKD_ERR_BACKEND, -7);
    ck_assert_int_eq(QKD_ERR_STATE, -8);
    ck_assert_int_eq(QKD_ERR_NOT_FOUND, -9);
    ck_assert_int_eq(QKD_ERR_NON_FINITE, -10);
    ck_assert_int_eq(QKD_ERR_CANCELLED, -11);
    ck_assert_int_eq(QKD_ERR_VERSION, -12);
    ck_assert_int_eq(QKD_ERR_RANGE, -13);
}
END_TEST

START_TEST(version_matches_header)
{
    char expect[32];
    snprintf(expect, sizeof expect, "%d.%d.%d", QKD_VERSION_MAJOR, QKD_VERSION_MINOR,
             QKD_VERSION_PATCH);
    ck_assert_uint_eq(qkd_version(), QKD_VERSION_NUMBER);
    ck_assert_str_eq(qkd_version_string(), expect);
    ck_assert(QKD_VERSION_AT_LEAST(0, 0, 1));
    ck_assert(!QKD_VERSION_AT_LEAST(QKD_VERSION_MAJOR + 1, 0, 0));
}
END_TEST

/* ---- context -------------------------------------------------------------- */

START_TEST(context_defaults)
{
    qkd_context *ctx = NULL;
    ck_assert_int_eq(qkd_context_create(NULL, &ctx), QKD_OK);
    ck_assert_ptr_nonnull(ctx);
    ck_assert_int_ge(qkd_context_n_threads(ctx), 1);
    /* AUTO picks the fastest backend built in; the CPU ones are always there. */
    const char *name = qkd_context_backend_name(ctx);
    ck_assert_msg(strcmp(name, "ref") == 0 || strcmp(name, "simd") == 0, "backend %s", name);
    ck_assert_str_eq(qkd_context_last_error(ctx), "");
    qkd_context_free(ctx);
    qkd_context_free(NULL);
}
END_TEST

START_TEST(context_rejects_bad_params)
{
    qkd_context *ctx = (qkd_context *)0x1;
    qkd_context_params p;
    ck_assert_int_eq(qkd_context_create(NULL, NULL), QKD_ERR_INVALID_ARG);

    qkd_context_params_init(&p);
    p.size = 8;
    ck_assert_int_eq(qkd_context_create(&p, &ctx), QKD_ERR_INVALID_ARG);
    ck_assert_ptr_null(ctx);

    qkd_context_params_init(&p);
    p.n_threads = -2;
    ck_assert_int_eq(qkd_context_create(&p, &ctx), QKD_ERR_INVALID_ARG);

    qkd_context_params_init(&p);
    p.alloc = test_alloc_hook; /* a hook without its partner */
    ck_assert_int_eq(qkd_context_create(&p, &ctx), QKD_ERR_INVALID_ARG);

    qkd_context_params_init(&p);
    p.backend = (qkd_backend_kind)42;
    ck_assert_int_eq(qkd_context_create(&p, &ctx), QKD_ERR_INVALID_ARG);
}
END_TEST

START_TEST(context_unavailable_backend_is_unsupported)
{
    qkd_context_params p;
    qkd_context_params_init(&p);
    p.backend = QKD_BACKEND_CUDA;
    qkd_context *ctx = NULL;
    /* Without the CUDA backend built in, or without a GPU: a clear status
     * and no context, not a crash. With both, a CUDA context. */
    qkd_status st = qkd_context_create(&p, &ctx);
    if (st == QKD_OK) {
        ck_assert_str_eq(qkd_context_backend_name(ctx), "cuda");
        qkd_context_free(ctx);
        return;
    }
    ck_assert_int_eq(st, QKD_ERR_UNSUPPORTED);
    ck_assert_ptr_null(ctx);
}
END_TEST

/* A context on the default backend counting its allocations; attempt
 * fail_at (from 0; -1 none) fails. */
static qkd_status create_counted(test_alloc *c, long fail_at, int threads, qkd_context **ctx)
{
    qkd_context_params p;
    qkd_context_params_init(&p);
    test_alloc_hooks(&p, c);
    c->fail_at = fail_at;
    p.n_threads = threads;
    return qkd_context_create(&p, ctx);
}

START_TEST(context_uses_allocator_hooks)
{
    test_alloc c;
    qkd_context *ctx = NULL;
    ck_assert_int_eq(create_counted(&c, -1, 3, &ctx), QKD_OK);
    ck_assert_int_gt(c.n, 0);
    void *p = qkd__alloc(ctx, 1000);
    ck_assert_ptr_nonnull(p);
    ck_assert_uint_eq((uintptr_t)p % 64, 0);
    qkd__free(ctx, p);
    qkd_context_free(ctx);
    ck_assert_int_eq(c.live, 0);
}
END_TEST

START_TEST(context_create_survives_every_allocation_failure)
{
    test_alloc probe;
    qkd_context *ctx = NULL;
    ck_assert_int_eq(create_counted(&probe, -1, 3, &ctx), QKD_OK);
    qkd_context_free(ctx);
    for (long n = 0; n < probe.n; n++) {
        test_alloc c;
        ctx = NULL;
        ck_assert_int_eq(create_counted(&c, n, 3, &ctx), QKD_ERR_NO_MEMORY);
        ck_assert_ptr_null(ctx);
        ck_assert_int_eq(c.live, 0);
    }
}
END_TEST

START_TEST(alloc_rejects_overflow)
{
    qkd_context *ctx = test_context(1);
    ck_assert_ptr_null(qkd__alloc(ctx, SIZE_MAX - 8));
    ck_assert_ptr_null(qkd__calloc(ctx, SIZE_MAX / 2, 4));
    qkd_context_free(ctx);
}
END_TEST

/* MemAvailable read from a /proc/meminfo text, and nothing claimed from a
 * text without a well-formed line; on Linux, the machine's own figure. */
START_TEST(host_memory_from_meminfo)
{
    ck_assert_uint_eq(qkd__meminfo_available("MemTotal:       16384000 kB\n"
                                             "MemFree:         1000000 kB\n"
                                             "MemAvailable:    8000000 kB\n"),
                      (size_t)8000000 * 1024);
    ck_assert_uint_eq(qkd__meminfo_available("MemAvailable:\t12 kB"), 12 * 1024);
    ck_assert_uint_eq(qkd__meminfo_available("MemTotal: 1 kB\nMemFree: 2 kB\n"), SIZE_MAX);
    ck_assert_uint_eq(qkd__meminfo_available("MemAvailable: kB\n"), SIZE_MAX);
    ck_assert_uint_eq(qkd__meminfo_available("MemAvailable: 12 MB\n"), SIZE_MAX);
    ck_assert_uint_eq(qkd__meminfo_available("MemAvailable: 99999999999999999999999 kB"),
                      SIZE_MAX);
    ck_assert_uint_eq(qkd__meminfo_available(NULL), SIZE_MAX);
#ifdef __linux__
    const size_t have = qkd__host_memory_available();
    ck_assert(have > 0 && have < SIZE_MAX);
#endif
}
END_TEST

START_TEST(error_message_and_log)
{
    qkd_context *ctx = test_context(1);
    ck_assert_int_eq(qkd__error(ctx, QKD_ERR_IO, "file %s at %d", "x.bin", 7), QKD_ERR_IO);
    ck_assert_str_eq(qkd_context_last_error(ctx), "file x.bin at 7");
    qkd_context_free(ctx);
}
END_TEST

/* ---- thread pool ---------------------------------------------------------- */

typedef struct {
    atomic_int hits[1000];
} pool_probe;

static void count_task(void *arg, int64_t i)
{
    pool_probe *p = arg;
    atomic_fetch_add(&p->hits[i], 1);
}

START_TEST(pool_runs_every_task_once)
{
    for (int threads = 1; threads <= 4; threads++) {
        qkd_context *ctx = test_context(threads);
        for (int n = 0; n <= 1000; n += 333) {
            pool_probe *p = calloc(1, sizeof *p);
            for (int rep = 0; rep < 3; rep++)
                qkd__pool_run(ctx->pool, n, count_task, p);
            for (int i = 0; i < 1000; i++)
                ck_assert_int_eq(atomic_load(&p->hits[i]), i < n ? 3 : 0);
            free(p);
        }
        ck_assert_int_eq(qkd__pool_size(ctx->pool), threads);
        qkd_context_free(ctx);
    }
}
END_TEST

/* ---- ABI: exported symbols ----------------------------------------------------
 * The shared library exports exactly the committed list (tests/abi/symbols.txt);
 * adding a function means adding it there, removing one is an ABI break. */

static char *read_lines_sorted(FILE *f)
{
    char *buf = calloc(1, 1 << 16);
    size_t used = 0;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (line[0] == '#' || line[0] == '\n')
            continue;
        size_t n = strlen(line);
        ck_assert_uint_lt(used + n, (1 << 16) - 1);
        memcpy(buf + used, line, n);
        used += n;
    }
    return buf;
}

START_TEST(exported_symbols_match_list)
{
    const char *lib = getenv("QKD_LIB");
    ck_assert_msg(lib && *lib, "QKD_LIB is not set (meson sets it)");
    char cmd[4096];
    snprintf(cmd, sizeof cmd,
             "nm -D --defined-only '%s' | awk '$2 ~ /[TDBRVW]/ {print $3}' | "
             "sed 's/@.*//' | grep -v -e '^QKD_' -e '^_' | LC_ALL=C sort -u",
             lib);
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    char *built = read_lines_sorted(p);
    ck_assert_int_eq(pclose(p), 0);

    snprintf(cmd, sizeof cmd, "LC_ALL=C sort -u '%s'", test_source("tests/abi/symbols.txt"));
    p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    char *listed = read_lines_sorted(p);
    pclose(p);
    ck_assert_msg(strcmp(built, listed) == 0,
                  "exported symbols differ from tests/abi/symbols.txt.\nbuilt:\n%s\nlisted:\n%s",
                  built, listed);
    ck_assert_ptr_null(strstr(built, "qkd__"));
    free(built);
    free(listed);
}
END_TEST

Suite *suite_core(void)
{
    Suite *s = suite_create("core");
    TCase *tc = tcase_create("status");
    tcase_add_test(tc, status_table_is_consistent);
    tcase_add_test(tc, status_values_are_frozen);
    tcase_add_test(tc, version_matches_header);
    suite_add_tcase(s, tc);

    tc = tcase_create("context");
    tcase_add_test(tc, context_defaults);
    tcase_add_test(tc, context_rejects_bad_params);
    tcase_add_test(tc, context_unavailable_backend_is_unsupported);
    tcase_add_test(tc, context_uses_allocator_hooks);
    tcase_add_test(tc, context_create_survives_every_allocation_failure);
    tcase_add_test(tc, alloc_rejects_overflow);
    tcase_add_test(tc, host_memory_from_meminfo);
    tcase_add_test(tc, error_message_and_log);
    suite_add_tcase(s, tc);

    tc = tcase_create("pool");
    tcase_add_test(tc, pool_runs_every_task_once);
    suite_add_tcase(s, tc);

    tc = tcase_create("abi");
    tcase_add_test(tc, exported_symbols_match_list);
    suite_add_tcase(s, tc);
    return s;
}
