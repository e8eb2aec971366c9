/* GGUF export: students bound to a format quantizer come back from the
 * file with bit-identical logits; stories260K round-trips through every
 * type (F32 exactly), keeps its tokenizer (the same greedy text, the same
 * vocabulary arrays as llama.cpp's converter wrote), and a W4 student's
 * perplexity is the same from the file as in memory; malformed block
 * files, bad arguments and the `qkd export` command. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"

#include "io/gguf.h"
#include "quant/ggml_blocks.h"

#define STORIES_BIN "models/stories260K/stories260K.bin"
#define STORIES_GGUF "models/stories260K/stories260K.gguf"
#define STORIES_TOK "models/stories260K/tok512.bin"
#define TINYSTORIES "text/tinystories/TinyStories-valid.slice_My-AI_Tasks.txt"

/* ---- helpers ------------------------------------------------------------------ */

/* A file under ../shared, copied out of test_shared's buffer; NULL (the
 * test is skipped) when absent. */
static const char *shared_path(const char *rel, char *buf, size_t n)
{
    const char *path = test_shared(rel);
    if (!path)
        return NULL;
    snprintf(buf, n, "%s", path);
    return buf;
}

static char *tmp_path(const char *name)
{
    return test_path_in(test_tmpdir(), name);
}

static void save_ok(qkd_model *m, qkd_context *ctx, const char *path, const qkd_gguf_params *p)
{
    qkd_status st = qkd_model_save_gguf(m, path, p);
    ck_assert_msg(st == QKD_OK, "saving %s: %s: %s", path, qkd_status_name(st),
                  qkd_context_last_error(ctx));
}

/* A random model; rows of `dim` and `hidden` values. */
static qkd_model *random_model(qkd_context *ctx, int dim, int hidden, int vocab, uint64_t seed)
{
    qkd_model_config cfg;
    qkd_model_config_init(&cfg);
    cfg.dim = dim;
    cfg.hidden_dim = hidden;
    cfg.n_layers = 1;
    cfg.n_heads = 4;
    cfg.n_kv_heads = 2;
    cfg.vocab_size = vocab;
    cfg.max_seq_len = 16;
    return test_model(ctx, &cfg, seed, 0.05f);
}

static float *forward_logits(qkd_model *m, const int32_t *tokens, int B, int T)
{
    qkd_model_config cfg = {.size = sizeof cfg};
    ck_assert_int_eq(qkd_model_get_config(m, &cfg), QKD_OK);
    size_t n = (size_t)B * T * cfg.vocab_size;
    float *logits = malloc(n * sizeof *logits);
    ck_assert_ptr_nonnull(logits);
    ck_assert_int_eq(qkd_model_forward(m, tokens, B, T), QKD_OK);
    ck_assert_int_eq(qkd_model_logits(m, logits, n), QKD_OK);
    return logits;
}

static float *tensor_values(const qkd_model *m, int index, int64_t *n)
{
    qkd_tensor_info info = {.size = sizeof info};
    ck_assert_int_eq(qkd_model_tensor_info(m, index, &info), QKD_OK);
    float *v = malloc((size_t)info.n_elements * sizeof *v);
    ck_assert_ptr_nonnull(v);
    ck_assert_int_eq(qkd_model_tensor_get(m, index, v, (size_t)info.n_elements), QKD_OK);
    *n = info.n_elements;
    return v;
}

static qkd__gguf *open_gguf(qkd_context *ctx, const char *path)
{
    qkd__gguf *g = NULL;
    ck_assert_int_eq(qkd__gguf_open(ctx, path, &g), QKD_OK);
    return g;
}

/* The type a tensor has in a written file. */
static uint32_t type_in(const qkd__gguf *g, const char *name)
{
    const qkd__gguf_tensor *t;
    ck_assert_msg(qkd__gguf_find_tensor(g, name, &t) == QKD_OK, "no tensor %s", name);
    return t->type;
}

static uint32_t file_tensor_type(qkd_context *ctx, const char *path, const char *name)
{
    qkd__gguf *g = open_gguf(ctx, path);
    uint32_t type = type_in(g, name);
    qkd__gguf_close(g);
    return type;
}

static int is_projection(qkd_tensor_kind k)
{
    return k >= QKD_TENSOR_ATTN_Q && k <= QKD_TENSOR_FFN_UP && k != QKD_TENSOR_FFN_NORM;
}

/* ---- students: the file holds exactly what the forward reads ---------------------- */

static const qkd_quant_scheme format_schemes[] = {
    QKD_QUANT_Q8_0, QKD_QUANT_Q4_0, QKD_QUANT_Q4_1, QKD_QUANT_Q5_0,
    QKD_QUANT_Q5_1, QKD_QUANT_Q4_K, QKD_QUANT_Q6_K, QKD_QUANT_TQ2_0,
};
static const uint32_t format_types[] = {
    QKD__GGML_Q8_0, QKD__GGML_Q4_0, QKD__GGML_Q4_1, QKD__GGML_Q5_0,
    QKD__GGML_Q5_1, QKD__GGML_Q4_K, QKD__GGML_Q6_K, QKD__GGML_TQ2_0,
};
enum { N_FORMATS = sizeof format_schemes / sizeof format_schemes[0] };

static qkd_quantizer *quantizer(qkd_context *ctx, qkd_quant_scheme scheme)
{
    qkd_quant_params qp;
    qkd_quant_params_init(&qp);
    qp.scheme = scheme;
    if (scheme == QKD_QUANT_ASYM)
        qp.group_size = 32;
    qkd_quantizer *q = NULL;
    ck_assert_int_eq(qkd_quantizer_create(ctx, &qp, &q), QKD_OK);
    return q;
}

/* Student -> GGUF (AS_TRAINED) -> load: the same logits, bit for bit, on
 * the reference backend. Rows of 256 (attention, gate, up) take every
 * format; ffn_down's rows of 288 make the 256-value formats fall back to
 * Q8_0. Even cases also quantize the tied embedding/head. */
START_TEST(test_student_round_trip)
{
    qkd_context *ctx = test_context(2);
    qkd_model *m = random_model(ctx, 256, 288, 96, 100 + (uint64_t)_i);
    qkd_quantizer *q = quantizer(ctx, format_schemes[_i]);
    unsigned targets = QKD_QUANT_TARGET_LINEAR;
    if (_i % 2 == 0)
        targets |= QKD_QUANT_TARGET(QKD_TENSOR_OUTPUT);
    ck_assert_int_eq(qkd_model_set_quantizer(m, q, targets), QKD_OK);
    int32_t tokens[16];
    for (int i = 0; i < 16; i++)
        tokens[i] = (i * 37 + _i) % 96;
    float *want = forward_logits(m, tokens, 2, 8);

    const char *path = tmp_path("student.gguf");
    save_ok(m, ctx, path, NULL);
    const uint32_t k = format_types[_i];
    const int k_quant = qkd__ggml_format_of(k)->block == 256;
    qkd__gguf *g = open_gguf(ctx, path);
    for (int i = 0; i < qkd_model_n_tensors(m); i++) {
        qkd_tensor_info info = {.size = sizeof info};
        ck_assert_int_eq(qkd_model_tensor_info(m, i, &info), QKD_OK);
        uint32_t expect = QKD__GGML_F32;
        if (is_projection(info.kind))
            expect = info.kind == QKD_TENSOR_FFN_DOWN && k_quant ? QKD__GGML_Q8_0 : k;
        if (info.kind == QKD_TENSOR_TOKEN_EMBD && (targets & QKD_QUANT_TARGET(QKD_TENSOR_OUTPUT)))
            expect = k;
        ck_assert_msg(type_in(g, info.name) == expect, "%s", info.name);
        qkd_gguf_type reported;
        ck_assert_int_eq(qkd_gguf_tensor_type(m, i, NULL, &reported), QKD_OK);
        ck_assert_int_eq((int)reported, (int)expect);
    }
    qkd__gguf_close(g);
    qkd_model *back = test_load_model(ctx, path);
    float *got = forward_logits(back, tokens, 2, 8);
    ck_assert_msg(memcmp(got, want, 16 * 96 * sizeof(float)) == 0,
                  "logits from the file differ from the student's");
    free(want);
    free(got);
    qkd_model_free(back);
    qkd_model_free(m);
    qkd_quantizer_free(q);
    qkd_context_free(ctx);
}
END_TEST

/* A scheme no GGUF type holds: AS_TRAINED writes Q(w) as F32, so the
 * logits still match; an explicit type quantizes the latent weights. */
START_TEST(test_student_other_scheme)
{
    qkd_context *ctx = test_context(1);
    qkd_model *m = random_model(ctx, 64, 96, 64, 7);
    qkd_quantizer *q = quantizer(ctx, QKD_QUANT_ASYM);
    ck_assert_int_eq(qkd_model_set_quantizer(m, q, QKD_QUANT_TARGET_LINEAR), QKD_OK);
    int32_t tokens[12] = {1, 5, 9, 33, 2, 0, 63, 7, 8, 11, 40, 41};
    float *want = forward_logits(m, tokens, 1, 12);
    const char *path = tmp_path("asym.gguf");
    save_ok(m, ctx, path, NULL);
    ck_assert_uint_eq(file_tensor_type(ctx, path, "blk.0.attn_q.weight"), QKD__GGML_F32);
    qkd_model *back = test_load_model(ctx, path);
    float *got = forward_logits(back, tokens, 1, 12);
    ck_assert(memcmp(got, want, 12 * 64 * sizeof(float)) == 0);
    free(got);
    qkd_model_free(back);

    qkd_gguf_params p;
    qkd_gguf_params_init(&p);
    p.type = QKD_GGUF_Q8_0;
    save_ok(m, ctx, path, &p);
    back = test_load_model(ctx, path);
    int idx;
    int64_t n, n2;
    ck_assert_int_eq(qkd_model_tensor_find(m, "blk.0.ffn_up.weight", &idx), QKD_OK);
    float *latent = tensor_values(m, idx, &n), *stored = tensor_values(back, idx, &n2);
    float *expect = malloc((size_t)n * sizeof *expect);
    uint8_t *blocks = malloc((size_t)n * 2);
    const qkd__ggml_format *f = qkd__ggml_format_of(QKD__GGML_Q8_0);
    qkd__ggml_quantize_row(f, latent, blocks, n);
    qkd__ggml_dequantize_row(f, blocks, expect, n);
    ck_assert(memcmp(stored, expect, (size_t)n * sizeof(float)) == 0);
    free(latent);
    free(stored);
    free(expect);
    free(blocks);
    free(want);
    qkd_model_free(back);
    qkd_model_free(m);
    qkd_quantizer_free(q);
    qkd_context_free(ctx);
}
END_TEST

/* A student with learned scales: moved away from their min-max start, the
 * file still holds exactly the student's Q(w) (GGUF and safetensors), and no
 * scale tensor is written. */
START_TEST(test_learned_scales_export)
{
    qkd_context *ctx = test_context(1);
    qkd_model *m = random_model(ctx, 64, 96, 64, 9);
    int n_weights = qkd_model_n_tensors(m);
    qkd_quant_params qp;
    qkd_quant_params_init(&qp);
    qp.group_size = 32;
    qp.learn_scales = 1;
    qkd_quantizer *q = NULL;
    ck_assert_int_eq(qkd_quantizer_create(ctx, &qp, &q), QKD_OK);
    ck_assert_int_eq(qkd_model_set_quantizer(m, q, QKD_QUANT_TARGET_LINEAR), QKD_OK);
    ck_assert_int_gt(qkd_model_n_tensors(m), n_weights);
    for (int i = n_weights; i < qkd_model_n_tensors(m); i++) {
        qkd_tensor_info info = {.size = sizeof info};
        ck_assert_int_eq(qkd_model_tensor_info(m, i, &info), QKD_OK);
        if (info.kind != QKD_TENSOR_QUANT_SCALE)
            continue;
        int64_t n;
        float *s = tensor_values(m, i, &n);
        for (int64_t k = 0; k < n; k++)
            s[k] *= 0.8f; /* a learned scale, not min-max's */
        ck_assert_int_eq(qkd_model_tensor_set(m, i, s, (size_t)n), QKD_OK);
        free(s);
    }
    int32_t tokens[12] = {1, 5, 9, 33, 2, 0, 63, 7, 8, 11, 40, 41};
    float *want = forward_logits(m, tokens, 1, 12);

    const char *path = tmp_path("learned.gguf");
    save_ok(m, ctx, path, NULL);
    qkd_model *back = test_load_model(ctx, path);
    ck_assert_int_eq(qkd_model_n_tensors(back), n_weights);
    float *got = forward_logits(back, tokens, 1, 12);
    ck_assert(memcmp(got, want, 12 * 64 * sizeof(float)) == 0);
    free(got);
    qkd_model_free(back);

    char *dir = strdup(tmp_path("learned-hf"));
    qkd_safetensors_params sp;
    qkd_safetensors_params_init(&sp);
    sp.as_deployed = 1;
    ck_assert_int_eq(qkd_model_save_safetensors(m, dir, &sp), QKD_OK);
    back = test_load_model(ctx, dir);
    got = forward_logits(back, tokens, 1, 12);
    for (int i = 0; i < 12 * 64; i++)
        ck_assert_msg(fabsf(got[i] - want[i]) <= 1e-5f * (1 + fabsf(want[i])), "logit %d", i);
    free(got);
    free(dir);
    free(want);
    qkd_model_free(back);
    qkd_model_free(m);
    qkd_quantizer_free(q);
    qkd_context_free(ctx);
}
END_TEST

/* ---- stories260K through every type ------------------------------------------------ */

static const qkd_gguf_type all_types[] = {
    QKD_GGUF_F32,  QKD_GGUF_F16,  QKD_GGUF_BF16, QKD_GGUF_Q8_0, QKD_GGUF_Q4_0, QKD_GGUF_Q4_1,
    QKD_GGUF_Q5_0, QKD_GGUF_Q5_1, QKD_GGUF_Q4_K, QKD_GGUF_Q6_K, QKD_GGUF_TQ2_0,
};
enum { N_ALL_TYPES = sizeof all_types / sizeof all_types[0] };

/* llama.cpp's general.file_type of the type most projections get: on
 * stories260K the 256-value types fall back to Q8_0 (7) everywhere. */
static uint32_t expected_file_type(qkd_gguf_type t)
{
    switch (t) {
    case QKD_GGUF_F32: return 0;
    case QKD_GGUF_F16: return 1;
    case QKD_GGUF_BF16: return 32;
    case QKD_GGUF_Q4_0: return 2;
    case QKD_GGUF_Q4_1: return 3;
    case QKD_GGUF_Q5_0: return 8;
    case QKD_GGUF_Q5_1: return 9;
    default: return 7;
    }
}

/* Each tensor of the loaded file is the source tensor quantized and
 * dequantized in the type it was given: the type asked for, or F16 for
 * ffn_down's rows of 172 and Q8_0 for the 256-value types' rows of 64. */
START_TEST(test_stories_every_type)
{
    const char *src = test_shared(STORIES_BIN);
    if (!src)
        return;
    const qkd_gguf_type t = all_types[_i];
    qkd_context *ctx = test_context(2);
    qkd_model *m = test_load_model(ctx, src);
    qkd_gguf_params p;
    qkd_gguf_params_init(&p);
    p.type = t;
    p.embd_type = _i % 3 == 1 ? QKD_GGUF_F16 : QKD_GGUF_F32;
    const char *path = tmp_path("stories.gguf");
    save_ok(m, ctx, path, &p);
    qkd_model *back = test_load_model(ctx, path);
    qkd_model_config a = {.size = sizeof a}, b = {.size = sizeof b};
    ck_assert_int_eq(qkd_model_get_config(m, &a), QKD_OK);
    ck_assert_int_eq(qkd_model_get_config(back, &b), QKD_OK);
    ck_assert(memcmp(&a, &b, sizeof a) == 0);
    ck_assert_int_eq(qkd_model_n_tensors(back), qkd_model_n_tensors(m));

    qkd__gguf *g = open_gguf(ctx, path);
    for (int i = 0; i < qkd_model_n_tensors(m); i++) {
        qkd_tensor_info info = {.size = sizeof info};
        ck_assert_int_eq(qkd_model_tensor_info(m, i, &info), QKD_OK);
        int64_t n, n2;
        float *w = tensor_values(m, i, &n), *got = tensor_values(back, i, &n2);
        uint32_t type = QKD__GGML_F32;
        if (is_projection(info.kind)) {
            const qkd__ggml_format *asked = qkd__ggml_format_of((uint32_t)t);
            type = info.shape[1] % asked->block == 0 ? (uint32_t)t
                   : info.shape[1] % 32 == 0        ? QKD__GGML_Q8_0
                                                    : QKD__GGML_F16;
        } else if (info.kind == QKD_TENSOR_TOKEN_EMBD) {
            type = (uint32_t)p.embd_type;
        }
        ck_assert_uint_eq(type_in(g, info.name), type);
        const qkd__ggml_format *f = qkd__ggml_format_of(type);
        float *expect = malloc((size_t)n * sizeof *expect);
        uint8_t *blocks = malloc(qkd__ggml_row_bytes(f, n));
        qkd__ggml_quantize_row(f, w, blocks, n);
        qkd__ggml_dequantize_row(f, blocks, expect, n);
        ck_assert_msg(memcmp(got, expect, (size_t)n * sizeof(float)) == 0, "%s as %s",
                      info.name, f->name);
        if (type == QKD__GGML_F32)
            ck_assert(memcmp(got, w, (size_t)n * sizeof(float)) == 0);
        free(w);
        free(got);
        free(expect);
        free(blocks);
    }
    uint32_t ft;
    ck_assert_int_eq(qkd__gguf_get_u32(g, "general.file_type", &ft), QKD_OK);
    ck_assert_uint_eq(ft, expected_file_type(t));
    qkd__gguf_close(g);
    qkd_model_free(back);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

static void assert_same_u32(const qkd__gguf *a, const qkd__gguf *b, const char *key)
{
    uint32_t x, y;
    ck_assert_msg(qkd__gguf_get_u32(a, key, &x) == QKD_OK, "ours lacks %s", key);
    ck_assert_int_eq(qkd__gguf_get_u32(b, key, &y), QKD_OK);
    ck_assert_msg(x == y, "%s: %u, llama.cpp's converter wrote %u", key, x, y);
}

/* Our metadata against the file llama.cpp's converter made of the same
 * model: the same llama.* values and the same vocabulary arrays. */
START_TEST(test_stories_metadata)
{
    const char *src = test_shared(STORIES_GGUF);
    if (!src)
        return;
    qkd_context *ctx = test_context(1);
    qkd_model *m = test_load_model(ctx, src);
    const char *path = tmp_path("meta.gguf");
    save_ok(m, ctx, path, NULL);
    qkd__gguf *ours, *ref;
    ck_assert_int_eq(qkd__gguf_open(ctx, path, &ours), QKD_OK);
    ck_assert_int_eq(qkd__gguf_open(ctx, src, &ref), QKD_OK);
    static const char *const keys[] = {
        "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
        "llama.block_count", "llama.attention.head_count", "llama.attention.head_count_kv",
        "llama.rope.dimension_count", "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
    };
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        assert_same_u32(ours, ref, keys[i]);
    float eps_a, eps_b, base;
    ck_assert_int_eq(qkd__gguf_get_f32(ours, "llama.attention.layer_norm_rms_epsilon", &eps_a),
                     QKD_OK);
    ck_assert_int_eq(qkd__gguf_get_f32(ref, "llama.attention.layer_norm_rms_epsilon", &eps_b),
                     QKD_OK);
    ck_assert(eps_a == eps_b);
    ck_assert_int_eq(qkd__gguf_get_f32(ours, "llama.rope.freq_base", &base), QKD_OK);
    ck_assert(base == 10000.0f);
    const char *s;
    uint64_t len, n_ours, n_ref;
    uint32_t v;
    ck_assert_int_eq(qkd__gguf_get_str(ours, "general.architecture", &s, &len), QKD_OK);
    ck_assert(len == 5 && memcmp(s, "llama", 5) == 0);
    ck_assert_int_eq(qkd__gguf_get_str(ours, "tokenizer.ggml.model", &s, &len), QKD_OK);
    ck_assert(len == 5 && memcmp(s, "llama", 5) == 0);
    ck_assert_int_eq(qkd__gguf_get_u32(ours, "general.alignment", &v), QKD_OK);
    ck_assert_uint_eq(v, 32);
    ck_assert_int_eq(qkd__gguf_get_u32(ours, "llama.vocab_size", &v), QKD_OK);
    ck_assert_uint_eq(v, 512);

    qkd__gguf_type et;
    ck_assert_int_eq(qkd__gguf_get_arr(ours, "tokenizer.ggml.tokens", &et, &n_ours), QKD_OK);
    ck_assert_int_eq(qkd__gguf_get_arr(ref, "tokenizer.ggml.tokens", &et, &n_ref), QKD_OK);
    ck_assert_uint_eq(n_ours, n_ref);
    for (uint64_t i = 0; i < n_ref; i++) {
        const char *a, *b;
        uint64_t la, lb;
        ck_assert_int_eq(qkd__gguf_arr_str(ours, "tokenizer.ggml.tokens", i, &a, &la), QKD_OK);
        ck_assert_int_eq(qkd__gguf_arr_str(ref, "tokenizer.ggml.tokens", i, &b, &lb), QKD_OK);
        ck_assert_msg(la == lb && memcmp(a, b, la) == 0, "token %llu differs",
                      (unsigned long long)i);
    }
    float sa[512], sb[512];
    int32_t ta[512], tb[512];
    ck_assert_int_eq(qkd__gguf_arr_f32(ours, "tokenizer.ggml.scores", sa, 512), QKD_OK);
    ck_assert_int_eq(qkd__gguf_arr_f32(ref, "tokenizer.ggml.scores", sb, 512), QKD_OK);
    ck_assert(memcmp(sa, sb, sizeof sa) == 0);
    ck_assert_int_eq(qkd__gguf_arr_i32(ours, "tokenizer.ggml.token_type", ta, 512), QKD_OK);
    ck_assert_int_eq(qkd__gguf_arr_i32(ref, "tokenizer.ggml.token_type", tb, 512), QKD_OK);
    ck_assert(memcmp(ta, tb, sizeof ta) == 0);
    qkd__gguf_close(ours);
    qkd__gguf_close(ref);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* ---- the tokenizer travels: the same greedy text ------------------------------------- */

typedef struct text {
    char buf[4096];
    size_t len;
} text;

static int collect(void *user, int32_t token, const char *piece, size_t len)
{
    text *t = user;
    (void)token;
    ck_assert_uint_lt(t->len + len, sizeof t->buf);
    memcpy(t->buf + t->len, piece, len);
    t->len += len;
    t->buf[t->len] = '\0';
    return 0;
}

static void greedy(qkd_model *m, const qkd_tokenizer *tok, text *out)
{
    qkd_generate_params gp;
    qkd_generate_params_init(&gp);
    gp.steps = 100;
    gp.sampler.temperature = 0.0f;
    int n = 0;
    out->len = 0;
    ck_assert_int_eq(qkd_generate(m, tok, "Once upon a time", &gp, collect, out, &n), QKD_OK);
    ck_assert_int_gt(n, 50);
}

START_TEST(test_stories_generate_same_text)
{
    const char *src = test_shared(STORIES_BIN);
    if (!src)
        return;
    qkd_context *ctx = test_context(1);
    qkd_model *m = test_load_model(ctx, src);
    qkd_tokenizer *tok = NULL;
    ck_assert_int_eq(qkd_tokenizer_load(ctx, test_shared(STORIES_TOK), &tok), QKD_OK);
    qkd_gguf_params p;
    qkd_gguf_params_init(&p);
    p.type = QKD_GGUF_F32;
    p.tokenizer = tok;
    const char *path = tmp_path("gen.gguf");
    save_ok(m, ctx, path, &p);
    qkd_model *back = test_load_model(ctx, path);
    const qkd_tokenizer *inside = qkd_model_tokenizer(back);
    ck_assert_ptr_nonnull(inside);
    ck_assert_int_eq(qkd_tokenizer_vocab_size(inside), 512);
    static text a, b;
    greedy(m, tok, &a);
    greedy(back, inside, &b);
    ck_assert_str_eq(a.buf, b.buf);
    ck_assert_ptr_nonnull(strstr(a.buf, "Lily"));
    qkd_model_free(back);
    qkd_model_free(m);
    qkd_tokenizer_free(tok);
    qkd_context_free(ctx);
}
END_TEST

/* ---- a W4 student's perplexity, in memory and from the file ------------------------------ */

START_TEST(test_w4_perplexity)
{
    char b1[1024], b2[1024], b3[1024];
    const char *src = shared_path(STORIES_BIN, b1, sizeof b1);
    const char *tok_path = shared_path(STORIES_TOK, b2, sizeof b2);
    const char *text_path = shared_path(TINYSTORIES, b3, sizeof b3);
    if (!src || !tok_path || !text_path)
        return;
    enum { B = 4, T = 128 };
    qkd_context *ctx = test_context(2);
    qkd_tokenizer *tok = NULL;
    ck_assert_int_eq(qkd_tokenizer_load(ctx, tok_path, &tok), QKD_OK);
    size_t len, n_ids;
    char *txt = test_read_file(text_path, &len);
    int32_t *ids = malloc((len + 2) * sizeof *ids);
    ck_assert_int_eq(qkd_tokenizer_encode(tok, txt, len, QKD_ENCODE_BOS, ids, len + 2, &n_ids),
                     QKD_OK);
    ck_assert_uint_gt(n_ids, B * (T + 1));
    int32_t tokens[B * T], targets[B * T];
    for (int b = 0; b < B; b++) {
        memcpy(tokens + b * T, ids + b * T, T * sizeof *ids);
        memcpy(targets + b * T, ids + b * T + 1, T * sizeof *ids);
    }
    qkd_model *m = test_load_model(ctx, src);
    float fp_loss, student_loss, file_loss;
    ck_assert_int_eq(qkd_model_forward(m, tokens, B, T), QKD_OK);
    ck_assert_int_eq(qkd_model_cross_entropy(m, targets, 0, &fp_loss), QKD_OK);
    qkd_quantizer *q = quantizer(ctx, _i == 0 ? QKD_QUANT_Q4_0 : QKD_QUANT_Q4_1);
    ck_assert_int_eq(qkd_model_set_quantizer(m, q, QKD_QUANT_TARGET_LINEAR), QKD_OK);
    ck_assert_int_eq(qkd_model_forward(m, tokens, B, T), QKD_OK);
    ck_assert_int_eq(qkd_model_cross_entropy(m, targets, 0, &student_loss), QKD_OK);

    const char *path = tmp_path("w4.gguf");
    save_ok(m, ctx, path, NULL);
    ck_assert_uint_eq(file_tensor_type(ctx, path, "blk.2.attn_v.weight"),
                      _i == 0 ? QKD__GGML_Q4_0 : QKD__GGML_Q4_1);
    qkd_model *back = test_load_model(ctx, path);
    ck_assert_int_eq(qkd_model_forward(back, tokens, B, T), QKD_OK);
    ck_assert_int_eq(qkd_model_cross_entropy(back, targets, 0, &file_loss), QKD_OK);
    ck_assert_msg(file_loss == student_loss, "perplexity from the file %.9g, in memory %.9g",
                  exp(file_loss), exp(student_loss));
    /* 4-bit weights cost something, but the model still models the text */
    ck_assert(student_loss != fp_loss);
    ck_assert(exp(student_loss) < 2.0 * exp(fp_loss));
    qkd_model_free(back);
    qkd_model_free(m);
    qkd_quantizer_free(q);
    qkd_tokenizer_free(tok);
    free(ids);
    free(txt);
    qkd_context_free(ctx);
}
END_TEST

/* ---- malformed block files ------------------------------------------------------------- */

/* Loading must fail with want, mention `what`, and free everything. */
static void load_fails(qkd_context *ctx, const test_alloc *c, long base, const char *path,
                       qkd_status want, const char *what)
{
    qkd_model *m = (qkd_model *)&m;
    qkd_status st = qkd_model_load(ctx, path, &m);
    ck_assert_msg(st == want, "got %s (%s), want %s", qkd_status_name(st),
                  qkd_context_last_error(ctx), qkd_status_name(want));
    ck_assert_ptr_null(m);
    if (what)
        ck_assert_msg(strstr(qkd_context_last_error(ctx), what), "message '%s' lacks '%s'",
                      qkd_context_last_error(ctx), what);
    ck_assert_int_eq(c->live, base);
}

/* Offset of the tensor info of `name` (at its n_dims field). */
static size_t info_at(const uint8_t *b, size_t len, const char *name)
{
    size_t n = strlen(name);
    for (size_t i = 8; i + n + 4 <= len; i++) {
        uint64_t l;
        memcpy(&l, b + i - 8, 8);
        if (l == n && memcmp(b + i, name, n) == 0)
            return i + n;
    }
    ck_abort_msg("no tensor info for %s", name);
    return 0;
}

static void patch_u64(uint8_t *p, uint64_t v)
{
    memcpy(p, &v, 8);
}

START_TEST(test_malformed_block_files)
{
    test_alloc c;
    qkd_context *ctx = test_counting_context(&c, 1);
    const long base = c.live; /* the context's own */
    qkd_model *m = random_model(ctx, 64, 96, 64, 3);
    qkd_gguf_params p;
    qkd_gguf_params_init(&p);
    p.type = QKD_GGUF_Q4_0;
    const char *good = tmp_path("good.gguf");
    save_ok(m, ctx, good, &p);
    qkd_model_free(m);
    ck_assert_int_eq(c.live, base);
    size_t len;
    uint8_t *orig = test_read_file(good, &len), *b = malloc(len);
    char bad[600];
    snprintf(bad, sizeof bad, "%s.bad", good);

    /* block data cut short, anywhere in the data section */
    for (size_t cut = len - 1; cut > len - 3000; cut -= 151) {
        test_write_file(bad, orig, cut);
        load_fails(ctx, &c, base, bad, QKD_ERR_FORMAT, "runs past the end");
    }
    /* ne[0] that is not a multiple of the block */
    const size_t q = info_at(orig, len, "blk.0.attn_q.weight");
    memcpy(b, orig, len);
    patch_u64(b + q + 4, 48);
    test_write_file(bad, b, len);
    load_fails(ctx, &c, base, bad, QKD_ERR_FORMAT,
               "not a multiple of the 32-value blocks of type Q4_0");
    /* a 256-value type on rows of 64 */
    memcpy(b, orig, len);
    b[q + 20] = QKD__GGML_Q4_K;
    test_write_file(bad, b, len);
    load_fails(ctx, &c, base, bad, QKD_ERR_FORMAT, "Q4_K");
    /* more rows than the blocks in the file */
    memcpy(b, orig, len);
    const size_t down = info_at(orig, len, "blk.0.ffn_down.weight");
    patch_u64(b + down + 12, 1u << 20);
    test_write_file(bad, b, len);
    load_fails(ctx, &c, base, bad, QKD_ERR_FORMAT, "runs past the end");
    /* a block type libqkd does not read */
    memcpy(b, orig, len);
    b[q + 20] = 10; /* Q2_K */
    test_write_file(bad, b, len);
    load_fails(ctx, &c, base, bad, QKD_ERR_UNSUPPORTED, "Q2_K");
    /* and the untouched file still loads */
    m = test_load_model(ctx, good);
    qkd_model_free(m);
    ck_assert_int_eq(c.live, base);
    free(orig);
    free(b);
    qkd_context_free(ctx);
}
END_TEST

START_TEST(test_save_errors)
{
    test_alloc c;
    qkd_context *ctx = test_counting_context(&c, 1);
    const long base = c.live; /* the context's own */
    qkd_model *m = random_model(ctx, 64, 96, 64, 5);
    const char *path = tmp_path("err.gguf");
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    qkd_gguf_params p;

    ck_assert_int_eq(qkd_model_save_gguf(NULL, path, NULL), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_model_save_gguf(m, NULL, NULL), QKD_ERR_INVALID_ARG);
    qkd_gguf_params_init(&p);
    p.size = 8;
    ck_assert_int_eq(qkd_model_save_gguf(m, path, &p), QKD_ERR_INVALID_ARG);
    qkd_gguf_params_init(&p);
    p.type = (qkd_gguf_type)5;
    ck_assert_int_eq(qkd_model_save_gguf(m, path, &p), QKD_ERR_INVALID_ARG);
    qkd_gguf_params_init(&p);
    qkd_tokenizer *bytes = NULL;
    ck_assert_int_eq(qkd_tokenizer_create_bytes(ctx, &bytes), QKD_OK);
    p.tokenizer = bytes;
    ck_assert_int_eq(qkd_model_save_gguf(m, path, &p), QKD_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(ctx), "260"));
    qkd_tokenizer_free(bytes);
    ck_assert_int_eq(qkd_model_save_gguf(m, "/nonexistent-dir/x.gguf", NULL), QKD_ERR_IO);

    int idx;
    int64_t n;
    ck_assert_int_eq(qkd_model_tensor_find(m, "blk.0.ffn_gate.weight", &idx), QKD_OK);
    float *w = tensor_values(m, idx, &n);
    qkd_gguf_params_init(&p);
    p.type = QKD_GGUF_Q4_0;
    w[70] = NAN;
    ck_assert_int_eq(qkd_model_tensor_set(m, idx, w, (size_t)n), QKD_OK);
    ck_assert_int_eq(qkd_model_save_gguf(m, path, &p), QKD_ERR_NON_FINITE);
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(ctx), "blk.0.ffn_gate.weight[70]"));
    w[70] = 1e9f; /* d = 1.25e8 overflows the half scale */
    ck_assert_int_eq(qkd_model_tensor_set(m, idx, w, (size_t)n), QKD_OK);
    ck_assert_int_eq(qkd_model_save_gguf(m, path, &p), QKD_ERR_RANGE);
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(ctx), "Q4_0"));
    w[70] = 1e5f;
    ck_assert_int_eq(qkd_model_tensor_set(m, idx, w, (size_t)n), QKD_OK);
    p.type = QKD_GGUF_F16;
    ck_assert_int_eq(qkd_model_save_gguf(m, path, &p), QKD_ERR_RANGE);
    p.type = QKD_GGUF_Q4_0; /* d = 12500 fits */
    save_ok(m, ctx, path, &p);
    ck_assert(test_exists(path));
    ck_assert(!test_exists(tmp));
    ck_assert_int_eq(unlink(path), 0);
    p.type = QKD_GGUF_F16;
    ck_assert_int_eq(qkd_model_save_gguf(m, path, &p), QKD_ERR_RANGE);
    ck_assert(!test_exists(path) && !test_exists(tmp)); /* a failed save leaves nothing */
    free(w);
    qkd_model_free(m);
    ck_assert_int_eq(c.live, base);
    qkd_context_free(ctx);
}
END_TEST

START_TEST(test_type_names_and_query)
{
    qkd_gguf_type t;
    ck_assert_int_eq(qkd_gguf_type_from_name("q4_k", &t), QKD_OK);
    ck_assert_int_eq(t, QKD_GGUF_Q4_K);
    ck_assert_int_eq(qkd_gguf_type_from_name("TQ2_0", &t), QKD_OK);
    ck_assert_int_eq(t, QKD_GGUF_TQ2_0);
    ck_assert_int_eq(qkd_gguf_type_from_name("as_trained", &t), QKD_OK);
    ck_assert_int_eq(t, QKD_GGUF_AS_TRAINED);
    ck_assert_int_eq(qkd_gguf_type_from_name("q3_k", &t), QKD_ERR_NOT_FOUND);
    ck_assert_int_eq(qkd_gguf_type_from_name("q4_0x", &t), QKD_ERR_NOT_FOUND);
    ck_assert_int_eq(qkd_gguf_type_from_name(NULL, &t), QKD_ERR_INVALID_ARG);
    ck_assert_str_eq(qkd_gguf_type_name(QKD_GGUF_Q6_K), "Q6_K");
    ck_assert_str_eq(qkd_gguf_type_name(QKD_GGUF_BF16), "BF16");
    ck_assert_ptr_null(qkd_gguf_type_name((qkd_gguf_type)99));

    qkd_context *ctx = test_context(1);
    qkd_model *m = random_model(ctx, 64, 172, 64, 9);
    qkd_gguf_params p;
    qkd_gguf_params_init(&p);
    p.type = QKD_GGUF_TQ2_0;
    p.embd_type = QKD_GGUF_Q4_K;
    static const struct {
        const char *name;
        qkd_gguf_type type;
    } want[] = {
        {"blk.0.attn_q.weight", QKD_GGUF_Q8_0},   /* rows of 64 */
        {"blk.0.ffn_down.weight", QKD_GGUF_F16},  /* rows of 172 */
        {"blk.0.attn_norm.weight", QKD_GGUF_F32}, /* norms stay float */
        {"token_embd.weight", QKD_GGUF_Q8_0},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        int idx;
        ck_assert_int_eq(qkd_model_tensor_find(m, want[i].name, &idx), QKD_OK);
        ck_assert_int_eq(qkd_gguf_tensor_type(m, idx, &p, &t), QKD_OK);
        ck_assert_msg(t == want[i].type, "%s: %s", want[i].name, qkd_gguf_type_name(t));
    }
    ck_assert_int_eq(qkd_gguf_tensor_type(m, 999, &p, &t), QKD_ERR_RANGE);
    ck_assert_int_eq(qkd_gguf_tensor_type(m, 0, NULL, NULL), QKD_ERR_INVALID_ARG);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* ---- qkd export --------------------------------------------------------------------------- */

/* Run the qkd tool with a shell command line after "qkd "; its stdout
 * and stderr go to the files out and err (NULL: discarded). Returns the
 * exit status. */
static int run_qkd(const char *args, const char *out, const char *err)
{
    const char *cli = getenv("QKD_CLI");
    ck_assert_msg(cli && *cli, "QKD_CLI is not set (meson test sets it)");
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "'%s' %s >'%s' 2>'%s'", cli, args, out ? out : "/dev/null",
             err ? err : "/dev/null");
    int st = system(cmd);
    ck_assert(st != -1 && WIFEXITED(st));
    return WEXITSTATUS(st);
}

START_TEST(test_cli_export)
{
    char srcp[1024], tokp[1024], args[4096];
    if (!shared_path(STORIES_BIN, srcp, sizeof srcp) ||
        !shared_path(STORIES_TOK, tokp, sizeof tokp))
        return;
    const char *dir = test_tmpdir();
    char out[600], log[600], gen_a[600], gen_b[600];
    snprintf(out, sizeof out, "%s/q4.gguf", dir);
    snprintf(log, sizeof log, "%s/log", dir);
    snprintf(gen_a, sizeof gen_a, "%s/a", dir);
    snprintf(gen_b, sizeof gen_b, "%s/b", dir);

    snprintf(args, sizeof args, "export '%s' --tokenizer '%s' --format q4_0 --out '%s'", srcp,
             tokp, out);
    ck_assert_int_eq(run_qkd(args, NULL, log), 0);
    size_t n;
    char *text = test_read_text(log, &n);
    ck_assert_ptr_nonnull(strstr(text, "blk.4.ffn_down.weight: rows of 172 values do not fill "
                                       "Q4_0 blocks: written as F16"));
    ck_assert_ptr_nonnull(strstr(text, "5 tensors fell back"));
    ck_assert_ptr_null(strstr(text, "attn_q.weight: rows"));
    free(text);
    qkd_context *ctx = test_context(1);
    ck_assert_uint_eq(file_tensor_type(ctx, out, "blk.0.attn_q.weight"), QKD__GGML_Q4_0);
    qkd_context_free(ctx);

    /* F32 export: qkd generate gives the source's text */
    snprintf(out, sizeof out, "%s/f32.gguf", dir);
    snprintf(args, sizeof args, "export '%s' --tokenizer '%s' --out '%s'", srcp, tokp, out);
    ck_assert_int_eq(run_qkd(args, NULL, NULL), 0);
    snprintf(args, sizeof args, "generate '%s' --tokenizer '%s' -t 0 -n 80", srcp, tokp);
    ck_assert_int_eq(run_qkd(args, gen_a, NULL), 0);
    snprintf(args, sizeof args, "generate '%s' -t 0 -n 80", out);
    ck_assert_int_eq(run_qkd(args, gen_b, NULL), 0);
    size_t la, lb;
    char *a = test_read_file(gen_a, &la), *b = test_read_file(gen_b, &lb);
    ck_assert_uint_gt(la, 100);
    ck_assert(la == lb && memcmp(a, b, la) == 0);
    free(a);
    free(b);

    static const char *const usage[] = {
        "--format q4_0",                           /* no --out */
        "--to onnx --out x",                       /* unknown target */
        "--format q3_k --out x",                   /* unknown type */
        "--format as_trained --out x",             /* a file has no binding */
        "--to safetensors --format q4_0 --out x",  /* not a safetensors dtype */
        "--to safetensors --tokenizer t --out x",  /* gguf-only option */
    };
    for (size_t i = 0; i < sizeof usage / sizeof usage[0]; i++) {
        snprintf(args, sizeof args, "export '%s' %s", srcp, usage[i]);
        ck_assert_msg(run_qkd(args, NULL, NULL) == 2, "qkd %s", args);
    }
}
END_TEST

Suite *suite_export_gguf(void)
{
    Suite *s = suite_create("export_gguf");
    TCase *tc = tcase_create("students");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_student_round_trip, 0, N_FORMATS);
    tcase_add_test(tc, test_student_other_scheme);
    tcase_add_test(tc, test_learned_scales_export);
    suite_add_tcase(s, tc);

    tc = tcase_create("stories260K");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_stories_every_type, 0, N_ALL_TYPES);
    tcase_add_test(tc, test_stories_metadata);
    tcase_add_test(tc, test_stories_generate_same_text);
    tcase_add_loop_test(tc, test_w4_perplexity, 0, 2);
    tcase_add_test(tc, test_cli_export);
    suite_add_tcase(s, tc);

    tc = tcase_create("errors");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_malformed_block_files);
    tcase_add_test(tc, test_save_errors);
    tcase_add_test(tc, test_type_names_and_query);
    suite_add_tcase(s, tc);
    return s;
}
