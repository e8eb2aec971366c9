#include "bench_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

double bench_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

enum { MAX_RUNS = 1000, MAX_CONTENDERS = 8 };

void bench_compare(void (*fn)(void *arg), void *const *args, int n, double min_seconds,
                   int min_runs, double *seconds, double *ratios)
{
    static double times[MAX_CONTENDERS][MAX_RUNS];
    if (n > MAX_CONTENDERS) {
        fprintf(stderr, "bench_compare: at most %d contenders\n", MAX_CONTENDERS);
        exit(1);
    }
    for (int i = 0; i < n; i++)
        fn(args[i]);
    int runs = 0;
    double start = bench_now();
    while (runs < MAX_RUNS && (runs < min_runs || bench_now() - start < min_seconds)) {
        for (int i = 0; i < n; i++) {
            double t0 = bench_now();
            fn(args[i]);
            times[i][runs] = bench_now() - t0;
        }
        runs++;
    }
    static double ratio[MAX_RUNS];
    for (int i = 0; ratios && i < n; i++) {
        for (int r = 0; r < runs; r++)
            ratio[r] = times[i][r] / times[0][r];
        qsort(ratio, (size_t)runs, sizeof ratio[0], cmp_double);
        ratios[i] = ratio[runs / 2];
    }
    for (int i = 0; i < n; i++) {
        qsort(times[i], (size_t)runs, sizeof times[i][0], cmp_double);
        seconds[i] = times[i][runs / 2];
    }
}

double bench_time(void (*fn)(void *arg), void *arg, double min_seconds, int min_runs)
{
    double t;
    bench_compare(fn, &arg, 1, min_seconds, min_runs, &t, NULL);
    return t;
}

qkd_context *bench_context(qkd_backend_kind backend, int n_threads)
{
    qkd_context_params p;
    qkd_context_params_init(&p);
    p.backend = backend;
    p.n_threads = n_threads;
    qkd_context *ctx = NULL;
    qkd_status st = qkd_context_create(&p, &ctx);
    if (st != QKD_OK) {
        fprintf(stderr, "cannot create a context on backend %d: %s\n", (int)backend,
                qkd_status_str(st));
        exit(1);
    }
    return ctx;
}

float *bench_random(size_t n, uint64_t seed)
{
    float *x = malloc(n * sizeof *x);
    if (!x) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        x[i] = (float)((double)(s >> 40) / (double)(1ull << 23) - 1.0);
    }
    return x;
}

int bench_cores(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (int)n;
}

void bench_check(qkd_context *ctx, qkd_status st, const char *what)
{
    if (st != QKD_OK) {
        fprintf(stderr, "benchmark: %s: %s (%s)\n", what, qkd_status_str(st),
                ctx ? qkd_context_last_error(ctx) : "");
        exit(1);
    }
}

void bench_kdqat_init(bench_kdqat *k, qkd_context *ctx, qkd_model *student, int bits,
                      int group, int beta_from_teacher)
{
    qkd_quant_params qp;
    qkd_quant_params_init(&qp);
    qp.scheme = QKD_QUANT_ASYM;
    qp.bits = bits;
    qp.group_size = group;
    qp.estimator = QKD_ESTIMATOR_STE;
    bench_check(ctx, qkd_quantizer_create(ctx, &qp, &k->quant), "quantizer_create");
    bench_check(ctx, qkd_model_set_quantizer(student, k->quant, QKD_QUANT_TARGET_LINEAR),
                "set_quantizer");
    qkd_loss_term term;
    qkd_loss_term_init(&term, QKD_LOSS_CAKLD);
    term.beta_from_teacher = beta_from_teacher;
    bench_check(ctx, qkd_loss_create(ctx, &k->loss), "loss_create");
    bench_check(ctx, qkd_loss_add(k->loss, &term), "loss_add");
    qkd_optim_params op;
    qkd_optim_params_init(&op);
    op.lr = 1e-5f;
    bench_check(ctx, qkd_optimizer_create(student, &op, &k->opt), "optimizer_create");
}

void bench_kdqat_free(bench_kdqat *k, qkd_model *student)
{
    qkd_optimizer_free(k->opt);
    qkd_loss_free(k->loss);
    if (k->quant)
        bench_check(NULL, qkd_model_set_quantizer(student, NULL, 0), "unbind quantizer");
    qkd_quantizer_free(k->quant);
}
