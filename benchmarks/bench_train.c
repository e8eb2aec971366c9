/* Training-step throughput in tokens per second, SIMD backend next to the
 * reference backend, with every core, for stories260K's shape and the 15M
 * LLaMA shape (dim 288, 6 layers, 6 heads, hidden 768, vocab 32000,
 * untied), B x T = 4 x 256 random tokens, random weights (speed does not
 * depend on them). Two steps:
 *   - train: zero the gradients, forward, cross-entropy, backward;
 *   - kdqat: the KD-QAT step of ../shared/bench/torch_kdqat.py: a frozen
 *     fp32 teacher's forward (not trainable: no per-layer activations
 *     kept, as under torch.no_grad()), the student's forward with every
 *     linear weight fake-quantized (4-bit asymmetric, groups of 32, STE),
 *     CAKLD with the teacher's mean top-1 probability as beta, the
 *     student's backward and an AdamW step.
 * The two backends are timed in turn (one reference step, then a few SIMD
 * steps, per round), so a change in the machine's load hits both; figures
 * are medians, the speedup the median over the rounds of the round's
 * ratio. A third case, teacher_forward, times the frozen teacher's
 * forward on the SIMD backend in fp32 and with bf16 matmuls
 * (QKD_MATMUL_BF16), in turn. Prints one JSON object.
 *
 *   bench-train [--quick] [--simd-only] [--only MODEL/STEP]
 *     --quick: stories260K only; --simd-only: no reference steps (for
 *     profiling), the reference figures read null; --only: one case,
 *     e.g. 15M/kdqat. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_util.h"

struct shape {
    const char *name;
    int dim, hidden, layers, heads, kv_heads, vocab, tied;
    int rounds; /* reference steps (seconds each at 15M) */
};

enum kind { TRAIN, KDQAT };
static const char *const kind_names[] = {"train", "kdqat"};

/* Everything one backend's step uses. */
struct setup {
    qkd_context *ctx;
    qkd_model *student, *teacher;
    bench_kdqat kd;
    const int32_t *tokens, *targets;
    int B, T;
    enum kind kind;
};

static qkd_model *make_model(qkd_context *ctx, const struct shape *sh, int T)
{
    qkd_model_config cfg;
    qkd_model_config_init(&cfg);
    cfg.dim = sh->dim;
    cfg.hidden_dim = sh->hidden;
    cfg.n_layers = sh->layers;
    cfg.n_heads = sh->heads;
    cfg.n_kv_heads = sh->kv_heads;
    cfg.vocab_size = sh->vocab;
    cfg.max_seq_len = T;
    cfg.tied_embeddings = sh->tied;
    qkd_model *m = NULL;
    bench_check(ctx, qkd_model_create(ctx, &cfg, &m), "model_create");
    bench_check(ctx, qkd_model_init_random(m, 1, 0.02f), "init_random");
    return m;
}

static void setup_init(struct setup *s, qkd_backend_kind backend, const struct shape *sh)
{
    s->ctx = bench_context(backend, bench_cores());
    s->student = make_model(s->ctx, sh, s->T);
    if (s->kind == TRAIN)
        return;
    s->teacher = make_model(s->ctx, sh, s->T);
    bench_check(s->ctx, qkd_model_set_trainable(s->teacher, 0), "frozen teacher");
    bench_kdqat_init(&s->kd, s->ctx, s->student, 4, 32, 0); /* beta set by each step */
}

static void setup_free(struct setup *s)
{
    bench_kdqat_free(&s->kd, s->student);
    qkd_model_free(s->student);
    qkd_model_free(s->teacher);
    qkd_context_free(s->ctx);
}

static void run_step(void *arg)
{
    struct setup *s = arg;
    qkd_context *c = s->ctx;
    float value;
    if (s->kind == TRAIN) {
        bench_check(c, qkd_model_zero_grad(s->student), "zero_grad");
        bench_check(c, qkd_model_forward(s->student, s->tokens, s->B, s->T), "forward");
        bench_check(c, qkd_model_cross_entropy(s->student, s->targets, 1, &value), "cross_entropy");
        bench_check(c, qkd_model_backward(s->student, NULL), "backward");
        return;
    }
    float beta;
    bench_check(c, qkd_model_forward(s->teacher, s->tokens, s->B, s->T), "teacher forward");
    bench_check(c, qkd_model_forward(s->student, s->tokens, s->B, s->T), "student forward");
    bench_check(c, qkd_loss_teacher_confidence(s->teacher, NULL, &beta), "teacher_confidence");
    bench_check(c, qkd_loss_set_beta(s->kd.loss, 0, beta), "set_beta");
    bench_check(c, qkd_loss_compute(s->kd.loss, s->student, s->teacher, NULL, &value), "CAKLD");
    bench_check(c, qkd_model_backward(s->student, NULL), "backward");
    bench_check(c, qkd_optimizer_step(s->kd.opt, NULL), "optimizer_step");
    bench_check(c, qkd_model_zero_grad(s->student), "zero_grad");
}

static double timed_step(struct setup *s)
{
    double t0 = bench_now();
    run_step(s);
    return bench_now() - t0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *x, int n)
{
    qsort(x, (size_t)n, sizeof *x, cmp_double);
    return x[n / 2];
}

/* Median seconds per step of each backend, timed in turn, and the median
 * over the rounds of the reference step's time over the SIMD steps' median
 * in the same round. */
static void measure(const struct shape *sh, enum kind kind, const int32_t *tokens,
                    const int32_t *targets, int B, int T, int with_ref, double *t_simd,
                    double *t_ref, double *speedup)
{
    enum { SIMD_PER_ROUND = 3, MAX_ROUNDS = 8 };
    struct setup simd = {.tokens = tokens, .targets = targets, .B = B, .T = T, .kind = kind};
    struct setup ref = simd;
    setup_init(&simd, QKD_BACKEND_SIMD, sh);
    if (with_ref)
        setup_init(&ref, QKD_BACKEND_REF, sh);
    double ts[SIMD_PER_ROUND * MAX_ROUNDS], tr[MAX_ROUNDS], ratio[MAX_ROUNDS];
    run_step(&simd); /* warm-up: allocates activations and workspace */
    for (int r = 0; r < sh->rounds; r++) {
        tr[r] = with_ref ? timed_step(&ref) : 0.0;
        for (int i = 0; i < SIMD_PER_ROUND; i++)
            ts[r * SIMD_PER_ROUND + i] = timed_step(&simd);
        ratio[r] = tr[r] / median(ts + r * SIMD_PER_ROUND, SIMD_PER_ROUND);
    }
    *t_simd = median(ts, sh->rounds * SIMD_PER_ROUND);
    *t_ref = median(tr, sh->rounds);
    *speedup = median(ratio, sh->rounds);
    setup_free(&simd);
    if (with_ref)
        setup_free(&ref);
}

/* One model's forward on B x T tokens. */
struct forward {
    qkd_context *ctx;
    qkd_model *m;
    const int32_t *tokens;
    int B, T;
};

static void run_forward(void *arg)
{
    const struct forward *f = arg;
    bench_check(f->ctx, qkd_model_forward(f->m, f->tokens, f->B, f->T), "teacher forward");
}

/* Median seconds of the teacher's forward in fp32 and in bf16, timed in
 * turn, and the median over the rounds of the fp32 time over the bf16. */
static void measure_teacher(const struct shape *sh, const int32_t *tokens, int B, int T,
                            double *t_fp32, double *t_bf16, double *speedup)
{
    qkd_context *ctx = bench_context(QKD_BACKEND_SIMD, bench_cores());
    struct forward bf16 = {ctx, make_model(ctx, sh, T), tokens, B, T}, fp32 = bf16;
    fp32.m = make_model(ctx, sh, T);
    bench_check(ctx, qkd_model_set_matmul_precision(bf16.m, QKD_MATMUL_BF16), "matmul precision");
    void *args[2] = {&bf16, &fp32};
    double t[2], ratio[2];
    bench_compare(run_forward, args, 2, 1.0, 5, t, ratio);
    *t_bf16 = t[0];
    *t_fp32 = t[1];
    *speedup = ratio[1];
    qkd_model_free(bf16.m);
    qkd_model_free(fp32.m);
    qkd_context_free(ctx);
}

int main(int argc, char **argv)
{
    int quick = 0, with_ref = 1;
    const char *only = NULL;
    for (int i = 1; i < argc; i++) {
        quick |= strcmp(argv[i], "--quick") == 0;
        with_ref &= strcmp(argv[i], "--simd-only") != 0;
        if (strcmp(argv[i], "--only") == 0 && i + 1 < argc)
            only = argv[++i];
    }
    const struct shape shapes[] = {
        {"stories260K", 64, 172, 5, 8, 4, 512, 1, 5},
        {"15M", 288, 768, 6, 6, 6, 32000, 0, 1},
    };
    const int B = 4, T = 256;
    int n = B * T;
    int32_t *tokens = malloc((size_t)(n + 1) * sizeof *tokens);
    float *r = bench_random((size_t)n + 1, 7);
    if (!tokens) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    printf("{\"benchmark\": \"train_step\", \"cores\": %d, \"results\": [", bench_cores());
    const char *sep = "\n";
    for (int si = 0; si < (quick ? 1 : 2); si++) {
        const struct shape *sh = &shapes[si];
        for (int i = 0; i <= n; i++)
            tokens[i] = (int32_t)((r[i] + 1.0f) * 0.5f * (sh->vocab - 1));
        for (int kind = TRAIN; kind <= KDQAT; kind++) {
            char name[64];
            snprintf(name, sizeof name, "%s/%s", sh->name, kind_names[kind]);
            if (only && strcmp(only, name) != 0)
                continue;
            double ts, tr, speedup;
            measure(sh, (enum kind)kind, tokens, tokens + 1, B, T, with_ref, &ts, &tr, &speedup);
            printf("%s  {\"model\": \"%s\", \"step\": \"%s\", \"B\": %d, \"T\": %d, "
                   "\"threads\": %d, \"simd_tokens_per_s\": %.0f",
                   sep, sh->name, kind_names[kind], B, T, bench_cores(), n / ts);
            if (with_ref)
                printf(", \"ref_tokens_per_s\": %.1f, \"speedup\": %.1f}", n / tr, speedup);
            else
                printf(", \"ref_tokens_per_s\": null, \"speedup\": null}");
            fflush(stdout);
            sep = ",\n";
        }
        char name[64];
        snprintf(name, sizeof name, "%s/teacher_forward", sh->name);
        if (only && strcmp(only, name) != 0)
            continue;
        double t32, t16, speedup;
        measure_teacher(sh, tokens, B, T, &t32, &t16, &speedup);
        printf("%s  {\"model\": \"%s\", \"step\": \"teacher_forward\", \"B\": %d, "
               "\"T\": %d, \"threads\": %d, \"fp32_tokens_per_s\": %.0f, "
               "\"bf16_tokens_per_s\": %.0f, \"bf16_speedup\": %.2f}",
               sep, sh->name, B, T, bench_cores(), n / t32, n / t16, speedup);
        fflush(stdout);
        sep = ",\n";
    }
    printf("\n]}\n");
    free(tokens);
    free(r);
    return 0;
}
