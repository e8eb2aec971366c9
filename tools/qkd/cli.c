/* Option parsing and model/tokenizer opening shared by the subcommands. */
#include "cli.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char common_help[] =
    "  --threads N      worker threads (default: one per core)\n"
    "  --backend B      compute backend: ref, simd, cuda or auto (default auto: simd\n"
    "                   where built in, else ref; cuda only when asked for)\n"
    "  -h, --help       show this help\n";

static const cli_command *const commands[] = {&cli_cmd_info, &cli_cmd_generate,
                                               &cli_cmd_eval, &cli_cmd_distill,
                                               &cli_cmd_report, &cli_cmd_export,
                                               &cli_cmd_demo};
enum { N_COMMANDS = sizeof commands / sizeof commands[0] };

const cli_command *cli_find_command(const char *name)
{
    for (size_t i = 0; i < N_COMMANDS; i++)
        if (strcmp(commands[i]->name, name) == 0)
            return commands[i];
    return NULL;
}

void cli_print_help(const cli_command *cmd)
{
    if (!cmd) {
        printf("usage: qkd COMMAND [options]\n\ncommands:\n");
        for (size_t i = 0; i < N_COMMANDS; i++)
            printf("  %-10s %s\n", commands[i]->name, commands[i]->summary);
        printf("  %-10s %s\n", "help", "help on a command: qkd help COMMAND");
        printf("\nqkd --version prints the library version.\n");
        return;
    }
    printf("usage: qkd %s %s\n%s\n\noptions:\n%s%s", cmd->name, cmd->usage, cmd->summary,
           cmd->help, common_help);
}

int cli_usage_error(const cli_command *cmd, const char *fmt, ...)
{
    const char *name = cmd ? cmd->name : "";
    fprintf(stderr, "qkd%s%s: ", *name ? " " : "", name);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nTry 'qkd %s%s--help'.\n", name, *name ? " " : "");
    return CLI_EXIT_USAGE;
}

/* ---- numbers: the whole string must be the number ---------------------- */

static int parse_int(const char *s, int *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || errno || v < -2147483647L - 1 || v > 2147483647L)
        return -1;
    *out = (int)v;
    return 0;
}

static int parse_float(const char *s, float *out)
{
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (end == s || *end || errno || !isfinite(v))
        return -1;
    *out = v;
    return 0;
}

static int parse_u64(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    if (*s < '0' || *s > '9') /* strtoull would accept "-1" */
        return -1;
    unsigned long long v = strtoull(s, &end, 10);
    if (*end || errno)
        return -1;
    *out = (uint64_t)v;
    return 0;
}

static int parse_backend(const char *s, qkd_backend_kind *out)
{
    static const struct {
        const char *name;
        qkd_backend_kind kind;
    } kinds[] = {{"auto", QKD_BACKEND_AUTO},
                 {"ref", QKD_BACKEND_REF},
                 {"simd", QKD_BACKEND_SIMD},
                 {"cuda", QKD_BACKEND_CUDA}};
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
        if (strcmp(s, kinds[i].name) == 0) {
            *out = kinds[i].kind;
            return 0;
        }
    return -1;
}

static int store_value(const cli_option *o, const char *v)
{
    switch (o->kind) {
    case CLI_STRING:
        *(const char **)o->value = v;
        return 0;
    case CLI_INT:
        return parse_int(v, o->value);
    case CLI_FLOAT:
        return parse_float(v, o->value);
    case CLI_U64:
        return parse_u64(v, o->value);
    case CLI_FLAG:
        *(int *)o->value = 1;
        return 0;
    }
    return -1;
}

static const char *kind_name(cli_kind k)
{
    switch (k) {
    case CLI_INT:
        return "an integer";
    case CLI_FLOAT:
        return "a finite number";
    case CLI_U64:
        return "an unsigned integer";
    default:
        return "a value";
    }
}

/* --- option table lookup; "--name=value" splits at '=' ------------------- */

static const cli_option *find_option(const cli_option *opts, size_t n, const char *arg,
                                     size_t arg_len)
{
    for (size_t i = 0; i < n; i++) {
        const char *names[2] = {opts[i].name, opts[i].alias};
        for (int k = 0; k < 2; k++)
            if (names[k] && strlen(names[k]) == arg_len && !strncmp(names[k], arg, arg_len))
                return &opts[i];
    }
    return NULL;
}

int cli_parse(const cli_command *cmd, int argc, char **argv, const cli_option *opts,
              size_t n_opts, cli_common *common)
{
    const char *backend = "auto";
    *common = (cli_common){.threads = 0, .backend = QKD_BACKEND_AUTO};
    const cli_option shared[] = {
        {"--threads", NULL, CLI_INT, &common->threads, NULL},
        {"--backend", NULL, CLI_STRING, &backend, NULL},
    };
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (!strcmp(arg, "-h") || !strcmp(arg, "--help")) {
            cli_print_help(cmd);
            return CLI_EXIT_OK;
        }
        if (arg[0] != '-' || arg[1] == '\0') {
            if (common->model || cmd->no_model)
                return cli_usage_error(cmd, "unexpected argument '%s'", arg);
            common->model = arg;
            continue;
        }
        const char *eq = strncmp(arg, "--", 2) == 0 ? strchr(arg, '=') : NULL;
        size_t name_len = eq ? (size_t)(eq - arg) : strlen(arg);
        const cli_option *o = find_option(opts, n_opts, arg, name_len);
        if (!o)
            o = find_option(shared, sizeof shared / sizeof shared[0], arg, name_len);
        if (!o)
            return cli_usage_error(cmd, "unknown option '%.*s'", (int)name_len, arg);
        if (o->kind == CLI_FLAG && eq)
            return cli_usage_error(cmd, "option '%s' takes no value", o->name);
        const char *value = o->kind == CLI_FLAG ? ""
                            : eq                ? eq + 1
                                                : (i + 1 < argc ? argv[++i] : NULL);
        if (!value)
            return cli_usage_error(cmd, "option '%s' needs a value", o->name);
        if (store_value(o, value) != 0)
            return cli_usage_error(cmd, "option '%s' wants %s, not '%s'", o->name,
                                   kind_name(o->kind), value);
        if (o->seen)
            *o->seen = 1;
    }
    if (!common->model && !cmd->no_model)
        return cli_usage_error(cmd, "missing MODEL");
    if (common->threads < 0 || common->threads > 1024)
        return cli_usage_error(cmd, "--threads %d is outside 0..1024", common->threads);
    if (parse_backend(backend, &common->backend) != 0)
        return cli_usage_error(cmd, "--backend wants ref, simd, cuda or auto, not '%s'", backend);
    return CLI_CONTINUE;
}

/* ---- sessions ------------------------------------------------------------ */

int cli_fail(qkd_context *ctx, qkd_status st, const char *what)
{
    fprintf(stderr, "qkd: %s: %s: %s\n", what, qkd_status_name(st),
            ctx ? qkd_context_last_error(ctx) : qkd_status_str(st));
    return CLI_EXIT_FAIL;
}

void cli_session_close(cli_session *s)
{
    qkd_tokenizer_free(s->own_tok);
    qkd_model_free(s->model);
    qkd_context_free(s->ctx);
    memset(s, 0, sizeof *s);
}

/* Why the last context could not be made: the library logs the reason,
 * as no context is left to hold it (the tool calls the library from one
 * thread). */
static char context_reason[256];

static void keep_reason(void *user, qkd_log_level level, const char *msg)
{
    (void)user;
    if (level == QKD_LOG_ERROR)
        snprintf(context_reason, sizeof context_reason, "%s", msg);
}

int cli_context_open(const cli_common *c, qkd_context **out)
{
    qkd_context_params cp;
    qkd_context_params_init(&cp);
    cp.n_threads = c->threads;
    cp.backend = c->backend;
    cp.log = keep_reason;
    cp.log_level = QKD_LOG_ERROR;
    context_reason[0] = '\0';
    qkd_status st = qkd_context_create(&cp, out);
    if (st == QKD_OK)
        return CLI_EXIT_OK;
    fprintf(stderr, "qkd: cannot create a context: %s: %s\n", qkd_status_name(st),
            context_reason[0] ? context_reason : qkd_status_str(st));
    return CLI_EXIT_FAIL;
}

static qkd_status open_parts(cli_session *s, const cli_common *c, const char *tok_path,
                             const char **what)
{
    *what = c->model;
    qkd_status st = qkd_model_load(s->ctx, c->model, &s->model);
    if (st != QKD_OK)
        return st;
    qkd_model_config_init(&s->cfg);
    st = qkd_model_get_config(s->model, &s->cfg);
    if (st != QKD_OK || !tok_path)
        return st;
    *what = tok_path;
    return qkd_tokenizer_load(s->ctx, tok_path, &s->own_tok);
}

int cli_session_open(cli_session *s, const cli_common *c, const char *tok_path, int need_tok)
{
    memset(s, 0, sizeof *s);
    if (cli_context_open(c, &s->ctx) != CLI_EXIT_OK)
        return CLI_EXIT_FAIL;
    const char *what = "";
    qkd_status st = open_parts(s, c, tok_path, &what);
    if (st != QKD_OK) {
        int rc = cli_fail(s->ctx, st, what);
        cli_session_close(s);
        return rc;
    }
    s->tok = s->own_tok ? s->own_tok : qkd_model_tokenizer(s->model);
    if (need_tok && !s->tok) {
        fprintf(stderr, "qkd: %s carries no tokenizer; name one with --tokenizer FILE\n",
                c->model);
        cli_session_close(s);
        return CLI_EXIT_FAIL;
    }
    return CLI_EXIT_OK;
}

int cli_session_fit(cli_session *s, int n)
{
    if (n <= s->cfg.max_seq_len)
        return CLI_EXIT_OK;
    fprintf(stderr, "qkd: note: widening the model's context from %d to %d positions\n",
            s->cfg.max_seq_len, n);
    qkd_status st = qkd_model_set_max_seq_len(s->model, n);
    if (st != QKD_OK)
        return cli_fail(s->ctx, st, "cannot widen the context");
    s->cfg.max_seq_len = n;
    return CLI_EXIT_OK;
}

double cli_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
