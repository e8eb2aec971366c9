/* The SIMD backend's table, instruction-set choice, workspace and
 * parallel-for. */
#include <limits.h>
#include <math.h>

#include "backend/simd/simd.h"

#define ROPE_TABLES 4

/* The backend's private state. */
struct simd_impl {
    float *ws;
    size_t ws_floats;
    /* RoPE tables of the last few (hd, width, theta) used, so models of
     * other head sizes or bases sharing the context do not rebuild one
     * another's table at every call */
    struct rope_table {
        float *rows;
        int hd, width, n_pos;
        float theta;
    } rope[ROPE_TABLES];
    int rope_next; /* the slot a new kind of table replaces */
    void (*ref_destroy)(qkd__backend *b); /* frees the table itself */
};

/* Below this many flops a job runs on the calling thread. The pool's
 * threads spin between the runs of a step, so handing work over costs a
 * few microseconds: a job of tens of microseconds (the packing of a
 * stories260K product, RoPE over a batch) is worth splitting. */
#define MIN_PARALLEL_FLOPS 50000.0

float *qkd__simd_workspace(qkd__backend *b, size_t floats)
{
    struct simd_impl *impl = b->impl;
    if (floats < 16)
        floats = 16;
    if (floats <= impl->ws_floats)
        return impl->ws;
    /* Grow by half again, so a slowly growing need does not reallocate
     * every call. */
    size_t want = floats + floats / 2;
    float *ws = want <= SIZE_MAX / sizeof *ws ? qkd__alloc(b->ctx, want * sizeof *ws) : NULL;
    if (!ws)
        return NULL;
    qkd__free(b->ctx, impl->ws);
    impl->ws = ws;
    impl->ws_floats = want;
    return ws;
}

void qkd__simd_run(qkd__backend *b, int64_t n_tasks, double flops, qkd__task_fn fn, void *arg)
{
    if (flops < MIN_PARALLEL_FLOPS) {
        for (int64_t i = 0; i < n_tasks; i++)
            fn(arg, i);
        return;
    }
    qkd__pool_run(b->ctx->pool, n_tasks, fn, arg);
}

/* Tasks per thread of a parallel job: a few even out uneven items. */
#define TASKS_PER_THREAD 4
/* Least work of one task. */
#define MIN_TASK_FLOPS (MIN_PARALLEL_FLOPS / 4)

/* How many tasks a job of n items of `flops` each is worth. */
static int64_t n_tasks(qkd__backend *b, int64_t n, double flops)
{
    double total = (double)n * flops;
    if (total < MIN_PARALLEL_FLOPS)
        return 1;
    double tasks = (double)TASKS_PER_THREAD * qkd__pool_size(b->ctx->pool);
    if (tasks > total / MIN_TASK_FLOPS)
        tasks = total / MIN_TASK_FLOPS;
    return tasks > (double)n ? n : (int64_t)tasks;
}

/* Items [*begin, *end) of task `task`, per_task items each, of n. */
static void task_items(int64_t task, int64_t per_task, int64_t n, int64_t *begin, int64_t *end)
{
    *begin = task * per_task;
    *end = n - *begin < per_task ? n : *begin + per_task;
}

struct range_job {
    qkd__ref_range_fn fn;
    const void *arg;
    int64_t n, per_task;
};

static void range_task(void *p, int64_t task)
{
    const struct range_job *job = p;
    int64_t begin, end;
    task_items(task, job->per_task, job->n, &begin, &end);
    job->fn(job->arg, begin, end);
}

void qkd__simd_parallel(qkd__backend *b, int64_t n, double cost, qkd__ref_range_fn fn,
                        const void *arg)
{
    if (n <= 0)
        return;
    int64_t tasks = n_tasks(b, n, cost);
    if (tasks < 2) {
        fn(arg, 0, n);
        return;
    }
    int64_t per_task = (n + tasks - 1) / tasks;
    struct range_job job = {.fn = fn, .arg = arg, .n = n, .per_task = per_task};
    qkd__pool_run(b->ctx->pool, (n + per_task - 1) / per_task, range_task, &job);
}

struct slot_job {
    qkd__simd_slot_fn fn;
    const void *arg;
    float *ws;
    size_t slot_floats;
    int64_t n, per_task;
};

static void slot_task(void *p, int64_t task)
{
    const struct slot_job *job = p;
    int64_t begin, end;
    task_items(task, job->per_task, job->n, &begin, &end);
    job->fn(job->arg, begin, end, job->ws + (size_t)task * job->slot_floats);
}

/* Slots whole cache lines apart. */
static size_t slot_stride(size_t slot_floats)
{
    return (slot_floats + 15) & ~(size_t)15;
}

/* The job's tasks, each with a slot in ws (room for `tasks` slots). */
static void run_slots(qkd__backend *b, int64_t n, int64_t tasks, int64_t per_task, double flops,
                      size_t slot_floats, float *ws, qkd__simd_slot_fn fn, const void *arg)
{
    struct slot_job job = {.fn = fn, .arg = arg, .ws = ws, .slot_floats = slot_stride(slot_floats),
                           .n = n, .per_task = per_task};
    qkd__simd_run(b, tasks, (double)n * flops, slot_task, &job);
}

/* Tasks of a slot job of n items and their items per task. */
static int64_t slot_tasks(qkd__backend *b, int64_t n, double flops, int64_t *per_task)
{
    int64_t tasks = n_tasks(b, n, flops);
    *per_task = (n + tasks - 1) / tasks;
    return (n + *per_task - 1) / *per_task;
}

int qkd__simd_parallel_slots(qkd__backend *b, int64_t n, double flops, size_t slot_floats,
                             qkd__simd_slot_fn fn, const void *arg)
{
    if (n <= 0)
        return 1;
    int64_t per_task, tasks = slot_tasks(b, n, flops, &per_task);
    size_t stride = slot_stride(slot_floats);
    if (stride && (size_t)tasks > SIZE_MAX / sizeof(float) / stride)
        return 0;
    float *ws = qkd__simd_workspace(b, (size_t)tasks * stride);
    if (!ws)
        return 0;
    run_slots(b, n, tasks, per_task, flops, slot_floats, ws, fn, arg);
    return 1;
}

size_t qkd__simd_slots_floats(qkd__backend *b, size_t slot_floats)
{
    size_t tasks = (size_t)TASKS_PER_THREAD * (size_t)qkd__pool_size(b->ctx->pool);
    return tasks * slot_stride(slot_floats) + 15;
}

void qkd__simd_parallel_slots_in(qkd__backend *b, int64_t n, double flops, size_t slot_floats,
                                 float *mem, qkd__simd_slot_fn fn, const void *arg)
{
    if (n <= 0)
        return;
    int64_t per_task, tasks = slot_tasks(b, n, flops, &per_task);
    float *ws = (float *)(((uintptr_t)mem + 63) & ~(uintptr_t)63);
    run_slots(b, n, tasks, per_task, flops, slot_floats, ws, fn, arg);
}

/* Positions [begin, end) of the RoPE table in arg. */
static void rope_rows_range(const void *arg, int64_t begin, int64_t end)
{
    const struct rope_table *r = arg;
    for (int64_t pos = begin; pos < end; pos++) {
        float *cs = r->rows + (size_t)pos * 2 * r->width, *sn = cs + r->width;
        for (int p = 0; p + 1 < r->hd; p += 2) {
            double angle = (double)pos * pow(r->theta, -(double)p / r->hd);
            float c = (float)cos(angle), s = (float)sin(angle);
            for (int at = p; at < r->width; at += r->hd) {
                cs[at] = cs[at + 1] = c;
                sn[at] = -s;
                sn[at + 1] = s;
            }
        }
        for (int at = r->hd - 1; r->hd % 2 && at < r->width; at += r->hd) {
            cs[at] = 1.0f;
            sn[at] = 0.0f;
        }
    }
}

/* The slot of the table for (hd, width, theta): its own, else the next
 * one to replace. */
static struct rope_table *rope_slot(struct simd_impl *impl, int hd, int width, float theta)
{
    for (int i = 0; i < ROPE_TABLES; i++) {
        struct rope_table *r = &impl->rope[i];
        if (r->rows && r->hd == hd && r->width == width && r->theta == theta)
            return r;
    }
    struct rope_table *r = &impl->rope[impl->rope_next];
    impl->rope_next = (impl->rope_next + 1) % ROPE_TABLES;
    return r;
}

const float *qkd__simd_rope_table(qkd__backend *b, int hd, int width, float theta, int n_pos)
{
    struct rope_table *r = rope_slot(b->impl, hd, width, theta);
    if (r->rows && r->hd == hd && r->width == width && r->theta == theta && r->n_pos >= n_pos)
        return r->rows;
    /* Room for half as many positions again: decoding grows one a call. */
    int64_t want = (int64_t)n_pos + n_pos / 2;
    if (want > INT_MAX)
        want = n_pos;
    if ((uint64_t)want > SIZE_MAX / sizeof(float) / 2 / (size_t)width)
        return NULL;
    float *rows = qkd__alloc(b->ctx, (size_t)want * 2 * (size_t)width * sizeof *rows);
    if (!rows)
        return NULL;
    qkd__free(b->ctx, r->rows);
    *r = (struct rope_table){.rows = rows, .hd = hd, .width = width, .n_pos = (int)want,
                             .theta = theta};
    qkd__simd_parallel(b, want, 40.0 * width, rope_rows_range, r);
    return rows;
}

static void simd_destroy(qkd__backend *b)
{
    struct simd_impl *impl = b->impl;
    void (*ref_destroy)(qkd__backend *b) = impl->ref_destroy;
    for (int i = 0; i < ROPE_TABLES; i++)
        qkd__free(b->ctx, impl->rope[i].rows);
    qkd__free(b->ctx, impl->ws);
    qkd__free(b->ctx, impl);
    ref_destroy(b);
}

#ifdef __aarch64__
/* NEON is mandatory in AArch64: every CPU this build runs on has it. */
static void install_best(qkd__backend *b)
{
    qkd__simd_install_neon(b);
}
#else
/* The best instruction set this CPU (and its OS, which must save the
 * wider registers) supports; the caller keeps the reference kernels when
 * there is none. */
static void install_best(qkd__backend *b)
{
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("fma"))
        (__builtin_cpu_supports("avx512bf16") ? qkd__simd_install_avx512bf16
                                              : qkd__simd_install_avx512)(b);
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        qkd__simd_install_avx2(b);
}
#endif

/* The reference's bf16-bits family would route a bf16 model's products
 * to the scalar kernels: without it the model keeps fp32 operands, which
 * the vector bf16 products round as they pack them. */
static void drop_bf16_bits(qkd__backend *b)
{
    b->matmul_forward_bf16_bits = NULL;
    b->matmul_backward_input_bf16_bits = NULL;
    b->matmul_backward_weight_bf16_bits = NULL;
    b->matmul_forward_to_bf16_bits = NULL;
    b->matmul_backward_input_to_bf16_bits = NULL;
    b->rmsnorm_forward_bf16_bits = NULL;
    b->add_rmsnorm_forward_bf16_bits = NULL;
    b->rmsnorm_backward_bf16_bits = NULL;
    b->swiglu_forward_bf16_bits = NULL;
    b->swiglu_backward_bf16_bits = NULL;
    b->fakequant_forward_bf16 = NULL;
}

/* A CPU backend has no host round trip to save: without the reference's
 * device-decided step, a deferred step is the synchronous one and runs
 * SIMD's vector AdamW rather than the reference's scalar loop. */
static void drop_device_step(qkd__backend *b)
{
    b->step_decide = NULL;
    b->adamw_update_multi_dev = NULL;
}

qkd_status qkd__backend_simd_create(qkd_context *ctx, qkd__backend **out)
{
    *out = NULL;
    struct simd_impl *impl = qkd__calloc(ctx, 1, sizeof *impl);
    if (!impl)
        return qkd__error(ctx, QKD_ERR_NO_MEMORY, "simd backend: out of memory");
    qkd__backend *b = NULL;
    qkd_status st = qkd__backend_ref_create(ctx, &b);
    if (st != QKD_OK) {
        qkd__free(ctx, impl);
        return st;
    }
    impl->ref_destroy = b->destroy;
    b->name = "simd";
    b->impl = impl;
    b->destroy = simd_destroy;
    install_best(b);
    drop_bf16_bits(b);
    drop_device_step(b);
    *out = b;
    return QKD_OK;
}
