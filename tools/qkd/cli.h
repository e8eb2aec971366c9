/* Shared pieces of the qkd tool: option parsing, opening a model and its
 * tokenizer, error reporting. The tool uses the public API only. */
#ifndef QKD_TOOL_CLI_H
#define QKD_TOOL_CLI_H

#include <stddef.h>
#include <stdint.h>

#include <qkd/qkd.h>

/* Exit statuses. */
enum {
    CLI_EXIT_OK = 0,
    CLI_EXIT_FAIL = 1,  /* a library error: bad file, out of memory... */
    CLI_EXIT_USAGE = 2, /* bad command line */
    CLI_CONTINUE = -1   /* cli_parse: go on with the command */
};

typedef struct cli_command {
    const char *name;
    const char *summary; /* one line for `qkd help` */
    const char *usage;   /* "MODEL [--x N]..." after "qkd <name> " */
    const char *help;    /* the command's own options, one per line */
    int (*run)(int argc, char **argv); /* argv[0] is the command name */
    int no_model;        /* 1: takes no MODEL argument */
} cli_command;

extern const cli_command cli_cmd_info;
extern const cli_command cli_cmd_generate;
extern const cli_command cli_cmd_eval;
extern const cli_command cli_cmd_distill;
extern const cli_command cli_cmd_report;
extern const cli_command cli_cmd_export;
extern const cli_command cli_cmd_demo;

/* The subcommand called name, or NULL. */
const cli_command *cli_find_command(const char *name);

typedef enum cli_kind {
    CLI_STRING, /* const char ** */
    CLI_INT,    /* int *, any value int holds; callers check ranges */
    CLI_FLOAT,  /* float *, finite */
    CLI_U64,    /* uint64_t *, unsigned decimal */
    CLI_FLAG    /* int *, set to 1; takes no value */
} cli_kind;

typedef struct cli_option {
    const char *name;  /* "--prompt" */
    const char *alias; /* "-n", or NULL */
    cli_kind kind;
    void *value;
    int *seen;         /* set to 1 when given, or NULL */
} cli_option;

/* What every subcommand takes: one MODEL path (unless no_model), --threads,
 * --backend. */
typedef struct cli_common {
    const char *model;
    int threads;             /* 0: all cores */
    qkd_backend_kind backend;
} cli_common;

/* Parse argv[1..argc) against opts plus the common options and --help.
 * Returns CLI_CONTINUE, or the status to exit with: CLI_EXIT_OK after
 * printing help, CLI_EXIT_USAGE after printing what was wrong. */
int cli_parse(const cli_command *cmd, int argc, char **argv, const cli_option *opts,
              size_t n_opts, cli_common *common);

/* Report a bad command line for cmd (printf format) and return
 * CLI_EXIT_USAGE. */
int cli_usage_error(const cli_command *cmd, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Print cmd's help (or the tool's when cmd is NULL) to stdout. */
void cli_print_help(const cli_command *cmd);

/* A context, a loaded model and, when a tokenizer path is given or the
 * model file carries one, a tokenizer. */
typedef struct cli_session {
    qkd_context *ctx;
    qkd_model *model;
    qkd_tokenizer *own_tok;   /* loaded from --tokenizer */
    const qkd_tokenizer *tok; /* own_tok, the model's, or NULL */
    qkd_model_config cfg;
} cli_session;

/* A context with the common options' threads and backend; on failure the
 * library's reason (e.g. no CUDA device) on stderr and CLI_EXIT_FAIL. */
int cli_context_open(const cli_common *c, qkd_context **out);

/* Open c->model (and tok_path, if not NULL) in a context of c's (see
 * cli_context_open). With need_tok, a missing tokenizer is an error.
 * Returns CLI_EXIT_OK or CLI_EXIT_FAIL after printing the reason; the
 * session is closed on failure. */
int cli_session_open(cli_session *s, const cli_common *c, const char *tok_path, int need_tok);
void cli_session_close(cli_session *s);

/* Make the model accept sequences of n tokens, widening max_seq_len with a
 * note on stderr when n exceeds it. CLI_EXIT_OK or CLI_EXIT_FAIL. */
int cli_session_fit(cli_session *s, int n);

/* Print "qkd: what: QKD_ERR_X: <last error>" and return CLI_EXIT_FAIL. */
int cli_fail(qkd_context *ctx, qkd_status st, const char *what);

/* Monotonic seconds, for rates and ETAs. */
double cli_now(void);

#endif
