/* GEMM GFLOP/s of the three matmul kernels (forward, both backward
 * products) on the SIMD and reference backends, next to OpenBLAS's sgemm
 * on the same operation when OpenBLAS was found at build time. Shapes: the
 * 1024^3 square and the linear layers of stories260K and of the 15M LLaMA
 * shape at 2048 tokens. SIMD and OpenBLAS run in turn, one call each per
 * round; GFLOP/s are medians, simd_vs_openblas the median of the rounds'
 * time ratios. Then the square's three products on the SIMD backend with
 * bf16 inputs (the *_bf16 slots: VDPBF16PS where the CPU has AVX512_BF16)
 * against fp32, in turn the same way; and at the model shapes a student
 * linear's forward and backward-input products with 4-bit asymmetric
 * group-32 fake quantization, fused into the packing (fakequant_groups
 * and the *_fq slots) against unfused (fakequant_forward into a Q(w) copy,
 * then the plain products). Prints one JSON object.
 *
 *   bench-gemm [--quick | --bf16 | --fused]
 *     --quick: the square's forward only; --bf16, --fused: only that part */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "bench_util.h"
#include "core/core.h"

#ifdef QKD_BENCH_OPENBLAS
#include <cblas.h>
#endif

enum op { FORWARD, BACKWARD_INPUT, BACKWARD_WEIGHT };

/* Largest product the reference backend is timed on. */
#define MAX_REF_FLOP 5e9
static const char *const op_names[] = {"forward", "backward_input", "backward_weight"};

struct shape {
    const char *name;
    int N, C, OC; /* tokens, in features, out features */
};

struct call {
    qkd__backend *be; /* NULL: OpenBLAS */
    enum op op;
    int bf16;         /* the backend's bf16 slots */
    float *out, *x, *w, *dout;
    struct shape s;
};

static void run_call(void *arg)
{
    const struct call *c = arg;
    const struct shape *s = &c->s;
    qkd__backend *be = c->be;
    if (be) {
        switch (c->op) {
        case FORWARD:
            (c->bf16 ? be->matmul_forward_bf16 : be->matmul_forward)(be, c->out, c->x, c->w,
                                                                     s->N, s->C, s->OC);
            break;
        case BACKWARD_INPUT:
            (c->bf16 ? be->matmul_backward_input_bf16
                     : be->matmul_backward_input)(be, c->out, c->dout, c->w, s->N, s->C, s->OC);
            break;
        case BACKWARD_WEIGHT:
            (c->bf16 ? be->matmul_backward_weight_bf16
                     : be->matmul_backward_weight)(be, c->out, c->dout, c->x, s->N, s->C, s->OC);
            break;
        }
        return;
    }
#ifdef QKD_BENCH_OPENBLAS
    switch (c->op) {
    case FORWARD: /* out = x w^T */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s->N, s->OC, s->C, 1.0f, c->x,
                    s->C, c->w, s->C, 0.0f, c->out, s->OC);
        break;
    case BACKWARD_INPUT: /* dx += dout w */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, s->N, s->C, s->OC, 1.0f,
                    c->dout, s->OC, c->w, s->C, 1.0f, c->out, s->C);
        break;
    case BACKWARD_WEIGHT: /* dw += dout^T x */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, s->OC, s->C, s->N, 1.0f,
                    c->dout, s->OC, c->x, s->C, 1.0f, c->out, s->C);
        break;
    }
#endif
}

static double gflops(const struct call *c, double seconds)
{
    return 2.0 * c->s.N * c->s.C * c->s.OC / seconds * 1e-9;
}

static size_t out_floats(enum op op, const struct shape *s)
{
    switch (op) {
    case FORWARD: return (size_t)s->N * s->OC;
    case BACKWARD_INPUT: return (size_t)s->N * s->C;
    default: return (size_t)s->OC * s->C;
    }
}

/* The three products of shape s with bf16 inputs against fp32 on the
 * SIMD backend of `threads` threads, as JSON entries after sep. */
static void bf16_vs_fp32(const struct shape *s, int threads, double secs, const char **sep)
{
    qkd_context *simd = bench_context(QKD_BACKEND_SIMD, threads);
    float *x = bench_random((size_t)s->N * s->C, 1), *w = bench_random((size_t)s->OC * s->C, 2);
    float *dout = bench_random((size_t)s->N * s->OC, 3);
    for (int op = FORWARD; op <= BACKWARD_WEIGHT; op++) {
        float *out = calloc(out_floats((enum op)op, s), sizeof *out);
        struct call b16 = {.be = simd->backend, .op = (enum op)op, .bf16 = 1, .out = out,
                           .x = x, .w = w, .dout = dout, .s = *s};
        struct call f32 = b16;
        f32.bf16 = 0;
        void *contenders[2] = {&b16, &f32};
        double t[2], ratio[2];
        bench_compare(run_call, contenders, 2, secs, 7, t, ratio);
        printf("%s  {\"shape\": \"%s\", \"op\": \"%s\", \"threads\": %d, "
               "\"fp32_gflops\": %.2f, \"bf16_gflops\": %.2f, \"bf16_vs_fp32\": %.3f}",
               *sep, s->name, op_names[op], threads, gflops(&f32, t[1]), gflops(&b16, t[0]),
               ratio[1]);
        fflush(stdout);
        *sep = ",\n";
        free(out);
    }
    free(x);
    free(w);
    free(dout);
    qkd_context_free(simd);
}

/* A student linear's products, fused or not. */
struct fq_call {
    qkd__backend *be;
    int fused;
    const qkd__quant_spec *spec;
    float *wq, *scales, *zeros, *out, *dx, *x, *w, *dout;
    struct shape s;
};

static void run_fq(void *arg)
{
    const struct fq_call *c = arg;
    const struct shape *s = &c->s;
    qkd__backend *be = c->be;
    if (!c->fused) {
        be->fakequant_forward(be, c->wq, c->scales, c->zeros, c->w, s->OC, s->C, c->spec);
        be->matmul_forward(be, c->out, c->x, c->wq, s->N, s->C, s->OC);
        be->matmul_backward_input(be, c->dx, c->dout, c->wq, s->N, s->C, s->OC);
        return;
    }
    const qkd__qweight q = {.w = c->w, .scales = c->scales, .zeros = c->zeros,
                            .spec = c->spec, .scratch = c->wq};
    be->fakequant_groups(be, c->scales, c->zeros, c->w, s->OC, s->C, c->spec);
    be->matmul_forward_fq(be, c->out, c->x, &q, s->N, s->C, s->OC);
    be->matmul_backward_input_fq(be, c->dx, c->dout, &q, s->N, s->C, s->OC);
}

/* Fused against unfused fake quantization at shape s, SIMD backend with
 * every core, as a JSON entry after sep. */
static void fused_vs_unfused(const struct shape *s, double secs, const char **sep)
{
    const qkd__quant_spec spec = {.scheme = QKD_QUANT_ASYM, .bits = 4, .group = 32,
                                  .clip_ratio = 1.0f};
    qkd_context *simd = bench_context(QKD_BACKEND_SIMD, bench_cores());
    size_t nw = (size_t)s->OC * s->C, ng = (size_t)s->OC * (size_t)((s->C + 31) / 32);
    struct fq_call f = {.be = simd->backend, .fused = 1, .spec = &spec, .s = *s,
                        .wq = malloc(nw * sizeof(float)), .scales = malloc(ng * sizeof(float)),
                        .zeros = malloc(ng * sizeof(float)),
                        .out = calloc((size_t)s->N * s->OC, sizeof(float)),
                        .dx = calloc((size_t)s->N * s->C, sizeof(float)),
                        .x = bench_random((size_t)s->N * s->C, 1), .w = bench_random(nw, 2),
                        .dout = bench_random((size_t)s->N * s->OC, 3)};
    struct fq_call u = f;
    u.fused = 0;
    void *contenders[2] = {&f, &u};
    double t[2], ratio[2];
    bench_compare(run_fq, contenders, 2, secs, 7, t, ratio);
    printf("%s  {\"shape\": \"%s\", \"M\": %d, \"K\": %d, \"N\": %d, \"threads\": %d, "
           "\"unfused_ms\": %.3f, \"fused_ms\": %.3f, \"fused_speedup\": %.3f}",
           *sep, s->name, s->N, s->C, s->OC, bench_cores(), t[1] * 1e3, t[0] * 1e3, ratio[1]);
    fflush(stdout);
    *sep = ",\n";
    free(f.wq), free(f.scales), free(f.zeros), free(f.out), free(f.dx), free(f.x), free(f.w);
    free(f.dout);
    qkd_context_free(simd);
}

int main(int argc, char **argv)
{
    int quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
    int bf16_only = argc > 1 && strcmp(argv[1], "--bf16") == 0;
    int fused_only = argc > 1 && strcmp(argv[1], "--fused") == 0;
    const struct shape shapes[] = {
        {"square1024", 1024, 1024, 1024},
        {"stories260K.attn_q", 2048, 64, 64},
        {"stories260K.ffn_up", 2048, 64, 172},
        {"stories260K.ffn_down", 2048, 172, 64},
        {"stories260K.output", 2048, 64, 512},
        {"15M.attn_q", 2048, 288, 288},
        {"15M.ffn_up", 2048, 288, 768},
        {"15M.ffn_down", 2048, 768, 288},
        {"15M.output", 2048, 288, 32000},
    };
    int n_shapes = quick ? 1 : (int)(sizeof shapes / sizeof shapes[0]);
    double secs = 0.3;
    int cores = bench_cores();
    int thread_counts[] = {1, cores};
    int n_counts = cores > 1 ? 2 : 1;

#ifdef QKD_BENCH_OPENBLAS
    const int have_blas = 1;
#else
    const int have_blas = 0;
#endif
    printf("{\"benchmark\": \"gemm\", \"cores\": %d, \"openblas\": %s, \"results\": [", cores,
           have_blas ? "true" : "false");
    const char *sep = "\n";
    for (int ti = 0; ti < n_counts && !bf16_only && !fused_only; ti++) {
        int threads = thread_counts[ti];
        qkd_context *simd = bench_context(QKD_BACKEND_SIMD, threads);
        qkd_context *ref = bench_context(QKD_BACKEND_REF, threads);
#ifdef QKD_BENCH_OPENBLAS
        openblas_set_num_threads(threads);
#endif
        for (int si = 0; si < n_shapes; si++) {
            const struct shape *s = &shapes[si];
            float *x = bench_random((size_t)s->N * s->C, 1);
            float *w = bench_random((size_t)s->OC * s->C, 2);
            float *dout = bench_random((size_t)s->N * s->OC, 3);
            for (int op = FORWARD; op <= BACKWARD_WEIGHT; op++) {
                if (quick && op != FORWARD)
                    continue;
                float *out = calloc(out_floats((enum op)op, s), sizeof *out);
                struct call c = {.be = simd->backend, .op = (enum op)op, .out = out, .x = x,
                                 .w = w, .dout = dout, .s = *s};
                /* SIMD and OpenBLAS in turn; the slow reference on its own, once. */
                struct call blas = c, refc = c;
                blas.be = NULL;
                refc.be = ref->backend;
                void *contenders[2] = {&c, &blas};
                double t[2], ratio[2];
                bench_compare(run_call, contenders, have_blas ? 2 : 1, secs, 7, t, ratio);
                double g_simd = gflops(&c, t[0]);
                printf("%s  {\"shape\": \"%s\", \"op\": \"%s\", \"M\": %d, \"K\": %d, "
                       "\"N\": %d, \"threads\": %d, \"simd_gflops\": %.2f",
                       sep, s->name, op_names[op], s->N, s->C, s->OC, threads, g_simd);
                /* the reference takes tens of seconds past a few GFLOP */
                double g_ref = 0.0;
                if (2.0 * s->N * s->C * s->OC <= MAX_REF_FLOP) {
                    g_ref = gflops(&c, bench_time(run_call, &refc, 0.0, 1));
                    printf(", \"ref_gflops\": %.2f, \"simd_vs_ref\": %.1f", g_ref, g_simd / g_ref);
                } else {
                    printf(", \"ref_gflops\": null, \"simd_vs_ref\": null");
                }
                if (have_blas)
                    printf(", \"openblas_gflops\": %.2f, \"simd_vs_openblas\": %.3f",
                           gflops(&c, t[1]), ratio[1]);
                printf("}");
                fflush(stdout);
                sep = ",\n";
                free(out);
            }
            free(x);
            free(w);
            free(dout);
        }
        qkd_context_free(simd);
        qkd_context_free(ref);
    }
    printf("\n], \"bf16\": [");
    sep = "\n";
    for (int ti = 0; ti < n_counts && !quick && !fused_only; ti++)
        bf16_vs_fp32(&shapes[0], thread_counts[ti], secs, &sep);
    printf("\n], \"fused_fakequant\": [");
    sep = "\n";
    for (int si = 1; si < (int)(sizeof shapes / sizeof shapes[0]) && !quick && !bf16_only; si++)
        if (strstr(shapes[si].name, ".output") == NULL) /* the head stays float */
            fused_vs_unfused(&shapes[si], secs, &sep);
    printf("\n]}\n");
    return 0;
}
