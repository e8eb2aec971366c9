/* qkd eval MODEL --text FILE: perplexity over non-overlapping windows. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"

typedef struct eval_args {
    const char *text;
    const char *tokenizer;
    int seq;
    int seq_given;
    int batch;
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

static int eval_run(int argc, char **argv)
{
    eval_args a = {.batch = 4};
    const cli_option opts[] = {
        {"--text", NULL, CLI_STRING, &a.text, NULL},
        {"--tokenizer", NULL, CLI_STRING, &a.tokenizer, NULL},
        {"--seq", NULL, CLI_INT, &a.seq, &a.seq_given},
        {"--batch", NULL, CLI_INT, &a.batch, NULL},
    };
    cli_common common;
    int rc = cli_parse(&cli_cmd_eval, argc, argv, opts, sizeof opts / sizeof opts[0], &common);
    if (rc != CLI_CONTINUE)
        return rc;
    if (!a.text)
        return cli_usage_error(&cli_cmd_eval, "missing --text FILE");
    if (a.seq_given && (a.seq < 1 || a.seq > (1 << 20)))
        return cli_usage_error(&cli_cmd_eval, "--seq %d is outside 1..%d", a.seq, 1 << 20);
    if (a.batch < 1 || a.batch > 4096)
        return cli_usage_error(&cli_cmd_eval, "--batch %d is outside 1..4096", a.batch);
    cli_session s;
    rc = cli_session_open(&s, &common, a.tokenizer, 1);
    if (rc != CLI_EXIT_OK)
        return rc;
    rc = eval_session(&s, &a);
    cli_session_close(&s);
    return rc;
}

const cli_command cli_cmd_eval = {
    .name = "eval",
    .summary = "perplexity of a model over a text file",
    .usage = "MODEL --text FILE [--tokenizer T] [--seq N] [--batch B]",
    .help = "  --text FILE      the text to score (UTF-8)\n"
            "  --tokenizer T    tokenizer file (default: the one inside MODEL)\n"
            "  --seq N          predicted tokens per window; windows of N+1 tokens do\n"
            "                   not overlap (default: the context, at most 256)\n"
            "  --batch B        windows per forward pass (default 4)\n",
    .run = eval_run,
};
