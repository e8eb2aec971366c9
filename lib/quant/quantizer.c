/* The quantizer handle: parameters, the mapping of its groups onto the
 * backend's fake-quantization kernels, and the host query of deployed
 * codes and scales. */
#include <math.h>
#include <string.h>

#include "core/core.h"
#include "quant/ggml_blocks.h"
#include "quant/quant.h"

struct qkd_quantizer {
    qkd_context *ctx;
    qkd_quant_params p;
};

#define MAX_ACT_BITS 16

void qkd_quant_params_init(qkd_quant_params *p)
{
    if (!p)
        return;
    *p = (qkd_quant_params){
        .size = sizeof *p,
        .scheme = QKD_QUANT_ASYM,
        .bits = 4,
        .group_size = 128,
        .clip = QKD_CLIP_NONE,
        .clip_ratio = 1.0f,
        .estimator = QKD_ESTIMATOR_STE,
        .round_sharpness = 10.0f,
        .clamp_sharpness = 10.0f,
    };
}

/* ---- format schemes -------------------------------------------------------- */

int qkd__quant_scheme_type(int scheme)
{
    static const int types[] = {QKD__GGML_Q8_0, QKD__GGML_Q4_0, QKD__GGML_Q4_1,
                                QKD__GGML_Q5_0, QKD__GGML_Q5_1, QKD__GGML_Q4_K,
                                QKD__GGML_Q6_K, QKD__GGML_TQ2_0};
    const int first = QKD_QUANT_Q8_0, n = (int)(sizeof types / sizeof types[0]);
    return scheme >= first && scheme < first + n ? types[scheme - first] : -1;
}

int qkd__quant_fit_type(int type, int64_t cols)
{
    if (cols % qkd__ggml_format_of((uint32_t)type)->block == 0)
        return type;
    return cols % QKD__QK == 0 ? QKD__GGML_Q8_0 : QKD__GGML_F16;
}

int qkd__quant_row_type(int scheme, int64_t cols)
{
    int type = qkd__quant_scheme_type(scheme);
    return type < 0 ? -1 : qkd__quant_fit_type(type, cols);
}

/* Groups per row of a format scheme (0 for an F16 fallback). */
static int64_t format_groups_per_row(int scheme, int64_t cols)
{
    const qkd__ggml_format *f = qkd__ggml_format_of((uint32_t)qkd__quant_row_type(scheme, cols));
    return f->group ? cols / f->group : 0;
}

/* ---- parameter checks ---------------------------------------------------- */

static int positive_finite(float x)
{
    return isfinite(x) && x > 0.0f;
}

static qkd_status check_dynamic_bits(qkd_context *ctx, const char *field, int bits)
{
    if (bits != 0 && (bits < 2 || bits > MAX_ACT_BITS))
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "quantizer create: %s %d is neither 0 (off) nor in [2, %d]", field,
                          bits, MAX_ACT_BITS);
    return QKD_OK;
}

/* A format scheme's grid is the format's own: no clip, hard rounding. */
static qkd_status check_format(qkd_context *ctx, const qkd_quant_params *p)
{
    if (p->clip != QKD_CLIP_NONE)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "quantizer create: format scheme %d takes no clip (clip mode %d)",
                          (int)p->scheme, (int)p->clip);
    if (p->estimator != QKD_ESTIMATOR_STE)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "quantizer create: format scheme %d needs the STE estimator "
                          "(estimator %d)",
                          (int)p->scheme, (int)p->estimator);
    return QKD_OK;
}

static qkd_status check_grid(qkd_context *ctx, const qkd_quant_params *p)
{
    if (qkd__quant_scheme_type(p->scheme) >= 0)
        return check_format(ctx, p);
    if (p->scheme != QKD_QUANT_SYM && p->scheme != QKD_QUANT_ASYM &&
        p->scheme != QKD_QUANT_TERNARY)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "quantizer create: unknown scheme %d",
                          (int)p->scheme);
    if (p->scheme != QKD_QUANT_TERNARY && p->bits != 2 && p->bits != 3 && p->bits != 4 &&
        p->bits != 8)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "quantizer create: bits %d is not 2, 3, 4 or 8", p->bits);
    if (p->group_size < -1)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "quantizer create: group_size %d (use > 0, 0 per row, -1 per tensor)",
                          p->group_size);
    if (p->clip < QKD_CLIP_NONE || p->clip > QKD_CLIP_SEARCH_OUTPUT)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "quantizer create: unknown clip mode %d",
                          (int)p->clip);
    if (!(p->clip_ratio > 0.0f && p->clip_ratio <= 1.0f))
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "quantizer create: clip_ratio %g is outside (0, 1]",
                          (double)p->clip_ratio);
    return QKD_OK;
}

static qkd_status check_estimator(qkd_context *ctx, const qkd_quant_params *p)
{
    if (p->estimator != QKD_ESTIMATOR_STE && p->estimator != QKD_ESTIMATOR_CONTINUOUS)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "quantizer create: unknown estimator %d",
                          (int)p->estimator);
    if (!positive_finite(p->round_sharpness) || !positive_finite(p->clamp_sharpness))
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "quantizer create: round_sharpness %g and clamp_sharpness %g must be "
                          "positive and finite",
                          (double)p->round_sharpness, (double)p->clamp_sharpness);
    return QKD_OK;
}

/* Learned scales need a grid of our own: a format's scales are its own. */
static qkd_status check_learn(qkd_context *ctx, const qkd_quant_params *p)
{
    if (p->learn_scales != 0 && p->learn_scales != 1)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "quantizer create: learn_scales %d is neither 0 nor 1",
                          p->learn_scales);
    if (p->learn_scales && qkd__quant_scheme_type(p->scheme) >= 0)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "quantizer create: format scheme %d cannot learn its scales (use "
                          "SYM, ASYM or TERNARY)",
                          (int)p->scheme);
    return QKD_OK;
}

static qkd_status check_params(qkd_context *ctx, const qkd_quant_params *p)
{
    if (!p)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "quantizer create: params is NULL");
    if (p->size < sizeof *p)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "quantizer create: size field %zu, expected %zu (call "
                          "qkd_quant_params_init)",
                          p->size, sizeof *p);
    qkd_status st;
    if ((st = check_estimator(ctx, p)) || (st = check_grid(ctx, p)) ||
        (st = check_dynamic_bits(ctx, "act_bits", p->act_bits)) ||
        (st = check_dynamic_bits(ctx, "kv_bits", p->kv_bits)) || (st = check_learn(ctx, p)))
        return st;
    return QKD_OK;
}

/* ---- create / free ------------------------------------------------------- */

qkd_status qkd_quantizer_create(qkd_context *ctx, const qkd_quant_params *p, qkd_quantizer **out)
{
    if (!ctx)
        return QKD_ERR_INVALID_ARG;
    if (!out)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "quantizer create: out is NULL");
    *out = NULL;
    qkd_status st = check_params(ctx, p);
    if (st != QKD_OK)
        return st;
    const qkd__backend *be = ctx->backend;
    if (p->learn_scales && (!be->fakequant_lsq_forward || !be->fakequant_lsq_backward))
        return qkd__error(ctx, QKD_ERR_UNSUPPORTED,
                          "quantizer create: the %s backend has no learned-scale kernels",
                          be->name);
    qkd_quantizer *q = qkd__calloc(ctx, 1, sizeof *q);
    if (!q)
        return qkd__error(ctx, QKD_ERR_NO_MEMORY, "quantizer create: out of memory");
    q->ctx = ctx;
    q->p = *p;
    q->p.size = sizeof q->p;
    *out = q;
    return QKD_OK;
}

void qkd_quantizer_free(qkd_quantizer *q)
{
    if (q)
        qkd__free(q->ctx, q);
}

qkd_status qkd_quantizer_set_sharpness(qkd_quantizer *q, float round_sharpness)
{
    if (!q)
        return QKD_ERR_INVALID_ARG;
    if (!positive_finite(round_sharpness))
        return qkd__error(q->ctx, QKD_ERR_INVALID_ARG,
                          "quantizer set_sharpness: %g must be positive and finite",
                          (double)round_sharpness);
    q->p.round_sharpness = round_sharpness;
    return QKD_OK;
}

qkd_status qkd_quantizer_set_estimator(qkd_quantizer *q, qkd_estimator estimator)
{
    if (!q)
        return QKD_ERR_INVALID_ARG;
    if (estimator != QKD_ESTIMATOR_STE && estimator != QKD_ESTIMATOR_CONTINUOUS)
        return qkd__error(q->ctx, QKD_ERR_INVALID_ARG,
                          "quantizer set_estimator: unknown estimator %d", (int)estimator);
    q->p.estimator = estimator;
    return QKD_OK;
}

/* ---- groups and kernels --------------------------------------------------- */

qkd_context *qkd__quantizer_context(const qkd_quantizer *q)
{
    return q->ctx;
}

const qkd_quant_params *qkd__quantizer_params(const qkd_quantizer *q)
{
    return &q->p;
}

int qkd__quantizer_smooth(const qkd_quantizer *q)
{
    return q->p.estimator == QKD_ESTIMATOR_CONTINUOUS;
}

int64_t qkd_quantizer_n_groups(const qkd_quantizer *q, int64_t rows, int64_t cols)
{
    if (!q || rows < 1 || cols < 1)
        return 0;
    if (qkd__quant_scheme_type(q->p.scheme) >= 0)
        return rows * format_groups_per_row(q->p.scheme, cols);
    if (q->p.group_size == -1)
        return 1;
    if (q->p.group_size == 0)
        return rows;
    return rows * ((cols + q->p.group_size - 1) / q->p.group_size);
}

/* The shape a kernel call sees (per tensor: one row of rows*cols values)
 * and the spec of the quantizer's grid. A format scheme keeps its rows
 * (its blocks lie along them). */
static qkd__quant_spec kernel_spec(const qkd_quantizer *q, int64_t *rows, int64_t *cols,
                                   int smooth)
{
    const qkd_quant_params *p = &q->p;
    const int format = qkd__quant_scheme_type(p->scheme) >= 0;
    if (p->group_size == -1 && !format) {
        *cols *= *rows;
        *rows = 1;
    }
    return (qkd__quant_spec){
        .scheme = p->scheme,
        .bits = p->bits,
        .group = p->group_size > 0 && !format ? p->group_size : *cols,
        .clip_ratio = p->clip == QKD_CLIP_FIXED ? p->clip_ratio : 1.0f,
        .continuous = smooth,
        .round_T = p->round_sharpness,
        .clamp_T = p->clamp_sharpness,
    };
}

qkd__quant_spec qkd__quantizer_spec(const qkd_quantizer *q, int64_t *rows, int64_t *cols,
                                    int smooth)
{
    return kernel_spec(q, rows, cols, smooth);
}

void qkd__quantizer_forward(const qkd_quantizer *q, float *wq, float *scales, float *zeros,
                            const float *w, int64_t rows, int64_t cols, int smooth)
{
    qkd__backend *be = q->ctx->backend;
    qkd__quant_spec spec = kernel_spec(q, &rows, &cols, smooth);
    be->fakequant_forward(be, wq, scales, zeros, w, rows, cols, &spec);
}

void qkd__quantizer_forward_bf16(const qkd_quantizer *q, uint16_t *wq, float *scales,
                                 float *zeros, const float *w, int64_t rows, int64_t cols,
                                 int smooth)
{
    qkd__backend *be = q->ctx->backend;
    qkd__quant_spec spec = kernel_spec(q, &rows, &cols, smooth);
    be->fakequant_forward_bf16(be, wq, scales, zeros, w, rows, cols, &spec);
}

void qkd__quantizer_backward(const qkd_quantizer *q, float *dw, const float *dwq,
                             const float *w, const float *scales, const float *zeros,
                             int64_t rows, int64_t cols)
{
    qkd__backend *be = q->ctx->backend;
    qkd__quant_spec spec = kernel_spec(q, &rows, &cols, qkd__quantizer_smooth(q));
    be->fakequant_backward(be, dw, dwq, w, scales, zeros, rows, cols, &spec);
}

int qkd__quantizer_grad_is_identity(const qkd_quantizer *q)
{
    int64_t rows = 1, cols = 1;
    const qkd__quant_spec spec = kernel_spec(q, &rows, &cols, qkd__quantizer_smooth(q));
    /* the condition of the backends' fakequant_backward for the plain STE */
    return !q->p.learn_scales && !spec.continuous && spec.clip_ratio >= 1.0f;
}

int qkd__quantizer_learned(const qkd_quantizer *q)
{
    if (!q->p.learn_scales)
        return 0;
    return q->p.scheme == QKD_QUANT_ASYM ? 2 : 1;
}

void qkd__quantizer_scale_shape(const qkd_quantizer *q, int64_t rows, int64_t cols,
                                int64_t *srows, int64_t *scols)
{
    *srows = q->p.group_size == -1 ? 1 : rows;
    *scols = qkd_quantizer_n_groups(q, rows, cols) / *srows;
}

void qkd__quantizer_lsq_forward(const qkd_quantizer *q, float *wq, const float *w,
                                const float *scales, const float *zeros, int64_t rows,
                                int64_t cols, int smooth)
{
    qkd__backend *be = q->ctx->backend;
    qkd__quant_spec spec = kernel_spec(q, &rows, &cols, smooth);
    be->fakequant_lsq_forward(be, wq, w, scales, zeros, rows, cols, &spec);
}

void qkd__quantizer_lsq_backward(const qkd_quantizer *q, float *dw, float *dscales,
                                 float *dzeros, const float *dwq, const float *w,
                                 const float *scales, const float *zeros, int64_t rows,
                                 int64_t cols)
{
    qkd__backend *be = q->ctx->backend;
    qkd__quant_spec spec = kernel_spec(q, &rows, &cols, qkd__quantizer_smooth(q));
    be->fakequant_lsq_backward(be, dw, dscales, dzeros, dwq, w, scales, zeros, rows, cols,
                               &spec);
}

/* ---- host query --------------------------------------------------------------- */

static qkd_status check_finite(qkd_context *ctx, const float *w, int64_t rows, int64_t cols)
{
    for (int64_t i = 0; i < rows * cols; i++) {
        if (!isfinite(w[i]))
            return qkd__error(ctx, QKD_ERR_NON_FINITE,
                              "quantizer quantize: w[%lld] (row %lld, column %lld) is %s",
                              (long long)i, (long long)(i / cols), (long long)(i % cols),
                              isnan(w[i]) ? "NaN" : "infinite");
    }
    return QKD_OK;
}

static qkd_status check_shape(qkd_context *ctx, const float *w, int64_t rows, int64_t cols)
{
    if (!w)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "quantizer quantize: w is NULL");
    if (rows < 1 || cols < 1 || rows > (int64_t)(SIZE_MAX / 4 / sizeof(float)) / cols)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG,
                          "quantizer quantize: shape %lld x %lld is empty or too large",
                          (long long)rows, (long long)cols);
    return QKD_OK;
}

/* Group index of element (r, c), groups in row-major order. */
static int64_t group_of(const qkd_quantizer *q, int64_t r, int64_t c, int64_t cols)
{
    int64_t g = q->p.group_size;
    if (g == -1)
        return 0;
    if (g == 0)
        return r;
    return r * ((cols + g - 1) / g) + c / g;
}

/* Integer codes as deployed: Q = (code - zero) * scale exactly inverts to
 * code = round(Q / scale) + zero. */
static void codes_from(const qkd_quantizer *q, int32_t *codes, const float *wq,
                       const float *scales, const float *zeros, int64_t rows, int64_t cols)
{
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < cols; c++) {
            int64_t g = group_of(q, r, c, cols), i = r * cols + c;
            codes[i] = (int32_t)(round((double)wq[i] / scales[g]) + zeros[g]);
        }
    }
}

/* A format scheme's codes: each row's blocks as the file stores them. */
static void format_codes(const qkd_quantizer *q, int32_t *codes, const float *w, int64_t rows,
                         int64_t cols)
{
    const qkd__ggml_format *f =
        qkd__ggml_format_of((uint32_t)qkd__quant_row_type(q->p.scheme, cols));
    uint8_t blk[QKD__GGML_MAX_BLOCK_BYTES];
    for (int64_t i = 0; i < rows * cols; i += f->block) {
        f->quantize(w + i, blk);
        f->codes(blk, codes + i);
    }
}

/* Run the hard forward kernel on the host arrays w -> host (wq, scales,
 * zeros laid out one after another). */
static qkd_status run_kernel(qkd_quantizer *q, const float *w, int64_t rows, int64_t cols,
                             int64_t n_groups, float *host)
{
    qkd__backend *be = q->ctx->backend;
    const size_t n = (size_t)(rows * cols), ng = (size_t)n_groups;
    float *dev = NULL;
    qkd_status st = be->alloc(be, (2 * n + 2 * ng) * sizeof(float), (void **)&dev);
    if (st != QKD_OK)
        return st;
    float *dev_wq = dev + n;
    st = be->upload(be, dev, w, n * sizeof(float));
    if (st == QKD_OK) {
        qkd__quantizer_forward(q, dev_wq, dev_wq + n, dev_wq + n + ng, dev, rows, cols, 0);
        st = be->sync(be);
    }
    if (st == QKD_OK)
        st = be->download(be, host, dev_wq, (n + 2 * ng) * sizeof(float));
    be->free(be, dev);
    return st;
}

static void copy_out(float *dst, const float *src, size_t n)
{
    if (dst)
        memcpy(dst, src, n * sizeof(float));
}

qkd_status qkd_quantizer_quantize(qkd_quantizer *q, const float *w, int64_t rows, int64_t cols,
                                  float *wq, int32_t *codes, float *scales, float *zeros)
{
    if (!q)
        return QKD_ERR_INVALID_ARG;
    qkd_status st = check_shape(q->ctx, w, rows, cols);
    if (st == QKD_OK)
        st = check_finite(q->ctx, w, rows, cols);
    if (st != QKD_OK)
        return st;
    const int64_t n = rows * cols, ng = qkd_quantizer_n_groups(q, rows, cols);
    float *host = qkd__alloc(q->ctx, (size_t)(n + 2 * ng) * sizeof(float));
    if (!host)
        return qkd__error(q->ctx, QKD_ERR_NO_MEMORY, "quantizer quantize: out of memory");
    st = run_kernel(q, w, rows, cols, ng, host);
    if (st == QKD_OK) {
        const float *h_scales = host + n, *h_zeros = host + n + ng;
        if (codes && qkd__quant_scheme_type(q->p.scheme) >= 0)
            format_codes(q, codes, w, rows, cols);
        else if (codes)
            codes_from(q, codes, host, h_scales, h_zeros, rows, cols);
        copy_out(wq, host, (size_t)n);
        copy_out(scales, h_scales, (size_t)ng);
        copy_out(zeros, h_zeros, (size_t)ng);
    }
    qkd__free(q->ctx, host);
    return st;
}
