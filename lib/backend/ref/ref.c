/* The reference backend: plain scalar C on host memory, the oracle every
 * other backend is tested against. This file holds the table, memory,
 * elementwise kernels, the optimizer update and the parallel-for; the
 * other kernel families live beside it (ref.h lists them). */
#include <math.h>
#include <string.h>

#include "backend/ref/ref.h"
#include "core/half.h"

/* Below this many flops a job is not worth waking other threads for. */
#define MIN_TASK_FLOPS 16384

/* ---- parallel-for ------------------------------------------------------ */

struct range_job {
    qkd__ref_range_fn fn;
    const void *arg;
    int64_t n;
    int64_t per_task;
};

static void range_task(void *p, int64_t task)
{
    const struct range_job *job = p;
    int64_t begin = task * job->per_task;
    int64_t end = job->n - begin < job->per_task ? job->n : begin + job->per_task;
    job->fn(job->arg, begin, end);
}

void qkd__ref_parallel(qkd__backend *b, int64_t n, int64_t cost, qkd__ref_range_fn fn,
                       const void *arg)
{
    if (n <= 0)
        return;
    qkd__pool *pool = b->ctx->pool;
    /* A few tasks per thread even out uneven items (causal attention rows). */
    double tasks = 4.0 * qkd__pool_size(pool);
    double by_work = (double)n * (double)(cost > 0 ? cost : 1) / MIN_TASK_FLOPS;
    if (by_work < tasks)
        tasks = by_work;
    if (tasks > (double)n)
        tasks = (double)n;
    if (tasks < 2) {
        fn(arg, 0, n);
        return;
    }
    int64_t per_task = (n + (int64_t)tasks - 1) / (int64_t)tasks;
    struct range_job job = {.fn = fn, .arg = arg, .n = n, .per_task = per_task};
    qkd__pool_run(pool, (n + per_task - 1) / per_task, range_task, &job);
}

double qkd__ref_dot(const float *x, const float *y, int n)
{
    double s = 0.0;
    for (int i = 0; i < n; i++)
        s += (double)x[i] * y[i];
    return s;
}

/* ---- memory -------------------------------------------------------------- */

static qkd_status ref_alloc(qkd__backend *b, size_t bytes, void **out)
{
    *out = NULL;
    if (bytes == 0)
        return qkd__error(b->ctx, QKD_ERR_INVALID_ARG, "ref backend: allocation of 0 bytes");
    void *p = qkd__alloc(b->ctx, bytes);
    if (!p)
        return qkd__error(b->ctx, QKD_ERR_NO_MEMORY,
                          "ref backend: out of memory allocating %zu bytes", bytes);
    *out = p;
    return QKD_OK;
}

static void ref_free(qkd__backend *b, void *ptr)
{
    qkd__free(b->ctx, ptr);
}

/* Device memory is host memory, so transfers are plain copies. */
static qkd_status ref_transfer(qkd__backend *b, void *dst, const void *src, size_t bytes)
{
    (void)b;
    if (bytes)
        memcpy(dst, src, bytes);
    return QKD_OK;
}

/* Kernels run synchronously: nothing is ever pending. */
static qkd_status ref_sync(qkd__backend *b)
{
    (void)b;
    return QKD_OK;
}

/* ---- elementwise ----------------------------------------------------------- */

static void ref_fill(qkd__backend *b, float *x, float value, size_t n)
{
    (void)b;
    for (size_t i = 0; i < n; i++)
        x[i] = value;
}

static void ref_copy(qkd__backend *b, float *dst, const float *src, size_t n)
{
    (void)b;
    if (n)
        memmove(dst, src, n * sizeof *dst);
}

static void ref_to_bf16_bits(qkd__backend *b, uint16_t *dst, const float *x, size_t n)
{
    (void)b;
    for (size_t i = 0; i < n; i++)
        dst[i] = qkd__f32_to_bf16(x[i]);
}

static void ref_round_to_bf16(qkd__backend *b, float *x, size_t n)
{
    (void)b;
    for (size_t i = 0; i < n; i++)
        x[i] = qkd__bf16_round(x[i]);
}

static void ref_add(qkd__backend *b, float *out, const float *x, const float *y, size_t n)
{
    (void)b;
    for (size_t i = 0; i < n; i++)
        out[i] = x[i] + y[i];
}

static void ref_axpy(qkd__backend *b, float *y, float alpha, const float *x, size_t n)
{
    (void)b;
    for (size_t i = 0; i < n; i++)
        y[i] = (float)(y[i] + (double)alpha * x[i]);
}

static void ref_scale(qkd__backend *b, float *x, float alpha, size_t n)
{
    (void)b;
    for (size_t i = 0; i < n; i++)
        x[i] *= alpha;
}

static void ref_sum(qkd__backend *b, float *out, const float *x, size_t n)
{
    (void)b;
    double s = 0.0;
    for (size_t i = 0; i < n; i++)
        s += x[i];
    *out = (float)s;
}

static void ref_sum_squares(qkd__backend *b, float *out, const float *x, size_t n)
{
    (void)b;
    double s = 0.0;
    for (size_t i = 0; i < n; i++)
        s += (double)x[i] * x[i];
    *out = (float)s;
}

/* ---- optimizer ---------------------------------------------------------------- */

/* AdamW on g * gscale (the float product, as `scale` on a copy gives). */
static void adamw_span(float *p, const float *g, float gscale, float *m, float *v, size_t n,
                       float lr, const qkd__adamw_k *k)
{
    for (size_t i = 0; i < n; i++)
        qkd__adamw_one(&p[i], g[i] * gscale, &m[i], &v[i], lr, k);
}

static void ref_adamw_update(qkd__backend *b, float *p, const float *g, float *m, float *v,
                             size_t n, float lr, float b1, float b2, float eps, float wd, int t)
{
    (void)b;
    const qkd__adamw_k k = qkd__adamw_k_at(b1, b2, eps, wd, t);
    adamw_span(p, g, 1.0f, m, v, n, lr, &k);
}

static void ref_step_decide(qkd__backend *b, qkd__step_state *st, const float *norms, int n,
                            float max_norm, float b1, float b2)
{
    (void)b;
    double sum = 0.0;
    for (int k = 0; k < n; k++)
        sum += norms[k];
    qkd__step_decide(st, sum, max_norm, b1, b2);
}

static void ref_adamw_update_multi_dev(qkd__backend *b, const qkd__update_span *spans,
                                       int n_spans, const qkd__step_state *st, float b1,
                                       float b2, float eps, float wd,
                                       const qkd__quant_spec *fq)
{
    const qkd__adamw_k k = qkd__adamw_k_of(b1, b2, eps, wd, st->rbc1, st->rbc2);
    for (int i = 0; i < n_spans; i++) {
        const qkd__update_span *s = &spans[i];
        if (!st->skipped)
            adamw_span(s->p, s->g, st->gscale, s->m, s->v, s->n, s->lr, &k);
        if (s->wq) /* a skipped step too: Q(p) of the weights it leaves */
            qkd__ref_fakequant_forward_bf16(b, s->wq, s->scales, s->zeros, s->p,
                                            (int64_t)s->n / fq->group, fq->group, fq);
    }
}

/* ---- the table ---------------------------------------------------------------- */

static void *ref_extra(qkd__backend *b, const char *name)
{
    (void)b;
    (void)name;
    return NULL;
}

static void ref_destroy(qkd__backend *b)
{
    qkd__free(b->ctx, b);
}

static const qkd__backend ref_table = {
    .abi = QKD__BACKEND_ABI,
    .name = "ref",
    .destroy = ref_destroy,
    .extra = ref_extra,
    .alloc = ref_alloc,
    .free = ref_free,
    .upload = ref_transfer,
    .download = ref_transfer,
    .sync = ref_sync,
    .fill = ref_fill,
    .copy = ref_copy,
    .add = ref_add,
    .axpy = ref_axpy,
    .scale = ref_scale,
    .sum = ref_sum,
    .sum_squares = ref_sum_squares,
    .to_bf16_bits = ref_to_bf16_bits,
    .round_to_bf16 = ref_round_to_bf16,
    .matmul_forward = qkd__ref_matmul_forward,
    .matmul_backward_input = qkd__ref_matmul_backward_input,
    .matmul_backward_weight = qkd__ref_matmul_backward_weight,
    .matmul_forward_bf16 = qkd__ref_matmul_forward_bf16,
    .matmul_backward_input_bf16 = qkd__ref_matmul_backward_input_bf16,
    .matmul_backward_weight_bf16 = qkd__ref_matmul_backward_weight_bf16,
    .matmul_forward_bf16_bits = qkd__ref_matmul_forward_bf16_bits,
    .matmul_forward_to_bf16_bits = qkd__ref_matmul_forward_to_bf16_bits,
    .matmul_backward_input_to_bf16_bits = qkd__ref_matmul_backward_input_to_bf16_bits,
    .matmul_backward_input_bf16_bits = qkd__ref_matmul_backward_input_bf16_bits,
    .matmul_backward_weight_bf16_bits = qkd__ref_matmul_backward_weight_bf16_bits,
    .embedding_forward = qkd__ref_embedding_forward,
    .embedding_backward = qkd__ref_embedding_backward,
    .rmsnorm_forward = qkd__ref_rmsnorm_forward,
    .rmsnorm_forward_bf16_bits = qkd__ref_rmsnorm_forward_bf16_bits,
    .add_rmsnorm_forward_bf16_bits = qkd__ref_add_rmsnorm_forward_bf16_bits,
    .rmsnorm_backward = qkd__ref_rmsnorm_backward,
    .rmsnorm_backward_bf16_bits = qkd__ref_rmsnorm_backward_bf16_bits,
    .rope_forward = qkd__ref_rope_forward,
    .rope_backward = qkd__ref_rope_backward,
    .attention_scratch_floats = qkd__ref_attention_scratch_floats,
    .attention_forward = qkd__ref_attention_forward,
    .attention_backward = qkd__ref_attention_backward,
    .attention_forward_bf16 = qkd__ref_attention_forward_bf16,
    .attention_backward_bf16 = qkd__ref_attention_backward_bf16,
    .swiglu_forward = qkd__ref_swiglu_forward,
    .swiglu_backward = qkd__ref_swiglu_backward,
    .swiglu_forward_bf16_bits = qkd__ref_swiglu_forward_bf16_bits,
    .swiglu_backward_bf16_bits = qkd__ref_swiglu_backward_bf16_bits,
    .softmax_forward = qkd__ref_softmax_forward,
    .softmax_backward = qkd__ref_softmax_backward,
    .log_softmax_forward = qkd__ref_log_softmax_forward,
    .log_softmax_backward = qkd__ref_log_softmax_backward,
    .cross_entropy_forward = qkd__ref_cross_entropy_forward,
    .cross_entropy_backward = qkd__ref_cross_entropy_backward,
    .adamw_update = ref_adamw_update,
    .step_decide = ref_step_decide,
    .adamw_update_multi_dev = ref_adamw_update_multi_dev,
    .sgd_update = qkd__ref_sgd_update,
    .fakequant_forward = qkd__ref_fakequant_forward,
    .fakequant_forward_bf16 = qkd__ref_fakequant_forward_bf16,
    .fakequant_backward = qkd__ref_fakequant_backward,
    .quant_rows = qkd__ref_quant_rows,
    .fakequant_lsq_forward = qkd__ref_fakequant_lsq_forward,
    .fakequant_lsq_backward = qkd__ref_fakequant_lsq_backward,
    .fakequant_groups = qkd__ref_fakequant_groups,
    .matmul_forward_fq = qkd__ref_matmul_forward_fq,
    .matmul_backward_input_fq = qkd__ref_matmul_backward_input_fq,
    .kd_loss = qkd__ref_kd_loss,
    .tsld_weights = qkd__ref_tsld_weights,
    .row_max_prob = qkd__ref_row_max_prob,
};

qkd_status qkd__backend_ref_create(qkd_context *ctx, qkd__backend **out)
{
    *out = NULL;
    qkd__backend *b = qkd__alloc(ctx, sizeof *b);
    if (!b)
        return qkd__error(ctx, QKD_ERR_NO_MEMORY, "ref backend: out of memory");
    *b = ref_table;
    b->ctx = ctx;
    *out = b;
    return QKD_OK;
}
