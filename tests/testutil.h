/* Helpers shared by the test suites. */
#ifndef QKD_TESTUTIL_H
#define QKD_TESTUTIL_H

#include <check.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

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

/* got must be want; a failure (want != QKD_OK) must leave a message in
 * ctx. `what` names the call in the test's message. */
void test_expect_status(qkd_context *ctx, qkd_status got, qkd_status want, const char *what);
/* got is want, and the context's last error message contains needle. */
void test_expect_error(qkd_context *ctx, qkd_status got, qkd_status want, const char *needle);

/* Read a whole file (malloc'd, caller frees); fails the test on error. */
void *test_read_file(const char *path, size_t *len);
/* A whole file as a NUL-terminated string (malloc'd); *len (if len) gets
 * its length. */
char *test_read_text(const char *path, size_t *len);
/* Write len bytes to path (created or truncated); fails the test on error. */
void test_write_file(const char *path, const void *data, size_t len);
/* "dir/name" in one of two static buffers used in turn, so two paths can be
 * live at once. */
char *test_path_in(const char *dir, const char *name);
/* Whether path exists. */
int test_exists(const char *path);
/* test_shared's path copied out of its static buffer (malloc'd), or NULL
 * when the test is skipped. */
char *test_shared_dup(const char *rel);

/* calloc of n elements of size (at least one byte); fails the test on error. */
void *test_calloc(size_t n, size_t size);
/* A malloc'd copy of n bytes at p; fails the test on error. */
void *test_memdup(const void *p, size_t n);
/* The next value in [0, 1) (53 bits) of the splitmix64 sequence *state. */
double test_rng_unit(uint64_t *state);
/* Uniform in [lo, hi) from test_rng_unit. */
double test_rng_uniform(uint64_t *state, double lo, double hi);
/* The next 31 bits of a 64-bit LCG (Knuth's MMIX constants) on *state. */
uint32_t test_lcg_next(uint64_t *state);

/* ---- random vectors for the backend suites: one test_rng_unit stream per
 * process, which each test seeds ---- */

void test_rng_seed(uint64_t seed);
/* The stream's next value, uniform in [lo, hi). */
double test_rng_next(double lo, double hi);
/* n zero floats or doubles (room for one at least; free with free); fail the
 * test when out of memory. */
float *test_vec_new(size_t n);
double *test_dvec_new(size_t n);
/* n floats from test_rng_next(lo, hi). */
float *test_vec_rand(size_t n, double lo, double hi);
/* A copy of n floats. */
float *test_vec_copy(const float *src, size_t n);

/* ---- allocation hooks that count and can fail ---- */

typedef struct test_alloc {
    long n;         /* allocations attempted */
    long live;      /* allocations not yet freed */
    long fail_at;   /* the attempt (counting from 0) refused; -1 for none */
    int fail_rest;  /* refuse every attempt after fail_at as well */
    int failed;     /* an attempt was refused */
    size_t largest; /* the largest size asked for */
    size_t bytes;   /* every size asked for, summed */
    size_t cap;     /* a larger request is refused; 0 for no cap */
} test_alloc;

/* Reset *a (counting from zero, refusing nothing) and route p's allocator
 * hooks through it. */
void test_alloc_hooks(qkd_context_params *p, test_alloc *a);
/* Refuse the k-th allocation from now (k = 0: the next one) and, when
 * rest, every one after it; clears failed. fail_at = -1 disarms. */
void test_alloc_fail_in(test_alloc *a, long k, int rest);
/* The allocation hook test_alloc_hooks installs (user is a test_alloc). */
void *test_alloc_hook(void *user, size_t size);
/* A context on the reference backend with n_threads threads whose
 * allocations go through *a (reset first); fails the test on error. */
qkd_context *test_counting_context(test_alloc *a, int n_threads);

/* A model of cfg with qkd_model_init_random(seed, scale); fails the test on
 * error. */
qkd_model *test_model(qkd_context *ctx, const qkd_model_config *cfg, uint64_t seed, float scale);

/* A loss of one term of kind with its defaults, beta_from_teacher set as
 * given (owned); fails the test on error. */
qkd_loss *test_one_term_loss(qkd_context *ctx, qkd_loss_kind kind, int beta_from_teacher);

/* qkd_model_load of path (owned); fails the test on error. */
qkd_model *test_load_model(qkd_context *ctx, const char *path);

/* ---- binary golden fixtures (written by the scripts in tests/golden) ---- */

typedef struct test_golden {
    uint8_t *raw;
    size_t len, at; /* size and read cursor */
} test_golden;

/* Read the fixture at path and check its 8-byte magic. */
test_golden test_golden_open(const char *path, const char *magic);
/* The next n bytes (borrowed from g); fails the test if g ends first. */
const void *test_golden_take(test_golden *g, size_t n);
/* The next int32, int64 or float64 (host byte order) at g's cursor. */
int32_t test_golden_i32(test_golden *g);
int64_t test_golden_i64(test_golden *g);
double test_golden_f64(test_golden *g);
/* Compare m's gradient of one tensor with the record at g's cursor: name,
 * size, PyTorch's L2 norm (nonzero, within 1e-4 relative) and sampled
 * elements (within 1e-6 absolute or 1e-4 relative). */
void test_golden_check_grad(test_golden *g, const qkd_model *m);

/* ---- one model run, for comparing backends ---- */

typedef struct test_model_run {
    float *logits;  /* [B * T][vocab] */
    float *grads;   /* every tensor's gradient, in tensor order */
    float *decoded; /* [decode_steps][vocab] */
    size_t n_logits, n_grads, n_decoded;
    float loss;
} test_model_run;

/* The model at path on ctx: forward of B x T seeded random tokens, its
 * logits, cross-entropy (every seventh target ignored) and backward, then
 * decode_steps decoding steps from the same tokens; every call must
 * succeed. */
void test_model_run_do(qkd_context *ctx, const char *path, int B, int T, int decode_steps,
                       test_model_run *r);
void test_model_run_free(test_model_run *r);
/* max |got - want| <= tol * max |want| over n values. */
void test_assert_close_tensor(const char *what, const float *got, const float *want, size_t n,
                              double tol);

/* ---- the qkd tool ---- */

/* Start QKD_CLI with args (NULL-terminated, without argv[0]), its stdout
 * going to out and stderr to err (which may be the same file). */
pid_t test_spawn_cli(const char *const *args, const char *out, const char *err);
/* Exit status of pid, or -1 if it did not exit normally. */
int test_wait_cli(pid_t pid);

/* The logsumexp a flash-style attention forward saved for every query row,
 * lse[B][n_heads][Tq], against one computed in double from q
 * [B][Tq][n_heads][hd] and k [B][kv_len][n_kv][hd]: log sum_key exp(q . k /
 * sqrt(hd)) over keys 0..pos0+t, within tol of max(1, |value|). */
void assert_attention_lse(const char *backend, const float *lse, const float *q, const float *k,
                          int B, int Tq, int pos0, int kv_len, int n_heads, int n_kv, int hd,
                          double tol);

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
