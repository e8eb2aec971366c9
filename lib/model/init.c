/* Seeded random initialisation. The numbers are drawn on the host by our
 * own generator (splitmix64 + Box-Muller) and uploaded, so a seed gives
 * the same weights on every backend. splitmix64's state only counts, so
 * each draw can be made from its index alone: the context's threads fill
 * a staging buffer's chunks at once, and the weights are those of one
 * draw after the other, whatever the thread count. */
#include <math.h>

#include "model/model_impl.h"

#define CHUNK_FLOATS 65536                /* one task's draws */
#define STAGE_FLOATS (16 * CHUNK_FLOATS) /* host staging buffer at most, one upload */

/* The k-th output (k >= 1) of splitmix64 seeded with `seed`. */
static uint64_t splitmix64_at(uint64_t seed, uint64_t k)
{
    uint64_t z = seed + k * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in (0, 1]: 53 random bits, never 0 so the log below is finite. */
static double uniform_at(uint64_t seed, uint64_t k)
{
    return (double)((splitmix64_at(seed, k) >> 11) + 1) * 0x1.0p-53;
}

/* Box-Muller pair p of the seed's sequence, from uniforms 2 p + 1 and
 * 2 p + 2: standard normals 2 p (its cosine) and 2 p + 1 (its sine). */
static void normal_pair(uint64_t seed, uint64_t p, double out[2])
{
    const double two_pi = 6.283185307179586476925;
    const double radius = sqrt(-2.0 * log(uniform_at(seed, 2 * p + 1)));
    const double angle = two_pi * uniform_at(seed, 2 * p + 2);
    out[0] = radius * cos(angle);
    out[1] = radius * sin(angle);
}

typedef struct draw_job {
    float *stage;
    size_t cap;     /* floats of the stage */
    size_t len;     /* values in it */
    uint64_t seed;
    uint64_t first; /* the sequence's index of stage[0] */
    float std;
} draw_job;

static void draw_chunk(void *arg, int64_t task)
{
    const draw_job *d = arg;
    const size_t from = (size_t)task * CHUNK_FLOATS;
    const size_t to = from + CHUNK_FLOATS < d->len ? from + CHUNK_FLOATS : d->len;
    for (size_t i = from; i < to;) {
        const uint64_t j = d->first + i;
        double z[2];
        normal_pair(d->seed, j / 2, z);
        for (uint64_t k = j % 2; k < 2 && i < to; k++)
            d->stage[i++] = (float)(d->std * z[k]);
    }
}

/* dst (a matrix of e) from draw *next of the seed's sequence on. */
static qkd_status fill_normal(qkd_model *m, float *dst, const qkd__tensor_entry *e,
                              draw_job *d, uint64_t *next)
{
    qkd__backend *be = qkd__model_backend(m);
    const size_t n = (size_t)(e->rows * e->cols);
    for (size_t done = 0; done < n; done += d->cap) {
        d->len = n - done < d->cap ? n - done : d->cap;
        d->first = *next + done;
        qkd__pool_run(m->ctx->pool, (int64_t)((d->len + CHUNK_FLOATS - 1) / CHUNK_FLOATS),
                      draw_chunk, d);
        qkd_status st = be->upload(be, dst + done, d->stage, d->len * sizeof(float));
        if (st != QKD_OK)
            return st;
    }
    *next += n;
    return QKD_OK;
}

/* Floats of the staging buffer: the largest matrix's, up to STAGE_FLOATS. */
static size_t stage_floats(const qkd_model *m)
{
    size_t most = 1;
    for (int i = 0; i < m->n_weights; i++) {
        const size_t n = (size_t)(m->tensors[i].rows * m->tensors[i].cols);
        most = n > most ? n : most;
    }
    return most < STAGE_FLOATS ? most : STAGE_FLOATS;
}

qkd_status qkd_model_init_random(qkd_model *m, uint64_t seed, float std)
{
    if (!m)
        return QKD_ERR_INVALID_ARG;
    if (!isfinite(std) || std < 0.0f)
        return qkd__error(m->ctx, QKD_ERR_INVALID_ARG,
                          "model init_random: std %g must be finite and >= 0", (double)std);
    qkd_status st = qkd__model_fetch_matrices(m);
    if (st != QKD_OK)
        return st;
    const size_t stage = stage_floats(m);
    draw_job d = {.stage = qkd__alloc(m->ctx, stage * sizeof(float)), .cap = stage, .seed = seed,
                  .std = std};
    if (!d.stage)
        return qkd__error(m->ctx, QKD_ERR_NO_MEMORY, "model init_random: out of memory");
    qkd__backend *be = qkd__model_backend(m);
    uint64_t next = 0; /* the sequence's index of the next draw */
    for (int i = 0; i < m->n_weights && st == QKD_OK; i++) {
        const qkd__tensor_entry *e = &m->tensors[i];
        float *w = qkd__model_param_dev(m, i);
        if (e->n_dims == 1)
            be->fill(be, w, 1.0f, (size_t)e->rows);
        else
            st = fill_normal(m, w, e, &d, &next);
    }
    qkd__free(m->ctx, d.stage);
    if (st == QKD_OK)
        qkd__model_init_scales(m); /* learned scales follow the new weights */
    return st;
}
