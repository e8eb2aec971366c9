/* Helpers shared by the test suites. */
#ifndef QKD_TESTUTIL_H
#define QKD_TESTUTIL_H

#include <check.h>
#include <stddef.h>

#include "qkd/qkd.h"

/* Path of a file under ../shared (env QKD_SHARED, set by meson), written to
 * a static buffer. If the file is missing: outside CI the test is skipped
 * with a message (returns NULL; the caller returns); under CI (CI set) the
 * test fails, since CI always has ../shared. */
const char *test_shared(const char *rel);
/* Path of a file in the source tree (tests/fixtures/..., env QKD_SOURCE). */
const char *test_source(const char *rel);
/* A fresh empty temporary directory (owned by the test process). */
const char *test_tmpdir(void);

/* A context on the reference backend with n_threads threads; fails the test
 * if it cannot be created. */
qkd_context *test_context(int n_threads);

/* Read a whole file (malloc'd, caller frees); fails the test on error. */
void *test_read_file(const char *path, size_t *len);

/* Suites, one per area; test_main.c runs them all. */
Suite *suite_core(void);
Suite *suite_backend_ref(void);
Suite *suite_model(void);
Suite *suite_loaders(void);
Suite *suite_hf(void);
Suite *suite_tokenizer(void);
Suite *suite_generate(void);
Suite *suite_cli(void);
Suite *suite_quant(void);
Suite *suite_loss(void);
Suite *suite_optim(void);
Suite *suite_data(void);
Suite *suite_distill(void);
Suite *suite_kdqat_golden(void);
Suite *suite_backend_simd(void);
Suite *suite_export_hf(void);
Suite *suite_zeroshot(void);
Suite *suite_formats(void);
Suite *suite_export_gguf(void);
Suite *suite_backend_cuda(void);
Suite *suite_reliability(void);

#endif
