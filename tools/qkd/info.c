/* qkd info MODEL: the config, parameter count, tensors and tokenizer, and
 * the backend that computes (--backend). */
#include <stdio.h>

#include "cli.h"

static void print_config(const qkd_model_config *c)
{
    printf("config:\n");
    printf("  dim %d\n", c->dim);
    printf("  hidden_dim %d\n", c->hidden_dim);
    printf("  n_layers %d\n", c->n_layers);
    printf("  n_heads %d\n", c->n_heads);
    printf("  n_kv_heads %d\n", c->n_kv_heads);
    printf("  vocab_size %d\n", c->vocab_size);
    printf("  max_seq_len %d\n", c->max_seq_len);
    printf("  rope_theta %g\n", c->rope_theta);
    printf("  norm_eps %g\n", c->norm_eps);
    printf("  tied_embeddings %s\n", c->tied_embeddings ? "yes" : "no");
}

static int print_tensors(const cli_session *s)
{
    int n = qkd_model_n_tensors(s->model);
    printf("tensors: %d\n", n);
    for (int i = 0; i < n; i++) {
        qkd_tensor_info t = {.size = sizeof t};
        qkd_status st = qkd_model_tensor_info(s->model, i, &t);
        if (st != QKD_OK)
            return cli_fail(s->ctx, st, "tensor info");
        if (t.n_dims == 1)
            printf("  %-28s [%lld]\n", t.name, (long long)t.shape[0]);
        else
            printf("  %-28s [%lld, %lld]\n", t.name, (long long)t.shape[0],
                   (long long)t.shape[1]);
    }
    return CLI_EXIT_OK;
}

static void print_tokenizer(const qkd_tokenizer *tok)
{
    if (!tok) {
        printf("tokenizer: none in the file (pass --tokenizer to generate or eval)\n");
        return;
    }
    printf("tokenizer: in the file, %d tokens, bos %d, eos %d\n", qkd_tokenizer_vocab_size(tok),
           (int)qkd_tokenizer_bos(tok), (int)qkd_tokenizer_eos(tok));
}

static int info_run(int argc, char **argv)
{
    cli_common common;
    int rc = cli_parse(&cli_cmd_info, argc, argv, NULL, 0, &common);
    if (rc != CLI_CONTINUE)
        return rc;
    cli_session s;
    rc = cli_session_open(&s, &common, NULL, 0);
    if (rc != CLI_EXIT_OK)
        return rc;
    printf("model: %s\n", common.model);
    printf("backend: %s\n", qkd_context_backend_name(s.ctx));
    print_config(&s.cfg);
    printf("parameters: %lld\n", (long long)qkd_model_n_params(s.model));
    rc = print_tensors(&s);
    if (rc == CLI_EXIT_OK)
        print_tokenizer(s.tok);
    cli_session_close(&s);
    return rc;
}

const cli_command cli_cmd_info = {
    .name = "info",
    .summary = "show a model's configuration, parameter count, tensors, tokenizer and backend",
    .usage = "MODEL",
    .help = "",
    .run = info_run,
};
