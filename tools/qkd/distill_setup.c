/* qkd distill, setting up: options and method presets, the models, the
 * data, the quantizer, the loss and the optimizer. Public API only. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "distill_cli.h"

/* ---- method presets ------------------------------------------------------- */

typedef struct method_preset {
    const char *name;
    const char *scheme;  /* --scheme default */
    int group;           /* --group default */
    const char *loss;    /* --loss default */
    int data_free;       /* --data-free default when --data is absent; 0: none */
    unsigned optim_presets;
    int continuous;
    float lr;            /* --lr default; 0: the tool's */
} method_preset;

static const method_preset methods[] = {
    {"none", "asym", 32, "fkl", 0, 0, 0, 0},
    /* BitDistiller: asymmetric, clip searched on layer outputs, CAKLD. */
    {"bitdistiller", "clip", 32, "cakld", 0, 0, 0, 0},
    /* TSLD: ternary weights (TWN, per output row), token-scaled KD + CE. */
    {"tsld", "ternary", 0, "tsld+ce", 0, 0, 0, 0},
    /* LLM-QAT: symmetric per output channel, forward KL, data-free data. */
    {"llm-qat", "sym", 0, "fkl", 64, 0, 0, 0},
    /* ov-freeze: v and o projections keep their quantized initialisation. */
    {"ov-freeze", "asym", 32, "fkl", 0, QKD_PRESET_OV_FREEZE, 0, 0},
    /* Continuous approximations of rounding and clamping, annealed, from
     * BitDistiller's searched clip, at twice the default learning rate
     * (W3 g32 on stories260K: plain asym at 5e-4 closed 78% of the RTN-FP
     * gap in CE, the clip alone 80%, lr 1e-3 alone 81%, both 82-84% over
     * three seeds). */
    {"cont-approx", "clip", 32, "fkl", 0, 0, 1, 1e-3f},
};

static const method_preset *find_method(const char *name)
{
    for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++)
        if (!strcmp(methods[i].name, name))
            return &methods[i];
    return NULL;
}

static void apply_preset(distill_opts *o, const method_preset *m)
{
    if (!o->seen.scheme)
        o->scheme = m->scheme;
    if (!o->seen.group)
        o->group = m->group;
    if (!o->seen.loss)
        o->loss = m->loss;
    if (!o->seen.data_free && !o->data)
        o->data_free = m->data_free;
    if (!o->seen.warmup)
        o->warmup = o->steps / 10;
    if (!o->seen.lr && m->lr > 0.0f)
        o->lr = m->lr;
    o->optim_presets = m->optim_presets | (o->scales_only ? QKD_PRESET_SCALES_ONLY : 0u);
    o->continuous = m->continuous;
}

float distill_sharpness(int64_t t, int64_t total)
{
    const double from = 4.0, to = 64.0;
    double f = total > 1 ? (double)(t - 1) / (double)(total - 1) : 1.0;
    return (float)(from * pow(to / from, f));
}

/* ---- the loss and quantizer options ------------------------------------------ */

static const char *const loss_names[] = {
    [QKD_LOSS_CE] = "ce",     [QKD_LOSS_FKL] = "fkl",     [QKD_LOSS_RKL] = "rkl",
    [QKD_LOSS_JSD] = "jsd",   [QKD_LOSS_CAKLD] = "cakld", [QKD_LOSS_TSLD] = "tsld",
    [QKD_LOSS_MSE] = "mse",
};
enum { N_LOSS_KINDS = sizeof loss_names / sizeof loss_names[0] };

const char *distill_loss_name(qkd_loss_kind kind)
{
    return (unsigned)kind < N_LOSS_KINDS ? loss_names[kind] : "?";
}

/* --loss "a+b+...": one term of weight 1 per name. */
static int parse_loss(distill_opts *o)
{
    const int max_terms = (int)(sizeof o->kinds / sizeof o->kinds[0]);
    o->n_terms = 0;
    for (const char *p = o->loss;; p++) {
        size_t len = strcspn(p, "+");
        int kind = -1;
        for (int k = 0; k < N_LOSS_KINDS; k++)
            if (strlen(loss_names[k]) == len && !strncmp(loss_names[k], p, len))
                kind = k;
        if (kind < 0 || o->n_terms == max_terms)
            return -1;
        o->kinds[o->n_terms++] = (qkd_loss_kind)kind;
        p += len;
        if (*p == '\0')
            return 0;
    }
}

static int parse_clip(const char *s, qkd_quant_params *q)
{
    char *end;
    if (!strcmp(s, "none"))
        q->clip = QKD_CLIP_NONE;
    else if (!strcmp(s, "weight"))
        q->clip = QKD_CLIP_SEARCH_WEIGHT;
    else if (!strcmp(s, "output"))
        q->clip = QKD_CLIP_SEARCH_OUTPUT;
    else if ((q->clip_ratio = strtof(s, &end)) > 0.0f && q->clip_ratio <= 1.0f && !*end)
        q->clip = QKD_CLIP_FIXED;
    else
        return -1;
    return 0;
}

/* A GGUF block format as a training grid: the student then trains on exactly
 * the weights `qkd export` writes. */
static int format_scheme(const char *name, qkd_quant_scheme *out)
{
    static const struct {
        const char *name;
        qkd_quant_scheme scheme;
    } formats[] = {{"q8_0", QKD_QUANT_Q8_0}, {"q4_0", QKD_QUANT_Q4_0}, {"q4_1", QKD_QUANT_Q4_1},
                   {"q5_0", QKD_QUANT_Q5_0}, {"q5_1", QKD_QUANT_Q5_1}, {"q4_k", QKD_QUANT_Q4_K},
                   {"q6_k", QKD_QUANT_Q6_K}, {"tq2_0", QKD_QUANT_TQ2_0}};
    for (size_t i = 0; i < sizeof formats / sizeof formats[0]; i++)
        if (!strcmp(name, formats[i].name)) {
            *out = formats[i].scheme;
            return 0;
        }
    return -1;
}

static int parse_quant(distill_opts *o)
{
    const cli_command *cmd = &cli_cmd_distill;
    qkd_quant_params *q = &o->quant;
    qkd_quant_params_init(q);
    q->bits = o->bits;
    q->group_size = o->group;
    q->act_bits = o->act_bits;
    q->kv_bits = o->kv_bits;
    q->learn_scales = o->learn_scales || o->scales_only;
    q->estimator = o->continuous ? QKD_ESTIMATOR_CONTINUOUS : QKD_ESTIMATOR_STE;
    if (o->continuous)
        q->round_sharpness = distill_sharpness(1, o->steps);
    const char *clip = "none";
    if (!strcmp(o->scheme, "sym")) {
        q->scheme = QKD_QUANT_SYM;
    } else if (!strcmp(o->scheme, "asym")) {
        q->scheme = QKD_QUANT_ASYM;
    } else if (!strcmp(o->scheme, "ternary")) {
        q->scheme = QKD_QUANT_TERNARY;
    } else if (!strcmp(o->scheme, "clip")) {
        q->scheme = QKD_QUANT_ASYM;
        clip = "output";
    } else if (format_scheme(o->scheme, &q->scheme) != 0) {
        return cli_usage_error(cmd, "--scheme '%s': use sym, asym, clip, ternary or a GGUF "
                               "format (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q6_k, tq2_0)",
                               o->scheme);
    }
    if (parse_clip(o->clip ? o->clip : clip, q) != 0)
        return cli_usage_error(cmd, "--clip '%s': use none, weight, output or a ratio in (0, 1]",
                               o->clip);
    if (q->learn_scales && q->scheme > QKD_QUANT_TERNARY) /* a format's scales are its own */
        return cli_usage_error(cmd, "--learn-scales and --scales-only want --scheme sym, asym, "
                               "clip or ternary, not '%s'", o->scheme);
    return CLI_CONTINUE;
}

/* ---- options -------------------------------------------------------------- */

static int check_ranges(const distill_opts *o)
{
    const cli_command *cmd = &cli_cmd_distill;
    if (!o->out || !*o->out)
        return cli_usage_error(cmd, "missing --out DIR");
    if (!!o->data + !!o->data_free != 1)
        return cli_usage_error(cmd, "give exactly one of --data FILE and --data-free N");
    if (o->bits != 2 && o->bits != 3 && o->bits != 4 && o->bits != 8)
        return cli_usage_error(cmd, "--bits %d: use 2, 3, 4 or 8", o->bits);
    if (o->group < -1)
        return cli_usage_error(cmd, "--group %d: use N > 0, 0 (per row) or -1 (per tensor)",
                               o->group);
    if (o->steps < 1 || o->batch < 1 || o->batch > 4096 || o->seq < 1 || o->seq > (1 << 20))
        return cli_usage_error(cmd, "--steps, --batch (<= 4096) and --seq must be >= 1");
    if (o->data_free < 0 || (o->data_free > 0 && o->data_free < 2))
        return cli_usage_error(cmd, "--data-free %d: need at least 2 sequences", o->data_free);
    if (o->checkpoint_every < 0 || o->warmup < 0 || o->warmup > o->steps)
        return cli_usage_error(cmd, "--checkpoint-every must be >= 0, --warmup in 0..steps");
    if (o->eval_windows < 1)
        return cli_usage_error(cmd, "--eval-windows %d must be >= 1", o->eval_windows);
    if (!(o->lr > 0.0f))
        return cli_usage_error(cmd, "--lr %g must be > 0", (double)o->lr);
    if (o->logits_rows < 0)
        return cli_usage_error(cmd, "--logits-rows %d must be >= 0", o->logits_rows);
    if (o->act_bits < 0 || o->act_bits > 16 || o->kv_bits < 0 || o->kv_bits > 16)
        return cli_usage_error(cmd, "--act-bits and --kv-bits must be in 0..16");
    if (strcmp(o->schedule, "constant") && strcmp(o->schedule, "linear") &&
        strcmp(o->schedule, "cosine"))
        return cli_usage_error(cmd, "--schedule '%s': use constant, linear or cosine",
                               o->schedule);
    return CLI_CONTINUE;
}

int distill_parse(int argc, char **argv, distill_opts *o, cli_common *c)
{
    *o = (distill_opts){.method = "none", .schedule = "cosine", .bits = 4, .steps = 100,
                        .batch = 8, .seq = 64, .eval_windows = 64, .lr = 5e-4f, .seed = 1};
    /* --teacher writes the session's MODEL: cli_parse clears *c first and
     * then stores options, so the pointer stays valid. */
    const cli_option opts[] = {
        {"--teacher", NULL, CLI_STRING, &c->model, NULL},
        {"--tokenizer", NULL, CLI_STRING, &o->tokenizer, NULL},
        {"--method", NULL, CLI_STRING, &o->method, NULL},
        {"--bits", NULL, CLI_INT, &o->bits, NULL},
        {"--group", NULL, CLI_INT, &o->group, &o->seen.group},
        {"--scheme", NULL, CLI_STRING, &o->scheme, &o->seen.scheme},
        {"--clip", NULL, CLI_STRING, &o->clip, NULL},
        {"--act-bits", NULL, CLI_INT, &o->act_bits, NULL},
        {"--kv-bits", NULL, CLI_INT, &o->kv_bits, NULL},
        {"--learn-scales", NULL, CLI_FLAG, &o->learn_scales, NULL},
        {"--scales-only", NULL, CLI_FLAG, &o->scales_only, NULL},
        {"--teacher-bf16", NULL, CLI_FLAG, &o->teacher_bf16, NULL},
        {"--student-bf16", NULL, CLI_FLAG, &o->student_bf16, NULL},
        {"--logits-rows", NULL, CLI_INT, &o->logits_rows, NULL},
        {"--loss", NULL, CLI_STRING, &o->loss, &o->seen.loss},
        {"--data", NULL, CLI_STRING, &o->data, NULL},
        {"--data-free", NULL, CLI_INT, &o->data_free, &o->seen.data_free},
        {"--eval-text", NULL, CLI_STRING, &o->eval_text, NULL},
        {"--eval-windows", NULL, CLI_INT, &o->eval_windows, NULL},
        {"--steps", NULL, CLI_INT, &o->steps, NULL},
        {"--batch", NULL, CLI_INT, &o->batch, NULL},
        {"--seq", NULL, CLI_INT, &o->seq, NULL},
        {"--lr", NULL, CLI_FLOAT, &o->lr, &o->seen.lr},
        {"--schedule", NULL, CLI_STRING, &o->schedule, NULL},
        {"--warmup", NULL, CLI_INT, &o->warmup, &o->seen.warmup},
        {"--out", NULL, CLI_STRING, &o->out, NULL},
        {"--resume", NULL, CLI_FLAG, &o->resume, NULL},
        {"--checkpoint-every", NULL, CLI_INT, &o->checkpoint_every, NULL},
        {"--seed", NULL, CLI_U64, &o->seed, NULL},
    };
    int rc = cli_parse(&cli_cmd_distill, argc, argv, opts, sizeof opts / sizeof opts[0], c);
    if (rc != CLI_CONTINUE)
        return rc;
    const method_preset *m = find_method(o->method);
    if (!m)
        return cli_usage_error(&cli_cmd_distill,
                               "--method '%s': use bitdistiller, tsld, llm-qat, ov-freeze, "
                               "cont-approx or none", o->method);
    o->teacher = c->model;
    apply_preset(o, m);
    rc = check_ranges(o);
    if (rc == CLI_CONTINUE && parse_loss(o) != 0)
        rc = cli_usage_error(&cli_cmd_distill,
                             "--loss '%s': join up to 8 of ce, fkl, rkl, jsd, cakld, tsld, mse "
                             "with '+'", o->loss);
    return rc == CLI_CONTINUE ? parse_quant(o) : rc;
}

/* ---- data ----------------------------------------------------------------- */

static int is_token_file(const char *path)
{
    char magic[4] = {0};
    FILE *f = fopen(path, "rb");
    size_t n = f ? fread(magic, 1, sizeof magic, f) : 0;
    if (f)
        fclose(f);
    return n == sizeof magic && !memcmp(magic, "QKDT", 4);
}

static int need_tokenizer(const distill_job *j, const char *why)
{
    if (j->s.tok)
        return CLI_EXIT_OK;
    fprintf(stderr, "qkd: the teacher carries no tokenizer and %s needs one: name it with "
                    "--tokenizer\n", why);
    return CLI_EXIT_FAIL;
}

/* A counter on a terminal; otherwise one line at the end. */
static int datafree_progress(void *user, int64_t done, int64_t total)
{
    const int tty = *(const int *)user;
    if (tty || done == total)
        fprintf(stderr, "%sqkd: data-free: %lld/%lld sequences%s", tty ? "\r" : "",
                (long long)done, (long long)total, done == total ? "\n" : "");
    return 0;
}

/* The teacher's own sequences, from the cache in DIR when it is there. */
static int load_datafree(distill_job *j, const distill_opts *o)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/datafree-n%d-len%d-seed%llu.tok", o->out, o->data_free,
             o->seq + 1, (unsigned long long)o->seed);
    qkd_context *ctx = j->s.ctx;
    size_t want = (size_t)o->data_free * (size_t)(o->seq + 1);
    if (qkd_dataset_load(ctx, path, &j->train) == QKD_OK) {
        if (qkd_dataset_n_tokens(j->train) == want) {
            fprintf(stderr, "qkd: data-free: reusing %s\n", path);
            return CLI_EXIT_OK;
        }
        qkd_dataset_free(j->train);
        j->train = NULL;
    }
    int rc = need_tokenizer(j, "--data-free");
    if (rc != CLI_EXIT_OK)
        return rc;
    qkd_datafree_params p;
    qkd_datafree_params_init(&p);
    p.n_sequences = o->data_free;
    p.seq_len = o->seq + 1;
    p.seed = o->seed;
    int tty = isatty(STDERR_FILENO);
    p.progress = datafree_progress;
    p.progress_user = &tty;
    qkd_status st = qkd_dataset_generate(ctx, j->s.model, j->s.tok, &p, &j->train);
    if (st == QKD_OK)
        st = qkd_dataset_save(j->train, path);
    return st == QKD_OK ? CLI_EXIT_OK : cli_fail(ctx, st, "data-free generation");
}

/* A token file (recognised by its magic) or a text file. */
static int load_file(distill_job *j, const char *path, qkd_dataset **out)
{
    qkd_status st;
    if (is_token_file(path)) {
        st = qkd_dataset_load(j->s.ctx, path, out);
    } else {
        int rc = need_tokenizer(j, path);
        if (rc != CLI_EXIT_OK)
            return rc;
        st = qkd_dataset_from_text(j->s.ctx, j->s.tok, path, out);
    }
    return st == QKD_OK ? CLI_EXIT_OK : cli_fail(j->s.ctx, st, path);
}

/* The training data and the held-out windows: the last --eval-windows
 * windows of --eval-text, or else the last windows of the training data
 * (10% of them, at most --eval-windows). */
static int load_data(distill_job *j, const distill_opts *o)
{
    int rc = o->data_free ? load_datafree(j, o) : load_file(j, o->data, &j->train);
    if (rc != CLI_EXIT_OK)
        return rc;
    int64_t n_win = (int64_t)(qkd_dataset_n_tokens(j->train) / (size_t)(o->seq + 1));
    int64_t n_eval = 0;
    if (o->eval_text) {
        rc = load_file(j, o->eval_text, &j->own_eval);
        if (rc != CLI_EXIT_OK)
            return rc;
        qkd_dataset_set_split(j->own_eval, o->seed, o->eval_windows);
        j->eval = j->own_eval;
    } else {
        n_eval = n_win / 10 < 1 ? 1 : n_win / 10;
        if (n_eval > o->eval_windows)
            n_eval = o->eval_windows;
        j->eval = j->train;
    }
    if (n_win - n_eval < 1) {
        fprintf(stderr, "qkd: the data has %lld windows of %d tokens: too few to train%s\n",
                (long long)n_win, o->seq + 1, o->eval_text ? "" : " and hold some out");
        return CLI_EXIT_FAIL;
    }
    qkd_dataset_set_split(j->train, o->seed, n_eval);
    return CLI_EXIT_OK;
}

/* ---- models ------------------------------------------------------------------ */

/* mkdir -p */
static int make_dir(const char *path)
{
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1;; p++) {
        int last = *p == '\0';
        if (*p != '/' && !last)
            continue;
        *p = '\0';
        if (mkdir(buf, 0777) != 0 && errno != EEXIST) {
            fprintf(stderr, "qkd: cannot create %s: %s\n", buf, strerror(errno));
            return CLI_EXIT_FAIL;
        }
        if (last)
            return CLI_EXIT_OK;
        *p = '/';
    }
}

/* The student starts as the teacher: the same file, loaded again. With
 * --student-bf16 its products read bf16 inputs (the tensor cores on CUDA)
 * while its weights, gradients and optimizer state stay fp32. */
static int open_student(distill_job *j, const distill_opts *o, const cli_common *c)
{
    qkd_context *ctx = j->s.ctx;
    qkd_status st = qkd_model_load(ctx, c->model, &j->student);
    if (st == QKD_OK)
        st = qkd_model_set_max_seq_len(j->student, j->s.cfg.max_seq_len);
    if (st == QKD_OK && o->student_bf16)
        st = qkd_model_set_matmul_precision(j->student, QKD_MATMUL_BF16);
    if (st == QKD_OK)
        st = qkd_quantizer_create(ctx, &o->quant, &j->quant);
    if (st == QKD_OK)
        st = qkd_model_set_quantizer(j->student, j->quant, QKD_QUANT_TARGET_LINEAR);
    return st == QKD_OK ? CLI_EXIT_OK : cli_fail(ctx, st, "the student");
}

/* The teacher is frozen: it keeps no per-layer activations. With
 * --teacher-bf16 its products (forward, data-free generation, evaluation)
 * read bf16 inputs; the student stays fp32. */
static int set_teacher_precision(distill_job *j, const distill_opts *o)
{
    qkd_status st = qkd_model_set_trainable(j->s.model, 0);
    if (st != QKD_OK)
        return cli_fail(j->s.ctx, st, "the teacher");
    if (!o->teacher_bf16)
        return CLI_EXIT_OK;
    st = qkd_model_set_matmul_precision(j->s.model, QKD_MATMUL_BF16);
    return st == QKD_OK ? CLI_EXIT_OK : cli_fail(j->s.ctx, st, "--teacher-bf16");
}

/* --logits-rows: the objective computes both models' logits a block of
 * rows at a time, never all at once (same values). */
static int set_logits_rows(distill_job *j, const distill_opts *o)
{
    qkd_status st = qkd_model_set_logits_rows(j->s.model, o->logits_rows);
    if (st == QKD_OK)
        st = qkd_model_set_logits_rows(j->student, o->logits_rows);
    return st == QKD_OK ? CLI_EXIT_OK : cli_fail(j->s.ctx, st, "--logits-rows");
}

int distill_open(distill_job *j, const distill_opts *o, const cli_common *c)
{
    memset(j, 0, sizeof *j);
    snprintf(j->ckpt_path, sizeof j->ckpt_path, "%s/checkpoint.qkdc", o->out);
    snprintf(j->metrics_path, sizeof j->metrics_path, "%s/metrics.jsonl", o->out);
    snprintf(j->summary_path, sizeof j->summary_path, "%s/summary.json", o->out);
    snprintf(j->config_path, sizeof j->config_path, "%s/run.json", o->out);
    int rc = make_dir(o->out);
    if (rc == CLI_EXIT_OK)
        rc = cli_session_open(&j->s, c, o->tokenizer, 0);
    if (rc == CLI_EXIT_OK)
        rc = cli_session_fit(&j->s, o->seq + 1);
    if (rc == CLI_EXIT_OK)
        rc = set_teacher_precision(j, o);
    if (rc == CLI_EXIT_OK)
        rc = open_student(j, o, c);
    if (rc == CLI_EXIT_OK)
        rc = set_logits_rows(j, o);
    if (rc == CLI_EXIT_OK)
        rc = load_data(j, o);
    return rc;
}

/* ---- loss and optimizer -------------------------------------------------------- */

static int build_loss(distill_job *j, const distill_opts *o)
{
    qkd_status st = qkd_loss_create(j->s.ctx, &j->loss);
    for (int i = 0; i < o->n_terms && st == QKD_OK; i++) {
        qkd_loss_term term;
        qkd_loss_term_init(&term, o->kinds[i]);
        st = qkd_loss_add(j->loss, &term);
    }
    return st == QKD_OK ? CLI_EXIT_OK : cli_fail(j->s.ctx, st, "--loss");
}

/* CAKLD's beta: the teacher's mean top-1 probability over the first
 * CALIB_BATCHES training batches, set on every CAKLD term. */
static int set_cakld_beta(distill_job *j, const distill_opts *o)
{
    enum { CALIB_BATCHES = 4 };
    int has_cakld = 0;
    for (int i = 0; i < o->n_terms; i++)
        has_cakld |= o->kinds[i] == QKD_LOSS_CAKLD;
    if (!has_cakld)
        return CLI_EXIT_OK;
    size_t n = (size_t)o->batch * (size_t)o->seq;
    int32_t *tok = malloc(n * sizeof *tok), *tgt = malloc(n * sizeof *tgt);
    double sum = 0.0;
    qkd_status st = tok && tgt ? QKD_OK : QKD_ERR_NO_MEMORY;
    for (int b = 0; b < CALIB_BATCHES && st == QKD_OK; b++) {
        float conf = 0.0f;
        st = qkd_dataset_batch(j->train, b, o->batch, o->seq, tok, tgt);
        if (st == QKD_OK)
            st = qkd_model_forward(j->s.model, tok, o->batch, o->seq);
        if (st == QKD_OK)
            st = qkd_loss_teacher_confidence(j->s.model, tgt, &conf);
        sum += conf;
    }
    free(tok);
    free(tgt);
    float beta = (float)(sum / CALIB_BATCHES);
    for (int i = 0; i < o->n_terms && st == QKD_OK; i++)
        if (o->kinds[i] == QKD_LOSS_CAKLD)
            st = qkd_loss_set_beta(j->loss, i, beta);
    if (st != QKD_OK)
        return cli_fail(j->s.ctx, st, "CAKLD beta");
    fprintf(stderr, "qkd: CAKLD beta %.4f (the teacher's mean top-1 probability, %d batches)\n",
            beta, CALIB_BATCHES);
    return CLI_EXIT_OK;
}

static int build_optimizer(distill_job *j, const distill_opts *o)
{
    qkd_optim_params p;
    qkd_optim_params_init(&p);
    p.lr = o->lr;
    p.total_steps = o->steps;
    p.warmup_steps = o->warmup;
    p.min_lr_ratio = 0.1f;
    p.schedule = !strcmp(o->schedule, "constant") ? QKD_SCHEDULE_CONSTANT
                 : !strcmp(o->schedule, "linear") ? QKD_SCHEDULE_LINEAR
                                                  : QKD_SCHEDULE_COSINE;
    qkd_status st = qkd_optimizer_create(j->student, &p, &j->opt);
    if (st == QKD_OK && o->optim_presets)
        st = qkd_optimizer_apply_preset(j->opt, o->optim_presets);
    return st == QKD_OK ? CLI_EXIT_OK : cli_fail(j->s.ctx, st, "the optimizer");
}

/* A SEARCH clip is fitted once, on the first training batch, before any
 * step; a resumed run takes its (clamped) weights from the checkpoint. */
static int calibrate(distill_job *j, const distill_opts *o)
{
    if (o->resume ||
        (o->quant.clip != QKD_CLIP_SEARCH_WEIGHT && o->quant.clip != QKD_CLIP_SEARCH_OUTPUT))
        return CLI_EXIT_OK;
    int32_t *tok = malloc((size_t)o->batch * (size_t)o->seq * sizeof *tok);
    qkd_status st = tok ? qkd_dataset_batch(j->train, 0, o->batch, o->seq, tok, NULL)
                        : QKD_ERR_NO_MEMORY;
    if (st == QKD_OK)
        st = qkd_quantizer_calibrate(j->quant, j->student, tok, o->batch, o->seq);
    free(tok);
    if (st != QKD_OK)
        return cli_fail(j->s.ctx, st, "clip search");
    fprintf(stderr, "qkd: clip searched on %d x %d calibration tokens\n", o->batch, o->seq);
    return CLI_EXIT_OK;
}

int distill_prepare_run(distill_job *j, const distill_opts *o, qkd_distill_fn on_step,
                        void *user)
{
    int rc = calibrate(j, o);
    if (rc == CLI_EXIT_OK)
        rc = build_loss(j, o);
    if (rc == CLI_EXIT_OK)
        rc = set_cakld_beta(j, o);
    if (rc == CLI_EXIT_OK)
        rc = build_optimizer(j, o);
    if (rc != CLI_EXIT_OK)
        return rc;
    qkd_distill_params p;
    qkd_distill_params_init(&p);
    p.batch = o->batch;
    p.seq = o->seq;
    p.total_steps = o->steps;
    p.on_step = on_step;
    p.user = user;
    qkd_status st = qkd_distill_create(j->s.ctx, j->s.model, j->student, j->loss, j->opt,
                                       j->train, &p, &j->run);
    return st == QKD_OK ? CLI_EXIT_OK : cli_fail(j->s.ctx, st, "distill");
}

void distill_close(distill_job *j)
{
    qkd_distill_free(j->run);
    qkd_optimizer_free(j->opt);
    qkd_loss_free(j->loss);
    qkd_dataset_free(j->train);
    qkd_dataset_free(j->own_eval);
    qkd_model_free(j->student);
    qkd_quantizer_free(j->quant);
    cli_session_close(&j->s);
    memset(j, 0, sizeof *j);
}
