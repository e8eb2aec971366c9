/* qkd generate MODEL: llama2.c's `run`, printing exactly what it prints. */
#include <ctype.h>
#include <stdio.h>
#include <time.h>

#include "cli.h"

/* llama2.c's safe_printf: a lone byte that is neither printable nor
 * whitespace (a stray piece of a UTF-8 sequence, a control byte) is
 * dropped; everything else is written as it is. */
static int print_piece(void *user, int32_t token, const char *text, size_t len)
{
    (void)user;
    (void)token;
    if (len == 0)
        return 0;
    if (len == 1 && !isprint((unsigned char)text[0]) && !isspace((unsigned char)text[0]))
        return 0;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    return 0;
}

typedef struct gen_args {
    const char *tokenizer;
    const char *prompt;
    int steps;
    float temperature;
    float top_p;
    uint64_t seed;
    int seed_given;
} gen_args;

static int check_args(gen_args *a)
{
    if (a->steps < 0)
        return cli_usage_error(&cli_cmd_generate, "-n %d is negative", a->steps);
    if (a->temperature < 0.0f)
        return cli_usage_error(&cli_cmd_generate, "--temp %g is negative", a->temperature);
    if (a->top_p < 0.0f || a->top_p > 1.0f)
        return cli_usage_error(&cli_cmd_generate, "--top-p %g is outside 0..1", a->top_p);
    if (a->top_p == 0.0f) /* llama2.c's "-p 0": nucleus sampling off */
        a->top_p = 1.0f;
    if (!a->seed_given) /* llama2.c seeds from the clock by default */
        a->seed = (uint64_t)time(NULL);
    return CLI_CONTINUE;
}

static int run_generation(cli_session *s, const gen_args *a)
{
    int rc = cli_session_fit(s, a->steps);
    if (rc != CLI_EXIT_OK)
        return rc;
    qkd_generate_params gp;
    qkd_generate_params_init(&gp);
    gp.steps = a->steps;
    gp.sampler.temperature = a->temperature;
    gp.sampler.top_p = a->top_p;
    gp.sampler.seed = a->seed;
    int n = 0;
    double t0 = cli_now();
    qkd_status st = qkd_generate(s->model, s->tok, a->prompt, &gp, print_piece, NULL, &n);
    printf("\n");
    fflush(stdout);
    if (st != QKD_OK)
        return cli_fail(s->ctx, st, "generate");
    double dt = cli_now() - t0;
    fprintf(stderr, "qkd: %d tokens in %.3f s, %.1f tok/s (seed %llu)\n", n, dt,
            dt > 0 ? n / dt : 0.0, (unsigned long long)a->seed);
    return CLI_EXIT_OK;
}

static int generate_run(int argc, char **argv)
{
    gen_args a = {.steps = 256, .temperature = 1.0f, .top_p = 0.9f};
    const cli_option opts[] = {
        {"--tokenizer", NULL, CLI_STRING, &a.tokenizer, NULL},
        {"--prompt", "-i", CLI_STRING, &a.prompt, NULL},
        {"--steps", "-n", CLI_INT, &a.steps, NULL},
        {"--temp", "-t", CLI_FLOAT, &a.temperature, NULL},
        {"--top-p", "-p", CLI_FLOAT, &a.top_p, NULL},
        {"--seed", "-s", CLI_U64, &a.seed, &a.seed_given},
    };
    cli_common common;
    int rc = cli_parse(&cli_cmd_generate, argc, argv, opts, sizeof opts / sizeof opts[0],
                       &common);
    if (rc == CLI_CONTINUE)
        rc = check_args(&a);
    if (rc != CLI_CONTINUE)
        return rc;
    cli_session s;
    rc = cli_session_open(&s, &common, a.tokenizer, 1);
    if (rc != CLI_EXIT_OK)
        return rc;
    rc = run_generation(&s, &a);
    cli_session_close(&s);
    return rc;
}

const cli_command cli_cmd_generate = {
    .name = "generate",
    .summary = "generate text from a prompt (llama2.c's run, same output)",
    .usage = "MODEL [--tokenizer T] [--prompt P] [-n N] [--temp X] [--top-p P] [--seed S]",
    .help = "  --tokenizer T    tokenizer file (default: the one inside MODEL)\n"
            "  -i, --prompt P   text to start from (default: none)\n"
            "  -n, --steps N    positions to run, prompt included (default 256;\n"
            "                   0: the model's context; more widens the context)\n"
            "  -t, --temp X     temperature, 0 for greedy (default 1.0)\n"
            "  -p, --top-p P    nucleus sampling threshold, 0 or 1 for off (default 0.9)\n"
            "  -s, --seed S     random seed (default: the clock; 0 counts as 1)\n",
    .run = generate_run,
};
