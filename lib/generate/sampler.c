/* Token sampling: greedy, temperature, top-p, with llama2.c's xorshift
 * generator so that seeded runs reproduce llama2.c's published outputs. */
#include <math.h>
#include <stdlib.h>

#include "core/core.h"
#include "generate/sampler.h"
#include "qkd/generate.h"

struct qkd_sampler {
    qkd_context *ctx;
    int vocab_size;
    float temperature;
    float top_p;
    uint64_t rng;
    qkd__prob_index *buf; /* top-p scratch, vocab_size entries */
};

uint32_t qkd__rng_u32(uint64_t *state)
{
    uint64_t s = *state;
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    *state = s;
    return (uint32_t)((s * UINT64_C(0x2545F4914F6CDD1D)) >> 32);
}

float qkd__rng_f32(uint64_t *state)
{
    return (float)(qkd__rng_u32(state) >> 8) / 16777216.0f;
}

int32_t qkd__sample_argmax(const float *x, int n)
{
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

void qkd__softmax(float *x, int n)
{
    float max = x[0];
    for (int i = 1; i < n; i++)
        if (x[i] > max)
            max = x[i];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    for (int i = 0; i < n; i++)
        x[i] /= sum;
}

int32_t qkd__sample_mult(const float *probs, int n, float coin)
{
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += probs[i];
        if (coin < cdf)
            return i;
    }
    return n - 1;
}

static int by_prob_desc(const void *a, const void *b)
{
    float pa = ((const qkd__prob_index *)a)->prob;
    float pb = ((const qkd__prob_index *)b)->prob;
    return (pa < pb) - (pa > pb);
}

int32_t qkd__sample_topp(const float *probs, int n, float top_p, float coin,
                         qkd__prob_index *buf)
{
    /* A token below this cannot be in the nucleus: even if every other
     * token were as small, the rest would already exceed top_p. Dropping
     * them before the sort changes nothing but the cost. */
    const float cutoff = (1.0f - top_p) / (float)(n - 1);
    int n0 = 0;
    for (int i = 0; i < n; i++) {
        if (probs[i] >= cutoff) {
            buf[n0].prob = probs[i];
            buf[n0].index = i;
            n0++;
        }
    }
    /* Nothing reaches the cutoff (one token, or top_p < 1/n on a flat
     * distribution): the nucleus is then the most probable token alone. */
    if (n0 == 0)
        return qkd__sample_argmax(probs, n);
    qsort(buf, (size_t)n0, sizeof *buf, by_prob_desc);

    float cumulative = 0.0f;
    int last = n0 - 1; /* rounding may keep the sum at or below top_p */
    for (int i = 0; i < n0; i++) {
        cumulative += buf[i].prob;
        if (cumulative > top_p) {
            last = i;
            break;
        }
    }
    float r = coin * cumulative;
    float cdf = 0.0f;
    for (int i = 0; i <= last; i++) {
        cdf += buf[i].prob;
        if (r < cdf)
            return buf[i].index;
    }
    return buf[last].index;
}

void qkd_sampler_params_init(qkd_sampler_params *p)
{
    if (!p)
        return;
    p->size = sizeof *p;
    p->temperature = 1.0f;
    p->top_p = 0.9f;
    p->seed = 1;
}

qkd_status qkd_sampler_create(qkd_context *ctx, const qkd_sampler_params *p,
                              int vocab_size, qkd_sampler **out)
{
    if (!ctx || !out)
        return QKD_ERR_INVALID_ARG;
    *out = NULL;
    if (!p || p->size < sizeof *p)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "sampler: params missing or size field not set (use qkd_sampler_params_init)");
    if (!isfinite(p->temperature) || p->temperature < 0.0f)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "sampler: temperature %g must be finite and >= 0", p->temperature);
    if (!isfinite(p->top_p) || p->top_p <= 0.0f)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "sampler: top_p %g must be finite and > 0", p->top_p);
    if (vocab_size < 1)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "sampler: vocab_size %d must be >= 1", vocab_size);

    qkd_sampler *s = qkd__calloc(ctx, 1, sizeof *s);
    qkd__prob_index *buf = qkd__calloc(ctx, (size_t)vocab_size, sizeof *buf);
    if (!s || !buf) {
        qkd__free(ctx, s);
        qkd__free(ctx, buf);
        return qkd__error(ctx, QKD_ERR_NO_MEMORY, "sampler: out of memory for %d tokens",
                          vocab_size);
    }
    s->ctx = ctx;
    s->vocab_size = vocab_size;
    s->temperature = p->temperature;
    s->top_p = p->top_p;
    s->rng = p->seed ? p->seed : 1;
    s->buf = buf;
    *out = s;
    return QKD_OK;
}

void qkd_sampler_free(qkd_sampler *s)
{
    if (!s)
        return;
    qkd__free(s->ctx, s->buf);
    qkd__free(s->ctx, s);
}

qkd_status qkd_sampler_sample(qkd_sampler *s, float *logits, int32_t *token)
{
    if (!s)
        return QKD_ERR_INVALID_ARG;
    if (!logits || !token)
        return qkd__error(s->ctx, QKD_ERR_INVALID_ARG, "sampler: NULL logits or token");
    const int n = s->vocab_size;
    for (int i = 0; i < n; i++)
        if (!isfinite(logits[i]))
            return qkd__error(s->ctx, QKD_ERR_NON_FINITE, "sampler: logit %d is %g", i,
                              logits[i]);
    if (s->temperature == 0.0f) {
        *token = qkd__sample_argmax(logits, n);
        return QKD_OK;
    }
    for (int i = 0; i < n; i++)
        logits[i] /= s->temperature;
    qkd__softmax(logits, n);
    /* Drawn before the branch, as llama2.c does, so both rules consume the
     * generator identically. */
    float coin = qkd__rng_f32(&s->rng);
    if (s->top_p >= 1.0f)
        *token = qkd__sample_mult(logits, n, coin);
    else
        *token = qkd__sample_topp(logits, n, s->top_p, coin, s->buf);
    return QKD_OK;
}
