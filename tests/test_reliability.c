/* Reliability (docs/reliability.md): every allocation failing in turn along
 * load, a KD-QAT step, checkpoints, export and the data layer; non-finite
 * losses, gradients and weights in a distillation run; `qkd distill`
 * killed at random moments; several contexts training on parallel
 * threads; and the fuzz targets replayed on their seeds, on mutations of
 * them and on every regression input under tests/fixtures/fuzz/. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "testutil.h"
#include "../fuzz/targets.h"

#define STORIES_BIN "models/stories260K/stories260K.bin"
#define STORIES_GGUF "models/stories260K/stories260K.gguf"
#define TOK512 "models/stories260K/tok512.bin"
#define SMALL_TEXT "text/tinystories/TinyStories-valid.slice_My-AI_Tasks.txt"

enum { VOCAB = 32, SEQ = 8, BATCH = 2, N_TOKENS = 9 * 40 };

/* ---- a context whose allocations are counted and can fail -------------------- */

typedef struct counter {
    long live;     /* allocations not given back */
    long n;        /* allocations attempted */
    long fail_at;  /* the attempt that fails, -1 for none */
    int failed;    /* fail_at was reached */
} counter;

static void *count_alloc(void *user, size_t size)
{
    counter *c = user;
    if (c->n++ == c->fail_at) {
        c->failed = 1;
        return NULL;
    }
    void *p = malloc(size);
    c->live += p != NULL;
    return p;
}

static void count_free(void *user, void *p)
{
    if (p) {
        ((counter *)user)->live--;
        free(p);
    }
}

static qkd_context *counting_context(counter *c)
{
    *c = (counter){.fail_at = -1};
    qkd_context_params p;
    qkd_context_params_init(&p);
    p.n_threads = 1;
    p.backend = QKD_BACKEND_REF;
    p.alloc = count_alloc;
    p.free = count_free;
    p.alloc_user = c;
    qkd_context *ctx = NULL;
    ck_assert_int_eq(qkd_context_create(&p, &ctx), QKD_OK);
    return ctx;
}

/* Arm the counter so that allocation k from now fails. */
static void fail_in(counter *c, long k)
{
    c->fail_at = c->n + k;
    c->failed = 0;
}

static void disarm(counter *c)
{
    c->fail_at = -1;
}

/* ---- a KD-QAT run over tiny models, built without ck_assert so that it can
 * run with an allocation failing anywhere --------------------------------------- */

typedef struct kd {
    qkd_context *ctx;
    qkd_model *teacher, *student;
    qkd_quantizer *quant;
    qkd_loss *loss;
    qkd_optimizer *opt;
    qkd_dataset *data;
    qkd_distill *run;
} kd;

typedef struct kd_opts {
    int total;            /* steps of the run */
    int max_bad;          /* qkd_distill_params.max_bad_steps */
    uint64_t seed;        /* the student's initial weights */
    qkd_distill_fn on_step;
    void *user;
} kd_opts;

static qkd_status tiny_model(qkd_context *ctx, int dim, int vocab, uint64_t seed, qkd_model **out)
{
    qkd_model_config cfg;
    qkd_model_config_init(&cfg);
    cfg.dim = dim;
    cfg.hidden_dim = dim + dim / 2;
    cfg.n_layers = 1;
    cfg.n_heads = 2;
    cfg.n_kv_heads = 1;
    cfg.vocab_size = vocab;
    cfg.max_seq_len = 16;
    qkd_status st = qkd_model_create(ctx, &cfg, out);
    if (st == QKD_OK && (st = qkd_model_init_random(*out, seed, 0.5f)) != QKD_OK) {
        qkd_model_free(*out);
        *out = NULL;
    }
    return st;
}

/* N_TOKENS pseudo-random ids below VOCAB (a fixed LCG). */
static void random_ids(int32_t *ids, int n, int vocab)
{
    uint32_t x = 12345;
    for (int i = 0; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        ids[i] = (int32_t)((x >> 16) % (uint32_t)vocab);
    }
}

static qkd_status kd_add_loss(kd *r)
{
    qkd_loss_term fkl, ce;
    qkd_loss_term_init(&fkl, QKD_LOSS_FKL);
    qkd_loss_term_init(&ce, QKD_LOSS_CE);
    ce.weight = 0.1f;
    qkd_status st = qkd_loss_create(r->ctx, &r->loss);
    if (st == QKD_OK)
        st = qkd_loss_add(r->loss, &fkl);
    if (st == QKD_OK)
        st = qkd_loss_add(r->loss, &ce);
    return st;
}

static qkd_status kd_add_quantizer(kd *r)
{
    qkd_quant_params qp;
    qkd_quant_params_init(&qp);
    qp.bits = 4;
    qp.group_size = 8;
    qkd_status st = qkd_quantizer_create(r->ctx, &qp, &r->quant);
    if (st == QKD_OK)
        st = qkd_model_set_quantizer(r->student, r->quant, QKD_QUANT_TARGET_LINEAR);
    return st;
}

static qkd_status kd_add_run(kd *r, const int32_t *ids, const kd_opts *o)
{
    qkd_optim_params op;
    qkd_optim_params_init(&op);
    op.lr = 1e-2f;
    op.schedule = QKD_SCHEDULE_COSINE;
    op.warmup_steps = 2;
    op.total_steps = o->total;
    qkd_distill_params p;
    qkd_distill_params_init(&p);
    p.batch = BATCH;
    p.seq = SEQ;
    p.total_steps = o->total;
    p.max_bad_steps = o->max_bad;
    p.on_step = o->on_step;
    p.user = o->user;
    qkd_status st = qkd_optimizer_create(r->student, &op, &r->opt);
    if (st == QKD_OK)
        st = qkd_dataset_from_tokens(r->ctx, ids, N_TOKENS, VOCAB, &r->data);
    if (st == QKD_OK)
        st = qkd_distill_create(r->ctx, r->teacher, r->student, r->loss, r->opt, r->data, &p,
                                &r->run);
    return st;
}

static void kd_close(kd *r)
{
    qkd_distill_free(r->run);
    qkd_optimizer_free(r->opt);
    qkd_loss_free(r->loss);
    qkd_dataset_free(r->data);
    qkd_model_free(r->student);
    qkd_model_free(r->teacher);
    qkd_quantizer_free(r->quant);
    qkd_context *ctx = r->ctx;
    memset(r, 0, sizeof *r);
    r->ctx = ctx;
}

/* Teacher, 4-bit student, FKL + CE, AdamW, data and run on ctx. On error
 * everything made so far is freed. */
static qkd_status kd_open(kd *r, qkd_context *ctx, const kd_opts *o)
{
    memset(r, 0, sizeof *r);
    r->ctx = ctx;
    int32_t ids[N_TOKENS];
    random_ids(ids, N_TOKENS, VOCAB);
    qkd_status st = tiny_model(ctx, 16, VOCAB, 1, &r->teacher);
    if (st == QKD_OK)
        st = tiny_model(ctx, 16, VOCAB, o->seed, &r->student);
    if (st == QKD_OK)
        st = kd_add_quantizer(r);
    if (st == QKD_OK)
        st = kd_add_loss(r);
    if (st == QKD_OK)
        st = kd_add_run(r, ids, o);
    if (st != QKD_OK)
        kd_close(r);
    return st;
}

static void kd_open_ok(kd *r, qkd_context *ctx, const kd_opts *o)
{
    qkd_status st = kd_open(r, ctx, o);
    ck_assert_msg(st == QKD_OK, "kd_open: %s", qkd_context_last_error(ctx));
}

static kd_opts opts(int total)
{
    return (kd_opts){.total = total, .max_bad = 8, .seed = 2};
}

/* Every weight of a model, concatenated (malloc'd). */
static float *all_weights(const qkd_model *m, size_t *n)
{
    *n = (size_t)qkd_model_n_params(m);
    float *w = malloc(*n * sizeof *w), *p = w;
    ck_assert_ptr_nonnull(w);
    for (int i = 0; i < qkd_model_n_tensors(m); i++) {
        qkd_tensor_info info = {.size = sizeof info};
        ck_assert_int_eq(qkd_model_tensor_info(m, i, &info), QKD_OK);
        ck_assert_int_eq(qkd_model_tensor_get(m, i, p, (size_t)info.n_elements), QKD_OK);
        p += info.n_elements;
    }
    return w;
}

static void assert_same_weights(const qkd_model *a, const qkd_model *b, const char *what)
{
    size_t na, nb;
    float *wa = all_weights(a, &na), *wb = all_weights(b, &nb);
    ck_assert_uint_eq(na, nb);
    ck_assert_msg(memcmp(wa, wb, na * sizeof *wa) == 0, "%s: weights differ", what);
    free(wa);
    free(wb);
}

/* The optimizer's whole state (malloc'd). */
static unsigned char *opt_state(const qkd_optimizer *opt, size_t *n)
{
    *n = qkd_optimizer_state_bytes(opt);
    unsigned char *s = malloc(*n);
    ck_assert_ptr_nonnull(s);
    ck_assert_int_eq(qkd_optimizer_state_get(opt, s, *n), QKD_OK);
    return s;
}

/* Steps the optimizer applied (the state's int64 at offset 16, host order). */
static int64_t opt_steps(const qkd_optimizer *opt)
{
    size_t n;
    unsigned char *s = opt_state(opt, &n);
    int64_t steps;
    memcpy(&steps, s + 16, sizeof steps);
    free(s);
    return steps;
}

static void write_bytes(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    ck_assert_msg(f != NULL, "cannot write %s", path);
    ck_assert_uint_eq(fwrite(data, 1, n, f), n);
    ck_assert_int_eq(fclose(f), 0);
}

static int exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

static void assert_file_is(const char *path, const void *want, size_t n, const char *what)
{
    size_t len;
    void *got = test_read_file(path, &len);
    ck_assert_msg(len == n && memcmp(got, want, n) == 0, "%s: %s changed", what, path);
    free(got);
}

/* ---- allocation failures ----------------------------------------------------------- */

START_TEST(context_alloc_goes_through_the_hooks)
{
    counter c;
    qkd_context *ctx = counting_context(&c);
    long live = c.live;
    void *p = qkd_context_alloc(ctx, 100), *z = qkd_context_alloc(ctx, 0);
    ck_assert_ptr_nonnull(p);
    ck_assert_ptr_nonnull(z);
    ck_assert_ptr_ne(p, z);
    ck_assert_uint_eq((uintptr_t)p % 64, 0);
    memset(p, 0xab, 100);
    ck_assert_int_eq(c.live, live + 2);
    qkd_context_dealloc(ctx, p);
    qkd_context_dealloc(ctx, z);
    qkd_context_dealloc(ctx, NULL);
    ck_assert_int_eq(c.live, live);
    fail_in(&c, 0);
    ck_assert_ptr_null(qkd_context_alloc(ctx, 8));
    ck_assert(c.failed);
    disarm(&c);
    ck_assert_ptr_null(qkd_context_alloc(ctx, SIZE_MAX));
    ck_assert_ptr_null(qkd_context_alloc(NULL, 8));
    qkd_context_dealloc(NULL, NULL);
    ck_assert_int_eq(c.live, live);
    qkd_context_free(ctx);
}
END_TEST

/* Run op with allocation k failing, for k = 0, 1, ... until op runs without
 * reaching the failure. op does its whole job (what it makes, it frees), and
 * returns the status of the call under test: each failure must be NO_MEMORY
 * with a message (or OK, where an allocation is only an optimisation) and
 * give every allocation back; check (may be NULL) then verifies what must
 * not have changed. Returns the number of allocations op makes. */
typedef qkd_status (*op_fn)(void *arg);

static long fail_each(counter *c, qkd_context *ctx, const char *what, op_fn op,
                      void (*check)(void *arg), void *arg)
{
    for (long k = 0;; k++) {
        const long live = c->live;
        fail_in(c, k);
        qkd_status st = op(arg);
        disarm(c);
        if (!c->failed) {
            ck_assert_msg(st == QKD_OK, "%s: %s (%s)", what, qkd_status_name(st),
                          qkd_context_last_error(ctx));
            ck_assert_msg(c->live == live, "%s: leaked %ld", what, c->live - live);
            return k;
        }
        ck_assert_msg(st == QKD_ERR_NO_MEMORY || st == QKD_OK,
                      "%s: allocation %ld failing gave %s (%s)", what, k, qkd_status_name(st),
                      qkd_context_last_error(ctx));
        if (st != QKD_OK)
            ck_assert_msg(qkd_context_last_error(ctx)[0], "%s: no message", what);
        ck_assert_msg(c->live == live, "%s: allocation %ld failing leaked %ld", what, k,
                      c->live - live);
        if (check)
            check(arg);
    }
}

typedef struct load_arg {
    qkd_context *ctx;
    const char *path;
} load_arg;

/* Load a model, run one forward on it, free it. */
static qkd_status load_and_use(void *p)
{
    load_arg *a = p;
    qkd_model *m = (qkd_model *)&m;
    qkd_status st = qkd_model_load(a->ctx, a->path, &m);
    if (st != QKD_OK) {
        ck_assert_ptr_null(m);
        return st;
    }
    const int32_t tokens[2] = {1, 2};
    st = qkd_model_forward(m, tokens, 1, 2);
    qkd_model_free(m);
    return st;
}

static qkd_status load_tokenizer(void *p)
{
    load_arg *a = p;
    qkd_tokenizer *tok = (qkd_tokenizer *)&tok;
    qkd_status st = qkd_tokenizer_load(a->ctx, a->path, &tok);
    if (st != QKD_OK) {
        ck_assert_ptr_null(tok);
        return st;
    }
    int32_t ids[64];
    size_t n;
    st = qkd_tokenizer_encode(tok, "Once upon a time", 16, QKD_ENCODE_BOS, ids, 64, &n);
    qkd_tokenizer_free(tok);
    return st;
}

START_TEST(fail_each_allocation_of_model_and_tokenizer_loads)
{
    const char *rel[] = {STORIES_BIN, STORIES_GGUF};
    counter c;
    qkd_context *ctx = counting_context(&c);
    for (int i = 0; i < 2; i++) {
        const char *path = test_shared(rel[i]);
        if (!path)
            break;
        char copy[4096];
        snprintf(copy, sizeof copy, "%s", path);
        load_arg a = {ctx, copy};
        ck_assert_int_gt(fail_each(&c, ctx, rel[i], load_and_use, NULL, &a), 3);
    }
    load_arg hf = {ctx, test_source("tests/fixtures/hf_tiny")};
    ck_assert_int_gt(fail_each(&c, ctx, "hf_tiny", load_and_use, NULL, &hf), 3);
    const char *tok = test_shared(TOK512);
    if (tok) {
        char copy[4096];
        snprintf(copy, sizeof copy, "%s", tok);
        load_arg a = {ctx, copy};
        ck_assert_int_gt(fail_each(&c, ctx, "tok512.bin", load_tokenizer, NULL, &a), 1);
    }
    qkd_context_free(ctx);
}
END_TEST

/* Build the whole KD-QAT run on ctx and take one step; both may fail. */
static qkd_status build_and_step(void *ctx)
{
    kd r;
    kd_opts o = opts(4);
    qkd_status st = kd_open(&r, ctx, &o);
    if (st != QKD_OK)
        return st;
    st = qkd_distill_run(r.run, 1);
    kd_close(&r);
    return st;
}

START_TEST(fail_each_allocation_of_a_kdqat_step)
{
    counter c;
    qkd_context *ctx = counting_context(&c);
    ck_assert_int_gt(fail_each(&c, ctx, "build + one KD-QAT step", build_and_step, NULL, ctx), 20);
    qkd_context_free(ctx);
}
END_TEST

/* A step that fails on an allocation leaves the run as it was: retried, it
 * gives the very weights, history and optimizer state of a clean step. */
START_TEST(failed_step_leaves_the_run_usable)
{
    counter c;
    qkd_context *ctx = counting_context(&c);
    kd_opts o = opts(4);
    kd ref;
    kd_open_ok(&ref, ctx, &o);
    ck_assert_int_eq(qkd_distill_run(ref.run, 2), QKD_OK);
    size_t sn;
    unsigned char *want_state = opt_state(ref.opt, &sn);
    const long base = c.live;
    int failures = 0;
    for (long k = 0;; k++) {
        kd r;
        kd_open_ok(&r, ctx, &o);
        ck_assert_int_eq(qkd_distill_run(r.run, 1), QKD_OK);
        fail_in(&c, k);
        qkd_status st = qkd_distill_run(r.run, 1); /* the second step: shapes known */
        disarm(&c);
        const int reached = c.failed;
        if (reached && st != QKD_OK) {
            ck_assert_msg(st == QKD_ERR_NO_MEMORY, "allocation %ld: %s (%s)", k,
                          qkd_status_name(st), qkd_context_last_error(ctx));
            ck_assert_int_eq(qkd_distill_step(r.run), 1);
            ck_assert_int_eq(qkd_distill_run(r.run, 1), QKD_OK);
            failures++;
        }
        ck_assert_msg(st == QKD_OK || reached, "step: %s", qkd_context_last_error(ctx));
        assert_same_weights(r.student, ref.student, "retried step");
        size_t n;
        unsigned char *state = opt_state(r.opt, &n);
        ck_assert_msg(n == sn && memcmp(state, want_state, n) == 0, "optimizer state differs");
        free(state);
        const float *ha, *hb;
        ck_assert_int_eq(qkd_distill_history(r.run, &ha), 2);
        ck_assert_int_eq(qkd_distill_history(ref.run, &hb), 2);
        ck_assert_int_eq(memcmp(ha, hb, 2 * sizeof *ha), 0);
        kd_close(&r);
        ck_assert_msg(c.live == base, "allocation %ld failing leaked %ld", k, c.live - base);
        if (!reached)
            break;
    }
    /* The second step of a known shape allocates nothing (the documented
     * steady state), or each of its allocations failed cleanly above. */
    ck_assert_int_ge(failures, 0);
    free(want_state);
    kd_close(&ref);
    qkd_context_free(ctx);
}
END_TEST

Suite *suite_reliability(void)
{
    Suite *s = suite_create("reliability");
    TCase *tc = tcase_create("alloc");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, context_alloc_goes_through_the_hooks);
    tcase_add_test(tc, fail_each_allocation_of_model_and_tokenizer_loads);
    tcase_add_test(tc, fail_each_allocation_of_a_kdqat_step);
    tcase_add_test(tc, failed_step_leaves_the_run_usable);
    suite_add_tcase(s, tc);
    return s;
}
