/* qkd eval MODEL --text FILE: perplexity over non-overlapping windows.
 * qkd eval MODEL --task T --data FILE: zero-shot multiple-choice accuracy
 * (qkd/eval.h); a FILE ending in .bz2 is read through `bzip2 -dc`. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <qkd/eval.h>

#include "cli.h"

typedef struct eval_args {
    const char *text;
    const char *tokenizer;
    int seq;
    int seq_given;
    int batch;
    int batch_given;
    const char *task;
    const char *data;
    int limit;
    int no_bos;
} eval_args;

/* The file's bytes, NUL-terminated (owned, free()), or NULL with a message. */
static char *read_text(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    long n = -1;
    if (f && fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0)
        buf = malloc((size_t)n + 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    if (f)
        fclose(f);
    if (!buf) {
        fprintf(stderr, "qkd: %s: cannot read the text file\n", path);
        return NULL;
    }
    buf[n] = '\0';
    *len = (size_t)n;
    return buf;
}

/* Token ids of the whole text with BOS first (owned, free()). */
static int tokenize(cli_session *s, const char *path, int32_t **ids, size_t *n)
{
    size_t len;
    char *text = read_text(path, &len);
    if (!text)
        return CLI_EXIT_FAIL;
    /* BOS, the added leading space and one id per byte suffice for LLaMA
     * vocabularies; a second pass takes the exact count otherwise. */
    size_t cap = len + 2;
    qkd_status st = QKD_ERR_RANGE;
    *ids = NULL;
    for (int pass = 0; pass < 2 && st == QKD_ERR_RANGE; pass++) {
        free(*ids);
        *ids = malloc(cap * sizeof **ids);
        st = *ids ? qkd_tokenizer_encode(s->tok, text, len, QKD_ENCODE_BOS, *ids, cap, n)
                  : QKD_ERR_NO_MEMORY;
        cap = *n;
    }
    free(text);
    if (st != QKD_OK) {
        free(*ids);
        *ids = NULL;
        return cli_fail(s->ctx, st, path);
    }
    return CLI_EXIT_OK;
}

static void show_progress(int done, int total, int seq, double t0)
{
    enum { WIDTH = 30 };
    double dt = cli_now() - t0;
    double rate = dt > 0 ? (double)done * seq / dt : 0.0;
    double eta = done > 0 ? dt * (total - done) / done : 0.0;
    int fill = total > 0 ? done * WIDTH / total : WIDTH;
    fprintf(stderr, "\r[%.*s%*s] %d/%d windows, %.0f tok/s, ETA %.0f s ", fill,
            "==============================", WIDTH - fill, "", done, total, rate, eta);
    if (done == total)
        fputc('\n', stderr);
}

/* Forward windows [w0, w0+b) of seq+1 tokens each; adds the summed
 * cross-entropy of their seq predictions to *sum. */
static int eval_batch(cli_session *s, const int32_t *ids, int w0, int b, int seq,
                      int32_t *in, int32_t *tgt, double *sum)
{
    for (int i = 0; i < b; i++) {
        const int32_t *win = ids + (size_t)(w0 + i) * (size_t)(seq + 1);
        memcpy(in + (size_t)i * seq, win, (size_t)seq * sizeof *in);
        memcpy(tgt + (size_t)i * seq, win + 1, (size_t)seq * sizeof *tgt);
    }
    float loss;
    qkd_status st = qkd_model_forward(s->model, in, b, seq);
    if (st == QKD_OK)
        st = qkd_model_cross_entropy(s->model, tgt, 0, &loss);
    if (st != QKD_OK)
        return cli_fail(s->ctx, st, "eval");
    *sum += (double)loss * b * seq;
    return CLI_EXIT_OK;
}

static int evaluate(cli_session *s, const eval_args *a, const int32_t *ids, size_t n_ids)
{
    int seq = a->seq;
    int n_win = (int)(n_ids / (size_t)(seq + 1));
    if (n_win == 0) {
        fprintf(stderr, "qkd: %s: %zu tokens, too few for one window of %d + 1\n", a->text,
                n_ids, seq);
        return CLI_EXIT_FAIL;
    }
    int batch = a->batch < n_win ? a->batch : n_win;
    int32_t *in = malloc((size_t)batch * seq * sizeof *in);
    int32_t *tgt = malloc((size_t)batch * seq * sizeof *tgt);
    int rc = in && tgt ? CLI_EXIT_OK : cli_fail(NULL, QKD_ERR_NO_MEMORY, "eval");
    int tty = isatty(STDERR_FILENO);
    double sum = 0.0, t0 = cli_now();
    for (int w = 0; w < n_win && rc == CLI_EXIT_OK; w += batch) {
        int b = n_win - w < batch ? n_win - w : batch;
        rc = eval_batch(s, ids, w, b, seq, in, tgt, &sum);
        if (tty && rc == CLI_EXIT_OK)
            show_progress(w + b, n_win, seq, t0);
    }
    free(in);
    free(tgt);
    if (rc != CLI_EXIT_OK)
        return rc;
    double count = (double)n_win * seq, mean = sum / count;
    printf("windows: %d of %d tokens\n", n_win, seq + 1);
    printf("tokens: %.0f\n", count);
    printf("mean cross-entropy: %.6f nats/token\n", mean);
    printf("perplexity: %.6f\n", exp(mean));
    fprintf(stderr, "qkd: %.0f tokens in %.3f s\n", count, cli_now() - t0);
    return CLI_EXIT_OK;
}

static int eval_session(cli_session *s, eval_args *a)
{
    if (!a->seq_given)
        a->seq = s->cfg.max_seq_len < 256 ? s->cfg.max_seq_len : 256;
    int rc = cli_session_fit(s, a->seq);
    int32_t *ids = NULL;
    size_t n_ids = 0;
    if (rc == CLI_EXIT_OK)
        rc = tokenize(s, a->text, &ids, &n_ids);
    if (rc == CLI_EXIT_OK)
        rc = evaluate(s, a, ids, n_ids);
    free(ids);
    return rc;
}

/* ---- zero-shot tasks ---- */

/* The output of `bzip2 -dc -- path` (owned, free()), or NULL with a
 * message. The path is single-quoted for the shell. */
static char *read_bz2(const char *path, size_t *len)
{
    size_t cmd_len = sizeof "bzip2 -dc -- ''" + 4 * strlen(path);
    char *cmd = malloc(cmd_len), *o = cmd;
    if (!cmd)
        return NULL;
    o += sprintf(o, "bzip2 -dc -- '");
    for (const char *p = path; *p; p++)
        o += *p == '\'' ? sprintf(o, "'\\''") : sprintf(o, "%c", *p);
    sprintf(o, "'");
    FILE *f = popen(cmd, "r");
    free(cmd);
    size_t cap = 1 << 20, n = 0;
    char *buf = f ? malloc(cap) : NULL;
    while (buf && (n += fread(buf + n, 1, cap - n, f)) == cap) {
        char *grown = realloc(buf, 2 * cap);
        if (!grown) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = grown;
        cap *= 2;
    }
    int status = f ? pclose(f) : -1;
    if (!buf || status != 0) {
        fprintf(stderr, "qkd: %s: `bzip2 -dc` failed (%s)\n", path,
                !f ? "cannot run it" : !buf ? "out of memory" : "bad archive or no bzip2");
        free(buf);
        return NULL;
    }
    *len = n;
    return buf;
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static int load_set(cli_session *s, qkd_eval_task task, const char *path, qkd_eval_set **set)
{
    qkd_status st;
    if (ends_with(path, ".bz2")) {
        size_t len;
        char *text = read_bz2(path, &len);
        if (!text)
            return CLI_EXIT_FAIL;
        st = qkd_eval_set_parse(s->ctx, task, path, text, len, NULL, 0, set);
        free(text);
    } else {
        st = qkd_eval_set_load(s->ctx, task, path, set);
    }
    return st == QKD_OK ? CLI_EXIT_OK : cli_fail(s->ctx, st, path);
}

static int show_items(void *user, size_t done, size_t total)
{
    double t0 = *(const double *)user, dt = cli_now() - t0;
    fprintf(stderr, "\r%zu/%zu items, %.1f items/s ", done, total, dt > 0 ? done / dt : 0.0);
    if (done == total)
        fputc('\n', stderr);
    return 0;
}

static void print_result(const qkd_eval_result *r)
{
    printf("task: %s\n", qkd_eval_task_name(r->task));
    printf("items: %zu\n", r->n_items);
    printf("acc: %.4f +/- %.4f\n", r->acc, r->acc_stderr);
    if (r->task == QKD_EVAL_LAMBADA)
        printf("perplexity: %.4f\n", r->perplexity);
    else
        printf("acc_norm: %.4f +/- %.4f\n", r->acc_norm, r->acc_norm_stderr);
}

static int zeroshot_session(cli_session *s, const eval_args *a, qkd_eval_task task)
{
    qkd_eval_set *set = NULL;
    int rc = load_set(s, task, a->data, &set);
    if (rc != CLI_EXIT_OK)
        return rc;
    double t0 = cli_now();
    qkd_eval_params p;
    qkd_eval_params_init(&p);
    p.limit = (size_t)a->limit;
    p.add_bos = !a->no_bos;
    p.progress = isatty(STDERR_FILENO) ? show_items : NULL;
    p.progress_user = &t0;
    qkd_eval_result r = {.size = sizeof r};
    qkd_status st = qkd_eval_run(s->ctx, s->model, s->tok, set, &p, &r);
    qkd_eval_set_free(set);
    if (st != QKD_OK)
        return cli_fail(s->ctx, st, a->data);
    print_result(&r);
    fprintf(stderr, "qkd: %zu items in %.3f s\n", r.n_items, cli_now() - t0);
    return CLI_EXIT_OK;
}

/* ---- the command ---- */

/* Which mode the options ask for: CLI_CONTINUE, or a usage error. */
static int check_args(const eval_args *a, qkd_eval_task *task)
{
    if (a->text && a->task)
        return cli_usage_error(&cli_cmd_eval, "--text (perplexity) and --task (zero-shot) "
                               "exclude each other");
    if (!a->text && !a->task)
        return cli_usage_error(&cli_cmd_eval, "missing --text FILE (perplexity) or --task T "
                               "--data FILE (zero-shot)");
    if (a->task) {
        if (qkd_eval_task_from_name(a->task, task) != QKD_OK)
            return cli_usage_error(&cli_cmd_eval, "unknown task '%s'", a->task);
        if (!a->data)
            return cli_usage_error(&cli_cmd_eval, "--task needs --data FILE");
        if (a->seq_given || a->batch_given)
            return cli_usage_error(&cli_cmd_eval, "--seq and --batch apply to --text only");
        if (a->limit < 0)
            return cli_usage_error(&cli_cmd_eval, "--limit %d is negative", a->limit);
        return CLI_CONTINUE;
    }
    if (a->data || a->limit || a->no_bos)
        return cli_usage_error(&cli_cmd_eval, "--data, --limit and --no-bos apply to --task "
                               "only");
    if (a->seq_given && (a->seq < 1 || a->seq > (1 << 20)))
        return cli_usage_error(&cli_cmd_eval, "--seq %d is outside 1..%d", a->seq, 1 << 20);
    if (a->batch < 1 || a->batch > 4096)
        return cli_usage_error(&cli_cmd_eval, "--batch %d is outside 1..4096", a->batch);
    return CLI_CONTINUE;
}

static int eval_run(int argc, char **argv)
{
    eval_args a = {.batch = 4};
    const cli_option opts[] = {
        {"--text", NULL, CLI_STRING, &a.text, NULL},
        {"--tokenizer", NULL, CLI_STRING, &a.tokenizer, NULL},
        {"--seq", NULL, CLI_INT, &a.seq, &a.seq_given},
        {"--batch", NULL, CLI_INT, &a.batch, &a.batch_given},
        {"--task", NULL, CLI_STRING, &a.task, NULL},
        {"--data", NULL, CLI_STRING, &a.data, NULL},
        {"--limit", NULL, CLI_INT, &a.limit, NULL},
        {"--no-bos", NULL, CLI_FLAG, &a.no_bos, NULL},
    };
    cli_common common;
    qkd_eval_task task = QKD_EVAL_PIQA;
    int rc = cli_parse(&cli_cmd_eval, argc, argv, opts, sizeof opts / sizeof opts[0], &common);
    if (rc == CLI_CONTINUE)
        rc = check_args(&a, &task);
    if (rc != CLI_CONTINUE)
        return rc;
    cli_session s;
    rc = cli_session_open(&s, &common, a.tokenizer, 1);
    if (rc != CLI_EXIT_OK)
        return rc;
    rc = a.task ? zeroshot_session(&s, &a, task) : eval_session(&s, &a);
    cli_session_close(&s);
    return rc;
}

const cli_command cli_cmd_eval = {
    .name = "eval",
    .summary = "perplexity over a text file, or zero-shot multiple-choice accuracy",
    .usage = "MODEL --text FILE [--tokenizer T] [--seq N] [--batch B]\n"
             "       qkd eval MODEL --task T --data FILE [--limit N] [--no-bos] [--tokenizer T]",
    .help = "  --text FILE      the text to score (UTF-8)\n"
            "  --tokenizer T    tokenizer file (default: the one inside MODEL)\n"
            "  --seq N          predicted tokens per window; windows of N+1 tokens do\n"
            "                   not overlap (default: the context, at most 256)\n"
            "  --batch B        windows per forward pass (default 4)\n"
            "  --task T         zero-shot task: piqa, hellaswag, arc_easy, arc_challenge,\n"
            "                   boolq, winogrande, lambada, or mc (any llm-foundry\n"
            "                   query/choices/gold file); prints acc and acc_norm\n"
            "                   (lambada: acc of the greedy continuation, perplexity)\n"
            "  --data FILE      the task's file: PIQA's valid.jsonl (labels beside it),\n"
            "                   llama.cpp's HellaSwag text (.bz2 is read through\n"
            "                   `bzip2 -dc`) or an llm-foundry .jsonl\n"
            "  --limit N        score the first N items only (default: all)\n"
            "  --no-bos         no BOS before the context, as lm-evaluation-harness's\n"
            "                   Hugging Face backend by default\n",
    .run = eval_run,
};
