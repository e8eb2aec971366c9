/* qkd demo: the embedded default job, needing no file of ours.
 *
 * 1. Reads text that every Debian system has (/usr/share/common-licenses,
 *    installed by the essential package base-files) with the built-in
 *    byte-level tokenizer; the last windows are held out.
 * 2. Trains a small LLaMA teacher on it from scratch (cross-entropy, AdamW).
 * 3. Distils it into a 4-bit and a 2-bit student (asymmetric, groups of 32,
 *    forward KL) and prints, for each, the held-out perplexity of the float
 *    teacher, of the round-to-nearest student and of the distilled student.
 * Everything runs through the public API, as a user's program would. */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"

enum { SEQ = 128, EVAL_WINDOWS = 24 };

typedef struct demo_opts {
    const char *text;   /* a file, or a folder whose regular files are read */
    int teacher_steps;
    int steps;          /* distillation steps per student */
    int batch;
} demo_opts;

/* ---- the text ---------------------------------------------------------- */

typedef struct id_buf {
    int32_t *ids;
    size_t n, cap;
} id_buf;

/* Append path's text, encoded with BOS first (each file is a document). */
static int append_file(qkd_context *ctx, const qkd_tokenizer *tok, const char *path,
                       id_buf *b)
{
    FILE *f = fopen(path, "rb");
    long len = -1;
    if (f && fseek(f, 0, SEEK_END) == 0)
        len = ftell(f);
    char *text = len >= 0 ? malloc((size_t)len + 1) : NULL;
    int ok = text && fseek(f, 0, SEEK_SET) == 0 && fread(text, 1, (size_t)len, f) == (size_t)len;
    if (f)
        fclose(f);
    if (!ok) {
        free(text);
        fprintf(stderr, "qkd demo: cannot read %s\n", path);
        return CLI_EXIT_FAIL;
    }
    /* The byte tokenizer needs at most one id per byte, plus BOS and the
     * leading space. */
    size_t need = b->n + (size_t)len + 2;
    if (need > b->cap) {
        int32_t *grown = realloc(b->ids, need * sizeof *grown);
        if (!grown) {
            free(text);
            return cli_fail(ctx, QKD_ERR_NO_MEMORY, path);
        }
        b->ids = grown;
        b->cap = need;
    }
    size_t n = 0;
    qkd_status st = qkd_tokenizer_encode(tok, text, (size_t)len, QKD_ENCODE_BOS, b->ids + b->n,
                                         b->cap - b->n, &n);
    free(text);
    if (st != QKD_OK)
        return cli_fail(ctx, st, path);
    b->n += n;
    return CLI_EXIT_OK;
}

static int by_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The regular files of dir (symbolic links skipped: Debian links GPL to
 * GPL-3 and so on), in name order. */
static int read_folder(qkd_context *ctx, const qkd_tokenizer *tok, const char *dir, id_buf *b,
                       int *n_files)
{
    DIR *d = opendir(dir);
    if (!d) {
        fprintf(stderr, "qkd demo: cannot open %s (give a text with --text FILE)\n", dir);
        return CLI_EXIT_FAIL;
    }
    char *names[256];
    int n = 0;
    for (struct dirent *e; (e = readdir(d)) && n < 256;)
        if (e->d_name[0] != '.')
            names[n++] = strdup(e->d_name);
    closedir(d);
    qsort(names, (size_t)n, sizeof *names, by_name);
    int rc = CLI_EXIT_OK;
    *n_files = 0;
    for (int i = 0; i < n; i++) {
        char path[4096];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        if (rc == CLI_EXIT_OK && lstat(path, &st) == 0 && S_ISREG(st.st_mode)) {
            rc = append_file(ctx, tok, path, b);
            ++*n_files;
        }
        free(names[i]);
    }
    return rc;
}

static int load_text(qkd_context *ctx, const qkd_tokenizer *tok, const char *path,
                     qkd_dataset **data)
{
    id_buf b = {0};
    struct stat st;
    int n_files = 1;
    int rc = stat(path, &st) == 0 && S_ISDIR(st.st_mode)
                 ? read_folder(ctx, tok, path, &b, &n_files)
                 : append_file(ctx, tok, path, &b);
    if (rc == CLI_EXIT_OK) {
        qkd_status s = qkd_dataset_from_tokens(ctx, b.ids, b.n, qkd_tokenizer_vocab_size(tok),
                                               data);
        if (s == QKD_OK)
            s = qkd_dataset_set_split(*data, 1, EVAL_WINDOWS);
        rc = s == QKD_OK ? CLI_EXIT_OK : cli_fail(ctx, s, path);
        fprintf(stderr, "text: %s, %d file(s), %zu bytes as tokens; %d held-out windows of %d\n",
                path, n_files, b.n, EVAL_WINDOWS, SEQ);
    }
    free(b.ids);
    return rc;
}

/* ---- training ------------------------------------------------------------ */

static int progress(void *user, const qkd_distill_stats *s)
{
    const char *what = user;
    if (s->step % 50 == 0 || s->step == s->total_steps)
        fprintf(stderr, "  %s: step %lld/%lld loss %.4f, %.0f tok/s\n", what,
                (long long)s->step, (long long)s->total_steps, s->loss, s->tokens_per_s);
    return 0;
}

/* Run `steps` steps of `loss` on student (teacher NULL: plain training). */
static qkd_status train(qkd_context *ctx, qkd_model *teacher, qkd_model *student,
                        qkd_loss_kind kind, const qkd_dataset *data, const demo_opts *o,
                        int steps, float lr, const char *what)
{
    qkd_loss *loss = NULL;
    qkd_optimizer *opt = NULL;
    qkd_distill *run = NULL;
    qkd_loss_term term;
    qkd_loss_term_init(&term, kind);
    qkd_optim_params op;
    qkd_optim_params_init(&op);
    op.lr = lr;
    op.schedule = QKD_SCHEDULE_COSINE;
    op.warmup_steps = steps / 10;
    op.total_steps = steps;
    op.min_lr_ratio = 0.1f;
    qkd_distill_params dp;
    qkd_distill_params_init(&dp);
    dp.batch = o->batch;
    dp.seq = SEQ;
    dp.total_steps = steps;
    dp.on_step = progress;
    dp.user = (void *)what;
    qkd_status st = qkd_loss_create(ctx, &loss);
    if (st == QKD_OK)
        st = qkd_loss_add(loss, &term);
    if (st == QKD_OK)
        st = qkd_optimizer_create(student, &op, &opt);
    if (st == QKD_OK)
        st = qkd_distill_create(ctx, teacher, student, loss, opt, data, &dp, &run);
    if (st == QKD_OK)
        st = qkd_distill_run(run, 0);
    qkd_distill_free(run);
    qkd_optimizer_free(opt);
    qkd_loss_free(loss);
    return st;
}

static qkd_status make_teacher(qkd_context *ctx, const qkd_dataset *data, const demo_opts *o,
                               qkd_model **out)
{
    qkd_model_config cfg;
    qkd_model_config_init(&cfg);
    cfg.dim = 64;
    cfg.hidden_dim = 176;
    cfg.n_layers = 4;
    cfg.n_heads = 4;
    cfg.n_kv_heads = 2;
    cfg.vocab_size = QKD_BYTE_VOCAB_SIZE;
    cfg.max_seq_len = SEQ;
    qkd_status st = qkd_model_create(ctx, &cfg, out);
    if (st == QKD_OK)
        st = qkd_model_init_random(*out, 1, 0.05f);
    if (st == QKD_OK)
        st = train(ctx, NULL, *out, QKD_LOSS_CE, data, o, o->teacher_steps, 3e-3f, "teacher");
    return st;
}

/* A student: a copy of the teacher's weights, bound to a quantizer. */
static qkd_status make_student(qkd_context *ctx, qkd_model *teacher, qkd_quantizer *q,
                               qkd_model **out)
{
    qkd_model_config cfg;
    qkd_model_config_init(&cfg);
    qkd_status st = qkd_model_get_config(teacher, &cfg);
    if (st == QKD_OK)
        st = qkd_model_create(ctx, &cfg, out);
    float *w = NULL;
    for (int i = 0; st == QKD_OK && i < qkd_model_n_tensors(teacher); i++) {
        qkd_tensor_info info = {.size = sizeof info};
        st = qkd_model_tensor_info(teacher, i, &info);
        float *grown = st == QKD_OK ? realloc(w, (size_t)info.n_elements * sizeof *w) : NULL;
        if (!grown) {
            st = st == QKD_OK ? QKD_ERR_NO_MEMORY : st;
            break;
        }
        w = grown;
        st = qkd_model_tensor_get(teacher, i, w, (size_t)info.n_elements);
        if (st == QKD_OK)
            st = qkd_model_tensor_set(*out, i, w, (size_t)info.n_elements);
    }
    free(w);
    if (st == QKD_OK)
        st = qkd_model_set_quantizer(*out, q, QKD_QUANT_TARGET_LINEAR);
    return st;
}

/* Distil one student at `bits`: its held-out cross-entropy before (round
 * to nearest) and after distillation. */
static qkd_status one_student(qkd_context *ctx, qkd_model *teacher, const qkd_dataset *data,
                              const demo_opts *o, int bits, double ce[2])
{
    char what[32];
    snprintf(what, sizeof what, "W%d student", bits);
    qkd_quant_params qp;
    qkd_quant_params_init(&qp);
    qp.scheme = QKD_QUANT_ASYM;
    qp.bits = bits;
    qp.group_size = 32;
    qkd_quantizer *q = NULL;
    qkd_model *student = NULL;
    qkd_status st = qkd_quantizer_create(ctx, &qp, &q);
    if (st == QKD_OK)
        st = make_student(ctx, teacher, q, &student);
    if (st == QKD_OK)
        st = qkd_distill_eval_ce(ctx, student, data, o->batch, SEQ, &ce[0], NULL);
    if (st == QKD_OK)
        st = train(ctx, teacher, student, QKD_LOSS_FKL, data, o, o->steps, 1e-3f, what);
    if (st == QKD_OK)
        st = qkd_distill_eval_ce(ctx, student, data, o->batch, SEQ, &ce[1], NULL);
    qkd_model_free(student);
    qkd_quantizer_free(q);
    return st;
}

static int demo_main(int argc, char **argv)
{
    demo_opts o = {.text = "/usr/share/common-licenses", .teacher_steps = 1500, .steps = 400,
                   .batch = 8};
    const cli_option opts[] = {
        {"--text", NULL, CLI_STRING, &o.text, NULL},
        {"--teacher-steps", NULL, CLI_INT, &o.teacher_steps, NULL},
        {"--steps", NULL, CLI_INT, &o.steps, NULL},
        {"--batch", NULL, CLI_INT, &o.batch, NULL},
    };
    cli_common c;
    int rc = cli_parse(&cli_cmd_demo, argc, argv, opts, sizeof opts / sizeof opts[0], &c);
    if (rc != CLI_CONTINUE)
        return rc;
    if (o.teacher_steps < 1 || o.steps < 1 || o.batch < 1 || o.batch > 4096)
        return cli_usage_error(&cli_cmd_demo, "--teacher-steps, --steps and --batch must be "
                                              ">= 1 (batch <= 4096)");
    qkd_context *ctx = NULL;
    qkd_tokenizer *tok = NULL;
    qkd_dataset *data = NULL;
    qkd_model *teacher = NULL;
    if (cli_context_open(&c, &ctx) != CLI_EXIT_OK)
        return CLI_EXIT_FAIL;
    double t0 = cli_now(), teacher_ce = 0, ce[2][2];
    qkd_status st = qkd_tokenizer_create_bytes(ctx, &tok);
    rc = st == QKD_OK ? load_text(ctx, tok, o.text, &data) : cli_fail(ctx, st, "tokenizer");
    if (rc == CLI_EXIT_OK) {
        fprintf(stderr, "backend %s, %d threads\n", qkd_context_backend_name(ctx),
                qkd_context_n_threads(ctx));
        st = make_teacher(ctx, data, &o, &teacher);
        if (st == QKD_OK)
            st = qkd_distill_eval_ce(ctx, teacher, data, o.batch, SEQ, &teacher_ce, NULL);
        for (int i = 0; st == QKD_OK && i < 2; i++)
            st = one_student(ctx, teacher, data, &o, i == 0 ? 4 : 2, ce[i]);
        rc = st == QKD_OK ? CLI_EXIT_OK : cli_fail(ctx, st, "demo");
    }
    if (rc == CLI_EXIT_OK) {
        printf("held-out perplexity (%d windows of %d bytes of %s)\n", EVAL_WINDOWS, SEQ,
               o.text);
        printf("%-30s %12s %12s\n", "", "W4 g32", "W2 g32");
        printf("%-30s %12.4f %12.4f\n", "teacher (float)", exp(teacher_ce), exp(teacher_ce));
        printf("%-30s %12.4f %12.4f\n", "student, round-to-nearest", exp(ce[0][0]),
               exp(ce[1][0]));
        printf("%-30s %12.4f %12.4f\n", "student, distilled", exp(ce[0][1]), exp(ce[1][1]));
        printf("total %.0f s\n", cli_now() - t0);
    }
    qkd_model_free(teacher);
    qkd_dataset_free(data);
    qkd_tokenizer_free(tok);
    qkd_context_free(ctx);
    return rc;
}

const cli_command cli_cmd_demo = {
    .name = "demo",
    .summary = "train a small teacher on the system's licence texts and distil it to W4 and W2",
    .usage = "[--text FILE|DIR] [--teacher-steps N] [--steps N] [--batch B]",
    .help = "  --text FILE|DIR      training text (default /usr/share/common-licenses)\n"
            "  --teacher-steps N    teacher training steps (default 1500)\n"
            "  --steps N            distillation steps per student (default 400)\n"
            "  --batch B            sequences of 128 tokens per step (default 8)\n",
    .run = demo_main,
    .no_model = 1,
};
