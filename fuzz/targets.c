/* The fuzz targets (targets.h). Every input runs on one context whose
 * allocator hooks count live allocations, so a leak on any error path is a
 * broken contract even without LeakSanitizer; inputs that go through a
 * file are written to a scratch folder of this process. */
#include "targets.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <qkd/qkd.h>

/* ---- the process's context and scratch folder ------------------------------ */

/* The tiny distillation run that checkpoints and optimizer states are
 * restored into; the seed writer saves the same run's. */
typedef struct fuzz_run {
    qkd_model *student;
    qkd_loss *loss;
    qkd_optimizer *opt;
    qkd_dataset *data;
    qkd_distill *run;
} fuzz_run;

static struct {
    qkd_context *ctx;
    long live;      /* allocations through ctx not given back */
    char dir[512];  /* scratch folder, removed at exit */
    fuzz_run run;
    int have_run;
} G;

static void *count_alloc(void *user, size_t size)
{
    (void)user;
    void *p = malloc(size);
    G.live += p != NULL;
    return p;
}

static void count_free(void *user, void *p)
{
    (void)user;
    if (p) {
        G.live--;
        free(p);
    }
}

/* Paths inside the scratch folder (two buffers: a call may need both). */
static const char *scratch(const char *name)
{
    static char buf[2][600];
    static int next;
    next ^= 1;
    snprintf(buf[next], sizeof buf[next], "%s/%s", G.dir, name);
    return buf[next];
}

static const char *const scratch_files[] = {"input", "hf/config.json", "hf/model.safetensors",
                                            "hf", NULL};

static void run_free(fuzz_run *r)
{
    qkd_distill_free(r->run);
    qkd_optimizer_free(r->opt);
    qkd_loss_free(r->loss);
    qkd_dataset_free(r->data);
    qkd_model_free(r->student);
    memset(r, 0, sizeof *r);
}

static void cleanup(void)
{
    run_free(&G.run);
    qkd_context_free(G.ctx);
    G.ctx = NULL;
    for (int i = 0; scratch_files[i]; i++)
        remove(scratch(scratch_files[i]));
    rmdir(G.dir);
}

/* The context and the scratch folder, made on first use. */
static int setup(void)
{
    if (G.ctx)
        return 0;
    const char *tmp = getenv("TMPDIR");
    snprintf(G.dir, sizeof G.dir, "%s/qkd-fuzz-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(G.dir)) {
        perror("fuzz: mkdtemp");
        return -1;
    }
    qkd_context_params p;
    qkd_context_params_init(&p);
    p.n_threads = 1;
    p.backend = QKD_BACKEND_REF;
    p.alloc = count_alloc;
    p.free = count_free;
    if (qkd_context_create(&p, &G.ctx) != QKD_OK) {
        fprintf(stderr, "fuzz: cannot create a context\n");
        return -1;
    }
    atexit(cleanup);
    return 0;
}

static int write_file(const char *path, const void *data, size_t n)
{
    /* A new file rather than a truncated one: ext4 flushes a file that is
     * truncated and rewritten on close, which would make fuzzing I/O-bound. */
    remove(path);
    FILE *f = fopen(path, "wb");
    int ok = f && (n == 0 || fwrite(data, 1, n, f) == n);
    if (f && fclose(f) != 0)
        ok = 0;
    if (!ok)
        fprintf(stderr, "fuzz: cannot write %s\n", path);
    return ok ? 0 : -1;
}

/* ---- contract checks ---------------------------------------------------------- */

static int broken(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("fuzz: contract broken: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return FUZZ_BROKEN;
}

/* An error leaves *out NULL, records a message and is one of the statuses
 * the call documents (documented[]: ends with QKD_OK). */
static int check_error(const char *call, qkd_status st, const void *out,
                       const qkd_status *documented)
{
    if (st == QKD_OK)
        return 0;
    const char *msg = qkd_context_last_error(G.ctx);
    if (out)
        return broken("%s: %s but the out-pointer is set", call, qkd_status_name(st));
    if (!msg[0])
        return broken("%s: %s without a message", call, qkd_status_name(st));
    for (int i = 0; documented[i] != QKD_OK; i++)
        if (documented[i] == st)
            return 0;
    return broken("%s: undocumented status %s (%s)", call, qkd_status_name(st), msg);
}

static int check_leaks(const char *call, long live0)
{
    return G.live == live0 ? 0 : broken("%s: %ld allocations not given back", call,
                                        G.live - live0);
}

/* The target's result: broken wins over the status of the parse. */
static int result(int rc, qkd_status st)
{
    return rc ? FUZZ_BROKEN : (int)st;
}

static const qkd_status tokenizer_errors[] = {QKD_ERR_IO, QKD_ERR_FORMAT, QKD_ERR_UNSUPPORTED,
                                              QKD_ERR_NO_MEMORY, QKD_OK};
static const qkd_status model_errors[] = {QKD_ERR_IO, QKD_ERR_FORMAT, QKD_ERR_UNSUPPORTED,
                                          QKD_ERR_SHAPE, QKD_ERR_NON_FINITE,
                                          QKD_ERR_NO_MEMORY, QKD_OK};

/* ---- using what loaded ------------------------------------------------------------- */

/* Encode a text, decode it back and read every piece: all must work on a
 * tokenizer that loaded. */
static int use_tokenizer(const qkd_tokenizer *tok)
{
    static const char text[] = "Once upon a time, Lily saw 42 \xc3\xbc\xe2\x96\x81 birds.\n";
    const size_t len = sizeof text - 1;
    const int vocab = qkd_tokenizer_vocab_size(tok);
    size_t n = 0, cap = len + 2;
    int32_t *ids = malloc(cap * sizeof *ids);
    qkd_status st = ids ? qkd_tokenizer_encode(tok, text, len, QKD_ENCODE_BOS, ids, cap, &n)
                        : QKD_ERR_NO_MEMORY;
    if (st == QKD_ERR_RANGE && n > cap) { /* as documented: retry with the size asked */
        int32_t *more = realloc(ids, n * sizeof *ids);
        if (more)
            ids = more;
        cap = n;
        st = more ? qkd_tokenizer_encode(tok, text, len, QKD_ENCODE_BOS, ids, cap, &n)
                  : QKD_ERR_NO_MEMORY;
    }
    int rc = 0;
    if (st != QKD_OK && st != QKD_ERR_NO_MEMORY)
        rc = broken("encode with a loaded tokenizer: %s (%s)", qkd_status_name(st),
                    qkd_context_last_error(G.ctx));
    for (size_t i = 0; st == QKD_OK && i < n && !rc; i++) {
        size_t dlen;
        if (ids[i] < 0 || ids[i] >= vocab)
            rc = broken("encode gave id %d outside the vocabulary of %d", ids[i], vocab);
        else if (!qkd_tokenizer_decode(tok, i ? ids[i - 1] : -1, ids[i], &dlen))
            rc = broken("decode of id %d failed", ids[i]);
    }
    for (int32_t id = 0; id < vocab && !rc; id++)
        if (!qkd_tokenizer_piece(tok, id))
            rc = broken("no piece for id %d of %d", id, vocab);
    free(ids);
    return rc;
}

/* A loaded model reports its shape and runs a forward of one token. */
static int use_model(qkd_model *m)
{
    qkd_model_config cfg;
    qkd_model_config_init(&cfg);
    if (qkd_model_get_config(m, &cfg) != QKD_OK)
        return broken("get_config of a loaded model failed");
    const int32_t token = 0;
    qkd_status st = qkd_model_forward(m, &token, 1, 1);
    if (st != QKD_OK && st != QKD_ERR_NO_MEMORY)
        return broken("forward of a loaded model: %s (%s)", qkd_status_name(st),
                      qkd_context_last_error(G.ctx));
    const qkd_tokenizer *tok = qkd_model_tokenizer(m);
    return tok ? use_tokenizer(tok) : 0;
}

static int load_model(const char *path, qkd_status *status)
{
    const long live0 = G.live;
    qkd_model *m = (qkd_model *)&m; /* an error must reset it */
    qkd_status st = qkd_model_load(G.ctx, path, &m);
    int rc = check_error("qkd_model_load", st, m, model_errors);
    if (!rc && st == QKD_OK)
        rc = use_model(m);
    qkd_model_free(st == QKD_OK ? m : NULL);
    *status = st;
    return rc ? rc : check_leaks("qkd_model_load", live0);
}

static int load_tokenizer(const char *path, qkd_status *status)
{
    const long live0 = G.live;
    qkd_tokenizer *tok = (qkd_tokenizer *)&tok;
    qkd_status st = qkd_tokenizer_load(G.ctx, path, &tok);
    int rc = check_error("qkd_tokenizer_load", st, tok, tokenizer_errors);
    if (!rc && st == QKD_OK)
        rc = use_tokenizer(tok);
    qkd_tokenizer_free(st == QKD_OK ? tok : NULL);
    *status = st;
    return rc ? rc : check_leaks("qkd_tokenizer_load", live0);
}

/* ---- targets -------------------------------------------------------------------------- */

/* llama2.c checkpoints (and whatever qkd_model_load makes of the bytes). */
static int run_llama2c(const uint8_t *data, size_t size)
{
    qkd_status st = QKD_OK;
    if (setup() != 0 || write_file(scratch("input"), data, size) != 0)
        abort();
    int rc = load_model(scratch("input"), &st);
    return result(rc, st);
}

/* GGUF: as a model, then as a tokenizer. OK when either loaded (a
 * vocabulary-only GGUF is no model), else the model's status. */
static int run_gguf(const uint8_t *data, size_t size)
{
    qkd_status st = QKD_OK, tst = QKD_OK;
    if (setup() != 0 || write_file(scratch("input"), data, size) != 0)
        abort();
    int rc = load_model(scratch("input"), &st);
    if (!rc)
        rc = load_tokenizer(scratch("input"), &tst);
    return result(rc, tst == QKD_OK ? tst : st);
}

/* A Hugging Face folder: the input is a little-endian u16 n, then n bytes
 * of config.json, then model.safetensors. */
static int run_hf(const uint8_t *data, size_t size)
{
    qkd_status st = QKD_OK;
    if (setup() != 0)
        abort();
    const uint8_t *body = data;
    size_t n = 0, body_n = size;
    if (size >= 2) {
        n = (size_t)data[0] | (size_t)data[1] << 8;
        body += 2;
        body_n -= 2;
    }
    if (n > body_n)
        n = body_n;
    mkdir(scratch("hf"), 0700);
    if (write_file(scratch("hf/config.json"), body, n) != 0 ||
        write_file(scratch("hf/model.safetensors"), body + n, body_n - n) != 0)
        abort();
    int rc = load_model(scratch("hf"), &st);
    return result(rc, st);
}

/* llama2.c tokenizer.bin (and GGUF vocabularies). */
static int run_tokenizer(const uint8_t *data, size_t size)
{
    qkd_status st = QKD_OK;
    if (setup() != 0 || write_file(scratch("input"), data, size) != 0)
        abort();
    int rc = load_tokenizer(scratch("input"), &st);
    return result(rc, st);
}

/* Token files (QKDT). */
static int run_tokfile(const uint8_t *data, size_t size)
{
    if (setup() != 0 || write_file(scratch("input"), data, size) != 0)
        abort();
    static const qkd_status documented[] = {QKD_ERR_IO, QKD_ERR_FORMAT, QKD_ERR_UNSUPPORTED,
                                            QKD_ERR_NO_MEMORY, QKD_OK};
    const long live0 = G.live;
    qkd_dataset *ds = (qkd_dataset *)&ds;
    qkd_status st = qkd_dataset_load(G.ctx, scratch("input"), &ds);
    int rc = check_error("qkd_dataset_load", st, ds, documented);
    if (!rc && st == QKD_OK) {
        const int32_t *ids = qkd_dataset_tokens(ds);
        const int vocab = qkd_dataset_vocab_size(ds);
        for (size_t i = 0; i < qkd_dataset_n_tokens(ds) && !rc; i++)
            if (ids[i] < 0 || ids[i] >= vocab)
                rc = broken("token file: id %d at %zu outside the vocabulary of %d", ids[i], i,
                            vocab);
        int32_t tokens[4], targets[4];
        qkd_status bst = qkd_dataset_batch(ds, 3, 1, 4, tokens, targets);
        if (!rc && bst != QKD_OK && bst != QKD_ERR_STATE)
            rc = broken("batch of a loaded token file: %s", qkd_status_name(bst));
    }
    qkd_dataset_free(st == QKD_OK ? ds : NULL);
    return result(rc ? rc : check_leaks("qkd_dataset_load", live0), st);
}

/* Zero-shot sets: the first byte picks the task, the text runs to the
 * first NUL byte, and what follows it is PIQA's labels file. */
static int run_eval(const uint8_t *data, size_t size)
{
    if (setup() != 0)
        abort();
    static const qkd_status documented[] = {QKD_ERR_FORMAT, QKD_ERR_NO_MEMORY, QKD_OK};
    qkd_eval_task task = size ? (qkd_eval_task)(data[0] % 8) : QKD_EVAL_PIQA;
    const char *text = size ? (const char *)data + 1 : "";
    size_t len = size ? size - 1 : 0;
    const char *nul = memchr(text, '\0', len);
    const char *labels = nul ? nul + 1 : NULL;
    size_t labels_len = nul ? len - (size_t)(labels - text) : 0;
    if (nul)
        len = (size_t)(nul - text);
    const long live0 = G.live;
    qkd_eval_set *set = (qkd_eval_set *)&set;
    qkd_status st = qkd_eval_set_parse(G.ctx, task, "fuzz", text, len, labels, labels_len, &set);
    int rc = check_error("qkd_eval_set_parse", st, set, documented);
    for (size_t i = 0; !rc && st == QKD_OK && i < qkd_eval_set_size(set); i++) {
        qkd_eval_item item = {.size = sizeof item};
        if (qkd_eval_set_item(set, i, &item) != QKD_OK)
            rc = broken("eval item %zu of %zu: not readable", i, qkd_eval_set_size(set));
        else if (item.n_choices < 1 || item.gold < 0 || item.gold >= item.n_choices)
            rc = broken("eval item %zu: gold %d of %d choices", i, item.gold, item.n_choices);
        for (int c = 0; !rc && c < item.n_choices; c++)
            if (!item.contexts[c] || !item.continuations[c] || !item.choices[c] ||
                strlen(item.continuations[c]) + strlen(item.contexts[c]) == 0)
                rc = broken("eval item %zu: choice %d is missing text", i, c);
    }
    qkd_eval_set_free(st == QKD_OK ? set : NULL);
    return result(rc ? rc : check_leaks("qkd_eval_set_parse", live0), st);
}

/* ---- the tiny run (checkpoints, optimizer states) ----------------------------------- */

enum { RUN_VOCAB = 16, RUN_SEQ = 4, RUN_BATCH = 2, RUN_TOKENS = 120 };

static qkd_status run_open(qkd_context *ctx, fuzz_run *r)
{
    memset(r, 0, sizeof *r);
    qkd_model_config cfg;
    qkd_model_config_init(&cfg);
    cfg.dim = 8;
    cfg.hidden_dim = 12;
    cfg.n_layers = 1;
    cfg.n_heads = 2;
    cfg.n_kv_heads = 1;
    cfg.vocab_size = RUN_VOCAB;
    cfg.max_seq_len = RUN_SEQ;
    int32_t ids[RUN_TOKENS];
    for (int i = 0; i < RUN_TOKENS; i++)
        ids[i] = (int32_t)((i * 7 + i / 5) % RUN_VOCAB);
    qkd_loss_term ce;
    qkd_loss_term_init(&ce, QKD_LOSS_CE);
    qkd_distill_params p;
    qkd_distill_params_init(&p);
    p.batch = RUN_BATCH;
    p.seq = RUN_SEQ;
    p.total_steps = 4;
    qkd_status st = qkd_model_create(ctx, &cfg, &r->student);
    if (st == QKD_OK)
        st = qkd_model_init_random(r->student, 3, 0.3f);
    if (st == QKD_OK)
        st = qkd_loss_create(ctx, &r->loss);
    if (st == QKD_OK)
        st = qkd_loss_add(r->loss, &ce);
    if (st == QKD_OK)
        st = qkd_optimizer_create(r->student, NULL, &r->opt);
    if (st == QKD_OK)
        st = qkd_dataset_from_tokens(ctx, ids, RUN_TOKENS, RUN_VOCAB, &r->data);
    if (st == QKD_OK)
        st = qkd_distill_create(ctx, NULL, r->student, r->loss, r->opt, r->data, &p, &r->run);
    if (st != QKD_OK)
        run_free(r);
    return st;
}

/* The process's run, made on first use and one step in, so that its
 * buffers are all allocated: a step after a restore then allocates
 * nothing, and the allocation count tells a leak. */
static fuzz_run *the_run(void)
{
    if (setup() != 0)
        abort();
    if (!G.have_run) {
        if (run_open(G.ctx, &G.run) != QKD_OK || qkd_distill_run(G.run.run, 1) != QKD_OK) {
            fprintf(stderr, "fuzz: cannot make the run: %s\n", qkd_context_last_error(G.ctx));
            abort();
        }
        G.have_run = 1;
    }
    return &G.run;
}

/* FNV-1a of every weight of the student and of the optimizer's state:
 * what a failed restore must leave as it was. */
static uint64_t run_hash(const fuzz_run *r)
{
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    unsigned char buf[4096];
    for (int i = 0; i < qkd_model_n_tensors(r->student); i++) {
        qkd_tensor_info info = {.size = sizeof info};
        if (qkd_model_tensor_info(r->student, i, &info) != QKD_OK ||
            (size_t)info.n_elements * sizeof(float) > sizeof buf ||
            qkd_model_tensor_get(r->student, i, (float *)(void *)buf,
                                 (size_t)info.n_elements) != QKD_OK)
            return 0;
        for (size_t k = 0; k < (size_t)info.n_elements * sizeof(float); k++)
            h = (h ^ buf[k]) * UINT64_C(0x100000001b3);
    }
    size_t n = qkd_optimizer_state_bytes(r->opt);
    unsigned char *state = malloc(n);
    if (!state || qkd_optimizer_state_get(r->opt, state, n) != QKD_OK)
        n = 0;
    for (size_t k = 0; k < n; k++)
        h = (h ^ state[k]) * UINT64_C(0x100000001b3);
    free(state);
    return h ^ (uint64_t)qkd_distill_step(r->run);
}

/* Distillation checkpoints (QKDC), restored into the tiny run. */
static int run_checkpoint(const uint8_t *data, size_t size)
{
    fuzz_run *r = the_run();
    if (write_file(scratch("input"), data, size) != 0)
        abort();
    static const qkd_status documented[] = {QKD_ERR_IO, QKD_ERR_FORMAT, QKD_ERR_UNSUPPORTED,
                                            QKD_ERR_SHAPE, QKD_ERR_STATE, QKD_ERR_NO_MEMORY,
                                            QKD_OK};
    const long live0 = G.live;
    const uint64_t before = run_hash(r);
    qkd_status st = qkd_distill_resume(r->run, scratch("input"));
    int rc = check_error("qkd_distill_resume", st, NULL, documented);
    if (!rc && st != QKD_OK && run_hash(r) != before)
        rc = broken("qkd_distill_resume: %s changed the run", qkd_status_name(st));
    if (!rc && st == QKD_OK && qkd_distill_run(r->run, 1) != QKD_OK)
        rc = broken("a step after a resume failed: %s", qkd_context_last_error(G.ctx));
    return result(rc ? rc : check_leaks("qkd_distill_resume", live0), st);
}

/* Optimizer states, as checkpoints carry them. */
static int run_optim_state(const uint8_t *data, size_t size)
{
    fuzz_run *r = the_run();
    static const qkd_status documented[] = {QKD_ERR_FORMAT, QKD_ERR_SHAPE, QKD_OK};
    const long live0 = G.live;
    const uint64_t before = run_hash(r);
    /* An empty input still needs a valid pointer. */
    qkd_status st = qkd_optimizer_state_set(r->opt, size ? data : (const uint8_t *)"", size);
    int rc = check_error("qkd_optimizer_state_set", st, NULL, documented);
    if (!rc && st != QKD_OK && run_hash(r) != before)
        rc = broken("qkd_optimizer_state_set: %s changed the state", qkd_status_name(st));
    return result(rc ? rc : check_leaks("qkd_optimizer_state_set", live0), st);
}

/* ---- seeds ---------------------------------------------------------------------------- */

typedef struct seeder {
    const char *dir;
    int n;      /* seeds written */
    int failed;
} seeder;

static void seed_bytes(seeder *s, const void *data, size_t n)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/seed-%03d", s->dir, s->n);
    if (write_file(path, data, n) == 0)
        s->n++;
    else
        s->failed = 1;
}

/* A whole file (malloc'd) or NULL (missing: skipped, not an error). */
static void *read_all(const char *dir, const char *rel, size_t *n)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, rel);
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    void *buf = NULL;
    long len = -1;
    if (fseek(f, 0, SEEK_END) == 0 && (len = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0)
        buf = malloc((size_t)len + 1);
    if (buf && fread(buf, 1, (size_t)len, f) != (size_t)len) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *n = buf ? (size_t)len : 0;
    return buf;
}

static void seed_copy(seeder *s, const char *dir, const char *rel)
{
    size_t n;
    void *buf = read_all(dir, rel, &n);
    if (buf)
        seed_bytes(s, buf, n);
    free(buf);
}

/* prefix (k bytes) then the first `lines` lines of dir/rel, then tail. */
static void seed_lines(seeder *s, const void *prefix, size_t k, const char *dir, const char *rel,
                       int lines, const char *tail, size_t tail_n)
{
    size_t n;
    char *text = read_all(dir, rel, &n);
    if (!text)
        return;
    size_t cut = 0;
    for (int l = 0; l < lines && cut < n; cut++)
        l += text[cut] == '\n';
    char *buf = malloc(k + cut + tail_n + 1);
    if (buf) {
        memcpy(buf, prefix, k);
        memcpy(buf + k, text, cut);
        memcpy(buf + k + cut, tail, tail_n);
        seed_bytes(s, buf, k + cut + tail_n);
    }
    free(buf);
    free(text);
}

static int seed_done(const seeder *s)
{
    return s->failed ? -1 : s->n;
}

/* A random model of the given shape on ctx (or NULL). */
static qkd_model *tiny_model(qkd_context *ctx, int dim, int hidden, int vocab, int tied)
{
    qkd_model_config cfg;
    qkd_model_config_init(&cfg);
    cfg.dim = dim;
    cfg.hidden_dim = hidden;
    cfg.n_layers = 1;
    cfg.n_heads = 2;
    cfg.n_kv_heads = 1;
    cfg.vocab_size = vocab;
    cfg.max_seq_len = 16;
    cfg.tied_embeddings = tied;
    qkd_model *m = NULL;
    if (qkd_model_create(ctx, &cfg, &m) != QKD_OK)
        return NULL;
    if (qkd_model_init_random(m, 7, 0.2f) != QKD_OK) {
        qkd_model_free(m);
        return NULL;
    }
    return m;
}

/* A llama2.c checkpoint of a tiny random model, written by hand from the
 * format (7 int32 header; weights in llama2.c's order; a negative vocab
 * size means an untied classifier follows). */
static void seed_llama2c_tiny(seeder *s, int untied)
{
    enum { DIM = 8, HID = 12, LAYERS = 1, HEADS = 2, KV = 1, VOCAB = 16, SEQ = 4 };
    const int kv_dim = DIM * KV / HEADS, head = DIM / HEADS;
    const size_t n = (size_t)VOCAB * DIM + LAYERS * (2u * DIM + 2u * DIM * DIM + 2u * DIM * kv_dim +
                                                     3u * DIM * HID) +
                     DIM + (size_t)SEQ * head + (untied ? (size_t)VOCAB * DIM : 0);
    const int32_t header[7] = {DIM, HID, LAYERS, HEADS, KV, untied ? -VOCAB : VOCAB, SEQ};
    unsigned char *buf = malloc(sizeof header + n * sizeof(float));
    if (!buf) {
        s->failed = 1;
        return;
    }
    memcpy(buf, header, sizeof header);
    uint32_t x = 1;
    for (size_t i = 0; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        float v = (float)((int)(x >> 20) - 2048) / 8192.0f;
        memcpy(buf + sizeof header + i * sizeof v, &v, sizeof v);
    }
    seed_bytes(s, buf, sizeof header + n * sizeof(float));
    free(buf);
}

static int seed_llama2c(const char *dir, const char *shared, const char *source)
{
    (void)source;
    seeder s = {.dir = dir};
    seed_llama2c_tiny(&s, 0);
    seed_llama2c_tiny(&s, 1);
    seed_copy(&s, shared, "models/stories260K/stories260K.bin");
    return seed_done(&s);
}

/* qkd_model_save_gguf of a tiny model with the byte tokenizer. */
static void seed_gguf_tiny(seeder *s, qkd_context *ctx, qkd_gguf_type type)
{
    qkd_model *m = tiny_model(ctx, 32, 64, QKD_BYTE_VOCAB_SIZE, 1);
    qkd_tokenizer *tok = NULL;
    qkd_gguf_params p;
    qkd_gguf_params_init(&p);
    p.type = type;
    const char *path = scratch("input");
    size_t n = 0;
    void *buf = NULL;
    if (m && qkd_tokenizer_create_bytes(ctx, &tok) == QKD_OK) {
        p.tokenizer = tok;
        if (qkd_model_save_gguf(m, path, &p) == QKD_OK)
            buf = read_all(G.dir, "input", &n);
    }
    if (buf)
        seed_bytes(s, buf, n);
    else
        s->failed = 1;
    free(buf);
    qkd_tokenizer_free(tok);
    qkd_model_free(m);
}

static int seed_gguf(const char *dir, const char *shared, const char *source)
{
    (void)source;
    if (setup() != 0)
        return -1;
    seeder s = {.dir = dir};
    seed_gguf_tiny(&s, G.ctx, QKD_GGUF_F32);
    seed_gguf_tiny(&s, G.ctx, QKD_GGUF_Q4_0);
    seed_gguf_tiny(&s, G.ctx, QKD_GGUF_Q4_K);
    seed_copy(&s, shared, "models/stories260K/stories260K.gguf");
    seed_copy(&s, shared, "gguf/ggml-vocab-llama-spm.gguf");
    return seed_done(&s);
}

/* A folder's config.json and model.safetensors as one hf input. */
static void seed_hf_folder(seeder *s, const char *folder)
{
    size_t nc, nw;
    unsigned char *config = read_all(folder, "config.json", &nc);
    unsigned char *weights = read_all(folder, "model.safetensors", &nw);
    unsigned char *buf = config && weights && nc <= 0xffff ? malloc(2 + nc + nw) : NULL;
    if (buf) {
        buf[0] = (unsigned char)(nc & 0xff);
        buf[1] = (unsigned char)(nc >> 8);
        memcpy(buf + 2, config, nc);
        memcpy(buf + 2 + nc, weights, nw);
        seed_bytes(s, buf, 2 + nc + nw);
    }
    free(buf);
    free(config);
    free(weights);
}

static int seed_hf(const char *dir, const char *shared, const char *source)
{
    (void)shared;
    if (setup() != 0)
        return -1;
    seeder s = {.dir = dir};
    char folder[1024];
    snprintf(folder, sizeof folder, "%s/tests/fixtures/hf_tiny", source);
    seed_hf_folder(&s, folder);
    static const qkd_save_dtype dtypes[] = {QKD_SAVE_F16, QKD_SAVE_BF16};
    for (int i = 0; i < 2; i++) {
        qkd_model *m = tiny_model(G.ctx, 16, 24, 32, i);
        qkd_safetensors_params p;
        qkd_safetensors_params_init(&p);
        p.dtype = dtypes[i];
        if (m && qkd_model_save_safetensors(m, scratch("hf"), &p) == QKD_OK)
            seed_hf_folder(&s, scratch("hf"));
        else
            s.failed = 1;
        qkd_model_free(m);
    }
    return seed_done(&s);
}

static int seed_tokenizer(const char *dir, const char *shared, const char *source)
{
    (void)source;
    seeder s = {.dir = dir};
    seed_copy(&s, shared, "models/stories260K/tok512.bin");
    seed_copy(&s, shared, "models/llama2_tokenizer/tokenizer.bin");
    seed_copy(&s, shared, "gguf/ggml-vocab-llama-spm.gguf");
    return seed_done(&s);
}

/* A checkpoint of the tiny run after two steps, through the library. */
static int seed_checkpoint(const char *dir, const char *shared, const char *source)
{
    (void)shared;
    (void)source;
    fuzz_run *r = the_run();
    seeder s = {.dir = dir};
    size_t n = 0;
    void *buf = NULL;
    if (qkd_distill_run(r->run, 2) == QKD_OK &&
        qkd_distill_save(r->run, scratch("input")) == QKD_OK)
        buf = read_all(G.dir, "input", &n);
    if (buf)
        seed_bytes(&s, buf, n);
    else
        s.failed = 1;
    free(buf);
    return seed_done(&s);
}

static int seed_optim_state(const char *dir, const char *shared, const char *source)
{
    (void)shared;
    (void)source;
    fuzz_run *r = the_run();
    seeder s = {.dir = dir};
    size_t n = qkd_optimizer_state_bytes(r->opt);
    void *buf = malloc(n);
    if (buf && qkd_distill_run(r->run, 1) == QKD_OK &&
        qkd_optimizer_state_get(r->opt, buf, n) == QKD_OK)
        seed_bytes(&s, buf, n);
    else
        s.failed = 1;
    free(buf);
    return seed_done(&s);
}

/* Token files: a small random one, and a TinyStories sample encoded with
 * the stories260K tokenizer. */
static int seed_tokfile(const char *dir, const char *shared, const char *source)
{
    (void)source;
    if (setup() != 0)
        return -1;
    seeder s = {.dir = dir};
    int32_t ids[64];
    for (int i = 0; i < 64; i++)
        ids[i] = (i * 37) % 100;
    qkd_dataset *ds = NULL;
    qkd_tokenizer *tok = NULL;
    if (qkd_dataset_from_tokens(G.ctx, ids, 64, 100, &ds) == QKD_OK &&
        qkd_dataset_save(ds, scratch("input")) == QKD_OK)
        seed_copy(&s, G.dir, "input");
    else
        s.failed = 1;
    qkd_dataset_free(ds);
    ds = NULL;
    char path[1024];
    snprintf(path, sizeof path, "%s/text/tinystories/TinyStories-valid.slice_My-AI_Tasks.txt",
             shared);
    char tok_path[1024];
    snprintf(tok_path, sizeof tok_path, "%s/models/stories260K/tok512.bin", shared);
    if (access(path, R_OK) == 0 && qkd_tokenizer_load(G.ctx, tok_path, &tok) == QKD_OK &&
        qkd_dataset_from_text(G.ctx, tok, path, &ds) == QKD_OK &&
        qkd_dataset_save(ds, scratch("input")) == QKD_OK)
        seed_copy(&s, G.dir, "input");
    qkd_dataset_free(ds);
    qkd_tokenizer_free(tok);
    return seed_done(&s);
}

/* The first lines of each zero-shot file, behind their task byte. */
static int seed_eval(const char *dir, const char *shared, const char *source)
{
    (void)source;
    seeder s = {.dir = dir};
    static const struct {
        qkd_eval_task task;
        const char *file;
    } sets[] = {
        {QKD_EVAL_PIQA, "eval/llm-foundry/piqa.jsonl"},
        {QKD_EVAL_ARC_EASY, "eval/llm-foundry/arc_easy.jsonl"},
        {QKD_EVAL_ARC_CHALLENGE, "eval/llm-foundry/arc_challenge.jsonl"},
        {QKD_EVAL_BOOLQ, "eval/llm-foundry/boolq.jsonl"},
        {QKD_EVAL_WINOGRANDE, "eval/llm-foundry/winogrande.jsonl"},
        {QKD_EVAL_LAMBADA, "eval/llm-foundry/lambada_openai_small.jsonl"},
        {QKD_EVAL_MC, "eval/llm-foundry/copa.jsonl"},
        {QKD_EVAL_MC, "eval/llm-foundry/siqa.jsonl"},
    };
    for (size_t i = 0; i < sizeof sets / sizeof sets[0]; i++) {
        const unsigned char task = (unsigned char)sets[i].task;
        seed_lines(&s, &task, 1, shared, sets[i].file, 3, "", 0);
    }
    /* Official PIQA: three items, a NUL, their three labels. */
    const unsigned char piqa = QKD_EVAL_PIQA;
    size_t nl;
    char *labels = read_all(shared, "eval/piqa/valid-labels.lst", &nl);
    if (labels && nl >= 6) { /* the labels file's first three lines, "0\n1\n1\n" */
        char tail[7] = {'\0'};
        memcpy(tail + 1, labels, 6);
        seed_lines(&s, &piqa, 1, shared, "eval/piqa/valid.jsonl", 3, tail, sizeof tail);
    }
    free(labels);
    /* HellaSwag's text format (the shared file is compressed): one item. */
    static const char hella[] = "\x01" "A man is sitting on a roof. he\n2\n"
                                "is using wrap to wrap a pair of skis.\n"
                                "is ripping level tiles off.\n"
                                "is holding a rubik's cube.\n"
                                "starts pulling up roofing on a roof.\n";
    seed_bytes(&s, hella, sizeof hella - 1);
    return seed_done(&s);
}

/* ---- the table ------------------------------------------------------------------------- */

const fuzz_target fuzz_targets[] = {
    {"llama2c", run_llama2c, seed_llama2c},
    {"gguf", run_gguf, seed_gguf},
    {"hf", run_hf, seed_hf},
    {"tokenizer", run_tokenizer, seed_tokenizer},
    {"checkpoint", run_checkpoint, seed_checkpoint},
    {"optim_state", run_optim_state, seed_optim_state},
    {"tokfile", run_tokfile, seed_tokfile},
    {"eval", run_eval, seed_eval},
    {NULL, NULL, NULL},
};

const fuzz_target *fuzz_target_find(const char *name)
{
    for (const fuzz_target *t = fuzz_targets; name && t->name; t++)
        if (strcmp(t->name, name) == 0)
            return t;
    return NULL;
}
