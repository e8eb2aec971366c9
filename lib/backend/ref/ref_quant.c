/* Reference fake-quantization kernels; the math of each scheme is in
 * include/qkd/quant.h. One task handles whole groups, in double, so a
 * result never depends on the thread count; format schemes run ggml's
 * block quantizers (lib/quant/ggml_blocks.c), one block per task. */
#include <float.h>
#include <math.h>

#include "backend/ref/ref.h"
#include "core/half.h"
#include "quant/ggml_blocks.h"
#include "quant/quant.h"

/* One group's grid. [lo, hi] is the clip range (values outside are
 * clamped), [qmin, qmax] the code range, d TERNARY's threshold. */
typedef struct grid {
    double lo, hi, qmin, qmax, d;
    float s, z;
} grid;

/* A scale never falls below the smallest normal float: an all-zero group
 * keeps a finite scale (and codes 0). */
static float scale_floor(double s)
{
    return s >= FLT_MIN ? (float)s : FLT_MIN;
}

static double clampd(double x, double lo, double hi)
{
    return x < lo ? lo : x > hi ? hi : x;
}

static double sigmoid(double x)
{
    return 1.0 / (1.0 + exp(-x));
}

/* mean |clamp(w, lo, hi)| over the group: TERNARY's threshold is 0.7 of it. */
static double mean_abs_clamped(const float *w, int64_t n, double lo, double hi)
{
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++)
        sum += fabs(clampd(w[i], lo, hi));
    return sum / (double)n;
}

/* The clip range, code range and TERNARY threshold of a group. */
static grid group_range(const float *w, int64_t n, const qkd__quant_spec *sp)
{
    double mx = 0.0, mn = 0.0; /* zero always lies in the range */
    for (int64_t i = 0; i < n; i++) {
        mx = fmax(mx, w[i]);
        mn = fmin(mn, w[i]);
    }
    const double r = sp->clip_ratio;
    grid g = {0};
    if (sp->scheme == QKD_QUANT_ASYM) {
        g.lo = mn * r;
        g.hi = mx * r;
        g.qmax = (double)((1 << sp->bits) - 1);
        return g;
    }
    g.hi = fmax(mx, -mn) * r;
    g.lo = -g.hi;
    if (sp->scheme == QKD_QUANT_SYM) {
        g.qmax = (double)((1 << (sp->bits - 1)) - 1);
    } else {
        g.qmax = 1.0;
        g.d = 0.7 * mean_abs_clamped(w, n, g.lo, g.hi);
    }
    g.qmin = -g.qmax;
    return g;
}

/* The group's scale and zero point, from its range. */
static void group_scale(grid *g, const float *w, int64_t n, const qkd__quant_spec *sp)
{
    if (sp->scheme == QKD_QUANT_ASYM) {
        g->s = scale_floor((g->hi - g->lo) / g->qmax);
        g->z = (float)clampd(-round(g->lo / g->s), 0.0, g->qmax) + 0.0f; /* never -0 */
    } else if (sp->scheme == QKD_QUANT_SYM) {
        g->s = scale_floor(g->hi / g->qmax);
    } else {
        double sum = 0.0;
        int64_t count = 0;
        for (int64_t i = 0; i < n; i++) {
            if (fabs(w[i]) > g->d) {
                sum += fabs(clampd(w[i], g->lo, g->hi));
                count++;
            }
        }
        g->s = scale_floor(count ? sum / (double)count : 0.0);
    }
}

/* ---- rounding and clamping, hard and smooth ----------------------------------------
 * round_T(u) = floor(u) + (tanh(T (f - 1/2) / 2) + t) / (2 t), f = u - floor(u),
 * t = tanh(T / 4): the sigmoid step of each unit interval rescaled to run
 * from 0 to 1, so round_T is continuous and exact at integers.
 * SoftClamp(x, a, b) = x g(x-a) g(b-x) + a g(a-x) + b g(x-b), g(u) = sigmoid(k u). */

static double round_smooth(double u, double T)
{
    double f = floor(u), t = tanh(0.25 * T);
    return f + 0.5 * (tanh(0.5 * T * (u - f - 0.5)) + t) / t;
}

static double round_smooth_grad(double u, double T)
{
    double f = floor(u), h = tanh(0.5 * T * (u - f - 0.5));
    return T * (1.0 - h * h) / (4.0 * tanh(0.25 * T));
}

static double soft_clamp(double x, double a, double b, double k)
{
    return x * sigmoid(k * (x - a)) * sigmoid(k * (b - x)) + a * sigmoid(k * (a - x)) +
           b * sigmoid(k * (x - b));
}

/* g'(u) = k g(u) (1 - g(u)) */
static double gate_grad(double u, double k)
{
    double g = sigmoid(k * u);
    return k * g * (1.0 - g);
}

static double soft_clamp_grad(double x, double a, double b, double k)
{
    double ga = sigmoid(k * (x - a)), gb = sigmoid(k * (b - x));
    return ga * gb + x * (gate_grad(x - a, k) * gb - ga * gate_grad(b - x, k)) -
           a * gate_grad(a - x, k) + b * gate_grad(x - b, k);
}

/* TERNARY's smooth code: sigmoid(T (w - d) / s) - sigmoid(T (-w - d) / s). */
static double ternary_smooth(const grid *g, double w, double T)
{
    return sigmoid(T * (w - g->d) / g->s) - sigmoid(T * (-w - g->d) / g->s);
}

static double ternary_smooth_grad(const grid *g, double w, double T)
{
    double a = T * (w - g->d) / g->s, b = T * (-w - g->d) / g->s;
    double sa = sigmoid(a), sb = sigmoid(b);
    return T * (sa * (1.0 - sa) + sb * (1.0 - sb)); /* s cancels: Q = s * code */
}

/* Q(w) for one value of a group. */
static float quantize_value(const grid *g, float w, const qkd__quant_spec *sp)
{
    double code;
    if (sp->scheme == QKD_QUANT_TERNARY) {
        code = sp->continuous ? ternary_smooth(g, w, sp->round_T)
                              : (fabs(w) > g->d ? copysign(1.0, w) : 0.0);
        return (float)(code * g->s);
    }
    double u = (double)w / g->s;
    if (sp->continuous)
        code = soft_clamp(round_smooth(u, sp->round_T) + g->z, g->qmin, g->qmax, sp->clamp_T);
    else
        code = clampd(round(u) + g->z, g->qmin, g->qmax);
    return (float)((code - g->z) * g->s);
}

/* dQ(w)/dw for one value, the group's statistics held constant. */
static double value_grad(const grid *g, float w, const qkd__quant_spec *sp)
{
    if (!sp->continuous)
        return w >= g->lo && w <= g->hi; /* STE, zero where the clip clamped */
    if (sp->scheme == QKD_QUANT_TERNARY)
        return ternary_smooth_grad(g, w, sp->round_T);
    double u = (double)w / g->s;
    return soft_clamp_grad(round_smooth(u, sp->round_T) + g->z, g->qmin, g->qmax, sp->clamp_T) *
           round_smooth_grad(u, sp->round_T);
}

/* The largest float not above d: |w| > d exactly when |w| > it, for float w. */
static float threshold_floor(double d)
{
    float f = (float)d;
    return (double)f > d ? nextafterf(f, -INFINITY) : f;
}

/* ---- kernels ------------------------------------------------------------------------ */

struct fq_job {
    float *out;              /* wq, or dw */
    uint16_t *out_bits;      /* wq as bf16 bits instead (fakequant_forward_bf16) */
    float *scales, *zeros;   /* per group: the forward's scale and zero point,
                                or the LSQ backward's dscales and dzeros */
    const float *w, *dq;
    const float *in_scales, *in_zeros; /* the groups' scales and zero points */
    int64_t cols, per_row;
    const qkd__quant_spec *spec;
    int groups_only;         /* fakequant_groups: no wq; TERNARY's zeros
                                receive the thresholds */
};

/* Group `item` (row-major over rows, then groups along a row) of the job. */
static const float *group_at(const struct fq_job *j, const float *base, int64_t item,
                             int64_t *n)
{
    int64_t row = item / j->per_row, first = (item % j->per_row) * j->spec->group;
    int64_t left = j->cols - first;
    *n = left < j->spec->group ? left : j->spec->group;
    return base + row * j->cols + first;
}

static void forward_range(const void *arg, int64_t begin, int64_t end)
{
    const struct fq_job *j = arg;
    for (int64_t item = begin; item < end; item++) {
        int64_t n;
        const float *w = group_at(j, j->w, item, &n);
        grid g = group_range(w, n, j->spec);
        group_scale(&g, w, n, j->spec);
        j->scales[item] = g.s;
        if (j->groups_only) {
            j->zeros[item] = j->spec->scheme == QKD_QUANT_TERNARY ? threshold_floor(g.d) : g.z;
            continue;
        }
        const size_t at = (size_t)(w - j->w);
        for (int64_t i = 0; i < n; i++) {
            const float q = quantize_value(&g, w[i], j->spec);
            if (j->out_bits)
                j->out_bits[at + i] = qkd__f32_to_bf16(q);
            else
                j->out[at + i] = q;
        }
        j->zeros[item] = g.z;
    }
}

/* Q(w) (hard rounding) from the groups of fakequant_groups. */
static void apply_range(const void *arg, int64_t begin, int64_t end)
{
    const struct fq_job *j = arg;
    for (int64_t item = begin; item < end; item++) {
        int64_t n;
        const float *w = group_at(j, j->w, item, &n);
        float *out = j->out + (w - j->w);
        grid g = group_range(w, n, j->spec); /* the code range */
        g.s = j->in_scales[item];
        if (j->spec->scheme == QKD_QUANT_TERNARY)
            g.d = j->in_zeros[item];
        else
            g.z = j->in_zeros[item];
        for (int64_t i = 0; i < n; i++)
            out[i] = quantize_value(&g, w[i], j->spec);
    }
}

static void backward_range(const void *arg, int64_t begin, int64_t end)
{
    const struct fq_job *j = arg;
    for (int64_t item = begin; item < end; item++) {
        int64_t n;
        const float *w = group_at(j, j->w, item, &n);
        const size_t at = (size_t)(w - j->w);
        float *dw = j->out + at;
        const float *dq = j->dq + at;
        if (!j->spec->continuous && j->spec->clip_ratio >= 1.0f) {
            for (int64_t i = 0; i < n; i++) /* the plain STE (format schemes too) */
                dw[i] += dq[i];
            continue;
        }
        grid g = group_range(w, n, j->spec);
        g.s = j->in_scales[item];
        g.z = j->in_zeros[item];
        for (int64_t i = 0; i < n; i++)
            dw[i] = (float)(dw[i] + value_grad(&g, w[i], j->spec) * dq[i]);
    }
}

static int64_t groups_per_row(int64_t cols, int64_t group)
{
    return (cols + group - 1) / group;
}

/* ---- format schemes ---------------------------------------------------------------- */

struct format_job {
    float *wq, *scales, *zeros;
    const float *w;
    const qkd__ggml_format *f;
};

/* Blocks [begin, end) of the whole weight: the format's block divides the
 * row, so no block straddles two rows and block k's groups come k-th. */
static void format_range(const void *arg, int64_t begin, int64_t end)
{
    const struct format_job *j = arg;
    const qkd__ggml_format *f = j->f;
    const int64_t per_block = f->group ? f->block / f->group : 0;
    uint8_t blk[QKD__GGML_MAX_BLOCK_BYTES];
    for (int64_t k = begin; k < end; k++) {
        f->quantize(j->w + k * f->block, blk);
        f->dequantize(blk, j->wq + k * f->block);
        if (per_block)
            f->groups(blk, j->scales + k * per_block, j->zeros + k * per_block);
    }
}

static void format_forward(qkd__backend *b, float *wq, float *scales, float *zeros,
                           const float *w, int64_t rows, int64_t cols, int type)
{
    struct format_job job = {.wq = wq, .scales = scales, .zeros = zeros, .w = w,
                             .f = qkd__ggml_format_of((uint32_t)type)};
    qkd__ref_parallel(b, rows * cols / job.f->block, job.f->block * 60, format_range, &job);
}

/* A forward job (outputs, w and spec set) over the groups of rows x cols. */
static void forward_groups(qkd__backend *b, struct fq_job *job, int64_t rows, int64_t cols)
{
    const qkd__quant_spec *spec = job->spec;
    job->cols = cols;
    job->per_row = groups_per_row(cols, spec->group);
    int64_t per_group = cols < spec->group ? cols : spec->group;
    qkd__ref_parallel(b, rows * job->per_row, per_group * (spec->continuous ? 120 : 20),
                      forward_range, job);
}

void qkd__ref_fakequant_forward(qkd__backend *b, float *wq, float *scales, float *zeros,
                                const float *w, int64_t rows, int64_t cols,
                                const qkd__quant_spec *spec)
{
    const int type = qkd__quant_row_type(spec->scheme, cols);
    if (type >= 0) {
        format_forward(b, wq, scales, zeros, w, rows, cols, type);
        return;
    }
    struct fq_job job = {.out = wq, .scales = scales, .zeros = zeros, .w = w, .spec = spec};
    forward_groups(b, &job, rows, cols);
}

void qkd__ref_fakequant_forward_bf16(qkd__backend *b, uint16_t *wq, float *scales,
                                     float *zeros, const float *w, int64_t rows, int64_t cols,
                                     const qkd__quant_spec *spec)
{
    struct fq_job job = {.out_bits = wq, .scales = scales, .zeros = zeros, .w = w,
                         .spec = spec};
    forward_groups(b, &job, rows, cols);
}

void qkd__ref_fakequant_backward(qkd__backend *b, float *dw, const float *dwq, const float *w,
                                 const float *scales, const float *zeros, int64_t rows,
                                 int64_t cols, const qkd__quant_spec *spec)
{
    struct fq_job job = {.out = dw, .w = w, .dq = dwq, .in_scales = scales, .in_zeros = zeros,
                         .cols = cols, .per_row = groups_per_row(cols, spec->group),
                         .spec = spec};
    int64_t per_group = cols < spec->group ? cols : spec->group;
    qkd__ref_parallel(b, rows * job.per_row, per_group * (spec->continuous ? 150 : 10),
                      backward_range, &job);
}

void qkd__ref_fakequant_groups(qkd__backend *b, float *scales, float *zeros, const float *w,
                               int64_t rows, int64_t cols, const qkd__quant_spec *spec)
{
    struct fq_job job = {.scales = scales, .zeros = zeros, .w = w, .cols = cols,
                         .per_row = groups_per_row(cols, spec->group), .spec = spec,
                         .groups_only = 1};
    int64_t per_group = cols < spec->group ? cols : spec->group;
    qkd__ref_parallel(b, rows * job.per_row, per_group * 4, forward_range, &job);
}

/* The fused products compose: Q(w) into the scratch, then the plain product. */
static const float *apply_groups(qkd__backend *b, const qkd__qweight *q, int64_t rows,
                                 int64_t cols)
{
    struct fq_job job = {.out = q->scratch, .w = q->w, .in_scales = q->scales,
                         .in_zeros = q->zeros, .cols = cols,
                         .per_row = groups_per_row(cols, q->spec->group), .spec = q->spec};
    int64_t per_group = cols < q->spec->group ? cols : q->spec->group;
    qkd__ref_parallel(b, rows * job.per_row, per_group * 20, apply_range, &job);
    return q->scratch;
}

void qkd__ref_matmul_forward_fq(qkd__backend *b, float *out, const float *inp,
                                const qkd__qweight *w, int N, int C, int OC)
{
    qkd__ref_matmul_forward(b, out, inp, apply_groups(b, w, OC, C), N, C, OC);
}

void qkd__ref_matmul_backward_input_fq(qkd__backend *b, float *dinp, const float *dout,
                                       const qkd__qweight *w, int N, int C, int OC)
{
    qkd__ref_matmul_backward_input(b, dinp, dout, apply_groups(b, w, OC, C), N, C, OC);
}

/* ---- learned scales (LSQ) --------------------------------------------------------------
 * The group's stored scale (floored at FLT_MIN) and, for ASYM, its zero
 * point rounded and clamped to the code range replace the computed ones;
 * both the floor and the rounding pass their gradient straight through.
 * The clip range and TERNARY's threshold still come from the group. */

static grid learned_grid(const struct fq_job *j, const float *w, int64_t n, int64_t item)
{
    grid g = group_range(w, n, j->spec);
    g.s = scale_floor(j->in_scales[item]);
    if (j->in_zeros)
        g.z = (float)clampd(round(j->in_zeros[item]), 0.0, g.qmax) + 0.0f; /* never -0 */
    return g;
}

/* dQ/dw, dQ/ds and dQ/dz of one value. */
typedef struct lsq_grad {
    double w, s, z;
} lsq_grad;

static lsq_grad ternary_lsq_grad(const grid *g, float w, const qkd__quant_spec *sp)
{
    if (!sp->continuous) /* Q = s c: the code does not depend on s */
        return (lsq_grad){w >= g->lo && w <= g->hi, fabs(w) > g->d ? copysign(1.0, w) : 0.0,
                          0.0};
    const double T = sp->round_T, a = T * (w - g->d) / g->s, b = T * (-w - g->d) / g->s;
    const double sa = sigmoid(a), sb = sigmoid(b), da = sa * (1.0 - sa), db = sb * (1.0 - sb);
    return (lsq_grad){T * (da + db), sa - sb - da * a + db * b, 0.0};
}

static lsq_grad lsq_value_grad(const grid *g, float w, const qkd__quant_spec *sp)
{
    if (sp->scheme == QKD_QUANT_TERNARY)
        return ternary_lsq_grad(g, w, sp);
    const double u = (double)w / g->s;
    if (sp->continuous) { /* Q = s (SoftClamp(round_T(u) + z) - z), exactly */
        const double T = sp->round_T, dr = round_smooth_grad(u, T);
        const double k = round_smooth(u, T) + g->z;
        const double c = soft_clamp(k, g->qmin, g->qmax, sp->clamp_T);
        const double dc = soft_clamp_grad(k, g->qmin, g->qmax, sp->clamp_T);
        return (lsq_grad){dc * dr, c - g->z - dc * dr * u, g->s * (dc - 1.0)};
    }
    const double k = round(u) + g->z; /* the code before its clamp */
    if (k >= g->qmin && k <= g->qmax)
        return (lsq_grad){1.0, round(u) - u, 0.0};
    return (lsq_grad){0.0, clampd(k, g->qmin, g->qmax) - g->z, -g->s};
}

static void lsq_forward_range(const void *arg, int64_t begin, int64_t end)
{
    const struct fq_job *j = arg;
    for (int64_t item = begin; item < end; item++) {
        int64_t n;
        const float *w = group_at(j, j->w, item, &n);
        float *out = j->out + (w - j->w);
        grid g = learned_grid(j, w, n, item);
        for (int64_t i = 0; i < n; i++)
            out[i] = quantize_value(&g, w[i], j->spec);
    }
}

static void lsq_backward_range(const void *arg, int64_t begin, int64_t end)
{
    const struct fq_job *j = arg;
    for (int64_t item = begin; item < end; item++) {
        int64_t n;
        const float *w = group_at(j, j->w, item, &n);
        const size_t at = (size_t)(w - j->w);
        float *dw = j->out + at;
        const float *dq = j->dq + at;
        grid g = learned_grid(j, w, n, item);
        double ds = 0.0, dz = 0.0;
        for (int64_t i = 0; i < n; i++) {
            lsq_grad d = lsq_value_grad(&g, w[i], j->spec);
            dw[i] = (float)(dw[i] + d.w * dq[i]);
            ds += d.s * dq[i];
            dz += d.z * dq[i];
        }
        j->scales[item] = (float)(j->scales[item] + ds);
        if (j->zeros)
            j->zeros[item] = (float)(j->zeros[item] + dz);
    }
}

void qkd__ref_fakequant_lsq_forward(qkd__backend *b, float *wq, const float *w,
                                    const float *scales, const float *zeros, int64_t rows,
                                    int64_t cols, const qkd__quant_spec *spec)
{
    struct fq_job job = {.out = wq, .w = w, .in_scales = scales, .in_zeros = zeros,
                         .cols = cols, .per_row = groups_per_row(cols, spec->group),
                         .spec = spec};
    int64_t per_group = cols < spec->group ? cols : spec->group;
    qkd__ref_parallel(b, rows * job.per_row, per_group * (spec->continuous ? 120 : 20),
                      lsq_forward_range, &job);
}

void qkd__ref_fakequant_lsq_backward(qkd__backend *b, float *dw, float *dscales, float *dzeros,
                                     const float *dwq, const float *w, const float *scales,
                                     const float *zeros, int64_t rows, int64_t cols,
                                     const qkd__quant_spec *spec)
{
    struct fq_job job = {.out = dw, .scales = dscales, .zeros = dzeros, .w = w, .dq = dwq,
                         .in_scales = scales, .in_zeros = zeros, .cols = cols,
                         .per_row = groups_per_row(cols, spec->group), .spec = spec};
    int64_t per_group = cols < spec->group ? cols : spec->group;
    qkd__ref_parallel(b, rows * job.per_row, per_group * (spec->continuous ? 200 : 30),
                      lsq_backward_range, &job);
}

/* ---- dynamic per-row quantization (activations, KV cache) ----------------------------- */

struct rows_job {
    float *out;
    const float *x;
    int64_t cols;
    qkd__quant_spec spec;
};

static void quant_rows_range(const void *arg, int64_t begin, int64_t end)
{
    const struct rows_job *j = arg;
    for (int64_t r = begin; r < end; r++) {
        const float *x = j->x + r * j->cols;
        float *out = j->out + r * j->cols;
        grid g = group_range(x, j->cols, &j->spec);
        group_scale(&g, x, j->cols, &j->spec);
        for (int64_t i = 0; i < j->cols; i++) /* reads x[i] before writing it */
            out[i] = quantize_value(&g, x[i], &j->spec);
    }
}

void qkd__ref_quant_rows(qkd__backend *b, float *out, const float *x, int64_t rows,
                         int64_t cols, int bits)
{
    struct rows_job job = {.out = out, .x = x, .cols = cols,
                           .spec = {.scheme = QKD_QUANT_SYM, .bits = bits, .group = cols,
                                    .clip_ratio = 1.0f}};
    qkd__ref_parallel(b, rows, cols * 20, quant_rows_range, &job);
}
