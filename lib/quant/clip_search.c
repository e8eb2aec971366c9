/* The SEARCH clips (BitDistiller's "auto clip"): per group, shrink the
 * range by a grid of factors and keep the one whose quantized weights err
 * least. Each candidate is applied to every group at once and the whole
 * tensor goes through the backend's own quantization kernel, so the
 * chosen clip scores exactly what the training forward will compute. */
#include <math.h>
#include <string.h>

#include "core/core.h"
#include "quant/quant.h"

#define GRID 10 /* shrink factors 1 - i/20 for i = 0..9 */

typedef struct search {
    qkd_quantizer *q;
    const float *w;      /* the weights as they were [rows][cols] */
    int64_t rows, cols;
    int64_t seg, n_seg;  /* a row splits into n_seg segments of seg values */
    int64_t n_groups;    /* per tensor: 1 group made of every row's segment */
    int asym;
    float *lo, *hi;      /* each group's min and max (symmetric: -amax, amax) */
    unsigned char *ci, *cj; /* shrink steps applied to each group */
    double *gram;        /* [n_seg][seg][seg] input Gram blocks; NULL: weight error */
    float *wc, *wq;      /* candidate clamped weights and their quantization */
    double *seg_err;     /* [rows][n_seg] error of each row segment */
} search;

static int64_t group_at(const search *s, int64_t r, int64_t c)
{
    return s->n_groups == 1 ? 0 : r * s->n_seg + c / s->seg;
}

static void group_bounds(search *s)
{
    for (int64_t g = 0; g < s->n_groups; g++) {
        s->lo[g] = INFINITY;
        s->hi[g] = -INFINITY;
    }
    for (int64_t r = 0; r < s->rows; r++) {
        for (int64_t c = 0; c < s->cols; c++) {
            int64_t g = group_at(s, r, c);
            float x = s->w[r * s->cols + c];
            s->lo[g] = fminf(s->lo[g], s->asym ? x : -fabsf(x));
            s->hi[g] = fmaxf(s->hi[g], s->asym ? x : fabsf(x));
        }
    }
}

/* dst = w clamped to each group's shrunk range (shrink steps ci, cj). */
static void apply_clip(const search *s, float *dst)
{
    for (int64_t r = 0; r < s->rows; r++) {
        for (int64_t c = 0; c < s->cols; c++) {
            int64_t g = group_at(s, r, c);
            float hi = (float)(s->hi[g] * (1.0 - s->ci[g] / 20.0));
            float lo = s->asym ? (float)(s->lo[g] * (1.0 - s->cj[g] / 20.0)) : -hi;
            float x = s->w[r * s->cols + c];
            dst[r * s->cols + c] = x < lo ? lo : x > hi ? hi : x;
        }
    }
}

/* ---- errors ----------------------------------------------------------------- */

/* Gram block b: S[k][l] = mean over the inputs of x[c0 + k] x[c0 + l]. */
static void fill_gram(search *s, const float *x, int64_t n_x)
{
    for (int64_t b = 0; b < s->n_seg; b++) {
        const int64_t c0 = b * s->seg, n = s->cols - c0 < s->seg ? s->cols - c0 : s->seg;
        double *S = s->gram + b * s->seg * s->seg;
        for (int64_t k = 0; k < n; k++) {
            for (int64_t l = 0; l <= k; l++) {
                double acc = 0.0;
                for (int64_t t = 0; t < n_x; t++)
                    acc += (double)x[t * s->cols + c0 + k] * x[t * s->cols + c0 + l];
                S[k * s->seg + l] = S[l * s->seg + k] = acc / (double)n_x;
            }
        }
    }
}

/* d^T S d with d = wq - w over one row segment (S = identity without inputs). */
static double segment_error(const search *s, int64_t r, int64_t b)
{
    const int64_t c0 = b * s->seg, n = s->cols - c0 < s->seg ? s->cols - c0 : s->seg;
    const float *w = s->w + r * s->cols + c0, *wq = s->wq + r * s->cols + c0;
    const double *S = s->gram ? s->gram + b * s->seg * s->seg : NULL;
    double err = 0.0;
    for (int64_t k = 0; k < n; k++) {
        double dk = (double)wq[k] - w[k], sd = dk;
        if (S) {
            sd = 0.0;
            for (int64_t l = 0; l < n; l++)
                sd += S[k * s->seg + l] * ((double)wq[l] - w[l]);
        }
        err += dk * sd;
    }
    return err;
}

static void row_errors(void *arg, int64_t r)
{
    search *s = arg;
    for (int64_t b = 0; b < s->n_seg; b++)
        s->seg_err[r * s->n_seg + b] = segment_error(s, r, b);
}

static double group_error(const search *s, int64_t g)
{
    if (s->n_groups > 1)
        return s->seg_err[g];
    double err = 0.0; /* per tensor: every row is a segment of the group */
    for (int64_t r = 0; r < s->rows; r++)
        err += s->seg_err[r];
    return err;
}

/* ---- the search -------------------------------------------------------------- */

/* Quantize the candidate wc through the backend into s->wq. dev holds the
 * device buffers: weights, quantized weights, scales, zeros. */
static qkd_status quantize_candidate(search *s, float *dev)
{
    qkd__backend *be = qkd__quantizer_context(s->q)->backend;
    const size_t n = (size_t)(s->rows * s->cols);
    float *dev_wq = dev + n;
    qkd_status st = be->upload(be, dev, s->wc, n * sizeof(float));
    if (st != QKD_OK)
        return st;
    qkd__quantizer_forward(s->q, dev_wq, dev_wq + n, dev_wq + n + s->n_groups, dev, s->rows,
                           s->cols, 0);
    st = be->sync(be);
    return st == QKD_OK ? be->download(be, s->wq, dev_wq, n * sizeof(float)) : st;
}

/* Try every candidate; leave the best steps of each group in best_i/j. */
static qkd_status run_grid(search *s, float *dev, unsigned char *best_i, unsigned char *best_j,
                           double *best)
{
    qkd_context *ctx = qkd__quantizer_context(s->q);
    for (int64_t g = 0; g < s->n_groups; g++)
        best[g] = INFINITY;
    for (int i = 0; i < GRID; i++) {
        for (int j = 0; j < (s->asym ? GRID : 1); j++) {
            memset(s->ci, i, (size_t)s->n_groups);
            memset(s->cj, j, (size_t)s->n_groups);
            apply_clip(s, s->wc);
            qkd_status st = quantize_candidate(s, dev);
            if (st != QKD_OK)
                return st;
            qkd__pool_run(ctx->pool, s->rows, row_errors, s);
            for (int64_t g = 0; g < s->n_groups; g++) {
                double err = group_error(s, g);
                if (err < best[g]) { /* strict: ties keep the smaller shrink */
                    best[g] = err;
                    best_i[g] = (unsigned char)i;
                    best_j[g] = (unsigned char)j;
                }
            }
        }
    }
    return QKD_OK;
}

/* Carve the search's host buffers out of one allocation. */
static void *alloc_buffers(qkd_context *ctx, search *s, int with_gram, unsigned char **best_ij,
                           double **best)
{
    const size_t n = (size_t)(s->rows * s->cols), ng = (size_t)s->n_groups;
    const size_t n_gram = with_gram ? (size_t)(s->n_seg * s->seg * s->seg) : 0;
    const size_t doubles = n_gram + (size_t)(s->rows * s->n_seg) + ng;
    char *mem = qkd__alloc(ctx, doubles * sizeof(double) + (2 * n + 2 * ng) * sizeof(float) +
                                    4 * ng);
    if (!mem)
        return NULL;
    double *d = (double *)mem;
    s->gram = with_gram ? d : NULL;
    s->seg_err = d + n_gram;
    *best = s->seg_err + s->rows * s->n_seg;
    float *f = (float *)(*best + ng);
    s->wc = f;
    s->wq = f + n;
    s->lo = f + 2 * n;
    s->hi = s->lo + ng;
    s->ci = (unsigned char *)(s->hi + ng);
    s->cj = s->ci + ng;
    *best_ij = s->cj + ng;
    return mem;
}

static qkd_status search_on(search *s, float *w, const float *x, int64_t n_x, const char *what)
{
    qkd_context *ctx = qkd__quantizer_context(s->q);
    qkd__backend *be = ctx->backend;
    unsigned char *best_ij;
    double *best;
    void *mem = alloc_buffers(ctx, s, x != NULL, &best_ij, &best);
    float *dev = NULL;
    const size_t n = (size_t)(s->rows * s->cols);
    if (!mem)
        return qkd__error(ctx, QKD_ERR_NO_MEMORY, "calibrate: out of memory for %s", what);
    qkd_status st = be->alloc(be, (2 * n + 2 * (size_t)s->n_groups) * sizeof(float),
                              (void **)&dev);
    if (st == QKD_OK) {
        group_bounds(s);
        if (x)
            fill_gram(s, x, n_x);
        st = run_grid(s, dev, best_ij, best_ij + s->n_groups, best);
    }
    if (st == QKD_OK) {
        memcpy(s->ci, best_ij, (size_t)s->n_groups);
        memcpy(s->cj, best_ij + s->n_groups, (size_t)s->n_groups);
        apply_clip(s, w); /* in place: each value is read before it is written */
    }
    be->free(be, dev);
    qkd__free(ctx, mem);
    return st;
}

qkd_status qkd__quantizer_search_clip(qkd_quantizer *q, float *w, int64_t rows, int64_t cols,
                                      const float *x, int64_t n_x, const char *what)
{
    qkd_context *ctx = qkd__quantizer_context(q);
    for (int64_t i = 0; i < rows * cols; i++) {
        if (!isfinite(w[i]))
            return qkd__error(ctx, QKD_ERR_NON_FINITE,
                              "calibrate: %s has a non-finite weight at index %lld", what,
                              (long long)i);
    }
    const qkd_quant_params *p = qkd__quantizer_params(q);
    search s = {.q = q, .w = w, .rows = rows, .cols = cols,
                .asym = p->scheme == QKD_QUANT_ASYM};
    s.seg = p->group_size > 0 && p->group_size < cols ? p->group_size : cols;
    s.n_seg = (cols + s.seg - 1) / s.seg;
    s.n_groups = qkd_quantizer_n_groups(q, rows, cols);
    return search_on(&s, w, x, n_x, what);
}
