/* Sampling and generation: the sampler's rules one by one, then whole runs
 * of stories260K against llama2.c's published outputs. */
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "generate/sampler.h"
#include "testutil.h"

#define MODEL_BIN "models/stories260K/stories260K.bin"
#define MODEL_GGUF "models/stories260K/stories260K.gguf"
#define TOK_BIN "models/stories260K/tok512.bin"
#define REF_DIR "models/stories260K/reference/"

/* ---- the generator ------------------------------------------------------ */

/* The formula written out again here, independently of lib/generate. */
static uint32_t xorshift_star(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return (uint32_t)((*s * 0x2545F4914F6CDD1DULL) >> 32);
}

START_TEST(rng_first_outputs)
{
    /* Worked out with Python's exact integers from the same formula. */
    const uint32_t seed1[4] = {0x47e4ce4b, 0xabcfa6a8, 0xb9d10d8f, 0x4db418a0};
    const uint32_t seed42[4] = {0x56ce4ab7, 0xc841eb53, 0xca466be0, 0xf1acc733};
    uint64_t a = 1, b = 42, c = 42;
    for (int i = 0; i < 4; i++) {
        ck_assert_uint_eq(qkd__rng_u32(&a), seed1[i]);
        ck_assert_uint_eq(xorshift_star(&c), seed42[i]);
        float f = qkd__rng_f32(&b);
        ck_assert_float_eq(f, (float)(seed42[i] >> 8) / 16777216.0f);
    }
    /* Further on, the library and the test's copy stay in step. */
    for (int i = 0; i < 1000; i++) {
        uint32_t want = xorshift_star(&c);
        ck_assert_uint_eq(qkd__rng_u32(&b), want);
    }
}
END_TEST

/* ---- the sampling rules -------------------------------------------------- */

START_TEST(argmax_first_of_ties)
{
    const float x[5] = {1.0f, 3.0f, -2.0f, 3.0f, 2.0f};
    ck_assert_int_eq(qkd__sample_argmax(x, 5), 1);
    const float flat[3] = {0.5f, 0.5f, 0.5f};
    ck_assert_int_eq(qkd__sample_argmax(flat, 3), 0);

    /* the public sampler at temperature 0 is the same argmax */
    qkd_context *ctx = test_context(1);
    qkd_sampler_params p;
    qkd_sampler_params_init(&p);
    p.temperature = 0.0f;
    qkd_sampler *s = NULL;
    ck_assert_int_eq(qkd_sampler_create(ctx, &p, 5, &s), QKD_OK);
    float logits[5];
    memcpy(logits, x, sizeof logits);
    int32_t tok = -1;
    ck_assert_int_eq(qkd_sampler_sample(s, logits, &tok), QKD_OK);
    ck_assert_int_eq(tok, 1);
    qkd_sampler_free(s);
    qkd_context_free(ctx);
}
END_TEST

START_TEST(softmax_values)
{
    float x[3] = {1.0f, 2.0f, 3.0f};
    qkd__softmax(x, 3);
    double z = exp(1.0) + exp(2.0) + exp(3.0);
    for (int i = 0; i < 3; i++)
        ck_assert_double_eq_tol(x[i], exp(i + 1.0) / z, 1e-6);
}
END_TEST

START_TEST(multinomial_walk)
{
    const float p[4] = {0.1f, 0.4f, 0.2f, 0.3f};
    ck_assert_int_eq(qkd__sample_mult(p, 4, 0.0f), 0);
    ck_assert_int_eq(qkd__sample_mult(p, 4, 0.45f), 1);  /* cdf 0.1, 0.5 */
    ck_assert_int_eq(qkd__sample_mult(p, 4, 0.65f), 2);  /* cdf 0.7 */
    ck_assert_int_eq(qkd__sample_mult(p, 4, 0.75f), 3);
    ck_assert_int_eq(qkd__sample_mult(p, 4, 1.5f), 3);   /* never reached: last */
}
END_TEST

START_TEST(top_p_hand_made)
{
    const float p[4] = {0.1f, 0.4f, 0.2f, 0.3f};
    qkd__prob_index buf[4];
    /* top_p 0.5: cutoff (1-0.5)/3 = 0.167 drops 0.1; sorted 0.4, 0.3, 0.2;
     * the cumulative sum first exceeds 0.5 at 0.3, so the nucleus is
     * {1: 0.4, 3: 0.3}, total 0.7, and r = coin * 0.7. */
    ck_assert_int_eq(qkd__sample_topp(p, 4, 0.5f, 0.5f, buf), 1);  /* r 0.35 < 0.4 */
    ck_assert_int_eq(qkd__sample_topp(p, 4, 0.5f, 0.6f, buf), 3);  /* r 0.42 */
    ck_assert_int_eq(qkd__sample_topp(p, 4, 0.5f, 0.99f, buf), 3); /* never 2 */
    /* top_p 0.75: all kept; nucleus 0.4, 0.3, 0.2 (total 0.9) */
    ck_assert_int_eq(qkd__sample_topp(p, 4, 0.75f, 0.7f, buf), 3);  /* r 0.63 */
    ck_assert_int_eq(qkd__sample_topp(p, 4, 0.75f, 0.8f, buf), 2);  /* r 0.72 */
    ck_assert_int_eq(qkd__sample_topp(p, 4, 0.75f, 0.999f, buf), 2); /* never 0 */
    /* nothing reaches the cutoff: the top token alone */
    const float flat[4] = {0.25f, 0.25f, 0.25f, 0.25f};
    ck_assert_int_eq(qkd__sample_topp(flat, 4, 0.1f, 0.9f, buf), 0);
    const float one[1] = {1.0f};
    ck_assert_int_eq(qkd__sample_topp(one, 1, 0.5f, 0.9f, buf), 0);
}
END_TEST

/* The public sampler draws one coin per call, then applies the rules. */
START_TEST(sampler_seeded_matches_rules)
{
    qkd_context *ctx = test_context(1);
    qkd_sampler_params p;
    qkd_sampler_params_init(&p);
    ck_assert_float_eq(p.temperature, 1.0f);
    ck_assert_float_eq(p.top_p, 0.9f);
    p.temperature = 0.5f;
    p.top_p = 0.75f;
    p.seed = 42;
    qkd_sampler *s = NULL;
    ck_assert_int_eq(qkd_sampler_create(ctx, &p, 4, &s), QKD_OK);
    uint64_t rng = 42;
    for (int i = 0; i < 50; i++) {
        float logits[4] = {0.3f, 1.1f, -0.4f, (float)(i % 5) * 0.3f};
        float probs[4];
        for (int k = 0; k < 4; k++)
            probs[k] = logits[k] / 0.5f;
        qkd__softmax(probs, 4);
        qkd__prob_index buf[4];
        float coin = (float)(xorshift_star(&rng) >> 8) / 16777216.0f;
        int32_t want = qkd__sample_topp(probs, 4, 0.75f, coin, buf);
        int32_t got = -1;
        ck_assert_int_eq(qkd_sampler_sample(s, logits, &got), QKD_OK);
        ck_assert_int_eq(got, want);
    }
    qkd_sampler_free(s);
    qkd_context_free(ctx);
}
END_TEST

START_TEST(sampler_bad_params)
{
    qkd_context *ctx = test_context(1);
    qkd_sampler *s = NULL;
    qkd_sampler_params p;
    const float bad_temp[] = {-0.1f, NAN, INFINITY};
    const float bad_top_p[] = {0.0f, -0.5f, NAN};
    for (int i = 0; i < 3; i++) {
        qkd_sampler_params_init(&p);
        p.temperature = bad_temp[i];
        ck_assert_int_eq(qkd_sampler_create(ctx, &p, 8, &s), QKD_ERR_INVALID_ARG);
        ck_assert_ptr_null(s);
        ck_assert_str_ne(qkd_context_last_error(ctx), "");
        qkd_sampler_params_init(&p);
        p.top_p = bad_top_p[i];
        ck_assert_int_eq(qkd_sampler_create(ctx, &p, 8, &s), QKD_ERR_INVALID_ARG);
    }
    qkd_sampler_params_init(&p);
    ck_assert_int_eq(qkd_sampler_create(ctx, &p, 0, &s), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_sampler_create(ctx, NULL, 8, &s), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_sampler_create(ctx, &p, 8, NULL), QKD_ERR_INVALID_ARG);
    p.size = 0;
    ck_assert_int_eq(qkd_sampler_create(ctx, &p, 8, &s), QKD_ERR_INVALID_ARG);

    qkd_sampler_params_init(&p);
    ck_assert_int_eq(qkd_sampler_create(ctx, &p, 3, &s), QKD_OK);
    float logits[3] = {0.0f, NAN, 1.0f};
    int32_t tok;
    ck_assert_int_eq(qkd_sampler_sample(s, logits, &tok), QKD_ERR_NON_FINITE);
    ck_assert_int_eq(qkd_sampler_sample(s, NULL, &tok), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_sampler_sample(NULL, logits, &tok), QKD_ERR_INVALID_ARG);
    qkd_sampler_free(s);
    qkd_sampler_free(NULL);
    qkd_context_free(ctx);
}
END_TEST

/* ---- whole runs ------------------------------------------------------------ */

/* Collects the generated text as llama2.c prints it: its safe_printf drops
 * a single-byte piece that is neither printable nor whitespace. */
typedef struct text_buf {
    char *data;
    size_t len, cap;
    int stop_after; /* > 0: ask to stop after this many tokens */
    int calls;
} text_buf;

static int collect(void *user, int32_t token, const char *text, size_t len)
{
    (void)token;
    text_buf *b = user;
    b->calls++;
    if (len == 1 && !isprint((unsigned char)text[0]) && !isspace((unsigned char)text[0]))
        len = 0;
    if (b->len + len + 2 > b->cap) {
        b->cap = 2 * (b->len + len + 2);
        b->data = realloc(b->data, b->cap);
        ck_assert_ptr_nonnull(b->data);
    }
    memcpy(b->data + b->len, text, len);
    b->len += len;
    b->data[b->len] = '\0';
    return b->stop_after > 0 && b->calls >= b->stop_after;
}

typedef struct gen_case {
    float temperature, top_p;
    uint64_t seed;
    int steps;
    int threads;
    const char *prompt;
} gen_case;

/* Run a case on model + tok; returns the printed text plus llama2.c's
 * closing newline (malloc'd). */
static char *generate_text(qkd_context *ctx, qkd_model *model, const qkd_tokenizer *tok,
                           const gen_case *c)
{
    qkd_generate_params p;
    qkd_generate_params_init(&p);
    ck_assert_int_eq(p.steps, 256);
    p.steps = c->steps;
    p.sampler.temperature = c->temperature;
    p.sampler.top_p = c->top_p;
    p.sampler.seed = c->seed;
    text_buf b = {0};
    int n = -1;
    qkd_status st = qkd_generate(model, tok, c->prompt, &p, collect, &b, &n);
    ck_assert_msg(st == QKD_OK, "qkd_generate: %s: %s", qkd_status_name(st),
                  qkd_context_last_error(ctx));
    ck_assert_int_eq(n, b.calls);
    collect(&b, 0, "\n", 1);
    return b.data;
}

static qkd_tokenizer *load_tokenizer(qkd_context *ctx, const char *path)
{
    qkd_tokenizer *t = NULL;
    qkd_status st = qkd_tokenizer_load(ctx, path, &t);
    ck_assert_msg(st == QKD_OK, "%s: %s", qkd_status_name(st), qkd_context_last_error(ctx));
    return t;
}

static const gen_case greedy256 = {.temperature = 0.0f, .top_p = 0.9f, .seed = 1, .steps = 256};

START_TEST(greedy_bin_matches_llama2c)
{
    const char *path = test_shared(REF_DIR "gen_greedy_n256.txt");
    if (!path)
        return;
    char *want = test_read_text(path, NULL);
    qkd_context *ctx = test_context(2);
    qkd_model *m = test_load_model(ctx, test_shared(MODEL_BIN));
    qkd_tokenizer *tok = load_tokenizer(ctx, test_shared(TOK_BIN));
    char *got = generate_text(ctx, m, tok, &greedy256);
    ck_assert_str_eq(got, want);

    /* the story block after llama2.c's `-t 0.0` command in stories260K.md */
    char *md = test_read_text(test_shared(REF_DIR "stories260K.md"), NULL);
    const char *cmd = "-z stories260K/tok512.bin -t 0.0\n";
    char *start = strstr(md, cmd);
    ck_assert_ptr_nonnull(start);
    start += strlen(cmd);
    char *end = strstr(start, "```");
    ck_assert_ptr_nonnull(end);
    *end = '\0';
    ck_assert_str_eq(got, start);

    free(md);
    free(got);
    free(want);
    qkd_tokenizer_free(tok);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* The sampled story of stories260K.md: -t 1.0 -p 0.9 -s 133742, 256 steps. */
START_TEST(sampled_bin_matches_md)
{
    const char *path = test_shared(REF_DIR "stories260K.md");
    if (!path)
        return;
    char *md = test_read_text(path, NULL);
    const char *cmd = "-t 1.0 -p 0.9 -s 133742\n";
    char *start = strstr(md, cmd);
    ck_assert_ptr_nonnull(start);
    start += strlen(cmd);
    char *end = strstr(start, "```");
    ck_assert_ptr_nonnull(end);
    *end = '\0';

    qkd_context *ctx = test_context(1);
    qkd_model *m = test_load_model(ctx, test_shared(MODEL_BIN));
    qkd_tokenizer *tok = load_tokenizer(ctx, test_shared(TOK_BIN));
    const gen_case c = {.temperature = 1.0f, .top_p = 0.9f, .seed = 133742, .steps = 256};
    char *got = generate_text(ctx, m, tok, &c);
    ck_assert_str_eq(got, start);
    free(got);
    free(md);
    qkd_tokenizer_free(tok);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

START_TEST(greedy_gguf_own_tokenizer)
{
    const char *path = test_shared(REF_DIR "gen_greedy_n256.txt");
    if (!path)
        return;
    char *want = test_read_text(path, NULL);
    qkd_context *ctx = test_context(2);
    qkd_model *m = test_load_model(ctx, test_shared(MODEL_GGUF));
    const qkd_tokenizer *tok = qkd_model_tokenizer(m);
    ck_assert_ptr_nonnull(tok);
    /* the file records a context of 128; the reference runs 256 steps */
    qkd_model_config cfg;
    qkd_model_config_init(&cfg);
    ck_assert_int_eq(qkd_model_get_config(m, &cfg), QKD_OK);
    ck_assert_int_eq(cfg.max_seq_len, 128);
    ck_assert_int_eq(qkd_model_set_max_seq_len(m, 256), QKD_OK);
    char *got = generate_text(ctx, m, tok, &greedy256);
    ck_assert_str_eq(got, want);
    free(got);
    free(want);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* Logits of positions 0..15 when feeding the reference run's input ids. */
static void check_reference_logits(const char *model_rel)
{
    const char *ids_path = test_shared(REF_DIR "gen_greedy_n256.input_token_ids.txt");
    if (!ids_path)
        return;
    char *ids_text = test_read_text(ids_path, NULL);
    size_t ref_len;
    float *ref = test_read_file(test_shared(REF_DIR "gen_greedy_n256.logits_f32le.bin"), &ref_len);
    enum { N_POS = 16, VOCAB = 512 };
    ck_assert_uint_eq(ref_len, sizeof(float) * N_POS * VOCAB);

    qkd_context *ctx = test_context(2);
    qkd_model *m = test_load_model(ctx, test_shared(model_rel));
    float logits[VOCAB];
    char *cur = ids_text;
    double worst = 0.0;
    for (int pos = 0; pos < N_POS; pos++) {
        char *next;
        long id = strtol(cur, &next, 10);
        ck_assert_ptr_ne(next, cur);
        cur = next;
        qkd_status st = qkd_model_decode(m, (int32_t)id, pos, logits);
        ck_assert_msg(st == QKD_OK, "decode pos %d: %s", pos, qkd_context_last_error(ctx));
        for (int v = 0; v < VOCAB; v++) {
            double d = fabs((double)logits[v] - ref[pos * VOCAB + v]);
            worst = d > worst ? d : worst;
            ck_assert_msg(d <= 1e-4, "%s pos %d token %d: %g vs %g", model_rel, pos, v,
                          logits[v], ref[pos * VOCAB + v]);
        }
    }
    fprintf(stderr, "%s: largest logit difference %.3g\n", model_rel, worst);
    qkd_model_free(m);
    qkd_context_free(ctx);
    free(ref);
    free(ids_text);
}

START_TEST(logits_match_reference)
{
    check_reference_logits(MODEL_BIN);
    check_reference_logits(MODEL_GGUF);
}
END_TEST

/* ---- llama2c_expected_outputs.txt ------------------------------------------ */

/* Settings of a '== ...' header line: llama2.zig's flag names. */
static void parse_settings(const char *line, gen_case *c)
{
    *c = (gen_case){.temperature = 1.0f, .top_p = 0.9f, .seed = 1, .steps = 200,
                    .threads = 1};
    const char *q;
    if ((q = strstr(line, "--temperature ")))
        c->temperature = strtof(q + 14, NULL);
    if ((q = strstr(line, "--top_p ")))
        c->top_p = strtof(q + 8, NULL);
    if ((q = strstr(line, "--random_seed ")))
        c->seed = strtoull(q + 14, NULL, 10);
    if ((q = strstr(line, "steps ")))
        c->steps = atoi(q + 6);
    if ((q = strstr(line, "--worker_count ")))
        c->threads = atoi(q + 15);
    if ((q = strstr(line, "--prompt \""))) {
        static char prompt[256];
        q += 10;
        const char *e = strchr(q, '"');
        ck_assert_ptr_nonnull(e);
        snprintf(prompt, sizeof prompt, "%.*s", (int)(e - q), q);
        c->prompt = prompt;
    }
}

START_TEST(llama2c_expected_outputs)
{
    const char *path = test_shared(REF_DIR "llama2c_expected_outputs.txt");
    if (!path)
        return;
    char *all = test_read_text(path, NULL);
    /* test_shared returns one static buffer: keep copies */
    char *bin = strdup(test_shared(MODEL_BIN)), *tokp = strdup(test_shared(TOK_BIN));
    int n_cases = 0;
    for (char *h = strstr(all, "\n== "); h; n_cases++) {
        char *line_end = strchr(h + 1, '\n');
        ck_assert_ptr_nonnull(line_end);
        *line_end = '\0';
        gen_case c;
        parse_settings(h + 1, &c);
        char *text = line_end + 1;
        h = strstr(text, "\n== ");
        char saved = 0;
        if (h) { /* the text keeps its last newline, which llama2.c prints */
            saved = h[1];
            h[1] = '\0';
        }
        qkd_context *ctx = test_context(c.threads);
        qkd_model *m = test_load_model(ctx, bin);
        qkd_tokenizer *tok = load_tokenizer(ctx, tokp);
        char *got = generate_text(ctx, m, tok, &c);
        ck_assert_msg(strcmp(got, text) == 0, "case %d:\n--- got\n%s--- want\n%s", n_cases,
                      got, text);
        free(got);
        qkd_tokenizer_free(tok);
        qkd_model_free(m);
        qkd_context_free(ctx);
        if (h)
            h[1] = saved;
    }
    ck_assert_int_eq(n_cases, 5);
    free(bin);
    free(tokp);
    free(all);
}
END_TEST

/* ---- generation's own rules ------------------------------------------------ */

START_TEST(generate_stops_and_cancels)
{
    if (!test_shared(MODEL_BIN))
        return;
    qkd_context *ctx = test_context(1);
    qkd_model *m = test_load_model(ctx, test_shared(MODEL_BIN));
    qkd_tokenizer *tok = load_tokenizer(ctx, test_shared(TOK_BIN));
    qkd_generate_params p;
    qkd_generate_params_init(&p);
    p.sampler.temperature = 0.0f;

    /* the callback asks to stop: CANCELLED, text complete up to there */
    text_buf b = {.stop_after = 5};
    int n = 0;
    ck_assert_int_eq(qkd_generate(m, tok, NULL, &p, collect, &b, &n), QKD_ERR_CANCELLED);
    ck_assert_int_eq(n, 5);
    ck_assert_str_eq(b.data, "Once upon a time,");
    free(b.data);

    /* one token per position (BOS in, a token out): 4 steps give 4 tokens */
    p.steps = 4;
    b = (text_buf){0};
    ck_assert_int_eq(qkd_generate(m, tok, "", &p, collect, &b, &n), QKD_OK);
    ck_assert_int_eq(n, 4);
    ck_assert_str_eq(b.data, "Once upon a time");
    free(b.data);

    /* a prompt is echoed token by token before sampling starts */
    p.steps = 10;
    b = (text_buf){0};
    ck_assert_int_eq(qkd_generate(m, tok, "Once upon a time", &p, collect, &b, &n), QKD_OK);
    ck_assert_int_eq(n, 10);
    ck_assert_int_eq(strncmp(b.data, "Once upon a time", 16), 0);
    free(b.data);

    /* steps beyond the context clamp to it */
    ck_assert_int_eq(qkd_model_set_max_seq_len(m, 8), QKD_OK);
    p.steps = 1000;
    ck_assert_int_eq(qkd_generate(m, tok, NULL, &p, NULL, NULL, &n), QKD_OK);
    ck_assert_int_eq(n, 8);

    qkd_tokenizer_free(tok);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

START_TEST(generate_bad_params)
{
    if (!test_shared(TOK_BIN))
        return;
    qkd_context *ctx = test_context(1);
    qkd_tokenizer *tok = load_tokenizer(ctx, test_shared(TOK_BIN));
    qkd_model_config cfg;
    qkd_model_config_init(&cfg);
    cfg.vocab_size = 256; /* the tokenizer has 512 */
    qkd_model *m = NULL;
    ck_assert_int_eq(qkd_model_create(ctx, &cfg, &m), QKD_OK);
    qkd_generate_params p;
    qkd_generate_params_init(&p);
    int n = 7;
    ck_assert_int_eq(qkd_generate(m, tok, NULL, &p, NULL, NULL, &n), QKD_ERR_SHAPE);
    ck_assert_int_eq(n, 0);
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(ctx), "512"));
    ck_assert_int_eq(qkd_generate(NULL, tok, NULL, &p, NULL, NULL, NULL), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_generate(m, NULL, NULL, &p, NULL, NULL, NULL), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_generate(m, tok, NULL, NULL, NULL, NULL, NULL), QKD_ERR_INVALID_ARG);
    p.steps = -1;
    ck_assert_int_eq(qkd_generate(m, tok, NULL, &p, NULL, NULL, NULL), QKD_ERR_INVALID_ARG);
    qkd_generate_params_init(&p);
    p.size = 1;
    ck_assert_int_eq(qkd_generate(m, tok, NULL, &p, NULL, NULL, NULL), QKD_ERR_INVALID_ARG);
    qkd_model_free(m);

    /* a matching vocabulary but a bad sampler setting */
    cfg.vocab_size = 512;
    ck_assert_int_eq(qkd_model_create(ctx, &cfg, &m), QKD_OK);
    qkd_generate_params_init(&p);
    p.sampler.temperature = -1.0f;
    ck_assert_int_eq(qkd_generate(m, tok, NULL, &p, NULL, NULL, NULL), QKD_ERR_INVALID_ARG);
    qkd_model_free(m);
    qkd_tokenizer_free(tok);
    qkd_context_free(ctx);
}
END_TEST

/* Every allocation generation makes may fail: NO_MEMORY, nothing else. */
START_TEST(generate_out_of_memory)
{
    if (!test_shared(MODEL_BIN))
        return;
    test_alloc a;
    qkd_context *ctx = test_counting_context(&a, 1);
    qkd_model *m = test_load_model(ctx, test_shared(MODEL_BIN));
    qkd_tokenizer *tok = load_tokenizer(ctx, test_shared(TOK_BIN));
    qkd_generate_params p;
    qkd_generate_params_init(&p);
    p.sampler.temperature = 0.0f;
    p.steps = 8;
    qkd_status st = QKD_ERR_NO_MEMORY;
    long budget = 0;
    for (; budget < 100 && st != QKD_OK; budget++) {
        test_alloc_fail_in(&a, budget, 1);
        text_buf b = {0};
        st = qkd_generate(m, tok, "Once", &p, collect, &b, NULL);
        a.fail_at = -1;
        ck_assert_msg(st == QKD_OK || st == QKD_ERR_NO_MEMORY, "budget %ld: %s", budget,
                      qkd_status_name(st));
        if (st == QKD_OK)
            ck_assert_str_eq(b.data, "Once upon a time, there was a");
        free(b.data);
    }
    ck_assert_int_eq(st, QKD_OK);
    ck_assert_int_gt(budget, 1); /* at least one allocation was refused */
    qkd_tokenizer_free(tok);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

Suite *suite_generate(void)
{
    Suite *s = suite_create("generate");
    TCase *unit = tcase_create("sampler");
    tcase_add_test(unit, rng_first_outputs);
    tcase_add_test(unit, argmax_first_of_ties);
    tcase_add_test(unit, softmax_values);
    tcase_add_test(unit, multinomial_walk);
    tcase_add_test(unit, top_p_hand_made);
    tcase_add_test(unit, sampler_seeded_matches_rules);
    tcase_add_test(unit, sampler_bad_params);
    suite_add_tcase(s, unit);

    TCase *runs = tcase_create("stories260K");
    tcase_set_timeout(runs, 120);
    tcase_add_test(runs, greedy_bin_matches_llama2c);
    tcase_add_test(runs, sampled_bin_matches_md);
    tcase_add_test(runs, greedy_gguf_own_tokenizer);
    tcase_add_test(runs, logits_match_reference);
    tcase_add_test(runs, llama2c_expected_outputs);
    tcase_add_test(runs, generate_stops_and_cancels);
    tcase_add_test(runs, generate_bad_params);
    tcase_add_test(runs, generate_out_of_memory);
    suite_add_tcase(s, runs);
    return s;
}
