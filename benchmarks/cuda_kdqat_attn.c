/* The CUDA backend's bf16 attention slots alone, at the attention shapes
 * of cuda-kdqat's two models (causal, T = 1024, head size 64): seconds
 * of one forward and one backward call as the models run them (the
 * forward's bf16 copies of q, k and v, which the backward reads from the
 * scratch, and the backward's of dout included; RoPE applied inside; the
 * output (only) and the gradients written in bf16, the backward reading
 * that output), the mean of `reps` calls
 * after two warm-up calls, and their rate in model FLOPs (causal: 4 B H T^2 hd / 2 for the forward,
 * 2.5 times that for the backward). One JSON line per shape.
 *
 *   cuda-kdqat-attn [reps]     (default 20; exit 77 without a device) */
#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "backend/backend.h"
#include "core/core.h"

#define ROPE_THETA 10000.0f /* both models' */

struct shape {
    const char *name;
    int B, T, H, n_kv, hd;
};

static const struct shape shapes[] = {
    {"smollm135m", 16, 1024, 9, 3, 64},
    {"tinyllama1b", 4, 1024, 32, 4, 64},
};

static void *device_random(size_t n, unsigned seed)
{
    float *h = malloc(n * sizeof *h);
    void *d = NULL;
    if (!h || cudaMalloc(&d, n * sizeof *h) != cudaSuccess) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    srand(seed);
    for (size_t i = 0; i < n; i++)
        h[i] = (float)rand() / (float)RAND_MAX * 2.0f - 1.0f;
    cudaMemcpy(d, h, n * sizeof *h, cudaMemcpyHostToDevice);
    free(h);
    return d;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Mean seconds of `reps` calls of the forward (backward = 0) or backward
 * (the backend's stream does not wait for the default one: the device is
 * drained around the timed calls instead of timing with events). */
static double time_pass(qkd__backend *be, const struct shape *s, int backward, int reps,
                        float **t)
{
    double t0 = 0.0;
    for (int i = -2; i < reps; i++) {
        if (i == 0) {
            cudaDeviceSynchronize();
            t0 = now();
        }
        if (backward)
            be->attention_backward_bf16(be, t[4], t[5], t[6], t[7], t[8], t[0], t[1], t[2],
                                        (qkd__bf16_in){.bits = (uint16_t *)t[9]}, s->B, s->T,
                                        s->H, s->n_kv, s->hd, ROPE_THETA, (uint16_t *)t[10]);
        else
            be->attention_forward_bf16(be, NULL, (uint16_t *)t[9], t[8], t[0], t[1], t[2], s->B,
                                       s->T, 0, s->T, s->H, s->n_kv, s->hd, ROPE_THETA);
    }
    cudaDeviceSynchronize();
    return (now() - t0) / reps;
}

int main(int argc, char **argv)
{
    int reps = argc > 1 ? atoi(argv[1]) : 20;
    qkd_context_params cp;
    qkd_context_params_init(&cp);
    cp.backend = QKD_BACKEND_CUDA;
    qkd_context *ctx = NULL;
    if (qkd_context_create(&cp, &ctx) != QKD_OK) {
        fprintf(stderr, "cuda-kdqat-attn: SKIP: no CUDA device\n");
        return 77;
    }
    qkd__backend *be = ctx->backend;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        const struct shape *s = &shapes[i];
        size_t nq = (size_t)s->B * s->T * s->H * s->hd, nkv = (size_t)s->B * s->T * s->n_kv * s->hd;
        size_t scratch = be->attention_scratch_floats(be, s->B, s->T, s->T, s->H, s->n_kv, s->hd);
        size_t sizes[11] = {nq, nkv, nkv, nq, nq, nkv, nkv, nq, scratch, nq / 2, nq / 2 + nkv};
        /* q k v out dq dk dv dout, the scratch, out's and dq dk dv's bf16 bits */
        float *t[11];
        for (int j = 0; j < 11; j++)
            t[j] = device_random(sizes[j], 11u + (unsigned)j);
        double fwd = time_pass(be, s, 0, reps, t), bwd = time_pass(be, s, 1, reps, t);
        double flops = 4.0 * s->B * s->H * (double)s->T * s->T * s->hd / 2;
        printf("{\"shape\": \"%s\", \"forward_ms\": %.4f, \"forward_tflops\": %.1f, "
               "\"backward_ms\": %.4f, \"backward_tflops\": %.1f, \"error\": \"%s\"}\n",
               s->name, fwd * 1e3, flops / fwd / 1e12, bwd * 1e3, 2.5 * flops / bwd / 1e12,
               qkd_context_last_error(ctx));
        for (int j = 0; j < 11; j++)
            cudaFree(t[j]);
    }
    qkd_context_free(ctx);
    return 0;
}
