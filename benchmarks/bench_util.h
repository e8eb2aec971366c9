/* Helpers shared by the benchmark programs: timing, contexts, random data. */
#ifndef QKD_BENCH_UTIL_H
#define QKD_BENCH_UTIL_H

#include <stddef.h>
#include <stdint.h>

#include "qkd/qkd.h"

/* Seconds on a monotonic clock. */
double bench_now(void);

/* Median seconds of one call of fn(arg): a warm-up call, then calls until
 * min_seconds have passed and at least min_runs were made. */
double bench_time(void (*fn)(void *arg), void *arg, double min_seconds, int min_runs);

/* Median seconds of one call of each of n contenders fn(args[i]), timed in
 * turn (one call of each per round, after a warm-up round) so that a
 * change in the machine's load affects them alike: rounds run until
 * min_seconds have passed and at least min_runs were made. ratios (NULL,
 * or n values) receives, for each contender, the median over the rounds
 * of its time divided by contender 0's in the same round: a comparison
 * that a load changing between rounds hardly moves. */
void bench_compare(void (*fn)(void *arg), void *const *args, int n, double min_seconds,
                   int min_runs, double *seconds, double *ratios);

/* A context on `backend` with n_threads threads; exits with a message on
 * failure. */
qkd_context *bench_context(qkd_backend_kind backend, int n_threads);

/* n floats uniform in [-1, 1) from a fixed seed (malloc'd). */
float *bench_random(size_t n, uint64_t seed);

/* Online CPU cores. */
int bench_cores(void);

/* Exit with `what`, the status and the context's message unless st is OK. */
void bench_check(qkd_context *ctx, qkd_status st, const char *what);

/* What the KD-QAT step of ../shared/bench/torch_kdqat.py trains with:
 * the student's linears fake-quantized (asymmetric, `bits`, groups of
 * `group`, STE), CAKLD, AdamW at lr 1e-5. */
typedef struct bench_kdqat {
    qkd_quantizer *quant;
    qkd_loss *loss;
    qkd_optimizer *opt;
} bench_kdqat;

/* Bind and create them for `student` (exits on failure): ASYM `bits` in
 * groups of `group`, STE; one CAKLD term, its beta from the teacher on the
 * device with beta_from_teacher, else set by the caller each step; AdamW
 * at lr 1e-5. */
void bench_kdqat_init(bench_kdqat *k, qkd_context *ctx, qkd_model *student, int bits,
                      int group, int beta_from_teacher);
/* Free them (any may be NULL), unbinding the quantizer from `student`,
 * before the student is freed. */
void bench_kdqat_free(bench_kdqat *k, qkd_model *student);

#endif
