#include "testutil.h"

#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
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

void test_expect_status(qkd_context *ctx, qkd_status got, qkd_status want, const char *what)
{
    ck_assert_msg(got == want, "%s: got %s (\"%s\"), want %s", what, qkd_status_name(got),
                  qkd_context_last_error(ctx), qkd_status_name(want));
    if (want != QKD_OK)
        ck_assert_msg(qkd_context_last_error(ctx)[0] != '\0', "%s: no error message", what);
}

void test_expect_error(qkd_context *ctx, qkd_status got, qkd_status want, const char *needle)
{
    ck_assert_msg(got == want, "status %s, expected %s (%s)", qkd_status_name(got),
                  qkd_status_name(want), qkd_context_last_error(ctx));
    ck_assert_msg(strstr(qkd_context_last_error(ctx), needle) != NULL,
                  "message '%s' does not mention '%s'", qkd_context_last_error(ctx), needle);
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

char *test_read_text(const char *path, size_t *len)
{
    size_t n;
    char *data = test_read_file(path, &n), *text = realloc(data, n + 1);
    ck_assert_ptr_nonnull(text);
    text[n] = '\0';
    if (len)
        *len = n;
    return text;
}

void test_write_file(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    ck_assert_msg(f != NULL, "cannot write %s", path);
    ck_assert_uint_eq(fwrite(data, 1, len, f), len);
    ck_assert_int_eq(fclose(f), 0);
}

char *test_path_in(const char *dir, const char *name)
{
    static char buf[2][4096 + 64]; /* room for a name after any folder */
    static int turn;
    turn ^= 1;
    snprintf(buf[turn], sizeof buf[turn], "%s/%s", dir, name);
    return buf[turn];
}

int test_exists(const char *path)
{
    return access(path, F_OK) == 0;
}

char *test_shared_dup(const char *rel)
{
    const char *p = test_shared(rel);
    return p ? strdup(p) : NULL;
}

void *test_calloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    ck_assert_ptr_nonnull(p);
    return p;
}

void *test_memdup(const void *p, size_t n)
{
    void *copy = malloc(n ? n : 1);
    ck_assert_ptr_nonnull(copy);
    return memcpy(copy, p, n);
}

double test_rng_unit(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (double)(z >> 11) / 9007199254740992.0;
}

double test_rng_uniform(uint64_t *state, double lo, double hi)
{
    return lo + (hi - lo) * test_rng_unit(state);
}

uint32_t test_lcg_next(uint64_t *state)
{
    *state = *state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(*state >> 33);
}

/* ---- random vectors ---- */

static uint64_t vec_rng_state;

void test_rng_seed(uint64_t seed)
{
    vec_rng_state = seed;
}

double test_rng_next(double lo, double hi)
{
    return test_rng_uniform(&vec_rng_state, lo, hi);
}

float *test_vec_new(size_t n)
{
    return test_calloc(n ? n : 1, sizeof(float));
}

double *test_dvec_new(size_t n)
{
    return test_calloc(n ? n : 1, sizeof(double));
}

float *test_vec_rand(size_t n, double lo, double hi)
{
    float *x = test_vec_new(n);
    for (size_t i = 0; i < n; i++)
        x[i] = (float)test_rng_next(lo, hi);
    return x;
}

float *test_vec_copy(const float *src, size_t n)
{
    float *x = test_vec_new(n);
    memcpy(x, src, n * sizeof *x);
    return x;
}

/* ---- one model run ---- */

/* Every gradient of m, tensor after tensor. */
static float *all_grads(qkd_context *ctx, qkd_model *m, size_t *n)
{
    *n = (size_t)qkd_model_n_params(m);
    float *all = test_vec_new(*n);
    size_t off = 0;
    for (int t = 0; t < qkd_model_n_tensors(m); t++) {
        qkd_tensor_info info = {.size = sizeof info};
        test_expect_status(ctx, qkd_model_tensor_info(m, t, &info), QKD_OK, "tensor_info");
        ck_assert_uint_le(off + (size_t)info.n_elements, *n);
        test_expect_status(ctx, qkd_model_grad_get(m, t, all + off, (size_t)info.n_elements),
                           QKD_OK, "grad_get");
        off += (size_t)info.n_elements;
    }
    *n = off;
    return all;
}

void test_model_run_do(qkd_context *ctx, const char *path, int B, int T, int decode_steps,
                       test_model_run *r)
{
    qkd_model *m = NULL;
    test_expect_status(ctx, qkd_model_load(ctx, path, &m), QKD_OK, "load");
    qkd_model_config cfg;
    qkd_model_config_init(&cfg);
    test_expect_status(ctx, qkd_model_get_config(m, &cfg), QKD_OK, "get_config");
    size_t n = (size_t)B * T;
    int32_t *tokens = test_calloc(n, sizeof *tokens), *targets = test_calloc(n, sizeof *targets);
    test_rng_seed(91);
    for (size_t i = 0; i < n; i++) {
        tokens[i] = (int32_t)(test_rng_next(0, 1) * cfg.vocab_size);
        targets[i] = i % 7 == 3 ? -1 : (int32_t)(test_rng_next(0, 1) * cfg.vocab_size);
    }
    r->n_logits = n * (size_t)cfg.vocab_size;
    r->logits = test_vec_new(r->n_logits);
    test_expect_status(ctx, qkd_model_forward(m, tokens, B, T), QKD_OK, "forward");
    test_expect_status(ctx, qkd_model_logits(m, r->logits, r->n_logits), QKD_OK, "logits");
    test_expect_status(ctx, qkd_model_zero_grad(m), QKD_OK, "zero_grad");
    test_expect_status(ctx, qkd_model_cross_entropy(m, targets, 1, &r->loss), QKD_OK,
                       "cross_entropy");
    test_expect_status(ctx, qkd_model_backward(m, NULL), QKD_OK, "backward");
    r->grads = all_grads(ctx, m, &r->n_grads);
    r->n_decoded = (size_t)decode_steps * (size_t)cfg.vocab_size;
    r->decoded = test_vec_new(r->n_decoded);
    for (int pos = 0; pos < decode_steps; pos++)
        test_expect_status(ctx, qkd_model_decode(m, tokens[pos], pos,
                                                 r->decoded + (size_t)pos * cfg.vocab_size),
                           QKD_OK, "decode");
    free(tokens);
    free(targets);
    qkd_model_free(m);
}

void test_model_run_free(test_model_run *r)
{
    free(r->logits);
    free(r->grads);
    free(r->decoded);
}

void test_assert_close_tensor(const char *what, const float *got, const float *want, size_t n,
                              double tol)
{
    double mag = 0.0, err = 0.0;
    for (size_t i = 0; i < n; i++) {
        mag = fmax(mag, fabs(want[i]));
        err = fmax(err, fabs((double)got[i] - want[i]));
    }
    ck_assert_msg(err <= tol * mag, "%s: max error %.3g > %.3g * max magnitude %.3g", what, err,
                  tol, mag);
}

/* ---- counting allocator ---- */

void *test_alloc_hook(void *user, size_t size)
{
    test_alloc *a = user;
    a->largest = size > a->largest ? size : a->largest;
    a->bytes += size;
    long k = a->n++;
    int refused = a->fail_at >= 0 && (k == a->fail_at || (a->fail_rest && k > a->fail_at));
    if (refused || (a->cap && size > a->cap)) {
        a->failed = 1;
        return NULL;
    }
    void *p = malloc(size);
    a->live += p != NULL;
    return p;
}

static void free_hook(void *user, void *ptr)
{
    test_alloc *a = user;
    a->live -= ptr != NULL;
    free(ptr);
}

void test_alloc_hooks(qkd_context_params *p, test_alloc *a)
{
    *a = (test_alloc){.fail_at = -1};
    p->alloc = test_alloc_hook;
    p->free = free_hook;
    p->alloc_user = a;
}

void test_alloc_fail_in(test_alloc *a, long k, int rest)
{
    a->fail_at = a->n + k;
    a->fail_rest = rest;
    a->failed = 0;
}

qkd_context *test_counting_context(test_alloc *a, int n_threads)
{
    qkd_context_params p;
    qkd_context_params_init(&p);
    p.n_threads = n_threads;
    p.backend = QKD_BACKEND_REF;
    test_alloc_hooks(&p, a);
    qkd_context *ctx = NULL;
    ck_assert_int_eq(qkd_context_create(&p, &ctx), QKD_OK);
    return ctx;
}

qkd_model *test_model(qkd_context *ctx, const qkd_model_config *cfg, uint64_t seed, float scale)
{
    qkd_model *m = NULL;
    qkd_status st = qkd_model_create(ctx, cfg, &m);
    ck_assert_msg(st == QKD_OK, "model: %s", qkd_context_last_error(ctx));
    ck_assert_int_eq(qkd_model_init_random(m, seed, scale), QKD_OK);
    return m;
}

qkd_loss *test_one_term_loss(qkd_context *ctx, qkd_loss_kind kind, int beta_from_teacher)
{
    qkd_loss *loss = NULL;
    qkd_loss_term term;
    qkd_loss_term_init(&term, kind);
    term.beta_from_teacher = beta_from_teacher;
    qkd_status st = qkd_loss_create(ctx, &loss);
    if (st == QKD_OK)
        st = qkd_loss_add(loss, &term);
    ck_assert_msg(st == QKD_OK, "loss: %s", qkd_context_last_error(ctx));
    return loss;
}

qkd_model *test_load_model(qkd_context *ctx, const char *path)
{
    qkd_model *m = NULL;
    qkd_status st = qkd_model_load(ctx, path, &m);
    ck_assert_msg(st == QKD_OK, "loading %s: %s: %s", path, qkd_status_name(st),
                  qkd_context_last_error(ctx));
    ck_assert_ptr_nonnull(m);
    return m;
}

/* ---- golden fixtures ---- */

test_golden test_golden_open(const char *path, const char *magic)
{
    test_golden g = {0};
    g.raw = test_read_file(path, &g.len);
    ck_assert_msg(memcmp(test_golden_take(&g, 8), magic, 8) == 0, "bad golden magic");
    return g;
}

const void *test_golden_take(test_golden *g, size_t n)
{
    ck_assert_msg(g->len - g->at >= n, "golden file truncated at byte %zu", g->at);
    const void *p = g->raw + g->at;
    g->at += n;
    return p;
}

int32_t test_golden_i32(test_golden *g)
{
    int32_t v;
    memcpy(&v, test_golden_take(g, 4), 4);
    return v;
}

int64_t test_golden_i64(test_golden *g)
{
    int64_t v;
    memcpy(&v, test_golden_take(g, 8), 8);
    return v;
}

double test_golden_f64(test_golden *g)
{
    double v;
    memcpy(&v, test_golden_take(g, 8), 8);
    return v;
}

void test_golden_check_grad(test_golden *g, const qkd_model *m)
{
    int32_t name_len = test_golden_i32(g);
    ck_assert(name_len > 0 && name_len < 64);
    char name[64];
    memcpy(name, test_golden_take(g, (size_t)name_len), (size_t)name_len);
    name[name_len] = '\0';
    int64_t n = test_golden_i64(g);
    double l2_want = test_golden_f64(g);
    int32_t n_samples = test_golden_i32(g);

    int index;
    ck_assert_msg(qkd_model_tensor_find(m, name, &index) == QKD_OK, "no tensor %s", name);
    qkd_tensor_info info = {.size = sizeof info};
    ck_assert_int_eq(qkd_model_tensor_info(m, index, &info), QKD_OK);
    ck_assert_int_eq(info.n_elements, n);
    float *grad = test_calloc((size_t)n, sizeof(float));
    ck_assert_int_eq(qkd_model_grad_get(m, index, grad, (size_t)n), QKD_OK);
    double l2 = 0;
    for (int64_t i = 0; i < n; i++)
        l2 += (double)grad[i] * grad[i];
    l2 = sqrt(l2);
    ck_assert_msg(l2_want > 0, "%s: PyTorch's gradient is zero", name);
    ck_assert_msg(fabs(l2 - l2_want) <= 1e-4 * l2_want, "%s: |grad| %.9g vs PyTorch %.9g", name,
                  l2, l2_want);
    for (int32_t s = 0; s < n_samples; s++) {
        int32_t i = test_golden_i32(g);
        double want = test_golden_f64(g);
        ck_assert(i >= 0 && i < n);
        double err = fabs(grad[i] - want);
        ck_assert_msg(err <= 1e-6 || err <= 1e-4 * fabs(want),
                      "%s[%d]: grad %.9g vs PyTorch %.9g", name, i, (double)grad[i], want);
    }
    free(grad);
}

/* ---- the qkd tool ---- */

/* In a forked child: fd goes to path (created or truncated); exit 127 on error. */
static void redirect(const char *path, int fd)
{
    int f = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (f < 0 || dup2(f, fd) < 0)
        _exit(127);
    close(f);
}

pid_t test_spawn_cli(const char *const *args, const char *out, const char *err)
{
    const char *cli = getenv("QKD_CLI");
    ck_assert_msg(cli && *cli, "QKD_CLI is not set (meson test sets it)");
    char *argv[48] = {(char *)cli};
    for (int i = 0; args[i]; i++) {
        ck_assert_int_lt(i, 46);
        argv[i + 1] = (char *)args[i];
    }
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        redirect(out, STDOUT_FILENO);
        /* One file for both: share the descriptor so neither overwrites the other. */
        if (strcmp(out, err) == 0) {
            if (dup2(STDOUT_FILENO, STDERR_FILENO) < 0)
                _exit(127);
        } else {
            redirect(err, STDERR_FILENO);
        }
        execv(cli, argv);
        _exit(127);
    }
    return pid;
}

int test_wait_cli(pid_t pid)
{
    int ws;
    ck_assert_int_eq(waitpid(pid, &ws, 0), pid);
    return WIFEXITED(ws) ? WEXITSTATUS(ws) : -1;
}

void assert_attention_lse(const char *backend, const float *lse, const float *q, const float *k,
                          int B, int Tq, int pos0, int kv_len, int n_heads, int n_kv, int hd,
                          double tol)
{
    const int rep = n_heads / n_kv;
    double *sc = malloc((size_t)(pos0 + Tq) * sizeof *sc);
    ck_assert_ptr_nonnull(sc);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < n_heads; h++)
            for (int t = 0; t < Tq; t++) {
                const float *qr = q + (((size_t)b * Tq + t) * n_heads + h) * hd;
                int n_keys = pos0 + t + 1;
                double mx = -INFINITY, sum = 0.0;
                for (int key = 0; key < n_keys; key++) {
                    const float *kr = k + (((size_t)b * kv_len + key) * n_kv + h / rep) * hd;
                    double d = 0.0;
                    for (int c = 0; c < hd; c++)
                        d += (double)qr[c] * kr[c];
                    sc[key] = d / sqrt((double)hd);
                    mx = fmax(mx, sc[key]);
                }
                for (int key = 0; key < n_keys; key++)
                    sum += exp(sc[key] - mx);
                double want = mx + log(sum);
                float got = lse[((size_t)b * n_heads + h) * Tq + t];
                ck_assert_msg(fabs(got - want) <= tol * fmax(1.0, fabs(want)),
                              "attention logsumexp (b %d, h %d, t %d): %s %.9g, want %.9g", b, h,
                              t, backend, (double)got, want);
            }
    free(sc);
}
