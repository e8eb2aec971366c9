/* Data-free generation (LLM-QAT): the teacher writes its own training
 * sequences through the public decode and sampler API. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qkd/qkd.h>

#include "data/dataset.h"

/* A logit far below any real one but finite (the sampler refuses Inf):
 * its probability underflows to exactly zero. */
#define MASKED_LOGIT (-1e30f)

void qkd_datafree_params_init(qkd_datafree_params *p)
{
    if (!p)
        return;
    *p = (qkd_datafree_params){
        .size = sizeof *p,
        .n_sequences = 64,
        .seq_len = 257,
        .greedy_min = 3,
        .greedy_max = 5,
        .top_k = 50,
        .temperature = 1.0f,
        .seed = 1,
    };
}

static qkd_status check_params(qkd_context *ctx, const qkd_datafree_params *p)
{
    if (!p || p->size < sizeof *p)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG,
                                     "data-free: params missing or size not set "
                                     "(use qkd_datafree_params_init)");
    if (p->n_sequences < 1 || p->seq_len < 2)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG,
                                     "data-free: n_sequences %lld must be >= 1 and seq_len %d >= 2",
                                     (long long)p->n_sequences, p->seq_len);
    if (p->greedy_min < 1 || p->greedy_max < p->greedy_min)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG,
                                     "data-free: greedy lengths %d..%d: need 1 <= min <= max",
                                     p->greedy_min, p->greedy_max);
    if (p->top_k < 0 || !(p->temperature > 0.0f) || p->temperature > 1e30f)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG,
                                     "data-free: top_k %d must be >= 0 and temperature %g > 0",
                                     p->top_k, p->temperature);
    if ((uint64_t)p->n_sequences > SIZE_MAX / sizeof(int32_t) / (size_t)p->seq_len)
        return qkd_context_set_error(ctx, QKD_ERR_NO_MEMORY,
                                     "data-free: %lld sequences of %d tokens do not fit in memory",
                                     (long long)p->n_sequences, p->seq_len);
    return QKD_OK;
}

/* The byte of a byte-fallback piece "<0xNN>", or -1. */
static int byte_of(const char *piece)
{
    unsigned v;
    char end;
    if (strlen(piece) != 6 || sscanf(piece, "<0x%2X%c", &v, &end) != 2 || end != '>')
        return -1;
    return (int)v;
}

/* Whether id may start a sequence: not BOS or EOS, not a "<...>" piece
 * (unknown, control), except the byte token of a printable ASCII character
 * that has no piece of its own (single[c]): only those can come out of the
 * tokenizer at the start of a text. */
static int may_start(const qkd_tokenizer *tok, int32_t id, const unsigned char *single)
{
    const char *piece = qkd_tokenizer_piece(tok, id);
    if (!piece || id == qkd_tokenizer_bos(tok) || id == qkd_tokenizer_eos(tok))
        return 0;
    size_t len = strlen(piece);
    if (len < 3 || piece[0] != '<' || piece[len - 1] != '>')
        return 1;
    int byte = byte_of(piece);
    return byte >= 0x20 && byte < 0x7f && !single[byte];
}

static int by_value_desc(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/* Keep the k largest logits (and ties with the k-th); mask the others. */
static void keep_top_k(float *logits, float *scratch, int vocab, int k)
{
    if (k <= 0 || k >= vocab)
        return;
    memcpy(scratch, logits, (size_t)vocab * sizeof *scratch);
    qsort(scratch, (size_t)vocab, sizeof *scratch, by_value_desc);
    const float kth = scratch[k - 1];
    for (int i = 0; i < vocab; i++)
        if (logits[i] < kth)
            logits[i] = MASKED_LOGIT;
}

typedef struct gen_state {
    qkd_context *ctx;
    qkd_model *teacher;
    const qkd_datafree_params *p;
    int vocab;
    int32_t bos;
    int32_t *starts;        /* ids that may start a sequence */
    int64_t n_starts;
    qkd_sampler *greedy;    /* temperature 0: argmax */
    qkd_sampler *sampler;   /* temperature, top_p 1, seeded */
    float *logits, *scratch;
} gen_state;

/* The walk's token for sequence i: a fresh seeded permutation of the
 * start ids for every pass over them. */
static int32_t walk_token(const gen_state *g, int64_t i)
{
    uint64_t key = qkd__mix64(g->p->seed ^ qkd__mix64(UINT64_C(0x5157) + (uint64_t)(i / g->n_starts)));
    return g->starts[qkd__permute(i % g->n_starts, g->n_starts, key)];
}

static int greedy_length(const gen_state *g, int64_t i)
{
    uint64_t span = (uint64_t)(g->p->greedy_max - g->p->greedy_min) + 1;
    uint64_t h = qkd__mix64(g->p->seed ^ qkd__mix64(UINT64_C(0x67726565) ^ (uint64_t)i));
    return g->p->greedy_min + (int)(h % span);
}

/* Write sequence i into seq[seq_len]. */
static qkd_status generate_one(gen_state *g, int64_t i, int32_t *seq)
{
    const int n = g->p->seq_len, n_greedy = greedy_length(g, i);
    seq[0] = g->bos;
    seq[1] = walk_token(g, i);
    /* Position 0's logits are not needed: the walk picks token 1. */
    qkd_status st = qkd_model_decode(g->teacher, seq[0], 0, NULL);
    for (int pos = 1; pos + 1 < n && st == QKD_OK; pos++) {
        st = qkd_model_decode(g->teacher, seq[pos], pos, g->logits);
        if (st != QKD_OK)
            break;
        if (pos + 1 <= n_greedy) {
            st = qkd_sampler_sample(g->greedy, g->logits, &seq[pos + 1]);
        } else {
            keep_top_k(g->logits, g->scratch, g->vocab, g->p->top_k);
            st = qkd_sampler_sample(g->sampler, g->logits, &seq[pos + 1]);
        }
    }
    return st;
}

static qkd_status collect_starts(gen_state *g, const qkd_tokenizer *tok)
{
    unsigned char single[128] = {0}; /* ASCII characters with a piece */
    for (int32_t id = 0; id < g->vocab; id++) {
        const char *piece = qkd_tokenizer_piece(tok, id);
        if (piece && strlen(piece) == 1 && (unsigned char)piece[0] < 128)
            single[(unsigned char)piece[0]] = 1;
    }
    g->starts = qkd_context_alloc(g->ctx, (size_t)g->vocab * sizeof *g->starts);
    if (!g->starts)
        return qkd_context_set_error(g->ctx, QKD_ERR_NO_MEMORY, "data-free: out of memory");
    for (int32_t id = 0; id < g->vocab; id++)
        if (may_start(tok, id, single))
            g->starts[g->n_starts++] = id;
    if (g->n_starts == 0)
        return qkd_context_set_error(g->ctx, QKD_ERR_STATE,
                                     "data-free: no token of the vocabulary can start a sequence");
    return QKD_OK;
}

static qkd_status setup(gen_state *g, const qkd_tokenizer *tok)
{
    qkd_model_config cfg;
    qkd_model_config_init(&cfg);
    qkd_status st = qkd_model_get_config(g->teacher, &cfg);
    if (st != QKD_OK)
        return st;
    g->vocab = cfg.vocab_size;
    g->bos = qkd_tokenizer_bos(tok);
    if (qkd_tokenizer_vocab_size(tok) != cfg.vocab_size)
        return qkd_context_set_error(g->ctx, QKD_ERR_SHAPE,
                                     "data-free: tokenizer has %d tokens, the model %d",
                                     qkd_tokenizer_vocab_size(tok), cfg.vocab_size);
    if (g->p->seq_len - 1 > cfg.max_seq_len)
        return qkd_context_set_error(g->ctx, QKD_ERR_RANGE,
                                     "data-free: sequences of %d tokens need %d positions, the "
                                     "model takes %d (qkd_model_set_max_seq_len)",
                                     g->p->seq_len, g->p->seq_len - 1, cfg.max_seq_len);
    g->logits = qkd_context_alloc(g->ctx, (size_t)g->vocab * sizeof *g->logits);
    g->scratch = qkd_context_alloc(g->ctx, (size_t)g->vocab * sizeof *g->scratch);
    if (!g->logits || !g->scratch)
        return qkd_context_set_error(g->ctx, QKD_ERR_NO_MEMORY, "data-free: out of memory");
    qkd_sampler_params sp;
    qkd_sampler_params_init(&sp);
    sp.temperature = 0.0f;
    st = qkd_sampler_create(g->ctx, &sp, g->vocab, &g->greedy);
    sp.temperature = g->p->temperature;
    sp.top_p = 1.0f;
    sp.seed = g->p->seed;
    if (st == QKD_OK)
        st = qkd_sampler_create(g->ctx, &sp, g->vocab, &g->sampler);
    if (st == QKD_OK)
        st = collect_starts(g, tok);
    return st;
}

static qkd_status generate_all(gen_state *g, int32_t *ids)
{
    const int64_t n = g->p->n_sequences;
    for (int64_t i = 0; i < n; i++) {
        qkd_status st = generate_one(g, i, ids + (size_t)i * (size_t)g->p->seq_len);
        if (st != QKD_OK)
            return st;
        if (g->p->progress && g->p->progress(g->p->progress_user, i + 1, n))
            return qkd_context_set_error(g->ctx, QKD_ERR_CANCELLED,
                                         "data-free: cancelled after %lld of %lld sequences",
                                         (long long)(i + 1), (long long)n);
    }
    return QKD_OK;
}

qkd_status qkd_dataset_generate(qkd_context *ctx, qkd_model *teacher, const qkd_tokenizer *tok,
                                const qkd_datafree_params *p, qkd_dataset **out)
{
    if (out)
        *out = NULL;
    if (!ctx || !teacher || !tok || !out)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG, "data-free: NULL argument");
    qkd_status st = check_params(ctx, p);
    if (st != QKD_OK)
        return st;
    gen_state g = {.ctx = ctx, .teacher = teacher, .p = p};
    size_t n_ids = (size_t)p->n_sequences * (size_t)p->seq_len;
    int32_t *ids = NULL;
    st = setup(&g, tok);
    if (st == QKD_OK && !(ids = qkd_context_alloc(ctx, n_ids * sizeof *ids)))
        st = qkd_context_set_error(ctx, QKD_ERR_NO_MEMORY,
                                   "data-free: out of memory for %zu tokens", n_ids);
    if (st == QKD_OK)
        st = generate_all(&g, ids);
    qkd_sampler_free(g.greedy);
    qkd_sampler_free(g.sampler);
    qkd_context_dealloc(ctx, g.starts);
    qkd_context_dealloc(ctx, g.logits);
    qkd_context_dealloc(ctx, g.scratch);
    if (st != QKD_OK) {
        qkd_context_dealloc(ctx, ids);
        return st;
    }
    return qkd__dataset_adopt(ctx, ids, n_ids, g.vocab, out);
}
