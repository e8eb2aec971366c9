/* A persistent thread pool on libuv threads. The caller's thread takes
 * part in every run, so a pool of one thread runs everything inline.
 *
 * A training step is hundreds of short runs, and a futex wake-up costs
 * tens of microseconds (more in a VM), so waiting spins a little first:
 * a worker watches `generation` and the caller watches `busy` for up to
 * SPIN_ROUNDS pauses before sleeping on the condition variables. Both are
 * changed under the mutex too, so a sleeper never misses a wake-up. */
#include <stdatomic.h>
#include <uv.h>

#include "core/core.h"

struct qkd__pool {
    int n_threads; /* including the caller */
    uv_thread_t *threads;
    uv_mutex_t mutex;
    uv_cond_t work_cond;
    uv_cond_t done_cond;
    atomic_uint_fast64_t generation; /* bumped for every run and for shutdown */
    atomic_int stop;
    atomic_int busy;     /* workers still inside the current run */
    qkd__task_fn fn;
    void *arg;
    int64_t n_tasks;
    atomic_int_fast64_t next;
};

/* About 50 to 200 microseconds of pauses. */
#define SPIN_ROUNDS 4096

static void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Spin until *x differs from `from` (1) or the rounds run out (0). */
static int spin_until_changed(atomic_uint_fast64_t *x, uint64_t from)
{
    for (int i = 0; i < SPIN_ROUNDS; i++) {
        if (atomic_load_explicit(x, memory_order_acquire) != from)
            return 1;
        cpu_relax();
    }
    return 0;
}

static int spin_until_zero(atomic_int *x)
{
    for (int i = 0; i < SPIN_ROUNDS; i++) {
        if (atomic_load_explicit(x, memory_order_acquire) == 0)
            return 1;
        cpu_relax();
    }
    return 0;
}

static void run_tasks(qkd__pool *pool)
{
    for (;;) {
        int64_t i = atomic_fetch_add(&pool->next, 1);
        if (i >= pool->n_tasks)
            return;
        pool->fn(pool->arg, i);
    }
}

static void worker(void *arg)
{
    qkd__pool *pool = arg;
    uint64_t seen = 0;
    for (;;) {
        if (!spin_until_changed(&pool->generation, seen)) {
            uv_mutex_lock(&pool->mutex);
            while (atomic_load(&pool->generation) == seen && !atomic_load(&pool->stop))
                uv_cond_wait(&pool->work_cond, &pool->mutex);
            uv_mutex_unlock(&pool->mutex);
        }
        seen = atomic_load(&pool->generation);
        if (atomic_load(&pool->stop))
            return;
        run_tasks(pool);
        if (atomic_fetch_sub(&pool->busy, 1) == 1) {
            uv_mutex_lock(&pool->mutex);
            uv_cond_signal(&pool->done_cond);
            uv_mutex_unlock(&pool->mutex);
        }
    }
}

qkd_status qkd__pool_create(qkd_context *ctx, int n_threads, qkd__pool **out)
{
    *out = NULL;
    qkd__pool *pool = qkd__calloc(ctx, 1, sizeof *pool);
    if (!pool)
        return qkd__error(ctx, QKD_ERR_NO_MEMORY, "thread pool: out of memory");
    pool->n_threads = n_threads < 1 ? 1 : n_threads;
    if (uv_mutex_init(&pool->mutex) != 0) {
        qkd__free(ctx, pool);
        return qkd__error(ctx, QKD_ERR_BACKEND, "thread pool: cannot create a mutex");
    }
    if (uv_cond_init(&pool->work_cond) != 0) {
        uv_mutex_destroy(&pool->mutex);
        qkd__free(ctx, pool);
        return qkd__error(ctx, QKD_ERR_BACKEND, "thread pool: cannot create a condition");
    }
    if (uv_cond_init(&pool->done_cond) != 0) {
        uv_cond_destroy(&pool->work_cond);
        uv_mutex_destroy(&pool->mutex);
        qkd__free(ctx, pool);
        return qkd__error(ctx, QKD_ERR_BACKEND, "thread pool: cannot create a condition");
    }
    int n_workers = pool->n_threads - 1;
    if (n_workers > 0) {
        pool->threads = qkd__calloc(ctx, (size_t)n_workers, sizeof *pool->threads);
        if (!pool->threads) {
            pool->n_threads = 1;
            qkd__pool_free(ctx, pool);
            return qkd__error(ctx, QKD_ERR_NO_MEMORY, "thread pool: out of memory");
        }
    }
    for (int i = 0; i < n_workers; i++) {
        if (uv_thread_create(&pool->threads[i], worker, pool) != 0) {
            pool->n_threads = i + 1; /* join only those started */
            qkd__pool_free(ctx, pool);
            return qkd__error(ctx, QKD_ERR_BACKEND, "thread pool: cannot start thread %d", i);
        }
    }
    *out = pool;
    return QKD_OK;
}

void qkd__pool_free(qkd_context *ctx, qkd__pool *pool)
{
    if (!pool)
        return;
    uv_mutex_lock(&pool->mutex);
    atomic_store(&pool->stop, 1);
    atomic_fetch_add(&pool->generation, 1); /* wakes spinning workers too */
    uv_cond_broadcast(&pool->work_cond);
    uv_mutex_unlock(&pool->mutex);
    for (int i = 0; i < pool->n_threads - 1; i++)
        uv_thread_join(&pool->threads[i]);
    uv_cond_destroy(&pool->done_cond);
    uv_cond_destroy(&pool->work_cond);
    uv_mutex_destroy(&pool->mutex);
    qkd__free(ctx, pool->threads);
    qkd__free(ctx, pool);
}

void qkd__pool_run(qkd__pool *pool, int64_t n_tasks, qkd__task_fn fn, void *arg)
{
    if (n_tasks <= 0)
        return;
    if (pool->n_threads == 1 || n_tasks == 1) {
        for (int64_t i = 0; i < n_tasks; i++)
            fn(arg, i);
        return;
    }
    pool->fn = fn;
    pool->arg = arg;
    pool->n_tasks = n_tasks;
    atomic_store(&pool->next, 0);
    atomic_store(&pool->busy, pool->n_threads - 1);
    uv_mutex_lock(&pool->mutex);
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    uv_cond_broadcast(&pool->work_cond);
    uv_mutex_unlock(&pool->mutex);

    run_tasks(pool);

    if (!spin_until_zero(&pool->busy)) {
        uv_mutex_lock(&pool->mutex);
        while (atomic_load(&pool->busy) > 0)
            uv_cond_wait(&pool->done_cond, &pool->mutex);
        uv_mutex_unlock(&pool->mutex);
    }
}

int qkd__pool_size(const qkd__pool *pool)
{
    return pool->n_threads;
}
