/* Seeded random initialisation. The numbers are drawn on the host by our
 * own generator (splitmix64 + Box-Muller) and uploaded, so a seed gives
 * the same weights on every backend. */
#include <math.h>

#include "model/model_impl.h"

#define CHUNK_FLOATS 65536 /* host staging buffer */

typedef struct normal_rng {
    uint64_t state;
    int has_spare;
    double spare;
} normal_rng;

static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in (0, 1]: 53 random bits, never 0 so the log below is finite. */
static double uniform_open0(normal_rng *r)
{
    return (double)((splitmix64(&r->state) >> 11) + 1) * 0x1.0p-53;
}

/* Standard normal; Box-Muller yields two per draw, the second is kept. */
static double normal(normal_rng *r)
{
    if (r->has_spare) {
        r->has_spare = 0;
        return r->spare;
    }
    const double two_pi = 6.283185307179586476925;
    double radius = sqrt(-2.0 * log(uniform_open0(r)));
    double angle = two_pi * uniform_open0(r);
    r->spare = radius * sin(angle);
    r->has_spare = 1;
    return radius * cos(angle);
}

static qkd_status fill_normal(qkd_model *m, float *dst, const qkd__tensor_entry *e,
                              normal_rng *r, float std, float *chunk)
{
    qkd__backend *be = qkd__model_backend(m);
    size_t n = (size_t)(e->rows * e->cols);
    for (size_t done = 0; done < n; done += CHUNK_FLOATS) {
        size_t len = n - done < CHUNK_FLOATS ? n - done : CHUNK_FLOATS;
        for (size_t i = 0; i < len; i++)
            chunk[i] = (float)(std * normal(r));
        qkd_status st = be->upload(be, dst + done, chunk, len * sizeof(float));
        if (st != QKD_OK)
            return st;
    }
    return QKD_OK;
}

qkd_status qkd_model_init_random(qkd_model *m, uint64_t seed, float std)
{
    if (!m)
        return QKD_ERR_INVALID_ARG;
    if (!isfinite(std) || std < 0.0f)
        return qkd__error(m->ctx, QKD_ERR_INVALID_ARG,
                          "model init_random: std %g must be finite and >= 0", (double)std);
    float *chunk = qkd__alloc(m->ctx, CHUNK_FLOATS * sizeof(float));
    if (!chunk)
        return qkd__error(m->ctx, QKD_ERR_NO_MEMORY, "model init_random: out of memory");
    qkd__backend *be = qkd__model_backend(m);
    normal_rng r = {.state = seed};
    qkd_status st = QKD_OK;
    for (int i = 0; i < m->n_weights && st == QKD_OK; i++) {
        const qkd__tensor_entry *e = &m->tensors[i];
        float *w = qkd__model_param_dev(m, i);
        if (e->n_dims == 1)
            be->fill(be, w, 1.0f, (size_t)e->rows);
        else
            st = fill_normal(m, w, e, &r, std, chunk);
    }
    qkd__free(m->ctx, chunk);
    if (st == QKD_OK)
        qkd__model_init_scales(m); /* learned scales follow the new weights */
    return st;
}
