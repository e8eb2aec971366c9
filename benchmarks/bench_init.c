/* qkd_model_init_random on one thread next to every core (the reference
 * backend, whose upload is a copy), timed in turn (bench_compare), for a
 * model of 219 million weights: TinyLlama's width and vocabulary (dim
 * 2048, hidden 5632, vocab 32000, untied) with 2 layers. The weights are
 * the same bit for bit at any thread count (tests/test_model.c); the
 * cuda-kdqat benchmark draws TinyLlama's twice (teacher and student).
 * Prints one JSON object.
 *
 *   bench-init */
#include <stdio.h>

#include "bench_util.h"

static qkd_model *make_model(qkd_context *ctx)
{
    qkd_model_config c;
    qkd_model_config_init(&c);
    c.dim = 2048;
    c.hidden_dim = 5632;
    c.n_layers = 2;
    c.n_heads = 32;
    c.n_kv_heads = 4;
    c.vocab_size = 32000;
    c.max_seq_len = 1024;
    c.tied_embeddings = 0;
    qkd_model *m = NULL;
    bench_check(ctx, qkd_model_create(ctx, &c, &m), "model_create");
    return m;
}

struct contender {
    qkd_context *ctx;
    qkd_model *model;
};

static void init(void *arg)
{
    const struct contender *c = arg;
    bench_check(c->ctx, qkd_model_init_random(c->model, 1, 0.02f), "init_random");
}

int main(void)
{
    const int cores = bench_cores();
    qkd_context *one = bench_context(QKD_BACKEND_REF, 1);
    qkd_context *all = bench_context(QKD_BACKEND_REF, cores);
    struct contender c[2] = {{one, make_model(one)}, {all, make_model(all)}};
    void *args[2] = {&c[0], &c[1]};
    double seconds[2], ratios[2];
    bench_compare(init, args, 2, 10.0, 3, seconds, ratios);
    printf("{\"params\": %lld, \"cores\": %d, \"one_thread_s\": %.3f, \"all_cores_s\": %.3f, "
           "\"speedup\": %.2f}\n",
           (long long)qkd_model_n_params(c[0].model), cores, seconds[0], seconds[1],
           1.0 / ratios[1]);
    qkd_model_free(c[0].model);
    qkd_model_free(c[1].model);
    qkd_context_free(one);
    qkd_context_free(all);
    return 0;
}
