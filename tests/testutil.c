#include "testutil.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *env_or(const char *name, const char *fallback)
{
    const char *v = getenv(name);
    return v && *v ? v : fallback;
}

const char *test_shared(const char *rel)
{
    static char path[4096];
    snprintf(path, sizeof path, "%s/%s", env_or("QKD_SHARED", "../shared"), rel);
    if (access(path, R_OK) == 0)
        return path;
    if (getenv("CI"))
        ck_abort_msg("missing %s: CI must have ../shared beside the checkout", path);
    fprintf(stderr, "SKIP: %s not found (../shared is absent on this machine)\n", path);
    return NULL;
}

const char *test_source(const char *rel)
{
    static char path[4096];
    snprintf(path, sizeof path, "%s/%s", env_or("QKD_SOURCE", "."), rel);
    return path;
}

const char *test_tmpdir(void)
{
    static char dir[256];
    snprintf(dir, sizeof dir, "%s/qkd-test-XXXXXX", env_or("TMPDIR", "/tmp"));
    ck_assert_msg(mkdtemp(dir) != NULL, "mkdtemp failed");
    return dir;
}

qkd_context *test_context(int n_threads)
{
    qkd_context_params p;
    qkd_context_params_init(&p);
    p.n_threads = n_threads;
    p.backend = QKD_BACKEND_REF;
    qkd_context *ctx = NULL;
    ck_assert_int_eq(qkd_context_create(&p, &ctx), QKD_OK);
    return ctx;
}

void *test_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *buf = malloc(n > 0 ? (size_t)n : 1);
    ck_assert_ptr_nonnull(buf);
    ck_assert_int_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return buf;
}
