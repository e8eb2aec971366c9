/* The generation loop: llama2.c's generate() over qkd_model_decode, with
 * the text of each token handed to the caller. */
#include <string.h>

#include "core/core.h"
#include "model/model.h"
#include "qkd/generate.h"

void qkd_generate_params_init(qkd_generate_params *p)
{
    if (!p)
        return;
    p->size = sizeof *p;
    qkd_sampler_params_init(&p->sampler);
    p->steps = 256;
}

/* The prompt's ids with BOS first into *out (owned, qkd__free). An empty
 * prompt is BOS alone, without the space sentencepiece would prepend. */
static qkd_status encode_prompt(qkd_context *ctx, const qkd_tokenizer *tok,
                                const char *prompt, int32_t **out, size_t *n)
{
    size_t len = prompt ? strlen(prompt) : 0;
    /* BOS, the added leading space and one id per byte suffice for LLaMA
     * vocabularies; a second pass takes the exact count otherwise. */
    size_t cap = len + 2;
    for (int pass = 0; pass < 2; pass++) {
        int32_t *ids = qkd__calloc(ctx, cap, sizeof *ids);
        if (!ids)
            return qkd__error(ctx, QKD_ERR_NO_MEMORY, "generate: out of memory for the prompt");
        qkd_status st = QKD_OK;
        if (len == 0) {
            ids[0] = qkd_tokenizer_bos(tok);
            *n = 1;
        } else {
            st = qkd_tokenizer_encode(tok, prompt, len, QKD_ENCODE_BOS, ids, cap, n);
        }
        if (st == QKD_OK) {
            *out = ids;
            return QKD_OK;
        }
        qkd__free(ctx, ids);
        if (st != QKD_ERR_RANGE)
            return st;
        cap = *n;
    }
    return qkd__error(ctx, QKD_ERR_RANGE, "generate: the prompt's token count changed");
}

/* Everything one run needs, freed together. */
typedef struct gen_run {
    qkd_model *model;
    const qkd_tokenizer *tok;
    qkd_sampler *sampler;
    float *logits;
    int32_t *prompt;
    size_t n_prompt;
    int steps;
} gen_run;

static qkd_status check_args(qkd_context *ctx, const qkd_model *model,
                             const qkd_tokenizer *tok, const qkd_generate_params *p,
                             qkd_model_config *cfg)
{
    if (!tok || !p)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "generate: NULL tokenizer or params");
    if (p->size < sizeof *p)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "generate: params size field not set (use qkd_generate_params_init)");
    if (p->steps < 0)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "generate: steps %d is negative", p->steps);
    qkd_model_config_init(cfg);
    qkd_status st = qkd_model_get_config(model, cfg);
    if (st != QKD_OK)
        return st;
    if (qkd_tokenizer_vocab_size(tok) != cfg->vocab_size)
        return qkd__error(ctx, QKD_ERR_SHAPE,
                          "generate: tokenizer has %d tokens but the model's vocabulary is %d",
                          qkd_tokenizer_vocab_size(tok), cfg->vocab_size);
    return QKD_OK;
}

static qkd_status run_loop(qkd_context *ctx, gen_run *r, qkd_token_fn on_token, void *user,
                           int *n_generated)
{
    const int32_t bos = qkd_tokenizer_bos(r->tok);
    const int32_t eos = qkd_tokenizer_eos(r->tok);
    int32_t token = r->prompt[0];
    for (int pos = 0; pos < r->steps; pos++) {
        qkd_status st = qkd_model_decode(r->model, token, pos, r->logits);
        if (st != QKD_OK)
            return st;
        int32_t next;
        if ((size_t)pos + 1 < r->n_prompt) {
            next = r->prompt[pos + 1];
        } else {
            st = qkd_sampler_sample(r->sampler, r->logits, &next);
            if (st != QKD_OK)
                return st;
        }
        if (next == bos || next == eos)
            break;
        size_t len = 0;
        const char *text = qkd_tokenizer_decode(r->tok, token, next, &len);
        if (!text)
            return qkd__error(ctx, QKD_ERR_RANGE, "generate: token %d at position %d has no text",
                              (int)next, pos + 1);
        if (n_generated)
            (*n_generated)++;
        if (on_token && on_token(user, next, text, len))
            return qkd__error(ctx, QKD_ERR_CANCELLED,
                              "generate: stopped by the token callback at position %d", pos + 1);
        token = next;
    }
    return QKD_OK;
}

qkd_status qkd_generate(qkd_model *model, const qkd_tokenizer *tok, const char *prompt,
                        const qkd_generate_params *p, qkd_token_fn on_token, void *user,
                        int *n_generated)
{
    if (!model)
        return QKD_ERR_INVALID_ARG;
    if (n_generated)
        *n_generated = 0;
    qkd_context *ctx = qkd__model_context(model);
    qkd_model_config cfg;
    qkd_status st = check_args(ctx, model, tok, p, &cfg);
    if (st != QKD_OK)
        return st;

    gen_run r = {
        .model = model,
        .tok = tok,
        .steps = p->steps == 0 || p->steps > cfg.max_seq_len ? cfg.max_seq_len : p->steps,
    };
    st = qkd_sampler_create(ctx, &p->sampler, cfg.vocab_size, &r.sampler);
    if (st == QKD_OK)
        st = encode_prompt(ctx, tok, prompt, &r.prompt, &r.n_prompt);
    if (st == QKD_OK) {
        r.logits = qkd__calloc(ctx, (size_t)cfg.vocab_size, sizeof *r.logits);
        if (!r.logits)
            st = qkd__error(ctx, QKD_ERR_NO_MEMORY, "generate: out of memory for the logits");
    }
    if (st == QKD_OK)
        st = run_loop(ctx, &r, on_token, user, n_generated);
    qkd__free(ctx, r.logits);
    qkd__free(ctx, r.prompt);
    qkd_sampler_free(r.sampler);
    return st;
}
