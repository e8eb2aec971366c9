/* Log-likelihood scoring of (context, continuation) pairs, as
 * lm-evaluation-harness computes it, and the accuracy metrics over a set.
 * The choices of an item go through the model as one batch, each padded
 * at its end: the model is causal, so padding never changes the logits
 * of the positions scored. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "eval/eval_impl.h"

#define T_STEP 16 /* batch lengths are rounded up to this, to reuse activations */

/* One choice as token ids: seq[0..n) is what the model reads, and its
 * last n_cont positions predict the continuation's tokens, the one at
 * position p predicting target[p]. */
typedef struct scored_seq {
    int32_t *ids;   /* owned: prefix + whole text; seq = ids + skip */
    size_t n_ids;
    size_t skip;    /* tokens dropped on the left to fit max_seq_len */
    int n_cont;
} scored_seq;

typedef struct scorer {
    qkd_context *ctx;
    qkd_model *model;
    const qkd_tokenizer *tok;
    qkd_model_config cfg;
    int add_bos;
} scorer;

/* ---- tokens ---- */

/* text[0..len) encoded (no BOS) into *ids (owned, free()). */
static qkd_status encode(const scorer *sc, const char *text, size_t len, int32_t **ids,
                         size_t *n)
{
    size_t cap = len + 2; /* enough for LLaMA vocabularies; else a second pass */
    qkd_status st = QKD_ERR_RANGE;
    *ids = NULL;
    for (int pass = 0; pass < 2 && st == QKD_ERR_RANGE; pass++) {
        free(*ids);
        *ids = malloc((cap ? cap : 1) * sizeof **ids);
        if (!*ids)
            return qkd_context_set_error(sc->ctx, QKD_ERR_NO_MEMORY, "eval: out of memory");
        st = qkd_tokenizer_encode(sc->tok, text, len, 0, *ids, cap, n);
        cap = *n;
    }
    if (st != QKD_OK) {
        free(*ids);
        *ids = NULL;
    }
    return st;
}

/* Python's str.isspace() for the ASCII white space lm-eval strips. */
static size_t trailing_space(const char *s, size_t n)
{
    size_t k = 0;
    while (k < n && strchr(" \t\n\r\f\v", s[n - 1 - k]))
        k++;
    return k;
}

/* lm-eval's _encode_pair: the context's trailing white space moves to the
 * continuation; the continuation's tokens are those of the whole text
 * after as many tokens as the context alone has. An empty context, or
 * add_bos, puts BOS first. */
static qkd_status encode_pair(const scorer *sc, const char *context, const char *continuation,
                              scored_seq *out)
{
    size_t n_ctx_text = strlen(context), n_cont_text = strlen(continuation);
    n_ctx_text -= trailing_space(context, n_ctx_text);
    size_t n_whole = strlen(context) + n_cont_text;
    char *whole = malloc(n_whole + 1);
    if (!whole)
        return qkd_context_set_error(sc->ctx, QKD_ERR_NO_MEMORY, "eval: out of memory");
    memcpy(whole, context, strlen(context));
    memcpy(whole + strlen(context), continuation, n_cont_text + 1);
    int32_t *ctx_ids = NULL, *whole_ids = NULL;
    size_t n_ctx = 0, n_all = 0;
    qkd_status st = n_ctx_text ? encode(sc, context, n_ctx_text, &ctx_ids, &n_ctx) : QKD_OK;
    if (st == QKD_OK)
        st = encode(sc, whole, n_whole, &whole_ids, &n_all);
    free(whole);
    free(ctx_ids);
    if (st == QKD_OK && n_all <= n_ctx)
        st = qkd_context_set_error(sc->ctx, QKD_ERR_INVALID_ARG, "eval: continuation '%.40s' "
                                   "adds no token to its context", continuation);
    if (st != QKD_OK) {
        free(whole_ids);
        return st;
    }
    size_t prefix = sc->add_bos || n_ctx_text == 0;
    out->ids = malloc((n_all + prefix) * sizeof *out->ids);
    if (!out->ids) {
        free(whole_ids);
        return qkd_context_set_error(sc->ctx, QKD_ERR_NO_MEMORY, "eval: out of memory");
    }
    out->ids[0] = qkd_tokenizer_bos(sc->tok);
    memcpy(out->ids + prefix, whole_ids, n_all * sizeof *whole_ids);
    free(whole_ids);
    out->n_ids = n_all + prefix;
    out->n_cont = (int)(n_all - n_ctx);
    return QKD_OK;
}

/* Drop tokens on the left so that the model reads at most max_seq_len
 * (lm-eval keeps the last max_length + 1 tokens). */
static qkd_status fit(const scorer *sc, scored_seq *s)
{
    size_t max = (size_t)sc->cfg.max_seq_len;
    if ((size_t)s->n_cont > max)
        return qkd_context_set_error(sc->ctx, QKD_ERR_RANGE, "eval: a continuation of %d "
                                     "tokens exceeds the model's context of %zu", s->n_cont,
                                     max);
    s->skip = s->n_ids - 1 > max ? s->n_ids - 1 - max : 0;
    return QKD_OK;
}

static size_t seq_len(const scored_seq *s)
{
    return s->n_ids - 1 - s->skip;
}

/* ---- scoring a batch ---- */

/* log softmax(row)[target] in double, and whether target is the row's
 * first argmax. */
static double log_prob(const float *row, int V, int32_t target, int *is_argmax)
{
    int best = 0;
    for (int v = 1; v < V; v++)
        if (row[v] > row[best])
            best = v;
    double max = row[best], sum = 0.0;
    for (int v = 0; v < V; v++)
        sum += exp((double)row[v] - max);
    *is_argmax = best == target;
    return (double)row[target] - max - log(sum);
}

/* Forward the n sequences as one padded batch and score each. */
static qkd_status score_batch(const scorer *sc, const scored_seq *seqs, int n, double *lls,
                              int *n_tokens, int *greedy)
{
    size_t T = 0;
    for (int i = 0; i < n; i++)
        T = seq_len(&seqs[i]) > T ? seq_len(&seqs[i]) : T;
    T = (T + T_STEP - 1) / T_STEP * T_STEP;
    T = T < (size_t)sc->cfg.max_seq_len ? T : (size_t)sc->cfg.max_seq_len;
    const size_t V = (size_t)sc->cfg.vocab_size, rows = (size_t)n * T;
    int32_t *tokens = calloc(rows, sizeof *tokens);
    float *logits = malloc(rows * V * sizeof *logits);
    qkd_status st = tokens && logits ? QKD_OK
                                     : qkd_context_set_error(sc->ctx, QKD_ERR_NO_MEMORY,
                                                             "eval: out of memory for %zu x "
                                                             "%zu logits", rows, V);
    for (int i = 0; st == QKD_OK && i < n; i++)
        memcpy(tokens + i * T, seqs[i].ids + seqs[i].skip, seq_len(&seqs[i]) * sizeof *tokens);
    if (st == QKD_OK)
        st = qkd_model_forward(sc->model, tokens, n, (int)T);
    if (st == QKD_OK)
        st = qkd_model_logits(sc->model, logits, rows * V);
    for (int i = 0; st == QKD_OK && i < n; i++) {
        const scored_seq *s = &seqs[i];
        const int32_t *seq = s->ids + s->skip;
        size_t len = seq_len(s);
        double sum = 0.0;
        int all_greedy = 1;
        for (size_t p = len - (size_t)s->n_cont; p < len; p++) {
            int hit;
            sum += log_prob(logits + (i * T + p) * V, (int)V, seq[p + 1], &hit);
            all_greedy &= hit;
        }
        lls[i] = sum;
        if (n_tokens)
            n_tokens[i] = s->n_cont;
        if (greedy)
            greedy[i] = all_greedy;
    }
    free(logits);
    free(tokens);
    return st;
}

static qkd_status scorer_init(scorer *sc, qkd_context *ctx, qkd_model *model,
                              const qkd_tokenizer *tok, int add_bos)
{
    *sc = (scorer){.ctx = ctx, .model = model, .tok = tok, .add_bos = add_bos != 0};
    if (!model || !tok)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG, "eval: NULL model or tokenizer");
    qkd_model_config_init(&sc->cfg);
    qkd_status st = qkd_model_get_config(model, &sc->cfg);
    if (st == QKD_OK && qkd_tokenizer_vocab_size(tok) > sc->cfg.vocab_size)
        st = qkd_context_set_error(ctx, QKD_ERR_SHAPE, "eval: the tokenizer has %d tokens, "
                                   "the model only %d", qkd_tokenizer_vocab_size(tok),
                                   sc->cfg.vocab_size);
    return st;
}

/* Score n (context, continuation) pairs together. */
static qkd_status score_pairs(const scorer *sc, int n, const char *const *contexts,
                              const char *const *continuations, double *lls, int *n_tokens,
                              int *greedy)
{
    scored_seq *seqs = calloc((size_t)n, sizeof *seqs);
    qkd_status st = seqs ? QKD_OK
                         : qkd_context_set_error(sc->ctx, QKD_ERR_NO_MEMORY, "eval: out of memory");
    for (int i = 0; st == QKD_OK && i < n; i++) {
        if (!contexts[i] || !continuations[i])
            st = qkd_context_set_error(sc->ctx, QKD_ERR_INVALID_ARG, "eval: NULL context or "
                                       "continuation");
        if (st == QKD_OK)
            st = encode_pair(sc, contexts[i], continuations[i], &seqs[i]);
        if (st == QKD_OK)
            st = fit(sc, &seqs[i]);
    }
    if (st == QKD_OK)
        st = score_batch(sc, seqs, n, lls, n_tokens, greedy);
    for (int i = 0; seqs && i < n; i++)
        free(seqs[i].ids);
    free(seqs);
    return st;
}

qkd_status qkd_eval_loglikelihood(qkd_context *ctx, qkd_model *model, const qkd_tokenizer *tok,
                                  const char *context, const char *continuation, int add_bos,
                                  double *logprob, int *n_tokens, int *greedy)
{
    scorer sc;
    qkd_status st = scorer_init(&sc, ctx, model, tok, add_bos);
    double ll = 0.0;
    if (st == QKD_OK)
        st = score_pairs(&sc, 1, &context, &continuation, &ll, n_tokens, greedy);
    if (st == QKD_OK && logprob)
        *logprob = ll;
    return st;
}

static qkd_status item_score(const scorer *sc, const qkd_eval_set *set, size_t index,
                             double *lls, int *greedy)
{
    if (!set || index >= set->n)
        return qkd_context_set_error(sc->ctx, set ? QKD_ERR_RANGE : QKD_ERR_INVALID_ARG,
                                     "eval: item %zu of %zu", index, set ? set->n : 0);
    const qkd__eval_entry *e = &set->items[index];
    return score_pairs(sc, e->n_choices, e->contexts, e->continuations, lls, NULL, greedy);
}

qkd_status qkd_eval_item_score(qkd_context *ctx, qkd_model *model, const qkd_tokenizer *tok,
                               const qkd_eval_set *set, size_t index, int add_bos, double *lls,
                               int *greedy)
{
    scorer sc;
    qkd_status st = scorer_init(&sc, ctx, model, tok, add_bos);
    if (st == QKD_OK && !lls)
        st = qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG, "eval item_score: NULL lls");
    return st == QKD_OK ? item_score(&sc, set, index, lls, greedy) : st;
}

/* ---- metrics ---- */

void qkd_eval_params_init(qkd_eval_params *p)
{
    if (p)
        *p = (qkd_eval_params){.size = sizeof *p, .add_bos = 1};
}

/* Length in Unicode code points, Python's len() of the answer. */
static size_t code_points(const char *s)
{
    size_t n = 0;
    for (; *s; s++)
        n += ((unsigned char)*s & 0xc0) != 0x80;
    return n;
}

static int argmax(const double *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

typedef struct tally {
    size_t n, hits, hits_norm;
    double ll_sum;
} tally;

static void tally_item(tally *t, const qkd__eval_entry *e, qkd_eval_task task, double *lls,
                       const int *greedy)
{
    t->n++;
    if (task == QKD_EVAL_LAMBADA) {
        t->hits += greedy[0];
        t->ll_sum += lls[0];
        return;
    }
    t->hits += argmax(lls, e->n_choices) == e->gold;
    for (int i = 0; i < e->n_choices; i++)
        lls[i] /= (double)code_points(e->choices[i]);
    t->hits_norm += argmax(lls, e->n_choices) == e->gold;
}

/* lm-eval's mean stderr of a 0/1 metric: sqrt(p (1 - p) / (n - 1)). */
static double stderr_of(double p, size_t n)
{
    return n > 1 ? sqrt(p * (1.0 - p) / (double)(n - 1)) : NAN;
}

static void tally_result(const tally *t, qkd_eval_task task, qkd_eval_result *res)
{
    double n = t->n ? (double)t->n : NAN;
    *res = (qkd_eval_result){.size = sizeof *res, .task = task, .n_items = t->n,
                             .acc = (double)t->hits / n, .acc_norm = NAN,
                             .acc_norm_stderr = NAN, .perplexity = NAN};
    res->acc_stderr = stderr_of(res->acc, t->n);
    if (task == QKD_EVAL_LAMBADA) {
        res->perplexity = exp(-t->ll_sum / n);
    } else {
        res->acc_norm = (double)t->hits_norm / n;
        res->acc_norm_stderr = stderr_of(res->acc_norm, t->n);
    }
}

static qkd_status check_run_args(qkd_context *ctx, const qkd_eval_set *set,
                                 const qkd_eval_params *p, const qkd_eval_result *res)
{
    if (!set || !res || res->size < sizeof *res)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG, "eval run: NULL set or result, "
                                     "or the result's size field is not set");
    if (p->size < sizeof *p)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG, "eval run: params size field "
                                     "is not set (use qkd_eval_params_init)");
    return QKD_OK;
}

qkd_status qkd_eval_run(qkd_context *ctx, qkd_model *model, const qkd_tokenizer *tok,
                        const qkd_eval_set *set, const qkd_eval_params *p, qkd_eval_result *res)
{
    qkd_eval_params defaults;
    qkd_eval_params_init(&defaults);
    if (!p)
        p = &defaults;
    scorer sc;
    qkd_status st = check_run_args(ctx, set, p, res);
    if (st == QKD_OK)
        st = scorer_init(&sc, ctx, model, tok, p->add_bos);
    if (st != QKD_OK)
        return st;
    size_t total = p->limit && p->limit < set->n ? p->limit : set->n;
    int max_choices = 1;
    for (size_t i = 0; i < total; i++)
        max_choices = set->items[i].n_choices > max_choices ? set->items[i].n_choices
                                                            : max_choices;
    double *lls = malloc((size_t)max_choices * sizeof *lls);
    int *greedy = malloc((size_t)max_choices * sizeof *greedy);
    if (!lls || !greedy)
        st = qkd_context_set_error(ctx, QKD_ERR_NO_MEMORY, "eval run: out of memory");
    tally t = {0};
    for (size_t i = 0; st == QKD_OK && i < total; i++) {
        st = item_score(&sc, set, i, lls, greedy);
        if (st != QKD_OK)
            break;
        tally_item(&t, &set->items[i], set->task, lls, greedy);
        if (p->progress && p->progress(p->progress_user, i + 1, total))
            st = qkd_context_set_error(ctx, QKD_ERR_CANCELLED, "eval run: cancelled after "
                                       "%zu of %zu items", i + 1, total);
    }
    free(lls);
    free(greedy);
    if (st == QKD_OK || st == QKD_ERR_CANCELLED)
        tally_result(&t, set->task, res);
    return st;
}
