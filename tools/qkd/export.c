/* qkd export STUDENT --to gguf|safetensors --format F --out PATH: write a
 * loaded model for deployment, reporting the tensors a block format
 * could not hold. */
#include <stdio.h>
#include <string.h>

#include "cli.h"

typedef struct export_args {
    const char *to;
    const char *format;
    const char *embd_format;
    const char *tokenizer;
    const char *name;
    const char *out;
    int gguf;                /* --to gguf */
    qkd_gguf_type type;      /* gguf: --format */
    qkd_gguf_type embd_type; /* gguf: --embd-format */
    qkd_save_dtype dtype;    /* safetensors: --format */
} export_args;

/* The --format names of GGUF: every qkd_gguf_type but AS_TRAINED (a file
 * carries no quantizer binding, so its weights are simply float). */
static int parse_gguf_type(const char *opt, const char *name, qkd_gguf_type *out)
{
    if (qkd_gguf_type_from_name(name, out) != QKD_OK || *out == QKD_GGUF_AS_TRAINED)
        return cli_usage_error(&cli_cmd_export,
                               "%s wants f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, "
                               "q4_k, q6_k or tq2_0, not '%s'",
                               opt, name);
    return CLI_CONTINUE;
}

static int parse_save_dtype(const char *name, qkd_save_dtype *out)
{
    static const struct {
        const char *name;
        qkd_save_dtype dtype;
    } dtypes[] = {{"f32", QKD_SAVE_F32}, {"f16", QKD_SAVE_F16}, {"bf16", QKD_SAVE_BF16}};
    for (size_t i = 0; i < sizeof dtypes / sizeof dtypes[0]; i++) {
        if (strcmp(dtypes[i].name, name) == 0) {
            *out = dtypes[i].dtype;
            return CLI_CONTINUE;
        }
    }
    return cli_usage_error(&cli_cmd_export,
                           "--to safetensors takes --format f32, f16 or bf16, not '%s'", name);
}

/* One line per tensor stored in another type than asked for. */
static int report_fallbacks(const cli_session *s, const qkd_gguf_params *p)
{
    int n = qkd_model_n_tensors(s->model), fell = 0;
    for (int i = 0; i < n; i++) {
        qkd_tensor_info info = {.size = sizeof info};
        qkd_gguf_type type;
        qkd_status st = qkd_model_tensor_info(s->model, i, &info);
        if (st == QKD_OK)
            st = qkd_gguf_tensor_type(s->model, i, p, &type);
        if (st != QKD_OK)
            return cli_fail(s->ctx, st, "export");
        int embd = info.kind == QKD_TENSOR_TOKEN_EMBD || info.kind == QKD_TENSOR_OUTPUT;
        qkd_gguf_type asked = embd ? p->embd_type : p->type;
        if (info.n_dims == 2 && type != asked) {
            fprintf(stderr, "qkd: %s: rows of %lld values do not fill %s blocks: written as %s\n",
                    info.name, (long long)info.shape[1], qkd_gguf_type_name(asked),
                    qkd_gguf_type_name(type));
            fell++;
        }
    }
    if (fell)
        fprintf(stderr, "qkd: %d tensor%s fell back to another type\n", fell,
                fell == 1 ? "" : "s");
    return CLI_EXIT_OK;
}

static int export_gguf(cli_session *s, const export_args *a)
{
    qkd_gguf_params p;
    qkd_gguf_params_init(&p);
    p.type = a->type;
    p.embd_type = a->embd_type;
    p.name = a->name;
    p.tokenizer = s->tok;
    int rc = report_fallbacks(s, &p);
    if (rc != CLI_EXIT_OK)
        return rc;
    qkd_status st = qkd_model_save_gguf(s->model, a->out, &p);
    if (st != QKD_OK)
        return cli_fail(s->ctx, st, a->out);
    fprintf(stderr, "qkd: wrote %s (%s%s)\n", a->out, qkd_gguf_type_name(p.type),
            s->tok ? ", with the tokenizer" : ", no tokenizer");
    return CLI_EXIT_OK;
}

static int export_safetensors(cli_session *s, const export_args *a)
{
    qkd_safetensors_params p;
    qkd_safetensors_params_init(&p);
    p.dtype = a->dtype;
    qkd_status st = qkd_model_save_safetensors(s->model, a->out, &p);
    if (st != QKD_OK)
        return cli_fail(s->ctx, st, a->out);
    fprintf(stderr, "qkd: wrote %s/\n", a->out);
    return CLI_EXIT_OK;
}

/* Check the options before any file is read. */
static int check_args(export_args *a)
{
    if (!a->out)
        return cli_usage_error(&cli_cmd_export, "missing --out");
    a->gguf = strcmp(a->to, "gguf") == 0;
    if (!a->gguf && strcmp(a->to, "safetensors") != 0)
        return cli_usage_error(&cli_cmd_export, "--to wants gguf or safetensors, not '%s'",
                               a->to);
    if (!a->gguf && (a->embd_format || a->tokenizer || a->name))
        return cli_usage_error(&cli_cmd_export,
                               "--embd-format, --tokenizer and --name are for --to gguf");
    if (!a->gguf)
        return parse_save_dtype(a->format, &a->dtype);
    int rc = parse_gguf_type("--format", a->format, &a->type);
    if (rc == CLI_CONTINUE && a->embd_format)
        rc = parse_gguf_type("--embd-format", a->embd_format, &a->embd_type);
    return rc;
}

static int export_run(int argc, char **argv)
{
    export_args a = {.to = "gguf", .format = "f32", .embd_type = QKD_GGUF_F32};
    const cli_option opts[] = {
        {"--to", NULL, CLI_STRING, &a.to, NULL},
        {"--format", "-f", CLI_STRING, &a.format, NULL},
        {"--embd-format", NULL, CLI_STRING, &a.embd_format, NULL},
        {"--tokenizer", NULL, CLI_STRING, &a.tokenizer, NULL},
        {"--name", NULL, CLI_STRING, &a.name, NULL},
        {"--out", "-o", CLI_STRING, &a.out, NULL},
    };
    cli_common common;
    int rc = cli_parse(&cli_cmd_export, argc, argv, opts, sizeof opts / sizeof opts[0],
                       &common);
    if (rc == CLI_CONTINUE)
        rc = check_args(&a);
    if (rc != CLI_CONTINUE)
        return rc;
    cli_session s;
    rc = cli_session_open(&s, &common, a.tokenizer, 0);
    if (rc != CLI_EXIT_OK)
        return rc;
    rc = a.gguf ? export_gguf(&s, &a) : export_safetensors(&s, &a);
    cli_session_close(&s);
    return rc;
}

const cli_command cli_cmd_export = {
    .name = "export",
    .summary = "write a model as GGUF (llama.cpp) or Hugging Face safetensors",
    .usage = "STUDENT --out PATH [--to gguf|safetensors] [--format F] [--embd-format F]\n"
             "          [--tokenizer T] [--name N]",
    .help = "  --out, -o PATH   the GGUF file, or the safetensors folder\n"
            "  --to gguf|safetensors\n"
            "                   the file format (default gguf)\n"
            "  -f, --format F   gguf: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1,\n"
            "                   q4_k, q6_k or tq2_0 for the attention and MLP weights;\n"
            "                   safetensors: f32, f16 or bf16 for every tensor\n"
            "                   (default f32). Rows a block does not fill fall back\n"
            "                   (q4_k, q6_k, tq2_0 to q8_0, else f16): listed on stderr\n"
            "  --embd-format F  gguf: the type of token_embd and output (default f32)\n"
            "  --tokenizer T    gguf: the vocabulary to store (default: STUDENT's own)\n"
            "  --name N         gguf: general.name (default libqkd)\n",
    .run = export_run,
};
