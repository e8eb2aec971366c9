/* Loaders: llama2.c .bin and GGUF (F32, F16, BF16), the dispatch of
 * qkd_model_load, and a malformed-input suite (truncations, bad headers,
 * absurd counts and sizes, random garbage) run under a counting allocator
 * so that every error path is also checked for leaks. */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "io/gguf.h"

#define STORIES_BIN "models/stories260K/stories260K.bin"
#define STORIES_GGUF "models/stories260K/stories260K.gguf"

/* ---- small helpers ----------------------------------------------------- */

/* Load must fail (with `want` unless it is QKD_OK), leave *out NULL,
 * record a message, and give back every allocation. */
static void load_fails(qkd_context *ctx, const test_alloc *c, const char *path,
                       qkd_status want, const char *what)
{
    long live = c->live;
    qkd_model *m = (qkd_model *)&m; /* must be overwritten with NULL */
    qkd_status s = qkd_model_load(ctx, path, &m);
    ck_assert_msg(s != QKD_OK, "%s: loaded", what);
    if (want != QKD_OK)
        ck_assert_msg(s == want, "%s: got %s (%s), want %s", what, qkd_status_name(s),
                      qkd_context_last_error(ctx), qkd_status_name(want));
    ck_assert_ptr_null(m);
    ck_assert_msg(qkd_context_last_error(ctx)[0] != '\0', "%s: no message", what);
    ck_assert_msg(c->live == live, "%s: %ld allocations leaked", what, c->live - live);
}

static void assert_msg_has(qkd_context *ctx, const char *needle)
{
    const char *msg = qkd_context_last_error(ctx);
    ck_assert_msg(strstr(msg, needle) != NULL, "message '%s' lacks '%s'", msg, needle);
}

static float *tensor_copy(const qkd_model *m, int index, int64_t *n)
{
    qkd_tensor_info info = {.size = sizeof info};
    ck_assert_int_eq(qkd_model_tensor_info(m, index, &info), QKD_OK);
    float *v = malloc((size_t)info.n_elements * sizeof *v);
    ck_assert_ptr_nonnull(v);
    ck_assert_int_eq(qkd_model_tensor_get(m, index, v, (size_t)info.n_elements), QKD_OK);
    *n = info.n_elements;
    return v;
}

static float *tensor_by_name(const qkd_model *m, const char *name, int64_t *n)
{
    int index;
    ck_assert_msg(qkd_model_tensor_find(m, name, &index) == QKD_OK, "no tensor %s", name);
    return tensor_copy(m, index, n);
}

static uint64_t xorshift(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static void patch_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void patch_u64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* Position of the first occurrence of str in the buffer (must exist). */
static size_t find_bytes(const uint8_t *p, size_t n, const char *str)
{
    const uint8_t *hit = memmem(p, n, str, strlen(str));
    ck_assert_msg(hit != NULL, "'%s' not in the buffer", str);
    return (size_t)(hit - p);
}

/* ---- stories260K: .bin and .gguf -------------------------------------- */

static void check_stories_config(const qkd_model *m, int tied, int seq_len)
{
    qkd_model_config cfg;
    qkd_model_config_init(&cfg);
    ck_assert_int_eq(qkd_model_get_config(m, &cfg), QKD_OK);
    ck_assert_int_eq(cfg.dim, 64);
    ck_assert_int_eq(cfg.hidden_dim, 172);
    ck_assert_int_eq(cfg.n_layers, 5);
    ck_assert_int_eq(cfg.n_heads, 8);
    ck_assert_int_eq(cfg.n_kv_heads, 4);
    ck_assert_int_eq(cfg.vocab_size, 512);
    ck_assert_int_eq(cfg.max_seq_len, seq_len);
    ck_assert_int_eq(cfg.tied_embeddings, tied);
    ck_assert_float_eq_tol(cfg.rope_theta, 10000.0f, 1e-3f);
    ck_assert_float_eq_tol(cfg.norm_eps, 1e-5f, 1e-9f);
}

START_TEST(stories_bin_and_gguf_agree)
{
    const char *bin_path = test_shared(STORIES_BIN);
    if (!bin_path)
        return;
    char bin[4096];
    snprintf(bin, sizeof bin, "%s", bin_path);
    const char *gguf = test_shared(STORIES_GGUF);
    if (!gguf)
        return;
    qkd_context *ctx = test_context(1);
    qkd_model *a = test_load_model(ctx, bin);
    qkd_model *b = test_load_model(ctx, gguf);
    check_stories_config(a, 1, 512);
    check_stories_config(b, 0, 128); /* the converter recorded 128 */
    ck_assert_int_eq(qkd_model_n_tensors(a), 1 + 5 * 9 + 1);
    ck_assert_int_eq(qkd_model_n_tensors(b), 1 + 5 * 9 + 2);

    /* Every tensor of the tied .bin equals the .gguf's, bit for bit. */
    for (int i = 0; i < qkd_model_n_tensors(a); i++) {
        qkd_tensor_info info = {.size = sizeof info};
        ck_assert_int_eq(qkd_model_tensor_info(a, i, &info), QKD_OK);
        int64_t na, nb;
        float *va = tensor_copy(a, i, &na);
        float *vb = tensor_by_name(b, info.name, &nb);
        ck_assert_int_eq(na, nb);
        ck_assert_msg(memcmp(va, vb, (size_t)na * sizeof *va) == 0, "%s differs", info.name);
        free(va);
        free(vb);
    }
    /* The .gguf's untied head is a copy of the embedding. */
    int64_t ne, no;
    float *embd = tensor_by_name(a, "token_embd.weight", &ne);
    float *out = tensor_by_name(b, "output.weight", &no);
    ck_assert_int_eq(ne, no);
    ck_assert_int_eq(memcmp(embd, out, (size_t)ne * sizeof *embd), 0);
    free(embd);
    free(out);

    /* A tokenizer comes with the .gguf only. */
    ck_assert_ptr_null(qkd_model_tokenizer(a));
    ck_assert_ptr_nonnull(qkd_model_tokenizer(b));
    ck_assert_int_eq(qkd_tokenizer_vocab_size(qkd_model_tokenizer(b)), 512);
    qkd_model_free(a);
    qkd_model_free(b);
    qkd_context_free(ctx);
}
END_TEST

/* Compare a loaded tensor slice with floats read at a byte offset that
 * the test computes from llama2.c's layout itself. */
static void spot_check(const qkd_model *m, const uint8_t *file, const char *name,
                       int64_t first, size_t offset, int count)
{
    int64_t n;
    float *v = tensor_by_name(m, name, &n);
    ck_assert_int_le(first + count, n);
    for (int i = 0; i < count; i++) {
        float want;
        memcpy(&want, file + offset + 4 * (size_t)i, 4);
        ck_assert_msg(memcmp(&v[first + i], &want, 4) == 0, "%s[%lld]: %g vs %g", name,
                      (long long)(first + i), v[first + i], want);
    }
    free(v);
}

START_TEST(stories_bin_raw_offsets)
{
    const char *path = test_shared(STORIES_BIN);
    if (!path)
        return;
    size_t len;
    uint8_t *file = test_read_file(path, &len);
    ck_assert_uint_eq(len, 1056540);
    qkd_context *ctx = test_context(1);
    qkd_model *m = test_load_model(ctx, path);
    const size_t D = 64, H = 172, L = 5, KV = 32, V = 512, F = 4;
    size_t embd = 28, att = embd + F * V * D, wq = att + F * L * D, wk = wq + F * L * D * D;
    size_t wv = wk + F * L * KV * D, wo = wv + F * L * KV * D, ffn = wo + F * L * D * D;
    size_t w1 = ffn + F * L * D, w2 = w1 + F * L * H * D, w3 = w2 + F * L * D * H;
    size_t fin = w3 + F * L * H * D;
    ck_assert_uint_eq(fin + F * D + F * 512 * 4 * 2, len); /* then freq_cis real/imag */
    spot_check(m, file, "token_embd.weight", 0, embd, 64);
    spot_check(m, file, "token_embd.weight", 511 * 64 + 60, embd + F * (511 * 64 + 60), 4);
    spot_check(m, file, "blk.0.attn_norm.weight", 0, att, 64);
    spot_check(m, file, "blk.4.attn_q.weight", 4000, wq + F * (4 * D * D + 4000), 96);
    spot_check(m, file, "blk.2.attn_k.weight", 100, wk + F * (2 * KV * D + 100), 50);
    spot_check(m, file, "blk.3.attn_v.weight", 0, wv + F * 3 * KV * D, 32);
    spot_check(m, file, "blk.1.attn_output.weight", 7, wo + F * (D * D + 7), 64);
    spot_check(m, file, "blk.4.ffn_norm.weight", 0, ffn + F * 4 * D, 64);
    spot_check(m, file, "blk.2.ffn_gate.weight", 171 * 64, w1 + F * (2 * H * D + 171 * 64), 64);
    spot_check(m, file, "blk.0.ffn_down.weight", 5, w2 + F * 5, 172);
    spot_check(m, file, "blk.4.ffn_up.weight", 0, w3 + F * 4 * H * D, 64);
    spot_check(m, file, "output_norm.weight", 0, fin, 64);
    qkd_model_free(m);
    qkd_context_free(ctx);
    free(file);
}
END_TEST

/* ---- a GGUF writer for small test files -------------------------------- */

typedef struct gb {
    uint8_t *p;
    size_t n, cap;
} gb;

static void put(gb *b, const void *src, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2;
        b->p = realloc(b->p, b->cap);
        ck_assert_ptr_nonnull(b->p);
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}

static void put_u32(gb *b, uint32_t v) { put(b, &v, 4); }
static void put_u64(gb *b, uint64_t v) { put(b, &v, 8); }

static void put_str(gb *b, const char *s)
{
    put_u64(b, strlen(s));
    put(b, s, strlen(s));
}

static void pad_to(gb *b, size_t align)
{
    static const uint8_t zero[64];
    put(b, zero, (align - b->n % align) % align);
}

static void kv_u32(gb *b, const char *key, uint32_t v)
{
    put_str(b, key);
    put_u32(b, QKD__GGUF_U32);
    put_u32(b, v);
}

static void kv_f32(gb *b, const char *key, float v)
{
    put_str(b, key);
    put_u32(b, QKD__GGUF_F32);
    put(b, &v, 4);
}

static void kv_str(gb *b, const char *key, const char *v)
{
    put_str(b, key);
    put_u32(b, QKD__GGUF_STRING);
    put_str(b, v);
}

typedef struct gtensor {
    const char *name;
    uint32_t n_dims;
    uint64_t ne[2];
} gtensor;

/* An exactly representable value (k/8, |k| <= 16) for F32, F16 and BF16. */
static float tiny_value(size_t tensor, uint64_t i)
{
    return (float)((int)((i * 7 + tensor * 13) % 33) - 16) / 8.0f;
}

/* float -> IEEE half for normal numbers and zero that fit exactly. */
static uint16_t to_half(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    if ((x & 0x7fffffff) == 0)
        return sign;
    ck_assert_uint_eq(x & 0x1fff, 0);
    int exp = (int)((x >> 23) & 0xff) - 127 + 15;
    ck_assert(exp > 0 && exp < 31);
    return (uint16_t)(sign | exp << 10 | ((x >> 13) & 0x3ff));
}

static void put_value(gb *b, uint32_t type, float v)
{
    uint32_t bits;
    memcpy(&bits, &v, 4);
    uint16_t h = type == QKD__GGML_F16 ? to_half(v) : (uint16_t)(bits >> 16);
    if (type == QKD__GGML_F32)
        put(b, &v, 4);
    else
        put(b, &h, 2);
}

static size_t type_bytes(uint32_t type)
{
    return type == QKD__GGML_F32 ? 4 : 2;
}

/* A whole GGUF v3 file: kvs (n_kv entries, already encoded), tensor infos
 * and data (tiny_value pattern in `type`), alignment 32. */
static gb gguf_file(const gb *kvs, uint64_t n_kv, const gtensor *t, size_t n_t, uint32_t type)
{
    gb b = {0};
    put(&b, "GGUF", 4);
    put_u32(&b, 3);
    put_u64(&b, n_t);
    put_u64(&b, n_kv);
    put(&b, kvs->p, kvs->n);
    uint64_t offset = 0;
    for (size_t i = 0; i < n_t; i++) {
        put_str(&b, t[i].name);
        put_u32(&b, t[i].n_dims);
        for (uint32_t d = 0; d < t[i].n_dims; d++)
            put_u64(&b, t[i].ne[d]);
        put_u32(&b, type);
        put_u64(&b, offset);
        uint64_t bytes = t[i].ne[0] * (t[i].n_dims > 1 ? t[i].ne[1] : 1) * type_bytes(type);
        offset += (bytes + 31) / 32 * 32;
    }
    pad_to(&b, 32);
    for (size_t i = 0; i < n_t; i++) {
        uint64_t n = t[i].ne[0] * (t[i].n_dims > 1 ? t[i].ne[1] : 1);
        for (uint64_t k = 0; k < n; k++)
            put_value(&b, type, tiny_value(i, k));
        pad_to(&b, 32);
    }
    return b;
}

/* The tiny LLaMA: dim 8, hidden 16, 1 layer, 2 heads, vocab 16, context
 * 32; with_kv: 1 kv head, theta 500000 and eps 1e-6 recorded; without,
 * those keys are absent (defaults: 2 kv heads, 10000, 1e-5). */
enum { TINY_TENSORS = 12 };

static gtensor tiny_tensors[TINY_TENSORS] = {
    {"token_embd.weight", 2, {8, 16}},
    {"blk.0.attn_norm.weight", 1, {8, 0}},
    {"blk.0.attn_q.weight", 2, {8, 8}},
    {"blk.0.attn_k.weight", 2, {8, 4}},
    {"blk.0.attn_v.weight", 2, {8, 4}},
    {"blk.0.attn_output.weight", 2, {8, 8}},
    {"blk.0.ffn_norm.weight", 1, {8, 0}},
    {"blk.0.ffn_gate.weight", 2, {8, 16}},
    {"blk.0.ffn_down.weight", 2, {16, 8}},
    {"blk.0.ffn_up.weight", 2, {8, 16}},
    {"output_norm.weight", 1, {8, 0}},
    {"output.weight", 2, {8, 16}},
};

static gb tiny_gguf(uint32_t type, bool tied, bool with_kv)
{
    gb kvs = {0};
    uint64_t n_kv = 0;
    kv_str(&kvs, "general.architecture", "llama"), n_kv++;
    kv_u32(&kvs, "general.alignment", 32), n_kv++;
    kv_u32(&kvs, "llama.embedding_length", 8), n_kv++;
    kv_u32(&kvs, "llama.feed_forward_length", 16), n_kv++;
    kv_u32(&kvs, "llama.block_count", 1), n_kv++;
    kv_u32(&kvs, "llama.attention.head_count", 2), n_kv++;
    kv_u32(&kvs, "llama.context_length", 32), n_kv++;
    /* an array the loader does not need: the parser must walk it */
    put_str(&kvs, "test.array");
    put_u32(&kvs, QKD__GGUF_ARRAY);
    put_u32(&kvs, QKD__GGUF_U32);
    put_u64(&kvs, 3);
    for (uint32_t i = 0; i < 3; i++)
        put_u32(&kvs, i);
    n_kv++;
    if (with_kv) {
        kv_u32(&kvs, "llama.attention.head_count_kv", 1), n_kv++;
        kv_f32(&kvs, "llama.rope.freq_base", 500000.0f), n_kv++;
        kv_f32(&kvs, "llama.attention.layer_norm_rms_epsilon", 1e-6f), n_kv++;
    }
    gtensor t[TINY_TENSORS];
    memcpy(t, tiny_tensors, sizeof t);
    if (!with_kv)
        t[3].ne[1] = t[4].ne[1] = 8;
    gb b = gguf_file(&kvs, n_kv, t, tied ? TINY_TENSORS - 1 : TINY_TENSORS, type);
    free(kvs.p);
    return b;
}

static void check_tiny(const qkd_model *m, bool tied, bool with_kv)
{
    qkd_model_config cfg;
    qkd_model_config_init(&cfg);
    ck_assert_int_eq(qkd_model_get_config(m, &cfg), QKD_OK);
    ck_assert_int_eq(cfg.dim, 8);
    ck_assert_int_eq(cfg.hidden_dim, 16);
    ck_assert_int_eq(cfg.n_layers, 1);
    ck_assert_int_eq(cfg.n_heads, 2);
    ck_assert_int_eq(cfg.n_kv_heads, with_kv ? 1 : 2);
    ck_assert_int_eq(cfg.vocab_size, 16);
    ck_assert_int_eq(cfg.max_seq_len, 32);
    ck_assert_int_eq(cfg.tied_embeddings, tied);
    ck_assert_float_eq(cfg.rope_theta, with_kv ? 500000.0f : 10000.0f);
    ck_assert_float_eq(cfg.norm_eps, with_kv ? 1e-6f : 1e-5f);
    ck_assert_int_eq(qkd_model_n_tensors(m), tied ? TINY_TENSORS - 1 : TINY_TENSORS);
    for (size_t i = 0; i < (size_t)qkd_model_n_tensors(m); i++) {
        int64_t n;
        float *v = tensor_by_name(m, tiny_tensors[i].name, &n);
        for (int64_t k = 0; k < n; k++)
            ck_assert_msg(v[k] == tiny_value(i, (uint64_t)k), "%s[%lld] = %g, want %g",
                          tiny_tensors[i].name, (long long)k, v[k],
                          tiny_value(i, (uint64_t)k));
        free(v);
    }
}

static void tiny_roundtrip(uint32_t type, bool tied, bool with_kv)
{
    const char *dir = test_tmpdir();
    gb b = tiny_gguf(type, tied, with_kv);
    const char *path = test_path_in(dir, "tiny.gguf");
    test_write_file(path, b.p, b.n);
    free(b.p);
    test_alloc c;
    qkd_context *ctx = test_counting_context(&c, 1);
    long live = c.live;
    qkd_model *m = test_load_model(ctx, path);
    check_tiny(m, tied, with_kv);
    ck_assert_ptr_null(qkd_model_tokenizer(m)); /* no tokenizer.ggml.* keys */
    qkd_model_free(m);
    ck_assert_int_eq(c.live, live);
    qkd_context_free(ctx);
}

START_TEST(gguf_f32) { tiny_roundtrip(QKD__GGML_F32, false, true); }
END_TEST
START_TEST(gguf_f16) { tiny_roundtrip(QKD__GGML_F16, false, true); }
END_TEST
START_TEST(gguf_bf16) { tiny_roundtrip(QKD__GGML_BF16, true, true); }
END_TEST
START_TEST(gguf_defaults_tied) { tiny_roundtrip(QKD__GGML_F16, true, false); }
END_TEST

/* GGUF version 2 has the same layout and is read too. */
START_TEST(gguf_version2)
{
    gb b = tiny_gguf(QKD__GGML_F32, false, true);
    patch_u32(b.p + 4, 2);
    const char *path = test_path_in(test_tmpdir(), "v2.gguf");
    test_write_file(path, b.p, b.n);
    free(b.p);
    qkd_context *ctx = test_context(1);
    qkd_model *m = test_load_model(ctx, path);
    check_tiny(m, false, true);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* F16 and BF16 edge values through the reader itself: subnormals, the
 * largest half, signed zero, infinities and NaN. */
START_TEST(gguf_half_special_values)
{
    static const uint16_t half[] = {0x0000, 0x8000, 0x0001, 0x03ff, 0x0400, 0x3c00,
                                    0xc000, 0x7bff, 0x3555, 0x7c00, 0xfc00, 0x7e00};
    const float want_half[] = {0.0f, -0.0f, 5.9604644775390625e-8f, 6.0975551605224609e-5f,
                               6.103515625e-5f, 1.0f, -2.0f, 65504.0f, 0.333251953125f,
                               INFINITY, -INFINITY, NAN};
    static const uint16_t bf16[] = {0x3f80, 0xc040, 0x0001, 0x7f7f, 0x7f80, 0x7fc0};
    const float want_bf16[] = {1.0f, -3.0f, 9.1835496157991212e-41f, 3.3895313892515355e38f,
                               INFINITY, NAN};
    const size_t nh = sizeof half / 2, nb = sizeof bf16 / 2;
    gb b = {0};
    put(&b, "GGUF", 4);
    put_u32(&b, 3);
    put_u64(&b, 2);
    put_u64(&b, 0);
    put_str(&b, "h");
    put_u32(&b, 1);
    put_u64(&b, nh);
    put_u32(&b, QKD__GGML_F16);
    put_u64(&b, 0);
    put_str(&b, "b");
    put_u32(&b, 1);
    put_u64(&b, nb);
    put_u32(&b, QKD__GGML_BF16);
    put_u64(&b, 32);
    pad_to(&b, 32);
    put(&b, half, sizeof half);
    pad_to(&b, 32);
    put(&b, bf16, sizeof bf16);
    const char *path = test_path_in(test_tmpdir(), "special.gguf");
    test_write_file(path, b.p, b.n);
    free(b.p);

    qkd_context *ctx = test_context(1);
    qkd__gguf *g;
    ck_assert_int_eq(qkd__gguf_open(ctx, path, &g), QKD_OK);
    ck_assert_int_eq(qkd__gguf_n_tensors(g), 2);
    const qkd__gguf_tensor *t;
    float got[16];
    ck_assert_int_eq(qkd__gguf_find_tensor(g, "h", &t), QKD_OK);
    ck_assert_int_eq(qkd__gguf_read_f32(g, t, got, nh + 1), QKD_ERR_SHAPE);
    ck_assert_int_eq(qkd__gguf_read_f32(g, t, got, nh), QKD_OK);
    for (size_t i = 0; i < nh; i++) {
        if (isnan(want_half[i]))
            ck_assert_msg(isnan(got[i]), "half %04x -> %g", half[i], got[i]);
        else
            ck_assert_msg(got[i] == want_half[i] && signbit(got[i]) == signbit(want_half[i]),
                          "half %04x -> %g, want %g", half[i], got[i], want_half[i]);
    }
    ck_assert_int_eq(qkd__gguf_find_tensor(g, "b", &t), QKD_OK);
    ck_assert_int_eq(qkd__gguf_read_f32(g, t, got, nb), QKD_OK);
    for (size_t i = 0; i < nb; i++) {
        if (isnan(want_bf16[i]))
            ck_assert(isnan(got[i]));
        else
            ck_assert_msg(got[i] == want_bf16[i], "bf16 %04x -> %g", bf16[i], got[i]);
    }
    ck_assert_int_eq(qkd__gguf_find_tensor(g, "x", &t), QKD_ERR_NOT_FOUND);
    qkd__gguf_close(g);
    qkd_context_free(ctx);
}
END_TEST

/* The metadata getters on the tiny file: conversions, types, absences. */
START_TEST(gguf_metadata_getters)
{
    gb b = tiny_gguf(QKD__GGML_F32, false, true);
    const char *path = test_path_in(test_tmpdir(), "tiny.gguf");
    test_write_file(path, b.p, b.n);
    free(b.p);
    qkd_context *ctx = test_context(1);
    qkd__gguf *g;
    ck_assert_int_eq(qkd__gguf_open(ctx, path, &g), QKD_OK);
    uint32_t u;
    float f;
    const char *s;
    uint64_t len;
    ck_assert_int_eq(qkd__gguf_get_u32(g, "llama.block_count", &u), QKD_OK);
    ck_assert_uint_eq(u, 1);
    ck_assert_int_eq(qkd__gguf_get_u32(g, "no.such.key", &u), QKD_ERR_NOT_FOUND);
    ck_assert_int_eq(qkd__gguf_get_u32(g, "llama.rope.freq_base", &u), QKD_ERR_FORMAT);
    ck_assert_int_eq(qkd__gguf_get_f32(g, "llama.rope.freq_base", &f), QKD_OK);
    ck_assert_float_eq(f, 500000.0f);
    ck_assert_int_eq(qkd__gguf_get_f32(g, "general.architecture", &f), QKD_ERR_FORMAT);
    ck_assert_int_eq(qkd__gguf_get_str(g, "general.architecture", &s, &len), QKD_OK);
    ck_assert_uint_eq(len, 5);
    ck_assert_int_eq(memcmp(s, "llama", 5), 0);
    qkd__gguf_type et;
    uint64_t n;
    ck_assert_int_eq(qkd__gguf_get_arr(g, "test.array", &et, &n), QKD_OK);
    ck_assert_int_eq(et, QKD__GGUF_U32);
    ck_assert_uint_eq(n, 3);
    int32_t iv[3];
    float fv[3];
    ck_assert_int_eq(qkd__gguf_arr_i32(g, "test.array", iv, 3), QKD_OK);
    ck_assert_int_eq(iv[0], 0);
    ck_assert_int_eq(iv[2], 2);
    ck_assert_int_eq(qkd__gguf_arr_i32(g, "test.array", iv, 2), QKD_ERR_SHAPE);
    ck_assert_int_eq(qkd__gguf_arr_f32(g, "test.array", fv, 3), QKD_ERR_FORMAT);
    ck_assert_int_eq(qkd__gguf_arr_str(g, "test.array", 0, &s, &len), QKD_ERR_FORMAT);
    ck_assert_int_eq(qkd__gguf_get_arr(g, "llama.block_count", &et, &n), QKD_ERR_FORMAT);
    qkd__gguf_close(g);
    qkd_context_free(ctx);
}
END_TEST

/* String arrays in a real file: the tokenizer vocabulary. */
START_TEST(gguf_string_array)
{
    const char *path = test_shared(STORIES_GGUF);
    if (!path)
        return;
    qkd_context *ctx = test_context(1);
    qkd__gguf *g;
    ck_assert_int_eq(qkd__gguf_open(ctx, path, &g), QKD_OK);
    ck_assert_int_eq(qkd__gguf_n_tensors(g), 48);
    qkd__gguf_type et;
    uint64_t n, len;
    const char *s;
    ck_assert_int_eq(qkd__gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n), QKD_OK);
    ck_assert_int_eq(et, QKD__GGUF_STRING);
    ck_assert_uint_eq(n, 512);
    ck_assert_int_eq(qkd__gguf_arr_str(g, "tokenizer.ggml.tokens", 0, &s, &len), QKD_OK);
    ck_assert_uint_eq(len, 5);
    ck_assert_int_eq(memcmp(s, "<unk>", 5), 0);
    ck_assert_int_eq(qkd__gguf_arr_str(g, "tokenizer.ggml.tokens", 3, &s, &len), QKD_OK);
    ck_assert_uint_eq(len, 6);
    ck_assert_int_eq(memcmp(s, "<0x00>", 6), 0);
    ck_assert_int_eq(qkd__gguf_arr_str(g, "tokenizer.ggml.tokens", 512, &s, &len),
                     QKD_ERR_RANGE);
    const qkd__gguf_tensor *t;
    ck_assert_int_eq(qkd__gguf_find_tensor(g, "blk.3.ffn_down.weight", &t), QKD_OK);
    ck_assert_uint_eq(t->n_dims, 2);
    ck_assert_uint_eq(t->ne[0], 172);
    ck_assert_uint_eq(t->ne[1], 64);
    ck_assert_uint_eq(t->type, QKD__GGML_F32);
    qkd__gguf_close(g);
    qkd_context_free(ctx);
}
END_TEST

START_TEST(load_dispatch_errors)
{
    test_alloc c;
    qkd_context *ctx = test_counting_context(&c, 1);
    qkd_model *m = NULL;
    ck_assert_int_eq(qkd_model_load(NULL, "x", &m), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_model_load(ctx, NULL, &m), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_model_load(ctx, "x", NULL), QKD_ERR_INVALID_ARG);
    const char *dir = test_tmpdir();
    const char *missing = test_path_in(dir, "missing.bin");
    load_fails(ctx, &c, missing, QKD_ERR_IO, "missing file");
    assert_msg_has(ctx, "missing.bin");
    assert_msg_has(ctx, "No such file");
    test_write_file(test_path_in(dir, "empty.bin"), "", 0);
    load_fails(ctx, &c, test_path_in(dir, "empty.bin"), QKD_ERR_FORMAT, "empty file");
    assert_msg_has(ctx, "empty.bin");
    qkd_context_free(ctx);
}
END_TEST

/* ---- malformed input --------------------------------------------------- */

/* Cut the file at every 1/50th and at each of its first 64 bytes. */
static void truncations(const char *src, const char *name)
{
    size_t len;
    uint8_t *data = test_read_file(src, &len);
    const char *path = test_path_in(test_tmpdir(), name);
    test_alloc c;
    qkd_context *ctx = test_counting_context(&c, 1);
    for (size_t k = 0; k < 64 + 50; k++) {
        size_t cut = k < 64 ? k : (len * (k - 64)) / 50;
        char what[64];
        snprintf(what, sizeof what, "%s cut at %zu", name, cut);
        test_write_file(path, data, cut);
        load_fails(ctx, &c, path, QKD_OK, what);
    }
    qkd_context_free(ctx);
    free(data);
}

START_TEST(truncated_bin)
{
    const char *src = test_shared(STORIES_BIN);
    if (src)
        truncations(src, "cut.bin");
}
END_TEST

START_TEST(truncated_gguf)
{
    const char *src = test_shared(STORIES_GGUF);
    if (src)
        truncations(src, "cut.gguf");
}
END_TEST

/* A llama2.c header with one field changed, or the file resized. */
START_TEST(bad_llama2c_headers)
{
    const char *src = test_shared(STORIES_BIN);
    if (!src)
        return;
    static const struct { int field; int32_t value; } cases[] = {
        {0, 0}, {0, -64}, {0, 1 << 30}, {0, 63}, {1, 0}, {1, -1}, {1, INT32_MAX},
        {2, 0}, {2, -5}, {2, 100000}, {3, 0}, {3, -8}, {3, 7}, {4, 0}, {4, -4}, {4, 3},
        {4, 16}, {5, 0}, {5, INT32_MIN}, {5, -512}, {5, 513}, {6, 0}, {6, -512},
        {6, 513}, {6, INT32_MAX},
    };
    size_t len;
    uint8_t *data = test_read_file(src, &len);
    const char *dir = test_tmpdir();
    const char *path = test_path_in(dir, "bad.bin");
    test_alloc c;
    qkd_context *ctx = test_counting_context(&c, 1);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint8_t *copy = test_memdup(data, len);
        patch_u32(copy + 4 * cases[i].field, (uint32_t)cases[i].value);
        test_write_file(path, copy, len);
        free(copy);
        char what[64];
        snprintf(what, sizeof what, "header field %d = %d", cases[i].field, cases[i].value);
        load_fails(ctx, &c, path, QKD_ERR_FORMAT, what);
        assert_msg_has(ctx, "bad.bin");
    }
    /* Four bytes too many: the message gives both sizes. */
    uint8_t *longer = calloc(len + 4, 1);
    ck_assert_ptr_nonnull(longer);
    memcpy(longer, data, len);
    test_write_file(path, longer, len + 4);
    free(longer);
    load_fails(ctx, &c, path, QKD_ERR_FORMAT, "4 bytes too long");
    assert_msg_has(ctx, "1056540");
    assert_msg_has(ctx, "1056544");
    qkd_context_free(ctx);
    free(data);
}
END_TEST

/* Header fields of the real GGUF. */
START_TEST(bad_gguf_headers)
{
    const char *src = test_shared(STORIES_GGUF);
    if (!src)
        return;
    static const struct { size_t at; int width; uint64_t value; qkd_status want;
                          const char *msg; } cases[] = {
        {0, 4, 0x58554747, QKD_OK, NULL},          /* "GGUX": taken for llama2.c */
        {4, 4, 1, QKD_ERR_UNSUPPORTED, "version 1"},
        {4, 4, 4, QKD_ERR_UNSUPPORTED, "version 4"},
        {4, 4, 0x03000000, QKD_ERR_UNSUPPORTED, "version"}, /* big-endian GGUF */
        {8, 8, 1ull << 60, QKD_ERR_FORMAT, "tensor count"},
        {8, 8, 0, QKD_ERR_FORMAT, "token_embd"},  /* no tensors at all */
        {16, 8, 1ull << 60, QKD_ERR_FORMAT, "metadata count"},
        {16, 8, UINT64_MAX, QKD_ERR_FORMAT, "metadata count"},
        {24, 8, 1ull << 62, QKD_ERR_FORMAT, "metadata key"},
        {24, 8, 0, QKD_ERR_FORMAT, "key"},
    };
    size_t len;
    uint8_t *data = test_read_file(src, &len);
    const char *path = test_path_in(test_tmpdir(), "bad.gguf");
    test_alloc c;
    qkd_context *ctx = test_counting_context(&c, 1);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint8_t saved[8];
        memcpy(saved, data + cases[i].at, 8);
        if (cases[i].width == 4)
            patch_u32(data + cases[i].at, (uint32_t)cases[i].value);
        else
            patch_u64(data + cases[i].at, cases[i].value);
        test_write_file(path, data, len);
        memcpy(data + cases[i].at, saved, 8);
        char what[64];
        snprintf(what, sizeof what, "gguf case %zu", i);
        load_fails(ctx, &c, path, cases[i].want, what);
        if (cases[i].msg)
            assert_msg_has(ctx, cases[i].msg);
    }
    qkd_context_free(ctx);
    free(data);
}
END_TEST

/* Structural damage to the tiny GGUF, found by the strings it contains. */
typedef enum patch_kind { P_U32_AFTER, P_U64_AFTER, P_BYTES } patch_kind;

static const struct {
    const char *anchor; /* patch relative to the end of this string... */
    long delta;         /* ...plus delta bytes */
    patch_kind kind;
    uint64_t value;
    const char *bytes;
    qkd_status want;
    const char *msg;
} tiny_cases[] = {
    /* tensor infos: name, then n_dims (u32), ne (u64 each), type, offset */
    {"token_embd.weight", 0, P_U32_AFTER, 9, NULL, QKD_ERR_FORMAT, "dimensions"},
    {"token_embd.weight", 0, P_U32_AFTER, 0, NULL, QKD_ERR_FORMAT, "dimensions"},
    {"token_embd.weight", 4, P_U64_AFTER, 1ull << 62, NULL, QKD_ERR_FORMAT, "overflow"},
    {"token_embd.weight", 4, P_U64_AFTER, 1ull << 40, NULL, QKD_ERR_FORMAT, "past the end"},
    {"token_embd.weight", 4, P_U64_AFTER, 0, NULL, QKD_ERR_FORMAT, "dimension"},
    {"token_embd.weight", 20, P_U32_AFTER, 10, NULL, QKD_ERR_UNSUPPORTED, "Q2_K"},
    {"token_embd.weight", 20, P_U32_AFTER, 2, NULL, QKD_ERR_FORMAT, "blocks of type Q4_0"},
    {"token_embd.weight", 20, P_U32_AFTER, 1000, NULL, QKD_ERR_UNSUPPORTED, "1000"},
    {"output.weight", 24, P_U64_AFTER, 1ull << 40, NULL, QKD_ERR_FORMAT, "past the end"},
    {"output.weight", 24, P_U64_AFTER, UINT64_MAX - 31, NULL, QKD_ERR_FORMAT, "past the end"},
    {"output.weight", 24, P_U64_AFTER, 8, NULL, QKD_ERR_FORMAT, "alignment"},
    {"blk.0.attn_q.weight", 12, P_U64_AFTER, 4, NULL, QKD_ERR_FORMAT, "attn_q"},
    {"blk.0.attn_v", -1, P_BYTES, 0, "k", QKD_ERR_FORMAT, "duplicate tensor"},
    {"blk.0.ffn_up", -2, P_BYTES, 0, "X", QKD_ERR_FORMAT, "ffn_up"},
    {"token_embd.weight", -1, P_BYTES, 0, "\0", QKD_ERR_FORMAT, "NUL"},
    /* metadata */
    {"general.architecture", 12, P_BYTES, 0, "gpt2x", QKD_ERR_UNSUPPORTED, "gpt2x"},
    {"general.architecture", 4, P_U64_AFTER, 1ull << 62, NULL, QKD_ERR_FORMAT, "string"},
    {"general.architecture", 0, P_U32_AFTER, 13, NULL, QKD_ERR_FORMAT, "unknown value type"},
    {"general.alignment", 4, P_U32_AFTER, 3, NULL, QKD_ERR_FORMAT, "power of two"},
    {"general.alignment", 4, P_U32_AFTER, 0, NULL, QKD_ERR_FORMAT, "power of two"},
    {"general.alignment", 0, P_U32_AFTER, QKD__GGUF_F32, NULL, QKD_ERR_FORMAT, "alignment"},
    {"llama.block_count", -1, P_BYTES, 0, "X", QKD_ERR_FORMAT, "block_count"},
    {"llama.block_count", 4, P_U32_AFTER, 0, NULL, QKD_ERR_FORMAT, "block_count"},
    {"llama.block_count", 4, P_U32_AFTER, 3, NULL, QKD_ERR_FORMAT, "blk.1"},
    {"llama.embedding_length", 4, P_U32_AFTER, 16, NULL, QKD_ERR_FORMAT, "token_embd"},
    {"llama.attention.head_count", 4, P_U32_AFTER, 3, NULL, QKD_ERR_FORMAT, ""},
    {"llama.attention.head_count_kv", 4, P_U32_AFTER, 2, NULL, QKD_ERR_FORMAT, "attn_k"},
    {"llama.context_length", 4, P_U32_AFTER, 0x80000000u, NULL, QKD_ERR_FORMAT, "context"},
    {"llama.rope.freq_base", 0, P_U32_AFTER, QKD__GGUF_STRING, NULL, QKD_ERR_FORMAT, ""},
    {"test.array", 4, P_U32_AFTER, QKD__GGUF_ARRAY, NULL, QKD_ERR_UNSUPPORTED, "nested"},
    {"test.array", 4, P_U32_AFTER, 77, NULL, QKD_ERR_FORMAT, "element type"},
    {"test.array", 8, P_U64_AFTER, 1ull << 61, NULL, QKD_ERR_FORMAT, "array length"},
    {"test.array", 4, P_U32_AFTER, QKD__GGUF_STRING, NULL, QKD_ERR_FORMAT, ""},
    {"test.array", 0, P_U32_AFTER, QKD__GGUF_U64, NULL, QKD_ERR_FORMAT, ""},
    /* n_kv one short (offset 16): the last key is taken for a tensor info */
    {"general.architecture", -36, P_U64_AFTER, 10, NULL, QKD_ERR_FORMAT, "dimensions"},
};

START_TEST(bad_gguf_structure)
{
    gb tiny = tiny_gguf(QKD__GGML_F32, false, true);
    const char *path = test_path_in(test_tmpdir(), "tiny-bad.gguf");
    test_alloc c;
    qkd_context *ctx = test_counting_context(&c, 1);
    for (size_t i = 0; i < sizeof tiny_cases / sizeof tiny_cases[0]; i++) {
        uint8_t *p = test_memdup(tiny.p, tiny.n);
        size_t at = find_bytes(p, tiny.n, tiny_cases[i].anchor) +
                    strlen(tiny_cases[i].anchor) + (size_t)tiny_cases[i].delta;
        if (tiny_cases[i].kind == P_U32_AFTER)
            patch_u32(p + at, (uint32_t)tiny_cases[i].value);
        else if (tiny_cases[i].kind == P_U64_AFTER)
            patch_u64(p + at, tiny_cases[i].value);
        else
            memcpy(p + at, tiny_cases[i].bytes, strlen(tiny_cases[i].bytes) + 
                   (tiny_cases[i].bytes[0] == '\0'));
        test_write_file(path, p, tiny.n);
        free(p);
        char what[64];
        snprintf(what, sizeof what, "tiny case %zu", i);
        load_fails(ctx, &c, path, tiny_cases[i].want, what);
        assert_msg_has(ctx, tiny_cases[i].msg);
    }
    qkd_context_free(ctx);
    free(tiny.p);
}
END_TEST

/* Seeded random bytes: bare, behind a GGUF header with small counts, and
 * behind the stories260K llama2.c header. All must fail cleanly. */
START_TEST(random_garbage)
{
    const char *path = test_path_in(test_tmpdir(), "garbage");
    test_alloc c;
    qkd_context *ctx = test_counting_context(&c, 1);
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    static const int32_t stories_header[7] = {64, 172, 5, 8, 4, 512, 512};
    for (int i = 0; i < 300; i++) {
        size_t len = (size_t)(xorshift(&seed) % 4096);
        uint8_t *p = malloc(len + 64);
        ck_assert_ptr_nonnull(p);
        for (size_t k = 0; k < len + 64; k++)
            p[k] = (uint8_t)xorshift(&seed);
        int variant = i % 3;
        if (variant == 1) {
            memcpy(p, "GGUF", 4);
            patch_u32(p + 4, 3);
            patch_u64(p + 8, xorshift(&seed) % 4);
            patch_u64(p + 16, xorshift(&seed) % 4);
            patch_u64(p + 24, xorshift(&seed) % 32); /* a key length that fits */
            len += 24;
        } else if (variant == 2) {
            memcpy(p, stories_header, sizeof stories_header);
            len += 28;
        }
        test_write_file(path, p, len);
        free(p);
        char what[64];
        snprintf(what, sizeof what, "garbage %d (%zu bytes)", i, len);
        load_fails(ctx, &c, path, QKD_OK, what);
    }
    qkd_context_free(ctx);
}
END_TEST

/* Random byte damage in the metadata of the real GGUF: may still load
 * (a damaged token text is valid) but never crashes or leaks. */
START_TEST(gguf_byte_flips)
{
    const char *src = test_shared(STORIES_GGUF);
    if (!src)
        return;
    size_t len;
    uint8_t *data = test_read_file(src, &len);
    const char *path = test_path_in(test_tmpdir(), "flip.gguf");
    test_alloc c;
    qkd_context *ctx = test_counting_context(&c, 1);
    uint64_t seed = 12345;
    int failed = 0;
    for (int i = 0; i < 150; i++) {
        uint8_t *p = test_memdup(data, len);
        for (int k = 0; k < 4; k++)
            p[xorshift(&seed) % 8192] ^= (uint8_t)(1u << (xorshift(&seed) % 8));
        test_write_file(path, p, len);
        free(p);
        long live = c.live;
        qkd_model *m = NULL;
        qkd_status s = qkd_model_load(ctx, path, &m);
        if (s == QKD_OK) {
            qkd_model_free(m);
        } else {
            failed++;
            ck_assert_ptr_null(m);
            ck_assert(qkd_context_last_error(ctx)[0] != '\0');
        }
        ck_assert_int_eq(c.live, live);
    }
    ck_assert_int_gt(failed, 0);
    qkd_context_free(ctx);
    free(data);
}
END_TEST

/* Every allocation of a GGUF load fails in turn: NO_MEMORY (or another
 * error) with a message, and nothing leaks. */
START_TEST(allocation_failures)
{
    gb tiny = tiny_gguf(QKD__GGML_BF16, false, true);
    const char *path = test_path_in(test_tmpdir(), "tiny.gguf");
    test_write_file(path, tiny.p, tiny.n);
    free(tiny.p);
    test_alloc c;
    qkd_context *ctx = test_counting_context(&c, 1);
    bool loaded = false;
    for (long k = 0; k < 10000 && !loaded; k++) {
        long live = c.live;
        test_alloc_fail_in(&c, k, 0);
        qkd_model *m = NULL;
        qkd_status s = qkd_model_load(ctx, path, &m);
        c.fail_at = -1;
        loaded = s == QKD_OK;
        if (loaded) {
            qkd_model_free(m);
        } else {
            ck_assert_msg(s == QKD_ERR_NO_MEMORY, "failing allocation %ld: %s (%s)", k,
                          qkd_status_name(s), qkd_context_last_error(ctx));
            ck_assert_ptr_null(m);
        }
        ck_assert_msg(c.live == live, "failing allocation %ld leaked %ld", k, c.live - live);
    }
    ck_assert(loaded);
    qkd_context_free(ctx);
}
END_TEST

Suite *suite_loaders(void)
{
    Suite *s = suite_create("loaders");
    TCase *tc = tcase_create("stories260K");
    tcase_add_test(tc, stories_bin_and_gguf_agree);
    tcase_add_test(tc, stories_bin_raw_offsets);
    tcase_add_test(tc, gguf_string_array);
    suite_add_tcase(s, tc);

    tc = tcase_create("gguf");
    tcase_add_test(tc, gguf_f32);
    tcase_add_test(tc, gguf_f16);
    tcase_add_test(tc, gguf_bf16);
    tcase_add_test(tc, gguf_defaults_tied);
    tcase_add_test(tc, gguf_version2);
    tcase_add_test(tc, gguf_half_special_values);
    tcase_add_test(tc, gguf_metadata_getters);
    tcase_add_test(tc, load_dispatch_errors);
    suite_add_tcase(s, tc);

    tc = tcase_create("malformed");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, truncated_bin);
    tcase_add_test(tc, truncated_gguf);
    tcase_add_test(tc, bad_llama2c_headers);
    tcase_add_test(tc, bad_gguf_headers);
    tcase_add_test(tc, bad_gguf_structure);
    tcase_add_test(tc, random_garbage);
    tcase_add_test(tc, gguf_byte_flips);
    tcase_add_test(tc, allocation_failures);
    suite_add_tcase(s, tc);
    return s;
}
