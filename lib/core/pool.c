/* A persistent thread pool on libuv threads. The caller's thread takes
 * part in every run, so a pool of one thread runs everything inline. */
#include <stdatomic.h>
#include <uv.h>

#include "core/core.h"

struct qkd__pool {
    int n_threads; /* including the caller */
    uv_thread_t *threads;
    uv_mutex_t mutex;
    uv_cond_t work_cond;
    uv_cond_t done_cond;
    uint64_t generation; /* bumped for every run and for shutdown */
    int stop;
    int busy;            /* workers still inside the current run */
    qkd__task_fn fn;
    void *arg;
    int64_t n_tasks;
    atomic_int_fast64_t next;
};

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
    uv_mutex_lock(&pool->mutex);
    for (;;) {
        while (pool->generation == seen && !pool->stop)
            uv_cond_wait(&pool->work_cond, &pool->mutex);
        if (pool->stop)
            break;
        seen = pool->generation;
        uv_mutex_unlock(&pool->mutex);
        run_tasks(pool);
        uv_mutex_lock(&pool->mutex);
        if (--pool->busy == 0)
            uv_cond_signal(&pool->done_cond);
    }
    uv_mutex_unlock(&pool->mutex);
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
    pool->stop = 1;
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
    uv_mutex_lock(&pool->mutex);
    pool->fn = fn;
    pool->arg = arg;
    pool->n_tasks = n_tasks;
    atomic_store(&pool->next, 0);
    pool->busy = pool->n_threads - 1;
    pool->generation++;
    uv_cond_broadcast(&pool->work_cond);
    uv_mutex_unlock(&pool->mutex);

    run_tasks(pool);

    uv_mutex_lock(&pool->mutex);
    while (pool->busy > 0)
        uv_cond_wait(&pool->done_cond, &pool->mutex);
    uv_mutex_unlock(&pool->mutex);
}

int qkd__pool_size(const qkd__pool *pool)
{
    return pool->n_threads;
}
