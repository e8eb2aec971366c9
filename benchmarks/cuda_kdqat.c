/* The KD-QAT step of ../shared/bench/torch_kdqat.py on the CUDA backend,
 * printing the same JSON fields for the same shapes, so the two can run
 * side by side on one GPU (benchmarks/cuda_kdqat_vs_torch.sh):
 * a frozen teacher's forward, the student's forward with every linear
 * weight fake-quantized (asymmetric, per group, STE), CAKLD with the
 * teacher's mean top-1 probability over the batch as beta, the student's
 * backward and an AdamW step, with no host round trip (beta_from_teacher,
 * the loss deferred, qkd_optimizer_step_deferred): the timed steps are
 * queued back to back and the loss value read after the last. Teacher and student start from the same random weights.
 * --dtype picks both models' matmul precision: bf16 (the default, as
 * torch_kdqat.py runs: tensor-core products of bf16-rounded inputs, fp32
 * master weights, activations and optimizer state) or fp32 (exact fp32
 * SGEMMs); "dtype" says which. tokens_s and tflops count what
 * torch_kdqat.py counts (8 N flops per token plus attention); mem_gb is
 * the most device memory in use after any part of the warm-up steps or
 * after the timed ones (cudaMemGetInfo: the CUDA context and cuBLAS
 * included): the frozen teacher moves its fp32 matrices to the host in
 * its first forward, so the memory in use after the steps alone need
 * not be the peak.
 *
 *   cuda-kdqat [--cfg smollm135m|tinyllama1b] [--batch B] [--seq T]
 *              [--bits 4] [--group G] [--steps S] [--dtype bf16|fp32]
 *              [--phases 1] [--profile MASK] [--logits-rows R]
 *
 * --logits-rows R gives both models qkd_model_set_logits_rows(R): the
 * objective computes their logits R positions at a time, never all at
 * once (0, the default: the forwards store them whole).
 * --phases 1 adds one untimed step drained after each part and prints
 * the parts' seconds, and the host's seconds to queue each, as a JSON
 * line on stderr; --profile MASK wraps the
 * parts of that step with bit i set (0 teacher forward, 1 student
 * forward, 2 objective, 3 backward, 4 optimizer) in cudaProfilerStart /
 * Stop, for `ncu --profile-from-start off`. */
#include <cuda_profiler_api.h>
#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_util.h"

struct cfg {
    const char *name;
    int dim, hidden, layers, heads, kv_heads, vocab;
};

static const struct cfg cfgs[] = {
    {"smollm135m", 576, 1536, 30, 9, 3, 49152},
    {"tinyllama1b", 2048, 5632, 22, 32, 4, 32000},
};

struct run {
    qkd_context *ctx;
    qkd_model *teacher, *student;
    bench_kdqat kd;
    int32_t *tokens;
    int B, T;
    float value;
    int note_memory;  /* sample the memory in use after each part */
    size_t mem_peak;  /* the most bytes in use seen */
};

static void note_memory(struct run *r)
{
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    if (total_b - free_b > r->mem_peak)
        r->mem_peak = total_b - free_b;
}

static qkd_model *make_model(qkd_context *ctx, const struct cfg *c, int T,
                             qkd_matmul_precision prec)
{
    qkd_model_config mc;
    qkd_model_config_init(&mc);
    mc.dim = c->dim;
    mc.hidden_dim = c->hidden;
    mc.n_layers = c->layers;
    mc.n_heads = c->heads;
    mc.n_kv_heads = c->kv_heads;
    mc.vocab_size = c->vocab;
    mc.max_seq_len = T;
    mc.tied_embeddings = 0;
    qkd_model *m = NULL;
    bench_check(ctx, qkd_model_create(ctx, &mc, &m), "model_create");
    bench_check(ctx, qkd_model_init_random(m, 1, 0.02f), "init_random"); /* same seed: same weights */
    bench_check(ctx, qkd_model_set_matmul_precision(m, prec), "set_matmul_precision");
    return m;
}

/* The CUDA context; without a device the benchmark is skipped (exit 77,
 * meson's skip). */
static qkd_context *cuda_context(void)
{
    qkd_context_params p;
    qkd_context_params_init(&p);
    p.backend = QKD_BACKEND_CUDA;
    p.n_threads = bench_cores(); /* the host side: format schemes, checks */
    qkd_context *ctx = NULL;
    qkd_status st = qkd_context_create(&p, &ctx);
    if (st == QKD_ERR_UNSUPPORTED) {
        fprintf(stderr, "cuda-kdqat: SKIP: no CUDA device\n");
        exit(77);
    }
    bench_check(NULL, st, "context_create");
    return ctx;
}

static void setup(struct run *r, const struct cfg *c, int bits, int group,
                  qkd_matmul_precision prec, int logits_rows)
{
    r->ctx = cuda_context();
    r->teacher = make_model(r->ctx, c, r->T, prec);
    bench_check(r->ctx, qkd_model_set_trainable(r->teacher, 0), "frozen teacher");
    r->student = make_model(r->ctx, c, r->T, prec);
    bench_check(r->ctx, qkd_model_set_logits_rows(r->teacher, logits_rows), "logits rows");
    bench_check(r->ctx, qkd_model_set_logits_rows(r->student, logits_rows), "logits rows");
    bench_kdqat_init(&r->kd, r->ctx, r->student, bits, group, 1); /* beta on the device */
    size_t n = (size_t)r->B * r->T;
    float *u = bench_random(n, 7);
    r->tokens = malloc(n * sizeof *r->tokens);
    if (!r->tokens) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < n; i++)
        r->tokens[i] = (int32_t)((u[i] + 1.0f) * 0.5f * (float)(c->vocab - 1));
    free(u);
}

/* After each part of the step (teacher forward, student forward,
 * objective, backward, optimizer): the memory in use is sampled where the
 * run notes it, and with phases the seconds the host took to queue the
 * part are added to its entry in phases[PHASES + i], then the device is
 * drained and the part's seconds are added to phases[i]. A part the host
 * queues in less time than the device runs it is bound by the device,
 * which a CUDA graph (it saves launch work on the host) cannot speed. */
enum { PHASES = 5 };
static const char *const phase_names[PHASES] = {"teacher_fwd", "student_fwd", "loss",
                                                "backward", "optimizer"};

/* Phases whose kernels a profiler started with --profile-from-start off
 * records (bit i: phase i), for --phases' step. */
static int profile_mask;

static void phase_end(struct run *r, double *phases, int i, double *t)
{
    if (r->note_memory)
        note_memory(r);
    if (!phases)
        return;
    phases[PHASES + i] += bench_now() - *t;
    cudaDeviceSynchronize();
    if (profile_mask & (1 << i))
        cudaProfilerStop();
    if (i + 1 < PHASES && (profile_mask & (1 << (i + 1))))
        cudaProfilerStart();
    double now = bench_now();
    phases[i] += now - *t;
    *t = now;
}

static void step(struct run *r, double *phases)
{
    qkd_context *c = r->ctx;
    double t = bench_now();
    bench_check(c, qkd_model_forward(r->teacher, r->tokens, r->B, r->T), "teacher forward");
    phase_end(r, phases, 0, &t);
    bench_check(c, qkd_model_forward(r->student, r->tokens, r->B, r->T), "student forward");
    phase_end(r, phases, 1, &t);
    /* deferred: beta, the value and its check stay on the device */
    bench_check(c, qkd_loss_compute(r->kd.loss, r->student, r->teacher, NULL, NULL), "CAKLD");
    phase_end(r, phases, 2, &t);
    bench_check(c, qkd_model_backward(r->student, NULL), "backward");
    phase_end(r, phases, 3, &t);
    bench_check(c, qkd_optimizer_step_deferred(r->kd.opt), "optimizer_step");
    bench_check(c, qkd_model_zero_grad(r->student), "zero_grad");
    phase_end(r, phases, 4, &t);
}

static void print_seconds(const char *key, const double *s)
{
    fprintf(stderr, "\"%s\": {", key);
    for (int i = 0; i < PHASES; i++)
        fprintf(stderr, "%s\"%s\": %.4f", i ? ", " : "", phase_names[i], s[i]);
    fprintf(stderr, "}");
}

/* One more step, drained after each part; a JSON line on stderr: each
 * part's seconds, and the host's seconds to queue it. */
static void print_phases(struct run *r)
{
    double phases[2 * PHASES] = {0};
    cudaDeviceSynchronize();
    if (profile_mask & 1)
        cudaProfilerStart();
    step(r, phases);
    fprintf(stderr, "{");
    print_seconds("phases_s", phases);
    fprintf(stderr, ", ");
    print_seconds("host_s", phases + PHASES);
    fprintf(stderr, "}\n");
}

int main(int argc, char **argv)
{
    const char *name = "smollm135m";
    int B = 16, T = 1024, bits = 4, group = 64, steps = 5;
    const char *dtype = "bf16";
    int phases = 0, logits_rows = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (strcmp(k, "--cfg") == 0)
            name = v;
        else if (strcmp(k, "--batch") == 0)
            B = atoi(v);
        else if (strcmp(k, "--seq") == 0)
            T = atoi(v);
        else if (strcmp(k, "--bits") == 0)
            bits = atoi(v);
        else if (strcmp(k, "--group") == 0)
            group = atoi(v);
        else if (strcmp(k, "--steps") == 0)
            steps = atoi(v);
        else if (strcmp(k, "--dtype") == 0)
            dtype = v;
        else if (strcmp(k, "--phases") == 0)
            phases = atoi(v);
        else if (strcmp(k, "--profile") == 0)
            profile_mask = atoi(v);
        else if (strcmp(k, "--logits-rows") == 0)
            logits_rows = atoi(v);
        else {
            fprintf(stderr, "cuda-kdqat: unknown option %s\n", k);
            return 2;
        }
    }
    const struct cfg *c = NULL;
    for (size_t i = 0; i < sizeof cfgs / sizeof cfgs[0]; i++)
        if (strcmp(cfgs[i].name, name) == 0)
            c = &cfgs[i];
    const int bf16 = strcmp(dtype, "bf16") == 0;
    if (!c || B < 1 || T < 1 || steps < 1 || (!bf16 && strcmp(dtype, "fp32") != 0)) {
        fprintf(stderr, "cuda-kdqat: bad configuration\n");
        return 2;
    }
    struct run r = {.B = B, .T = T};
    setup(&r, c, bits, group, bf16 ? QKD_MATMUL_BF16 : QKD_MATMUL_FP32, logits_rows);
    r.note_memory = 1;
    for (int i = 0; i < 3; i++) /* warm-up, as torch_kdqat.py does */
        step(&r, NULL);
    r.note_memory = 0;
    cudaDeviceSynchronize(); /* the queued warm-up steps are not timed */
    double t0 = bench_now();
    for (int i = 0; i < steps; i++)
        step(&r, NULL);
    bench_check(r.ctx, qkd_loss_value(r.kd.loss, &r.value), "loss value"); /* waits */
    double dt = (bench_now() - t0) / steps;
    note_memory(&r);
    long long N = (long long)qkd_model_n_params(r.student);
    double tok = (double)B * T / dt;
    double flops_tok = 8.0 * (double)N + 4.0 * c->layers * (double)T * c->dim * 3;
    printf("{\"cfg\": \"%s\", \"params\": %lld, \"batch\": %d, \"seq\": %d, \"bits\": %d, "
           "\"group\": %d, \"compile\": false, \"backend\": \"libqkd-cuda\", \"dtype\": \"%s\", "
           "\"step_s\": %.4f, \"tokens_s\": %.0f, \"tflops\": %.1f, \"mem_gb\": %.1f, "
           "\"loss\": %.6g}\n",
           c->name, N, B, T, bits, group, dtype, dt, tok, tok * flops_tok / 1e12,
           (double)r.mem_peak / 1e9, (double)r.value);
    fflush(stdout);
    bench_check(r.ctx, qkd_optimizer_last_step(r.kd.opt, NULL), "a step was skipped");
    if (phases)
        print_phases(&r);
    bench_kdqat_free(&r.kd, r.student);
    qkd_model_free(r.student);
    qkd_model_free(r.teacher);
    qkd_context_free(r.ctx);
    free(r.tokens);
    return 0;
}
