/* Training-step throughput: forward, cross-entropy and backward (with the
 * gradients zeroed first) on B x T random tokens, in tokens per second, on
 * the SIMD and reference backends with every core, for stories260K's shape
 * and the 15M LLaMA shape (dim 288, 6 layers, 6 heads, hidden 768, vocab
 * 32000). Weights are random: speed does not depend on them. The SIMD
 * figure is the median of several steps after a warm-up; the reference
 * figure, a single step (it takes seconds). Prints one JSON object.
 *
 *   bench-train [--quick]    (--quick: stories260K only) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_util.h"

struct shape {
    const char *name;
    int dim, hidden, layers, heads, kv_heads, vocab;
};

struct step {
    qkd_model *m;
    int32_t *tokens, *targets;
    int B, T;
};

static void check(qkd_status st, const char *what)
{
    if (st != QKD_OK) {
        fprintf(stderr, "bench-train: %s failed: %s\n", what, qkd_status_str(st));
        exit(1);
    }
}

static void run_step(void *arg)
{
    const struct step *s = arg;
    float loss;
    check(qkd_model_zero_grad(s->m), "zero_grad");
    check(qkd_model_forward(s->m, s->tokens, s->B, s->T), "forward");
    check(qkd_model_cross_entropy(s->m, s->targets, 1, &loss), "cross_entropy");
    check(qkd_model_backward(s->m, NULL), "backward");
}

/* Seconds per step of `shape` on a context of `backend`. */
static double time_step(const struct shape *sh, qkd_backend_kind backend, int threads, int B,
                        int T, int timed_runs)
{
    qkd_context *ctx = bench_context(backend, threads);
    qkd_model_config cfg;
    qkd_model_config_init(&cfg);
    cfg.dim = sh->dim;
    cfg.hidden_dim = sh->hidden;
    cfg.n_layers = sh->layers;
    cfg.n_heads = sh->heads;
    cfg.n_kv_heads = sh->kv_heads;
    cfg.vocab_size = sh->vocab;
    cfg.max_seq_len = T;
    struct step s = {.B = B, .T = T};
    check(qkd_model_create(ctx, &cfg, &s.m), "model_create");
    check(qkd_model_init_random(s.m, 1, 0.02f), "init_random");
    size_t n = (size_t)B * T;
    s.tokens = malloc(n * sizeof *s.tokens);
    s.targets = malloc(n * sizeof *s.targets);
    float *r = bench_random(n + 1, 7);
    if (!s.tokens || !s.targets) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < n; i++) {
        s.tokens[i] = (int32_t)((r[i] + 1.0f) * 0.5f * (sh->vocab - 1));
        s.targets[i] = (int32_t)((r[i + 1] + 1.0f) * 0.5f * (sh->vocab - 1));
    }
    double t;
    if (timed_runs > 1) {
        t = bench_time(run_step, &s, 2.0, timed_runs);
    } else {
        double t0 = bench_now();
        run_step(&s);
        t = bench_now() - t0;
    }
    free(r);
    free(s.tokens);
    free(s.targets);
    qkd_model_free(s.m);
    qkd_context_free(ctx);
    return t;
}

int main(int argc, char **argv)
{
    int quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
    const struct shape shapes[] = {
        {"stories260K", 64, 172, 5, 8, 4, 512},
        {"15M", 288, 768, 6, 6, 6, 32000},
    };
    const int B = 4, T = 256;
    int n_shapes = quick ? 1 : 2, threads = bench_cores();
    printf("{\"benchmark\": \"train_step\", \"cores\": %d, \"results\": [", threads);
    for (int i = 0; i < n_shapes; i++) {
        double t_simd = time_step(&shapes[i], QKD_BACKEND_SIMD, threads, B, T, 5);
        double t_ref = time_step(&shapes[i], QKD_BACKEND_REF, threads, B, T, 1);
        double tokens = (double)B * T;
        printf("%s\n  {\"model\": \"%s\", \"B\": %d, \"T\": %d, \"threads\": %d, "
               "\"simd_tokens_per_s\": %.0f, \"ref_tokens_per_s\": %.0f, \"speedup\": %.1f}",
               i ? "," : "", shapes[i].name, B, T, threads, tokens / t_simd, tokens / t_ref,
               t_ref / t_simd);
        fflush(stdout);
    }
    printf("\n]}\n");
    return 0;
}
